"""EDM2's ImageNet-512 path (latent space) end to end through the command-line tools, with diffusers' real
AutoencoderKL class: `dataset_tool.py encode` / `decode`, training on the 8-channel latents and resuming,
`generate_images.py` decoding to PNGs, `calculate_metrics.py gen`, EDM2-format latent pickles, `--vae` for local
folders and offline machines, and the messages for a missing or broken diffusers.

The VAEs are randomly initialised from architecture configs kept in tests/data/vae (weights from a fixed seed,
written with save_pretrained): `tiny.json`, the same class and layout as sd-vae-ft-mse (four levels, factor 8) at
81 k parameters, for the fast tests; `sd-vae-ft-mse.json`, the real architecture (83.7 M parameters), for one slow test.
"""

import importlib.metadata
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import calculate_metrics
import dataset_tool
import generate_images
import sweep_phema
import edm2_standin
from conftest import single_thread
from networks import export, loading
from training import encoders

# Skipped where diffusers is not installed (setup.sh installs it, so CI runs these); a broken install fails here.
if importlib.util.find_spec('diffusers') is None:
    pytest.skip('the latent tests need the [latent] extra (setup.sh installs it)', allow_module_level=True)
import diffusers  # noqa: E402  pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, 'tests', 'data', 'vae')
FASHION = '/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz'
ENV = dict(os.environ, OMP_NUM_THREADS='1')

pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py

#----------------------------------------------------------------------------
# Helpers.

def make_vae(config, seed):
    """An AutoencoderKL of the config in tests/data/vae, its weights drawn after torch.manual_seed(seed)."""
    with open(os.path.join(CONFIGS, f'{config}.json')) as f:
        cfg = json.load(f)
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL.from_config(cfg).eval().requires_grad_(False)

def read_zip(path):
    with zipfile.ZipFile(path) as z:
        return {name: z.read(name) for name in z.namelist()}

def png(path):
    return np.asarray(PIL.Image.open(path))

def posterior(vae, pixels, batch):
    """diffusers' own posterior (mean, std) of uint8 NCHW pixels, EDM2's [0, 1] input, `batch` images per call."""
    means, stds = [], []
    with torch.no_grad():
        for part in torch.split(torch.as_tensor(pixels).float() / 255, batch):
            dist = vae.encode(part).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)

def run_tool(command, args):
    return CliRunner().invoke(command, [str(a) for a in args])

def error_line(result):
    """The single `Error: ...` line of a failed run (exit 1, no traceback)."""
    assert result.exit_code == 1 and 'Traceback' not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.startswith('Error: ')]
    assert len(lines) == 1, result.output
    return lines[0]

def train(data, outdir, duration, *extra):
    """img512's recipe (P_mean -0.4, P_std 1.0, EDM2-XS) scaled down to an 8x8x4 latent network; returns stdout."""
    args = [sys.executable, 'train_edm2plus.py', f'--outdir={outdir}', f'--data={data}', '--preset=edm2-img512-xs',
            '--channels=16', '--channel-mult=1,2', '--num-blocks=1', '--attn=4', '--batch=32', '--rampup=0',
            f'--duration={duration}', '--status=1Ki', '--snapshot=1Ki', '--checkpoint=1Ki', *extra]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout

#----------------------------------------------------------------------------
# Shared data: two tiny VAEs (different seeds), 12 Fashion-MNIST images at 64x64, their latents, a trained network.

@pytest.fixture(scope='module')
def vaes(tmp_path_factory):
    root = tmp_path_factory.mktemp('vae')
    paths = dnnlib.EasyDict(a=str(root / 'tiny-a'), b=str(root / 'tiny-b'))
    make_vae('tiny', seed=0).save_pretrained(paths.a)
    make_vae('tiny', seed=1).save_pretrained(paths.b)
    return paths

@pytest.fixture(scope='module')
def images(tmp_path_factory):
    if not os.path.isfile(FASHION):
        pytest.skip(f'{FASHION} is missing (setup.sh installs it)')
    dest = str(tmp_path_factory.mktemp('img') / 'fashion-64.zip')
    dataset_tool.convert_dataset(FASHION, dest, max_images=12, resolution=(64, 64), verbose=False)
    return dest

