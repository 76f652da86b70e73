"""An independent, deliberately plain implementation of the denoiser's formulas, for tests.

It reads a network's weights from its state_dict and recomputes D(x, sigma, labels) from the formulas of the EDM2
paper (Karras et al. 2024, Appendix B) and the EDM2+ paper (Sec. 3, eqs. 2-9) alone: the U-Net layout is rebuilt
from the constructor arguments, every block variant's residual branch is transcribed from the paper's equations,
attention loops over heads with EDM2's qkv channel order, resampling is 2x2 averaging / pixel repetition. Nothing is imported from networks/edm2plus.py, so
a mistake there (in the reference path or the fast path) cannot cancel out here. By default it computes in float64,
which makes it a precise yardstick for both float32 paths.
"""

import numpy as np
import torch
import torch.nn.functional as F

# Residual branches, left to right (EDM2+ paper, eqs. 2-9). Widths: 'in' = branch input, 'out' = block
# output, 'E' = expansion * out. ('dw', C) is a depthwise k x k convolution, ('pw', A, B) a 1x1 one, ('conv', A, B)
# a dense 3x3 one, ('mod', C) the modulation. Dropout is omitted (identity in eval mode).
_G_STAR = ['silu', ('dw', 'in'), ('pw', 'in', 'E'), 'silu', ('pw', 'E', 'out'), 'silu', ('mod', 'out'), ('dw', 'out')]
BRANCHES = {
    'A': ['silu', ('conv', 'in', 'out'), ('mod', 'out'), 'silu', ('conv', 'out', 'out')],
    'B-enc': ['silu', ('dw', 'in'), ('mod', 'out'), 'silu', ('dw', 'out')],
    'B-dec': ['silu', ('dw', 'in'), ('pw', 'in', 'out'), ('mod', 'out'), 'silu', ('dw', 'out')],
    'C': ['silu', ('dw', 'in'), 'silu', ('pw', 'in', 'E'), 'silu', ('dw', 'E'), ('mod', 'E'), 'silu', ('pw', 'E', 'out')],
    'D': ['silu', ('dw', 'in'), ('pw', 'in', 'E'), 'silu', ('dw', 'E'), ('mod', 'E'), 'silu', ('pw', 'E', 'out')],
    'E': ['silu', ('pw', 'in', 'E'), 'silu', ('dw', 'E'), ('mod', 'E'), 'silu', ('pw', 'E', 'out')],
    'F': ['silu', ('dw', 'in'), ('pw', 'in', 'E'), 'silu', ('dw', 'E'), ('mod', 'E'), 'silu', ('pw', 'E', 'out'),
          'silu', ('dw', 'out')],
    'G': ['silu', ('dw', 'in'), ('pw', 'in', 'E'), ('mod', 'E'), 'silu', ('pw', 'E', 'out'), 'silu', ('dw', 'out')],
    'F*': ['silu', ('dw', 'in'), ('pw', 'in', 'E'), 'silu', ('dw', 'E'), 'silu', ('pw', 'E', 'out'), 'silu',
           ('mod', 'out'), ('dw', 'out')],
    'G*': _G_STAR,
}
BRANCHES['D*'] = BRANCHES['D']
BRANCHES['E-k7'] = BRANCHES['E']

def _branch(block, flavor):
    if block == 'B':
        return BRANCHES['B-' + flavor]
    return BRANCHES[block]

#----------------------------------------------------------------------------
# Formulas (EDM2 paper, Appendix B: magnitude-preserving layers).

def _rms_normalize(x, dims, eps=1e-4):
    n = x.square().sum(dim=dims, keepdim=True).sqrt()
    count = np.prod([x.shape[d] for d in dims])
    return x / (eps + n / np.sqrt(count))

def _weight(w, gain=1.0):
    """Forced-weight-normalised weight scaled by gain / sqrt(fan_in)."""
    dims = list(range(1, w.ndim))
    fan_in = np.prod(w.shape[1:])
    return _rms_normalize(w, dims) * gain / np.sqrt(fan_in)

def _conv(x, w, gain=1.0):
    groups = x.shape[1] // w.shape[1]
    return F.conv2d(x, _weight(w, gain), padding=w.shape[-1] // 2, groups=groups)

def _linear(x, w, gain=1.0):
    return x @ _weight(w, gain).t()

def _silu(x):
    return x * torch.sigmoid(x) / 0.596

def _mp_sum(a, b, t):
    return ((1 - t) * a + t * b) / np.sqrt((1 - t) ** 2 + t ** 2)

def _mp_cat(a, b, t):
    na, nb = a.shape[1], b.shape[1]
    c = np.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (c * (1 - t) / np.sqrt(na)), b * (c * t / np.sqrt(nb))], dim=1)

def _down(x):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).mean(dim=(3, 5))

def _up(x):
    return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)

