"""Generate images from a trained denoiser: seeds, batching across processes, labels, decoding, PNG output.

`generate_images(...)` is the library entry point used by `generate_images.py` and by `calculate_metrics.py gen`;
it returns an iterable (with `len`) that produces one batch per step. Every image depends only on its seed (and
its class, when classes are given): each seed owns a `torch.Generator`, and batches and processes merely decide
which seeds are computed together.
"""

import contextlib
import math
import os
import pickletools
import re
import sys
import zipfile

import numpy as np
import PIL.Image
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import cli
from torch_utils import misc
from torch_utils.cli import parse_int_list  # noqa: F401 (EDM2's generate_images.parse_int_list)
from networks import loading
from training import encoders
from sampling.sampler import check_sampler_options, edm_sampler, euler_sampler

#----------------------------------------------------------------------------
# EDM2's published post-hoc EMA reconstructions. The files are downloaded (and cached) on first use;
# the comments give the metric each one was chosen for and its value as reported by EDM2.

model_root = 'https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions'

def _preset(net, gnet=None, guidance=None):
    return dnnlib.EasyDict(net=f'{model_root}/{net}', gnet=(f'{model_root}/{gnet}' if gnet else None), guidance=guidance)

config_presets = {
    # ImageNet-512 (latent space), no guidance.
    'edm2-img512-xs-fid':              _preset('edm2-img512-xs-2147483-0.135.pkl'),   # fid 3.53
    'edm2-img512-xs-dino':             _preset('edm2-img512-xs-2147483-0.200.pkl'),   # fd_dinov2 103.39
    'edm2-img512-s-fid':               _preset('edm2-img512-s-2147483-0.130.pkl'),    # fid 2.56
    'edm2-img512-s-dino':              _preset('edm2-img512-s-2147483-0.190.pkl'),    # fd_dinov2 68.64
    'edm2-img512-m-fid':               _preset('edm2-img512-m-2147483-0.100.pkl'),    # fid 2.25
    'edm2-img512-m-dino':              _preset('edm2-img512-m-2147483-0.155.pkl'),    # fd_dinov2 58.44
    'edm2-img512-l-fid':               _preset('edm2-img512-l-1879048-0.085.pkl'),    # fid 2.06
    'edm2-img512-l-dino':              _preset('edm2-img512-l-1879048-0.155.pkl'),    # fd_dinov2 52.25
    'edm2-img512-xl-fid':              _preset('edm2-img512-xl-1342177-0.085.pkl'),   # fid 1.96
    'edm2-img512-xl-dino':             _preset('edm2-img512-xl-1342177-0.155.pkl'),   # fd_dinov2 45.96
    'edm2-img512-xxl-fid':             _preset('edm2-img512-xxl-0939524-0.070.pkl'),  # fid 1.91
    'edm2-img512-xxl-dino':            _preset('edm2-img512-xxl-0939524-0.150.pkl'),  # fd_dinov2 42.84

    # ImageNet-64 (pixel space), no guidance.
    'edm2-img64-s-fid':                _preset('edm2-img64-s-1073741-0.075.pkl'),     # fid 1.58
    'edm2-img64-m-fid':                _preset('edm2-img64-m-2147483-0.060.pkl'),     # fid 1.43
    'edm2-img64-l-fid':                _preset('edm2-img64-l-1073741-0.040.pkl'),     # fid 1.33
    'edm2-img64-xl-fid':               _preset('edm2-img64-xl-0671088-0.040.pkl'),    # fid 1.33

    # ImageNet-512, classifier-free guidance: the guide is the unconditional XS net at the same EMA length.
    'edm2-img512-xs-guid-fid':         _preset('edm2-img512-xs-2147483-0.045.pkl',  'edm2-img512-xs-uncond-2147483-0.045.pkl', 1.40),  # fid 2.91
    'edm2-img512-xs-guid-dino':        _preset('edm2-img512-xs-2147483-0.150.pkl',  'edm2-img512-xs-uncond-2147483-0.150.pkl', 1.70),  # fd_dinov2 79.94
    'edm2-img512-s-guid-fid':          _preset('edm2-img512-s-2147483-0.025.pkl',   'edm2-img512-xs-uncond-2147483-0.025.pkl', 1.40),  # fid 2.23
    'edm2-img512-s-guid-dino':         _preset('edm2-img512-s-2147483-0.085.pkl',   'edm2-img512-xs-uncond-2147483-0.085.pkl', 1.90),  # fd_dinov2 52.32
    'edm2-img512-m-guid-fid':          _preset('edm2-img512-m-2147483-0.030.pkl',   'edm2-img512-xs-uncond-2147483-0.030.pkl', 1.20),  # fid 2.01
    'edm2-img512-m-guid-dino':         _preset('edm2-img512-m-2147483-0.015.pkl',   'edm2-img512-xs-uncond-2147483-0.015.pkl', 2.00),  # fd_dinov2 41.98
    'edm2-img512-l-guid-fid':          _preset('edm2-img512-l-1879048-0.015.pkl',   'edm2-img512-xs-uncond-2147483-0.015.pkl', 1.20),  # fid 1.88
    'edm2-img512-l-guid-dino':         _preset('edm2-img512-l-1879048-0.035.pkl',   'edm2-img512-xs-uncond-2147483-0.035.pkl', 1.70),  # fd_dinov2 38.20
    'edm2-img512-xl-guid-fid':         _preset('edm2-img512-xl-1342177-0.020.pkl',  'edm2-img512-xs-uncond-2147483-0.020.pkl', 1.20),  # fid 1.85
    'edm2-img512-xl-guid-dino':        _preset('edm2-img512-xl-1342177-0.030.pkl',  'edm2-img512-xs-uncond-2147483-0.030.pkl', 1.70),  # fd_dinov2 35.67
    'edm2-img512-xxl-guid-fid':        _preset('edm2-img512-xxl-0939524-0.015.pkl', 'edm2-img512-xs-uncond-2147483-0.015.pkl', 1.20),  # fid 1.81
    'edm2-img512-xxl-guid-dino':       _preset('edm2-img512-xxl-0939524-0.015.pkl', 'edm2-img512-xs-uncond-2147483-0.015.pkl', 1.70),  # fd_dinov2 33.09

    # Autoguidance: the guide is a smaller, shorter-trained version of the same task.
    'edm2-img512-s-autog-fid':         _preset('edm2-img512-s-2147483-0.070.pkl',   'edm2-img512-xs-0134217-0.125.pkl', 2.10),         # fid 1.34
    'edm2-img512-s-autog-dino':        _preset('edm2-img512-s-2147483-0.120.pkl',   'edm2-img512-xs-0134217-0.165.pkl', 2.45),         # fd_dinov2 36.67
    'edm2-img512-xxl-autog-fid':       _preset('edm2-img512-xxl-0939524-0.075.pkl', 'edm2-img512-m-0268435-0.155.pkl', 2.05),          # fid 1.25
    'edm2-img512-xxl-autog-dino':      _preset('edm2-img512-xxl-0939524-0.130.pkl', 'edm2-img512-m-0268435-0.205.pkl', 2.30),          # fd_dinov2 24.18
    'edm2-img512-s-uncond-autog-fid':  _preset('edm2-img512-s-uncond-2147483-0.070.pkl', 'edm2-img512-xs-uncond-0134217-0.110.pkl', 2.85),  # fid 3.86
    'edm2-img512-s-uncond-autog-dino': _preset('edm2-img512-s-uncond-2147483-0.090.pkl', 'edm2-img512-xs-uncond-0134217-0.125.pkl', 2.90),  # fd_dinov2 90.39
    'edm2-img64-s-autog-fid':          _preset('edm2-img64-s-1073741-0.045.pkl',    'edm2-img64-xs-0134217-0.110.pkl', 1.70),          # fid 1.01
    'edm2-img64-s-autog-dino':         _preset('edm2-img64-s-1073741-0.105.pkl',    'edm2-img64-xs-0134217-0.175.pkl', 2.20),          # fd_dinov2 31.85
}

