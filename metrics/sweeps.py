"""Sweeps over training runs: reconstruct post-hoc EMA networks at chosen training times and EMA lengths, measure
them, keep one results.jsonl line per measured point, and draw what a researcher decides with.

A sweep's dimensions, each a list: the runs (one curve each); the training times (snapshots along each run, for a
metric against images seen, training wall time and training compute); the EMA lengths σ_rel (EDM2 paper Sec. 3.2,
Fig. 5); and for autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself") the
guide's EMA length and the guidance weight.

`sweep()` is the library function behind sweep_phema.py and demo.py. Each point is reconstructed by
training.posthoc.reconstruct_phema (as reconstruct_phema.py does) and measured by
metrics.stats.calculate_stats_for_network (as `calculate_metrics.py gen` does), so it gets their file names and
numbers. `run_curves()` and `first_reached()` turn results into the curves along training that the pictures and
demo.py's summary show; `read_sweep_runs()` reads a results file (ours, or a hand-written JSON/CSV) for
plot_sweep.py.
"""

import contextlib
import csv
import io
import json
import math
import os
import tempfile
import textwrap
import time

import torch
import tqdm

import dnnlib
from figures.charts import curves_plot, sweep_plot
from metrics.stats import (calculate_metrics_from_stats, calculate_stats_for_network, check_reference, detectors_for,
                           load_stats, parse_metric_list)
from networks import flops
from networks.loading import load_snapshot
from sampling.generate import check_guide, require_decoder
from torch_utils import cli
from torch_utils import distributed as dist
from torch_utils.cli import parse_int_list
from training import posthoc
from training.posthoc import parse_pickle_name

RESULTS_NAME = 'results.jsonl'
PLOT_NAME = 'sweep.png'             # the metric against σ_rel
GUIDANCE_PLOT_NAME = 'guidance.png'  # the metric against the guidance weight, one curve per guide EMA length
# The metric along training, against each of these results.jsonl fields: (file name, axis).
ALONG_PLOTS = {'nimg': 'along-images.png', 'train_sec': 'along-time.png', 'train_pflop': 'along-compute.png'}
METRIC_NAMES = {'fid': 'FID', 'fd_dinov2': 'FD_DINOv2'}

class SweepError(Exception):
    """A user-facing problem; the message is one line naming the option or file concerned."""

#----------------------------------------------------------------------------
# results.jsonl: one line per (run, training time, EMA length, guide setting, metric). The fields before `value`
# identify the point: a rerun skips a point that a line with the same values holds. None of them is an absolute
# path of the run or the sweep, so that moving the sweep's folder (or the runs) keeps its resume.

RESULT_FIELDS = [
    # name          type          meaning
    ('run',         'str',        "label of the training run: its folder name (demo.py: 'CONFIG G*', 'CONFIG A')"),
    ('run_id',      'str',        "SHA-1 (16 hex digits) of the run's first snapshot: the same run wherever it lies"),
    ('kimg',        'int',        'training time of the measured network, thousands of images (as in file names)'),
    ('std',         'float',      'EMA length sigma_rel of the measured network'),
    ('metric',      'str',        'fid or fd_dinov2'),
    ('num_images',  'int',        'number of generated images measured'),
    ('seed',        'int',        'first seed'),
    ('seeds',       'list|null',  'every seed, when they are not seed, seed+1, ..., seed+num_images-1'),
    ('ref_sha256',  'str',        'SHA-256 of the reference statistics file: a point measured against other '
                                  'statistics is measured again'),
    ('guide',       'str|null',   'guiding network: file name or URL, or the label of the run it comes from; '
                                  'null without guidance'),
    ('guide_id',    'str|null',   "SHA-1 (16 hex digits) of the guide's file, or its run's run_id"),
    ('guide_kimg',  'int|null',   'training time of a guide that comes from a run'),
    ('guide_std',   'float|null', 'EMA length sigma_rel of a guide that comes from a run'),
    ('guidance',    'float',      'guidance weight (1: no guidance)'),
    ('edm2_exact',  'true',       "only when measured with EDM2's exact op sequence (--edm2-exact)"),
    ('instd',       'list',       'only when --instd chose the input snapshots: their sigma_rel'),
    ('vae',         'str',        'only when --vae replaced the VAE that latent networks name: that VAE'),
    ('detector',    'str',        "only when --detector or --dinov2 replaced the metric's default feature network: "
                                  'SHA-1 (16 hex digits) of its file, or its URL'),
    ('value',       'float',      "the metric's value"),
    ('ref',         'str',        'the reference statistics file (absolute path or URL; for information)'),
    ('nimg',        'int',        'images the run had trained on at that point'),
    ('train_sec',   'float|null', "training wall time at that point, seconds: the run's stats.jsonl Timing/total_sec "
                                  'at nimg (linear between the status lines around it when none is at nimg); null '
                                  'without stats.jsonl'),
    ('gflops',      'float',      'GFLOPs per network evaluation (networks/flops.py, as count_flops.py counts)'),
    ('train_pflop', 'float',      'training compute so far, PFLOP: nimg x 3 x gflops / 1e6 (a training step costs '
                                  'about 3 evaluations: forward and backward)'),
    ('indir',       'str',        'the run folder, relative to the sweep folder (for information)'),
    ('net',         'str',        'the measured reconstruction, relative to the sweep folder (deleted once measured '
                                  'unless --keep-networks)'),
    ('sec',         'float',      "seconds this point took: its share of the reconstruction, generation and metric"),
]
KEY_FIELDS = [name for name, _, _ in RESULT_FIELDS[:[n for n, _, _ in RESULT_FIELDS].index('value')]]
OPTIONAL_KEYS = ('edm2_exact', 'instd', 'vae', 'detector')  # written only when set, so that older lines keep matching the default

