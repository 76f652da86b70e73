"""FLOP/parameter counts reproduce the EDM2+ paper's Tables 1-3 and the GFLOPs of EDM2 paper Table 2."""

import json
import os
import subprocess
import sys

import pytest

from networks import flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every config of Tables 1 and 2, the scaled G* family and EDM2 for comparison.
EXPECTED = {
    'A': (280.21, 101.90), 'B': (252.28, 51.13), 'C': (273.99, 72.52), 'D': (273.99, 72.44), 'D*': (195.59, 51.09),
    'E': (273.76, 72.27), 'E-k7': (278.05, 75.27), 'F': (195.76, 51.26), 'G': (195.11, 50.61), 'F*': (154.61, 51.05),
    'G*': (153.97, 50.41), 'EDM2+-L': (426.40, 138.49), 'EDM2+-XL': (613.55, 198.88),
    'EDM2-M': (497.80, 180.77), 'EDM2-L': (777.49, 282.08), 'EDM2-XL': (1119.28, 405.83),
}

def run(*args):
    return subprocess.run([sys.executable, 'count_flops.py', *args], cwd=ROOT, capture_output=True, text=True)

def test_paper_tables_json():
    res = run('--paper', '--json')
    assert res.returncode == 0, res.stderr
    rows = {r['name']: r for r in json.loads(res.stdout)}
    assert set(EXPECTED) <= set(rows)
    for name, (mparams, gflops) in EXPECTED.items():
        assert abs(rows[name]['mparams'] - mparams) <= 0.01, name
        assert abs(rows[name]['gflops'] - gflops) <= 0.01, name

@pytest.mark.parametrize('channels,mparams,gflops', [(128, 68.69, 22.71), (256, 273.21, 89.00)])
def test_scaled_gstar_family(channels, mparams, gflops):
    r = flops.count(flops.build_meta(img_resolution=64, img_channels=3, label_dim=1000, model_channels=channels, block='G*'))
    assert abs(r['params'] / 1e6 - mparams) <= 0.01 and abs(r['flops'] / 1e9 - gflops) <= 0.01

def test_edm2_img512_xs_breakdown():
    """EDM2's count_flops on img512-XS: 124.71 M, 45.50 GFLOPs; conv 44.57, matmul 0.39, div 0.16 ."""
    r = flops.count(flops.build_meta(img_resolution=64, img_channels=4, label_dim=1000, model_channels=128))
    assert round(r['params'] / 1e6, 2) == 124.71 and round(r['flops'] / 1e9, 2) == 45.50
    per = {k: v[1] / 1e9 for k, v in r['per_op'].items()}
    assert round(per['convolution'], 2) == 44.57 and round(per['bmm'] + per['mm'], 2) == 0.39
    assert round(per['div'], 2) == 0.16 and round(per['mul'], 2) == 0.14 and round(per['linalg_vector_norm'], 2) == 0.13

def test_meta_count_equals_real_forward_count():
    """Counting on the meta device sees exactly the ops of a real CPU forward pass."""
    kw = dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=64, channel_mult=[1, 2], num_blocks=1,
              attn_resolutions=[8], block='G*')
    from networks.edm2plus import Precond
    real = flops.count(Precond(**kw), device='cpu')
    meta = flops.count(flops.build_meta(**kw))
    assert real['flops'] == meta['flops'] and real['params'] == meta['params']

@pytest.mark.slow  # several count_flops.py processes
def test_cli_variant_options_and_errors():
    res = run('--block=G*', '--channels=128', '--expansion=6', '--json')
    assert res.returncode == 0, res.stderr
    row = json.loads(res.stdout)[0]
    base = flops.count(flops.build_meta(img_resolution=64, img_channels=3, label_dim=1000, model_channels=128, block='G*'))
    assert row['mparams'] > base['params'] / 1e6  # e = 6 is wider than the default 4
    res = run('edm2plus-img64-xl')
    assert res.returncode == 0 and '613.55M' in res.stdout and '198.88 Gflops/sample' in res.stdout
    res = run('--channels=100')
    assert res.returncode == 1 and 'does not split into 6 equal heads' in res.stderr
    res = run('--block=Q')
    assert res.returncode == 2 and 'Invalid value' in res.stderr
    res = run('missing.pkl')
    assert res.returncode == 1 and 'missing.pkl' in res.stderr and 'Traceback' not in res.stderr

@pytest.mark.slow  # several count_flops.py processes
def test_cli_variant_brings_paper_e_k_and_width():
    """--block brings the variant's own e, k and width (Table 1), unless given explicitly."""
    res = run('edm2plus-img64-s', '--block=C', '--json')
    assert res.returncode == 0, res.stderr
    row = json.loads(res.stdout)[0]
    assert (round(row['mparams'], 2), round(row['gflops'], 2)) == (273.99, 72.52)
    res = run('edm2-img64-s', '--block=B', '--json')
    row = json.loads(res.stdout)[0]
    assert (round(row['mparams'], 2), round(row['gflops'], 2)) == (252.28, 51.13)
    res = run('edm2-img64-s', '--block=B')
    assert 'Counting edm2-img64-s: block B, width 384, k 3 ...' in res.stdout
    res = run('edm2plus-img64-s', '--block=D', '--expansion=4', '--json')  # explicit e wins: D* of Table 1
    row = json.loads(res.stdout)[0]
    assert (round(row['mparams'], 2), round(row['gflops'], 2)) == (195.59, 51.09)

@pytest.mark.parametrize('args, message', [
    (['--block=A', '--expansion=4'], 'Error: --expansion: block A has no expansion ratio'),
    (['--kernel=2'], 'Error: --kernel=2: the depthwise kernel size must be odd from 1 to 15'),
    (['--block=G*', '--kernel=17'], 'Error: --kernel=17: the depthwise kernel size must be odd from 1 to 15'),
    (['--resolution=12'], 'Error: --resolution=12: must be a power of two'),
    (['--resolution=4'], 'need at least 8x8 images; got 4x4'),
    (['--block=G*', '--expansion=0.001'], 'Error: --expansion=0.001: the widest layer of a 192-channel block'),
])
def test_cli_option_errors_are_one_line(args, message):
    res = run(*args)
    assert res.returncode == 1 and message in res.stderr
    assert res.stderr.count('\n') == 1 and 'Traceback' not in res.stderr
