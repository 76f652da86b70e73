"""Every network file format is read here: `load_snapshot(path)` gives the snapshot dict, `load_network(path)` the net.

Two formats, told apart by the file's first bytes, except that a file NAMED .pt or .pth is always read as the
weights-only format (a pickle given such a name is refused, never unpickled):
  * Pickle (.pkl): the snapshot layout of EDM2 (docs/compatibility.md §2-§3), written by EDM2's tools or by ours. An EasyDict
    with `ema` (the denoiser, float16) and usually `encoder`, `dataset_kwargs` and `loss_fn`. Its persistent objects
    carry the source code of their modules, and unpickling RUNS THAT CODE (torch_utils/persistence.py).
  * Weights-only (.pt): tensors plus a JSON description of the architecture (networks/export.py), read with
    `torch.load(weights_only=True)`; loading it never runs code from the file.

A `Precond` that is not ours (EDM2's class, executed from the source embedded in its pickle, or ours from an older
version of networks/edm2plus.py) is by default rebuilt as the current `networks.edm2plus.Precond` from its recorded
constructor arguments, with the same weights (`load_state_dict(strict=True)`), so that every tool gets our fast
paths; likewise a foreign encoder becomes the current class of its name with the same attributes (`vae_name`, the
affine constants, ...), so that its VAE is loaded by our code (local folders, offline machines, one-line errors).
`native=False` keeps everything exactly as unpickled.
"""

import importlib
import json
import os
import pickle
import urllib.parse
import warnings

import torch

import dnnlib
from torch_utils import misc
from torch_utils.cli import one_line

# The sentence every tool that loads networks puts in its --help (and the README says the same).
PICKLE_WARNING = ('Network pickles (.pkl) run the Python code stored inside them when loaded: load only pickles you '
                  'trust, or convert them once with "python -m networks.export IN.pkl OUT.pt" into the weights-only '
                  '.pt format, which every tool accepts and which never runs code.')

# The weights-only format: a torch.save of plain containers and tensors (layout in networks/export.py).
WEIGHTS_FORMAT = 'edm2plus-weights'
WEIGHTS_VERSION = 1

def _file_name(path_or_url):
    """The name that misc.is_weights_only_name judges: the path itself, or a URL's path (no query or fragment)."""
    name = os.fspath(path_or_url)
    return urllib.parse.urlparse(name).path if dnnlib.util.is_url(name) else name

# The only classes a weights-only file may name, per role. The file chooses among these names and supplies
# constructor arguments and tensors; nothing else. They are looked up by name when a file asks for them (as a
# pickle's class names are), so this module imports nothing above the networks layer.
ALLOWED_CLASSES = {
    'network': ('networks.edm2plus.Precond',),
    'encoder': ('training.encoders.StandardRGBEncoder', 'training.encoders.StabilityVAEEncoder'),
    'loss':    ('training.loss.EDM2Loss',),
}

def _allowed_class(role, class_name):
    if class_name not in ALLOWED_CLASSES[role]:
        return None
    module, attr = class_name.rsplit('.', 1)
    return getattr(importlib.import_module(module), attr)

class NetworkFileError(ValueError):
    """A network file that cannot be used; the message is one line that names the file."""

#----------------------------------------------------------------------------
# Public API.

