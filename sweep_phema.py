"""Post-hoc EMA sweep in one command: reconstruct each EMA length, measure it, and plot the metric against σ_rel.

Example: python sweep_phema.py --indir=runs/00000 --outdir=sweep --outstd=0.010,0.015,...,0.250 --ref=REF.pkl \\
             --metrics=fid --num=50000
Each point is reconstructed by training.posthoc.reconstruct_phema (as reconstruct_phema.py does) and measured by
metrics.stats.calculate_stats_for_network (as `calculate_metrics.py gen` does), so it gets their file names and
numbers. The library function is `sweep()`.
"""

import contextlib
import hashlib
import json
import os
import tempfile
import warnings

import click
import scipy.linalg
import torch
import tqdm

import dnnlib
from figures.charts import sweep_plot
from metrics import MetricsError
from metrics.options import detector_kwargs, generation_options, metrics_options, seeds_to_measure
from metrics.detectors import get_detector
from metrics.stats import (calculate_metrics_from_stats, calculate_stats_for_network, check_reference, load_stats,
                           parse_metric_list)
from networks.loading import NetworkFileError
from torch_utils import cli
from torch_utils import distributed as dist
from torch_utils.cli import parse_int_list
from torch_utils import misc
from training import posthoc

RESULTS_NAME = 'results.jsonl'
PLOT_NAME = 'sweep.png'


class SweepError(Exception):
    """A user-facing problem; the message is one line naming the option or file concerned."""

#----------------------------------------------------------------------------
# Runs: the training runs whose EMA lengths are swept, one curve each.

def find_runs(indirs, outdir, in_prefix='network-snapshot', in_std=None, out_kimg=None, out_prefix='phema'):
    """EasyDict(label, indir, in_pkls, out_nimg, net_dir) per run. `indirs`: a list of folders (labelled by their
    names) or a dict label -> folder. Reconstructions of a run go to <outdir>/<label>/."""
    if not isinstance(indirs, dict):
        indirs = {os.path.basename(os.path.normpath(d)): d for d in _unique_folders(indirs)}
    runs = []
    for label, indir in indirs.items():
        if not os.path.isdir(indir):
            raise SweepError(f'--indir={indir}: no such directory')
        try:
            in_pkls = [p for p in posthoc.list_input_pickles(indir, in_prefix=in_prefix, in_std=in_std) if p.nimg > 0]
        except ValueError as e:
            raise SweepError(f'--indir={indir}: {e}') from None
        if not in_pkls:
            raise SweepError(f'--indir={indir}: no {in_prefix or "<prefix>"}-<kimg>-<std>.pkl snapshots after the '
                             f'start of training')
        if len({(p.nimg, p.std) for p in in_pkls}) != len(in_pkls):
            raise SweepError(f'--indir={indir}: several snapshots share a time and std; choose one run with '
                             f'--inprefix')
        if out_kimg is None:
            out_nimg = max(p.nimg for p in in_pkls)
        else:
            matches = [p.nimg for p in in_pkls if p.nimg // 1000 == out_kimg]
            if not matches:
                raise SweepError(f'--outkimg={out_kimg}: {indir} has no snapshots at that time')
            out_nimg = matches[0]
        runs.append(dnnlib.EasyDict(label=label, indir=indir, in_pkls=in_pkls, out_nimg=out_nimg,
                                    net_dir=os.path.join(outdir, _safe_name(label)), out_prefix=out_prefix))
    return runs


def _unique_folders(indirs):
    names = {}
    for d in indirs:
        name = os.path.basename(os.path.normpath(d))
        if name in names and os.path.abspath(names[name]) != os.path.abspath(d):
            raise SweepError(f'--indir={d}: has the same name as --indir={names[name]}; each run is labelled by '
                             f'its folder name, so give the runs different names')
        names[name] = d
    return list(names.values())


def _safe_name(label):
    return ''.join(c if c.isalnum() or c in '-_.' else '_' for c in label) or 'run'


def check_outdir(outdir):
    """Create the output folder and prove that it is writable, before any work is done."""
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise SweepError(f'--outdir={outdir}: exists and is not a directory')
    try:
        os.makedirs(outdir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix='.write-test-', dir=outdir)
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise SweepError(f'--outdir={outdir}: not writable ({e.strerror or e})') from None

#----------------------------------------------------------------------------
# Results: one JSON line per (run, EMA length, metric). The whole file is rewritten under a temporary name and
# renamed, so a kill at any moment leaves either the old or the new file, never a torn line.

def read_records(path):
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, encoding='utf-8') as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise SweepError(f'{path}: line {i + 1} is not JSON; fix or remove it') from None
            if not isinstance(record, dict):
                raise SweepError(f'{path}: line {i + 1} is not a JSON object')
            records.append(record)
    return records


