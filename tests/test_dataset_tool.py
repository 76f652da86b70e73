"""dataset_tool.py: sources (folders, zips, IDX), transforms with known pixels, output layout, determinism, errors,
and the encode/decode pipeline with a stand-in VAE."""

import gzip
import io
import json
import os
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dataset_tool
from dataset_tool import cmdline

FASHION = '/usr/share/datasets/fashion-mnist'

#----------------------------------------------------------------------------
# Helpers.

def save_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(array).save(path)

def pattern(h, w, seed=0):
    """A random but fixed RGB image."""
    return np.random.RandomState(seed).randint(0, 256, size=[h, w, 3], dtype=np.uint8)

def run_cli(*args, env=None):
    return CliRunner().invoke(cmdline, list(args), env=env)

def read_zip(path):
    with zipfile.ZipFile(path) as z:
        return {info.filename: (info, z.read(info.filename)) for info in z.infolist()}

def png_array(data):
    return np.array(PIL.Image.open(io.BytesIO(data)))

def write_idx(path, array, gz=True):
    """Write an IDX file from scratch: 0, 0, type 0x08 (uint8), ndim, big-endian sizes, data."""
    array = np.asarray(array, dtype=np.uint8)
    data = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype='>u4').tobytes() + array.tobytes()
    with (gzip.open(path, 'wb') if gz else open(path, 'wb')) as f:
        f.write(data)

#----------------------------------------------------------------------------
# Sources and labels.

def test_class_subfolders_become_labels(tmp_path):
    src = tmp_path / 'src'
    images = {}
    for cls, n in [('n002', 2), ('n001', 1), ('n010', 2)]:
        for i in range(n):
            img = pattern(8, 8, seed=len(images))
            images[f'{cls}/{i}.png'] = img
            save_png(str(src / cls / f'{i}.png'), img)
    save_png(str(src / 'n001' / 'grey.png'), np.full([8, 8], 77, dtype=np.uint8)) # Mode L.
    images['n001/grey.png'] = np.full([8, 8, 3], 77, dtype=np.uint8)

    dest = tmp_path / 'out.zip'
    result = run_cli('convert', f'--source={src}', f'--dest={dest}')
    assert result.exit_code == 0, result.output
    files = read_zip(dest)
    names = sorted(images) # Sorted input order: n001/0, n001/grey, n002/0, n002/1, n010/0, n010/1.
    expected_labels = [0, 0, 1, 1, 2, 2]
    meta = json.loads(files['dataset.json'][1])
    assert meta == {'labels': [[f'00000/img{i:08d}.png', expected_labels[i]] for i in range(6)]}
    for i, name in enumerate(names):
        info, data = files[f'00000/img{i:08d}.png']
        assert info.compress_type == zipfile.ZIP_STORED
        assert info.date_time == (1980, 1, 1, 0, 0, 0)
        img = png_array(data)
        assert img.shape == (8, 8, 3) # Grey became RGB.
        np.testing.assert_array_equal(img, images[name])
        assert len(data) > 8 * (8 * 3 + 1) # compress_level=0 stores the raw scanlines.
    # dataset.json is the last member, with json.dumps' default separators.
    assert list(files)[-1] == 'dataset.json'
    assert files['dataset.json'][1].startswith(b'{"labels": [["00000/img00000000.png", 0], ')

def test_single_folder_has_no_labels_and_max_images(tmp_path):
    src = tmp_path / 'src'
    for i in range(5):
        save_png(str(src / f'{i}.png'), pattern(4, 4, seed=i))
    dest = tmp_path / 'out'
    result = run_cli('convert', f'--source={src}', f'--dest={dest}', '--max-images=3')
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(dest / '00000')) == ['img00000000.png', 'img00000001.png', 'img00000002.png']
    assert json.loads((dest / 'dataset.json').read_text()) == {'labels': None}
    np.testing.assert_array_equal(png_array((dest / '00000' / 'img00000002.png').read_bytes()), pattern(4, 4, seed=2))
    assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')] # The temporary folder was renamed.

def test_zip_source_with_dataset_json_labels(tmp_path):
    src = tmp_path / 'src.zip'
    with zipfile.ZipFile(src, 'w') as z:
        for i, name in enumerate(['b/x.png', 'a/y.png', 'c.png']):
            buf = io.BytesIO()
            PIL.Image.fromarray(pattern(4, 4, seed=i)).save(buf, format='png')
            z.writestr(name, buf.getvalue())
        z.writestr('dataset.json', json.dumps({'labels': [['b/x.png', 7], ['a/y.png', 3], ['c.png', 5]]}))
    dest = tmp_path / 'out'
    result = run_cli('convert', f'--source={src}', f'--dest={dest}')
    assert result.exit_code == 0, result.output
    meta = json.loads((dest / 'dataset.json').read_text())
    # Sorted order a/y.png, b/x.png, c.png; labels from dataset.json, not from the sub-folders.
    assert meta['labels'] == [['00000/img00000000.png', 3], ['00000/img00000001.png', 7], ['00000/img00000002.png', 5]]
    np.testing.assert_array_equal(png_array((dest / '00000' / 'img00000001.png').read_bytes()), pattern(4, 4, seed=0))

