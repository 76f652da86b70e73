"""Train EDM2 / EDM2+ diffusion models, on CUDA GPUs or on CPUs.

Examples:
  # The demo: Fashion-MNIST on a laptop CPU, at most 15 minutes (rerun the same command to continue).
  python dataset_tool.py convert --source=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz \\
      --dest=datasets/fashion-mnist-16.zip --resolution=16x16
  python train_edm2plus.py --preset=demo --data=datasets/fashion-mnist-16.zip --outdir=runs/demo --minutes=15

  # EDM2+-S on ImageNet-64 with 8 GPUs.
  torchrun --standalone --nproc_per_node=8 train_edm2plus.py --preset=edm2plus-img64-s \\
      --data=datasets/img64.zip --outdir=runs/00000-edm2plus-img64-s --batch-gpu=64

Resuming is rerunning the same command: training continues from the newest training-state-*.pt in --outdir.
"""

import contextlib
import json
import os
import re
import traceback

import click
import torch

import dnnlib
from torch_utils import cli
from torch_utils import misc
from torch_utils import distributed as dist
from networks import flops, presets
from networks.edm2plus import BLOCK_VARIANTS
from networks.fastpaths import TRAINING_PATHS
from training import phema, training_loop

#----------------------------------------------------------------------------
# Configuration, built from the options; kept separate from the CLI so that tests can call it.

# The options' fixed defaults, one place for the command line and for programmatic callers (None: the preset's).
OPTION_DEFAULTS = dict(cond=True, preset='edm2-img512-s', channel_mult=None, num_blocks=None, attn=None, rampup=None,
                       ema_stds=[0.050, 0.100], batch_gpu=0, fp16=True, bf16=False, ls=1, bench=True, compile=False,
                       train_path='auto', workers=None, status=None, snapshot=None, checkpoint=None, minutes=None, seed=0,
                       dry_run=False, vae=None)
D = OPTION_DEFAULTS

# The options that change the network's shape, and their names on the command line: a resumed run must keep them.
ARCHITECTURE_OPTIONS = dict(block='--block', model_channels='--channels', expansion='--expansion', kernel='--kernel',
                            channel_mult='--channel-mult', num_blocks='--num-blocks', attn_resolutions='--attn')

def probe_dataset(dataset_kwargs):
    """EasyDict(dataset, num_channels, resolution, label_dim, has_labels, vae) of the dataset, after decoding one
    image (so that a corrupt dataset fails here, with its file named): `dataset` is the opened dataset, which the
    training loop then uses rather than opening it again; `vae` is the VAE a latent (8-channel) dataset's
    dataset.json names (dataset_tool.py encode writes it), or None. Raises click.ClickException."""
    try:
        dataset_obj = dnnlib.util.construct_class_by_name(**dataset_kwargs)
        dataset_obj[0]
        return dnnlib.EasyDict(dataset=dataset_obj, num_channels=dataset_obj.num_channels,
                               resolution=dataset_obj.resolution, label_dim=dataset_obj.label_dim,
                               has_labels=dataset_obj.has_labels,
                               vae=dataset_obj.recorded_vae if dataset_obj.num_channels == 8 else None)
    except (IOError, OSError, ValueError) as e:
        raise click.ClickException(f'--data: {e}')

def latent_encoder_kwargs(vae, info):
    """encoder_kwargs of a latent dataset: the VAE that the snapshots will decode with is --vae (checked: a folder,
    stored as an absolute path, or a hub name), else the one the dataset names, else EDM2's default, which is left
    implicit as in EDM2's configuration."""
    from training import encoders  # pylint: disable=import-outside-toplevel
    name = info.vae
    if vae is not None:
        try:
            name = encoders.vae_record_name(vae)
        except encoders.VAEError as e:
            raise click.ClickException(f'--vae={vae}: {e.reason}') from None
    kwargs = dict(class_name='training.encoders.StabilityVAEEncoder')
    if name is not None and name != encoders.DEFAULT_VAE:
        kwargs['vae_name'] = name
    return kwargs

