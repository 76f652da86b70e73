"""Encoders between dataset pixels and the space the network is trained in.

An encoder has three steps: `encode_pixels` (run once, when a dataset is built: uint8 pixels -> stored values),
`encode_latents` (run on every training batch: stored values -> network space) and `decode` (network space ->
uint8 pixels).

The full source text of this module is embedded in every snapshot pickle (torch_utils/persistence.py)
and executed when the pickle is loaded, possibly by EDM2's own code. It must therefore stay self-contained: import
only the standard library, numpy, torch, dnnlib and torch_utils.persistence here; diffusers is imported lazily,
by `diffusers_problem` and `load_stability_vae`, when a VAE is really needed.
"""

import importlib.metadata
import importlib.util
import os
import re
import warnings

import numpy as np
import torch

import dnnlib
from torch_utils import persistence

#----------------------------------------------------------------------------
# Common interface. Instances are pickled with their attribute dict.

def _per_channel(values, like):
    """A float32 numpy vector as a [1, C, 1, 1] tensor on the device of `like`."""
    return torch.as_tensor(values, dtype=torch.float32, device=like.device).reshape(1, -1, 1, 1)

def _in_chunks(fn, x, batch_size):
    """fn applied to slices of `batch_size` images, without autograd, results joined along the batch. A short last
    slice is padded with zeros (the padding's results are dropped): library kernels round differently at different
    batch sizes (on a CPU, at batch 1 and at odd sizes), so every call gets the same size, and an image's result
    does not depend on how many images came with it."""
    results = []
    with torch.no_grad():
        for part in torch.split(x, batch_size):
            count = part.shape[0]
            if count < batch_size:
                part = torch.cat([part, part.new_zeros([batch_size - count, *part.shape[1:]])])
            results.append(fn(part)[:count])
    return torch.cat(results)

class Encoder:
    """Base of the encoders: subclasses define `encode_pixels`, `encode_latents` and `decode` (module docstring);
    `init(device)` loads whatever weights they need."""

    def init(self, device):  # pylint: disable=unused-argument
        return None

    def encode(self, x):
        return self.encode_latents(self.encode_pixels(x))

    def __getstate__(self):
        return self.__dict__

#----------------------------------------------------------------------------
# Plain RGB: the dataset stores pixels and the network sees them in [-1, 1].

@persistence.persistent_class
class StandardRGBEncoder(Encoder):
    def encode_pixels(self, x):
        return x

    def encode_latents(self, x):
        return x.float().div(127.5).sub(1)

    def decode(self, x):
        # Adding 128 rather than 127.5 before the truncating uint8 cast rounds 127.5 x + 127.5 half up.
        return x.float().mul(127.5).add(128).clip(0, 255).to(torch.uint8)

#----------------------------------------------------------------------------
# Stable Diffusion VAE latents (EDM2's ImageNet-512 models). The dataset stores the
# posterior mean and standard deviation (8 channels); every training step samples a latent from that posterior and
# maps it affinely so that each channel has mean `final_mean` and standard deviation `final_std` over ImageNet-512
# (`raw_mean`, `raw_std`: the raw latents' statistics). `vae_name` is the VAE the snapshot decodes with: a Hugging
# Face hub name or a local folder written by diffusers' `save_pretrained`.

DEFAULT_VAE = 'stabilityai/sd-vae-ft-mse'