@pytest.fixture(scope='module')
def latents(vaes, images, tmp_path_factory):
    """`dataset_tool.py encode` of the 12 images with the tiny VAE (folder), 4 images per VAE call."""
    dest = tmp_path_factory.mktemp('lat') / 'fashion-64-sd.zip'
    with single_thread():
        result = run_tool(dataset_tool.cmdline, ['encode', f'--source={images}', f'--dest={dest}', f'--vae={vaes.a}',
                                                 '--batch=4'])
    assert result.exit_code == 0, result.output
    return dnnlib.EasyDict(path=str(dest), result=result)

@pytest.fixture(scope='module')
def trained(latents, tmp_path_factory):
    """2 kimg of training on the latents, in two launches (the second resumes the first)."""
    outdir = tmp_path_factory.mktemp('run') / 'run'
    first = train(latents.path, outdir, '1Ki')
    second = train(latents.path, outdir, '2Ki')
    return dnnlib.EasyDict(outdir=outdir, first=first, second=second,
                           snapshot=str(outdir / 'network-snapshot-0000002-0.100.pkl'))

#----------------------------------------------------------------------------
# 1. encode and decode.

def test_encode_stores_the_vae_posterior(vaes, images, latents):
    files = read_zip(latents.path)
    names = sorted(n for n in files if n.endswith('.npy'))
    assert names == [f'00000/img-mean-std-{i:08d}.npy' for i in range(12)]
    stored = np.stack([np.load(io.BytesIO(files[n])) for n in names])
    assert stored.shape == (12, 8, 8, 8) and stored.dtype == np.float32   # [4 means, 4 stds] at 64/8
    # Equal, to the bit, to diffusers' own posterior of the same pixels in [0, 1], computed with the same batches.
    source = read_zip(images)
    pixels = np.stack([np.asarray(PIL.Image.open(io.BytesIO(source[f'00000/img{i:08d}.png']))) for i in range(12)])
    mean, std = posterior(diffusers.AutoencoderKL.from_pretrained(vaes.a), pixels.transpose(0, 3, 1, 2), batch=4)
    assert np.array_equal(stored[:, :4], mean.numpy()) and np.array_equal(stored[:, 4:], std.numpy())
    assert stored[:, 4:].min() > 0 and np.abs(stored[:, :4]).max() > 0.01
    # dataset.json: the images' labels, and the VAE (its absolute folder) for decoding and training.
    meta = json.loads(files['dataset.json'])
    source_labels = [label for _name, label in json.loads(source['dataset.json'])['labels']]
    assert [label for _name, label in meta['labels']] == source_labels and len(set(source_labels)) > 2
    assert meta['vae'] == os.path.abspath(vaes.a)
    # Speed and memory are shown: images/s in the progress bar and in the summary line.
    assert re.search(r'encode: 100%.*12/12 .*img/s.*GiB RAM', latents.result.stderr), latents.result.stderr
    summary = latents.result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf'Wrote 12 latent files of shape 8x8x8 to {re.escape(latents.path)}, [\d.]+ images/s; '
                        r'peak memory [\d.]+ GiB RAM', summary), summary