def network_interface(info):
    """img_resolution, img_channels and label_dim of the network that trains on a dataset (probe_dataset): the VAE
    latents' 8 channels are a 4-channel mean and its standard deviation (the encoder samples them)."""
    return dict(img_resolution=info.resolution, img_channels=4 if info.num_channels == 8 else info.num_channels,
                label_dim=info.label_dim)

def check_resume(outdir, network_kwargs):
    """A rerun resumes the newest training state in `outdir`: refuse options that change the network's shape."""
    options_path = os.path.join(outdir, 'training_options.json')
    if not os.path.isdir(outdir) or not any(re.fullmatch(r'training-state-\d+\.pt', f) for f in os.listdir(outdir)):
        return
    try:
        with open(options_path) as f:
            before = json.load(f)['network_kwargs']
    except (OSError, ValueError, KeyError, TypeError):
        return  # nothing to compare with; the training loop checks the state itself
    def effective(kwargs, key):  # None expansion/kernel: the variant's own (its BLOCK_VARIANTS record)
        variant = BLOCK_VARIANTS.get(kwargs.get('block', 'A'))
        if variant is None or key not in ('expansion', 'kernel'):
            return kwargs.get(key)
        e, k = variant.resolve(kwargs.get('expansion'), kwargs.get('kernel'))
        return e if key == 'expansion' else k
    for key, option in ARCHITECTURE_OPTIONS.items():
        old, new = effective(before, key), effective(network_kwargs, key)
        if old != new:
            show = lambda v: ','.join(map(str, v)) if isinstance(v, list) else ('the variant\'s' if v is None else v)
            raise click.ClickException(f'{option}={show(new)}: the run in {outdir} was started with {option}={show(old)} '
                                       f'and resumes from its training state; use the same value or a new --outdir')

def setup_training_config(opts, world_size=1):
    """Return the training_loop config dict for a dict of CLI options (option names as keyword names; `data` is
    required, missing options take their defaults). Raises click.ClickException."""
    return configure(opts, world_size)[0]

def configure(opts, world_size=1):
    """(config, info): setup_training_config's config, and what probe_dataset learned from the dataset (the dataset
    is opened once, here, and the training loop gets it from info.dataset)."""
    opts, preset = resolve_options(opts)
    dataset_kwargs = dict(class_name='training.dataset.ImageFolderDataset', path=opts.data, use_labels=opts.cond)
    info = probe_dataset(dataset_kwargs)
    if opts.cond and not info.has_labels:
        raise click.ClickException('--cond=True, but no labels found in the dataset')
    c = training_config(opts, dataset_kwargs, encoder_kwargs_for(opts, info), network_kwargs_for(opts, preset, info))
    try:  # sizes must fit together; say which option is wrong
        training_loop.batch_layout(c['batch_size'], c['batch_gpu'], world_size)
        training_loop.check_intervals(c['batch_size'], c['total_nimg'], None, c['status_nimg'], c['snapshot_nimg'], c['checkpoint_nimg'])
    except ValueError as e:
        raise click.ClickException(f'{e} (check --batch, --batch-gpu, --duration, --status, --snapshot, --checkpoint)')
    return c, info

def resolve_options(opts):
    """(opts, preset): every option given a value (the command line's, else the preset's, else the fixed default),
    with --ema-stds checked."""
    opts = dnnlib.EasyDict({**OPTION_DEFAULTS, **{k: v for k, v in opts.items() if v is not None or k not in OPTION_DEFAULTS}})
    try:
        preset = presets.get(opts.preset)
    except ValueError as e:
        raise click.ClickException(str(e))
    for key in ['duration', 'batch', 'lr', 'decay', 'dropout', 'P_mean', 'P_std']:
        if opts.get(key) is None:
            opts[key] = getattr(preset, key)
    if opts.get('rampup') is None:
        opts.rampup = preset.rampup_Mimg
    for key, default in [('status', 128 << 10), ('snapshot', 8 << 20), ('checkpoint', 128 << 20)]:
        if opts.get(key) is None:
            opts[key] = getattr(preset, key) or default
    opts.decay = float(opts.decay)
    if len(opts.ema_stds) == 0 or not all(0 < s < 0.289 for s in opts.ema_stds):
        raise click.ClickException(f'--ema-stds={",".join(f"{s:g}" for s in opts.ema_stds)}: '
                                   f'give one or more relative standard deviations between 0 and 0.289')
    collision = phema.name_collision(opts.ema_stds)  # one snapshot file per tracked EMA
    if collision is not None:
        raise click.ClickException(f'--ema-stds={",".join(f"{s:g}" for s in opts.ema_stds)}: two of them are '
                                   f'{collision[0]:.3f} at the three decimals that snapshot names hold, and would '
                                   f'write one file')
    return opts, preset

