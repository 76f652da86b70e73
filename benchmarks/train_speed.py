"""Training speed of the block variants at the same base width, measured side by side.

One optimizer step (EDM2 loss, forward + backward + Adam, as the training loop runs it) per variant and path in
turn, repeated; the median step time gives images per second. The paths: `reference` (EDM2's op sequence,
reference_mode()), `training` (the training path of networks/fastpaths.py, on every device) and, on request,
`compiled` (torch.compile of the network in --compile-mode, as train_edm2plus.py --compile runs it;
'reduce-overhead' replays CUDA graphs on a GPU). On CUDA the training path becomes the default for training only
once it is at least as fast as the reference path there (benchmarks/gpu_suite.sh prints both). Printed:
each variant's ratio to the first variant on the same path, each path's speed-up over the variant's reference
path, and the ratio of the two variants on the last path. Interleaving means a busy machine slows them all alike,
so the ratios stay meaningful even when the absolute numbers do not.

  python benchmarks/train_speed.py                                   # CONFIG A vs G*, 32x32, base 32, CPU
  python benchmarks/train_speed.py --resolution=64 --channels=192 --channel-mult=1,2,3,4 --num-blocks=3 \\
      --attn=16,8 --batch=64 --label-dim=1000                        # EDM2-S vs EDM2+-S (on a GPU)
  python benchmarks/train_speed.py --impls=training,compiled --compile-mode=reduce-overhead ...  # + CUDA graphs
"""

import os
import sys
import time

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from networks import edm2plus, fastpaths, flops  # noqa: E402
from networks.edm2plus import Precond          # noqa: E402
from torch_utils import cli                    # noqa: E402
from torch_utils import distributed as dist    # noqa: E402
from training import training_loop            # noqa: E402
from training.loss import EDM2Loss             # noqa: E402

#----------------------------------------------------------------------------

PATHS = ('reference', 'training', 'compiled')

def make_trainer(block, resolution, label_dim, batch, device, fp16, reference=False, compile=False, **net_kwargs):
    """Return (step function, parameter count, GFLOPs per evaluation) for one variant on one path; `compile`: False
    or a torch.compile mode."""
    net = Precond(resolution, 3, label_dim, block=block, use_fp16=fp16, **net_kwargs).train().to(device)
    train_net = training_loop.compile_net(net, compile)
    counted = flops.count(flops.build_meta(img_resolution=resolution, img_channels=3, label_dim=label_dim, block=block, **net_kwargs))
    adam = dict(class_name='torch.optim.Adam', betas=(0.9, 0.99))
    optimizer = training_loop.make_optimizer(net.parameters(), adam)
    loss_fn = EDM2Loss(P_mean=-0.8, P_std=1.6)
    images = torch.randn([batch, 3, resolution, resolution], device=device).clamp(-1, 1)
    labels = torch.eye(label_dim, device=device)[torch.randint(label_dim, [batch], device=device)] if label_dim else None

    def step():
        optimizer.zero_grad(set_to_none=True)
        with edm2plus.reference_mode(reference), fastpaths.training_path('fast'):
            loss_fn(train_net, images, labels).sum().mul(1 / batch).backward()
        training_loop.apply_gradients(net, optimizer, lr=1e-3, force_finite=True)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
    return step, counted['params'], counted['flops'] / 1e9

#----------------------------------------------------------------------------

