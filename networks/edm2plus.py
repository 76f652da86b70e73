"""The EDM2+ denoiser: EDM2's magnitude-preserving U-Net with every block variant of the EDM2+ paper (CONFIG A–G*).

CONFIG A is EDM2's network (same state_dict keys, shapes, parameter order and outputs). The other variants change
only the residual branch of each block; a variant is a recipe (data, see BLOCK_VARIANTS), built by one Block class.

This file is embedded, as source text, in every network pickle we write (torch_utils/persistence.py), and EDM2's
tools execute it when they load our snapshots. It must therefore stay self-contained: it may import only numpy,
torch, the standard library, torch_utils.persistence, torch_utils.misc and dnnlib.

Reading order: the magnitude-preserving primitives, the layers, the block recipes, Block, UNet and Precond. These
define the network; their op sequence is EDM2's, bit for bit (the *reference path*: what the FLOP counter counts,
what torch.compile traces, and what `reference_mode()` forces). The last section holds the two faster ways to
compute the same function, chosen automatically per call:
  * the *inference path* (eval mode, autograd off: sampling, metrics), which caches normalised weights and folds
    constant factors into them;
  * the *training path* (autograd on, unless in reference_mode), which folds constants into the weights it
    normalises every step and fuses elementwise work.
Both agree with the reference path up to float rounding (tests/test_speed_equivalence.py, tests/test_train_path.py),
and on a CPU every image's result is bit-identical whatever the batch size (tests/test_batch_invariance.py).
"""

import contextlib
import weakref

import numpy as np
import torch
from torch_utils import persistence

#----------------------------------------------------------------------------
# Magnitude-preserving primitives (EDM2 paper, Karras et al. 2024, Sec. 3 and Appendix B). Each keeps unit-variance
# inputs at unit variance. The exact torch ops matter twice: for bitwise agreement with EDM2 and for the FLOP
# convention of networks/flops.py.

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
# Learned layers.

