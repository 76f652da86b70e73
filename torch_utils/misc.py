"""Small tensor, module and randomness helpers.

The names are EDM2's (spec §0, §7.2) because pickled network sources import `constant`/`const_like` from here,
and because seeds and data order must match EDM2's bit for bit (spec §2.12): both are derived from CPython's
hash of a tuple of small integers, which this module computes explicitly so that it does not depend on the
interpreter.
"""

import contextlib
import ctypes
import functools
import os
import re
import sys
import warnings

import numpy as np
import torch

import dnnlib

#----------------------------------------------------------------------------
# Cached constant tensors (used by pickled network code; spec §7.2).

_constant_cache = dict()

def constant(value, shape=None, dtype=None, device=None, memory_format=None):
    """Return a cached tensor holding `value` (broadcast to `shape`), created once per distinct request."""
    value = np.asarray(value)
    if shape is not None:
        shape = tuple(shape)
    if dtype is None:
        dtype = torch.get_default_dtype()
    if device is None:
        device = torch.device('cpu')
    if memory_format is None:
        memory_format = torch.contiguous_format
    key = (value.shape, value.dtype, value.tobytes(), shape, dtype, device, memory_format)
    tensor = _constant_cache.get(key, None)
    if tensor is None:
        tensor = torch.as_tensor(value.copy(), dtype=dtype, device=device)
        if shape is not None:
            tensor, _ = torch.broadcast_tensors(tensor, torch.empty(shape))
        tensor = tensor.contiguous(memory_format=memory_format)
        _constant_cache[key] = tensor
    return tensor

def const_like(ref, value, shape=None, dtype=None, device=None, memory_format=None):
    """`constant` with the dtype and device of the tensor `ref` unless given."""
    if dtype is None:
        dtype = ref.dtype
    if device is None:
        device = ref.device
    return constant(value, shape=shape, dtype=dtype, device=device, memory_format=memory_format)

#----------------------------------------------------------------------------
# CPython's hash of a tuple of integers (spec §2.12): xxHash-style mixing of the items' hashes.

_MASK64 = (1 << 64) - 1
_XXPRIME_1 = 11400714785074694791
_XXPRIME_2 = 14029467366897019727
_XXPRIME_5 = 2870177450012600261
_HASH_MODULUS = (1 << 61) - 1   # hash(int) reduces modulo the Mersenne prime 2^61 - 1 on 64-bit builds.

def _int_hash(n):
    # hash(n) for a Python int on a 64-bit build; -1 is reserved for errors, so hash(-1) == -2.
    h = n % _HASH_MODULUS if n >= 0 else -((-n) % _HASH_MODULUS)
    return -2 if h == -1 else h

def tuple_hash(items):
    """Return hash(tuple(items)) as CPython >= 3.8 (64-bit) computes it, for integer items."""
    acc = _XXPRIME_5
    for item in items:
        lane = _int_hash(int(item)) if isinstance(item, (int, np.integer)) else hash(item)
        acc = (acc + (lane & _MASK64) * _XXPRIME_2) & _MASK64
        acc = ((acc << 31) | (acc >> 33)) & _MASK64     # rotate left by 31 bits
        acc = (acc * _XXPRIME_1) & _MASK64
    acc = (acc + (len(items) ^ (_XXPRIME_5 ^ 3527539))) & _MASK64
    if acc == _MASK64:                                   # (unsigned)-1 is reserved as well
        return 1546275796
    return acc - (1 << 64) if acc >> 63 else acc         # read as a signed 64-bit value

def seed_from_tuple(*args):
    """The 31-bit seed EDM2 derives from a tuple: hash(args) % 2^31 (spec §2.12)."""
    return tuple_hash(args) % (1 << 31)

def set_random_seed(*args):
    """Seed torch (all devices) and numpy's global generator from the tuple `args` (spec §2.12)."""
    seed = seed_from_tuple(*args)
    torch.manual_seed(seed)
    np.random.seed(seed)
    return seed

