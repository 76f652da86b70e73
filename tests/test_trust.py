"""Trust (issue 27): files we call safe never run code, no run writes over another or over its own inputs, and no
tool prints or writes a meaningless number.

The table CASES runs every tool through click's CliRunner as tests/test_bad_inputs.py does: exit code 1 (our check)
or 2 (click's), exactly one line `Error: ...` matching the pattern, no traceback, every file that was there before
byte-identical afterwards, and no file that a payload would create (a payload pickle creates `PWNED-<case>` when it
runs). `pytest -s tests/test_trust.py | grep TABLE` lists what each case prints now. The functions after the table
check behaviour that a one-line error cannot show (what still loads, what is still measured, the run-dir lock).
"""

import copy
import gzip
import hashlib
import json
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import tempfile
import warnings
import zlib

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dnnlib
from metrics import detectors
from cli_cases import check_refusal, error_lines, files_under, run_tool
from conftest import make_tiny_net, randomize_weights, snapshot_dict, write_dataset, png_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#----------------------------------------------------------------------------
# Assets.

class Payload:
    """Unpickling this creates the folder `marker` (it stands for arbitrary code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))

class PooledColours(torch.nn.Module):
    """A stand-in for NVIDIA's Inception module (any size, `return_features`) with 24 cheap features."""

    def forward(self, img, return_features: bool = False):
        x = torch.nn.functional.adaptive_avg_pool2d(img.to(torch.float32), 2).flatten(1) / 255
        return torch.cat([x, x * x], dim=1)

def _pickle(path, obj, protocol=None):
    with open(path, 'wb') as f:
        pickle.dump(obj, f, protocol=protocol)

def _stats(mu, sigma, metric='fid'):
    return {'num_images': 10, metric: dict(mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))}

def _png16(path, array, colour=False):
    """A 16-bit PNG written byte by byte (grey, or RGB with colour=True; Pillow writes only 16-bit grey)."""
    height, width = array.shape[:2]
    raw = b''.join(b'\x00' + array[y].astype('>u2').tobytes() for y in range(height))
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff)
    header = struct.pack('>IIBBBBB', width, height, 16, 2 if colour else 0, 0, 0, 0)
    with open(path, 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))

def _idx(path, array, type_code):
    array = np.asarray(array)
    data = bytes([0, 0, type_code, array.ndim]) + np.array(array.shape, dtype='>u4').tobytes() + array.tobytes()
    with gzip.open(path, 'wb') as f:
        f.write(data)

@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    from networks.edm2plus import Precond
    from metrics.stats import calculate_stats_for_iterable, final_stats, save_stats
    root = tmp_path_factory.mktemp('trust')
    A = str(root)

    # Networks: 8x8 RGB with 4 classes, an unconditional one, and guides that cannot guide it.
    net = randomize_weights(make_tiny_net(label_dim=4))
    _pickle(f'{A}/net.pkl', snapshot_dict(net))
    _pickle(f'{A}/uncond.pkl', snapshot_dict(randomize_weights(make_tiny_net(label_dim=0, seed=1))))
    _pickle(f'{A}/three-classes.pkl', snapshot_dict(make_tiny_net(label_dim=3, seed=2)))
    torch.manual_seed(0)
    _pickle(f'{A}/res16.pkl', snapshot_dict(Precond(16, 3, 4, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                                                     attn_resolutions=[4])))
    _pickle(f'{A}/latent4.pkl', snapshot_dict(Precond(8, 4, 4, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                                                       attn_resolutions=[4])))
    # Payloads: pickles under the names of safe files, and a torch zip that names a function.
    for name in ('evil.pt', 'EVIL.PT', 'evil.pth'):
        _pickle(f'{A}/{name}', dict(ema=Payload(f'{A}/PWNED')))
    torch.save(dict(format='edm2plus-weights', version=1, x=Payload(f'{A}/PWNED')), f'{A}/evil-zip.pt')
    torch.save(dict(state=dnnlib.EasyDict(cur_nimg=0, total_elapsed_time=0.0), net={}, x=Payload(f'{A}/PWNED')),
               f'{A}/evil-state.pt')

    # A run of snapshots (post-hoc EMA inputs).
    os.makedirs(f'{A}/run')
    for kimg in (2, 4):
        for std in ('0.050', '0.100'):
            _pickle(f'{A}/run/network-snapshot-{kimg:07d}-{std}.pkl', snapshot_dict(net))

    # Data: a labelled zip of 8x8 images, a folder of them, IDX files.
    rng = np.random.RandomState(0)
    images = [rng.randint(0, 256, size=[8, 8, 3], dtype=np.uint8) for _ in range(6)]
    write_dataset(f'{A}/data.zip', images, labels=[0, 1, 2, 3, 0, 1])
    os.makedirs(f'{A}/images')
    for i, image in enumerate(images):
        with open(f'{A}/images/{i}.png', 'wb') as f:
            f.write(png_bytes(image))
    os.makedirs(f'{A}/idx')
    _idx(f'{A}/idx/train-images-idx3-ubyte.gz', rng.randint(0, 256, size=[3, 8, 8], dtype=np.uint8), 0x08)
    _idx(f'{A}/idx/train-labels-idx1-ubyte.gz', np.array([0, -1, 2], dtype=np.int8), 0x09)
    for name, labels in [('huge', [0, 10**12]), ('ragged', [[1, 2], [3]]), ('nanvec', [[1.0, float('nan')], [0, 1]]),
                         ('mixed', [[1, 2], 0])]:
        os.makedirs(f'{A}/labels-{name}')
        names = ['a.png', 'b.png']
        for n, image in zip(names, images):
            with open(f'{A}/labels-{name}/{n}', 'wb') as f:
                f.write(png_bytes(image))
        with open(f'{A}/labels-{name}/dataset.json', 'w') as f:
            json.dump({'labels': [[n, label] for n, label in zip(names, labels)]}, f)
    write_dataset(f'{A}/huge-label.zip', images[:2], labels=[0, 10**12])
    os.makedirs(f'{A}/float-tiff')
    for i in range(2):
        PIL.Image.fromarray(rng.rand(8, 8).astype(np.float32), 'F').save(f'{A}/float-tiff/{i}.tif')

    # The stand-in detector, reference statistics made with it, and broken or hostile statistics.
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)  # TorchScript is deprecated in 2.13
        torch.jit.save(torch.jit.script(PooledColours()), f'{A}/pooled.pt')
    batch = torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy())
    save_stats(final_stats(calculate_stats_for_iterable([batch], metrics=['fid'], device='cpu', verbose=False,
                                                        detector_kwargs=dict(fid=dict(path=f'{A}/pooled.pt')))),
               f'{A}/ref.pkl', verbose=False)
    both = pickle.load(open(f'{A}/ref.pkl', 'rb'))
    both['fd_dinov2'] = copy.deepcopy(both['fid'])
    _pickle(f'{A}/ref-both.pkl', both)
    _pickle(f'{A}/ref-payload.pkl', dict(fid=Payload(f'{A}/PWNED')))
    _pickle(f'{A}/ref-asym.pkl', _stats(np.zeros(24), np.eye(24) + np.triu(np.ones([24, 24]), 1)))
    _pickle(f'{A}/ref-negeig.pkl', _stats(np.zeros(2), [[1.0, 2.0], [2.0, 1.0]]))
    _pickle(f'{A}/ref-nan.pkl', _stats([0.0, np.nan], np.eye(2)))
    _pickle(f'{A}/ref-width16.pkl', _stats(np.zeros(16), np.eye(16)))
    _pickle(f'{A}/ref-text.pkl', {'fid': dict(mu=np.array(['a', 'b']), sigma=np.array([['a', 'b'], ['c', 'd']]))})
    np.savez(f'{A}/ref-object.npz', mu=np.array([1, None], dtype=object), sigma=np.eye(2))

    # Sweep results with one EMA length twice.
    with open(f'{A}/sweep.json', 'w') as f:
        f.write('{"0.050": 3.4, "0.100": 3.1}')
    with open(f'{A}/dup.json', 'w') as f:
        f.write('{"0.05": 3.4, "0.050": 2.9, "0.100": 3.1}')
    with open(f'{A}/dup.csv', 'w') as f:
        f.write('std,fid\n0.050,3.4\n0.100,3.1\n0.050,2.9\n')
    return root