def test_decode_gives_the_vae_decoding_of_the_means(vaes, latents, tmp_path):
    # No --vae: the VAE that dataset.json names.
    result = run_tool(dataset_tool.cmdline, ['decode', f'--source={latents.path}', f'--dest={tmp_path / "dec"}',
                                             '--batch=4'])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith(f'Wrote 12 images to {tmp_path / "dec"} (VAE {os.path.abspath(vaes.a)})')
    files = read_zip(latents.path)
    means = torch.stack([torch.from_numpy(np.load(io.BytesIO(files[f'00000/img-mean-std-{i:08d}.npy']))[:4])
                         for i in range(12)])
    vae = diffusers.AutoencoderKL.from_pretrained(vaes.a)
    with torch.no_grad():
        want = torch.cat([vae.decode(part).sample for part in torch.split(means, 4)])
    # Up to the network-space round trip of the affine map (float32): within one of the truncated uint8 value.
    want = (want.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy().astype(int)
    got = np.stack([png(tmp_path / 'dec' / '00000' / f'img{i:08d}.png') for i in range(12)]).astype(int)
    assert got.shape == (12, 64, 64, 3) and np.abs(got - want).max() <= 1
    labels = json.loads((tmp_path / 'dec' / 'dataset.json').read_text())['labels']
    assert [label for _n, label in labels] == [label for _n, label in json.loads(files['dataset.json'])['labels']]
    # --model-url (EDM2's name) still names the VAE; another VAE gives other images.
    result = run_tool(dataset_tool.cmdline, ['decode', f'--source={latents.path}', f'--dest={tmp_path / "dec-b"}',
                                             f'--model-url={vaes.b}', '--max-images=2'])
    assert result.exit_code == 0, result.output
    assert not np.array_equal(png(tmp_path / 'dec-b' / '00000' / 'img00000000.png'), got[0])

def test_encode_failures_leave_nothing(vaes, images, tmp_path, monkeypatch):
    # A corrupt image in the middle: one line naming it, no zip, no temporary file.
    source = read_zip(images)
    source['00000/img00000005.png'] = source['00000/img00000005.png'][:100]
    broken = tmp_path / 'broken.zip'
    with zipfile.ZipFile(broken, 'w') as z:
        for name, data in source.items():
            z.writestr(name, data)
    out = tmp_path / 'out'
    out.mkdir()
    line = error_line(run_tool(dataset_tool.cmdline, ['encode', f'--source={broken}', f'--dest={out / "lat.zip"}',
                                                      f'--vae={vaes.a}', '--batch=2']))
    assert line.startswith(f'Error: {broken}/00000/img00000005.png: cannot read image'), line
    assert os.listdir(out) == []
    # The VAE itself failing in the middle (e.g. out of memory) after two batches: the same.
    calls = []
    real_encode = diffusers.AutoencoderKL.encode
    def failing(self, x, *args, **kwargs):
        calls.append(len(x))
        if len(calls) == 3:
            raise RuntimeError('CUDA out of memory. Tried to allocate 2.00 GiB\nmore details')
        return real_encode(self, x, *args, **kwargs)
    monkeypatch.setattr(diffusers.AutoencoderKL, 'encode', failing)
    line = error_line(run_tool(dataset_tool.cmdline, ['encode', f'--source={images}', f'--dest={out / "lat.zip"}',
                                                      f'--vae={vaes.a}', '--batch=2']))
    assert line == ('Error: 00000/img00000004.png ... 00000/img00000005.png: the VAE failed to encode (RuntimeError: '
                    'CUDA out of memory. Tried to allocate 2.00 GiB); nothing was written (for lack of memory, lower '
                    '--batch)')
    assert calls == [2, 2, 2] and os.listdir(out) == []
    monkeypatch.undo()
    # Images of different sizes: refused before they would make an unusable dataset.
    mixed = tmp_path / 'mixed'
    mixed.mkdir()
    PIL.Image.new('RGB', (64, 64)).save(mixed / 'a.png')
    PIL.Image.new('RGB', (32, 32)).save(mixed / 'b.png')
    line = error_line(run_tool(dataset_tool.cmdline, ['encode', f'--source={mixed}', f'--dest={out / "lat.zip"}',
                                                      f'--vae={vaes.a}']))
    assert line.startswith('Error: b.png: the image is 32x32, the first one 64x64: all images'), line
    assert os.listdir(out) == []

def test_vae_option_errors(vaes, images, tmp_path, monkeypatch):
    dest = tmp_path / 'lat.zip'
    base = ['encode', f'--source={images}', f'--dest={dest}']
    assert error_line(run_tool(dataset_tool.cmdline, base + [f'--vae={tmp_path / "none"}'])) == \
        f'Error: --vae={tmp_path / "none"}: no such folder'
    assert error_line(run_tool(dataset_tool.cmdline, base + [f'--vae={tmp_path}'])) == \
        (f'Error: --vae={tmp_path}: not a diffusers VAE folder (it has no config.json; write one with '
         'AutoencoderKL.save_pretrained)')
    # A hub name that is not in the cache, on a machine without internet access: one line, pointing to --vae=FOLDER.
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    line = error_line(run_tool(dataset_tool.cmdline, base))
    assert line.startswith(f'Error: --vae=stabilityai/sd-vae-ft-mse: not in the local cache '
                           f'{tmp_path / "cache" / "diffusers"}, and HF_HUB_OFFLINE forbids downloading it; '), line
    assert line.endswith('and pass --vae=FOLDER')
    # A local folder is read without any network access (local_files_only): it works while the hub is unreachable.
    real = diffusers.AutoencoderKL.from_pretrained
    seen = []
    def recorded(*args, **kwargs):
        seen.append(kwargs.get('local_files_only'))
        return real(*args, **kwargs)
    monkeypatch.setattr(diffusers.AutoencoderKL, 'from_pretrained', recorded)
    monkeypatch.delenv('HF_HUB_OFFLINE')
    result = run_tool(dataset_tool.cmdline, base + [f'--vae={vaes.a}', '--max-images=1'])
    assert result.exit_code == 0 and seen == [True], result.output
    assert dest.exists()

#----------------------------------------------------------------------------
# diffusers missing or broken: told apart, each in one line with the install command of the [latent] extra.

def test_install_command_matches_the_extra_and_what_is_installed():
    tomllib = pytest.importorskip('tomllib')  # Python 3.11+
    with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
        extra = tomllib.load(f)['project']['optional-dependencies']['latent']
    pins = dict(req.split('==') for req in extra)
    assert encoders.DIFFUSERS_INSTALL == 'pip install ' + ' '.join(f'{k}=={pins[k]}' for k in ('diffusers', 'huggingface_hub'))
    assert {k: importlib.metadata.version(k) for k in pins} == pins  # CI tests the versions users get
    assert encoders.diffusers_problem() is None

def test_missing_and_broken_diffusers(images, tmp_path, monkeypatch):
    args = ['encode', f'--source={images}', f'--dest={tmp_path / "lat.zip"}']
    # Missing.
    find_spec = encoders.importlib.util.find_spec
    monkeypatch.setattr(encoders.importlib.util, 'find_spec',
                        lambda name, *a: None if name == 'diffusers' else find_spec(name, *a))
    assert error_line(run_tool(dataset_tool.cmdline, args)) == \
        f'Error: the Stable Diffusion VAE needs the diffusers package, which is not installed: {encoders.DIFFUSERS_INSTALL}'
    monkeypatch.undo()
    # Installed but not importable, as EDM2's pinned diffusers 0.26.3 with today's huggingface_hub.
    fake = tmp_path / 'fake'
    (fake / 'diffusers').mkdir(parents=True)
    (fake / 'diffusers' / '__init__.py').write_text(
        "raise ImportError(\"cannot import name 'cached_download' from 'huggingface_hub'\")\n")
    for name in [n for n in sys.modules if n == 'diffusers' or n.startswith('diffusers.')]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(fake))
    line = error_line(run_tool(dataset_tool.cmdline, args))
    assert re.fullmatch(r"Error: the Stable Diffusion VAE needs the diffusers package, which is installed "
                        r"\(diffusers [\d.]+, huggingface_hub [\d.]+\) but cannot be imported \(ImportError: cannot "
                        r"import name 'cached_download' from 'huggingface_hub'\); install versions that work together: "
                        + re.escape(encoders.DIFFUSERS_INSTALL), line), line
    assert not (tmp_path / 'lat.zip').exists()