def encoder_kwargs_for(opts, info):
    """The encoder the dataset needs: RGB pixels, or a latent dataset's VAE (latent_encoder_kwargs)."""
    if info.num_channels == 3:
        if opts.vae is not None:
            raise click.ClickException(f'--vae={opts.vae}: the dataset holds RGB pixels (3 channels); a VAE belongs '
                                       'to latent datasets (8 channels, made by dataset_tool.py encode)')
        return dict(class_name='training.encoders.StandardRGBEncoder')
    if info.num_channels == 8:
        return latent_encoder_kwargs(opts.vae, info)
    raise click.ClickException(f'--data: Unsupported channel count {info.num_channels}')

def network_kwargs_for(opts, preset, info):
    """The preset's architecture with the command line's overrides (a --block brings its variant's e, k and width),
    checked against the data's resolution and against a run being resumed, before anything is built."""
    network_kwargs = presets.architecture_kwargs(preset, model_channels=opts.get('channels'), dropout=opts.dropout,
                                                 block=opts.get('block'), expansion=opts.get('expansion'),
                                                 kernel=opts.get('kernel'), channel_mult=opts.channel_mult,
                                                 num_blocks=opts.num_blocks, attn_resolutions=opts.attn)
    try:
        presets.check_architecture(dict(network_kwargs, img_resolution=info.resolution),
                                   explicit=[k for k in ('expansion', 'kernel') if opts.get(k) is not None])
    except ValueError as e:
        raise click.ClickException(str(e))
    if opts.get('outdir') is not None:
        check_resume(opts.outdir, network_kwargs)
    network_kwargs = dict(class_name='networks.edm2plus.Precond', **network_kwargs, use_fp16=opts.fp16)
    if opts.bf16:
        network_kwargs['use_bf16'] = True
    return network_kwargs

def training_config(opts, dataset_kwargs, encoder_kwargs, network_kwargs):
    """training_loop's keyword arguments, in EDM2's order (training_options.json keeps it)."""
    return dict(
        dataset_kwargs      = dataset_kwargs,
        encoder_kwargs      = encoder_kwargs,
        total_nimg          = opts.duration,
        batch_size          = opts.batch,
        network_kwargs      = network_kwargs,
        loss_kwargs         = dict(class_name='training.loss.EDM2Loss', P_mean=opts.P_mean, P_std=opts.P_std),
        lr_kwargs           = dict(func_name='training.training_loop.learning_rate_schedule', ref_lr=opts.lr,
                                   ref_batches=opts.decay, rampup_Mimg=opts.rampup),
        ema_kwargs          = dict(class_name='training.phema.PowerFunctionEMA', stds=opts.ema_stds),
        data_loader_kwargs  = dict(class_name='torch.utils.data.DataLoader', pin_memory=True, prefetch_factor=2,
                                   num_workers=opts.workers if opts.workers is not None else (2 if torch.cuda.is_available() else 0)),
        batch_gpu           = opts.batch_gpu or None,
        loss_scaling        = opts.ls,
        cudnn_benchmark     = opts.bench,
        status_nimg         = opts.status or None,
        snapshot_nimg       = opts.snapshot or None,
        checkpoint_nimg     = opts.checkpoint or None,
        seed                = opts.seed,
        compile             = opts.compile,
        train_path          = opts.train_path,
    )