def test_dataset_json_with_null_labels_falls_back_to_subfolders_as_edm2(tmp_path):
    # EDM2 reads `"labels": null` as "no labels in dataset.json" and then applies its sub-folder rule: two top-level
    # sub-folders are classes 0 and 1 (folder and zip sources alike).
    src = tmp_path / 'src'
    save_png(str(src / '00000' / 'img00000000.png'), pattern(4, 4, seed=0))
    save_png(str(src / '00001' / 'img00001000.png'), pattern(4, 4, seed=1))
    (src / 'dataset.json').write_text(json.dumps({'labels': None}))
    result = run_cli('convert', f'--source={src}', f'--dest={tmp_path / "out.zip"}')
    assert result.exit_code == 0, result.output
    assert 'labels: 2 top-level sub-folders (dataset.json has "labels": null)' in result.output
    expected = {'labels': [['00000/img00000000.png', 0], ['00000/img00000001.png', 1]]}
    assert json.loads(read_zip(tmp_path / 'out.zip')['dataset.json'][1]) == expected
    with zipfile.ZipFile(tmp_path / 'src.zip', 'w') as z:
        z.write(src / '00000' / 'img00000000.png', '00000/img00000000.png')
        z.write(src / '00001' / 'img00001000.png', '00001/img00001000.png')
        z.writestr('dataset.json', json.dumps({'labels': None}))
    assert run_cli('convert', f'--source={tmp_path / "src.zip"}', f'--dest={tmp_path / "out2.zip"}').exit_code == 0
    assert json.loads(read_zip(tmp_path / 'out2.zip')['dataset.json'][1]) == expected
    # A single top-level folder: no labels, as in EDM2.
    single = tmp_path / 'single'
    save_png(str(single / 'x' / 'a.png'), pattern(4, 4, seed=0))
    save_png(str(single / 'x' / 'b.png'), pattern(4, 4, seed=1))
    (single / 'dataset.json').write_text(json.dumps({'labels': None}))
    assert run_cli('convert', f'--source={single}', f'--dest={tmp_path / "out3.zip"}').exit_code == 0
    assert json.loads(read_zip(tmp_path / 'out3.zip')['dataset.json'][1]) == {'labels': None}

def test_zip_without_dataset_json_labels_by_top_level_folder(tmp_path):
    # Members sorted by name; labels are the sorted index of the top-level folder; files at the root count as ''.
    with zipfile.ZipFile(tmp_path / 'src.zip', 'w') as z:
        for name, seed in [('dog/1.png', 0), ('cat/2.png', 1), ('cat/1.png', 2), ('root.png', 3)]:
            buf = io.BytesIO()
            PIL.Image.fromarray(pattern(4, 4, seed=seed)).save(buf, format='png')
            z.writestr(name, buf.getvalue())
    result = run_cli('convert', f'--source={tmp_path / "src.zip"}', f'--dest={tmp_path / "out.zip"}')
    assert result.exit_code == 0, result.output
    out = read_zip(tmp_path / 'out.zip')
    # Sorted: cat/1.png (cat=1), cat/2.png (1), dog/1.png (dog=2), root.png ('' = 0).
    assert json.loads(out['dataset.json'][1])['labels'] == [['00000/img00000000.png', 1], ['00000/img00000001.png', 1],
                                                           ['00000/img00000002.png', 2], ['00000/img00000003.png', 0]]
    np.testing.assert_array_equal(png_array(out['00000/img00000000.png'][1]), pattern(4, 4, seed=2))

