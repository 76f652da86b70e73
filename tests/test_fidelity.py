"""Sampling fidelity: a snapshot written by our training tool, sampled at the same seeds by

  * generate_images' default path,
  * generate_images --edm2-exact (EDM2's op sequence: the reference path), and
  * EDM2's own sampling in EDM2's environment (tests/edm2_standin.py), which runs the source embedded in the pickle
    with autograd left on, as EDM2's generate_images does (so another of that source's paths),

gives the same images up to float rounding: latents within 1e-5 (a float32 rounding difference after 15 network
evaluations is ~1e-6; the float16 gain rounding that the training path once dropped gave ~1e-4), uint8 images
differing in at most one value. 4 seeds, 8 Heun steps, a 16x16 G* network of the demo preset trained for 1Ki images.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import generate_images as tool
import edm2_standin
from conftest import ROOT, write_dataset

SEEDS = [0, 1, 2, 3]
STEPS = 8
LATENT_TOL = 1e-5

pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py

class Latents:
    """Encoder stand-in: decode() returns the sampler's float output."""
    def decode(self, x):
        return x

def to_uint8(x):
    """StandardRGBEncoder.decode's mapping of [-1, 1] to uint8 (EDM2 §6.3)."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)

@pytest.fixture(scope='module')
def snapshots(tmp_path_factory):
    """(main, guide): the 0.100 and 0.050 EMA snapshots of a 1Ki-image demo-preset run (G*, 16x16, 10 classes) on
    random images, without warm-up so that the gains move away from their initial zeros."""
    root = tmp_path_factory.mktemp('fidelity')
    rng = np.random.RandomState(0)
    data = write_dataset(root / 'data.zip', rng.randint(0, 256, [64, 16, 16, 3]).astype(np.uint8),
                         labels=[int(c) for c in rng.randint(0, 10, 64)])
    run = root / 'run'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'train_edm2plus.py'), '--preset=demo', f'--data={data}',
                           f'--outdir={run}', '--duration=1Ki', '--snapshot=1Ki', '--checkpoint=0', '--status=0',
                           '--rampup=0'], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return run / 'network-snapshot-0000001-0.100.pkl', run / 'network-snapshot-0000001-0.050.pkl'

def sample(net, gnet=None, guidance=1, **kwargs):
    """(latents, noise, labels) of generate_images at SEEDS, one batch."""
    (r,) = list(tool.generate_images(net, gnet=gnet, guidance=guidance, encoder=Latents(), seeds=SEEDS, num_steps=STEPS,
                                     max_batch_size=len(SEEDS), verbose=False, device='cpu', **kwargs))
    return r.images, r.noise, r.labels

def assert_same_images(a, b, what):
    diff = (a.double() - b.double()).abs().max().item()
    levels = (to_uint8(a) != to_uint8(b)).sum().item()
    assert diff <= LATENT_TOL and levels <= 1, f'{what}: latents differ by {diff:.3g}, {levels} uint8 values differ'

@pytest.mark.parametrize('guided', [False, True])
def test_default_path_matches_edm2_exact(snapshots, guided):
    net, guide = snapshots
    kwargs = dict(gnet=guide, guidance=2.0) if guided else {}
    fast, noise, labels = sample(net, **kwargs)
    exact, noise2, labels2 = sample(net, edm2_exact=True, **kwargs)
    assert torch.equal(noise, noise2) and torch.equal(labels, labels2)
    assert fast.std().item() > 0.1 and not torch.equal(fast, noise * 80)  # the network really acted
    assert_same_images(fast, exact, 'default path against --edm2-exact')

# EDM2's Heun sampler as EDM2 §4.2 describes it, run as EDM2's generate_images runs it: the networks straight from
# the pickle (stored dtype, the embedded source), autograd on.
SAMPLE_IN_EDM2 = '''
import pickle
import torch
for name in ('networks', 'training', 'sampling'):  # our packages must be out of reach
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(f'{name} is importable in the EDM2 stand-in')

def ema_of(path):
    with open(path, 'rb') as f:
        return pickle.load(f)['ema']

given = torch.load(sys.argv[1])
net = ema_of(sys.argv[2])
gnet = ema_of(sys.argv[3]) if sys.argv[3] != '-' else net
w, num_steps = float(sys.argv[4]), int(sys.argv[5])
assert type(net).__module__.startswith('_imported_module_') and torch.is_grad_enabled()

def denoise(x, sigma):
    main = net(x, sigma, given['labels']).to(torch.float32)
    return main if w == 1 else gnet(x, sigma, given['labels']).to(torch.float32).lerp(main, w)

rho = 7
ramp = torch.arange(num_steps, dtype=torch.float32) / (num_steps - 1)
levels = (80 ** (1 / rho) + ramp * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
levels = torch.cat([levels, levels.new_zeros(1)])
x = given['noise'].to(torch.float32) * levels[0]
for s, s_next in zip(levels[:-1], levels[1:]):
    slope = (x - denoise(x, s)) / s
    euler = x + (s_next - s) * slope
    if s_next > 0:
        slope = (slope + (euler - denoise(euler, s_next)) / s_next) / 2
        euler = x + (s_next - s) * slope
    x = euler
torch.save(x.detach(), sys.argv[6])
print('sampled', type(net).__name__)
'''

@pytest.mark.parametrize('guided', [False, True])
def test_edm2_sampling_of_our_snapshot_matches(snapshots, guided, tmp_path):
    net, guide = snapshots
    w = 2.0 if guided else 1.0
    exact, noise, labels = sample(net, gnet=guide if guided else None, guidance=w, edm2_exact=True)
    torch.save(dict(noise=noise, labels=labels), tmp_path / 'inputs.pt')
    env = tmp_path / 'edm2env'
    edm2_standin.write_tree(env, edm2_standin.CORE)
    out = edm2_standin.run_isolated(env, 'import sys\n' + SAMPLE_IN_EDM2, tmp_path / 'inputs.pt', net,
                                    guide if guided else '-', w, STEPS, tmp_path / 'edm2.pt')
    assert 'sampled Precond' in out
    edm2 = torch.load(tmp_path / 'edm2.pt')
    assert_same_images(edm2, exact, "EDM2's sampling (autograd on) against --edm2-exact")