#----------------------------------------------------------------------------
# Per-seed randomness. Every seed owns a torch.Generator seeded with seed mod 2^32, and row i of a batch-shaped draw
# comes from generator i alone, exactly what a batch of that one seed would draw. So an image depends on its seed,
# never on which seeds share its batch or process.

class StackedRandomGenerator:
    """Batch-shaped random draws, one row per seed (randn, randn_like, randint, like the torch functions)."""

    def __init__(self, device, seeds):
        self.generators = [torch.Generator(device).manual_seed(int(s) % 2**32) for s in seeds]

    def _rows(self, size, draw):
        """Stack draw(row_shape, generator) over the seeds; size[0] must be the number of seeds."""
        size = list(size)
        if not size or size[0] != len(self.generators):
            raise ValueError(f'draws of shape {size} do not have one row for each of the {len(self.generators)} seeds')
        return torch.stack([draw(size[1:], g) for g in self.generators])

    def randn(self, size, **kwargs):
        return self._rows(size, lambda shape, g: torch.randn(shape, generator=g, **kwargs))

    def randn_like(self, input):
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, *args, size, **kwargs):
        return self._rows(size, lambda shape, g: torch.randint(*args, size=shape, generator=g, **kwargs))

#----------------------------------------------------------------------------
# Output files: <outdir>/<seed:06d>.png, or with subdirs <outdir>/<floor(seed/1000)*1000:06d>/<seed:06d>.png.
# Written atomically, so an interrupted run never leaves a truncated PNG under its final name.

