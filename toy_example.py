"""Autoguidance in two dimensions: the toy experiment of "Guiding a Diffusion Model with a Bad Version of Itself"
(Karras et al. 2024, Fig. 1), small enough for a CPU.

The data is a known 2-D Gaussian mixture shaped like two trees (classes A and B), so the exact score of every noise
level is available for training (denoising score matching against the true score) and as a reference in the plot.
A small magnitude-preserving MLP (networks/toy.py) learns the log-density; its score comes from autograd.

EDM2's defaults throughout: batch 4096 and 4096 iterations for training, Heun sampling from the ground truth diffused
to sigma_max, guidance weight 3. The exact score of the ~1000-component mixture dominates training, in proportion to
--batch x --iterations: a default run takes most of an hour on 2 CPU cores; --batch=1024 roughly halves that and
still shows the effect.

  # The main model (class A), a weaker guide (smaller, less trained) and an unconditional model (classes A and B)
  python toy_example.py train --outdir=toy-runs/main --cls=A --dim=64
  python toy_example.py train --outdir=toy-runs/guide --cls=A --dim=32 --iterations=512
  python toy_example.py train --outdir=toy-runs/uncond --cls=AB --dim=64
  # Ground truth, samples, trajectories and score fields without guidance, with classifier-free guidance and with
  # autoguidance (--save: .png or .pdf; without it, a window)
  python toy_example.py plot --net=toy-runs/main/iter4096.pkl --gnet=toy-runs/guide/iter0512.pkl \\
      --uncond=toy-runs/uncond/iter4096.pkl --save=toy-example.png
"""

import copy
import os
import pickle

import click
import numpy as np
import torch
from tqdm import tqdm

import dnnlib
from networks import toy as toy_model
from networks.toy import MPLinear, ToyModel  # noqa: F401 (MPLinear: the name EDM2's toy pickles look up here)
from torch_utils import cli
from training.phema import power_function_beta

EDM2_TOY_ROOT = 'https://nvlabs-fi-cdn.nvidia.com/edm2/toy-example'
INSTALL_MATPLOTLIB = "pip install -e '.[toy]' (bash setup.sh installs it)"

#----------------------------------------------------------------------------
# Ground truth: a mixture of elongated Gaussians along the branches of a random binary tree per class. Diffusing it
# to noise level sigma adds sigma^2 to every covariance (EDM, Karras et al. 2022, eq. 2), so density and score stay
# exact at every sigma.

class GaussianMixture:
    def __init__(self, weights, means, covs, device='cpu'):
        lam, vec = np.linalg.eigh(covs)                     # covs = vec diag(lam) vec^T, per component
        as_tensor = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32), device=device)
        self.weights = as_tensor(weights / weights.sum())   # [K]
        self.means = as_tensor(means)                       # [K, 2]
        self.lam = as_tensor(lam)                           # [K, 2] eigenvalues
        self.vec = as_tensor(vec)                           # [K, 2, 2] eigenvectors (columns)
        # Projection onto every component's eigenbasis as one matrix product: z = x @ proj - offset, [N, 2K].
        self.proj = self.vec.permute(1, 0, 2).reshape(2, -1)
        self.offset = torch.einsum('ki,kij->kj', self.means, self.vec).reshape(-1)

    def sample(self, n, sigma=0.0, generator=None):
        """n points of the mixture diffused to noise level sigma (i.e. plus sigma * N(0, I))."""
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn([n, 2], generator=generator, device=self.means.device)
        x = self.means[idx] + torch.einsum('nij,nj->ni', self.vec[idx], eps * self.lam[idx].sqrt())
        if sigma != 0:
            x = x + sigma * torch.randn([n, 2], generator=generator, device=self.means.device)
        return x

    def logp_score(self, x, sigma, need_score=True):
        """log p(x; sigma) [N] and its gradient [N, 2] (None unless `need_score`), for points x [N, 2] and noise
        levels sigma [N] or a scalar."""
        n, k = x.shape[0], self.weights.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1)
        z = x @ self.proj - self.offset                     # coordinates in each eigenbasis [N, 2K]
        var = self.lam.reshape(1, -1) + sigma ** 2          # variances along them at this noise level
        q = z / var
        quad = (z * q).view(n, k, 2).sum(-1)                # Mahalanobis distances [N, K]
        logdet = var.view(-1, k, 2).prod(-1).log()
        log_comp = self.weights.log() - 0.5 * (quad + logdet) - np.log(2 * np.pi)
        logp = log_comp.logsumexp(dim=1)
        if not need_score:
            return logp, None
        resp = (log_comp - logp.unsqueeze(1)).exp()         # responsibilities [N, K]
        score = -(q.view(n, k, 2) * resp.unsqueeze(-1)).view(n, -1) @ self.proj.t()
        return logp, score

