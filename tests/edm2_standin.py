"""A stand-in for EDM2's own environment, for the compatibility tests (test_compat.py, test_export.py).

EDM2's code is not available here (and may not be copied), so this module writes, into a temporary folder, a
minimal package tree with the names EDM2's pickles and embedded sources rely on: `dnnlib` with
EasyDict, `torch_utils.persistence` implementing the version-6 pickle format in a few lines, `torch_utils.misc`
with const_like/constant, and (for writing EDM2-layout snapshots) stubs of `torch_utils.distributed` and
`torch_utils.training_stats` plus a `training` package whose network module is an independent implementation of
EDM2's CONFIG A from the EDM2 paper's formulas (EDM2's names, state_dict layout and attributes). Scripts run in a fresh Python
started with -S (no site processing, so the editable install of this project is invisible) with only that folder
and the interpreter's site-packages (torch, numpy, psutil) on sys.path.
"""

import os
import subprocess
import sys
import sysconfig
import textwrap

# Tiny CONFIG A: 8x8, two levels, attention (2 heads of 16 channels) at 4x4.
TINY = dict(img_resolution=8, img_channels=3, label_dim=4, model_channels=16, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[4], channels_per_head=16)

#----------------------------------------------------------------------------
# Core of EDM2's environment: what any pickle of persistent objects needs.

CORE = {}

CORE['dnnlib/__init__.py'] = '''
from .util import EasyDict, make_cache_dir_path
'''

CORE['dnnlib/util.py'] = '''
import os
import tempfile

class EasyDict(dict):
    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key)
    def __setattr__(self, key, value):
        self[key] = value
    def __delattr__(self, key):
        del self[key]

def make_cache_dir_path(*parts):
    return os.path.join(tempfile.gettempdir(), '.cache', 'dnnlib', *parts)
'''

CORE['torch_utils/__init__.py'] = ''

# Version-6 persistent pickles: the decorator records the constructor arguments and pickles the
# instance as _reconstruct_persistent_obj(meta) with the defining module's full source text.
CORE['torch_utils/persistence.py'] = '''
import copy
import inspect
import sys
import types
import uuid
import dnnlib

_version = 6
_persistent = set()
_src_by_module = {}
_module_by_src = {}

def _register(module, src):
    _src_by_module[module] = src
    _module_by_src.setdefault(src, module)

def persistent_class(cls):
    if cls in _persistent:
        return cls
    module = sys.modules[cls.__module__]
    if module not in _src_by_module:
        _register(module, inspect.getsource(module))
    src = _src_by_module[module]

    class Persistent(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)

        @property
        def init_args(self):
            return copy.deepcopy(self._init_args)

        @property
        def init_kwargs(self):
            return dnnlib.EasyDict(copy.deepcopy(self._init_kwargs))

        def __reduce__(self):
            fields = list(super().__reduce__()) + [None] * 3
            meta = dict(type='class', version=_version, module_src=src, class_name=cls.__name__, state=fields[2])
            return (_reconstruct_persistent_obj, (meta,), None, fields[3], fields[4])

    Persistent.__name__, Persistent.__qualname__, Persistent.__module__ = cls.__name__, cls.__qualname__, cls.__module__
    _persistent.add(Persistent)
    return Persistent

def is_persistent(obj):
    return obj in _persistent or type(obj) in _persistent

def _reconstruct_persistent_obj(meta):
    meta = dnnlib.EasyDict(meta)
    meta.state = dnnlib.EasyDict(meta.state)
    assert meta.version == _version and meta.type == 'class'
    module = _module_by_src.get(meta.module_src)
    if module is None:
        module = types.ModuleType('_imported_module_' + uuid.uuid4().hex)
        sys.modules[module.__name__] = module
        _register(module, meta.module_src)
        exec(meta.module_src, module.__dict__)
    cls = persistent_class(getattr(module, meta.class_name))
    obj = cls.__new__(cls)
    if hasattr(obj, '__setstate__'):
        obj.__setstate__(meta.state)
    else:
        obj.__dict__.update(meta.state)
    return obj
'''

