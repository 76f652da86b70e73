"""training/dataset.py: ImageFolderDataset with EDM2's semantics and errors that name the file."""

import json
import os
import pickle

import numpy as np
import pytest
import torch

from conftest import image_name, write_files
from conftest import png_bytes as png
from training.dataset import ImageFolderDataset

#----------------------------------------------------------------------------
# Helpers: a dataset in EDM2's layout, written directly (independent of dataset_tool).

def image(i, size=8, channels=3):
    rs = np.random.RandomState(i)
    return rs.randint(0, 256, size=[size, size, channels] if channels > 1 else [size, size], dtype=np.uint8)

def make_dataset(root, n=6, labels='int', as_zip=False, size=8, channels=3, overrides=None):
    """Write n PNGs 00000/imgXXXXXXXX.png and dataset.json; `overrides` maps a name to replacement bytes."""
    files = {image_name(i): png(image(i, size, channels)) for i in range(n)}
    names = list(files)
    if labels == 'int':
        files['dataset.json'] = json.dumps({'labels': [[name, (i * 3) % 5] for i, name in enumerate(names)]}).encode()
    elif labels == 'vector':
        files['dataset.json'] = json.dumps({'labels': [[name, [i, 0.5, -1]] for i, name in enumerate(names)]}).encode()
    elif labels == 'null':
        files['dataset.json'] = json.dumps({'labels': None}).encode()
    elif isinstance(labels, dict):
        files['dataset.json'] = json.dumps(labels).encode()
    files.update(overrides or {})
    return write_files(str(root) + '.zip' if as_zip else root, files)

#----------------------------------------------------------------------------
# Contents, labels, properties.

@pytest.mark.parametrize('as_zip', [False, True])
def test_items_and_onehot_labels(tmp_path, as_zip):
    ds = ImageFolderDataset(make_dataset(tmp_path / 'ds', n=6, as_zip=as_zip))
    assert ds.name == 'ds'
    assert len(ds) == 6
    assert ds.image_shape == [3, 8, 8] and ds.num_channels == 3 and ds.resolution == 8
    # Labels (i*3) % 5 = 0, 3, 1, 4, 2, 0: class count is max + 1 = 5.
    assert ds.label_shape == [5] and ds.label_dim == 5 and ds.has_labels and ds.has_onehot_labels
    img, label = ds[3]
    assert img.dtype == np.uint8 and img.shape == (3, 8, 8)
    np.testing.assert_array_equal(img, image(3).transpose(2, 0, 1))
    assert label.dtype == np.float32
    np.testing.assert_array_equal(label, [0, 0, 0, 0, 1])
    assert ds.get_details(3).raw_label == 4

def test_no_labels(tmp_path):
    for kind, path in [('null', tmp_path / 'a'), (None, tmp_path / 'b')]:
        ds = ImageFolderDataset(make_dataset(path, labels=kind))
        assert not ds.has_labels and ds.label_dim == 0
        assert ds[0][1].shape == (0,)
    ds = ImageFolderDataset(make_dataset(tmp_path / 'c'), use_labels=False)
    assert not ds.has_labels and ds.label_shape == [0]

def test_vector_labels_used_as_is(tmp_path):
    ds = ImageFolderDataset(make_dataset(tmp_path / 'ds', labels='vector'))
    assert not ds.has_onehot_labels and ds.label_dim == 3
    np.testing.assert_array_equal(ds[2][1], np.array([2, 0.5, -1], dtype=np.float32))

def test_grey_images_have_one_channel(tmp_path):
    ds = ImageFolderDataset(make_dataset(tmp_path / 'ds', channels=1))
    assert ds.image_shape == [1, 8, 8]
    np.testing.assert_array_equal(ds[1][0][0], image(1, channels=1))