def fields_help(width=100):
    """The fields of results.jsonl as text lines of at most `width` characters (for --help)."""
    lines = []
    for name, kind, meaning in RESULT_FIELDS:
        lines += textwrap.wrap(meaning, width, initial_indent=f'{name:<12s}{kind:<12s}', subsequent_indent=' ' * 24)
    return lines

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
    """Add `new_records` to the file and return all its records (so that the caller need not read it again). The
    whole file is rewritten under a temporary name and renamed, so a kill at any moment leaves either the old or the
    new file, never a torn line."""
    records = read_records(path) + list(new_records)
    lines = [json.dumps(r) for r in records]
    with dnnlib.util.atomic_write(path, 'w') as f:
        f.write(''.join(line + '\n' for line in lines))
    return records

LATER_KEYS = ('ref_sha256',)  # lines written before these existed lack them, and match any value (they cannot tell)

def _same(record, setting):
    """True if `record` holds the values of every field of `setting` (a point's keys, or only some of them)."""
    return all(record.get(k) == setting.get(k) for k in set(setting) | set(OPTIONAL_KEYS)
               if not (k in LATER_KEYS and k not in record))

# The fields by which records are grouped for the resume check: every point's setting holds them, as a string or a
# number, and _same compares them with ==, which for such values is what a dict lookup does.
INDEX_KEYS = ('run', 'kimg', 'std', 'metric')

def _index(records):
    """{values of INDEX_KEYS: [records]}, so that finding a point's records does not scan the whole file."""
    index = {}
    for r in records:
        try:
            index.setdefault(tuple(r.get(k) for k in INDEX_KEYS), []).append(r)
        except TypeError:  # a list or object there (a hand-edited line) equals no setting's value
            pass
    return index

def _measured(index, setting):
    """Whether a record of `index` (from _index) holds the values of `setting` (as _same tells)."""
    return any(_same(r, setting) for r in index.get(tuple(setting[k] for k in INDEX_KEYS), ()))

def _where(path):
    return path if dnnlib.util.is_url(path) else os.path.abspath(path)

def ref_fingerprint(ref_path):
    """SHA-256 of the reference statistics file: a point measured against other statistics is measured again."""
    return dnnlib.util.file_digest(ref_path, 'sha256')

#----------------------------------------------------------------------------
# Runs: the training runs whose networks are measured, and their own records (stats.jsonl, snapshots).

def read_stats(run_dir):
    """stats.jsonl of a run as a list of dicts with 'Progress/kimg' (an unparsable line, e.g. from a killed run,
    is skipped)."""
    path = os.path.join(run_dir, 'stats.jsonl')
    records = []
    if os.path.isfile(path):
        with open(path, 'r', encoding='utf-8') as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    pass
    return [r for r in records if isinstance(r, dict) and 'Progress/kimg' in r]

def training_times(run_dir):
    """[(nimg, seconds)] of the run's status lines: Timing/total_sec, the training wall time so far (kept in the
    training state across resumes; it includes writing snapshots and training states)."""
    times = {}
    for r in read_stats(run_dir):
        try:
            nimg, sec = round(float(r['Progress/kimg']) * 1000), float(r['Timing/total_sec'])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(sec):
            times[nimg] = sec
    return sorted(times.items())

def time_at(times, nimg):
    """Training seconds at `nimg` from training_times(): the status line at nimg, else linear between the two
    around it; None outside them."""
    after = next((i for i, (n, _) in enumerate(times) if n >= nimg), None)
    if after is None:
        return None
    n1, s1 = times[after]
    if n1 == nimg:
        return s1
    if after == 0:
        return None
    n0, s0 = times[after - 1]
    return s0 + (s1 - s0) * (nimg - n0) / (n1 - n0)

def file_id(path):
    """SHA-1 (16 hex digits) of a file's bytes: names a run or a guide by content, not by where it lies."""
    return dnnlib.util.file_digest(path)[:16]

def architecture(path):
    """EasyDict(block, params, gflops) of the network in a snapshot, counted by networks.flops as count_flops.py
    counts, with one evaluation of the loaded network in float32 on the CPU."""
    net = load_snapshot(path, verbose=False).ema
    try:
        block = str(net.init_kwargs.get('block', 'A'))
    except AttributeError:  # a foreign network that did not record its arguments: EDM2's own block
        block = 'A'
    result = flops.count(net.float(), device='cpu')  # the network was just loaded for this alone: no copy needed
    return dnnlib.EasyDict(block=block, params=int(result['params']), gflops=result['flops'] / 1e9)

def describe(label, arch):
    """Legend text of a run: its configuration and size, e.g. 'CONFIG G* (EDM2+), 0.64 M params'."""
    family = {'A': 'EDM2', 'G*': 'EDM2+'}.get(arch.block)
    config = f'CONFIG {arch.block}' + (f' ({family})' if family else '')
    head = config if label in (arch.block, f'CONFIG {arch.block}') else f'{label}: {config}'
    return f'{head}, {arch.params / 1e6:.2f} M params'

def detect_prefix(indir, in_prefix, out_prefix, option):
    """The name prefix of a run's snapshots: `in_prefix` if given; else the one prefix of the <prefix>-<kimg>-<std>.pkl
    files in `indir`, reconstructions ('phema', `out_prefix`) aside when other files are there. EDM2's training
    writes network-snapshot-*, its published raw snapshots carry the model's name (e.g. edm2-img512-xs-*)."""
    if in_prefix is not None:
        return in_prefix
    infos = [parse_pickle_name(name) for name in sorted(os.listdir(indir))]
    prefixes = sorted({info.prefix for info in infos if info is not None})
    candidates = [p for p in prefixes if p not in ('phema', out_prefix)] or prefixes
    if len(candidates) > 1:
        raise SweepError(f'{option}={indir}: holds snapshots with several name prefixes ({", ".join(candidates)}); '
                         f'choose one with --inprefix')
    return candidates[0] if candidates else None

