"""Build datasets in EDM2's layout: `convert` images to PNGs, `encode` them to Stable Diffusion VAE
latents, `decode` latents back to PNGs.

Output layout (a zip, stored uncompressed, or a folder): `00000/img00000000.png`, `00000/img00000001.png`, ...
(the first five of the eight index digits name the sub-folder) and `dataset.json`, written last, holding
`{"labels": [["00000/img00000000.png", 6], ...]}` or `{"labels": null}`. The same input always gives a
byte-identical output. The output appears under its final name only when everything has been written.

Sources for `convert`:
  * a folder of images (searched recursively) or a zip of images. Labels come from a `dataset.json` at its root
    if it has labels; otherwise (no dataset.json, or `"labels": null`), when the images sit in two or more top-level
    sub-folders (like ImageNet's `train/n01440764/...`), the label is the index of the sub-folder name in sorted
    order; otherwise none. dataset.json labels are checked first: class indices (integers, 0 or more, below
    --num-classes when given) or lists of numbers, for every image or none.
  * MNIST-format IDX files (MNIST, Fashion-MNIST): name the image file, e.g.
    `--source=/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz`; the labels are read from the file
    next to it with `images-idx3` replaced by `labels-idx1`. Naming the folder instead takes its training split
    (`train-images-idx3-ubyte[.gz]`), or its only IDX image file.

Examples:
  python dataset_tool.py convert --source=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz \\
      --dest=datasets/fashion-mnist-32.zip --resolution=32x32
  python dataset_tool.py convert --source=downloads/imagenet/ILSVRC/Data/CLS-LOC/train \\
      --dest=datasets/img64.zip --resolution=64x64 --transform=center-crop-dhariwal
"""

import contextlib
import functools
import gzip
import io
import json
import os
import re
import shutil
import time
import uuid
import zipfile
import zlib

import click
import numpy as np
import PIL.Image
from tqdm import tqdm

import dnnlib
from torch_utils import cli

#----------------------------------------------------------------------------
# Errors of the library functions: one line naming the file or option at fault. The CLI shows them as
# `Error: <message>`.

class DatasetToolError(Exception):
    pass

#----------------------------------------------------------------------------
# Input images. Every source yields InputImage records in a fixed (sorted) order.

class InputImage:
    def __init__(self, name, image, label):
        self.name = name        # Name for error messages (archive-relative path or `<file>[index]`).
        self.image = image      # np.ndarray: uint8 [H,W,3] RGB, or the array of a latent .npy file.
        self.label = label      # int, list of numbers, or None.

class Source:
    """An ordered list of inputs: `len()` gives their count, `read(i)` the i-th InputImage."""
    def __init__(self, names, read_fn, labels, label_origin):
        self.names = names                 # Input names, in order, already cut to --max-images.
        self.labels = labels               # One label (or None) per input.
        self.label_origin = label_origin   # Where the labels came from, for the summary line.
        self._read_fn = read_fn            # i -> np.ndarray.

    def __len__(self):
        return len(self.names)

    def read(self, i):
        return InputImage(self.names[i], self._read_fn(i), self.labels[i])

def _file_ext(name):
    return os.path.splitext(name)[1].lower()

@functools.lru_cache(maxsize=None)
def _image_extensions():
    PIL.Image.init()
    return frozenset(PIL.Image.EXTENSION.keys())

def _decode_image(f, where):
    """Read an image file object with Pillow and return it as uint8 RGB [H,W,3] (grey and palette images too;
    16-bit images scaled to 8 bits with their brightness, as training reads them)."""
    try:
        with PIL.Image.open(f) as img:
            if img.mode.startswith('I') or img.mode == 'F':  # deeper than 8 bits: Pillow's convert() would clip
                from training.dataset import pil_to_array # pylint: disable=import-outside-toplevel
                return np.repeat(pil_to_array(img)[:, :, np.newaxis], 3, axis=2)
            return np.array(img.convert('RGB'))
    except Exception as e: # Any decoder failure means a corrupt or unreadable file.
        raise DatasetToolError(f'{where}: cannot read image ({type(e).__name__}: {e})') from None

def _read_dataset_json(data, where):
    """The dataset.json of the source `where` (its bytes, or None when it has none) parsed once, for everything taken
    from it: a dict whose "labels" are made a {name: label} dict (or stay None), or None when there is no file.
    Refused as a whole when it is not JSON, has no "labels", or its labels are not [[name, label], ...]."""
    if data is None:
        return None
    try:
        doc = json.loads(data)
        if doc['labels'] is not None:
            doc['labels'] = dict(doc['labels'])
    except Exception as e:
        raise DatasetToolError(f'{where}/dataset.json: not a valid dataset.json ({type(e).__name__}: {e})') from None
    return doc

def _labels_for(names, dataset_json, where, num_classes=None):
    """Labels of the inputs `names` (archive-relative, `/`-separated), as EDM2 assigns them: from dataset.json (as
    _read_dataset_json gives it, or None) when it has labels; otherwise (no dataset.json, or `"labels": null`) from the
    top-level sub-folder names when there are two or more. Returns (labels, description of their origin). dataset.json
    labels are checked here, before any work: integers >= 0 (below `num_classes` when given) or lists of numbers, for
    every image or none."""
    if dataset_json is not None and dataset_json['labels'] is not None:
        result = [dataset_json['labels'].get(name) for name in names]
        _check_labels(names, result, f'{where}/dataset.json', num_classes)
        return result, 'dataset.json'
    top = [name.split('/')[0] if '/' in name else '' for name in names]
    classes = sorted(set(top))
    note = ' (dataset.json has "labels": null)' if dataset_json is not None else ''
    if len(classes) < 2:
        return [None] * len(names), 'none' + note
    if num_classes is not None and len(classes) > num_classes:
        raise DatasetToolError(f'{where}: {len(classes)} top-level sub-folders give {len(classes)} classes, more than '
                               f'--num-classes={num_classes}')
    index = {c: i for i, c in enumerate(classes)}
    return [index[t] for t in top], f'{len(classes)} top-level sub-folders{note}'

