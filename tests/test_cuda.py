"""The CUDA paths, on a machine with a GPU; skipped elsewhere (CI has none).

float32, float16 and bfloat16 activations through the fast and the reference path against the float64 formulas
(tests/reference_net.py, computed on the CPU), a training step on either path against the same step on the CPU and,
in half precision, the training path against the reference path, and sampling on the GPU across batch sizes.
Tolerances are absolute on outputs of magnitude ~1-4. Until this file has passed on a GPU (and benchmarks/gpu_suite.sh
has measured the training path at least as fast as the reference path there), CUDA training takes the reference path
by default (networks/fastpaths.py): `bash benchmarks/gpu_suite.sh` runs this file first.
"""

import copy

import numpy as np
import pytest
import torch

from networks import edm2plus, fastpaths
from reference_net import reference_forward
from sampling.generate import generate_images
from test_speed_equivalence import inputs, maxdiff, tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')

CUDA = torch.device('cuda')

@pytest.fixture(autouse=True)
def true_float32():
    """TF32 rounds matrix inputs to 10 mantissa bits; float32 comparisons need it off (the benchmarks turn it on)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

def on_cuda(*tensors):
    return [t.to(CUDA) for t in tensors]

def fast_and_reference(net, args, **kwargs):
    with torch.no_grad():
        fast = net(*args, **kwargs)
        with edm2plus.reference_mode():
            ref = net(*args, **kwargs)
    return fast.cpu(), ref.cpu()

@pytest.mark.parametrize('batch', [1, 3])
@pytest.mark.parametrize('block', ['A', 'G*', 'F'])
def test_float32_matches_formulas(block, batch):
    net = tiny(block, use_fp16=False)
    x, sigma, labels = inputs(batch)
    exact = reference_forward(net, x, sigma, labels)
    fast, ref = fast_and_reference(net.to(CUDA), on_cuda(x, sigma, labels))
    assert fast.dtype == torch.float32 and fast.shape == x.shape
    assert maxdiff(fast, exact) < 1e-4 and maxdiff(ref, exact) < 1e-4, (maxdiff(fast, exact), maxdiff(ref, exact))
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    assert maxdiff(fast, c_skip.reshape(-1, 1, 1, 1) * x) > 0.1  # the network part matters

@pytest.mark.parametrize('precision, tol', [('fp16', 0.01), ('bf16', 0.06)])  # measured on an H200: 1.9e-3, 1.6e-2
@pytest.mark.parametrize('block', ['A', 'G*'])
def test_half_precision_activations(block, precision, tol):
    net = tiny(block, use_fp16=(precision == 'fp16'), use_bf16=(precision == 'bf16'))
    x, sigma, labels = inputs(3)
    exact = reference_forward(net, x, sigma, labels)
    net = net.to(CUDA)
    seen = []
    hook = net.unet.enc['8x8_block0'].register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    fast, ref = fast_and_reference(net, on_cuda(x, sigma, labels))
    hook.remove()
    assert seen == [torch.float16 if precision == 'fp16' else torch.bfloat16] * 2  # fast, then reference
    assert fast.dtype == torch.float32 and torch.isfinite(fast).all()
    errors = maxdiff(fast, exact), maxdiff(ref, exact)
    print(f'{block} {precision}: max |fast - exact| {errors[0]:.2e}, max |reference - exact| {errors[1]:.2e}')
    assert max(errors) < tol, errors
    with torch.no_grad():  # force_fp32 gives float32 activations on CUDA as well
        assert maxdiff(net(*on_cuda(x, sigma, labels), force_fp32=True).cpu(), exact) < 1e-4

@pytest.mark.parametrize('path', ['fast', 'reference'])
@pytest.mark.parametrize('block', ['A', 'G*'])
def test_training_step_matches_cpu(block, path):
    """Loss and gradients of one training-mode step (forced weight normalisation included) on CUDA in float32 equal
    the CPU's (training path); with float16 activations they stay finite and close. On CUDA both the training path
    and the reference path (CUDA's default until this file has passed on a GPU: networks/fastpaths.py)."""
    x, sigma, labels = inputs(3)
    def step(device, force_fp32):
        net = copy.deepcopy(tiny(block)).train().to(device)
        with fastpaths.training_path(path if device == CUDA else 'fast'):
            d, logvar = net(x.to(device), sigma.to(device), labels.to(device), force_fp32=force_fp32, return_logvar=True)
        loss = ((d - x.to(device)) ** 2 / logvar.exp() + logvar).mean()
        loss.backward()
        return loss.item(), {n: p.grad.cpu() for n, p in net.named_parameters() if p.grad is not None}
    loss_cpu, grads_cpu = step('cpu', True)
    loss_gpu, grads_gpu = step(CUDA, True)
    assert abs(loss_gpu - loss_cpu) < 1e-4 * abs(loss_cpu)
    assert grads_gpu.keys() == grads_cpu.keys() and len(grads_cpu) > 10
    for name, g in grads_cpu.items():
        assert maxdiff(grads_gpu[name], g) <= 1e-3 * g.abs().max().item() + 1e-6, name
    loss_fp16, grads_fp16 = step(CUDA, False)
    assert abs(loss_fp16 - loss_cpu) < 0.02 * abs(loss_cpu)
    for name, g in grads_cpu.items():
        assert torch.isfinite(grads_fp16[name]).all(), name
        assert maxdiff(grads_fp16[name], g) <= 0.1 * g.abs().max().item() + 1e-4, name

@pytest.mark.parametrize('precision, tol', [('fp16', 0.05), ('bf16', 0.15)])
@pytest.mark.parametrize('block', ['A', 'G*'])
def test_training_path_matches_reference_in_half_precision(block, precision, tol):
    """The training path (forced: CUDA's default is the reference path until this passes on a GPU) against EDM2's
    op sequence, both on CUDA with float16 or bfloat16 activations: the same loss within 1% and gradients within `tol` of each tensor's largest entry (the
    two round differently in half precision; a wrong formula is off by order 1)."""
    x, sigma, labels = inputs(3)
    base = tiny(block, use_fp16=(precision == 'fp16'), use_bf16=(precision == 'bf16')).train()
    def step(reference):
        net = copy.deepcopy(base).to(CUDA)
        with edm2plus.reference_mode(reference), fastpaths.training_path('fast'):
            d, logvar = net(*on_cuda(x, sigma, labels), return_logvar=True)
        loss = ((d - x.to(CUDA)) ** 2 / logvar.exp() + logvar).mean()
        loss.backward()
        return loss.item(), {n: p.grad.cpu() for n, p in net.named_parameters() if p.grad is not None}
    loss_ref, grads_ref = step(True)
    loss, grads = step(False)
    assert abs(loss - loss_ref) < 0.01 * abs(loss_ref)
    assert grads.keys() == grads_ref.keys() and len(grads) > 10
    for name, g in grads_ref.items():
        assert torch.isfinite(grads[name]).all(), name
        assert maxdiff(grads[name], g) <= tol * g.abs().max().item() + 1e-4, name

def test_sampling_on_cuda_is_stable_across_batch_sizes():
    net = tiny('G*').to(CUDA)  # float16 activations, as EDM2 samples
    def images(batch):
        out = [r.images.cpu() for r in generate_images(net, seeds=range(6), class_idx=[1, 2, 3], max_batch_size=batch,
                                                       num_steps=8, verbose=False, device=CUDA)]
        return torch.cat(out)
    a, b = images(6), images(1)
    assert a.shape == (6, 3, 16, 16) and a.dtype == torch.uint8
    assert a.float().std() > 10  # not a constant image
    diff = (a.int() - b.int()).abs()
    # Same seeds, same noise: batching only changes float rounding (cuDNN picks kernels per shape).
    assert diff.float().mean() < 1 and np.percentile(diff.numpy(), 99) <= 4, (diff.float().mean(), diff.max())
