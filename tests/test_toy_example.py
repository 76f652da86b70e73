"""toy_example.py: the exact ground truth (density and score), the model, a few training steps, the Heun sampler,
guidance, the figure and the command line. Tiny sizes throughout."""

import os
import pickle
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import edm2_standin
import toy_example as toy
from torch_utils import persistence

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
    # As EDM2, sampling starts from the ground truth diffused to sigma_max, drawn with the seed.
    net = toy.ToyModel(hidden_dim=16).eval()
    steps = toy.sample(net, num_samples=512, seed=3, trajectory=True)
    assert steps.shape == (33, 512, 2)
    start = toy.ground_truth('A').sample(512, sigma=5.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(steps[0], start, rtol=0, atol=0)
    torch.testing.assert_close(steps[-1], toy.sample(net, num_samples=512, seed=3), rtol=0, atol=0)
    # For the untrained model (a Gaussian of std sigma_data = 0.5) the ODE is linear: x(sigma) is x(sigma_max) times
    # sqrt((0.25 + sigma^2) / (0.25 + sigma_max^2)); Heun's 32 steps give one factor for every point, within 1% of it.
    x0 = torch.randn(2000, 2) * 5
    ratio = toy.sample(net, x_init=x0) / x0
    assert ratio.std().item() < 1e-5 * ratio.mean().item()
    assert abs(ratio.mean().item() / np.sqrt((0.25 + 0.002 ** 2) / (0.25 + 25)) - 1) < 0.01
    # w = 1 never evaluates the guide; a guide equal to the net changes nothing (lerp(s, s, w) = s).
    class Boom(torch.nn.Module):
        def score(self, *args, **kwargs):
            raise AssertionError('guide evaluated at w = 1')
    torch.testing.assert_close(toy.sample(net, Boom(), 1.0, num_samples=64), toy.sample(net, num_samples=64))
    torch.testing.assert_close(toy.sample(net, net, 3.0, num_samples=64), toy.sample(net, num_samples=64))
    # A model without score() (EDM2's interface may differ) is differentiated through its log-density output.
    class NoScore(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = net
        def forward(self, x, sigma):
            return self.inner(x, sigma)
    torch.testing.assert_close(toy.sample(NoScore(), num_samples=64), toy.sample(net, num_samples=64))

def test_guidance_moves_samples_towards_the_main_model():
    # With a trained main model and an untrained (Gaussian) guide, w > 1 extrapolates away from the guide: the
    # guided samples end nearer the branches (higher true density) than the unguided ones.
    main = toy.train(hidden_dim=32, iterations=60, batch_size=256, verbose=False)
    guide = toy.ToyModel(hidden_dim=8).eval()
    gt = toy.ground_truth('A')
    plain = gt.logp_score(toy.sample(main, num_samples=512, num_steps=12), 0.0, need_score=False)[0].mean()
    guided = gt.logp_score(toy.sample(main, guide, 2.0, num_samples=512, num_steps=12), 0.0, need_score=False)[0].mean()
    assert guided > plain + 0.5, (plain.item(), guided.item())

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

@pytest.fixture
def tiny_pkl(tmp_path):
    """A two-iteration snapshot written by `toy_example.py train`."""
    result = CliRunner().invoke(toy.cmdline, ['train', f'--outdir={tmp_path / "run"}', '--iterations=2', '--batch=32',
                                              '--dim=8', '--viz=false'])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path / 'run')) == ['iter0002.pkl']
    return str(tmp_path / 'run' / 'iter0002.pkl')

def test_train_defaults_are_edm2s():
    options = {p.name: p.default for p in toy.cmdline.commands['train'].params}
    assert options['batch'] == 4096 and options['iterations'] == 4096 and options['dim'] == 64
    assert options['layers'] == 4 and options['cls'] == 'A'
    plot = {p.name: p.default for p in toy.cmdline.commands['plot'].params}
    assert plot['guidance'] == 3 and plot['save'] is None
    assert plot['net'].endswith('/clsA-layers04-dim64/iter4096.pkl') and plot['gnet'].endswith('/clsA-layers04-dim32/iter0512.pkl')