def load_snapshot(path_or_url, verbose=True, native=True, allow_pickle=True, finite=True):
    """Return the snapshot stored at path_or_url as an EasyDict with at least `ema` (plus `encoder`,
    `dataset_kwargs`, `loss_fn` where the file has them). The network keeps the stored dtype (float16 in snapshots).

    native:       rebuild a foreign Precond as networks.edm2plus.Precond (same weights and outputs).
    allow_pickle: False refuses pickles, i.e. accepts only files whose loading cannot run code.
    finite:       refuse a network with a NaN or infinite weight (written by a run that diverged), which would
                  otherwise give black images and meaningless metrics without a word.
    """
    name = os.fspath(path_or_url)
    if verbose:
        print(f'Loading network from {name} ...')
    if not dnnlib.util.is_url(name) and not os.path.isfile(name):
        raise FileNotFoundError(f'{name}: no such network file')
    with dnnlib.util.open_url(name, verbose=verbose) as f:
        head = f.read(4)
        f.seek(0)
        if head[:2] == b'PK':  # torch.save's zip archive
            data = _read_weights(f, name)
        elif head[:1] == b'\x80' and misc.is_weights_only_name(_file_name(name)):
            raise NetworkFileError(f'{name}: {misc.PICKLE_UNDER_WEIGHTS_NAME}, since unpickling runs code: if you '
                                   'trust it, rename it .pkl')
        elif head[:1] == b'\x80':  # pickle protocol 2 or later (EDM2 and we write the default protocol)
            if not allow_pickle:
                raise NetworkFileError(f'{name}: is a pickle, and pickles are refused here because loading them runs '
                                       'code; convert it with "python -m networks.export" first')
            data = _unpickle(f, name)
        elif len(head) == 0:
            raise NetworkFileError(f'{name}: empty file, not a network')
        else:
            raise NetworkFileError(f'{name}: not a network file (neither a snapshot pickle nor a weights-only .pt)')
    data = _check_snapshot(data, name)
    if finite:
        check_finite(data.ema, name)
    if native:
        data.ema = to_native(data.ema, name=name)
        if data.get('encoder') is not None:
            data.encoder = native_encoder(data.encoder, name=name)
    return data

def load_network(path_or_url, device=None, dtype=None, native=True, verbose=True, finite=True):
    """Return the EMA network of a snapshot file as stored (snapshots: eval mode, float16), optionally moved to
    `device` and cast to `dtype`. A module passed instead of a path is returned as it is (moved/cast likewise).
    Casting float16 snapshots to float32 changes D by ~1e-4: EDM2 itself computes gain/sqrt(fan_in) with the
    float16 gains of a loaded snapshot, so the stored dtype reproduces EDM2's outputs exactly."""
    if isinstance(path_or_url, (str, os.PathLike)):
        net = load_snapshot(path_or_url, verbose=verbose, native=native, finite=finite).ema
    else:
        net = path_or_url
    if device is not None:
        net = net.to(device)
    if dtype is not None:
        net = net.to(dtype)
    return net

def count_non_finite(net):
    """(number of NaN or infinite values among the floating-point parameters and buffers of `net`, name of the
    first tensor holding one, or None)."""
    count, first = 0, None
    for key, t in list(net.named_parameters()) + list(net.named_buffers()):
        if t.is_floating_point() and not t.is_meta:
            bad = int((~t.isfinite()).sum())
            if bad and first is None:
                first = key
            count += bad
    return count, first

def check_finite(net, name):
    """Raise NetworkFileError naming `name` unless every floating-point parameter and buffer of `net` is finite."""
    count, first = count_non_finite(net)
    if count:
        raise NetworkFileError(f'{name}: the network has {count} non-finite (NaN or infinite) weight value(s), '
                               f'first in {first}; the training run that wrote it probably diverged')

def is_native(net):
    """True if `net` is an instance of the current networks.edm2plus.Precond."""
    from networks import edm2plus  # pylint: disable=import-outside-toplevel
    return isinstance(net, edm2plus.Precond)

def to_native(net, name=None, verify=False):
    """Rebuild a foreign Precond (EDM2's, or ours from other source text) as networks.edm2plus.Precond.

    Built from the recorded constructor arguments on the meta device, then given the foreign tensors themselves
    (`load_state_dict(strict=True, assign=True)`: same dtype, no copy). The rebuild is used only if every parameter
    and buffer matches by name and shape and every plain attribute of every sub-module (balances, heads, clip, ...)
    is equal; otherwise the foreign module is returned unchanged, with a warning. `verify=True` also compares the
    outputs of both modules on a small batch (costs two forward passes). Anything that is not a Precond, and our own
    Precond, is returned as it is.
    """
    from networks import edm2plus  # pylint: disable=import-outside-toplevel
    if isinstance(net, edm2plus.Precond) or type(net).__name__ != 'Precond' or not isinstance(net, torch.nn.Module):
        return net
    init_args, init_kwargs = getattr(net, '_init_args', None), getattr(net, '_init_kwargs', None)
    where = f'{name}: ' if name is not None else ''
    if init_args is None or init_kwargs is None:
        warnings.warn(f'{where}the network did not record its constructor arguments; it is used as it was pickled')
        return net
    try:
        with torch.device('meta'):
            native = edm2plus.Precond(*init_args, **init_kwargs)
        _check_same_attributes(net, native)
        native.load_state_dict(net.state_dict(), strict=True, assign=True)
        left = [n for n, t in list(native.named_parameters()) + list(native.named_buffers()) if t.is_meta]
        if left:
            raise ValueError(f'no value for {", ".join(left)}')
        native.train(net.training)
        for p_native, p in zip(native.parameters(), net.parameters()):
            p_native.requires_grad_(p.requires_grad)
        if verify:
            _check_same_outputs(net, native)
    except Exception as e:  # pylint: disable=broad-except
        warnings.warn(f'{where}{type(net).__module__}.Precond cannot be rebuilt as networks.edm2plus.Precond '
                      f'({type(e).__name__}: {e}); it is used as it was pickled')
        return net
    return native

