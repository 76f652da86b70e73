"""Bad input to every command-line tool: each case must end in exit code 1 (our check) or 2 (click's option
check), with exactly one line `Error: ...` that names the input at fault, no traceback, and every file that was
there before byte-identical afterwards (no new files either: outputs are checked before any work starts).

The tools run in this process through click's CliRunner; `pytest -s tests/test_bad_inputs.py | grep TABLE` lists
what each case prints now.
"""

import copy
import errno
import io
import json
import os
import pickle
import re
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import edm2_standin
from cli_cases import check_refusal, error_lines, files_under, run_tool

#----------------------------------------------------------------------------
# Files the cases read: built once per module.

def _png_bytes(seed, size=8):
    image = np.random.RandomState(seed).randint(0, 256, size=[size, size, 3], dtype=np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(image).save(buf, format='png')
    return buf.getvalue()

def _write_zip(path, files):
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as z:
        for name, data in files.items():
            z.writestr(name, data)

def _snapshot(net):
    from training.encoders import StandardRGBEncoder
    return dnnlib.EasyDict(encoder=StandardRGBEncoder(), dataset_kwargs=dnnlib.EasyDict(), loss_fn=None,
                           ema=copy.deepcopy(net).half().eval().requires_grad_(False))

@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    from networks import edm2plus
    root = tmp_path_factory.mktemp('assets')
    names = [f'00000/img{i:08d}.png' for i in range(4)]
    images = {name: _png_bytes(i) for i, name in enumerate(names)}
    _write_zip(root / 'data.zip', {**images, 'dataset.json': json.dumps({'labels': [[n, i] for i, n in enumerate(names)]})})
    _write_zip(root / 'unlabelled.zip', {**images, 'dataset.json': json.dumps({'labels': None})})
    os.makedirs(root / 'images')
    for i in range(3):
        (root / 'images' / f'{i}.png').write_bytes(_png_bytes(i))
    os.makedirs(root / 'corrupt')
    (root / 'corrupt' / 'a.png').write_bytes(_png_bytes(0))
    (root / 'corrupt' / 'b.png').write_bytes(b'\x89PNG\r\n\x1a\n broken')

    torch.manual_seed(0)
    net = edm2plus.Precond(**edm2_standin.TINY)
    with open(root / 'net.pkl', 'wb') as f:
        pickle.dump(_snapshot(net), f)
    with torch.no_grad():
        net.unet.out_gain.fill_(float('nan'))
    with open(root / 'nan.pkl', 'wb') as f:
        pickle.dump(_snapshot(net), f)
    data = (root / 'net.pkl').read_bytes()
    (root / 'trunc.pkl').write_bytes(data[:len(data) // 2])
    (root / 'text.txt').write_text('not a network\n')
    torch.save(dict(net={}, optimizer={}), root / 'training-state-0000001.pt')

    os.makedirs(root / 'run')
    os.makedirs(root / 'nanrun')
    for std in ['0.050', '0.100']:
        for kimg in [2, 4]:
            name = f'network-snapshot-{kimg:07d}-{std}.pkl'
            (root / 'run' / name).write_bytes(data)
            (root / 'nanrun' / name).write_bytes((root / ('nan.pkl' if kimg == 4 else 'net.pkl')).read_bytes())
    os.makedirs(root / 'empty')
    os.makedirs(root / 'empty.zip')
    os.makedirs(root / 'empty.png')

    with open(root / 'ref.pkl', 'wb') as f:
        pickle.dump(dict(fid=dict(mu=np.zeros(4), sigma=np.eye(4))), f)
    with open(root / 'notref.pkl', 'wb') as f:
        pickle.dump([1, 2, 3], f)
    (root / 'sweep.json').write_text(json.dumps({'0.050': 3.4, '0.100': 3.1, '0.150': 3.3}))
    (root / 'nan.json').write_text('{"0.050": 3.4, "0.100": NaN, "0.150": 3.3}')
    (root / 'broken.json').write_text('{"0.050": 3.4,')
    (root / 'afile').write_bytes(b'a regular file')
    return root

#----------------------------------------------------------------------------
# The cases: (id, tool, arguments, exit code, regular expression the Error line must match).
# In arguments, {A} is the assets folder and {T} the case's own empty folder; `existing` files are made in {T}
# before the call (they must survive unchanged); `full_disk` makes every write fail with ENOSPC.

class Case:
    def __init__(self, id, tool, args, code, pattern, existing=(), full_disk=False):  # pylint: disable=redefined-builtin
        self.id, self.tool, self.args, self.code, self.pattern = id, tool, args, code, pattern
        self.existing, self.full_disk = existing, full_disk

TRAIN = ['--data={A}/data.zip', '--outdir={T}/run', '--preset=demo']
GEN = ['--net={A}/net.pkl', '--outdir={T}/out', '--steps=2', '--seeds=0-1']
CALC = ['--images={A}/images', '--ref={A}/ref.pkl', '--num=3']
GENM = ['--net={A}/net.pkl', '--ref={A}/ref.pkl', '--num=2']
REF = ['--data={A}/images', '--dest={T}/ref.pkl']
PHEMA = ['--indir={A}/run', '--outdir={T}/out', '--outstd=0.070']
PLOT = ['--results={A}/sweep.json', '--out={T}/sweep.png']
CONVERT = ['--source={A}/images', '--dest={T}/out.zip']

CASES = [
    # train_edm2plus.py
    Case('train-batch-0',            'train', TRAIN + ['--batch=0'], 2, r"'--batch': 0 is not in the range x>=1"),
    Case('train-batch-words',        'train', TRAIN + ['--batch=lots'], 2, r"'--batch': 'lots' is not an image count"),
    Case('train-duration-suffix',    'train', TRAIN + ['--duration=12Ki3'], 2, r"'--duration': '12Ki3' is not an image count"),
    Case('train-lr-nan',             'train', TRAIN + ['--lr=nan'], 2, r"'--lr': 'nan' is not a finite number"),
    Case('train-lr-0',               'train', TRAIN + ['--lr=0'], 2, r"'--lr': 0.0 is not in the range x>0"),
    Case('train-dropout-2',          'train', TRAIN + ['--dropout=2'], 2, r"'--dropout': 2.0 is not in the range 0<=x<=1"),
    Case('train-expansion-tiny',     'train', TRAIN + ['--expansion=0.001'], 1, r'--expansion=0.001: .*give at least'),
    Case('train-kernel-even',        'train', TRAIN + ['--kernel=2'], 1, r'--kernel=2: the depthwise kernel size must be odd'),
    Case('train-expansion-block-a',  'train', TRAIN + ['--block=A', '--expansion=4'], 1, r'--expansion: block A has no expansion ratio'),
    Case('train-resume-other-block', 'train', TRAIN + ['--block=G*'], 1, r'--block=G\*: the run in .*run was started with --block=A',
         existing={'run/training-state-0000001.pt': b'state', 'run/training_options.json':
                   json.dumps({'network_kwargs': {'block': 'A', 'model_channels': 32}}).encode()}),
    Case('train-channels-4',         'train', TRAIN + ['--channels=4'], 2, r"'--channels': 4 is not in the range x>=8"),
    Case('train-channel-mult-deep',  'train', TRAIN + ['--channel-mult=1,1,1,1,1'], 1, r'--channel-mult=1,1,1,1,1: .*8x8'),
    Case('train-channel-mult-text',  'train', TRAIN + ['--channel-mult=1,x'], 2, r"'--channel-mult': \"x\" is neither"),
    Case('train-attn-range',         'train', TRAIN + ['--attn=0'], 2, r"'--attn': 0 is not in the range x>=1"),
    Case('train-ema-stds-big',       'train', TRAIN + ['--ema-stds=0.5'], 2, r"'--ema-stds': 0.5 is not in the range 0<x<0.289"),
    Case('train-ema-stds-empty',     'train', TRAIN + ['--ema-stds='], 2, r"'--ema-stds'.*at least 1 value"),
    Case('train-block-unknown',      'train', TRAIN + ['--block=Z'], 2, r"'--block': 'Z' is not one of"),
    Case('train-preset-unknown',     'train', ['--data={A}/data.zip', '--outdir={T}/run', '--preset=nope'], 1, r'nope'),
    Case('train-data-missing',       'train', ['--data={T}/none.zip', '--outdir={T}/run', '--preset=demo'], 1, r'--data: .*none\.zip'),
    Case('train-data-unlabelled',    'train', ['--data={A}/unlabelled.zip', '--outdir={T}/run', '--preset=demo'], 1, r'--cond=True, but no labels'),
    Case('train-outdir-is-file',     'train', ['--data={A}/data.zip', '--outdir={A}/afile', '--preset=demo'], 1, r'afile: exists and is not a directory'),
    Case('train-outdir-under-file',  'train', ['--data={A}/data.zip', '--outdir={A}/afile/run', '--preset=demo'], 1, r'afile/run: .*afile is not a directory'),
    Case('train-outdir-read-only',   'train', ['--data={A}/data.zip', '--outdir=/sys/edm2plus-run', '--preset=demo'], 1, r'/sys/edm2plus-run: cannot write there'),
    Case('train-minutes-0',          'train', TRAIN + ['--minutes=0'], 2, r"'--minutes': 0.0 is not in the range x>0"),
    Case('train-workers-neg',        'train', TRAIN + ['--workers=-1'], 2, r"'--workers': -1 is not in the range x>=0"),

    # generate_images.py
    Case('generate-batch-0',         'generate', GEN + ['--batch=0'], 2, r"'--batch': 0 is not in the range x>=1"),
    Case('generate-steps-0',         'generate', GEN + ['--steps=0'], 2, r"'--steps': 0 is not in the range x>=1"),
    Case('generate-seeds-reversed',  'generate', GEN + ['--seeds=5-1'], 2, r"'--seeds': range \"5-1\" is empty"),
    Case('generate-seeds-text',      'generate', GEN + ['--seeds=a'], 2, r"'--seeds': \"a\" is neither"),
    Case('generate-seeds-empty',     'generate', GEN + ['--seeds='], 2, r"'--seeds'.*at least 1 value"),
    Case('generate-class-text',      'generate', GEN + ['--class=x'], 2, r"'--class': \"x\" is neither"),
    Case('generate-class-range',     'generate', GEN + ['--class=9'], 1, r'class 9 is out of range'),
    Case('generate-sigma-nan',       'generate', GEN + ['--sigma_min=nan'], 2, r"'--sigma_min': 'nan' is not a finite"),
    Case('generate-guidance-nan',    'generate', GEN + ['--guidance=nan'], 2, r"'--guidance': 'nan' is not a finite"),
    Case('generate-interval',        'generate', GEN + ['--guidance-interval=2,1'], 2, r"'--guidance-interval': '2,1' must satisfy"),
    Case('generate-no-gnet',         'generate', GEN + ['--guidance=2'], 1, r'Please specify --gnet when using guidance'),
    Case('generate-no-net',          'generate', ['--outdir={T}/out'], 1, r'Please specify either --preset or --net'),
    Case('generate-preset-unknown',  'generate', ['--preset=nope', '--outdir={T}/out'], 1, r'Invalid configuration preset "nope"'),
    Case('generate-net-missing',     'generate', ['--net={T}/none.pkl', '--outdir={T}/out'], 1, r'none\.pkl: no such network file'),
    Case('generate-net-text',        'generate', ['--net={A}/text.txt', '--outdir={T}/out'], 1, r'text\.txt: not a network file'),
    Case('generate-net-truncated',   'generate', ['--net={A}/trunc.pkl', '--outdir={T}/out'], 1, r'trunc\.pkl: .*truncated'),
    Case('generate-net-state',       'generate', ['--net={A}/training-state-0000001.pt', '--outdir={T}/out'], 1, r'training-state-0000001\.pt: a training state'),
    Case('generate-net-nan',         'generate', ['--net={A}/nan.pkl', '--outdir={T}/out'], 1, r'nan\.pkl: the network has \d+ non-finite'),
    Case('generate-outdir-is-file',  'generate', ['--net={A}/net.pkl', '--outdir={A}/afile'], 1, r'afile: exists and is not a directory'),
    Case('generate-outdir-under-file', 'generate', ['--net={A}/net.pkl', '--outdir={A}/afile/out'], 1, r'afile/out: .*is not a directory'),
    Case('generate-outdir-read-only', 'generate', ['--net={A}/net.pkl', '--outdir=/sys/edm2plus-out'], 1, r'/sys/edm2plus-out: cannot write there'),
    Case('generate-grid-is-dir',     'generate', GEN + ['--grid={A}/empty'], 1, r'empty: is a directory'),
    Case('generate-grid-exists',     'generate', GEN + ['--grid={T}/grid.png'], 1, r'grid\.png: already exists; pass --overwrite', existing=['grid.png']),
    Case('generate-grid-under-file', 'generate', GEN + ['--grid={A}/afile/grid.png'], 1, r'grid\.png: .*afile is not a directory'),
    Case('generate-full-disk',       'generate', GEN, 1, r'out/.*\.png: No space left on device', full_disk=True),

    # calculate_metrics.py calc / gen / ref
    Case('calc-images-missing',      'calc', ['--images={T}/none', '--ref={A}/ref.pkl'], 1, r'none'),
    Case('calc-ref-missing',         'calc', ['--images={A}/images', '--ref={T}/none.pkl'], 1, r'none\.pkl: no such statistics file'),
    Case('calc-ref-not-stats',       'calc', ['--images={A}/images', '--ref={A}/notref.pkl'], 1, r'notref\.pkl: not a statistics file'),
    Case('calc-ref-is-net',          'calc', ['--images={A}/images', '--ref={A}/text.txt'], 1, r'text\.txt: cannot read statistics'),
    Case('calc-batch-0',             'calc', CALC + ['--batch=0'], 2, r"'--batch': 0 is not in the range x>=1"),
    Case('calc-num-1',               'calc', CALC[:2] + ['--num=1'], 2, r"'--num': 1 is not in the range x>=2"),
    Case('calc-metrics-unknown',     'calc', CALC + ['--metrics=fid,kid'], 2, r"'--metrics'.*kid"),
    Case('calc-workers-neg',         'calc', CALC + ['--workers=-1'], 2, r"'--workers': -1 is not in the range x>=0"),
    Case('gen-net-missing',          'gen', ['--net={T}/none.pkl', '--ref={A}/ref.pkl'], 1, r'none\.pkl: no such network file'),
    Case('gen-net-nan',              'gen', ['--net={A}/nan.pkl', '--ref={A}/ref.pkl', '--num=2'], 1, r'nan\.pkl: the network has \d+ non-finite'),
    Case('gen-net-text',             'gen', ['--net={A}/text.txt', '--ref={A}/ref.pkl', '--num=2'], 1, r'text\.txt: not a network file'),
    Case('gen-seeds-reversed',       'gen', GENM + ['--seeds=3-1'], 2, r"'--seeds': range \"3-1\" is empty"),
    Case('gen-seeds-one',            'gen', GENM + ['--seeds=5'], 2, r"'--seeds'.*at least 2"),
    Case('gen-no-gnet',              'gen', GENM + ['--guidance=2'], 2, r'--guidance other than 1 needs --gnet'),
    Case('gen-guidance-nan',         'gen', GENM + ['--guidance=nan'], 2, r"'--guidance': 'nan' is not a finite"),
    Case('gen-ref-missing',          'gen', ['--net={A}/net.pkl', '--ref={T}/none.pkl'], 1, r'none\.pkl: no such statistics file'),
    Case('gen-batch-0',              'gen', GENM + ['--batch=0'], 2, r"'--batch': 0 is not in the range x>=1"),
    Case('ref-dest-exists',          'ref', REF, 1, r'ref\.pkl: already exists; pass --overwrite', existing=['ref.pkl']),
    Case('ref-dest-is-dir',          'ref', ['--data={A}/images', '--dest={A}/empty'], 1, r'empty: is a directory'),
    Case('ref-dest-under-file',      'ref', ['--data={A}/images', '--dest={A}/afile/ref.pkl'], 1, r'ref\.pkl: .*afile is not a directory'),
    Case('ref-dest-read-only',       'ref', ['--data={A}/images', '--dest=/sys/edm2plus-ref.pkl'], 1, r'/sys/edm2plus-ref\.pkl: cannot write there'),
    Case('ref-npz-without-fid',      'ref', ['--data={A}/images', '--dest={T}/ref.npz', '--metrics=fd_dinov2'], 2, r'--dest: an \.npz file holds FID'),
    Case('ref-data-missing',         'ref', ['--data={T}/none', '--dest={T}/ref.pkl'], 1, r'none'),

    # reconstruct_phema.py
    Case('phema-indir-missing',      'phema', ['--indir={T}/none', '--outdir={T}/out', '--outstd=0.07'], 1, r'none'),
    Case('phema-indir-empty',        'phema', ['--indir={A}/empty', '--outdir={T}/out', '--outstd=0.07'], 1, r'empty'),
    Case('phema-outdir-is-file',     'phema', ['--indir={A}/run', '--outdir={A}/afile', '--outstd=0.07'], 1, r'afile: exists and is not a directory'),
    Case('phema-outdir-under-file',  'phema', ['--indir={A}/run', '--outdir={A}/afile/out', '--outstd=0.07'], 1, r'afile/out: .*afile is not a directory'),
    Case('phema-outdir-read-only',   'phema', ['--indir={A}/run', '--outdir=/sys/edm2plus-phema', '--outstd=0.07'], 1, r'/sys/edm2plus-phema: cannot write there'),
    Case('phema-outstd-text',        'phema', PHEMA[:2] + ['--outstd=abc'], 2, r"'--outstd': 'abc' is not a float"),
    Case('phema-outstd-dots',        'phema', PHEMA[:2] + ['--outstd=0.05,...,0.1'], 2, r"'--outstd': '...' must be preceded"),
    Case('phema-batch-0',            'phema', PHEMA + ['--batch=0'], 2, r"'--batch': 0 is not in the range x>=1"),
    Case('phema-outkimg-0',          'phema', PHEMA + ['--outkimg=0'], 2, r"'--outkimg': 0 is not in the range x>=1"),
    Case('phema-input-nan',          'phema', ['--indir={A}/nanrun', '--outdir={T}/out', '--outstd=0.07'], 1, r'network-snapshot-0000004-0\.0[51]0*\.pkl: the network has \d+ non-finite'),
    Case('phema-full-disk',          'phema', PHEMA, 1, r'phema-\d+-0\.070\.pkl: No space left on device', full_disk=True),

    # plot_sweep.py
    Case('plot-results-missing',     'plot', ['--results={T}/none.json', '--out={T}/sweep.png'], 1, r'none\.json'),
    Case('plot-results-nan',         'plot', ['--results={A}/nan.json', '--out={T}/sweep.png'], 1, r'nan\.json: σ_rel 0\.1: value is nan, not a finite number'),
    Case('plot-results-broken',      'plot', ['--results={A}/broken.json', '--out={T}/sweep.png'], 1, r'broken\.json'),
    Case('plot-out-is-dir',          'plot', ['--results={A}/sweep.json', '--out={A}/empty'], 1, r'empty: is a directory'),
    Case('plot-out-exists',          'plot', PLOT, 1, r'sweep\.png: already exists; pass --overwrite', existing=['sweep.png']),
    Case('plot-out-under-file',      'plot', ['--results={A}/sweep.json', '--out={A}/afile/sweep.png'], 1, r'sweep\.png: .*afile is not a directory'),
    Case('plot-out-read-only',       'plot', ['--results={A}/sweep.json', '--out=/sys/edm2plus-sweep.png'], 1, r'/sys/edm2plus-sweep\.png: cannot write there'),
    Case('plot-full-disk',           'plot', PLOT, 1, r'sweep\.png: No space left on device', full_disk=True),
    Case('plot-out-folder-missing',  'plot', ['--results={A}/sweep.json', '--out={T}/no/sweep.png'], 1, r'sweep\.png: the folder .*no does not exist'),

    # count_flops.py
    Case('flops-kernel-even',        'flops', ['--block=G*', '--kernel=2'], 1, r'--kernel=2: the depthwise kernel size must be odd'),
    Case('flops-resolution-12',      'flops', ['--resolution=12'], 1, r'--resolution=12: must be a power of two'),
    Case('flops-channels-0',         'flops', ['--channels=0'], 2, r"'--channels': 0 is not in the range x>=1"),
    Case('flops-block-unknown',      'flops', ['--block=Z'], 2, r"'--block': 'Z' is not one of"),
    Case('flops-expansion-tiny',     'flops', ['--block=G*', '--expansion=0.001'], 1, r'--expansion=0.001: .*give at least'),
    Case('flops-expansion-nan',      'flops', ['--block=G*', '--expansion=nan'], 2, r"'--expansion': 'nan' is not a finite number"),
    Case('flops-expansion-ignored',  'flops', ['--block=A', '--expansion=4'], 1, r'--expansion: block A has no expansion ratio'),
    Case('flops-net-missing',        'flops', ['{T}/none.pkl'], 1, r'none\.pkl'),
    Case('flops-net-text',           'flops', ['{A}/text.txt'], 1, r'text\.txt: not a network file'),
    Case('flops-file-with-block',    'flops', ['{A}/net.pkl', '--block=G*'], 1, r'--block cannot be combined with a network file'),

    # dataset_tool.py convert
    Case('dataset-source-missing',   'convert', ['--source={T}/none', '--dest={T}/out.zip'], 1, r'none'),
    Case('dataset-dest-exists',      'convert', CONVERT, 1, r'out\.zip: .*(already exists|--overwrite)', existing=['out.zip']),
    Case('dataset-dest-under-file',  'convert', ['--source={A}/images', '--dest={A}/afile/out.zip'], 1, r'out\.zip: .*afile is not a directory'),
    Case('dataset-dest-is-dir',      'convert', ['--source={A}/images', '--dest={A}/empty.zip'], 1, r'empty\.zip: is a directory'),
    Case('dataset-dest-read-only',   'convert', ['--source={A}/images', '--dest=/sys/edm2plus-out.zip'], 1, r'/sys/edm2plus-out\.zip: cannot write there'),
    Case('dataset-full-disk',        'convert', CONVERT, 1, r'out\.zip: No space left on device', full_disk='zip'),
    Case('dataset-num-classes',      'convert', ['--source={A}/data.zip', '--dest={T}/out.zip', '--num-classes=2'], 1, r'data\.zip.*label'),
    Case('dataset-resolution-0x0',   'convert', CONVERT + ['--resolution=0x0'], 2, r"'--resolution': 0x0: width and height must be 1 or more"),
    Case('dataset-resolution-text',  'convert', CONVERT + ['--resolution=big'], 2, r"'--resolution'.*big"),
    Case('dataset-max-images-0',     'convert', CONVERT + ['--max-images=0'], 2, r"'--max-images': 0 is not in the range x>=1"),
    Case('dataset-corrupt-image',    'convert', ['--source={A}/corrupt', '--dest={T}/out.zip'], 1, r'b\.png: cannot read image'),

    # sweep_phema.py
    Case('sweep-outdir-is-file',     'sweep', ['--indir={A}/run', '--outdir={A}/afile', '--outstd=0.07', '--ref={A}/ref.pkl'], 1, r'afile: exists and is not a directory'),
    Case('sweep-outdir-read-only',   'sweep', ['--indir={A}/run', '--outdir=/sys/edm2plus-sweep', '--outstd=0.07', '--ref={A}/ref.pkl'], 1, r'/sys/edm2plus-sweep: cannot write there'),
    Case('sweep-seeds-one',          'sweep', ['--indir={A}/run', '--outdir={T}/s', '--outstd=0.07', '--ref={A}/ref.pkl', '--seeds=3'], 2, r"'--seeds'.*at least 2"),
    Case('sweep-outstd-text',        'sweep', ['--indir={A}/run', '--outdir={T}/s', '--outstd=x', '--ref={A}/ref.pkl'], 2, r"'--outstd': 'x' is not a float"),
    Case('sweep-guidance-nan',       'sweep', ['--indir={A}/run', '--outdir={T}/s', '--outstd=0.07', '--ref={A}/ref.pkl', '--guidance=nan'], 2, r"'--guidance': 'nan' is not a finite number"),
    Case('sweep-ref-missing',        'sweep', ['--indir={A}/run', '--outdir={T}/s', '--outstd=0.07', '--ref={T}/none.pkl', '--metrics=fid'], 1, r'none\.pkl: no such statistics file'),

    # train_edm2.py (EDM2's options, run by train_edm2plus.py)
    Case('edm2-batch-0',             'edm2', TRAIN + ['--batch=0'], 2, r"'--batch': 0 is not in the range x>=1"),
    Case('edm2-lr-inf',              'edm2', TRAIN + ['--lr=inf'], 2, r"'--lr': 'inf' is not a finite number"),
    Case('edm2-outdir-is-file',      'edm2', ['--data={A}/data.zip', '--outdir={A}/afile', '--preset=demo'], 1, r'afile: exists and is not a directory'),
    Case('edm2-data-missing',        'edm2', ['--data={T}/none.zip', '--outdir={T}/run', '--preset=demo'], 1, r'--data: .*none\.zip'),

    # demo.py
    Case('demo-outdir-is-file',      'demo', ['--outdir={A}/afile'], 1, r'afile: exists and is not a directory'),
    Case('demo-outdir-read-only',    'demo', ['--outdir=/sys/edm2plus-demo'], 1, r'/sys/edm2plus-demo: cannot write there'),
    Case('demo-minutes-nan',         'demo', ['--outdir={T}/d', '--minutes=nan'], 2, r"'--minutes': 'nan' is not a finite number"),
    Case('demo-sweep-stds-text',     'demo', ['--outdir={T}/d', '--sweep-stds=x'], 2, r"'--sweep-stds': 'x' is not a float"),
    Case('demo-ref-images-1',        'demo', ['--outdir={T}/d', '--ref-images=1'], 2, r"'--ref-images': 1 is not in the range 2<=x<=10000"),
    Case('demo-source-missing',      'demo', ['--outdir={T}/d', '--source={T}/none'], 1, r'none'),

    # toy_example.py train / plot
    Case('toy-train-outdir-is-file', 'toytrain', ['--outdir={A}/afile'], 1, r'afile: exists and is not a directory'),
    Case('toy-train-outdir-read-only', 'toytrain', ['--outdir=/sys/edm2plus-toy'], 1, r'/sys/edm2plus-toy: cannot write there'),
    Case('toy-train-layers-0',       'toytrain', ['--layers=0'], 2, r"'--layers': 0 is not in the range x>=1"),
    Case('toy-plot-save-not-png',    'toyplot', ['--save={T}/figure.jpg'], 1, r'--save=.*figure\.jpg: give a \.png or \.pdf file name'),
    Case('toy-plot-save-is-dir',     'toyplot', ['--save={A}/empty.png'], 1, r'empty\.png: is a directory'),
    Case('toy-plot-save-under-file', 'toyplot', ['--save={A}/afile/figure.png'], 1, r'figure\.png: .*afile is not a directory'),
    Case('toy-plot-net-missing',     'toyplot', ['--net={T}/none.pkl', '--save={T}/figure.png'], 1, r'--net=.*none\.pkl: cannot load a toy model'),
    Case('toy-plot-guidance-nan',    'toyplot', ['--guidance=nan', '--save={T}/figure.png'], 2, r"'--guidance': 'nan' is not a finite number"),

    # python -m networks.export
    Case('export-in-missing',        'export', ['{T}/none.pkl', '{T}/out.pt'], 1, r'none\.pkl: no such network file'),
    Case('export-in-nan',            'export', ['{A}/nan.pkl', '{T}/out.pt'], 1, r'nan\.pkl: the network has \d+ non-finite'),
    Case('export-in-truncated',      'export', ['{A}/trunc.pkl', '{T}/out.pt'], 1, r'trunc\.pkl: .*truncated'),
    Case('export-in-state',          'export', ['{A}/training-state-0000001.pt', '{T}/out.pt'], 1, r'training-state-0000001\.pt: a training state'),
    Case('export-out-exists',        'export', ['{A}/net.pkl', '{T}/out.pt'], 1, r'out\.pt: already exists; pass --overwrite', existing=['out.pt']),
    Case('export-out-is-dir',        'export', ['{A}/net.pkl', '{A}/empty'], 1, r'empty: is a directory'),
    Case('export-out-under-file',    'export', ['{A}/net.pkl', '{A}/afile/out.pt'], 1, r'out\.pt: .*afile is not a directory'),
    Case('export-out-read-only',     'export', ['{A}/net.pkl', '/sys/edm2plus-out.pt'], 1, r'/sys/edm2plus-out\.pt: cannot write there'),
    Case('export-out-is-in',         'export', ['{A}/net.pkl', '{A}/net.pkl', '--overwrite'], 1, r'net\.pkl: is the input IN=.*net\.pkl .*must not overwrite an input'),
    Case('export-full-disk',         'export', ['{A}/net.pkl', '{T}/out.pt'], 1, r'out\.pt: No space left on device', full_disk=True),
]

#----------------------------------------------------------------------------

TIME_LIMIT = 30  # seconds; every case should end in well under one

def run_case(case, assets, tmp_path, monkeypatch):
    existing = case.existing if isinstance(case.existing, dict) else {n: b'precious ' + n.encode() for n in case.existing}
    for name, data in existing.items():
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_bytes(data)
    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device')
    if case.full_disk == 'zip':  # dataset_tool writes its zip directly
        monkeypatch.setattr(zipfile.ZipFile, 'writestr', full)
    elif case.full_disk:  # every other output goes through dnnlib.util.atomic_write, which syncs before renaming
        monkeypatch.setattr(os, 'fsync', full)
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    before = (files_under(assets), files_under(tmp_path))
    result = run_tool(case.tool, [a.format(A=assets, T=tmp_path) for a in case.args], TIME_LIMIT)
    return result, before, (files_under(assets), files_under(tmp_path))

@pytest.mark.parametrize('case', CASES, ids=[c.id for c in CASES])
def test_bad_input(case, assets, tmp_path, monkeypatch, one_thread):  # pylint: disable=redefined-outer-name,unused-argument
    result, before, after = run_case(case, assets, tmp_path, monkeypatch)
    check_refusal(case, result)
    assert after[0] == before[0], 'a file in the assets folder changed or appeared'
    assert after[1] == before[1], f'files before {sorted(before[1])}, after {sorted(after[1])}'

def test_at_least_sixty_cases():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)

def test_reconstruction_that_overflows_float16_is_not_written(assets, tmp_path, monkeypatch):
    """Finite inputs whose solved coefficients are huge give weights beyond float16's range: no file is written."""
    import reconstruct_phema
    from training import posthoc
    solve = posthoc.solve_posthoc_coefficients
    monkeypatch.setattr(posthoc, 'solve_posthoc_coefficients', lambda *args: solve(*args) * 1e9)
    result = CliRunner().invoke(reconstruct_phema.cmdline, [f'--indir={assets}/run', f'--outdir={tmp_path}/out',
                                                         '--outstd=0.07'])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert re.search(r'phema-0000004-0\.070\.pkl: not written: \d+ weight value\(s\) are not finite',
                     error_lines(result.output)[0])
    assert not os.path.exists(tmp_path / 'out' / 'phema-0000004-0.070.pkl')