#----------------------------------------------------------------------------
# The cases: (id, tool, arguments, exit code, pattern of the Error line). {A}: the assets folder, {T}: the case's own
# empty folder. `prepare(T, A, monkeypatch)` sets up a case (links, environment); `writes` allows new files (a
# training refused at resume writes its log); `root_only` skips a case that needs root's chown.

class Case:
    def __init__(self, id, tool, args, code, pattern, prepare=None, writes=False, root_only=False):  # pylint: disable=redefined-builtin
        self.id, self.tool, self.args, self.code, self.pattern = id, tool, args, code, pattern
        self.prepare, self.writes, self.root_only = prepare, writes, root_only

def _copy(src, dst):
    def prepare(T, A, _monkeypatch):
        os.makedirs(os.path.dirname(dst.format(T=T, A=A)), exist_ok=True)
        with open(src.format(T=T, A=A), 'rb') as f, open(dst.format(T=T, A=A), 'wb') as g:
            g.write(f.read())
    return prepare

def _symlink(target, link):
    return lambda T, A, _m: os.symlink(target.format(T=T, A=A), link.format(T=T, A=A))

def _hardlink(target, link):
    return lambda T, A, _m: os.link(target.format(T=T, A=A), link.format(T=T, A=A))

def _both(*steps):
    def prepare(T, A, monkeypatch):
        for step in steps:
            step(T, A, monkeypatch)
    return prepare

def _env(**values):
    def prepare(T, A, monkeypatch):
        for key, value in values.items():
            monkeypatch.setenv(key, value.format(T=T, A=A))
    return prepare

INCEPTION = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl'

def _planted_cache(cache, modes, owner=None):
    """A download cache at `cache` (modes of the cache folder and its downloads folder) holding a payload where
    NVIDIA's Inception pickle would be."""
    def prepare(T, A, monkeypatch):
        folder = cache.format(T=T, A=A)
        os.makedirs(os.path.join(folder, 'downloads'))
        name = hashlib.md5(INCEPTION.encode()).hexdigest() + '_inception-2015-12-05.pkl'
        _pickle(os.path.join(folder, 'downloads', name), Payload(f'{T}/PWNED'))
        os.chmod(folder, modes[0])
        os.chmod(os.path.join(folder, 'downloads'), modes[1])
        if owner is not None:
            os.chown(folder, owner, owner)
        monkeypatch.setenv('DNNLIB_CACHE_DIR', folder)
    return prepare

def _no_home(T, A, monkeypatch):
    """HOME and the password database give no home: the cache falls back to a folder of this user's own in the
    temporary folder, which someone else made world-writable and planted a payload in."""
    for var in ('HOME', 'USERPROFILE', 'DNNLIB_CACHE_DIR'):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(os.path, 'expanduser', lambda path: path)
    monkeypatch.setattr(tempfile, 'gettempdir', lambda: f'{T}/tmp')
    os.makedirs(f'{T}/tmp')
    _planted_cache(f'{T}/tmp/dnnlib-cache-{os.getuid()}', (0o777, 0o777))(T, A, monkeypatch)
    monkeypatch.delenv('DNNLIB_CACHE_DIR')

TRAIN = ['--data={A}/data.zip', '--outdir={T}/run', '--preset=demo']
GEN = ['--net={A}/net.pkl', '--outdir={T}/out', '--steps=2', '--seeds=0-1']
CALC = ['--images={A}/images', '--detector={A}/pooled.pt', '--workers=0', '--num=6']
GENM = ['--net={A}/net.pkl', '--detector={A}/pooled.pt', '--num=2', '--batch=2']
SWEEP = ['--indir={A}/run', '--outdir={T}/sweep', '--detector={A}/pooled.pt', '--metrics=fid', '--num=2']
REFUSED = r'refused: .*(run code|never unpickled)'

