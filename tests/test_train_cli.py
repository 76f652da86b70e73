"""Trainer command lines: train_edm2.py (EDM2's options), block variants with the paper's e, k and width, the
parameter/FLOP counts printed at start, and option errors found before anything is built or written."""

import json
import os
import re
import subprocess
import sys

import click.testing
import numpy as np
import pytest

from conftest import write_dataset
import train_edm2
import train_edm2plus
from networks import presets
from networks.edm2plus import BLOCK_VARIANTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS='1')

# EDM2's train_edm2.py options, in its order.
EDM2_FLAGS = ['--outdir', '--data', '--cond', '--preset', '--duration', '--batch', '--channels', '--dropout', '--P_mean',
              '--P_std', '--lr', '--decay', '--batch-gpu', '--fp16', '--ls', '--bench', '--status', '--snapshot',
              '--checkpoint', '--seed', '--dry-run']

def make_dataset(path, resolution, labels):
    """Flat grey PNGs of the given resolution with the given class labels, and dataset.json."""
    images = [np.full([resolution, resolution, 3], (37 * i) % 256, dtype=np.uint8) for i in range(len(labels))]
    return write_dataset(path, images, labels, names=[f'img{i:03d}.png' for i in range(len(labels))])

def invoke(command, args):
    return click.testing.CliRunner().invoke(command, args)

def counts(output):
    """(M params, GFLOPs) from the two count lines that the trainer and count_flops.py print."""
    m = re.search(r'^Parameters\s+([\d.]+)M$', output, re.M)
    g = re.search(r'^Compute\s+([\d.]+) Gflops/sample$', output, re.M)
    return float(m.group(1)), float(g.group(1))

@pytest.fixture(scope='module')
def imagenet_like(tmp_path_factory):
    # Two 64x64 images with labels 0 and 999: the network sees ImageNet-64's interface (1000 classes).
    return make_dataset(tmp_path_factory.mktemp('data') / 'img64', 64, [0, 999])

#----------------------------------------------------------------------------
# train_edm2.py

def test_train_edm2_help_lists_edm2_options():
    result = invoke(train_edm2.cmdline, ['--help'])
    assert result.exit_code == 0
    flags = re.findall(r'^  (?:-n, )?(--[\w-]+)', result.output.split('Options:')[1], re.M)
    assert flags == EDM2_FLAGS + ['--help']
    assert '--block' not in result.output and '[default: edm2-img512-s]' in result.output

