"""Sampler tests: time steps, accuracy on Gaussian data with the exact denoiser, evaluation counts,
guidance and the guidance interval, churn. Denoisers are plain closed-form callables, so these run in seconds."""

import math

import pytest
import torch

from sampling.sampler import edm_sampler, edm_time_steps, euler_sampler, guided_denoiser

#----------------------------------------------------------------------------
# Gaussian data N(mu, s^2) per channel: the exact denoiser is E[x0 | x] = mu + s^2/(s^2 + sigma^2)·(x − mu), and the
# probability-flow ODE maps x(sigma_max) to mu + (x − mu)·s/sqrt(s^2 + sigma_max^2) at sigma = 0.

MU = torch.tensor([1.0, -0.5]).view(1, 2, 1, 1)
STD = torch.tensor([0.5, 0.3]).view(1, 2, 1, 1)

class GaussianDenoiser:
    """Exact denoiser for N(mu, std^2) data; records the noise level of every call."""
    def __init__(self, mu=MU, std=STD):
        self.mu, self.std = mu, std
        self.sigmas = []

    def __call__(self, x, sigma, labels=None):
        assert sigma.ndim == 0  # EDM2 calls the network with a 0-d tensor.
        self.sigmas.append(float(sigma))
        return self.mu + self.std ** 2 / (self.std ** 2 + sigma ** 2) * (x - self.mu)

def exact_ode_solution(noise, sigma_max, mu=MU, std=STD):
    x_start = noise.to(torch.float64) * sigma_max
    return mu + (x_start - mu) * std / torch.sqrt(std ** 2 + sigma_max ** 2)

def relative_error(x, exact, mu=MU):
    return float((x.to(torch.float64) - exact).norm() / (exact - mu).norm())

#----------------------------------------------------------------------------

def test_time_steps_match_edm2():
    t = edm_time_steps()
    assert t.dtype == torch.float32 and t.shape == (33,)
    # EDM2's values (float32).
    assert t[0].item() == pytest.approx(79.999985, abs=2e-6)
    assert t[0].item() != 80.0  # the float32 rounding EDM2 has
    assert t[1].item() == pytest.approx(66.93087, rel=1e-6)
    assert t[30].item() == pytest.approx(0.004267, rel=1e-3)
    assert t[31].item() == pytest.approx(0.002, rel=1e-6)
    assert t[32].item() == 0
    assert torch.all(t[1:] < t[:-1])
    # Other schedules: ρ = 1 is linear; one step jumps straight from sigma_max to 0.
    assert edm_time_steps(3, 1, 5, rho=1).tolist() == pytest.approx([5, 3, 1, 0])
    assert edm_time_steps(1, 0.002, 80).tolist() == pytest.approx([80, 0])
    with pytest.raises(ValueError):
        edm_time_steps(0)

def test_gaussian_data_mean_and_variance_are_reproduced():
    # 2 channels × 65,536 samples: sampling error of the std ≈ 0.3 %, of the mean ≈ 0.002·s.
    noise = torch.randn([8192, 2, 4, 2], generator=torch.Generator().manual_seed(1))
    denoiser = GaussianDenoiser()
    x = edm_sampler(denoiser, noise)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    mean = x.mean(dim=[0, 2, 3])
    std = x.std(dim=[0, 2, 3])
    # Stated tolerances: mean within 0.02 absolute (the start x = 80·noise has mean 0, not mu, which shifts the
    # result by mu·s/80 ≈ 0.006); std within 3 % (Heun-32 discretisation error ≈ 1.6–2 %, measured below).
    assert mean.tolist() == pytest.approx(MU.flatten().tolist(), abs=0.02)
    assert (std / STD.flatten() - 1).abs().max() < 0.03