CASES = [
    # Code execution: a file we call safe never runs code, whatever its bytes, name case or the environment say.
    Case('generate-net-pickle-named-pt',   'generate', ['--net={A}/evil.pt', '--outdir={T}/out'], 1, r'evil\.pt: refused: a pickle under a \.pt name'),
    Case('generate-net-pickle-named-PT',   'generate', ['--net={A}/EVIL.PT', '--outdir={T}/out'], 1, r'EVIL\.PT: refused: a pickle under a \.pt name'),
    Case('generate-net-pickle-named-pth',  'generate', ['--net={A}/evil.pth', '--outdir={T}/out'], 1, r'evil\.pth: refused: a pickle under a \.pt name'),
    Case('generate-gnet-pickle-named-pt',  'generate', ['--net={A}/net.pkl', '--gnet={A}/evil.pt', '--guidance=2', '--outdir={T}/out', '--steps=2'], 1, r'evil\.pt: refused'),
    Case('generate-net-zip-with-payload',  'generate', ['--net={A}/evil-zip.pt', '--outdir={T}/out'], 1, r'evil-zip\.pt: refused: not a weights-only network file.*it names os\.makedirs'),
    Case('generate-net-training-state',    'generate', ['--net={A}/evil-state.pt', '--outdir={T}/out'], 1, r'evil-state\.pt: refused'),
    Case('flops-pickle-named-pt',          'flops', ['{A}/evil.pt'], 1, r'evil\.pt: refused: a pickle under a \.pt name'),
    Case('export-pickle-named-pt',         'export', ['{A}/evil.pt', '{T}/out.pt'], 1, r'evil\.pt: refused: a pickle under a \.pt name'),
    Case('gen-net-pickle-named-pt',        'gen', ['--net={A}/evil.pt', '--ref={A}/ref.pkl'] + GENM[1:], 1, r'evil\.pt: refused: a pickle under a \.pt name'),
    Case('calc-ref-payload',               'calc', ['--ref={A}/ref-payload.pkl'] + CALC, 1, r'ref-payload\.pkl: cannot read statistics \(refused: it names os\.makedirs'),
    Case('gen-ref-payload',                'gen', ['--ref={A}/ref-payload.pkl'] + GENM, 1, r'ref-payload\.pkl: cannot read statistics \(refused'),
    Case('sweep-ref-payload',              'sweep', SWEEP + ['--outstd=0.07', '--ref={A}/ref-payload.pkl'], 1, r'ref-payload\.pkl: cannot read statistics \(refused'),
    Case('calc-detector-pickle-named-pt',  'calc', ['--images={A}/images', '--ref={A}/ref.pkl', '--metrics=fid', '--detector={A}/evil.pt', '--workers=0', '--num=6'], 1, r'detector .*evil\.pt: cannot load it \(CodeRefusedError: refused: a pickle under a \.pt name'),
    Case('calc-dinov2-pickle-named-pth',   'calc', ['--images={A}/images', '--ref={A}/ref-both.pkl', '--metrics=fd_dinov2', '--dinov2={A}/evil.pth', '--workers=0', '--num=6'], 1, r'DINOv2 checkpoint .*evil\.pth: cannot load it \(CodeRefusedError: refused: a pickle under a \.pt name'),
    Case('train-resume-state-payload',     'train', TRAIN, 1, r'training-state-0000001\.pt: cannot resume from this training state \(CodeRefusedError: .*it names os\.makedirs',
         prepare=_copy('{A}/evil-state.pt', '{T}/run/training-state-0000001.pt'), writes=True),
    Case('train-resume-payload-forced-env', 'train', TRAIN, 1, r'training-state-0000001\.pt: cannot resume .*refused',
         prepare=_both(_copy('{A}/evil-state.pt', '{T}/run/training-state-0000001.pt'),
                       _env(TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD='1')), writes=True),
    Case('calc-cache-world-writable',      'calc', ['--images={A}/images', '--ref={A}/ref.pkl', '--metrics=fid', '--workers=0', '--num=6'], 1, r'refusing to use the download cache .*other users can write to it \(mode 777\)',
         prepare=_planted_cache('{T}/cache', (0o777, 0o777))),
    Case('calc-cache-group-writable',      'calc', ['--images={A}/images', '--ref={A}/ref.pkl', '--metrics=fid', '--workers=0', '--num=6'], 1, r'cache: refusing to use the download cache .*other users can write to it \(mode 775\)',
         prepare=_planted_cache('{T}/cache', (0o775, 0o755))),
    Case('calc-cache-of-another-user',     'calc', ['--images={A}/images', '--ref={A}/ref.pkl', '--metrics=fid', '--workers=0', '--num=6'], 1, r'refusing to use the download cache .*belongs to another user',
         prepare=_planted_cache('{T}/cache', (0o755, 0o755), owner=65534), root_only=True),
    Case('calc-cache-under-open-folder',   'calc', ['--images={A}/images', '--ref={A}/ref.pkl', '--metrics=fid', '--workers=0', '--num=6'], 1, r'open: refusing to use the download cache .*any user can write to it',
         prepare=_both(lambda T, A, m: os.makedirs(f'{T}/open'), _planted_cache('{T}/open/cache', (0o700, 0o700)),
                       lambda T, A, m: os.chmod(f'{T}/open', 0o777))),
    Case('calc-cache-without-home',        'calc', ['--images={A}/images', '--ref={A}/ref.pkl', '--metrics=fid', '--workers=0', '--num=6'], 1, r'dnnlib-cache-\d+/downloads: refusing to use the download cache',
         prepare=_no_home),

    # No tool writes over one of its own inputs, through any alias.
    Case('convert-dest-is-source-zip',     'convert', ['--source={T}/data.zip', '--dest={T}/data.zip', '--overwrite'], 1, r'--dest=.*data\.zip: is the input --source=',
         prepare=_copy('{A}/data.zip', '{T}/data.zip')),
    Case('convert-dest-symlink-to-source', 'convert', ['--source={T}/data.zip', '--dest={T}/link.zip', '--overwrite'], 1, r'link\.zip: is the input --source=.*data\.zip',
         prepare=_both(_copy('{A}/data.zip', '{T}/data.zip'), _symlink('{T}/data.zip', '{T}/link.zip'))),
    Case('convert-dest-hardlink-to-source', 'convert', ['--source={T}/data.zip', '--dest={T}/hard.zip', '--overwrite'], 1, r'hard\.zip: is the input --source=.*data\.zip',
         prepare=_both(_copy('{A}/data.zip', '{T}/data.zip'), _hardlink('{T}/data.zip', '{T}/hard.zip'))),
    Case('convert-dest-other-spelling',    'convert', ['--source={T}/data.zip', '--dest={T}/x/../data.zip', '--overwrite'], 1, r'is the input --source=',
         prepare=_both(_copy('{A}/data.zip', '{T}/data.zip'), lambda T, A, m: os.makedirs(f'{T}/x'))),
    Case('convert-dest-is-source-folder',  'convert', ['--source={T}/ds', '--dest={T}/ds', '--overwrite'], 1, r'ds: is the input --source=',
         prepare=_both(_copy('{A}/images/0.png', '{T}/ds/0.png'), _copy('{A}/images/1.png', '{T}/ds/1.png'),
                       lambda T, A, m: open(f'{T}/ds/dataset.json', 'w').write('{"labels": null}'))),
    Case('convert-dest-inside-source',     'convert', ['--source={A}/images', '--dest={A}/images/out'], 1, r'images/out: lies inside the input --source='),
    Case('convert-dest-contains-source',   'convert', ['--source={T}/data/images', '--dest={T}/data', '--overwrite'], 1, r'data: contains the input --source=',
         prepare=_both(_copy('{A}/images/0.png', '{T}/data/images/0.png'),
                       lambda T, A, m: open(f'{T}/data/dataset.json', 'w').write('{"labels": null}'))),
    Case('convert-dest-contains-idx',      'convert', ['--source={T}/d/train-images-idx3-ubyte.gz', '--dest={T}/d', '--overwrite'], 1, r'd: contains the input --source',
         prepare=_copy('{A}/idx/train-images-idx3-ubyte.gz', '{T}/d/train-images-idx3-ubyte.gz')),
    Case('encode-dest-is-source',          'encode', ['--source={T}/data.zip', '--dest={T}/data.zip', '--overwrite'], 1, r'data\.zip: is the input --source=',
         prepare=_copy('{A}/data.zip', '{T}/data.zip')),
    Case('decode-dest-is-source',          'decode', ['--source={T}/data.zip', '--dest={T}/data.zip', '--overwrite'], 1, r'data\.zip: is the input --source=',
         prepare=_copy('{A}/data.zip', '{T}/data.zip')),
    Case('plot-out-is-results',            'plot', ['--results={T}/s.json', '--out={T}/s.json', '--overwrite'], 1, r's\.json: is the input --results=',
         prepare=_copy('{A}/sweep.json', '{T}/s.json')),
    Case('plot-out-symlink-to-results',    'plot', ['--results={T}/s.json', '--out={T}/s.png', '--overwrite'], 1, r's\.png: is the input --results=.*s\.json',
         prepare=_both(_copy('{A}/sweep.json', '{T}/s.json'), _symlink('{T}/s.json', '{T}/s.png'))),
    Case('generate-grid-is-net',           'generate', ['--net={T}/net.pkl', '--outdir={T}/out', '--seeds=0-1', '--steps=2', '--grid={T}/net.pkl', '--overwrite'], 1, r'net\.pkl: is the input --net=',
         prepare=_copy('{A}/net.pkl', '{T}/net.pkl')),
    Case('generate-grid-is-an-image',      'generate', GEN + ['--grid={T}/out/000001.png'], 1, r'000001\.png: --grid is also the image of seed 1'),
    Case('generate-net-is-an-output',      'generate', ['--net={T}/out/000000.png', '--outdir={T}/out', '--seeds=0-1', '--steps=2'], 1, r'out/000000\.png: is the input --net=',
         prepare=_copy('{A}/net.pkl', '{T}/out/000000.png')),
    Case('ref-dest-is-data',               'ref', ['--data={T}/data.zip', '--dest={T}/data.zip', '--overwrite', '--metrics=fid', '--detector={A}/pooled.pt'], 1, r'data\.zip: is the input --data=',
         prepare=_copy('{A}/data.zip', '{T}/data.zip')),
    Case('ref-dest-is-detector',           'ref', ['--data={A}/images', '--dest={T}/d.pt', '--overwrite', '--metrics=fid', '--detector={T}/d.pt'], 1, r'd\.pt: is the input --detector=',
         prepare=_copy('{A}/pooled.pt', '{T}/d.pt')),
    Case('ref-dest-is-an-image-of-data',   'ref', ['--data={T}/imgs', '--dest={T}/imgs/new.png', '--metrics=fid', '--detector={A}/pooled.pt'], 1, r'new\.png: lies inside --data=.*with the name of an image',
         prepare=_both(_copy('{A}/images/0.png', '{T}/imgs/0.png'), _copy('{A}/images/1.png', '{T}/imgs/1.png'))),
    Case('phema-outdir-over-inputs',       'phema', ['--indir={A}/run', '--outdir={A}/run', '--outprefix=network-snapshot', '--outstd=0.05'], 1, r'network-snapshot-0000004-0\.050\.pkl: is the input --indir=.*choose another --outdir or --outprefix'),
    Case('sweep-outdir-over-inputs',       'sweep', ['--indir={A}/run', '--outdir={A}', '--outprefix=network-snapshot', '--outstd=0.05', '--ref={A}/ref.pkl', '--detector={A}/pooled.pt', '--metrics=fid', '--num=2'], 1, r'network-snapshot-0000004-0\.050\.pkl: is the input --indir='),
    Case('export-out-hardlink-to-in',      'export', ['{T}/net.pkl', '{T}/same.pt', '--overwrite'], 1, r'same\.pt: is the input IN=',
         prepare=_both(_copy('{A}/net.pkl', '{T}/net.pkl'), _hardlink('{T}/net.pkl', '{T}/same.pt'))),

    # Statistics are checked before anything is measured.
    Case('calc-ref-asymmetric',            'calc', ['--ref={A}/ref-asym.pkl'] + CALC, 1, r'ref-asym\.pkl: "fid": sigma is not symmetric'),
    Case('calc-ref-negative-eigenvalue',   'calc', ['--ref={A}/ref-negeig.pkl'] + CALC, 1, r'ref-negeig\.pkl: "fid": sigma has negative eigenvalues'),
    Case('calc-ref-nan',                   'calc', ['--ref={A}/ref-nan.pkl'] + CALC, 1, r'ref-nan\.pkl: "fid" contains NaN or Inf'),
    Case('calc-ref-text-arrays',           'calc', ['--ref={A}/ref-text.pkl'] + CALC, 1, r'ref-text\.pkl: "fid" holds mu of type <U1 .*expected arrays of numbers'),
    Case('calc-ref-object-npz',            'calc', ['--ref={A}/ref-object.npz'] + CALC, 1, r'ref-object\.npz: cannot read statistics \(ValueError: Object arrays cannot be loaded'),
    Case('calc-ref-other-detector',        'calc', ['--ref={A}/ref-width16.pkl', '--metrics=fid'] + CALC, 1, r'ref-width16\.pkl: its fid statistics have 16 features, but InceptionV3Detector gives 24'),
    Case('calc-ref-lacks-metric',          'calc', ['--ref={A}/ref.pkl', '--metrics=fid,fd_dinov2'] + CALC, 1, r'ref\.pkl: holds no statistics for fd_dinov2 \(it has fid\); choose --metrics=fid'),
    Case('gen-ref-asymmetric',             'gen', ['--ref={A}/ref-asym.pkl'] + GENM, 1, r'ref-asym\.pkl: "fid": sigma is not symmetric'),
    Case('gen-ref-other-detector',         'gen', ['--ref={A}/ref-width16.pkl', '--metrics=fid'] + GENM, 1, r'its fid statistics have 16 features, but InceptionV3Detector gives 24'),

    # Sampler settings that give no sensible schedule.
    Case('generate-sigma-min-above-max',   'generate', GEN + ['--sigma_min=100'], 1, r'--sigma_min=100 must be below --sigma_max=80'),
    Case('generate-rho-tiny',              'generate', GEN + ['--rho=0.001'], 1, r'--sigma_max=80 with --rho=0\.001: the noise levels overflow single precision'),
    Case('generate-rho-half',              'generate', GEN + ['--rho=0.5'], 1, r'--rho=0\.5: the noise levels are not strictly decreasing'),
    Case('generate-sigma-max-huge',        'generate', GEN + ['--sigma_max=1e30'], 1, r'--sigma_max=1e\+30 with --rho=7: the noise levels overflow'),
    Case('generate-steps-huge',            'generate', GEN[:2] + ['--seeds=0-1', '--steps=1000000000000'], 1, r'--steps=1000000000000: give 1 to 1000000 steps'),
    Case('generate-churn-outside',         'generate', GEN + ['--S_churn=5', '--S_min=100'], 1, r'--S_churn=5 has no effect: no noise level of the schedule'),
    Case('generate-S-min-above-S-max',     'generate', GEN + ['--S_churn=5', '--S_min=10', '--S_max=1'], 1, r'--S_min=10 must not exceed --S_max=1'),
    Case('generate-S-noise-negative',      'generate', GEN + ['--S_noise=-1'], 2, r"'--S_noise': -1\.0 is not in the range x>=0"),
    Case('generate-interval-outside',      'generate', ['--net={A}/net.pkl', '--gnet={A}/uncond.pkl', '--guidance=2', '--guidance-interval=100,200', '--outdir={T}/out', '--steps=2'], 1, r'--guidance-interval=100,200 has no effect'),

    # Values that collide in file names, or repeat an image.
    Case('generate-seeds-twice',           'generate', GEN[:3] + ['--seeds=0-3,2'], 2, r"'--seeds': 2 is given twice"),
    Case('generate-seed-negative',         'generate', GEN[:3] + ['--seeds=-1'], 2, r"'--seeds': -1 is not in the range 0<=x<=4294967295"),
    Case('generate-seed-beyond-2-32',      'generate', GEN[:3] + ['--seeds=4294967301'], 2, r"'--seeds': 4294967301 is not in the range"),
    Case('gen-seeds-twice',                'gen', ['--ref={A}/ref.pkl'] + GENM + ['--seeds=0,1,0'], 2, r"'--seeds': 0 is given twice"),
    Case('gen-seeds-past-the-last',        'gen', ['--ref={A}/ref.pkl'] + GENM + ['--seed=4294967295'], 2, r'--seed=4294967295 --num=2: the seeds would run past 4294967295'),
    Case('sweep-seeds-twice',              'sweep', SWEEP[:3] + ['--outstd=0.07', '--ref={A}/ref.pkl', '--seeds=3,3'], 2, r"'--seeds': 3 is given twice"),
    Case('phema-outstd-same-file-name',    'phema', ['--indir={A}/run', '--outdir={T}/out', '--outstd=0.0501,0.0502'], 2, r"0\.0501 and 0\.0502 are the same EMA length at the three decimals"),
    Case('sweep-outstd-same-file-name',    'sweep', SWEEP + ['--outstd=0.07,0.0701', '--ref={A}/ref.pkl'], 2, r'0\.07 and 0\.0701 are the same EMA length'),
    Case('train-ema-stds-same-file-name',  'train', TRAIN + ['--ema-stds=0.05,0.0504'], 1, r'--ema-stds=0\.05,0\.0504: two of them are 0\.050'),
    Case('plot-results-std-twice-json',    'plot', ['--results={A}/dup.json', '--out={T}/p.png'], 1, r'dup\.json: 0\.050: σ_rel 0\.05 appears twice in the results'),
    Case('plot-results-std-twice-csv',     'plot', ['--results={A}/dup.csv', '--out={T}/p.png'], 1, r'dup\.csv: record 3: σ_rel 0\.05 appears twice'),

    # Labels that training would refuse or cannot hold are refused when the dataset is written.
    Case('convert-label-huge',             'convert', ['--source={A}/labels-huge', '--dest={T}/o.zip'], 1, r'dataset\.json: invalid labels \(the label of b\.png is 1000000000000; not a usable class label'),
    Case('convert-label-vectors-ragged',   'convert', ['--source={A}/labels-ragged', '--dest={T}/o.zip'], 1, r'the label of b\.png is \[3\]; .* of one length \(2\)'),
    Case('convert-label-vector-nan',       'convert', ['--source={A}/labels-nanvec', '--dest={T}/o.zip'], 1, r'the label of a\.png is \[1\.0, NaN\]; label vectors must hold finite'),
    Case('convert-labels-mixed-kinds',     'convert', ['--source={A}/labels-mixed', '--dest={T}/o.zip'], 1, r'the label of b\.png is 0; labels must be class indices or vectors'),
    Case('convert-idx-label-negative',     'convert', ['--source={A}/idx/train-images-idx3-ubyte.gz', '--dest={T}/o.zip'], 1, r'train-labels-idx1-ubyte\.gz: invalid labels \(the label of train-images-idx3-ubyte\.gz\[1\] is -1'),
    Case('convert-num-classes-huge',       'convert', ['--source={A}/images', '--dest={T}/o.zip', '--num-classes=1000000000'], 2, r"'--num-classes': 1000000000 is not in the range 1<=x<=1048576"),
    Case('train-label-huge',               'train', ['--data={A}/huge-label.zip', '--outdir={T}/run', '--preset=demo'], 1, r'--data: .*not a usable class label'),
    Case('calc-float-images',              'calc', ['--images={A}/float-tiff', '--ref={A}/ref.pkl', '--metrics=fid', '--detector={A}/pooled.pt', '--workers=0', '--num=2'], 1, r'0\.tif: cannot decode image \(ValueError: floating-point pixels have no known brightness scale'),

    # A guide that cannot guide the main network.
    Case('generate-gnet-other-resolution', 'generate', ['--net={A}/net.pkl', '--gnet={A}/res16.pkl', '--guidance=2', '--outdir={T}/out', '--steps=2'], 1, r'res16\.pkl: the guiding network\'s resolution is 16, the main network\'s 8'),
    Case('generate-gnet-other-channels',   'generate', ['--net={A}/net.pkl', '--gnet={A}/latent4.pkl', '--guidance=2', '--outdir={T}/out', '--steps=2'], 1, r'latent4\.pkl: the guiding network\'s channel count is 4'),
    Case('generate-gnet-other-classes',    'generate', ['--net={A}/net.pkl', '--gnet={A}/three-classes.pkl', '--guidance=2', '--outdir={T}/out', '--steps=2'], 1, r'three-classes\.pkl: the guiding network has 3 classes, the main network 4'),
    Case('gen-gnet-other-resolution',      'gen', ['--ref={A}/ref.pkl', '--gnet={A}/res16.pkl', '--guidance=2'] + GENM, 1, r'res16\.pkl: the guiding network\'s resolution is 16'),

    # Requests that cannot fit in memory are one line, up front.
    Case('generate-seeds-trillion',        'generate', GEN[:2] + ['--seeds=0-999999999999'], 2, r"'--seeds': \"0-999999999999\" makes the list longer than 10,000,000 values"),
    Case('gen-seeds-trillion',             'gen', ['--ref={A}/ref.pkl'] + GENM + ['--seeds=0-999999999999'], 2, r'makes the list longer than'),
    Case('generate-batch-huge',            'generate', GEN[:2] + ['--seeds=0-9999999', '--batch=10000000', '--steps=2'], 1, r'A batch of 10000000 images \(--batch\) needs at least .* GiB, more than this machine has'),
    Case('convert-resolution-huge',        'convert', ['--source={A}/images', '--dest={T}/o.zip', '--resolution=65536x65536'], 1, r'--resolution=65536x65536: converting one image needs at least 48\.0 GiB'),
    Case('convert-resolution-not-square',  'convert', ['--source={A}/images', '--dest={T}/o.zip', '--resolution=64x32'], 1, r'required to be square\.  Got 64x32'),
    Case('train-batch-huge',               'train', TRAIN + ['--batch=1Gi', '--duration=1Gi', '--status=1Gi', '--snapshot=1Gi', '--checkpoint=1Gi'], 1, r'Training 0\.\d M parameters .* at 1073741824 images per step .* more than this machine has'),
    Case('train-expansion-huge',           'train', TRAIN + ['--block=G*', '--expansion=1e6'], 1, r'Training [\d,.]+ M parameters \(--channels, --channel-mult, --expansion\) .* more than this machine has'),
    Case('train-channels-huge',            'train', TRAIN + ['--channels=1000000000'], 1, r'the network cannot be built \(.*\); check --channels, --channel-mult and --expansion'),
    Case('flops-channels-huge',            'flops', ['--channels=1000000000'], 1, r'the network cannot be built \(.*\); check --channels and --expansion'),
    Case('plot-results-binary',            'plot', ['--results={T}/bin.json', '--out={T}/p.png'], 1, r'bin\.json: not a text file',
         prepare=lambda T, A, m: open(f'{T}/bin.json', 'wb').write(bytes(range(128, 256)))),
    Case('ref-detector-is-a-network',      'ref', ['--data={A}/images', '--dest={T}/r.pkl', '--metrics=fid', '--detector={A}/net.pkl'], 1, r'detector .*net\.pkl: cannot load it \(TypeError: the file holds a EasyDict, not a model\)'),
]

