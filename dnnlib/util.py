"""Generic utilities: attribute dicts, cache paths, URL opening, construct-by-name, atomic writes, logging.

The public names match EDM2's `dnnlib.util`: EDM2's pickles store `dnnlib.util.EasyDict` by name, and its
configs name classes and functions as strings that `construct_class_by_name` / `call_func_by_name` resolve.
"""

import contextlib
import ctypes
import fnmatch
import hashlib
import importlib
import inspect
import io
import os
import pickle
import re
import shutil
import sys
import tempfile
import urllib.parse

import numpy as np

#----------------------------------------------------------------------------
# Attribute dictionary; pickled by name as `dnnlib.util.EasyDict`.

class EasyDict(dict):
    """dict whose keys are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name)

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name)

#----------------------------------------------------------------------------
# Atomic file writing: write to a temporary name in the same folder, then rename,
# so a killed process never leaves a truncated file under its final name.

@contextlib.contextmanager
def atomic_write(path, mode='wb'):
    """Context manager yielding a file object; the file appears at `path` only when the block succeeds.

    An OSError met while making or writing the file (full disk, read-only folder) is raised again naming `path`,
    not the hidden temporary name, so that a one-line report points at what the user asked for."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the final file the usual permissions
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        if isinstance(e, OSError) and e.filename in (None, tmp, folder):
            raise OSError(e.errno, e.strerror or str(e), path) from None
        raise

#----------------------------------------------------------------------------
# Tee of stdout/stderr into a log file (EDM2's log.txt).

class Logger:
    """Tee: while open, whatever is printed to stdout or stderr goes to the original stdout and to `file_name`."""

    def __init__(self, file_name=None, file_mode='a', should_flush=True):
        self.file = open(file_name, file_mode) if file_name is not None else None
        self.should_flush = should_flush
        self.stdout, self.stderr = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = self

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.close()

    def _sinks(self):
        return [sink for sink in (self.file, self.stdout) if sink is not None]

    def write(self, text):
        text = text.decode() if isinstance(text, bytes) else text
        if text:
            for sink in self._sinks():
                sink.write(text)
            if self.should_flush:
                self.flush()

    def isatty(self):
        return self.stdout.isatty()

    def flush(self):
        for sink in self._sinks():
            sink.flush()

    def close(self):
        """Flush, give sys.stdout/sys.stderr back (where they are still this tee) and close the file."""
        self.flush()
        for stream in ('stdout', 'stderr'):
            if getattr(sys, stream) is self:
                setattr(sys, stream, getattr(self, stream))
        file, self.file = self.file, None
        if file is not None:
            file.close()

#----------------------------------------------------------------------------
# Cache directory for downloads and hub models.

_cache_dir = None

def set_cache_dir(path):
    """Use `path` as the cache root from now on (None: back to the environment's choice)."""
    global _cache_dir
    _cache_dir = path

def _cache_root():
    # The first of: set_cache_dir(), $DNNLIB_CACHE_DIR, then a .cache/dnnlib folder in $HOME, in $USERPROFILE
    # (Windows) or in the temporary directory.
    if _cache_dir is not None:
        return _cache_dir
    if 'DNNLIB_CACHE_DIR' in os.environ:
        return os.environ['DNNLIB_CACHE_DIR']
    home = next((os.environ[var] for var in ('HOME', 'USERPROFILE') if var in os.environ), tempfile.gettempdir())
    return os.path.join(home, '.cache', 'dnnlib')

def make_cache_dir_path(*paths):
    """A path inside the cache root, e.g. make_cache_dir_path('downloads')."""
    return os.path.join(_cache_root(), *paths)

#----------------------------------------------------------------------------
# Human-readable durations, as in the training status line: the largest unit first, without padding, then the
# next smaller units zero-padded to two digits; 3 units in full ('1h 01m 01s'), 2 when brief ('1h 01m').

_UNITS = [('d', 86400, None), ('h', 3600, 24), ('m', 60, 60), ('s', 1, 60)]

