"""Small tensor, module and randomness helpers.

The names are EDM2's because pickled network sources import `constant`/`const_like` from here, and because
seeds and data order must match EDM2's bit for bit: both are derived from CPython's hash of a tuple of small
integers, which this module computes explicitly so that it does not depend on the interpreter.
"""

import contextlib
import ctypes
import functools
import os
import pickle
import re
import sys
import warnings

import numpy as np
import torch

#----------------------------------------------------------------------------
# Cached constant tensors. Pickled network sources import `constant` and `const_like` from here.

_constants = {}

def constant(value, shape=None, dtype=None, device=None, memory_format=None):
    """A tensor holding `value` broadcast to `shape`, made once per distinct request and then reused.

    The cache key includes the value's bytes, so equal requests share one tensor; never modify the result.
    """
    array = np.asarray(value)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    device = torch.device('cpu') if device is None else device
    memory_format = torch.contiguous_format if memory_format is None else memory_format
    shape = None if shape is None else tuple(shape)
    key = (array.dtype, array.shape, array.tobytes(), shape, dtype, device, memory_format)
    cached = _constants.get(key)
    if cached is None:
        cached = torch.tensor(array, dtype=dtype, device=device)
        if shape is not None:
            cached = cached.broadcast_to(torch.broadcast_shapes(cached.shape, shape))
        cached = _constants[key] = cached.contiguous(memory_format=memory_format)
    return cached

def const_like(ref, value, shape=None, dtype=None, device=None, memory_format=None):
    """`constant` with the dtype and device of the tensor `ref`, unless given."""
    return constant(value, shape, ref.dtype if dtype is None else dtype, ref.device if device is None else device,
                    memory_format)

#----------------------------------------------------------------------------
# CPython's hash of a tuple of integers: xxHash-style mixing of the items' hashes.

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
    """The 31-bit seed EDM2 derives from a tuple: hash(args) % 2^31."""
    return tuple_hash(args) % (1 << 31)

def set_random_seed(*args):
    """Seed torch (all devices) and numpy's global generator from the tuple `args`."""
    seed = seed_from_tuple(*args)
    torch.manual_seed(seed)
    np.random.seed(seed)
    return seed

#----------------------------------------------------------------------------
# Endless, resumable data order.
# Epoch e of the global stream is arange(N) shuffled by RandomState(hash((seed, e)) % 2^31); rank r takes the
# global positions start_idx + r, start_idx + r + num_replicas, ... Restarting at start_idx = cur_nimg therefore
# continues exactly where an interrupted run stopped.

class InfiniteSampler(torch.utils.data.Sampler):
    def __init__(self, dataset, rank=0, num_replicas=1, shuffle=True, seed=0, start_idx=0):
        # Sampler.__init__ no longer accepts a data source on recent PyTorch, so none is passed.
        super().__init__()
        if len(dataset) == 0 or not 0 <= rank < num_replicas:
            raise ValueError(f'InfiniteSampler: needs a non-empty dataset and 0 <= rank < num_replicas '
                             f'(got {len(dataset)} items, rank {rank}, num_replicas {num_replicas})')
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

class SizedIterable:
    """A one-shot iterable with a known length, so that callers can size a progress bar: len() is `length`,
    iterating runs `iterator` (typically a generator that does the work as it is consumed)."""

    def __init__(self, iterator, length):
        self._iterator = iterator
        self._length = length

    def __len__(self):
        return self._length

    def __iter__(self):
        return self._iterator

#----------------------------------------------------------------------------

def named_params_and_buffers(module):
    """[(name, tensor)]: the module's named parameters, then its named buffers."""
    return [*module.named_parameters(), *module.named_buffers()]

def params_and_buffers(module):
    """The module's parameters, then its buffers."""
    return [tensor for _name, tensor in named_params_and_buffers(module)]

@torch.no_grad()
def copy_params_and_buffers(src_module, dst_module, require_all=False):
    """Copy into each parameter/buffer of dst_module the same-named tensor of src_module, where there is one.

    With require_all, every tensor of dst_module must have a source, checked before anything is copied.
    """
    source = dict(named_params_and_buffers(src_module))
    targets = named_params_and_buffers(dst_module)
    missing = [name for name, _tensor in targets if name not in source]
    if require_all and missing:
        raise KeyError(f'copy_params_and_buffers: the source module has no tensor named {missing[0]!r}')
    for name, tensor in targets:
        if name in source:
            tensor.copy_(source[name])

#----------------------------------------------------------------------------
# Distributed data parallel.

