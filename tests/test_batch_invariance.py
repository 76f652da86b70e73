"""Every image is bit-identical whatever the batch it is computed in (networks/fastpaths.py, "Batch invariance").

On a CPU, BLAS matrix products with fewer than 4 rows and torch's convolution at batch 1 round differently from
larger batches; the inference and training paths avoid both. Checked on trained networks (a few optimizer steps, so
gains, modulation and output convolution all matter), for several network seeds, batch sizes 1, 2, 3, 4 and 8, on
the inference path (autograd off) and the training path (autograd on), and end to end as PNG bytes.
"""

import copy

import pytest
import torch

from networks import edm2plus, fastpaths
from networks.edm2plus import Precond

pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py

TINY = dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=32, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[8])

def trained(block, seed, steps=3):
    """A tiny network after a few Adam steps of EDM2's loss on random images (every gain moves away from 0)."""
    torch.manual_seed(seed)
    net = Precond(**TINY, block=block, dropout=0.1).train()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(steps):
        x = torch.randn(4, 3, 16, 16)
        sigma = (torch.randn(4) * 1.2 - 0.4).exp()
        D, logvar = net(x + torch.randn_like(x) * sigma[:, None, None, None], sigma, torch.eye(10)[:4],
                        return_logvar=True)
        opt.zero_grad()
        ((D - x).square().mean() / logvar.exp().mean() + logvar.mean()).backward()
        opt.step()
    gains = [m.emb_gain.abs().item() for m in net.modules() if hasattr(m, 'emb_gain')]
    assert net.unet.out_gain.abs().item() > 0.01 and min(gains) > 1e-3
    return net.eval()

def inputs(batch=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 16, 16, generator=g) * 2
    sigma = (torch.randn(batch, generator=g) * 1.5).exp()
    labels = torch.eye(10)[torch.randint(10, [batch], generator=g)]
    return x, sigma, labels

def in_batches(net, size, x, sigma, labels):
    return torch.cat([net(x[i:i + size], sigma[i:i + size], labels[i:i + size]) for i in range(0, len(x), size)])

@pytest.mark.parametrize('block', ['A', 'G*', 'C'])
@pytest.mark.parametrize('path', ['infer', 'train'])
def test_per_image_output_independent_of_batch_size(block, path):
    x, sigma, labels = inputs()
    for seed in (0, 1):
        net = trained(block, seed)
        with torch.set_grad_enabled(path == 'train'):
            whole = copy.deepcopy(net)(x, sigma, labels)  # a fresh copy: no cached weights from smaller batches
            assert (whole - 0.25 / (sigma[:, None, None, None] ** 2 + 0.25) * x).abs().max() > 0.01  # the net matters
            for size in (1, 2, 3, 4):
                assert torch.equal(in_batches(net, size, x, sigma, labels), whole), (block, seed, path, size)

def test_inference_chunks_do_not_change_results(monkeypatch):
    """A large batch split into CPU chunks (here 3 images) gives the images of one unsplit evaluation."""
    net = trained('G*', 2)
    x, sigma, labels = inputs()
    with torch.no_grad():
        whole = net(x, sigma, labels)
        monkeypatch.setattr(fastpaths, '_FAST_CHUNK_PIXELS', 3 * 16 * 16)
        assert torch.equal(copy.deepcopy(net)(x, sigma, labels), whole)

def test_training_dropout_masks_agree_with_reference_layout():
    """Channels-last training draws its dropout masks in NCHW order: the same elements drop as in the reference
    layout at the same seed, so outputs agree to rounding (a different mask would differ by order 0.1)."""
    net = trained('G*', 3).train()
    x, sigma, labels = inputs(4)
    torch.manual_seed(7)
    default = net(x, sigma, labels)
    torch.manual_seed(7)
    with edm2plus.reference_mode():
        reference = net(x, sigma, labels)
    torch.manual_seed(8)
    other_seed = net(x, sigma, labels)
    assert (default - reference).abs().max().item() < 1e-4
    assert (other_seed - reference).abs().max().item() > 1e-2

def test_generated_pngs_identical_for_batch_1_and_4(tmp_path):
    from sampling.generate import generate_images
    net = trained('G*', 4)
    for batch in (1, 4):
        for _ in generate_images(net, outdir=tmp_path / f'b{batch}', seeds=range(5), max_batch_size=batch,
                                 device='cpu', verbose=False, num_steps=4):
            pass
    names = sorted(p.name for p in (tmp_path / 'b1').glob('*.png'))
    assert len(names) == 5
    for name in names:
        assert (tmp_path / 'b1' / name).read_bytes() == (tmp_path / 'b4' / name).read_bytes(), name
