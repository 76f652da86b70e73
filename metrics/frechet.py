"""Fréchet distance between two Gaussians, the formula behind FID and FD_DINOv2 (docs/compatibility.md §8)."""

import warnings

import numpy as np
import scipy.linalg

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2·(Σ₁Σ₂)^½), computed in float64; returns the real part as a Python float.

    The matrix square root is scipy.linalg.sqrtm called without its `disp` argument (deprecated in SciPy 1.16,
    removed in 1.18), so it returns only the root. For nearly singular covariances the root can come back with
    tiny imaginary parts from rounding; like EDM2 we keep the real part of the whole expression.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    dim = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.ndim != 1 or mu2.shape != mu1.shape or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(f'frechet_distance: mismatched shapes mu {mu1.shape}/{mu2.shape}, '
                         f'sigma {sigma1.shape}/{sigma2.shape}')
    mean_term = np.square(mu1 - mu2).sum()
    with warnings.catch_warnings():
        # Covariances of fewer images than features are singular; EDM2 (disp=False) computes on silently.
        warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(np.dot(sigma1, sigma2))
    fd = mean_term + np.trace(sigma1 + sigma2 - 2 * root)
    return float(np.real(fd))