def test_heun_is_far_more_accurate_than_euler_at_equal_cost():
    noise = torch.randn([4096, 2, 1, 1], generator=torch.Generator().manual_seed(2))
    sigma_max = edm_time_steps()[0].double()
    exact = exact_ode_solution(noise, sigma_max)

    counted = GaussianDenoiser()
    heun = relative_error(edm_sampler(counted, noise, num_steps=32), exact)
    assert len(counted.sigmas) == 63
    counted = GaussianDenoiser()
    euler = relative_error(euler_sampler(counted, noise, num_steps=63), exact)
    assert len(counted.sigmas) == 63  # same cost

    # Measured here: Heun-32 ≈ 1.7e-2, Euler-63 ≈ 4.6e-2 relative error.
    print(f'relative error: heun-32 {heun:.3e}, euler-63 {euler:.3e}, ratio {euler / heun:.2f}')
    assert heun < 0.025
    assert euler / heun > 2.5
    # Euler still loses with 2.5× the evaluations (first order vs. second order) ...
    assert relative_error(euler_sampler(GaussianDenoiser(), noise, num_steps=160), exact) > heun
    # ... and doubling Heun's steps divides its error by about 4 (second order).
    heun64 = relative_error(edm_sampler(GaussianDenoiser(), noise, num_steps=64), exact)
    assert heun / heun64 > 3.5

@pytest.mark.parametrize('num_steps', [1, 2, 5, 32])
def test_heun_evaluates_the_network_2n_minus_1_times(num_steps):
    denoiser = GaussianDenoiser()
    edm_sampler(denoiser, torch.randn([3, 2, 2, 2]), num_steps=num_steps)
    assert len(denoiser.sigmas) == 2 * num_steps - 1
    # The evaluations happen at t_0 and at each t_i, i = 1..N-1, twice (step end and next step start).
    t = edm_time_steps(num_steps).tolist()
    assert sorted(denoiser.sigmas) == pytest.approx(sorted(t[:1] + 2 * t[1:-1]))

def test_float64_and_callback():
    infos = []
    x = edm_sampler(GaussianDenoiser(), torch.randn([4, 2, 1, 1]), num_steps=6, dtype=torch.float64,
                    callback=infos.append)
    assert x.dtype == torch.float64
    assert [info.i for info in infos] == list(range(6))
    assert [info.sigma.item() for info in infos] == pytest.approx(edm_time_steps(6, dtype=torch.float64)[:-1].tolist())
    assert torch.equal(infos[-1].x, x)

#----------------------------------------------------------------------------
# Guidance.

class Constant:
    """Denoiser returning a constant; counts its calls and records their noise levels."""
    def __init__(self, value):
        self.value = value
        self.sigmas = []

    def __call__(self, x, sigma, labels=None):
        self.sigmas.append(float(sigma))
        return torch.full_like(x, self.value)

def test_guidance_is_a_lerp_from_guide_to_main():
    main, guide = GaussianDenoiser(), GaussianDenoiser(mu=torch.zeros(1, 2, 1, 1), std=torch.ones(1, 2, 1, 1))
    x = torch.randn([5, 2, 3, 3])
    sigma = torch.tensor(1.3)
    for w in [0.0, 1.7, 3.0]:
        D = guided_denoiser(main, gnet=guide, guidance=w)(x, sigma)
        expected = guide(x, sigma) + w * (main(x, sigma) - guide(x, sigma))
        torch.testing.assert_close(D, expected)
    # Through the sampler: one step from sigma_max straight to 0 returns D(x_0, sigma_max) itself.
    noise = torch.randn([5, 2, 3, 3])
    out = edm_sampler(Constant(2.0), noise, gnet=Constant(-1.0), num_steps=1, guidance=2.5)
    torch.testing.assert_close(out, torch.full_like(noise, -1.0 + 2.5 * (2.0 - -1.0)))

def test_guide_is_never_evaluated_at_guidance_one():
    def guide(x, sigma, labels=None):
        raise AssertionError('the guide must not be evaluated at guidance 1')
    main = Constant(0.5)
    edm_sampler(main, torch.randn([2, 2, 2, 2]), gnet=guide, num_steps=8, guidance=1)
    assert len(main.sigmas) == 15

