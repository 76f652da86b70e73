"""Generation tests: per-seed determinism across batch sizes and processes, labels, output
layout, grid, option rules and errors. Uses a tiny conditional Precond (8×8, 4 classes) with randomised weights."""

import copy
import os
import pickle
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import generate_images as cli
from conftest import count_fast_path, make_tiny_net, randomize_weights, snapshot_dict
from figures.grids import grid_layout
from sampling.generate import StackedRandomGenerator, config_presets, generate_images, image_path, parse_int_list
from training.encoders import DIFFUSERS_INSTALL as INSTALL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = dict(num_steps=6)  # 11 evaluations per batch: enough to exercise the sampler, fast on CPU.

pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py

def random_tiny_net(label_dim=4, seed=0):
    return randomize_weights(make_tiny_net(label_dim, channels=32, seed=seed)).eval().requires_grad_(False)

@pytest.fixture(scope='module')
def tiny_net():
    return random_tiny_net()

@pytest.fixture(scope='module')
def tiny_pkl(tmp_path_factory, tiny_net):
    path = tmp_path_factory.mktemp('net') / 'network-snapshot-0000001-0.100.pkl'
    with dnnlib.util.atomic_write(path) as f:
        pickle.dump(snapshot_dict(tiny_net), f)
    return str(path)

def generate_all(net, **kwargs):
    kwargs = dict(device='cpu', verbose=False, **STEPS) | kwargs
    return list(generate_images(net, **kwargs))

def images_by_seed(batches):
    return {seed: image for r in batches if r.images is not None for seed, image in zip(r.seeds, r.images)}

#----------------------------------------------------------------------------

def test_parse_int_list():
    assert parse_int_list('0-3,7,10-11') == [0, 1, 2, 3, 7, 10, 11]
    assert parse_int_list('5') == [5]
    assert parse_int_list(range(2, 4)) == [2, 3]
    for bad in ['a', '1-', '3-1', '']:
        with pytest.raises(ValueError):
            parse_int_list(bad)

def test_config_presets_table():
    assert len(config_presets) == 36
    root = 'https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/'
    assert config_presets['edm2-img512-xxl-fid'].net == root + 'edm2-img512-xxl-0939524-0.070.pkl'
    assert config_presets['edm2-img512-xxl-fid'].gnet is None and config_presets['edm2-img512-xxl-fid'].guidance is None
    p = config_presets['edm2-img512-s-guid-dino']
    assert (p.net, p.gnet, p.guidance) == (root + 'edm2-img512-s-2147483-0.085.pkl', root + 'edm2-img512-xs-uncond-2147483-0.085.pkl', 1.9)
    p = config_presets['edm2-img64-s-autog-dino']
    assert (p.net, p.gnet, p.guidance) == (root + 'edm2-img64-s-1073741-0.105.pkl', root + 'edm2-img64-xs-0134217-0.175.pkl', 2.2)
    for name, p in config_presets.items():
        assert p.net.startswith(root) and p.net.endswith('.pkl')
        assert (p.gnet is None) == (p.guidance is None) == ('guid' not in name and 'autog' not in name)

def test_stacked_random_generator_draws_per_seed():
    rnd = StackedRandomGenerator('cpu', [3, 7, 3 + 2**32])
    noise = rnd.randn([3, 2, 4, 4])
    classes = rnd.randint(10, size=[3])
    for i, seed in enumerate([3, 7, 3]):
        gen = torch.Generator().manual_seed(seed)
        assert torch.equal(noise[i], torch.randn([2, 4, 4], generator=gen))
        assert torch.equal(classes[i], torch.randint(10, size=[], generator=gen))
    assert torch.equal(noise[0], noise[2])  # seeds are taken modulo 2^32
    assert rnd.randn_like(noise).shape == noise.shape
    with pytest.raises(ValueError, match='one row for each of the 3 seeds'):
        rnd.randn([2, 4])

#----------------------------------------------------------------------------
# Per-seed determinism.