CORE['torch_utils/misc.py'] = '''
import numpy as np
import torch

_cache = {}

def constant(value, shape=None, dtype=None, device=None, memory_format=None):
    value = np.asarray(value)
    shape = None if shape is None else tuple(shape)
    key = (value.shape, value.dtype, value.tobytes(), shape, dtype, device, memory_format)
    if key not in _cache:
        tensor = torch.as_tensor(value.copy(), dtype=dtype, device=device)
        if shape is not None:
            tensor = tensor.expand(shape)
        _cache[key] = tensor.contiguous(memory_format=memory_format or torch.contiguous_format)
    return _cache[key]

def const_like(ref, value, shape=None, dtype=None, device=None, memory_format=None):
    return constant(value, shape=shape, dtype=dtype or ref.dtype, device=device or ref.device, memory_format=memory_format)
'''

#----------------------------------------------------------------------------
# The rest of a training environment: what EDM2-layout snapshots are written with.

WRITER = dict(CORE)

WRITER['torch_utils/distributed.py'] = '''
def get_rank():
    return 0

def get_world_size():
    return 1

def print0(*args, **kwargs):
    print(*args, **kwargs)
'''

WRITER['torch_utils/training_stats.py'] = '''
def report(name, value):
    return value

def report0(name, value):
    return value
'''

WRITER['training/__init__.py'] = ''

