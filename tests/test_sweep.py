"""sweep_phema.py: each point is what reconstruct_phema.py and `calculate_metrics.py gen` give, a killed sweep resumes
without measuring a point twice, results.jsonl and sweep.png agree; plot_sweep.py refuses non-finite data.

Tiny networks (8x8 images, 16 channels), 8 images per point and a TorchScript stand-in for Inception-v3 (2x2
average-pooled colours and their squares, 24 features) keep every test to seconds.
"""

import copy
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import calculate_metrics
import count_flops
from conftest import make_tiny_net, single_thread, snapshot_dict
import dnnlib
import plot_sweep
import reconstruct_phema
import sweep_phema
from metrics import sweeps
from metrics.stats import calculate_stats_for_iterable, final_stats, save_stats
from networks.loading import load_snapshot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDS = [0.06, 0.08, 0.12]
DATASET_KWARGS = dict(class_name='training.dataset.ImageFolderDataset', path='data.zip', use_labels=False)

# Tiny tensors gain nothing from a second thread, and beside other processes on 2 cores one thread is many times
# faster.
pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py

#----------------------------------------------------------------------------
# Fixtures: two tiny "training runs", a stand-in detector and reference statistics made with it.

class PooledColours(torch.nn.Module):
    """The interface of NVIDIA's Inception pickle (any size, `return_features`), with 24 cheap features."""

    def forward(self, img, return_features: bool = False):
        x = torch.nn.functional.adaptive_avg_pool2d(img.to(torch.float32), 2).flatten(1) / 255
        return torch.cat([x, x * x], dim=1)

# runA's stats.jsonl: status lines every 3072 images (training seconds at 3072, 6144, 9216, 12288 images), so the
# time at the 4 and 8 kimg snapshots lies between two lines and the one at 12 kimg on one.
STATUS_TIMES = [(0, 1.0), (3072, 30.0), (6144, 70.0), (9216, 100.0), (12288, 150.0)]

def _write_run(folder, seed, times=None):
    """Snapshots at 4, 8 and 12 kimg, tracked at σ_rel 0.050 and 0.100, of a network that drifts randomly; with
    `times` [(nimg, seconds)], a stats.jsonl."""

    net = make_tiny_net(seed=seed, channels_per_head=16).eval().requires_grad_(False)
    os.makedirs(folder)
    for nimg in (4096, 8192, 12288):
        for p in net.parameters():
            p.add_(torch.randn_like(p), alpha=0.3)
        for std in (0.05, 0.10):
            ema = copy.deepcopy(net)
            for p in ema.parameters():
                p.add_(torch.randn_like(p), alpha=0.1 * std)
            with open(os.path.join(folder, f'network-snapshot-{nimg // 1000:07d}-{std:.3f}.pkl'), 'wb') as f:
                pickle.dump(snapshot_dict(ema, DATASET_KWARGS), f)
    if times is not None:
        with open(os.path.join(folder, 'stats.jsonl'), 'w') as f:
            f.writelines(json.dumps({'Progress/kimg': nimg / 1000, 'Timing/total_sec': sec}) + '\n'
                         for nimg, sec in times)
    return str(folder)

@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    with single_thread():
        return _setup(tmp_path_factory.mktemp('sweep'))