@persistence.persistent_class
class MPFourier(torch.nn.Module):
    """Random Fourier features of the noise level, sqrt(2)*cos(2*pi*(f*x + phi)) (EDM2 eq. 75)."""

    def __init__(self, num_channels, bandwidth=1):
        super().__init__()
        turn = 2 * np.pi  # frequencies and phases are drawn in turns, stored in radians
        self.register_buffer('freqs', torch.randn(num_channels) * turn * bandwidth)
        self.register_buffer('phases', torch.rand(num_channels) * turn)

    def forward(self, x):
        angle = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (angle.cos() * np.sqrt(2)).to(x.dtype)

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

    def unit_weight(self):
        """The float32 weight normalised to unit RMS per output channel. In training mode the stored weight is first
        projected back onto that sphere (forced weight normalisation, EDM2 paper Sec. 2.3), in place and outside
        autograd; for a float32 parameter `w32` aliases it, so what is returned normalises the projected weight."""
        w32 = self.weight.to(torch.float32)
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w32))
        return normalize(w32)

    def forward(self, x, gain=1):
        path = _path(self, x)
        if path != 'reference':
            return (_infer_mpconv if path == 'infer' else _train_mpconv)(self, x, gain)
        w = self.unit_weight()
        scaled = (w * (gain / np.sqrt(w[0].numel()))).to(x.dtype)  # magnitude-preserving 1/sqrt(fan_in)
        if scaled.ndim == 2:
            return x @ scaled.t()
        return torch.nn.functional.conv2d(x, scaled, padding=(scaled.shape[-1] // 2,), groups=getattr(self, 'groups', 1))

    # Anything that may change the weight outside its version counter drops the inference path's cached copy.
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
# Block variants as data (EDM2+ paper, Sec. 3, eqs. 2-9). A recipe lists the residual branch's layers left to right:
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
# U-Net block: resampling, (encoder) skip projection + pixel norm, the variant's residual branch, MP-sum, optional
# self-attention, clipping (EDM2 paper Fig. 21; EDM2+ paper Sec. 3: only the residual branch varies).

@persistence.persistent_class
class Block(torch.nn.Module):
    def __init__(self, in_channels, out_channels, emb_channels,  # widths: input, output, conditioning vector
        flavor              = 'enc',    # 'enc' (encoder) or 'dec' (decoder)
        block               = 'A',      # variant name, a key of BLOCK_VARIANTS
        expansion           = None,     # e: width of E = e*out; None: the variant's
        kernel              = None,     # k of the depthwise convs; None: the variant's
        dropout             = 0,        # dropout inside the branch (training only)
        resample_mode       = 'keep',   # 'keep', 'down' (2x pool) or 'up' (2x nearest)
        resample_filter     = [1,1],    # separable resampling kernel
        res_balance         = 0.3,      # MP-sum weight of the branch vs. the shortcut
        attention           = False,    # add self-attention after the branch
        channels_per_head   = 64,       # head width C_h
        attn_balance        = 0.3,      # MP-sum weight of attention vs. its input
        clip_act            = 256,      # clamp outputs to +-clip_act; None disables
    ):
        super().__init__()
        if block not in BLOCK_VARIANTS:
            raise ValueError(f'Unknown block variant "{block}"; choose from {", ".join(BLOCK_VARIANTS)}')
        heads = out_channels // channels_per_head if attention else 0  # 0 heads: no attention
        if heads != 0 and out_channels % heads != 0:
            raise ValueError(f'Attention width {out_channels} does not split into {heads} equal heads')
        recipe, default_e, default_k = BLOCK_VARIANTS[block]
        self.steps = parse_recipe(recipe, flavor, out_channels if flavor == 'enc' else in_channels, out_channels,
                                  default_e if expansion is None else expansion, default_k if kernel is None else kernel)

        # Settings, under the attribute names EDM2's code reads from a pickled block.
        self.flavor, self.out_channels, self.num_heads = flavor, out_channels, heads
        self.resample_mode, self.resample_filter = resample_mode, resample_filter
        self.res_balance, self.attn_balance = res_balance, attn_balance
        self.dropout, self.clip_act = dropout, clip_act

        # Parameters, in EDM2's order: the gain, the branch's layers left to right, the shortcut projection, attention.
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        for op, name, args in self.steps:
            if op == 'mod':
                setattr(self, name, MPConv(emb_channels, args, kernel=[]))
            elif name is not None:
                setattr(self, name, MPConv(args[0], args[1], kernel=args[2], groups=args[3]))
        self.conv_skip = None if in_channels == out_channels else MPConv(in_channels, out_channels, kernel=[1, 1])
        self.attn_qkv, self.attn_proj = (None, None) if heads == 0 else \
            (MPConv(out_channels, out_channels * 3, kernel=[1, 1]), MPConv(out_channels, out_channels, kernel=[1, 1]))

    def forward(self, x, emb):
        path = _path(self, x)
        if path != 'reference':
            return (_infer_block if path == 'infer' else _train_block)(self, x, emb)
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == 'enc':
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm
        y = self.branch(x, emb)
        if self.flavor == 'dec' and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads != 0:
            x = mp_sum(x, self.attention(x), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clip_(-self.clip_act, self.clip_act)
        return x

    def branch(self, x, emb):
        """The residual branch: the variant's recipe, one op after the other."""
        for op, name, _args in self.steps:
            if op == 'silu':
                x = mp_silu(x)
            elif op == 'drop':
                if self.training and self.dropout != 0:
                    x = torch.nn.functional.dropout(x, p=self.dropout)
            elif op == 'mod':
                x = x * (self.emb_linear(emb, gain=self.emb_gain) + 1).unsqueeze(2).unsqueeze(3).to(x.dtype)
            else:
                x = getattr(self, name)(x)
        return x

    def attention(self, x):
        """Self-attention with cosine similarity: q, k and v are normalised per head over its C_h channels. The qkv
        projection's channel index is (head * C_h + c) * 3 + {0: q, 1: k, 2: v}, as in EDM2's checkpoints."""
        n, c, h, w = x.shape
        qkv = self.attn_qkv(x).contiguous()  # a channels-last result would make the reshape copy anyway
        q, k, v = normalize(qkv.reshape(n, self.num_heads, -1, 3, h * w), dim=2).unbind(3)
        logits = torch.einsum('nhcq,nhck->nhqk', q, k / np.sqrt(q.shape[2]))
        mixed = torch.einsum('nhqk,nhck->nhcq', logits.softmax(dim=3), v)
        return self.attn_proj(mixed.reshape(n, c, h, w))

#----------------------------------------------------------------------------
# The U-Net: embedding network, encoder, decoder with skip connections (EDM2 paper Fig. 21).

def unet_layout(img_resolution, img_channels, widths, num_blocks, attn_resolutions):
    """The encoder and decoder as lists of (module name, in channels, out channels, Block options or None for the
    input convolution). Every encoder module's output is a skip; every decoder '*_block*' consumes the last one."""
    enc, width = [], img_channels + 1  # + a constant-ones channel
    for level, level_width in enumerate(widths):
        tag = f'{img_resolution >> level}x{img_resolution >> level}'
        attend = (img_resolution >> level) in attn_resolutions
        if level == 0:
            enc.append((f'{tag}_conv', width, level_width, None))
        else:
            enc.append((f'{tag}_down', width, width, dict(flavor='enc', resample_mode='down')))
        enc += [(f'{tag}_block{i}', width if i == 0 and level > 0 else level_width, level_width,
                 dict(flavor='enc', attention=attend)) for i in range(num_blocks)]
        width = level_width
    skips = [spec[2] for spec in enc]
    dec = []
    for level in reversed(range(len(widths))):
        tag = f'{img_resolution >> level}x{img_resolution >> level}'
        attend = (img_resolution >> level) in attn_resolutions
        if level == len(widths) - 1:
            dec += [(f'{tag}_in0', width, width, dict(flavor='dec', attention=True)),
                    (f'{tag}_in1', width, width, dict(flavor='dec'))]
        else:
            dec.append((f'{tag}_up', width, width, dict(flavor='dec', resample_mode='up')))
        for i in range(num_blocks + 1):
            dec.append((f'{tag}_block{i}', width + skips.pop(), widths[level], dict(flavor='dec', attention=attend)))
            width = widths[level]
    return enc, dec

def _takes_skip(name):
    return name.rsplit('_', 1)[-1].startswith('block')

@persistence.persistent_class
class UNet(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim,  # image side and channels; classes (0: none)
        model_channels      = 192,      # base width; level widths are multiples
        channel_mult        = [1,2,3,4],# width multiplier per resolution level
        num_blocks          = 3,        # encoder blocks per level (decoder: +1)
        attn_resolutions    = [16,8],   # resolutions whose blocks attend
        channel_mult_noise  = None,     # Fourier width / base; None: first level
        channel_mult_emb    = None,     # cemb / base; None: widest level
        label_balance       = 0.5,      # MP-sum weight of labels vs. noise
        concat_balance      = 0.5,      # MP-cat weight of skips vs. main path
        **block_kwargs,                 # passed to every Block
    ):
        super().__init__()
        widths = [model_channels * m for m in channel_mult]
        cnoise = widths[0] if channel_mult_noise is None else model_channels * channel_mult_noise
        cemb = max(widths) if channel_mult_emb is None else model_channels * channel_mult_emb
        self.label_balance, self.concat_balance = label_balance, concat_balance
        self.out_gain = torch.nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = None if label_dim == 0 else MPConv(label_dim, cemb, kernel=[])
        enc, dec = unet_layout(img_resolution, img_channels, widths, num_blocks, attn_resolutions)
        build = lambda c_in, c_out, opts: MPConv(c_in, c_out, kernel=[3, 3]) if opts is None else \
            Block(c_in, c_out, cemb, **opts, **block_kwargs)
        self.enc = torch.nn.ModuleDict([(name, build(*spec)) for name, *spec in enc])
        self.dec = torch.nn.ModuleDict([(name, build(*spec)) for name, *spec in dec])
        self.out_conv = MPConv(widths[0], img_channels, kernel=[3, 3])

    def forward(self, x, noise_labels, class_labels):
        path = _path(self, x)
        if path == 'train':
            return _train_unet(self, x, noise_labels, class_labels)
        emb = self.embedding(noise_labels, class_labels)
        return _infer_unet(self, x, emb) if path == 'infer' else self.trunk(x, emb)

    def embedding(self, noise_labels, class_labels):
        """The conditioning vector: Fourier features of the noise level, MP-summed with the class embedding."""
        noise = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is None:
            return mp_silu(noise)
        labels = self.emb_label(class_labels * np.sqrt(class_labels.shape[1]))
        return mp_silu(mp_sum(noise, labels, t=self.label_balance))

    def trunk(self, x, emb, cat=mp_cat):
        """Encoder (each output kept as a skip), decoder (consuming them), output convolution."""
        h = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        stack = []
        for layer in self.enc.values():
            h = layer(h) if isinstance(layer, MPConv) else layer(h, emb)
            stack.append(h)
        for name, layer in self.dec.items():
            h = layer(cat(h, stack.pop(), t=self.concat_balance) if _takes_skip(name) else h, emb)
        return self.out_conv(h, gain=self.out_gain)

#----------------------------------------------------------------------------
# EDM preconditioning (Karras et al. 2022, Table 1) plus the learned log-variance head of EDM2's uncertainty-
# weighted loss (EDM2 paper eq. 21).

@persistence.persistent_class
class Precond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim,  # image side and channels; classes (0: none)
        sigma_data          = 0.5,      # sigma_data of EDM's preconditioning
        logvar_channels     = 128,      # Fourier width of the log-variance head
        use_fp16            = True,     # float16 activations on CUDA
        use_bf16            = False,    # bfloat16 instead (wins over fp16)
        **unet_kwargs,                  # passed to UNet
    ):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16, self.use_bf16, self.sigma_data = use_fp16, use_bf16, sigma_data
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def activation_dtype(self, device, force_fp32=False):
        """float16 (or bfloat16) on CUDA unless disabled; float32 elsewhere."""
        if device.type != 'cuda' or force_fp32:
            return torch.float32
        if getattr(self, 'use_bf16', False):  # pickles from before the option lack the attribute
            return torch.bfloat16
        return torch.float16 if self.use_fp16 else torch.float32

    def coefficients(self, sigma):
        """c_skip, c_out, c_in and c_noise of EDM's preconditioning (Karras et al. 2022, Table 1)."""
        sd = self.sigma_data
        total = sigma ** 2 + sd ** 2  # sigma^2 + sigma_data^2
        return sd ** 2 / total, sigma * sd / total.sqrt(), 1 / total.sqrt(), sigma.flatten().log() / 4

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False, **unet_kwargs):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)  # unconditional use of a class net
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        dtype = self.activation_dtype(x.device, force_fp32)
        F_x = self.unet((c_in * x).to(dtype), c_noise, class_labels, **unet_kwargs)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if not return_logvar:
            return D_x
        return D_x, self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)

