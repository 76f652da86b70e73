"""EDM2's training loss: denoising score matching with a learned, noise-level-dependent uncertainty.

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
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data  # (pickled state, in this order)

    def edm_weight(self, sigma):
        """lambda(sigma) of EDM (Karras et al. 2022, Table 1)."""
        return (sigma.square() + self.sigma_data ** 2) / (sigma * self.sigma_data).square()

    def __call__(self, net, images, labels=None):
        # The global RNG is drawn twice, in this order: ln sigma per image, then the noise.
        sigma = torch.randn([len(images), 1, 1, 1], device=images.device).mul(self.P_std).add(self.P_mean).exp()
        noisy = images + torch.randn_like(images) * sigma
        denoised, logvar = net(noisy, sigma, labels, return_logvar=True)
        return (denoised - images).square().mul(self.edm_weight(sigma) / logvar.exp()).add(logvar)