def tree_components(seed=2, origin=(0.0030, 0.0325), scale=(1.3136, 1.3844), depth_limit=7):
    """{'A': (weights, means, covs), 'B': ...}: class A grows from `origin` towards pi/4, class B towards 5pi/4."""
    rnd = np.random.RandomState(seed)
    scale = np.asarray(scale)
    result = {}
    for name, root_angle in [('A', np.pi / 4), ('B', 5 * np.pi / 4)]:
        weights, means, covs = [], [], []

        def grow(pos, angle, depth):
            length = 0.292 * 0.8 ** depth * (1 + 0.2 * rnd.randn())
            direction = np.array([np.cos(angle), np.sin(angle)])
            along = np.outer(direction, direction)
            thickness = 0.2 * 0.8 ** depth / length       # across-branch std relative to the along-branch std
            size = scale * length * 0.06
            cov = (along + (np.eye(2) - along) * thickness ** 2) * np.outer(size, size)
            for frac in np.linspace(0.07, 0.93, 8):
                weights.append(length * 0.5 ** depth)
                means.append((pos + direction * length * frac) * scale)
                covs.append(cov)
            if depth + 1 < depth_limit:  # two children from the tip, turned either way; the + one grown first
                tip = pos + direction * length
                for sign in (1, -1):
                    grow(tip, angle + sign * 0.7 ** depth * (1 + 0.2 * rnd.randn()), depth + 1)

        grow(np.asarray(origin, dtype=np.float64), root_angle, 0)
        result[name] = (np.array(weights), np.array(means), np.array(covs))
    return result

def ground_truth(classes, device='cpu'):
    """The mixture of the classes in `classes` ('A', 'B' or 'AB'), their weights renormalised."""
    parts = tree_components()
    chosen = [parts[c] for c in classes]
    return GaussianMixture(*(np.concatenate(arrays) for arrays in zip(*chosen)), device=device)

#----------------------------------------------------------------------------
# Training: denoising score matching against the exact score, at log-normal noise levels (EDM, Karras et al. 2022),
# with Adam, a 1/sqrt learning-rate decay and a power-function EMA (EDM2 paper eqs. 1 and 2 in §3.1).