def test_images_do_not_depend_on_batch_size(tiny_net):
    seeds = [0, 1, 2, 3, 4, 5, 6, 2**32 + 5]
    kwargs = dict(S_churn=10)  # stochastic sampling: churn noise must come from the per-seed generators too
    results = {b: images_by_seed(generate_all(tiny_net, seeds=seeds, max_batch_size=b, **kwargs)) for b in [1, 3, 8]}
    for b in [3, 8]:
        assert results[b].keys() == results[1].keys()
        for seed in seeds:
            assert torch.equal(results[b][seed], results[1][seed]), f'seed {seed} differs at batch {b}'
    images = results[1]
    assert images[0].dtype == torch.uint8 and images[0].shape == (3, 8, 8)
    assert not torch.equal(images[0], images[1]) and images[0].float().std() > 10
    assert torch.equal(images[5], images[2**32 + 5])

def test_batches_noise_and_labels(tiny_net):
    batches = generate_all(tiny_net, seeds=range(10), max_batch_size=4)
    assert [len(r.indices) for r in batches] == [4, 3, 3]  # numpy.array_split into ceil(10/4) = 3 chunks
    assert [r.batch_idx for r in batches] == [0, 1, 2] and {r.num_batches for r in batches} == {3}
    for r in batches:
        for seed, noise, label in zip(r.seeds, r.noise, r.labels):
            gen = torch.Generator().manual_seed(seed)
            assert torch.equal(noise, torch.randn([3, 8, 8], generator=gen))  # noise first ...
            cls = torch.randint(4, size=[], generator=gen)                     # ... then the class
            assert torch.equal(label, torch.eye(4)[cls])
    assert len(generate_images(tiny_net, seeds=range(10), max_batch_size=4, device='cpu', verbose=False)) == 3

def test_class_selection(tiny_net):
    seeds = list(range(6))
    free = generate_all(tiny_net, seeds=seeds)
    fixed = generate_all(tiny_net, seeds=seeds, class_idx=2)
    assert torch.equal(fixed[0].labels, torch.eye(4)[[2] * 6])
    assert torch.equal(fixed[0].noise, free[0].noise)  # the class draw still happens; noise unchanged
    cycled = generate_all(tiny_net, seeds=seeds, class_idx=[1, 3])
    assert cycled[0].labels.argmax(dim=1).tolist() == [1, 3, 1, 3, 1, 3]
    # Labels matter: same seed, different class → different image.
    assert not torch.equal(generate_all(tiny_net, seeds=[0], class_idx=1)[0].images,
                           generate_all(tiny_net, seeds=[0], class_idx=3)[0].images)
    with pytest.raises(ValueError, match='class 4 is out of range'):
        generate_images(tiny_net, seeds=seeds, class_idx=4, device='cpu', verbose=False)

def test_unconditional_net_gets_no_labels():
    net = random_tiny_net(label_dim=0, seed=1)
    batches = generate_all(net, seeds=[0, 1, 2])
    assert batches[0].labels is None and batches[0].images.shape == (3, 3, 8, 8)
    with pytest.raises(ValueError, match='unconditional'):
        generate_images(net, class_idx=0, device='cpu', verbose=False)

def test_guidance_changes_images_and_guide_is_loaded_only_when_used(tiny_net, tiny_pkl, tmp_path):
    guide = random_tiny_net(seed=2)
    plain = images_by_seed(generate_all(tiny_net, seeds=[0, 1]))
    guided = images_by_seed(generate_all(tiny_net, gnet=guide, seeds=[0, 1], guidance=2.0))
    interval = images_by_seed(generate_all(tiny_net, gnet=guide, seeds=[0, 1], guidance=2.0, guidance_interval=(0.5, 5)))
    assert not torch.equal(plain[0], guided[0]) and not torch.equal(guided[0], interval[0])
    missing = str(tmp_path / 'missing.pkl')
    generate_all(tiny_pkl, gnet=missing, seeds=[0], guidance=1)  # guidance 1: the guide is never loaded
    with pytest.raises(FileNotFoundError, match='missing.pkl'):
        generate_images(tiny_pkl, gnet=missing, seeds=[0], guidance=2.0, device='cpu', verbose=False)

#----------------------------------------------------------------------------
# Output files and grid.

