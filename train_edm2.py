"""EDM2's training entry point, for the scripts and documents that call it: the options of EDM2's `train_edm2.py`
(EDM2 paper's training setup, CONFIG A presets), run by train_edm2plus.py.

Everything else (presets, resuming, output files) is train_edm2plus.py's; the options that train_edm2plus.py adds
beyond EDM2's (block variants, CPU training, time limits, ...) keep their defaults here. Example:

  torchrun --standalone --nproc_per_node=8 train_edm2.py --outdir=training-runs/00000-edm2-img512-xs \\
      --data=datasets/img512-sd.zip --preset=edm2-img512-xs --batch-gpu=32
"""

import click

import train_edm2plus
from torch_utils import cli

# EDM2's options, in EDM2's order (the names of train_edm2plus.py's click parameters).
EDM2_OPTIONS = ['outdir', 'data', 'cond', 'preset',
                'duration', 'batch', 'channels', 'dropout', 'P_mean', 'P_std', 'lr', 'decay',
                'batch_gpu', 'fp16', 'ls', 'bench',
                'status', 'snapshot', 'checkpoint', 'seed', 'dry_run']

def _run(**opts):
    # ctx.invoke gives the options not named here train_edm2plus.py's own defaults.
    click.get_current_context().invoke(train_edm2plus.cmdline, **opts)

_params = {p.name: p for p in train_edm2plus.cmdline.params}
cmdline = click.Command(
    name='train_edm2.py', callback=_run, params=[_params[name] for name in EDM2_OPTIONS],
    help='Train a diffusion model with EDM2\'s options (train_edm2plus.py has more: block variants, CPU runs, time '
         'limits).\n\n\b\nExample: ImageNet-512 latents, EDM2-XS, 8 GPUs\n'
         'torchrun --standalone --nproc_per_node=8 train_edm2.py \\\n'
         '    --outdir=training-runs/00000-edm2-img512-xs \\\n'
         '    --data=datasets/img512-sd.zip --preset=edm2-img512-xs --batch-gpu=32\n\n'
         'Rerunning the same command resumes from the newest training state.')

if __name__ == '__main__':
    cli.run(cmdline, spawn_workers=True)