#----------------------------------------------------------------------------
# Faster paths: the same function as above, computed with fewer passes over memory.
#
# Which path a call takes (per module call, so a whole network agrees):
#   reference  reference_mode() (networks/flops.py counts in it) and torch.compile (inductor fuses the reference
#              ops itself);
#   infer      eval mode with autograd off: sampling, metrics, benchmarks;
#   train      everything else (training, or gradients through an eval-mode network).
#
# Batch invariance. A caller must get the same image whatever the batch it is part of. On a CPU two library kernels
# round differently for small batches: BLAS matrix products with fewer than 4 rows, and torch's convolution for a
# batch of 1 (which bypasses oneDNN). The faster paths therefore pad matrix products to at least 4 rows and call
# oneDNN's convolution directly. The reference path keeps EDM2's calls, and with them EDM2's batch dependence: its
# outputs are EDM2's bit for bit at every batch size, which rules out changing the kernels it calls.

_fast_enabled = True
_FAST_CHUNK_PIXELS = 8192  # batch chunk (in pixels) of the inference path on a CPU: 2 images at 64x64

@contextlib.contextmanager
def reference_mode(enabled=True):
    """Within this context every network of this module runs the reference path (EDM2's op sequence)."""
    global _fast_enabled
    previous, _fast_enabled = _fast_enabled, not enabled
    try:
        yield
    finally:
        _fast_enabled = previous

