"""Training under torchrun survives a killed rank (--max-restarts) and trains across two 'nodes' (c10d rendezvous).

Each case runs a real 2-process gloo training job on the CPU and compares its final training state, tensor by
tensor, with an uninterrupted 2-process run of the same command: restarts and rendezvous must not change a bit.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import psutil
import pytest
import torch

from conftest import write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run']

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith('linux'), reason='uses /proc')]

def _train_args(data, outdir, duration='2Ki'):
    # The demo network at batch 32 (16 per rank); a checkpoint after every 1Ki images.
    return ['train_edm2plus.py', '--preset=demo', f'--data={data}', f'--outdir={outdir}', f'--duration={duration}',
            '--status=1Ki', '--snapshot=0', '--checkpoint=1Ki', '--channels=16']

def _env():
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    env.pop('WORLD_SIZE', None)
    return env

def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

def _tensors(obj, prefix=''):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors(value, f'{prefix}/{key}')
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors(value, f'{prefix}/{i}')

def _assert_same_state(path_a, path_b):
    a = dict(_tensors(torch.load(path_a, map_location='cpu', weights_only=True)))
    b = dict(_tensors(torch.load(path_b, map_location='cpu', weights_only=True)))
    assert a.keys() == b.keys()
    differ = [key for key in a if not torch.equal(a[key], b[key])]
    assert not differ, f'{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}'

def _run(cmd, timeout=600):
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res

@pytest.fixture(scope='module')
def fashion_zip_16(tmp_path_factory):
    """512 labelled 16x16 RGB images in the dataset zip layout (smooth random blobs; 10 classes)."""
    path = tmp_path_factory.mktemp('data') / 'data16.zip'
    rng = np.random.default_rng(0)
    images = [np.asarray(PIL.Image.fromarray(rng.integers(0, 256, size=[4, 4, 3], dtype=np.uint8))
                         .resize((16, 16), PIL.Image.BILINEAR)) for _ in range(512)]
    return write_dataset(path, images, [i % 10 for i in range(512)])

@pytest.fixture(scope='module')
def reference(tmp_path_factory, fashion_zip_16):
    """An uninterrupted 2-process run to 2Ki images."""
    outdir = tmp_path_factory.mktemp('ft') / 'reference'
    _run(TORCHRUN + ['--standalone', '--nproc_per_node=2'] + _train_args(fashion_zip_16, outdir))
    return outdir / 'training-state-0000002.pt'

def _worker_with_rank(launcher, rank):
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get('RANK') == str(rank) and 'train_edm2plus.py' in ' '.join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None

def test_killed_rank_restarts_and_ends_bit_identical(reference, fashion_zip_16, tmp_path):
    outdir = tmp_path / 'killed'
    cmd = TORCHRUN + ['--standalone', '--nproc_per_node=2', '--max-restarts=1'] + _train_args(fashion_zip_16, outdir)
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (outdir / 'training-state-0000001.pt').exists():
            assert launcher.poll() is None and time.monotonic() < deadline, 'no first checkpoint'
            time.sleep(0.2)
        victim = _worker_with_rank(launcher, 1)
        assert victim is not None
        victim.send_signal(signal.SIGKILL)
        output, _ = launcher.communicate(timeout=600)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, output[-3000:]
    assert 'Loading' in output and 'training-state-0000001.pt' in output  # the restarted group resumed by itself
    _assert_same_state(reference, outdir / 'training-state-0000002.pt')

def test_two_nodes_c10d_rendezvous_train_and_resume(reference, fashion_zip_16, tmp_path):
    outdir = tmp_path / 'two-nodes'
    port = _free_port()
    for duration in ['1Ki', '2Ki']:  # the second launch resumes from the first one's training state
        nodes = [subprocess.Popen(TORCHRUN + ['--nnodes=2', '--nproc_per_node=1', f'--node_rank={node}',
                                              '--rdzv_backend=c10d', f'--rdzv_endpoint=127.0.0.1:{port}',
                                              f'--rdzv_id=edm2plus-test-{duration}']
                                  + _train_args(fashion_zip_16, outdir, duration),
                                  cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for node in range(2)]
        outputs = [node.communicate(timeout=600)[0] for node in nodes]
        for node, output in zip(nodes, outputs):
            assert node.returncode == 0, output[-3000:]
    _assert_same_state(reference, outdir / 'training-state-0000002.pt')