#----------------------------------------------------------------------------
# Endless, resumable data order (spec §7.2).
# Epoch e of the global stream is arange(N) shuffled by RandomState(hash((seed, e)) % 2^31); rank r takes the
# global positions start_idx + r, start_idx + r + num_replicas, ... Restarting at start_idx = cur_nimg therefore
# continues exactly where an interrupted run stopped.

class InfiniteSampler(torch.utils.data.Sampler):
    def __init__(self, dataset, rank=0, num_replicas=1, shuffle=True, seed=0, start_idx=0):
        # Sampler.__init__ no longer accepts a data source on recent PyTorch (spec §9), so none is passed.
        super().__init__()
        assert len(dataset) > 0
        assert num_replicas > 0
        assert 0 <= rank < num_replicas
        self.dataset_size = len(dataset)
        self.rank = rank
        self.num_replicas = num_replicas
        self.shuffle = shuffle
        self.seed = seed
        self.start_idx = start_idx

    def epoch_order(self, epoch):
        """The permutation of dataset indices used by global epoch `epoch`."""
        order = np.arange(self.dataset_size)
        if self.shuffle:
            np.random.RandomState(seed_from_tuple(self.seed, epoch)).shuffle(order)
        return order

    def __iter__(self):
        pos = self.start_idx + self.rank
        epoch, order = None, None
        while True:
            if pos // self.dataset_size != epoch:
                epoch = pos // self.dataset_size
                order = self.epoch_order(epoch)
            yield int(order[pos % self.dataset_size])
            pos += self.num_replicas

#----------------------------------------------------------------------------
# Parameters and buffers.

def params_and_buffers(module):
    assert isinstance(module, torch.nn.Module)
    return list(module.parameters()) + list(module.buffers())

def named_params_and_buffers(module):
    assert isinstance(module, torch.nn.Module)
    return list(module.named_parameters()) + list(module.named_buffers())

@torch.no_grad()
def copy_params_and_buffers(src_module, dst_module, require_all=False):
    """Copy every parameter/buffer of dst_module that has a same-named tensor in src_module."""
    assert isinstance(src_module, torch.nn.Module)
    assert isinstance(dst_module, torch.nn.Module)
    src_tensors = dict(named_params_and_buffers(src_module))
    for name, tensor in named_params_and_buffers(dst_module):
        assert (name in src_tensors) or (not require_all), f'copy_params_and_buffers: missing "{name}"'
        if name in src_tensors:
            tensor.copy_(src_tensors[name])

#----------------------------------------------------------------------------
# Distributed data parallel helpers.

@contextlib.contextmanager
def ddp_sync(module, sync):
    """Skip DDP's gradient all-reduce inside the block when `sync` is False (accumulation rounds, spec §2.3)."""
    assert isinstance(module, torch.nn.Module)
    if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        yield
    else:
        with module.no_sync():
            yield

def check_ddp_consistency(module, ignore_regex=None):
    """Assert that every parameter and buffer equals rank 0's copy (NaNs compared as zeros)."""
    assert isinstance(module, torch.nn.Module)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for name, tensor in named_params_and_buffers(module):
        fullname = type(module).__name__ + '.' + name
        if ignore_regex is not None and re.fullmatch(ignore_regex, fullname):
            continue
        tensor = tensor.detach()
        if tensor.is_floating_point():
            tensor = torch.nan_to_num(tensor)
        other = tensor.clone()
        torch.distributed.broadcast(tensor=other, src=0)
        assert (tensor == other).all(), f'DDP consistency check failed: {fullname} differs from rank 0'

#----------------------------------------------------------------------------
# Module summary table printed at the start of training (spec §2.9).