def image_path(outdir, seed, subdirs=False):
    folder = os.path.join(outdir, f'{seed // 1000 * 1000:06d}') if subdirs else outdir
    return os.path.join(folder, f'{seed:06d}.png')

def _to_pil(image):
    """uint8 CHW array (1 or 3 channels) → PIL image."""
    image = np.asarray(image)
    if image.shape[0] == 1:
        return PIL.Image.fromarray(image[0], 'L')
    if image.shape[0] == 3:
        return PIL.Image.fromarray(image.transpose(1, 2, 0), 'RGB')
    raise ValueError(f'cannot save an image with {image.shape[0]} channels as PNG (expected 1 or 3)')

def save_png(path, image):
    with dnnlib.util.atomic_write(path) as f:
        _to_pil(image).save(f, format='png')

#----------------------------------------------------------------------------
# Sample grid (beyond EDM2): one row per class, or near-square; drawn by figures/grids.py.

from figures.grids import grid_layout, make_grid  # noqa: E402  pylint: disable=wrong-import-position,unused-import

#----------------------------------------------------------------------------
# Latent networks (EDM2's ImageNet-512 models) decode their samples with the Stable Diffusion VAE, which needs the
# diffusers package. Whether a network does is decided before anything is loaded: by the file name of EDM2's
# published models, or by the class name of the encoder stored in the file, read without running the file's code.
# A missing diffusers and one that is installed but does not import get different messages (encoders.diffusers_problem).

class MissingPackageError(ImportError):
    """The work asked for needs a package that is not installed or does not import; the message is one line with the
    install command."""

def _vae_error(name, problem):
    return MissingPackageError(f'{name}: its samples are Stable Diffusion VAE latents, and decoding them {problem}')

def _diffusers_problem():
    return encoders.diffusers_problem()

_STRING_OPS = ('SHORT_BINUNICODE', 'BINUNICODE', 'BINUNICODE8', 'UNICODE')

def _pickled_encoder_name(f):
    """Class name of the first encoder in a snapshot pickle, read with pickletools (nothing is run); None when the
    network comes first or there is none. Persistent objects store their class as the 'class_name' entry of a dict,
    so the name is the string that follows that key; strings seen before are referenced through the memo."""
    memo, previous = {}, None
    for op, arg, _pos in pickletools.genops(f):
        if op.name == 'MEMOIZE':
            memo[len(memo)] = previous
            continue
        if op.name in ('PUT', 'BINPUT', 'LONG_BINPUT'):
            memo[arg] = previous
            continue
        value = arg if op.name in _STRING_OPS else memo.get(arg) if op.name in ('GET', 'BINGET', 'LONG_BINGET') else None
        if previous == 'class_name' and isinstance(value, str):
            if value.endswith('Encoder'):
                return value
            if value == 'Precond':
                return None
        previous = value
    return None

def stored_encoder_name(path):
    """Class name of the encoder a local network file stores (snapshot pickle or weights-only .pt), or None."""
    try:
        with open(path, 'rb') as f:
            if f.read(2) != b'PK':
                f.seek(0)
                return _pickled_encoder_name(f)
        with zipfile.ZipFile(path) as z:  # weights-only: the architecture is JSON inside the archive's data.pkl
            data = z.read(next(n for n in z.namelist() if n.rsplit('/', 1)[-1] == 'data.pkl'))
        m = re.search(rb'training\.encoders\.(\w+)', data)
        return m.group(1).decode() if m else None
    except Exception:  # pylint: disable=broad-except  (unreadable files are reported by the loader itself)
        return None