def test_npy_latents(tmp_path):
    os.makedirs(tmp_path / 'lat' / '00000')
    arrays = [np.random.RandomState(i).randn(8, 4, 4).astype(np.float32) for i in range(3)]
    for i, a in enumerate(arrays):
        np.save(tmp_path / 'lat' / '00000' / f'img-mean-std-{i:08d}.npy', a)
    ds = ImageFolderDataset(str(tmp_path / 'lat'))
    assert ds.image_shape == [8, 4, 4] and ds.num_channels == 8
    img, _ = ds[2]
    assert img.dtype == np.float32
    np.testing.assert_array_equal(img, arrays[2])

def test_max_size_subset_is_seeded_and_sorted(tmp_path):
    path = make_dataset(tmp_path / 'ds', n=20)
    ds = ImageFolderDataset(path, max_size=7, random_seed=123)
    # EDM2's rule: shuffle 0..N-1 with RandomState(seed % 2^31), keep the first max_size, sort.
    order = np.arange(20)
    np.random.RandomState(123).shuffle(order)
    expected = sorted(order[:7])
    assert [ds.get_details(i).raw_idx for i in range(len(ds))] == expected
    np.testing.assert_array_equal(ds[0][0], image(expected[0]).transpose(2, 0, 1))
    again = ImageFolderDataset(path, max_size=7, random_seed=123 + (1 << 31)) # Seed taken modulo 2^31.
    assert [again.get_details(i).raw_idx for i in range(7)] == expected
    other = ImageFolderDataset(path, max_size=7, random_seed=124)
    assert [other.get_details(i).raw_idx for i in range(7)] != expected
    assert len(ImageFolderDataset(path, max_size=50)) == 20 # Larger than the dataset: everything, in order.

def test_xflip_doubles_with_mirrored_copies(tmp_path):
    ds = ImageFolderDataset(make_dataset(tmp_path / 'ds', n=4), xflip=True)
    assert len(ds) == 8
    for i in range(4):
        plain, label = ds[i]
        flipped, flipped_label = ds[i + 4]
        np.testing.assert_array_equal(flipped, plain[:, :, ::-1])
        np.testing.assert_array_equal(flipped_label, label)
        assert ds.get_details(i + 4).xflip and not ds.get_details(i).xflip

def test_cache_keeps_decoded_images(tmp_path):
    path = make_dataset(tmp_path / 'ds', n=3)
    ds = ImageFolderDataset(path, cache=True)
    first = ds[1][0]
    with open(os.path.join(path, '00000', 'img00000001.png'), 'wb') as f:
        f.write(png(image(99)))
    np.testing.assert_array_equal(ds[1][0], first)
    np.testing.assert_array_equal(ImageFolderDataset(path)[1][0], image(99).transpose(2, 0, 1))

def test_pickle_round_trip(tmp_path):
    ds = ImageFolderDataset(make_dataset(tmp_path / 'ds', n=5, as_zip=True), max_size=3, xflip=True)
    before = [ds[i] for i in range(len(ds))]
    assert ds._zipfile is not None # The archive is open now ...
    state = ds.__getstate__()
    assert state['_zipfile'] is None and state['_raw_labels'] is None # ... but neither it nor the labels are pickled.
    copy = pickle.loads(pickle.dumps(ds))
    assert len(copy) == len(ds) == 6
    for (img_a, label_a), (img_b, label_b) in zip(before, [copy[i] for i in range(len(copy))]):
        np.testing.assert_array_equal(img_a, img_b)
        np.testing.assert_array_equal(label_a, label_b)

def test_data_loader_workers_read_the_zip(tmp_path):
    ds = ImageFolderDataset(make_dataset(tmp_path / 'ds', n=6, as_zip=True))
    ds[0] # Opens the archive in this process; the workers must not share its handle.
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
    images = torch.cat([images for images, _labels in loader])
    np.testing.assert_array_equal(images.numpy(), np.stack([ds[i][0] for i in range(6)]))

#----------------------------------------------------------------------------
# Errors: one line, naming the file.