def native_encoder(encoder, name=None):
    """A foreign encoder (EDM2's StabilityVAEEncoder or StandardRGBEncoder run from the source in its pickle, or ours
    from older source text) as an instance of the current class of the same name with the same attributes: an
    encoder is nothing but its attributes (docs/compatibility.md §3). Returned unchanged, with a warning, if it lacks
    an attribute the current class has; an encoder of any other class is returned as it is."""
    cls = _allowed_class('encoder', f'training.encoders.{type(encoder).__name__}')
    if cls is None or isinstance(encoder, cls) or not hasattr(encoder, '__dict__'):
        return encoder
    state = dict(vars(encoder))
    missing = [key for key in vars(cls()) if not key.startswith('_') and key not in state]
    if missing:
        where = f'{name}: ' if name is not None else ''
        warnings.warn(f'{where}the encoder lacks {", ".join(missing)}; it is used as it was pickled')
        return encoder
    native = cls.__new__(cls)
    native.__dict__.update(state)
    return native

#----------------------------------------------------------------------------
# Pickles.

def _unpickle(f, name):
    try:
        return pickle.load(f)
    except EOFError:
        raise NetworkFileError(f'{name}: truncated pickle (the file ends early)') from None
    except pickle.UnpicklingError as e:
        raise NetworkFileError(f'{name}: corrupt or unsupported pickle ({one_line(e)})') from None
    except Exception as e:  # pylint: disable=broad-except
        # Typically the code embedded in the pickle failed to run here, e.g. it imports a missing package.
        raise NetworkFileError(f'{name}: could not be unpickled ({one_line(e, with_type=True)})') from None

def _check_snapshot(data, name):
    """The structure every tool relies on (docs/compatibility.md §3)."""
    if not isinstance(data, dict):
        raise NetworkFileError(f'{name}: not a network snapshot: it holds a {type(data).__name__}, '
                               'not a dict with the key "ema"')
    if 'ema' not in data:
        keys = ', '.join(repr(k) for k in list(data)[:8]) + (', ...' if len(data) > 8 else '')
        raise NetworkFileError(f'{name}: not a network snapshot: a dict without the key "ema" (keys: {keys or "none"})')
    net = data['ema']
    if not isinstance(net, torch.nn.Module):
        raise NetworkFileError(f'{name}: not a network snapshot: "ema" is a {type(net).__name__}, not a network module')
    missing = [a for a in ('img_resolution', 'img_channels', 'label_dim') if not hasattr(net, a)]
    if missing:
        raise NetworkFileError(f'{name}: the network in "ema" lacks the attribute(s) {", ".join(missing)}')
    return dnnlib.EasyDict(data)

#----------------------------------------------------------------------------
# Weights-only files (.pt), written by networks/export.py.

def _read_weights(f, name):
    """Read a weights-only file from the open file `f`; return the snapshot EasyDict (encoder, dataset_kwargs,
    loss_fn, ema). Never runs code from the file: any error is a NetworkFileError naming `name`."""
    try:
        data = misc.load_weights_only(f, name)
    except misc.CodeRefusedError as e:
        raise NetworkFileError(f'{name}: refused: not a weights-only network file, and loading it would run code '
                               f'({e.reason}); an EDM2 training state?') from None
    except Exception as e:  # pylint: disable=broad-except
        raise NetworkFileError(f'{name}: truncated or corrupt .pt file ({one_line(e)})') from None
    if isinstance(data, dict) and data.get('format') == WEIGHTS_FORMAT:
        return _build(data, name)
    if isinstance(data, dict) and {'net', 'optimizer'} <= set(data):
        raise NetworkFileError(f'{name}: a training state (training-state-*.pt), not a network: use a '
                                       'network-snapshot-*.pkl, or export one with "python -m networks.export"')
    raise NetworkFileError(f'{name}: not a network file: a .pt file without the "{WEIGHTS_FORMAT}" format tag')