def train(outdir=None, classes='A', num_layers=4, hidden_dim=64, iterations=4096, batch_size=4096, seed=0,
          snapshot_every=256, P_mean=-2.3, P_std=1.5, lr_ref=0.01, decay_iter=512, ema_std=0.010, verbose=True,
          device='cpu'):
    """Train a ToyModel on `classes`; returns its EMA. Writes <outdir>/iterNNNN.pkl (the EMA model) every
    `snapshot_every` iterations and at the end."""
    torch.manual_seed(seed)
    gen = torch.Generator(device).manual_seed(seed)
    gt = ground_truth(classes, device=device)
    net = ToyModel(num_layers=num_layers, hidden_dim=hidden_dim).to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), betas=(0.9, 0.99))
    if outdir is not None:
        os.makedirs(outdir, exist_ok=True)
    bar = tqdm(range(iterations), desc=f'train cls {classes} dim {hidden_dim}', disable=not verbose, unit='it')
    for it in bar:
        sigma = (torch.randn([batch_size], generator=gen, device=device) * P_std + P_mean).exp()
        x = gt.sample(batch_size, generator=gen) + torch.randn([batch_size, 2], generator=gen, device=device) * sigma[:, None]
        _, score_gt = gt.logp_score(x, sigma)
        x.requires_grad_(True)
        score = net.score(x, sigma, graph=True)
        loss = (sigma[:, None] ** 2 * (score - score_gt) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:
            g['lr'] = lr_ref / np.sqrt(max(it / decay_iter, 1))
        opt.step()
        beta = power_function_beta(std=ema_std, t_next=it + 1, t_delta=1)
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.lerp_(p.detach(), 1 - beta)
        if it % 32 == 0:
            bar.set_postfix(loss=f'{loss.item():.4f}')
        done = it + 1
        if outdir is not None and (done % snapshot_every == 0 or done == iterations):
            path = os.path.join(outdir, f'iter{done:04d}.pkl')
            with dnnlib.util.atomic_write(path, 'wb') as f:
                pickle.dump(copy.deepcopy(ema).cpu(), f)
    return ema

#----------------------------------------------------------------------------
# Sampling: EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 1) on D(x) = x + sigma^2 * score; guidance
# mixes two scores as D_guide + w (D_main - D_guide) does (Karras et al. 2024, eq. 2). As in EDM2, sampling starts
# from the ground truth diffused to sigma_max rather than from N(0, sigma_max^2): at sigma_max = 5 the two differ
# little, and this way the only error in the samples is the models'.

def score_of(net, x, sigma):
    """The score of a toy model: its own score() where it has one, else the gradient of its log-density output."""
    if hasattr(net, 'score'):
        return net.score(x, sigma)
    return ToyModel.score(net, x, sigma)  # that gradient, as ToyModel takes it: it needs only the model's forward()

def guided_score(net, gnet, guidance, x, sigma):
    """lerp(score_guide, score_main, w); the guide is not evaluated when w = 1 (or there is none)."""
    score = score_of(net, x, sigma)
    if gnet is not None and guidance != 1:
        score = torch.lerp(score_of(gnet, x, sigma), score, guidance)
    return score

def noise_levels(num_steps=32, sigma_min=0.002, sigma_max=5.0, rho=7.0):
    """EDM's rho-spaced levels sigma_0 > ... > sigma_{N-1}, then 0 (EDM eq. 5), as Python floats."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)]).tolist()

def sample(net, gnet=None, guidance=1.0, num_samples=4096, seed=1, num_steps=32, sigma_min=0.002, sigma_max=5.0,
           rho=7.0, classes='A', x_init=None, trajectory=False, device='cpu'):
    """Samples [N, 2]; with `trajectory`, every step's points instead, [num_steps + 1, N, 2] (the last = samples).
    The start is x_init, or the ground truth of `classes` diffused to sigma_max, drawn with `seed`."""
    t = noise_levels(num_steps, sigma_min, sigma_max, rho)
    if x_init is None:
        gen = torch.Generator(device).manual_seed(seed)
        x_init = ground_truth(classes, device=device).sample(num_samples, sigma=t[0], generator=gen)

    def slope(x, sigma):  # dx/dsigma = -sigma * score
        return -sigma * guided_score(net, gnet, guidance, x, torch.full([x.shape[0]], sigma, device=device))

    x = x_init
    steps = [x]
    for i in range(num_steps):
        d = slope(x, t[i])
        x_next = x + (t[i + 1] - t[i]) * d
        if i < num_steps - 1:
            x_next = x + (t[i + 1] - t[i]) * (d + slope(x_next, t[i + 1])) / 2
        x = x_next.detach()
        steps.append(x)
    return torch.stack(steps) if trajectory else x

#----------------------------------------------------------------------------
# The figure (matplotlib, imported only here): two rows of four panels on 48 x 25 inches, as EDM2's. Every panel has
# the true density behind it (class A shaded, class B grey, class A outlined). Top row, the whole tree of class A:
# samples of the ground truth, without guidance, with classifier-free guidance (with an unconditional model) and
# with autoguidance. Bottom row, magnified around a branch tip: sampling trajectories without guidance and with
# autoguidance, the denoiser's step D(x) - x of the ground truth and of the main model at one noise level, and the
# step that autoguidance adds, (w - 1) (D_main - D_guide), at the same level.

COLORS = dict(gt='#303030', none='#c02828', cfg='#2858c8', auto='#14873c')
ARROW_SIGMA_FRACTION = 0.15   # noise level of the arrow panels, relative to the magnified view's half-width

def require_matplotlib():
    """matplotlib.pyplot, or a CliError with the install command."""
    try:
        import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise cli.CliError(f'toy_example.py plot needs matplotlib: {INSTALL_MATPLOTLIB}') from None
    return plt

def views(gt):
    """(full, zoom) boxes ((x0, x1), (y0, y1)): the mixture's extent with a margin, and a square a quarter of its size
    around the component farthest from the mixture's centre (a branch tip)."""
    lo, hi = gt.means.min(0).values, gt.means.max(0).values
    centre, half = (lo + hi) / 2, (hi - lo).max().item() / 2 * 1.25
    full = ((centre[0].item() - half, centre[0].item() + half), (centre[1].item() - half, centre[1].item() + half))
    tip = gt.means[(gt.means - gt.means.mean(0)).norm(dim=1).argmax()]
    zhalf = half / 4
    zoom = ((tip[0].item() - zhalf, tip[0].item() + zhalf), (tip[1].item() - zhalf, tip[1].item() + zhalf))
    return full, zoom

def _grid(box, res):
    (x0, x1), (y0, y1) = box
    xs, ys = torch.linspace(x0, x1, res), torch.linspace(y0, y1, res)
    return torch.stack(torch.meshgrid(xs, ys, indexing='xy'), dim=-1).reshape(-1, 2)  # row-major, y up

DENSITY_RES = 160  # density images: pixels per side (then smoothed by imshow); the figure's main cost

def density_images(box, classes='A', res=None):
    """(shade of `classes`, shade of the other class): the true densities at res x res points of `box`, compressed
    (fourth root of the density relative to its maximum in the box), so that thin branches stay visible."""
    res = res or DENSITY_RES
    points = _grid(box, res)
    gt = ground_truth('AB')  # one pass over all components, then each class's share of them
    in_a = torch.arange(gt.weights.shape[0]) < len(tree_components()['A'][0])
    mine = in_a if classes == 'A' else ~in_a
    log_comp = []
    for chunk in points.split(4096):
        z = chunk @ gt.proj - gt.offset
        quad = (z * z / gt.lam.reshape(1, -1)).view(chunk.shape[0], -1, 2).sum(-1)
        log_comp.append(gt.weights.log() - 0.5 * (quad + gt.lam.prod(-1).log()))
    log_comp = torch.cat(log_comp)
    shades = []
    for part in (mine, ~mine):
        logp = log_comp[:, part].logsumexp(dim=1).reshape(res, res)
        shades.append(((logp - logp.max()).exp() ** 0.25).numpy())
    return shades

def draw_density(ax, box, shades):
    """The density images of density_images(): the class of the plot shaded and outlined, the other grey."""
    mine, other = shades
    res = mine.shape[0]
    rgb = 1 - 0.22 * other[..., None] - 0.55 * mine[..., None] * np.array([0.35, 0.55, 0.85])
    (x0, x1), (y0, y1) = box
    ax.imshow(np.clip(rgb, 0, 1), extent=(x0, x1, y0, y1), origin='lower', interpolation='bilinear')
    xs, ys = np.linspace(x0, x1, res), np.linspace(y0, y1, res)
    ax.contour(xs, ys, mine, levels=[0.35], colors=['#7a5a20'], linewidths=1.5)

def _frame(ax, box, title):
    ax.set_xlim(*box[0])
    ax.set_ylim(*box[1])
    ax.set_aspect('equal')
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)