def ddp_sync(module, sync):
    """Context: with sync=False, a DDP module skips its gradient all-reduce (the accumulation rounds before the
    last); anything else runs unchanged."""
    if not sync and isinstance(module, torch.nn.parallel.DistributedDataParallel):
        return module.no_sync()
    return contextlib.nullcontext()

def check_ddp_consistency(module, ignore_regex=None):
    """Raise unless every parameter and buffer equals rank 0's copy (NaN compares as 0, inf as the largest value).

    Names are written `<ModuleType>.<name>`; those fully matching ignore_regex are skipped.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    skip = re.compile(ignore_regex) if ignore_regex is not None else None
    for name, tensor in named_params_and_buffers(module):
        label = f'{type(module).__name__}.{name}'
        if skip is not None and skip.fullmatch(label):
            continue
        mine = tensor.detach()
        mine = torch.nan_to_num(mine) if mine.is_floating_point() else mine
        reference = mine.clone()
        torch.distributed.broadcast(tensor=reference, src=0)
        if not torch.equal(mine, reference):
            raise RuntimeError(f'DDP consistency check failed: {label} differs from rank 0')

#----------------------------------------------------------------------------
# Module summary table, printed once at the start of training.

def _claim(tensors, claimed):
    """The tensors not claimed yet (by identity), which now become claimed."""
    fresh = [t for t in tensors if id(t) not in claimed]
    claimed.update(id(t) for t in fresh)
    return fresh

@torch.no_grad()
def print_module_summary(module, inputs, max_nesting=3, skip_redundant=True):
    """Run `module(*inputs)` once and print a table of its sub-modules, returning the module's output.

    One row per call of a sub-module made at most `max_nesting` calls deep inside `module`, in the order the calls
    finish (inner before outer), so each parameter and buffer is counted at the innermost listed module that owns it.
    With skip_redundant, rows that add no parameters, buffers or new output tensors are left out.
    """
    names = {mod: name for name, mod in module.named_modules()}
    running = []  # sub-modules whose forward has started but not finished; the call depth is its length
    calls = []    # (sub-module, its output tensors)
    def enter(mod, _inputs):
        if mod in names:
            running.append(mod)
    def leave(mod, _inputs, output):
        if mod in names:
            running.pop()
            if len(running) <= max_nesting:
                outputs = output if isinstance(output, (tuple, list)) else [output]
                calls.append((mod, [t for t in outputs if isinstance(t, torch.Tensor)]))
    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
             torch.nn.modules.module.register_module_forward_hook(leave)]
    try:
        result = module(*inputs)
    finally:
        for hook in hooks:
            hook.remove()

    rows = []
    totals = [0, 0]
    claimed = set()
    for mod, outputs in calls:
        counts = [sum(t.numel() for t in _claim(tensors, claimed)) for tensors in (mod.parameters(), mod.buffers())]
        if skip_redundant and not any(counts) and not _claim(outputs, claimed):
            continue
        claimed.update(id(t) for t in outputs)
        totals = [a + b for a, b in zip(totals, counts)]
        label = names[mod] or '<top-level>'
        for idx, out in enumerate(outputs or [None]):
            rows.append([f'{label}:{idx}' if len(outputs) > 1 else label,
                         *(str(c) if c and idx == 0 else '-' for c in counts),
                         '-' if out is None else str(list(out.shape)),
                         '-' if out is None else str(out.dtype).replace('torch.', '')])

    header = [type(module).__name__, 'Parameters', 'Buffers', 'Output shape', 'Datatype']
    rule = ['---'] * len(header)
    table = [header, rule, *rows, rule, ['Total', str(totals[0]), str(totals[1]), '-', '-']]
    widths = [max(map(len, column)) for column in zip(*table)]
    print()
    for row in table:
        print('  '.join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print()
    return result

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
    """Raise AssertionError unless tensor.shape matches ref_shape, where None matches any size. Sizes that are
    tensors (while tracing) are compared with an assert the tracer records."""
    if tensor.ndim != len(ref_shape):
        raise AssertionError(f'Wrong number of dimensions: got {tensor.ndim}, expected {len(ref_shape)}')
    for dim, (size, want) in enumerate(zip(tensor.shape, ref_shape)):
        if want is None:
            continue
        if isinstance(size, torch.Tensor) or isinstance(want, torch.Tensor):
            with suppress_tracer_warnings():
                symbolic_assert(torch.equal(torch.as_tensor(size), torch.as_tensor(want)), f'Wrong size for dimension {dim}')
        elif size != want:
            raise AssertionError(f'Wrong size for dimension {dim}: got {size}, expected {want}')

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
    (G*'s 4x-wide tensors suffer most; the README's Speed section has the numbers). Serving everything from the
    heap and never trimming it keeps the pages mapped; the process then holds on to its peak heap size, which it
    reaches again at the next step anyway. Linux/glibc only; a no-op elsewhere or when the environment already sets
    MALLOC_MMAP_MAX_ (glibc's own switch for this; set it to keep glibc's default). Called once per process, by
    cli.run for every tool and by importing `networks` for library users; calling it again does nothing.
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

#----------------------------------------------------------------------------
# Loading torch files without running code from them. Not part of EDM2.

class CodeRefusedError(pickle.UnpicklingError):
    """A file that would need code to load (it names a class or function outside the allow-list); the message is
    one line that names the file and what it asked for."""

def _what_was_refused(error):
    """What the file asked for, from torch's weights-only refusal (a page of text, with advice we do not give)."""
    text = str(error)
    named = re.search(r'GLOBAL ([\w.]+)', text)
    if named is not None:
        return f'it names {named.group(1)}'
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = next((line for line in lines if line.startswith(('Unsupported', 'Can only', 'Trying to'))), None)
    return detail.rstrip('.') if detail is not None else 'it is not in the weights-only format'

