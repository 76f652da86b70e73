"""Power-function EMA (EDM2 paper Sec. 3): the profile mathematics and the EMA trackers used during training.

Facts implemented here are in spec ../shared/spec/edm2-compat.md §3.1-§3.4. All profile mathematics runs in float64
with NumPy because the reconstruction system of §3.4 is badly conditioned (condition number ~1e8 and more).
Reconstruction from saved snapshots lives in training/posthoc.py.
"""

import copy

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------------------
# Profile mathematics (spec §3.1, §3.3, §3.4).

def exp_to_std(exp):
    """Relative standard deviation σ_rel of the power-function profile with exponent γ (spec §3.1).

    σ_rel(γ) = sqrt((γ+1) / ((γ+2)² (γ+3))). Elementwise, float64, shape preserved.
    """
    exp = np.asarray(exp, dtype=np.float64)
    return np.sqrt((exp + 1) / ((exp + 2) ** 2 * (exp + 3)))


def std_to_exp(std):
    """Exponent γ whose profile has relative standard deviation σ_rel = std (inverse of exp_to_std, spec §3.1).

    Squaring and rearranging σ_rel² = (γ+1)/((γ+2)²(γ+3)) with s = σ_rel⁻² gives the cubic
    γ³ + 7γ² + (16 − s)γ + (12 − s) = 0; the wanted solution is the root with the largest real part.
    """
    std = np.asarray(std, dtype=np.float64)
    s = 1 / std.ravel() ** 2
    exp = [np.roots([1, 7, 16 - si, 12 - si]).real.max() for si in s]
    return np.asarray(exp, dtype=np.float64).reshape(std.shape)


def power_function_response(ofs, std, len, axis=0):
    """Discrete profile of a snapshot taken at time `ofs` with σ_rel `std`, sampled at t = 0 .. len-1 (spec §3.4).

    Diagnostic helper (the tools do not use it): f(t) = (γ+1)/ofs · (t/ofs)^γ for t ≤ ofs, 0 after, normalised to
    sum 1 along `axis`. `ofs` and `std` broadcast against each other; the new time axis is inserted at `axis`.
    """
    ofs = np.asarray(ofs, dtype=np.float64)
    exp = std_to_exp(std)
    ofs, exp = np.broadcast_arrays(ofs, exp)
    ofs = np.expand_dims(ofs, axis)
    exp = np.expand_dims(exp, axis)
    shape = [1] * ofs.ndim
    shape[axis] = len
    t = np.arange(len, dtype=np.float64).reshape(shape)
    f = np.where(t <= ofs, (exp + 1) / ofs * (t / ofs) ** exp, 0)
    return f / f.sum(axis=axis, keepdims=True)


def power_function_correlation(a_ofs, a_std, b_ofs, b_std):
    """Inner product ⟨f_a, f_b⟩ = ∫ f_a(t) f_b(t) dt of two power-function profiles (spec §3.3).

    Integrating (γa+1)(γb+1) t^(γa+γb) / (Ta^(γa+1) Tb^(γb+1)) from 0 to min(Ta, Tb) gives
    (γa+1)(γb+1) (Ta/Tb)^e / ((γa+γb+1) max(Ta, Tb)) with e = γb if Ta < Tb, else e = −γa.
    Times are image counts (nimg). Inputs broadcast; float64.
    """
    a_ofs = np.asarray(a_ofs, dtype=np.float64)
    b_ofs = np.asarray(b_ofs, dtype=np.float64)
    a_exp = std_to_exp(a_std)
    b_exp = std_to_exp(b_std)
    t_ratio = a_ofs / b_ofs
    t_exp = np.where(a_ofs < b_ofs, b_exp, -a_exp)
    t_max = np.maximum(a_ofs, b_ofs)
    return (a_exp + 1) * (b_exp + 1) * t_ratio ** t_exp / ((a_exp + b_exp + 1) * t_max)


def power_function_beta(std, t_next, t_delta):
    """Per-step EMA decay β = (1 − Δ/t)^(γ+1), with t the image count after the step and Δ the batch (spec §3.2).

    With this β the EMA after n equal steps weights step k by ((k/n)^(γ+1) − ((k−1)/n)^(γ+1)), i.e. exactly the
    integral of the power-function profile over that step, so tracked snapshots match the model of §3.1.
    """
    exp = std_to_exp(std)
    return (1 - t_delta / t_next) ** (exp + 1)