# torch < 2.3 has no torch.compiler.is_compiling: there compile traces the faster paths (with graph breaks).
_is_compiling = getattr(getattr(torch, 'compiler', None), 'is_compiling', lambda: False)

def _path(module, x):
    if not _fast_enabled or _is_compiling():
        return 'reference'
    return 'infer' if not module.training and not torch.is_grad_enabled() else 'train'

def _matmul_rows(x, w):
    """x @ w.t() with each row's result independent of the number of rows (see "Batch invariance")."""
    if x.shape[0] >= 4:
        return x @ w.t()
    return (torch.cat([x, x.new_zeros([4 - x.shape[0], *x.shape[1:]])]) @ w.t())[:x.shape[0]]

_mkldnn = getattr(torch.ops, 'mkldnn', None)
_onednn_conv = torch.backends.mkldnn.is_available() and hasattr(torch, 'mkldnn_convolution')

def _conv2d(x, w, groups=1):
    """conv2d with padding kernel//2; on a CPU in float32 through oneDNN at every batch size (see above)."""
    pad = w.shape[-1] // 2
    if _onednn_conv and x.device.type == 'cpu' and x.dtype == torch.float32:
        return torch.mkldnn_convolution(x, w, None, [pad, pad], [1, 1], [1, 1], groups)
    return torch.nn.functional.conv2d(x, w, padding=(pad,), groups=groups)

#----------------------------------------------------------------------------
# Training path. The reference path makes a pass over memory (forward, and again in backward) for every constant
# factor of the magnitude-preserving formulas; on a memory-bound device those passes, not the convolutions, set the
# time (benchmarks/traffic.py counts them). This path computes the same function with fewer passes:
#   * Constant factors are folded into the weights, which are normalised on every call anyway: MP-SiLU's 1/0.596
#     and dropout's 1/(1-p) into the next layer, the MP-sum weight t/sqrt((1-t)^2+t^2) into the layer that ends a
#     branch or the attention; the weight's normalisation and gain become one per-row factor (_MPWeight).
#   * MP-sum is one add with a scalar factor (its branch share is in the branch's last weight); the pixel norm has a
#     hand-written backward (four passes over the activations instead of about a dozen); mp_cat writes both scaled halves straight into
#     the output; clipping is skipped, forward and backward, when no value reaches the limit (checked on a CPU).
#   * Dropout multiplies by a 1-byte mask. bernoulli_ fills a tensor in storage order, so the mask is drawn in NCHW
#     order and then laid out channels-last: the same elements drop as in the reference layout at the same seed (on
#     a CPU; CUDA's reference dropout is a fused kernel with its own use of the generator).
#   * Activations are channels-last; attention uses scaled_dot_product_attention on q, k, v normalised in place
#     of the einsum/softmax sequence (the same softmax(q.k / sqrt(C_h)) v).

def _blend(t):
    """(branch weight, shortcut weight) of mp_sum(shortcut, branch, t)."""
    return t / np.sqrt((1 - t) ** 2 + t ** 2), (1 - t) / np.sqrt((1 - t) ** 2 + t ** 2)

class _MPWeight(torch.autograd.Function):
    """w * gain * scale / (sqrt(fan_in) * (eps + |w| / sqrt(fan_in))) per output channel (row) of w, i.e.
    normalize(w) * gain * scale / sqrt(fan_in), as one per-row factor, with the backward written out: for
    y = w * f, f = c / d, d = eps + |w| / sqrt(n), dL/dw = f * (g - w * <g, w> / (d * sqrt(n) * |w|)) and
    dL/dgain = sum over rows of <g, w> / (sqrt(n) * d) * scale. `gain` is a tensor (a learned gain) or None."""

    @staticmethod
    def forward(ctx, w, gain, scale):
        fan_in = w[0].numel()
        norm = torch.linalg.vector_norm(w, dim=list(range(1, w.ndim)), keepdim=True)
        d = torch.add(1e-4, norm, alpha=np.sqrt(1 / fan_in))  # as normalize()
        f0 = (scale / np.sqrt(fan_in)) / d
        f = f0 if gain is None else f0 * gain
        ctx.save_for_backward(w, norm, d, f0, f)
        ctx.has_gain = gain is not None
        return w * f

    @staticmethod
    def backward(ctx, g):
        w, norm, d, f0, f = ctx.saved_tensors
        dot = torch.linalg.vecdot(g.flatten(1), w.flatten(1)).reshape(d.shape)  # <g, w> per row
        coef = dot / (d * np.sqrt(w[0].numel()) * norm.clamp(min=1e-30))
        grad_w = torch.addcmul(g, w, coef, value=-1).mul_(f)
        grad_gain = (dot * f0).sum() if ctx.has_gain and ctx.needs_input_grad[1] else None
        return grad_w, grad_gain, None

