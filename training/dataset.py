"""Datasets of images (PNG etc.) or VAE latents (.npy) in a folder or zip, with labels from `dataset.json`.

The format is EDM2's: image files sorted by relative name, labels in a root file dataset.json as
`{"labels": [["00000/img00000000.png", 6], ...]}` or `{"labels": null}`. Beyond EDM2, dataset.json may say
`"num_classes": N`; every class label must then be below N and the one-hot vectors have length N.

Every error about the data is an OSError (the dataset cannot be read) or a ValueError (its content is wrong) whose
one-line message starts with the file it is about, e.g. `datasets/x.zip/00000/img00000003.png: cannot decode image
(...)`, so that tools can show it as is (`--data: <message>`).
"""

import io
import json
import os
import zipfile

import numpy as np
import PIL.Image
import torch

import dnnlib

def _optional_pyspng():
    # pyspng decodes PNGs faster than Pillow, to the same pixels; use it when it is installed.
    try:
        import pyspng  # pylint: disable=import-outside-toplevel
    except ImportError:
        return None
    return pyspng

_pyspng = _optional_pyspng()

#----------------------------------------------------------------------------
# Which raw items a dataset shows, in which order, and which of them mirrored.

def select_items(num_raw, max_size=None, xflip=False, random_seed=0):
    """(raw index per item, x-flip flag per item).

    A subset of `max_size` items is a seeded random choice that keeps the files' order: the first `max_size` of a
    permutation drawn by RandomState(random_seed mod 2^31), sorted. `xflip` appends a mirrored copy of every item.
    """
    raw_idx = np.arange(num_raw, dtype=np.int64)
    if max_size is not None and max_size < num_raw:
        permutation = np.random.RandomState(random_seed % (1 << 31)).permutation(num_raw)
        raw_idx = np.sort(permutation[:max_size]).astype(np.int64)
    copies = 2 if xflip else 1
    flags = np.repeat(np.arange(copies, dtype=np.uint8), raw_idx.size)
    return np.tile(raw_idx, copies), flags

#----------------------------------------------------------------------------
# Base class: items, labels and properties on top of a subclass's raw images. A subclass provides
# `_load_raw_image(raw_idx)` -> CHW ndarray and `_load_raw_labels()` -> int64 [N] / float32 [N, D] / None, and may
# override `_describe_item(raw_idx)` (how errors name an item) and `close()`.

class Dataset(torch.utils.data.Dataset):
    def __init__(self, name, raw_shape, use_labels=True, max_size=None, xflip=False, random_seed=0, cache=False):
        self._name = name
        self._raw_shape = list(raw_shape)           # [N, C, H, W]; C, H, W taken from the first image.
        self._use_labels = use_labels
        self._image_cache = {} if cache else None    # raw index -> decoded image
        self._raw_labels = None                     # Loaded on first use ...
        self._label_shape = None                    # ... together with this.
        self._num_classes = None                    # One-hot length of class labels, if the dataset states it.
        self._raw_idx, self._xflip = select_items(self._raw_shape[0], max_size, xflip, random_seed)

    def _load_raw_image(self, raw_idx):
        raise NotImplementedError(f'{type(self).__name__} does not read images')

    def _load_raw_labels(self):
        return None

    def _describe_item(self, raw_idx):
        return f'{self._name}[{raw_idx}]'

    def close(self):
        """Release open files; the dataset reopens them when used again."""

    def __del__(self):
        try:
            self.close()
        except Exception:  # pylint: disable=broad-except
            pass

    def __getstate__(self):
        return dict(self.__dict__, _raw_labels=None, _label_shape=None)

    def _labels(self):
        if self._raw_labels is None:
            labels = self._load_raw_labels() if self._use_labels else None
            if labels is None:
                labels = np.zeros([self._raw_shape[0], 0], dtype=np.float32)
            if labels.ndim == 2:
                self._label_shape = list(labels.shape[1:])
            else:  # Class labels: one-hot vectors, as long as the stated class count or the largest label + 1.
                self._label_shape = [self._num_classes if self._num_classes is not None else int(labels.max(initial=-1)) + 1]
            self._raw_labels = labels
        return self._raw_labels

    def _image(self, raw_idx):
        image = None if self._image_cache is None else self._image_cache.get(raw_idx)
        if image is None:
            image = self._load_raw_image(raw_idx)
            if list(image.shape) != self._raw_shape[1:]:
                raise ValueError(f'{self._describe_item(raw_idx)}: image shape {list(image.shape)} differs from the '
                                 f'dataset\'s {self._raw_shape[1:]} (taken from the first image)')
            if self._image_cache is not None:
                self._image_cache[raw_idx] = image
        return image

    def __len__(self):
        return len(self._raw_idx)

    def __getitem__(self, idx):
        image = self._image(int(self._raw_idx[idx]))
        if self._xflip[idx]:
            image = np.flip(image, axis=2)  # CHW: mirror the width axis.
        return image.copy(), self.get_label(idx)

    def get_label(self, idx):
        """float32 label vector of item `idx`: one-hot for class labels, the stored vector otherwise."""
        raw = self._labels()[self._raw_idx[idx]]
        if raw.ndim == 0:
            return (np.arange(self.label_dim) == raw).astype(np.float32)
        return np.array(raw, dtype=np.float32)

    def get_details(self, idx):
        raw_idx = int(self._raw_idx[idx])
        return dnnlib.EasyDict(raw_idx=raw_idx, xflip=bool(self._xflip[idx]), raw_label=self._labels()[raw_idx].copy())

    @property
    def name(self):
        return self._name

    @property
    def image_shape(self):
        """[C, H, W] of every item."""
        return self._raw_shape[1:]

    @property
    def num_channels(self):
        return self.image_shape[0]

    @property
    def resolution(self):
        _, height, width = self.image_shape
        if height != width:
            raise ValueError(f'{self._name}: images are {width}x{height}, not square')
        return height

    @property
    def has_onehot_labels(self):
        return self._labels().ndim == 1

    @property
    def label_shape(self):
        self._labels()
        return list(self._label_shape)

    @property
    def label_dim(self):
        (dim,) = self.label_shape
        return dim

    @property
    def has_labels(self):
        return self.label_dim != 0