def append_records(path, new_records):
    lines = [json.dumps(r) for r in read_records(path) + list(new_records)]
    with dnnlib.util.atomic_write(path, 'w') as f:
        f.write(''.join(line + '\n' for line in lines))


def _setting(run, std, metric, measure):
    """The fields that identify a measured point: an equal record means the point need not be measured again."""
    return dict(run=run.label, indir=os.path.abspath(run.indir), kimg=run.out_nimg // 1000, std=round(std, 3),
                metric=metric, **measure)


def _where(path):
    return path if dnnlib.util.is_url(path) else os.path.abspath(path)


# Keys that records written before they existed lack; such a record matches any value (it cannot tell).
_LATER_KEYS = ('ref_sha256',)

def _same(record, setting, ignore=()):
    keys = set(setting) | {'edm2_exact'}  # present only when set: a default point must not match an exact one
    return all(record.get(k) == setting.get(k) for k in keys
               if k not in ignore and not (k in _LATER_KEYS and k not in record))


def ref_fingerprint(ref_path):
    """SHA-256 of the reference statistics file: a point measured against other statistics is measured again."""
    digest = hashlib.sha256()
    with dnnlib.util.open_url(ref_path, verbose=False) as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def plot_results(outdir, records, runs, metrics, measure):
    """Redraw sweep.png (first metric; sweep-<metric>.png for the others) from the records of this setting.
    Returns {metric: {label: (best_std, best_value)}}."""
    best = {}
    for k, metric in enumerate(metrics):
        curves = {}
        for run in runs:
            setting = _setting(run, 0, metric, measure)
            points = {r['std']: r['value'] for r in records if _same(r, setting, ignore=('std',))}
            if points:
                curves[run.label] = points
        if not curves:
            continue
        path = os.path.join(outdir, PLOT_NAME if k == 0 else f'sweep-{metric}.png')
        title = f'{metric}, {measure["num_images"]} images per point'
        best[metric] = sweep_plot(path, curves, metric=metric, title=title)
    return best

#----------------------------------------------------------------------------
# Process group: rank 0 decides and writes; every rank generates its share of each point's images.

def on_rank0(fn):
    """Run fn() on rank 0 only and give its (small, picklable) result to every rank. An error is raised on rank 0;
    the other ranks stop quietly."""
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as e:  # pylint: disable=broad-except
            error = e
    if not dist.broadcast_bool(error is None):
        if error is not None:
            raise error
        raise SystemExit(1)
    if dist.is_distributed():
        box = [result]
        torch.distributed.broadcast_object_list(box, src=0)
        result = box[0]
    return result

#----------------------------------------------------------------------------
# One point.

def measure_network(net_path, ref, metrics, seeds, gnet=None, guidance=1, max_batch_size=32, device=None,
                    detector_kwargs=None, detectors=None, progress=True, edm2_exact=False):
    """{metric: value} of the images `net_path` generates for `seeds` (rank 0; None on the other ranks)."""
    stats_iter = calculate_stats_for_network(net_path, seeds, gnet=gnet, guidance=guidance,
                                             max_batch_size=max_batch_size, device=device, verbose=False,
                                             edm2_exact=edm2_exact,
                                             metrics=metrics, detectors=detectors, detector_kwargs=detector_kwargs)
    stats = None
    with tqdm.tqdm(total=len(seeds), unit='img', desc='images', leave=False, dynamic_ncols=True,
                   disable=not progress or dist.get_rank() != 0) as bar:
        for result in stats_iter:
            if result.images is not None:  # this rank's share; the others run batches of the same size
                bar.update(min(result.images.shape[0] * dist.get_world_size(), bar.total - bar.n))
            stats = result.stats
    if dist.get_rank() != 0:
        return None
    with warnings.catch_warnings():
        # With fewer images than features both covariances are singular; scipy warns at every such point, and the
        # square root FID needs is still well defined.
        warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)
        return calculate_metrics_from_stats(stats, ref, metrics, verbose=False)

