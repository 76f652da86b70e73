"""The training path (networks/fastpaths.py) computes the reference path's function, loss and gradients.

The training path (the default whenever autograd is on) folds constant factors into the weights and fuses
elementwise work; the reference path (`edm2plus.reference_mode()`) is EDM2's op sequence. In float32 the two differ
only by rounding: about 1e-7 relative in the loss and at most ~3e-5 relative (to each tensor's largest entry) in
the gradients, measured over A and G* with and without dropout. The tolerances below sit well above that and far
below what a wrong formula or a different dropout mask gives (order 1e-2 to 1).
"""

import contextlib
import gzip
import os
import types

import click.testing

import numpy as np
import pytest
import torch

from conftest import write_dataset
from networks import edm2plus, fastpaths, presets
from networks.edm2plus import MPConv, Precond
from training.loss import EDM2Loss

pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py

TINY = dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=32, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[8])
LOSS_RTOL, GRAD_RTOL = 1e-5, 5e-4

def perturbed(block, dropout, seed=0):
    """A tiny network whose gains are non-zero and whose weights are off the unit sphere, as during training."""
    torch.manual_seed(seed)
    net = Precond(**TINY, block=block, dropout=dropout)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3) if p.ndim else p.fill_(0.6)
    return net.train()

def training_step(net, reference, seed=3):
    """(loss, {name: gradient}, {name: weight after forced normalisation}) of one step of EDM2's loss."""
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(4, 3, 16, 16, generator=g), torch.eye(10)[[1, 2, 3, 4]]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    net.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # sigma, noise and dropout masks
    with edm2plus.reference_mode(reference):
        loss = EDM2Loss()(net, images, labels).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    weights = {n: p.detach().clone() for n, p in net.named_parameters()}
    net.load_state_dict(state)
    return loss.item(), grads, weights

def worst_relative(a, b):
    return max(((a[n] - b[n]).abs().max() / (b[n].abs().max() + 1e-12)).item() for n in b)

@pytest.mark.parametrize('block', ['A', 'G*', 'C'])
@pytest.mark.parametrize('dropout', [0, 0.1])
def test_one_step_same_loss_and_gradients(block, dropout):
    net = perturbed(block, dropout)
    loss_ref, grads_ref, weights_ref = training_step(net, reference=True)
    loss, grads, weights = training_step(net, reference=False)
    assert abs(loss - loss_ref) <= LOSS_RTOL * abs(loss_ref), (block, dropout)
    assert grads.keys() == grads_ref.keys() and all(g.abs().max() > 0 for g in grads_ref.values())
    assert worst_relative(grads, grads_ref) < GRAD_RTOL, (block, dropout)
    # Forced weight normalisation acts on the stored weights identically on both paths.
    assert all(torch.equal(weights[n], weights_ref[n]) for n in weights)
    if dropout:  # the comparison can fail: other dropout masks (another seed) change the gradients clearly
        _, grads_other, _ = training_step(net, reference=True, seed=4)
        assert worst_relative(grads_other, grads_ref) > 100 * GRAD_RTOL

@pytest.mark.parametrize('block', ['A', 'G*'])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_precision_activations(block, dtype):
    """The training path with float16/bfloat16 activations (as on a GPU; here the U-Net is called with half-precision
    input on the CPU): its gradients are as close to the float32 gradients as the reference path's in the same
    precision. Half-precision rounding alone puts either path several % off on some tensors (the scalar gains sum
    over whole activations; A's output gain sees a loss of ~1e-4), so each tensor's error is bounded by three times
    the reference path's error plus 0.05 of its largest entry: a wrong factor or cast is off by order 1."""
    net = perturbed(block, dropout=0)
    g = torch.Generator().manual_seed(1)
    x, noise, labels = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, generator=g), torch.eye(10)[[1, 2, 3, 4]]
    w = torch.randn(4, 3, 16, 16, generator=g)
    def gradients(activations, reference):
        state = {k: v.clone() for k, v in net.state_dict().items()}
        net.zero_grad(set_to_none=True)
        with edm2plus.reference_mode(reference):
            out = net.unet(x.to(activations), noise, labels)
        assert out.dtype == activations
        (out.float() * w).mean().backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        net.load_state_dict(state)
        return grads
    exact = gradients(torch.float32, reference=True)
    ref, ours = gradients(dtype, reference=True), gradients(dtype, reference=False)
    assert exact.keys() == ref.keys() == ours.keys() and len(exact) > 50
    for name, g32 in exact.items():
        scale = g32.abs().max().item() + 1e-12
        err_ref, err_ours = ((ref[name] - g32).abs().max().item() / scale, (ours[name] - g32).abs().max().item() / scale)
        assert torch.isfinite(ours[name]).all() and err_ours <= 3 * err_ref + 0.05, (name, err_ours, err_ref)