#----------------------------------------------------------------------------
# Images (any Pillow format) or latents (.npy) in a folder or a zip archive, labels in `dataset.json`.

def _ext(fname):
    return os.path.splitext(fname)[1].lower()

def item_extensions():
    """The file name extensions a dataset reads as its items: every image format Pillow knows, and .npy (latents)."""
    PIL.Image.init()
    return set(PIL.Image.EXTENSION) | {'.npy'}

def is_dataset_file(fname):
    """Whether a file of this name in a dataset folder or zip is read as one of its items."""
    return _ext(fname) in item_extensions()

def to_uint8(array):
    """16-bit pixels -> 8 bits with their brightness: round(x * 255 / 65535), so that 8-bit values stored as 16
    bits (x * 257) come back exactly. 8-bit arrays pass through."""
    if array.dtype == np.uint8:
        return array
    if array.dtype in (np.uint16, np.dtype('>u2'), np.dtype('<u2')):
        return ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    raise ValueError(f'{array.dtype} pixels: only 8- and 16-bit images are read')

def pil_to_array(image):
    """A Pillow image -> uint8 HW or HWC array of what it shows: palette and bilevel images as their colours (not
    palette indices), 16-bit grey scaled to 8 bits (not clipped or wrapped); other deep formats are refused."""
    if image.mode in ('P', 'PA'):
        image = image.convert('RGBA' if image.mode == 'PA' or 'transparency' in image.info else 'RGB')
    elif image.mode in ('1', 'CMYK', 'YCbCr', 'LAB', 'HSV'):
        image = image.convert('L' if image.mode == '1' else 'RGB')
    elif image.mode.startswith('I;16') or (image.mode == 'I' and image.format == 'PNG'):
        return to_uint8(np.array(image).astype(np.uint16))  # a PNG's 16-bit grey (mode I in older Pillows)
    elif image.mode in ('I', 'F'):
        raise ValueError(f'{"32-bit integer" if image.mode == "I" else "floating-point"} pixels have no known '
                         'brightness scale; convert the image to 8 or 16 bits')
    return np.array(image)

def decode_array(fname, data):
    """The bytes of file `fname` -> CHW ndarray: latents as stored ([-1, H, W]), images HW(C) -> CHW uint8
    (pil_to_array: palette images as colours, 16-bit images scaled to 8 bits)."""
    if _ext(fname) == '.npy':
        array = np.load(io.BytesIO(data))
        return array.reshape(-1, *array.shape[-2:])
    if _ext(fname) == '.png' and _pyspng is not None:
        array = to_uint8(_pyspng.load(data))
    else:
        array = pil_to_array(PIL.Image.open(io.BytesIO(data)))
    if array.ndim == 2:  # Grey: one channel.
        array = array[:, :, np.newaxis]
    return array.transpose(2, 0, 1)

