"""Encoders between dataset pixels and the space the network is trained in (spec §6.2, §6.3).

An encoder has three steps: `encode_pixels` (run once, when a dataset is built: uint8 pixels -> stored values),
`encode_latents` (run on every training batch: stored values -> network space) and `decode` (network space ->
uint8 pixels).

The full source text of this module is embedded in every snapshot pickle (torch_utils/persistence.py, spec §7.1)
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
# Common interface. Instances are pickled with their attribute dict (spec §6.3).

class Encoder:
    def __init__(self):
        pass

    def init(self, device):
        """Prepare for use on `device` (load weights, move them); a no-op for encoders without weights."""
        pass

    def __getstate__(self):
        return self.__dict__

    def encode(self, x):
        """uint8 pixels [N,C,H,W] -> network space."""
        return self.encode_latents(self.encode_pixels(x))

    def encode_pixels(self, x):
        """uint8 pixels -> the values stored in a dataset."""
        raise NotImplementedError

    def encode_latents(self, x):
        """Stored dataset values -> network space."""
        raise NotImplementedError

    def decode(self, x):
        """Network space -> uint8 pixels [N,C,H,W]."""
        raise NotImplementedError

#----------------------------------------------------------------------------
# Plain RGB: the dataset stores pixels and the network sees them scaled to [-1, 1] (spec §6.2).

@persistence.persistent_class
class StandardRGBEncoder(Encoder):
    def __init__(self):
        super().__init__()

    def encode_pixels(self, x):
        return x

    def encode_latents(self, x):
        # [0, 255] -> [-1, 1].
        return x.to(torch.float32) / 127.5 - 1

    def decode(self, x):
        # Inverse map with round-half-up: adding 128 (not 127.5) before the truncating uint8 cast rounds
        # x*127.5 + 127.5 to the nearest integer, halves upwards (spec §6.2).
        return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)

#----------------------------------------------------------------------------
# Stable Diffusion VAE latents (spec §6.3). The dataset stores the posterior mean and standard deviation
# (8 channels); every training step samples a latent from that posterior and maps it affinely so that each
# channel has mean `final_mean` and standard deviation `final_std` over ImageNet-512.

@persistence.persistent_class
class StabilityVAEEncoder(Encoder):
    def __init__(self,
        vae_name    = 'stabilityai/sd-vae-ft-mse',     # Name of the diffusers AutoencoderKL.
        raw_mean    = [5.81, 3.25, 0.12, -2.15],       # Per-channel mean of the raw latents (pixels in [0,1]).
        raw_std     = [4.17, 4.62, 3.71, 3.28],        # Per-channel standard deviation of the raw latents.
        final_mean  = 0,                               # Mean of the latents the network sees.
        final_std   = 0.5,                             # Standard deviation of the latents the network sees.
        batch_size  = 8,                               # Images per VAE call.
    ):
        super().__init__()
        self.vae_name = vae_name
        # Computed in float32 as numpy arrays, so the stored numbers equal EDM2's bit for bit (spec §6.3).
        self.scale = np.float32(final_std) / np.float32(raw_std)
        self.bias = np.float32(final_mean) - np.float32(raw_mean) * self.scale
        self.batch_size = int(batch_size)
        self._vae = None # Loaded on first use; never pickled.

    def init(self, device):
        super().init(device)
        if self._vae is None:
            self._vae = load_stability_vae(self.vae_name, device=device)
        else:
            self._vae.to(device)

    def __getstate__(self):
        return dict(super().__getstate__(), _vae=None)

    def _run_vae_encoder(self, x):
        posterior = self._vae.encode(x)['latent_dist']
        return torch.cat([posterior.mean, posterior.std], dim=1)

    def _run_vae_decoder(self, x):
        return self._vae.decode(x)['sample']

    def _channel_const(self, array, x):
        return torch.as_tensor(array, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)

    def encode_pixels(self, x):
        # uint8 [N,3,H,W] -> [N,8,H/8,W/8] float32 (4 posterior means, then 4 standard deviations). The VAE is fed
        # pixels in [0,1], not its training range [-1,1]: every released EDM2 latent model and the raw_mean/raw_std
        # constants belong to that convention (spec §6.3, §9 NVlabs/edm2#9).
        self.init(x.device)
        x = x.to(torch.float32) / 255
        with torch.no_grad():
            return torch.cat([self._run_vae_encoder(batch) for batch in x.split(self.batch_size)])

    def encode_latents(self, x):
        # Sample z = mean + std * eps from the stored posterior (fresh noise from the global torch RNG every
        # call), then apply the per-channel affine map.
        mean, std = x.to(torch.float32).chunk(2, dim=1)
        z = mean + torch.randn_like(mean) * std
        return z * self._channel_const(self.scale, z) + self._channel_const(self.bias, z)

    def decode(self, x):
        # Undo the affine map, run the VAE decoder, [0,1] -> uint8 with truncation (spec §6.3).
        self.init(x.device)
        x = x.to(torch.float32)
        x = (x - self._channel_const(self.bias, x)) / self._channel_const(self.scale, x)
        with torch.no_grad():
            x = torch.cat([self._run_vae_decoder(batch) for batch in x.split(self.batch_size)])
        return x.clamp(0, 1).mul(255).to(torch.uint8)

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
