"""The main job in one command: train EDM2+ (CONFIG G*) on Fashion-MNIST on a CPU and look at the result.

    python demo.py                      # ~25 minutes on 2 idle CPU cores (15 of them training); output in demo-out/
    python demo.py --compare            # also CONFIG A (EDM2's block) with the same time budget, curves side by side
    python demo.py --sweep              # then FID against the post-hoc EMA length (5 lengths x 500 images per run)

Steps, each done with library functions; each is a documented CLI as well, and the demo prints the command that
does the same by hand:
  1. dataset_tool.py convert: the Fashion-MNIST training set -> a labelled RGB zip; the first --ref-images test
     images -> a second zip.
  2. calculate_metrics.py ref: Inception-v3 reference statistics of that test subset (FID only: DINOv2's weights
     are not available offline).
  3. train_edm2plus.py --preset=demo: train for a wall-clock budget (--minutes).
  4. reconstruct_phema.py: a post-hoc EMA network from the training snapshots.
  5. generate_images.py: a 10x10 grid of seeds 0-99 with classes 0-9 in turn, so row r shows class r.
  6. calculate_metrics.py gen: FID of --fid-images generated images against the reference statistics.
  7. the loss and learning-rate curves of stats.jsonl as a PNG.
  8. sweep_phema.py --points: FID along each run, at about --curve-points of the snapshots training wrote, against
     training wall time, training compute and images seen; with --compare, when each configuration first reached
     the FID that the weaker one has at its end.
  9. with --sweep, sweep_phema.py: FID against the EMA length sigma_rel, one curve per run, best length marked.

Rerunning the same command reuses what is done: finished datasets and statistics are kept, an interrupted training
resumes from its newest checkpoint until the run has used its --minutes, and grid and FID are recomputed only for
a new network. What was done is recorded in <outdir>/summary.json (rewritten atomically after every step).
"""

import os

# OpenMP threads spin for a while when they wait for work before they sleep. libgomp's default spins so long that a
# CPU shared with other processes slows PyTorch many times over, and never spinning (OMP_WAIT_POLICY=PASSIVE) costs
# speed on an idle CPU; a bounded spin keeps most of both (README, "The main job": the measurements). It must be set
# before torch loads its OpenMP runtime; values in the environment win.
if 'OMP_WAIT_POLICY' not in os.environ:
    os.environ.setdefault('GOMP_SPINCOUNT', '30000')

import contextlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import click  # noqa: E402
import scipy.linalg  # noqa: E402
import torch  # noqa: E402
import tqdm  # noqa: E402

import dnnlib  # noqa: E402
from figures.charts import training_curves  # noqa: E402
from figures.grids import label_grid  # noqa: E402
from torch_utils import cli  # noqa: E402
from torch_utils import distributed as dist  # noqa: E402
from networks import presets  # noqa: E402
from metrics import sweeps  # noqa: E402
from training.posthoc import parse_std_list  # noqa: E402
from metrics.sweeps import read_stats  # noqa: E402

#----------------------------------------------------------------------------
# Fixed facts of the demo.

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'     # Debian package dataset-fashion-mnist
FASHION_MNIST_CLASSES = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                         'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot']
PRESET = 'demo'                                             # networks/presets.py: CONFIG G*, base width 32
CONFIGS = {'G*': None, 'A': 'A'}                            # run label -> --block override (None: the preset's)
GRID_SEEDS = range(100)                                     # seed i has class i % 10: row r = seeds r, r+10, ...
FID_SEED = 1000                                             # first seed of the FID images (none in the grid)
SWEEP_STDS = '0.030,0.050,0.080,0.120,0.180'                # EMA lengths of --sweep, around the usual optimum
CURVE_POINTS = 5                                            # snapshots measured along each run (step 8)
CURVE_IMAGES = 100                                          # generated images per point of step 8
MIN_TRAIN_SECONDS = 60                                      # a leftover budget below this is not worth a restart

class DemoError(Exception):
    """A one-line error naming the file or option at fault (the CLI shows it as `Error: ...`)."""

def _tag(label):
    return label.replace('*', 'star')   # 'G*' -> 'Gstar' in file names

def run_dir_of(outdir, label):
    return os.path.join(outdir, f'run-{_tag(label)}')

def file_id(path):
    """The SHA-1 of a file's bytes: a grid or FID is recorded for a network's content, not its name, so that it is
    not reused for a different network (or reference) that a new run wrote under the same name."""
    return dnnlib.util.file_digest(path)

