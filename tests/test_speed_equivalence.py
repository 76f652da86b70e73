"""The inference path (networks/fastpaths.py) computes the same function as the reference path.

Three implementations are compared: the fast path (eval mode, no autograd), the reference path (EDM2's op sequence,
`edm2plus.reference_mode()`), and tests/reference_net.py, an independent float64 transcription of the formulas.
Tolerances are absolute on outputs of magnitude ~1-4; float32 rounding differences are ~1e-6, a wrong formula
gives differences of order 0.01-1.
"""

import copy
import pickle

import pytest
import torch

from networks import edm2plus, fastpaths, flops
from networks.edm2plus import BLOCK_VARIANTS, Precond, Variant
from reference_net import reference_forward

TINY = dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=32, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[8])
TOL = 2e-5

pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py

def tiny(block='G*', seed=0, **kw):
    """A tiny eval-mode net whose gains are non-zero, so every layer (modulation, output conv) matters."""
    torch.manual_seed(seed)
    net = Precond(**{**TINY, 'block': block, **kw}).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.7)
    return net

def inputs(batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 16, 16, generator=g) * 2
    sigma = torch.tensor([0.05, 1.0, 20.0, 0.4, 3.0][:batch])
    labels = torch.eye(10)[torch.randint(10, [batch], generator=g)]
    return x, sigma, labels

def both(net, x, sigma, labels):
    """(fast, reference) outputs of `net`."""
    with torch.no_grad():
        fast = net(x, sigma, labels)
        with edm2plus.reference_mode():
            ref = net(x, sigma, labels)
    return fast, ref

def maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()

#----------------------------------------------------------------------------
# Every block variant, at batch 1 and batch 3.

@pytest.mark.parametrize('batch', [1, 3])
@pytest.mark.parametrize('block', list(BLOCK_VARIANTS))
def test_fast_path_matches_reference_and_formulas(block, batch):
    net = tiny(block)
    x, sigma, labels = inputs(batch)
    fast, ref = both(net, x, sigma, labels)
    exact = reference_forward(net, x, sigma, labels)
    assert fast.shape == x.shape and fast.dtype == torch.float32 and fast.is_contiguous()
    assert maxdiff(fast, ref) < TOL, block
    assert maxdiff(fast, exact) < TOL and maxdiff(ref, exact) < TOL, block
    # The network part must matter, or the comparison would be empty: D differs clearly from c_skip * x.
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    assert maxdiff(fast, c_skip.reshape(-1, 1, 1, 1) * x) > 0.1

def test_fast_path_is_used_only_for_frozen_inference():
    net = tiny('G*')
    x, sigma, labels = inputs()
    conv = net.unet.enc['16x16_block0'].conv_res1
    fastpaths._weight_cache.pop(conv, None)
    with torch.no_grad(), edm2plus.reference_mode():
        net(x, sigma, labels)
    assert conv not in fastpaths._weight_cache
    net(x, sigma, labels)  # autograd on: reference path (gradients flow through the normalisation)
    assert conv not in fastpaths._weight_cache
    with torch.no_grad():
        net(x, sigma, labels)
    assert conv in fastpaths._weight_cache
    # With autograd on, eval mode gives the reference path's result (the same ops; on a CPU in channels-last
    # memory, which changes only the rounding).
    with edm2plus.reference_mode():
        ref = net(x, sigma, labels)
    assert maxdiff(net(x, sigma, labels), ref) < TOL
    with torch.inference_mode():
        assert maxdiff(net(x, sigma, labels), ref) < TOL

def test_compilation_traces_the_reference_ops(monkeypatch):
    """While torch.compile traces, the network emits the reference ops (inductor fuses and folds them itself)."""
    net = tiny('G*')
    x, sigma, labels = inputs()
    monkeypatch.setattr(fastpaths, '_is_compiling', lambda: True)
    with torch.no_grad():
        traced = net(x, sigma, labels)
        with edm2plus.reference_mode():
            assert torch.equal(traced, net(x, sigma, labels))