@pytest.mark.parametrize('labels, message', [
    ([['a.png', 1]], 'no label for 1 of the 2 images (first: b.png)'),
    ([['a.png', -1], ['b.png', 0]], 'invalid labels (the label of a.png is -1; class labels must not be negative)'),
    ([['a.png', 'cat'], ['b.png', 0]], 'invalid labels (the label of a.png is "cat"; labels must be class indices or vectors of numbers)'),
    ([['a.png', 1.5], ['b.png', 0]], 'invalid labels (the label of a.png is 1.5; labels must be class indices or vectors of numbers)'),
    ([['a.png', True], ['b.png', 0]], 'invalid labels (the label of a.png is true; labels must be class indices or vectors of numbers)'),
    ([['a.png', ['x']], ['b.png', [1.0]]], 'invalid labels (the label of a.png is ["x"]; labels must be class indices or vectors of numbers)'),
    ([['a.png', 2000], ['b.png', 0]], 'invalid labels (the label of a.png is 2000; class labels must be 0..9)'),
])
def test_bad_labels_are_refused_before_any_work(tmp_path, labels, message):
    src = tmp_path / 'src'
    save_png(str(src / 'a.png'), pattern(4, 4, seed=0))
    save_png(str(src / 'b.png'), pattern(4, 4, seed=1))
    (src / 'dataset.json').write_text(json.dumps({'labels': labels}))
    result = run_cli('convert', f'--source={src}', f'--dest={tmp_path / "out"}', '--num-classes=10')
    assert result.exit_code == 1
    assert result.output.strip() == f'Error: {src}/dataset.json: {message}' or message in result.output
    assert result.output.count('\n') == 1 and 'Traceback' not in result.output
    assert sorted(os.listdir(tmp_path)) == ['src']

def test_labels_accepted_and_class_count_of_subfolders(tmp_path):
    src = tmp_path / 'src'
    save_png(str(src / 'a.png'), pattern(4, 4, seed=0))
    save_png(str(src / 'b.png'), pattern(4, 4, seed=1))
    (src / 'dataset.json').write_text(json.dumps({'labels': [['a.png', 9], ['b.png', 0]]}))
    assert run_cli('convert', f'--source={src}', f'--dest={tmp_path / "o.zip"}', '--num-classes=10').exit_code == 0
    doc = json.loads(read_zip(tmp_path / 'o.zip')['dataset.json'][1])
    assert doc['labels'][0][1] == 9 and doc['num_classes'] == 10  # kept, so training makes 10-long one-hot labels
    from training.dataset import ImageFolderDataset
    assert ImageFolderDataset(str(tmp_path / 'o.zip')).label_dim == 10
    assert run_cli('convert', f'--source={src}', f'--dest={tmp_path / "n.zip"}').exit_code == 0
    assert 'num_classes' not in json.loads(read_zip(tmp_path / 'n.zip')['dataset.json'][1])  # EDM2's file otherwise
    folders = tmp_path / 'folders'
    for i in range(3):
        save_png(str(folders / f'c{i}' / 'x.png'), pattern(4, 4, seed=i))
    result = run_cli('convert', f'--source={folders}', f'--dest={tmp_path / "p.zip"}', '--num-classes=2')
    assert result.exit_code == 1 and f'Error: {folders}: 3 top-level sub-folders give 3 classes' in result.output

