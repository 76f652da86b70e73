"""Sweeps over training runs in one command: reconstruct each post-hoc EMA network, measure it, plot the results.

Example: python sweep_phema.py --indir=runs/00000 --outdir=sweep --outstd=0.010,0.015,...,0.250 --ref=REF.pkl \\
             --metrics=fid --num=50000
Each point is reconstructed by training.posthoc.reconstruct_phema (as reconstruct_phema.py does) and measured by
metrics.stats.calculate_stats_for_network (as `calculate_metrics.py gen` does), so it gets their file names and
numbers. The library function is metrics.sweeps.sweep().
"""

import click

from metrics import MetricsError
from metrics.options import detector_kwargs, generation_options, metrics_options, seeds_to_measure
from networks.loading import NetworkFileError
from torch_utils import cli
from torch_utils import distributed as dist
from training import posthoc
from training.encoders import VAEError, vae_error_line, vae_option_problem
from metrics.sweeps import KEY_FIELDS, SweepError, describe_point, fields_help, parse_kimg_list, sweep

FIELDS_EPILOG = (f'\b\nFields of each results.jsonl line (the first {len(KEY_FIELDS)} identify the point when '
                 f'resuming):\n' + '\n'.join('  ' + line for line in fields_help()))

#----------------------------------------------------------------------------

@click.command(epilog=FIELDS_EPILOG)
# Main options.
@click.option('--indir', 'indirs', help='Training run with snapshots; repeat for one curve per run', metavar='DIR',
              type=str, required=True, multiple=True)
@click.option('--outdir', help='Where results.jsonl, the pictures and the reconstructions go', metavar='DIR',
              type=str, required=True)
@click.option('--outstd', help='EMA lengths to measure, e.g. 0.010,0.015,...,0.250', metavar='LIST',
              type=cli.Parsed(posthoc.parse_std_list), required=True)
@click.option('--ref', 'ref_path', help='Reference statistics', metavar='PKL|NPZ|URL', type=str, required=True)
@metrics_options
# Training times.
@click.option('--outkimg', help='Training times to measure: kimg list, or all snapshots  [default: latest]',
              metavar='LIST|all', type=cli.Parsed(parse_kimg_list), default=None)
@click.option('--points', help='Keep about this many training times, spread evenly over the run  '
              '[default: all chosen]', metavar='INT', type=click.IntRange(min=1), default=None)
# Reconstruction.
@click.option('--inprefix', help='Use only inputs whose name prefix is this  [default: the one prefix in --indir, '
              'reconstructions aside]', metavar='STR', type=str, default=None)
@click.option('--instd', help='Use only inputs with these stds, e.g. 0.050,0.100', metavar='LIST',
              type=cli.Parsed(posthoc.parse_std_list), default=None)
@click.option('--outprefix', help='File name prefix of the reconstructions', metavar='STR', type=str,
              default='phema', show_default=True)
@click.option('--keep-networks', help='Keep the reconstructed networks (deleted once measured otherwise)',
              is_flag=True)
# Generation.
@generation_options(num_help='Number of images to generate per point', sweep=True)
@click.option('--gstd', 'guide_std', help='Guide EMA lengths when --gnet is a training run, e.g. 0.050,0.100',
              metavar='LIST', type=cli.Parsed(posthoc.parse_std_list), default=None)
@click.option('--gkimg', 'guide_kimg', help='Training time of the guide when --gnet is a training run  '
              '[default: its latest snapshot]', metavar='KIMG', type=click.IntRange(min=1), default=None)
# Performance.
@click.option('--batch', 'max_batch_size', help='Maximum generation batch size per process', metavar='INT',
              type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--phema-batch', help='Reconstructions per pass over the snapshots', metavar='INT',
              type=click.IntRange(min=1), default=8, show_default=True)