def open_run(indir, in_prefix=None, in_std=None, out_prefix='phema', option='--indir', count_size=True):
    """EasyDict(indir, prefix, in_pkls, run_id, arch, times) of a training run folder; SweepError if it has no
    usable snapshots. `arch` (architecture(): a load and an evaluation on the CPU) is None without `count_size`:
    only measured runs show their size and compute; a guide's is never read."""
    if not os.path.isdir(indir):
        raise SweepError(f'{option}={indir}: no such directory')
    prefix = detect_prefix(indir, in_prefix, out_prefix, option)
    try:
        in_pkls = [p for p in posthoc.list_input_pickles(indir, in_prefix=prefix, in_std=in_std) if p.nimg > 0]
    except ValueError as e:
        raise SweepError(f'{option}={indir}: {e}') from None
    if not in_pkls:
        raise SweepError(f'{option}={indir}: no {prefix or "<prefix>"}-<kimg>-<std>.pkl snapshots after the '
                         f'start of training')
    if len({(p.nimg, p.std) for p in in_pkls}) != len(in_pkls):
        raise SweepError(f'{option}={indir}: several snapshots share a time and std; choose one run with --inprefix')
    return dnnlib.EasyDict(indir=indir, prefix=prefix, in_pkls=in_pkls, run_id=file_id(in_pkls[0].path),
                           arch=architecture(in_pkls[0].path) if count_size else None, times=training_times(indir))

def parse_kimg_list(text):
    """'all' (every snapshot), or a list of kimg such as '256,512,1024' or '64-66' (each at least 1)."""
    if isinstance(text, str) and text.strip() == 'all':
        return 'all'
    kimgs = parse_int_list(text)
    if not kimgs or min(kimgs) < 1:
        raise ValueError('give "all" or training times in kimg, each at least 1')
    return sorted(set(kimgs))

def spread(times, count):
    """About `count` of the sorted `times`, evenly spread in images: the ones nearest to 1/count, 2/count, ..., 1 of
    the last (which is always kept)."""
    if len(times) <= count:
        return list(times)
    last = times[-1]
    return sorted({min(times, key=lambda t: abs(t - last * k / count)) for k in range(1, count + 1)})