@torch.no_grad()
def print_module_summary(module, inputs, max_nesting=3, skip_redundant=True):
    """Run `module(*inputs)` once and print a table of its sub-modules' parameters, buffers and outputs."""
    assert isinstance(module, torch.nn.Module)
    assert not isinstance(module, torch.jit.ScriptModule)
    assert isinstance(inputs, (tuple, list))

    # Record every sub-module call that happens at a shallow enough nesting level.
    entries = []
    nesting = [0]
    def pre_hook(_mod, _inputs):
        nesting[0] += 1
    def post_hook(mod, _inputs, outputs):
        nesting[0] -= 1
        if nesting[0] <= max_nesting:
            outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
            outputs = [t for t in outputs if isinstance(t, torch.Tensor)]
            entries.append(dnnlib.EasyDict(mod=mod, outputs=outputs))
    hooks = [mod.register_forward_pre_hook(pre_hook) for mod in module.modules()]
    hooks += [mod.register_forward_hook(post_hook) for mod in module.modules()]
    try:
        outputs = module(*inputs)
    finally:
        for hook in hooks:
            hook.remove()

    # Attribute each tensor to the innermost recorded module that owns it.
    tensors_seen = set()
    for e in entries:
        e.unique_params = [t for t in e.mod.parameters() if id(t) not in tensors_seen]
        e.unique_buffers = [t for t in e.mod.buffers() if id(t) not in tensors_seen]
        e.unique_outputs = [t for t in e.outputs if id(t) not in tensors_seen]
        tensors_seen |= {id(t) for t in e.unique_params + e.unique_buffers + e.unique_outputs}
    if skip_redundant:
        entries = [e for e in entries if len(e.unique_params) or len(e.unique_buffers) or len(e.unique_outputs)]

    # Build and print the table.
    rows = [[type(module).__name__, 'Parameters', 'Buffers', 'Output shape', 'Datatype']]
    rows += [['---'] * len(rows[0])]
    param_total = 0
    buffer_total = 0
    submodule_names = {mod: name for name, mod in module.named_modules()}
    for e in entries:
        name = '<top-level>' if e.mod is module else submodule_names[e.mod]
        param_size = sum(t.numel() for t in e.unique_params)
        buffer_size = sum(t.numel() for t in e.unique_buffers)
        output_shapes = [str(list(t.shape)) for t in e.outputs]
        output_dtypes = [str(t.dtype).split('.')[-1] for t in e.outputs]
        rows += [[
            name + (':0' if len(e.outputs) >= 2 else ''),
            str(param_size) if param_size else '-',
            str(buffer_size) if buffer_size else '-',
            (output_shapes + ['-'])[0],
            (output_dtypes + ['-'])[0],
        ]]
        for idx in range(1, len(e.outputs)):
            rows += [[name + f':{idx}', '-', '-', output_shapes[idx], output_dtypes[idx]]]
        param_total += param_size
        buffer_total += buffer_size
    rows += [['---'] * len(rows[0])]
    rows += [['Total', str(param_total), str(buffer_total), '-', '-']]

    widths = [max(len(cell) for cell in column) for column in zip(*rows)]
    print()
    for row in rows:
        print('  '.join(cell + ' ' * (width - len(cell)) for cell, width in zip(row, widths)))
    print()
    return outputs

#----------------------------------------------------------------------------
# Images.

def tile_images(x, w, h):
    """Arrange a batch of h*w images [N,C,H,W] into one image [C, h*H, w*W], row by row."""
    assert x.ndim == 4, 'tile_images: expected a 4-D NCHW batch'
    N, C, H, W = x.shape
    assert N == w * h, f'tile_images: {N} images do not fill a {w}x{h} grid'
    return x.reshape(h, w, C, H, W).permute(2, 0, 3, 1, 4).reshape(C, h * H, w * W)

#----------------------------------------------------------------------------
# Shape assertions usable while tracing.

def symbolic_assert(condition, message):
    """torch._assert: a plain assert that torch.jit/fx tracing can record."""
    return torch._assert(condition, message)