def test_idx_source_synthetic(tmp_path):
    rs = np.random.RandomState(1)
    images = rs.randint(0, 256, size=[5, 4, 4], dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    write_idx(tmp_path / 'train-images-idx3-ubyte.gz', images)
    write_idx(tmp_path / 'train-labels-idx1-ubyte.gz', labels)
    write_idx(tmp_path / 't10k-images-idx3-ubyte', images[::-1], gz=False)   # Uncompressed test split.
    write_idx(tmp_path / 't10k-labels-idx1-ubyte', labels[::-1], gz=False)

    # The folder takes the training split.
    out = tmp_path / 'train.zip'
    result = run_cli('convert', f'--source={tmp_path}', f'--dest={out}')
    assert result.exit_code == 0, result.output
    files = read_zip(out)
    assert json.loads(files['dataset.json'][1])['labels'] == [[f'00000/img{i:08d}.png', int(labels[i])] for i in range(5)]
    for i in range(5):
        img = png_array(files[f'00000/img{i:08d}.png'][1])
        np.testing.assert_array_equal(img, np.repeat(images[i][:, :, None], 3, axis=2))

    # Naming the test file directly (uncompressed), limited to 2 images.
    out = tmp_path / 'test.zip'
    result = run_cli('convert', f'--source={tmp_path / "t10k-images-idx3-ubyte"}', f'--dest={out}', '--max-images=2')
    assert result.exit_code == 0, result.output
    files = read_zip(out)
    assert json.loads(files['dataset.json'][1])['labels'] == [['00000/img00000000.png', 5], ['00000/img00000001.png', 1]]
    np.testing.assert_array_equal(png_array(files['00000/img00000000.png'][1])[:, :, 1], images[4])

def test_idx_without_labels_file_and_ambiguous_folder(tmp_path):
    write_idx(tmp_path / 'a-images-idx3-ubyte.gz', np.zeros([2, 4, 4]))
    write_idx(tmp_path / 'b-images-idx3-ubyte.gz', np.zeros([2, 4, 4]))
    result = run_cli('convert', f'--source={tmp_path / "a-images-idx3-ubyte.gz"}', f'--dest={tmp_path / "o.zip"}')
    assert result.exit_code == 0, result.output
    assert json.loads(read_zip(tmp_path / 'o.zip')['dataset.json'][1]) == {'labels': None}
    result = run_cli('convert', f'--source={tmp_path}', f'--dest={tmp_path / "p.zip"}')
    assert result.exit_code == 1
    assert 'several IDX image files' in result.output and 'a-images-idx3-ubyte.gz' in result.output

def test_idx_errors_name_the_file(tmp_path):
    path = tmp_path / 'x-images-idx3-ubyte'
    write_idx(path, np.zeros([3, 4, 4]), gz=False)
    path.write_bytes(path.read_bytes()[:-5]) # Truncated data.
    result = run_cli('convert', f'--source={path}', f'--dest={tmp_path / "o.zip"}')
    assert result.exit_code == 1
    assert f'Error: {path}: truncated IDX file' in result.output
    path.write_bytes(b'\x12\x34\x56\x78' + bytes(100))
    result = run_cli('convert', f'--source={path}', f'--dest={tmp_path / "o.zip"}')
    assert f'{path}: not an IDX file' in result.output
    # Labels that do not match the images in count.
    write_idx(tmp_path / 'x-images-idx3-ubyte', np.zeros([3, 4, 4]), gz=False)
    write_idx(tmp_path / 'x-labels-idx1-ubyte', np.zeros([2]), gz=False)
    result = run_cli('convert', f'--source={path}', f'--dest={tmp_path / "o.zip"}')
    assert result.exit_code == 1 and 'x-labels-idx1-ubyte: expected 3 integer labels' in result.output
    assert not (tmp_path / 'o.zip').exists()

@pytest.mark.skipif(not os.path.isfile(f'{FASHION}/train-images-idx3-ubyte.gz'), reason='Fashion-MNIST not installed')
def test_fashion_mnist_first_50(tmp_path):
    dest = tmp_path / 'fm.zip'
    r = dataset_tool.convert_dataset(f'{FASHION}/train-images-idx3-ubyte.gz', str(dest), max_images=50,
                                     resolution=(32, 32), verbose=False)
    assert r.num_images == 50 and r.has_labels and r.shape == [3, 32, 32]
    # Labels read independently from the IDX file: 8-byte header, then one byte per label.
    with gzip.open(f'{FASHION}/train-labels-idx1-ubyte.gz', 'rb') as f:
        expected = list(f.read(8 + 50)[8:])
    assert expected[:10] == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5] # Fashion-MNIST's well-known first labels.
    files = read_zip(dest)
    assert len(files) == 51
    assert json.loads(files['dataset.json'][1])['labels'] == [[f'00000/img{i:08d}.png', expected[i]] for i in range(50)]
    with gzip.open(f'{FASHION}/train-images-idx3-ubyte.gz', 'rb') as f:
        first = np.frombuffer(f.read(16 + 784)[16:], dtype=np.uint8).reshape(28, 28)
    img = png_array(files['00000/img00000000.png'][1])
    assert img.shape == (32, 32, 3)
    np.testing.assert_array_equal(img[:, :, 0], img[:, :, 2]) # Still grey.
    # 28x28 -> 32x32 with Lanczos (no transform).
    np.testing.assert_array_equal(img[:, :, 0], np.array(PIL.Image.fromarray(first).resize((32, 32), PIL.Image.LANCZOS)))

#----------------------------------------------------------------------------
# Determinism and atomic output.

def test_same_input_gives_identical_bytes(tmp_path):
    src = tmp_path / 'src'
    for cls in ['a', 'b']:
        for i in range(3):
            save_png(str(src / cls / f'{i}.png'), pattern(16, 20, seed=i + (cls == 'b') * 10))
    args = ['--transform=center-crop', '--resolution=8x8']
    assert run_cli('convert', f'--source={src}', f'--dest={tmp_path / "one.zip"}', *args).exit_code == 0
    os.utime(src / 'a' / '0.png', (1e9, 1e9)) # Source timestamps must not matter.
    assert run_cli('convert', f'--source={src}', f'--dest={tmp_path / "two.zip"}', *args).exit_code == 0
    one = (tmp_path / 'one.zip').read_bytes()
    assert one == (tmp_path / 'two.zip').read_bytes()
    # Folder output: the same files with the same bytes as the zip members.
    assert run_cli('convert', f'--source={src}', f'--dest={tmp_path / "dir"}', *args).exit_code == 0
    for name, (_info, data) in read_zip(tmp_path / 'one.zip').items():
        assert (tmp_path / 'dir' / name).read_bytes() == data