def choose_times(run, out_kimg=None, points=None, option='--outkimg'):
    """The training times (nimg) of a run to measure: `out_kimg` None (the latest, or all with `points`), 'all'
    or a list of kimg; then about `points` of them spread over the run."""
    times = sorted({p.nimg for p in run.in_pkls})
    if out_kimg is None:
        chosen = times if points else times[-1:]
    elif out_kimg == 'all':
        chosen = times
    else:
        chosen = set()
        for kimg in ([out_kimg] if isinstance(out_kimg, int) else out_kimg):
            match = [t for t in times if t // 1000 == kimg]
            if not match:
                have = ', '.join(str(t // 1000) for t in times[:8]) + (', ...' if len(times) > 8 else '')
                raise SweepError(f'{option}={kimg}: {run.indir} has no snapshots at that time (it has {have})')
            chosen.add(match[0])
        chosen = sorted(chosen)
    return spread(chosen, points) if points else chosen

def find_runs(indirs, outdir, in_prefix=None, in_std=None, out_kimg=None, points=None, out_prefix='phema'):
    """The runs to sweep, as open_run() plus label, nimgs (the training times to measure) and net_dir (where their
    reconstructions go: <outdir>/<label>). `indirs`: a list of folders (labelled by their names) or a dict
    label -> folder."""
    if not isinstance(indirs, dict):
        indirs = {os.path.basename(os.path.normpath(d)): d for d in _unique_folders(indirs)}
    runs = []
    for label, indir in indirs.items():
        run = open_run(indir, in_prefix, in_std, out_prefix)
        run.update(label=label, nimgs=choose_times(run, out_kimg, points),
                   net_dir=os.path.join(outdir, _safe_name(label)))
        runs.append(run)
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

def find_guide(gnet, guide_std, guide_kimg, outdir, out_prefix='phema'):
    """The guiding network(s): None; a network file or URL; or a training run folder, whose reconstructions at
    `guide_kimg` (default: its latest snapshot) with each EMA length of `guide_std` guide in turn (EDM2's
    autoguidance search). EasyDict(label, id, kimg, stds, paths {std: path}, run)."""
    if gnet is None:
        if guide_std is not None or guide_kimg is not None:
            raise SweepError('--gstd and --gkimg choose the guide from a training run: give it with --gnet')
        return None
    if not dnnlib.util.is_url(gnet) and os.path.isdir(gnet):
        if not guide_std:
            raise SweepError(f'--gnet={gnet}: is a training run; give the guide\'s EMA lengths with --gstd')
        run = open_run(gnet, None, None, out_prefix, option='--gnet', count_size=False)
        nimg, = choose_times(run, None if guide_kimg is None else [guide_kimg], option='--gkimg')
        label = os.path.basename(os.path.normpath(gnet))
        run.update(label=label, net_dir=os.path.join(outdir, _safe_name(f'guide-{label}')))
        return dnnlib.EasyDict(label=label, id=run.run_id, kimg=nimg // 1000, nimg=nimg, run=run,
                               stds=[round(s, 3) for s in guide_std],
                               paths={round(s, 3): posthoc.output_path(run.net_dir, out_prefix, nimg, s)
                                      for s in guide_std})
    if guide_std is not None or guide_kimg is not None:
        raise SweepError(f'--gnet={gnet}: --gstd and --gkimg need a training run folder, not a network file')
    if dnnlib.util.is_url(gnet):
        return dnnlib.EasyDict(label=gnet, id=None, kimg=None, stds=[None], paths={None: gnet}, run=None)
    if not os.path.isfile(gnet):
        raise SweepError(f'--gnet={gnet}: no such network file or training run folder')
    return dnnlib.EasyDict(label=os.path.basename(gnet), id=file_id(gnet), kimg=None, stds=[None], paths={None: gnet},
                           run=None)

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
# Points: (run index, nimg, std, guide std, guidance). Guidance 1 does not use the guide, so it is one point
# whatever the guide.

def guide_settings(guide, guidances):
    """[(guide std, guidance)] to measure: (None, 1.0) for no guidance, and each guide EMA length with each weight."""
    settings = [(None, 1.0)] if 1.0 in guidances else []
    if guide is not None:
        settings += [(gstd, w) for gstd in guide.stds for w in guidances if w != 1.0]
    return settings

def _setting(run, nimg, std, guide, gstd, guidance, metric, measure):
    """The fields that identify a measured point: an equal record means the point need not be measured again."""
    guided = guide is not None and guidance != 1
    fields = dict(run=run.label, run_id=run.run_id, kimg=nimg // 1000, std=round(std, 3), metric=metric,
                  guide=guide.label if guided else None, guide_id=guide.id if guided else None,
                  guide_kimg=guide.kimg if guided else None, guide_std=gstd if guided else None,
                  guidance=float(guidance), **_measure_of(metric, measure))
    return {k: fields[k] for k in KEY_FIELDS if k in fields}

def _run_setting(run, metric, measure):
    """The fields that every point of one run and metric of this sweep shares (for the pictures)."""
    return dict(run=run.label, run_id=run.run_id, metric=metric, **_measure_of(metric, measure))

def _measure_of(metric, measure):
    """`measure` with its per-metric detector identities ('detectors': {metric: id}) resolved for `metric`."""
    fields = {k: v for k, v in measure.items() if k != 'detectors'}
    if metric in measure.get('detectors', {}):
        fields['detector'] = measure['detectors'][metric]
    return fields

def detector_id(path):
    """Names a detector given with --detector/--dinov2 by content (a local file) or by its URL."""
    return path if dnnlib.util.is_url(path) else file_id(path)

#----------------------------------------------------------------------------
# Curves from records: the same function feeds the pictures and demo.py's summary, so they show the same numbers.

def _point_key(record):
    return json.dumps([record.get(k) for k in KEY_FIELDS])

def _latest(records):
    """One record per point (when a point was measured more than once, its last line counts)."""
    return list({_point_key(r): r for r in records}.values())

def run_curves(records, x_field='nimg'):
    """{run: [(x, value, record), ...] sorted by x}: for each run and training time, the record with the best (lowest)
    value over the other settings (EMA length, guide), at x = its `x_field` (nimg, train_sec or train_pflop).
    `records` hold one metric of one measuring setting. Points whose x is null (no stats.jsonl) are left out."""
    best = {}
    for r in _latest(records):
        key = (r['run'], r['kimg'])
        if key not in best or r['value'] < best[key]['value']:
            best[key] = r
    curves = {}
    for (run, _), r in best.items():
        if r.get(x_field) is not None:
            curves.setdefault(run, []).append((float(r[x_field]), float(r['value']), r))
    return {run: sorted(points, key=lambda p: p[0]) for run, points in curves.items()}

def first_reached(points, target):
    """The first x at which a curve [(x, value), ...] (sorted by x) reaches `target` (value <= target): linear
    between the last point above it and the first at or below it; None if it never does."""
    prev = None
    for x, value in points:
        if value <= target:
            if prev is None:
                return x
            x0, v0 = prev
            return x0 + (x - x0) * (v0 - target) / (v0 - value)
        prev = (x, value)
    return None

def _axis(field, values):
    """(label, scale) of an axis showing `field`: the unit chosen by the largest value."""
    top = max(values, default=0)
    if field == 'nimg':
        return ('training images (millions)', 1e6) if top >= 1e6 else ('training images (thousands)', 1e3)
    if field == 'train_sec':
        return ('training wall time (hours)', 3600.0) if top >= 5 * 3600 else ('training wall time (minutes)', 60.0)
    units = [('GFLOP', 1e-6), ('TFLOP', 1e-3), ('PFLOP', 1.0), ('EFLOP', 1e3), ('ZFLOP', 1e6)]
    unit, scale = next(((u, s) for u, s in reversed(units) if top >= s), units[0])
    return f'training compute ({unit}, 3 x GFLOPs per evaluation x images)', scale

def _dimensions(mine, planned):
    """(along, guided, stds): whether some run has several training times, guidance weights, EMA lengths among
    its records and its planned points [(kimg, std, guidance)]."""
    seen = [{(r['kimg'], r['std'], r['guidance']) for r in recs} | set(planned.get(label, ()))
            for label, recs in mine.items()]
    along, stds, guided = (any(len({p[i] for p in points}) > 1 for points in seen) for i in range(3))
    return along, guided, stds

def plot_results(outdir, records, runs, metrics, measure, planned=None, draw=True):
    """Redraw the pictures of this sweep from `records` (those of other settings are ignored). Per metric (the
    first unsuffixed, the others with -<metric>): along-images.png, along-time.png and along-compute.png, along
    training, when a run has several training times (each run's best over the other settings at each time);
    guidance.png, against the guidance weight, when there are several; sweep.png, against σ_rel at each run's
    latest measured time, when there are several EMA lengths or nothing else to draw. What a run has counts its
    `planned` points {run: [(kimg, std, guidance)]} too, so that a sweep draws the same pictures from its first
    point on. Returns EasyDict(best {metric: {run: record}}, plots [paths], records {metric: [the records
    drawn]}); with `draw` False, without writing the pictures."""
    best, plots, drawn_records = {}, [], {}
    names = {run.label: describe(run.label, run.arch) for run in runs}
    for k, metric in enumerate(metrics):
        mine = {}
        for run in runs:
            setting = _run_setting(run, metric, measure)
            mine[run.label] = _latest([r for r in records if _same(r, setting)])
        mine = {label: recs for label, recs in mine.items() if recs}
        if not mine:
            continue
        best[metric] = {label: min(recs, key=lambda r: r['value']) for label, recs in mine.items()}
        drawn_records[metric] = [r for recs in mine.values() for r in recs]
        suffix = '' if k == 0 else f'-{metric}'
        ylabel = METRIC_NAMES.get(metric, metric)
        per_point = f'{measure["num_images"]} images per point'
        at_end = {}
        for label, recs in mine.items():
            last = max(r['kimg'] for r in recs)
            at_end[label] = [r for r in recs if r['kimg'] == last]
        along, guided, several_stds = _dimensions(mine, planned or {})

        def name_of(path):
            return os.path.join(outdir, path.replace('.png', f'{suffix}.png'))

        # Along training.
        if along:
            stds = {r['std'] for recs in mine.values() for r in recs}
            how = f'sigma_rel {next(iter(stds)):.3f}' if len(stds) == 1 else 'best sigma_rel per point'
            for field, file_name in ALONG_PLOTS.items():
                curves = run_curves([r for recs in mine.values() for r in recs], field)
                if not curves:
                    continue  # no run has training times (stats.jsonl)
                xlabel, scale = _axis(field, [x for points in curves.values() for x, _, _ in points])
                path = name_of(file_name)
                if draw:
                    curves_plot(path, {label: [(x, v) for x, v, _ in points] for label, points in curves.items()},
                                xlabel=xlabel, ylabel=ylabel, names=names, x_scale=scale,
                                title=f'{ylabel} along training ({per_point}, {how})')
                plots.append(path)

        # Against the guidance weight, one curve per (run, guide EMA length); guidance 1 (unguided) starts each.
        if guided:
            curves, curve_names = {}, {}
            for label, recs in at_end.items():
                gstds = sorted({r['guide_std'] for r in recs if r['guidance'] != 1}, key=lambda g: (g is None, g)) \
                    or [None]
                for gstd in gstds:
                    key = label if gstds == [None] else f'{label}, guide sigma_rel {gstd:.3f}'
                    by_w = {}
                    for r in recs:
                        if r['guidance'] == 1 or r['guide_std'] == gstd:
                            by_w[r['guidance']] = min(by_w.get(r['guidance'], math.inf), r['value'])
                    curves[key] = list(by_w.items())
                    curve_names[key] = key.replace(label, names[label], 1)
            path = name_of(GUIDANCE_PLOT_NAME)
            if draw:
                curves_plot(path, curves, xlabel='guidance weight', ylabel=ylabel, names=curve_names, logx=False,
                            title=f'{ylabel} against guidance ({per_point}, best sigma_rel per point)',
                            mark_text=lambda key, w, v: f'{v:.4g} at {w:g}')
            plots.append(path)

        # Against the EMA length (EDM2 paper Fig. 5), at each run's latest time, best guide setting per length.
        if several_stds or not (along or guided):
            curves = {}
            for label, recs in at_end.items():
                by_std = {}
                for r in recs:
                    by_std[r['std']] = min(by_std.get(r['std'], math.inf), r['value'])
                curves[label] = by_std
            kimgs = sorted({recs[0]['kimg'] for recs in at_end.values()})
            at = f' at {kimgs[0]} kimg' if len(kimgs) == 1 else ''
            path = name_of(PLOT_NAME)
            if draw:
                sweep_plot(path, curves, metric=metric, title=f'{metric}{at}, {per_point}')
            plots.append(path)
    return dnnlib.EasyDict(best=best, plots=plots, records=drawn_records)

#----------------------------------------------------------------------------
# One point.

class HeldNetworks:
    """The networks of the points being measured, each loaded once while it is in use: a reconstruction is measured
    at each of its guide settings in turn, and the weights of one guide EMA length come one after another. One
    network per role ('main', 'guide') is held, with the encoder stored with it, under the path it came from; asking
    for another path of that role loads it in its place. Loading is generate_images' (same checks, same errors
    naming the file, rank 0 first, onto `device`, by default this process's), so a point measures the same images."""

    def __init__(self, device=None):
        self.device = torch.device(device) if device is not None else dist.device()
        self.held = {}  # role -> (path, network, encoder)

    def get(self, path, role):
        """(network on the device, the encoder stored with it or None) of the network file or URL `path`."""
        if self.held.get(role, (None,))[0] != path:
            self.drop(role)  # its memory is freed before the next one is loaded
            if role == 'main':
                require_decoder(path)  # a latent network that cannot be decoded is refused before it is loaded
            snapshot = dist.rank0_first(lambda: load_snapshot(path, verbose=False))
            self.held[role] = (path, snapshot.ema.to(self.device), snapshot.get('encoder'))
        return self.held[role][1:]

    def drop(self, role):
        """Forget the network of `role` (e.g. once its file is to be deleted: a later one may take its name)."""
        self.held.pop(role, None)

def measure_network(net_path, ref, metrics, seeds, gnet=None, guidance=1, max_batch_size=32, device=None,
                    detector_kwargs=None, detectors=None, progress=True, edm2_exact=False, vae=None, held=None):
    """{metric: value} of the images `net_path` generates for `seeds` (rank 0; None on the other ranks). With
    `held` (HeldNetworks), the networks come from it, loaded once for all the points that use them; without, they
    are loaded from their files for this point."""
    net, encoder = net_path, None
    if held is not None:
        net, encoder = held.get(net_path, 'main')
        if gnet is not None and guidance != 1:
            gnet_path = gnet
            gnet, _ = held.get(gnet_path, 'guide')
            check_guide(net, gnet, os.fspath(gnet_path))  # named by its file, as generate_images names it
    stats_iter = calculate_stats_for_network(net, seeds, gnet=gnet, guidance=guidance, encoder=encoder,
                                             max_batch_size=max_batch_size, device=device, verbose=False,
                                             edm2_exact=edm2_exact, vae=vae,
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
    return calculate_metrics_from_stats(stats, ref, metrics, verbose=False)

#----------------------------------------------------------------------------
# The sweep.

def sweep(indirs, outdir, out_std, ref_path, metrics=('fid',), seeds=range(50000), out_kimg=None, points=None,
          gnet=None, guide_std=None, guide_kimg=None, guidance=1, max_batch_size=32, in_prefix=None, in_std=None,
          out_prefix='phema', phema_batch=8, keep_networks=False, device=None, detector_kwargs=None,
          detectors=None, verbose=True, edm2_exact=False, vae=None):
    """Reconstruct, measure and plot every point of the sweep, skipping points that <outdir>/results.jsonl already
    holds for the same setting.

    indirs:     training run folders (a list, labelled by folder name) or a dict label -> folder; one curve each.
    out_kimg:   training times: None (the latest snapshot), 'all', or a list of kimg; `points` keeps about that
                many of them, spread evenly over the run (None with `points`: over all snapshots).
    out_std:    EMA lengths σ_rel of the measured networks.
    gnet:       None, a guiding network file/URL, or a training run whose reconstructions at `guide_kimg` (default:
                its latest) with each EMA length of `guide_std` guide in turn; `guidance`: a weight or a list.
    in_prefix:  snapshot name prefix (None: the one prefix in the folder, reconstructions aside); in_std: use only
                snapshots with these EMA lengths.

    Per (run, time) a batch of reconstructions <outdir>/<run>/<out_prefix>-<kimg>-<std>.pkl shares one pass over
    the snapshots; each is measured at every guide setting, then deleted unless `keep_networks`. Each point
    appends its lines to results.jsonl (fields: RESULT_FIELDS) and redraws the pictures (plot_results). Under
    torchrun, rank 0 reconstructs and writes; all ranks generate. `edm2_exact` measures with EDM2's exact op
    sequence and `vae` decodes latent networks with another VAE than the one they name (each a setting of its own
    in results.jsonl). Returns plot_results()'s EasyDict(best, plots, records) and
    results (path), names {run: legend text}, measured (points measured now), sec (seconds this call took).
    """
    start = time.time()
    metrics = parse_metric_list(metrics)
    seeds = parse_int_list(seeds)
    if len(seeds) < 2:
        raise SweepError('at least 2 seeds are needed to compute statistics')
    out_std = posthoc.parse_std_list(out_std)
    if guide_std is not None:
        guide_std = posthoc.parse_std_list(guide_std)
    if in_std is not None:
        in_std = posthoc.parse_std_list(in_std)
    guidances = sorted({float(w) for w in (guidance if isinstance(guidance, (list, tuple)) else [guidance])})
    if gnet is None and guidances != [1.0]:
        raise SweepError('--guidance other than 1 needs --gnet')
    results_path = os.path.join(outdir, RESULTS_NAME)
    contiguous = seeds == list(range(seeds[0], seeds[0] + len(seeds)))
    measure = dict(num_images=len(seeds), seed=seeds[0], seeds=None if contiguous else seeds)
    if edm2_exact:  # keys only when set, so that earlier results.jsonl files keep matching the default
        measure['edm2_exact'] = True
    if in_std is not None:
        measure['instd'] = [round(s, 3) for s in in_std]
    if vae is not None:
        measure['vae'] = vae
    given = {m: kwargs['path'] for m, kwargs in (detector_kwargs or {}).items() if kwargs.get('path') is not None}
    say = tqdm.tqdm.write if verbose and dist.get_rank() == 0 else (lambda *_: None)

    # Everything a user can get wrong is checked before the first reconstruction.
    ref = None
    release_lock = lambda: None

    def prepare():
        nonlocal ref, release_lock
        runs = find_runs(indirs, outdir, in_prefix, in_std, out_kimg, points, out_prefix)
        guide = find_guide(gnet, guide_std, guide_kimg, outdir, out_prefix)
        # A reconstruction must not replace (and, once measured, delete) one of its inputs; no output may replace
        # --ref or --gnet.
        for run, nimgs, stds in [(run, run.nimgs, out_std) for run in runs] + \
                ([(guide.run, [guide.nimg], guide.stds)] if guide is not None and guide.run is not None else []):
            for nimg in nimgs:
                posthoc.check_outputs_not_inputs(run.in_pkls, run.net_dir, out_prefix, nimg, stds)
        pictures = [PLOT_NAME, GUIDANCE_PLOT_NAME] + list(ALONG_PLOTS.values())
        for output in [results_path] + [os.path.join(outdir, name.replace('.png', f'{suffix}.png'))
                                        for name in pictures for suffix in [''] + [f'-{m}' for m in metrics[1:]]]:
            reason = cli.input_overwrite(output, {'--ref': ref_path, '--gnet': gnet})
            if reason is not None:
                raise SweepError(reason)
        ref = load_stats(ref_path, verbose=False)
        # A metric the reference lacks is refused before the detectors are set up (DINOv2's would be downloaded);
        # then the detectors must give the reference's feature widths.
        check_reference(ref, metrics, f'--ref={ref_path}')
        ready = detectors_for(metrics, detectors, detector_kwargs, device=device, verbose=False)
        check_reference(ref, metrics, f'--ref={ref_path}', ready)
        measure['ref_sha256'] = ref_fingerprint(ref_path)
        measure['detectors'] = {m: detector_id(given[m]) for m in metrics if m in given}  # the detectors loaded
        check_outdir(outdir)  # created only once every input has been read
        release_lock = dist.acquire_run_dir(outdir, 'sweep.lock', what='sweep')  # one sweep writes results.jsonl
        measured = _index(read_records(results_path))
        every = [(i, nimg, std, gstd, w) for i, run in enumerate(runs) for nimg in run.nimgs for std in out_std
                 for gstd, w in guide_settings(guide, guidances)]
        todo = [p for p in every
                if not all(_measured(measured, _setting(runs[p[0]], p[1], p[2], guide, p[3], p[4], m, measure))
                           for m in metrics)]
        planned = {}
        for i, nimg, std, _, w in every:
            planned.setdefault(runs[i].label, []).append((nimg // 1000, round(std, 3), w))
        return runs, guide, todo, planned, len(every), dict(ref_sha256=measure['ref_sha256'],
                                                            detectors=measure['detectors'])
    runs, guide, todo, planned, total, fingerprints = dist.on_rank0(prepare)
    measure.update(fingerprints)
    say(f'{total - len(todo)} of {total} points already measured in {results_path}; {len(todo)} to go.')

    try:
        with tqdm.tqdm(total=total, initial=total - len(todo), unit='point', desc='points', dynamic_ncols=True,
                       disable=not verbose or dist.get_rank() != 0) as bar:
            if any(w != 1 for *_, w in todo) and guide.run is not None:
                dist.on_rank0(lambda: reconstruct(guide.run, guide.nimg, guide.stds, out_prefix, verbose))
            held = HeldNetworks(device)
            for i, nimg, batch in _batches(runs, todo, phema_batch):
                # A batch of reconstructions shares one pass over the snapshots; each one is written (atomically)
                # before any is measured, and a rerun reuses those still there.
                run, began = runs[i], time.time()
                paths = dist.on_rank0(lambda: reconstruct(run, nimg, batch, out_prefix, verbose))
                share = (time.time() - began) / len(batch)
                for std, net_path in zip(batch, paths):
                    for k, (gstd, w) in enumerate([p[3:] for p in todo if p[:3] == (i, nimg, std)]):
                        began = time.time()
                        values = measure_network(net_path, ref, metrics, seeds,
                                                 gnet=guide.paths[gstd] if w != 1 else None, guidance=w,
                                                 max_batch_size=max_batch_size, device=device,
                                                 detector_kwargs=detector_kwargs, detectors=detectors,
                                                 progress=verbose, edm2_exact=edm2_exact, vae=vae, held=held)
                        sec = time.time() - began + (share if k == 0 else 0)
                        dist.on_rank0(lambda: record_point(run, nimg, std, guide, gstd, w, net_path, values, sec,
                                                           _where(ref_path), runs, metrics, measure, planned, outdir,
                                                           say))
                        bar.update(1)
                    held.drop('main')
                    if not keep_networks:
                        dist.on_rank0(lambda: _remove(net_path, run.net_dir))
        if not keep_networks and guide is not None and guide.run is not None:
            dist.on_rank0(lambda: [_remove(path, guide.run.net_dir) for path in guide.paths.values()])
        result = dist.on_rank0(lambda: _final_pictures(outdir, runs, metrics, measure, planned))
    finally:
        release_lock()
    return dnnlib.EasyDict(result, results=results_path, measured=len(todo), sec=time.time() - start,
                           names={run.label: describe(run.label, run.arch) for run in runs})

def _batches(runs, todo, phema_batch):
    """(run index, nimg, stds) of each batch of reconstructions that share one pass over a run's snapshots."""
    for i, run in enumerate(runs):
        for nimg in run.nimgs:
            stds = sorted({p[2] for p in todo if p[:2] == (i, nimg)})
            for first in range(0, len(stds), phema_batch):
                yield i, nimg, stds[first:first + phema_batch]

def _final_pictures(outdir, runs, metrics, measure, planned):
    """plot_results() of the whole file; the pictures were drawn after each point, so only a missing one is drawn
    again (a rerun with nothing to measure writes nothing)."""
    records = read_records(os.path.join(outdir, RESULTS_NAME))
    result = plot_results(outdir, records, runs, metrics, measure, planned, draw=False)
    if not all(os.path.isfile(path) for path in result.plots):
        result = plot_results(outdir, records, runs, metrics, measure, planned)
    return result

def reconstruct(run, nimg, stds, out_prefix, progress=True):
    """Write the reconstructions of `stds` at `nimg` for `run` that are not on disk yet; return the paths of all."""
    steps = posthoc.reconstruct_phema(run.in_pkls, out_std=stds, out_nimg=nimg, out_dir=run.net_dir,
                                      out_prefix=out_prefix, skip_existing=True, max_batch_size=len(stds),
                                      verbose=False)
    for _ in tqdm.tqdm(steps, unit='snapshot', desc=f'post-hoc EMA {run.label}', leave=False, dynamic_ncols=True,
                       disable=not progress or len(steps) == 0):
        pass
    return [posthoc.output_path(run.net_dir, out_prefix, nimg, std) for std in stds]

def _remove(path, folder):
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    with contextlib.suppress(OSError):
        os.rmdir(folder)  # only once it is empty

def record_point(run, nimg, std, guide, gstd, guidance, net_path, values, sec, ref_where, runs, metrics, measure,
                 planned, outdir, say):
    """Append a measured point's lines, redraw the pictures, report the value and the run's best so far."""
    results_path = os.path.join(outdir, RESULTS_NAME)
    train_sec = time_at(run.times, nimg)
    facts = dict(ref=ref_where, nimg=nimg, train_sec=None if train_sec is None else round(train_sec, 3),
                 gflops=run.arch.gflops, train_pflop=nimg * 3 * run.arch.gflops / 1e6,
                 indir=os.path.relpath(run.indir, outdir), net=os.path.relpath(net_path, outdir), sec=round(sec, 3))
    new = [dict(_setting(run, nimg, std, guide, gstd, guidance, metric=m, measure=measure), value=float(values[m]),
                **facts) for m in metrics]
    best = plot_results(outdir, append_records(results_path, new), runs, metrics, measure, planned).best
    where = f'{nimg // 1000} kimg, σ_rel {std:.3f}' + (f', guide σ_rel {gstd:.3f}' if gstd is not None else '') + \
        (f', guidance {guidance:g}' if guidance != 1 else '')
    for m in metrics:
        b = best[m][run.label]
        say(f'{run.label}: {where}  {m} {values[m]:.4g}   best so far {b["value"]:.4g} at {describe_point(b)}')

def describe_point(record):
    """'σ_rel 0.080' (with the training time and guide setting where they vary in a sweep)."""
    text = f'σ_rel {record["std"]:.3f}, {record["kimg"]} kimg'
    if record.get('guidance', 1) != 1:
        if record.get('guide_std') is not None:
            text += f', guide σ_rel {record["guide_std"]:.3f}'
        text += f', guidance {record["guidance"]:g}'
    return text

#----------------------------------------------------------------------------
# Results files for plot_sweep.py: any of several formats, one curve per run.

def _std_of(key):
    """σ_rel from a float-like key or from a reconstruction/snapshot file name such as phema-0002147-0.050.pkl."""
    info = parse_pickle_name(str(key))
    if info is not None:
        return info.std
    try:
        return float(key)
    except (TypeError, ValueError):
        raise ValueError(f'cannot tell the EMA length of "{key}"; use a std or a <prefix>-<kimg>-<std>.pkl name') \
            from None

def _pick_metric(record, metric, where):
    """The value of `metric` in a dict record; with metric None the record must hold exactly one number."""
    numbers = {k: v for k, v in record.items() if k not in ('std', 'net', 'path', 'pkl')
               and _is_number(v)}
    if metric is None:
        if len(numbers) != 1:
            raise ValueError(f'{where}: found metrics {sorted(numbers)}; choose one')
        return float(next(iter(numbers.values())))
    if metric not in record:
        raise ValueError(f'{where}: no metric "{metric}" (found {sorted(numbers)})')
    return _number(record[metric], where)

def _number(v, where):
    if not _is_number(v):
        raise ValueError(f'{where}: "{v}" is not a number')
    return float(v)

def _is_number(v):
    try:
        float(v)
        return not isinstance(v, bool)
    except (TypeError, ValueError):
        return False

def _add_point(points, std, value, where):
    """points[std] = value, unless another entry already gave that EMA length (e.g. "0.05" and "0.050", or two rows
    of one std): which of the two values is meant cannot be told."""
    if std in points:
        raise ValueError(f'{where}: σ_rel {std:g} appears twice in the results (values {points[std]:g} and '
                         f'{value:g}); keep one')
    points[std] = value

def _varying(records):
    """{run: the fields among kimg, guide_std and guidance that take several values in its records}."""
    seen = {}
    for r in records:
        for k in ('kimg', 'guide_std', 'guidance'):
            seen.setdefault(str(r.get('run', '')), {}).setdefault(k, set()).add(json.dumps(r.get(k)))
    return {run: [k for k, values in fields.items() if len(values) > 1] for run, fields in seen.items()}

def _curve_label(record, varying):
    """A curve per run, and per training time and guide setting where the run's records hold several."""
    run = str(record.get('run', ''))
    parts = [run]
    fields = varying.get(run, [])
    if 'kimg' in fields:
        parts.append(f'{record.get("kimg")} kimg')
    if 'guide_std' in fields and record.get('guide_std') is not None:
        parts.append(f'guide sigma_rel {float(record["guide_std"]):.3f}')
    if 'guidance' in fields or 'guide_std' in fields:
        parts.append(f'guidance {float(record.get("guidance", 1)):g}')
    return ', '.join(p for p in parts if p)

def read_sweep_runs(path, metric=None):
    """{run label: {std: value}} from a results file; every value and std must be a finite number.

    Accepted: JSON object {std or pkl name: value or {metric: value}}; JSON list or JSON-lines of records with a
    'std' (or 'net'/'path'/'pkl' file name) key and metric keys; CSV with a header holding 'std' (or 'net'/'path'/
    'pkl') and metric columns; sweep_phema.py's results.jsonl, whose records name their 'metric', 'value' and
    'run' (one curve per run, and per training time and guide setting where a run has several; when a point was
    measured more than once, its last record counts). The other formats
    hold one run, labelled ''. `metric` chooses the metric when there are several.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: no such results file')
    with open(path, encoding='utf-8') as f:
        try:
            text = f.read()
        except UnicodeDecodeError:
            raise ValueError(f'{path}: not a text file (JSON, JSON lines or CSV)') from None
    if path.lower().endswith('.csv'):
        records = list(csv.DictReader(io.StringIO(text)))
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError:
            try:
                records = [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError as e:
                raise ValueError(f'{path}: neither JSON, JSON lines nor CSV ({e})') from None
    runs = {}
    if isinstance(records, dict):
        runs[''] = {}
        for key, value in records.items():
            _add_point(runs[''], _std_of(key), _pick_metric(value, metric, f'{path}: {key}') if isinstance(value, dict)
                       else _number(value, f'{path}: {key}'), f'{path}: {key}')
    else:
        if not isinstance(records, list):
            raise ValueError(f'{path}: expected a JSON object or a list of records')
        bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
        if bad is not None:
            raise ValueError(f'{path}: record {bad + 1} is not an object')
        long = records and all('metric' in r and 'value' in r for r in records)
        if long:  # sweep_phema.py: one record per (run, std, metric)
            found = sorted({str(r['metric']) for r in records})
            if metric is None and len(found) != 1:
                raise ValueError(f'{path}: found metrics {found}; choose one')
            if metric is not None and metric not in found:
                raise ValueError(f'{path}: no metric "{metric}" (found {found})')
            records = [r for r in records if r['metric'] == (metric or found[0])]
        varying = _varying(records) if long else {}
        for i, record in enumerate(records):
            where = f'{path}: record {i + 1}'
            key = next((record[k] for k in ('std', 'net', 'path', 'pkl') if k in record), None)
            if key is None:
                raise ValueError(f'{where} has no "std" (or "net") field')
            value = _number(record['value'], where) if long else _pick_metric(record, metric, where)
            points = runs.setdefault(_curve_label(record, varying) if long else '', {})
            if long:
                points[_std_of(key)] = value  # a point measured again: its last record counts
            else:
                _add_point(points, _std_of(key), value, where)
    if not any(runs.values()):
        raise ValueError(f'{path}: no results found')
    # NaN or inf would be drawn as a gap and could be reported as the best point: refuse them with the point named.
    for label, sweep in runs.items():
        run = f'run "{label}", ' if label else ''
        for std, value in sweep.items():
            if not math.isfinite(std):
                raise ValueError(f'{path}: {run}σ_rel {std:g} is not a finite number')
            if not math.isfinite(value):
                raise ValueError(f'{path}: {run}σ_rel {std:g}: {metric or "value"} is {value:g}, '
                                 f'not a finite number')
    return runs

def read_sweep_results(path, metric=None):
    """dict std → value of a results file that holds one run (formats as read_sweep_runs)."""
    runs = read_sweep_runs(path, metric=metric)
    if len(runs) != 1:
        raise ValueError(f'{path}: holds the runs {sorted(runs)}; read it with read_sweep_runs')
    return next(iter(runs.values()))