#----------------------------------------------------------------------------
# 2. Training on the latents, resumed once; the snapshot remembers the VAE the dataset names.

def test_training_on_latents_resumes_and_remembers_the_vae(vaes, trained):
    assert 'Training from 0 kimg to 1 kimg' in trained.first
    assert 'Training from 1 kimg to 2 kimg' in trained.second and 'training-state-0000001.pt' in trained.second
    options = json.loads((trained.outdir / 'training_options.json').read_text())
    assert options['encoder_kwargs'] == dict(class_name='training.encoders.StabilityVAEEncoder',
                                             vae_name=os.path.abspath(vaes.a))
    assert options['loss_kwargs']['P_mean'] == -0.4 and options['loss_kwargs']['P_std'] == 1.0
    snap = loading.load_snapshot(trained.snapshot, verbose=False)
    assert isinstance(snap.encoder, encoders.StabilityVAEEncoder) and snap.encoder.vae_name == os.path.abspath(vaes.a)
    assert (snap.ema.img_channels, snap.ema.img_resolution, snap.ema.label_dim) == (4, 8, 10)
    assert snap.ema.unet.out_gain.abs().item() > 0  # it trained

def test_training_vae_option(vaes, latents, images, tmp_path):
    import click
    import train_edm2plus
    config = lambda **kw: train_edm2plus.setup_training_config(dict(data=latents.path, preset='edm2-img512-xs', **kw))
    assert config(vae=vaes.b)['encoder_kwargs']['vae_name'] == os.path.abspath(vaes.b)  # --vae beats the dataset's
    # EDM2's VAE is left implicit, as in EDM2's configuration.
    assert config(vae='stabilityai/sd-vae-ft-mse')['encoder_kwargs'] == dict(class_name='training.encoders.StabilityVAEEncoder')
    with pytest.raises(click.ClickException, match=f'--vae={tmp_path / "none"}: no such folder'):
        config(vae=str(tmp_path / 'none'))
    with pytest.raises(click.ClickException, match=r'the dataset holds RGB pixels \(3 channels\)'):
        train_edm2plus.setup_training_config(dict(data=images, preset='edm2-img64-xs', vae=vaes.a))