def draw_samples(ax, points, color, size):
    ax.scatter(points[:, 0].numpy(), points[:, 1].numpy(), s=size, c=color, linewidths=0, alpha=0.6)

def draw_trajectories(ax, steps, box, color, count=48):
    """The paths of (up to) `count` samples that end inside `box`, each ending in a dot."""
    (x0, x1), (y0, y1) = box
    end = steps[-1]
    inside = ((end[:, 0] > x0) & (end[:, 0] < x1) & (end[:, 1] > y0) & (end[:, 1] < y1)).nonzero().flatten()[:count]
    for i in inside.tolist():
        ax.plot(steps[:, i, 0].numpy(), steps[:, i, 1].numpy(), color=color, linewidth=1.5, alpha=0.7)
    ax.scatter(end[inside, 0].numpy(), end[inside, 1].numpy(), s=40, c=color, linewidths=0, zorder=3)

def draw_arrows(ax, points, steps, color, scale):
    """Arrows from each point by its step (D(x) - x), drawn at 1/scale of their length."""
    ax.quiver(points[:, 0].numpy(), points[:, 1].numpy(), steps[:, 0].numpy(), steps[:, 1].numpy(), color=color,
              angles='xy', scale_units='xy', scale=scale, width=0.004)

def figure(net, gnet, uncond=None, guidance=3.0, cfg_guidance=None, num_samples=4096, seed=1, classes='A'):
    """The comparison figure (a matplotlib Figure, not shown). `uncond` (a model of all classes) gives the
    classifier-free panel, with weight cfg_guidance (default: guidance)."""
    plt = require_matplotlib()
    cfg_guidance = guidance if cfg_guidance is None else cfg_guidance
    gt = ground_truth(classes)
    full, zoom = views(gt)
    runs = dict(none=sample(net, num_samples=num_samples, seed=seed, classes=classes, trajectory=True),
                auto=sample(net, gnet, guidance, num_samples=num_samples, seed=seed, classes=classes, trajectory=True))
    if uncond is not None:
        runs['cfg'] = sample(net, uncond, cfg_guidance, num_samples=num_samples, seed=seed, classes=classes,
                             trajectory=True)
    truth = gt.sample(num_samples, generator=torch.Generator().manual_seed(seed))

    # The arrow panels: one noise level, a grid over the magnified view.
    zhalf = (zoom[0][1] - zoom[0][0]) / 2
    sigma = ARROW_SIGMA_FRACTION * zhalf
    points = _grid(zoom, 20)
    s = torch.full([points.shape[0]], sigma)
    gt_step = sigma ** 2 * gt.logp_score(points, s)[1]
    net_score = score_of(net, points, s)
    net_step = sigma ** 2 * net_score
    auto_step = (guidance - 1) * sigma ** 2 * (net_score - score_of(gnet, points, s))
    cell = 2 * zhalf / 20
    step_scale = max(gt_step.norm(dim=1).max().item(), net_step.norm(dim=1).max().item()) / (1.5 * cell) or 1.0
    auto_scale = auto_step.norm(dim=1).max().item() / (1.5 * cell) or 1.0

    with plt.rc_context({'font.size': 28}):
        fig = plt.figure(figsize=[48, 25], dpi=40)
        axes = fig.subplots(2, 4)
        top = [('Ground truth', 'gt', truth),
               ('No guidance', 'none', runs['none'][-1]),
               (f'Classifier-free guidance, w = {cfg_guidance:g}', 'cfg', runs['cfg'][-1] if 'cfg' in runs else None),
               (f'Autoguidance, w = {guidance:g}', 'auto', runs['auto'][-1])]
        shades = {box: density_images(box, classes) for box in (full, zoom)}
        for ax, (title, key, pts) in zip(axes[0], top):
            draw_density(ax, full, shades[full])
            if pts is None:
                title = 'Classifier-free guidance: give --uncond'
            else:
                draw_samples(ax, pts, COLORS[key], size=12)
            _frame(ax, full, title)
        ax = axes[1]
        for a, key, title in [(ax[0], 'none', 'Trajectories, no guidance'),
                              (ax[1], 'auto', 'Trajectories, autoguidance')]:
            draw_density(a, zoom, shades[zoom])
            draw_trajectories(a, runs[key], zoom, COLORS[key])
            _frame(a, zoom, title)
        draw_density(ax[2], zoom, shades[zoom])
        draw_arrows(ax[2], points, gt_step, COLORS['gt'], step_scale)
        draw_arrows(ax[2], points, net_step, COLORS['none'], step_scale)
        _frame(ax[2], zoom, f'Step D(x) - x at σ = {sigma:.2g}: truth, main model')
        draw_density(ax[3], zoom, shades[zoom])
        draw_arrows(ax[3], points, auto_step, COLORS['auto'], auto_scale)
        _frame(ax[3], zoom, 'Autoguidance adds (w - 1)(D - D_guide)')
        fig.tight_layout()
    return fig