def _setup(root):
    detector = str(root / 'pooled.pt')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)  # TorchScript is deprecated in PyTorch 2.13
        torch.jit.save(torch.jit.script(PooledColours()), detector)
    images = torch.randint(0, 256, [40, 3, 8, 8], generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    ref = str(root / 'ref.pkl')
    save_stats(final_stats(calculate_stats_for_iterable([images], metrics=['fid'], device='cpu', verbose=False,
                                                        detector_kwargs=dict(fid=dict(path=detector)))),
               ref, verbose=False)
    return dnnlib.EasyDict(root=root, detector=detector, ref=ref, run_a=_write_run(root / 'runA', 1, STATUS_TIMES),
                           run_b=_write_run(root / 'runB', 2))

def _args(setup, outdir, *extra, stds=STDS, indirs=None):
    indirs = indirs or [setup.run_a]
    return ([f'--indir={d}' for d in indirs] +
            [f'--outdir={outdir}', f'--outstd={",".join(f"{s:g}" for s in stds)}', f'--ref={setup.ref}',
             '--metrics=fid', f'--detector={setup.detector}', '--num=8', '--seed=5', '--batch=4'] + list(extra))

def _sweep(setup, outdir, *extra, **kwargs):
    result = CliRunner().invoke(sweep_phema.cmdline, _args(setup, outdir, *extra, **kwargs))
    assert result.exit_code == 0, result.output
    return result

def _records(outdir):
    with open(os.path.join(outdir, 'results.jsonl')) as f:
        return [json.loads(line) for line in f]

#----------------------------------------------------------------------------

def test_point_equals_reconstruct_phema_and_calculate_metrics_gen(setup, tmp_path):
    out = str(tmp_path / 'sweep')
    _sweep(setup, out, '--keep-networks')
    records = _records(out)
    assert [(r['run'], r['std'], r['kimg'], r['metric'], r['num_images'], r['seed']) for r in records] == \
        [('runA', s, 12, 'fid', 8, 5) for s in STDS]
    # The networks: reconstruct_phema.py's file names, and its weights bit for bit.
    phema = str(tmp_path / 'phema')
    result = CliRunner().invoke(reconstruct_phema.cmdline, [f'--indir={setup.run_a}', f'--outdir={phema}',
                                                         '--outstd=0.06,0.08,0.12'])
    assert result.exit_code == 0, result.output
    for r in records:
        name = f'phema-0000012-{r["std"]:.3f}.pkl'
        assert r['net'] == os.path.join('runA', name)  # relative to the sweep folder
        ours, theirs = load_snapshot(os.path.join(out, r['net'])).ema, load_snapshot(os.path.join(phema, name)).ema
        assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
        # The metric: `calculate_metrics.py gen` on the same network and seeds.
        result = CliRunner().invoke(calculate_metrics.cmdline, ['gen', f'--net={out}/{r["net"]}', f'--ref={setup.ref}',
                                                                '--metrics=fid', f'--detector={setup.detector}',
                                                                '--seeds=5-12', '--batch=3'])
        assert result.exit_code == 0, result.output
        fid = float([line for line in result.output.splitlines() if line.startswith('fid = ')][0].split(' = ')[1])
        assert r['value'] == pytest.approx(fid, rel=1e-5) and r['value'] > 0
    # Different EMA lengths are different networks with different FIDs.
    assert len({r['value'] for r in records}) == len(STDS)

def test_edm2_exact_is_its_own_setting(setup, tmp_path):
    """--edm2-exact measures with EDM2's op sequence, as `calculate_metrics.py gen --edm2-exact` does, and is kept
    apart from the default path's points in results.jsonl."""
    out = str(tmp_path / 'sweep')
    _sweep(setup, out, '--edm2-exact', '--keep-networks', stds=[0.08])
    exact, = _records(out)
    assert exact['edm2_exact'] is True
    result = CliRunner().invoke(calculate_metrics.cmdline, ['gen', f'--net={out}/{exact["net"]}', f'--ref={setup.ref}',
                                                            '--metrics=fid', f'--detector={setup.detector}',
                                                            '--seeds=5-12', '--batch=3', '--edm2-exact'])
    assert result.exit_code == 0, result.output
    fid = float([line for line in result.output.splitlines() if line.startswith('fid = ')][0].split(' = ')[1])
    assert exact['value'] == pytest.approx(fid, rel=1e-5)
    _sweep(setup, out, stds=[0.08])  # the default path: a new point, not a skipped one
    records = _records(out)
    assert len(records) == 2 and 'edm2_exact' not in records[1]
    assert records[1]['value'] == pytest.approx(exact['value'], rel=1e-3)  # the same function, other rounding

def test_interrupted_sweep_resumes_without_measuring_twice(setup, tmp_path, monkeypatch):
    out = str(tmp_path / 'sweep')
    measured = []
    real_measure = sweeps.measure_network

    def measure(net_path, *args, **kwargs):
        if interrupt_at is not None and len(measured) == interrupt_at:
            raise KeyboardInterrupt  # Ctrl-C while the second point's images are generated
        measured.append(os.path.basename(net_path))
        return real_measure(net_path, *args, **kwargs)
    monkeypatch.setattr(sweeps, 'measure_network', measure)

    interrupt_at = 1
    result = CliRunner().invoke(sweep_phema.cmdline, _args(setup, out))
    assert result.exit_code == 1 and 'Aborted!' in result.output  # click's answer to Ctrl-C
    assert [r['std'] for r in _records(out)] == [0.06] and measured == ['phema-0000012-0.060.pkl']
    interrupt_at = None
    result = _sweep(setup, out)
    assert '1 of 3 points already measured' in result.output
    assert measured == ['phema-0000012-0.060.pkl', 'phema-0000012-0.080.pkl', 'phema-0000012-0.120.pkl']
    assert sorted(r['std'] for r in _records(out)) == STDS
    assert not os.path.exists(os.path.join(out, 'runA'))  # measured networks are deleted, then their folder
    # A third run has nothing to do; a larger --num is a new setting and is measured again.
    _sweep(setup, out)
    assert len(measured) == 3
    _sweep(setup, out, '--num=9', stds=[0.08])
    assert len(measured) == 4 and len(_records(out)) == 4

def test_sigkilled_sweep_resumes(setup, tmp_path, monkeypatch):
    """A real SIGKILL while the sweep runs: the results file stays whole, and the rerun measures each missing point
    once."""
    out = str(tmp_path / 'sweep')
    stds = [0.06, 0.07, 0.08, 0.09, 0.10, 0.12]
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, 'sweep_phema.py')] + _args(setup, out, stds=stds),
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = os.path.join(out, 'results.jsonl')
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and not os.path.isfile(results):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _records(out)  # every line parses
    assert 1 <= len(before) < len(stds), 'the sweep was not killed half-way; make it longer'
    measured = []
    real_measure = sweeps.measure_network
    monkeypatch.setattr(sweeps, 'measure_network',
                        lambda net_path, *a, **k: measured.append(net_path) or real_measure(net_path, *a, **k))
    _sweep(setup, out, stds=stds)
    after = _records(out)
    assert after[:len(before)] == before
    assert sorted(r['std'] for r in after) == stds  # each point exactly once
    assert len(measured) == len(stds) - len(before)