#----------------------------------------------------------------------------
# 3. generate_images.py: decoded PNGs, byte-identical whatever --batch.

def test_generate_decodes_and_is_batch_invariant(vaes, trained, tmp_path):
    common = [f'--net={trained.snapshot}', '--seeds=0-4', '--steps=4', '--vae-batch=2']
    outputs = {}
    for batch in (1, 2, 5):
        result = run_tool(generate_images.cmdline, common + [f'--batch={batch}', f'--outdir={tmp_path / str(batch)}'])
        assert result.exit_code == 0, result.output
        assert f'Setting up StabilityVAEEncoder with VAE {os.path.abspath(vaes.a)}...' in result.output
        outputs[batch] = [(tmp_path / str(batch) / f'{s:06d}.png').read_bytes() for s in range(5)]
    assert outputs[1] == outputs[2] == outputs[5]
    images = [png(tmp_path / '5' / f'{s:06d}.png') for s in range(5)]
    assert all(img.shape == (64, 64, 3) for img in images) and len({img.tobytes() for img in images}) == 5
    # --vae overrides the snapshot's VAE.
    result = run_tool(generate_images.cmdline, common + [f'--vae={vaes.b}', f'--outdir={tmp_path / "b"}'])
    assert result.exit_code == 0 and f'with VAE {vaes.b}...' in result.output, result.output
    assert png(tmp_path / 'b' / '000000.png').shape == (64, 64, 3)
    assert (tmp_path / 'b' / '000000.png').read_bytes() != outputs[5][0]
    # The snapshot's VAE gone (the run was copied to another machine): one line that names it and what to do.
    result = run_tool(generate_images.cmdline, common + [f'--vae={tmp_path / "none"}', f'--outdir={tmp_path / "c"}'])
    assert error_line(result) == f'Error: --vae={tmp_path / "none"}: no such folder'
    assert not (tmp_path / 'c').exists()

#----------------------------------------------------------------------------
# 4. calculate_metrics.py gen on the latent network.

class PoolStandIn(torch.nn.Module):
    """A stand-in for NVIDIA's Inception pickle (as in test_metrics.py): 2x2 average-pooled colours and squares."""

    def forward(self, img, return_features: bool = False):  # pylint: disable=unused-argument
        x = torch.nn.functional.adaptive_avg_pool2d(img.to(torch.float32), 2).flatten(1) / 255
        return torch.cat([x, x * x], dim=1)