def test_png_files_and_subdirs(tiny_pkl, tiny_net, tmp_path):
    batches = generate_all(tiny_pkl, seeds=[0, 999, 1001], outdir=str(tmp_path / 'flat'))
    assert sorted(os.listdir(tmp_path / 'flat')) == ['000000.png', '000999.png', '001001.png']
    generate_all(tiny_pkl, seeds=[0, 999, 1001], outdir=str(tmp_path / 'sub'), subdirs=True)
    assert image_path('o', 1001, subdirs=True) == os.path.join('o', '001000', '001001.png')
    assert os.path.isfile(tmp_path / 'sub' / '000000' / '000999.png')
    assert os.path.isfile(tmp_path / 'sub' / '001000' / '001001.png')
    # The PNG holds exactly the decoded image of its seed.
    png = np.asarray(PIL.Image.open(tmp_path / 'sub' / '001000' / '001001.png'))
    assert png.shape == (8, 8, 3) and np.array_equal(png, images_by_seed(batches)[1001].permute(1, 2, 0).numpy())
    assert not [f for f in os.listdir(tmp_path / 'flat') if f.endswith('.tmp')]

def test_grid(tiny_net, tmp_path):
    # Random classes: near-square grid in seed order (6 images → 3 columns × 2 rows).
    batches = generate_all(tiny_net, seeds=range(6), max_batch_size=4, grid=str(tmp_path / 'square.png'))
    grid = np.asarray(PIL.Image.open(tmp_path / 'square.png'))
    assert grid.shape == (2 * 8, 3 * 8, 3)
    images = images_by_seed(batches)
    assert np.array_equal(grid[8:16, 0:8], images[3].permute(1, 2, 0).numpy())
    # Several classes given: one row per class (3 classes → 3 rows × 2 columns).
    batches = generate_all(tiny_net, seeds=range(6), class_idx=[2, 0, 1], grid=str(tmp_path / 'classes.png'))
    grid = np.asarray(PIL.Image.open(tmp_path / 'classes.png'))
    assert grid.shape == (3 * 8, 2 * 8, 3)
    images = images_by_seed(batches)  # seed 4 is the second image of class 0, i.e. row 1, column 1
    assert np.array_equal(grid[8:16, 8:16], images[4].permute(1, 2, 0).numpy())
    assert grid_layout(5, [2, 0, 2, 0, 2]) == [[0, 2, 4], [1, 3]]

#----------------------------------------------------------------------------
# Command line: option rules and errors.

def run_cli(args):
    return CliRunner().invoke(cli.cmdline, args)

def test_cli_errors(tiny_pkl, tmp_path):
    out = ['--outdir', str(tmp_path / 'out')]
    result = run_cli(out)
    assert result.exit_code == 1 and 'Error: Please specify either --preset or --net' in result.output
    result = run_cli(out + ['--preset=nope'])
    assert result.exit_code == 1 and 'Error: Invalid configuration preset "nope"' in result.output
    result = run_cli(out + ['--net', tiny_pkl, '--guidance=2'])
    assert result.exit_code == 1 and 'Error: Please specify --gnet when using guidance' in result.output
    result = run_cli(out + ['--net', str(tmp_path / 'nothere.pkl')])
    assert result.exit_code == 1 and 'nothere.pkl: no such network file' in result.output
    assert result.output.count('\n') == 1
    not_a_pickle = tmp_path / 'bad.pkl'
    not_a_pickle.write_bytes(b'not a pickle')
    result = run_cli(out + ['--net', str(not_a_pickle)])
    assert result.exit_code == 1 and 'bad.pkl' in result.output and 'Traceback' not in result.output
    result = run_cli(out + ['--net', tiny_pkl, '--class=9'])
    assert result.exit_code == 1 and 'class 9 is out of range' in result.output
    for bad in [['--seeds=1,x'], ['--steps=0'], ['--guidance-interval=3,1'], ['--guidance-interval=1'], ['--S_churn=-1']]:
        result = run_cli(out + ['--net', tiny_pkl] + bad)
        assert result.exit_code == 2, bad
    assert not os.path.exists(tmp_path / 'out')