def test_results_and_plot_agree(setup, tmp_path):
    out = str(tmp_path / 'sweep')
    result = _sweep(setup, out, indirs=[setup.run_a, setup.run_b])
    records = _records(out)
    assert len(records) == 2 * len(STDS) and {r['run'] for r in records} == {'runA', 'runB'}
    expected = {run: sorted([r['std'], r['value']] for r in records if r['run'] == run) for run in ('runA', 'runB')}
    best = {run: min(points, key=lambda p: p[1]) for run, points in expected.items()}
    png = PIL.Image.open(os.path.join(out, 'sweep.png'))
    assert json.loads(png.text['sweep']) == expected  # the PNG shows exactly the measured points ...
    assert json.loads(png.text['best']) == best       # ... and marks the best of each run
    pixels = np.asarray(png.convert('RGB')).astype(int)
    assert (np.abs(pixels - [200, 0, 0]).sum(axis=2) < 60).sum() > 50  # the red best markers are drawn
    for run, (std, value) in best.items():
        assert f'{run}: best fid {value:.4g} at σ_rel {std:.3f}' in result.output
    # plot_sweep.py reads the same file to the same curves and best points.
    result = CliRunner().invoke(plot_sweep.cmdline, [f'--results={out}/results.jsonl', f'--out={tmp_path}/p.png'])
    assert result.exit_code == 0, result.output
    assert json.loads(PIL.Image.open(tmp_path / 'p.png').text['sweep']) == expected
    for run, (std, value) in best.items():
        assert f'{run}: best metric {value:g} at σ_rel {std:.3f}' in result.output

@pytest.mark.slow  # a torchrun launch of two processes
def test_two_processes_give_the_single_process_numbers(setup, tmp_path):
    single, double = str(tmp_path / 'single'), str(tmp_path / 'double')
    _sweep(setup, single, stds=[0.06, 0.12])
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           os.path.join(REPO, 'sweep_phema.py')] +
                          # torchrun's own parser takes --num for an abbreviation of its --numa-binding
                          [a for a in _args(setup, double, stds=[0.06, 0.12]) if a[:5] not in ('--num', '--see')] +
                          ['--seeds=5-12'],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a, b = _records(single), _records(double)
    assert [r['std'] for r in b] == [0.06, 0.12]
    for x, y in zip(a, b):
        assert y['value'] == pytest.approx(x['value'], rel=1e-6)

