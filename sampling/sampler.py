"""Deterministic and stochastic ODE samplers for EDM-style denoisers (EDM, Karras et al. 2022, §3 and Alg. 1–2).

Layout, smallest piece first:
  * `edm_time_steps`   — the ρ-spaced noise levels σ_0 > … > σ_{N−1} followed by 0 (EDM eq. 5).
  * `guided_denoiser`  — turns (net, gnet, labels, guidance, interval) into one function D(x, σ).
  * `sample_heun`, `sample_euler` — plain solvers over (denoise, x, sigmas, …); a new solver is one new function.
  * `edm_sampler`      — EDM2's entry point: noise in, images out, Heun with 2N − 1 evaluations.
  * `euler_sampler`    — same signature with a first-order solver (for comparisons; not used by EDM2).

Networks are called as `net(x, sigma, labels)` with `sigma` a 0-d tensor; their output is cast to `dtype`.
Every solver takes an optional `callback(info)` (an EasyDict with i, x, sigma, sigma_hat, denoised), and
`progress=True` shows a tqdm bar over the steps.
"""

import math

import torch
import tqdm

import dnnlib

#----------------------------------------------------------------------------
# Noise levels (EDM eq. 5): σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ for i < N, then σ_N = 0.
# Computed in `dtype` so that float32 gives EDM2's values to the last bit (σ_0 = 79.999985, not 80).

def edm_time_steps(num_steps=32, sigma_min=0.002, sigma_max=80, rho=7, dtype=torch.float32, device=None):
    """Return the N + 1 noise levels of the EDM schedule, the last one exactly zero."""
    if num_steps < 1:
        raise ValueError(f'num_steps must be at least 1, got {num_steps}')
    i = torch.arange(num_steps, dtype=dtype, device=device)
    # With a single step EDM2's formula divides 0 by 0; we define that schedule as one jump from σ_max to 0.
    frac = i / max(num_steps - 1, 1)
    t = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros_like(t[:1])])

#----------------------------------------------------------------------------
# Settings that cannot give a sensible schedule are refused before any network is loaded: a schedule must run
# from σ_max down to σ_min through finite, strictly decreasing levels, and churn or a guidance interval that no
# level of the schedule reaches would silently do nothing.

MAX_STEPS = 1_000_000
_OPTION_NAMES = dict(num_steps='--steps', guidance_interval='--guidance-interval')

def _option(name, value):
    text = f'{value:.10g}' if isinstance(value, float) else f'{value}'
    return f'{_OPTION_NAMES.get(name, "--" + name)}={text}'

def check_sampler_options(num_steps=32, sigma_min=0.002, sigma_max=80, rho=7, guidance=1, guidance_interval=None,
                          S_churn=0, S_min=0, S_max=math.inf, S_noise=1, **_other):
    """Raise ValueError, one line naming the option (as generate_images.py spells it), unless the settings give a
    schedule of finite, strictly decreasing noise levels in which churn and the guidance interval take effect."""
    if not isinstance(num_steps, int) or not 1 <= num_steps <= MAX_STEPS:
        raise ValueError(f'{_option("num_steps", num_steps)}: give 1 to {MAX_STEPS} steps')
    numbers = dict(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, guidance=guidance, S_churn=S_churn,
                   S_min=S_min, S_noise=S_noise)
    for name, value in numbers.items():
        if not math.isfinite(value):
            raise ValueError(f'{_option(name, value)}: not a finite number')
    for name in ('sigma_min', 'rho'):
        if not numbers[name] > 0:
            raise ValueError(f'{_option(name, numbers[name])}: must be positive')
    for name in ('S_churn', 'S_min', 'S_noise'):
        if numbers[name] < 0:
            raise ValueError(f'{_option(name, numbers[name])}: must not be negative')
    if not sigma_min < sigma_max:
        raise ValueError(f'{_option("sigma_min", sigma_min)} must be below {_option("sigma_max", sigma_max)}')
    try:
        levels = edm_time_steps(num_steps, sigma_min, sigma_max, rho, dtype=torch.float32)  # as the samplers do
    except OverflowError:
        levels = torch.tensor([math.inf])
    if not torch.isfinite(levels.square()).all():
        raise ValueError(f'{_option("sigma_max", sigma_max)} with {_option("rho", rho)}: the noise levels overflow '
                         'single precision')
    if not (levels[1:] < levels[:-1]).all() or not (levels[:-1] > 0).all():
        raise ValueError(f'{_option("sigma_min", sigma_min)}, {_option("sigma_max", sigma_max)}, '
                         f'{_option("rho", rho)}: the noise levels are not strictly decreasing')
    evaluated = levels[:-1].tolist()  # every level a network is evaluated at, before churn
    if S_churn > 0:
        if not S_min <= S_max:
            raise ValueError(f'{_option("S_min", S_min)} must not exceed {_option("S_max", S_max)}')
        if not any(S_min <= sigma <= S_max for sigma in evaluated):
            raise ValueError(f'{_option("S_churn", S_churn)} has no effect: no noise level of the schedule '
                             f'({evaluated[-1]:g} to {evaluated[0]:g}) lies in [S_min, S_max] = [{S_min:g}, {S_max:g}]')
    if guidance_interval is not None and guidance != 1:
        lo, hi = map(float, guidance_interval)
        if not 0 <= lo <= hi:
            raise ValueError(f'--guidance-interval={lo:g},{hi:g}: must satisfy 0 <= LO <= HI')
        if not any(lo <= sigma <= hi for sigma in evaluated):
            raise ValueError(f'--guidance-interval={lo:g},{hi:g} has no effect: no noise level of the schedule '
                             f'({evaluated[-1]:g} to {evaluated[0]:g}) lies in it')