def test_failure_leaves_nothing_and_keeps_old_output(tmp_path):
    src = tmp_path / 'src'
    for i in range(3):
        save_png(str(src / f'{i}.png'), pattern(4, 4, seed=i))
    dest = tmp_path / 'out.zip'
    assert run_cli('convert', f'--source={src}', f'--dest={dest}').exit_code == 0
    before = dest.read_bytes()
    (src / '2.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage') # Corrupt last image.
    result = run_cli('convert', f'--source={src}', f'--dest={dest}', '--overwrite')
    assert result.exit_code == 1
    assert f'Error: {src / "2.png"}: cannot read image' in result.output
    assert dest.read_bytes() == before
    result = run_cli('convert', f'--source={src}', f'--dest={tmp_path / "folder"}')
    assert result.exit_code == 1
    assert sorted(os.listdir(tmp_path)) == ['out.zip', 'src'] # No temporary file or folder left behind.

#----------------------------------------------------------------------------
# Transforms with known pixels.

def blocks(h, w, size):
    """Image of size x size constant blocks; block (by, bx) has colour (by, bx, 7)."""
    by, bx = np.meshgrid(np.arange(h // size), np.arange(w // size), indexing='ij')
    small = np.stack([by * 3, bx * 3, np.full_like(by, 7)], axis=2).astype(np.uint8)
    return np.repeat(np.repeat(small, size, axis=0), size, axis=1)

def test_dhariwal_box_halving_is_exact_on_blocks():
    # 256x128 (w x h), S=32: BOX to 128x64, again to 64x32 (32 < 64 stops); scale 1; crop columns 16..48.
    img = blocks(128, 256, 4)
    out = dataset_tool.center_crop_dhariwal(img, 32)
    assert out.shape == (32, 32, 3)
    for y in [0, 5, 31]:
        for x in [0, 9, 31]:
            assert list(out[y, x]) == [y * 3, (x + 16) * 3, 7]

def test_dhariwal_steps_300x200():
    img = pattern(200, 300, seed=5)
    out = dataset_tool.center_crop_dhariwal(img, 32)
    # Steps written out: 300x200 -> 150x100 -> 75x50 (BOX; 50 < 64), bicubic to (48, 32), crop x 8..40, y 0..32.
    pil = PIL.Image.fromarray(img).resize((150, 100), PIL.Image.BOX).resize((75, 50), PIL.Image.BOX)
    pil = pil.resize((48, 32), PIL.Image.BICUBIC)
    np.testing.assert_array_equal(out, np.array(pil)[0:32, 8:40])

def test_dhariwal_rounds_halves_to_even():
    # 8x14 (w x h), S=6: no halving (8 < 12); scale 0.75; height 14*0.75 = 10.5 -> round() = 10 (not 11);
    # crop rows (10-6)//2 = 2.
    img = pattern(14, 8, seed=6)
    out = dataset_tool.center_crop_dhariwal(img, 6)
    resized = np.array(PIL.Image.fromarray(img).resize((6, 10), PIL.Image.BICUBIC))
    np.testing.assert_array_equal(out, resized[2:8, 0:6])
    half_up = np.array(PIL.Image.fromarray(img).resize((6, 11), PIL.Image.BICUBIC))[2:8, 0:6]
    assert not np.array_equal(out, half_up)

def test_dhariwal_through_cli(tmp_path):
    img = pattern(200, 300, seed=7)
    save_png(str(tmp_path / 'src' / 'a.png'), img)
    result = run_cli('convert', f'--source={tmp_path / "src"}', f'--dest={tmp_path / "o.zip"}',
                     '--transform=center-crop-dhariwal', '--resolution=32x32')
    assert result.exit_code == 0, result.output
    out = png_array(read_zip(tmp_path / 'o.zip')['00000/img00000000.png'][1])
    np.testing.assert_array_equal(out, dataset_tool.center_crop_dhariwal(img, 32))

def test_center_crop_known_pixels():
    img = pattern(30, 40, seed=8) # h=30, w=40: square of 30 at columns 5..35; same size, so no resampling.
    np.testing.assert_array_equal(dataset_tool.center_crop(img, 30, 30), img[:, 5:35])
    img = pattern(41, 30, seed=9) # Odd difference: rows (41-30)//2 = 5 .. (41+30)//2 = 35.
    np.testing.assert_array_equal(dataset_tool.center_crop(img, 30, 30), img[5:35])
    img = pattern(30, 40, seed=10)
    expected = np.array(PIL.Image.fromarray(img[:, 5:35]).resize((16, 16), PIL.Image.LANCZOS))
    np.testing.assert_array_equal(dataset_tool.center_crop(img, 16, 16), expected)

def test_center_crop_wide_known_pixels_and_skip(tmp_path):
    img = pattern(16, 32, seed=11) # w=32, h=16 at 32x16: band height round(32*16/32) = 16, no resampling.
    out = dataset_tool.center_crop_wide(img, 32, 16)
    assert out.shape == (32, 32, 3)
    np.testing.assert_array_equal(out[8:24], img)
    assert out[:8].max() == 0 and out[24:].max() == 0
    assert dataset_tool.center_crop_wide(pattern(16, 16), 32, 16) is None # Narrower than W: skipped.

    # Through the CLI: the skipped image still uses up its index.
    for i, (h, w) in enumerate([(16, 32), (8, 8), (20, 40)]):
        save_png(str(tmp_path / 'src' / f'{i}.png'), pattern(h, w, seed=i))
    result = run_cli('convert', f'--source={tmp_path / "src"}', f'--dest={tmp_path / "o"}',
                     '--transform=center-crop-wide', '--resolution=32x16')
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path / 'o' / '00000')) == ['img00000000.png', 'img00000002.png']
    assert '1 skipped' in result.output