def cmdline(indirs, outdir, outstd, ref_path, metrics, detector, dinov2, outkimg, points, inprefix, instd, outprefix,
         keep_networks, num_images, seed, seeds, gnet, guidance, edm2_exact, vae, guide_std, guide_kimg,
         max_batch_size, phema_batch):
    """Measure post-hoc EMA networks of training runs and plot the metric: against the EMA length, along training
    (against images, wall time and compute), against the guidance weight.

    \b
    # FID-50K of 49 EMA lengths of one run, 8 GPUs sharing each point's images (torchrun reads --num as its
    # own --numa-binding: give --seeds under torchrun):
    torchrun --standalone --nproc_per_node=8 sweep_phema.py --indir=runs/00000 --outdir=sweep \\
        --outstd=0.010,0.015,...,0.250 --ref=dataset-refs/img64.pkl --metrics=fid --seeds=0-49999
    \b
    # Two runs as two curves on one plot (e.g. CONFIG A against G*):
    python sweep_phema.py --indir=runs/A --indir=runs/G --outdir=sweep --outstd=0.05,0.10,...,0.25 --ref=REF.pkl
    \b
    # Along training: 8 snapshots spread over each run, 2 EMA lengths (the best one at each time is drawn):
    python sweep_phema.py --indir=runs/A --indir=runs/G --outdir=along --outstd=0.05,0.10 --points=8 \\
        --ref=REF.pkl --metrics=fid --num=10000
    \b
    # Autoguidance search: the guide is an earlier snapshot of a smaller run, at its own EMA lengths:
    python sweep_phema.py --indir=runs/S --outdir=guided --outstd=0.05,0.10 --gnet=runs/XS --gkimg=134217 \\
        --gstd=0.05,0.10,0.15 --guidance=1.2,1.4,1.7,2.0 --ref=REF.pkl --metrics=fid --num=10000

    Writes <outdir>/results.jsonl (one line per run, training time, EMA length, guide setting and metric) and
    the pictures: sweep.png (the first metric against sigma_rel at each run's latest measured time, best marked),
    guidance.png (against the guidance weight, one curve per guide EMA length) when several weights are
    measured, and along-images.png, along-time.png and along-compute.png (along training, the best value at each
    time) when a run is measured at several times; -<metric> before .png for the other metrics. While a point is
    measured its network is <outdir>/<run>/<outprefix>-<kimg>-<std>.pkl. Rerun the same command to resume: points
    already in results.jsonl with the same setting (and the same --ref file) are skipped; moving the folders keeps
    that. Under torchrun, <outdir> must be visible to every process; one sweep at a time may use it.

    The snapshots and --gnet are network pickles, which run the Python code stored inside them when loaded: load
    only pickles you trust (a --gnet file may also be in the weights-only .pt format of "python -m networks.export",
    which never runs code).
    """
    seeds = seeds_to_measure(num_images, seed, seeds, gnet, guidance)
    problem = vae_option_problem(vae)  # before any reconstruction
    if problem is not None:
        raise cli.CliError(problem)
    cli.check_output_dir(outdir)

    with dist.process_group() as device, cli.os_errors(outdir):
        try:
            result = sweep(list(indirs), outdir, outstd, ref_path, metrics=metrics, seeds=seeds, out_kimg=outkimg,
                           points=points, gnet=gnet, guide_std=guide_std, guide_kimg=guide_kimg, guidance=guidance,
                           max_batch_size=max_batch_size, in_prefix=inprefix, in_std=instd, out_prefix=outprefix,
                           phema_batch=phema_batch, keep_networks=keep_networks, device=device,
                           edm2_exact=edm2_exact, vae=vae, detector_kwargs=detector_kwargs(detector, dinov2))
        except (SweepError, MetricsError, NetworkFileError, ValueError, MemoryError, dist.RunDirBusyError) as e:
            raise cli.CliError(str(e)) from None
        except VAEError as e:
            raise cli.CliError(vae_error_line(e, vae, 'the VAE that the networks name')) from None
        if dist.get_rank() == 0:
            for metric, runs in result.best.items():
                for label, record in runs.items():
                    print(f'{label}: best {metric} {record["value"]:.4g} at {describe_point(record)}')
            print(f'{result.measured} points measured in {result.sec / 60:.1f} min. Results: {result.results}; '
                  f'pictures: {", ".join(result.plots)}')

if __name__ == '__main__':
    cli.run(cmdline)
