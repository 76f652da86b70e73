"""Training: loss and learning-rate formulas (EDM2 paper eq. 15 and 21), the loop's outputs, resume, torchrun,
atomic checkpoints, non-finite losses and weights, bad data and bad input. All on CPU with a tiny network at 8x8."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import click.testing
import numpy as np
import pytest
import torch

import dnnlib
from conftest import single_thread, write_dataset
from networks.loading import load_snapshot
from training import training_loop as tl
from training.loss import EDM2Loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
ENV = dict(os.environ, OMP_NUM_THREADS='1')  # tiny tensors: one thread is faster, and robust on a busy machine

pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py

#----------------------------------------------------------------------------
# Helpers.

def make_dataset(path, num_images=40, resolution=8, labels=True):
    """A folder of small RGB PNGs whose content depends on the class (image i: class i % 3, that colour bright)."""
    rnd = np.random.RandomState(0)
    images = []
    for idx in range(num_images):
        img = np.zeros([resolution, resolution, 3], dtype=np.uint8)
        img[..., idx % 3] = 200
        img += rnd.randint(0, 50, size=img.shape).astype(np.uint8)
        images.append(img)
    return write_dataset(path, images, [idx % 3 for idx in range(num_images)] if labels else None,
                         names=[f'img{idx:03d}.png' for idx in range(num_images)])

TINY_NET = dict(class_name='networks.edm2plus.Precond', model_channels=16, channel_mult=[1, 2], num_blocks=1,
                attn_resolutions=[4], block='G*', expansion=2, use_fp16=True)
TINY_CLI = ['--preset=demo', '--channels=16', '--channel-mult=1,2', '--num-blocks=1', '--attn=4', '--expansion=2']

def tiny_config(data, **overrides):
    """training_loop keyword arguments for a few dozen steps of a tiny network."""
    c = dict(
        dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=data, use_labels=True),
        encoder_kwargs=dict(class_name='training.encoders.StandardRGBEncoder'),
        data_loader_kwargs=dict(class_name='torch.utils.data.DataLoader', num_workers=0),
        network_kwargs=dict(TINY_NET),
        loss_kwargs=dict(class_name='training.loss.EDM2Loss', P_mean=-1.2, P_std=1.2),
        optimizer_kwargs=dict(class_name='torch.optim.Adam', betas=(0.9, 0.99)),
        lr_kwargs=dict(func_name='training.training_loop.learning_rate_schedule', ref_lr=0.01, ref_batches=8, rampup_Mimg=0.0005),
        ema_kwargs=dict(class_name='training.phema.PowerFunctionEMA', stds=[0.05, 0.1]),
        batch_size=32, total_nimg=2048, status_nimg=512, snapshot_nimg=1024, checkpoint_nimg=1024, seed=1,
        device=torch.device('cpu'), progress=False,
    )
    c.update(overrides)
    return c

def run_cli(args, check=True, timeout=240):
    proc = subprocess.run([PYTHON, os.path.join(ROOT, 'train_edm2plus.py')] + args, cwd=ROOT, capture_output=True,
                          text=True, env=ENV, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc

def load_state(path):
    return torch.load(path, map_location='cpu', weights_only=True)

def assert_states_equal(a, b, where='state'):
    """Bitwise equality of nested dicts/lists of tensors and numbers."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), where
        for key in a:
            assert_states_equal(a[key], b[key], f'{where}.{key}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for idx, (x, y) in enumerate(zip(a, b)):
            assert_states_equal(x, y, f'{where}[{idx}]')
    else:
        assert a == b, where

#----------------------------------------------------------------------------
# Formulas.

@pytest.mark.parametrize('nimg, lr', [(0, 0.0), (2048, 2.4576e-6), (5_000_000, 0.006), (10_000_000, 0.012),
                                      (143_360_000, 0.012), (2 << 30, 0.0031005)])
def test_learning_rate_schedule_reference_values(nimg, lr):
    value = tl.learning_rate_schedule(cur_nimg=nimg, batch_size=2048, ref_lr=0.012, ref_batches=70000)
    assert value == pytest.approx(lr, rel=1e-4, abs=1e-12)

def test_learning_rate_schedule_without_decay_or_rampup():
    assert tl.learning_rate_schedule(cur_nimg=10**12, batch_size=64, ref_lr=0.01, ref_batches=0) == 0.01
    assert tl.learning_rate_schedule(cur_nimg=0, batch_size=64, ref_lr=0.01, ref_batches=0, rampup_Mimg=0) == 0.01
    assert tl.learning_rate_schedule(cur_nimg=4 * 64 * 100, batch_size=64, ref_lr=0.01, ref_batches=100, rampup_Mimg=0) == pytest.approx(0.005)

class _FixedNet(torch.nn.Module):
    """D = y + offset (given the clean images), u = constant; records sigma and the noisy input."""
    def __init__(self, images, offset, logvar):
        super().__init__()
        self.images, self.offset, self.logvar = images, offset, logvar

    def forward(self, x, sigma, labels=None, return_logvar=False):
        self.sigma, self.x = sigma, x
        assert return_logvar
        return self.images + self.offset, torch.full([x.shape[0], 1, 1, 1], self.logvar)

def test_loss_formula():
    images = torch.linspace(-1, 1, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    net = _FixedNet(images, offset=0.5, logvar=0.3)
    torch.manual_seed(7)
    loss = EDM2Loss(P_mean=-0.4, P_std=1.0)(net, images)
    assert loss.shape == images.shape

    # Random draws in EDM2's order: ln sigma ~ N(P_mean, P_std^2) per image, then the noise.
    torch.manual_seed(7)
    sigma = (torch.randn([2, 1, 1, 1]) * 1.0 - 0.4).exp()
    noise = torch.randn_like(images) * sigma
    assert torch.allclose(net.sigma, sigma) and torch.allclose(net.x, images + noise)

    # L = lambda(sigma) / e^u * (D - y)^2 + u, lambda = (sigma^2 + 0.25) / (0.5 sigma)^2.
    weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    expected = weight / np.exp(0.3) * 0.25 + 0.3
    assert torch.allclose(loss, expected.expand_as(images), rtol=1e-6)
    assert float(loss[0, 0, 0, 0]) == pytest.approx(float((sigma[0] ** 2 + 0.25) / (0.25 * sigma[0] ** 2)) * 0.25 * np.exp(-0.3) + 0.3, rel=1e-6)

def test_stats_line_format():
    line = tl.format_stats_line([('Progress/kimg', 1.024), ('Timing/maintenance_sec', 0.1307431234), ('Resources/peak_gpu_mem_gb', 0.0),
                                 ('Loss/loss', float('nan')), ('Loss/learning_rate', 4.96e-07), ('timestamp', 1795629116.1314)])
    assert line == ('{"Progress/kimg": 1.024, "Timing/maintenance_sec": 0.130743, "Resources/peak_gpu_mem_gb": 0, '
                    '"Loss/loss": NaN, "Loss/learning_rate": 4.96e-07, "timestamp": 1795629116.131}\n')
    assert np.isnan(json.loads(line)['Loss/loss'])

def test_stats_line_writes_nan_for_every_non_finite_value():
    line = tl.format_stats_line([('Progress/kimg', 2.048), ('Loss/loss', float('inf')), ('Loss/x', float('-inf')),
                                 ('Loss/y', float('nan')), ('timestamp', 1.0)])
    assert line == '{"Progress/kimg": 2.048, "Loss/loss": NaN, "Loss/x": NaN, "Loss/y": NaN, "timestamp": 1.000}\n'

def test_batch_layout_and_intervals():
    assert tl.batch_layout(2048, 32, 8) == (32, 256, 8)
    assert tl.batch_layout(64, None, 2) == (32, 32, 1)
    with pytest.raises(ValueError, match='not divisible by --batch-gpu=24'):
        tl.batch_layout(64, 24, 1)
    with pytest.raises(ValueError, match='multiple of 1024'):
        tl.check_intervals(64, 4096, snapshot_nimg=640)
    with pytest.raises(ValueError, match='duration'):
        tl.check_intervals(64, 1000)

#----------------------------------------------------------------------------
# The command line end to end: every output file and its format.

STATS_KEYS = ['Progress/kimg', 'Timing/total_sec', 'Timing/sec_per_tick', 'Timing/sec_per_kimg', 'Timing/maintenance_sec',
              'Resources/cpu_mem_gb', 'Resources/peak_gpu_mem_gb', 'Resources/peak_gpu_mem_reserved_gb']
NUMBER = r'(-?[0-9.]+(e[-+][0-9]+)?|NaN)'

@pytest.mark.slow  # two train_edm2plus.py processes
def test_cli_end_to_end(tmp_path):
    data = make_dataset(tmp_path / 'data')
    outdir = str(tmp_path / 'run')
    args = TINY_CLI + [f'--data={data}', f'--outdir={outdir}', '--batch=32', '--duration=2048', '--status=512',
                       '--snapshot=1Ki', '--checkpoint=1Ki', '--lr=0.01', '--decay=8', '--rampup=0.0005']
    proc = run_cli(args)
    assert 'Training config:' in proc.stdout and 'Number of GPUs:          1' in proc.stdout

    kimgs = ['0000000', '0000001', '0000002']
    expected = {'training_options.json', 'log.txt', 'stats.jsonl', 'training-state-0000001.pt', 'training-state-0000002.pt',
                'training.lock'}
    expected |= {f'network-snapshot-{k}-{s}.pkl' for k in kimgs for s in ['0.050', '0.100']}
    assert set(os.listdir(outdir)) == expected

    # training_options.json: the config in EDM2's key order, plus ours.
    with open(os.path.join(outdir, 'training_options.json')) as f:
        c = json.load(f)
    assert list(c)[:6] == ['dataset_kwargs', 'encoder_kwargs', 'total_nimg', 'batch_size', 'network_kwargs', 'loss_kwargs']
    assert c['total_nimg'] == 2048 and c['network_kwargs']['block'] == 'G*' and c['network_kwargs']['channel_mult'] == [1, 2]
    assert c['lr_kwargs'] == dict(func_name='training.training_loop.learning_rate_schedule', ref_lr=0.01, ref_batches=8.0, rampup_Mimg=0.0005)

    # log.txt starts at the training loop and has the status lines.
    with open(os.path.join(outdir, 'log.txt')) as f:
        log = f.read()
    assert log.startswith('Loading dataset...\n')
    status = [line for line in log.splitlines() if line.startswith('Status:')]
    assert len(status) == 5
    gpu_mem = r'(?=\d+\.\d\d)[\d. ]{6}' if torch.cuda.is_available() else r'0\.00  '  # GPU columns: 0.00 on a CPU
    assert re.fullmatch(r'Status: kimg 0\.5       time \S+( \S+)?\s+sec/tick [0-9.]+\s+sec/kimg [0-9.]+\s+maintenance [0-9.]+\s+'
                        r'cpumem [0-9.]+\s+gpumem ' + gpu_mem + r' reserved ' + gpu_mem, status[1]), status[1]
    assert 'Saving network-snapshot-0000002-0.100.pkl ... done' in log

    # stats.jsonl: one line per tick, key order of first report, %.3f kimg, no Loss/* at nimg 0.
    with open(os.path.join(outdir, 'stats.jsonl')) as f:
        lines = f.read().splitlines()
    assert len(lines) == 5
    rows = [json.loads(line) for line in lines]
    assert list(rows[0]) == STATS_KEYS + ['timestamp']
    assert list(rows[1]) == STATS_KEYS + ['Loss/loss', 'Loss/learning_rate', 'timestamp']
    assert [row['Progress/kimg'] for row in rows] == [0, 0.512, 1.024, 1.536, 2.048]
    assert re.match(r'\{"Progress/kimg": 0\.512, "Timing/total_sec": ' + NUMBER, lines[1])
    assert re.search(r'"timestamp": [0-9]+\.[0-9]{3}\}$', lines[1])
    assert all(np.isfinite(row['Loss/loss']) for row in rows[1:])
    assert rows[-1]['Loss/learning_rate'] == pytest.approx(np.mean([tl.learning_rate_schedule(n, 32, 0.01, 8, 0.0005) for n in range(1536, 2048, 32)]), rel=1e-5)

    # Snapshots: EasyDict(encoder, dataset_kwargs, loss_fn, ema) with an fp16 eval-mode CPU net.
    snap = load_snapshot(os.path.join(outdir, 'network-snapshot-0000002-0.050.pkl'), verbose=False)
    assert list(snap.keys()) == ['encoder', 'dataset_kwargs', 'loss_fn', 'ema']
    assert isinstance(snap.dataset_kwargs, dnnlib.EasyDict) and snap.dataset_kwargs.path == data
    assert snap.loss_fn.P_mean == -1.2 and type(snap.encoder).__name__ == 'StandardRGBEncoder'
    assert not snap.ema.training and all(t.dtype == torch.float16 and t.device.type == 'cpu' for t in snap.ema.state_dict().values())
    assert not any(p.requires_grad for p in snap.ema.parameters())
    assert (snap.ema.img_resolution, snap.ema.img_channels, snap.ema.label_dim) == (8, 3, 3)

    # Training state loads with torch's safe weights-only loader.
    state = load_state(os.path.join(outdir, 'training-state-0000002.pt'))
    assert list(state) == ['state', 'net', 'loss_fn', 'optimizer', 'ema']
    assert state['state']['cur_nimg'] == 2048 and state['ema']['stds'] == [0.05, 0.1]
    assert state['loss_fn']['P_std'] == 1.2
    ema_050 = {k: v.float() for k, v in snap.ema.state_dict().items()}
    assert all(torch.allclose(ema_050[k], v.half().float()) for k, v in state['ema']['emas'][0].items())

    # Rerunning the finished command is harmless.
    proc = run_cli(args)
    assert 'Nothing to do' in proc.stdout
    assert len(open(os.path.join(outdir, 'stats.jsonl')).read().splitlines()) == 5

#----------------------------------------------------------------------------
# Resume: interrupted + resumed == straight through, bit for bit.

@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('straight')
    data = make_dataset(root / 'data')
    with single_thread():
        tl.training_loop(run_dir=str(root / 'run'), **tiny_config(data))
    return data, str(root / 'run')

def test_resume_is_bitwise_identical(straight_run, tmp_path, capsys):
    data, straight_dir = straight_run
    run_dir = str(tmp_path / 'run')
    assert tl.training_loop(run_dir=run_dir, slice_nimg=1024, **tiny_config(data)) == 1024   # interrupted
    assert sorted(f for f in os.listdir(run_dir) if f.endswith('.pt')) == ['training-state-0000001.pt']
    capsys.readouterr()
    assert tl.training_loop(run_dir=run_dir, **tiny_config(data)) == 2048                    # resumed
    assert 'Loading ' in capsys.readouterr().out
    final = 'training-state-0000002.pt'
    a, b = load_state(os.path.join(straight_dir, final)), load_state(os.path.join(run_dir, final))
    assert_states_equal(a['net'], b['net'], 'net')
    assert_states_equal(a['optimizer'], b['optimizer'], 'optimizer')
    assert_states_equal(a['ema'], b['ema'], 'ema')
    assert a['state']['cur_nimg'] == b['state']['cur_nimg'] == 2048
    # The resumed run's curve equals the straight one (same Loss/loss in every tick after the restart).
    rows = lambda d: [json.loads(line) for line in open(os.path.join(d, 'stats.jsonl'))]
    assert [r['Progress/kimg'] for r in rows(run_dir)] == [0, 0.512, 1.024, 1.536, 2.048]
    assert [r['Loss/loss'] for r in rows(run_dir)[1:]] == [r['Loss/loss'] for r in rows(straight_dir)[1:]]

_KILL_SCRIPT = textwrap.dedent('''
    import io, os, signal, sys, torch
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    import test_training as t
    from training import training_loop as tl
    real_save = torch.save
    calls = []
    def dying_save(obj, f, *args, **kwargs):
        calls.append(not isinstance(f, io.BytesIO))  # (pickling a tensor calls torch.save on a BytesIO)
        if sum(calls) == 2 and calls[-1]:            # the second checkpoint, training-state-0000002.pt
            real_save(obj, f, *args, **kwargs)
            f.flush()
            f.truncate(f.tell() // 2)          # half of the file is on disk ...
            os.kill(os.getpid(), signal.SIGKILL)   # ... when the process is killed
        return real_save(obj, f, *args, **kwargs)
    torch.save = dying_save
    tl.training_loop(run_dir={run_dir!r}, **t.tiny_config({data!r}))
''')

def test_kill_during_checkpoint_write_leaves_no_partial_file(straight_run, tmp_path):
    data, straight_dir = straight_run
    run_dir = str(tmp_path / 'run')
    script = _KILL_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, 'tests'), run_dir=run_dir, data=data)
    proc = subprocess.run([PYTHON, '-c', script], cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    files = os.listdir(run_dir)
    assert 'training-state-0000001.pt' in files and 'training-state-0000002.pt' not in files
    assert any(f.startswith('.training-state-0000002.pt.') for f in files)     # only a temporary name
    load_state(os.path.join(run_dir, 'training-state-0000001.pt'))              # the earlier one is intact

    tl.training_loop(run_dir=run_dir, **tiny_config(data))                      # rerun: resumes and finishes
    files = os.listdir(run_dir)
    assert not any(f.endswith('.tmp') for f in files)
    a = load_state(os.path.join(straight_dir, 'training-state-0000002.pt'))
    b = load_state(os.path.join(run_dir, 'training-state-0000002.pt'))
    assert_states_equal(a['net'], b['net'], 'net')

#----------------------------------------------------------------------------
# Wall-clock limit: stops at a multiple of 1024 images with a final snapshot and checkpoint.

def test_time_limit_stops_with_snapshot_and_checkpoint(tmp_path, capsys):
    from training import posthoc
    data = make_dataset(tmp_path / 'data')
    run_dir = str(tmp_path / 'run')
    cur = tl.training_loop(run_dir=run_dir, time_limit=1e-3, **tiny_config(data, total_nimg=4096, snapshot_nimg=2048, checkpoint_nimg=4096))
    assert cur == 1024
    assert 'Stopped at the time limit' in capsys.readouterr().out
    # Off the snapshot interval, the final snapshots are named so that post-hoc EMA does not take them as inputs;
    # the training state is saved as usual, and the post-hoc EMA inputs are those of EDM2's schedule.
    assert set(os.listdir(run_dir)) == {'stats.jsonl', 'training.lock', 'training-state-0000001.pt', 'network-snapshot-0000000-0.050.pkl',
                                        'network-snapshot-0000000-0.100.pkl', 'network-snapshot-0000001-0.050-stop.pkl',
                                        'network-snapshot-0000001-0.100-stop.pkl'}
    assert [p.nimg for p in posthoc.list_input_pickles(run_dir)] == [0, 0]
    assert load_snapshot(os.path.join(run_dir, 'network-snapshot-0000001-0.100-stop.pkl'), verbose=False).ema.img_resolution == 8
    # Resumed and stopped again on the interval (2048): the ordinary names.
    cur = tl.training_loop(run_dir=run_dir, time_limit=1e-3, **tiny_config(data, total_nimg=4096, snapshot_nimg=2048, checkpoint_nimg=4096))
    assert cur == 2048
    assert {'network-snapshot-0000002-0.050.pkl', 'training-state-0000002.pt'} <= set(os.listdir(run_dir))
    assert not any(f.startswith('network-snapshot-0000002') and f.endswith('-stop.pkl') for f in os.listdir(run_dir))
    assert [p.nimg for p in posthoc.list_input_pickles(run_dir)] == [0, 0, 2048, 2048]

#----------------------------------------------------------------------------
# Non-finite values: gradients are zeroed, a whole tick of NaN loss gives a warning.

class NaNLoss(EDM2Loss):
    """EDM2's loss with NaN in the first image of every batch (or everywhere)."""
    def __init__(self, everywhere=False, **kwargs):
        super().__init__(**kwargs)
        self.everywhere = everywhere

    def __call__(self, net, images, labels=None):
        loss = super().__call__(net, images, labels)
        mask = torch.zeros_like(loss, dtype=torch.bool)
        mask[0 if not self.everywhere else slice(None)] = True
        return torch.where(mask, torch.full_like(loss, float('nan')), loss)

def test_non_finite_gradients_are_zeroed(tmp_path, capsys):
    data = make_dataset(tmp_path / 'data')
    run_dir = str(tmp_path / 'run')
    c = tiny_config(data, total_nimg=1024, status_nimg=512, snapshot_nimg=None, checkpoint_nimg=1024,
                    loss_kwargs=dict(class_name=NaNLoss))
    tl.training_loop(run_dir=run_dir, **c)
    state = load_state(os.path.join(run_dir, 'training-state-0000001.pt'))
    assert all(torch.isfinite(v).all() for v in state['net'].values())
    rows = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    assert np.isfinite(rows[-1]['Loss/loss'])           # finite elements still reported
    assert 'Warning' not in capsys.readouterr().out

    # NaN throughout a tick: the run stops there with a one-line error, before any later save.
    run_dir = str(tmp_path / 'run_nan')
    c['loss_kwargs'] = dict(class_name=NaNLoss, everywhere=True)
    with pytest.raises(tl.TrainingError) as info:
        tl.training_loop(run_dir=run_dir, **c)
    assert str(info.value).startswith('the loss was NaN/Inf throughout the tick ending at kimg 0.5; stopped without saving')
    assert '\n' not in str(info.value)
    assert sorted(os.listdir(run_dir)) == ['stats.jsonl', 'training.lock']
    rows = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    assert np.isnan(rows[-1]['Loss/loss']) and rows[-1]['Progress/kimg'] == 0.512

def test_apply_gradients_zeroes_only_non_finite_entries():
    params = [torch.nn.Parameter(torch.zeros(3, 4)) for _ in range(3)]
    grads = [torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    opt = torch.optim.SGD(params, lr=1)
    for force_finite, bad in [(True, None), (True, float('nan')), (True, float('inf')), (True, -float('inf')), (False, None)]:
        for p, g in zip(params, grads):
            p.data.zero_()
            p.grad = g.clone()
        if bad is not None:
            params[1].grad[2, 1] = bad
        tl.apply_gradients(torch.nn.ParameterList(params), opt, lr=1, force_finite=force_finite)
        expected = [-g for g in grads]  # SGD at lr 1 from zero weights
        if bad is not None:
            expected[1][2, 1] = 0
        assert all(torch.equal(p.detach(), e) for p, e in zip(params, expected)), bad
        assert opt.param_groups[0]['lr'] == 1

def test_make_optimizer_fuses_torch_adam_only():
    params = [torch.nn.Parameter(torch.randn(4, 3))]
    adam = tl.make_optimizer(params, dict(class_name='torch.optim.Adam', betas=(0.9, 0.99)))
    assert adam.defaults['fused'] is True and adam.defaults['betas'] == (0.9, 0.99)
    chosen = tl.make_optimizer(params, dict(class_name='torch.optim.Adam', foreach=True))
    assert not chosen.defaults.get('fused') and chosen.defaults['foreach'] is True
    sgd = tl.make_optimizer(params, dict(class_name='torch.optim.SGD', lr=0.1))
    assert not sgd.defaults.get('fused')
    # The fused update is Adam's update: a few steps agree with the per-parameter loop to float32 rounding.
    start = params[0].detach().clone()
    ref_params = [torch.nn.Parameter(start.clone())]
    ref = torch.optim.Adam(ref_params, betas=(0.9, 0.99), foreach=False)
    for i in range(5):
        g = torch.randn(4, 3, generator=torch.Generator().manual_seed(i))
        params[0].grad, ref_params[0].grad = g.clone(), g.clone()
        adam.step()
        ref.step()
    assert (params[0] - ref_params[0]).abs().max() < 1e-6
    assert (params[0] - start).abs().max() > 1e-3  # the steps moved the weights, so the comparison means something

class PoisonedAdam(torch.optim.Adam):
    """Adam that writes NaN into the first parameter at its `at`-th step."""
    def __init__(self, params, at, **kwargs):
        super().__init__(params, **kwargs)
        self.at, self.steps = at, 0

    def step(self, closure=None):
        super().step(closure)
        self.steps += 1
        if self.steps == self.at:
            self.param_groups[0]['params'][0].data.fill_(float('nan'))

def snapshot_files(run_dir):
    """Contents of every file in run_dir except the appended logs (stats.jsonl, log.txt) and the lock (who ran last)."""
    return {name: open(os.path.join(run_dir, name), 'rb').read() for name in sorted(os.listdir(run_dir))
            if name not in ('stats.jsonl', 'log.txt', 'training.lock')}

def test_non_finite_weights_stop_before_any_save(tmp_path):
    data = make_dataset(tmp_path / 'data')
    run_dir = str(tmp_path / 'run')
    c = tiny_config(data, total_nimg=2048, status_nimg=512, snapshot_nimg=1024, checkpoint_nimg=1024)
    tl.training_loop(run_dir=run_dir, **dict(c, total_nimg=1024))
    before = snapshot_files(run_dir)
    assert sorted(before) == ['network-snapshot-0000000-0.050.pkl', 'network-snapshot-0000000-0.100.pkl',
                              'network-snapshot-0000001-0.050.pkl', 'network-snapshot-0000001-0.100.pkl',
                              'training-state-0000001.pt']
    # Resumed at 1024; the weights turn NaN at step 10 after the resume, i.e. during the tick ending at 1.536 kimg,
    # whose status check stops the run before the snapshot and training state of 2.048 kimg.
    c['optimizer_kwargs'] = dict(class_name=PoisonedAdam, at=10, betas=(0.9, 0.99))
    with pytest.raises(tl.TrainingError) as info:
        tl.training_loop(run_dir=run_dir, **c)
    assert str(info.value).startswith('the weights are no longer finite at kimg 1.5 (net.')
    assert snapshot_files(run_dir) == before  # byte-identical, nothing added

@pytest.mark.slow  # two train_edm2plus.py processes
def test_cli_diverging_lr_exits_with_one_line_and_keeps_files(tmp_path):
    data = make_dataset(tmp_path / 'data')
    outdir = str(tmp_path / 'run')
    args = TINY_CLI + [f'--data={data}', f'--outdir={outdir}', '--batch=32', '--status=512', '--snapshot=1Ki',
                       '--checkpoint=1Ki', '--lr=0.01', '--decay=8', '--rampup=0.0005', '--workers=0']
    run_cli(args + ['--duration=1Ki'])
    before = snapshot_files(outdir)
    proc = run_cli([a for a in args if not a.startswith('--lr=')] + ['--duration=2Ki', '--lr=1e38'], check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and re.fullmatch(r'Error: the (weights are no longer finite at kimg 1\.5 \(net\..*\)|loss was '
                                             r'NaN/Inf throughout the tick ending at kimg 1\.5); stopped without saving.*',
                                             errors[0]), proc.stderr
    assert 'Traceback' not in proc.stdout + proc.stderr
    assert snapshot_files(outdir) == before
    assert open(os.path.join(outdir, 'log.txt')).read().rstrip().endswith(errors[0])

#----------------------------------------------------------------------------
# Resume from the newest readable training state; a truncated one is named and set aside, never deleted.

def test_truncated_newest_state_is_set_aside(straight_run, tmp_path, capsys):
    import shutil
    data, straight_dir = straight_run
    run_dir = str(tmp_path / 'run')
    shutil.copytree(straight_dir, run_dir)
    newest = os.path.join(run_dir, 'training-state-0000002.pt')
    with open(newest, 'rb') as f:
        truncated = f.read()
    truncated = truncated[:len(truncated) // 2]
    with open(newest, 'wb') as f:
        f.write(truncated)
    os.remove(os.path.join(run_dir, 'stats.jsonl'))
    capsys.readouterr()
    assert tl.training_loop(run_dir=run_dir, **tiny_config(data)) == 2048
    out = capsys.readouterr().out
    assert f'Warning: {newest}: unreadable training state (BadZipFile: ' in out
    assert f'Set aside as {newest}.corrupt' in out
    assert f'Loading {os.path.join(run_dir, "training-state-0000001.pt")} ... done' in out
    with open(newest + '.corrupt', 'rb') as f:
        assert f.read() == truncated                     # kept as it was
    a, b = load_state(os.path.join(straight_dir, 'training-state-0000002.pt')), load_state(newest)
    assert_states_equal(a['net'], b['net'], 'net')       # retrained from 1 kimg: the same result
    assert_states_equal(a['ema'], b['ema'], 'ema')

def test_no_readable_state_left_is_an_error(tmp_path):
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    (run_dir / 'training-state-0000001.pt').write_bytes(b'PK\x03\x04 cut short')
    (run_dir / 'network-snapshot-0000001-0.050.pkl').write_bytes(b'an earlier snapshot')
    data = make_dataset(tmp_path / 'data')
    with pytest.raises(tl.TrainingError) as info:
        tl.training_loop(run_dir=str(run_dir), **tiny_config(data))
    assert str(info.value) == (f'{run_dir}: no readable training state left to resume from (set aside: '
                               'training-state-0000001.pt); not starting over in this directory')
    assert sorted(os.listdir(run_dir)) == ['network-snapshot-0000001-0.050.pkl', 'training-state-0000001.pt.corrupt',
                                           'training.lock']
    assert (run_dir / 'network-snapshot-0000001-0.050.pkl').read_bytes() == b'an earlier snapshot'
    assert (run_dir / 'training-state-0000001.pt.corrupt').read_bytes() == b'PK\x03\x04 cut short'

def test_state_that_cannot_be_applied_is_a_one_line_error(straight_run, tmp_path):
    import shutil
    data, straight_dir = straight_run
    run_dir = str(tmp_path / 'run')
    shutil.copytree(straight_dir, run_dir)
    c = tiny_config(data, total_nimg=4096)
    c['network_kwargs'] = dict(TINY_NET, model_channels=32)  # Not the network the state was trained with.
    with pytest.raises(tl.TrainingError) as info:
        tl.training_loop(run_dir=run_dir, **c)
    message = str(info.value)
    assert message.startswith(os.path.join(run_dir, 'training-state-0000002.pt') + ': cannot resume from this training state (RuntimeError: ')
    assert '\n' not in message
    assert os.path.isfile(os.path.join(run_dir, 'training-state-0000002.pt'))  # a readable file is not set aside

#----------------------------------------------------------------------------
# A corrupt image met during training: one line naming the file inside the zip, nothing saved from that step.

@pytest.mark.parametrize('workers', [0, 1])
def test_corrupt_image_in_zip_during_training(tmp_path, workers):
    import zipfile
    folder = make_dataset(tmp_path / 'data')
    data = str(tmp_path / 'data.zip')
    with zipfile.ZipFile(data, 'w') as z:
        for name in sorted(os.listdir(folder)):
            content = open(os.path.join(folder, name), 'rb').read()
            z.writestr(name, b'\x89PNG\r\n\x1a\n' + b'\x00' * 30 if name == 'img017.png' else content)
    outdir = str(tmp_path / 'run')
    args = TINY_CLI + [f'--data={data}', f'--outdir={outdir}', '--batch=32', '--duration=2Ki', '--status=512',
                       '--snapshot=1Ki', '--checkpoint=1Ki', f'--workers={workers}']
    proc = run_cli(args, check=False)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and 'Traceback' not in proc.stdout + proc.stderr, proc.stderr
    assert errors[0].startswith(f'Error: {os.path.join(data, "img017.png")}: cannot decode image (')
    assert re.search(r'\(in the step after kimg 0\.0; stopped without saving anything from that step\)$', errors[0])
    # Only what the run wrote before that step (the snapshots at 0 kimg): no training state.
    assert sorted(f for f in os.listdir(outdir) if f.endswith(('.pkl', '.pt'))) == \
        ['network-snapshot-0000000-0.050.pkl', 'network-snapshot-0000000-0.100.pkl']

#----------------------------------------------------------------------------
# Two processes under torchrun with gloo.

@pytest.mark.slow  # a torchrun launch of two processes
def test_torchrun_two_processes(tmp_path):
    data = make_dataset(tmp_path / 'data')
    outdir = str(tmp_path / 'run')
    cmd = [PYTHON, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', os.path.join(ROOT, 'train_edm2plus.py')]
    cmd += TINY_CLI + [f'--data={data}', f'--outdir={outdir}', '--batch=32', '--duration=1Ki', '--status=512',
                       '--snapshot=1Ki', '--checkpoint=1Ki']
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=300)
    if proc.returncode != 0 and 'address already in use' in (proc.stdout + proc.stderr).lower():
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=300)  # port race
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'Number of GPUs:          2' in proc.stdout
    assert set(os.listdir(outdir)) == {'training_options.json', 'log.txt', 'stats.jsonl', 'training-state-0000001.pt',
                                       'training.lock', 'network-snapshot-0000000-0.050.pkl', 'network-snapshot-0000000-0.100.pkl',
                                       'network-snapshot-0000001-0.050.pkl', 'network-snapshot-0000001-0.100.pkl'}
    rows = [json.loads(line) for line in open(os.path.join(outdir, 'stats.jsonl'))]
    assert [r['Progress/kimg'] for r in rows] == [0, 0.512, 1.024] and np.isfinite(rows[-1]['Loss/loss'])
    state = load_state(os.path.join(outdir, 'training-state-0000001.pt'))
    assert state['state']['cur_nimg'] == 1024
    assert open(os.path.join(outdir, 'log.txt')).read().startswith('Loading dataset...')

#----------------------------------------------------------------------------
# Set-up reads the dataset once: train_edm2plus.py's probe hands the opened dataset to the training loop.

def test_cli_opens_the_dataset_once(tmp_path, monkeypatch):
    import train_edm2plus
    from training.dataset import ImageFolderDataset
    opened = []
    real_init = ImageFolderDataset.__init__
    def counting_init(self, path, **kwargs):
        opened.append(path)
        real_init(self, path, **kwargs)
    monkeypatch.setattr(ImageFolderDataset, '__init__', counting_init)
    data = make_dataset(tmp_path / 'data', num_images=4)
    outdir = str(tmp_path / 'run')
    result = click.testing.CliRunner().invoke(train_edm2plus.cmdline, TINY_CLI + [
        f'--data={data}', f'--outdir={outdir}', '--batch=32', '--duration=32', '--status=32', '--snapshot=0',
        '--checkpoint=0'])
    assert result.exit_code == 0, result.output
    assert opened == [data]
    assert [json.loads(line)['Progress/kimg'] for line in open(os.path.join(outdir, 'stats.jsonl'))] == [0, 0.032]

#----------------------------------------------------------------------------
# Bad input: one-line errors that name the option and the file.

def test_bad_dataset_and_options(tmp_path):
    import train_edm2plus
    def run(args):
        return click.testing.CliRunner().invoke(train_edm2plus.cmdline, args)
    outdir = str(tmp_path / 'run')
    missing = str(tmp_path / 'missing.zip')
    result = run(TINY_CLI + [f'--data={missing}', f'--outdir={outdir}'])
    assert result.exit_code == 1 and f'Error: --data: {missing}' in result.stderr

    corrupt = make_dataset(tmp_path / 'corrupt', num_images=4)
    with open(os.path.join(corrupt, 'img000.png'), 'wb') as f:
        f.write(b'not a png')
    result = run(TINY_CLI + [f'--data={corrupt}', f'--outdir={outdir}'])
    assert result.exit_code == 1 and 'Error: --data: ' in result.stderr and 'img000.png' in result.stderr

    unlabelled = make_dataset(tmp_path / 'unlabelled', num_images=4, labels=False)
    result = run(TINY_CLI + [f'--data={unlabelled}', f'--outdir={outdir}'])
    assert result.exit_code == 1 and '--cond=True, but no labels found in the dataset' in result.stderr

    good = make_dataset(tmp_path / 'good', num_images=4)
    result = run(TINY_CLI + [f'--data={good}', f'--outdir={outdir}', '--batch=32', '--batch-gpu=24'])
    assert result.exit_code == 1 and 'not divisible by --batch-gpu=24' in result.stderr
    result = run(TINY_CLI + [f'--data={good}', f'--outdir={outdir}', '--duration=12kimg'])
    assert result.exit_code == 2 and "Invalid value for '--duration'" in result.stderr
    result = run(TINY_CLI + [f'--data={good}', f'--outdir={outdir}', '--block=Z'])
    assert result.exit_code == 2 and "Invalid value for '--block'" in result.stderr
    result = run(TINY_CLI + [f'--data={good}', f'--outdir={outdir}', '--ema-stds=0.05,0.5'])
    assert result.exit_code == 2 and "Invalid value for '--ema-stds': 0.5 is not in the range 0<x<0.289" in result.stderr
    result = run([f'--data={good}', f'--outdir={outdir}', '--preset=nope'])
    assert result.exit_code == 1 and 'Invalid configuration preset "nope"' in result.stderr
    result = run(TINY_CLI + [f'--data={good}', f'--outdir={outdir}', '--compile=fastest'])
    assert result.exit_code == 2 and "'fastest' is neither a boolean nor a torch.compile mode (default, reduce-overhead" in result.stderr
    assert not os.path.exists(outdir)   # nothing was written for any of these

    result = run(TINY_CLI + [f'--data={good}', f'--outdir={outdir}', '--dry-run'])
    assert result.exit_code == 0 and result.stdout.rstrip().endswith('Dry run; exiting.')
    assert '"block": "G*"' in result.stdout and '"model_channels": 16' in result.stdout
    assert '"compile": false' in result.stdout
    for value, mode in [('true', 'default'), ('reduce-overhead', 'reduce-overhead'), ('No', 'false')]:
        result = run(TINY_CLI + [f'--data={good}', f'--outdir={outdir}', '--dry-run', f'--compile={value}'])
        assert result.exit_code == 0 and (f'"compile": "{mode}"' if mode != 'false' else '"compile": false') in result.stdout
    assert not os.path.exists(outdir)

#----------------------------------------------------------------------------

def test_compile_net_passes_the_mode(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, 'compile', lambda net, mode=None: seen.append(mode) or ('compiled', net))
    net = torch.nn.Linear(2, 2)
    assert tl.compile_net(net, False) is net and tl.compile_net(net, None) is net and tl.compile_net(net, 'off') is net
    assert tl.compile_net(net, True) == ('compiled', net) and tl.compile_net(net, 'reduce-overhead') == ('compiled', net)
    assert seen == ['default', 'reduce-overhead']
    with pytest.raises(ValueError, match='neither a boolean nor a torch.compile mode'):
        tl.compile_net(net, 'turbo')

@pytest.mark.slow  # torch.compile of a tiny network's forward and backward
def test_compiled_training_follows_the_eager_loss_curve(tmp_path):
    """--compile=reduce-overhead (CUDA graphs on a GPU; on a CPU inductor alone) trains the same function: the
    compiled graph is the reference op sequence, fused by inductor, so the losses agree with the eager training
    path's up to float rounding (here to the 6 digits stats.jsonl keeps; 1e-4 leaves room for what a few Adam steps
    at lr 0.01 make of rounding differences elsewhere), and the network really was compiled."""
    data = make_dataset(tmp_path / 'data')
    config = tiny_config(data, total_nimg=256, status_nimg=64, snapshot_nimg=None, checkpoint_nimg=None)
    rows = {}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for compile in (False, 'reduce-overhead'):
        run_dir = str(tmp_path / f'run-{compile}')
        assert tl.training_loop(run_dir=run_dir, compile=compile, **config) == 256
        assert (torch._dynamo.utils.counters['stats']['unique_graphs'] >= 1) == bool(compile)
        stats = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
        rows[compile] = [r['Loss/loss'] for r in stats if r['Progress/kimg'] > 0]
    eager, compiled = (np.array(rows[k], dtype=np.float64) for k in (False, 'reduce-overhead'))
    assert len(eager) == 4 and np.all(np.isfinite(compiled))
    np.testing.assert_allclose(compiled, eager, rtol=1e-4)
    torch._dynamo.reset()

def test_bad_labels_are_one_line_errors(tmp_path):
    import train_edm2plus
    outdir = str(tmp_path / 'run')
    for idx, (labels, message) in enumerate([
            (dict(labels=[[f'img{i:03d}.png', 7 if i == 2 else i % 3] for i in range(4)], num_classes=3),
             'invalid labels (the label of img002.png is 7; class labels must be 0..2)'),
            (dict(labels=[[f'img{i:03d}.png', -1 if i == 3 else 0] for i in range(4)]),
             'invalid labels (the label of img003.png is -1; class labels must not be negative)'),
            (dict(labels=[[f'img{i:03d}.png', 0] for i in range(2)]), 'no label for img002.png (and 1 more of 4 images)')]):
        data = make_dataset(tmp_path / f'data{idx}', num_images=4)
        with open(os.path.join(data, 'dataset.json'), 'w') as f:
            json.dump(labels, f)
        result = click.testing.CliRunner().invoke(train_edm2plus.cmdline, TINY_CLI + [f'--data={data}', f'--outdir={outdir}'])
        assert result.exit_code == 1
        assert result.stderr == f'Error: --data: {os.path.join(data, "dataset.json")}: {message}\n'
        assert not os.path.exists(outdir)