def test_resolution_without_transform_uses_lanczos(tmp_path):
    img = pattern(12, 20, seed=12)
    expected = np.array(PIL.Image.fromarray(img).resize((16, 16), PIL.Image.LANCZOS))
    np.testing.assert_array_equal(dataset_tool.make_transform(None, 16, 16)(img), expected)
    np.testing.assert_array_equal(dataset_tool.make_transform(None)(img), img)

#----------------------------------------------------------------------------
# Errors: EDM2's messages, one line, exit status 1 (2 for bad option syntax).

@pytest.fixture
def one_image(tmp_path):
    save_png(str(tmp_path / 'src' / 'a.png'), pattern(12, 16))
    return tmp_path / 'src'

@pytest.mark.parametrize('args, code, message', [
    (['--source=/nonexistent/x'], 1, 'Error: Missing input file or directory: /nonexistent/x'),
    (['--dest='], 1, 'Error: --dest output filename or directory must not be an empty string'),
    ([], 1, 'Error: Image dimensions after scale and crop are required to be square.  Got 16x12'),
    (['--resolution=24x24'], 1, 'Error: Image width/height after scale and crop are required to be power-of-two'),
    (['--resolution=32by32'], 2, 'cannot parse tuple 32by32'),
    (['--resolution=0x0'], 2, '0x0: width and height must be 1 or more'),
    (['--transform=center-crop'], 1, 'Error: must specify --resolution=WxH when using center-crop transform'),
    (['--transform=center-crop-dhariwal', '--resolution=32x16'], 1,
     'Error: width and height must match in --resolution=WxH when using center-crop-dhariwal transform'),
    (['--transform=bogus'], 2, "'bogus' is not one of"),
    (['--max-images=0'], 2, 'Invalid value for \'--max-images\''),
])
def test_cli_errors(tmp_path, one_image, args, code, message):
    paths = {'source': str(one_image), 'dest': str(tmp_path / 'out.zip')}
    extra = []
    for arg in args:
        key, _, value = arg[2:].partition('=')
        if key in paths:
            paths[key] = value
        else:
            extra.append(arg)
    result = run_cli('convert', f'--source={paths["source"]}', f'--dest={paths["dest"]}', *extra)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert not (tmp_path / 'out.zip').exists()

def test_cli_errors_about_paths(tmp_path, one_image):
    (tmp_path / 'notzip.tar').write_bytes(b'x')
    result = run_cli('convert', f'--source={tmp_path / "notzip.tar"}', f'--dest={tmp_path / "o.zip"}')
    assert result.exit_code == 1 and f'Error: Only zip archives are supported: {tmp_path / "notzip.tar"}' in result.output
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'keep.txt').write_text('precious')
    result = run_cli('convert', f'--source={one_image}', f'--dest={tmp_path / "full"}', '--resolution=8x8')
    assert result.exit_code == 1 and '--dest folder must be empty' in result.output
    assert os.listdir(tmp_path / 'full') == ['keep.txt']
    result = run_cli('convert', f'--source={one_image}', f'--dest={tmp_path / "o.zip"}', '--resolution=8x8',
                     env={'WORLD_SIZE': '2'})
    assert result.exit_code == 1 and 'Error: Distributed execution is not supported.' in result.output
    (tmp_path / 'bad.zip').write_bytes(b'not a zip at all')
    result = run_cli('convert', f'--source={tmp_path / "bad.zip"}', f'--dest={tmp_path / "o.zip"}')
    assert result.exit_code == 1 and f'{tmp_path / "bad.zip"}: cannot read zip archive' in result.output