def test_figure_panels(monkeypatch):
    """Two rows of four panels on EDM2's 48 x 25 inches: samples of the truth, without guidance, with classifier-free
    guidance and with autoguidance; trajectories without and with autoguidance; two arrow fields."""
    import matplotlib.collections
    import matplotlib.pyplot as plt
    import matplotlib.quiver
    monkeypatch.setattr(toy, 'DENSITY_RES', 24)
    torch.manual_seed(0)
    net, gnet, uncond = (toy.ToyModel(hidden_dim=8).eval() for _ in range(3))
    for model, gain in [(net, 0.5), (gnet, 0.2), (uncond, 0.3)]:
        model.gain.data.fill_(gain)
    fig = toy.figure(net, gnet, uncond, guidance=2.5, cfg_guidance=1.5, num_samples=96)
    try:
        assert tuple(fig.get_size_inches()) == (48, 25)
        axes = fig.axes
        assert len(axes) == 8
        titles = [ax.get_title() for ax in axes]
        assert titles[:4] == ['Ground truth', 'No guidance', 'Classifier-free guidance, w = 1.5', 'Autoguidance, w = 2.5']
        assert titles[4:6] == ['Trajectories, no guidance', 'Trajectories, autoguidance']
        for ax in axes:  # the true density behind every panel, with the class outlined
            assert len(ax.get_images()) == 1 and len(ax.collections) >= 1
        for ax in axes[:4]:  # every sample of each top panel
            dots = [c for c in ax.collections if isinstance(c, matplotlib.collections.PathCollection)]
            assert sum(len(c.get_offsets()) for c in dots) == 96
        for ax in axes[4:6]:  # a path per sample ending in the magnified view, each with all 33 points
            assert all(len(line.get_xdata()) == 33 for line in ax.get_lines())
        assert sum(len(ax.get_lines()) for ax in axes[4:6]) > 0
        for ax, count in [(axes[6], 2), (axes[7], 1)]:  # truth and main model; autoguidance's added step
            assert sum(isinstance(c, matplotlib.quiver.Quiver) for c in ax.collections) == count
        # Without --uncond the classifier-free panel is a hint.
        fig2 = toy.figure(net, gnet, None, guidance=2.5, num_samples=96)
        assert fig2.axes[2].get_title() == 'Classifier-free guidance: give --uncond'
        plt.close(fig2)
    finally:
        plt.close(fig)

def test_cli_plot_png_and_pdf(tiny_pkl, tmp_path, monkeypatch):
    monkeypatch.setattr(toy, 'DENSITY_RES', 24)
    runner = CliRunner()
    for name in ('toy.png', 'toy.PDF'):
        out = tmp_path / name
        result = runner.invoke(toy.cmdline, ['plot', f'--net={tiny_pkl}', f'--gnet={tiny_pkl}', f'--uncond={tiny_pkl}',
                                             f'--save={out}', '--samples=32'])
        assert result.exit_code == 0, result.output
        assert f'Saved {out}' in result.output
    assert PIL.Image.open(tmp_path / 'toy.png').size == (48 * 80, 25 * 80)  # EDM2's figure, saved at 80 dpi
    assert (tmp_path / 'toy.PDF').read_bytes()[:5] == b'%PDF-'

def test_toy_pickle_loads_without_toy_example(tiny_pkl, tmp_path):
    """The snapshot carries the model's code: it loads in EDM2's environment (tests/edm2_standin.py: numpy, torch,
    dnnlib and torch_utils.persistence only), where neither toy_example nor our networks package exists."""
    net = toy.load_toy(tiny_pkl)
    assert persistence.is_persistent(net) and all(persistence.is_persistent(layer) for layer in net.layers)
    x, sigma = torch.randn(16, 2), torch.rand(16) + 0.05
    torch.save(dict(x=x, sigma=sigma, score=net.score(x, sigma), logp=net(x, sigma)), tmp_path / 'expected.pt')
    env = tmp_path / 'edm2env'
    edm2_standin.write_tree(env, edm2_standin.CORE)
    out = edm2_standin.run_isolated(env, """
import pickle
import torch
for name in ('toy_example', 'networks', 'training'):
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(f'{name} is importable in the EDM2 stand-in')
exp = torch.load(sys.argv[1])
with open(sys.argv[2], 'rb') as f:
    net = pickle.load(f)
assert type(net).__module__.startswith('_imported_module_'), type(net).__module__
assert torch.equal(net(exp['x'], exp['sigma']), exp['logp'])
assert torch.equal(net.score(exp['x'], exp['sigma']), exp['score'])
print('loaded', type(net).__name__, type(net.layers[0]).__name__)
""", tmp_path / 'expected.pt', tiny_pkl)
    assert 'loaded ToyModel MPLinear' in out