# EDM2's CONFIG A network, written for these tests from the formulas of the EDM2 paper (Karras et al. 2024).
WRITER['training/networks_edm2.py'] = '''
"""Test stand-in for EDM2's network module: CONFIG A under EDM2's class, attribute and parameter names.

The U-Net is first written out as a table of layers (`unet_layout`), which the classes then instantiate; a block's
own layers come from a second table (`block_layers`). Creation order = parameter order = order of random draws.
"""

import numpy as np
import torch
from torch_utils import persistence
from torch_utils import misc

def normalize(x, dim=None, eps=1e-4):
    dims = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.float32)
    rms = norm * np.sqrt(norm.numel() / x.numel())
    return x / (eps + rms).to(x.dtype)

def resample(x, f=[1, 1], mode='keep'):
    if mode == 'keep':
        return x
    taps = np.asarray(f, dtype=np.float32)
    kernel = np.outer(taps, taps) / np.square(taps.sum())
    channels = x.shape[1]
    weight = misc.const_like(x, np.tile(kernel[None, None], (channels, 1, 1, 1)))
    pad = (len(taps) - 1) // 2
    if mode == 'down':
        return torch.nn.functional.conv2d(x, weight, stride=2, padding=pad, groups=channels)
    return torch.nn.functional.conv_transpose2d(x, weight * 4, stride=2, padding=pad, groups=channels)

def mp_silu(x):
    return torch.nn.functional.silu(x) / 0.596

def mp_sum(a, b, t=0.5):
    return (a * (1 - t) + b * t) / np.sqrt((1 - t) ** 2 + t ** 2)

def mp_cat(a, b, dim=1, t=0.5):
    na, nb = a.shape[dim], b.shape[dim]
    c = np.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (c * (1 - t) / np.sqrt(na)), b * (c * t / np.sqrt(nb))], dim=dim)

def set_plain(module, **values):
    """Plain (non-tensor) attributes, which the pickled state carries by name."""
    for key, value in values.items():
        setattr(module, key, value)

#----------------------------------------------------------------------------
# Layers.

def fourier_features(x, freqs, phases):
    # sqrt(2) cos(freqs x + phases), evaluated in float32 whatever the storage dtype.
    as32 = [t.to(torch.float32) for t in (x, freqs, phases)]
    angles = torch.outer(as32[0], as32[1]) + as32[2]
    return (np.sqrt(2) * torch.cos(angles)).to(x.dtype)

@persistence.persistent_class
class MPFourier(torch.nn.Module):
    def __init__(self, num_channels, bandwidth=1):
        super().__init__()
        # Both buffers are 2 pi times a draw: normal frequencies (times bandwidth), then uniform phases.
        for name, draw, scale in [('freqs', torch.randn, bandwidth), ('phases', torch.rand, 1)]:
            self.register_buffer(name, 2 * np.pi * draw(num_channels) * scale)

    def forward(self, x):
        return fourier_features(x, self.freqs, self.phases)

def used_weight(param, gain, training, dtype):
    """The weight an MPConv applies: unit-norm rows (forced into the stored parameter while training) scaled by
    gain / sqrt(fan_in)."""
    w = param.to(torch.float32)
    if training:
        with torch.no_grad():
            param.copy_(normalize(w))  # float32 storage: w is that same tensor, so it is normalised as well
    fan_in = w[0].numel()
    return (normalize(w) * (gain / np.sqrt(fan_in))).to(dtype)

@persistence.persistent_class
class MPConv(torch.nn.Module):
    def __init__(self, in_channels, out_channels, kernel):
        super().__init__()
        set_plain(self, out_channels=out_channels)
        shape = [out_channels, in_channels] + list(kernel)
        self.weight = torch.nn.Parameter(torch.randn(shape))

    def forward(self, x, gain=1):
        w = used_weight(self.weight, gain, self.training, x.dtype)
        if w.ndim == 4:
            return torch.nn.functional.conv2d(x, w, padding=w.shape[-1] // 2)
        return torch.nn.functional.linear(x, w)

#----------------------------------------------------------------------------
# Blocks.

def block_layers(in_channels, out_channels, emb_channels, flavor, num_heads):
    """(name, input width, output width, kernel, present) of a block's convolutions, in creation order."""
    branch_in = out_channels if flavor == 'enc' else in_channels
    attn = num_heads > 0
    return [
        ('conv_res0',  branch_in,    out_channels,     [3, 3], True),
        ('emb_linear', emb_channels, out_channels,     [],     True),
        ('conv_res1',  out_channels, out_channels,     [3, 3], True),
        ('conv_skip',  in_channels,  out_channels,     [1, 1], in_channels != out_channels),
        ('attn_qkv',   out_channels, 3 * out_channels, [1, 1], attn),
        ('attn_proj',  out_channels, out_channels,     [1, 1], attn),
    ]

@persistence.persistent_class
class Block(torch.nn.Module):
    def __init__(self, in_channels, out_channels, emb_channels, flavor='enc', resample_mode='keep',
                 resample_filter=[1, 1], attention=False, channels_per_head=64, dropout=0, res_balance=0.3,
                 attn_balance=0.3, clip_act=256):
        super().__init__()
        heads = out_channels // channels_per_head if attention else 0
        set_plain(self, out_channels=out_channels, flavor=flavor, resample_filter=resample_filter,
                  resample_mode=resample_mode, num_heads=heads, dropout=dropout, res_balance=res_balance,
                  attn_balance=attn_balance, clip_act=clip_act)
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        for name, cin, cout, kernel, present in block_layers(in_channels, out_channels, emb_channels, flavor, heads):
            setattr(self, name, MPConv(cin, cout, kernel=kernel) if present else None)

    def skip(self, x):
        return x if self.conv_skip is None else self.conv_skip(x)

    def residual(self, x, emb):
        modulation = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = self.conv_res0(mp_silu(x))
        y = mp_silu(y * modulation[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = torch.nn.functional.dropout(y, p=self.dropout)
        return self.conv_res1(y)

    def attention(self, x):
        # qkv channel (head * C_h + c) * 3 + j holds q (j = 0), k (1), v (2); cosine attention per head.
        n, c, h, w = x.shape
        q, k, v = normalize(self.attn_qkv(x).reshape(n, self.num_heads, -1, 3, h * w), dim=2).unbind(3)
        logits = torch.matmul(q.transpose(2, 3), k) / np.sqrt(q.shape[2])
        y = torch.matmul(v, logits.softmax(dim=3).transpose(2, 3))
        return self.attn_proj(y.reshape(n, c, h, w))

    def forward(self, x, emb):
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        encoder = self.flavor == 'enc'
        if encoder:
            x = normalize(self.skip(x), dim=1)
        y = self.residual(x, emb)
        x = mp_sum(x if encoder else self.skip(x), y, t=self.res_balance)
        if self.num_heads:
            x = mp_sum(x, self.attention(x), t=self.attn_balance)
        return x if self.clip_act is None else x.clip_(-self.clip_act, self.clip_act)

#----------------------------------------------------------------------------
# U-Net and preconditioning.

def unet_layout(img_resolution, img_channels, widths, num_blocks, attn_resolutions):
    """[(part, name, in, out, options)] in creation order; options None = the input convolution, else a Block's
    keyword arguments. Every encoder entry's output is a skip; decoder blocks take one each, last in first out."""
    layout = []
    def add(part, res, suffix, cin, cout, options=None):
        layout.append((part, f'{res}x{res}_{suffix}', cin, cout, options))
        return cout
    width = img_channels + 1
    for level, target in enumerate(widths):
        res = img_resolution >> level
        if level == 0:
            width = add('enc', res, 'conv', width, target)
        else:
            width = add('enc', res, 'down', width, width, dict(flavor='enc', resample_mode='down'))
        for i in range(num_blocks):
            width = add('enc', res, f'block{i}', width, target, dict(flavor='enc', attention=res in attn_resolutions))
    skips = [entry[3] for entry in layout]
    for level in reversed(range(len(widths))):
        res, target = img_resolution >> level, widths[level]
        if level == len(widths) - 1:
            add('dec', res, 'in0', width, width, dict(flavor='dec', attention=True))
            add('dec', res, 'in1', width, width, dict(flavor='dec'))
        else:
            add('dec', res, 'up', width, width, dict(flavor='dec', resample_mode='up'))
        for i in range(num_blocks + 1):
            width = add('dec', res, f'block{i}', width + skips.pop(), target,
                        dict(flavor='dec', attention=res in attn_resolutions))
    return layout

@persistence.persistent_class
class UNet(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim, model_channels=192, channel_mult=[1, 2, 3, 4],
                 channel_mult_noise=None, channel_mult_emb=None, num_blocks=3, attn_resolutions=[16, 8],
                 label_balance=0.5, concat_balance=0.5, **block_kwargs):
        super().__init__()
        widths = [model_channels * m for m in channel_mult]
        noise_width = widths[0] if channel_mult_noise is None else model_channels * channel_mult_noise
        emb_width = max(widths) if channel_mult_emb is None else model_channels * channel_mult_emb
        set_plain(self, label_balance=label_balance, concat_balance=concat_balance)
        self.out_gain = torch.nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(noise_width)
        self.emb_noise = MPConv(noise_width, emb_width, kernel=[])
        self.emb_label = MPConv(label_dim, emb_width, kernel=[]) if label_dim else None
        self.enc, self.dec = torch.nn.ModuleDict(), torch.nn.ModuleDict()
        for part, name, cin, cout, options in unet_layout(img_resolution, img_channels, widths, num_blocks,
                                                          attn_resolutions):
            if options is None:
                layer = MPConv(cin, cout, kernel=[3, 3])
            else:
                layer = Block(cin, cout, emb_width, **options, **block_kwargs)
            getattr(self, part)[name] = layer
        self.out_conv = MPConv(widths[0], img_channels, kernel=[3, 3])

    def embedding(self, noise_labels, class_labels):
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            scaled = class_labels * np.sqrt(class_labels.shape[1])
            emb = mp_sum(emb, self.emb_label(scaled), t=self.label_balance)
        return mp_silu(emb)

    def forward(self, x, noise_labels, class_labels):
        emb = self.embedding(noise_labels, class_labels)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        stack = []
        for part in (self.enc, self.dec):
            for name, layer in part.items():
                if part is self.dec and 'block' in name:
                    x = mp_cat(x, stack.pop(), t=self.concat_balance)
                x = layer(x, emb) if isinstance(layer, Block) else layer(x)
                if part is self.enc:
                    stack.append(x)
        return self.out_conv(x, gain=self.out_gain)

def edm_scalings(sigma, sigma_data):
    """c_skip, c_out, c_in, c_noise of EDM's preconditioning (Karras et al. 2022, Table 1)."""
    total = sigma ** 2 + sigma_data ** 2
    return sigma_data ** 2 / total, sigma * sigma_data / total.sqrt(), 1 / total.sqrt(), sigma.flatten().log() / 4

@persistence.persistent_class
class Precond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim, use_fp16=True, sigma_data=0.5, logvar_channels=128,
                 **unet_kwargs):
        super().__init__()
        set_plain(self, img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                  use_fp16=use_fp16, sigma_data=sigma_data)
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def labels_for(self, class_labels, device):
        if not self.label_dim:
            return None
        if class_labels is None:
            return torch.zeros([1, self.label_dim], device=device)
        return class_labels.to(torch.float32).reshape(-1, self.label_dim)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False, **unet_kwargs):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        half = self.use_fp16 and not force_fp32 and x.device.type == 'cuda'
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma, self.sigma_data)
        F_x = self.unet((c_in * x).to(torch.float16 if half else torch.float32), c_noise,
                        self.labels_for(class_labels, x.device), **unet_kwargs)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if not return_logvar:
            return D_x
        return D_x, self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
'''