def test_unequal_images_are_named(tmp_path):
    save_png(str(tmp_path / 'src' / 'a.png'), pattern(8, 8))
    save_png(str(tmp_path / 'src' / 'b.png'), pattern(4, 4))
    result = run_cli('convert', f'--source={tmp_path / "src"}', f'--dest={tmp_path / "o.zip"}')
    assert result.exit_code == 1
    assert 'Error: Image b.png attributes must be equal across all images of the dataset.  Got: width 4 (dataset 8)' in result.output
    errors = [line for line in result.output.splitlines() if 'Error' in line]
    assert len(errors) == 1 and errors[0].endswith('height 4 (dataset 8)') # One line, every differing attribute.

#----------------------------------------------------------------------------
# encode / decode with a stand-in VAE inside the real StabilityVAEEncoder.

class FakeVAE:
    """encode: 8x8 average pooling, channels (r, g, b, mean) x 10; decode: the inverse on constant blocks."""
    class Posterior:
        def __init__(self, mean):
            self.mean = mean
            self.std = torch.full_like(mean, 0.25)

    def encode(self, x):
        assert 0 <= x.min() and x.max() <= 1 # Pixels in [0,1].
        m = torch.nn.functional.avg_pool2d(x, 8) * 10
        return {'latent_dist': self.Posterior(torch.cat([m, m.mean(dim=1, keepdim=True)], dim=1))}

    def decode(self, z):
        return {'sample': torch.nn.functional.interpolate(z[:, :3] / 10, scale_factor=8, mode='nearest')}

    def to(self, _device):
        return self

def fake_encoder():
    from training.encoders import StabilityVAEEncoder
    enc = StabilityVAEEncoder(batch_size=2)
    enc._vae = FakeVAE()
    return enc

def test_encode_then_decode_round_trip(tmp_path):
    src = tmp_path / 'src'
    for cls in ['a', 'b']:
        for i in range(2):
            save_png(str(src / cls / f'{i}.png'), blocks(16, 16, 8) * (i + 1))
    enc = fake_encoder()
    r = dataset_tool.encode_dataset(str(src), str(tmp_path / 'lat.zip'), encoder=enc, device='cpu', verbose=False)
    assert r.num_images == 4
    files = read_zip(tmp_path / 'lat.zip')
    assert sorted(files) == ['00000/img-mean-std-00000000.npy', '00000/img-mean-std-00000001.npy',
                             '00000/img-mean-std-00000002.npy', '00000/img-mean-std-00000003.npy', 'dataset.json']
    assert json.loads(files['dataset.json'][1])['labels'][2] == ['00000/img-mean-std-00000002.npy', 1]
    lat = np.load(io.BytesIO(files['00000/img-mean-std-00000001.npy'][1]))
    assert lat.shape == (8, 2, 2) and lat.dtype == np.float32
    np.testing.assert_allclose(lat[4:], 0.25) # Stored std.
    np.testing.assert_allclose(lat[:3, 1, 0], np.array([3, 0, 7]) * 2 / 255 * 10, rtol=1e-6) # Block (1, 0), doubled.

    # decode reads the .npy files (EDM2's cannot) and gives back the pixels, up to the truncation to uint8.
    r = dataset_tool.decode_dataset(str(tmp_path / 'lat.zip'), str(tmp_path / 'dec'), encoder=enc, device='cpu',
                                    verbose=False)
    assert r.num_images == 4
    meta = json.loads((tmp_path / 'dec' / 'dataset.json').read_text())
    assert [label for _name, label in meta['labels']] == [0, 0, 1, 1]
    out = png_array((tmp_path / 'dec' / '00000' / 'img00000001.png').read_bytes()).astype(int)
    assert np.abs(out - blocks(16, 16, 8).astype(int) * 2).max() <= 1

def test_encode_decode_need_diffusers(tmp_path, one_image):
    import importlib.util
    if importlib.util.find_spec('diffusers') is not None:
        pytest.skip('diffusers is installed')
    result = run_cli('encode', f'--source={one_image}', f'--dest={tmp_path / "lat.zip"}')
    assert result.exit_code == 1 and 'needs the diffusers package' in result.output
    assert not (tmp_path / 'lat.zip').exists()
    np.save(tmp_path / 'x.npy', np.zeros([8, 2, 2], np.float32))
    result = run_cli('decode', f'--source={tmp_path}', f'--dest={tmp_path / "dec.zip"}')
    assert result.exit_code == 1 and 'needs the diffusers package' in result.output

