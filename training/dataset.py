"""Datasets of images (PNG etc.) or VAE latents (.npy) in a folder or zip, with EDM2's semantics (spec §6.1).

Every error about the data is an OSError (the dataset cannot be read) or a ValueError (its content is wrong) whose
one-line message starts with the file it is about, e.g. `datasets/x.zip/00000/img00000003.png: cannot decode image
(...)`, so that tools can show it as is (`--data: <message>`).
"""

import json
import os
import zipfile

import numpy as np
import PIL.Image
import torch

import dnnlib

try:
    import pyspng # Optional, faster PNG decoding.
except ImportError:
    pyspng = None

#----------------------------------------------------------------------------
# Base class: index bookkeeping (subset, x-flips), labels and properties. Subclasses provide the raw images.

class Dataset(torch.utils.data.Dataset):
    def __init__(self,
        name,                   # Name of the dataset.
        raw_shape,              # Shape of the raw image data (NCHW).
        use_labels  = True,     # Enable conditioning labels? False = label dimension is zero.
        max_size    = None,     # Artificially limit the size of the dataset. None = no limit.
        xflip       = False,    # Artificially double the size of the dataset via x-flips.
        random_seed = 0,        # Random seed to use when applying max_size.
        cache       = False,    # Keep decoded images in memory?
    ):
        self._name = name
        self._raw_shape = list(raw_shape)
        self._use_labels = use_labels
        self._cache = cache
        self._cached_images = dict() # raw_idx -> np.ndarray
        self._raw_labels = None
        self._label_shape = None

        # Subset: a seeded shuffle picks which raw items to keep; they stay in their original order (spec §6.1).
        self._raw_idx = np.arange(self._raw_shape[0], dtype=np.int64)
        if max_size is not None and self._raw_idx.size > max_size:
            np.random.RandomState(random_seed % (1 << 31)).shuffle(self._raw_idx)
            self._raw_idx = np.sort(self._raw_idx[:max_size])

        # X-flips: the index list is repeated, the second copy flipped.
        self._xflip = np.zeros(self._raw_idx.size, dtype=np.uint8)
        if xflip:
            self._raw_idx = np.tile(self._raw_idx, 2)
            self._xflip = np.concatenate([self._xflip, np.ones_like(self._xflip)])

    def _get_raw_labels(self):
        if self._raw_labels is None:
            self._raw_labels = self._load_raw_labels() if self._use_labels else None
            if self._raw_labels is None:
                self._raw_labels = np.zeros([self._raw_shape[0], 0], dtype=np.float32)
            assert isinstance(self._raw_labels, np.ndarray)
            assert self._raw_labels.shape[0] == self._raw_shape[0]
            assert self._raw_labels.dtype in [np.float32, np.int64]
            if self._raw_labels.dtype == np.int64:
                assert self._raw_labels.ndim == 1
                assert np.all(self._raw_labels >= 0)
        return self._raw_labels

    def close(self): # to be overridden by subclass
        pass

    def _load_raw_image(self, raw_idx): # to be overridden by subclass
        raise NotImplementedError

    def _load_raw_labels(self): # to be overridden by subclass
        raise NotImplementedError

    def _describe_item(self, raw_idx): # to be overridden by subclass: names the item in error messages
        return f'{self._name}[{raw_idx}]'

    def __getstate__(self):
        return dict(self.__dict__, _raw_labels=None)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __len__(self):
        return self._raw_idx.size

    def __getitem__(self, idx):
        raw_idx = self._raw_idx[idx]
        image = self._cached_images.get(raw_idx, None)
        if image is None:
            image = self._load_raw_image(raw_idx)
            self._check_image(raw_idx, image)
            if self._cache:
                self._cached_images[raw_idx] = image
        if self._xflip[idx]:
            assert image.ndim == 3 # CHW
            image = image[:, :, ::-1]
        return image.copy(), self.get_label(idx)

    def _check_image(self, raw_idx, image):
        if list(image.shape) != self._raw_shape[1:]:
            raise ValueError(f'{self._describe_item(raw_idx)}: image shape {list(image.shape)} differs from the '
                             f'dataset\'s {self._raw_shape[1:]} (taken from the first image)')

    def get_label(self, idx):
        label = self._get_raw_labels()[self._raw_idx[idx]]
        if label.dtype == np.int64:
            onehot = np.zeros(self.label_shape, dtype=np.float32)
            onehot[label] = 1
            label = onehot
        return label.copy()

    def get_details(self, idx):
        d = dnnlib.EasyDict()
        d.raw_idx = int(self._raw_idx[idx])
        d.xflip = (int(self._xflip[idx]) != 0)
        d.raw_label = self._get_raw_labels()[d.raw_idx].copy()
        return d

    @property
    def name(self):
        return self._name

    @property
    def image_shape(self): # [CHW]
        return list(self._raw_shape[1:])

    @property
    def num_channels(self):
        assert len(self.image_shape) == 3 # CHW
        return self.image_shape[0]

    @property
    def resolution(self):
        assert len(self.image_shape) == 3 # CHW
        assert self.image_shape[1] == self.image_shape[2]
        return self.image_shape[1]

    @property
    def label_shape(self):
        if self._label_shape is None:
            raw_labels = self._get_raw_labels()
            if raw_labels.dtype == np.int64:
                self._label_shape = [int(np.max(raw_labels)) + 1] if raw_labels.size else [0]
            else:
                self._label_shape = list(raw_labels.shape[1:])
        return list(self._label_shape)

    @property
    def label_dim(self):
        assert len(self.label_shape) == 1
        return self.label_shape[0]

    @property
    def has_labels(self):
        return any(x != 0 for x in self.label_shape)

    @property
    def has_onehot_labels(self):
        return self._get_raw_labels().dtype == np.int64