def test_pixel_norm_backward_matches_autograd():
    """The hand-written backward of the normalisation equals autograd's, over channels and over a head's axis."""
    g = torch.Generator().manual_seed(0)
    for shape, dim in [((2, 5, 3, 3), 1), ((2, 4, 3, 2, 6), 4)]:
        x = (torch.randn(shape, generator=g) * 3).requires_grad_()
        x.data[0, ..., 0] = 0  # a zero vector (norm 0) along dim, where the formula divides by the norm
        w = torch.randn(shape, generator=g)
        (fastpaths._RMSNorm.apply(x, dim) * w).sum().backward()
        ours = x.grad.clone()
        x.grad = None
        (edm2plus.normalize(x, dim=dim) * w).sum().backward()
        assert torch.allclose(ours, x.grad, rtol=1e-5, atol=1e-6), shape  # float32 rounding
        assert torch.equal(fastpaths._RMSNorm.apply(x, dim), edm2plus.normalize(x, dim=dim))

def test_mp_cat_and_clip_gradients():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 6, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 10, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 16, 4, 4, generator=g, dtype=torch.float64)
    for fn in (fastpaths._train_cat, edm2plus.mp_cat):
        a.grad = b.grad = None
        (fn(a, b, t=0.3) * w).sum().backward()
        if fn is fastpaths._train_cat:
            ours = (a.grad.clone(), b.grad.clone())
    assert torch.allclose(ours[0], a.grad) and torch.allclose(ours[1], b.grad)
    # Clipping: skipped when nothing reaches the limit (the same tensor comes back), else clamp with its gradient.
    x = torch.randn(3, 4, generator=g, requires_grad=True)
    assert fastpaths._clip(x, 256) is x
    y = torch.tensor([-3.0, 0.5, 2.0, 9.0], requires_grad=True)
    clipped = fastpaths._clip(y, 2.0)
    clipped.sum().backward()
    assert clipped.tolist() == [-2.0, 0.5, 2.0, 2.0] and y.grad.tolist() == [0.0, 1.0, 1.0, 0.0]
    # Channels-last activations (the check reads their storage as one vector): every element is seen.
    z = torch.randn(2, 3, 4, 5, generator=g).clamp(-1, 1).contiguous(memory_format=torch.channels_last)
    assert fastpaths._clip(z, 1.5) is z
    for index, value in [((1, 2, 3, 4), 7.0), ((0, 0, 0, 0), -7.0), ((1, 0, 2, 1), 1.6)]:
        high = z.clone()
        high[index] = value
        assert high.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(fastpaths._clip(high, 1.5), high.clamp(-1.5, 1.5)) and fastpaths._clip(high, 1.5)[index].abs() == 1.5

#----------------------------------------------------------------------------
# 200 steps on Fashion-MNIST: the loss curves of the two paths agree.

FASHION = '/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz'

def fashion_batches(num_images, size=16):
    """The first Fashion-MNIST training images as RGB in [-1, 1], 28x28 padded to 32 and averaged down to `size`."""
    with gzip.open(FASHION, 'rb') as f:
        data = np.frombuffer(f.read(), np.uint8, offset=16)[:num_images * 784].reshape(-1, 1, 28, 28)
    x = torch.nn.functional.pad(torch.from_numpy(data.astype(np.float32)) / 127.5 - 1, [2, 2, 2, 2], value=-1)
    return torch.nn.functional.adaptive_avg_pool2d(x, size).repeat(1, 3, 1, 1)

def loss_curve(reference, images, labels, steps, batch):
    kwargs = presets.network_kwargs('demo')
    torch.manual_seed(0)
    net = Precond(**kwargs).train()
    opt = torch.optim.Adam(net.parameters(), lr=0.01, betas=(0.9, 0.99))
    loss_fn = EDM2Loss(P_mean=-1.2, P_std=1.2)
    losses = []
    for step in range(steps):
        i = (step * batch) % len(images)
        opt.zero_grad(set_to_none=True)
        with edm2plus.reference_mode(reference):
            loss = loss_fn(net, images[i:i + batch], labels[i:i + batch]).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return np.array(losses)