def _gain32(gain, fan_in):
    """A learned gain in float32, for a folded weight factor. MPConv.forward rounds gain / sqrt(fan_in) in the
    gain's own dtype: float16 for a loaded snapshot, whose sampling (EDM2's generate_images keeps autograd on, so it
    runs this path) then keeps that rounding, up to 2^-11 of the output layer's gain. Float32 gains pass unchanged."""
    if gain.dtype == torch.float32:
        return gain
    return (gain / np.sqrt(fan_in)).to(torch.float32) * np.sqrt(fan_in)

def _train_weight(conv, dtype, gain=1, scale=1):
    """normalize(weight) * gain * scale / sqrt(fan_in), with forced weight normalisation in training mode, as
    MPConv.forward computes it (there the stored weight is normalised and then normalised again, which the
    gradient goes through)."""
    unit = _unit_weights.get(conv)
    if unit is not None:  # normalised already, with the network's other weights (see _unit_weight_table)
        if isinstance(gain, torch.Tensor):
            w = unit * (_gain32(gain, conv.weight[0].numel()) * scale)
        else:
            w = unit if gain * scale == 1 else unit * (gain * scale)
        w = w.to(dtype)
        return w.contiguous(memory_format=torch.channels_last) if w.ndim == 4 else w
    w32 = conv.weight.to(torch.float32)
    if conv.training:
        with torch.no_grad():
            if w32 is conv.weight:  # normalize() in place: the same division, without a copy
                norm = torch.linalg.vector_norm(w32, dim=list(range(1, w32.ndim)), keepdim=True)
                w32.div_(torch.add(1e-4, norm, alpha=np.sqrt(1 / w32[0].numel())))
            else:
                conv.weight.copy_(normalize(w32))
    if isinstance(gain, torch.Tensor):
        w = _MPWeight.apply(w32, _gain32(gain, w32[0].numel()), scale)
    else:
        w = _MPWeight.apply(w32, None, scale * gain)
    w = w.to(dtype)
    return w.contiguous(memory_format=torch.channels_last) if w.ndim == 4 else w

# Weight table. At the demo size a training step dispatches ~13,000 ops, and normalising each of G*'s ~100 weights
# on its own (forced normalisation, then normalize(w) / sqrt(fan_in) with its backward) is ~1,900 of them: ~20 ms
# of a 150 ms step on a CPU, and more for G* than for A, since G* has more layers. On a CPU the training path
# therefore normalises all float32 weights of the network before the forward pass, grouped by fan-in (the rows of
# one group have equal length and stack into one matrix): the same formulas with a few ops per group instead of per
# layer. Each layer then multiplies its unit weight by its gain and folded scale. On a GPU every layer keeps its own
# normalisation: there DDP reduces each weight's gradient as soon as backward reaches it, which one node for all
# weights would hold back to the end of backward.

_unit_weights = {}  # MPConv -> normalize(weight) / sqrt(fan_in) (float32), while a CPU training pass runs

def _rows(ws):
    """The weights as one [rows, fan_in] matrix (they share fan_in), and how to split it back."""
    return torch.cat([w.reshape(w.shape[0], -1) for w in ws]), [w.shape[0] for w in ws]

class _UnitWeights(torch.autograd.Function):
    """normalize(w) / sqrt(fan_in) for weights of one fan-in n, stacked as rows: y = w * f per row, f = 1 / (sqrt(n) *
    d), d = eps + |w| / sqrt(n); backward as _MPWeight's, dL/dw = f * (g - w * <g, w> / (d * sqrt(n) * |w|))."""

    @staticmethod
    def forward(ctx, *ws):
        w, sizes = _rows(ws)
        norm = torch.linalg.vector_norm(w, dim=1, keepdim=True)
        d = torch.add(1e-4, norm, alpha=np.sqrt(1 / w.shape[1]))  # as normalize()
        f = (1 / np.sqrt(w.shape[1])) / d
        ctx.save_for_backward(w, norm, d, f)
        ctx.shapes, ctx.sizes = [x.shape for x in ws], sizes
        ctx.set_materialize_grads(False)
        return tuple(y.view(shape) for y, shape in zip((w * f).split(sizes), ctx.shapes))

    @staticmethod
    def backward(ctx, *gs):
        if all(g is None for g in gs):
            return (None,) * len(gs)
        w, norm, d, f = ctx.saved_tensors
        g = torch.cat([(w.new_zeros(shape) if g is None else g).reshape(shape[0], -1) for g, shape in zip(gs, ctx.shapes)])
        dot = torch.linalg.vecdot(g, w).unsqueeze(1)  # <g, w> per row
        coef = dot / (d * np.sqrt(w.shape[1]) * norm.clamp(min=1e-30))
        grads = torch.addcmul(g, w, coef, value=-1).mul_(f).split(ctx.sizes)
        return tuple(None if g_in is None or not need else grad.view(shape)
                     for g_in, need, grad, shape in zip(gs, ctx.needs_input_grad, grads, ctx.shapes))