#----------------------------------------------------------------------------
# Loading. A toy pickle runs the code it carries (its module's source). Ours carry networks/toy.py; EDM2's published
# ones carry EDM2's toy_example.py, which imports matplotlib, and refer to MPLinear by the name of the script that
# trained them (__main__ or toy_example): both names resolve to our MPLinear, the same layer.

class _ToyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if name == 'MPLinear' and module in ('__main__', 'toy_example'):
            return toy_model.MPLinear
        return super().find_class(module, name)

def load_toy(path):
    """The toy model in a pickle (path or URL), in eval mode. Runs the pickle's code: only for files you trust."""
    with dnnlib.util.open_url(path, verbose=False) as f:
        net = _ToyUnpickler(f).load()
    if not isinstance(net, torch.nn.Module):
        raise TypeError(f'holds a {type(net).__name__}, not a toy model')
    return net.eval().requires_grad_(False)

def _load_or_fail(option, path):
    try:
        return load_toy(path)
    except ModuleNotFoundError as e:
        package = (e.name or 'a package').split('.')[0]
        how = INSTALL_MATPLOTLIB if package == 'matplotlib' else f'pip install {package}'
        raise cli.CliError(f'{option}={path}: the code in this pickle needs the Python package {package}: {how}') from None
    except Exception as e:  # pylint: disable=broad-except
        raise cli.CliError(f'{option}={path}: cannot load a toy model ({type(e).__name__}: {e})') from None