@click.command()
@click.option('--blocks',       help='Variants to compare; ratios are relative to the first', metavar='LIST', type=str, default='A,G*', show_default=True)
@click.option('--resolution',   help='Image resolution', metavar='INT',               type=click.IntRange(min=4), default=32, show_default=True)
@click.option('--channels',     help='Base width (model_channels)', metavar='INT',    type=click.IntRange(min=8), default=32, show_default=True)
@click.option('--channel-mult', help='Width multipliers per level', metavar='LIST',   type=cli.IntList(min=1, min_len=1), default='1,2,2', show_default=True)
@click.option('--num-blocks',   help='Encoder blocks per level', metavar='INT',       type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--attn',         help='Resolutions with attention', metavar='LIST',    type=cli.IntList(min=1), default='16,8', show_default=True)
@click.option('--label-dim',    help='Number of classes (0: unconditional)', metavar='INT', type=click.IntRange(min=0), default=10, show_default=True)
@click.option('--batch',        help='Images per step', metavar='INT',                type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--steps',        help='Timed steps per variant', metavar='INT',        type=click.IntRange(min=1), default=5, show_default=True)
@click.option('--warmup',       help='Untimed steps per variant first', metavar='INT', type=click.IntRange(min=0), default=1, show_default=True)
@click.option('--fp16',         help='FP16 activations (CUDA only)', metavar='BOOL',  type=bool, default=True, show_default=True)
@click.option('--device',       help='cuda or cpu [default: cuda if available]', metavar='STR', type=str, default=None)
@click.option('--impls',        help='Paths: reference, training, compiled', metavar='LIST', type=str, default='reference,training', show_default=True)
@click.option('--compile-mode', help='torch.compile mode of the compiled path', type=click.Choice(training_loop.COMPILE_MODES), default='default', show_default=True)
def cmdline(blocks, resolution, channels, channel_mult, num_blocks, attn, label_dim, batch, steps, warmup, fp16, device, impls, compile_mode):
    """Training images per second of block variants at the same width, run side by side."""
    device = torch.device(device) if device is not None else dist.device()
    net_kwargs = dict(model_channels=channels, channel_mult=channel_mult, num_blocks=num_blocks, attn_resolutions=attn)
    names = [x.strip() for x in blocks.split(',') if x.strip()]
    paths = [x.strip() for x in impls.split(',') if x.strip()]
    for path in paths:
        if path not in PATHS:
            raise click.ClickException(f'--impls: unknown path "{path}" (choose from {", ".join(PATHS)})')
    print(f'Device {device} ({torch.get_num_threads()} threads), {resolution}x{resolution}, base {channels}, '
          f'mult {net_kwargs["channel_mult"]}, {num_blocks} blocks, batch {batch}')
    trainers = {}
    for name in names:
        for path in paths:
            try:
                torch.manual_seed(0)
                trainers[name, path] = make_trainer(name, resolution, label_dim, batch, device, fp16,
                                                    reference=(path == 'reference'),
                                                    compile=(compile_mode if path == 'compiled' else False), **net_kwargs)
            except ValueError as e:
                raise click.ClickException(str(e))

    # Interleave the variants and paths, step by step.
    times = {key: [] for key in trainers}
    for round_idx in range(warmup + steps):
        for key, (step, _params, _gflops) in trainers.items():
            t0 = time.perf_counter()
            step()
            if round_idx >= warmup:
                times[key].append(time.perf_counter() - t0)
    speed = {key: batch / float(np.median(t)) for key, t in times.items()}

    print(f'{"variant":<8s} {"path":<9s} {"Mparams":>8s} {"GFLOPs":>7s} {"img/s":>8s} {"ratio":>6s} {"vs ref":>6s}')
    for path in paths:
        for name in names:
            _, params, gflops = trainers[name, path]
            vs_ref = f'{speed[name, path] / speed[name, "reference"]:6.2f}' if 'reference' in paths else f'{"":6s}'
            print(f'{name:<8s} {path:<9s} {params / 1e6:8.3f} {gflops:7.3f} {speed[name, path]:8.2f} '
                  f'{speed[name, path] / speed[names[0], path]:6.2f} {vs_ref}')
    for path in paths if 'reference' in paths else ():
        for name in names if path != 'reference' else ():
            print(f'{name} {path} path: {speed[name, path] / speed[name, "reference"]:.2f}x its reference path')
    if len(names) == 2:
        a, b = names
        ratio = speed[b, paths[-1]] / speed[a, paths[-1]]
        print(f'{b} trains {ratio:.2f}x as many images per second as {a}')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    cli.run(cmdline)