def test_calculate_metrics_gen_on_the_latent_network(vaes, images, trained, tmp_path):
    import warnings
    from metrics.stats import calculate_metrics_from_stats, calculate_stats_for_iterable, final_stats, load_stats
    from sampling.generate import generate_images as generate
    detector = str(tmp_path / 'standin.pt')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)  # TorchScript is deprecated in PyTorch 2.13
        torch.jit.save(torch.jit.script(PoolStandIn()), detector)
    ref = tmp_path / 'ref.pkl'
    result = run_tool(calculate_metrics.cmdline, ['ref', f'--data={images}', f'--dest={ref}', '--metrics=fid',
                                                  f'--detector={detector}', '--workers=0'])
    assert result.exit_code == 0, result.output
    result = run_tool(calculate_metrics.cmdline, ['gen', f'--net={trained.snapshot}', f'--ref={ref}', '--num=6',
                                                  '--batch=3', '--metrics=fid', f'--detector={detector}',
                                                  f'--vae={vaes.b}'])
    assert result.exit_code == 0, result.output
    fid = float(re.search(r'^fid = ([\d.e+-]+)$', result.output, re.M).group(1))
    # The same seeds generated and decoded with the same VAE, measured with the same features.
    batches = [r.images for r in generate(trained.snapshot, seeds=range(6), vae=vaes.b, verbose=False, device='cpu')]
    stats = final_stats(calculate_stats_for_iterable(batches, metrics=['fid'], verbose=False, device='cpu',
                                                     detectors=dict(fid=lambda x: PoolStandIn()(torch.as_tensor(x)))))
    want = calculate_metrics_from_stats(stats, load_stats(str(ref), verbose=False), ['fid'], verbose=False)['fid']
    assert fid == pytest.approx(want, rel=1e-5) and fid > 0
    line = error_line(run_tool(calculate_metrics.cmdline, ['gen', f'--net={trained.snapshot}', f'--ref={ref}',
                                                           f'--vae={tmp_path / "none"}']))
    assert line == f'Error: --vae={tmp_path / "none"}: no such folder'

    # sweep_phema.py takes the same --vae: its point equals `gen` of the network it reconstructed, with that VAE.
    sweep = tmp_path / 'sweep'
    args = [f'--indir={trained.outdir}', f'--outdir={sweep}', '--outstd=0.1', f'--ref={ref}', '--metrics=fid',
            f'--detector={detector}', '--seeds=0-5', '--batch=3', '--keep-networks']
    result = run_tool(sweep_phema.cmdline, args + [f'--vae={vaes.b}'])
    assert result.exit_code == 0, result.output
    [record] = [json.loads(line) for line in open(sweep / 'results.jsonl')]
    assert record['vae'] == vaes.b
    result = run_tool(calculate_metrics.cmdline, ['gen', f'--net={sweep / record["net"]}', f'--ref={ref}',
                                                  '--seeds=0-5', '--batch=3', '--metrics=fid', f'--detector={detector}',
                                                  f'--vae={vaes.b}'])
    assert result.exit_code == 0, result.output
    assert record['value'] == pytest.approx(float(re.search(r'^fid = ([\d.e+-]+)$', result.output, re.M).group(1)),
                                            rel=1e-5)
    # Another VAE is another setting: measured anew, and it decodes other images.
    result = run_tool(sweep_phema.cmdline, args + [f'--vae={vaes.a}'])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in open(sweep / 'results.jsonl')]
    assert [r['vae'] for r in records] == [vaes.b, vaes.a] and records[1]['value'] != records[0]['value']
    line = error_line(run_tool(sweep_phema.cmdline, args[:1] + [f'--outdir={tmp_path / "sweep2"}'] + args[2:]
                               + [f'--vae={tmp_path / "none"}']))
    assert line == f'Error: --vae={tmp_path / "none"}: no such folder'
    assert not os.path.exists(tmp_path / 'sweep2')

#----------------------------------------------------------------------------
# 5. EDM2-format latent pickles: EDM2's class names and persistence format, written by the stand-in environment
# (tests/edm2_standin.py) with an encoder module that has EDM2's StabilityVAEEncoder attributes.