def load_net(net):
    """A network from a snapshot/post-hoc EMA pickle (or a module), on the device, in float32. The pickles hold
    float16 weights, which a CPU would otherwise convert at each of the 63 evaluations per image."""
    from networks.loading import load_network  # pylint: disable=import-outside-toplevel
    try:
        return load_network(net, dist.device(), verbose=False).to(torch.float32)
    except (OSError, ValueError) as e:
        raise DemoError(str(e)) from None

#----------------------------------------------------------------------------
# Progress record: <outdir>/summary.json says which network each grid and FID belongs to, so that a rerun redoes
# them only for a new network. Written atomically, so a kill never leaves it half-written.

def load_summary(path):
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, 'r', encoding='utf-8') as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return {}  # Unreadable (e.g. edited by hand): what it described is found on disk again or redone.
    return summary if isinstance(summary, dict) else {}

def save_summary(path, summary):
    with dnnlib.util.atomic_write(path, 'w') as f:
        json.dump(summary, f, indent=2)

@contextlib.contextmanager
def step(timings, name, title, command=None):
    """Print a step header (and the CLI that does the same by hand); record the step's wall time in `timings`."""
    print()
    print(f'=== {title}')
    if command:
        print(f'    by hand: {command}')
    start = time.time()
    yield
    timings[name] = round(time.time() - start, 1)
    print(f'=== done in {timings[name]:.1f} s')

#----------------------------------------------------------------------------
# Step 1: datasets, with dataset_tool's library function. It writes under a temporary name and renames at the end,
# so a zip that exists is complete and is reused as is.

def check_source(source_dir, split):
    """The path of the IDX image file of `split`, or a DemoError saying how to get it."""
    source = os.path.join(source_dir, f'{split}-images-idx3-ubyte.gz')
    if not os.path.isfile(source):
        raise DemoError(f'{source}: Fashion-MNIST not found (install the Debian package dataset-fashion-mnist, '
                        f'e.g. with `bash setup.sh`, or name a folder holding the IDX files with --source)')
    return source

def convert_fashion_mnist(split, dest, resolution, source_dir=FASHION_MNIST_DIR, max_images=None):
    """Convert the first `max_images` (None: all) of Fashion-MNIST's `split` ('train' or 't10k') to an RGB PNG zip.
    Returns True if it converted, False if `dest` already existed."""
    import dataset_tool  # pylint: disable=import-outside-toplevel
    if os.path.isfile(dest):
        return False
    source = check_source(source_dir, split)
    try:
        dataset_tool.convert_dataset(source, dest, max_images=max_images, resolution=(resolution, resolution))
    except dataset_tool.DatasetToolError as e:
        raise DemoError(str(e)) from None
    return True

#----------------------------------------------------------------------------
# Step 2: reference statistics. Inception-v3 costs ~5.7 GFLOP per image (about 8 images/s on 2 idle cores), so the
# whole test set would take ~20 minutes; the demo uses the first --ref-images test images (the test set is in
# random order: the first 1,000 hold 87-115 images of each class, the first 2,000 188-219). A finished file is reused.

def reference_stats(dataset, dest, batch=64, detector=None):
    """FID reference statistics of all images of `dataset`, computed once and cached in `dest`. `detector`: a ready
    feature detector to use instead of Inception-v3 (tests pass a cheap stand-in)."""
    from metrics import MetricsError  # pylint: disable=import-outside-toplevel
    from metrics import stats as mstats  # pylint: disable=import-outside-toplevel
    try:
        if os.path.isfile(dest):
            return mstats.load_stats(dest, verbose=False)
        it = mstats.calculate_stats_for_files(dataset, max_batch_size=batch, num_workers=0, metrics=['fid'],
                                              device=dist.device(), dest_path=dest, detectors=_detectors(detector))
        return mstats.final_stats(it)
    except MetricsError as e:
        raise DemoError(str(e)) from None

def _detectors(detector):
    return None if detector is None else {'fid': detector}

#----------------------------------------------------------------------------
# Step 3: training, with train_edm2plus.py's library functions (configure, then launch, which runs
# training.training_loop.training_loop), so the run directory is exactly what the CLI makes. --minutes is the run's
# TOTAL training time: a rerun gives an interrupted run the time it has left and a finished run none. The time used
# so far is `Timing/total_sec` (kept in the training state across resumes) of the newest stats.jsonl line at or
# before the newest training state; later lines are work the resumed run repeats.

def training_progress(run_dir):
    """EasyDict(nimg, seconds, finished) at the newest training-state-*.pt of a run (zeros when there is none)."""
    names = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    kimgs = [int(m.group(1)) for m in (re.fullmatch(r'training-state-(\d+)\.pt', n) for n in names) if m]
    progress = dnnlib.EasyDict(nimg=0, seconds=0.0, finished=False)
    if not kimgs:
        return progress
    for record in read_stats(run_dir):
        nimg = round(float(record['Progress/kimg']) * 1000)
        if nimg // 1000 <= max(kimgs) and nimg >= progress.nimg:
            progress.nimg = nimg
            progress.seconds = float(record.get('Timing/total_sec', 0))
    options_path = os.path.join(run_dir, 'training_options.json')
    if os.path.isfile(options_path):
        with open(options_path, 'r', encoding='utf-8') as f:
            progress.finished = progress.nimg >= json.load(f).get('total_nimg', float('inf'))
    return progress