#----------------------------------------------------------------------------

def print_training_config(c, opts, world_size, info):
    """Print the config, the run's facts and the network's size (`info`: configure()'s, what the dataset holds);
    refuse (ClickException) a network that cannot be built or cannot fit the device's memory."""
    dist.print0()
    dist.print0('Training config:')
    dist.print0(json.dumps(c, indent=2))
    dist.print0()
    device = 'CUDA' if torch.cuda.is_available() else 'CPU'
    precision = 'bf16' if opts.bf16 else 'fp16' if opts.fp16 else 'fp32'
    if device == 'CPU':
        precision += ' (CPU: float32)'
    rows = [('Output directory', opts.outdir), ('Dataset path', opts.data), ('Class-conditional', opts.cond),
            ('Number of GPUs', f'{world_size} ({device})'), ('Batch size', c['batch_size']),
            ('Mixed-precision', precision)]
    if opts.minutes is not None:
        rows.append(('Time limit', f'{opts.minutes:g} minutes'))
    for label, value in rows:  # EDM2's log.txt layout: the label and its colon in 25 columns
        dist.print0(f'{label + ":":<25s}{value}')
    dist.print0()
    # The network's size, counted as count_flops.py does (on the meta device: no memory, about a second).
    kwargs = {k: v for k, v in c['network_kwargs'].items() if k not in ('class_name', 'use_fp16', 'use_bf16')}
    kwargs.update(network_interface(info))
    dist.print0(f'Network: {flops.describe(kwargs)}')
    try:
        meta_net = flops.build_meta(**kwargs)
    except (RuntimeError, ValueError) as e:  # e.g. --channels=1000000000: sizes beyond what a tensor can describe
        raise click.ClickException(f'the network cannot be built ({cli.one_line(e)}); check --channels, '
                                   '--channel-mult and --expansion') from None
    for line in flops.headline(flops.count(meta_net)):
        dist.print0(line)
    dist.print0()
    check_memory(c, kwargs, sum(p.numel() for p in meta_net.parameters()), world_size)

def check_memory(c, net_kwargs, num_params, world_size):
    """Refuse, before anything is built, a run that cannot fit the device: float32 weights, gradients, Adam's two
    moments and the EMA copies, plus one micro-batch of input images (a lower bound: activations come on top)."""
    copies = 4 + len(c['ema_kwargs']['stds']) if c.get('ema_kwargs') else 4
    batch_gpu = training_loop.batch_layout(c['batch_size'], c['batch_gpu'], world_size)[0]
    images = batch_gpu * net_kwargs['img_channels'] * net_kwargs['img_resolution'] ** 2
    try:
        misc.check_fits_memory(4 * (copies * num_params + images),
                               f'Training {num_params / 1e6:,.1f} M parameters (--channels, --channel-mult, '
                               f'--expansion) at {batch_gpu} images per step and process (--batch, --batch-gpu)',
                               dist.device())
    except MemoryError as e:
        raise click.ClickException(str(e)) from None

#----------------------------------------------------------------------------

@click.command()

# Main options.
@click.option('--outdir',           help='Where to save the results', metavar='DIR',                    type=str, required=True)
@click.option('--data',             help='Path to the dataset', metavar='ZIP|DIR',                      type=str, required=True)
@click.option('--cond',             help='Train class-conditional model', metavar='BOOL',               type=bool, default=D['cond'], show_default=True)
@click.option('--preset',           help='Configuration preset', metavar='STR',                         type=str, default=D['preset'], show_default=True)
@click.option('--vae',              help="Latent data: the VAE the snapshots decode with, a save_pretrained folder or a hub name  [default: the one the dataset names]", metavar='PATH|NAME', type=str, default=None)