def test_train_edm2_dry_run_prints_edm2_config(tmp_path, imagenet_like):
    outdir = tmp_path / 'run'
    proc = subprocess.run([sys.executable, 'train_edm2.py', f'--outdir={outdir}', f'--data={imagenet_like}',
                           '--preset=edm2-img64-s', '--batch=1024', '--seed=3', '--dry-run'],
                          cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    config = json.loads(proc.stdout[proc.stdout.index('{'):proc.stdout.index('\n}\n') + 2])
    assert config['batch_size'] == 1024 and config['seed'] == 3 and config['total_nimg'] == 1024 << 20
    assert config['network_kwargs']['block'] == 'A' and config['network_kwargs']['model_channels'] == 192
    assert config['lr_kwargs']['ref_lr'] == 0.01 and config['lr_kwargs']['ref_batches'] == 35000.0
    assert counts(proc.stdout) == (280.21, 101.90)  # EDM2-S at ImageNet-64 (EDM2 paper Table 2)
    assert proc.stdout.rstrip().endswith('Dry run; exiting.') and not outdir.exists()

def test_train_edm2_tiny_real_run(tmp_path):
    data = make_dataset(tmp_path / 'data16', 16, [0, 1, 2, 1])
    outdir = tmp_path / 'run'
    proc = subprocess.run([sys.executable, 'train_edm2.py', f'--outdir={outdir}', f'--data={data}',
                           '--preset=edm2-img64-xs', '--channels=8', '--batch=64', '--duration=1Ki', '--status=1Ki',
                           '--snapshot=1Ki', '--checkpoint=1Ki'],
                          cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    files = set(os.listdir(outdir))
    assert {'training_options.json', 'log.txt', 'stats.jsonl', 'training-state-0000001.pt',
            'network-snapshot-0000001-0.050.pkl', 'network-snapshot-0000001-0.100.pkl'} <= files
    options = json.loads((outdir / 'training_options.json').read_text())
    assert options['network_kwargs']['model_channels'] == 8 and options['batch_size'] == 64
    assert options['network_kwargs']['block'] == 'A' and 'Network: block A, width 8' in proc.stdout

#----------------------------------------------------------------------------
# Block variants: the paper's e, k and width, and the counts printed at start.

@pytest.mark.parametrize('preset, block, expected', [
    ('edm2plus-img64-s', 'C', (273.99, 72.52)),   # Table 1, CONFIG C: e = 6
    ('edm2-img64-s', 'B', (252.28, 51.13)),       # Table 1, CONFIG B: width 384
    ('edm2-img64-s', 'E-k7', (278.05, 75.27)),    # Table 1, CONFIG E with k = 7
    ('edm2-img64-s', 'G*', (153.97, 50.41)),      # Table 2, CONFIG G*
])
def test_trainer_prints_paper_counts(tmp_path, imagenet_like, preset, block, expected):
    result = invoke(train_edm2plus.cmdline, [f'--outdir={tmp_path / "run"}', f'--data={imagenet_like}',
                                             f'--preset={preset}', f'--block={block}', '--dry-run'])
    assert result.exit_code == 0, result.output
    assert counts(result.output) == expected
    proc = subprocess.run([sys.executable, 'count_flops.py', preset, f'--block={block}'], cwd=ROOT, capture_output=True,
                          text=True, env=ENV)
    assert proc.returncode == 0 and counts(proc.stdout) == expected  # the same numbers as count_flops.py

def test_explicit_options_beat_the_variant_defaults(tmp_path, imagenet_like):
    args = [f'--outdir={tmp_path / "run"}', f'--data={imagenet_like}', '--preset=edm2plus-img64-s', '--dry-run']
    result = invoke(train_edm2plus.cmdline, args + ['--block=C', '--expansion=4'])
    assert result.exit_code == 0 and '"expansion": 4.0' in result.output and 'block C, width 192, e 4, k 3' in result.output
    result = invoke(train_edm2plus.cmdline, args + ['--block=B', '--channels=192'])
    assert result.exit_code == 0 and '"model_channels": 192' in result.output
    assert counts(result.output) == (63.66, 13.37)  # B at the preset's width: what the old code trained
    result = invoke(train_edm2plus.cmdline, args + ['--block=E', '--kernel=5'])
    assert result.exit_code == 0 and 'block E, width 192, e 6, k 5' in result.output

def test_variant_width_rule():
    # B doubles the preset's width whatever it is; the others keep it; the preset's own settings without --block.
    assert presets.variant_architecture('edm2-img64-xs', block='B')['model_channels'] == 256
    assert presets.variant_architecture('edm2plus-img64-l', block='B')['model_channels'] == 640
    assert presets.variant_architecture('edm2plus-img64-l', block='A')['model_channels'] == 320
    assert presets.variant_architecture('demo', block='D') == dict(block='D', model_channels=32, expansion=None, kernel=None)
    assert presets.variant_architecture('demo') == dict(block='G*', model_channels=32, expansion=4, kernel=None)
    assert all(BLOCK_VARIANTS[b].width == (384 if b == "B" else 192) for b in BLOCK_VARIANTS)

#----------------------------------------------------------------------------
# Option errors at parse time, and the de-duplicated option table.

@pytest.mark.parametrize('args, code, message', [
    (['--batch=0'], 2, "Invalid value for '--batch': 0 is not in the range x>=1"),
    (['--duration=0'], 2, "Invalid value for '--duration': 0 is not in the range x>=1"),
    (['--expansion=0.001'], 1, 'Error: --expansion=0.001: the widest layer of a 32-channel block would have no channel'),
    (['--channel-mult=1,2,2,2,2,2'], 1, 'Error: --channel-mult=1,2,2,2,2,2: its 6 levels halve the resolution 5 times'),
    (['--block=A', '--expansion=4'], 1, 'Error: --expansion: block A has no expansion ratio'),
    (['--block=A', '--kernel=3'], 1, 'Error: --kernel: block A has no depthwise convolution'),
    (['--kernel=2'], 1, 'Error: --kernel=2: the depthwise kernel size must be odd from 1 to 7'),
    (['--kernel=9'], 1, 'Error: --kernel=9: the depthwise kernel size must be odd from 1 to 7'),
])
def test_bad_options_fail_at_parse_time(tmp_path, args, code, message):
    data = make_dataset(tmp_path / 'data16', 16, [0, 1])
    outdir = tmp_path / 'run'
    result = invoke(train_edm2plus.cmdline, ['--preset=demo', f'--data={data}', f'--outdir={outdir}'] + args)
    assert result.exit_code == code, result.output
    assert message in result.output and 'Traceback' not in result.output
    assert not outdir.exists()

def test_resume_with_another_block_is_refused(tmp_path):
    data = make_dataset(tmp_path / 'data16', 16, [0, 1])
    outdir = tmp_path / 'run'
    outdir.mkdir()
    config = train_edm2plus.setup_training_config(dict(data=data, preset='demo'))
    (outdir / 'training_options.json').write_text(json.dumps(config, indent=2))
    before = (outdir / 'training_options.json').read_bytes()
    base = ['--preset=demo', f'--data={data}', f'--outdir={outdir}', '--dry-run']
    assert invoke(train_edm2plus.cmdline, base + ['--block=A']).exit_code == 0  # no training state yet: a fresh start
    (outdir / 'training-state-0000004.pt').write_bytes(b'')
    result = invoke(train_edm2plus.cmdline, base + ['--block=A'])
    assert result.exit_code == 1
    assert f'Error: --block=A: the run in {outdir} was started with --block=G*' in result.output
    result = invoke(train_edm2plus.cmdline, base + ['--channels=64'])
    assert result.exit_code == 1 and '--channels=64: the run in' in result.output and '--channels=32' in result.output
    assert invoke(train_edm2plus.cmdline, base).exit_code == 0  # the same options resume
    assert invoke(train_edm2plus.cmdline, base + ['--block=G*']).exit_code == 0  # naming its own variant changes nothing
    assert (outdir / 'training_options.json').read_bytes() == before

def test_block_choices_and_defaults_have_one_source():
    params = {p.name: p for p in train_edm2plus.cmdline.params}
    assert list(params['block'].type.choices) == list(BLOCK_VARIANTS)
    for name, default in train_edm2plus.OPTION_DEFAULTS.items():
        assert params[name].default == default, name