def snapshot_interval(minutes):
    """Images between network snapshots: the preset's, halved (down to 1Ki) until a run of `minutes` writes at
    least 8 even on a busy machine (~100 images/s at the demo size), so that the curve along the run (step 8) finds
    its ~5 points. A snapshot of the demo network takes milliseconds: training is not slowed."""
    interval = presets.get(PRESET).snapshot
    while interval > 1024 and minutes * 60 * 100 / interval < 8:
        interval //= 2
    return interval

def train_options(run_dir, data, minutes, block=None, options=None, total_minutes=None):
    """train_edm2plus.py's options of a demo run, by their keyword names (`options` add to and override them)."""
    opts = dict(preset=PRESET, data=data, outdir=run_dir, minutes=float(f'{minutes:.6g}'),
                snapshot=snapshot_interval(minutes if total_minutes is None else total_minutes))
    if block is not None:
        opts['block'] = block
    return {**opts, **(options or {})}

def train_command(opts):
    """The train_edm2plus.py command line that trains with `opts` (printed for the user)."""
    def flag(key):
        return '--' + (key if key.startswith('P_') else key.replace('_', '-'))
    def text(value):
        return ','.join(str(v) for v in value) if isinstance(value, (list, tuple)) else f'{value:g}' \
            if isinstance(value, float) else str(value)
    return 'python train_edm2plus.py ' + ' '.join(shlex.quote(f'{flag(k)}={text(v)}') for k, v in opts.items())

def train(run_dir, data, minutes, block=None, options=None):
    """Train (or resume) the run in `run_dir` until it has used `minutes` of training time in total.

    `block` overrides the preset's block variant; `options` are further train_edm2plus.py options by keyword name
    (the tests use them for a tiny network). Returns EasyDict(nimg, seconds, finished, trained) after training."""
    import train_edm2plus  # pylint: disable=import-outside-toplevel
    before = training_progress(run_dir)
    left = minutes * 60 - before.seconds
    if before.finished or left < MIN_TRAIN_SECONDS * min(1, minutes):
        why = 'has reached its duration' if before.finished else f'has used its {minutes:g} minutes'
        print(f'{run_dir}: training {why} ({before.nimg} images in {before.seconds / 60:.1f} min); reused. '
              f'A larger --minutes trains it further.')
        return dnnlib.EasyDict(before, trained=False)
    if before.nimg > 0:
        print(f'{run_dir}: resuming at {before.nimg} images, {left / 60:.1f} of {minutes:g} minutes left.')
    opts = train_options(run_dir, data, left / 60, block, options, total_minutes=minutes)
    try:
        cli.check_output_dir(run_dir)
        config, info = train_edm2plus.configure(opts)  # opens the dataset, once: launch trains on info.dataset
        train_edm2plus.print_training_config(config, dnnlib.EasyDict({**train_edm2plus.OPTION_DEFAULTS, **opts}), 1,
                                             info)
        with dist.process_group():
            train_edm2plus.launch(config, dnnlib.EasyDict(opts), dataset=info.dataset)
    except click.ClickException as e:
        raise DemoError(f'training: {e.format_message()}') from None
    after = training_progress(run_dir)
    if after.nimg == 0:
        raise DemoError(f'{run_dir}: training wrote no training state; see {os.path.join(run_dir, "log.txt")}')
    return dnnlib.EasyDict(after, trained=True)

#----------------------------------------------------------------------------
# Step 4: post-hoc EMA (EDM2 paper Sec. 3.2) at the end of training, from the snapshots that the run tracked
# at sigma_rel 0.050 and 0.100.

def reconstruct_ema(run_dir, std):
    """Reconstruct the EMA network with relative std `std` at the newest snapshot into `run_dir` (reused if there).
    Returns EasyDict(path, written)."""
    from training import posthoc  # pylint: disable=import-outside-toplevel
    try:
        in_pkls = [p for p in posthoc.list_input_pickles(run_dir, in_prefix='network-snapshot') if p.nimg > 0]
        if not in_pkls:
            raise DemoError(f'{run_dir}: no network snapshots after the start of training to reconstruct from')
        out_nimg = max(p.nimg for p in in_pkls)
        path = posthoc.output_path(run_dir, 'phema', out_nimg, std)
        if os.path.isfile(path):
            print(f'{path}: exists, reused')
            return dnnlib.EasyDict(path=path, written=False)
        steps = posthoc.reconstruct_phema(in_pkls, out_std=[std], out_nimg=out_nimg, out_dir=run_dir, verbose=False)
        for _ in tqdm.tqdm(steps, desc='Post-hoc EMA', unit='snapshot', dynamic_ncols=True):
            pass
    except (ValueError, FileNotFoundError) as e:
        raise DemoError(str(e)) from None
    print(f'{path}: written')
    return dnnlib.EasyDict(path=path, written=True)