#----------------------------------------------------------------------------
# The sweep.

def sweep(indirs, outdir, out_std, ref_path, metrics=('fid',), seeds=range(50000), gnet=None, guidance=1,
          max_batch_size=32, in_prefix='network-snapshot', in_std=None, out_kimg=None, out_prefix='phema',
          phema_batch=8, keep_networks=False, device=None, detector_kwargs=None, detectors=None, verbose=True,
          edm2_exact=False):
    """Reconstruct, measure and plot every EMA length of `out_std` for every run of `indirs` (a list of folders or
    a dict label -> folder), skipping points that <outdir>/results.jsonl already holds for the same setting.

    Per point: the reconstruction <outdir>/<run>/<out_prefix>-<kimg>-<std>.pkl (deleted after measuring unless
    `keep_networks`), its metrics appended to results.jsonl, sweep.png redrawn. Under torchrun, rank 0
    reconstructs and writes; all ranks generate. `edm2_exact` measures with EDM2's exact op sequence (a setting of
    its own in results.jsonl). Returns {metric: {run label: (best std, best value)}} on rank 0.
    """
    metrics = parse_metric_list(metrics)
    seeds = parse_int_list(seeds)
    if len(seeds) < 2:
        raise SweepError('at least 2 seeds are needed to compute statistics')
    out_std = posthoc.parse_std_list(out_std)
    results_path = os.path.join(outdir, RESULTS_NAME)
    contiguous = seeds == list(range(seeds[0], seeds[0] + len(seeds)))
    measure = dict(num_images=len(seeds), seed=seeds[0], seeds=None if contiguous else seeds,
                   ref=_where(ref_path), gnet=gnet and _where(gnet),
                   guidance=float(guidance) if gnet is not None else 1.0)
    if edm2_exact:  # a key only when set, so that earlier results.jsonl files keep matching the default
        measure['edm2_exact'] = True
    say = tqdm.tqdm.write if verbose and dist.get_rank() == 0 else (lambda *_: None)

    # Everything a user can get wrong is checked before the first reconstruction.
    ref = None

    release_lock = lambda: None

    def prepare():
        nonlocal ref, release_lock
        if gnet is not None and not dnnlib.util.is_url(gnet) and not os.path.isfile(gnet):
            raise SweepError(f'--gnet={gnet}: no such network file')
        runs = find_runs(indirs, outdir, in_prefix, in_std, out_kimg, out_prefix)
        for run in runs:  # a reconstruction must not replace (and, once measured, delete) one of its inputs
            posthoc.check_outputs_not_inputs(run.in_pkls, run.net_dir, run.out_prefix, run.out_nimg, out_std)
        for output in (results_path, os.path.join(outdir, PLOT_NAME)):
            reason = cli.input_overwrite(output, {'--ref': ref_path, '--gnet': gnet})
            if reason is not None:
                raise SweepError(reason)
        ref = load_stats(ref_path, verbose=False)
        missing = [m for m in metrics if m not in ref]
        if missing:
            raise SweepError(f'--ref={ref_path}: holds no statistics for {", ".join(missing)}')
        ready = {m: (detectors or {}).get(m) or get_detector(m, verbose=False, device=_device(device),
                                                             **(detector_kwargs or {}).get(m, {})) for m in metrics}
        check_reference(ref, metrics, f'--ref={ref_path}', ready)  # the detectors give the reference's widths
        measure['ref_sha256'] = ref_fingerprint(ref_path)
        check_outdir(outdir)  # created only once every input has been read
        release_lock = dist.acquire_run_dir(outdir, 'sweep.lock', what='sweep')  # one sweep writes results.jsonl
        records = read_records(results_path)
        todo = [(i, std) for i, run in enumerate(runs) for std in out_std
                if not all(any(_same(r, _setting(run, std, m, measure)) for r in records) for m in metrics)]
        return runs, todo, len(records)
    runs, todo, num_old = on_rank0(prepare)
    try:
        return _sweep_points(runs, todo, num_old, outdir, out_std, ref, metrics, seeds, gnet, guidance, max_batch_size,
                             phema_batch, keep_networks, device, detector_kwargs, detectors, verbose, edm2_exact,
                             measure, say)
    finally:
        release_lock()