#----------------------------------------------------------------------------

@click.group()
def cmdline():
    """2-D toy example of autoguidance (Karras et al. 2024): train small models of a known distribution and plot
    their samples without guidance, with classifier-free guidance and with autoguidance.

    \b
    python toy_example.py train --outdir=toy-runs/main --cls=A --dim=64
    python toy_example.py train --outdir=toy-runs/guide --cls=A --dim=32 --iterations=512
    python toy_example.py train --outdir=toy-runs/uncond --cls=AB --dim=64
    python toy_example.py plot --net=toy-runs/main/iter4096.pkl --gnet=toy-runs/guide/iter0512.pkl \\
        --uncond=toy-runs/uncond/iter4096.pkl --save=toy-example.png
    """
    cli.refuse_torchrun('toy_example.py')
    torch.set_num_threads(min(torch.get_num_threads(), 4))  # tiny tensors: more threads only add overhead

@cmdline.command('train')
@click.option('--outdir',     help='Where to save the snapshots (none: no snapshots)', metavar='DIR', type=str, default=None)
@click.option('--cls',        help='Classes to train on', metavar='A|B|AB', type=click.Choice(['A', 'B', 'AB']), default='A', show_default=True)
@click.option('--layers',     help='Number of hidden layers', metavar='INT', type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--dim',        help='Width of the hidden layers', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--viz',        help='Show the loss on the progress bar (EDM2 draws a live plot instead; this way training needs no display)', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--iterations', help='Training iterations', metavar='INT', type=click.IntRange(min=1), default=4096, show_default=True)
@click.option('--batch',      help="Batch size (EDM2's; on 2 CPU cores 4096 iterations take most of an hour, --batch=1024 about half)", metavar='INT', type=click.IntRange(min=1), default=4096, show_default=True)
def train_cmd(outdir, cls, layers, dim, viz, iterations, batch):
    """Train a toy model; snapshots of its EMA go to OUTDIR/iterNNNN.pkl every 256 iterations and at the end."""
    if outdir is not None:
        cli.check_output_dir(outdir)
    with cli.os_errors(outdir):
        train(outdir=outdir, classes=cls, num_layers=layers, hidden_dim=dim, iterations=iterations, batch_size=batch,
              verbose=viz)

PICKLE_NOTE = 'a pickle: loading it runs the code it carries, so give only files you trust (toy models have no weights-only format)'

@cmdline.command('plot')
@click.option('--net',      help=f'Main model, {PICKLE_NOTE}', metavar='PKL|URL', type=str, default=f'{EDM2_TOY_ROOT}/clsA-layers04-dim64/iter4096.pkl', show_default=True)
@click.option('--gnet',     help=f'Guiding model for autoguidance, {PICKLE_NOTE}', metavar='PKL|URL', type=str, default=f'{EDM2_TOY_ROOT}/clsA-layers04-dim32/iter0512.pkl', show_default=True)
@click.option('--uncond',   help=f'Unconditional model (trained with --cls=AB) for the classifier-free panel, {PICKLE_NOTE}', metavar='PKL|URL', type=str, default=None)
@click.option('--guidance', help='Autoguidance weight w', metavar='FLOAT', type=cli.FloatRange(), default=3, show_default=True)
@click.option('--cfg-guidance', 'cfg_guidance', help='Classifier-free guidance weight [default: --guidance]', metavar='FLOAT', type=cli.FloatRange(), default=None)
@click.option('--save',     help='Write the figure to this file (.png or .pdf); without it, show a window', metavar='PNG|PDF', type=str, default=None)
@click.option('--samples',  help='Samples per panel', metavar='INT', type=click.IntRange(min=1), default=4096, show_default=True)
def plot_cmd(net, gnet, uncond, guidance, cfg_guidance, save, samples):
    """Plot ground truth, unguided, classifier-free-guided and autoguided samples of class A, with sampling
    trajectories and score fields magnified around a branch tip.

    The network files are pickles, which run code when loaded: only give files you trust.
    """
    plt = require_matplotlib()
    fmt = None if save is None else os.path.splitext(save)[1].lower().lstrip('.')
    if save is not None:
        if fmt not in ('png', 'pdf'):
            raise click.ClickException(f'--save={save}: give a .png or .pdf file name')
        cli.check_output_file(save, overwrite=True)  # a rerun replaces the figure, as in EDM2
    elif plt.get_backend().lower() in ('agg', 'pdf', 'ps', 'svg', 'cairo', 'pgf', 'template'):
        raise click.ClickException(f'no display to show a window on (matplotlib backend {plt.get_backend()}): '
                                   'give --save=FILE.png or --save=FILE.pdf')
    models = {option: _load_or_fail(option, path) for option, path in [('--net', net), ('--gnet', gnet), ('--uncond', uncond)]
              if path is not None}
    fig = figure(models['--net'], models['--gnet'], models.get('--uncond'), guidance=guidance, cfg_guidance=cfg_guidance,
                 num_samples=samples)
    if save is None:
        plt.show()
        return
    try:
        with cli.os_errors(save), dnnlib.util.atomic_write(save, 'wb') as f:
            fig.savefig(f, format=fmt, dpi=80)
    finally:
        plt.close(fig)
    click.echo(f'Saved {save}')

if __name__ == '__main__':
    cli.run(cmdline)
