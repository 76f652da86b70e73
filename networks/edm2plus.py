"""The EDM2+ denoiser: EDM2's magnitude-preserving U-Net with every block variant of the EDM2+ paper (CONFIG A–G*).

CONFIG A is EDM2's network (same state_dict keys, shapes, parameter order and outputs). The other variants change
only the residual branch of each block; a variant is a recipe (data, see BLOCK_VARIANTS), built by one Block class.

This file is embedded, as source text, in every network pickle we write (torch_utils/persistence.py), and EDM2's
tools execute it when they load our snapshots. It must therefore stay self-contained: it may import only numpy,
torch, the standard library, torch_utils.persistence, torch_utils.misc and dnnlib.
"""

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
            y = self.attn_qkv(x)
            y = y.reshape(y.shape[0], self.num_heads, -1, 3, y.shape[2] * y.shape[3])
            q, k, v = normalize(y, dim=2).unbind(3)
            w = torch.einsum('nhcq,nhck->nhqk', q, k / np.sqrt(q.shape[2])).softmax(dim=3)
            y = torch.einsum('nhqk,nhck->nhcq', w, v)
            y = self.attn_proj(y.reshape(*x.shape))
            x = mp_sum(x, y, t=self.attn_balance)

        if self.clip_act is not None:
            x = x.clip_(-self.clip_act, self.clip_act)
        return x

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

        # Encoder.
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if 'conv' in name else block(x, emb)
            skips.append(x)

        # Decoder.
        for name, block in self.dec.items():
            if 'block' in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)

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