#----------------------------------------------------------------------------
# Guidance (autoguidance, Karras et al. 2024, eq. 1; the same formula gives classifier-free guidance): D = D_guide + w·(D_main − D_guide), i.e. lerp(D_guide, D_main, w). The guide is never
# evaluated when w = 1. Beyond EDM2: with `guidance_interval=(lo, hi)` the guide is only used for lo ≤ σ ≤ hi
# (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval"); elsewhere D = D_main.

def guided_denoiser(net, labels=None, gnet=None, guidance=1, guidance_interval=None, dtype=torch.float32):
    """Return D(x, sigma) → denoised x in `dtype`, combining the main and the guiding network."""
    if gnet is None:
        gnet = net  # EDM2's Python API: a missing guide defaults to the main net.
    lo, hi = (-math.inf, math.inf) if guidance_interval is None else map(float, guidance_interval)
    if not lo <= hi:
        raise ValueError(f'guidance_interval must satisfy lo <= hi, got ({lo}, {hi})')
    everywhere = guidance_interval is None  # Skips the per-call float(sigma), a device sync on CUDA.

    def denoise(x, sigma):
        D = net(x, sigma, labels).to(dtype)
        if guidance == 1 or not (everywhere or lo <= float(sigma) <= hi):
            return D
        D_guide = gnet(x, sigma, labels).to(dtype)
        return D_guide.lerp(D, guidance)
    return denoise

#----------------------------------------------------------------------------
# Stochastic "churn" (EDM paper Alg. 2): raise the noise level from σ to σ̂ = σ(1 + γ) by adding fresh
# noise of variance σ̂² − σ², with γ = min(S_churn/N, √2 − 1) inside [S_min, S_max]. The noise comes from
# `randn_like`, which generation binds to the per-seed generators, so stochastic samples still depend only on
# their seed. Without churn no random numbers are drawn at all.

def _churn(x, sigma, num_steps, S_churn, S_min, S_max, S_noise, randn_like):
    if S_churn > 0 and S_min <= float(sigma) <= S_max:
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1)
        sigma_hat = sigma + gamma * sigma
        x = x + (sigma_hat ** 2 - sigma ** 2).sqrt() * S_noise * randn_like(x)
        return x, sigma_hat
    return x, sigma

def _report(callback, **info):
    if callback is not None:
        callback(dnnlib.EasyDict(info))

#----------------------------------------------------------------------------
# Heun's second-order method on the probability-flow ODE dx/dσ = (x − D(x, σ))/σ (EDM Alg. 1/2).
# The step into σ = 0 is a plain Euler step (the ODE's slope is undefined there): 2N − 1 evaluations in all.