#----------------------------------------------------------------------------
# Destinations: never replaced without --overwrite, checked before any work, no leftovers.

def test_existing_dest_needs_overwrite(tmp_path, one_image):
    dest = tmp_path / 'out.zip'
    dest.write_bytes(b'precious, not even a zip')
    result = run_cli('convert', f'--source={one_image}', f'--dest={dest}', '--resolution=8x8')
    assert result.exit_code == 1 and f'Error: {dest}: exists; give --overwrite to replace it' in result.output
    assert dest.read_bytes() == b'precious, not even a zip'
    assert run_cli('convert', f'--source={one_image}', f'--dest={dest}', '--resolution=8x8', '--overwrite').exit_code == 0
    assert set(read_zip(dest)) == {'00000/img00000000.png', 'dataset.json'}
    # A dataset folder can be replaced with --overwrite; any other non-empty folder never.
    folder = tmp_path / 'ds'
    assert run_cli('convert', f'--source={one_image}', f'--dest={folder}', '--resolution=8x8').exit_code == 0
    result = run_cli('convert', f'--source={one_image}', f'--dest={folder}', '--resolution=4x4')
    assert result.exit_code == 1 and '--dest folder must be empty' in result.output
    assert run_cli('convert', f'--source={one_image}', f'--dest={folder}', '--resolution=4x4', '--overwrite').exit_code == 0
    assert png_array((folder / '00000' / 'img00000000.png').read_bytes()).shape == (4, 4, 3)
    other = tmp_path / 'other'
    other.mkdir()
    (other / 'keep.txt').write_text('precious')
    result = run_cli('convert', f'--source={one_image}', f'--dest={other}', '--resolution=8x8', '--overwrite')
    assert result.exit_code == 1 and 'replaces only a dataset folder' in result.output
    assert os.listdir(other) == ['keep.txt']
    assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]

def test_unwritable_or_directory_dest_fails_before_work(tmp_path, one_image, monkeypatch):
    (tmp_path / 'dir.zip').mkdir()
    result = run_cli('convert', f'--source={one_image}', f'--dest={tmp_path / "dir.zip"}', '--resolution=8x8')
    assert result.exit_code == 1 and f'Error: {tmp_path / "dir.zip"}: is a directory' in result.output
    (tmp_path / 'afile').write_text('x')
    result = run_cli('convert', f'--source={one_image}', f'--dest={tmp_path / "afile" / "o.zip"}', '--resolution=8x8')
    assert result.exit_code == 1 and f'Error: {tmp_path / "afile" / "o.zip"}: {tmp_path / "afile"} is not a directory' in result.output
    readonly = tmp_path / 'ro'
    readonly.mkdir()
    # Root ignores permission bits, so the check's own question (os.access) is answered "no" for this folder.
    real_access = os.access
    monkeypatch.setattr(dataset_tool.os, 'access', lambda p, mode: False if str(p) == str(readonly) else real_access(p, mode))
    opened = []
    monkeypatch.setattr(dataset_tool, 'open_source', lambda *a, **k: opened.append(a))  # no work may start
    result = run_cli('convert', f'--source={one_image}', f'--dest={readonly / "sub" / "o.zip"}', '--resolution=8x8')
    assert result.exit_code == 1
    assert f'Error: {readonly / "sub" / "o.zip"}: permission denied (cannot write in {readonly})' in result.output
    assert opened == [] and os.listdir(readonly) == []

def test_leftovers_of_a_killed_run_are_removed(tmp_path, one_image):
    import subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    zip_left = tmp_path / f'.out.zip.{pid}.0123abcd.tmp'
    zip_left.write_bytes(b'half a zip')
    dir_left = tmp_path / f'.ds.{pid}.89abcdef.tmp'
    (dir_left / '00000').mkdir(parents=True)
    alive = tmp_path / f'.out.zip.{os.getppid()}.0123abcd.tmp'  # a live process's: not ours to remove
    alive.write_bytes(b'in progress')
    unrelated = tmp_path / '.other.zip.1.0123abcd.tmp'
    unrelated.write_bytes(b'x')
    assert run_cli('convert', f'--source={one_image}', f'--dest={tmp_path / "out.zip"}', '--resolution=8x8').exit_code == 0
    assert run_cli('convert', f'--source={one_image}', f'--dest={tmp_path / "ds"}', '--resolution=8x8').exit_code == 0
    assert not zip_left.exists() and not dir_left.exists()
    assert alive.exists() and unrelated.exists()
