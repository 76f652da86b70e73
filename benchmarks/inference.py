"""Inference speed and memory of CONFIG A (EDM2) vs G* (EDM2+): the protocol of the EDM2+ paper's Table 4.

Batch-1 latency (the paper's CPU column) and batch-32 throughput (its GPU column) of both networks at base width
192, 64x64, 1000 classes, for each implementation:
  reference   the straightforward implementation: EDM2's op sequence, every weight normalised on every call
  fast        the inference path of networks/fastpaths.py (cached weights, channels-last oneDNN kernels, ...)
  compiled    (--compile) torch.compile of the reference ops, with inductor's weight freezing
After a warm-up call of each, the runs are interleaved (A, G*, A, G*, ...) so that a busy machine slows both alike;
medians are reported. The ratios compare G* with A *within* one implementation; the last lines are those of the
fastest implementation measured (least time for A and G* together: at batch 1, or at the large batch with --reps=0).

  python benchmarks/inference.py                       # CPU (the README's Speed section has its results)
  python benchmarks/inference.py --threads=1 --clock=cpu   # robust when other jobs share the cores
  python benchmarks/inference.py --device=cuda --compile --precision=fp16
"""

import os
import sys
import threading
import time

import click
import numpy as np
import psutil
import torch
import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from networks import edm2plus, fastpaths        # noqa: E402
from networks.edm2plus import Precond           # noqa: E402
from torch_utils import cli                     # noqa: E402
from torch_utils import misc                    # noqa: E402
import common                                   # noqa: E402  (benchmarks/common.py)

#----------------------------------------------------------------------------
# Measuring one call: wall time and peak memory.

class PeakRSS:
    """Samples the process's resident memory every millisecond in a background thread; `peak - start` is the
    memory a call needed on top of what was already resident (weights, caches). CPU only, and meaningful only after
    misc.release_freed_cpu_memory(): otherwise the C allocator keeps freed blocks and reuses them without new pages."""

    def __enter__(self):
        self._proc = psutil.Process()
        self.start = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)

def timed_call(fn, device, clock=time.perf_counter):
    """Seconds taken by fn() on `clock` (wall time, or process CPU time: see --clock)."""
    sync(device)
    start = clock()
    fn()
    sync(device)
    return clock() - start

def peak_memory_mb(fn, device):
    """Memory that fn() needs on top of what is already there (activations and temporaries; the weights and caches of
    every network on the device excluded, see weights_mb and cache_mb). CUDA: peak allocated memory above the
    allocated memory before the call. CPU: peak resident memory above the resident memory before the call."""
    if device.type == 'cuda':
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    misc.release_freed_cpu_memory()  # start from live memory only
    with PeakRSS() as mem:
        fn()
    return (mem.peak - mem.start) / 2**20

def weights_mb(net):
    return sum(p.numel() * p.element_size() for p in net.parameters()) / 2**20

def cache_mb(net):
    """Memory held by the fast path's cached (and prepacked) weights of `net`."""
    def nbytes(value):
        if isinstance(value, dict):
            return sum(nbytes(v) for v in value.values())
        if isinstance(value, tuple):
            return sum(nbytes(v) for v in value)
        return value.numel() * 4 if isinstance(value, torch.Tensor) else 0  # prepacked: float32, ~same size
    return sum(nbytes(entry) for m in net.modules() for _, entry in fastpaths._weight_cache.get(m, {}).values()) / 2**20

#----------------------------------------------------------------------------
# The networks and the implementations.

def build(block, channels, resolution, label_dim, device, precision):
    torch.manual_seed(0)
    net = Precond(resolution, 3, label_dim, model_channels=channels, block=block, use_fp16=(precision == 'fp16'),
                  use_bf16=(precision == 'bf16')).eval().requires_grad_(False).to(device)
    return net  # Untrained weights cost the same time as trained ones: no data-dependent shortcuts anywhere.

def implementations(nets, compile_):
    """name -> {config: callable(x, sigma, labels)}."""
    impls = {}
    def reference(net):
        def run(*args):
            with edm2plus.reference_mode():
                return net(*args)
        return run
    impls['reference'] = {cfg: reference(net) for cfg, net in nets.items()}
    impls['fast'] = dict(nets)
    if compile_:
        import torch._inductor.config as inductor_config  # pylint: disable=import-outside-toplevel
        inductor_config.freezing = True  # weights become constants: normalisation is folded, weights prepacked
        impls['compiled'] = {cfg: torch.compile(net) for cfg, net in nets.items()}
    return impls