#----------------------------------------------------------------------------

TIME_LIMIT = 60  # seconds; every case should end in a few

def run_case(case, assets, tmp_path, monkeypatch):
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'private-cache'))  # never the user's own cache
    # Detectors that earlier tests loaded in this process are kept in memory: each case must find its own.
    monkeypatch.setattr(detectors, '_detector_cache', {})
    if case.prepare is not None:
        case.prepare(str(tmp_path), str(assets), monkeypatch)
    before = (files_under(assets), files_under(tmp_path))
    result = run_tool(case.tool, [a.format(A=assets, T=tmp_path) for a in case.args], TIME_LIMIT)
    return result, before, (files_under(assets), files_under(tmp_path))

@pytest.mark.parametrize('case', CASES, ids=[c.id for c in CASES])
def test_trust_case(case, assets, tmp_path, monkeypatch, one_thread):  # pylint: disable=redefined-outer-name,unused-argument
    if case.root_only and os.getuid() != 0:
        pytest.skip('needs root to give a folder to another user')
    result, before, after = run_case(case, assets, tmp_path, monkeypatch)
    check_refusal(case, result)
    assert not os.path.exists(assets / 'PWNED') and not os.path.exists(tmp_path / 'PWNED'), 'a payload ran'
    assert after[0] == before[0], 'a file in the assets folder changed or appeared'
    if case.writes:
        assert {k: v for k, v in after[1].items() if k in before[1]} == before[1], 'a file that was there changed'
    else:
        assert after[1] == before[1], f'files before {sorted(before[1])}, after {sorted(after[1])}'

