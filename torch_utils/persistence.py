"""Pickles that carry their own source code: EDM2's persistence format, version 6 (spec §7.1).

A class decorated with `persistent_class` pickles as a call to `_reconstruct_persistent_obj(meta)`, where `meta`
holds the full source text of the module that defines the class, the class name and the instance state. Loading
such a pickle therefore works without the original package being importable, but it EXECUTES THAT SOURCE CODE:
only load pickles from people you trust (or use the weights-only `.pt` format of `networks/export.py`).
"""

import copy
import inspect
import io
import pickle
import sys
import types
import uuid

import dnnlib

_version = 6            # Written into every pickle; EDM2 refuses any other value.
_decorators = set()     # Every persistent subclass created so far.
_import_hooks = []      # Callables meta -> meta applied before reconstruction.
_module_to_src = {}     # Module object -> its source text.
_src_to_module = {}     # Source text -> module object (reused when the same source is loaded again).

#----------------------------------------------------------------------------

def persistent_class(orig_class):
    """Class decorator: instances record their constructor arguments and pickle together with their module's source."""
    assert isinstance(orig_class, type)
    if is_persistent(orig_class):
        return orig_class

    assert orig_class.__module__ in sys.modules
    orig_module = sys.modules[orig_class.__module__]
    orig_module_src = _module_to_src_text(orig_module)

    class Decorator(orig_class):
        _orig_module_src = orig_module_src
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            record = getattr(self, '_record_init_args', True)
            self._init_args = copy.deepcopy(args) if record else None
            self._init_kwargs = copy.deepcopy(kwargs) if record else None
            assert orig_class.__name__ in orig_module.__dict__
            _check_pickleable(self.__reduce__())

        @property
        def init_args(self):
            assert self._init_args is not None
            return copy.deepcopy(self._init_args)

        @property
        def init_kwargs(self):
            assert self._init_kwargs is not None
            return dnnlib.EasyDict(copy.deepcopy(self._init_kwargs))

        def __reduce__(self):
            fields = list(super().__reduce__())
            fields += [None] * max(3 - len(fields), 0)
            if fields[0] is not _reconstruct_persistent_obj:
                meta = dict(type='class', version=_version, module_src=self._orig_module_src,
                            class_name=self._orig_class_name, state=fields[2])
                fields[0] = _reconstruct_persistent_obj
                fields[1] = (meta,)
                fields[2] = None
            return tuple(fields)

    Decorator.__name__ = orig_class.__name__
    Decorator.__qualname__ = orig_class.__qualname__
    Decorator.__doc__ = orig_class.__doc__
    Decorator.__module__ = orig_class.__module__
    _decorators.add(Decorator)
    return Decorator

def is_persistent(obj):
    """True for a persistent class or an instance of one."""
    try:
        if obj in _decorators:
            return True
    except TypeError:
        pass
    return type(obj) in _decorators

def import_hook(hook):
    """Register hook(meta) -> meta, called on every persistent object before it is rebuilt (e.g. to patch source)."""
    assert callable(hook)
    _import_hooks.append(hook)

#----------------------------------------------------------------------------

def _reconstruct_persistent_obj(meta):
    """Rebuild a persistent object from its pickled meta; referenced by name from every network pickle."""
    meta = dnnlib.EasyDict(meta)
    meta.state = dnnlib.EasyDict(meta.state)
    for hook in _import_hooks:
        meta = hook(meta)
        assert meta is not None
    if meta.get('version') != _version:
        raise pickle.UnpicklingError(f'Unsupported persistence format version {meta.get("version")!r} (expected {_version})')
    module = _src_to_module_obj(meta.module_src)
    if meta.type != 'class':
        raise pickle.UnpicklingError(f'Unsupported persistent object type {meta.type!r}')
    orig_class = module.__dict__.get(meta.class_name)
    if not isinstance(orig_class, type):
        raise pickle.UnpicklingError(f'The source stored in the pickle defines no class {meta.class_name!r}')
    decorator_class = persistent_class(orig_class)
    obj = decorator_class.__new__(decorator_class)
    setstate = getattr(obj, '__setstate__', None)
    if callable(setstate):
        setstate(meta.state)
    else:
        obj.__dict__.update(meta.state)
    return obj

def _module_to_src_text(module):
    src = _module_to_src.get(module)
    if src is None:
        src = inspect.getsource(module)
        _module_to_src[module] = src
        _src_to_module[src] = module
    return src

def _src_to_module_obj(src):
    module = _src_to_module.get(src)
    if module is None:
        name = '_imported_module_' + uuid.uuid4().hex
        module = types.ModuleType(name)
        sys.modules[name] = module
        _module_to_src[module] = src
        _src_to_module[src] = module
        try:
            exec(src, module.__dict__)  # pylint: disable=exec-used
        except BaseException:
            # Forget the half-built module, so that a later load (e.g. after installing a missing package) runs
            # the source again instead of reusing a module without its classes.
            del sys.modules[name], _module_to_src[module], _src_to_module[src]
            raise
    return module

#----------------------------------------------------------------------------

def _check_pickleable(obj):
    """Raise if obj contains something the standard pickler cannot handle (checked at construction time)."""
    def recurse(obj):
        if isinstance(obj, (list, tuple, set)):
            return [recurse(x) for x in obj]
        if isinstance(obj, dict):
            return [[recurse(x), recurse(y)] for x, y in obj.items()]
        if isinstance(obj, (str, int, float, bool, bytes, bytearray)):
            return None
        if f'{type(obj).__module__}.{type(obj).__name__}' in ['numpy.ndarray', 'torch.Tensor', 'torch.nn.parameter.Parameter']:
            return None
        if is_persistent(obj):
            return None
        return obj
    with io.BytesIO() as f:
        pickle.dump(recurse(obj), f)
