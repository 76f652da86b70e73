"""The EDM2+ denoiser: EDM2's magnitude-preserving U-Net with every block variant of the EDM2+ paper (CONFIG A–G*).

CONFIG A is EDM2's network (same state_dict keys, shapes, parameter order and outputs). The other variants change
only the residual branch of each block; a variant is a recipe (data, see BLOCK_VARIANTS), built by one Block class.
This file is the reference network: EDM2's op sequence, bit for bit, which networks/flops.py counts and torch.compile
traces. Reading order: the magnitude-preserving formulas, the layers, the block variants, Block, UNet, Precond, and
the hook through which networks/fastpaths.py computes the same function faster (this file never imports it).

Every network pickle we write embeds this file's source (torch_utils/persistence.py), and EDM2's tools run it when
they load our snapshots; nothing registers with the hook there, so they run the reference network, as EDM2 would.
It must stay self-contained: numpy, torch, the standard library, torch_utils.persistence/misc and dnnlib only.
"""

import contextlib
import dataclasses

import numpy as np
import torch
from torch_utils import persistence

#----------------------------------------------------------------------------
# Magnitude-preserving formulas (EDM2 paper, Karras et al. 2024, Sec. 3 and Appendix B). Each keeps unit-variance
# inputs at unit variance. Every path of the network takes its constants and weights from here; the exact torch
# ops of the functions matter twice: for bitwise agreement with EDM2 and for the FLOP convention of networks/flops.py.

NORM_EPS = 1e-4     # floor of the RMS that normalize() divides by (EDM2 paper, Appendix B)
SILU_STD = 0.596    # standard deviation of SiLU(x) for x ~ N(0, 1): MP-SiLU divides by it (EDM2 eq. 81)

def norm_divisor(norm, n, eps=NORM_EPS):
    """eps + norm / sqrt(n): the floored RMS of n values whose L2 norm is `norm` (what normalize() divides by)."""
    return torch.add(eps, norm, alpha=np.sqrt(1 / n))

