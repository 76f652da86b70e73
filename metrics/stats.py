"""Feature statistics of image sets, reference files, and the metrics computed from them (FID: Heusel et al. 2017; FD_DINOv2: Stein et al. 2023).

Statistics are the mean and the unbiased covariance of a detector's features, accumulated as float64 sums
(Σf, Σffᵀ, n) over batches and, under torch.distributed, summed over all processes at the end. The result is a
plain dict in EDM2's reference layout, `{'num_images': n, 'fid': {'mu', 'sigma'}, 'fd_dinov2': {'mu', 'sigma'}}`
(only the metrics computed), which `save_stats` pickles; EDM1's `.npz` (`mu`, `sigma` of FID) is read and written.
"""

import os
import pickle

import numpy as np
import torch
import tqdm

import dnnlib
from metrics import MetricsError
from metrics.detectors import get_detector, metric_specs
from metrics.frechet import frechet_distance
from metrics.images import ImageBatches, ImageFiles
from sampling.generate import generate_images
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils.cli import one_line

DEFAULT_METRICS = ('fid', 'fd_dinov2')

class StatsError(MetricsError):
    """Too few images, or a statistics file that cannot be used."""

#----------------------------------------------------------------------------

def parse_metric_list(metrics):
    """'fid,fd_dinov2' or a list -> list of known metric names (unknown names: `Invalid metric "<name>"`, as EDM2 words it)."""
    names = [m.strip() for m in metrics.split(',')] if isinstance(metrics, str) else list(metrics)
    for name in names:
        if name not in metric_specs:
            raise ValueError(f'Invalid metric "{name}"')
    if len(names) == 0:
        raise ValueError('No metrics given')
    return names

class FeatureMoments:
    """Running n, Σf and Σffᵀ of one metric's features, in float64 on the detector's device.
    The sums are allocated at the first batch, so any feature width works (stand-in or custom detectors)."""

    def __init__(self, device):
        self.device = device
        self.count = torch.zeros([], dtype=torch.int64, device=device)
        self.sum = None
        self.sum_outer = None

    def _allocate(self, feature_dim):
        self.sum = torch.zeros([feature_dim], dtype=torch.float64, device=self.device)
        self.sum_outer = torch.zeros([feature_dim, feature_dim], dtype=torch.float64, device=self.device)

    def add(self, features):
        f = features.to(self.device, torch.float64)
        if self.sum is None:
            self._allocate(f.shape[1])
        self.count += f.shape[0]
        self.sum += f.sum(dim=0)
        self.sum_outer += f.T @ f

    def all_reduce(self):
        """Sum over all processes; a process that saw no images learns the feature width from the others."""
        if not torch.distributed.is_initialized():
            return
        width = torch.tensor(0 if self.sum is None else self.sum.shape[0], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(width, op=torch.distributed.ReduceOp.MAX)
        if self.sum is None:
            self._allocate(int(width))
        for t in (self.count, self.sum, self.sum_outer):
            torch.distributed.all_reduce(t)

    def mean_and_covariance(self):
        """μ = Σf/n, Σ = (Σffᵀ − n·μμᵀ)/(n − 1) (unbiased), as float64 numpy arrays."""
        n = int(self.count)
        if n < 2:
            raise StatsError(f'Found {n} images, but need at least 2 to compute statistics')
        mu = self.sum / n
        sigma = (self.sum_outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()

#----------------------------------------------------------------------------

def _images_of(item):
    """uint8 [N, 3, H, W] tensor from a batch given as a tensor/array, an (images, labels) pair or a dict with
    key 'images'; None for an empty batch (generation yields those for empty chunks)."""
    if isinstance(item, dict):
        item = item.get('images')
    elif isinstance(item, (tuple, list)):
        item = item[0]
    if item is None:
        return None
    images = torch.as_tensor(item)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f'expected uint8 image batches of shape [N, 3, H, W], got {images.dtype} {list(images.shape)}')
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)     # grey -> RGB (EDM2 would reject it)
    return images if images.shape[0] > 0 else None