#----------------------------------------------------------------------------
# Step 5: the class grid, exactly as `generate_images.py --seeds=0-99 --class=0-9 --grid=...` makes it: the classes
# are used in turn (seed i gets class i % 10) and the grid has one row per class. The labelled copy is the same grid
# enlarged with the class names on the left (figures/grids.py).

def write_grid(net, path, labelled_path=None, class_names=FASHION_MNIST_CLASSES, seeds=GRID_SEEDS, scale=4,
               batch=100):
    """Write a grid PNG with one row per class: row r shows class r for seeds r, r + C, r + 2C, ... (C classes)."""
    from sampling.generate import generate_images  # pylint: disable=import-outside-toplevel
    num_classes = len(class_names)
    images = generate_images(load_net(net), seeds=seeds, class_idx=list(range(num_classes)), grid=path,
                             max_batch_size=batch, device=dist.device(), verbose=False)
    for _ in tqdm.tqdm(images, desc='Grid', unit='batch', dynamic_ncols=True):
        pass
    if labelled_path is not None:
        label_grid(path, labelled_path, class_names, len(seeds) // num_classes, scale)

#----------------------------------------------------------------------------
# Step 6: FID of generated images (random classes, so as balanced as the test set) against the reference.

def compute_fid(net, ref, num_images, seed=FID_SEED, batch=64, detector=None):
    """FID of `num_images` images generated by `net` (path or module) with seeds seed, seed+1, ... against `ref`
    (`detector`: as in reference_stats)."""
    from metrics import MetricsError  # pylint: disable=import-outside-toplevel
    from metrics import stats as mstats  # pylint: disable=import-outside-toplevel
    from sampling.generate import generate_images  # pylint: disable=import-outside-toplevel
    images = generate_images(load_net(net), seeds=range(seed, seed + num_images), max_batch_size=batch,
                             device=dist.device(), verbose=False)
    try:
        stats = mstats.final_stats(mstats.calculate_stats_for_iterable(images, metrics=['fid'], device=dist.device(),
                                                                       detectors=_detectors(detector)))
        with warnings.catch_warnings():
            # Fewer images than Inception's 2048 features make both covariances singular; the square root of their
            # product is still what FID defines (scipy warns about it at every demo-sized FID).
            warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)
            return float(mstats.calculate_metrics_from_stats(stats, ref, metrics=['fid'], verbose=False)['fid'])
    except MetricsError as e:
        raise DemoError(str(e)) from None

#----------------------------------------------------------------------------
# Step 7: training curves, drawn by figures/charts.py: the loss and learning-rate plots (one series per run) stacked
# into one PNG.

def plot_training_curves(path, runs):
    """runs: dict label -> run directory. Writes the loss and learning-rate curves of their stats.jsonl."""
    training_curves(path, {label: read_stats(run_dir) for label, run_dir in runs.items()})

#----------------------------------------------------------------------------
# Step 8: FID along each run, with metrics.sweeps.sweep (sweep_phema.py's library function): the post-hoc EMA
# network at about `points` of the snapshots that training wrote, against images seen, training wall time and
# training compute. It runs after training, from the snapshots training writes anyway, so it costs training
# nothing. Its results.jsonl makes a rerun skip the points already measured; the summary's numbers and the
# pictures' points both come from the records that sweep() drew.

