"""Reconstruct post-hoc EMA networks with chosen relative standard deviations from training snapshots.

Example: python reconstruct_phema.py --indir=runs/00000-demo --outdir=phema --outstd=0.010,0.015,...,0.250
The library function is training.posthoc.reconstruct_phema (EDM2 paper Appendix C.2).
"""

import os

import click
import tqdm

from torch_utils import cli
from training.posthoc import kimg_to_nimg, list_input_pickles, parse_std_list, reconstruct_phema  # noqa: F401

@click.command()
# Inputs.
@click.option('--indir', help='Directory with the input snapshots (network-snapshot-*-*.pkl)', metavar='DIR',
              type=str, required=True)
@click.option('--inprefix', help='Use only inputs whose name prefix is this', metavar='STR', type=str,
              default=None)
@click.option('--instd', help='Use only inputs with these stds, e.g. 0.050,0.100', metavar='LIST', type=cli.Parsed(parse_std_list),
              default=None)
# Outputs.
@click.option('--outdir', help='Where to write the reconstructions', metavar='DIR', type=str, required=True)
@click.option('--outprefix', help='Output file name prefix', metavar='STR', type=str, default='phema',
              show_default=True)
@click.option('--outstd', help='Relative stds to reconstruct, e.g. 0.010,0.015,...,0.250', metavar='LIST',
              type=cli.Parsed(parse_std_list), required=True)
@click.option('--outkimg', help='Training time of the reconstruction  [default: latest input]', metavar='KIMG',
              type=click.IntRange(min=1), default=None)
@click.option('--skip', help='Skip outputs that already exist', is_flag=True)
# Performance.
@click.option('--batch', help='Outputs per pass over the inputs (memory vs. passes)', metavar='INT',
              type=click.IntRange(min=1), default=8, show_default=True)
def cmdline(indir, inprefix, instd, outdir, outprefix, outstd, outkimg, skip, batch):
    """Reconstruct post-hoc EMA networks from the snapshots of a training run.

    \b
    # Sweep 49 EMA lengths at the end of training, 8 per pass over the inputs:
    python reconstruct_phema.py --indir=runs/00000-demo --outdir=phema \\
        --outstd=0.010,0.015,...,0.250 --batch=8

    Inputs are files named <prefix>-<kimg>-<std>.pkl; their times are recovered as multiples of 1024 images.
    Network pickles (.pkl) run the Python code stored inside them when loaded: load only pickles you trust.
    """
    cli.refuse_torchrun('reconstruct_phema.py')
    if not os.path.isdir(indir):
        raise click.ClickException(f'Input directory does not exist: {indir}')
    cli.check_output_dir(outdir)
    out_nimg = None
    if outkimg is not None:
        try:
            out_nimg = kimg_to_nimg(outkimg)
        except ValueError as e:
            raise click.ClickException(f'--outkimg={outkimg}: {e}')
    with cli.os_errors(outdir):
        try:
            in_pkls = list_input_pickles(indir, in_prefix=inprefix, in_std=instd)
            if not any(p.nimg > 0 for p in in_pkls):
                raise ValueError(f'No valid input pickles found in {indir}')
            steps = reconstruct_phema(in_pkls, out_std=outstd, out_nimg=out_nimg, out_dir=outdir,
                                      out_prefix=outprefix, skip_existing=skip, max_batch_size=batch)
            for _step in tqdm.tqdm(steps, unit='step'):
                pass
        except ValueError as e:
            raise cli.CliError(str(e)) from None  # Outputs already written stay; the one in progress is not written.

main = cmdline  # the command's earlier name, for scripts that import it

if __name__ == '__main__':
    cli.run(cmdline)
