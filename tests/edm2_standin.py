"""A stand-in for EDM2's own environment, for the compatibility tests (test_compat.py, test_export.py).

EDM2's code is not available here (and may not be copied), so this module writes, into a temporary folder, a
minimal package tree with the names EDM2's pickles and embedded sources rely on (spec §0, §7.1): `dnnlib` with
EasyDict, `torch_utils.persistence` implementing the version-6 pickle format in a few lines, `torch_utils.misc`
with const_like/constant, and (for writing EDM2-layout snapshots) stubs of `torch_utils.distributed` and
`torch_utils.training_stats` plus a `training` package whose network module is an independent implementation of
EDM2's CONFIG A from spec §2.8 (EDM2's names, state_dict layout and attributes). Scripts run in a fresh Python
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

# Version-6 persistent pickles (spec §7.1): the decorator records the constructor arguments and pickles the
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

# EDM2's CONFIG A network, written for these tests from the facts of spec §2.8.
WRITER['training/networks_edm2.py'] = '''
"""Test stand-in for EDM2's network module: CONFIG A with EDM2's names, state_dict layout and attributes."""

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

@persistence.persistent_class
class MPFourier(torch.nn.Module):
    def __init__(self, num_channels, bandwidth=1):
        super().__init__()
        self.register_buffer('freqs', 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer('phases', 2 * np.pi * torch.rand(num_channels))

    def forward(self, x):
        angles = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (np.sqrt(2) * torch.cos(angles)).to(x.dtype)

@persistence.persistent_class
class MPConv(torch.nn.Module):
    def __init__(self, in_channels, out_channels, kernel):
        super().__init__()
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x, gain=1):
        w = self.weight.to(torch.float32)
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        w = normalize(w)
        w = (w * (gain / np.sqrt(w[0].numel()))).to(x.dtype)
        if w.ndim == 2:
            return torch.nn.functional.linear(x, w)
        return torch.nn.functional.conv2d(x, w, padding=w.shape[-1] // 2)

@persistence.persistent_class
class Block(torch.nn.Module):
    def __init__(self, in_channels, out_channels, emb_channels, flavor='enc', resample_mode='keep',
                 resample_filter=[1, 1], attention=False, channels_per_head=64, dropout=0, res_balance=0.3,
                 attn_balance=0.3, clip_act=256):
        super().__init__()
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = resample_filter
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == 'enc' else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x, emb):
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == 'enc':
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)
        y = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * scale[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = torch.nn.functional.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == 'dec' and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            n, c, h, w = x.shape
            qkv = self.attn_qkv(x).reshape(n, self.num_heads, c // self.num_heads, 3, h * w)
            q, k, v = normalize(qkv, dim=2).unbind(3)
            attn = (torch.matmul(q.transpose(2, 3), k) / np.sqrt(q.shape[2])).softmax(dim=3)
            y = torch.matmul(v, attn.transpose(2, 3)).reshape(n, c, h, w)
            x = mp_sum(x, self.attn_proj(y), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clip_(-self.clip_act, self.clip_act)
        return x

@persistence.persistent_class
class UNet(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim, model_channels=192, channel_mult=[1, 2, 3, 4],
                 channel_mult_noise=None, channel_mult_emb=None, num_blocks=3, attn_resolutions=[16, 8],
                 label_balance=0.5, concat_balance=0.5, **block_kwargs):
        super().__init__()
        widths = [model_channels * m for m in channel_mult]
        cnoise = widths[0] if channel_mult_noise is None else model_channels * channel_mult_noise
        cemb = max(widths) if channel_mult_emb is None else model_channels * channel_mult_emb
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = torch.nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim != 0 else None
        self.enc = torch.nn.ModuleDict()
        c = img_channels + 1
        for level, width in enumerate(widths):
            r = img_resolution >> level
            if level == 0:
                self.enc[f'{r}x{r}_conv'] = MPConv(c, width, kernel=[3, 3])
                c = width
            else:
                self.enc[f'{r}x{r}_down'] = Block(c, c, cemb, flavor='enc', resample_mode='down', **block_kwargs)
            for i in range(num_blocks):
                self.enc[f'{r}x{r}_block{i}'] = Block(c, width, cemb, flavor='enc', attention=(r in attn_resolutions), **block_kwargs)
                c = width
        skip_widths = [m.out_channels for m in self.enc.values()]
        self.dec = torch.nn.ModuleDict()
        for level in reversed(range(len(widths))):
            r, width = img_resolution >> level, widths[level]
            if level == len(widths) - 1:
                self.dec[f'{r}x{r}_in0'] = Block(c, c, cemb, flavor='dec', attention=True, **block_kwargs)
                self.dec[f'{r}x{r}_in1'] = Block(c, c, cemb, flavor='dec', **block_kwargs)
            else:
                self.dec[f'{r}x{r}_up'] = Block(c, c, cemb, flavor='dec', resample_mode='up', **block_kwargs)
            for i in range(num_blocks + 1):
                self.dec[f'{r}x{r}_block{i}'] = Block(c + skip_widths.pop(), width, cemb, flavor='dec', attention=(r in attn_resolutions), **block_kwargs)
                c = width
        self.out_conv = MPConv(c, img_channels, kernel=[3, 3])

    def forward(self, x, noise_labels, class_labels):
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(class_labels * np.sqrt(class_labels.shape[1])), t=self.label_balance)
        emb = mp_silu(emb)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for module in self.enc.values():
            x = module(x) if isinstance(module, MPConv) else module(x, emb)
            skips.append(x)
        for name, module in self.dec.items():
            if 'block' in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = module(x, emb)
        return self.out_conv(x, gain=self.out_gain)

@persistence.persistent_class
class Precond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim, use_fp16=True, sigma_data=0.5, logvar_channels=128,
                 **unet_kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False, **unet_kwargs):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = torch.float16 if self.use_fp16 and not force_fp32 and x.device.type == 'cuda' else torch.float32
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.flatten().log() / 4
        F_x = self.unet((c_in * x).to(dtype), c_noise, class_labels, **unet_kwargs)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if return_logvar:
            return D_x, self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
        return D_x
'''

# EDM2's loss lives in its training-loop module, whose whole source (with these imports) is pickled (spec §7.1).
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

@persistence.persistent_class
class EDM2Loss:
    def __init__(self, P_mean=-0.4, P_std=1.0, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None):
        sigma = (torch.randn([images.shape[0], 1, 1, 1], device=images.device) * self.P_std + self.P_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        noise = torch.randn_like(images) * sigma
        denoised, logvar = net(images + noise, sigma, labels, return_logvar=True)
        return weight / logvar.exp() * (denoised - images) ** 2 + logvar

def learning_rate_schedule(cur_nimg, batch_size, ref_lr=100e-4, ref_batches=70e3, rampup_Mimg=10):
    lr = ref_lr
    if ref_batches > 0:
        lr /= np.sqrt(max(cur_nimg / (ref_batches * batch_size), 1))
    if rampup_Mimg > 0:
        lr *= min(cur_nimg / (rampup_Mimg * 1e6), 1)
    return lr

def training_loop(dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=None),
                  loss_kwargs=dict(class_name='training.training_loop.EDM2Loss'), device=torch.device('cuda')):
    raise NotImplementedError('stand-in')
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
# Writes EDM2-layout files (spec §2.10): snapshots of one run at kimg 4 and 8 for two EMA lengths (run/), a
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