def measure_curves(outdir, labels, ref_path, std, points=5, num_images=100, batch=64, detector=None):
    """FID of `num_images` images at about `points` training times of each run of `labels`, into <outdir>/curves.
    Returns the summary's 'curves' entry: files, the points of each run, the cost and (with two runs) when each run
    first reached the FID that the weaker one has at its end."""
    sweep_dir = os.path.join(outdir, 'curves')
    runs = {f'CONFIG {label}': run_dir_of(outdir, label) for label in labels}
    result = _sweep(runs, sweep_dir, [std], ref_path, num_images, batch, detector, points=points)
    records = result.records.get('fid', [])
    curves = {label: [dict(kimg=r['kimg'], nimg=r['nimg'], pflop=r['train_pflop'], fid=r['value'],
                           train_min=None if r['train_sec'] is None else r['train_sec'] / 60)
                      for _, _, r in run_points] for label, run_points in sweeps.run_curves(records, 'nimg').items()}
    entry = dict(results=result.results, num_images=num_images, std=std, names=result.names, runs=curves,
                 plots={field: os.path.join(sweep_dir, name) for field, name in sweeps.ALONG_PLOTS.items()
                        if os.path.join(sweep_dir, name) in result.plots},
                 cost_sec=round(sum(r.get('sec', 0) for r in records), 1), num_points=len(records))
    if len(curves) > 1:
        # The FID that the weaker run has at its end, and when (training minutes, PFLOP) each run first had it.
        ends = {label: run_points[-1]['fid'] for label, run_points in curves.items()}
        weaker = max(ends, key=ends.get)
        entry['common'] = dict(fid=ends[weaker], of=weaker, reached={
            label: dict(train_min=sweeps.first_reached([(p['train_min'], p['fid']) for p in run_points
                                                         if p['train_min'] is not None], ends[weaker]),
                        pflop=sweeps.first_reached([(p['pflop'], p['fid']) for p in run_points], ends[weaker]))
            for label, run_points in curves.items()})
    return entry

#----------------------------------------------------------------------------
# Step 9 (--sweep): FID against the EMA length, with the same library function.

def run_sweep(outdir, labels, ref_path, stds=SWEEP_STDS, num_images=500, batch=64, detector=None):
    """Sweep `stds` for the runs of `labels` into <outdir>/sweep; returns EasyDict(plot, results, best) with best =
    {label: [std, fid]}."""
    sweep_dir = os.path.join(outdir, 'sweep')
    runs = {f'CONFIG {label}': run_dir_of(outdir, label) for label in labels}
    result = _sweep(runs, sweep_dir, stds, ref_path, num_images, batch, detector)
    return dnnlib.EasyDict(plot=os.path.join(sweep_dir, sweeps.PLOT_NAME), results=result.results,
                           best={label: [r['std'], r['value']] for label, r in result.best['fid'].items()})

def _sweep(runs, sweep_dir, stds, ref_path, num_images, batch, detector, points=None):
    from metrics import MetricsError  # pylint: disable=import-outside-toplevel
    try:
        return sweeps.sweep(runs, sweep_dir, stds, ref_path, metrics=['fid'], points=points,
                            seeds=range(FID_SEED, FID_SEED + num_images), max_batch_size=batch,
                            device=dist.device(), detectors=_detectors(detector))
    except (sweeps.SweepError, MetricsError, ValueError, OSError) as e:
        raise DemoError(f'{os.path.basename(sweep_dir)}: {e}') from None

#----------------------------------------------------------------------------
# The whole job.