@contextlib.contextmanager
def _unit_weight_table(net):
    """Fill _unit_weights for the float32 CPU weights of `net` for one forward pass (see "Weight table"); in
    training mode the stored weights are first normalised in place, as MPConv.unit_weight does."""
    groups = {}
    for conv in net.modules():
        if isinstance(conv, MPConv) and conv.weight.dtype == torch.float32 and conv.weight.device.type == 'cpu':
            groups.setdefault(conv.weight[0].numel(), []).append(conv)
    try:
        for fan_in, convs in groups.items():
            trained = [conv.weight for conv in convs if conv.training]
            if trained:  # forced weight normalisation, the same ops as normalize() on each weight
                with torch.no_grad():
                    w, sizes = _rows(trained)
                    norm = torch.linalg.vector_norm(w, dim=1, keepdim=True)
                    w.div_(torch.add(1e-4, norm, alpha=np.sqrt(1 / fan_in)))
                    torch._foreach_copy_(trained, [y.view(p.shape) for y, p in zip(w.split(sizes), trained)])
            _unit_weights.update(zip(convs, _UnitWeights.apply(*[conv.weight for conv in convs])))
        yield
    finally:
        _unit_weights.clear()

def _train_mpconv(conv, x, gain):
    w = _train_weight(conv, x.dtype, gain)
    return _matmul_rows(x, w) if w.ndim == 2 else _conv2d(x, w, getattr(conv, 'groups', 1))

class _RMSNorm(torch.autograd.Function):
    """normalize(x, dim) for one dim, with the backward written out: for y = x / d, d = eps + |x| / sqrt(C),
    dL/dx = (g - x * <g, x> / (C * |x|/sqrt(C) * d)) / d."""

    @staticmethod
    def forward(ctx, x, dim):
        norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
        d = torch.add(1e-4, norm, alpha=np.sqrt(1 / x.shape[dim])).to(x.dtype)  # as normalize()
        ctx.save_for_backward(x, norm, d)
        ctx.dim = dim
        return x / d

    @staticmethod
    def backward(ctx, g):
        x, norm, d = ctx.saved_tensors
        if g.dtype == torch.float32:
            dot = torch.linalg.vecdot(g, x, dim=ctx.dim).unsqueeze(ctx.dim)
        else:  # float16/bfloat16: accumulate the dot products in float32
            dot = (g * x).sum(dim=ctx.dim, keepdim=True, dtype=torch.float32)
        coef = dot / (np.sqrt(x.shape[ctx.dim]) * norm.clamp(min=1e-30) * d)  # C * |x|/sqrt(C) = sqrt(C) * |x|
        return torch.addcmul(g, x, coef.to(g.dtype), value=-1).div_(d), None

class _MPCat(torch.autograd.Function):
    """mp_cat along channels, written straight into one channels-last buffer."""

    @staticmethod
    def forward(ctx, a, b, t):
        na, nb = a.shape[1], b.shape[1]
        scale = np.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
        ctx.factors = (scale / np.sqrt(na) * (1 - t), scale / np.sqrt(nb) * t)
        ctx.na = na
        return _mp_cat_fast(a, b, t)

    @staticmethod
    def backward(ctx, g):
        fa, fb = ctx.factors
        return g[:, :ctx.na] * fa, g[:, ctx.na:] * fb, None

def _train_cat(a, b, t=0.5):
    return _MPCat.apply(a, b, t)

def _clip(x, limit):
    """x.clip(-limit, limit); on a CPU the clamp (and its backward) is skipped when nothing reaches the limit. The
    check reads x's storage as one flat vector: torch's aminmax over a channels-last tensor's logical axes is ~14x
    slower (4.4 ms against 0.3 ms at 64x64x32x32, 2 cores), about 1.5% of a training step."""
    if x.device.type == 'cpu':
        flat = x.permute(0, 2, 3, 1).reshape(-1) if x.is_contiguous(memory_format=torch.channels_last) else x
        lo, hi = torch.aminmax(flat.detach())
        if lo >= -limit and hi <= limit:
            return x
    return x.clamp(-limit, limit)

def _train_branch(block, x, emb, out_scale):
    """The residual branch times out_scale. `k` is a scalar factor y still owes (true value = k * y), folded into
    the next weight or modulation instead of costing a pass over the activations."""
    y, k = x, 1.0
    for i, (op, name, _args) in enumerate(block.steps):
        if op == 'silu':
            y = torch.nn.functional.silu(y if k == 1 else y * k)
            k = 1 / 0.596
        elif op == 'drop':
            if block.training and block.dropout != 0:
                mask = torch.empty(y.shape, dtype=torch.bool, device=y.device).bernoulli_(1 - block.dropout)
                y, k = y * mask.contiguous(memory_format=torch.channels_last), k / (1 - block.dropout)
        elif op == 'mod':
            c = (block.emb_linear(emb, gain=block.emb_gain) + 1) * k
            y, k = y * c.to(y.dtype).unsqueeze(2).unsqueeze(3), 1.0
        else:
            conv = getattr(block, name)
            last = all(s[0] == 'drop' for s in block.steps[i + 1:])
            y = _conv2d(y, _train_weight(conv, y.dtype, scale=k * (out_scale if last else 1)), conv.groups)
            k = 1.0
            if last:
                return y
    return y * (k * out_scale)