def test_at_least_forty_cases_in_every_class():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)

#----------------------------------------------------------------------------
# What still loads: EDM2's files, read without code.

def test_edm2_training_state_with_easydict_still_resumes(tmp_path, monkeypatch):
    from torch_utils import distributed as dist
    from torch_utils import misc
    monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')  # yields to our explicit weights_only=True
    net = torch.nn.Linear(2, 2)
    path = tmp_path / 'training-state-0000001.pt'
    torch.save(dict(state=dnnlib.EasyDict(cur_nimg=1024, total_elapsed_time=3.0), net=net.state_dict(),
                    loss_fn=dict(P_mean=-0.4)), str(path))
    state, net2 = dnnlib.EasyDict(), torch.nn.Linear(2, 2)
    dist.CheckpointIO(state=state, net=net2, loss_fn=None).load(str(path), verbose=False)
    assert isinstance(state, dnnlib.EasyDict) and state.cur_nimg == 1024 and torch.equal(net2.weight, net.weight)
    torch.save(dict(state=dnnlib.EasyDict(cur_nimg=0), x=Payload(tmp_path / 'PWNED')), str(path))
    with pytest.raises(misc.CodeRefusedError, match=r'refused: loading it would run code .*it names os\.makedirs'):
        dist.CheckpointIO(state=dnnlib.EasyDict()).load(str(path), verbose=False)
    assert not (tmp_path / 'PWNED').exists()