@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(FASHION), reason='Debian package dataset-fashion-mnist not installed')
def test_fashion_mnist_loss_curves_agree():
    """200 steps of the demo network from the same initialisation and random draws (the two paths consume the
    generator identically). Rounding differences (~1e-7 per step) are amplified by training, so single steps may
    drift apart over time; what must agree is the curve: step 0 to rounding, and each 50-step mean loss to 2%,
    a fifth of the 10% (at least) by which the curve itself falls from its first window to its last."""
    steps, batch = 200, 32
    images = fashion_batches(steps * batch // 4)
    labels = torch.eye(10)[torch.arange(len(images)) % 10]
    ref = loss_curve(True, images, labels, steps, batch)
    new = loss_curve(False, images, labels, steps, batch)
    assert np.all(np.isfinite(new))
    assert abs(new[0] - ref[0]) <= LOSS_RTOL * abs(ref[0])  # step 0: same weights, same draws
    windows_ref, windows_new = ref.reshape(4, 50).mean(1), new.reshape(4, 50).mean(1)
    assert np.all(np.abs(windows_new - windows_ref) <= 0.02 * np.abs(windows_ref)), (windows_ref, windows_new)
    assert windows_ref[-1] < 0.9 * windows_ref[0]  # the network learns, so the curve is a real comparison

def test_weight_scaling_backward_matches_autograd():
    """_MPWeight (normalisation, gain and scale as one per-row factor) against autograd through MPConv's formula."""
    g = torch.Generator().manual_seed(2)
    for shape in [(6, 4, 3, 3), (5, 7)]:
        w = (torch.randn(shape, generator=g) * 2).requires_grad_()
        gain = torch.tensor(0.7, requires_grad=True)
        up = torch.randn(shape, generator=g)
        (fastpaths._MPWeight.apply(w, gain, 0.3) * up).sum().backward()
        ours = (w.grad.clone(), gain.grad.clone())
        w.grad = gain.grad = None
        fan_in = w[0].numel()
        (edm2plus.normalize(w) * (gain * (0.3 / np.sqrt(fan_in))) * up).sum().backward()
        assert torch.allclose(ours[0], w.grad, rtol=1e-4, atol=1e-6) and torch.allclose(ours[1], gain.grad, rtol=1e-4)

def test_unit_weight_table_matches_per_layer_normalisation(monkeypatch):
    """On a CPU the training path normalises all weights at once, grouped by fan-in (_unit_weight_table). The same
    step through the per-layer code (table switched off) gives the same loss, gradients within rounding and
    bit-identical forced-normalised weights; a weight the pass does not use gets no gradient."""
    calls = []
    table = fastpaths._unit_weight_table
    monkeypatch.setattr(fastpaths, '_unit_weight_table', lambda net: (calls.append(net), table(net))[1])
    net = perturbed('G*', 0.1)
    loss, grads, weights = training_step(net, reference=False)
    assert len(calls) == 1 and not fastpaths._unit_weights  # used once, and emptied after the pass
    monkeypatch.setattr(fastpaths, '_unit_weight_table', lambda net: contextlib.nullcontext())
    loss_layer, grads_layer, weights_layer = training_step(net, reference=False)
    assert abs(loss - loss_layer) <= LOSS_RTOL * abs(loss_layer)
    assert worst_relative(grads, grads_layer) < GRAD_RTOL
    assert all(torch.equal(weights[n], weights_layer[n]) for n in weights)

    # The grouped backward against autograd through normalize(), for two weights of one fan-in and one unused.
    g = torch.Generator().manual_seed(5)
    ws = [(torch.randn(shape, generator=g) * 2).requires_grad_() for shape in [(6, 4, 3, 3), (5, 36), (3, 36)]]
    ups = [torch.randn(w.shape, generator=g) for w in ws[:2]]
    outs = fastpaths._UnitWeights.apply(*ws)
    assert [o.shape for o in outs] == [w.shape for w in ws]
    sum((o * up).sum() for o, up in zip(outs, ups)).backward()
    ours = [w.grad for w in ws]
    assert ours[2] is None
    for w, up, grad in zip(ws, ups, ours):
        w.grad = None
        (edm2plus.normalize(w) / 6 * up).sum().backward()  # fan-in 36
        assert torch.allclose(grad, w.grad, rtol=1e-4, atol=1e-6)

#----------------------------------------------------------------------------
# Which path training takes: the training path where it has run (the CPU), the reference path elsewhere (CUDA,
# until tests/test_cuda.py and benchmarks/gpu_suite.sh have vouched for it there); each is one option away.

def test_training_path_default_per_device():
    assert fastpaths.training_path_for('cpu') == 'fast' and fastpaths.training_path_for('cuda') == 'reference'
    assert fastpaths.training_path_for('cuda', 'fast') == 'fast'
    assert fastpaths.training_path_for('cpu', 'reference') == 'reference'
    for bad in ('turbo', None):
        with pytest.raises(ValueError, match='unknown training path'):
            fastpaths.training_path_for('cpu', bad)
        with pytest.raises(ValueError, match='unknown training path'):
            fastpaths.training_path(bad).__enter__()

def test_path_of_a_call_on_cuda_without_a_gpu():
    """choose_path reads only the input's device type, so a stand-in input 'on CUDA' shows what a GPU run takes."""
    conv = MPConv(4, 4, kernel=[])  # training mode
    on_cuda, on_cpu = types.SimpleNamespace(device=torch.device('cuda')), torch.zeros(1, 4)
    assert fastpaths.choose_path(conv, on_cuda) == 'reference' and fastpaths.choose_path(conv, on_cpu) == 'train'
    with fastpaths.training_path('fast'):
        assert fastpaths.choose_path(conv, on_cuda) == 'train'
    with fastpaths.training_path('reference'):
        assert fastpaths.choose_path(conv, on_cpu) == 'reference'
    assert fastpaths.choose_path(conv, on_cpu) == 'train'  # the context restores the default
    with torch.no_grad():  # sampling and metrics: the inference path on every device
        assert fastpaths.choose_path(conv.eval(), on_cuda) == 'infer'

def test_reference_choice_trains_with_edm2s_op_sequence():
    net = perturbed('G*', 0.1)
    loss_ref, grads_ref, weights_ref = training_step(net, reference=True)
    with fastpaths.training_path('reference'):
        loss, grads, weights = training_step(net, reference=False)
    assert loss == loss_ref and all(torch.equal(grads[n], grads_ref[n]) for n in grads_ref)
    _, grads_fast, _ = training_step(net, reference=False)
    assert not all(torch.equal(grads_fast[n], grads_ref[n]) for n in grads_ref)  # the training path rounds otherwise

def test_training_loop_and_cli_take_the_choice(tmp_path, monkeypatch):
    import train_edm2plus
    from training import training_loop
    images = [np.full([8, 8, 3], 40 * i, dtype=np.uint8) for i in range(4)]
    data = write_dataset(tmp_path / 'data', images, [0, 1, 2, 0])
    seen, real = [], fastpaths.training_path
    monkeypatch.setattr(fastpaths, 'training_path', lambda choice: seen.append(choice) or real(choice))
    config = dict(dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=data, use_labels=True),
                  network_kwargs=dict(class_name='networks.edm2plus.Precond', model_channels=8, channel_mult=[1],
                                      num_blocks=1, attn_resolutions=[], block='G*'),
                  data_loader_kwargs=dict(class_name='torch.utils.data.DataLoader', num_workers=0), ema_kwargs=None,
                  batch_size=2, total_nimg=4, status_nimg=None, snapshot_nimg=None, checkpoint_nimg=None,
                  device='cpu', progress=False)
    assert training_loop.training_loop(run_dir=str(tmp_path / 'run'), train_path='reference', **config) == 4
    assert seen == ['reference', 'reference']  # every step's forward pass
    with pytest.raises(ValueError, match='unknown training path "turbo"'):
        training_loop.training_loop(run_dir=str(tmp_path / 'bad'), train_path='turbo', **config)
    assert not os.path.exists(tmp_path / 'bad')  # refused before anything was written
    runner = click.testing.CliRunner()
    base = [f'--outdir={tmp_path / "cli"}', f'--data={data}', '--preset=demo', '--dry-run']
    result = runner.invoke(train_edm2plus.cmdline, base + ['--train-path=reference'])
    assert result.exit_code == 0 and '"train_path": "reference"' in result.output, result.output
    result = runner.invoke(train_edm2plus.cmdline, base)
    assert result.exit_code == 0 and '"train_path": "auto"' in result.output
    result = runner.invoke(train_edm2plus.cmdline, base + ['--train-path=turbo'])
    assert result.exit_code == 2 and "'turbo' is not one of 'auto', 'fast', 'reference'" in result.output