def _train_attention(block, x, out_scale):
    """Block.attention times out_scale. The qkv weight's rows are reordered as in _infer_attention."""
    n, c, h, w = x.shape
    wq = _train_weight(block.attn_qkv, x.dtype)
    wq = wq.reshape(c, 3, c, 1, 1).transpose(0, 1).reshape(wq.shape).contiguous(memory_format=torch.channels_last)
    y = _conv2d(x, wq).permute(0, 2, 3, 1).reshape(n, h * w, 3, block.num_heads, -1)
    q, k, v = _RMSNorm.apply(y, 4).permute(2, 0, 3, 1, 4)  # each [N, heads, H*W, C_h]
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # softmax(q.k / sqrt(C_h)) v
    y = y.permute(0, 2, 1, 3).reshape(n, h, w, c).permute(0, 3, 1, 2)  # channel = head * C_h + c
    return _conv2d(y, _train_weight(block.attn_proj, y.dtype, scale=out_scale))

def _train_block(block, x, emb):
    """Block.forward on the training path."""
    x = _resample_fast(x, block.resample_filter, block.resample_mode)
    if block.flavor == 'enc':
        if block.conv_skip is not None:
            x = block.conv_skip(x)
        x = _RMSNorm.apply(x, 1)
    b, a = _blend(block.res_balance)
    y = _train_branch(block, x, emb, out_scale=b)
    if block.flavor == 'dec' and block.conv_skip is not None:
        x = block.conv_skip(x)
    x = torch.add(y, x, alpha=a)
    if block.num_heads != 0:
        b, a = _blend(block.attn_balance)
        x = torch.add(_train_attention(block, x, out_scale=b), x, alpha=a)
    return x if block.clip_act is None else _clip(x, block.clip_act)

def _train_unet(unet, x, noise_labels, class_labels):
    """UNet.forward on the training path, in channels-last memory; callers get the usual layout back."""
    with _unit_weight_table(unet) if x.device.type == 'cpu' else contextlib.nullcontext():
        emb = unet.embedding(noise_labels, class_labels)
        return unet.trunk(x.contiguous(memory_format=torch.channels_last), emb, cat=_train_cat).contiguous()

#----------------------------------------------------------------------------
# Inference path. What it changes, and why each change keeps the function the same:
#   * Each weight is normalised once and cached (normalize() reads and writes every parameter: per call that is
#     about a third of a batch-1 forward pass). The cache entry is keyed on the parameter's version counter (bumped
#     by optimizer steps, EMA updates, copy_, load_state_dict), its storage, device and dtype, and is also dropped on
#     train()/eval(), .to()/.half() and load_state_dict(). Writes through `param.data` bypass the version counter:
#     after such a write, call net.train() or net.eval() once. The cache lives outside the module (not in pickles
#     or deep copies) and costs one extra copy of the weights. On a CPU, dense weights are kept prepacked in
#     oneDNN's blocked layout instead.
#   * Scalar factors are folded into the cached weights: MP-SiLU's 1/0.596 into the next layer, the MP-sum weight
#     t/sqrt((1-t)^2+t^2) into the layer that ends a branch (convolutions are linear, so only rounding differs).
#   * Activations are channels-last, so 1x1 convolutions are plain matrix products over pixels and depthwise
#     convolutions get oneDNN's vectorised kernels; convolution + SiLU run as one oneDNN call.
#   * Self-attention uses scaled_dot_product_attention (the same softmax(q.k/sqrt(C_h)) v), resampling uses
#     avg_pool2d / nearest upsampling (the same [1,1] filters), elementwise updates are done in place, and on a CPU
#     large batches run in chunks of a few images (_infer_unet).

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
# absent from some builds: everything falls back to _conv2d.
_onednn = torch.backends.mkldnn.is_available() and all(hasattr(_mkldnn, op) for op in
    ('_convolution_pointwise', '_linear_pointwise', '_reorder_convolution_weight', '_reorder_linear_weight'))

def _conv_fast(x, entry, groups=1, silu=False):
    """conv2d(x, entry['w']) with padding kernel//2 (channels-last output), then SiLU when `silu`."""
    onednn = _onednn and x.device.type == 'cpu' and x.dtype == torch.float32
    if onednn and groups == 1:
        return _dense_onednn(x, entry, silu)
    w = entry['w']
    if onednn:
        pad = w.shape[-1] // 2
        return _mkldnn._convolution_pointwise(x, w, None, [pad, pad], [1, 1], [1, 1], groups,
                                              'swish' if silu else 'none', [], None)
    y = _conv2d(x, w, groups)
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

def _infer_mpconv(conv, x, gain):
    entry = _cached(conv, x.dtype, gain)
    if conv.weight.ndim == 2:
        return _matmul_rows(x, entry['w'])
    return _conv_fast(x, entry, getattr(conv, 'groups', 1))

