"""The faster paths of the EDM2+ denoiser: the function of networks/edm2plus.py, computed with fewer passes over memory.

networks/edm2plus.py is the reference network (EDM2's op sequence). This module computes the same function two
faster ways and registers them with its hook (edm2plus.register_faster) when the `networks` package is imported:
  * the *inference path* (eval mode, autograd off: sampling, metrics), which caches normalised weights and folds
    constant factors into them;
  * the *training path* (autograd on), which folds constants into the weights it normalises every step and fuses
    elementwise work.
Both agree with the reference path up to float rounding (tests/test_speed_equivalence.py, tests/test_train_path.py),
and on a CPU every image's result is bit-identical whatever the batch size (tests/test_batch_invariance.py).
Pickles embed only networks/edm2plus.py: this code never travels with a snapshot.

Which path a call takes (per module call, so a whole network agrees):
  reference  edm2plus.reference_mode() (networks/flops.py counts in it), torch.compile (inductor fuses the reference
             ops itself), and training where training_path_for() says so;
  infer      eval mode with autograd off;
  train      everything else (training, or gradients through an eval-mode network).

Batch invariance. A caller must get the same image whatever the batch it is part of. On a CPU two library kernels
round differently for small batches: BLAS matrix products with fewer than 4 rows, and torch's convolution for a
batch of 1 (which bypasses oneDNN). The faster paths therefore pad matrix products to at least 4 rows and call
oneDNN's convolution directly. The reference path keeps EDM2's calls, and with them EDM2's batch dependence: its
outputs are EDM2's bit for bit at every batch size, which rules out changing the kernels it calls.

Module state (each documented where it is defined): _training_path (the choice of training_path()), _weight_cache
(the inference path's normalised weights), _unit_weights (the training path's weights during one CPU pass) and
_branch_plans (what each block's recipe means to both paths).
"""

import contextlib
import weakref

import numpy as np
import torch

from networks import edm2plus
from networks.edm2plus import MPConv, SILU_STD, mp_cat_weights, mp_sum_weights, norm_divisor, normalize, resample

#----------------------------------------------------------------------------
# Choosing a path.
#
# The training path is the default only where it has run: on the CPU, where the tests check it against the
# reference path. On CUDA it has not yet passed tests/test_cuda.py on a GPU, nor has benchmarks/gpu_suite.sh
# measured it at least as fast as the reference path there; until both have, CUDA training takes the reference path
# unless asked for the training path (train_edm2plus.py --train-path=fast, or training_path('fast')).

TRAINING_PATHS = ('auto', 'fast', 'reference')
_training_path = 'auto'  # set by training_path() only, after checking it; read by every call with autograd on

def _resolve(device_type, choice):
    # A choice already known to be one of TRAINING_PATHS: every module call resolves _training_path, so it is
    # checked once where it is set, not again on each call.
    if choice != 'auto':
        return choice
    return 'fast' if device_type == 'cpu' else 'reference'

def training_path_for(device_type, choice='auto'):
    """'fast' (the training path) or 'reference': what a call with autograd on takes on a device of this type
    ('cpu', 'cuda', ...) for a choice of TRAINING_PATHS ('auto': 'fast' on the CPU only)."""
    if choice not in TRAINING_PATHS:
        raise ValueError(f'unknown training path "{choice}" (choose from {", ".join(TRAINING_PATHS)})')
    return _resolve(device_type, choice)

@contextlib.contextmanager
def training_path(choice):
    """Within this context calls with autograd on take the path training_path_for(device, choice) names."""
    global _training_path
    training_path_for('cpu', choice)  # checks the choice
    previous, _training_path = _training_path, choice
    try:
        yield
    finally:
        _training_path = previous

# torch < 2.3 has no torch.compiler.is_compiling: there compile traces the faster paths (with graph breaks).
_is_compiling = getattr(getattr(torch, 'compiler', None), 'is_compiling', lambda: False)