def test_guidance_evaluates_guide_alongside_main_and_passes_labels():
    seen = []
    def main(x, sigma, labels):
        seen.append(('main', labels))
        return torch.zeros_like(x)
    def guide(x, sigma, labels):
        seen.append(('guide', labels))
        return torch.ones_like(x)
    labels = torch.eye(3)[[0, 2]]
    edm_sampler(main, torch.randn([2, 1, 2, 2]), labels=labels, gnet=guide, num_steps=4, guidance=2)
    assert [who for who, _ in seen].count('main') == 7
    assert [who for who, _ in seen].count('guide') == 7
    assert all(l is labels for _, l in seen)  # the guide gets the same labels (EDM2 since 4bf8162)

def test_guidance_interval_is_respected():
    lo, hi = 0.28, 5.42
    main, guide = GaussianDenoiser(), GaussianDenoiser(mu=torch.zeros(1, 2, 1, 1), std=torch.ones(1, 2, 1, 1))
    noise = torch.randn([3, 2, 2, 2], generator=torch.Generator().manual_seed(3))
    out = edm_sampler(main, noise, gnet=guide, guidance=2.0, guidance_interval=(lo, hi))
    assert len(main.sigmas) == 63
    t = edm_time_steps().tolist()
    expected = [s for s in t[:1] + 2 * t[1:-1] if lo <= s <= hi]
    assert 0 < len(expected) < 63
    assert len(guide.sigmas) == len(expected)
    assert all(lo <= s <= hi for s in guide.sigmas)
    # The interval changes the result: it lies between unguided and always-guided sampling.
    unguided = edm_sampler(GaussianDenoiser(), noise)
    always = edm_sampler(GaussianDenoiser(), noise, gnet=GaussianDenoiser(mu=torch.zeros(1, 2, 1, 1), std=torch.ones(1, 2, 1, 1)), guidance=2.0)
    assert not torch.allclose(out, unguided) and not torch.allclose(out, always)
    # An empty interval means no guide evaluations at all; a wrong one is refused.
    never = Constant(0.0)
    edm_sampler(GaussianDenoiser(), noise, gnet=never, guidance=2.0, guidance_interval=(100, 200))
    assert never.sigmas == []
    with pytest.raises(ValueError):
        edm_sampler(GaussianDenoiser(), noise, gnet=never, guidance=2.0, guidance_interval=(2, 1))

#----------------------------------------------------------------------------
# Stochastic sampling: churn only inside [S_min, S_max], noise only from randn_like.

def test_churn_draws_noise_only_inside_its_range_and_only_through_randn_like():
    noise = torch.randn([2, 2, 2, 2], generator=torch.Generator().manual_seed(4))
    draws = []
    def randn_like(x):
        draws.append(1)
        return torch.randn(x.shape, generator=gen)
    gen = torch.Generator().manual_seed(5)
    deterministic = edm_sampler(GaussianDenoiser(), noise, num_steps=10, randn_like=randn_like)
    assert draws == []  # S_churn = 0: no random numbers at all

    S_min, S_max = 0.05, 10
    t = edm_time_steps(10).tolist()[:-1]
    gen = torch.Generator().manual_seed(5)
    denoiser = GaussianDenoiser()
    stochastic = edm_sampler(denoiser, noise, num_steps=10, S_churn=40, S_min=S_min, S_max=S_max, randn_like=randn_like)
    assert len(draws) == sum(S_min <= s <= S_max for s in t) > 0
    # σ̂ = σ(1 + γ) with γ = min(S_churn/N, √2 − 1) for the churned steps.
    gamma = min(40 / 10, math.sqrt(2) - 1)
    assert any(s == pytest.approx(t[3] * (1 + gamma), rel=1e-6) for s in denoiser.sigmas)
    assert not torch.allclose(stochastic, deterministic)
    # Same generator state → same result.
    draws.clear()
    gen = torch.Generator().manual_seed(5)
    again = edm_sampler(GaussianDenoiser(), noise, num_steps=10, S_churn=40, S_min=S_min, S_max=S_max, randn_like=randn_like)
    assert torch.equal(again, stochastic)