# Hyperparameters (default: the preset's).
@click.option('--duration',         help='Training duration', metavar='NIMG',                           type=cli.Nimg(min=1), default=None)
@click.option('--batch',            help='Total batch size', metavar='NIMG',                            type=cli.Nimg(min=1), default=None)
@click.option('--channels',         help='Channel multiplier (base width)', metavar='INT',              type=click.IntRange(min=8), default=None)
@click.option('--dropout',          help='Dropout probability', metavar='FLOAT',                        type=cli.FloatRange(min=0, max=1), default=None)
@click.option('--P_mean', 'P_mean', help='Noise level mean (of ln sigma)', metavar='FLOAT',             type=cli.FloatRange(), default=None)
@click.option('--P_std', 'P_std',   help='Noise level standard deviation (of ln sigma)', metavar='FLOAT', type=cli.FloatRange(min=0, min_open=True), default=None)
@click.option('--lr',               help='Learning rate max. (alpha_ref)', metavar='FLOAT',             type=cli.FloatRange(min=0, min_open=True), default=None)
@click.option('--decay',            help='Learning rate decay (t_ref)', metavar='BATCHES',              type=cli.FloatRange(min=0), default=None)
@click.option('--rampup',           help='Learning rate warm-up length', metavar='MIMG',                type=cli.FloatRange(min=0), default=None)
@click.option('--block',            help='Block variant (CONFIG A-G*) with its own e, k and width', metavar='NAME', type=click.Choice(list(BLOCK_VARIANTS)), default=None)
@click.option('--expansion',        help="Expansion ratio e [default: the variant's]", metavar='FLOAT', type=cli.FloatRange(min=0, min_open=True), default=None)
@click.option('--kernel',           help="Depthwise kernel size k, odd [default: the variant's]", metavar='INT', type=int, default=None)
@click.option('--channel-mult',     help='Width multipliers of the resolution levels', metavar='LIST',  type=cli.IntList(min=1, min_len=1), default=None)
@click.option('--num-blocks',       help='Encoder blocks per level (decoder: one more)', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--attn',             help='Resolutions with self-attention (empty: none)', metavar='LIST', type=cli.IntList(min=1), default=None)
@click.option('--ema-stds',         help='Tracked EMA lengths (sigma_rel)', metavar='LIST',             type=cli.FloatList(min=0, max=0.289, min_open=True, max_open=True, min_len=1), default=D['ema_stds'], show_default=True)

# Performance-related.
@click.option('--batch-gpu',        help='Limit batch size per GPU (process)', metavar='NIMG',          type=cli.Nimg(), default=D['batch_gpu'], show_default=True)
@click.option('--fp16',             help='Enable mixed-precision training (CUDA)', metavar='BOOL',      type=bool, default=D['fp16'], show_default=True)
@click.option('--bf16',             help='Use bfloat16 instead of float16 (CUDA)', metavar='BOOL',      type=bool, default=D['bf16'], show_default=True)
@click.option('--ls',               help='Loss scaling', metavar='FLOAT',                               type=cli.FloatRange(min=0, min_open=True), default=D['ls'], show_default=True)
@click.option('--bench',            help='Enable cuDNN benchmarking', metavar='BOOL',                   type=bool, default=D['bench'], show_default=True)
@click.option('--compile',          help='torch.compile the network (slow start): BOOL, or a mode, e.g. reduce-overhead (CUDA graphs)', metavar='BOOL|MODE', type=cli.Parsed(training_loop.parse_compile, 'mode'), default=D['compile'], show_default=True)
@click.option('--train-path',       help="Network path in training: fast (the training path), reference (EDM2's op sequence), auto (fast on CPU, reference on CUDA)", metavar='auto|fast|reference', type=click.Choice(TRAINING_PATHS), default=D['train_path'], show_default=True)
@click.option('--workers',          help='Data loader processes [default: 2 on CUDA, 0 on CPU]', metavar='INT', type=click.IntRange(min=0), default=None)

# I/O-related.
@click.option('--status',           help='Interval of status prints [default: preset or 128Ki]', metavar='NIMG', type=cli.Nimg(), default=None)
@click.option('--snapshot',         help='Interval of network snapshots [default: preset or 8Mi]', metavar='NIMG', type=cli.Nimg(), default=None)
@click.option('--checkpoint',       help='Interval of training checkpoints [default: preset or 128Mi]', metavar='NIMG', type=cli.Nimg(), default=None)
@click.option('--minutes',          help='Stop after this much wall time (with a final snapshot and checkpoint)', metavar='FLOAT', type=cli.FloatRange(min=0, min_open=True), default=None)
@click.option('--seed',             help='Random seed', metavar='INT',                                  type=int, default=D['seed'], show_default=True)
@click.option('-n', '--dry-run',    help='Print training options and exit',                             is_flag=True, default=D['dry_run'])

def cmdline(**opts):
    """Train a diffusion model (EDM2 with the EDM2+ block variants) on CUDA or CPU.

    \b
    Examples:
    # Demo: Fashion-MNIST 16x16 on a CPU in at most 15 minutes
    python train_edm2plus.py --preset=demo --data=datasets/fashion-mnist-16.zip \\
        --outdir=runs/demo --minutes=15

    \b
    # EDM2+-S on ImageNet-64, 8 GPUs
    torchrun --standalone --nproc_per_node=8 train_edm2plus.py \\
        --preset=edm2plus-img64-s --data=datasets/img64.zip \\
        --outdir=runs/00000-edm2plus-img64-s --batch-gpu=64

    Rerunning the same command resumes from the newest training state.
    """
    opts = dnnlib.EasyDict(opts)
    if not opts.dry_run:
        cli.check_output_dir(opts.outdir)  # before the dataset is read or any process group started
    # A dry run prints the configuration without starting any process group.
    with (contextlib.nullcontext() if opts.dry_run else dist.process_group()), cli.os_errors():
        world_size = int(os.environ.get('WORLD_SIZE', '1')) if opts.dry_run else dist.get_world_size()
        dist.print0('Setting up training config...')
        c, info = configure(opts, world_size=world_size)
        print_training_config(c, opts, world_size, info)
        if opts.dry_run:
            dist.print0('Dry run; exiting.')
            return
        launch(c, opts, dataset=info.dataset)

def launch(c, opts, dataset=None):
    """Create the output directory and run the training loop, with everything printed also going to log.txt. The
    run directory is locked first: a second training in it (e.g. a requeued job) stops here, before writing.
    `dataset`: the dataset c['dataset_kwargs'] describes, if the caller has opened it (probe_dataset)."""
    if dist.get_rank() == 0 and not os.path.isdir(opts.outdir):
        dist.print0('Creating output directory...')
        os.makedirs(opts.outdir)
    try:
        with dist.run_dir_lock(opts.outdir):
            _launch(c, opts, dataset)
    except dist.RunDirBusyError as e:
        if dist.get_rank() != 0:
            raise SystemExit(1) from None  # rank 0 says why
        raise click.ClickException(f'--outdir={e}') from None

def _launch(c, opts, dataset):
    # training_options.json is written by the first launch only (later ones resume).
    if dist.get_rank() == 0:
        options_path = os.path.join(opts.outdir, 'training_options.json')
        if not os.path.isfile(options_path):
            with dnnlib.util.atomic_write(options_path, 'w') as f:
                json.dump(c, f, indent=2)
    dist.barrier()

    logger = dnnlib.util.Logger(file_name=os.path.join(opts.outdir, 'log.txt'), file_mode='a', should_flush=True)
    try:
        time_limit = opts.minutes * 60 if opts.minutes is not None else None
        training_loop.training_loop(run_dir=opts.outdir, time_limit=time_limit, dataset=dataset, **c)
    except training_loop.TrainingError as e:  # One line (also in log.txt); the last good training state is kept.
        if logger.file is not None:
            logger.file.write(f'Error: {e}\n')
        raise click.ClickException(str(e)) from None
    except BaseException:
        if logger.file is not None:
            logger.file.write(traceback.format_exc())
        raise
    finally:
        logger.close()

#----------------------------------------------------------------------------

if __name__ == '__main__':
    cli.run(cmdline, spawn_workers=True)