def test_cli_preset_rules():
    guided = 'edm2-img512-s-guid-dino'
    opts = cli.resolve_options(dnnlib.EasyDict(preset=guided, net=None, gnet=None, guidance=None))
    assert (opts.net, opts.gnet, opts.guidance) == (config_presets[guided].net, config_presets[guided].gnet, 1.9)
    # The command line wins over the preset; --guidance=1 disables guidance and drops the guide.
    opts = cli.resolve_options(dnnlib.EasyDict(preset=guided, net='mine.pkl', gnet=None, guidance=1))
    assert (opts.net, opts.gnet, opts.guidance) == ('mine.pkl', None, 1)
    opts = cli.resolve_options(dnnlib.EasyDict(preset=None, net='a.pkl', gnet='b.pkl', guidance=None))
    assert (opts.gnet, opts.guidance) == (None, 1)
    # EDM2's calculate_metrics imports these names from generate_images.
    for name in ['config_presets', 'edm_sampler', 'StackedRandomGenerator', 'generate_images', 'parse_int_list']:
        assert hasattr(cli, name)

def test_cli_in_process(tiny_pkl, tmp_path):
    result = run_cli(['--net', tiny_pkl, '--outdir', str(tmp_path / 'out'), '--seeds=3-5', '--steps=4',
                      '--grid', str(tmp_path / 'grid.png'), '--class=1,2,3'])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path / 'out')) == ['000003.png', '000004.png', '000005.png']
    assert PIL.Image.open(tmp_path / 'grid.png').size == (8, 24)
    assert 'Generating 3 images...' in result.output

#----------------------------------------------------------------------------
# One process vs. two under torchrun (gloo on CPU): byte-identical PNGs and grid.