def test_custom_recipe_ending_without_convolution(monkeypatch):
    """A recipe whose branch ends with the modulation: the output scale cannot be folded into a weight."""
    monkeypatch.setitem(BLOCK_VARIANTS, 'H', Variant('silu pw:in>E silu drop pw:E>out mod:out', 2))
    net = tiny('H', attn_resolutions=[])
    for batch in (1, 2):
        fast, ref = both(net, *inputs(batch))
        assert maxdiff(fast, ref) < TOL

def test_dropout_and_generic_kernels(monkeypatch):
    """Dropout is the identity in eval mode. Without oneDNN's kernels (CUDA, other builds) conv2d + SiLU are used."""
    net = tiny('G*', dropout=0.5)
    fast, ref = both(net, *inputs())
    assert maxdiff(fast, ref) < TOL
    monkeypatch.setattr(fastpaths, '_onednn', False)
    for block in ('A', 'G*'):
        for batch in (1, 2):
            net = tiny(block)
            fast, ref = both(net, *inputs(batch))
            assert maxdiff(fast, ref) < TOL

#----------------------------------------------------------------------------
# The weight cache follows every change of the weights.

def assert_tracks(net, x, sigma, labels, exact_net=None):
    """The fast path equals the reference path and the float64 formulas of (a possibly different) net."""
    fast, ref = both(net, x, sigma, labels)
    assert maxdiff(fast, ref) < TOL
    assert maxdiff(fast, reference_forward(exact_net or net, x, sigma, labels)) < TOL

def test_cache_invalidated_by_optimizer_step_and_train():
    net = tiny('G*')
    x, sigma, labels = inputs()
    before, _ = both(net, x, sigma, labels)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    net.train()
    net(x, sigma, labels).square().mean().backward()
    opt.step()
    net.eval()
    after, _ = both(net, x, sigma, labels)
    assert maxdiff(before, after) > 1e-3  # the step changed the function ...
    assert_tracks(net, x, sigma, labels)  # ... and the fast path follows

def test_cache_invalidated_by_in_place_updates_and_load_state_dict():
    net, other = tiny('G*', seed=0), tiny('G*', seed=5)
    x, sigma, labels = inputs()
    both(net, x, sigma, labels)  # fill the cache
    with torch.no_grad():
        # An EMA update (phema.py) and a gain change, in place on the parameters.
        for p, q in zip(net.parameters(), other.parameters()):
            p.lerp_(q, 0.5)
    assert_tracks(net, x, sigma, labels)
    net.load_state_dict(other.state_dict())
    assert_tracks(net, x, sigma, labels, exact_net=other)

def test_cache_invalidated_by_dtype_round_trip_and_data_writes():
    net = tiny('A')
    x, sigma, labels = inputs()
    both(net, x, sigma, labels)
    net.half().float()  # weights rounded to float16 and back: storage replaced, version counter unchanged
    assert_tracks(net, x, sigma, labels)
    with torch.no_grad():
        for p in net.parameters():
            p.data.mul_(1.5)  # bypasses the version counter: documented remedy is train()/eval()
    net.train().eval()
    assert_tracks(net, x, sigma, labels)

def test_cache_not_pickled_or_shared_by_copies():
    net = tiny('G*')
    x, sigma, labels = inputs()
    size_before = len(pickle.dumps(net))
    fast, _ = both(net, x, sigma, labels)
    assert net.unet.out_conv in fastpaths._weight_cache
    assert len(pickle.dumps(net)) == size_before
    clone = copy.deepcopy(net)
    with torch.no_grad():
        clone.unet.out_gain.fill_(0.1)
        assert torch.equal(net(x, sigma, labels), fast)  # the original is unaffected
        assert maxdiff(clone(x, sigma, labels), fast) > 1e-3
    loaded = pickle.loads(pickle.dumps(net))  # runs the embedded source: its own module, its own fast path
    with torch.no_grad():
        assert maxdiff(loaded(x, sigma, labels), fast) < TOL

#----------------------------------------------------------------------------
# Pieces.