STANDIN_ENCODERS = '''
"""Test stand-in for EDM2's encoder module: the classes and the attributes their pickles carry."""

import numpy as np
import torch
import dnnlib
from torch_utils import persistence

class Encoder:
    def init(self, device):
        pass

@persistence.persistent_class
class StandardRGBEncoder(Encoder):
    def decode(self, x):
        return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)

@persistence.persistent_class
class StabilityVAEEncoder(Encoder):
    def __init__(self, vae_name='stabilityai/sd-vae-ft-mse', raw_mean=(5.81, 3.25, 0.12, -2.15),
                 raw_std=(4.17, 4.62, 3.71, 3.28), final_mean=0, final_std=0.5, batch_size=8):
        scale = np.float32(final_std) / np.asarray(raw_std, dtype=np.float32)
        vars(self).update(vae_name=vae_name, scale=scale,
                          bias=np.float32(final_mean) - np.asarray(raw_mean, dtype=np.float32) * scale,
                          batch_size=int(batch_size), _vae=None)

    def __getstate__(self):
        return dict(vars(self), _vae=None)

    def init(self, device):
        if self._vae is None:
            import diffusers
            self._vae = diffusers.models.AutoencoderKL.from_pretrained(
                self.vae_name, cache_dir=dnnlib.make_cache_dir_path('diffusers'), local_files_only=True)
        self._vae.eval().requires_grad_(False).to(device)

    def decode(self, x):
        self.init(x.device)
        shape = [1, -1, 1, 1]
        z = (x.to(torch.float32) - torch.as_tensor(self.bias).reshape(shape)) / torch.as_tensor(self.scale).reshape(shape)
        with torch.no_grad():
            pixels = torch.cat([self._vae.decode(part)['sample'] for part in z.split(self.batch_size)])
        return (pixels.clamp(0, 1) * 255).to(torch.uint8)
'''

WRITE_LATENT_PICKLE = '''
import pickle, sys
import torch
import dnnlib
from training import encoders, networks_edm2, training_loop

torch.manual_seed(0)
net = networks_edm2.Precond(**dict({tiny!r}, img_channels=4))
with torch.no_grad():
    for p in net.parameters():
        if p.ndim == 0:
            p.copy_(torch.rand([]) + 0.5)  # nonzero gains, as in a trained network
data = dnnlib.EasyDict(encoder=encoders.StabilityVAEEncoder(),
    dataset_kwargs=dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path='datasets/img512-sd.zip',
                                   use_labels=True),
    loss_fn=training_loop.EDM2Loss(P_mean=-0.4, P_std=1.0, sigma_data=0.5))
data.ema = net.eval().requires_grad_(False).to(torch.float16)
with open(sys.argv[1], 'wb') as f:
    pickle.dump(data, f)
print('written')
'''.format(tiny=edm2_standin.TINY)

@pytest.fixture(scope='module')
def edm2_latent_pickle(tmp_path_factory):
    root = tmp_path_factory.mktemp('edm2-latent')
    edm2_standin.write_tree(root / 'env', dict(edm2_standin.WRITER, **{'training/encoders.py': STANDIN_ENCODERS}))
    path = root / 'edm2-img512-tiny.pkl'
    assert edm2_standin.run_isolated(root / 'env', WRITE_LATENT_PICKLE, path).strip() == 'written'
    return str(path)