# Names that promise tensors only (PyTorch's weights files). A file so named is read with the weights-only loader
# whatever its bytes, and a pickle under such a name is refused, never unpickled: users rely on the name's promise,
# so the bytes must not turn the file into code that runs. The loaders of networks and of detectors share this rule
# and this refusal (each ends PICKLE_UNDER_WEIGHTS_NAME in its own words).
WEIGHTS_ONLY_SUFFIXES = ('.pt', '.pth')
PICKLE_UNDER_WEIGHTS_NAME = ('refused: a pickle under a .pt name; files named .pt or .pth are read weights-only and '
                             'never unpickled')

def is_weights_only_name(path):
    """True for a file name ending in .pt or .pth (any case): such a file is never unpickled with code."""
    return os.path.splitext(os.fspath(path))[1].lower() in WEIGHTS_ONLY_SUFFIXES

def load_weights_only(file, name, allow=()):
    """torch.load `file` (path or file object) onto the CPU with torch's weights-only unpickler, which rebuilds only
    tensors and plain containers and never runs code from the file, whatever its bytes or the environment say
    (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD yields to an explicit weights_only=True). `allow` lists extra names the file
    may use, as (stand-in, 'module.Name') pairs: the name is rebuilt as the stand-in, e.g. (dict,
    'dnnlib.util.EasyDict') reads EDM2's attribute dicts as plain dicts. A file that needs anything else raises
    CodeRefusedError naming `name`; other failures (truncated or corrupt files) raise torch's own errors."""
    try:
        with torch.serialization.safe_globals(list(allow)), warnings.catch_warnings():
            # A plain pickle (not torch's format) makes torch warn about its protocol before refusing it.
            warnings.filterwarnings('ignore', message='Detected pickle protocol')
            return torch.load(file, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'weights only' not in str(e).lower() and 'weightsunpickler' not in str(e).lower():
            raise
        reason = _what_was_refused(e)
        error = CodeRefusedError(f'{name}: refused: loading it would run code from the file ({reason})')
        error.reason = reason
        raise error from None

#----------------------------------------------------------------------------
# Memory: a lower bound of what a request needs, checked before the work starts. Not part of EDM2.

def memory_limit(device=None):
    """Bytes of memory the device has: the CUDA device's total memory, or the machine's RAM for the CPU."""
    device = torch.device(device) if device is not None else torch.device('cpu')
    if device.type == 'cuda':
        return torch.cuda.get_device_properties(device).total_memory
    import psutil  # pylint: disable=import-outside-toplevel
    return psutil.virtual_memory().total

def check_fits_memory(nbytes, what, device=None):
    """Raise MemoryError with one line unless `nbytes` (a lower bound of what `what` needs) fits the device's memory.
    Only requests that cannot possibly fit are refused; a request that passes may still run out of memory."""
    limit = memory_limit(device)
    if nbytes > limit:
        where = 'GPU' if torch.device(device or 'cpu').type == 'cuda' else 'machine'
        raise MemoryError(f'{what} needs at least {nbytes / 2**30:,.1f} GiB, more than this {where} has '
                          f'({limit / 2**30:,.1f} GiB)')