# EDM2's loss lives in its training-loop module, whose whole source (with these imports) is pickled with the loss.
WRITER['training/training_loop.py'] = '''
"""Test stand-in for EDM2's training-loop module: the imports its pickled source makes, and the loss."""

import copy
import os
import pickle
import time
import psutil
import numpy as np
import torch
import dnnlib
from torch_utils import distributed as dist
from torch_utils import training_stats
from torch_utils import persistence
from torch_utils import misc

def sample_sigma(n, P_mean, P_std, device):
    # Log-normal noise levels: ln(sigma) ~ N(P_mean, P_std^2) (EDM, Karras et al. 2022, Table 1).
    return (torch.randn([n, 1, 1, 1], device=device) * P_std + P_mean).exp()

def loss_weight(sigma, sigma_data):
    # lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, divided by exp(u(sigma)) below (EDM2 eq. 21).
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2

@persistence.persistent_class
class EDM2Loss:
    def __init__(self, P_mean=-0.4, P_std=1.0, sigma_data=0.5):
        vars(self).update(P_mean=P_mean, P_std=P_std, sigma_data=sigma_data)

    def __call__(self, net, images, labels=None):
        sigma = sample_sigma(images.shape[0], self.P_mean, self.P_std, images.device)
        noisy = images + torch.randn_like(images) * sigma
        denoised, logvar = net(noisy, sigma, labels, return_logvar=True)
        return loss_weight(sigma, self.sigma_data) / logvar.exp() * (denoised - images) ** 2 + logvar
'''

