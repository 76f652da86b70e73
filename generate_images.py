"""Generate images with a trained EDM2 / EDM2+ network.

Examples:
  python generate_images.py --net=phema/phema-2147483-0.050.pkl --outdir=out --seeds=0-63 --grid=grid.png
  python generate_images.py --preset=edm2-img512-s-guid-dino --outdir=out
  torchrun --standalone --nproc_per_node=8 generate_images.py --preset=edm2-img64-s-fid --outdir=out --subdirs --seeds=0-49999

This file is also imported as a module (EDM2's calculate_metrics does so): it re-exports the library names below.
"""

import os
import pickle
import re

import click
import tqdm

import dnnlib
from torch_utils import cli
from torch_utils import distributed as dist
from sampling.generate import config_presets, StackedRandomGenerator, generate_images, parse_int_list  # noqa: F401
from sampling.generate import MAX_SEED, MissingPackageError, image_path, require_decoder
from training.encoders import VAEError, vae_error_line, vae_option_problem
from sampling.sampler import check_sampler_options, edm_sampler  # noqa: F401

#----------------------------------------------------------------------------
# Option rules: a preset fills net, gnet and guidance only where the command line left them unset;
# guidance 1 (or unset) discards the guide; any other guidance needs one.

def resolve_options(opts):
    """Apply the preset to an EasyDict of CLI options (in place) and check the net/gnet/guidance rules."""
    preset = opts.pop('preset', None)
    if preset is not None:
        if preset not in config_presets:
            raise click.ClickException(f'Invalid configuration preset "{preset}"')
        for key, value in config_presets[preset].items():
            if opts.get(key) is None:
                opts[key] = value
    if opts.get('net') is None:
        raise click.ClickException('Please specify either --preset or --net')
    if opts.get('guidance') is None or opts.guidance == 1:
        opts.guidance = 1
        opts.gnet = None
    elif opts.get('gnet') is None:
        raise click.ClickException('Please specify --gnet when using guidance')
    return opts

def check_outputs_apart(opts):
    """No output overwrites an input network, and the grid is not one of the images: refuse before any work."""
    seeds = set(opts.seeds)
    def seed_named(path):
        # The seed being generated whose image has the file name of `path` (e.g. 000042.png), else None.
        match = re.fullmatch(r'(\d{6,})\.png', os.path.basename(path))
        seed = int(match[1]) if match is not None else None
        return seed if seed in seeds else None

    inputs = {'--net': opts.net, '--gnet': opts.gnet}
    outputs = [opts.grid] if opts.grid is not None else []
    for path in inputs.values():  # an input that lies where an image would be written
        seed = seed_named(path) if path is not None and not dnnlib.util.is_url(path) and os.path.isfile(path) else None
        if seed is not None:
            outputs.append(image_path(opts.outdir, seed, opts.subdirs))
    for output in outputs:
        cli.check_not_input(output, inputs)
    seed = seed_named(opts.grid) if opts.grid is not None else None
    if seed is not None and cli.same_file(opts.grid, image_path(opts.outdir, seed, opts.subdirs)):
        raise cli.CliError(f'{opts.grid}: --grid is also the image of seed {seed} in --outdir; choose another name')

#----------------------------------------------------------------------------

@click.command()

# Main options.
@click.option('--preset',            help='Configuration preset', metavar='STR',                         type=str, default=None)
@click.option('--net',               help='Network pickle or weights-only .pt (filename or URL)', metavar='PATH|URL', type=str, default=None)
@click.option('--gnet',              help='Guiding network pickle or weights-only .pt (filename or URL)', metavar='PATH|URL', type=str, default=None)
@click.option('--seeds',             help='List of random seeds (e.g. 1,2,5-10), each once', metavar='LIST', type=cli.IntList(min=0, max=MAX_SEED, min_len=1, unique=True), default='16-19', show_default=True)
@click.option('--class', 'class_idx',help='Class label(s); several are used in turn  [default: random]', metavar='INT|LIST', type=cli.IntList(min=0, min_len=1), default=None)

