"""training/encoders.py: the RGB pixel mapping and the VAE encoder's constants and affine map,
without loading a VAE; the module's pickles load in a fresh process from their embedded source."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from training.encoders import StabilityVAEEncoder, StandardRGBEncoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#----------------------------------------------------------------------------
# StandardRGBEncoder.

def test_rgb_encode_latents_numbers():
    enc = StandardRGBEncoder()
    x = torch.tensor([0, 1, 127, 128, 255], dtype=torch.uint8)
    assert torch.equal(enc.encode_pixels(x), x)
    out = enc.encode_latents(x)
    assert out.dtype == torch.float32
    assert out.tolist() == pytest.approx([-1, 1 / 127.5 - 1, 127 / 127.5 - 1, 128 / 127.5 - 1, 1], abs=1e-7)
    assert out[0].item() == -1 and out[-1].item() == 1

def test_rgb_decode_rounds_half_up():
    enc = StandardRGBEncoder()
    # x*127.5 + 127.5 = 127.5 (x=0) -> 128; 191.25 (x=0.5) -> 191; 63.75 (x=-0.5) -> 64; clipped outside [-1, 1].
    x = torch.tensor([-2, -1, -0.5, 0, 0.5, 1, 2])
    assert enc.decode(x).tolist() == [0, 0, 64, 128, 191, 255, 255]
    # 100.75: plain truncation of x*127.5+127.5 would give 100.
    assert enc.decode(torch.tensor([(100.75 - 127.5) / 127.5])).tolist() == [101]
    # 100.25: rounds down.
    assert enc.decode(torch.tensor([(100.25 - 127.5) / 127.5])).tolist() == [100]
    assert enc.decode(x).dtype == torch.uint8
    # Every pixel value survives encode -> decode.
    pixels = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(enc.decode(enc.encode(pixels)), pixels)

#----------------------------------------------------------------------------
# StabilityVAEEncoder (no VAE is loaded by any of these).

def test_vae_scale_and_bias_numbers():
    enc = StabilityVAEEncoder()
    assert enc.scale.dtype == np.float32 and enc.bias.dtype == np.float32
    # EDM2's numbers as numpy prints them (8 digits). Computing in float64 and casting afterwards would
    # print scale[0] as 0.11990408 and bias[0] as -0.6966427.
    with np.printoptions(precision=8):
        assert repr(enc.scale) == 'array([0.11990407, 0.10822511, 0.13477089, 0.15243903], dtype=float32)'
        assert repr(enc.bias) == 'array([-0.69664264, -0.3517316 , -0.01617251,  0.32774392], dtype=float32)'
    assert enc.batch_size == 8 and enc.vae_name == 'stabilityai/sd-vae-ft-mse'
    custom = StabilityVAEEncoder(raw_mean=[1, 2, 3, 4], raw_std=[2, 4, 5, 10], final_mean=1, final_std=1)
    np.testing.assert_allclose(custom.scale, [0.5, 0.25, 0.2, 0.1], rtol=1e-7)
    np.testing.assert_allclose(custom.bias, [0.5, 0.5, 0.4, 0.6], rtol=1e-6)

def test_vae_encode_latents_samples_the_posterior():
    enc = StabilityVAEEncoder()
    mean = torch.randn(2, 4, 3, 3)
    std = torch.rand(2, 4, 3, 3)
    scale = torch.from_numpy(enc.scale).reshape(1, 4, 1, 1)
    bias = torch.from_numpy(enc.bias).reshape(1, 4, 1, 1)
    # std = 0: the affine map alone.
    out = enc.encode_latents(torch.cat([mean, torch.zeros_like(std)], dim=1))
    torch.testing.assert_close(out, mean * scale + bias)
    # Noise from the global torch RNG, drawn like randn_like(mean).
    torch.manual_seed(5)
    out = enc.encode_latents(torch.cat([mean, std], dim=1))
    torch.manual_seed(5)
    eps = torch.randn_like(mean)
    torch.testing.assert_close(out, (mean + std * eps) * scale + bias)
    assert out.shape == (2, 4, 3, 3) and out.dtype == torch.float32

class _FakeVAE:
    def decode(self, z):
        return {'sample': z[:, :3]}
    def to(self, _device):
        return self

def test_vae_decode_undoes_the_affine_map_and_truncates():
    enc = StabilityVAEEncoder(batch_size=1)
    enc._vae = _FakeVAE() # decode returns the first 3 raw latent channels as the [0,1] image.
    raw = torch.tensor([-0.5, 0.0, 0.502, 0.999, 1.5]).reshape(5, 1, 1, 1).repeat(1, 4, 1, 1)
    final = raw * torch.from_numpy(enc.scale).reshape(1, 4, 1, 1) + torch.from_numpy(enc.bias).reshape(1, 4, 1, 1)
    out = enc.decode(final)
    assert out.shape == (5, 3, 1, 1) and out.dtype == torch.uint8
    # clamp to [0,1], x255, truncate: 0.502*255 = 128.01 -> 128, 0.999*255 = 254.7 -> 254 (not rounded).
    assert out[:, 0, 0, 0].tolist() == [0, 0, 128, 254, 255]

def test_vae_pickle_state_excludes_the_vae():
    enc = StabilityVAEEncoder(batch_size=4)
    enc._vae = _FakeVAE()
    data = pickle.dumps(enc)
    copy = pickle.loads(data)
    assert copy._vae is None and copy.batch_size == 4
    np.testing.assert_array_equal(copy.scale, enc.scale)
    state = dict(enc.__getstate__())
    assert [k for k in state if not k.startswith('_init')] == ['vae_name', 'scale', 'bias', 'batch_size', '_vae']
    assert state['_vae'] is None

def test_pickles_load_from_embedded_source_in_a_fresh_process(tmp_path):
    path = tmp_path / 'encoders.pkl'
    with open(path, 'wb') as f:
        pickle.dump({'rgb': StandardRGBEncoder(), 'vae': StabilityVAEEncoder(batch_size=2)}, f)
    code = (
        'import pickle, sys, torch\n'
        f'd = pickle.load(open({str(path)!r}, "rb"))\n'
        'assert "training.encoders" not in sys.modules, "the package module must not be needed"\n'
        'print(type(d["rgb"]).__module__.startswith("_imported_module_"))\n'
        'print(d["rgb"].decode(torch.tensor([0.5])).tolist(), d["vae"].batch_size, d["vae"].scale.tolist()[0])\n'
    )
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split('\n')[:2] == ['True', f'[191] 2 {float(np.float32(0.11990407))}']

#----------------------------------------------------------------------------
# VAE calls of a fixed size, and where a VAE comes from (no diffusers needed for either).

class _RecordingVAE(_FakeVAE):
    def __init__(self):
        self.calls = []
    def decode(self, z):
        self.calls.append(z.shape[0])
        return {'sample': z[:, :3] + z.shape[0]}  # depends on the call's batch size, like real kernels' rounding

def test_vae_calls_always_get_batch_size_images():
    enc = StabilityVAEEncoder(batch_size=4)
    enc._vae = _RecordingVAE()
    x = torch.full([6, 4, 1, 1], 0.0)
    out = enc.decode(x)
    # 6 images in calls of 4: the last call padded with 2 zero images, whose results are dropped.
    assert enc._vae.calls == [4, 4] and out.shape == (6, 3, 1, 1)
    # So every image decodes alike whatever batch it came in (here: raw latent + 4, clamped to 1 -> 255).
    assert out.unique().tolist() == [255]
    one = enc.decode(x[:1])
    assert enc._vae.calls == [4, 4, 4] and torch.equal(one, out[:1])

def test_vae_location(tmp_path, monkeypatch):
    from training.encoders import VAEError, vae_location
    folder = tmp_path / 'vae'
    folder.mkdir()
    with pytest.raises(VAEError, match='not a diffusers VAE folder'):
        vae_location(str(folder))
    (folder / 'config.json').write_text('{}')
    monkeypatch.chdir(tmp_path)
    assert vae_location('vae') == ('folder', str(folder))  # a folder here beats a hub name of the same spelling
    assert vae_location('stabilityai/sd-vae-ft-mse') == ('hub', 'stabilityai/sd-vae-ft-mse')
    assert vae_location('sd-vae') == ('hub', 'sd-vae')
    for missing in ['./none', str(tmp_path / 'none'), 'a/b/c', '~/none-such-vae', 'no such']:
        with pytest.raises(VAEError) as info:
            vae_location(missing)
        assert str(info.value) == f'VAE {missing}: no such folder' and info.value.reason == 'no such folder'
    (tmp_path / 'file').write_text('x')
    with pytest.raises(VAEError, match=r'^VAE file: not a folder \(a VAE is a folder written by AutoencoderKL'):
        vae_location('file')
