"""Autoguidance in two dimensions: the toy experiment of "Guiding a Diffusion Model with a Bad Version of Itself"
(Karras et al. 2024, Fig. 1), small enough for a CPU.

The data is a known 2-D Gaussian mixture shaped like two trees (classes A and B), so the exact score of every noise
level is available for training (denoising score matching against the true score) and as a reference in the plot.
A small magnitude-preserving MLP (EDM2 paper §3) learns the log-density; its score comes from autograd.

Cost: the exact score of the ~1000-component mixture dominates training, in proportion to --batch x --iterations.
EDM2 trained with batch 4096 for 4096 iterations; our default batch is 1024, for CPUs. Shorter runs still show the
effect: main and unconditional models of 768 iterations at batch 256 and a guide of 192 iterations give a figure in
which autoguidance visibly concentrates the samples on the branches.

  # The main model (class A), a weaker guide (smaller, less trained) and an unconditional model (classes A and B)
  python toy_example.py train --outdir=toy-runs/main --cls=A --dim=64
  python toy_example.py train --outdir=toy-runs/guide --cls=A --dim=32 --iterations=512
  python toy_example.py train --outdir=toy-runs/uncond --cls=AB --dim=64
  # Ground truth, no guidance, classifier-free guidance and autoguidance side by side
  python toy_example.py plot --net=toy-runs/main/iter4096.pkl --gnet=toy-runs/guide/iter0512.pkl \\
      --uncond=toy-runs/uncond/iter4096.pkl --save=toy-example.png
"""

import copy
import os
import pickle

import click
import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
from tqdm import tqdm

import dnnlib
from torch_utils import cli
from torch_utils import persistence
from training.phema import power_function_beta

EDM2_TOY_ROOT = 'https://nvlabs-fi-cdn.nvidia.com/edm2/toy-example'

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

    def sample(self, n, generator=None):
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn([n, 2], generator=generator, device=self.means.device)
        return self.means[idx] + torch.einsum('nij,nj->ni', self.vec[idx], eps * self.lam[idx].sqrt())

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
# The model: an MLP of magnitude-preserving layers (EDM2 paper §3, eqs. 46-47 for the forced weight normalisation)
# that outputs a log-density whose noise-free part is a Gaussian of the data's variance; the learned part starts at
# zero (gain 0).

def _normalize(x, eps=1e-4):
    return x / (eps + x.norm(dim=1, keepdim=True) / np.sqrt(x.shape[1]))

def _mp_silu(x):
    return torch.nn.functional.silu(x) / 0.596