WRITER['training/encoders.py'] = '''
"""Test stand-in for EDM2's encoder module."""

import os
import warnings
import numpy as np
import torch
from torch_utils import persistence
from torch_utils import misc
import dnnlib

class Encoder:
    def init(self, device):
        pass

@persistence.persistent_class
class StandardRGBEncoder(Encoder):
    def encode_latents(self, x):
        return x.to(torch.float32) / 127.5 - 1

    def decode(self, x):
        return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)
'''

#----------------------------------------------------------------------------
# Writes EDM2-layout files: snapshots of one run at kimg 4 and 8 for two EMA lengths (run/), a
# post-hoc reconstruction, an unconditional net (as used for guidance), and the outputs EDM2's side computes.

WRITE_EDM2_FILES = '''
import copy, os, pickle, sys
import torch
import dnnlib
from training import encoders, networks_edm2, training_loop

out = sys.argv[1]
tiny = {tiny!r}
torch.manual_seed(0)

def make(label_dim):
    net = networks_edm2.Precond(**dict(tiny, label_dim=label_dim))
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.copy_(torch.rand([]) + 0.5)  # EDM2 initialises gains to 0; trained nets have nonzero ones
    return net

def snapshot(net, noise):
    ema = copy.deepcopy(net)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(torch.randn_like(p) * noise)
    data = dnnlib.EasyDict(encoder=encoders.StandardRGBEncoder(),
        dataset_kwargs=dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path='datasets/tiny.zip', use_labels=True),
        loss_fn=training_loop.EDM2Loss(P_mean=-0.8, P_std=1.6, sigma_data=0.5))
    data.ema = ema.cpu().eval().requires_grad_(False).to(torch.float16)
    return data

def write(name, data):
    path = os.path.join(out, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        pickle.dump(data, f)
    return data

cond, uncond = make(4), make(0)
for kimg in (4, 8):
    for std in (0.050, 0.100):
        write(f'run/network-snapshot-{{kimg:07d}}-{{std:.3f}}.pkl', snapshot(cond, 0.2))
phema = write('phema-0000008-0.070.pkl', snapshot(cond, 0.1))
guide = write('guide-uncond.pkl', snapshot(uncond, 0.1))

x = torch.randn([3, 3, 8, 8])
sigma = torch.tensor([0.05, 0.7, 12.0])
labels = torch.eye(4)[[0, 2, 3]]
expected = dict(x=x, sigma=sigma, labels=labels)
with torch.no_grad():
    expected['phema_D'], expected['phema_logvar'] = phema.ema(x, sigma, labels, return_logvar=True)
    expected['guide_D'], expected['guide_logvar'] = guide.ema(x, sigma, None, return_logvar=True)
    torch.manual_seed(1)
    expected['phema_loss'] = phema.loss_fn(net=phema.ema, images=x, labels=labels)
expected['phema_decoded'] = phema.encoder.decode(x)
torch.save(expected, os.path.join(out, 'expected.pt'))
print('written')
'''.format(tiny=TINY)