def test_pickles_naming_mplinear_by_script(tmp_path, monkeypatch):
    """EDM2's toy pickles refer to MPLinear as a plain class of the script that trained them (__main__ or
    toy_example): load_toy resolves both to our MPLinear, in any process."""
    class Plain(torch.nn.Module):
        pass
    Plain.__name__ = Plain.__qualname__ = 'MPLinear'
    net = toy.ToyModel(hidden_dim=8).eval()
    net.gain.data.fill_(0.7)
    x, sigma = torch.randn(8, 2), torch.rand(8) + 0.1
    expected = net.score(x, sigma)
    for module in ('__main__', 'toy_example'):
        Plain.__module__ = module
        written = pickle.loads(pickle.dumps(net))
        for layer in written.layers:
            layer.__class__ = Plain
        path = tmp_path / f'{module}.pkl'
        with monkeypatch.context() as m:  # the class exists only while the pickle is written
            m.setattr(sys.modules[module], 'MPLinear', Plain, raising=False)
            path.write_bytes(pickle.dumps(written))
        if module == '__main__':
            with pytest.raises(AttributeError):
                pickle.loads(path.read_bytes())  # a plain unpickler finds no __main__.MPLinear here
        loaded = toy.load_toy(str(path))
        assert type(loaded.layers[0]) is toy.MPLinear
        torch.testing.assert_close(loaded.score(x, sigma), expected, rtol=0, atol=0)

def pickle_needing_matplotlib(path):
    """A toy pickle whose code imports matplotlib when it runs, as EDM2's published ones do. The source differs per
    path: a source that ran once is not run again in the same process."""
    net = toy.ToyModel(hidden_dim=8).eval()
    _fn, (meta,), *_ = net.__reduce__()
    meta = dict(meta, module_src=f'import matplotlib.pyplot  # {path.name}\n' + meta['module_src'])
    class Carrier:
        def __reduce__(self):
            return persistence._reconstruct_persistent_obj, (meta,)
    path.write_bytes(pickle.dumps(Carrier()))
    return str(path)

def test_pickle_code_needing_matplotlib(tmp_path, monkeypatch):
    assert type(toy.load_toy(pickle_needing_matplotlib(tmp_path / 'a.pkl'))).__name__ == 'ToyModel'  # installed: loads
    path = pickle_needing_matplotlib(tmp_path / 'b.pkl')
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    monkeypatch.setitem(sys.modules, 'matplotlib.pyplot', None)
    with pytest.raises(Exception) as info:
        toy._load_or_fail('--net', path)
    message = info.value.format_message()
    assert message == (f"--net={path}: the code in this pickle needs the Python package matplotlib: "
                       "pip install -e '.[toy]' (bash setup.sh installs it)")
    # plot itself needs matplotlib: one line before anything is loaded
    result = CliRunner().invoke(toy.cmdline, ['plot', f'--net={path}', f'--gnet={path}', '--save=x.png'])
    assert result.exit_code == 1 and 'Traceback' not in result.output
    assert "Error: toy_example.py plot needs matplotlib: pip install -e '.[toy]'" in result.output

def test_plot_help_says_pickles_run_code():
    text = ' '.join(CliRunner().invoke(toy.cmdline, ['plot', '--help']).output.split())
    for option in ('--net', '--gnet', '--uncond'):
        line = text[text.index(option + ' '):]
        assert 'loading it runs the code it carries' in line[:300], option
    assert 'no weights-only format' in text and '.png or .pdf' in text

@pytest.mark.parametrize('args, message', [
    (['plot', '--net=missing.pkl', '--gnet=missing.pkl', '--save=x.png'], 'Error: --net=missing.pkl: cannot load a toy model'),
    (['plot', '--save=out.jpg'], 'Error: --save=out.jpg: give a .png or .pdf file name'),
    (['plot', '--net=missing.pkl'], 'Error: no display to show a window on'),
    (['train', '--cls=C'], "Invalid value for '--cls'"),
])
def test_cli_errors(tmp_path, args, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import matplotlib.pyplot as plt
    monkeypatch.setattr(plt, 'get_backend', lambda: 'agg')  # no display here, whatever the machine has
    result = CliRunner().invoke(toy.cmdline, args)
    assert result.exit_code != 0 and message in result.output and 'Traceback' not in result.output
    result = CliRunner().invoke(toy.cmdline, ['train', '--iterations=1'], env={'WORLD_SIZE': '2'})
    assert result.exit_code == 1 and 'Error: Distributed execution is not supported.' in result.output
