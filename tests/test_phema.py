"""Post-hoc EMA (EDM2 paper Sec. 3): profile mathematics, naming and std lists, reconstruction."""

import copy
import os
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import reconstruct_phema
from conftest import make_tiny_net, snapshot_dict
from networks.loading import load_snapshot
from training import phema, posthoc

#----------------------------------------------------------------------------
# Profile mathematics.

GAMMA_REFERENCE = {0.010: 96.994898, 0.050: 16.972199, 0.100: 6.937204, 0.130: 4.603597, 0.150: 3.557869,
                   0.250: 0.719824}  # verified against EDM2

def test_std_to_exp_reference_values():
    stds = np.array(list(GAMMA_REFERENCE))
    exps = phema.std_to_exp(stds)
    assert exps.dtype == np.float64
    np.testing.assert_allclose(exps, list(GAMMA_REFERENCE.values()), atol=1e-6)

def test_std_exp_round_trip_preserves_shape():
    stds = np.array([[0.005, 0.05, 0.1], [0.15, 0.2, 0.28]])
    exps = phema.std_to_exp(stds)
    assert exps.shape == (2, 3)
    np.testing.assert_allclose(phema.exp_to_std(exps), stds, rtol=1e-12)
    assert np.ndim(phema.std_to_exp(0.1)) == 0
    np.testing.assert_allclose(phema.std_to_exp(phema.exp_to_std([0.5, 3.0, 40.0])), [0.5, 3.0, 40.0], rtol=1e-9)
    # σ_rel = 1/sqrt(12) is the uniform average (γ = 0).
    assert abs(phema.std_to_exp(1 / np.sqrt(12))) < 1e-9

def test_beta_reference_and_first_step():
    assert abs(phema.power_function_beta(std=0.05, t_next=2048 * 512, t_delta=2048) - 0.965474) < 1e-6
    assert phema.power_function_beta(std=0.10, t_next=2048, t_delta=2048) == 0  # first step: EMA = net

def test_correlation_matches_numerical_integral():
    # ⟨f_a, f_b⟩ for unequal times, both orders, against a fine Riemann sum of the two profiles.
    t = np.linspace(0, 3000, 3_000_001)[1:]
    def f(T, std):
        g = phema.std_to_exp(std)
        return np.where(t <= T, (g + 1) * t ** g / T ** (g + 1), 0)
    for (ta, sa), (tb, sb) in [((1000, 0.05), (3000, 0.1)), ((3000, 0.15), (2000, 0.05)), ((2000, 0.1), (2000, 0.1))]:
        numeric = np.sum(f(ta, sa) * f(tb, sb)) * (t[1] - t[0])
        assert abs(phema.power_function_correlation(ta, sa, tb, sb) - numeric) / numeric < 1e-4

def test_power_function_response():
    r = phema.power_function_response(ofs=[100, 200], std=[0.05, 0.1], len=300, axis=1)
    assert r.shape == (2, 300)
    np.testing.assert_allclose(r.sum(axis=1), 1)
    assert np.all(r[0, 101:] == 0) and r[0, 100] > 0 and np.all(r[1, 201:] == 0)
    # The sampled profile has the requested relative width.
    t = np.arange(300)
    for k, (ofs, std) in enumerate([(100, 0.05), (200, 0.1)]):
        mean = np.sum(r[k] * t)
        width = np.sqrt(np.sum(r[k] * (t - mean) ** 2)) / ofs
        assert abs(width - std) < 0.01

def test_solve_posthoc_coefficients():
    in_nimg = np.repeat(np.arange(1, 9) * 4096, 2)
    in_std = np.tile([0.05, 0.10], 8)
    out_std = [0.05, 0.075, 0.10, 0.15]
    X = phema.solve_posthoc_coefficients(in_nimg, in_std, in_nimg[-1], out_std)
    assert X.shape == (16, 4) and X.dtype == np.float64
    np.testing.assert_allclose(X.sum(axis=0), 1, atol=1e-12)
    # An output equal to an input gets coefficient 1 on it and (near) 0 elsewhere.
    assert abs(X[14, 0] - 1) < 1e-6 and abs(X[15, 2] - 1) < 1e-6
    assert np.abs(np.delete(X[:, 0], 14)).max() < 1e-6
    # The reconstructed profile of an in-between std is close to the true one (relative L2 error).
    resp_in = phema.power_function_response(in_nimg, in_std, len=in_nimg[-1] + 1, axis=1)
    resp_out = phema.power_function_response(in_nimg[-1], 0.075, len=in_nimg[-1] + 1)
    err = np.linalg.norm(X[:, 1] @ resp_in - resp_out) / np.linalg.norm(resp_out)
    assert err < 0.05