def _build(data, name):
    def fail(what):
        return NetworkFileError(f'{name}: invalid weights-only file: {what}')
    if not isinstance(data.get('version'), int) or data['version'] > WEIGHTS_VERSION:
        raise fail(f'format version {data.get("version")!r} is newer than this code reads ({WEIGHTS_VERSION})')
    try:
        arch = json.loads(data['architecture'])
        net_desc = arch['network']
    except (KeyError, TypeError, ValueError) as e:
        raise fail(f'unreadable architecture description ({one_line(e)})') from None
    state = data.get('state_dict')
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise fail('"state_dict" is not a dict of named tensors')

    net_class = _allowed_class('network', net_desc.get('class_name'))
    if net_class is None:
        raise fail(f'unknown network class {net_desc.get("class_name")!r}')
    try:
        with torch.device('meta'):
            net = net_class(*net_desc.get('init_args', []), **net_desc.get('init_kwargs', {}))
        net.load_state_dict(state, strict=True, assign=True)
    except Exception as e:  # pylint: disable=broad-except
        raise fail(f'the weights do not fit the described network ({one_line(e)})') from None
    net.eval().requires_grad_(False)

    encoder = _construct(arch.get('encoder'), fail, 'encoder')
    loss_fn = _construct(arch.get('loss'), fail, 'loss')
    dataset_kwargs = arch.get('dataset_kwargs')
    dataset_kwargs = dnnlib.EasyDict(dataset_kwargs) if isinstance(dataset_kwargs, dict) else None
    return dnnlib.EasyDict(encoder=encoder, dataset_kwargs=dataset_kwargs, loss_fn=loss_fn, ema=net)

def _construct(desc, fail, role):
    if desc is None:
        return None
    cls = _allowed_class(role, desc.get('class_name')) if isinstance(desc, dict) else None
    if cls is None:
        raise fail(f'unknown {role} class {desc.get("class_name") if isinstance(desc, dict) else desc!r}')
    try:
        return cls(*desc.get('init_args', []), **desc.get('init_kwargs', {}))
    except Exception as e:  # pylint: disable=broad-except
        raise fail(f'cannot construct the {role} ({one_line(e)})') from None

#----------------------------------------------------------------------------
# Checks of a native rebuild against the foreign module.

_PLAIN = (bool, int, float, str, type(None), list, tuple)

def _check_same_attributes(foreign, native):
    """Same sub-module tree (names and class names) and the same plain attributes in every sub-module."""
    native_modules = dict(native.named_modules())
    for path, mod in foreign.named_modules():
        other = native_modules.get(path)
        if other is None or type(other).__name__ != type(mod).__name__:
            raise ValueError(f'sub-module "{path or "."}" differs')
        for key, value in vars(mod).items():
            if key.startswith('_') or key == 'training' or not isinstance(value, _PLAIN):
                continue
            if vars(other).get(key, _Missing) != value:
                raise ValueError(f'attribute "{(path + "." if path else "") + key}" differs')

class _Missing:
    pass

@torch.no_grad()
def _check_same_outputs(foreign, native):
    modes = foreign.training, native.training
    foreign.eval(), native.eval()  # in training mode MPConv would rewrite the weights (forced weight normalisation)
    try:
        _compare_outputs(foreign, native)
    finally:
        foreign.train(modes[0]), native.train(modes[1])

def _compare_outputs(foreign, native):
    gen = torch.Generator().manual_seed(0)
    res, ch = native.img_resolution, native.img_channels
    x = torch.randn([2, ch, res, res], generator=gen)
    sigma = torch.tensor([0.3, 3.0])
    labels = None
    if native.label_dim:
        labels = torch.eye(native.label_dim)[torch.randint(native.label_dim, [2], generator=gen)]
    want = foreign(x, sigma, labels, return_logvar=True)
    got = native(x, sigma, labels, return_logvar=True)
    for a, b in zip(want, got):
        if not torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5):
            raise ValueError(f'outputs differ by up to {(a.float() - b.float()).abs().max().item():g}')
