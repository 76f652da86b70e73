"""The model of the 2-D toy example (toy_example.py): a small magnitude-preserving MLP whose output is a log-density
(EDM2 paper §3, eqs. 46-47 for the forced weight normalisation).

This file is embedded, as source text, in every toy pickle (torch_utils/persistence.py): MPLinear and ToyModel are
both persistent, so a toy snapshot loads wherever torch_utils.persistence does, EDM2's environment included, without
toy_example.py. It must therefore import only numpy, torch and torch_utils.persistence.
"""

import numpy as np
import torch
from torch_utils import persistence

def _normalize(x, eps=1e-4):
    """Rows of x scaled to unit RMS (eps keeps a zero row finite)."""
    return x / (eps + x.norm(dim=1, keepdim=True) / np.sqrt(x.shape[1]))

def _mp_silu(x):
    """SiLU scaled back to unit variance for unit-normal input (EDM2 eq. 81)."""
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
    """log p(x; sigma) up to a constant: a Gaussian of the data's variance (sigma_data) plus a learned part that
    starts at zero (gain 0). The input is [x / sqrt(sigma_data^2 + sigma^2), ln(sigma) / 4, 1]."""

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
        """The gradient of log p(x; sigma) with respect to x (with `graph`, differentiable itself, for training)."""
        with torch.enable_grad():
            x = x if graph else x.detach().requires_grad_(True)
            logp = self(x, sigma)
            return torch.autograd.grad(logp.sum(), x, create_graph=graph)[0]
