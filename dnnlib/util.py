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
#
# What lies in the cache is run: NVIDIA's Inception pickle and torch.hub's DINOv2 code are loaded from there without
# a question. So the cache must be private to the user: a folder that another user can write (or owns) is refused,
# and so is a path through a world-writable folder without the sticky bit (where another user could swap folders).

_cache_dir = None

class UnsafeCacheError(PermissionError):
    """The cache folder could be written by another user; the message is one line naming it and the remedy."""

def set_cache_dir(path):
    """Use `path` as the cache root from now on (None: back to the environment's choice)."""
    global _cache_dir
    _cache_dir = path

def _cache_root():
    # The first of: set_cache_dir(), $DNNLIB_CACHE_DIR, then .cache/dnnlib in $HOME, in $USERPROFILE (Windows) or in
    # the home folder of the password database; without any home, a folder of this user's own in the temporary
    # directory (never the shared temporary directory itself).
    if _cache_dir is not None:
        return _cache_dir
    if 'DNNLIB_CACHE_DIR' in os.environ:
        return os.environ['DNNLIB_CACHE_DIR']
    home = next((os.environ[var] for var in ('HOME', 'USERPROFILE') if os.environ.get(var)), None)
    if home is None:
        home = os.path.expanduser('~')  # POSIX: the password database's entry when HOME is unset
        if home == '~' or not os.path.isdir(home):
            user = os.getuid() if hasattr(os, 'getuid') else os.environ.get('USERNAME', 'user')
            return os.path.join(tempfile.gettempdir(), f'dnnlib-cache-{user}')
    return os.path.join(home, '.cache', 'dnnlib')

def _unsafe_reason(st, own):
    """Why a folder with stat result `st` is unsafe to trust, or None. `own`: a cache folder itself (must be ours and
    writable by us alone); else one of its ancestors (must not let other users rename what lies in it)."""
    import stat  # pylint: disable=import-outside-toplevel
    if own and st.st_uid != os.getuid():
        return f'it belongs to another user (uid {st.st_uid})'
    if own and st.st_mode & 0o022:
        return f'other users can write to it (mode {st.st_mode & 0o777:o})'
    if not own and st.st_mode & 0o002 and not st.st_mode & stat.S_ISVTX:
        return f'any user can write to it (mode {st.st_mode & 0o777:o}, no sticky bit)'
    return None

def check_private_dir(path, root=None):
    """Raise UnsafeCacheError unless every existing folder from `root` down to `path` belongs to this user and only
    this user can write to it, and no folder above `root` is world-writable without the sticky bit. Folders that do
    not exist yet are fine (make_private_dirs makes them). No-op where the OS has no user ids (Windows)."""
    if not hasattr(os, 'getuid'):
        return
    path = os.path.abspath(path)
    root = os.path.abspath(root) if root is not None else path
    folder = path
    while True:
        own = folder == root or folder.startswith(root.rstrip(os.sep) + os.sep)
        try:
            st = os.stat(folder)
        except FileNotFoundError:
            st = None
        if st is not None:
            reason = _unsafe_reason(st, own)
            if reason is not None:
                raise UnsafeCacheError(f'{folder}: refusing to use the download cache {root}: {reason}, and files '
                                       f'in the cache are loaded as code; make it yours alone (chmod go-w), or set '
                                       f'DNNLIB_CACHE_DIR to a folder of your own')
        parent = os.path.dirname(folder)
        if parent == folder:
            return
        folder = parent

def make_private_dirs(path):
    """Create `path` and its missing parents readable and writable by this user only (whatever the umask)."""
    missing = []
    folder = os.path.abspath(path)
    while not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, 0o700)
            os.chmod(folder, 0o700)

def make_cache_dir_path(*paths, create=False):
    """A path inside the cache root, e.g. make_cache_dir_path('downloads'), after checking that the cache is private
    to this user (UnsafeCacheError otherwise). `create` makes the folder, private, if it is missing."""
    root = _cache_root()
    path = os.path.join(root, *paths)
    if create:
        check_private_dir(path, root)  # before anything is made inside a folder that is not ours
        make_private_dirs(path)
    check_private_dir(path, root)
    return path

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