def test_sdpa_attention_matches_einsum_attention():
    """scaled_dot_product_attention on normalised q, k, v equals the reference's einsum/softmax attention."""
    net = tiny('A')
    blk = net.unet.enc['8x8_block0']
    g = torch.Generator().manual_seed(3)
    x, emb = torch.randn(4, 32, 8, 8, generator=g) * 3, torch.randn(4, 64, generator=g)
    with torch.no_grad():
        fast = blk(x.contiguous(memory_format=torch.channels_last), emb)
        with edm2plus.reference_mode():
            ref = blk(x.clone(), emb)
    assert blk.num_heads == 1 and maxdiff(fast, ref) < TOL
    # Direct comparison on sharp (large-logit) attention with 4 heads of 16 channels.
    q, k, v = (edm2plus.normalize(torch.randn(2, 4, 16, 64, generator=g), dim=2) for _ in range(3))
    w = torch.einsum('nhcq,nhck->nhqk', q, k / 4).softmax(dim=3)
    einsum = torch.einsum('nhqk,nhck->nhcq', w, v)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3))
    assert maxdiff(sdpa.transpose(2, 3), einsum) < 1e-6

def test_mp_cat_and_resampling_fast_versions():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 6, 8, 8, generator=g), torch.randn(2, 10, 8, 8, generator=g)
    assert maxdiff(fastpaths._mp_cat_fast(a, b, t=0.3), edm2plus.mp_cat(a, b, t=0.3)) < 1e-6
    for mode in ('down', 'up'):
        assert maxdiff(fastpaths._resample_fast(a, [1, 1], mode), edm2plus.resample(a, [1, 1], mode)) < 1e-6

def test_flop_count_is_edm2s_convention_in_any_mode():
    """Counting a real (CPU) net in eval mode sees the reference ops, also for an unpickled copy."""
    net = tiny('G*')
    meta = flops.count(flops.build_meta(**{**TINY, 'block': 'G*'}))
    assert flops.count(net, device='cpu')['flops'] == meta['flops']
    loaded = pickle.loads(pickle.dumps(net))
    assert flops.count(loaded, device='cpu')['flops'] == meta['flops']

def test_sampler_output_unchanged():
    """A whole Heun run (63 evaluations) gives the same images with either path."""
    from sampling.sampler import edm_sampler
    net = tiny('G*')
    noise, _, labels = inputs(2)
    with torch.no_grad():
        fast = edm_sampler(net, noise, labels, num_steps=8)
        with edm2plus.reference_mode():
            ref = edm_sampler(net, noise, labels, num_steps=8)
    assert maxdiff(fast, ref) < 1e-4

@pytest.mark.parametrize('block', ['A', 'G*'])
def test_large_batches_in_chunks(block, monkeypatch):
    """Chunked evaluation of a large batch (here 2 images per chunk) with per-image or shared sigma and labels."""
    monkeypatch.setattr(fastpaths, '_FAST_CHUNK_PIXELS', 2 * 16 * 16)
    net = tiny(block)
    x, sigma, labels = inputs(5)
    for s, l in [(sigma, labels), (sigma[1], labels), (sigma[1], None), (sigma, labels[:1])]:
        fast, ref = both(net, x, s, l)
        assert fast.shape == x.shape and maxdiff(fast, ref) < TOL

def test_cpu_training_in_channels_last_matches_reference_gradients():
    """Training on a CPU runs in channels-last memory: same outputs and gradients as the reference layout."""
    for block in ['A', 'G*']:
        net = tiny(block).train()
        x, sigma, labels = inputs()
        results = []
        for reference in [True, False]:
            net.zero_grad(set_to_none=True)
            torch.manual_seed(1)  # dropout, if any
            with edm2plus.reference_mode(reference):
                y, logvar = net(x, sigma, labels, return_logvar=True)
            assert y.is_contiguous()  # callers get the usual layout back
            (y.square().mean() + logvar.mean()).backward()
            results.append((y.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}))
        (y_ref, g_ref), (y_cl, g_cl) = results
        assert maxdiff(y_cl, y_ref) < TOL, block
        assert g_ref.keys() == g_cl.keys() and len(g_ref) > 10
        for name in g_ref:
            scale = g_ref[name].abs().max().item() + 1e-12
            assert (g_cl[name] - g_ref[name]).abs().max().item() / scale < 1e-3, (block, name)