def inputs(batch, resolution, label_dim, device):
    g = torch.Generator(device).manual_seed(1)
    x = torch.randn([batch, 3, resolution, resolution], generator=g, device=device)
    sigma = torch.full([batch], 2.0, device=device)
    labels = torch.eye(label_dim, device=device)[torch.randint(label_dim, [batch], generator=g, device=device)]
    return x, sigma, labels

def measure(impls, args, device, reps, warmup, desc, clock=time.perf_counter):
    """Interleaved runs; returns {(impl, config): median seconds}."""
    runs = [(impl, cfg, fn) for impl, fns in impls.items() for cfg, fn in fns.items()]
    results = {(impl, cfg): [] for impl, cfg, _ in runs}
    with torch.no_grad(), tqdm.tqdm(total=(warmup + reps) * len(runs), desc=desc, unit='call', leave=False) as bar:
        for rep in range(warmup + reps):
            for impl, cfg, fn in runs:
                seconds = timed_call(lambda fn=fn: fn(*args), device, clock)
                if rep >= warmup:
                    results[(impl, cfg)].append(seconds)
                bar.update(1)
    return {key: float(np.median(v)) for key, v in results.items()}

def measure_memory(impls, args, device):
    """{(impl, config): peak MB} of one call each."""
    with torch.no_grad():
        return {(impl, cfg): peak_memory_mb(lambda fn=fn: fn(*args), device)
                for impl, fns in impls.items() for cfg, fn in fns.items()}

#----------------------------------------------------------------------------