# The most classes (or label vector entries) a dataset may have: every training image carries a label vector of this
# length, and the network a label embedding as wide; 10**12 (a typo) would fail only deep inside training.
MAX_CLASSES = 1 << 20

def read_dataset_json(text, where):
    """dataset.json's bytes or text -> its parsed document; ValueError naming `where` if it is not JSON."""
    try:
        return json.loads(text)
    except Exception as e:  # pylint: disable=broad-except  (also bytes that are not UTF-8, or nesting too deep)
        raise ValueError(f'{where}: not a valid dataset.json ({type(e).__name__}: {e})') from None

def parse_labels(doc, keys, where):
    """dataset.json's parsed document -> (int64 [N] class labels, float32 [N, D] vectors, or None; stated class count
    or None).

    `keys` are the images' '/'-separated names. Every image needs a label; the labels are checked by check_labels.
    """
    try:
        mapping = doc['labels']
        mapping = dict(mapping) if mapping is not None else None
        num_classes = doc.get('num_classes')
    except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f'{where}: not a valid dataset.json ({type(e).__name__}: {e})') from None
    if mapping is None:
        return None, None
    missing = [key for key in keys if key not in mapping]
    if missing:
        more = f' (and {len(missing) - 1} more of {len(keys)} images)' if len(missing) > 1 else ''
        raise ValueError(f'{where}: no label for {missing[0]}{more}')
    return check_labels(keys, [mapping[key] for key in keys], where, num_classes)

def _finite32(number):
    try:
        return abs(float(number)) <= float(np.finfo(np.float32).max)  # False for NaN; huge ints overflow float()
    except OverflowError:
        return False

def check_labels(keys, values, where, num_classes=None):
    """The labels `values` of the images `keys` -> (int64 [N] class labels or float32 [N, D] vectors, num_classes).
    Class labels are integers 0..num_classes-1 (below MAX_CLASSES when no count is stated); vectors are lists of
    finite numbers, all of one length (1 to MAX_CLASSES); one kind for all images. ValueError naming `where` and the
    first image at fault otherwise. dataset_tool.py applies the same rules when it writes a dataset."""
    def invalid(key, value, rule):
        return ValueError(f'{where}: invalid labels (the label of {key} is {json.dumps(value)}; {rule})')

    is_index = [type(value) is int for value in values]  # pylint: disable=unidiomatic-typecheck  (bool is no label)
    if all(is_index):
        if num_classes is not None and (type(num_classes) is not int or not 0 < num_classes <= MAX_CLASSES):  # pylint: disable=unidiomatic-typecheck
            raise ValueError(f'{where}: num_classes must be a positive integer up to {MAX_CLASSES}, got '
                             f'{json.dumps(num_classes)}')
        for key, value in zip(keys, values):
            if value < 0:
                raise invalid(key, value, 'class labels must not be negative')
            if num_classes is not None and value >= num_classes:
                raise invalid(key, value, f'class labels must be 0..{num_classes - 1}')
            if value >= MAX_CLASSES:
                raise invalid(key, value, f'not a usable class label: training takes at most {MAX_CLASSES} classes')
        return np.array(values, dtype=np.int64), num_classes

    rule = 'labels must be class indices or vectors of numbers'
    if is_index[0]:  # Class labels, as the first one is: name the first that is not.
        bad = is_index.index(False)
        raise invalid(keys[bad], values[bad], rule)
    # Otherwise: vectors of finite numbers, all of one length.
    width = len(values[0]) if isinstance(values[0], list) else None
    for key, value in zip(keys, values):
        if not isinstance(value, list) or not all(type(v) in (int, float) for v in value):  # pylint: disable=unidiomatic-typecheck
            raise invalid(key, value, rule)
        if len(value) != width:
            raise invalid(key, value, rule + f' of one length ({width})')
        if not 0 < width <= MAX_CLASSES:
            raise invalid(key, value, f'label vectors must have 1 to {MAX_CLASSES} entries')
        if not all(_finite32(v) for v in value):
            raise invalid(key, value, 'label vectors must hold finite single-precision numbers')
    return np.array(values).astype(np.float32), None