# Hyperparameters.
@click.option('--steps', 'num_steps',help='Number of sampling steps', metavar='INT',                    type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--sigma_min',         help='Lowest noise level', metavar='FLOAT',                         type=cli.FloatRange(min=0, min_open=True), default=0.002, show_default=True)
@click.option('--sigma_max',         help='Highest noise level', metavar='FLOAT',                        type=cli.FloatRange(min=0, min_open=True), default=80, show_default=True)
@click.option('--rho',               help='Time step exponent', metavar='FLOAT',                         type=cli.FloatRange(min=0, min_open=True), default=7, show_default=True)
@click.option('--guidance',          help='Guidance strength  [default: 1; no guidance]', metavar='FLOAT', type=cli.FloatRange(), default=None)
@click.option('--guidance-interval', 'guidance_interval', help='Apply guidance only for noise levels in [LO, HI]  [default: all]', metavar='LO,HI', type=cli.Interval(), default=None)
@click.option('--S_churn', 'S_churn',help='Stochasticity strength', metavar='FLOAT',                     type=cli.FloatRange(min=0), default=0, show_default=True)
@click.option('--S_min', 'S_min',    help='Stochastic min noise level', metavar='FLOAT',                 type=cli.FloatRange(min=0), default=0, show_default=True)
@click.option('--S_max', 'S_max',    help='Stochastic max noise level', metavar='FLOAT',                 type=cli.FloatRange(min=0, allow_inf=True), default='inf', show_default=True)
@click.option('--S_noise', 'S_noise',help='Stochastic noise inflation', metavar='FLOAT',                 type=cli.FloatRange(min=0), default=1, show_default=True)

# Performance.
@click.option('--batch', 'max_batch_size', help='Maximum batch size per process', metavar='INT',       type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--edm2-exact', 'edm2_exact', help="Run the network with EDM2's exact op sequence: bit-identical to EDM2's images, but slower than the default fast path", is_flag=True)
@click.option('--compile',           help='torch.compile the networks (CUDA graphs on a GPU); slow start, for many images', is_flag=True)

# Latent networks (ImageNet-512).
@click.option('--vae',               help="VAE for latent networks: a folder written by diffusers' save_pretrained (no network access) or a hub name  [default: the one the network names]", metavar='PATH|NAME', type=str, default=None)
@click.option('--vae-batch', 'encoder_batch_size', help='Images per VAE decoder call (memory vs. speed)', metavar='INT', type=click.IntRange(min=1), default=4, show_default=True)

# I/O.
@click.option('--outdir',            help='Where to save the output images', metavar='DIR',              type=str, required=True)
@click.option('--subdirs',           help='Create subdirectory for every 1000 seeds',                    is_flag=True)
@click.option('--grid',              help='Also save all images as one grid PNG (rows by class when several classes are given)', metavar='PATH', type=str, default=None)
@click.option('--overwrite',         help='Replace an existing --grid file',                             is_flag=True)

def cmdline(**opts):
    """Generate images with a trained network, optionally guided.

    \b
    python generate_images.py --net=phema/phema-2147483-0.050.pkl --outdir=out --seeds=0-63 --grid=grid.png
    python generate_images.py --preset=edm2-img512-s-guid-dino --outdir=out
    torchrun --standalone --nproc_per_node=8 generate_images.py \\
        --preset=edm2-img64-s-fid --outdir=out --subdirs --seeds=0-49999
    python generate_images.py --net=edm2-img512-xs-2147483-0.135.pkl --vae=vae/sd-vae-ft-mse --outdir=out

    Network pickles (.pkl) run the Python code stored inside them when loaded: load only pickles you trust, or
    convert them once with "python -m networks.export IN.pkl OUT.pt" into the weights-only .pt format, which every
    tool accepts and which never runs code.
    """
    preset_net = opts['preset'] if opts['net'] is None else None
    overwrite = opts.pop('overwrite')
    opts = resolve_options(dnnlib.EasyDict(opts))
    try:
        check_sampler_options(**opts)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    for key in ['net', 'gnet']:
        path = opts[key]
        if path is not None and not dnnlib.util.is_url(path) and not os.path.isfile(path):
            raise click.ClickException(f'--{key}={path}: no such network file')
    net_option = f'--preset={preset_net}' if preset_net else f'--net={opts.net}'
    problem = vae_option_problem(opts.vae)
    if problem is not None:
        raise click.ClickException(problem)
    try:
        require_decoder(opts.net, net_option)
    except MissingPackageError as e:
        raise click.ClickException(str(e)) from None
    # Outputs before any work: the images may land in an existing folder (as in EDM2), the grid replaces a file
    # only when asked to.
    cli.check_output_dir(opts.outdir)
    if opts.grid is not None:
        cli.check_output_file(opts.grid, overwrite=overwrite)
    check_outputs_apart(opts)

    # Validation is done; only now start the process group.
    with dist.process_group(), cli.os_errors():
        try:
            image_iter = generate_images(**opts)
            for _ in tqdm.tqdm(image_iter, unit='batch', disable=(dist.get_rank() != 0)):
                pass
        except (ValueError, pickle.UnpicklingError, MissingPackageError, MemoryError, VAEError) as e:
            if dist.get_rank() != 0:
                raise SystemExit(1) from None  # every rank stops alike; rank 0 says why
            if isinstance(e, VAEError):
                raise click.ClickException(vae_error_line(e, opts.vae, f'{net_option}: the VAE it names')) from None
            raise click.ClickException(str(e)) from None

#----------------------------------------------------------------------------

if __name__ == '__main__':
    cli.run(cmdline)
