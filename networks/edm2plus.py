"""The EDM2+ denoiser: EDM2's magnitude-preserving U-Net with every block variant of the EDM2+ paper (CONFIG A–G*).

CONFIG A is EDM2's network (same state_dict keys, shapes, parameter order and outputs). The other variants change
only the residual branch of each block; a variant is a recipe (data, see BLOCK_VARIANTS), built by one Block class.

This file is embedded, as source text, in every network pickle we write (torch_utils/persistence.py), and EDM2's
tools execute it when they load our snapshots. It must therefore stay self-contained: it may import only numpy,
torch, the standard library, torch_utils.persistence, torch_utils.misc and dnnlib.

Two implementations of the same function live side by side. The *reference path* dispatches EDM2's ops one by one
(it is what training uses, what the FLOP counter counts and what EDM2 computes, bit for bit). The *fast path*
(section "Inference fast path") runs whenever a network is evaluated in eval mode without autograd: it normalises
each weight once and caches it, folds constant scale factors into those cached weights, runs channels-last with
oneDNN kernels (convolution + SiLU fused) and fused attention. It computes the same function up to float rounding
(tests/test_speed_equivalence.py); `reference_mode()` switches it off.
"""

import contextlib
import weakref

import numpy as np
import torch
from torch_utils import persistence

#----------------------------------------------------------------------------
# Magnitude-preserving primitives (EDM2 paper §3 / spec §2.8). Each keeps unit-variance inputs at unit variance.
# The exact torch ops matter twice: for bitwise agreement with EDM2 and for the FLOP convention (spec §8).

def normalize(x, dim=None, eps=1e-4):
    """x divided by eps + its RMS over `dim` (default: all but the batch axis); norms in float32."""
    dim = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=np.sqrt(norm.numel() / x.numel()))  # eps + ||x|| / sqrt(n)
    return x / norm.to(x.dtype)

def resample(x, f=[1, 1], mode='keep'):
    """2x down/upsampling with a separable filter f ([1,1]: average pooling / nearest neighbour)."""
    if mode == 'keep':
        return x
    f = torch.as_tensor(f, dtype=torch.float32, device=x.device)
    pad = (len(f) - 1) // 2
    f = f.ger(f).unsqueeze(0).unsqueeze(1) / f.sum().square()  # normalised 2-D kernel [1, 1, k, k]
    c = x.shape[1]
    if mode == 'down':
        return torch.nn.functional.conv2d(x, f.to(x.dtype).tile([c, 1, 1, 1]), groups=c, stride=2, padding=(pad,))
    assert mode == 'up'
    return torch.nn.functional.conv_transpose2d(x, (f * 4).to(x.dtype).tile([c, 1, 1, 1]), groups=c, stride=2, padding=(pad,))

def mp_silu(x):
    """SiLU scaled back to unit variance for unit-normal input (EDM2 eq. 81)."""
    return torch.nn.functional.silu(x) / 0.596

def mp_sum(a, b, t=0.5):
    """Blend a -> b by t, rescaled so the result keeps unit variance (EDM2 eq. 88)."""
    return a.lerp(b, t) / np.sqrt((1 - t) ** 2 + t ** 2)

def mp_cat(a, b, dim=1, t=0.5):
    """Concatenate with a t-controlled balance of the two parts' contributions (EDM2 eq. 103)."""
    na, nb = a.shape[dim], b.shape[dim]
    scale = np.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    a = a * (scale / np.sqrt(na) * (1 - t))
    b = b * (scale / np.sqrt(nb) * t)
    return torch.cat([a, b], dim=dim)