def require_decoder(net, name=None):
    """Raise MissingPackageError (naming `name`, default the path) if the network at `net` (path or URL) makes
    latents that only the Stable Diffusion VAE decodes and diffusers is missing or broken. A file is read only up to
    its encoder (stored first in snapshots); a module, or a file that does not tell, is checked by generate_images
    once its encoder is known, before the encoder is set up."""
    if not isinstance(net, (str, os.PathLike)):
        return
    net = os.fspath(net)
    if dnnlib.util.is_url(net):
        latent = os.path.basename(net).startswith('edm2-img512-')
    else:
        latent = os.path.isfile(net) and stored_encoder_name(net) == 'StabilityVAEEncoder'
    problem = _diffusers_problem() if latent else None  # only then: importing diffusers takes a second or two
    if problem is not None:
        raise _vae_error(name or net, problem)

#----------------------------------------------------------------------------
# The generator.

def _default_device(net):
    params = getattr(net, 'parameters', None)
    if callable(params):
        for p in params():
            return p.device
    return dist.device()

def _rank0_first(fn):
    """Run fn() on rank 0, then on the other ranks (one download, then cache hits). Rank 0 releases the others
    even when it fails, so a bad path ends every process instead of leaving them waiting."""
    if dist.get_rank() != 0:
        dist.barrier()
    try:
        return fn()
    finally:
        if dist.get_rank() == 0:
            dist.barrier()

def _load(path, role, device, verbose):
    """Return (network, snapshot) for a path/URL, or (module, None) for a module."""
    if not isinstance(path, (str, os.PathLike)):
        return path, None
    path = os.fspath(path)
    if verbose:
        print(f'Loading {role} network from {path} ...')
    # open_url's own messages ("Downloading ...") matter only for URLs.
    snapshot = _rank0_first(lambda: loading.load_snapshot(path, verbose=(verbose and dnnlib.util.is_url(path))))
    return snapshot.ema.to(device), snapshot

# Each seed's generator is seeded with seed mod 2^32 (as in EDM2), so seeds beyond this repeat smaller ones: the
# command-line tools take seeds 0..MAX_SEED only.
MAX_SEED = 2**32 - 1

def check_seeds(seeds):
    """Seeds name the output files: refuse a seed given twice (its image would be written, or measured, twice)."""
    twice = cli.first_duplicate(seeds)
    if twice is not None:
        raise ValueError(f'seed {twice} is given twice; every seed names one image')

def check_guide(net, gnet, name):
    """A guiding network must take the main network's inputs: same resolution and channels, and the same labels or
    none (classifier-free guidance by an unconditional network). NetworkFileError naming `name` otherwise."""
    for attr, what in (('img_resolution', 'resolution'), ('img_channels', 'channel count')):
        if getattr(gnet, attr, None) != getattr(net, attr, None):
            raise loading.NetworkFileError(f'{name}: the guiding network\'s {what} is {getattr(gnet, attr, None)}, the '
                                           f'main network\'s {getattr(net, attr, None)}; it cannot guide it')
    labels, guide_labels = getattr(net, 'label_dim', 0), getattr(gnet, 'label_dim', 0)
    if guide_labels not in (0, labels):
        raise loading.NetworkFileError(f'{name}: the guiding network has {guide_labels} classes, the main network '
                                       f'{labels}; a guide needs the same classes or none')

def _edm2_ops(*nets):
    """Context in which the given networks run EDM2's exact op sequence: the `reference_mode()` of each network's
    module (networks.edm2plus has one; a network without a faster path needs none)."""
    stack = contextlib.ExitStack()
    for module in dict.fromkeys(sys.modules.get(type(net).__module__) for net in nets):
        mode = getattr(module, 'reference_mode', None)
        if mode is not None:
            stack.enter_context(mode())
    return stack