def test_bad_options_are_one_line_errors(setup, tmp_path):
    afile = tmp_path / 'afile'
    afile.write_text('x')
    empty = tmp_path / 'empty'
    empty.mkdir()
    twin = tmp_path / 'other' / 'runA'
    twin.mkdir(parents=True)
    out = str(tmp_path / 'out')
    cases = [
        ([f'--indir={tmp_path / "missing"}'], f'--indir={tmp_path / "missing"}: no such directory'),
        ([f'--indir={empty}'], 'no <prefix>-<kimg>-<std>.pkl snapshots'),
        ([f'--indir={setup.run_a}', f'--indir={twin}'], 'has the same name as'),
        ([f'--indir={setup.run_a}', f'--outdir={afile}'], 'exists and is not a directory'),
        ([f'--indir={setup.run_a}', '--outstd=0.1,0.5'], 'less than 0.289'),
        ([f'--indir={setup.run_a}', '--outstd=0.1,x'], "'x' is not a float"),
        ([f'--indir={setup.run_a}', f'--ref={tmp_path / "noref.pkl"}'], 'noref.pkl: no such statistics file'),
        ([f'--indir={setup.run_a}', '--outkimg=7'], '--outkimg=7: '),
        ([f'--indir={setup.run_a}', '--metrics=fid,kid'], 'Invalid metric "kid"'),
        ([f'--indir={setup.run_a}', '--guidance=2'], '--guidance other than 1 needs --gnet'),
        ([f'--indir={setup.run_a}', f'--gnet={tmp_path / "g.pkl"}', '--guidance=2'], 'g.pkl: no such network file'),
    ]
    for extra, message in cases:
        base = [f'--outdir={out}', '--outstd=0.1', f'--ref={setup.ref}', '--metrics=fid', '--num=4']
        args = base + extra  # later options win
        result = CliRunner().invoke(sweep_phema.cmdline, args)
        assert result.exit_code in (1, 2), (extra, result.output)
        lines = [line for line in result.output.splitlines() if line.startswith('Error: ')]
        assert len(lines) == 1 and message in lines[0], (extra, result.output)
        assert result.exit_code == 2 or result.output.count('\n') == 1, result.output
        assert not os.path.exists(out), extra  # no input was wrong after --outdir had been made

#----------------------------------------------------------------------------
# Along training, guidance, prefixes, moved folders, documented fields.

def _count_flops_gflops(path):
    result = CliRunner().invoke(count_flops.cmdline, [path, '--json'])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)[0]['gflops']  # --json prints nothing but the JSON

def test_along_the_run(setup, tmp_path):
    """Two runs at two training times and two EMA lengths: each line carries images seen, training wall time
    (runA's stats.jsonl) and training compute; the pictures along training show, per run and time, the best of the
    lines."""
    out = str(tmp_path / 'along')
    result = _sweep(setup, out, '--outkimg=4,12', stds=[0.06, 0.12], indirs=[setup.run_a, setup.run_b])
    records = _records(out)
    assert sorted((r['run'], r['kimg'], r['std']) for r in records) == \
        sorted((run, k, s) for run in ('runA', 'runB') for k in (4, 12) for s in (0.06, 0.12))
    gflops = _count_flops_gflops(os.path.join(setup.run_a, 'network-snapshot-0000004-0.050.pkl'))
    for r in records:
        assert r['nimg'] == {4: 4096, 8: 8192, 12: 12288}[r['kimg']]
        assert r['gflops'] == pytest.approx(gflops, rel=1e-6)
        assert r['train_pflop'] == pytest.approx(r['nimg'] * 3 * gflops / 1e6, rel=1e-6)
        assert r['sec'] > 0 and r['guidance'] == 1 and r['guide'] is None
        # Linear between runA's status lines at 3072 and 6144 (30 s, 70 s); exact at 12288; runB has no
        # stats.jsonl.
        expected = {4: 30 + 40 / 3, 12: 150}[r['kimg']] if r['run'] == 'runA' else None
        assert r['train_sec'] == (pytest.approx(expected, abs=1e-3) if expected is not None else None)  # ms
    # The pictures' points are the results' numbers: per run and time the best EMA length's value.
    best = {}
    for r in records:
        key = (r['run'], r['kimg'])
        best[key] = min(best.get(key, r), r, key=lambda q: q['value'])
    for field, name in [('nimg', 'along-images.png'), ('train_sec', 'along-time.png'),
                        ('train_pflop', 'along-compute.png')]:
        png = PIL.Image.open(os.path.join(out, name))
        expected = {}
        for (run, _), r in sorted(best.items()):
            if r[field] is not None:
                expected.setdefault(run, []).append([r[field], r['value']])
        assert json.loads(png.text['points']) == expected, name
        assert set(expected) == ({'runA'} if field == 'train_sec' else {'runA', 'runB'})
    # sweep.png: against σ_rel at the latest time; plot_sweep.py reads the file to one curve per run and time.
    assert json.loads(PIL.Image.open(os.path.join(out, 'sweep.png')).text['sweep']) == \
        {run: sorted([r['std'], r['value']] for r in records if r['run'] == run and r['kimg'] == 12)
         for run in ('runA', 'runB')}
    runs = sweeps.read_sweep_runs(os.path.join(out, 'results.jsonl'))
    assert sorted(runs) == sorted(f'{run}, {k} kimg' for run in ('runA', 'runB') for k in (4, 12))
    assert 'along-time.png' in result.output
    # --points=2 of the snapshots at 4, 8 and 12 kimg: the nearest to 6 kimg (4, before 8 on a tie) and the last,
    # all measured already.
    result = _sweep(setup, out, '--points=2', stds=[0.06, 0.12], indirs=[setup.run_a, setup.run_b])
    assert '8 of 8 points already measured' in result.output and '0 points measured' in result.output

