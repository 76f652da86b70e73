"""Memory traffic of CONFIG A (EDM2) vs G* (EDM2+): bytes read and written per image, counted op by op.

Every aten op that a path dispatches is counted as the bytes of its tensor inputs (read) plus those of its outputs
(written); views and allocations move no data and are skipped. A training image is one image of one step's
forward and backward pass (EDM2's loss; the optimizer is not counted), an evaluation one image of one forward pass
in eval mode without autograd. On a memory-bound device these bytes, not the FLOPs, set the time, which is why G*'s
halved arithmetic only shows where its traffic shrinks too.

By default the networks run on the meta device: shapes only, so the S size counts in seconds and the numbers are
exactly reproducible. The path is the one a run takes (the training path, the inference path, or with
--impls=reference EDM2's op sequence), as on a GPU: on a CPU the training path skips the clamp of blocks whose
values stay within the clip limit, and --device=cpu counts that on real tensors.

  python benchmarks/traffic.py                      # S size (64x64, base 192, 1000 classes) and the demo size
  python benchmarks/traffic.py --sizes=demo --top=12 # where the bytes go
"""

import collections
import os
import sys

import click
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from networks import edm2plus, fastpaths, presets  # noqa: E402
from torch_utils import cli                       # noqa: E402
from training.loss import EDM2Loss              # noqa: E402

SIZES = {  # name -> (Precond keyword arguments without the block, batch)
    'S': (dict(img_resolution=64, img_channels=3, label_dim=1000, model_channels=192, channel_mult=[1, 2, 3, 4],
               num_blocks=3, attn_resolutions=[16, 8], dropout=0.1), 64),
    'demo': ({k: v for k, v in presets.network_kwargs('demo').items() if k not in ('block', 'expansion', 'kernel')},
             presets.get('demo').batch),
}
_NO_DATA = {'empty', 'empty_like', 'empty_strided', 'new_empty', 'new_empty_strided', 'detach', 'lift_fresh',
            'alias', 'set_', 'resize_', '_unsafe_view', 'as_strided', 'is_same_size', 'sym_size', 'sym_stride'}

class ByteCounter(TorchDispatchMode):
    """Sums bytes read (tensor arguments) and written (tensor results) per dispatched aten op."""

    def __init__(self):
        super().__init__()
        self.by_op = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name not in _NO_DATA and not func.is_view:
            read = [t for t in tree_leaves((args, {k: v for k, v in kwargs.items() if k != 'out'}))
                    if isinstance(t, torch.Tensor)]
            written = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.by_op[name] += sum(t.numel() * t.element_size() for t in read + written)
        return out

    @property
    def total(self):
        return sum(self.by_op.values())

def build(size, block, device):
    kwargs, batch = SIZES[size]
    torch.manual_seed(0)
    net = edm2plus.Precond(**kwargs, block=block, use_fp16=False).to(device)
    images = torch.randn([batch, kwargs['img_channels'], kwargs['img_resolution'], kwargs['img_resolution']],
                         device=device)
    labels = torch.eye(kwargs['label_dim'], device=device)[torch.arange(batch, device=device) % kwargs['label_dim']]
    return net, images, labels

def count(size, block, device, reference, training):
    """(bytes per image, Counter of bytes per op name) of one training step or one evaluation."""
    net, images, labels = build(size, block, device)
    counter = ByteCounter()
    # 'default': the faster paths, the training path included on every device (it is CUDA's default only once
    # tests/test_cuda.py and benchmarks/gpu_suite.sh vouch for it there; networks/fastpaths.py).
    with edm2plus.reference_mode(reference), fastpaths.training_path('fast'):
        if training:
            net.train()
            loss_fn = EDM2Loss(P_mean=-0.4, P_std=1.0)
            with counter:
                loss_fn(net, images, labels).sum().backward()
        else:
            net.eval()
            sigma = torch.full([images.shape[0]], 1.0, device=device)
            with torch.no_grad(), counter:
                net(images, sigma, labels)
    return counter.total / images.shape[0], counter.by_op

@click.command()
@click.option('--sizes',  help='Sizes to count (S, demo)', metavar='LIST', type=str, default='demo,S', show_default=True)
@click.option('--impls',  help='Paths: default (training/inference path) and/or reference', metavar='LIST',
              type=str, default='reference,default', show_default=True)
@click.option('--device', help='meta (shapes only) or cpu', metavar='STR', type=click.Choice(['meta', 'cpu']),
              default='meta', show_default=True)
@click.option('--top',    help='Also list the N ops that move the most bytes', metavar='INT', type=click.IntRange(min=0),
              default=0, show_default=True)
def cmdline(sizes, impls, device, top):
    """Bytes read + written per training image and per evaluation, CONFIG A vs G*."""
    sizes = [s.strip() for s in sizes.split(',') if s.strip()]
    impls = [s.strip() for s in impls.split(',') if s.strip()]
    for s in sizes:
        if s not in SIZES:
            raise click.ClickException(f'--sizes: unknown size "{s}" (choose from {", ".join(SIZES)})')
    for s in impls:
        if s not in ('default', 'reference'):
            raise click.ClickException(f'--impls: unknown path "{s}" (choose from default, reference)')
    final = []
    for size in sizes:
        for impl in impls:
            for what, training in (('training', True), ('evaluation', False)):
                res = {b: count(size, b, torch.device(device), impl == 'reference', training) for b in ('A', 'G*')}
                print(f'{size:<5s} {impl:<9s} {what:<10s}  A {res["A"][0] / 1e9:7.3f} GB   G* {res["G*"][0] / 1e9:7.3f} GB'
                      f'   G*/A {res["G*"][0] / res["A"][0]:.3f}   (per image)')
                for b in ('A', 'G*') if top else ():
                    total = res[b][0] * SIZES[size][1]
                    ops = ', '.join(f'{op} {v / total:.0%}' for op, v in res[b][1].most_common(top))
                    print(f'      {b}: {ops}')
                if impl == impls[-1] and training:
                    final.append((size, res['A'][0], res['G*'][0]))
    for size, a, g in final:
        if size == 'S' or len(sizes) == 1:
            print(f'A training traffic per image ({size}): {a / 1e9:.3g} GB')
            print(f'G* training traffic per image ({size}): {g / 1e9:.3g} GB')
            print(f'training traffic G*/A ({size}): {g / a:.3f}')

if __name__ == '__main__':
    cli.run(cmdline)
