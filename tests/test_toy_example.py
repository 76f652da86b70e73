"""toy_example.py: the exact ground truth (density and score), the model, a few training steps, the Heun sampler,
guidance, the figure and the command line. Tiny sizes throughout."""

import os
import pickle

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import toy_example as toy

pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py

def gaussian_logpdf(x, mean, cov):
    d = x - mean
    return -0.5 * d @ np.linalg.solve(cov, d) - 0.5 * np.log(np.linalg.det(cov)) - np.log(2 * np.pi)

def test_ground_truth_trees():
    parts = toy.tree_components()
    for name in 'AB':
        weights, means, covs = parts[name]
        assert len(weights) == 8 * (2 ** 7 - 1)   # 127 branches of depths 0-6, 8 components each
        assert np.all(weights > 0) and np.all(np.linalg.eigvalsh(covs) > 0)
    # A grows towards pi/4 (up and right of the origin), B towards 5pi/4, both from the same origin.
    assert np.all(np.average(parts['A'][1], axis=0, weights=parts['A'][0]) > 0.1)
    assert np.all(np.average(parts['B'][1], axis=0, weights=parts['B'][0]) < -0.1)
    np.testing.assert_allclose(parts['A'][1][0], np.array([0.0030, 0.0325]) * [1.3136, 1.3844] +
                               0.07 * (parts['A'][1][7] - parts['A'][1][0]) / 0.86, atol=1e-12)
    # Deterministic: the same seed gives the same trees.
    np.testing.assert_array_equal(toy.tree_components()['A'][1], parts['A'][1])

def test_mixture_density_and_score_are_exact():
    gt = toy.ground_truth('AB')
    x = torch.tensor([[0.3, 0.4], [-0.5, -0.2], [1.0, -1.0]])
    sigma = torch.tensor([0.01, 0.3, 2.0])
    logp, score = gt.logp_score(x, sigma)
    w, mu, lam, vec = (t.double().numpy() for t in (gt.weights, gt.means, gt.lam, gt.vec))
    for i in range(3):
        covs = np.einsum('kij,kj,klj->kil', vec, lam + sigma[i].item() ** 2, vec)  # heat diffusion: + sigma^2 I
        comps = np.array([np.log(wk) + gaussian_logpdf(x[i].double().numpy(), m, c) for wk, m, c in zip(w, mu, covs)])
        expected = np.log(np.exp(comps - comps.max()).sum()) + comps.max()
        assert abs(logp[i].item() - expected) < 1e-4 * max(1, abs(expected))
    xg = x.clone().requires_grad_(True)
    grad = torch.autograd.grad(gt.logp_score(xg, sigma)[0].sum(), xg)[0]
    torch.testing.assert_close(score, grad, rtol=1e-4, atol=1e-4)

def test_samples_follow_the_mixture():
    gt = toy.ground_truth('A')
    x = gt.sample(200000, generator=torch.Generator().manual_seed(0))
    mean = (gt.weights[:, None] * gt.means).sum(0)
    torch.testing.assert_close(x.mean(0), mean, atol=4e-3, rtol=0)

def test_untrained_model_is_the_data_gaussian():
    # gain = 0 at initialisation: log p = -|x|^2 / (2 (sigma_data^2 + sigma^2)), so the score is -x / (0.25 + sigma^2).
    net = toy.ToyModel(hidden_dim=16).eval()
    x = torch.randn(8, 2)
    sigma = torch.rand(8) + 0.1
    torch.testing.assert_close(net.score(x, sigma), -x / (0.25 + sigma[:, None] ** 2))

def test_heun_sampler_and_guidance():
    # The sampler maps N(0, sigma_max^2) to N(0, sigma_data^2 + sigma_min^2) for the Gaussian model: std 0.5.
    net = toy.ToyModel(hidden_dim=16).eval()
    x = toy.sample(net, num_samples=20000, seed=0)
    assert abs(x.std().item() - 0.5) < 0.01
    # w = 1 never evaluates the guide; a guide equal to the net changes nothing (lerp(s, s, w) = s).
    class Boom(torch.nn.Module):
        def score(self, *args, **kwargs):
            raise AssertionError('guide evaluated at w = 1')
    torch.testing.assert_close(toy.sample(net, Boom(), 1.0, num_samples=64), toy.sample(net, num_samples=64))
    torch.testing.assert_close(toy.sample(net, net, 3.0, num_samples=64), toy.sample(net, num_samples=64))

def test_training_learns_and_snapshots(tmp_path):
    gt = toy.ground_truth('A')
    gen = torch.Generator().manual_seed(5)
    sigma = (torch.randn(512, generator=gen) * 1.5 - 2.3).exp()
    x = gt.sample(512, generator=gen) + torch.randn(512, 2, generator=gen) * sigma[:, None]
    target = gt.logp_score(x, sigma)[1]
    def error(net):
        return (sigma[:, None] ** 2 * (net.score(x, sigma) - target) ** 2).mean().item()
    before = error(toy.ToyModel(hidden_dim=32).eval())
    ema = toy.train(outdir=str(tmp_path), hidden_dim=32, iterations=40, batch_size=256, snapshot_every=16, verbose=False)
    assert error(ema) < 0.8 * before
    assert sorted(os.listdir(tmp_path)) == ['iter0016.pkl', 'iter0032.pkl', 'iter0040.pkl']
    with open(tmp_path / 'iter0040.pkl', 'rb') as f:
        loaded = pickle.load(f)
    assert type(loaded).__name__ == 'ToyModel' and loaded.gain.item() == ema.gain.item() != 0
    torch.testing.assert_close(loaded.score(x[:16], sigma[:16]), ema.score(x[:16], sigma[:16]))

def test_cli_train_and_plot(tmp_path):
    runner = CliRunner()
    result = runner.invoke(toy.cmdline, ['train', f'--outdir={tmp_path / "run"}', '--iterations=2', '--batch=32',
                                         '--dim=8', '--viz=false'])
    assert result.exit_code == 0, result.output
    pkl = str(tmp_path / 'run' / 'iter0002.pkl')
    png = tmp_path / 'toy.png'
    result = runner.invoke(toy.cmdline, ['plot', f'--net={pkl}', f'--gnet={pkl}', f'--uncond={pkl}',
                                         f'--save={png}', '--samples=64'])
    assert result.exit_code == 0, result.output
    img = np.array(PIL.Image.open(png))
    assert img.shape == (28 + 2 * toy.PANEL + 3 * 6, 4 * toy.PANEL + 5 * 6, 3)
    # Every column holds points of its own colour in the full view (top row).
    for col, (_title, color) in enumerate(toy.COLUMNS):
        left = 6 + col * (toy.PANEL + 6)
        panel = img[34:34 + toy.PANEL, left:left + toy.PANEL]
        assert np.all(panel == color, axis=-1).sum() > 0, col

@pytest.mark.parametrize('args, message', [
    (['plot', '--net=missing.pkl', '--gnet=missing.pkl'], 'Error: --net=missing.pkl: cannot load a toy model'),
    (['plot', '--save=out.jpg'], 'Error: --save=out.jpg: give a .png file name'),
    (['train', '--cls=C'], "Invalid value for '--cls'"),
])
def test_cli_errors(tmp_path, args, message):
    result = CliRunner().invoke(toy.cmdline, args)
    assert result.exit_code != 0 and message in result.output and 'Traceback' not in result.output
    result = CliRunner().invoke(toy.cmdline, ['train', '--iterations=1'], env={'WORLD_SIZE': '2'})
    assert result.exit_code == 1 and 'Error: Distributed execution is not supported.' in result.output