@pytest.mark.parametrize('protocol', [2, 4, 5])
def test_statistics_pickles_of_every_protocol_load_without_code(tmp_path, protocol):
    from metrics.stats import load_stats
    rng = np.random.RandomState(0)
    f = rng.randn(50, 8)
    stats = dnnlib.EasyDict(num_images=np.int64(50), fid=dict(mu=f.mean(0), sigma=np.cov(f, rowvar=False).astype(np.float32)))
    _pickle(tmp_path / 'ref.pkl', stats, protocol=protocol)
    loaded = load_stats(str(tmp_path / 'ref.pkl'), verbose=False)
    assert int(loaded['num_images']) == 50
    np.testing.assert_array_equal(loaded['fid']['mu'], stats['fid']['mu'])
    np.testing.assert_array_equal(loaded['fid']['sigma'], stats['fid']['sigma'])

def test_frechet_distance_that_is_no_distance_is_refused():
    from metrics.stats import StatsError, calculate_metrics_from_stats
    ref = _stats(np.zeros(2), np.eye(2))
    bad = _stats(np.zeros(2), -np.eye(2) * 4)  # computed statistics are not validated as files are: caught here
    with pytest.raises(StatsError, match=r'fid: the Frechet distance came out as -\d+'):
        calculate_metrics_from_stats(bad, ref, ['fid'], verbose=False)
    assert calculate_metrics_from_stats(ref, ref, ['fid'], verbose=False)['fid'] == pytest.approx(0, abs=1e-12)