def generate_images(net, gnet=None, encoder=None, outdir=None, subdirs=False, seeds=range(16, 24), class_idx=None,
                    max_batch_size=32, encoder_batch_size=4, verbose=True, device=None, grid=None, vae=None,
                    sampler_fn=edm_sampler, edm2_exact=False, compile=False, **sampler_kwargs):
    """Return an iterable of EasyDict(images, labels, noise, batch_idx, num_batches, indices, seeds), one per batch.

    net, gnet:          main and guiding network, each a module or the path/URL of a network file. The guide is
                        loaded only when guidance != 1; without one the main net guides itself.
    encoder:            turns samples into uint8 images; default: the one stored with `net`, else StandardRGBEncoder.
    outdir, subdirs:    write <outdir>/[<thousands>/]<seed:06d>.png; None writes nothing.
    seeds:              one image per seed (list, range or text such as '0-63').
    class_idx:          None = a random class per seed; an int = that class; a list = its classes in turn.
    max_batch_size:     largest batch of one process; encoder_batch_size: images per call of the encoder's decoder
                        (the VAE), if it has one. Every call gets that many (the last one padded), so an image
                        is the same whatever max_batch_size.
    vae:                the VAE that decodes a latent network's samples (local folder or hub name) instead of the
                        one its snapshot names; ignored for pixel-space networks.
    verbose:            status lines (rank 0 only).
    device:             None = the device of `net`, else CUDA when available, else CPU.
    grid:               path of one PNG with every image (rows by class when several are given), written by rank 0.
    sampler_fn:         sampler(net, noise, labels, gnet, randn_like, **sampler_kwargs); sampler_kwargs are its
                        options (num_steps, sigma_min, sigma_max, rho, guidance, guidance_interval, S_*).
    edm2_exact:         run the networks with EDM2's exact op sequence (their reference path) instead of the
                        default fast path: slower, but bit-identical to EDM2's own results.
    compile:            run the networks through torch.compile (inductor fuses the reference op sequence); on CUDA
                        in 'reduce-overhead' mode, which replays each batch's network call as a CUDA graph. Every
                        full batch has the same shapes, so it compiles once (plus once for a smaller last batch).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    verbose = verbose and rank == 0
    seeds = parse_int_list(seeds)
    check_seeds(seeds)
    if max_batch_size < 1:
        raise ValueError(f'max_batch_size must be at least 1, got {max_batch_size}')
    if sampler_fn in (edm_sampler, euler_sampler):
        check_sampler_options(**sampler_kwargs)  # before any network is loaded
    net_name = os.fspath(net) if isinstance(net, (str, os.PathLike)) else 'the network'
    if encoder is None:
        require_decoder(net)

    # Networks and encoder. A guide is only loaded when it will be evaluated.
    if device is None:
        device = _default_device(net) if not isinstance(net, (str, os.PathLike)) else _default_device(None)
    device = torch.device(device)
    net, snapshot = _load(net, 'main', device, verbose)
    if sampler_kwargs.get('guidance', 1) == 1:
        gnet = None
    gnet_name = os.fspath(gnet) if isinstance(gnet, (str, os.PathLike)) else 'the guiding network'
    gnet, _ = _load(gnet, 'guiding', device, verbose)
    if gnet is None:
        gnet = net
    check_guide(net, gnet, gnet_name)
    run_net, run_gnet = net, gnet
    if compile:
        mode = 'reduce-overhead' if device.type == 'cuda' else None
        run_net = torch.compile(net, mode=mode, dynamic=False)
        run_gnet = run_net if gnet is net else torch.compile(gnet, mode=mode, dynamic=False)
    if encoder is None and snapshot is not None:
        encoder = snapshot.get('encoder', None)
    if encoder is None:
        encoder = encoders.StandardRGBEncoder()
    if vae is not None and hasattr(encoder, 'vae_name'):
        if encoder.vae_name != vae:  # an encoder passed in again (a sweep's points) keeps the VAE it has loaded
            encoder.vae_name, encoder._vae = vae, None  # pylint: disable=protected-access  (loaded anew by init)
    elif vae is not None and verbose:
        print(f'Note: the network works in pixel space ({type(encoder).__name__}); --vae is not used')
    if type(encoder).__name__ == 'StabilityVAEEncoder':
        problem = _diffusers_problem()
        if problem is not None:
            raise _vae_error(net_name, problem)  # before init() would fail on the import
    if verbose:
        with_vae = f' with VAE {encoder.vae_name}' if hasattr(encoder, 'vae_name') else ''
        print(f'Setting up {type(encoder).__name__}{with_vae}...')
    if hasattr(encoder, 'batch_size'):
        encoder.batch_size = encoder_batch_size
    if hasattr(encoder, 'init'):
        _rank0_first(lambda: encoder.init(device))  # a hub VAE is downloaded once, then read from the cache

    # Classes: checked here, so a wrong option fails before any work is done.
    label_dim = getattr(net, 'label_dim', 0)
    classes = None
    if class_idx is not None:
        classes = parse_int_list(class_idx) if isinstance(class_idx, (str, list, tuple, range)) else [int(class_idx)]
        if label_dim == 0:
            raise ValueError('a class was given, but the network is unconditional (label_dim = 0)')
        if not classes:
            raise ValueError('the list of classes is empty')
        for c in classes:
            if not 0 <= c < label_dim:
                raise ValueError(f'class {c} is out of range: the network has {label_dim} classes (0-{label_dim - 1})')
        classes = [classes[i % len(classes)] for i in range(len(seeds))]  # classes in turn, by position in the list

    # Batches: near-equal contiguous chunks of the seed list, dealt to the ranks in turn, so that every rank runs
    # the same number of batches (some possibly empty).
    num_batches = max(math.ceil(len(seeds) / (max_batch_size * world)), 1) * world
    rank_batches = np.array_split(np.arange(len(seeds)), num_batches)[rank::world]
    # Requests that cannot fit, refused before the first batch: a batch holds at least the noise, the sample and
    # the Heun step's three other tensors of the same size; the grid all images at once.
    batch = max((len(b) for b in rank_batches), default=0)
    image_bytes = 4 * net.img_channels * net.img_resolution ** 2
    misc.check_fits_memory(batch * image_bytes * 5, f'A batch of {batch} images (--batch)', device)
    if grid is not None and rank == 0:
        misc.check_fits_memory(len(seeds) * image_bytes // 4 * 2, f'A grid of {len(seeds)} images (--grid)')
    if verbose:
        print(f'Generating {len(seeds)} images...')

    def run():
        grid_images = {}
        for batch_idx, indices in enumerate(rank_batches):
            r = dnnlib.EasyDict(images=None, labels=None, noise=None, batch_idx=batch_idx,
                                num_batches=len(rank_batches), indices=indices, seeds=[seeds[i] for i in indices])
            if len(indices) > 0:
                # Each seed's generator draws its noise, then its class, then (inside the sampler) any churn noise.
                rnd = StackedRandomGenerator(device, r.seeds)
                r.noise = rnd.randn([len(indices), net.img_channels, net.img_resolution, net.img_resolution], device=device)
                if label_dim > 0:
                    drawn = rnd.randint(label_dim, size=[len(indices)], device=device)
                    if classes is not None:  # The draw above still happens, so the stream stays the same.
                        drawn = torch.as_tensor([classes[i] for i in indices], device=device)
                    r.labels = torch.eye(label_dim, device=device)[drawn]
                with torch.no_grad(), (_edm2_ops(net, gnet) if edm2_exact else contextlib.nullcontext()):
                    latents = sampler_fn(net=run_net, noise=r.noise, labels=r.labels, gnet=run_gnet,
                                         randn_like=rnd.randn_like, **sampler_kwargs)
                    finite = torch.isfinite(latents.flatten(1)).all(dim=1).cpu()
                    r.images = encoder.decode(latents) if finite.all() else None
            else:
                finite = torch.ones([0], dtype=torch.bool)
            # Every rank learns whether any sample anywhere is NaN/Inf (instead of a barrier), so all stop together
            # before such an image is written or measured: it would be saved as a black PNG without a word.
            _stop_on_non_finite(finite, r.seeds, net_name)
            if len(indices) > 0:
                if outdir is not None or grid is not None:
                    images = r.images.cpu().numpy()
                    for seed, idx, image in zip(r.seeds, indices, images):
                        if outdir is not None:
                            save_png(image_path(outdir, seed, subdirs), image)
                        if grid is not None:
                            grid_images[int(idx)] = image
            yield r
        if grid is not None:
            _write_grid(grid, grid_images, grid_layout(len(seeds), classes))

    return misc.SizedIterable(run(), len(rank_batches))

def _stop_on_non_finite(finite, seeds, net_name):
    """ValueError on every rank if any rank's batch holds a sample with a NaN or infinite value (naming the first
    such seed of all ranks); also the per-batch meeting point of the ranks."""
    bad = [seed for seed, ok in zip(seeds, finite.tolist()) if not ok]
    first_bad = torch.tensor([min(bad) if bad else MAX_SEED + 1], dtype=torch.int64)
    if dist.is_distributed():
        if torch.distributed.get_backend() == 'nccl':
            first_bad = first_bad.cuda()
        torch.distributed.all_reduce(first_bad, op=torch.distributed.ReduceOp.MIN)
    first_bad = int(first_bad.item())
    if first_bad <= MAX_SEED:
        raise ValueError(f'{net_name}: the sampler produced NaN or infinite values for seed {first_bad}; nothing of '
                         'that batch was written (check the network and the sampler options)')

def _write_grid(path, grid_images, rows):
    """Collect every rank's images on rank 0 and write the grid there."""
    if dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        torch.distributed.all_gather_object(parts, grid_images)
        grid_images = {k: v for part in parts for k, v in part.items()}
    if dist.get_rank() == 0 and grid_images:
        save_png(path, make_grid(grid_images, rows))