@persistence.persistent_class
class StabilityVAEEncoder(Encoder):
    def __init__(self, vae_name=DEFAULT_VAE, raw_mean=(5.81, 3.25, 0.12, -2.15),
                 raw_std=(4.17, 4.62, 3.71, 3.28), final_mean=0, final_std=0.5, batch_size=8):
        self.vae_name = vae_name
        # float32 numpy arithmetic, so that the pickled constants equal EDM2's bit for bit.
        raw_mean, raw_std = np.asarray(raw_mean, dtype=np.float32), np.asarray(raw_std, dtype=np.float32)
        self.scale = np.float32(final_std) / raw_std
        self.bias = np.float32(final_mean) - raw_mean * self.scale
        self.batch_size = int(batch_size)  # Images per VAE call.
        self._vae = None                   # Loaded on first use; never pickled.

    def init(self, device):
        if self._vae is not None:
            self._vae.to(device)
        else:
            self._vae = load_stability_vae(self.vae_name, device=device)

    def __getstate__(self):
        return {**super().__getstate__(), '_vae': None}

    def encode_pixels(self, x):
        # uint8 [N,3,H,W] -> float32 [N,8,H/8,W/8]: 4 posterior means, then 4 standard deviations. The VAE gets
        # pixels in [0,1], not its training range [-1,1]: the raw_mean/raw_std constants and every released EDM2
        # latent model belong to that convention.
        self.init(x.device)
        def posterior(images):
            dist = self._vae.encode(images)['latent_dist']
            return torch.cat([dist.mean, dist.std], dim=1)
        return _in_chunks(posterior, x.float() / 255, self.batch_size)

    def encode_latents(self, x):
        # A fresh sample of the stored posterior at every call (noise from the global torch RNG), then the affine map.
        mean, std = torch.chunk(x.float(), 2, dim=1)
        z = mean + std * torch.randn_like(mean)
        return z * _per_channel(self.scale, z) + _per_channel(self.bias, z)

    def decode(self, x):
        # Inverse affine map, VAE decoder, [0,1] -> uint8 by truncation.
        self.init(x.device)
        x = x.float()
        z = (x - _per_channel(self.bias, x)) / _per_channel(self.scale, x)
        images = _in_chunks(lambda part: self._vae.decode(part)['sample'], z, self.batch_size)
        return images.clamp(0, 1).mul(255).to(torch.uint8)

#----------------------------------------------------------------------------
# The diffusers package. `diffusers_problem()` tells a missing package from one that is installed but does not
# import (typically a diffusers release too old for the installed huggingface_hub); the install command names the
# versions of pyproject.toml's `latent` extra.

DIFFUSERS_INSTALL = 'pip install diffusers==0.42.1 huggingface_hub==2.4.0'

def _first_line(e):
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f'{type(e).__name__}: {lines[0]}' if lines else type(e).__name__

def _hf_environment():
    # The hub's settings are read when huggingface_hub is imported: set them before diffusers imports it.
    os.environ.setdefault('HF_HUB_DISABLE_SYMLINKS_WARNING', '1')
    os.environ.setdefault('HF_HUB_DISABLE_PROGRESS_BARS', '1')
    if 'HF_HOME' not in os.environ:  # only then: the cache path is checked to be private, and may be refused
        os.environ['HF_HOME'] = dnnlib.make_cache_dir_path('diffusers')

def diffusers_problem():
    """None if diffusers' AutoencoderKL can be used; otherwise the rest of a sentence that begins with what needs it
    ("... needs the diffusers package, which is not installed: pip install ...")."""
    try:
        installed = importlib.util.find_spec('diffusers') is not None
    except (ImportError, ValueError):  # a parent entry that is not a package, or a None left in sys.modules
        installed = True
    if not installed:
        return f'needs the diffusers package, which is not installed: {DIFFUSERS_INSTALL}'
    _hf_environment()
    try:
        import diffusers  # pylint: disable=import-outside-toplevel
        diffusers.AutoencoderKL  # pylint: disable=pointless-statement  (diffusers imports its models lazily)
    except Exception as e:  # pylint: disable=broad-except
        versions = []
        for package in ('diffusers', 'huggingface_hub'):
            try:
                versions.append(f'{package} {importlib.metadata.version(package)}')
            except importlib.metadata.PackageNotFoundError:
                versions.append(f'no {package}')
        return (f'needs the diffusers package, which is installed ({", ".join(versions)}) but cannot be imported '
                f'({_first_line(e)}); install versions that work together: {DIFFUSERS_INSTALL}')
    return None

#----------------------------------------------------------------------------
# Where a VAE comes from: a local folder (never any network access) or a name on the Hugging Face hub (the local
# cache first, so that a machine without internet access works once the weights are there).

class VAEError(RuntimeError):
    """The VAE cannot be found or loaded. The message, one line, is `VAE <name>: <reason>`; tools that took the name
    from an option show `<option>=<name>: <reason>`."""

    def __init__(self, name, reason):
        super().__init__(f'VAE {name}: {reason}')
        self.name, self.reason = name, reason