def test_guide_ema_length_and_weight(setup, tmp_path):
    """Autoguidance search: runA guided by runB's reconstructions at 8 kimg, two guide EMA lengths x two weights,
    plus the unguided point. Each line is `calculate_metrics.py gen --gnet=... --guidance=...` with that guide."""
    out = str(tmp_path / 'guided')
    _sweep(setup, out, f'--gnet={setup.run_b}', '--gstd=0.05,0.1', '--gkimg=8', '--guidance=1,1.5,2', stds=[0.08])
    records = _records(out)
    assert sorted((r['guide_std'] or 0, r['guidance']) for r in records) == \
        [(0, 1.0), (0.05, 1.5), (0.05, 2.0), (0.1, 1.5), (0.1, 2.0)]
    run_b_id = sweeps.file_id(os.path.join(setup.run_b, 'network-snapshot-0000004-0.050.pkl'))
    for r in records:
        guided = r['guidance'] != 1
        assert (r['guide'], r['guide_id'], r['guide_kimg']) == (('runB', run_b_id, 8) if guided else (None,) * 3)
    assert not os.path.exists(os.path.join(out, 'guide-runB'))  # the guides' reconstructions are deleted at the end
    # One point against the tools: runA's reconstruction guided by runB's at 8 kimg, σ_rel 0.100, weight 1.5.
    phema = str(tmp_path / 'phema')
    for indir, extra in [(setup.run_a, []), (setup.run_b, ['--outkimg=8'])]:
        result = CliRunner().invoke(reconstruct_phema.cmdline, [f'--indir={indir}', f'--outdir={phema}/{indir[-4:]}',
                                                             '--outstd=0.08,0.1'] + extra)
        assert result.exit_code == 0, result.output
    result = CliRunner().invoke(calculate_metrics.cmdline, [
        'gen', f'--net={phema}/runA/phema-0000012-0.080.pkl', f'--gnet={phema}/runB/phema-0000008-0.100.pkl',
        '--guidance=1.5', f'--ref={setup.ref}', '--metrics=fid', f'--detector={setup.detector}', '--seeds=5-12'])
    assert result.exit_code == 0, result.output
    fid = float([line for line in result.output.splitlines() if line.startswith('fid = ')][0].split(' = ')[1])
    point, = [r for r in records if r['guide_std'] == 0.1 and r['guidance'] == 1.5]
    assert point['value'] == pytest.approx(fid, rel=1e-5)
    # guidance.png: one curve per guide EMA length, each starting at the unguided point.
    png = PIL.Image.open(os.path.join(out, 'guidance.png'))
    unguided = next(r['value'] for r in records if r['guidance'] == 1)
    assert json.loads(png.text['points']) == {
        f'runA, guide sigma_rel {g:.3f}': [[1.0, unguided]] + sorted([r['guidance'], r['value']] for r in records
                                                                     if r['guide_std'] == g)
        for g in (0.05, 0.1)}