def _device(device):
    return torch.device(device) if device is not None else dist.device()


def _sweep_points(runs, todo, num_old, outdir, out_std, ref, metrics, seeds, gnet, guidance, max_batch_size,
                  phema_batch, keep_networks, device, detector_kwargs, detectors, verbose, edm2_exact, measure, say):
    """The measuring part of sweep(): every point of `todo`, then the plot."""
    results_path = os.path.join(outdir, RESULTS_NAME)
    total = len(runs) * len(out_std)
    say(f'{total - len(todo)} of {total} points already measured in {results_path}; {len(todo)} to go.')

    best = {}
    with tqdm.tqdm(total=total, initial=total - len(todo), unit='point', desc='points', dynamic_ncols=True,
                   disable=not verbose or dist.get_rank() != 0) as bar:
        for i, run in enumerate(runs):
            stds = [std for j, std in todo if j == i]
            for start in range(0, len(stds), phema_batch):
                batch = stds[start:start + phema_batch]
                # A batch of reconstructions shares one pass over the snapshots; each one is written (atomically)
                # before any is measured, and a rerun reuses those still there.
                paths = on_rank0(lambda: reconstruct(run, batch))
                for std, net_path in zip(batch, paths):
                    values = measure_network(net_path, ref, metrics, seeds, gnet=gnet, guidance=guidance,
                                             max_batch_size=max_batch_size, device=device,
                                             detector_kwargs=detector_kwargs, detectors=detectors,
                                             progress=verbose, edm2_exact=edm2_exact)
                    best = on_rank0(lambda: record_point(run, std, net_path, values, runs, metrics, measure,
                                                         outdir, keep_networks, say))
                    bar.update(1)
    if num_old and not todo:
        best = on_rank0(lambda: plot_results(outdir, read_records(results_path), runs, metrics, measure))
    return best


def reconstruct(run, stds):
    """Write the reconstructions of `stds` for `run` that are not on disk yet; return the paths of all."""
    steps = posthoc.reconstruct_phema(run.in_pkls, out_std=stds, out_nimg=run.out_nimg, out_dir=run.net_dir,
                                      out_prefix=run.out_prefix, skip_existing=True, max_batch_size=len(stds),
                                      verbose=False)
    for _ in tqdm.tqdm(steps, unit='snapshot', desc=f'post-hoc EMA {run.label}', leave=False, dynamic_ncols=True,
                       disable=len(steps) == 0):
        pass
    return [posthoc.output_path(run.net_dir, run.out_prefix, run.out_nimg, std) for std in stds]


def record_point(run, std, net_path, values, runs, metrics, measure, outdir, keep_networks, say):
    """Append a measured point, redraw the plot, report the best so far; returns plot_results' best."""
    results_path = os.path.join(outdir, RESULTS_NAME)
    new = [dict(_setting(run, std, m, measure), value=float(values[m]), net=net_path) for m in metrics]
    append_records(results_path, new)
    if not keep_networks:
        os.remove(net_path)
        with contextlib.suppress(OSError):
            os.rmdir(run.net_dir)  # only once it is empty
    best = plot_results(outdir, read_records(results_path), runs, metrics, measure)
    for m in metrics:
        b_std, b_value = best[m][run.label]
        say(f'{run.label}: σ_rel {std:.3f}  {m} {values[m]:.4g}   best so far {b_value:.4g} at σ_rel {b_std:.3f}')
    return best

#----------------------------------------------------------------------------

@click.command()
# Main options.
@click.option('--indir', 'indirs', help='Training run with snapshots; repeat for one curve per run', metavar='DIR',
              type=str, required=True, multiple=True)
@click.option('--outdir', help='Where results.jsonl, sweep.png and the reconstructions go', metavar='DIR',
              type=str, required=True)
@click.option('--outstd', help='EMA lengths to measure, e.g. 0.010,0.015,...,0.250', metavar='LIST',
              type=cli.Parsed(posthoc.parse_std_list), required=True)