_HUB_NAME = re.compile(r'[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?')

def vae_location(vae_name):
    """('folder', absolute path) for a local folder, ('hub', name) for a hub name. Raises VAEError for a path that
    is not a VAE folder. Needs neither diffusers nor the network: tools check --vae with it before any work."""
    name = os.fspath(vae_name)
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, 'config.json')):
            raise VAEError(name, 'not a diffusers VAE folder (it has no config.json; write one with '
                                 'AutoencoderKL.save_pretrained)')
        return 'folder', os.path.abspath(path)
    if os.path.lexists(path):
        raise VAEError(name, 'not a folder (a VAE is a folder written by AutoencoderKL.save_pretrained)')
    if os.path.isabs(path) or name.startswith(('.', '~')) or not _HUB_NAME.fullmatch(name):
        raise VAEError(name, 'no such folder')
    return 'hub', name

def vae_record_name(vae_name):
    """The name under which a VAE is stored (dataset.json, encoder_kwargs) and loaded again: a folder as its absolute
    path, so that it does not depend on the working directory; a hub name as given. Raises VAEError like
    vae_location."""
    kind, where = vae_location(vae_name)
    return where if kind == 'folder' else vae_name

def vae_option_problem(vae):
    """None when a tool's --vae (None: not given) may name a VAE, else the one line `--vae=<vae>: <reason>`; the
    tools ask before any work, as vae_location needs neither diffusers nor the network."""
    if vae is not None:
        try:
            vae_location(vae)
        except VAEError as e:
            return vae_error_line(e, vae)
    return None

def vae_error_line(e, vae, named_by=None):
    """The one line a tool shows for the VAEError `e`: `--vae=<vae>: <reason>` when the tool was given --vae (`vae`),
    else `<named_by>, <name>: <reason>`, `named_by` saying where the name came from (`--net=X: the VAE it names`)."""
    where = f'--vae={vae}' if vae is not None else f'{named_by}, {e.name}'
    return f'{where}: {e.reason}'

def _offline():
    return os.environ.get('HF_HUB_OFFLINE', '').strip().upper() in ('1', 'ON', 'YES', 'TRUE')

def load_stability_vae(vae_name=DEFAULT_VAE, device=torch.device('cpu')):
    """A diffusers AutoencoderKL in eval mode without gradients, from a local folder or the hub (see above)."""
    kind, where = vae_location(vae_name)
    problem = diffusers_problem()
    if problem is not None:
        raise ImportError(f'The Stable Diffusion VAE {problem}')
    import diffusers  # pylint: disable=import-outside-toplevel
    # Without accelerate, diffusers builds the model normally (and says so at length unless asked to).
    kwargs = {} if importlib.util.find_spec('accelerate') is not None else dict(low_cpu_mem_usage=False)
    def load(**more):
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='.*local_dir_use_symlinks.*')
            return diffusers.AutoencoderKL.from_pretrained(where, **kwargs, **more)
    if kind == 'folder':
        try:
            vae = load(local_files_only=True)
        except Exception as e:  # pylint: disable=broad-except
            raise VAEError(vae_name, f'cannot be loaded ({_first_line(e)})') from None
    else:
        cache_dir = dnnlib.make_cache_dir_path('diffusers')
        advice = ('without internet access, save the VAE with AutoencoderKL.save_pretrained(FOLDER) where it can be '
                  'downloaded, copy FOLDER here and pass --vae=FOLDER')
        try:
            vae = load(cache_dir=cache_dir, local_files_only=True)
        except Exception:  # pylint: disable=broad-except
            if _offline():
                raise VAEError(vae_name, f'not in the local cache {cache_dir}, and HF_HUB_OFFLINE forbids downloading '
                               f'it; {advice}') from None
            try:
                vae = load(cache_dir=cache_dir)
            except Exception as e:  # pylint: disable=broad-except
                raise VAEError(vae_name, f'not in the local cache {cache_dir}, and the download failed '
                               f'({_first_line(e)}); {advice}') from None
    return vae.eval().requires_grad_(False).to(device)