def test_corrupt_image_is_named(tmp_path):
    bad = b'\x89PNG\r\n\x1a\n' + b'\x00' * 40
    path = make_dataset(tmp_path / 'ds', n=4, overrides={'00000/img00000002.png': bad})
    ds = ImageFolderDataset(path)
    ds[1]
    with pytest.raises(OSError) as info:
        ds[2]
    assert str(info.value).startswith(os.path.join(path, '00000', 'img00000002.png') + ': cannot decode image')
    assert '\n' not in str(info.value)

def test_corrupt_first_image_in_zip_is_named(tmp_path):
    path = make_dataset(tmp_path / 'ds', n=2, as_zip=True, overrides={'00000/img00000000.png': b'nonsense'})
    with pytest.raises(OSError, match=r'ds\.zip/00000/img00000000\.png: cannot decode image'):
        ImageFolderDataset(path)

def test_wrong_size_image_is_named(tmp_path):
    path = make_dataset(tmp_path / 'ds', n=3, overrides={'00000/img00000001.png': png(image(1, size=4))})
    ds = ImageFolderDataset(path)
    with pytest.raises(ValueError) as info:
        ds[1]
    assert str(info.value) == (f'{os.path.join(path, "00000", "img00000001.png")}: image shape [3, 4, 4] differs from '
                               "the dataset's [3, 8, 8] (taken from the first image)")

def test_missing_label_is_named(tmp_path):
    labels = {'labels': [['00000/img00000000.png', 1], ['00000/img00000002.png', 0]]}
    path = make_dataset(tmp_path / 'ds', n=3, labels=labels)
    ds = ImageFolderDataset(path)
    with pytest.raises(ValueError) as info:
        ds.label_dim
    assert str(info.value) == f'{os.path.join(path, "dataset.json")}: no label for 00000/img00000001.png'
    assert ImageFolderDataset(path, use_labels=False).label_dim == 0 # Without labels the dataset is fine.

def test_malformed_dataset_json_is_named(tmp_path):
    path = make_dataset(tmp_path / 'ds', n=2, labels=None, overrides={'dataset.json': b'{"labels": [1, 2'})
    with pytest.raises(ValueError, match=r'dataset\.json: not a valid dataset\.json'):
        ImageFolderDataset(path).has_labels
    path = make_dataset(tmp_path / 'ds2', n=2, labels={'labels': [['00000/img00000000.png', 'cat'],
                                                                  ['00000/img00000001.png', 'dog']]})
    with pytest.raises(ValueError, match=r'dataset\.json: invalid labels'):
        ImageFolderDataset(path).has_labels