def choose_path(module, x):
    """The path of one call of an MPConv, Block or UNet (see the module docstring)."""
    if _is_compiling():
        return 'reference'
    if not module.training and not torch.is_grad_enabled():
        return 'infer'
    return 'train' if _resolve(x.device.type, _training_path) == 'fast' else 'reference'

#----------------------------------------------------------------------------
# Kernels of both paths.

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

def _resample_fast(x, f, mode):
    # EDM2's default filter [1,1] is exactly 2x2 average pooling / nearest-neighbour upsampling.
    if mode == 'keep' or list(f) != [1, 1]:
        return resample(x, f=f, mode=mode)
    if mode == 'down':
        return torch.nn.functional.avg_pool2d(x, 2)
    return torch.nn.functional.interpolate(x, scale_factor=2, mode='nearest')

def _mp_cat_fast(a, b, t=0.5):
    """mp_cat along channels, written straight into one channels-last buffer (no scaled temporaries)."""
    return _cat_scaled(a, b, *mp_cat_weights(a.shape[1], b.shape[1], t))

def _cat_scaled(a, b, wa, wb):
    """torch.cat([a * wa, b * wb], dim=1) with each product written into its part of one channels-last buffer."""
    na = a.shape[1]
    out = torch.empty([a.shape[0], na + b.shape[1], *a.shape[2:]], dtype=a.dtype, device=a.device,
                      memory_format=torch.channels_last)
    torch.mul(a, wa, out=out[:, :na])
    torch.mul(b, wb, out=out[:, na:])
    return out

# A block's recipe (block.steps) is fixed when the block is built, so what the paths derive from it is worked out
# once per block instead of on every call. The cache lives outside the module, so it never enters pickles or deep
# copies, and an entry goes when its block does.
_branch_plans = weakref.WeakKeyDictionary()  # Block -> (_infer_plan(steps), index of its last non-dropout step)

def _branch_plan(block):
    """(the inference path's plan of the branch, index of the last step that is not dropout, or None)."""
    plans = _branch_plans.get(block)
    if plans is None:
        steps = block.steps
        last = max((i for i, (op, _name, _args) in enumerate(steps) if op != 'drop'), default=None)
        plans = _branch_plans[block] = (tuple(_infer_plan(steps)), last)
    return plans

#----------------------------------------------------------------------------
# Training path. The reference path makes a pass over memory (forward, and again in backward) for every constant
# factor of the magnitude-preserving formulas; on a memory-bound device those passes, not the convolutions, set the
# time (benchmarks/traffic.py counts them). This path computes the same function with fewer passes:
#   * Constant factors are folded into the weights, which are normalised on every call anyway: MP-SiLU's 1/SILU_STD
#     and dropout's 1/(1-p) into the next layer, the branch's MP-sum factor (mp_sum_weights) into the layer that
#     ends a branch or the attention; the weight's normalisation and gain become one per-row factor (_MPWeight).
#   * MP-sum is one add with a scalar factor (its branch share is in the branch's last weight); the pixel norm has a
#     hand-written backward (four passes over the activations instead of about a dozen); mp_cat writes both scaled
#     halves straight into the output; clipping is skipped, forward and backward, when no value reaches the limit
#     (checked on a CPU).
#   * Dropout multiplies by a 1-byte mask. bernoulli_ fills a tensor in storage order, so the mask is drawn in NCHW
#     order and then laid out channels-last: the same elements drop as in the reference layout at the same seed (on
#     a CPU; CUDA's reference dropout is a fused kernel with its own use of the generator).
#   * Activations are channels-last; attention uses scaled_dot_product_attention on q, k, v normalised in place
#     of the einsum/softmax sequence (the same softmax(q.k / sqrt(C_h)) v).