@pytest.mark.slow  # a single-process and a torchrun launch
def test_two_processes_match_one(tiny_pkl, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
    env['OMP_NUM_THREADS'] = '1'
    args = ['--net', tiny_pkl, '--seeds=0-4,1001', '--batch=2', '--steps=4', '--S_churn=5', '--subdirs']
    def run(launcher, name):
        cmd = launcher + ['generate_images.py'] + args + ['--outdir', str(tmp_path / name), '--grid', str(tmp_path / f'{name}.png')]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc
    run([sys.executable], 'one')
    run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'], 'two')
    files = sorted(os.path.relpath(os.path.join(d, f), tmp_path / 'one') for d, _, fs in os.walk(tmp_path / 'one') for f in fs)
    assert files == [os.path.join('000000', f'{s:06d}.png') for s in range(5)] + [os.path.join('001000', '001001.png')]
    for f in files:
        assert (tmp_path / 'one' / f).read_bytes() == (tmp_path / 'two' / f).read_bytes(), f
    assert (tmp_path / 'one.png').read_bytes() == (tmp_path / 'two.png').read_bytes()
    assert PIL.Image.open(tmp_path / 'two.png').size == (3 * 8, 2 * 8)

#----------------------------------------------------------------------------
# EDM2's exact op sequence on request (edm2_exact, --edm2-exact); the fast path by default.

class Latents:
    """Encoder stand-in whose decode() returns the sampler's float output, so that runs compare bit for bit."""
    def decode(self, x):
        return x

def test_edm2_exact_equals_reference_mode(tiny_net, monkeypatch):
    from networks import edm2plus
    calls = count_fast_path(monkeypatch)
    kwargs = dict(seeds=[0, 1, 2, 7], max_batch_size=2, encoder=Latents(), gnet=random_tiny_net(seed=1), guidance=1.5)
    exact = generate_all(tiny_net, edm2_exact=True, **kwargs)
    assert calls == [] and edm2plus._fast_enabled  # reference path throughout, and only while generating
    with edm2plus.reference_mode():
        reference = generate_all(tiny_net, **kwargs)
    fast = generate_all(tiny_net, **kwargs)
    assert len(calls) > 0
    for a, b, c in zip(exact, reference, fast):
        assert torch.equal(a.images, b.images)
        torch.testing.assert_close(c.images, a.images, rtol=0, atol=1e-4)  # same function, other rounding

@pytest.mark.slow  # torch.compile of two tiny networks
def test_compiled_networks_give_the_same_images(tiny_net):
    """compile=True runs the networks through torch.compile (inductor, which traces the reference op sequence);
    the images equal the eager ones up to rounding, guide included, and the networks really were compiled."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    kwargs = dict(seeds=[0, 1, 2], max_batch_size=2, encoder=Latents(), gnet=random_tiny_net(seed=1), guidance=1.5)
    eager = generate_all(tiny_net, **kwargs)
    compiled = generate_all(tiny_net, compile=True, **kwargs)
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] >= 2  # main net and guide
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b.images, a.images, rtol=0, atol=1e-4)
    assert '--compile' in run_cli(['--help']).output
    torch._dynamo.reset()

def test_cli_edm2_exact(tiny_pkl, tmp_path, monkeypatch):
    from networks import edm2plus
    calls = count_fast_path(monkeypatch)
    args = ['--net', tiny_pkl, '--seeds=0-2', '--steps=4', '--class=1']
    assert run_cli(args + ['--outdir', str(tmp_path / 'exact'), '--edm2-exact']).exit_code == 0
    assert calls == []
    with edm2plus.reference_mode():
        assert run_cli(args + ['--outdir', str(tmp_path / 'reference')]).exit_code == 0
    for seed in range(3):
        name = f'{seed:06d}.png'
        assert (tmp_path / 'exact' / name).read_bytes() == (tmp_path / 'reference' / name).read_bytes()
    assert run_cli(args + ['--outdir', str(tmp_path / 'fast')]).exit_code == 0
    assert len(calls) > 0
    assert "EDM2's exact op sequence" in ' '.join(run_cli(['--help']).output.split())

#----------------------------------------------------------------------------
# Latent (ImageNet-512) networks need diffusers for their decoder: without it, one line with the install command,
# before any network is loaded.

def test_latent_networks_without_diffusers(tiny_net, tiny_pkl, tmp_path, monkeypatch):
    import sampling.generate as generate
    from networks import export, loading
    from training.encoders import StabilityVAEEncoder
    monkeypatch.setattr(generate, '_diffusers_problem',  # as without diffusers, wherever the test runs
                        lambda: f'needs the diffusers package, which is not installed: {INSTALL}')
    latent_pkl, latent_pt = tmp_path / 'latent.pkl', tmp_path / 'latent.pt'
    snapshot = dnnlib.EasyDict(encoder=StabilityVAEEncoder(), dataset_kwargs=dnnlib.EasyDict(), loss_fn=None,
                               ema=copy.deepcopy(tiny_net).half())
    with open(latent_pkl, 'wb') as f:
        pickle.dump(snapshot, f)
    export.export(str(latent_pkl), str(latent_pt), verbose=False)
    assert generate.stored_encoder_name(latent_pkl) == generate.stored_encoder_name(latent_pt) == 'StabilityVAEEncoder'
    assert generate.stored_encoder_name(tiny_pkl) == 'StandardRGBEncoder'

    def no_loading(*_args, **_kwargs):
        raise AssertionError('a network was loaded')
    monkeypatch.setattr(loading, 'load_snapshot', no_loading)
    cases = [(['--net', str(latent_pkl)], f'--net={latent_pkl}'), (['--net', str(latent_pt)], f'--net={latent_pt}'),
             (['--preset=edm2-img512-xs-fid'], '--preset=edm2-img512-xs-fid'),  # checked before any download
             (['--preset=edm2-img512-s-autog-fid', '--guidance=1'], '--preset=edm2-img512-s-autog-fid')]
    for args, name in cases:
        result = run_cli(args + ['--outdir', str(tmp_path / 'out')])
        assert result.exit_code == 1
        assert result.output == (f'Error: {name}: its samples are Stable Diffusion VAE latents, and decoding them '
                                 f'needs the diffusers package, which is not installed: {INSTALL}\n')
    assert not os.path.exists(tmp_path / 'out')
    # Pixel-space networks need no VAE.
    generate.require_decoder(tiny_pkl)
    generate.require_decoder(config_presets['edm2-img64-s-fid'].net)
    # A network passed as a module: refused once its encoder is known, before the encoder is set up.
    monkeypatch.setattr(StabilityVAEEncoder, 'init', no_loading)
    with pytest.raises(generate.MissingPackageError, match=f'the network: .* {INSTALL}$'):
        generate_images(tiny_net, encoder=StabilityVAEEncoder(), device='cpu', verbose=False)
