"""Shared test set-up: the repository root on sys.path, the CPU allocator setting that the CLIs use, one torch thread
for tiny tensors, and the factories of tiny networks, snapshots and datasets that several test files use."""
import contextlib
import copy
import io
import json
import os
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import PIL.Image  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import dnnlib  # noqa: E402
from torch_utils import misc  # noqa: E402

misc.keep_freed_cpu_memory()  # as cli.run does for every tool: large tensors without page faults (Inception too)

#----------------------------------------------------------------------------
# One torch thread.

@contextlib.contextmanager
def single_thread():
    """One torch thread inside the block: tiny tensors gain nothing from two, and other test processes may run beside
    it on a 2-core machine, where oversubscribed OpenMP threads make small convolutions several times slower. A
    module-scoped fixture that computes with torch uses this block; tests use the `one_thread` fixture."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

@pytest.fixture
def one_thread():
    """The test runs with one torch thread (see single_thread)."""
    with single_thread():
        yield

#----------------------------------------------------------------------------
# Tiny networks and their snapshot pickles.

def make_tiny_net(label_dim=0, channels=16, seed=0, **kwargs):
    """An 8x8 RGB EDM2+ Precond with two levels (`channels`, 2·`channels`), one block per level and attention at 4x4,
    its weights drawn after torch.manual_seed(`seed`). `kwargs` go to Precond (e.g. channels_per_head)."""
    from networks.edm2plus import Precond  # pylint: disable=import-outside-toplevel
    torch.manual_seed(seed)
    return Precond(8, 3, label_dim, model_channels=channels, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                   **kwargs)

def randomize_weights(net, scale=0.3):
    """Add `scale`·N(0, 1) noise to every weight, in place. A fresh Precond has zero output gains (D = c_skip·x,
    labels ignored); with random weights noise, labels and guidance all change the images."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * scale)
    return net

def snapshot_dict(ema, dataset_kwargs=None):
    """What a training snapshot pickle holds (training_loop's layout): a float16 copy of the EMA network on the CPU in
    eval mode, the RGB encoder, the dataset options and no loss."""
    from training.encoders import StandardRGBEncoder  # pylint: disable=import-outside-toplevel
    ema = copy.deepcopy(ema).cpu().eval().requires_grad_(False).to(torch.float16)
    return dnnlib.EasyDict(encoder=StandardRGBEncoder(), dataset_kwargs=dnnlib.EasyDict(dataset_kwargs or {}),
                           loss_fn=None, ema=ema)

#----------------------------------------------------------------------------
# Datasets in dataset_tool.py's layout: 00000/img00000000.png, ... and dataset.json, in a folder or a zip.

def png_bytes(array):
    """A uint8 HWC (or HW) array as PNG file bytes."""
    buf = io.BytesIO()
    PIL.Image.fromarray(array).save(buf, format='png')
    return buf.getvalue()

def image_name(idx):
    return f'{idx // 1000:05d}/img{idx:08d}.png'

def write_files(dest, files):
    """Write {name: bytes} into the folder `dest`, or into a zip when `dest` ends in .zip. Returns str(dest)."""
    dest = str(dest)
    if dest.endswith('.zip'):
        os.makedirs(os.path.dirname(dest) or '.', exist_ok=True)
        with zipfile.ZipFile(dest, 'w', compression=zipfile.ZIP_STORED) as z:
            for name, data in files.items():
                z.writestr(name, data)
        return dest
    for name, data in files.items():
        os.makedirs(os.path.join(dest, os.path.dirname(name)), exist_ok=True)
        with open(os.path.join(dest, name), 'wb') as f:
            f.write(data)
    return dest

def write_dataset(dest, images, labels=None, names=None):
    """A dataset of the uint8 HWC `images`, named `names` (default: image_name(i)); labels[i] is the class of image i
    (None: dataset.json says there are no labels). Returns str(dest)."""
    names = names or [image_name(i) for i in range(len(images))]
    files = {name: png_bytes(img) for name, img in zip(names, images)}
    entries = None if labels is None else [[name, label] for name, label in zip(names, labels)]
    files['dataset.json'] = json.dumps({'labels': entries}).encode()
    return write_files(dest, files)

def count_fast_path(monkeypatch):
    """List that grows by one per layer that the network evaluates on a path other than the reference one."""
    from networks import edm2plus
    calls, choose = [], edm2plus._path
    def counted(module, x):
        path = choose(module, x)
        if path != 'reference':
            calls.append(path)
        return path
    monkeypatch.setattr(edm2plus, '_path', counted)
    return calls