class ImageFolderDataset(Dataset):
    def __init__(self, path, resolution=None, **kwargs):
        # kwargs: use_labels, max_size, xflip, random_seed, cache (see Dataset).
        self._path = path
        self._zipfile = None
        self._zipfile_pid = None
        # What dataset.json says besides the labels, kept when it is read (not the parsed document: a large
        # dataset's label list is hundreds of megabytes of Python objects).
        self._json_read = False
        self._recorded_vae = None
        if os.path.isdir(path):
            self._type = 'dir'
            self._all_fnames = {os.path.relpath(os.path.join(root, fname), start=path)
                                for root, _dirs, files in os.walk(path) for fname in files}
        elif _ext(path) == '.zip' and os.path.isfile(path):
            self._type = 'zip'
            self._all_fnames = set(self._get_zipfile().namelist())
        elif not os.path.exists(path):
            raise IOError(f'{path}: no such file or directory (Path must point to a directory or zip)')
        else:
            raise IOError(f'{path}: Path must point to a directory or zip')

        readable = item_extensions()
        self._image_fnames = sorted(fname for fname in self._all_fnames if _ext(fname) in readable)
        if not self._image_fnames:
            raise IOError(f'{path}: No image files found in the specified path')

        first = self._load_raw_image(0)
        self._first_dtype = first.dtype
        channels, height, width = first.shape
        if resolution is not None and (height, width) != (resolution, resolution):
            raise IOError(f'{path}: Image files do not match the specified resolution '
                          f'({width}x{height} instead of {resolution}x{resolution})')
        name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
        super().__init__(name=name, raw_shape=[len(self._image_fnames), channels, height, width], **kwargs)

    def _get_zipfile(self):
        # A handle inherited from another process (forked data-loader workers) shares its file offset with the
        # parent: reopen instead.
        if self._zipfile is None or self._zipfile_pid != os.getpid():
            try:
                self._zipfile = zipfile.ZipFile(self._path)
            except (OSError, zipfile.BadZipFile) as e:
                raise IOError(f'{self._path}: cannot read zip archive ({e})') from None
            self._zipfile_pid = os.getpid()
        return self._zipfile

    def _read_bytes(self, fname):
        """Content of the file `fname` (relative to the dataset root)."""
        if self._type == 'zip':
            return self._get_zipfile().read(fname)
        with open(os.path.join(self._path, fname), 'rb') as f:
            return f.read()

    def _describe_file(self, fname):
        return os.path.join(self._path, fname.replace('/', os.sep))

    def _describe_item(self, raw_idx):
        return self._describe_file(self._image_fnames[raw_idx])

    def close(self):
        try:
            if self._zipfile is not None and self._zipfile_pid == os.getpid():
                self._zipfile.close()
        finally:
            self._zipfile = None

    def __getstate__(self):
        return dict(super().__getstate__(), _zipfile=None, _zipfile_pid=None)

    def _load_raw_image(self, raw_idx):
        fname = self._image_fnames[raw_idx]
        try:
            image = decode_array(fname, self._read_bytes(fname))
        except Exception as e:  # pylint: disable=broad-except  (any decoder failure: a corrupt or unreadable file)
            raise IOError(f'{self._describe_file(fname)}: cannot decode image ({type(e).__name__}: {e})') from None
        if raw_idx != 0 and image.dtype != self._first_dtype:
            raise ValueError(f'{self._describe_file(fname)}: pixel type {image.dtype} differs from the dataset\'s '
                             f'{self._first_dtype} (taken from the first image)')
        return image

    def _read_dataset_json(self):
        # dataset.json parsed (None when there is none). Labels and recorded_vae share one reading when the labels
        # are loaded first, as train_edm2plus.py does (decoding one item loads them).
        doc = None
        if 'dataset.json' in self._all_fnames:
            where = self._describe_file('dataset.json')
            try:
                text = self._read_bytes('dataset.json')
            except OSError as e:
                raise IOError(f'{where}: cannot read ({e})') from None
            doc = read_dataset_json(text, where)
        vae = doc.get('vae') if isinstance(doc, dict) else None
        self._recorded_vae = vae if isinstance(vae, str) else None
        self._json_read = True
        return doc

    def _load_raw_labels(self):
        if 'dataset.json' not in self._all_fnames:
            return None
        doc = self._read_dataset_json()
        keys = [fname.replace(os.sep, '/') for fname in self._image_fnames]
        labels, self._num_classes = parse_labels(doc, keys, self._describe_file('dataset.json'))
        return labels

    @property
    def recorded_vae(self):
        """The VAE that dataset.json names (its "vae" entry: a hub name or a folder, which dataset_tool.py encode
        writes for a latent dataset), or None; EDM2's reader ignores the key."""
        if not self._json_read:
            self._read_dataset_json()
        return self._recorded_vae