def _stats_batches(image_iter, detectors, verbose, dest_path, device, num_batches):
    """The work behind calculate_stats_for_iterable, one item per batch; the statistics ride on the last item."""
    moments = {metric: FeatureMoments(device) for metric in detectors}
    if verbose:
        print('Calculating feature statistics...')
    end = object()
    it = iter(image_iter)
    item = next(it, end)
    batch_idx = 0
    num_images = 0
    with tqdm.tqdm(total=num_batches, unit='batch', disable=not verbose) as progress:
        while True:
            images = None if item is end else _images_of(item)
            if images is not None:
                num_images += images.shape[0]
                for metric, detector in detectors.items():
                    features = detector(images)
                    if not torch.isfinite(features).all():
                        name = getattr(detector, 'name', type(detector).__name__)
                        raise StatsError(f'{name} returned non-finite features for batch {batch_idx}')
                    moments[metric].add(features)
            # Look one item ahead: the statistics belong to the last item yielded.
            item = end if item is end else next(it, end)
            result = dnnlib.EasyDict(stats=None, images=images, batch_idx=batch_idx, num_batches=num_batches,
                                     num_images=num_images)
            progress.update(1)
            if item is end:
                result.stats = _finish_stats(moments, dest_path, verbose)
            yield result
            if item is end:
                return
            batch_idx += 1

def _finish_stats(moments, dest_path, verbose):
    for m in moments.values():
        m.all_reduce()      # every rank calls this the same number of times, in the same order
    stats = dict(num_images=int(next(iter(moments.values())).count))
    for metric, m in moments.items():
        mu, sigma = m.mean_and_covariance()
        stats[metric] = dict(mu=mu, sigma=sigma)
    if dest_path is not None and dist.get_rank() == 0:
        save_stats(stats, dest_path, verbose=verbose)
    return stats

def detectors_for(metrics, detectors=None, detector_kwargs=None, device=None, verbose=True):
    """{metric: detector} for `metrics`: the one `detectors` ({metric: ready detector}) gives, else get_detector's
    (with detector_kwargs[metric], e.g. dict(path=...))."""
    return {metric: detectors[metric] if detectors is not None and metric in detectors else
            get_detector(metric, verbose=verbose, device=device, **(detector_kwargs or {}).get(metric, {}))
            for metric in metrics}

def calculate_stats_for_iterable(image_iter, metrics=DEFAULT_METRICS, verbose=True, dest_path=None, device=None,
                                 detectors=None, detector_kwargs=None, ref=None, ref_name='the reference'):
    """Feature statistics of the images of `image_iter`.

    image_iter:      has len(); yields uint8 [N, 3, H, W] batches, (images, labels) pairs or dicts with 'images'
                     (images None = nothing on this rank this time). Each rank passes its own share.
    detectors:       optional {metric: ready detector} (e.g. a stand-in); other metrics use get_detector().
    detector_kwargs: optional {metric: dict} passed to get_detector (e.g. {'fid': dict(path=...)}).
    ref:             optional reference statistics (load_stats, named `ref_name` in errors) that the result will be
                     compared with: checked against the metrics and the detectors before the first image is read.
    Returns an iterable (with len) of EasyDict(stats, images, batch_idx, num_batches, num_images); `stats` is set
    on the last item only, identical on every rank, and also saved to dest_path (by rank 0) when given.
    """
    metrics = parse_metric_list(metrics)
    device = torch.device(device) if device is not None else dist.device()
    verbose = verbose and dist.get_rank() == 0
    # Rank 0 builds the detectors first, so that a download happens once; the others then read the cache.
    if dist.get_rank() != 0:
        dist.barrier()
    ready = detectors_for(metrics, detectors, detector_kwargs, device=device, verbose=verbose)
    if dist.get_rank() == 0:
        dist.barrier()
    if ref is not None:
        check_reference(ref, metrics, ref_name, ready)
    num_batches = max(len(image_iter), 1)
    return misc.SizedIterable(_stats_batches(image_iter, ready, verbose, dest_path, device, num_batches), num_batches)