@click.option('--ref', 'ref_path', help='Reference statistics', metavar='PKL|NPZ|URL', type=str, required=True)
@metrics_options
# Reconstruction.
@click.option('--inprefix', help='Use only inputs whose name prefix is this', metavar='STR', type=str,
              default='network-snapshot', show_default=True)
@click.option('--instd', help='Use only inputs with these stds, e.g. 0.050,0.100', metavar='LIST', type=cli.Parsed(posthoc.parse_std_list),
              default=None)
@click.option('--outkimg', help='Training time of the reconstructions  [default: latest input]', metavar='KIMG',
              type=click.IntRange(min=1), default=None)
@click.option('--outprefix', help='File name prefix of the reconstructions', metavar='STR', type=str,
              default='phema', show_default=True)
@click.option('--keep-networks', help='Keep the reconstructed networks (deleted once measured otherwise)',
              is_flag=True)
# Generation.
@generation_options(num_help='Number of images to generate per point')
# Performance.
@click.option('--batch', 'max_batch_size', help='Maximum generation batch size per process', metavar='INT',
              type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--phema-batch', help='Reconstructions per pass over the snapshots', metavar='INT',
              type=click.IntRange(min=1), default=8, show_default=True)
def main(indirs, outdir, outstd, ref_path, metrics, detector, dinov2, inprefix, instd, outkimg, outprefix,
         keep_networks, num_images, seed, seeds, gnet, guidance, edm2_exact, max_batch_size, phema_batch):
    """Find the best post-hoc EMA length: reconstruct, measure and plot each one.

    \b
    # FID-50K of 49 EMA lengths of one run, 8 GPUs sharing each point's images (torchrun reads --num as its
    # own --numa-binding: give --seeds under torchrun):
    torchrun --standalone --nproc_per_node=8 sweep_phema.py --indir=runs/00000 --outdir=sweep \\
        --outstd=0.010,0.015,...,0.250 --ref=dataset-refs/img64.pkl --metrics=fid --seeds=0-49999
    \b
    # Two runs as two curves on one plot (e.g. CONFIG A against G*):
    python sweep_phema.py --indir=runs/A --indir=runs/G --outdir=sweep --outstd=0.05,0.10,...,0.25 --ref=REF.pkl

    Writes <outdir>/results.jsonl (one line per run, EMA length and metric), <outdir>/sweep.png (the first metric
    against sigma_rel, best length marked; sweep-<metric>.png for the others) and, while a point is measured, its
    network <outdir>/<run>/<outprefix>-<kimg>-<std>.pkl. Rerun the same command to resume: points already in
    results.jsonl with the same setting (and the same --ref file) are skipped. Under torchrun, <outdir> must be
    visible to every process; one sweep at a time may use it.

    The snapshots and --gnet are network pickles, which run the Python code stored inside them when loaded: load
    only pickles you trust (--gnet also takes the weights-only .pt format of "python -m networks.export", which never
    runs code).
    """
    seeds = seeds_to_measure(num_images, seed, seeds, gnet, guidance)
    cli.check_output_dir(outdir)

    with dist.process_group() as device, cli.os_errors(outdir):
        try:
            best = sweep(list(indirs), outdir, outstd, ref_path, metrics=metrics, seeds=seeds, gnet=gnet,
                         guidance=guidance, max_batch_size=max_batch_size, in_prefix=inprefix, in_std=instd,
                         out_kimg=outkimg, out_prefix=outprefix, phema_batch=phema_batch,
                         keep_networks=keep_networks, device=device, edm2_exact=edm2_exact,
                         detector_kwargs=detector_kwargs(detector, dinov2))
        except (SweepError, MetricsError, NetworkFileError, ValueError, MemoryError, dist.RunDirBusyError) as e:
            raise cli.CliError(str(e)) from None
        if dist.get_rank() == 0:
            for metric, runs in best.items():
                for label, (std, value) in runs.items():
                    print(f'{label}: best {metric} {value:.4g} at σ_rel {std:.3f}')
            print(f'Results: {os.path.join(outdir, RESULTS_NAME)}; plot: {os.path.join(outdir, PLOT_NAME)}')

if __name__ == '__main__':
    misc.keep_freed_cpu_memory()  # large CPU tensors without page faults (see there)
    main()  # pylint: disable=no-value-for-parameter

#----------------------------------------------------------------------------