@contextlib.contextmanager
def suppress_tracer_warnings():
    """Silence torch.jit.TracerWarning inside the block (expected when tracing shape checks)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', category=torch.jit.TracerWarning)
        yield

def assert_shape(tensor, ref_shape):
    """Assert tensor.shape == ref_shape, where None in ref_shape matches any size and a tensor matches its value."""
    if tensor.ndim != len(ref_shape):
        raise AssertionError(f'Wrong number of dimensions: got {tensor.ndim}, expected {len(ref_shape)}')
    for idx, (size, ref_size) in enumerate(zip(tensor.shape, ref_shape)):
        if ref_size is None:
            pass
        elif isinstance(ref_size, torch.Tensor):
            with suppress_tracer_warnings():
                symbolic_assert(torch.equal(torch.as_tensor(size), ref_size), f'Wrong size for dimension {idx}')
        elif isinstance(size, torch.Tensor):
            with suppress_tracer_warnings():
                symbolic_assert(torch.equal(size, torch.as_tensor(ref_size)), f'Wrong size for dimension {idx}: expected {ref_size}')
        elif size != ref_size:
            raise AssertionError(f'Wrong size for dimension {idx}: got {size}, expected {ref_size}')

#----------------------------------------------------------------------------
# Profiler ranges named after the function.

def profiled_function(fn):
    """Decorator: run fn inside torch.autograd.profiler.record_function(fn.__name__)."""
    @functools.wraps(fn)
    def decorator(*args, **kwargs):
        with torch.autograd.profiler.record_function(fn.__name__):
            return fn(*args, **kwargs)
    return decorator

#----------------------------------------------------------------------------
# Reusable page-locked host buffers for fast device transfers.

_pinned_bufs = dict()

def pinned_buf(ref, dtype=None):
    """Return a cached CPU buffer with ref's shape (page-locked when CUDA is available)."""
    dtype = ref.dtype if dtype is None else dtype
    key = (tuple(ref.shape), dtype)
    buf = _pinned_bufs.get(key, None)
    if buf is None:
        # Pinning needs a CUDA driver; on CPU-only machines an ordinary buffer serves the same purpose.
        buf = torch.empty(ref.shape, dtype=dtype, pin_memory=torch.cuda.is_available())
        _pinned_bufs[key] = buf
    return buf

#----------------------------------------------------------------------------
# CPU memory allocator. Not part of EDM2.

_allocator_tuned = False
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # mallopt parameters, from glibc's malloc.h

def _glibc():
    """The process's C library if it is glibc (mallopt, malloc_trim), else None (other OS, musl)."""
    if not sys.platform.startswith('linux'):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # pylint: disable=pointless-statement  # glibc only
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None

def keep_freed_cpu_memory():
    """Make glibc keep freed memory for reuse instead of returning it to the OS. Returns True if applied.

    PyTorch allocates every CPU tensor with malloc. glibc serves blocks above its mmap threshold (at most 32 MiB)
    with a fresh mmap and unmaps them on free, so each such tensor costs a page fault per 4 KiB on first touch, in
    every layer and every step; the same happens when the top of the heap is trimmed. Training at batch 64 on
    32x32 images has many activations of 32 MiB and more, and the page faults cost more time than the arithmetic
    (G*'s 4x-wide tensors suffer most: benchmarks/train_speed.py measured 27 -> 34 images/s for G*). Serving
    everything from the heap and never trimming it keeps the pages mapped; the process then holds on to its peak
    heap size, which it reaches again at the next step anyway. Linux/glibc only; a no-op elsewhere or when the
    environment already sets MALLOC_MMAP_MAX_ (glibc's own switch for this; set it to keep glibc's default).
    """
    global _allocator_tuned  # pylint: disable=global-statement
    if _allocator_tuned:
        return True
    libc = _glibc() if 'MALLOC_MMAP_MAX_' not in os.environ else None
    if libc is None:
        return False
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    _allocator_tuned = bool(ok)
    return _allocator_tuned

def release_freed_cpu_memory():
    """The opposite, for measuring memory: make glibc return every freed block of 64 KiB or more to the OS (undoing
    keep_freed_cpu_memory), so that resident memory follows live memory, and release what it holds now. Allocation
    gets slower. Returns False where the C library is not glibc."""
    global _allocator_tuned  # pylint: disable=global-statement
    libc = _glibc()
    if libc is None:
        return False
    ok = all(libc.mallopt(param, value) == 1 for param, value in
             [(M_MMAP_MAX, 65536), (M_MMAP_THRESHOLD, 65536), (M_TRIM_THRESHOLD, 0)])  # 65536: glibc's default max
    libc.malloc_trim(0)
    _allocator_tuned = False
    return ok