def calculate_stats_for_files(image_path, num_images=None, seed=0, max_batch_size=64, num_workers=2,
                              prefetch_factor=2, verbose=True, **stats_kwargs):
    """Statistics of a folder or zip of images; with more than num_images files a random subset chosen
    by `seed`. Each rank reads its share. Returns the iterable of calculate_stats_for_iterable."""
    if verbose and dist.get_rank() == 0:
        print(f'Loading images from {image_path} ...')
    dataset = ImageFiles(image_path, max_size=num_images, random_seed=seed)
    if num_images is not None and len(dataset) < num_images:
        raise StatsError(f'Found {len(dataset)} images, but expected at least {num_images}')
    if len(dataset) < 2:
        raise StatsError(f'Found {len(dataset)} images, but need at least 2 to compute statistics')
    batches = ImageBatches(dataset, max_batch_size=max_batch_size, rank=dist.get_rank(),
                           world_size=dist.get_world_size(), num_workers=num_workers, prefetch_factor=prefetch_factor)
    return calculate_stats_for_iterable(batches, verbose=verbose, **stats_kwargs)

def calculate_stats_for_network(net, seeds, gnet=None, guidance=1, max_batch_size=32, device=None, verbose=True,
                                edm2_exact=False, vae=None, encoder=None, **stats_kwargs):
    """Statistics of the images that `net` (module or path/URL of a snapshot) generates for `seeds`, streamed from
    the sampler into the detectors without touching the disk: the measurement of `calculate_metrics.py gen` and
    of every point of `sweep_phema.py`. `gnet` guides with strength `guidance` (1: no guidance, the guide is then
    not even loaded); `edm2_exact` runs EDM2's exact op sequence; `vae` replaces the VAE a latent network names;
    `encoder` decodes the samples of a `net` given as a module (as in generate_images, whose default is the encoder
    stored with a file). Each rank generates its share. Returns the iterable of calculate_stats_for_iterable."""
    sampler_kwargs = dict(gnet=gnet, guidance=guidance) if gnet is not None else {}
    image_iter = generate_images(net, seeds=seeds, max_batch_size=max_batch_size, device=device, verbose=verbose,
                                 edm2_exact=edm2_exact, vae=vae, encoder=encoder, **sampler_kwargs)
    return calculate_stats_for_iterable(image_iter, verbose=verbose, device=device, **stats_kwargs)

def final_stats(stats_iter):
    """Run a statistics iterable to its end and return the statistics."""
    stats = None
    for result in stats_iter:
        stats = result.stats
    return stats

#----------------------------------------------------------------------------
# Reference statistics files.
#
# Statistics are numbers, so their pickles are read by an unpickler that can build nothing but what EDM2's (and our)
# statistics pickles hold: dicts, numpy arrays and scalars, and their dtypes. Any other name in the file (a class or
# function, which is how a pickle runs code) is refused before anything is built.

def _numpy_pickle_functions():
    """The functions numpy's pickles name for arrays and scalars, under the module names of numpy 1.x and 2.x."""
    live = {'multiarray._reconstruct': np.zeros(1).__reduce__()[0],
            'multiarray.scalar': np.float64(0).__reduce__()[0],
            'numeric._frombuffer': np.zeros(1).__reduce_ex__(5)[0]}
    return {f'{package}.{name}': fn for package in ('numpy.core', 'numpy._core') for name, fn in live.items()}

def _latin1_encode(text, encoding='latin1'):
    # Pickle protocol 2 stores bytes as latin-1 text plus a call to _codecs.encode(text, 'latin1').
    if encoding not in ('latin1', 'latin-1'):
        raise pickle.UnpicklingError(f'_codecs.encode with encoding {encoding!r}')
    return text.encode('latin1')

