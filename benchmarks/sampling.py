"""Sampling speed: images per second of generate_images (Heun, 32 steps = 63 evaluations) for CONFIG A and G*.

Both variants are built at the same widths (by default the demo's network: base 32, 16x16, 10 classes, so that a
run takes about a minute on 2 CPU cores) and timed with each implementation of the network (networks/edm2plus.py,
networks/fastpaths.py):
  reference   EDM2's op sequence, every weight normalised on every one of the 63 evaluations
  fast        the inference fast path (weights normalised once for the whole run, channels-last oneDNN kernels)
  compiled    (--compile) torch.compile of the reference ops with inductor's weight freezing
Runs are interleaved after a short warm-up; the median of --reps runs is reported.

  python benchmarks/sampling.py                                        # demo-sized nets, 32 images
  python benchmarks/sampling.py --preset=edm2plus-img64-s --num-images=8 --batch=8   # the real EDM2+-S size
"""

import os
import sys
import time

import click
import numpy as np
import torch
import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from networks import edm2plus, presets          # noqa: E402
from networks.edm2plus import Precond           # noqa: E402
from torch_utils import cli                     # noqa: E402
import common                                   # noqa: E402  (benchmarks/common.py)
from sampling.generate import generate_images   # noqa: E402

#----------------------------------------------------------------------------

def build(preset, block, device):
    """The preset's network with its block variant replaced by `block`."""
    torch.manual_seed(0)
    return Precond(**presets.network_kwargs(preset, block=block)).eval().requires_grad_(False).to(device)

def sample_all(net, num_images, batch, steps, device):
    """Generate `num_images` images (seeds 0..n-1); returns seconds."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in generate_images(net, seeds=range(num_images), max_batch_size=batch, num_steps=steps, verbose=False,
                             device=device):
        pass
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter() - start

class Reference(torch.nn.Module):
    """The network run with EDM2's op sequence (edm2plus.reference_mode) on every call."""
    def __init__(self, net):
        super().__init__()
        self.net = net
        for name in ('img_resolution', 'img_channels', 'label_dim'):
            setattr(self, name, getattr(net, name))

    def forward(self, *args, **kwargs):
        with edm2plus.reference_mode():
            return self.net(*args, **kwargs)

#----------------------------------------------------------------------------

@click.command()
# Main options.
@click.option('--preset',       help='Network size (a preset of networks/presets.py)', metavar='NAME', type=click.Choice(sorted(presets.PRESETS)), default='demo', show_default=True)
@click.option('--num-images',   help='Images per run', metavar='INT', type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--batch',        help='Batch size (max_batch_size)', metavar='INT', type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--steps',        help='Heun steps (2N-1 evaluations)', metavar='INT', type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--reps',         help='Timed runs per network and implementation', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--impls',        help='Implementations (reference, fast)', metavar='LIST', type=str, default='reference,fast', show_default=True)
@click.option('--compile', 'compile_', help='Also time torch.compile (minutes of compilation on a CPU)', is_flag=True)
# Performance.
@click.option('--device',       help='cpu or cuda [default: cuda if available]', type=click.Choice(['cpu', 'cuda']), default=None)
@click.option('--threads',      help='CPU threads [default: torch default]', metavar='INT', type=click.IntRange(min=1), default=None)
def cmdline(preset, num_images, batch, steps, reps, impls, compile_, device, threads):
    """Images per second of generate_images for CONFIG A and G*, side by side."""
    device, chosen, where = common.setup(device, impls, threads)
    p = presets.get(preset)
    print(f'Device: {where}; preset {preset} ({p.channels} channels, {p.resolution}x{p.resolution}), '
          f'{num_images} images, batch {batch}, {steps} steps')

    nets = {cfg: build(preset, cfg, device) for cfg in ('A', 'G*')}
    runs = {}
    if 'reference' in chosen:
        runs.update({('reference', cfg): Reference(net) for cfg, net in nets.items()})
    if 'fast' in chosen:
        runs.update({('fast', cfg): net for cfg, net in nets.items()})
    if compile_:
        import torch._inductor.config as inductor_config  # pylint: disable=import-outside-toplevel
        inductor_config.freezing = True  # weights become constants: normalisation is folded, weights prepacked
        runs.update({('compiled', cfg): torch.compile(net) for cfg, net in nets.items()})
    times = {key: [] for key in runs}
    peak = {}  # CUDA: peak memory allocated during a timed run, MB
    with tqdm.tqdm(total=len(runs) * (reps + 1), desc='sampling', unit='run', leave=False) as bar:
        for key, net in runs.items():  # Warm-up (compilation, caches): one image, full batch shape.
            sample_all(net, min(batch, num_images), batch, 2, device)
            bar.update(1)
        for _ in range(reps):
            for key, net in runs.items():
                if device.type == 'cuda':
                    torch.cuda.reset_peak_memory_stats(device)
                times[key].append(sample_all(net, num_images, batch, steps, device))
                if device.type == 'cuda':
                    peak[key] = max(peak.get(key, 0), torch.cuda.max_memory_allocated(device) / 2**20)
                bar.update(1)
    rate = {key: num_images / float(np.median(v)) for key, v in times.items()}

    print()
    print(f'{"implementation":<15s}{"config":<7s}{"images/s":>10s}{"s/image":>10s}' + (f'{"peak MB":>10s}' if peak else ''))
    for (impl, cfg), r in rate.items():
        print(f'{impl:<15s}{cfg:<7s}{r:>10.2f}{1 / r:>10.3f}' + (f'{peak[(impl, cfg)]:>10.0f}' if peak else ''))
    print()
    for impl in dict.fromkeys(impl for impl, _ in rate):
        print(f'{impl:<10s} images/s G*/A: {rate[(impl, "G*")] / rate[(impl, "A")]:.3f}' +
              (f', peak memory G*/A: {peak[(impl, "G*")] / peak[(impl, "A")]:.3f}' if peak else ''))
    for impl in dict.fromkeys(impl for impl, _ in rate if impl != 'reference'):
        if ('reference', 'A') in rate:
            print(f'{impl:<10s} vs reference: A {rate[(impl, "A")] / rate[("reference", "A")]:.2f}x, '
                  f'G* {rate[(impl, "G*")] / rate[("reference", "G*")]:.2f}x images/s')

if __name__ == '__main__':
    cli.run(cmdline)