def _format_duration(seconds, num_units):
    s = int(np.rint(seconds))
    if s < 60:
        return f'{s}s'
    first = next(i for i, (_, size, _) in enumerate(_UNITS) if s >= size)
    parts = []
    for i, (unit, size, modulus) in enumerate(_UNITS[first:first + num_units]):
        value = s // size if i == 0 else s // size % modulus
        parts.append(f'{value}{unit}' if i == 0 else f'{value:02}{unit}')
    return ' '.join(parts)

def format_time(seconds):
    """E.g. '59s', '2m 12s', '1h 01m 01s', '2d 03h 04m'."""
    return _format_duration(seconds, 3)

def format_time_brief(seconds):
    """E.g. '59s', '2m 12s', '1h 01m', '2d 03h'."""
    return _format_duration(seconds, 2)

#----------------------------------------------------------------------------
# Small helpers kept for EDM2 compatibility.

def tuple_product(t):
    result = 1
    for v in t:
        result *= v
    return result

_str_to_ctype = {
    'uint8': ctypes.c_ubyte, 'uint16': ctypes.c_uint16, 'uint32': ctypes.c_uint32, 'uint64': ctypes.c_uint64,
    'int8': ctypes.c_byte, 'int16': ctypes.c_int16, 'int32': ctypes.c_int32, 'int64': ctypes.c_int64,
    'float32': ctypes.c_float, 'float64': ctypes.c_double,
}

def get_dtype_and_ctype(type_obj):
    """Map a numpy dtype, a dtype name or a ctypes type to (numpy dtype, ctypes type)."""
    if isinstance(type_obj, str):
        name = type_obj
    elif hasattr(type_obj, '__name__') and type_obj.__name__ in _str_to_ctype:
        name = type_obj.__name__
    elif hasattr(type_obj, 'name'):
        name = type_obj.name
    else:
        name = np.dtype(type_obj).name
    if name not in _str_to_ctype:
        raise ValueError(f'Unsupported type: {type_obj}')
    dtype = np.dtype(name)
    ctype = _str_to_ctype[name]
    assert dtype.itemsize == ctypes.sizeof(ctype)
    return dtype, ctype

def is_pickleable(obj):
    try:
        with io.BytesIO() as stream:
            pickle.dump(obj, stream)
        return True
    except Exception:
        return False

#----------------------------------------------------------------------------
# Construct objects and call functions by their dotted names, as EDM2 configs store them.

def get_module_from_obj_name(obj_name):
    """Split 'a.b.c.D' into (module, 'attr path'), trying the longest importable module prefix first."""
    obj_name = re.sub('^np.', 'numpy.', obj_name)
    obj_name = re.sub('^tf.', 'tensorflow.', obj_name)
    parts = obj_name.split('.')
    candidates = [('.'.join(parts[:i]), '.'.join(parts[i:])) for i in range(len(parts), 0, -1)]
    for module_name, local_name in candidates:
        try:
            module = importlib.import_module(module_name)
            get_obj_from_module(module, local_name)
            return module, local_name
        except Exception:
            pass
    # The name was not found: re-raise the error of a module that exists but fails to import.
    for module_name, _local_name in candidates:
        try:
            importlib.import_module(module_name)
        except ImportError as e:
            if not str(e).startswith("No module named '" + module_name.split('.')[0]):
                raise
    raise ImportError(obj_name)

def get_obj_from_module(module, obj_name):
    if obj_name == '':
        return module
    obj = module
    for part in obj_name.split('.'):
        obj = getattr(obj, part)
    return obj

def get_obj_by_name(name):
    module, obj_name = get_module_from_obj_name(name)
    return get_obj_from_module(module, obj_name)

def call_func_by_name(*args, func_name=None, **kwargs):
    assert func_name is not None
    func_obj = func_name if callable(func_name) else get_obj_by_name(func_name)
    assert callable(func_obj)
    return func_obj(*args, **kwargs)

def construct_class_by_name(*args, class_name=None, **kwargs):
    return call_func_by_name(*args, func_name=class_name, **kwargs)

def get_module_dir_by_obj_name(obj_name):
    module, _ = get_module_from_obj_name(obj_name)
    return os.path.dirname(inspect.getfile(module))