@click.command()
# Main options.
@click.option('--device',           help='cpu or cuda [default: cuda if available]', metavar='STR', type=click.Choice(['cpu', 'cuda']), default=None)
@click.option('--compile', 'compile_', help='Also time torch.compile (CPU: minutes of compilation per net)', is_flag=True)
@click.option('--reps',             help='Timed batch-1 calls per network and implementation (0: none)', metavar='INT', type=click.IntRange(min=0), default=5, show_default=True)
@click.option('--throughput-reps',  help='Timed calls at the large batch (0: none)', metavar='INT', type=click.IntRange(min=0), default=1, show_default=True)
@click.option('--impls',            help='Implementations to time (reference, fast)', metavar='LIST', type=str, default='reference,fast', show_default=True)
# Network and protocol (the paper's Table 4).
@click.option('--channels',         help='Base width (model_channels)', metavar='INT', type=click.IntRange(min=64), default=192, show_default=True)
@click.option('--resolution',       help='Input resolution', metavar='INT', type=click.IntRange(min=8), default=64, show_default=True)
@click.option('--label-dim',        help='Number of classes', metavar='INT', type=click.IntRange(min=1), default=1000, show_default=True)
@click.option('--batch',            help='Batch size of the throughput runs', metavar='INT', type=click.IntRange(min=1), default=32, show_default=True)
# Performance.
@click.option('--threads',          help='CPU threads [default: torch default]', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--precision',        help='CUDA activations (CPU is always fp32)', type=click.Choice(['fp16', 'bf16', 'fp32']), default='fp16', show_default=True)
@click.option('--warmup',           help='Untimed calls of each first', metavar='INT', type=click.IntRange(min=0), default=1, show_default=True)
@click.option('--clock',            help='wall, or cpu (process CPU time: robust on a busy machine with --threads=1)', type=click.Choice(['wall', 'cpu']), default='wall', show_default=True)
def cmdline(device, compile_, reps, throughput_reps, impls, channels, resolution, label_dim, batch, threads, precision, warmup, clock):
    """Batch-1 latency and batch-32 throughput of CONFIG A vs G*, side by side."""
    device, chosen, name = common.setup(device, impls, threads)
    if not reps and not throughput_reps:
        raise click.ClickException('--reps and --throughput-reps are both 0: nothing to time')
    if clock == 'cpu' and device.type == 'cuda':
        raise click.ClickException('--clock=cpu: only for --device=cpu')
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True  # the paper's GPU setting (Table 4: TF32 and torch.compile)
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    print(f'Device: {name}; {clock} clock; base width {channels}, {resolution}x{resolution}, {label_dim} classes'
          + (f', {precision} activations' if device.type == 'cuda' else ''))

    nets = {cfg: build(cfg, channels, resolution, label_dim, device, precision) for cfg in ('A', 'G*')}
    fns = {k: v for k, v in implementations(nets, compile_).items() if k in chosen or k == 'compiled'}
    if compile_:
        print('Compiling (the first call of each compiled network) ...')
    small, large = inputs(1, resolution, label_dim, device), inputs(batch, resolution, label_dim, device)
    clock = time.process_time if clock == 'cpu' else time.perf_counter
    lat = measure(fns, small, device, reps, warmup, 'batch 1', clock) if reps else {}
    # On a CPU the fast and reference paths are warm from the batch-1 runs. Compiled networks recompile for the new
    # shape and cuDNN (benchmark mode) picks its kernels per shape: they get warm-up calls at this batch too.
    warm_again = warmup if (compile_ or device.type == 'cuda' or not reps) else 0
    thr = measure(fns, large, device, throughput_reps, warm_again, f'batch {batch}', clock) if throughput_reps else {}
    # Memory last: releasing freed memory to the OS slows allocation down, so no timing may follow.
    if device.type == 'cpu' and not misc.release_freed_cpu_memory():
        mem1 = memN = {}
        print('(memory not measured: needs glibc)')
    else:
        mem1 = measure_memory(fns, small, device) if reps else {}
        memN = measure_memory(fns, large, device) if throughput_reps else {}
    mem_label = 'peak MB above allocated' if device.type == 'cuda' else 'peak MB above resident'

    print()
    print(f'{"implementation":<15s}{"config":<7s}{"latency s":>10s}{mem_label:>24s}{"img/s @" + str(batch):>12s}{mem_label:>24s}')
    na = float('nan')
    for impl, cfg in lat or thr:
        row = f'{impl:<15s}{cfg:<7s}{lat.get((impl, cfg), na):>10.3f}{mem1.get((impl, cfg), na):>24.0f}'
        if (impl, cfg) in thr:
            row += f'{batch / thr[(impl, cfg)]:>12.2f}{memN.get((impl, cfg), na):>24.0f}'
        print(row)
    print(f'weights: A {weights_mb(nets["A"]):.0f} MB, G* {weights_mb(nets["G*"]):.0f} MB' + (
          f'; fast-path weight cache: A {cache_mb(nets["A"]):.0f} MB, G* {cache_mb(nets["G*"]):.0f} MB '
          '(normalised copies of the weights, kept between calls)' if 'fast' in fns else ''))

    def ratios(impl):
        parts = [f'latency G*/A {lat[(impl, "G*")] / lat[(impl, "A")]:.3f}'] if lat else []
        parts += [f'throughput G*/A {thr[(impl, "A")] / thr[(impl, "G*")]:.3f}'] if thr else []
        return ', '.join(parts)
    def speedups(impl):
        parts = [f'batch 1 A {lat[("reference", "A")] / lat[(impl, "A")]:.2f}x, '
                 f'G* {lat[("reference", "G*")] / lat[(impl, "G*")]:.2f}x faster'] if lat else []
        parts += [f'batch {batch} A {thr[("reference", "A")] / thr[(impl, "A")]:.2f}x, '
                  f'G* {thr[("reference", "G*")] / thr[(impl, "G*")]:.2f}x'] if thr else []
        return '; '.join(parts)
    print()
    for impl in fns:
        print(f'{impl:<10s} {ratios(impl)}')
    if 'reference' in fns:
        for impl in (k for k in fns if k != 'reference'):
            print(f'{impl:<10s} vs reference: {speedups(impl)}')
    timing = lat or thr
    best = min(fns, key=lambda impl: timing[(impl, 'A')] + timing[(impl, 'G*')])
    print(f'\nimplementation: {best}')
    if lat:
        print(f'latency ratio G*/A: {lat[(best, "G*")] / lat[(best, "A")]:.3f}')
    if thr:
        print(f'throughput ratio G*/A: {thr[(best, "A")] / thr[(best, "G*")]:.3f}')

if __name__ == '__main__':
    cli.run(cmdline)