def test_help_says_which_files_run_code():
    import calculate_metrics
    import sweep_phema
    for command, args in [(calculate_metrics.cmdline, ['calc', '--help']), (calculate_metrics.cmdline, ['gen', '--help']),
                          (calculate_metrics.cmdline, ['ref', '--help']), (sweep_phema.cmdline, ['--help'])]:
        text = ' '.join(CliRunner().invoke(command, args).output.split())
        assert 'A pickle RUNS THE CODE stored in it' in text and 'runs no Python code from the file' in text, args
        assert 'A pickled model RUNS THE CODE stored in it' in text and 'read weights-only and runs no code' in text

def test_num_classes_limit_is_trainings():
    import dataset_tool
    from training.dataset import MAX_CLASSES
    option = next(p for p in dataset_tool.convert.params if p.name == 'num_classes')
    assert option.type.max == MAX_CLASSES

#----------------------------------------------------------------------------
# The download cache.

def test_cache_is_made_private_and_never_the_shared_temp_folder(tmp_path, monkeypatch):
    for var in ('HOME', 'USERPROFILE', 'DNNLIB_CACHE_DIR'):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(dnnlib.util, '_cache_dir', None)
    monkeypatch.setattr(os.path, 'expanduser', lambda path: path)  # no home in the password database either
    monkeypatch.setattr(tempfile, 'gettempdir', lambda: str(tmp_path))
    old = os.umask(0o002)  # a umask that makes group-writable folders
    try:
        path = dnnlib.util.make_cache_dir_path('downloads', create=True)
    finally:
        os.umask(old)
    assert path == os.path.join(str(tmp_path), f'dnnlib-cache-{os.getuid()}', 'downloads')
    assert os.stat(path).st_mode & 0o777 == 0o700 and os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700
    os.chmod(os.path.dirname(path), 0o770)
    with pytest.raises(dnnlib.util.UnsafeCacheError, match=r'other users can write to it \(mode 770\)'):
        dnnlib.util.make_cache_dir_path('downloads')
    os.chmod(os.path.dirname(path), 0o755)  # readable by others is fine; writable is not
    assert dnnlib.util.make_cache_dir_path('downloads') == path

#----------------------------------------------------------------------------
# Images: what a file shows is what is stored.

def test_16_bit_pngs_keep_their_brightness(tmp_path):
    import dataset_tool
    from training.dataset import ImageFolderDataset
    from metrics.images import ImageFiles
    grey = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1000).astype(np.uint16)
    colour = np.stack([grey, 65535 - grey, np.full_like(grey, 257 * 200)], axis=2)
    os.makedirs(tmp_path / 'src')
    _png16(str(tmp_path / 'src' / 'a.png'), grey)
    _png16(str(tmp_path / 'src' / 'b.png'), colour, colour=True)
    want_grey = np.round(grey / 257).astype(np.uint8)
    # dataset_tool: scaled, not clipped to white (Pillow's convert) or wrapped (a uint8 cast).
    dataset_tool.convert_dataset(str(tmp_path / 'src'), str(tmp_path / 'o.zip'), verbose=False)
    ds = ImageFolderDataset(str(tmp_path / 'o.zip'))
    np.testing.assert_array_equal(ds[0][0], np.stack([want_grey] * 3))
    b = ds[1][0].astype(int)  # 48-bit colour: Pillow keeps each value's high byte (at most 1 below rounding)
    assert np.abs(b[0] - want_grey).max() <= 1 and np.abs(b[1] - (255 - want_grey)).max() <= 1 and (b[2] == 200).all()
    # Training and the metrics read a 16-bit PNG as 8 bits of the same brightness too.
    raw = ImageFolderDataset(str(tmp_path / 'src'), use_labels=False)
    np.testing.assert_array_equal(raw[0][0][0], want_grey)
    images = ImageFiles(str(tmp_path / 'src'))
    np.testing.assert_array_equal(images[0][0][1], want_grey)

def test_palette_images_are_read_as_their_colours(tmp_path):
    from training.dataset import ImageFolderDataset
    palette = PIL.Image.new('P', (4, 4))
    palette.putpalette([0, 0, 0, 250, 10, 20] + [0] * 762)
    palette.putpixel((1, 1), 1)
    os.makedirs(tmp_path / 'p')
    palette.save(tmp_path / 'p' / 'a.png')
    image = ImageFolderDataset(str(tmp_path / 'p'), use_labels=False)[0][0]
    assert image.shape == (3, 4, 4) and list(image[:, 1, 1]) == [250, 10, 20] and image[:, 0, 0].tolist() == [0, 0, 0]

#----------------------------------------------------------------------------
# Samples that are not finite are never written or measured.

def test_non_finite_samples_stop_before_writing(tmp_path):
    from sampling.generate import generate_images
    net = make_tiny_net(label_dim=0)

    def sampler(net, noise, labels, gnet, randn_like, **_kwargs):  # pylint: disable=unused-argument
        out = noise.clone()
        out[1] = float('nan')  # the second seed of every batch
        return out
    with pytest.raises(ValueError, match=r'the sampler produced NaN or infinite values for seed 5'):
        list(generate_images(net, seeds=[4, 5, 6], outdir=str(tmp_path / 'out'), sampler_fn=sampler, verbose=False,
                             max_batch_size=3))
    assert not os.path.exists(tmp_path / 'out') or os.listdir(tmp_path / 'out') == []