def test_snapshot_prefix_is_detected(setup, tmp_path):
    """EDM2's published raw snapshots carry the model's name; a folder may also hold reconstructions."""
    run = tmp_path / 'edm2-img512-xs'
    run.mkdir()
    for name in os.listdir(setup.run_a):
        if name.endswith('.pkl'):
            shutil.copyfile(os.path.join(setup.run_a, name), run / name.replace('network-snapshot', 'edm2-img512-xs'))
    shutil.copyfile(os.path.join(setup.run_a, 'network-snapshot-0000008-0.050.pkl'), run / 'phema-0000012-0.080.pkl')
    out = str(tmp_path / 'sweep')
    _sweep(setup, out, stds=[0.08], indirs=[str(run)])
    mine, = _records(out)
    reference = str(tmp_path / 'reference')
    _sweep(setup, reference, stds=[0.08])
    assert mine['value'] == _records(reference)[0]['value']  # the same snapshots under other names
    (run / 'other-0000004-0.050.pkl').write_bytes(b'')
    result = CliRunner().invoke(sweep_phema.cmdline, _args(setup, str(tmp_path / 'x'), indirs=[str(run)]))
    assert result.exit_code == 1 and 'several name prefixes (edm2-img512-xs, other); choose one with --inprefix' \
        in result.output, result.output
    _sweep(setup, str(tmp_path / 'x'), '--inprefix=edm2-img512-xs', stds=[0.08], indirs=[str(run)])

class SquaredColours(torch.nn.Module):
    """Another detector of PooledColours' width: its features in the other order."""

    def forward(self, img, return_features: bool = False):
        x = torch.nn.functional.adaptive_avg_pool2d(img.to(torch.float32), 2).flatten(1) / 255
        return torch.cat([x * x, x], dim=1)

def test_another_detector_measures_again(setup, tmp_path, monkeypatch):
    """A point measured with one --detector is not reused for another (its file's SHA-1 is part of the point's key),
    and the same detector copied elsewhere is the same detector."""
    other = str(tmp_path / 'other.pt')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)
        torch.jit.save(torch.jit.script(SquaredColours()), other)
    out = str(tmp_path / 'sweep')
    _sweep(setup, out, stds=[0.08])
    result = CliRunner().invoke(sweep_phema.cmdline, [a if not a.startswith('--detector=') else f'--detector={other}'
                                                      for a in _args(setup, out, stds=[0.08])])
    assert result.exit_code == 0, result.output
    assert '0 of 1 points already measured' in result.output
    first, second = _records(out)
    assert first['detector'] == sweeps.file_id(setup.detector) and second['detector'] == sweeps.file_id(other)
    assert first['value'] != second['value']
    twin = str(tmp_path / 'twin.pt')
    shutil.copyfile(setup.detector, twin)
    monkeypatch.setattr(sweeps, 'measure_network', lambda *a, **k: pytest.fail('measured again'))
    result = CliRunner().invoke(sweep_phema.cmdline, [a if not a.startswith('--detector=') else f'--detector={twin}'
                                                      for a in _args(setup, out, stds=[0.08])])
    assert result.exit_code == 0 and '1 of 1 points already measured' in result.output, result.output

def test_moved_folders_keep_the_resume(setup, tmp_path, monkeypatch):
    """Run, reference statistics and sweep moved together to another place (as a demo folder holds them): the
    rerun finds every point measured."""
    first = tmp_path / 'first'
    shutil.copytree(setup.run_a, first / 'runA')
    shutil.copyfile(setup.ref, first / 'ref.pkl')
    _sweep(setup, str(first / 'sweep'), '--keep-networks', f'--ref={first / "ref.pkl"}', indirs=[str(first / 'runA')])
    shutil.move(str(first), str(tmp_path / 'moved'))
    measured = []
    monkeypatch.setattr(sweeps, 'measure_network', lambda *a, **k: measured.append(a) or {'fid': 0.0})
    moved = tmp_path / 'moved'
    result = _sweep(setup, str(moved / 'sweep'), f'--ref={moved / "ref.pkl"}', indirs=[str(moved / 'runA')])
    assert f'{len(STDS)} of {len(STDS)} points already measured' in result.output and measured == []
    for r in _records(str(moved / 'sweep')):
        assert os.path.isfile(os.path.join(moved, 'sweep', r['net'])) and r['indir'] == os.path.join('..', 'runA')