_STATS_GLOBALS = {'numpy.ndarray': np.ndarray, 'numpy.dtype': np.dtype, '_codecs.encode': _latin1_encode,
                  'builtins.dict': dict, 'collections.OrderedDict': dict, 'dnnlib.util.EasyDict': dict,
                  **_numpy_pickle_functions()}

class _StatsUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        found = _STATS_GLOBALS.get(f'{module}.{name}')
        if found is None:
            raise pickle.UnpicklingError(f'refused: it names {module}.{name}; statistics files hold only dicts and '
                                         'numpy arrays, and unpickling anything else would run code from the file')
        return found

def unpickle_stats(f):
    """Read a statistics pickle from the binary file `f` without running code from it (see above)."""
    return _StatsUnpickler(f).load()

def _check_covariance(sigma, where):
    """A covariance matrix is symmetric and positive semi-definite, up to float64 rounding."""
    scale = float(np.abs(sigma).max(initial=0))
    if not np.allclose(sigma, sigma.T, rtol=0, atol=1e-6 * scale):
        raise StatsError(f'{where}: sigma is not symmetric, so it is not a covariance matrix')
    diagonal = np.diagonal(sigma)
    if (diagonal < 0).any():
        raise StatsError(f'{where}: sigma has a negative variance ({diagonal.min():g}), so it is not a covariance matrix')
    # Positive semi-definite: Cholesky succeeds after lifting the eigenvalues by a rounding-sized amount (faster
    # than the eigenvalues themselves at D = 2048).
    lift = 1e-6 * float(diagonal.max(initial=0)) + 1e-300
    try:
        np.linalg.cholesky(sigma + lift * np.eye(sigma.shape[0]))
    except np.linalg.LinAlgError:
        raise StatsError(f'{where}: sigma has negative eigenvalues, so it is not a covariance matrix') from None

def _check_stats(stats, path):
    if not isinstance(stats, dict):
        raise StatsError(f'{path}: not a statistics file (expected a dict, got {type(stats).__name__})')
    found = [metric for metric in metric_specs if metric in stats]
    if len(found) == 0:
        raise StatsError(f'{path}: contains statistics for none of {", ".join(metric_specs)}')
    for metric in found:
        entry = stats[metric]
        try:
            mu, sigma = np.asarray(entry['mu']), np.asarray(entry['sigma'])
        except (TypeError, KeyError, IndexError):
            raise StatsError(f'{path}: "{metric}" must hold "mu" and "sigma"') from None
        if mu.dtype.kind not in 'fiu' or sigma.dtype.kind not in 'fiu':
            raise StatsError(f'{path}: "{metric}" holds mu of type {mu.dtype} and sigma of type {sigma.dtype}; '
                             'expected arrays of numbers')
        if mu.ndim != 1 or mu.size == 0 or sigma.shape != (mu.size, mu.size):
            raise StatsError(f'{path}: "{metric}" has mu of shape {list(mu.shape)} and sigma of shape '
                             f'{list(sigma.shape)}; expected [D] and [D, D]')
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise StatsError(f'{path}: "{metric}" contains NaN or Inf')
        _check_covariance(sigma.astype(np.float64), f'{path}: "{metric}"')