def test_a_guide_without_classes_still_guides(assets, tmp_path):
    from sampling.generate import generate_images
    result = list(generate_images(str(assets / 'net.pkl'), gnet=str(assets / 'uncond.pkl'), guidance=2, seeds=[0],
                                  num_steps=2, verbose=False, outdir=str(tmp_path)))
    assert result[0].images.shape == (1, 3, 8, 8) and os.listdir(tmp_path) == ['000000.png']

#----------------------------------------------------------------------------
# One writer per run directory.

_HOLDER = '''
import sys, time
sys.path.insert(0, {root!r})
from torch_utils import distributed as dist
dist.acquire_run_dir({run_dir!r}, {name!r})
print('locked', flush=True)
time.sleep(300)
'''

def _hold_lock(run_dir, name='training.lock'):
    proc = subprocess.Popen([sys.executable, '-c', _HOLDER.format(root=ROOT, run_dir=str(run_dir), name=name)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == 'locked'
    return proc

def test_second_training_is_refused_and_a_dead_one_resumes(assets, tmp_path, monkeypatch):
    import train_edm2plus
    from torch_utils import distributed as dist
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    run_dir = tmp_path / 'run'
    os.makedirs(run_dir)
    (run_dir / 'stats.jsonl').write_text('{"Progress/kimg": 0.000}\n')
    holder = _hold_lock(run_dir)
    try:
        before = files_under(run_dir)
        result = CliRunner().invoke(train_edm2plus.cmdline, [f'--data={assets}/data.zip', f'--outdir={run_dir}',
                                                             '--preset=demo', '--duration=64', '--batch=32'])
        lines = error_lines(result.output)
        assert result.exit_code == 1 and len(lines) == 1 and 'Traceback' not in result.output, result.output
        assert re.search(rf'--outdir=.*run: in use by another training \(PID {holder.pid} on host \S+, started ', lines[0])
        assert files_under(run_dir) == before  # nothing written: no log.txt, no training_options.json
        # A sweep's lock is its own: a second sweep in the same folder is refused the same way.
        with pytest.raises(dist.RunDirBusyError, match=rf'in use by another training \(PID {holder.pid}'):
            dist.acquire_run_dir(str(run_dir))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The holder died (SIGKILL: no clean-up of any kind): the lock went with it, and the run goes on.
    release = dist.acquire_run_dir(str(run_dir))
    assert f'PID {os.getpid()} ' in (run_dir / 'training.lock').read_text()
    release()

def test_second_sweep_is_refused(assets, tmp_path, monkeypatch):
    import sweep_phema
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    holder = _hold_lock(tmp_path / 'sweep', 'sweep.lock')
    try:
        result = CliRunner().invoke(sweep_phema.cmdline, [a.format(A=assets, T=tmp_path) for a in SWEEP] +
                                    ['--outstd=0.07', f'--ref={assets}/ref.pkl'])
        lines = error_lines(result.output)
        assert result.exit_code == 1 and len(lines) == 1, result.output
        assert re.search(rf'sweep: in use by another sweep \(PID {holder.pid} ', lines[0])
        assert sorted(os.listdir(tmp_path / 'sweep')) == ['sweep.lock']
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()

@pytest.mark.slow
def test_torchrun_ranks_all_stop_with_one_line(assets, tmp_path):
    """Two ranks under torchrun: rank 0 finds the directory held, every rank stops (no rank waits for the
    others), and the output has one Error line."""
    run_dir = tmp_path / 'run'
    holder = _hold_lock(run_dir)
    try:
        env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
        proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                               os.path.join(ROOT, 'train_edm2plus.py'), f'--data={assets}/data.zip',
                               f'--outdir={run_dir}', '--preset=demo', '--batch=32', '--duration=64'],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    lines = [line for line in output.splitlines() if re.match(r'(\[rank\d+\]:\s*)?Error:', line)]  # torchrun's own
    assert len(lines) == 1 and f'in use by another training (PID {holder.pid} ' in lines[0], output[-3000:]  # summary aside
    # No traceback from a worker (torchrun itself ends with one of its own, listing the failed ranks): rank 1
    # stopped too, without a word.
    assert not re.search(rf'File "{re.escape(ROOT)}/(?!\.venv)', output) and 'rank      : 1' in output
    assert sorted(os.listdir(run_dir)) == ['training.lock']

#----------------------------------------------------------------------------
# A sweep measures again what was measured against other reference statistics.

def test_sweep_measures_again_when_the_reference_changes(assets, tmp_path, monkeypatch, one_thread):  # pylint: disable=unused-argument
    import sweep_phema
    from metrics.stats import save_stats, load_stats
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    ref = str(tmp_path / 'ref.pkl')
    save_stats(load_stats(str(assets / 'ref.pkl'), verbose=False), ref, verbose=False)
    args = [f'--indir={assets}/run', f'--outdir={tmp_path}/sweep', '--outstd=0.07', f'--ref={ref}',
            f'--detector={assets}/pooled.pt', '--metrics=fid', '--num=2', '--batch=2']
    measured = []
    from metrics import sweeps
    real = sweeps.measure_network
    monkeypatch.setattr(sweeps, 'measure_network', lambda path, *a, **k: measured.append(path) or real(path, *a, **k))
    for _ in range(2):  # the second run finds the point measured
        result = CliRunner().invoke(sweep_phema.cmdline, args)
        assert result.exit_code == 0, result.output
    assert len(measured) == 1
    stats = load_stats(ref, verbose=False)
    stats['fid']['mu'] = stats['fid']['mu'] + 0.5  # same name, size class and shape; other numbers
    save_stats(stats, ref, verbose=False)
    result = CliRunner().invoke(sweep_phema.cmdline, args)
    assert result.exit_code == 0, result.output
    assert len(measured) == 2 and '0 of 1 points already measured' in result.output
    records = [json.loads(line) for line in open(tmp_path / 'sweep' / 'results.jsonl')]
    assert len(records) == 2 and records[0]['ref_sha256'] != records[1]['ref_sha256']
    assert records[1]['value'] != records[0]['value']
    # Records written before fingerprints existed still count as measured (they cannot tell).
    del records[1]['ref_sha256']
    with open(tmp_path / 'sweep' / 'results.jsonl', 'w') as f:
        f.write(json.dumps(records[1]) + '\n')
    result = CliRunner().invoke(sweep_phema.cmdline, args)
    assert result.exit_code == 0 and len(measured) == 2, result.output