#----------------------------------------------------------------------------
# Tracking.

class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.register_buffer('b', torch.zeros(2))

def test_power_function_ema_tracking():
    net = _Tiny()
    ema = phema.PowerFunctionEMA(net, stds=[0.05, 0.1])
    history = []
    for k in range(1, 21):
        with torch.no_grad():
            net.w.copy_(torch.tensor([k, k * k, np.sin(k)], dtype=torch.float32))
        history.append(net.w.detach().clone())
        ema.update(cur_nimg=k * 64, batch_size=64)
    net.b.fill_(7)
    got = ema.get()
    assert [suffix for _, suffix in got] == ['-0.050', '-0.100']
    for (ema_net, _), std in zip(got, [0.05, 0.1]):
        # Closed form: step k has weight (k/n)^(γ+1) − ((k−1)/n)^(γ+1).
        g = phema.std_to_exp(std)
        k = np.arange(1, 21)
        weights = (k / 20) ** (g + 1) - ((k - 1) / 20) ** (g + 1)
        expected = (torch.tensor(weights, dtype=torch.float64)[:, None] * torch.stack(history).double()).sum(0)
        torch.testing.assert_close(ema_net.w.double(), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(ema_net.b, net.b)  # get() copies buffers
    state = ema.state_dict()
    assert state['stds'] == [0.05, 0.1] and len(state['emas']) == 2
    other = phema.PowerFunctionEMA(_Tiny(), stds=[0.05, 0.1])
    other.load_state_dict(copy.deepcopy(state))
    assert torch.equal(other.emas[1].w, ema.emas[1].w)
    ema.reset()
    assert torch.equal(ema.emas[0].w, net.w)
    with pytest.raises(ValueError, match='positive and less than 0.289'):
        phema.PowerFunctionEMA(net, stds=[0.3])

def test_traditional_ema():
    net = _Tiny()
    ema = phema.TraditionalEMA(net, halflife_Mimg=0.0005, rampup_ratio=None)
    with torch.no_grad():
        net.w.fill_(1)
    ema.update(cur_nimg=500, batch_size=500)  # one half-life
    assert torch.allclose(ema.get()[0][0].w, torch.full([3], 0.5))
    assert ema.get()[0][1] == ''

#----------------------------------------------------------------------------
# Naming and std lists.

def test_kimg_nimg_mapping_and_names():
    assert posthoc.kimg_to_nimg(2147483) == 2147483648
    assert posthoc.kimg_to_nimg(134217) == 134217728
    assert posthoc.kimg_to_nimg(8388) == 8388608
    assert posthoc.kimg_to_nimg(0) == 0
    for nimg in range(0, 10_000_000, 1024 * 37):
        assert posthoc.kimg_to_nimg(nimg // 1000) == nimg
    with pytest.raises(ValueError):
        posthoc.kimg_to_nimg(42)  # 41984 and 43008 skip kimg 42
    assert posthoc.output_path('out', 'phema', 2147483648, 0.15) == os.path.join('out', 'phema-2147483-0.150.pkl')
    info = posthoc.parse_pickle_name('network-snapshot-0008388-0.050.pkl')
    assert (info.prefix, info.kimg, info.std) == ('network-snapshot', 8388, 0.05)
    assert posthoc.parse_pickle_name('phema-2147483-0.150.pkl').prefix == 'phema'
    for bad in ['network-snapshot-0008388.pkl', 'training-state-0008388.pt', 'x-12-0.05.pkl.tmp', 'x-12-5.pkl']:
        assert posthoc.parse_pickle_name(bad) is None

def test_parse_std_list():
    stds = posthoc.parse_std_list('0.010,0.015,...,0.250')
    assert len(stds) == 49 and stds[0] == 0.010 and stds[-1] == 0.250
    np.testing.assert_allclose(np.diff(stds), 0.005, atol=1e-12)
    assert len(posthoc.parse_std_list('0.07,0.08,...,0.12')) == 6
    assert posthoc.parse_std_list('0.1,0.05,0.1') == [0.05, 0.1]
    assert posthoc.parse_std_list([0.1, 0.05]) == [0.05, 0.1]
    errors = {
        '...,0.1': "'...' must be preceded by at least two floats",
        '0.05,...,0.1': "'...' must be preceded by at least two floats",
        '0.05,0.1,...': "'...' must be followed by at least one float",
        '0.05,0.1,...,...,0.2': "'...' must be followed by at least one float",
        '0.1,0.1,...,0.2': "The floats preceding '...' must not be equal",
        '0.05,0.1,...,0.12': "'...' must correspond to a non-empty interval",
        '0.05,0.1,...,0.22': "'...' must correspond to an evenly spaced interval",
        '0.05,0.3': 'Relative standard deviation must be positive and less than 0.289',
        '0,0.1': 'Relative standard deviation must be positive and less than 0.289',
        'nan': 'Relative standard deviation must be positive and less than 0.289',
        '0.05,abc': "'abc' is not a float",
    }
    for text, message in errors.items():
        with pytest.raises(ValueError) as info:
            posthoc.parse_std_list(text)
        assert str(info.value) == message, text

#----------------------------------------------------------------------------
# Reconstruction from snapshots written in the real format.

BATCH = 256
SNAPSHOT_STEPS = 16          # 4096 images: snapshot times are multiples of 1024 as the names require
NUM_STEPS = 128
TRACKED_STDS = [0.05, 0.075, 0.10]
DATASET_KWARGS = dict(class_name='training.dataset.ImageFolderDataset', path='data.zip', use_labels=False)

@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    """A simulated training run: a smooth random trajectory, EMAs at 0.050/0.075/0.100, snapshots every 4096 images."""
    run = tmp_path_factory.mktemp('run')
    net = make_tiny_net(channels_per_head=16)
    ema = phema.PowerFunctionEMA(net, stds=TRACKED_STDS)
    gen = torch.Generator().manual_seed(1)
    velocity = [torch.zeros_like(p) for p in net.parameters()]
    for step in range(NUM_STEPS + 1):
        cur_nimg = step * BATCH
        if step % SNAPSHOT_STEPS == 0:
            for ema_net, suffix in ema.get():
                with dnnlib.util.atomic_write(run / f'network-snapshot-{cur_nimg // 1000:07d}{suffix}.pkl') as f:
                    pickle.dump(snapshot_dict(ema_net, DATASET_KWARGS), f)
        if step == NUM_STEPS:
            break
        with torch.no_grad():  # Momentum-like noisy updates, roughly what an optimizer does.
            for p, v in zip(net.parameters(), velocity):
                v.mul_(0.9).add_(torch.randn(p.shape, generator=gen), alpha=0.01)
                p.add_(v)
        ema.update(cur_nimg=cur_nimg + BATCH, batch_size=BATCH)
    return run

def _max_rel_error(net, ref):
    """max over parameter tensors of max|net − ref| / max|ref|."""
    errs = [((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
            for a, b in zip(net.parameters(), ref.parameters())]
    return max(errs)

def _inputs(run_dir, stds=(0.05, 0.1)):
    return posthoc.list_input_pickles(str(run_dir), in_prefix='network-snapshot', in_std=list(stds))

def test_list_input_pickles(run_dir):
    pkls = _inputs(run_dir)
    assert len(pkls) == 18  # 9 times (incl. nimg 0) x 2 stds
    assert [(p.nimg, p.std) for p in pkls[:3]] == [(0, 0.05), (0, 0.1), (4096, 0.05)]
    assert pkls[-1].nimg == NUM_STEPS * BATCH
    assert len(posthoc.list_input_pickles(str(run_dir))) == 27
    with pytest.raises(FileNotFoundError, match='Input directory does not exist'):
        posthoc.list_input_pickles(str(run_dir / 'missing'))

@pytest.mark.parametrize('out_nimg', [None, 16384])
def test_reconstruction_reproduces_tracked_snapshot(run_dir, out_nimg):
    steps = posthoc.reconstruct_phema(_inputs(run_dir), out_std=[0.05, 0.1], out_nimg=out_nimg, verbose=False)
    num_inputs = 2 * ((out_nimg or NUM_STEPS * BATCH) // 4096)  # nimg 0 ignored
    assert len(steps) == num_inputs
    outs = [out for step in steps for out in step.out]
    kimg = (out_nimg or NUM_STEPS * BATCH) // 1000
    for out, std in zip(outs, [0.05, 0.1]):
        ref = load_snapshot(str(run_dir / f'network-snapshot-{kimg:07d}-{std:.3f}.pkl'), verbose=False).ema
        err = _max_rel_error(out.net, ref)
        assert err < 1e-3, (std, err)
        assert out.net.logvar_linear.weight.dtype == torch.float16 and not out.net.training
        assert all(b.dtype == torch.float16 for b in out.net.buffers())
        # Other steps of the trajectory differ by far more, so the comparison is meaningful.
        other = load_snapshot(str(run_dir / f'network-snapshot-{kimg - 4:07d}-{std:.3f}.pkl'), verbose=False).ema
        assert _max_rel_error(other, ref) > 20 * max(err, 1e-4)

def test_reconstruct_untracked_std_from_two_tracked(run_dir):
    # 0.075 was tracked directly; reconstruct it from the 0.050 + 0.100 snapshots only.
    ref = load_snapshot(str(run_dir / f'network-snapshot-{NUM_STEPS * BATCH // 1000:07d}-0.075.pkl'), False).ema
    near = load_snapshot(str(run_dir / f'network-snapshot-{NUM_STEPS * BATCH // 1000:07d}-0.050.pkl'), False).ema
    (out,) = [o for step in posthoc.reconstruct_phema(_inputs(run_dir), out_std=[0.075], verbose=False)
              for o in step.out]
    err = _max_rel_error(out.net, ref)
    spread = _max_rel_error(near, ref)  # how much the EMA length matters here
    print(f'0.075 reconstruction: max rel error {err:.2e}; 0.050 vs 0.075 tracked differ by {spread:.2e}')
    assert err < 0.1 * spread

def test_cli_writes_names_skip_and_batches(run_dir, tmp_path):
    out = tmp_path / 'out'
    args = ['--indir', str(run_dir), '--inprefix', 'network-snapshot', '--instd', '0.050,0.100', '--outdir', str(out),
            '--outstd', '0.06,0.07,...,0.11', '--batch', '4']
    result = CliRunner().invoke(reconstruct_phema.cmdline, args)
    assert result.exit_code == 0, result.output
    names = sorted(os.listdir(out))
    assert names == [f'phema-0000032-{s:.3f}.pkl' for s in [0.06, 0.07, 0.08, 0.09, 0.10, 0.11]]
    assert 'Loading 16 input pickles...' in result.output
    assert 'Reconstructing 6 output pickles in 2 batches...' in result.output  # 3 + 3
    assert result.output.count('    batch 1: ') == 3
    data = load_snapshot(str(out / 'phema-0000032-0.100.pkl'), verbose=False)
    assert list(data.keys()) == ['encoder', 'dataset_kwargs', 'loss_fn', 'ema']
    assert type(data) is dnnlib.EasyDict and data.dataset_kwargs.path == 'data.zip'

    # --skip: existing outputs are left alone, missing ones are made.
    os.remove(out / 'phema-0000032-0.080.pkl')
    before = os.stat(out / 'phema-0000032-0.100.pkl').st_mtime_ns
    result = CliRunner().invoke(reconstruct_phema.cmdline, args + ['--skip'])
    assert result.exit_code == 0, result.output
    assert 'Reconstructing 1 output pickles in 1 batches...' in result.output
    assert os.path.isfile(out / 'phema-0000032-0.080.pkl')
    assert os.stat(out / 'phema-0000032-0.100.pkl').st_mtime_ns == before

    # --outkimg and --outprefix.
    result = CliRunner().invoke(reconstruct_phema.cmdline, ['--indir', str(run_dir), '--outdir', str(out),
                                '--outstd', '0.05', '--outkimg', '16', '--outprefix', 'early', '--instd', '0.05,0.1'])
    assert result.exit_code == 0, result.output
    assert os.path.isfile(out / 'early-0000016-0.050.pkl')

def test_cli_errors(run_dir, tmp_path, monkeypatch):
    def run(*args):
        return CliRunner().invoke(reconstruct_phema.cmdline, list(args))
    base = ['--outdir', str(tmp_path / 'o')]
    cases = [
        (['--indir', str(tmp_path / 'nope'), '--outstd', '0.1'], 1, 'Input directory does not exist'),
        (['--indir', str(tmp_path), '--outstd', '0.1'], 1, 'No valid input pickles found'),
        (['--indir', str(run_dir), '--outstd', '0.1', '--outkimg', '18'], 1,
         'Reconstruction time must match one of the input pickles'),
        (['--indir', str(run_dir), '--outstd', '0.1', '--outkimg', '42'], 1, '--outkimg=42'),
        (['--indir', str(run_dir), '--outstd', '0.1', '--outkimg', '0'], 2, '--outkimg'),
        (['--indir', str(run_dir), '--outstd', '0.05,0.1,...'], 2, "'...' must be followed by at least one float"),
        (['--indir', str(run_dir), '--outstd', '0.5'], 2, 'positive and less than 0.289'),
        (['--indir', str(run_dir), '--outstd', '0.1', '--batch', '0'], 2, '--batch'),
    ]
    for args, code, message in cases:
        result = run(*(args + base))
        assert result.exit_code == code and message in result.output, (args, result.output)
    assert not os.path.exists(tmp_path / 'o')
    monkeypatch.setenv('WORLD_SIZE', '2')
    result = run('--indir', str(run_dir), '--outstd', '0.1', *base)
    assert result.exit_code == 1 and 'Distributed execution is not supported' in result.output

def test_failed_write_leaves_no_partial_file(run_dir, tmp_path, monkeypatch):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'phema-0000032-0.100.pkl').write_bytes(b'previous')

    def broken_dump(obj, f):
        f.write(b'partial data')
        raise OSError('disk full')
    monkeypatch.setattr(posthoc.pickle, 'dump', broken_dump)
    steps = posthoc.reconstruct_phema(_inputs(run_dir), out_std=[0.05, 0.1], out_dir=str(out), verbose=False)
    with pytest.raises(OSError, match='disk full'):
        for _ in steps:
            pass
    assert os.listdir(out) == ['phema-0000032-0.100.pkl']  # no temporary or partial file left behind
    assert (out / 'phema-0000032-0.100.pkl').read_bytes() == b'previous'

def test_corrupt_input_is_a_clear_error(run_dir, tmp_path):
    indir = tmp_path / 'in'
    indir.mkdir()
    for p in _inputs(run_dir)[-4:]:
        (indir / os.path.basename(p.path)).write_bytes(open(p.path, 'rb').read())
    (indir / 'network-snapshot-0000032-0.100.pkl').write_bytes(b'not a pickle')
    result = CliRunner().invoke(reconstruct_phema.cmdline, ['--indir', str(indir), '--outdir', str(tmp_path / 'o'),
                                                         '--outstd', '0.07'])
    assert result.exit_code == 1
    assert 'network-snapshot-0000032-0.100.pkl: not a network' in result.output
    assert not os.path.exists(tmp_path / 'o') or os.listdir(tmp_path / 'o') == []

#----------------------------------------------------------------------------
# A real (tiny) training run that tracks 0.050, 0.075 and 0.100 directly.

def _train_and_reconstruct_075(tmp_path, resolution, network_kwargs, loss_kwargs, lr_kwargs, batch_size, total_nimg):
    """Train with EMAs 0.050/0.075/0.100 tracked directly, snapshots every 1024 images; reconstruct 0.075 from the
    0.050 + 0.100 snapshots. Returns (relative L2 error, error / distance between the 0.050 and 0.100 EMAs)."""
    training_loop = pytest.importorskip('training.training_loop').training_loop
    from PIL import Image
    data = tmp_path / 'data'
    data.mkdir()
    rng = np.random.RandomState(0)
    yy, xx = np.mgrid[0:resolution, 0:resolution]
    for i in range(64):  # smooth coloured stripes: something learnable
        wave = np.sin(xx * rng.rand() + yy * rng.rand() + rng.rand() * 6)[..., None] * rng.rand(3)
        Image.fromarray((127.5 + 100 * wave).astype(np.uint8)).save(data / f'{i:03d}.png')
    run = tmp_path / 'run'
    training_loop(
        dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=str(data), use_labels=False),
        encoder_kwargs=dict(class_name='training.encoders.StandardRGBEncoder'),
        data_loader_kwargs=dict(class_name='torch.utils.data.DataLoader', num_workers=0),
        network_kwargs=dict(class_name='networks.edm2plus.Precond', **network_kwargs),
        loss_kwargs=dict(class_name='training.loss.EDM2Loss', **loss_kwargs),
        optimizer_kwargs=dict(class_name='torch.optim.Adam', betas=(0.9, 0.99)),
        lr_kwargs=dict(func_name='training.training_loop.learning_rate_schedule', **lr_kwargs),
        ema_kwargs=dict(class_name='training.phema.PowerFunctionEMA', stds=[0.05, 0.075, 0.1]),
        run_dir=str(run), batch_size=batch_size, total_nimg=total_nimg, status_nimg=None, snapshot_nimg=1024,
        checkpoint_nimg=None, device='cpu', progress=False)

    in_pkls = posthoc.list_input_pickles(str(run), in_std=[0.05, 0.1])
    assert [p.nimg for p in in_pkls] == [n for n in range(0, total_nimg + 1, 1024) for _ in range(2)]
    (out,) = [o for step in posthoc.reconstruct_phema(in_pkls, out_std=[0.075], verbose=False) for o in step.out]
    snap = {std: load_snapshot(str(run / f'network-snapshot-{total_nimg // 1000:07d}-{std}.pkl'), verbose=False).ema
            for std in ['0.050', '0.075', '0.100']}

    def flat(net):
        return torch.cat([p.detach().float().ravel() for p in net.parameters()])
    rec, direct = flat(out.net), flat(snap['0.075'])
    rel_err = ((rec - direct).norm() / direct.norm()).item()
    err_vs_spread = (rec - direct).norm().item() / (flat(snap['0.050']) - flat(snap['0.100'])).norm().item()
    print(f'tracked 0.075 vs reconstruction from 0.050+0.100: relative L2 error {rel_err:.2e}, '
          f'{err_vs_spread:.3f} of the 0.050-0.100 distance')
    return rel_err, err_vs_spread

def test_training_run_reconstructs_tracked_075(tmp_path, one_thread):
    # A tiny CONFIG A net at 8x8, 64 steps: a few seconds.
    rel_err, err_vs_spread = _train_and_reconstruct_075(
        tmp_path, resolution=8, network_kwargs=dict(model_channels=8, channel_mult=[1, 2], num_blocks=1,
                                                    attn_resolutions=[]),
        loss_kwargs=dict(), lr_kwargs=dict(ref_lr=0.03, ref_batches=0, rampup_Mimg=0.001), batch_size=64,
        total_nimg=4096)
    # Measured on the development machine: 1.2e-3 relative error, 0.047 of the 0.050-0.100 distance.
    assert rel_err < 3e-3
    assert err_vs_spread < 0.15

@pytest.mark.slow
def test_demo_preset_run_reconstructs_tracked_075(tmp_path, one_thread):
    # The demo preset's network (CONFIG G*, 16x16) and hyperparameters, 64 steps (about a minute on 2 cores).
    from networks import presets
    p = presets.get('demo')
    rel_err, err_vs_spread = _train_and_reconstruct_075(
        tmp_path, resolution=p.resolution,
        network_kwargs=dict(model_channels=p.channels, channel_mult=list(p.channel_mult), num_blocks=p.num_blocks,
                            attn_resolutions=list(p.attn_resolutions), block=p.block, expansion=p.expansion,
                            dropout=p.dropout),
        loss_kwargs=dict(P_mean=p.P_mean, P_std=p.P_std),
        lr_kwargs=dict(ref_lr=p.lr, ref_batches=p.decay, rampup_Mimg=p.rampup_Mimg), batch_size=p.batch,
        total_nimg=4096)
    # Measured on the development machine: 4.5e-4 relative error, 0.064 of the 0.050-0.100 distance.
    assert rel_err < 2e-3
    assert err_vs_spread < 0.2