def sample_heun(denoise, x, sigmas, S_churn=0, S_min=0, S_max=math.inf, S_noise=1,
                randn_like=torch.randn_like, callback=None, progress=False):
    """Integrate from x at sigmas[0] down to sigmas[-1]; x must already carry noise of level sigmas[0]."""
    num_steps = len(sigmas) - 1
    levels = sigmas.tolist()  # Python copies for the branch below: no device sync per step.
    for i in tqdm.trange(num_steps, unit='step', disable=not progress, leave=False):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x_hat, sigma_hat = _churn(x, sigma, num_steps, S_churn, S_min, S_max, S_noise, randn_like)
        denoised = denoise(x_hat, sigma_hat)
        d = (x_hat - denoised) / sigma_hat
        x = x_hat + (sigma_next - sigma_hat) * d
        if levels[i + 1] != 0:
            d_next = (x - denoise(x, sigma_next)) / sigma_next
            x = x_hat + (sigma_next - sigma_hat) * (0.5 * d + 0.5 * d_next)
        _report(callback, i=i, x=x, sigma=sigma, sigma_hat=sigma_hat, denoised=denoised)
    return x

# Euler's first-order method: one evaluation per step. Only for comparison (tests, benchmarks); the same number of
# evaluations buys far less accuracy than Heun (tests/test_sampler.py measures it).

def sample_euler(denoise, x, sigmas, S_churn=0, S_min=0, S_max=math.inf, S_noise=1,
                 randn_like=torch.randn_like, callback=None, progress=False):
    """Integrate from x at sigmas[0] down to sigmas[-1] with one denoiser evaluation per step."""
    num_steps = len(sigmas) - 1
    for i in tqdm.trange(num_steps, unit='step', disable=not progress, leave=False):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x_hat, sigma_hat = _churn(x, sigma, num_steps, S_churn, S_min, S_max, S_noise, randn_like)
        denoised = denoise(x_hat, sigma_hat)
        x = x_hat + (sigma_next - sigma_hat) * ((x_hat - denoised) / sigma_hat)
        _report(callback, i=i, x=x, sigma=sigma, sigma_hat=sigma_hat, denoised=denoised)
    return x

#----------------------------------------------------------------------------
# EDM2-compatible entry points: unit-variance noise in, samples out. x_0 = noise·σ_0.

def _run(solver, net, noise, labels, gnet, num_steps, sigma_min, sigma_max, rho, guidance, guidance_interval,
         S_churn, S_min, S_max, S_noise, dtype, randn_like, callback, progress):
    sigmas = edm_time_steps(num_steps, sigma_min, sigma_max, rho, dtype=dtype, device=noise.device)
    denoise = guided_denoiser(net, labels, gnet, guidance, guidance_interval, dtype)
    x = noise.to(dtype) * sigmas[0]
    return solver(denoise, x, sigmas, S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise,
                  randn_like=randn_like, callback=callback, progress=progress)

def edm_sampler(net, noise, labels=None, gnet=None, num_steps=32, sigma_min=0.002, sigma_max=80, rho=7,
                guidance=1, guidance_interval=None, S_churn=0, S_min=0, S_max=math.inf, S_noise=1,
                dtype=torch.float32, randn_like=torch.randn_like, callback=None, progress=False):
    """EDM2's Heun sampler: 2N − 1 evaluations of `net` (and as many of `gnet` when guidance ≠ 1)."""
    return _run(sample_heun, net, noise, labels, gnet, num_steps, sigma_min, sigma_max, rho, guidance,
                guidance_interval, S_churn, S_min, S_max, S_noise, dtype, randn_like, callback, progress)

def euler_sampler(net, noise, labels=None, gnet=None, num_steps=63, sigma_min=0.002, sigma_max=80, rho=7,
                  guidance=1, guidance_interval=None, S_churn=0, S_min=0, S_max=math.inf, S_noise=1,
                  dtype=torch.float32, randn_like=torch.randn_like, callback=None, progress=False):
    """Same interface with Euler steps: N evaluations (default 63, the cost of Heun's default 32 steps)."""
    return _run(sample_euler, net, noise, labels, gnet, num_steps, sigma_min, sigma_max, rho, guidance,
                guidance_interval, S_churn, S_min, S_max, S_noise, dtype, randn_like, callback, progress)