def run_demo(outdir='demo-out', minutes=15.0, resolution=16, ref_images=1000, fid_images=1000, ema_std=0.10,
             compare=False, source_dir=FASHION_MNIST_DIR, max_train_images=None, extra_train_options=None, batch=64,
             detector=None, curve_points=CURVE_POINTS, curve_images=CURVE_IMAGES, sweep=False, sweep_stds=SWEEP_STDS,
             sweep_images=500):
    """Run every step, reusing finished ones; return the summary dict (also written to <outdir>/summary.json).

    Step 8 measures FID of `curve_images` images at about `curve_points` snapshots of each run. `sweep` adds step 9,
    FID of `sweep_images` images at each EMA length of `sweep_stds`. `max_train_images`, `extra_train_options`
    (train_edm2plus.py options by keyword name) and `detector` (a feature detector instead of Inception-v3) exist
    for quick tests."""
    start = time.time()
    for split in ['train', 't10k']:
        check_source(source_dir, split)  # before anything is written
    if sweep:
        try:
            sweep_stds = ','.join(f'{s:.3f}' for s in parse_std_list(sweep_stds))
        except ValueError as e:
            raise DemoError(f'--sweep-stds={sweep_stds}: {e}') from None
    os.makedirs(outdir, exist_ok=True)
    summary_path = os.path.join(outdir, 'summary.json')
    summary = load_summary(summary_path)
    timings = summary['timings_sec'] = {}  # of this invocation; a reused step takes (almost) no time
    res = f'{resolution}x{resolution}'
    num_steps = 9 if sweep else 8
    labels = ['G*', 'A'] if compare else ['G*']

    # 1. Datasets.
    train_zip = os.path.join(outdir, f'fashion-mnist-train-{res}.zip')
    test_zip = os.path.join(outdir, f'fashion-mnist-test-{res}-first{ref_images}.zip')
    with step(timings, 'datasets', f'1/{num_steps} Datasets',
              f'python dataset_tool.py convert --source={source_dir}/train-images-idx3-ubyte.gz --dest={train_zip} '
              f'--resolution={res}   (and t10k-... --max-images={ref_images})'):
        for split, dest, limit in [('train', train_zip, max_train_images), ('t10k', test_zip, ref_images)]:
            converted = convert_fashion_mnist(split, dest, resolution, source_dir, max_images=limit)
            print(f'{dest}: {"written" if converted else "exists, reused"}')
    summary['datasets'] = dict(train=train_zip, test=test_zip, resolution=resolution)

    # 2. Reference statistics.
    ref_path = os.path.join(outdir, f'fid-ref-fashion-mnist-test-{res}-first{ref_images}.pkl')
    with step(timings, 'reference', f'2/{num_steps} FID reference statistics of the first {ref_images} test images',
              f'python calculate_metrics.py ref --data={test_zip} --dest={ref_path} --metrics=fid'):
        reused = os.path.isfile(ref_path)
        ref = reference_stats(test_zip, ref_path, batch=batch, detector=detector)
        print(f'{ref_path}: {"exists, reused" if reused else "written"}')
    summary['reference'] = dict(path=ref_path, num_images=int(ref['num_images']))
    save_summary(summary_path, summary)

    # 3-6 for each configuration.
    runs = summary.setdefault('runs', {})
    for label in labels:
        run = runs.setdefault(label, {})
        wall = run.setdefault('wall_sec', {})  # seconds each step took when it last did its work
        run_dir = run['run_dir'] = run_dir_of(outdir, label)
        name = f'CONFIG {label}'

        opts = train_options(run_dir, train_zip, minutes, CONFIGS[label], extra_train_options)
        with step(timings, f'train {label}', f'3/{num_steps} Training {name} ({minutes:g} minutes in total)',
                  train_command(opts)):
            progress = train(run_dir, train_zip, minutes, CONFIGS[label], extra_train_options)
        run.update(images_seen=progress.nimg, training_sec=round(progress.seconds, 1))
        if progress.trained or 'train' not in wall:
            wall['train'] = timings[f'train {label}']
        save_summary(summary_path, summary)

        with step(timings, f'phema {label}', f'4/{num_steps} Post-hoc EMA of {name}, sigma_rel {ema_std:.3f}',
                  f'python reconstruct_phema.py --indir={run_dir} --outdir={run_dir} --outstd={ema_std:.3f}'):
            phema = reconstruct_ema(run_dir, ema_std)
        net = run['network'] = phema.path
        if phema.written or 'phema' not in wall:
            wall['phema'] = timings[f'phema {label}']

        grid = run['grid'] = os.path.join(outdir, f'grid-{_tag(label)}.png')
        labelled = run['grid_labelled'] = os.path.join(outdir, f'grid-{_tag(label)}-labelled.png')
        with step(timings, f'grid {label}', f'5/{num_steps} Sample grid of {name}: row r = class r',
                  f'python generate_images.py --net={net} --seeds=0-99 --class=0-9 --grid={grid} --outdir=<DIR>'):
            redo = not (run.get('grid_of') == file_id(net) and os.path.isfile(grid) and os.path.isfile(labelled))
            if redo:
                write_grid(net, grid, labelled, batch=batch)
                run['grid_of'] = file_id(net)
            print(f'{labelled}: {"written" if redo else "exists for this network, reused"}')
        if redo:
            wall['grid'] = timings[f'grid {label}']
        save_summary(summary_path, summary)

        fid_of = dict(network=file_id(net), num_images=fid_images, ref=file_id(ref_path))
        with step(timings, f'fid {label}',
                  f'6/{num_steps} FID of {name}: {fid_images} generated vs {ref["num_images"]} test images',
                  f'python calculate_metrics.py gen --net={net} --ref={ref_path} --metrics=fid --num={fid_images} '
                  f'--seed={FID_SEED}'):
            redo = not (run.get('fid_of') == fid_of and run.get('fid') is not None)
            if redo:
                run['fid'] = compute_fid(net, ref, fid_images, batch=batch, detector=detector)
                run.update(fid_of=fid_of, fid_images=fid_images)
            print(f'FID {run["fid"]:.2f}{"" if redo else " for this network, reused"}')
        if redo:
            wall['fid'] = timings[f'fid {label}']
        save_summary(summary_path, summary)

    # 7. Curves of every run trained in this folder (both after --compare).
    plot = summary['plot'] = os.path.join(outdir, 'training-curves.png')
    with step(timings, 'plot', f'7/{num_steps} Loss and learning-rate curves'):
        shown = {f'CONFIG {label}': run_dir_of(outdir, label) for label in CONFIGS
                 if read_stats(run_dir_of(outdir, label))}
        plot_training_curves(plot, shown)
        print(f'{plot}: written')

    # 8. FID along each run.
    names = ' and '.join(f'CONFIG {label}' for label in labels)
    with step(timings, 'curves', f'8/{num_steps} FID along the run of {names}: about {curve_points} snapshots x '
              f'{curve_images} images per run',
              ' '.join(['python sweep_phema.py'] + [f'--indir={run_dir_of(outdir, label)}' for label in labels] +
                       [f'--outdir={os.path.join(outdir, "curves")} --outstd={ema_std:.3f} --points={curve_points}',
                        f'--ref={ref_path} --metrics=fid --num={curve_images} --seed={FID_SEED}'])):
        summary['curves'] = measure_curves(outdir, labels, ref_path, ema_std, curve_points, curve_images, batch,
                                           detector)
    save_summary(summary_path, summary)

    summary.pop('sweep', None)
    if sweep:
        with step(timings, 'sweep', f'9/9 FID against the EMA length: {len(sweep_stds.split(","))} lengths x '
                  f'{sweep_images} images per run',
                  ' '.join(['python sweep_phema.py'] + [f'--indir={run_dir_of(outdir, label)}' for label in labels] +
                           [f'--outdir={os.path.join(outdir, "sweep")} --outstd={sweep_stds} --ref={ref_path}',
                            f'--metrics=fid --num={sweep_images} --seed={FID_SEED}'])):
            result = run_sweep(outdir, labels, ref_path, sweep_stds, sweep_images, batch, detector)
        summary['sweep'] = dict(result, stds=sweep_stds, num_images=sweep_images)
    summary['outdir'] = outdir
    summary['labels'] = labels
    timings['total'] = round(time.time() - start, 1)
    save_summary(summary_path, summary)
    return summary