def _check_labels(names, labels, json_path, num_classes=None):
    """One-line errors naming the label source and the image for labels that training would refuse or cannot hold:
    training.dataset.check_labels's rules (the one home of them), applied before anything is written."""
    missing = [name for name, label in zip(names, labels) if label is None]
    if missing and len(missing) < len(names):
        raise DatasetToolError(f'{json_path}: no label for {len(missing)} of the {len(names)} images (first: '
                               f'{missing[0]}); label every image, or none with "labels": null')
    if missing or not names:
        return
    from training.dataset import check_labels # pylint: disable=import-outside-toplevel
    try:
        check_labels(names, labels, json_path, num_classes)
    except ValueError as e:
        raise DatasetToolError(str(e)) from None

def open_image_folder(source, max_images=None, num_classes=None):
    names = []
    for root, _dirs, files in os.walk(source):
        for fname in files:
            if _file_ext(fname) in _image_extensions():
                names.append(os.path.relpath(os.path.join(root, fname), source).replace(os.sep, '/'))
    names.sort()
    meta_path = os.path.join(source, 'dataset.json')
    dataset_json = None
    if os.path.isfile(meta_path):
        with open(meta_path, 'rb') as f:
            dataset_json = f.read()
    # Labels are assigned over ALL inputs, so that --max-images keeps the class numbering of the full set.
    labels, origin = _labels_for(names, _read_dataset_json(dataset_json, source), source, num_classes)
    names, labels = names[:max_images], labels[:max_images]

    def read(i):
        path = os.path.join(source, names[i].replace('/', os.sep))
        try:
            f = open(path, 'rb')
        except OSError as e:
            raise DatasetToolError(f'{path}: cannot open ({e.strerror})') from None
        with f:
            return _decode_image(f, path)
    return Source(names, read, labels, origin)

def open_image_zip(source, max_images=None, num_classes=None):
    try:
        archive = zipfile.ZipFile(source)
    except (OSError, zipfile.BadZipFile) as e:
        raise DatasetToolError(f'{source}: cannot read zip archive ({e})') from None
    all_names = set(archive.namelist())
    names = sorted(name for name in all_names if _file_ext(name) in _image_extensions())
    dataset_json = archive.read('dataset.json') if 'dataset.json' in all_names else None
    labels, origin = _labels_for(names, _read_dataset_json(dataset_json, source), source, num_classes)
    names, labels = names[:max_images], labels[:max_images]

    def read(i):
        where = f'{source}/{names[i]}'
        try:
            data = archive.read(names[i])
        except Exception as e:
            raise DatasetToolError(f'{where}: cannot read ({type(e).__name__}: {e})') from None
        return _decode_image(io.BytesIO(data), where)
    return Source(names, read, labels, origin)

#----------------------------------------------------------------------------
# MNIST-format IDX files: big-endian header [0, 0, type code, ndim], ndim uint32 sizes, then the raw array.
# Optionally gzip-compressed, as distributed.

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype('>i2'), 0x0C: np.dtype('>i4'),
               0x0D: np.dtype('>f4'), 0x0E: np.dtype('>f8')}
_IDX_IMAGE_PATTERN = re.compile(r'.*images-idx3-ubyte(\.gz)?$')

def read_idx(path, max_items=None):
    """Read (the first max_items entries of) an IDX file as a numpy array; reads only the bytes it needs."""
    try:
        with open(path, 'rb') as raw:
            gzipped = raw.read(2) == b'\x1f\x8b'
        with (gzip.open(path, 'rb') if gzipped else open(path, 'rb')) as f:
            header = f.read(4)
            if len(header) < 4 or header[0] != 0 or header[1] != 0 or header[2] not in _IDX_DTYPES or header[3] == 0:
                raise DatasetToolError(f'{path}: not an IDX file (bad header {header.hex()})')
            dtype = np.dtype(_IDX_DTYPES[header[2]])
            ndim = header[3]
            dims_bytes = f.read(4 * ndim)
            if len(dims_bytes) < 4 * ndim:
                raise DatasetToolError(f'{path}: truncated IDX header')
            shape = [int(x) for x in np.frombuffer(dims_bytes, dtype='>u4')]
            count = shape[0] if max_items is None else min(shape[0], max_items)
            nbytes = count * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            data = f.read(nbytes)
            if len(data) < nbytes:
                raise DatasetToolError(f'{path}: truncated IDX file (the header announces {shape[0]} items of shape '
                                       f'{shape[1:]}; {len(data)} of the {nbytes} bytes needed are there)')
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetToolError(f'{path}: cannot read IDX file ({type(e).__name__}: {e})') from None
    return np.frombuffer(data, dtype=dtype).reshape([count] + shape[1:])

