"""Power-function EMA (EDM2 paper Sec. 3): the profile mathematics and the EMA trackers used during training.

Profiles follow EDM2 paper Sec. 3.1, the reconstruction Sec. 3.2. All profile mathematics runs in float64 with NumPy
because the reconstruction's linear system is badly conditioned (condition number ~1e8 and more).
Reconstruction from saved snapshots lives in training/posthoc.py.
"""

import copy

import numpy as np
import torch

#----------------------------------------------------------------------------
# Profile mathematics (EDM2 paper Sec. 3.1-3.2).

def exp_to_std(exp):
    """Relative standard deviation σ_rel of the power-function profile with exponent γ (EDM2 paper Sec. 3.1).

    σ_rel(γ) = sqrt((γ+1) / ((γ+2)² (γ+3))). Elementwise, float64, shape preserved.
    """
    exp = np.asarray(exp, dtype=np.float64)
    return np.sqrt((exp + 1) / ((exp + 2) ** 2 * (exp + 3)))

def std_to_exp(std):
    """Exponent γ whose profile has relative standard deviation σ_rel = std (inverse of exp_to_std).

    Squaring and rearranging σ_rel² = (γ+1)/((γ+2)²(γ+3)) with s = σ_rel⁻² gives the cubic
    γ³ + 7γ² + (16 − s)γ + (12 − s) = 0; the wanted solution is the root with the largest real part.
    """
    std = np.asarray(std, dtype=np.float64)
    s = 1 / std.ravel() ** 2
    exp = [np.roots([1, 7, 16 - si, 12 - si]).real.max() for si in s]
    return np.asarray(exp, dtype=np.float64).reshape(std.shape)

def power_function_response(ofs, std, len, axis=0):
    """Discrete profile of a snapshot taken at time `ofs` with σ_rel `std`, sampled at t = 0 .. len-1.

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
    """Inner product ⟨f_a, f_b⟩ = ∫ f_a(t) f_b(t) dt of two power-function profiles.

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
    """Per-step EMA decay β = (1 − Δ/t)^(γ+1), with t the image count after the step and Δ the batch.

    With this β the EMA after n equal steps weights step k by ((k/n)^(γ+1) − ((k−1)/n)^(γ+1)), i.e. exactly the
    integral of the power-function profile over that step, so tracked snapshots match the profile of EDM2 paper Sec. 3.1.
    """
    exp = std_to_exp(std)
    return (1 - t_delta / t_next) ** (exp + 1)

def solve_posthoc_coefficients(in_ofs, in_std, out_ofs, out_std):
    """Coefficients X [n_in, n_out] such that output k ≈ Σ_i X[i,k] · input i (EDM2 paper Sec. 3.2).

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

#----------------------------------------------------------------------------
# File names: snapshots and reconstructions name their EMA length with three decimals (e.g. ...-0.050.pkl).

def name_collision(stds):
    """(earlier, later): the first two of `stds` that the three decimals of a file name cannot tell apart (e.g.
    0.0501 and 0.0502, both 0.050), whose files would be one, the later replacing the earlier; None if there are
    none. Exact repeats count too."""
    first = {}  # name -> the first std that has it
    for std in stds:
        name = f'{std:.3f}'
        if name in first:
            return first[name], std
        first[name] = std
    return None

#----------------------------------------------------------------------------
# EMA tracking during training (EDM2 paper Sec. 3.1). The trackers hold deep copies of the live network; `update` is
# called after every optimizer step with the image count after the step, `get` before writing snapshots.

def _check_stds(stds):
    stds = [float(s) for s in stds]
    for s in stds:
        if not 0 < s < 0.289:
            raise ValueError(f'EMA std {s}: relative standard deviation must be positive and less than 0.289')
    return stds

class _EMACopies:
    """Averaged copies of `net`: only parameters are averaged; buffers are copied from `net` when read."""

    def __init__(self, net, count):
        self.net = net
        self.emas = [copy.deepcopy(net) for _ in range(count)]

    @torch.no_grad()
    def reset(self):
        """Make every copy equal to the live network's parameters."""
        live = [p.detach() for p in self.net.parameters()]
        for ema in self.emas:
            torch._foreach_copy_(list(ema.parameters()), live)

    @torch.no_grad()
    def _average(self, betas):
        """p_ema <- beta p_ema + (1 - beta) p_net for each copy and its beta: one fused lerp per copy."""
        live = [p.detach() for p in self.net.parameters()]
        for ema, beta in zip(self.emas, betas):
            torch._foreach_lerp_(list(ema.parameters()), live, 1 - beta)

    @torch.no_grad()
    def _with_live_buffers(self):
        live = [b.detach() for b in self.net.buffers()]
        for ema in self.emas:
            for dst, src in zip(ema.buffers(), live):
                dst.copy_(src)
        return self.emas

class PowerFunctionEMA(_EMACopies):
    """One power-function EMA of `net` per relative standard deviation in `stds` (EDM2 paper Sec. 3.1)."""

    def __init__(self, net, stds=[0.050, 0.100]):
        stds = _check_stds(stds)
        super().__init__(net, len(stds))
        self.stds = stds

    def update(self, cur_nimg, batch_size):
        self._average([float(power_function_beta(std=std, t_next=cur_nimg, t_delta=batch_size)) for std in self.stds])

    def get(self):
        """[(ema_net, '-0.050'), ...], the nets' buffers equal to the live network's."""
        return [(ema, f'-{std:.3f}') for std, ema in zip(self.stds, self._with_live_buffers())]

    def state_dict(self):
        return dict(stds=list(self.stds), emas=[ema.state_dict() for ema in self.emas])

    def load_state_dict(self, state):
        if len(state['emas']) != len(self.emas):
            raise ValueError(f'EMA state holds {len(state["emas"])} EMAs (stds {state["stds"]}), '
                             f'but this run tracks {len(self.emas)} (stds {self.stds})')
        self.stds = [float(s) for s in state['stds']]
        for ema, ema_state in zip(self.emas, state['emas']):
            ema.load_state_dict(ema_state)

class TraditionalEMA(_EMACopies):
    """Exponential moving average with a half-life in millions of images, limited during a ramp-up to
    `rampup_ratio` times the images seen so far (EDM2 paper Sec. 3, the traditional EMA it compares against).
    Not used by default; EDM2 configs may name it. The file suffix of its one net is empty."""

    def __init__(self, net, halflife_Mimg=float('inf'), rampup_ratio=0.09):
        super().__init__(net, 1)
        self.halflife_Mimg = halflife_Mimg
        self.rampup_ratio = rampup_ratio

    def update(self, cur_nimg, batch_size):
        halflife_Mimg = self.halflife_Mimg
        if self.rampup_ratio is not None:
            halflife_Mimg = min(halflife_Mimg, cur_nimg / 1e6 * self.rampup_ratio)
        self._average([0.5 ** (batch_size / max(halflife_Mimg * 1e6, 1e-8))])

    def get(self):
        return [(self._with_live_buffers()[0], '')]

    def state_dict(self):
        return self.emas[0].state_dict()

    def load_state_dict(self, state):
        self.emas[0].load_state_dict(state)