class _MPWeight(torch.autograd.Function):
    """w * gain * scale / (sqrt(fan_in) * (eps + |w| / sqrt(fan_in))) per output channel (row) of w, i.e.
    normalize(w) * gain * scale / sqrt(fan_in), as one per-row factor, with the backward written out: for
    y = w * f, f = c / d, d = eps + |w| / sqrt(n), dL/dw = f * (g - w * <g, w> / (d * sqrt(n) * |w|)) and
    dL/dgain = sum over rows of <g, w> / (sqrt(n) * d) * scale. `gain` is a tensor (a learned gain) or None."""

    @staticmethod
    def forward(ctx, w, gain, scale):
        fan_in = w.shape[1:].numel()
        norm = torch.linalg.vector_norm(w, dim=list(range(1, w.ndim)), keepdim=True)
        d = norm_divisor(norm, fan_in)
        f0 = (scale / np.sqrt(fan_in)) / d
        f = f0 if gain is None else f0 * gain
        ctx.save_for_backward(w, norm, d, f0, f)
        ctx.has_gain = gain is not None
        return w * f

    @staticmethod
    def backward(ctx, g):
        w, norm, d, f0, f = ctx.saved_tensors
        dot = torch.linalg.vecdot(g.flatten(1), w.flatten(1)).reshape(d.shape)  # <g, w> per row
        coef = dot / (d * np.sqrt(w.shape[1:].numel()) * norm.clamp(min=1e-30))
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
            w = unit * (_gain32(gain, conv.weight.shape[1:].numel()) * scale)
        else:
            w = unit if gain * scale == 1 else unit * (gain * scale)
        w = w.to(dtype)
        return w.contiguous(memory_format=torch.channels_last) if w.ndim == 4 else w
    w32 = conv.weight.to(torch.float32)
    if conv.training:
        with torch.no_grad():
            if w32 is conv.weight:  # normalize() in place: the same division, without a copy
                norm = torch.linalg.vector_norm(w32, dim=list(range(1, w32.ndim)), keepdim=True)
                w32.div_(norm_divisor(norm, w32.shape[1:].numel()))
            else:
                conv.weight.copy_(normalize(w32))
    if isinstance(gain, torch.Tensor):
        w = _MPWeight.apply(w32, _gain32(gain, w32.shape[1:].numel()), scale)
    else:
        w = _MPWeight.apply(w32, None, scale * gain)
    w = w.to(dtype)
    return w.contiguous(memory_format=torch.channels_last) if w.ndim == 4 else w

# Weight table. Normalising each weight on its own (forced normalisation, then normalize(w) / sqrt(fan_in) with its
# backward) costs about twenty small ops per layer, a noticeable share of a CPU step at small sizes, and more for G*
# than for A, since G* has more layers. On a CPU the training path therefore normalises all float32 weights of the
# network before the forward pass, grouped by fan-in (the rows of one group have equal length and stack into one
# matrix): the same formulas with a few ops per group instead of per layer. Each layer then multiplies its unit weight by its gain and folded scale. On a GPU every layer keeps its own
# normalisation: there DDP reduces each weight's gradient as soon as backward reaches it, which one node for all
# weights would hold back to the end of backward.