def is_top_level_function(obj):
    return callable(obj) and obj.__name__ in sys.modules[obj.__module__].__dict__

def get_top_level_function_name(obj):
    assert is_top_level_function(obj)
    module = obj.__module__
    if module == '__main__':
        module = os.path.splitext(os.path.basename(sys.modules[module].__file__))[0]
    return module + '.' + obj.__name__

#----------------------------------------------------------------------------
# File-system helpers.

def list_dir_recursively_with_ignore(dir_path, ignores=None, add_base_to_relative=False):
    """Return [(absolute path, relative path)] of files under dir_path, skipping names matching `ignores`."""
    assert os.path.isdir(dir_path)
    base_name = os.path.basename(os.path.normpath(dir_path))
    ignores = ignores or []
    result = []
    for root, dirs, files in os.walk(dir_path, topdown=True):
        for pattern in ignores:
            dirs[:] = [d for d in dirs if not fnmatch.fnmatch(d, pattern)]
            files = [f for f in files if not fnmatch.fnmatch(f, pattern)]
        for f in files:
            absolute = os.path.join(root, f)
            relative = os.path.relpath(absolute, dir_path)
            if add_base_to_relative:
                relative = os.path.join(base_name, relative)
            result.append((absolute, relative))
    return result

def copy_files_and_create_dirs(files):
    for src, dst in files:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(src, dst)

#----------------------------------------------------------------------------
# URLs and local files.

def is_url(obj, allow_file_urls=False):
    if not isinstance(obj, str) or '://' not in obj:
        return False
    if allow_file_urls and obj.startswith('file://'):
        return True
    try:
        res = urllib.parse.urlparse(obj)
        if not res.scheme or not res.netloc or '.' not in res.netloc:
            return False
        res = urllib.parse.urlparse(urllib.parse.urljoin(obj, '/'))
        return bool(res.scheme and res.netloc and '.' in res.netloc)
    except Exception:
        return False

def open_url(url, cache_dir=None, num_attempts=10, verbose=True, return_filename=False, cache=True):
    """Open a local path, a file:// URL or an HTTP(S) URL (downloaded once into the cache) for binary reading."""
    assert num_attempts >= 1
    if not re.match('^[a-z]+://', url):
        return url if return_filename else open(url, 'rb')
    if url.startswith('file://'):
        filename = urllib.parse.urlparse(url).path
        if re.match(r'^/[a-zA-Z]:', filename):
            filename = filename[1:]
        return filename if return_filename else open(filename, 'rb')
    assert is_url(url)

    if cache_dir is None:
        cache_dir = make_cache_dir_path('downloads')
    url_md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
    if cache:
        cache_files = [f for f in (os.listdir(cache_dir) if os.path.isdir(cache_dir) else []) if f.startswith(url_md5 + '_')]
        if len(cache_files) == 1:
            filename = os.path.join(cache_dir, cache_files[0])
            return filename if return_filename else open(filename, 'rb')

    import requests  # only needed for downloads
    url_name, url_data = None, None
    with requests.Session() as session:
        if verbose:
            print(f'Downloading {url} ...', end='', flush=True)
        for attempts_left in reversed(range(num_attempts)):
            try:
                with session.get(url, timeout=60) as res:
                    res.raise_for_status()
                    if len(res.content) == 0:
                        raise IOError('No data received')
                    url_data = res.content
                    disposition = res.headers.get('Content-Disposition', '')
                    match = re.search(r'filename="([^"]*)"', disposition)
                    url_name = match[1] if match else url
                    if verbose:
                        print(' done')
                    break
            except KeyboardInterrupt:
                raise
            except Exception:
                if not attempts_left:
                    if verbose:
                        print(' failed')
                    raise
                if verbose:
                    print('.', end='', flush=True)

    if cache:
        safe_name = re.sub(r'[^0-9a-zA-Z-._]', '_', url_name)[:128]
        cache_file = os.path.join(cache_dir, url_md5 + '_' + safe_name)
        with atomic_write(cache_file) as f:
            f.write(url_data)
        if return_filename:
            return cache_file
    assert not return_filename
    return io.BytesIO(url_data)