def test_results_fields_are_documented(setup, tmp_path):
    """Every field a results.jsonl line holds is in --help and the README, with its type and meaning."""
    out = str(tmp_path / 'sweep')
    # Every optional field set (a pixel network ignores the VAE; a hub name is checked without a download).
    _sweep(setup, out, '--edm2-exact', '--instd=0.05,0.1', '--vae=stabilityai/sd-vae-ft-mse', stds=[0.08])
    record, = _records(out)
    names = [name for name, _, _ in sweeps.RESULT_FIELDS]
    assert list(record) == names  # in the documented order, none missing, none extra
    help_text = CliRunner().invoke(sweep_phema.cmdline, ['--help']).output
    with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
        readme = f.read()
    for name, kind, _ in sweeps.RESULT_FIELDS:
        assert re.search(rf'^\s+{name}\s+{re.escape(kind)}\s', help_text, re.M), name
        cell = re.escape(kind.replace('|', '\\|'))  # a table cell escapes its |
        assert re.search(rf'^\| `{name}` \| {cell} \| ', readme, re.M), name

def test_first_reached_and_spread():
    assert sweeps.first_reached([(1, 50), (2, 40), (3, 30)], 35) == pytest.approx(2.5)
    assert sweeps.first_reached([(1, 30), (2, 40)], 35) == 1        # at the first point already
    assert sweeps.first_reached([(1, 50), (2, 30), (3, 40), (4, 20)], 30) == 2  # the first time, not the last
    assert sweeps.first_reached([(1, 50), (2, 40)], 35) is None
    times = [1024 * k for k in range(1, 33)]
    assert sweeps.spread(times, 4) == [8192, 16384, 24576, 32768]
    assert sweeps.spread(times[:3], 5) == times[:3]
    assert sweeps.time_at([(0, 1.0), (3072, 30.0)], 1024) == pytest.approx(1 + 29 / 3)
    assert sweeps.time_at([(3072, 30.0)], 1024) is None and sweeps.time_at([(3072, 30.0)], 4096) is None

#----------------------------------------------------------------------------
# plot_sweep.py: data that cannot be plotted is refused with one line naming the file and the point.

@pytest.mark.parametrize('name, text, message', [
    ('nan.csv', 'std,fid\n0.05,3.4\n0.10,nan\n', 'nan.csv: σ_rel 0.1: fid is nan, not a finite number'),
    ('inf.json', '{"0.05": 3.4, "0.10": Infinity}', 'inf.json: σ_rel 0.1: fid is inf, not a finite number'),
    ('runs.jsonl', '{"run": "a", "std": 0.05, "metric": "fid", "value": 3.0}\n'
                   '{"run": "a", "std": 0.10, "metric": "fid", "value": NaN}\n',
     'runs.jsonl: run "a", σ_rel 0.1: fid is nan, not a finite number'),
    ('word.csv', 'std,fid\n0.05,3.4\n0.10,abc\n', 'word.csv: record 2: "abc" is not a number'),
    ('std.csv', 'std,fid\n0.05,3.4\ninf,3.0\n', 'std.csv: σ_rel inf is not a finite number'),
])
def test_plot_sweep_refuses_non_finite_data(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    out = tmp_path / 'plot.png'
    result = CliRunner().invoke(plot_sweep.cmdline, [f'--results={tmp_path / name}', f'--out={out}', '--metric=fid'])
    assert result.exit_code == 1 and result.output.count('\n') == 1, result.output
    assert result.output.startswith('Error: ') and message in result.output, result.output
    assert not out.exists()

def test_plot_sweep_checks_its_output_first(tmp_path):
    (tmp_path / 'r.csv').write_text('std,fid\n0.05,3.4\n0.10,3.1\n')
    for out, message in [(tmp_path, 'is a directory'), (tmp_path / 'no' / 'p.png', 'does not exist')]:
        result = CliRunner().invoke(plot_sweep.cmdline, [f'--results={tmp_path / "r.csv"}', f'--out={out}'])
        assert result.exit_code == 1 and result.output.count('\n') == 1 and message in result.output, result.output