def solve_posthoc_coefficients(in_ofs, in_std, out_ofs, out_std):
    """Coefficients X [n_in, n_out] such that output k ≈ Σ_i X[i,k] · input i (spec §3.4).

    Least-squares projection of each output profile onto the span of the input profiles: A = ⟨in_i, in_j⟩,
    B = ⟨in_i, out_k⟩, X = A⁻¹B, all float64. Each column is then scaled to sum to 1 so that a constant
    trajectory is reproduced exactly. `in_ofs`/`in_std` broadcast together, as do `out_ofs`/`out_std`.
    """
    in_ofs, in_std = np.broadcast_arrays(np.asarray(in_ofs, dtype=np.float64), np.asarray(in_std, dtype=np.float64))
    out_ofs, out_std = np.broadcast_arrays(np.asarray(out_ofs, dtype=np.float64), np.asarray(out_std, dtype=np.float64))
    in_ofs, in_std = in_ofs.ravel(), in_std.ravel()
    out_ofs, out_std = out_ofs.ravel(), out_std.ravel()
    A = power_function_correlation(in_ofs[:, None], in_std[:, None], in_ofs[None, :], in_std[None, :])
    B = power_function_correlation(in_ofs[:, None], in_std[:, None], out_ofs[None, :], out_std[None, :])
    X = np.linalg.solve(A, B)
    return X / X.sum(axis=0, keepdims=True)

# ----------------------------------------------------------------------------------------------------------------
# EMA tracking during training (spec §3.2). Both classes hold deep copies of the live network; `update` is called
# after every optimizer step with the image count after the step, `get` before writing snapshots.

def _check_stds(stds):
    stds = [float(s) for s in stds]
    for s in stds:
        if not 0 < s < 0.289:
            raise ValueError(f'EMA std {s}: relative standard deviation must be positive and less than 0.289')
    return stds


class PowerFunctionEMA:
    """Tracks one power-function EMA of `net` per relative standard deviation in `stds` (spec §3.2)."""

    def __init__(self, net, stds=[0.050, 0.100]):
        self.net = net
        self.stds = _check_stds(stds)
        self.emas = [copy.deepcopy(net) for _ in self.stds]

    @torch.no_grad()
    def reset(self):
        """Make every EMA equal to the live network's parameters."""
        for ema in self.emas:
            for p_net, p_ema in zip(self.net.parameters(), ema.parameters()):
                p_ema.copy_(p_net.detach())

    @torch.no_grad()
    def update(self, cur_nimg, batch_size):
        """One EMA step; `cur_nimg` is the image count after the optimizer step. Parameters only (not buffers)."""
        net_params = [p.detach() for p in self.net.parameters()]
        for std, ema in zip(self.stds, self.emas):
            beta = float(power_function_beta(std=std, t_next=cur_nimg, t_delta=batch_size))
            # One fused call per EMA instead of one kernel launch per parameter tensor.
            torch._foreach_lerp_(list(ema.parameters()), net_params, 1 - beta)

    @torch.no_grad()
    def get(self):
        """Return [(ema_net, '-0.050'), ...]; buffers are copied from the live network first."""
        for ema in self.emas:
            for b_net, b_ema in zip(self.net.buffers(), ema.buffers()):
                b_ema.copy_(b_net.detach())
        return [(ema, f'-{std:.3f}') for std, ema in zip(self.stds, self.emas)]

    def state_dict(self):
        return dict(stds=list(self.stds), emas=[ema.state_dict() for ema in self.emas])

    def load_state_dict(self, state):
        if len(state['emas']) != len(self.emas):
            raise ValueError(f'EMA state holds {len(state["emas"])} EMAs (stds {state["stds"]}), '
                             f'but this run tracks {len(self.emas)} (stds {self.stds})')
        self.stds = [float(s) for s in state['stds']]
        for ema, ema_state in zip(self.emas, state['emas']):
            ema.load_state_dict(ema_state)


class TraditionalEMA:
    """Classic exponential moving average with a half-life in millions of images and a ramp-up (spec §3.2).

    Not used by default; kept for EDM2 compatibility of configs that name it.
    """

    def __init__(self, net, halflife_Mimg=float('inf'), rampup_ratio=0.09):
        self.net = net
        self.halflife_Mimg = halflife_Mimg
        self.rampup_ratio = rampup_ratio
        self.ema = copy.deepcopy(net)

    @torch.no_grad()
    def reset(self):
        for p_net, p_ema in zip(self.net.parameters(), self.ema.parameters()):
            p_ema.copy_(p_net.detach())

    @torch.no_grad()
    def update(self, cur_nimg, batch_size):
        # Half-life h = min(halflife, ramp-up · elapsed) Mimg; β = 0.5^(Δ / h) (spec §3.2).
        halflife_Mimg = self.halflife_Mimg
        if self.rampup_ratio is not None:
            halflife_Mimg = min(halflife_Mimg, cur_nimg / 1e6 * self.rampup_ratio)
        beta = 0.5 ** (batch_size / max(halflife_Mimg * 1e6, 1e-8))
        torch._foreach_lerp_(list(self.ema.parameters()), [p.detach() for p in self.net.parameters()], 1 - beta)

    @torch.no_grad()
    def get(self):
        for b_net, b_ema in zip(self.net.buffers(), self.ema.buffers()):
            b_ema.copy_(b_net.detach())
        return [(self.ema, '')]

    def state_dict(self):
        return self.ema.state_dict()

    def load_state_dict(self, state):
        self.ema.load_state_dict(state)