_MODULE_ALIASES = {'np': 'numpy', 'tf': 'tensorflow'}  # short names that configs of the TensorFlow era used

def get_module_from_obj_name(obj_name):
    """Split 'a.b.c.D' into (module, 'attr path'), preferring the longest importable module prefix.

    A prefix whose import fails because the module itself is absent just means a shorter prefix is meant; an import
    that fails inside an existing module (a missing dependency of it) is the real error and is raised."""
    head, *rest = obj_name.split('.')
    parts = [_MODULE_ALIASES.get(head, head)] + rest
    broken = None
    for cut in reversed(range(1, len(parts) + 1)):
        module_name, attr_path = '.'.join(parts[:cut]), '.'.join(parts[cut:])
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            absent = e.name is not None and (module_name + '.').startswith(e.name + '.')
            broken = broken if absent else (broken or e)
            continue
        with contextlib.suppress(AttributeError):
            get_obj_from_module(module, attr_path)
            return module, attr_path
    if broken is not None:
        raise broken
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

def _local_file(url):
    """The file a plain path or a file:// URL names, or None for a URL that must be downloaded."""
    if not re.match('[a-z]+://', url):
        return url
    if not url.startswith('file://'):
        return None
    path = urllib.parse.urlparse(url).path
    return path[1:] if re.match('/[a-zA-Z]:', path) else path  # file:///C:/x -> C:/x on Windows

def _cache_entry(cache_dir, key):
    """The one file kept in `cache_dir` for a URL whose hash is `key`, or None."""
    names = os.listdir(cache_dir) if os.path.isdir(cache_dir) else []
    hits = [name for name in names if name.startswith(key + '_')]
    return os.path.join(cache_dir, hits[0]) if len(hits) == 1 else None

def open_url(url, cache_dir=None, num_attempts=10, verbose=True, return_filename=False, cache=True):
    """Open a local path, a file:// URL or an HTTP(S) URL (downloaded once into the cache) for binary reading."""
    assert num_attempts >= 1
    local = _local_file(url)
    if local is None:
        assert is_url(url)
        if cache_dir is None:
            cache_dir = make_cache_dir_path('downloads', create=cache)
        else:
            check_private_dir(cache_dir)
            if cache:
                make_private_dirs(cache_dir)
        key = hashlib.md5(url.encode('utf-8')).hexdigest()
        local = _cache_entry(cache_dir, key) if cache else None
    if local is not None:
        return local if return_filename else open(local, 'rb')

    name, data = _download(url, num_attempts, verbose)
    if not cache:
        assert not return_filename
        return io.BytesIO(data)
    stored = os.path.join(cache_dir, key + '_' + re.sub(r'[^0-9a-zA-Z-._]', '_', name)[:128])
    with atomic_write(stored) as f:
        f.write(data)
    return stored if return_filename else io.BytesIO(data)

def _download(url, num_attempts, verbose):
    """(file name the server gives, or the URL; the bytes), trying up to num_attempts times."""
    import requests  # only needed for downloads
    say = (lambda text: print(text, end='', flush=True)) if verbose else (lambda text: None)
    say(f'Downloading {url} ...')
    with requests.Session() as session:
        for attempt in range(1, num_attempts + 1):
            try:
                with session.get(url, timeout=60) as res:
                    res.raise_for_status()
                    if not res.content:
                        raise IOError('No data received')
                    named = re.search(r'filename="([^"]*)"', res.headers.get('Content-Disposition', ''))
                    say(' done\n')
                    return (named[1] if named else url), res.content
            except Exception:  # KeyboardInterrupt is not an Exception: it ends the download at once
                if attempt == num_attempts:
                    say(' failed\n')
                    raise
                say('.')

def file_digest(path_or_url, algorithm='sha1'):
    """Hex digest (hashlib's `algorithm`) of the bytes of a file or URL (opened with open_url, so a URL is read
    from the download cache), read in blocks so that a large network file is never held in memory whole."""
    digest = hashlib.new(algorithm)
    with open_url(path_or_url, verbose=False) as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()
