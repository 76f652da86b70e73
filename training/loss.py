"""EDM2's training loss: denoising score matching with a learned, noise-level-dependent uncertainty (spec §2.6).

This module's source is embedded in every network snapshot (the loss object is pickled with it), so it may only
import the standard library, numpy, torch, `torch_utils.persistence`, `torch_utils.misc` and `dnnlib`.
"""

import torch

from torch_utils import persistence

#----------------------------------------------------------------------------

@persistence.persistent_class
class EDM2Loss:
    """Per-element loss L = (lambda(sigma) / exp(u(sigma))) * (D(y + n; sigma) - y)^2 + u(sigma).

    sigma is log-normal (ln sigma ~ N(P_mean, P_std^2)), one per image; lambda(sigma) = (sigma^2 + sigma_data^2) /
    (sigma * sigma_data)^2 is EDM's weighting (Karras et al. 2022, eq. 8 with Table 1); u is the network's
    log-variance head (EDM2 paper eq. 21), which learns to equalise the loss magnitude across noise levels.
    """

    def __init__(self, P_mean=-0.4, P_std=1.0, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None):
        # Random draws in EDM2's order (spec §2.12): sigma first, then the noise.
        rnd_normal = torch.randn([images.shape[0], 1, 1, 1], device=images.device)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        noise = torch.randn_like(images) * sigma
        denoised, logvar = net(images + noise, sigma, labels, return_logvar=True)
        return (weight / logvar.exp()) * ((denoised - images) ** 2) + logvar

#----------------------------------------------------------------------------
