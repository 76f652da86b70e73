"""Pickles that carry their own source code (EDM2's persistence format, version 6).

An instance of a class decorated with `persistent_class` pickles as the call `_reconstruct_persistent_obj(meta)`,
meta = {'type': 'class', 'version': 6, 'module_src': full source text of the defining module, 'class_name': ...,
'state': the instance state}. Loading such a pickle works without the original package, but it EXECUTES THAT
SOURCE CODE: only load pickles from people you trust (or use the weights-only `.pt` format of
`networks/export.py`). The names `persistent_class`, `is_persistent`, `import_hook` and
`_reconstruct_persistent_obj` are referenced by EDM2's pickles and embedded sources and must not change.
"""

import copy
import inspect
import io
import pickle
import sys
import types
import uuid

import numpy as np
import torch

import dnnlib

_version = 6            # Written into every pickle; EDM2 accepts no other value.
_persistent = set()     # The persistent subclasses made so far (exact classes: a subclass of one is not persistent).
_import_hooks = []      # Callables meta -> meta, applied to every object before it is rebuilt.
_module_sources = {}    # Module -> its source text.
_src_to_module = {}     # Source text -> module (a source seen before is not executed again).

#----------------------------------------------------------------------------
# Module <-> source text.

def _remember(module, src):
    _module_sources[module] = src
    _src_to_module[src] = module

def _source_of(module):
    if module not in _module_sources:
        _remember(module, inspect.getsource(module))
    return _module_sources[module]

def _src_to_module_obj(src):
    """The module whose source is `src`: one imported earlier, else a fresh `_imported_module_<hex>` running it."""
    if src in _src_to_module:
        return _src_to_module[src]
    module = types.ModuleType(f'_imported_module_{uuid.uuid4().hex}')
    sys.modules[module.__name__] = module
    _remember(module, src)  # before running it: its classes are made persistent while it runs
    try:
        exec(src, module.__dict__)  # pylint: disable=exec-used
    except BaseException:
        # Forget the half-built module, so that a later load (e.g. after installing a missing package) runs the
        # source again instead of finding a module without its classes.
        sys.modules.pop(module.__name__, None)
        _module_sources.pop(module, None)
        _src_to_module.pop(src, None)
        raise
    return module

#----------------------------------------------------------------------------
# Making a class persistent.

def persistent_class(orig_class):
    """Class decorator: instances record their constructor arguments and pickle with their module's source text.

    Returns a subclass with the same name, qualified name, module and docstring; a class that is already
    persistent comes back unchanged.
    """
    if not isinstance(orig_class, type):
        raise TypeError(f'persistent_class: expected a class, got {type(orig_class).__name__}')
    if is_persistent(orig_class):
        return orig_class
    module = sys.modules.get(orig_class.__module__)
    if module is None:
        raise ValueError(f'persistent_class: module {orig_class.__module__!r} of {orig_class.__name__} is not imported')
    src = _source_of(module)
    name = orig_class.__name__

    def __init__(self, *args, **kwargs):
        orig_class.__init__(self, *args, **kwargs)
        keep = getattr(self, '_record_init_args', True)  # an instance may opt out before this point
        self._init_args = copy.deepcopy(args) if keep else None
        self._init_kwargs = copy.deepcopy(kwargs) if keep else None
        if getattr(module, name, None) is None:
            raise TypeError(f'persistent_class: {name} must be defined at the top level of {module.__name__}')
        _check_pickleable(self.__reduce__())  # fail at construction rather than at the first snapshot

    def __reduce__(self):
        reduced = tuple(orig_class.__reduce__(self))
        if reduced[0] is _reconstruct_persistent_obj:  # a persistent base class has done it already
            return reduced + (None,) * (3 - len(reduced))
        state = reduced[2] if len(reduced) > 2 else None
        meta = dict(type='class', version=_version, module_src=src, class_name=name, state=state)
        return (_reconstruct_persistent_obj, (meta,), None) + reduced[3:]

    def init_args(self):
        if self._init_args is None:
            raise AttributeError(f'{name} did not record its constructor arguments')
        return copy.deepcopy(self._init_args)

    def init_kwargs(self):
        if self._init_kwargs is None:
            raise AttributeError(f'{name} did not record its constructor arguments')
        return dnnlib.EasyDict(copy.deepcopy(self._init_kwargs))

    members = dict(__module__=orig_class.__module__, __qualname__=orig_class.__qualname__, __doc__=orig_class.__doc__,
                   __init__=__init__, __reduce__=__reduce__,
                   init_args=property(init_args, doc='Deep copy of the positional constructor arguments.'),
                   init_kwargs=property(init_kwargs, doc='Deep copy of the keyword constructor arguments (EasyDict).'))
    persistent = types.new_class(name, (orig_class,), exec_body=lambda ns: ns.update(members))
    _persistent.add(persistent)
    return persistent

def is_persistent(obj):
    """True for a persistent class or an instance of one."""
    return (obj if isinstance(obj, type) else type(obj)) in _persistent

def import_hook(hook):
    """Register hook(meta) -> meta, called on every persistent object before it is rebuilt (e.g. to patch source)."""
    if not callable(hook):
        raise TypeError(f'import_hook: {hook!r} is not callable')
    _import_hooks.append(hook)

#----------------------------------------------------------------------------
# Unpickling. Referenced by name from every network pickle.

def _checked_meta(raw):
    """The pickled meta as EasyDicts, after every import hook, checked to describe a version-6 class instance."""
    meta = dnnlib.EasyDict(raw, state=dnnlib.EasyDict(raw['state']))
    for hook in _import_hooks:
        meta = hook(meta)
        if meta is None:
            raise pickle.UnpicklingError(f'import hook {hook!r} returned None')
    if meta.get('version') != _version:
        raise pickle.UnpicklingError(f'Unsupported persistence format version {meta.get("version")!r} (expected {_version})')
    if meta.type != 'class':
        raise pickle.UnpicklingError(f'Unsupported persistent object type {meta.type!r}')
    return meta

def _reconstruct_persistent_obj(meta):
    """Rebuild a persistent object from its meta: run the stored source (once), then restore the state."""
    meta = _checked_meta(meta)
    cls = getattr(_src_to_module_obj(meta.module_src), meta.class_name, None)
    if not isinstance(cls, type):
        raise pickle.UnpicklingError(f'The source stored in the pickle defines no class {meta.class_name!r}')
    cls = persistent_class(cls)
    obj = cls.__new__(cls)  # no __init__: the state holds everything
    if hasattr(obj, '__setstate__'):
        obj.__setstate__(meta.state)
    else:
        obj.__dict__.update(meta.state)
    return obj

#----------------------------------------------------------------------------
# Construction-time pickle check.

class _LeafSkipper(pickle.Pickler):
    """Pickles into a buffer but stands in for tensors, arrays and persistent objects, whose pickling is known to
    work and would only cost time (persistent sub-modules are checked by their own constructors)."""

    def persistent_id(self, obj):
        skip = isinstance(obj, (torch.Tensor, np.ndarray)) or is_persistent(obj)
        return id(obj) if skip else None

def _check_pickleable(obj):
    """Raise the standard pickler's error if `obj` holds something it cannot handle."""
    with io.BytesIO() as buffer:
        _LeafSkipper(buffer).dump(obj)
