"""Parameter and FLOP counts with EDM2's convention (the GFLOPs of EDM2 paper Table 2), by running the real network.

Convention: multiply-accumulates of convolutions and matrix products count as one FLOP each; elementwise ops count
per output element (a few cost 2, 3, 4 or 14 per element, as in EDM2's count_flops); shape/copy ops are free;
network in eval mode, batch 1. EDM2 traces with torch.jit; we intercept every ATen op the forward pass dispatches
(TorchDispatchMode), on the `meta` device by default, so no memory is allocated and no arithmetic is done: counting
the 1.1 B-parameter EDM2-XL takes about a second.
"""

import collections
import contextlib
import math
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

def _numel(x):
    return math.prod(x.shape) if isinstance(x, torch.Tensor) else 1

def _first_tensor(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
        if isinstance(v, (list, tuple)):
            t = _first_tensor(v)
            if t is not None:
                return t
    return None

# Cost per output element of elementwise ops (reductions count their output size, as EDM2 does).
_PER_ELEMENT = {1: ['add', 'sub', 'rsub', 'exp', 'mul', 'div', 'addcmul', 'floor_divide', 'pow', 'reciprocal', 'square',
                    'sqrt', 'rsqrt', 'sin', 'cos', 'log', 'eq', 'gt', 'neg', 'mean', 'sum', 'clamp_min', 'outer',
                    'affine_grid_generator'],
                2: ['lerp', 'leaky_relu', 'clamp', 'clip'],
                3: ['silu', 'sigmoid', '_softmax', 'softmax'],
                4: ['native_group_norm', 'group_norm', 'native_layer_norm', 'layer_norm', 'upsample_bilinear2d'],
                14: ['gelu']}
PER_ELEMENT_COST = {name: cost for cost, names in _PER_ELEMENT.items() for name in names}

# Ops whose cost is the number of *input* elements.
PER_INPUT_ELEMENT = {'linalg_vector_norm', 'avg_pool2d'}

def op_cost(name, args, out):
    """FLOPs of one ATen op `name` (overload stripped, trailing '_' of in-place ops removed)."""
    if name == 'convolution':
        return _numel(out) * math.prod(args[1].shape[1:])  # per output: Cin/groups * kh * kw MACs
    if name in ('mm', 'bmm', 'matmul', 'linear'):
        return _numel(out) * args[0].shape[-1]
    if name == 'addmm':
        return _numel(out) * (args[1].shape[-1] + 1)
    if name in PER_INPUT_ELEMENT:
        return _numel(args[0])
    if name in PER_ELEMENT_COST:
        return PER_ELEMENT_COST[name] * _numel(out)
    return 0

class FlopCounter(TorchDispatchMode):
    """Accumulates EDM2-convention FLOPs per op while active."""

    def __init__(self):
        super().__init__()
        self.flops = collections.Counter()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        name = name[:-1] if name.endswith('_') and not name.startswith('_') else name
        result = out if isinstance(out, torch.Tensor) else _first_tensor(out if isinstance(out, (list, tuple)) else [out])
        cost = op_cost(name, args, result)
        key = name if cost else 'other'
        self.counts[key] += 1
        self.flops[key] += cost
        return out

def count(net, resolution=None, channels=None, label_dim=None, device='meta'):
    """Return dict(params, flops, per_op) for one sample through `net` (a Precond), with EDM2's dummy inputs."""
    resolution = net.img_resolution if resolution is None else resolution
    channels = net.img_channels if channels is None else channels
    label_dim = net.label_dim if label_dim is None else label_dim
    was_training = net.training
    net.eval()
    x = torch.zeros([1, channels, resolution, resolution], device=device)
    sigma = torch.ones([1], device=device)
    labels = torch.zeros([1, label_dim], device=device) if label_dim else None
    counter = FlopCounter()
    # Count EDM2's op sequence, not the inference fast path's fused ops: the network's own module (an unpickled
    # network brings its own copy) provides reference_mode(); foreign networks have no fast path.
    reference_mode = getattr(sys.modules.get(type(net).__module__), 'reference_mode', contextlib.nullcontext)
    with torch.no_grad(), reference_mode(), counter:
        net(x, sigma, labels)
    net.train(was_training)
    params = sum(p.numel() for p in net.parameters())
    return dict(params=params, flops=sum(counter.flops.values()),
                per_op={k: (counter.counts[k], counter.flops[k]) for k in counter.counts})

def build_meta(**network_kwargs):
    """Construct a network on the meta device (no memory, instant) for counting."""
    from networks.edm2plus import Precond
    with torch.device('meta'):
        return Precond(**network_kwargs)

def headline(result):
    """The two summary lines of a count(), as count_flops.py and the trainer print them."""
    return [f'{"Parameters":<12s}{result["params"] / 1e6:.2f}M', f'{"Compute":<12s}{result["flops"] / 1e9:.2f} Gflops/sample']

def describe(network_kwargs):
    """'block C, width 192, e 6, k 3': the architecture that Precond keyword arguments build (None = the variant's)."""
    from networks.edm2plus import BLOCK_VARIANTS
    block = network_kwargs.get('block', 'A')
    variant = BLOCK_VARIANTS[block]
    e, k = variant.resolve(network_kwargs.get('expansion'), network_kwargs.get('kernel'))
    parts = [f'block {block}', f'width {network_kwargs.get("model_channels", 192)}']
    parts += [f'e {e:g}'] if 'expansion' in variant.options else []
    parts += [f'k {k}'] if 'kernel' in variant.options else []
    return ', '.join(parts)
