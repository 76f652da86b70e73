"""The benchmark scripts run end to end at toy sizes and print the ratios they promise (not their speed)."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}

def run(script, *args):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', script), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr

def test_inference_prints_both_ratios():
    rc, out, err = run('inference.py', '--device=cpu', '--channels=64', '--resolution=8', '--label-dim=10',
                       '--batch=2', '--reps=1', '--warmup=0', '--threads=1')
    assert rc == 0, err[-2000:]
    assert out.startswith('Device: CPU, 1 threads')
    tail = out.strip().splitlines()[-2:]
    latency = float(re.fullmatch(r'latency ratio G\*/A: (\d+\.\d{3})', tail[0]).group(1))
    throughput = float(re.fullmatch(r'throughput ratio G\*/A: (\d+\.\d{3})', tail[1]).group(1))
    assert 0 < latency < 10 and 0 < throughput < 10

def test_inference_throughput_only():
    rc, out, err = run('inference.py', '--device=cpu', '--channels=64', '--resolution=8', '--label-dim=10',
                       '--batch=2', '--reps=0', '--throughput-reps=1', '--warmup=0', '--threads=1', '--impls=fast')
    assert rc == 0, err[-2000:]
    assert 'latency ratio' not in out
    assert re.search(r'^throughput ratio G\*/A: \d+\.\d{3}$', out, re.M), out
    rc, _out, err = run('inference.py', '--device=cpu', '--reps=0', '--throughput-reps=0')
    assert rc != 0 and '--reps and --throughput-reps are both 0: nothing to time' in err

def test_sampling_and_train_speed_print_ratios():
    rc, out, err = run('sampling.py', '--device=cpu', '--num-images=2', '--batch=2', '--steps=2', '--threads=1',
                       '--impls=fast')
    assert rc == 0, err[-2000:]
    assert re.search(r'G\*/A', out), out
    rc, out, err = run('train_speed.py', '--device=cpu', '--resolution=8', '--channels=8', '--channel-mult=1,2',
                       '--num-blocks=1', '--attn=4', '--batch=4', '--steps=1', '--warmup=0')
    assert rc == 0, err[-2000:]
    assert re.search(r'G\* trains \d+\.\d+x as many images per second as A', out), out
    rc, _out, err = run('train_speed.py', '--device=cpu', '--impls=training,turbo')
    assert rc != 0 and '--impls: unknown path "turbo" (choose from reference, training, compiled)' in err

def test_roofline_prints_rates_and_the_bound():
    rc, out, err = run('roofline.py', '--device=cpu', '--channels=64', '--resolution=8', '--label-dim=10', '--reps=1',
                       '--peak-size=256', '--threads=1', '--target=0.5')
    assert rc == 0, err[-2000:]
    rates = {cfg: (float(gflop), float(rate)) for cfg, gflop, rate in
             re.findall(r'^(A|G\*)\s+latency \d+\.\d+ s; matrix arithmetic (\d+\.\d{3}) GFLOP at (\d+) GFLOP/s', out, re.M)}
    assert set(rates) == {'A', 'G*'}, out
    assert rates['G*'][0] < rates['A'][0]  # G* does less matrix arithmetic than A at any size
    assert re.search(r'^G\*/A = 0\.5 needs G\* to average \d+ GFLOP/s', out, re.M), out
    latency, lowest = (float(v) for v in re.findall(r'ratio G\*/A(?: at peak)?: (\d+\.\d{3})', out))
    assert 0 < lowest <= latency  # no network beats the peak it is measured against

def run_suite(**env):
    proc = subprocess.run(['bash', os.path.join(ROOT, 'benchmarks', 'gpu_suite.sh')], cwd=ROOT, timeout=600,
                          env={**ENV, 'SMOKE': '1', 'DEVICE': 'cpu', 'PYTHON': sys.executable, **env},
                          capture_output=True, text=True)
    return proc.returncode, proc.stdout

def test_gpu_suite_runs_every_step():
    """The GPU suite at toy sizes on the CPU: every step runs with the options it passes, and prints its G*/A line."""
    rc, out = run_suite()
    assert rc == 0 and out.rstrip().endswith('all steps ran'), out[-3000:]
    assert len(re.findall(r'^G\* trains \d+\.\d+x as many images per second as A', out, re.M)) == 2, out
    assert len(re.findall(r'^throughput ratio G\*/A: \d+\.\d{3}$', out, re.M)) == 1 + 2, out  # protocol, sweep
    assert len(re.findall(r'^fast +images/s G\*/A: \d+\.\d{3}$', out, re.M)) == 1, out
    assert 'FAILED' not in out
    assert re.search(r'^\d+ (passed|skipped)', out, re.M) and out.index('== CUDA tests') < out.index('== Training'), out
    # A failing step is named with its command, the others still run, and the exit status says so.
    rc, out = run_suite(PYTHON='false')
    assert rc == 1 and out.rstrip().endswith('7 step(s) failed'), out[-3000:]
    assert out.count('FAILED (exit 1): false benchmarks/') == 6 and 'FAILED (exit 1): false -m pytest' in out

@pytest.mark.parametrize('script', ['inference.py', 'sampling.py'])
def test_bad_options_name_the_option(script):
    rc, _out, err = run(script, '--device=cpu', '--impls=fast,turbo')
    assert rc != 0 and 'Error: --impls: unknown implementation "turbo"' in err

def test_traffic_counts_bytes_per_image():
    rc, out, err = run('traffic.py', '--sizes=demo')
    assert rc == 0, err[-2000:]
    rows = {(m[0], m[1]): (float(m[2]), float(m[3])) for m in re.findall(
        r'^demo +(reference|default) +(training|evaluation) +A +(\d+\.\d+) GB +G\* +(\d+\.\d+) GB', out, re.M)}
    assert len(rows) == 4, out
    # The training path moves fewer bytes than EDM2's op sequence; so does the inference path.
    for what in ('training', 'evaluation'):
        for cfg in (0, 1):
            assert 0 < rows['default', what][cfg] < rows['reference', what][cfg], (what, cfg)
    tail = out.strip().splitlines()[-3:]
    a = float(re.fullmatch(r'A training traffic per image \(demo\): (\d+\.\d+) GB', tail[0]).group(1))
    g = float(re.fullmatch(r'G\* training traffic per image \(demo\): (\d+\.\d+) GB', tail[1]).group(1))
    assert abs(a - rows['default', 'training'][0]) < 0.01 and abs(g - rows['default', 'training'][1]) < 0.01
    ratio = float(re.fullmatch(r'training traffic G\*/A \(demo\): (\d+\.\d+)', tail[2]).group(1))
    assert abs(ratio - g / a) < 0.05 * ratio
    rc, _out, err = run('traffic.py', '--sizes=XL')
    assert rc != 0 and '--sizes: unknown size "XL"' in err