#----------------------------------------------------------------------------
# Images (any Pillow format) or latents (.npy) in a folder or a zip archive, labels in `dataset.json`.

def _file_ext(name):
    return os.path.splitext(name)[1].lower()

class ImageFolderDataset(Dataset):
    def __init__(self,
        path,                   # Path to directory or zip.
        resolution      = None, # Ensure specific resolution, None = anything goes.
        **super_kwargs,         # Additional arguments for the Dataset base class.
    ):
        self._path = path
        self._zipfile = None
        self._zipfile_pid = None

        if os.path.isdir(self._path):
            self._type = 'dir'
            self._all_fnames = {os.path.relpath(os.path.join(root, fname), start=self._path)
                                for root, _dirs, files in os.walk(self._path) for fname in files}
        elif _file_ext(self._path) == '.zip' and os.path.isfile(self._path):
            self._type = 'zip'
            self._all_fnames = set(self._get_zipfile().namelist())
        elif not os.path.exists(self._path):
            raise IOError(f'{self._path}: no such file or directory (Path must point to a directory or zip)')
        else:
            raise IOError(f'{self._path}: Path must point to a directory or zip')

        PIL.Image.init()
        supported_ext = set(PIL.Image.EXTENSION.keys()) | {'.npy'}
        self._image_fnames = sorted(fname for fname in self._all_fnames if _file_ext(fname) in supported_ext)
        if len(self._image_fnames) == 0:
            raise IOError(f'{self._path}: No image files found in the specified path')

        name = os.path.splitext(os.path.basename(os.path.normpath(self._path)))[0]
        first = self._load_raw_image(0)
        raw_shape = [len(self._image_fnames)] + list(first.shape)
        self._first_dtype = first.dtype
        if resolution is not None and (raw_shape[2] != resolution or raw_shape[3] != resolution):
            raise IOError(f'{self._path}: Image files do not match the specified resolution '
                          f'({raw_shape[3]}x{raw_shape[2]} instead of {resolution}x{resolution})')
        super().__init__(name=name, raw_shape=raw_shape, **super_kwargs)

    def _get_zipfile(self):
        assert self._type == 'zip'
        # A handle inherited from another process (forked data-loader workers) shares its file offset with the
        # parent: reopen instead.
        if self._zipfile is None or self._zipfile_pid != os.getpid():
            try:
                self._zipfile = zipfile.ZipFile(self._path)
            except (OSError, zipfile.BadZipFile) as e:
                raise IOError(f'{self._path}: cannot read zip archive ({e})') from None
            self._zipfile_pid = os.getpid()
        return self._zipfile

    def _open_file(self, fname):
        if self._type == 'dir':
            return open(os.path.join(self._path, fname), 'rb')
        if self._type == 'zip':
            return self._get_zipfile().open(fname, 'r')
        return None

    def _describe_item(self, raw_idx):
        return self._describe_file(self._image_fnames[raw_idx])

    def _describe_file(self, fname):
        return os.path.join(self._path, fname.replace('/', os.sep))

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
        ext = _file_ext(fname)
        try:
            with self._open_file(fname) as f:
                if ext == '.npy':
                    image = np.load(f)
                    image = image.reshape(-1, *image.shape[-2:]) # [C,H,W] latents stay as they are.
                elif ext == '.png' and pyspng is not None:
                    image = pyspng.load(f.read())
                    image = image.reshape(*image.shape[:2], -1).transpose(2, 0, 1) # HW(C) => CHW
                else:
                    image = np.array(PIL.Image.open(f))
                    image = image.reshape(*image.shape[:2], -1).transpose(2, 0, 1) # HW(C) => CHW
        except Exception as e: # Any decoder failure means a corrupt or unreadable file.
            raise IOError(f'{self._describe_file(fname)}: cannot decode image ({type(e).__name__}: {e})') from None
        if raw_idx != 0 and image.dtype != self._first_dtype:
            raise ValueError(f'{self._describe_file(fname)}: pixel type {image.dtype} differs from the dataset\'s '
                             f'{self._first_dtype} (taken from the first image)')
        return image

    def _load_raw_labels(self):
        # dataset.json: {"labels": null} or {"labels": [["00000/img00000000.png", 6], ...]} (spec §6.1).
        fname = 'dataset.json'
        if fname not in self._all_fnames:
            return None
        where = self._describe_file(fname)
        try:
            with self._open_file(fname) as f:
                labels = json.load(f)['labels']
            if labels is None:
                return None
            labels = dict(labels)
        except Exception as e:
            raise ValueError(f'{where}: not a valid dataset.json ({type(e).__name__}: {e})') from None
        values = []
        for fname in self._image_fnames:
            key = fname.replace('\\', '/')
            if key not in labels:
                raise ValueError(f'{where}: no label for {key}')
            values.append(labels[key])
        try:
            values = np.array(values)
            if values.ndim not in (1, 2) or values.dtype.kind not in 'iuf' or (values.ndim == 1 and values.dtype.kind == 'f'):
                raise ValueError(f'labels must be class indices or vectors of numbers, got {values.dtype} of shape {list(values.shape)}')
            if values.ndim == 1 and values.size and values.min() < 0:
                raise ValueError('class indices must not be negative')
        except Exception as e:
            raise ValueError(f'{where}: invalid labels ({e})') from None
        return values.astype({1: np.int64, 2: np.float32}[values.ndim])

#----------------------------------------------------------------------------
