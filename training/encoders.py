"""Encoders between dataset pixels and the space the network is trained in.

An encoder has three steps: `encode_pixels` (run once, when a dataset is built: uint8 pixels -> stored values),
`encode_latents` (run on every training batch: stored values -> network space) and `decode` (network space ->
uint8 pixels).

The full source text of this module is embedded in every snapshot pickle (torch_utils/persistence.py)
and executed when the pickle is loaded, possibly by EDM2's own code. It must therefore stay self-contained: import
only the standard library, numpy, torch, dnnlib and torch_utils.persistence here; diffusers is imported lazily,
inside `load_stability_vae`, when a VAE is really needed.
"""

import os

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
    """fn applied to slices of at most `batch_size` images, without autograd, results joined along the batch."""
    with torch.no_grad():
        return torch.cat([fn(part) for part in torch.split(x, batch_size)])

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
# (`raw_mean`, `raw_std`: the raw latents' statistics).

@persistence.persistent_class
class StabilityVAEEncoder(Encoder):
    def __init__(self, vae_name='stabilityai/sd-vae-ft-mse', raw_mean=(5.81, 3.25, 0.12, -2.15),
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
# Load a diffusers AutoencoderKL, from the local cache if it is there, else from the Hugging Face hub.

def load_stability_vae(vae_name='stabilityai/sd-vae-ft-mse', device=torch.device('cpu')):
    cache_dir = dnnlib.make_cache_dir_path('diffusers')
    os.environ['HF_HUB_DISABLE_SYMLINKS_WARNING'] = '1'
    os.environ['HF_HUB_DISABLE_PROGRESS_BARS'] = '1'
    os.environ['HF_HOME'] = cache_dir
    try:
        import diffusers # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError('The Stable Diffusion VAE needs the diffusers package: '
                          'pip install diffusers==0.26.3 accelerate==0.27.2') from e
    try:
        # Cached copy first, so that machines without network access work once the weights are there.
        vae = diffusers.models.AutoencoderKL.from_pretrained(vae_name, cache_dir=cache_dir, local_files_only=True)
    except Exception:
        vae = diffusers.models.AutoencoderKL.from_pretrained(vae_name, cache_dir=cache_dir)
    return vae.eval().requires_grad_(False).to(device)

#----------------------------------------------------------------------------