_unit_weights = {}  # MPConv -> normalize(weight) / sqrt(fan_in) (float32), filled during one CPU training pass

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
        d = norm_divisor(norm, w.shape[1])
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
    training mode the stored weights are first normalised in place, as MPConv.forward does."""
    groups = {}
    for conv in net.modules():
        if isinstance(conv, MPConv) and conv.weight.dtype == torch.float32 and conv.weight.device.type == 'cpu':
            groups.setdefault(conv.weight.shape[1:].numel(), []).append(conv)
    try:
        for fan_in, convs in groups.items():
            trained = [conv.weight for conv in convs if conv.training]
            if trained:  # forced weight normalisation, the same ops as normalize() on each weight
                with torch.no_grad():
                    w, sizes = _rows(trained)
                    norm = torch.linalg.vector_norm(w, dim=1, keepdim=True)
                    w.div_(norm_divisor(norm, fan_in))
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
        d = norm_divisor(norm, x.shape[dim]).to(x.dtype)
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
        ctx.factors, ctx.na = mp_cat_weights(a.shape[1], b.shape[1], t), a.shape[1]
        return _cat_scaled(a, b, *ctx.factors)  # the factors once, for forward and backward

    @staticmethod
    def backward(ctx, g):
        fa, fb = ctx.factors
        return g[:, :ctx.na] * fa, g[:, ctx.na:] * fb, None

def _train_cat(a, b, t=0.5):
    return _MPCat.apply(a, b, t)

def _clip(x, limit):
    """x.clip(-limit, limit); on a CPU the clamp (and its backward) is skipped when nothing reaches the limit. The
    check reads x's storage as one flat vector: torch's aminmax over a channels-last tensor's logical axes is much
    slower (README, Speed)."""
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
    end = _branch_plan(block)[1]  # a convolution at step `end` ends the branch: nothing but dropout follows it
    for i, (op, name, _args) in enumerate(block.steps):
        if op == 'silu':
            y = torch.nn.functional.silu(y if k == 1 else y * k)
            k = 1 / SILU_STD
        elif op == 'drop':
            if block.training and block.dropout != 0:
                mask = torch.empty(y.shape, dtype=torch.bool, device=y.device).bernoulli_(1 - block.dropout)
                y, k = y * mask.contiguous(memory_format=torch.channels_last), k / (1 - block.dropout)
        elif op == 'mod':
            c = (block.emb_linear(emb, gain=block.emb_gain) + 1) * k
            y, k = y * c.to(y.dtype).unsqueeze(2).unsqueeze(3), 1.0
        else:
            conv = getattr(block, name)
            last = i == end
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
    a, b = mp_sum_weights(block.res_balance)
    y = _train_branch(block, x, emb, out_scale=b)
    if block.flavor == 'dec' and block.conv_skip is not None:
        x = block.conv_skip(x)
    x = torch.add(y, x, alpha=a)
    if block.num_heads != 0:
        a, b = mp_sum_weights(block.attn_balance)
        x = torch.add(_train_attention(block, x, out_scale=b), x, alpha=a)
    return x if block.clip_act is None else _clip(x, block.clip_act)

def _train_unet(unet, x, noise_labels, class_labels):
    """UNet.forward on the training path, in channels-last memory; callers get the usual layout back."""
    with _unit_weight_table(unet) if x.device.type == 'cpu' else contextlib.nullcontext():
        emb = unet.embedding(noise_labels, class_labels)
        return unet.trunk(x.contiguous(memory_format=torch.channels_last), emb, cat=_train_cat).contiguous()

#----------------------------------------------------------------------------
# Inference path. What it changes, and why each change keeps the function the same:
#   * Each weight is normalised once and cached (normalize() reads and writes every parameter on every call, a large
#     share of a small batch's forward pass: benchmarks/inference.py measures it). The cache entry is keyed on the parameter's version counter (bumped
#     by optimizer steps, EMA updates, copy_, load_state_dict), its storage, device and dtype, and is also dropped on
#     train()/eval(), .to()/.half() and load_state_dict(). Writes through `param.data` bypass the version counter:
#     after such a write, call net.train() or net.eval() once. The cache lives outside the module (not in pickles
#     or deep copies) and costs one extra copy of the weights. On a CPU, dense weights are kept prepacked in
#     oneDNN's blocked layout instead.
#   * Scalar factors are folded into the cached weights: MP-SiLU's 1/SILU_STD into the next layer, the MP-sum weight
#     of the branch (mp_sum_weights) into the layer that ends a branch (convolutions are linear, so only rounding differs).
#   * Activations are channels-last, so 1x1 convolutions are plain matrix products over pixels and depthwise
#     convolutions get oneDNN's vectorised kernels; convolution + SiLU run as one oneDNN call.
#   * Self-attention uses scaled_dot_product_attention (the same softmax(q.k/sqrt(C_h)) v), resampling uses
#     avg_pool2d / nearest upsampling (the same [1,1] filters), elementwise updates are done in place, and on a CPU
#     large batches run in chunks of a few images (_infer_unet).

_weight_cache = weakref.WeakKeyDictionary()  # MPConv -> {(dtype, gain, scale): (validity key, entry)}
_FAST_CHUNK_PIXELS = 8192  # batch chunk (in pixels) of the inference path on a CPU: 2 images at 64x64

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
        w = normalize(w) * (gain * (scale / np.sqrt(w.shape[1:].numel())))
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
    """Dense convolution with a weight prepacked once into oneDNN's blocked layout (otherwise oneDNN repacks it on
    every call, which at small feature maps costs about as much as the convolution). The plain copy is dropped then:
    it would only cost memory."""
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
    plan = _branch_plan(block)[0]
    y, k, owned = x, 1.0, False
    for i, (op, name, silu) in enumerate(plan):
        if op == 'silu':
            if k != 1:
                y, owned = (y.mul_(k) if owned else y * k), True
            y = torch.nn.functional.silu(y, inplace=owned)
            k, owned = 1 / SILU_STD, True
        elif op == 'mod':
            c = block.emb_linear(emb, gain=block.emb_gain).add_(1).mul_(k).to(y.dtype).unsqueeze(2).unsqueeze(3)
            y, k, owned = (y.mul_(c) if owned else y * c), 1.0, True
        else:
            fold = i == len(plan) - 1 and not silu  # the branch ends here: out_scale goes into this weight too
            conv = getattr(block, name)
            y = _conv_fast(y, _cached(conv, y.dtype, scale=k * (out_scale if fold else 1)), conv.groups, silu)
            k, owned = (1 / SILU_STD if silu else 1.0), True
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
    y = y.div_(norm_divisor(norm, y.shape[4]).to(y.dtype))
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
    a, b = mp_sum_weights(block.res_balance)
    y = _infer_branch(block, x, emb, out_scale=b)
    if block.flavor == 'dec' and block.conv_skip is not None:
        x = block.conv_skip(x)
    x = y.add_(x, alpha=a)  # mp_sum; the branch's share is already in y
    if block.num_heads != 0:
        a, b = mp_sum_weights(block.attn_balance)
        y = _infer_attention(block, x)
        x = _conv_fast(y, _cached(block.attn_proj, y.dtype, scale=b)).add_(x, alpha=a)
    if block.clip_act is not None:
        x = x.clip_(-block.clip_act, block.clip_act)
    return x

def _infer_unet(unet, x, noise_labels, class_labels):
    """UNet.forward on the inference path. On a CPU, large batches go through in chunks of at most
    _FAST_CHUNK_PIXELS pixels. Each image is computed independently anyway, and the intermediates then stay below
    glibc's 32 MiB limit above which every allocation is a fresh mmap whose pages fault in on first touch; it also
    cuts peak memory. (A GPU wants the whole batch at once.)"""
    emb = unet.embedding(noise_labels, class_labels)
    n = max(1, _FAST_CHUNK_PIXELS // (x.shape[2] * x.shape[3]))
    run = lambda x, emb: unet.trunk(x.contiguous(memory_format=torch.channels_last), emb, cat=_mp_cat_fast).contiguous()
    if x.shape[0] <= n or x.device.type != 'cpu':
        return run(x, emb)
    return torch.cat([run(x[i:i + n], emb[i:i + n] if emb.shape[0] > 1 else emb) for i in range(0, x.shape[0], n)])

#----------------------------------------------------------------------------
# Registration with the reference network's hook.

def _forget_weights(conv):
    _weight_cache.pop(conv, None)

edm2plus.register_faster(choose=choose_path, forget=_forget_weights, forwards={
    'infer': {'MPConv': _infer_mpconv, 'Block': _infer_block, 'UNet': _infer_unet},
    'train': {'MPConv': _train_mpconv, 'Block': _train_block, 'UNet': _train_unet},
})