#----------------------------------------------------------------------------
# Inference fast path (issue 9). It is used when a network is evaluated in eval mode with autograd off (sampling,
# metrics, benchmarks). Training, gradients, the FLOP counter and torch.compile (which fuses the reference ops
# itself) always take the reference path. What it changes, and why each change keeps the function the same:
#   * Each weight is normalised once and cached (normalize() reads and writes every parameter: per call that is
#     about a third of a batch-1 forward pass). The cache entry is keyed on the parameter's version counter (bumped
#     by optimizer steps, EMA updates, copy_, load_state_dict), its storage, device and dtype, and is also dropped on
#     train()/eval(), .to()/.half() and load_state_dict(). Writes through `param.data` bypass the version counter:
#     after such a write, call net.train() or net.eval() once. The cache lives outside the module (not in pickles
#     or deep copies) and costs one extra copy of the weights. On a CPU, dense weights are kept prepacked in
#     oneDNN's blocked layout instead.
#   * Scalar factors are folded into the cached weights: MP-SiLU's 1/0.596 into the next layer, the MP-sum weight
#     t/sqrt((1-t)^2+t^2) into the layer that ends a branch (convolutions are linear, so only rounding differs).
#     At batch 1 the modulation in front of a depthwise convolution scales that convolution's (tiny) weight.
#   * Activations are channels-last, so 1x1 convolutions are plain matrix products over pixels and depthwise
#     convolutions get oneDNN's vectorised kernels; convolution + SiLU run as one oneDNN call.
#   * Self-attention uses scaled_dot_product_attention (the same softmax(q.k/sqrt(C_h)) v), resampling uses
#     avg_pool2d / nearest upsampling (the same [1,1] filters), elementwise updates are done in place, and on a CPU
#     large batches run in chunks of a few images (UNet.forward).

_fast_enabled = True
_FAST_CHUNK_PIXELS = 8192  # batch chunk (in pixels) of the fast path: 2 images at 64x64 (see UNet.forward)

@contextlib.contextmanager
def reference_mode(enabled=True):
    """Within this context every network of this module runs the reference path (EDM2's op sequence)."""
    global _fast_enabled
    previous, _fast_enabled = _fast_enabled, not enabled
    try:
        yield
    finally:
        _fast_enabled = previous

# torch < 2.3 has no torch.compiler.is_compiling: there compile traces the fast path (with graph breaks).
_is_compiling = getattr(getattr(torch, 'compiler', None), 'is_compiling', lambda: False)

def _use_fast(module, x):
    # Meta tensors (shape/FLOP analysis) and compilation want the plain op sequence.
    return (_fast_enabled and not module.training and not torch.is_grad_enabled() and x.device.type != 'meta'
            and not _is_compiling())

_weight_cache = weakref.WeakKeyDictionary()  # MPConv -> {(dtype, gain, scale): (validity key, entry)}

def _tensor_key(t):
    if not isinstance(t, torch.Tensor):
        return t
    if t.is_inference():
        return object()  # inference tensors have no version counter: never reuse (correct, just not faster)
    return (t._version, t.data_ptr(), t.device, t.dtype)

def _cached(conv, dtype, gain=1, scale=1):
    """Cache entry of `conv`: {'w': normalize(weight) * gain * scale / sqrt(fan_in) in `dtype`} (4-D weights
    channels-last). Users may add derived forms of w (a prepacked copy); they are invalidated with it."""
    entries = _weight_cache.setdefault(conv, {})
    valid = (_tensor_key(conv.weight), _tensor_key(gain))
    slot = (dtype, 'tensor' if isinstance(gain, torch.Tensor) else gain, scale)  # one slot per use of the layer
    hit = entries.get(slot)
    if hit is None or hit[0] != valid:
        w = conv.weight.to(torch.float32)
        w = normalize(w) * (gain * (scale / np.sqrt(w[0].numel())))
        w = w.to(dtype)
        if w.ndim == 4:
            w = w.contiguous(memory_format=torch.channels_last)
        hit = entries[slot] = (valid, {'w': w})
    return hit[1]

