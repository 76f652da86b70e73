"""The network family: EDM2 layout of CONFIG A, every variant's structure, MP primitives, preconditioning."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from networks import edm2plus, flops, presets
from networks.edm2plus import BLOCK_VARIANTS, Precond, Variant, mp_cat, mp_silu, mp_sum, normalize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=64, channel_mult=[1, 2],
            num_blocks=1, attn_resolutions=[8])

def tiny(block='A', **kw):
    torch.manual_seed(0)
    return Precond(**{**TINY, 'block': block, **kw})

#----------------------------------------------------------------------------
# CONFIG A is EDM2's network: counts, names, shapes and order (EDM2 paper Fig. 21, Table 2).

@pytest.mark.parametrize('name,channels,img_channels,expected', [
    ('img512-xxs', 64, 4, 31_309_029), ('img512-xs', 128, 4, 124_713_253), ('img512-s', 192, 4, 280_212_837),
    ('img512-m', 256, 4, 497_807_781), ('img512-xxl', 448, 4, 1_523_164_773), ('img64-s', 192, 3, 280_209_381),
])
def test_edm2_parameter_counts(name, channels, img_channels, expected):
    net = flops.build_meta(img_resolution=64, img_channels=img_channels, label_dim=1000, model_channels=channels)
    assert sum(p.numel() for p in net.parameters()) == expected
    assert sum(b.numel() for b in net.buffers()) == 2 * (channels + 128)
    uncond = flops.build_meta(img_resolution=64, img_channels=img_channels, label_dim=0, model_channels=channels)
    assert sum(p.numel() for p in uncond.parameters()) == expected - 1000 * 4 * channels

def test_edm2_xs_state_dict_layout():
    net = flops.build_meta(**presets.network_kwargs('edm2-img512-xs'))
    sd = net.state_dict()
    assert len(sd) == 203
    shapes = {k: list(v.shape) for k, v in sd.items()}
    expected = {
        'unet.out_gain': [], 'unet.emb_fourier.freqs': [128], 'unet.emb_fourier.phases': [128],
        'unet.emb_noise.weight': [512, 128], 'unet.emb_label.weight': [512, 1000],
        'unet.enc.64x64_conv.weight': [128, 5, 3, 3], 'unet.enc.64x64_block0.emb_gain': [],
        'unet.enc.64x64_block0.conv_res0.weight': [128, 128, 3, 3], 'unet.enc.64x64_block0.emb_linear.weight': [128, 512],
        'unet.enc.64x64_block0.conv_res1.weight': [128, 128, 3, 3], 'unet.enc.32x32_block0.conv_skip.weight': [256, 128, 1, 1],
        'unet.enc.16x16_block0.attn_qkv.weight': [1152, 384, 1, 1], 'unet.enc.16x16_block0.attn_proj.weight': [384, 384, 1, 1],
        'unet.dec.8x8_block0.conv_skip.weight': [512, 1024, 1, 1], 'unet.dec.64x64_block3.conv_skip.weight': [128, 256, 1, 1],
        'unet.out_conv.weight': [4, 128, 3, 3], 'logvar_fourier.freqs': [128], 'logvar_fourier.phases': [128],
        'logvar_linear.weight': [1, 128],
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    enc = [k.split('.')[2] for k in sd if k.startswith('unet.enc.') and k.endswith('weight')]
    assert list(dict.fromkeys(enc)) == ['64x64_conv', '64x64_block0', '64x64_block1', '64x64_block2', '32x32_down',
        '32x32_block0', '32x32_block1', '32x32_block2', '16x16_down', '16x16_block0', '16x16_block1', '16x16_block2',
        '8x8_down', '8x8_block0', '8x8_block1', '8x8_block2']
    dec = [k.split('.')[2] for k in sd if k.startswith('unet.dec.') and k.endswith('weight')]
    assert list(dict.fromkeys(dec))[:8] == ['8x8_in0', '8x8_in1', '8x8_block0', '8x8_block1', '8x8_block2', '8x8_block3',
                                            '16x16_up', '16x16_block0']
    # Parameter order inside a block (used by Adam state and EMA zipping).
    block = [k.split('.', 3)[3] for k in sd if k.startswith('unet.enc.16x16_block0.')]
    assert block == ['emb_gain', 'conv_res0.weight', 'emb_linear.weight', 'conv_res1.weight', 'conv_skip.weight',
                     'attn_qkv.weight', 'attn_proj.weight']

#----------------------------------------------------------------------------
# Block variants as data.

def test_variant_layers_follow_recipes():
    net = flops.build_meta(img_resolution=64, img_channels=3, label_dim=1000, model_channels=192, block='G*')
    blk = net.unet.dec['32x32_block1']  # decoder block: in = 384 + 384 (skip), out = 384
    layers = {n: (tuple(m.weight.shape), m.groups) for n, m in blk.named_children() if hasattr(m, 'weight')}
    assert layers['conv_res0'] == ((768, 1, 3, 3), 768)    # dw(in)
    assert layers['conv_res1'] == ((1536, 768, 1, 1), 1)   # pw(in -> E = 4*out)
    assert layers['conv_res2'] == ((384, 1536, 1, 1), 1)   # pw(E -> out)
    assert layers['emb_linear'] == ((384, 768), 1)         # embed bottleneck: cemb -> out
    assert layers['conv_res3'] == ((384, 1, 3, 3), 384)    # dw(out)
    assert layers['conv_skip'] == ((384, 768, 1, 1), 1)
    g = flops.build_meta(img_resolution=64, img_channels=3, label_dim=1000, model_channels=192, block='G')
    assert tuple(g.unet.dec['32x32_block1'].emb_linear.weight.shape) == (1536, 768)  # modulates the wide tensor
    k7 = flops.build_meta(img_resolution=64, img_channels=3, label_dim=1000, model_channels=192, block='E-k7')
    assert tuple(k7.unet.enc['64x64_block0'].conv_res1.weight.shape) == (1152, 1, 7, 7)

def test_new_variant_is_a_line_of_data(monkeypatch):
    monkeypatch.setitem(BLOCK_VARIANTS, 'H', Variant('silu pw:in>E silu drop pw:E>out mod:out', 2))
    net = tiny('H')
    assert tuple(net.unet.enc['16x16_block0'].conv_res0.weight.shape) == (128, 64, 1, 1)
    assert net(torch.randn(1, 3, 16, 16), torch.ones(1)).shape == (1, 3, 16, 16)

def test_unknown_variant_and_bad_attention_width():
    with pytest.raises(ValueError, match='Unknown block variant "Z"'):
        tiny('Z')
    with pytest.raises(ValueError, match='width 200 does not split into 3 equal heads'):
        Precond(**{**TINY, 'model_channels': 100})

@pytest.mark.parametrize('block', list(BLOCK_VARIANTS))
def test_every_variant_trains_and_round_trips(block):
    net = tiny(block, dropout=0.1, model_channels=16, attn_resolutions=[]).train()
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 3.0]), torch.eye(10)[[1, 7]]
    D, logvar = net(x, sigma, labels, return_logvar=True)
    assert D.shape == x.shape and logvar.shape == (2, 1, 1, 1) and D.dtype == torch.float32
    D.square().mean().backward()
    assert all(p.grad is not None for n, p in net.named_parameters() if 'logvar' not in n)
    net.eval()
    copy = pickle.loads(pickle.dumps(net))
    assert torch.equal(copy(x, sigma, labels), net(x, sigma, labels))

def test_pickles_carry_the_reference_network_only():
    """A pickle embeds the source of networks/edm2plus.py alone (torch_utils/persistence.py): the reference network
    and its hook, none of the faster paths' code or private torch ops. (tests/test_compat.py runs such a pickle in an
    EDM2 environment: it computes our reference path bit for bit.)"""
    data = pickle.dumps(tiny('G*'))
    assert b'class Precond(torch.nn.Module)' in data and b'def register_faster(' in data
    for word in (b'mkldnn', b'torch.ops', b'autograd.Function', b'_train_block', b'_infer_block', b'_weight_cache'):
        assert word not in data, word
    assert edm2plus._faster is not None  # importing `networks` registered networks/fastpaths.py
    for module in ('networks.edm2plus', 'networks.presets'):  # whatever part of the package a script imports first
        code = f'import {module}, sys; print(sys.modules["networks.edm2plus"]._faster is not None)'
        proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.stdout.strip() == 'True', proc.stderr[-2000:]

#----------------------------------------------------------------------------
# Primitives (EDM2 paper, Appendix B) and preconditioning (EDM paper, Table 1).

def test_mp_primitives_preserve_magnitude():
    torch.manual_seed(1)
    a, b = torch.randn(4, 256, 32, 32), torch.randn(4, 128, 32, 32)
    assert abs(mp_silu(a).square().mean().item() - 1) < 0.05
    assert abs(mp_sum(a, torch.randn_like(a), 0.3).square().mean().item() - 1) < 0.01
    assert abs(mp_cat(a, b, t=0.5).square().mean().item() - 1) < 0.01
    n = normalize(torch.randn(8, 3, 3, 3) * 5)
    assert torch.allclose(n.flatten(1).square().mean(1), torch.ones(8), atol=1e-3)
    # eps + RMS: a zero vector stays finite.
    assert torch.equal(normalize(torch.zeros(1, 4)), torch.zeros(1, 4))

def test_initial_network_is_identity_skip():
    net = tiny('G*').eval()
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.2, 5.0])
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    assert torch.allclose(net(x, sigma, torch.eye(10)[:2]), c_skip.reshape(-1, 1, 1, 1) * x, atol=1e-6)

def test_forced_weight_normalisation_only_in_training():
    net = tiny('A')
    conv = net.unet.enc['16x16_block0'].conv_res0
    with torch.no_grad():
        conv.weight.mul_(3)
    before = conv.weight.detach().clone()
    net.eval()(torch.randn(1, 3, 16, 16), torch.ones(1), torch.eye(10)[:1])
    assert torch.equal(conv.weight, before)
    net.train()(torch.randn(1, 3, 16, 16), torch.ones(1), torch.eye(10)[:1])
    rms = conv.weight.detach().flatten(1).square().mean(1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3)

def test_attention_channel_layout():
    """qkv channel (head*C_h + c)*3 + j holds q (j=0), k (1), v (2) (EDM2's checkpoint layout): permuting it changes the output."""
    net = tiny('A').eval()
    blk = net.unet.enc['8x8_block0']
    assert blk.num_heads == 2
    x, emb = torch.randn(1, 64, 8, 8), torch.randn(1, 128)
    y = blk(x.clone(), emb)
    # Reference: explicit per-head cosine attention with the documented channel order.
    h = edm2plus.normalize(blk.conv_skip(x), dim=1)
    c = blk.emb_linear(emb, gain=blk.emb_gain) + 1
    r = blk.conv_res1(mp_silu(blk.conv_res0(mp_silu(h)) * c[:, :, None, None]))
    h = mp_sum(h, r, 0.3)
    qkv = blk.attn_qkv(h).reshape(1, 128, 3, 64)
    out = torch.zeros(1, 128, 64)
    for head in range(2):
        sl = slice(head * 64, head * 64 + 64)
        q, k, v = (edm2plus.normalize(qkv[:, sl, j], dim=1) for j in range(3))
        w = torch.softmax(torch.einsum('ncq,nck->nqk', q, k) / 8, dim=2)
        out[:, sl] = torch.einsum('nqk,nck->ncq', w, v)
    ref = mp_sum(h, blk.attn_proj(out.reshape(1, 128, 8, 8)), 0.3).clip(-256, 256)
    assert torch.allclose(y, ref, atol=1e-5)

def test_presets_table():
    assert presets.get('edm2plus-img64-s').block == 'G*' and presets.get('edm2plus-img64-s').channels == 192
    assert [presets.get(f'edm2plus-img64-{s}').channels for s in ('xs', 's', 'l', 'xl')] == [128, 192, 320, 384]
    assert [presets.get(f'edm2-img64-{s}').channels for s in ('xs', 's', 'm', 'l', 'xl')] == [128, 192, 256, 320, 384]
    assert presets.get('edm2-img512-l').duration == 1879048192 and presets.get('edm2-img64-xl').duration == 671088640
    with pytest.raises(ValueError, match='Invalid configuration preset "nope"'):
        presets.get('nope')
    kw = presets.network_kwargs('edm2-img512-xs', dropout=0.2, block=None)
    assert kw['img_channels'] == 4 and kw['dropout'] == 0.2 and kw['block'] == 'A'
    assert np.isclose(presets.get('edm2-img512-m').dropout, 0.1)