def load_stats(path, verbose=True):
    """Read reference statistics from a path or URL: `.npz` as EDM1's FID layout (`mu`, `sigma`) -> {'fid': ...},
    anything else as EDM2's pickle, read without running code from it (unpickle_stats). The statistics are checked
    before they are returned: finite numbers, mu [D] and sigma [D, D], sigma symmetric and positive semi-definite."""
    if verbose:
        print(f'Loading feature statistics from {path} ...')
    if not dnnlib.util.is_url(path, allow_file_urls=True) and not os.path.isfile(path):
        raise StatsError(f'{path}: no such statistics file')
    try:
        with dnnlib.util.open_url(path, verbose=verbose) as f:
            if path.lower().endswith('.npz'):
                with np.load(f) as data:  # allow_pickle=False: object arrays are refused
                    stats = dict(fid=dict(mu=data['mu'], sigma=data['sigma']))
            else:
                stats = unpickle_stats(f)
    except pickle.UnpicklingError as e:
        raise StatsError(f'{path}: cannot read statistics ({one_line(e)})') from None
    except Exception as e:
        raise StatsError(f'{path}: cannot read statistics ({one_line(e, with_type=True)})') from None
    _check_stats(stats, path)
    return stats

def check_reference(ref, metrics, path, detectors=None):
    """Before any image is measured: `ref` (from load_stats) holds every metric of `metrics`, and, for each ready
    detector of `detectors` ({metric: detector}), its features have the reference's width (probed on one image)."""
    missing = [metric for metric in metrics if metric not in ref]
    if missing:
        have = [metric for metric in metric_specs if metric in ref]
        raise StatsError(f'{path}: holds no statistics for {", ".join(missing)} (it has {", ".join(have)}); '
                         f'choose --metrics={",".join(have)}')
    for metric, detector in (detectors or {}).items():
        if metric not in ref:
            continue
        width = int(detector(torch.zeros([1, 3, 32, 32], dtype=torch.uint8)).shape[1])
        ref_width = np.size(ref[metric]['mu'])
        if width != ref_width:
            name = getattr(detector, 'name', type(detector).__name__)
            raise StatsError(f'{path}: its {metric} statistics have {ref_width} features, but {name} gives {width}; '
                             'they were made with another detector')

def save_stats(stats, path, verbose=True):
    """Write statistics atomically: `.npz` in EDM1's FID layout, anything else as EDM2's pickle."""
    if verbose:
        print(f'Saving feature statistics to {path} ...')
    if path.lower().endswith('.npz'):
        if 'fid' not in stats:
            raise StatsError(f'{path}: .npz files hold FID statistics only, and none were computed')
        dropped = [metric for metric in stats if metric in metric_specs and metric != 'fid']
        if dropped and verbose:
            print(f'Note: .npz holds FID statistics only; {", ".join(dropped)} not saved')
        with dnnlib.util.atomic_write(path) as f:
            np.savez(f, mu=stats['fid']['mu'], sigma=stats['fid']['sigma'])
    else:
        with dnnlib.util.atomic_write(path) as f:
            pickle.dump(stats, f)

#----------------------------------------------------------------------------

def calculate_metrics_from_stats(stats, ref, metrics=DEFAULT_METRICS, verbose=True):
    """{metric: Fréchet distance between `stats` and `ref`} for the metrics both contain."""
    results = dict()
    for metric in parse_metric_list(metrics):
        if metric not in stats or metric not in ref:
            if verbose:
                print(f'No statistics computed for {metric} -- skipping.')
            continue
        if verbose:
            print(f'Calculating {metric}...')
        a, b = stats[metric], ref[metric]
        if np.shape(a['mu']) != np.shape(b['mu']):
            raise StatsError(f'{metric}: the statistics have {np.size(a["mu"])} features, the reference '
                             f'{np.size(b["mu"])}; were they made with different detectors?')
        value = frechet_distance(a['mu'], a['sigma'], b['mu'], b['sigma'])
        # A distance is finite and not negative; rounding in the matrix square root may leave a few ulps below 0.
        rounding = 1e-6 * (np.trace(a['sigma']) + np.trace(b['sigma']) + np.square(a['mu']).sum() + np.square(b['mu']).sum())
        if not np.isfinite(value) or value < -rounding:
            raise StatsError(f'{metric}: the Frechet distance came out as {value:g}, which is no distance (the matrix '
                             'square root failed); the statistics are not usable together')
        results[metric] = value
        if verbose:
            print(f'{metric} = {value:g}')
    return results