def format_curves(curves):
    """The summary's lines about step 8: pictures, each run's points, when each run reached the common FID, cost."""
    plots = [curves['plots'][field] for field in ('train_sec', 'train_pflop', 'nimg') if field in curves['plots']]
    lines = [f'FID along the run:  {", ".join(plots)}',
             f'  numbers: {curves["results"]}',
             f'  FID of {curves["num_images"]} generated images per point (sigma_rel {curves["std"]:.3f}): biased far '
             f'above an FID of more images; compare the points with each other.',
             f'  {"":12s}{"kimg":>6s}{"train min":>11s}{"PFLOP":>11s}{"FID":>9s}']
    for label, points in curves['runs'].items():
        for p in points:
            minutes = '-' if p['train_min'] is None else f'{p["train_min"]:.1f}'
            lines.append(f'  {label:<12s}{p["kimg"]:>6d}{minutes:>11s}{p["pflop"]:>11.4g}{p["fid"]:>9.2f}')
    if 'common' in curves:
        common = curves['common']
        lines.append(f'  FID {common["fid"]:.2f} ({common["of"]}\'s at its end) was first reached by')
        for label, at in common['reached'].items():
            minutes = '-' if at['train_min'] is None else f'{at["train_min"]:.1f}'
            lines.append(f'    {label:<12s}after {minutes} min of training, {at["pflop"]:.4g} PFLOP')
        lines.append('    (linear between the measured points)')
    lines.append(f'  cost: {curves["num_points"]} points, {curves["cost_sec"] / 60:.1f} min of measuring after '
                 f'training, from the snapshots it writes anyway (training is not slowed)')
    return lines

def format_summary(summary):
    """The short report printed at the end of a demo run."""
    ref = summary['reference']
    t = summary['timings_sec']
    lines = ['', 'Summary', '-------',
             f'Output folder:      {summary["outdir"]}',
             f'Datasets:           {summary["datasets"]["train"]}',
             f'                    {summary["datasets"]["test"]}',
             f'FID reference:      {ref["path"]} ({ref["num_images"]} test images)',
             f'Training curves:    {summary["plot"]}']
    for label in summary['labels']:
        run = summary['runs'][label]
        wall = run['wall_sec']
        lines += [f'CONFIG {label}:',
                  f'  run directory:    {run["run_dir"]}',
                  f'  post-hoc EMA net: {run["network"]}',
                  f'  sample grid:      {run["grid_labelled"]} (unlabelled: {run["grid"]})',
                  f'  images seen:      {run["images_seen"]} in {run["training_sec"] / 60:.1f} min of training',
                  f'  FID:              {run["fid"]:.2f} '
                  f'({run["fid_images"]} generated vs {ref["num_images"]} test images)',
                  '  wall time (s):    ' + ', '.join(f'{k} {v:.0f}' for k, v in wall.items())]
    if summary.get('curves'):
        lines += format_curves(summary['curves'])
    if 'sweep' in summary:
        sweep = summary['sweep']
        lines += [f'EMA sweep:          {sweep["plot"]} (FID of {sweep["num_images"]} images at sigma_rel '
                  f'{sweep["stds"]}; {sweep["results"]})']
        lines += [f'  {label}: best FID {fid:.2f} at sigma_rel {std:.3f}' for label, (std, fid) in sweep['best'].items()]
    lines.append('This invocation (s): ' + ', '.join(f'{k} {v:.0f}' for k, v in t.items() if k != 'total') +
                 f'; total {t["total"] / 60:.1f} min')
    if len(summary['labels']) > 1:
        lines += ['', f'{"":10s}{"FID":>8s}{"images seen":>13s}{"train min":>11s}{"wall min":>10s}']
        for label in summary['labels']:
            run = summary['runs'][label]
            total = sum(run['wall_sec'].values()) / 60
            lines.append(f'CONFIG {label:<3s}{run["fid"]:8.2f}{run["images_seen"]:13d}'
                         f'{run["training_sec"] / 60:11.1f}{total:10.1f}')
    return '\n'.join(lines)

