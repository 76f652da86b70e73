"""How close CONFIG A and G* come to the machine's arithmetic peak, and the G*/A latency ratio that peak allows.

Nearly all of A's time goes to 3x3 convolutions and nearly all of G*'s to 1x1 convolutions (matrix products over
pixels), so the batch-1 latency ratio G*/A is bounded by arithmetic: G* cannot take less time than its matrix
arithmetic needs at the machine's peak rate. In one run this script measures
  peak      the best rate of a large dense matrix product on this device (float32, 2*M*N*K FLOP per product)
  A, G*     the batch-1 latency of the inference fast path (interleaved runs after warm-up, medians) and the rate
            of each network's matrix arithmetic: 2 x the multiply-accumulates of its convolutions and matrix
            products (networks/flops.py; elementwise ops excluded) divided by its whole latency
and prints the lowest G*/A ratio reachable against the measured A (all of G*'s arithmetic at the peak, everything
else free) and the rate G* would need for a target ratio (the paper's 0.48).

  python benchmarks/roofline.py                   # CPU: about a minute on 2 cores
  python benchmarks/roofline.py --target=0.5
"""

import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from networks import flops                      # noqa: E402
from torch_utils import cli                     # noqa: E402
import common                                   # noqa: E402  (benchmarks/common.py)
import inference                                # noqa: E402  (benchmarks/inference.py: build, inputs, measure)

MATRIX_OPS = ('convolution', 'mm', 'bmm', 'matmul', 'linear', 'addmm')

def matrix_flop(**network_kwargs):
    """2 x the multiply-accumulates of the convolutions and matrix products of one batch-1 forward pass (counted on
    the meta device: no arithmetic is done)."""
    per_op = flops.count(flops.build_meta(**network_kwargs))['per_op']
    return 2 * sum(macs for name, (_calls, macs) in per_op.items() if name in MATRIX_OPS)

def peak_flops(device, size, reps):
    """Best FLOP/s of a size^3 float32 matrix product. On a CPU: oneDNN with a prepacked weight where this torch
    has it (what the fast path's 1x1 convolutions use; faster than torch.mm there), else torch.mm."""
    g = torch.Generator(device).manual_seed(0)
    a = torch.randn([size, size], generator=g, device=device)
    b = torch.randn([size, size], generator=g, device=device)
    mkldnn = getattr(torch.ops, 'mkldnn', None)
    if device.type == 'cpu' and torch.backends.mkldnn.is_available() and hasattr(mkldnn, '_linear_pointwise'):
        packed = mkldnn._reorder_linear_weight(b, size)
        product = lambda: mkldnn._linear_pointwise(a, packed, None, 'none', [], None)  # noqa: E731
    else:
        product = lambda: a @ b.t()  # noqa: E731
    product()
    best = float('inf')
    for _ in range(reps):
        best = min(best, inference.timed_call(product, device))
    return 2 * size ** 3 / best

#----------------------------------------------------------------------------

@click.command()
@click.option('--device',           help='cpu or cuda [default: cuda if available]', metavar='STR', type=click.Choice(['cpu', 'cuda']), default=None)
@click.option('--channels',         help='Base width (model_channels)', metavar='INT', type=click.IntRange(min=64), default=192, show_default=True)
@click.option('--resolution',       help='Input resolution', metavar='INT', type=click.IntRange(min=8), default=64, show_default=True)
@click.option('--label-dim',        help='Number of classes', metavar='INT', type=click.IntRange(min=1), default=1000, show_default=True)
@click.option('--reps',             help='Timed batch-1 calls per network', metavar='INT', type=click.IntRange(min=1), default=5, show_default=True)
@click.option('--peak-size',        help='Side of the square matrices of the peak measurement', metavar='INT', type=click.IntRange(min=16), default=2048, show_default=True)
@click.option('--target',           help='G*/A latency ratio to report the needed rate for', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=0.48, show_default=True)
@click.option('--threads',          help='CPU threads [default: torch default]', metavar='INT', type=click.IntRange(min=1), default=None)
def cmdline(device, channels, resolution, label_dim, reps, peak_size, target, threads):
    """Matrix-arithmetic rate of A and G* against the device's peak; the G*/A latency that peak allows."""
    device, _, name = common.setup(device, 'fast', threads)
    print(f'Device: {name}; float32; base width {channels}, {resolution}x{resolution}, {label_dim} classes')
    nets = {cfg: inference.build(cfg, channels, resolution, label_dim, device, 'fp32') for cfg in ('A', 'G*')}
    work = {cfg: matrix_flop(img_resolution=resolution, img_channels=3, label_dim=label_dim, model_channels=channels,
                             block=cfg) for cfg in nets}
    peak = peak_flops(device, peak_size, reps=max(reps, 3))
    lat = inference.measure({'fast': nets}, inference.inputs(1, resolution, label_dim, device), device, reps, 1,
                            'batch 1')
    lat = {cfg: lat[('fast', cfg)] for cfg in nets}
    peak2 = peak_flops(device, peak_size, reps=max(reps, 3))  # again after the networks: the better of the two
    peak = max(peak, peak2)

    print(f'\npeak: {peak / 1e9:.0f} GFLOP/s (float32 matrix product, {peak_size}^3)')
    for cfg in nets:
        rate = work[cfg] / lat[cfg]
        print(f'{cfg:<3s} latency {lat[cfg]:.3f} s; matrix arithmetic {work[cfg] / 1e9:.3f} GFLOP at '
              f'{rate / 1e9:.0f} GFLOP/s ({rate / peak:.0%} of peak)')
    need = work['G*'] / (target * lat['A'])
    print(f'G*/A = {target:g} needs G* to average {need / 1e9:.0f} GFLOP/s over the whole network ({need / peak:.0%} '
          'of peak)')
    print(f'\nlatency ratio G*/A: {lat["G*"] / lat["A"]:.3f}')
    print(f'lowest latency ratio G*/A at peak: {work["G*"] / peak / lat["A"]:.3f}')

if __name__ == '__main__':
    cli.run(cmdline)