# oneDNN's fused and prepacked kernels (the ones torch.compile's CPU backend emits). They are private torch ops,
# absent from some builds: everything falls back to conv2d.
_mkldnn = getattr(torch.ops, 'mkldnn', None)
_onednn = torch.backends.mkldnn.is_available() and all(hasattr(_mkldnn, op) for op in
    ('_convolution_pointwise', '_linear_pointwise', '_reorder_convolution_weight', '_reorder_linear_weight'))

def _conv_fast(x, entry, groups=1, silu=False, channel_scale=None):
    """conv2d(x, entry['w']) with padding kernel//2 (channels-last output), then SiLU when `silu`.
    `channel_scale` ([C, 1, 1, 1], depthwise only) multiplies the weight first."""
    onednn = _onednn and x.device.type == 'cpu' and x.dtype == torch.float32
    if onednn and groups == 1:
        return _dense_onednn(x, entry, silu)
    w = entry['w'] if channel_scale is None else entry['w'] * channel_scale
    pad = w.shape[-1] // 2
    if onednn:
        return _mkldnn._convolution_pointwise(x, w, None, [pad, pad], [1, 1], [1, 1], groups,
                                              'swish' if silu else 'none', [], None)
    y = torch.nn.functional.conv2d(x, w, padding=(pad,), groups=groups)
    return torch.nn.functional.silu(y, inplace=True) if silu else y