def test_edm2_latent_pickle_loads_and_generates(vaes, edm2_latent_pickle, tmp_path, monkeypatch):
    from sampling.generate import generate_images as generate
    foreign = loading.load_snapshot(edm2_latent_pickle, native=False, verbose=False)
    assert type(foreign.encoder).__module__.startswith('_imported_module_')   # EDM2's class, from the pickle
    assert foreign.encoder.vae_name == 'stabilityai/sd-vae-ft-mse'
    # Loaded natively, the encoder is ours with EDM2's state (affine constants to the bit).
    snap = loading.load_snapshot(edm2_latent_pickle, verbose=False)
    assert type(snap.encoder) is encoders.StabilityVAEEncoder
    ours = encoders.StabilityVAEEncoder()
    assert np.array_equal(snap.encoder.scale, ours.scale) and np.array_equal(snap.encoder.bias, ours.bias)
    assert snap.ema.img_channels == 4 and loading.is_native(snap.ema)
    # Offline, the hub VAE it names is not in the cache: one line that says what to do.
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    args = [f'--net={edm2_latent_pickle}', '--seeds=0-3', '--steps=4', '--batch=4', '--vae-batch=4']
    line = error_line(run_tool(generate_images.cmdline, args + [f'--outdir={tmp_path / "none"}']))
    assert line.startswith(f'Error: --net={edm2_latent_pickle}: the VAE it names, stabilityai/sd-vae-ft-mse: not in '
                           'the local cache'), line
    assert line.endswith('pass --vae=FOLDER')
    # With --vae=FOLDER it generates, and the images are EDM2's: its own network and encoder code, run from the
    # pickle, give the same pixels (the native network rounds differently in the last bits: at most 1 apart).
    result = run_tool(generate_images.cmdline, args + [f'--vae={vaes.a}', f'--outdir={tmp_path / "out"}'])
    assert result.exit_code == 0, result.output
    got = np.stack([png(tmp_path / 'out' / f'{s:06d}.png') for s in range(4)]).astype(int)
    foreign.encoder.vae_name = vaes.a
    ref = next(iter(generate(foreign.ema, encoder=foreign.encoder, seeds=range(4), num_steps=4, encoder_batch_size=4,
                             verbose=False, device='cpu')))
    want = ref.images.permute(0, 2, 3, 1).numpy().astype(int)
    assert got.shape == (4, 64, 64, 3) and np.abs(got - want).max() <= 1 and got.std() > 1
    # The weights-only export keeps the encoder; its VAE is overridden the same way.
    pt = str(tmp_path / 'net.pt')
    export.export(edm2_latent_pickle, pt, verbose=False)
    assert json.loads(torch.load(pt, weights_only=True)['architecture'])['encoder']['init_kwargs'] == \
        dict(vae_name='stabilityai/sd-vae-ft-mse')
    result = run_tool(generate_images.cmdline, [f'--net={pt}', '--seeds=0-3', '--steps=4', '--batch=4',
                                                '--vae-batch=4', f'--vae={vaes.a}', f'--outdir={tmp_path / "pt"}'])
    assert result.exit_code == 0, result.output
    assert all((tmp_path / 'pt' / f'{s:06d}.png').read_bytes() == (tmp_path / 'out' / f'{s:06d}.png').read_bytes()
               for s in range(4))

#----------------------------------------------------------------------------
# The real sd-vae-ft-mse architecture (83.7 M parameters, random weights): encode, decode and generate. Builds,
# saves (335 MB) and loads it three times.

def test_sd_vae_ft_mse_architecture_end_to_end(images, trained, tmp_path):
    vae = make_vae('sd-vae-ft-mse', seed=0)
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    folder = tmp_path / 'sd-vae-ft-mse'
    vae.save_pretrained(folder)
    lat = tmp_path / 'lat.zip'
    result = run_tool(dataset_tool.cmdline, ['encode', f'--source={images}', f'--dest={lat}', f'--vae={folder}',
                                             '--max-images=2', '--batch=2'])
    assert result.exit_code == 0, result.output
    files = read_zip(lat)
    stored = np.stack([np.load(io.BytesIO(files[f'00000/img-mean-std-{i:08d}.npy'])) for i in range(2)])
    source = read_zip(images)
    pixels = np.stack([np.asarray(PIL.Image.open(io.BytesIO(source[f'00000/img{i:08d}.png']))) for i in range(2)])
    mean, std = posterior(vae, pixels.transpose(0, 3, 1, 2), batch=2)
    assert stored.shape == (2, 8, 8, 8)
    assert np.array_equal(stored[:, :4], mean.numpy()) and np.array_equal(stored[:, 4:], std.numpy())
    result = run_tool(dataset_tool.cmdline, ['decode', f'--source={lat}', f'--dest={tmp_path / "dec"}'])
    assert result.exit_code == 0, result.output
    assert png(tmp_path / 'dec' / '00000' / 'img00000001.png').shape == (64, 64, 3)
    result = run_tool(generate_images.cmdline, [f'--net={trained.snapshot}', '--seeds=0-1', '--steps=2',
                                                f'--vae={folder}', '--vae-batch=2', f'--outdir={tmp_path / "gen"}'])
    assert result.exit_code == 0, result.output
    assert png(tmp_path / 'gen' / '000001.png').shape == (64, 64, 3)