#----------------------------------------------------------------------------

def write_tree(root, files):
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'w') as f:
            f.write(textwrap.dedent(text).lstrip('\n'))

def run_isolated(env_dir, script, *args, timeout=300):
    """Run `script` (source text) in a fresh interpreter that sees only env_dir and site-packages; return stdout."""
    # The installed packages (torch, numpy, psutil), but no .pth processing (-S): that would add this project.
    site_dirs = [p for p in sys.path if os.path.basename(p) in ('site-packages', 'dist-packages')]
    site_dirs = site_dirs or [sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']]
    path = os.path.join(env_dir, '_script.py')
    with open(path, 'w') as f:
        f.write(f'import sys\nsys.path.extend({site_dirs!r})\n' + script)
    env = {k: v for k, v in os.environ.items() if not k.startswith('PYTHON')}
    proc = subprocess.run([sys.executable, '-S', '-B', path, *map(str, args)], cwd=env_dir, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f'isolated script failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}')
    return proc.stdout

_cache = {}

def edm2_files(tmp_path_factory):
    """Folder with EDM2-written files (written once per test session)."""
    if 'files' not in _cache:
        root = tmp_path_factory.mktemp('edm2')
        env_dir, out_dir = root / 'env', root / 'files'
        write_tree(env_dir, WRITER)
        os.makedirs(out_dir)
        run_isolated(env_dir, WRITE_EDM2_FILES, out_dir)
        _cache['files'] = out_dir
    return _cache['files']