def _dense_onednn(x, entry, silu):
    """Dense convolution with a weight prepacked once into oneDNN's blocked layout (repacking it on every call
    costs as much as the convolution itself at 8x8). The plain copy is dropped then: it would only cost memory."""
    if 'packed' not in entry:
        w = entry.pop('w')
        k = w.shape[-1]
        if k == 1:  # 1x1 convolution = matrix product of the [pixels, C_in] view of x with the [C_out, C_in] weight
            packed = _mkldnn._reorder_linear_weight(w.flatten(1), x.numel() // x.shape[1])
        else:
            packed = _mkldnn._reorder_convolution_weight(w, [k // 2] * 2, [1, 1], [1, 1], 1, list(x.shape))
        entry['packed'] = (k, packed)
    k, packed = entry['packed']
    attr = 'swish' if silu else 'none'
    if k == 1:
        n, c, h, w = x.shape
        x = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(-1, c)
        return _mkldnn._linear_pointwise(x, packed, None, attr, [], None).reshape(n, h, w, -1).permute(0, 3, 1, 2)
    return _mkldnn._convolution_pointwise(x, packed, None, [k // 2] * 2, [1, 1], [1, 1], 1, attr, [], None)

def _resample_fast(x, f, mode):
    # EDM2's default filter [1,1] is exactly 2x2 average pooling / nearest-neighbour upsampling.
    if mode == 'keep' or list(f) != [1, 1]:
        return resample(x, f=f, mode=mode)
    if mode == 'down':
        return torch.nn.functional.avg_pool2d(x, 2)
    return torch.nn.functional.interpolate(x, scale_factor=2, mode='nearest')

def _mp_cat_fast(a, b, t=0.5):
    """mp_cat along channels, written straight into one channels-last buffer (no scaled temporaries)."""
    na, nb = a.shape[1], b.shape[1]
    scale = np.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    out = torch.empty([a.shape[0], na + nb, *a.shape[2:]], dtype=a.dtype, device=a.device,
                      memory_format=torch.channels_last)
    torch.mul(a, scale / np.sqrt(na) * (1 - t), out=out[:, :na])
    torch.mul(b, scale / np.sqrt(nb) * t, out=out[:, na:])
    return out

#----------------------------------------------------------------------------
# Learned layers.

@persistence.persistent_class
class MPFourier(torch.nn.Module):
    """Random Fourier features of the noise level, sqrt(2)*cos(2*pi*(f*x + phi)) (EDM2 eq. 75)."""

    def __init__(self, num_channels, bandwidth=1):
        super().__init__()
        self.register_buffer('freqs', 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer('phases', 2 * np.pi * torch.rand(num_channels))

    def forward(self, x):
        y = x.to(torch.float32).ger(self.freqs.to(torch.float32))
        y = y + self.phases.to(torch.float32)
        y = y.cos() * np.sqrt(2)
        return y.to(x.dtype)

@persistence.persistent_class
class MPConv(torch.nn.Module):
    """Convolution (or linear layer when kernel=[]) with forced weight normalisation, no bias (EDM2 eq. 66).

    `groups` > 1 gives grouped/depthwise convolutions; the fan-in is then (in_channels / groups) * kh * kw.
    """

    def __init__(self, in_channels, out_channels, kernel, groups=1):
        super().__init__()
        self.out_channels = out_channels
        self.groups = groups
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels // groups, *kernel))

    def forward(self, x, gain=1):
        if _use_fast(self, x):
            entry = _cached(self, x.dtype, gain)
            return x @ entry['w'].t() if self.weight.ndim == 2 else _conv_fast(x, entry, getattr(self, 'groups', 1))
        w = self.weight.to(torch.float32)
        if self.training:
            # Forced weight normalisation: keep the stored weight itself on the unit sphere (EDM2 §2.3). The float32
            # view aliases the parameter, so the normalisation below acts on the freshly normalised weight.
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        w = normalize(w)
        w = w * (gain / np.sqrt(w[0].numel()))  # magnitude-preserving scale 1/sqrt(fan_in)
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return torch.nn.functional.conv2d(x, w, padding=(w.shape[-1] // 2,), groups=getattr(self, 'groups', 1))

    # Anything that may change the weight outside its version counter drops the fast path's cached copy.
    def train(self, mode=True):
        _weight_cache.pop(self, None)
        return super().train(mode)

    def _apply(self, *args, **kwargs):
        _weight_cache.pop(self, None)
        return super()._apply(*args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        _weight_cache.pop(self, None)
        return super()._load_from_state_dict(*args, **kwargs)

#----------------------------------------------------------------------------
# Block variants as data (edm2plus-blocks.md). A recipe lists the residual branch's layers left to right:
#   silu        MP-SiLU                         drop       dropout (training only, when dropout > 0)
#   conv:A>B    regular 3x3 convolution         pw:A>B     1x1 convolution
#   dw:A        depthwise k x k convolution     mod:A      multiply by (emb_linear(emb, gain=emb_gain) + 1)
# Widths: `in` = branch input (= out in encoder blocks), `out` = block output, `E` = expansion * out.
# A recipe is either one string or {'enc': ..., 'dec': ...}. Convolutions are named conv_res0, conv_res1, ... in
# order and the modulation's linear layer emb_linear, which gives CONFIG A exactly EDM2's parameter names and order.

BLOCK_VARIANTS = {
    # name    recipe                                                                      e     k
    'A':    ('silu conv:in>out mod:out silu drop conv:out>out',                           None, 3),  # EDM2, eq. 2
    'B':    ({'enc': 'silu dw:in mod:out silu drop dw:out',
              'dec': 'silu dw:in pw:in>out mod:out silu drop dw:out'},                    None, 3),  # dwconv, eq. 3
    'C':    ('silu dw:in silu pw:in>E silu dw:E mod:E silu drop pw:E>out',               6,    3),  # dsconv, eq. 4
    'D':    ('silu dw:in pw:in>E silu dw:E mod:E silu drop pw:E>out',                    6,    3),  # linear bottleneck, eq. 5
    'D*':   ('silu dw:in pw:in>E silu dw:E mod:E silu drop pw:E>out',                    4,    3),  # D with e = 4
    'E':    ('silu pw:in>E silu dw:E mod:E silu drop pw:E>out',                          6,    3),  # mbconv, eq. 6
    'E-k7': ('silu pw:in>E silu dw:E mod:E silu drop pw:E>out',                          6,    7),  # E with a 7x7 kernel
    'F':    ('silu dw:in pw:in>E silu dw:E mod:E silu drop pw:E>out silu dw:out',        4,    3),  # + dwconv at end, eq. 7
    'G':    ('silu dw:in pw:in>E mod:E silu drop pw:E>out silu dw:out',                  4,    3),  # - middle dwconv, eq. 8
    'F*':   ('silu dw:in pw:in>E silu dw:E silu drop pw:E>out silu mod:out dw:out',      4,    3),  # F + embed bottleneck
    'G*':   ('silu dw:in pw:in>E silu drop pw:E>out silu mod:out dw:out',                4,    3),  # EDM2+, eq. 9
}

def parse_recipe(recipe, flavor, in_channels, out_channels, expansion, kernel):
    """Turn a recipe string into [(op, attribute name, conv args)] with concrete widths."""
    if isinstance(recipe, dict):
        recipe = recipe[flavor]
    widths = {'in': in_channels, 'out': out_channels, 'E': None if expansion is None else int(expansion * out_channels)}
    steps, num_convs = [], 0
    for token in recipe.split():
        op, _, arg = token.partition(':')
        if op in ('silu', 'drop'):
            steps.append((op, None, None))
        elif op == 'mod':
            steps.append((op, 'emb_linear', widths[arg]))
        else:
            src, _, dst = arg.partition('>')
            c_in, c_out = widths[src], widths[dst or src]
            if c_in is None or c_out is None:
                raise ValueError(f'Block recipe "{recipe}" needs an expansion ratio')
            conv = {'conv': ([3, 3], 1), 'pw': ([1, 1], 1), 'dw': ([kernel, kernel], c_in)}[op]
            steps.append((op, f'conv_res{num_convs}', (c_in, c_out) + conv))
            num_convs += 1
    return steps

#----------------------------------------------------------------------------
# U-Net block: resampling, (encoder) skip projection + pixel norm, the variant's residual branch, MP-sum,
# optional self-attention, clipping (spec §2.8; edm2plus-blocks.md "What stays as in EDM2").

@persistence.persistent_class
class Block(torch.nn.Module):
    def __init__(self,
        in_channels,                    # channels entering the block
        out_channels,                   # channels leaving the block
        emb_channels,                   # width of the conditioning vector (cemb)
        flavor              = 'enc',    # 'enc' (encoder) or 'dec' (decoder)
        resample_mode       = 'keep',   # 'keep', 'down' (2x pool) or 'up' (2x nearest)
        resample_filter     = [1,1],    # separable resampling kernel
        attention           = False,    # add self-attention after the branch
        channels_per_head   = 64,       # head width C_h
        dropout             = 0,        # dropout inside the branch (training only)
        res_balance         = 0.3,      # MP-sum weight of the branch vs. the shortcut
        attn_balance        = 0.3,      # MP-sum weight of attention vs. its input
        clip_act            = 256,      # clamp outputs to +-clip_act; None disables
        block               = 'A',      # variant name, a key of BLOCK_VARIANTS
        expansion           = None,     # e: width of E = e*out; None: the variant's
        kernel              = None,     # k of the depthwise convs; None: the variant's
    ):
        super().__init__()
        if block not in BLOCK_VARIANTS:
            raise ValueError(f'Unknown block variant "{block}"; choose from {", ".join(BLOCK_VARIANTS)}')
        recipe, default_e, default_k = BLOCK_VARIANTS[block]
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = resample_filter
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0  # 0 heads: no attention
        if self.num_heads != 0 and out_channels % self.num_heads != 0:
            raise ValueError(f'Attention width {out_channels} does not split into {self.num_heads} equal heads')
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        branch_in = out_channels if flavor == 'enc' else in_channels
        self.steps = parse_recipe(recipe, flavor, branch_in, out_channels,
                                  default_e if expansion is None else expansion, default_k if kernel is None else kernel)
        for op, name, args in self.steps:
            if op == 'mod':
                setattr(self, name, MPConv(emb_channels, args, kernel=[]))
            elif name is not None:
                c_in, c_out, kernel_size, groups = args
                setattr(self, name, MPConv(c_in, c_out, kernel=kernel_size, groups=groups))
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads != 0 else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads != 0 else None

    def forward(self, x, emb):
        if _use_fast(self, x):
            return self._forward_fast(x, emb)
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == 'enc':
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm

        # Residual branch: the variant's recipe.
        y = x
        for op, name, _args in self.steps:
            if op == 'silu':
                y = mp_silu(y)
            elif op == 'drop':
                if self.training and self.dropout != 0:
                    y = torch.nn.functional.dropout(y, p=self.dropout)
            elif op == 'mod':
                c = self.emb_linear(emb, gain=self.emb_gain) + 1
                y = y * c.unsqueeze(2).unsqueeze(3).to(y.dtype)
            else:
                y = getattr(self, name)(y)

        if self.flavor == 'dec' and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        # Self-attention with cosine similarity (q, k, v normalised per head). The qkv channel index is
        # (head * C_h + c) * 3 + {0: q, 1: k, 2: v} (spec §2.8, §10.5).
        if self.num_heads != 0:
            y = self.attn_qkv(x).contiguous()  # a channels-last y (CPU training) would make the reshape copy anyway
            y = y.reshape(y.shape[0], self.num_heads, -1, 3, y.shape[2] * y.shape[3])
            q, k, v = normalize(y, dim=2).unbind(3)
            w = torch.einsum('nhcq,nhck->nhqk', q, k / np.sqrt(q.shape[2])).softmax(dim=3)
            y = torch.einsum('nhqk,nhck->nhcq', w, v)
            y = self.attn_proj(y.reshape(*x.shape))
            x = mp_sum(x, y, t=self.attn_balance)

        if self.clip_act is not None:
            x = x.clip_(-self.clip_act, self.clip_act)
        return x

    # Fast path (see "Inference fast path"): the same computation as forward(), op for op.
    def _forward_fast(self, x, emb):
        x = _resample_fast(x, self.resample_filter, self.resample_mode)
        if self.flavor == 'enc':
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)
        t = self.res_balance
        y = self._branch_fast(x, emb, out_scale=t / np.sqrt((1 - t) ** 2 + t ** 2))
        if self.flavor == 'dec' and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = y.add_(x, alpha=(1 - t) / np.sqrt((1 - t) ** 2 + t ** 2))  # mp_sum; y's share is already in y

        if self.num_heads != 0:
            # Same attention as forward().
            t = self.attn_balance
            n, c, h, w = x.shape
            # The cached qkv weight has its rows reordered from (head * C_h + c) * 3 + j to j * C + head * C_h + c,
            # so that channels-last memory holds [N, H*W, 3, heads, C_h]: normalising over C_h then reduces the
            # contiguous axis, and q, k, v are strided views that the fused attention kernel accepts as they are.
            entry = _cached(self.attn_qkv, x.dtype)
            if 'by_qkv' not in entry:
                wq = entry['w']
                entry['by_qkv'] = {'w': wq.reshape(c, 3, c, 1, 1).transpose(0, 1).reshape(wq.shape)
                                   .contiguous(memory_format=torch.channels_last)}
            y = _conv_fast(x, entry['by_qkv']).permute(0, 2, 3, 1).reshape(n, h * w, 3, self.num_heads, -1)
            norm = torch.linalg.vector_norm(y, dim=4, keepdim=True, dtype=torch.float32)  # normalize(., dim=C_h)
            y = y.div_(torch.add(1e-4, norm, alpha=np.sqrt(1 / y.shape[4])).to(y.dtype))
            q, k, v = y.permute(2, 0, 3, 1, 4)  # each [N, heads, H*W, C_h]
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # softmax(q.k / sqrt(C_h)) v
            y = y.permute(0, 2, 1, 3).reshape(n, h, w, c).permute(0, 3, 1, 2)  # channel = head * C_h + c
            y = _conv_fast(y, _cached(self.attn_proj, y.dtype, scale=t / np.sqrt((1 - t) ** 2 + t ** 2)))
            x = y.add_(x, alpha=(1 - t) / np.sqrt((1 - t) ** 2 + t ** 2))

        if self.clip_act is not None:
            x = x.clip_(-self.clip_act, self.clip_act)
        return x

    def _branch_fast(self, x, emb, out_scale):
        """The residual branch times out_scale. `k` is a scalar factor y still owes (true value = k * y): it is
        folded into the next linear layer's weight instead of costing a pass over the activations."""
        steps = [s for s in self.steps if s[0] != 'drop']  # dropout is the identity in eval mode
        y, k, fresh, channel_scale = x, 1.0, False, None   # fresh: y is ours to overwrite in place
        i = 0
        while i < len(steps):
            op, name, _args = steps[i]
            nxt = steps[i + 1][0] if i + 1 < len(steps) else None
            last = i + 1 == len(steps)
            if op == 'silu':
                if k != 1:
                    y = y.mul_(k) if fresh else y * k
                y = torch.nn.functional.silu(y, inplace=fresh)
                k, fresh = 1 / 0.596, True
            elif op == 'mod':
                c = self.emb_linear(emb, gain=self.emb_gain).add_(1).mul_(k).to(y.dtype)  # [N, C]
                k = 1.0
                if nxt == 'dw' and y.shape[0] == 1:
                    channel_scale = c.reshape(-1, 1, 1, 1)  # dw(c * y) = dw with its weight scaled by c
                else:
                    c = c.unsqueeze(2).unsqueeze(3)
                    y, fresh = (y.mul_(c) if fresh else y * c), True
            else:
                conv = getattr(self, name)
                entry = _cached(conv, y.dtype, scale=k * (out_scale if last else 1))
                fuse = nxt == 'silu'  # conv + SiLU in one kernel
                y = _conv_fast(y, entry, groups=conv.groups, silu=fuse, channel_scale=channel_scale)
                channel_scale = None
                k, fresh = (1 / 0.596 if fuse else 1.0), True
                i += fuse
                if last:
                    return y
            i += 1
        return y.mul_(k * out_scale) if fresh else y * (k * out_scale)

#----------------------------------------------------------------------------
# The U-Net: embedding network, encoder, decoder with skip connections (spec §2.8).

@persistence.persistent_class
class UNet(torch.nn.Module):
    def __init__(self,
        img_resolution,                 # side length of the (square) input
        img_channels,                   # channels of the input/output image
        label_dim,                      # number of classes; 0 for unconditional
        model_channels      = 192,      # base width; level widths are multiples
        channel_mult        = [1,2,3,4],# width multiplier per resolution level
        channel_mult_noise  = None,     # Fourier width / base; None: first level
        channel_mult_emb    = None,     # cemb / base; None: widest level
        num_blocks          = 3,        # encoder blocks per level (decoder: +1)
        attn_resolutions    = [16,8],   # resolutions whose blocks attend
        label_balance       = 0.5,      # MP-sum weight of labels vs. noise
        concat_balance      = 0.5,      # MP-cat weight of skips vs. main path
        **block_kwargs,                 # passed to every Block
    ):
        super().__init__()
        cblock = [model_channels * x for x in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = torch.nn.Parameter(torch.zeros([]))

        # Embedding.
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim != 0 else None

        # Encoder. Every module's output is pushed on the skip stack.
        self.enc = torch.nn.ModuleDict()
        cout = img_channels + 1  # + constant-ones channel
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f'{res}x{res}_conv'] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f'{res}x{res}_down'] = Block(cout, cout, cemb, flavor='enc', resample_mode='down', **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f'{res}x{res}_block{idx}'] = Block(cin, cout, cemb, flavor='enc', attention=(res in attn_resolutions), **block_kwargs)

        # Decoder. Modules named *_block* take the concatenation with a popped skip.
        self.dec = torch.nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f'{res}x{res}_in0'] = Block(cout, cout, cemb, flavor='dec', attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = Block(cout, cout, cemb, flavor='dec', **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = Block(cout, cout, cemb, flavor='dec', resample_mode='up', **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f'{res}x{res}_block{idx}'] = Block(cin, cout, cemb, flavor='dec', attention=(res in attn_resolutions), **block_kwargs)
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def forward(self, x, noise_labels, class_labels):
        # Embedding.
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(class_labels * np.sqrt(class_labels.shape[1])), t=self.label_balance)
        emb = mp_silu(emb)
        if not _use_fast(self, x):
            if _fast_enabled and x.device.type == 'cpu' and not _is_compiling():
                # Training on a CPU: channels-last activations let oneDNN run 1x1 and depthwise convolutions and
                # their gradients without reordering every tensor (benchmarks/train_speed.py: G* 1.20x, A 1.09x
                # faster).
                return self._unet(x.contiguous(memory_format=torch.channels_last), emb, fast=False).contiguous()
            return self._unet(x, emb, fast=False)
        # Fast path. On a CPU, large batches go through in chunks of at most _FAST_CHUNK_PIXELS pixels. Each image
        # is computed independently anyway, and the intermediates then stay below glibc's 32 MiB limit above which
        # every allocation is a fresh mmap whose pages fault in on first touch (~10% of G*'s time at batch 8; A's
        # narrower tensors were spared). It also cuts peak memory. (A GPU wants the whole batch at once.)
        n = max(1, _FAST_CHUNK_PIXELS // (x.shape[2] * x.shape[3]))
        if x.shape[0] <= n or x.device.type != 'cpu':
            return self._unet(x, emb, fast=True)
        return torch.cat([self._unet(x[i:i + n], emb[i:i + n] if emb.shape[0] > 1 else emb, fast=True)
                          for i in range(0, x.shape[0], n)])

    def _unet(self, x, emb, fast):
        # Encoder.
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        if fast:
            x = x.contiguous(memory_format=torch.channels_last)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if 'conv' in name else block(x, emb)
            skips.append(x)

        # Decoder.
        for name, block in self.dec.items():
            if 'block' in name:
                x = (_mp_cat_fast if fast else mp_cat)(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        x = self.out_conv(x, gain=self.out_gain)
        return x.contiguous() if fast else x

#----------------------------------------------------------------------------
# EDM preconditioning (Karras et al. 2022, Table 1) plus the learned log-variance head of EDM2's uncertainty-
# weighted loss (EDM2 eq. 21; spec §2.8).

@persistence.persistent_class
class Precond(torch.nn.Module):
    def __init__(self,
        img_resolution,                 # side length of the (square) input
        img_channels,                   # channels of the input/output image
        label_dim,                      # number of classes; 0 for unconditional
        use_fp16            = True,     # float16 activations on CUDA
        sigma_data          = 0.5,      # sigma_data of EDM's preconditioning
        logvar_channels     = 128,      # Fourier width of the log-variance head
        use_bf16            = False,    # bfloat16 instead (wins over fp16)
        **unet_kwargs,                  # passed to UNet
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.use_bf16 = use_bf16
        self.sigma_data = sigma_data
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False, **unet_kwargs):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        class_labels = None if self.label_dim == 0 else \
            torch.zeros([1, self.label_dim], device=x.device) if class_labels is None else \
            class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = torch.float32
        if x.device.type == 'cuda' and not force_fp32:
            if getattr(self, 'use_bf16', False):
                dtype = torch.bfloat16
            elif self.use_fp16:
                dtype = torch.float16

        # Preconditioning weights (EDM, Table 1).
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.flatten().log() / 4

        F_x = self.unet((c_in * x).to(dtype), c_noise, class_labels, **unet_kwargs)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if return_logvar:
            logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
            return D_x, logvar
        return D_x