def _attention(x, w_qkv, w_proj, heads):
    n, c, h, w = x.shape
    ch = c // heads
    qkv = _conv(x, w_qkv).reshape(n, c * 3, h * w)
    out = torch.zeros(n, c, h * w, dtype=x.dtype)
    for head in range(heads):
        # qkv channel (head * C_h + c) * 3 + j holds q (j = 0), k (1), v (2).
        idx = (head * ch + torch.arange(ch)) * 3
        q, k, v = (_rms_normalize(qkv[:, idx + j], dims=[1]) for j in range(3))
        logits = torch.einsum('ncq,nck->nqk', q, k) / np.sqrt(ch)
        weights = torch.softmax(logits, dim=2)
        out[:, head * ch:(head + 1) * ch] = torch.einsum('nqk,nck->ncq', weights, v)
    return _conv(out.reshape(n, c, h, w), w_proj)

#----------------------------------------------------------------------------

def _block(sd, prefix, x, emb, block, flavor, mode, heads, res_balance=0.3, attn_balance=0.3, clip=256):
    p = lambda name: sd.get(f'{prefix}.{name}')
    if mode == 'down':
        x = _down(x)
    elif mode == 'up':
        x = _up(x)
    if flavor == 'enc':
        if p('conv_skip.weight') is not None:
            x = _conv(x, p('conv_skip.weight'))
        x = _rms_normalize(x, dims=[1])
    y, num_convs = x, 0
    for step in _branch(block, flavor):
        if step == 'silu':
            y = _silu(y)
        elif step[0] == 'mod':
            c = _linear(emb, p('emb_linear.weight'), gain=p('emb_gain')) + 1
            y = y * c[:, :, None, None]
        else:
            y = _conv(y, p(f'conv_res{num_convs}.weight'))
            num_convs += 1
    if flavor == 'dec' and p('conv_skip.weight') is not None:
        x = _conv(x, p('conv_skip.weight'))
    x = _mp_sum(x, y, res_balance)
    if heads:
        x = _mp_sum(x, _attention(x, p('attn_qkv.weight'), p('attn_proj.weight'), heads), attn_balance)
    return x.clamp(-clip, clip)

def reference_forward(net, x, sigma, labels=None, dtype=torch.float64):
    """D(x, sigma) of `net` (a persistent Precond, built with keyword arguments) computed from the formulas."""
    kw = dict(model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[16, 8], block='A',
              channels_per_head=64)
    kw.update(net.init_kwargs)
    sd = {k: v.detach().to(dtype) for k, v in net.state_dict().items()}
    x, sigma = x.to(dtype), sigma.to(dtype).reshape(-1, 1, 1, 1)
    sigma_data = net.sigma_data
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma_data ** 2 + sigma ** 2).sqrt()
    c_noise = sigma.flatten().log() / 4

    # Embedding.
    fourier = (c_noise[:, None] * sd['unet.emb_fourier.freqs'][None] + sd['unet.emb_fourier.phases'][None]).cos()
    emb = _linear(fourier * np.sqrt(2), sd['unet.emb_noise.weight'])
    if net.label_dim:
        labels = torch.zeros(1, net.label_dim) if labels is None else labels
        emb = _mp_sum(emb, _linear(labels.to(dtype) * np.sqrt(net.label_dim), sd['unet.emb_label.weight']), 0.5)
    emb = _silu(emb)

    # U-Net (EDM2 paper Fig. 21): EDM2's module names and order.
    cblock = [kw['model_channels'] * m for m in kw['channel_mult']]
    heads = lambda c, res: c // kw['channels_per_head'] if res in kw['attn_resolutions'] else 0
    h = torch.cat([c_in * x, torch.ones_like(x[:, :1])], dim=1)
    skips = []
    for level, c in enumerate(cblock):
        res = net.img_resolution >> level
        if level == 0:
            h = _conv(h, sd[f'unet.enc.{res}x{res}_conv.weight'])
        else:
            h = _block(sd, f'unet.enc.{res}x{res}_down', h, emb, kw['block'], 'enc', 'down', 0)
        skips.append(h)
        for i in range(kw['num_blocks']):
            h = _block(sd, f'unet.enc.{res}x{res}_block{i}', h, emb, kw['block'], 'enc', 'keep', heads(c, res))
            skips.append(h)
    for level in reversed(range(len(cblock))):
        c, res = cblock[level], net.img_resolution >> level
        if level == len(cblock) - 1:
            h = _block(sd, f'unet.dec.{res}x{res}_in0', h, emb, kw['block'], 'dec', 'keep', c // kw['channels_per_head'])
            h = _block(sd, f'unet.dec.{res}x{res}_in1', h, emb, kw['block'], 'dec', 'keep', 0)
        else:
            h = _block(sd, f'unet.dec.{res}x{res}_up', h, emb, kw['block'], 'dec', 'up', 0)
        for i in range(kw['num_blocks'] + 1):
            h = _mp_cat(h, skips.pop(), 0.5)
            h = _block(sd, f'unet.dec.{res}x{res}_block{i}', h, emb, kw['block'], 'dec', 'keep', heads(c, res))
    F_x = _conv(h, sd['unet.out_conv.weight'], gain=sd['unet.out_gain'])
    return c_skip * x + c_out * F_x