@persistence.persistent_class
class MPLinear(torch.nn.Module):
    """Bias-free linear layer whose weight rows are kept at unit RMS (forced weight normalisation)."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn([out_features, in_features]))

    def unit_weight(self):
        """The normalised weight over sqrt(fan-in); in training the stored weight is first projected back."""
        if self.training:
            self.weight.data.copy_(_normalize(self.weight.detach()))
        return _normalize(self.weight) / np.sqrt(self.weight.shape[1])

    def forward(self, x):
        return x @ self.unit_weight().t()

@persistence.persistent_class
class ToyModel(torch.nn.Module):
    def __init__(self, in_dim=2, num_layers=4, hidden_dim=64, sigma_data=0.5):
        super().__init__()
        self.sigma_data = sigma_data
        self.layers = torch.nn.ModuleList([MPLinear(in_dim + 2, hidden_dim)])
        self.layers.extend(MPLinear(hidden_dim, hidden_dim) for _ in range(num_layers))
        self.gain = torch.nn.Parameter(torch.zeros([]))

    def forward(self, x, sigma):
        """log p(x; sigma) up to a constant, for x [N, 2] and sigma [N]."""
        sigma = sigma.reshape(-1, 1)
        x_in = x / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        h = torch.cat([x_in, sigma.log() / 4, torch.ones_like(sigma)], dim=1)
        h = self.layers[0](h)
        for layer in self.layers[1:]:
            h = layer(_mp_silu(h))
        return h.square().mean(dim=1) * self.gain / sigma.squeeze(1) - 0.5 * x_in.square().sum(dim=1)

    def score(self, x, sigma, graph=False):
        with torch.enable_grad():
            x = x if graph else x.detach().requires_grad_(True)
            logp = self(x, sigma)
            return torch.autograd.grad(logp.sum(), x, create_graph=graph)[0]

#----------------------------------------------------------------------------
# Training: denoising score matching against the exact score, at log-normal noise levels (EDM, Karras et al. 2022),
# with Adam, a 1/sqrt learning-rate decay and a power-function EMA (EDM2 paper eqs. 1 and 2 in §3.1).

def train(outdir=None, classes='A', num_layers=4, hidden_dim=64, iterations=4096, batch_size=1024, seed=0,
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
# mixes two scores as D_guide + w (D_main - D_guide) does (Karras et al. 2024, eq. 2).

def sample(net, gnet=None, guidance=1.0, num_samples=4096, seed=1, num_steps=32, sigma_min=0.002, sigma_max=5.0,
           rho=7.0, device='cpu'):
    gen = torch.Generator(device).manual_seed(seed)
    x = torch.randn([num_samples, 2], generator=gen, device=device)
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)]).tolist()

    def slope(x, sigma):  # dx/dsigma = -sigma * score
        s = torch.full([x.shape[0]], sigma, device=device)
        score = net.score(x, s)
        if gnet is not None and guidance != 1:
            score = torch.lerp(gnet.score(x, s), score, guidance)
        return -sigma * score

    x = x * t[0]
    for i in range(num_steps):
        d = slope(x, t[i])
        x_next = x + (t[i + 1] - t[i]) * d
        if i < num_steps - 1:
            x_next = x + (t[i + 1] - t[i]) * (d + slope(x_next, t[i + 1])) / 2
        x = x_next
    return x.detach()

#----------------------------------------------------------------------------
# Plot with Pillow: columns ground truth / no guidance / classifier-free guidance / autoguidance; the top row shows
# the whole class, the bottom row a magnified branch tip. The background is the true density of the class.

PANEL = 400
COLUMNS = [('Ground truth', (40, 40, 40)), ('No guidance', (200, 40, 40)),
           ('Classifier-free guidance', (40, 90, 200)), ('Autoguidance', (20, 140, 60))]

def _density_image(gt, box, size):
    # Evaluated at half the panel's resolution and enlarged: the density is smooth, and this is the plot's main cost.
    res = size // 2
    (x0, x1), (y0, y1) = box
    xs = torch.linspace(x0, x1, res)
    ys = torch.linspace(y1, y0, res)  # image rows go down
    grid = torch.stack(torch.meshgrid(ys, xs, indexing='ij')[::-1], dim=-1).reshape(-1, 2)
    logp = torch.cat([gt.logp_score(chunk, 0.0, need_score=False)[0] for chunk in grid.split(4096)]).reshape(res, res)
    shade = (logp - logp.max()).exp() ** 0.25                     # compress the range: thin branches stay visible
    rgb = 255 - (shade[..., None] * torch.tensor([70, 45, 10])).numpy()
    small = PIL.Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    return np.array(small.resize((size, size), PIL.Image.BILINEAR))

def _draw_points(img, points, box, color, radius):
    (x0, x1), (y0, y1) = box
    px = ((points[:, 0] - x0) / (x1 - x0) * (PANEL - 1)).round().long().numpy()
    py = ((y1 - points[:, 1]) / (y1 - y0) * (PANEL - 1)).round().long().numpy()
    for dy in range(-radius + 1, radius):
        for dx in range(-radius + 1, radius):
            xs, ys = px + dx, py + dy
            keep = (xs >= 0) & (xs < PANEL) & (ys >= 0) & (ys < PANEL)
            img[ys[keep], xs[keep]] = color

def plot(net, gnet, uncond=None, guidance=3.0, num_samples=4096, seed=1, classes='A'):
    """The comparison figure as a PIL image. `uncond` (a model of all classes) gives the classifier-free panel."""
    gt = ground_truth(classes)
    panels = [gt.sample(num_samples, generator=torch.Generator().manual_seed(seed)),
              sample(net, num_samples=num_samples, seed=seed),
              sample(net, uncond, guidance, num_samples=num_samples, seed=seed) if uncond is not None else None,
              sample(net, gnet, guidance, num_samples=num_samples, seed=seed)]
    # Full view: the mixture's extent with a margin. Zoom: a square around the outermost component (a branch tip).
    lo, hi = gt.means.min(0).values, gt.means.max(0).values
    centre, half = (lo + hi) / 2, (hi - lo).max().item() / 2 * 1.25
    full = ((centre[0].item() - half, centre[0].item() + half), (centre[1].item() - half, centre[1].item() + half))
    tip = gt.means[(gt.means - gt.means.mean(0)).norm(dim=1).argmax()]
    zhalf = half / 4
    zoom = ((tip[0].item() - zhalf, tip[0].item() + zhalf), (tip[1].item() - zhalf, tip[1].item() + zhalf))

    title_h, gap = 28, 6
    canvas = PIL.Image.new('RGB', (4 * PANEL + 5 * gap, title_h + 2 * PANEL + 3 * gap), 'white')
    draw = PIL.ImageDraw.Draw(canvas)
    for row, (box, radius) in enumerate([(full, 1), (zoom, 2)]):
        background = _density_image(gt, box, PANEL)
        for col, ((title, color), points) in enumerate(zip(COLUMNS, panels)):
            img = background.copy()
            if points is not None:
                _draw_points(img, points, box, color, radius)
            left, top = gap + col * (PANEL + gap), title_h + gap + row * (PANEL + gap)
            canvas.paste(PIL.Image.fromarray(img), (left, top))
            draw.rectangle([left - 1, top - 1, left + PANEL, top + PANEL], outline=(150, 150, 150))
            if row == 0:
                label = title if col < 2 else f'{title}, w = {guidance:g}'
                draw.text((left + 4, 8), label if points is not None else f'{title}: no --uncond', fill=color)
    return canvas

#----------------------------------------------------------------------------

def load_toy(path):
    with dnnlib.util.open_url(path, verbose=False) as f:
        return pickle.load(f).eval().requires_grad_(False)

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
@click.option('--viz',        help='Show the loss on the progress bar (no plot window: matplotlib is not used)', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--iterations', help='Training iterations', metavar='INT', type=click.IntRange(min=1), default=4096, show_default=True)
@click.option('--batch',      help='Batch size (EDM2 used 4096; 1024 keeps a CPU run to minutes)', metavar='INT', type=click.IntRange(min=1), default=1024, show_default=True)
def train_cmd(outdir, cls, layers, dim, viz, iterations, batch):
    """Train a toy model; snapshots of its EMA go to OUTDIR/iterNNNN.pkl every 256 iterations and at the end."""
    if outdir is not None:
        cli.check_output_dir(outdir)
    with cli.os_errors(outdir):
        train(outdir=outdir, classes=cls, num_layers=layers, hidden_dim=dim, iterations=iterations, batch_size=batch,
              verbose=viz)

@cmdline.command('plot')
@click.option('--net',      help='Main model', metavar='PKL|URL', type=str, default=f'{EDM2_TOY_ROOT}/clsA-layers04-dim64/iter4096.pkl', show_default=True)
@click.option('--gnet',     help='Guiding model for autoguidance', metavar='PKL|URL', type=str, default=f'{EDM2_TOY_ROOT}/clsA-layers04-dim32/iter0512.pkl', show_default=True)
@click.option('--uncond',   help='Unconditional model (trained with --cls=AB) for classifier-free guidance', metavar='PKL|URL', type=str, default=None)
@click.option('--guidance', help='Guidance weight', metavar='FLOAT', type=cli.FloatRange(), default=3, show_default=True)
@click.option('--save',     help='Write the figure to this PNG', metavar='PNG', type=str, default='toy-example.png', show_default=True)
@click.option('--samples',  help='Samples per panel', metavar='INT', type=click.IntRange(min=1), default=4096, show_default=True)
def plot_cmd(net, gnet, uncond, guidance, save, samples):
    """Plot ground truth, unguided, classifier-free-guided and autoguided samples of class A."""
    if not save.lower().endswith('.png'):
        raise click.ClickException(f'--save={save}: give a .png file name')
    cli.check_output_file(save, overwrite=True)  # a rerun replaces the figure, as in EDM2
    models = {}
    for option, path in [('--net', net), ('--gnet', gnet), ('--uncond', uncond)]:
        if path is not None:
            try:
                models[option] = load_toy(path)
            except Exception as e:  # pylint: disable=broad-except
                raise click.ClickException(f'{option}={path}: cannot load a toy model ({type(e).__name__}: {e})')
    image = plot(models['--net'], models['--gnet'], models.get('--uncond'), guidance=guidance, num_samples=samples)
    with cli.os_errors(save), dnnlib.util.atomic_write(save, 'wb') as f:
        image.save(f, format='png')
    click.echo(f'Saved {save}')

if __name__ == '__main__':
    cmdline()  # pylint: disable=no-value-for-parameter