def normalize(x, dim=None, eps=NORM_EPS):
    """x divided by eps + its RMS over `dim` (default: all but the batch axis); norms in float32."""
    dim = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    return x / norm_divisor(norm, x.numel() // norm.numel(), eps).to(x.dtype)

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
    return torch.nn.functional.silu(x) / SILU_STD

def blend_variance(t):
    """Variance of (1 - t) * a + t * b for uncorrelated unit-variance a and b: MP-sum and MP-cat divide it out."""
    return (1 - t) ** 2 + t ** 2

def mp_sum(a, b, t=0.5):
    """Blend a -> b by t, rescaled so the result keeps unit variance (EDM2 eq. 88)."""
    return a.lerp(b, t) / np.sqrt(blend_variance(t))

def mp_sum_weights(t):
    """(factor of a, factor of b) in mp_sum(a, b, t) written as factor_a * a + factor_b * b."""
    s = np.sqrt(blend_variance(t))
    return (1 - t) / s, t / s

def mp_cat_weights(na, nb, t):
    """(factor of a, factor of b) in mp_cat of an na-channel a and an nb-channel b (EDM2 eq. 103)."""
    scale = np.sqrt((na + nb) / blend_variance(t))
    return scale / np.sqrt(na) * (1 - t), scale / np.sqrt(nb) * t

def mp_cat(a, b, dim=1, t=0.5):
    """Concatenate with a t-controlled balance of the two parts' contributions (EDM2 eq. 103)."""
    wa, wb = mp_cat_weights(a.shape[dim], b.shape[dim], t)
    return torch.cat([a * wa, b * wb], dim=dim)

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

    def forward(self, x, gain=1):
        path = _path(self, x)  # the hook at the end of this file
        if path != 'reference':
            return _faster_forward(path, 'MPConv', self, x, gain)
        # In training mode the stored weight is first projected back onto the unit-RMS sphere (forced weight
        # normalisation, EDM2 paper Sec. 2.3), in place and outside autograd. For a float32 parameter `w32` aliases
        # it, so `w` normalises the projected weight again, and the gradient goes through that.
        w32 = self.weight.to(torch.float32)
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w32))
        w = normalize(w32)
        scaled = (w * (gain / np.sqrt(w[0].numel()))).to(x.dtype)  # magnitude-preserving 1/sqrt(fan_in)
        if scaled.ndim == 2:
            return x @ scaled.t()
        return torch.nn.functional.conv2d(x, scaled, padding=(scaled.shape[-1] // 2,), groups=getattr(self, 'groups', 1))

    # Changes of the weight that its version counter may not see: a faster path drops what it derived from it.
    def train(self, mode=True):
        _weight_changed(self)
        return super().train(mode)

    def _apply(self, *args, **kwargs):
        _weight_changed(self)
        return super()._apply(*args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        _weight_changed(self)
        return super()._load_from_state_dict(*args, **kwargs)

#----------------------------------------------------------------------------
# Block variants as data (EDM2+ paper, Sec. 3, eqs. 2-9). A recipe lists the residual branch's layers left to right:
#   silu        MP-SiLU                         drop       dropout (training only, when dropout > 0)
#   conv:A>B    regular 3x3 convolution         pw:A>B     1x1 convolution
#   dw:A        depthwise k x k convolution     mod:A      multiply by (emb_linear(emb, gain=emb_gain) + 1)
# Widths: `in` = branch input (= out in encoder blocks), `out` = block output, `E` = expansion * out.
# A recipe is either one string or {'enc': ..., 'dec': ...}. Convolutions are named conv_res0, conv_res1, ... in
# order and the modulation's linear layer emb_linear, which gives CONFIG A exactly EDM2's parameter names and order.
# Everything the tools know about a variant is its Variant record: a new variant is one line of BLOCK_VARIANTS.

def recipe_tokens(recipe, flavor=None):
    """(op, argument) per layer of a recipe; for {'enc', 'dec'} recipes those of `flavor`, or of both if None."""
    if isinstance(recipe, dict):
        recipe = recipe[flavor] if flavor is not None else ' '.join(recipe.values())
    return [(op, arg) for op, _, arg in (token.partition(':') for token in recipe.split())]

@dataclasses.dataclass(frozen=True)
class Variant:
    recipe:     object              # the residual branch: a recipe, or {'enc': recipe, 'dec': recipe}
    expansion:  float = None        # default e (width of E = e * out); None: the recipe has no E
    kernel:     int = 3             # default k of the depthwise convolutions
    width:      int = 192           # base width of its row in the EDM2+ paper's Tables 1-2 (EDM2-S's is 192)

    @property
    def options(self):
        """Which of `expansion` and `kernel` change this variant's network."""
        ops = {op for op, _arg in recipe_tokens(self.recipe)}
        return tuple(name for name, used in [('expansion', self.expansion is not None), ('kernel', 'dw' in ops)] if used)

    def resolve(self, expansion=None, kernel=None):
        """(e, k) that a network of this variant is built with: the given values, the variant's where None."""
        return self.expansion if expansion is None else expansion, self.kernel if kernel is None else kernel

BLOCK_VARIANTS = {
    # name     Variant(recipe, e, k = 3, width = 192)
    'A':    Variant('silu conv:in>out mod:out silu drop conv:out>out'),                           # EDM2, eq. 2
    'B':    Variant({'enc': 'silu dw:in mod:out silu drop dw:out',
                     'dec': 'silu dw:in pw:in>out mod:out silu drop dw:out'}, width=384),       # dwconv, eq. 3
    'C':    Variant('silu dw:in silu pw:in>E silu dw:E mod:E silu drop pw:E>out', 6),            # dsconv, eq. 4
    'D':    Variant('silu dw:in pw:in>E silu dw:E mod:E silu drop pw:E>out', 6),                 # linear bottleneck, eq. 5
    'D*':   Variant('silu dw:in pw:in>E silu dw:E mod:E silu drop pw:E>out', 4),                 # D with e = 4
    'E':    Variant('silu pw:in>E silu dw:E mod:E silu drop pw:E>out', 6),                       # mbconv, eq. 6
    'E-k7': Variant('silu pw:in>E silu dw:E mod:E silu drop pw:E>out', 6, 7),                    # E with a 7x7 kernel
    'F':    Variant('silu dw:in pw:in>E silu dw:E mod:E silu drop pw:E>out silu dw:out', 4),     # + dwconv at end, eq. 7
    'G':    Variant('silu dw:in pw:in>E mod:E silu drop pw:E>out silu dw:out', 4),               # - middle dwconv, eq. 8
    'F*':   Variant('silu dw:in pw:in>E silu dw:E silu drop pw:E>out silu mod:out dw:out', 4),   # F + embed bottleneck
    'G*':   Variant('silu dw:in pw:in>E silu drop pw:E>out silu mod:out dw:out', 4),             # EDM2+, eq. 9
}

def parse_recipe(recipe, flavor, in_channels, out_channels, expansion, kernel):
    """Turn a recipe into [(op, attribute name, conv args)] with concrete widths."""
    widths = {'in': in_channels, 'out': out_channels, 'E': None if expansion is None else int(expansion * out_channels)}
    steps, num_convs = [], 0
    for op, arg in recipe_tokens(recipe, flavor):
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
        variant = BLOCK_VARIANTS[block]
        self.steps = parse_recipe(variant.recipe, flavor, out_channels if flavor == 'enc' else in_channels,
                                  out_channels, *variant.resolve(expansion, kernel))

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
            return _faster_forward(path, 'Block', self, x, emb)
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
        if path != 'reference':
            return _faster_forward(path, 'UNet', self, x, noise_labels, class_labels)
        return self.trunk(x, self.embedding(noise_labels, class_labels))

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
# The hook through which a faster implementation computes this network. networks/fastpaths.py (which importing the
# `networks` package imports) calls register_faster(); from then on each call of an MPConv, Block or UNet asks it
# which path to take. Where nothing registered (EDM2's tools running this file alone), every call is the code above.

_faster = None          # what register_faster() installed, or None
_fast_enabled = True    # False within reference_mode()

def register_faster(choose, forwards, forget):
    """Install a faster implementation of this network:
      choose(module, x) -> 'reference', or the name of a path, for one call of `module` (an MPConv, Block or UNet);
      forwards[path][class name](module, *args) computes that module's forward on that path;
      forget(conv) drops what the implementation derived from an MPConv's weight (the weight may have changed)."""
    global _faster
    _faster = dict(choose=choose, forwards=forwards, forget=forget)

@contextlib.contextmanager
def reference_mode(enabled=True):
    """Within this context every network of this module runs the reference path (EDM2's op sequence)."""
    global _fast_enabled
    previous, _fast_enabled = _fast_enabled, not enabled
    try:
        yield
    finally:
        _fast_enabled = previous

def _path(module, x):
    """'reference' (the code above) or the registered path that computes this call of `module`."""
    return 'reference' if _faster is None or not _fast_enabled else _faster['choose'](module, x)

def _faster_forward(path, class_name, module, *args):
    return _faster['forwards'][path][class_name](module, *args)

def _weight_changed(conv):
    if _faster is not None:
        _faster['forget'](conv)