def _infer_plan(steps):
    """The branch as [(op, layer name, fuse SiLU)], ops 'silu', 'mod' or 'conv': dropout (the identity in eval
    mode) dropped, and each convolution that SiLU follows marked to run with it as one kernel."""
    plan = []
    for op, name, _args in steps:
        if op == 'drop':
            continue
        if op == 'silu' and plan and plan[-1][0] == 'conv' and not plan[-1][2]:
            plan[-1] = ('conv', plan[-1][1], True)
        else:
            plan.append((op if op in ('silu', 'mod') else 'conv', name, False))
    return plan

def _infer_branch(block, x, emb, out_scale):
    """The residual branch times out_scale. `k` is a scalar factor y still owes (true value = k * y): it is folded
    into the next linear layer's weight instead of costing a pass over the activations. `owned`: y is a fresh
    tensor of ours, so elementwise updates may be done in place."""
    plan = _infer_plan(block.steps)
    y, k, owned = x, 1.0, False
    for i, (op, name, silu) in enumerate(plan):
        if op == 'silu':
            if k != 1:
                y, owned = (y.mul_(k) if owned else y * k), True
            y = torch.nn.functional.silu(y, inplace=owned)
            k, owned = 1 / 0.596, True
        elif op == 'mod':
            c = block.emb_linear(emb, gain=block.emb_gain).add_(1).mul_(k).to(y.dtype).unsqueeze(2).unsqueeze(3)
            y, k, owned = (y.mul_(c) if owned else y * c), 1.0, True
        else:
            fold = i == len(plan) - 1 and not silu  # the branch ends here: out_scale goes into this weight too
            conv = getattr(block, name)
            y = _conv_fast(y, _cached(conv, y.dtype, scale=k * (out_scale if fold else 1)), conv.groups, silu)
            k, owned = (1 / 0.596 if silu else 1.0), True
            if fold:
                return y
    return y.mul_(k * out_scale) if owned else y * (k * out_scale)

def _infer_attention(block, x):
    """attn_proj(attention(x)) of Block.attention, without its MP-sum weight folded in (done by the caller)."""
    n, c, h, w = x.shape
    # The cached qkv weight has its rows reordered from (head * C_h + c) * 3 + j to j * C + head * C_h + c, so that
    # channels-last memory holds [N, H*W, 3, heads, C_h]: normalising over C_h then reduces the contiguous axis, and
    # q, k, v are strided views that the fused attention kernel accepts as they are.
    entry = _cached(block.attn_qkv, x.dtype)
    if 'by_qkv' not in entry:
        wq = entry['w']
        entry['by_qkv'] = {'w': wq.reshape(c, 3, c, 1, 1).transpose(0, 1).reshape(wq.shape)
                           .contiguous(memory_format=torch.channels_last)}
    y = _conv_fast(x, entry['by_qkv']).permute(0, 2, 3, 1).reshape(n, h * w, 3, block.num_heads, -1)
    norm = torch.linalg.vector_norm(y, dim=4, keepdim=True, dtype=torch.float32)  # normalize(., dim=C_h)
    y = y.div_(torch.add(1e-4, norm, alpha=np.sqrt(1 / y.shape[4])).to(y.dtype))
    q, k, v = y.permute(2, 0, 3, 1, 4)  # each [N, heads, H*W, C_h]
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # softmax(q.k / sqrt(C_h)) v
    return y.permute(0, 2, 1, 3).reshape(n, h, w, c).permute(0, 3, 1, 2)  # channel = head * C_h + c

def _infer_block(block, x, emb):
    """Block.forward on the inference path; each MP-sum's branch weight is folded into the branch's last layer."""
    x = _resample_fast(x, block.resample_filter, block.resample_mode)
    if block.flavor == 'enc':
        if block.conv_skip is not None:
            x = block.conv_skip(x)
        x = normalize(x, dim=1)
    b, a = _blend(block.res_balance)
    y = _infer_branch(block, x, emb, out_scale=b)
    if block.flavor == 'dec' and block.conv_skip is not None:
        x = block.conv_skip(x)
    x = y.add_(x, alpha=a)  # mp_sum; the branch's share is already in y
    if block.num_heads != 0:
        b, a = _blend(block.attn_balance)
        y = _infer_attention(block, x)
        x = _conv_fast(y, _cached(block.attn_proj, y.dtype, scale=b)).add_(x, alpha=a)
    if block.clip_act is not None:
        x = x.clip_(-block.clip_act, block.clip_act)
    return x

def _infer_unet(unet, x, emb):
    """UNet.trunk on the inference path. On a CPU, large batches go through in chunks of at most _FAST_CHUNK_PIXELS
    pixels. Each image is computed independently anyway, and the intermediates then stay below glibc's 32 MiB limit
    above which every allocation is a fresh mmap whose pages fault in on first touch (~10% of G*'s time at batch 8).
    It also cuts peak memory. (A GPU wants the whole batch at once.)"""
    n = max(1, _FAST_CHUNK_PIXELS // (x.shape[2] * x.shape[3]))
    run = lambda x, emb: unet.trunk(x.contiguous(memory_format=torch.channels_last), emb, cat=_mp_cat_fast).contiguous()
    if x.shape[0] <= n or x.device.type != 'cpu':
        return run(x, emb)
    return torch.cat([run(x[i:i + n], emb[i:i + n] if emb.shape[0] > 1 else emb) for i in range(0, x.shape[0], n)])