#----------------------------------------------------------------------------

@click.command()

# Main options.
@click.option('--outdir',      help='Folder for every output (rerun to reuse/resume)', metavar='DIR', type=str, default='demo-out', show_default=True)
@click.option('--minutes',     help='Training time of each configuration (in total over reruns)', metavar='FLOAT', type=cli.FloatRange(min=0, min_open=True), default=15, show_default=True)
@click.option('--compare',     help='Also train CONFIG A (EDM2\'s block, same width and time) and compare', is_flag=True)

# Data and evaluation.
@click.option('--resolution',  help='Image size of the converted datasets', metavar='16|32', type=click.Choice(['16', '32']), default='16', show_default=True)
@click.option('--ref-images',  help='Test images in the FID reference statistics', metavar='INT', type=click.IntRange(min=2, max=10000), default=1000, show_default=True)
@click.option('--fid-images',  help='Generated images for FID', metavar='INT', type=click.IntRange(min=2), default=1000, show_default=True)
@click.option('--ema-std',     help='Post-hoc EMA length sigma_rel', metavar='FLOAT', type=click.FloatRange(min=0.01, max=0.25), default=0.10, show_default=True)
@click.option('--curve-points', help='Snapshots measured along each run (curves/along-*.png)', metavar='INT', type=click.IntRange(min=2), default=CURVE_POINTS, show_default=True)
@click.option('--curve-images', help='Generated images per snapshot of the curves', metavar='INT', type=click.IntRange(min=2), default=CURVE_IMAGES, show_default=True)
@click.option('--sweep',       help='Also measure FID against the post-hoc EMA length (sweep/sweep.png)', is_flag=True)
@click.option('--sweep-stds',  help='EMA lengths of --sweep', metavar='LIST', type=cli.Parsed(parse_std_list), default=SWEEP_STDS, show_default=True)
@click.option('--sweep-images', help='Generated images per EMA length of --sweep', metavar='INT', type=click.IntRange(min=2), default=500, show_default=True)

# I/O and performance.
@click.option('--source',      help='Folder holding the Fashion-MNIST IDX files', metavar='DIR', type=str, default=FASHION_MNIST_DIR, show_default=True)
@click.option('--batch',       help='Batch size of sampling and of Inception', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)

def cmdline(outdir, minutes, compare, resolution, ref_images, fid_images, ema_std, curve_points, curve_images, sweep,
         sweep_stds, sweep_images, source, batch):
    """Train EDM2+ (CONFIG G*) on Fashion-MNIST on this machine; write a sample grid, training curves, FID and FID
    along the run (against training time and compute).

    \b
    Examples:
    python demo.py                  # ~25 min on 2 idle CPU cores; outputs in demo-out/
    python demo.py --compare        # also CONFIG A with the same time, curves compared (~20 min more)
    python demo.py --minutes=30     # rerun: trains the same run on to 30 minutes
    python demo.py --sweep          # rerun with a sweep: FID at 5 EMA lengths (~10 min per run on 2 cores)
    """
    cli.check_output_dir(outdir)
    with cli.os_errors(outdir):
        try:
            summary = run_demo(outdir=outdir, minutes=minutes, resolution=int(resolution), ref_images=ref_images,
                               fid_images=fid_images, ema_std=ema_std, compare=compare, source_dir=source,
                               batch=batch, curve_points=curve_points, curve_images=curve_images, sweep=sweep,
                               sweep_stds=sweep_stds, sweep_images=sweep_images)
        except DemoError as e:
            raise cli.CliError(str(e)) from None
    print(format_summary(summary))

if __name__ == '__main__':
    cli.run(cmdline)