def find_idx_images(folder):
    """The IDX image file to use in `folder`: the training split, else the only one; None if there is none."""
    candidates = sorted(f for f in os.listdir(folder) if _IDX_IMAGE_PATTERN.match(f) and os.path.isfile(os.path.join(folder, f)))
    if not candidates:
        return None
    train = [f for f in candidates if f.startswith('train-')]
    if len(train) == 1:
        return os.path.join(folder, train[0])
    if len(candidates) == 1:
        return os.path.join(folder, candidates[0])
    raise DatasetToolError(f'{folder}: holds several IDX image files ({", ".join(candidates)}); name one as --source')

def _idx_labels_path(images_path):
    # The labels of `...images-idx3...` are read from `...labels-idx1...` in the same folder (MNIST's file names).
    return os.path.join(os.path.dirname(images_path),
                        os.path.basename(images_path).replace('images-idx3', 'labels-idx1'))

def open_idx(images_path, max_images=None, num_classes=None):
    images = read_idx(images_path, max_images)
    if images.ndim not in (3, 4) or images.dtype != np.uint8 or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise DatasetToolError(f'{images_path}: expected uint8 images [N,H,W] or [N,H,W,1|3] in the IDX file, '
                               f'got {images.dtype} {list(images.shape)}')
    if images.ndim == 3:
        images = images[:, :, :, np.newaxis]
    base = os.path.basename(images_path)
    names = [f'{base}[{i}]' for i in range(images.shape[0])]
    labels_path = _idx_labels_path(images_path)
    if labels_path != images_path and os.path.isfile(labels_path):
        labels = read_idx(labels_path, max_images)
        if labels.ndim != 1 or labels.shape[0] != images.shape[0] or labels.dtype.kind not in 'iu':
            raise DatasetToolError(f'{labels_path}: expected {images.shape[0]} integer labels to match '
                                   f'{images_path}, got {labels.dtype} {list(labels.shape)}')
        labels = [int(x) for x in labels]
        _check_labels(names, labels, labels_path, num_classes)
        origin = os.path.basename(labels_path)
    else:
        labels = [None] * images.shape[0]
        origin = 'none (no labels-idx1 file next to the images)'
    # Grey images become RGB by repeating the channel.
    return Source(names, lambda i: np.repeat(images[i], 3 // images.shape[3], axis=2),
                  labels, origin)

#----------------------------------------------------------------------------

def open_source(source, max_images=None, num_classes=None):
    """Open an image folder, zip or IDX file (or a folder holding IDX files) for reading; labels checked."""
    if os.path.isdir(source):
        idx_images = find_idx_images(source)
        if idx_images is not None:
            return open_idx(idx_images, max_images, num_classes)
        return open_image_folder(source, max_images, num_classes)
    if os.path.isfile(source):
        if _file_ext(source) == '.zip':
            return open_image_zip(source, max_images, num_classes)
        if _IDX_IMAGE_PATTERN.match(os.path.basename(source)):
            return open_idx(source, max_images, num_classes)
        raise DatasetToolError(f'Only zip archives are supported: {source} (or a folder, or an MNIST-format '
                               f'*-images-idx3-ubyte[.gz] file)')
    raise DatasetToolError(f'Missing input file or directory: {source}')

#----------------------------------------------------------------------------
# Transforms. Each maps uint8 [H,W,C] to uint8 [H',W',C], or None to skip the image.

def _resize(img, width, height, resample):
    # Pillow returns an exact copy when the size does not change.
    return np.array(PIL.Image.fromarray(img).resize((width, height), resample))

def scale_only(img, width, height):
    if width is None or (img.shape[1] == width and img.shape[0] == height):
        return img
    return _resize(img, width, height, PIL.Image.LANCZOS)

def center_crop(img, width, height):
    # The centred square of side min(h, w), then Lanczos to W x H.
    s = min(img.shape[0], img.shape[1])
    h, w = img.shape[0], img.shape[1]
    img = img[(h - s) // 2 : (h + s) // 2, (w - s) // 2 : (w + s) // 2]
    return _resize(img, width, height, PIL.Image.LANCZOS)

def center_crop_wide(img, width, height):
    # A centred band of rows, Lanczos to W x H, pasted into a black W x W square (wide images on a square canvas).
    ch = int(round(width * img.shape[0] / img.shape[1]))
    if img.shape[1] < width or ch < height:
        return None
    img = img[(img.shape[0] - ch) // 2 : (img.shape[0] + ch) // 2]
    img = _resize(img, width, height, PIL.Image.LANCZOS)
    canvas = np.zeros([width, width, img.shape[2]], dtype=np.uint8)
    canvas[(width - height) // 2 : (width + height) // 2, :] = img
    return canvas

def center_crop_dhariwal(img, size):
    # ADM's (guided-diffusion, Dhariwal & Nichol 2021) ImageNet preprocessing, step by step.
    pil = PIL.Image.fromarray(img)
    # 1. Halve with a box filter while the short side is at least twice the target.
    while min(*pil.size) >= 2 * size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=PIL.Image.BOX)
    # 2. Bicubic so that the short side equals the target; Python's round (halves to even) for the long side.
    scale = size / min(*pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=PIL.Image.BICUBIC)
    # 3. Centred size x size crop.
    arr = np.array(pil)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]

TRANSFORMS = ['center-crop', 'center-crop-wide', 'center-crop-dhariwal']

def _check_image_shape(width, height):
    # EDM2's rule for the images of a dataset, in its words: a square whose side is a power of two.
    if width != height:
        raise DatasetToolError(f'Image dimensions after scale and crop are required to be square.  Got {width}x{height}')
    if width & (width - 1) != 0:
        raise DatasetToolError(f'Image width/height after scale and crop are required to be power-of-two (got {width}; '
                               'use --resolution, e.g. --resolution=32x32)')

def check_output_size(width, height, transform):
    """What --resolution asks for, checked before the first image (with EDM2's words where EDM2 checks it only after
    converting one): a square (center-crop-wide pastes onto a square canvas) whose side is a power of two, and small
    enough that a few copies of one image fit in memory (65536x65536 would be 12 GiB each)."""
    _check_image_shape(width, width if transform == 'center-crop-wide' else height)  # the shape of the written images
    # misc.check_fits_memory's test and words, written out: importing misc loads torch, which a convert need not load.
    import psutil # pylint: disable=import-outside-toplevel
    need, have = 4 * 3 * width * width, psutil.virtual_memory().total  # the image, resized, its PNG, the zip buffer
    if need > have:
        raise DatasetToolError(f'--resolution={width}x{height}: converting one image needs at least '
                               f'{need / 2**30:,.1f} GiB, more than this machine has ({have / 2**30:,.1f} GiB)')

def make_transform(transform, width=None, height=None):
    """The function img -> img|None for --transform and --resolution, after checking that they fit together."""
    if transform is None:
        return functools.partial(scale_only, width=width, height=height)
    if transform not in TRANSFORMS:
        raise DatasetToolError(f'Unknown transform {transform!r}; choose one of {", ".join(TRANSFORMS)}')
    if width is None or height is None:
        raise DatasetToolError(f'must specify --resolution=WxH when using {transform} transform')
    if transform == 'center-crop':
        return functools.partial(center_crop, width=width, height=height)
    if transform == 'center-crop-wide':
        return functools.partial(center_crop_wide, width=width, height=height)
    if width != height:
        raise DatasetToolError('width and height must match in --resolution=WxH when using center-crop-dhariwal transform')
    return functools.partial(center_crop_dhariwal, size=width)

def parse_resolution(text):
    """'32x32' or '32,32' -> (32, 32); anything else is an error with EDM2's message."""
    match = re.fullmatch(r'(\d+)[x,](\d+)', text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f'cannot parse tuple {text}')
    if int(match[1]) < 1 or int(match[2]) < 1:
        raise ValueError(f'{text}: width and height must be 1 or more, e.g. 64x64')
    return int(match[1]), int(match[2])

#----------------------------------------------------------------------------
# Output: a zip (ZIP_STORED, fixed timestamps so that the bytes depend only on the content) or a folder.
# Written under a temporary name and renamed into place at the end, so a failure or a kill never leaves a
# half-written dataset under the final name.

_ZIP_DATE = (1980, 1, 1, 0, 0, 0) # The earliest time a zip can store.

def _temp_name(dest):
    # Hidden sibling of `dest` carrying our process id, so that a later run can tell its own dead leftovers apart
    # from the temporary output of a conversion still running.
    dest = os.path.normpath(os.path.abspath(dest))
    return os.path.join(os.path.dirname(dest), f'.{os.path.basename(dest)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp')

def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True # Exists, owned by someone else.
    return True

def remove_leftovers(dest):
    """Delete the temporary zip/folder of an earlier conversion to `dest` that was killed (its process is gone)."""
    dest = os.path.normpath(os.path.abspath(dest))
    parent, base = os.path.dirname(dest), os.path.basename(dest)
    pattern = re.compile(re.escape(f'.{base}.') + r'(\d+)\.[0-9a-f]{8}\.tmp')
    removed = []
    for name in os.listdir(parent) if os.path.isdir(parent) else []:
        match = pattern.fullmatch(name)
        if match and int(match.group(1)) != os.getpid() and not _process_alive(int(match.group(1))):
            path = os.path.join(parent, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
            removed.append(path)
    return removed

def _is_dataset_folder(path):
    return os.path.isfile(os.path.join(path, 'dataset.json'))

def check_dest(dest, overwrite=False, source=None):
    """Refuse a --dest we cannot or must not write, before any work: `Error: <path>: <reason>`. That includes
    --source itself (through any link or spelling), a folder holding it, and a folder inside a source folder."""
    if dest == '':
        raise DatasetToolError('--dest output filename or directory must not be an empty string')
    if source is not None:
        inputs = [('--source', source)]
        if os.path.isfile(source) and _IDX_IMAGE_PATTERN.match(os.path.basename(source)):
            inputs.append(('--source labels', _idx_labels_path(source)))
        reason = cli.input_overwrite(dest, inputs, folders=_file_ext(dest) != '.zip')
        if reason is not None:
            raise DatasetToolError(f'--dest={reason}')
    if _file_ext(dest) == '.zip':
        if os.path.isdir(dest):
            raise DatasetToolError(f'{dest}: is a directory (a .zip --dest must be a file)')
        if os.path.exists(dest) and not overwrite:
            raise DatasetToolError(f'{dest}: exists; give --overwrite to replace it')
    else:
        if os.path.exists(dest) and not os.path.isdir(dest):
            raise DatasetToolError(f'--dest folder must be empty: {dest} is a file')
        if os.path.isdir(dest) and len(os.listdir(dest)) != 0:
            if not overwrite:
                raise DatasetToolError(f'--dest folder must be empty: {dest} (--overwrite replaces a dataset folder)')
            if not _is_dataset_folder(dest):
                raise DatasetToolError(f'{dest}: --overwrite replaces only a dataset folder (one with dataset.json); '
                                       f'this folder has none and is kept')
    # The nearest existing ancestor must be a folder we can write in (missing parents are created).
    parent = os.path.dirname(os.path.normpath(os.path.abspath(dest)))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise DatasetToolError(f'{dest}: {parent} is not a directory')
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DatasetToolError(f'{dest}: permission denied (cannot write in {parent})')
    try:
        cli.check_writable_folder(parent, dest)  # what os.access cannot tell root: a read-only file system
    except click.ClickException as e:
        raise DatasetToolError(e.message) from None

@contextlib.contextmanager
def open_dest(dest, overwrite=False):
    """Context yielding write(archive_name, bytes); the dataset appears at `dest` only if the block succeeds."""
    check_dest(dest, overwrite)
    remove_leftovers(dest)
    parent = os.path.dirname(os.path.normpath(os.path.abspath(dest)))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise DatasetToolError(f'{dest}: {e.strerror}') from None
    tmp = _temp_name(dest)
    try:
        if _file_ext(dest) == '.zip':
            with open(tmp, 'wb') as f, zipfile.ZipFile(f, 'w', compression=zipfile.ZIP_STORED) as zf:
                def write_zip(name, data):
                    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
                    info.compress_type = zipfile.ZIP_STORED
                    info.create_system = 3 # Unix, on every platform.
                    info.external_attr = 0o644 << 16
                    zf.writestr(info, data)
                yield write_zip
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
            return

        os.mkdir(tmp)
        def write_file(name, data):
            path = os.path.join(tmp, *name.split('/'))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, 'wb') as f:
                f.write(data)
        yield write_file
        if os.path.isdir(dest) and os.listdir(dest):
            # --overwrite of a dataset folder (checked above): move the old one aside, then drop it.
            old = _temp_name(dest)
            os.rename(dest, old)
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if os.path.isdir(dest):
                os.rmdir(dest) # Checked empty above; fails (and keeps it) if something appeared meanwhile.
            os.rename(tmp, dest)
    except OSError as e:
        raise DatasetToolError(f'{e.filename or dest}: {e.strerror}') from None
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)

def output_name(idx, stem='img', ext='png'):
    # '{idx:08d}'[:5] is the sub-folder: 1000 files each.
    return f'{idx:08d}'[:5] + f'/{stem}{idx:08d}.{ext}'

def png_bytes(img):
    buf = io.BytesIO()
    PIL.Image.fromarray(img).save(buf, format='png', compress_level=0, optimize=False)
    return buf.getvalue()

def dataset_json_bytes(labels, num_classes=None, vae=None):
    # [[name, label], ...], or null when the images have no labels. A stated class count is kept as "num_classes"
    # (EDM2's reader ignores the key; ours then refuses labels outside 0..N-1 and makes one-hot vectors of length N).
    # A latent dataset names the VAE that made it as "vae", after the labels (see the VAE latents section).
    if any(label is None for _name, label in labels):
        labels = None
    doc = {'labels': labels}
    if num_classes is not None and labels is not None:
        doc['num_classes'] = num_classes
    if vae is not None:
        doc['vae'] = vae
    return json.dumps(doc).encode('utf-8')

#----------------------------------------------------------------------------

def convert_dataset(source, dest, max_images=None, transform=None, resolution=None, verbose=True, overwrite=False,
                    num_classes=None):
    """Convert `source` to a PNG dataset at `dest`. Returns an EasyDict(num_images, num_skipped, labels, shape)."""
    width, height = resolution if resolution is not None else (None, None)
    transform_fn = make_transform(transform, width, height)
    if resolution is not None:
        check_output_size(width, height, transform)
    check_dest(dest, overwrite, source)
    src = open_source(source, max_images, num_classes)
    if len(src) == 0:
        raise DatasetToolError(f'No input images found in {source}')

    dataset_attrs = None
    labels = []
    num_skipped = 0
    with open_dest(dest, overwrite) as write:
        for idx in tqdm(range(len(src)), desc='convert', unit='img', disable=not verbose):
            item = src.read(idx)
            img = transform_fn(item.image)
            if img is None: # Skipped by center-crop-wide; the index still advances.
                num_skipped += 1
                continue

            # The first image fixes the dataset's attributes; all must be equal.
            attrs = dict(width=img.shape[1], height=img.shape[0], channels=img.shape[2])
            if dataset_attrs is None:
                dataset_attrs = attrs
                _check_image_shape(attrs['width'], attrs['height'])
            elif attrs != dataset_attrs:
                diff = ', '.join(f'{k} {attrs[k]} (dataset {dataset_attrs[k]})' for k in attrs if attrs[k] != dataset_attrs[k])
                raise DatasetToolError(f'Image {item.name} attributes must be equal across all images of the dataset.  '
                                       f'Got: {diff}')

            name = output_name(idx)
            write(name, png_bytes(img))
            labels.append([name, item.label])
        if dataset_attrs is None:
            raise DatasetToolError(f'No image of {source} could be used (all {num_skipped} were skipped by {transform})')
        write('dataset.json', dataset_json_bytes(labels, num_classes)) # Last, as in EDM2.

    has_labels = all(label is not None for _name, label in labels)
    return dnnlib.EasyDict(num_images=len(labels), num_skipped=num_skipped, label_origin=src.label_origin,
                           has_labels=has_labels, shape=[dataset_attrs['channels'], dataset_attrs['height'], dataset_attrs['width']])

#----------------------------------------------------------------------------
# VAE latents (EDM2 paper, ImageNet-512 in latent space). `encoder` defaults to StabilityVAEEncoder; tests pass a stand-in.
# A latent dataset's dataset.json also names the VAE that made it ("vae": hub name or absolute folder path; EDM2's
# reader ignores the key): decoding and training default to it.

def check_vae(vae):
    """Check --vae (a local folder, or a hub name) and the diffusers package before any work; return the name to use
    and to record (a folder as an absolute path)."""
    from training import encoders # pylint: disable=import-outside-toplevel
    try:
        name = encoders.vae_record_name(vae)
    except encoders.VAEError as e:
        raise DatasetToolError(f'--vae={vae}: {e.reason}') from None
    problem = encoders.diffusers_problem()
    if problem is not None:
        raise DatasetToolError(f'the Stable Diffusion VAE {problem}')
    return name

def make_vae_encoder(vae, device, batch_size=1):
    from training import encoders # pylint: disable=import-outside-toplevel
    encoder = encoders.StabilityVAEEncoder(vae_name=vae, batch_size=batch_size)
    try:
        encoder.init(device)
    except encoders.VAEError as e:
        raise DatasetToolError(f'--vae={vae}: {e.reason}') from None
    return encoder

def _default_device():
    from torch_utils import distributed as dist # pylint: disable=import-outside-toplevel
    return dist.device()

def _batches(count, batch):
    return [range(i, min(i + batch, count)) for i in range(0, count, batch)]

def _peak_memory(device):
    """Peak memory so far, for the progress bar: allocated on a CUDA device, else this process's resident size."""
    import torch # pylint: disable=import-outside-toplevel
    if device.type == 'cuda':
        return f'{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB GPU'
    import psutil # pylint: disable=import-outside-toplevel
    return f'{psutil.Process().memory_info().rss / 2**30:.2f} GiB RAM'

def _run_vae(fn, what, names):
    """fn() for one batch; a failure of the VAE itself (e.g. out of memory) as one line naming the images."""
    try:
        return fn()
    except (RuntimeError, ValueError) as e:
        where = names[0] if len(names) == 1 else f'{names[0]} ... {names[-1]}'
        raise DatasetToolError(f'{where}: the VAE failed to {what} ({cli.one_line(e, with_type=True)}); nothing was '
                               'written (for lack of memory, lower --batch)') from None

def encode_dataset(source, dest, vae='stabilityai/sd-vae-ft-mse', max_images=None, batch=8, encoder=None,
                   device=None, verbose=True, overwrite=False):
    """RGB images -> `img-mean-std-XXXXXXXX.npy` files holding the VAE posterior [mean, std] (8 x H/8 x W/8), `batch`
    images per VAE call. Returns an EasyDict(num_images, label_origin, shape, images_per_second, peak_memory)."""
    import torch # pylint: disable=import-outside-toplevel
    check_dest(dest, overwrite, source)
    if encoder is None:
        vae = check_vae(vae) # Before reading the source.
    src = open_source(source, max_images)
    if len(src) == 0:
        raise DatasetToolError(f'No input images found in {source}')
    device = torch.device(device) if device is not None else _default_device()
    if encoder is None:
        encoder = make_vae_encoder(vae, device, batch)
    else:
        vae = getattr(encoder, 'vae_name', vae)
    labels, size, shape = [], None, None
    start = time.perf_counter()
    with open_dest(dest, overwrite) as write, \
            tqdm(total=len(src), desc='encode', unit='img', disable=not verbose) as progress:
        for indices in _batches(len(src), batch):
            items = [src.read(idx) for idx in indices]
            for item in items:
                if size is None:
                    size = item.image.shape[:2]
                if item.image.shape[:2] != size:
                    raise DatasetToolError(f'{item.name}: the image is {item.image.shape[1]}x{item.image.shape[0]}, '
                                           f'the first one {size[1]}x{size[0]}: all images of a latent dataset must '
                                           'have one size (make them so with "dataset_tool.py convert --resolution")')
            x = torch.from_numpy(np.stack([item.image for item in items])).permute(0, 3, 1, 2).to(device)
            mean_std = _run_vae(lambda: encoder.encode_pixels(x), 'encode', [item.name for item in items])
            mean_std = mean_std.to(torch.float32).cpu().numpy()
            shape = list(mean_std.shape[1:])
            for idx, item, array in zip(indices, items, mean_std):
                buf = io.BytesIO()
                np.save(buf, array)
                name = output_name(idx, stem='img-mean-std-', ext='npy')
                write(name, buf.getvalue())
                labels.append([name, item.label])
            progress.update(len(items))
            progress.set_postfix_str(_peak_memory(device), refresh=False)
        write('dataset.json', dataset_json_bytes(labels, vae=vae))
    seconds = time.perf_counter() - start
    return dnnlib.EasyDict(num_images=len(labels), label_origin=src.label_origin, shape=shape,
                           images_per_second=(len(labels) / seconds if seconds > 0 else None),
                           peak_memory=_peak_memory(device))

def open_latents(source, max_images=None):
    """A Source over the .npy files of a latent dataset (folder or zip); `read(i)` gives the array, `.vae` the VAE
    its dataset.json names (None if it names none)."""
    if os.path.isdir(source):
        names = sorted(os.path.relpath(os.path.join(root, f), source).replace(os.sep, '/')
                       for root, _dirs, files in os.walk(source) for f in files if _file_ext(f) == '.npy')
        meta_path = os.path.join(source, 'dataset.json')
        dataset_json = None
        if os.path.isfile(meta_path):
            with open(meta_path, 'rb') as f:
                dataset_json = f.read()
        opener = lambda name: open(os.path.join(source, name.replace('/', os.sep)), 'rb')
    elif os.path.isfile(source) and _file_ext(source) == '.zip':
        try:
            archive = zipfile.ZipFile(source)
        except (OSError, zipfile.BadZipFile) as e:
            raise DatasetToolError(f'{source}: cannot read zip archive ({e})') from None
        all_names = set(archive.namelist())
        names = sorted(n for n in all_names if _file_ext(n) == '.npy')
        dataset_json = archive.read('dataset.json') if 'dataset.json' in all_names else None
        opener = lambda name: io.BytesIO(archive.read(name))
    elif os.path.exists(source):
        raise DatasetToolError(f'Only zip archives are supported: {source}')
    else:
        raise DatasetToolError(f'Missing input file or directory: {source}')
    doc = _read_dataset_json(dataset_json, source)
    labels, origin = _labels_for(names, doc, source)
    names, labels = names[:max_images], labels[:max_images]

    def read(i):
        where = f'{source}/{names[i]}'
        try:
            with opener(names[i]) as f:
                return np.load(f)
        except Exception as e:
            raise DatasetToolError(f'{where}: cannot read latents ({type(e).__name__}: {e})') from None
    result = Source(names, read, labels, origin)
    recorded = doc.get('vae') if doc is not None else None
    result.vae = recorded if isinstance(recorded, str) else None
    return result

def decode_dataset(source, dest, vae=None, max_images=None, batch=8, encoder=None, device=None, verbose=True,
                   overwrite=False):
    """Latent dataset (.npy [mean, std] or [mean]) -> PNGs of the VAE decoding of the posterior means, `batch` per
    VAE call. `vae` None: the VAE the dataset names, else EDM2's. Returns an EasyDict(num_images, label_origin, vae)."""
    import torch # pylint: disable=import-outside-toplevel
    check_dest(dest, overwrite, source)
    src = open_latents(source, max_images)
    if len(src) == 0:
        raise DatasetToolError(f'No .npy latent files found in {source}')
    if encoder is None:
        vae = check_vae(vae or src.vae or 'stabilityai/sd-vae-ft-mse')
    device = torch.device(device) if device is not None else _default_device()
    if encoder is None:
        encoder = make_vae_encoder(vae, device, batch)
    # Decode the posterior mean deterministically: map it into network space with the encoder's affine constants,
    # which `decode` undoes before running the VAE decoder.
    scale = torch.as_tensor(encoder.scale, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
    bias = torch.as_tensor(encoder.bias, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
    labels, shape = [], None
    with open_dest(dest, overwrite) as write, \
            tqdm(total=len(src), desc='decode', unit='img', disable=not verbose) as progress:
        for indices in _batches(len(src), batch):
            items = [src.read(idx) for idx in indices]
            for item in items:
                latents = item.image
                if latents.ndim != 3 or latents.shape[0] not in (4, 8):
                    raise DatasetToolError(f'{source}/{item.name}: expected latents [8,h,w] (mean, std) or [4,h,w], '
                                           f'got {list(latents.shape)}')
                if shape is None:
                    shape = latents.shape[1:]
                if latents.shape[1:] != shape:
                    raise DatasetToolError(f'{source}/{item.name}: latents of size {list(latents.shape[1:])}, the '
                                           f'first ones {list(shape)}: all must have one size')
            mean = torch.from_numpy(np.stack([np.asarray(item.image[:4], dtype=np.float32) for item in items]))
            mean = mean.to(device)
            pixels = _run_vae(lambda: encoder.decode(mean * scale + bias), 'decode', [item.name for item in items])
            for idx, item, image in zip(indices, items, pixels.permute(0, 2, 3, 1).cpu().numpy()):
                name = output_name(idx)
                write(name, png_bytes(image))
                labels.append([name, item.label])
            progress.update(len(items))
            progress.set_postfix_str(_peak_memory(device), refresh=False)
        write('dataset.json', dataset_json_bytes(labels))
    return dnnlib.EasyDict(num_images=len(labels), label_origin=src.label_origin, vae=vae)

#----------------------------------------------------------------------------
# Command line.

def _run(fn, **kwargs):
    with cli.os_errors(kwargs.get('dest')):
        try:
            return fn(**kwargs)
        except DatasetToolError as e:
            raise click.ClickException(str(e)) from None

@click.group()
def cmdline():
    """Dataset tool: convert images to EDM2's dataset layout; encode/decode Stable Diffusion VAE latents.

    \b
    Fashion-MNIST, 32x32 RGB with labels (training and test sets):
      python dataset_tool.py convert --source=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz --dest=datasets/fashion-mnist-32.zip --resolution=32x32
      python dataset_tool.py convert --source=/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz --dest=datasets/fashion-mnist-test-32.zip --resolution=32x32
    ImageNet 64x64 (ADM's preprocessing):
      python dataset_tool.py convert --source=ILSVRC/Data/CLS-LOC/train --dest=datasets/img64.zip --resolution=64x64 --transform=center-crop-dhariwal
    ImageNet 512x512 latents (needs diffusers: pip install -e .[latent]; a GPU advised):
      python dataset_tool.py encode --source=datasets/img512.zip --dest=datasets/img512-sd.zip
    The same without internet access, with a VAE folder written by diffusers' save_pretrained:
      python dataset_tool.py encode --source=datasets/img512.zip --dest=datasets/img512-sd.zip --vae=vae/sd-vae-ft-mse
    """
    cli.refuse_torchrun('dataset_tool.py')

@cmdline.command()
# Main options.
@click.option('--source',      help='Input: image folder (recursive), zip, or MNIST-format *-images-idx3-ubyte[.gz] file', metavar='PATH', type=str, required=True)
@click.option('--dest',        help='Output: .zip (uncompressed) or an empty/new folder', metavar='PATH', type=str, required=True)
# Transform options.
@click.option('--transform',   help='Crop and resize: center-crop, center-crop-wide or center-crop-dhariwal (ADM)', metavar='MODE', type=click.Choice(TRANSFORMS), default=None)
@click.option('--resolution',  help='Output resolution, e.g. 64x64', metavar='WxH', type=cli.Parsed(parse_resolution, name='WxH'), default=None)
# Limits and checks.
@click.option('--max-images',  help='Use only the first N input images (sorted order)', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--num-classes', help='Number of classes: refuse labels outside 0..N-1', metavar='INT', type=click.IntRange(min=1, max=1 << 20), default=None)  # training.dataset.MAX_CLASSES
@click.option('--overwrite',   help='Replace an existing --dest (a zip, or a dataset folder)', is_flag=True)
def convert(source, dest, transform, resolution, max_images, num_classes, overwrite):
    """Convert images to EDM2's PNG dataset layout.

    Writes a zip (or folder) of PNGs and dataset.json labels. Sources: an image folder (class sub-folders give
    labels), a zip, or an MNIST-format IDX image file (labels from the labels-idx1 file next to it).
    """
    r = _run(convert_dataset, source=source, dest=dest, max_images=max_images, transform=transform, resolution=resolution,
             num_classes=num_classes, overwrite=overwrite)
    skipped = f', {r.num_skipped} skipped' if r.num_skipped else ''
    labels = f'labels: {r.label_origin}' if r.has_labels else 'no labels'
    click.echo(f'Wrote {r.num_images} images of shape {"x".join(map(str, r.shape))} (CHW){skipped} to {dest}; {labels}')

_VAE_HELP = ('VAE: a folder written by diffusers\' save_pretrained (no network access), or a Hugging Face hub name '
             '(local cache first)')

def _vae_option(default, help_text):
    # --model-url is EDM2's name for this option; it still works.
    return click.option('--vae', '--model-url', 'vae', help=help_text, metavar='PATH|NAME', type=str, default=default,
                        show_default=default is not None)

@cmdline.command()
# Main options.
@click.option('--source',      help='Input RGB dataset: folder, zip or IDX file', metavar='PATH', type=str, required=True)
@click.option('--dest',        help='Output: .zip or an empty/new folder', metavar='PATH', type=str, required=True)
@_vae_option('stabilityai/sd-vae-ft-mse', _VAE_HELP)
# Performance and limits.
@click.option('--batch',       help='Images per VAE call (1: each image alone, as EDM2 does)', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--max-images',  help='Use only the first N input images', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--overwrite',   help='Replace an existing --dest (a zip, or a dataset folder)', is_flag=True)
def encode(vae, source, dest, batch, max_images, overwrite):
    """Encode RGB images to Stable Diffusion VAE latents.

    Writes the posterior [mean, std] of each image as an 8-channel .npy file (EDM2's layout) and names the VAE in
    dataset.json. Needs diffusers (pip install -e .[latent]); a GPU is much faster. The progress bar shows images/s
    and peak memory.

    \b
    python dataset_tool.py encode --source=datasets/img512.zip --dest=datasets/img512-sd.zip
    python dataset_tool.py encode --source=datasets/img512.zip --dest=datasets/img512-sd.zip --vae=vae/sd-vae-ft-mse
    """
    r = _run(encode_dataset, source=source, dest=dest, vae=vae, batch=batch, max_images=max_images, overwrite=overwrite)
    speed = f', {r.images_per_second:.1f} images/s' if r.images_per_second is not None else ''
    click.echo(f'Wrote {r.num_images} latent files of shape {"x".join(map(str, r.shape))} to {dest}{speed}; '
               f'peak memory {r.peak_memory}')

@cmdline.command()
# Main options.
@click.option('--source',      help='Input latent dataset (.npy files): folder or zip', metavar='PATH', type=str, required=True)
@click.option('--dest',        help='Output: .zip or an empty/new folder', metavar='PATH', type=str, required=True)
@_vae_option(None, _VAE_HELP + '  [default: the VAE the dataset names, else stabilityai/sd-vae-ft-mse]')
# Performance and limits.
@click.option('--batch',       help='Images per VAE call', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--max-images',  help='Use only the first N inputs', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--overwrite',   help='Replace an existing --dest (a zip, or a dataset folder)', is_flag=True)
def decode(vae, source, dest, batch, max_images, overwrite):
    """Decode VAE latents back to PNG images.

    Decodes the posterior mean of each .npy file of a latent dataset. Needs diffusers (pip install -e .[latent]).
    """
    r = _run(decode_dataset, source=source, dest=dest, vae=vae, batch=batch, max_images=max_images, overwrite=overwrite)
    click.echo(f'Wrote {r.num_images} images to {dest} (VAE {r.vae})')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    cli.run(cmdline)