def test_unreadable_datasets_are_named(tmp_path):
    with pytest.raises(OSError, match=f'{tmp_path}/missing.zip: no such file'):
        ImageFolderDataset(str(tmp_path / 'missing.zip'))
    (tmp_path / 'bad.zip').write_bytes(b'this is not a zip file')
    with pytest.raises(OSError, match=f'{tmp_path}/bad.zip: cannot read zip archive'):
        ImageFolderDataset(str(tmp_path / 'bad.zip'))
    (tmp_path / 'x.tar').write_bytes(b'')
    with pytest.raises(OSError, match=f'{tmp_path}/x.tar: Path must point to a directory or zip'):
        ImageFolderDataset(str(tmp_path / 'x.tar'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(OSError, match='empty: No image files found in the specified path'):
        ImageFolderDataset(str(tmp_path / 'empty'))
    with pytest.raises(OSError, match='Image files do not match the specified resolution'):
        ImageFolderDataset(make_dataset(tmp_path / 'ds', n=2), resolution=16)

#----------------------------------------------------------------------------
# Label validation: every error names dataset.json and the image whose label is wrong.

def labels_of(names, values, **extra):
    return dict(labels=[[name, value] for name, value in zip(names, values)], **extra)

NAMES = [f'00000/img{i:08d}.png' for i in range(4)]

def test_stated_class_count(tmp_path):
    ds = ImageFolderDataset(make_dataset(tmp_path / 'ok', n=4, labels=labels_of(NAMES, [0, 2, 1, 2], num_classes=10)))
    assert ds.label_dim == 10 and ds.has_onehot_labels  # the stated count, not max + 1 = 3
    np.testing.assert_array_equal(ds[1][1], np.eye(10, dtype=np.float32)[2])
    path = make_dataset(tmp_path / 'bad', n=4, labels=labels_of(NAMES, [0, 2, 2000, 2], num_classes=10))
    with pytest.raises(ValueError) as info:
        ImageFolderDataset(path).label_dim
    assert str(info.value) == (f'{os.path.join(path, "dataset.json")}: invalid labels (the label of '
                               '00000/img00000002.png is 2000; class labels must be 0..9)')
    path = make_dataset(tmp_path / 'count', n=4, labels=labels_of(NAMES, [0, 1, 1, 0], num_classes='ten'))
    with pytest.raises(ValueError, match=r'dataset\.json: num_classes must be a positive integer up to 1048576, got "ten"$'):
        ImageFolderDataset(path).label_dim

@pytest.mark.parametrize('bad, shown, rule', [
    (-1, '-1', 'class labels must not be negative'),
    (1.5, '1.5', 'labels must be class indices or vectors of numbers'),
    (2.0, '2.0', 'labels must be class indices or vectors of numbers'),
    ('cat', '"cat"', 'labels must be class indices or vectors of numbers'),
    (True, 'true', 'labels must be class indices or vectors of numbers'),
    (None, 'null', 'labels must be class indices or vectors of numbers'),
])
def test_bad_class_label_is_named(tmp_path, bad, shown, rule):
    path = make_dataset(tmp_path / 'ds', n=4, labels=labels_of(NAMES, [0, 1, bad, 3]))
    ds = ImageFolderDataset(path)
    with pytest.raises(ValueError) as info:
        ds.has_labels
    assert str(info.value) == (f'{os.path.join(path, "dataset.json")}: invalid labels (the label of '
                               f'00000/img00000002.png is {shown}; {rule})')
    assert ImageFolderDataset(path, use_labels=False).label_dim == 0

def test_bad_label_vectors_are_named(tmp_path):
    path = make_dataset(tmp_path / 'ragged', n=3, labels=labels_of(NAMES, [[1, 2], [3], [4, 5]]))
    with pytest.raises(ValueError, match=r'dataset\.json: invalid labels \(the label of 00000/img00000001\.png is \[3\]; '
                                         r'labels must be class indices or vectors of numbers of one length \(2\)\)$'):
        ImageFolderDataset(path).label_dim
    path = make_dataset(tmp_path / 'text', n=2, labels=labels_of(NAMES, [['a', 'b'], ['c', 'd']]))
    with pytest.raises(ValueError, match=r'invalid labels \(the label of 00000/img00000000\.png is \["a", "b"\]'):
        ImageFolderDataset(path).label_dim
    path = make_dataset(tmp_path / 'mixed', n=3, labels=labels_of(NAMES, [[0.5, 1], 2, [1, 1]]))
    with pytest.raises(ValueError, match=r'invalid labels \(the label of 00000/img00000001\.png is 2; '):
        ImageFolderDataset(path).label_dim
    path = make_dataset(tmp_path / 'huge', n=2, labels=labels_of(NAMES, [0, 2 ** 70]))
    with pytest.raises(ValueError, match=r'invalid labels \(the label of 00000/img00000001\.png is 1180591620717411303424; '
                                         r'not a usable class label: training takes at most 1048576 classes\)$'):
        ImageFolderDataset(path).label_dim

def test_labels_missing_for_several_files(tmp_path):
    path = make_dataset(tmp_path / 'ds', n=4, labels=labels_of(NAMES[:1], [1]))
    with pytest.raises(ValueError) as info:
        ImageFolderDataset(path).label_dim
    assert str(info.value) == (f'{os.path.join(path, "dataset.json")}: no label for 00000/img00000001.png '
                               '(and 2 more of 4 images)')
