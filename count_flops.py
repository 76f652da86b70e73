"""Count parameters and compute (GFLOPs per sample, EDM2's convention) of a network, a preset or any block variant.

Examples:
    python count_flops.py edm2plus-img64-s
    python count_flops.py --block=G* --channels=128 --expansion=6
    python count_flops.py edm2-img64-s --block=B       # Table 1's CONFIG B: width 384 (the variant's own)
    python count_flops.py runs/00000/network-snapshot-0008388-0.050.pkl
    python count_flops.py --paper [--json]
"""

import json

import click
import torch

from networks import flops, presets
from torch_utils import cli
from networks.edm2plus import BLOCK_VARIANTS

#----------------------------------------------------------------------------
# The paper's numbers (Tables 1-3), printed next to ours by --paper. Only the reference column
# comes from this table: our numbers are always counted from the network itself.

PAPER_ROWS = [
    # name        base  block  M params  GFLOPs   tables
    ('A',         192, 'A',    280.21, 101.90, 'Tables 1, 2; EDM2-S in Table 3'),
    ('B',         384, 'B',    252.28,  51.13, 'Table 1'),
    ('C',         192, 'C',    273.99,  72.52, 'Table 1'),
    ('D',         192, 'D',    273.99,  72.44, 'Table 1'),
    ('D*',        192, 'D*',   195.59,  51.09, 'Tables 1, 2'),
    ('E',         192, 'E',    273.76,  72.27, 'Table 1'),
    ('E-k7',      192, 'E-k7', 278.05,  75.27, 'Table 1'),
    ('F',         192, 'F',    195.76,  51.26, 'Tables 1, 2'),
    ('G',         192, 'G',    195.11,  50.61, 'Tables 1, 2'),
    ('F*',        192, 'F*',   154.61,  51.05, 'Table 2'),
    ('G*',        192, 'G*',   153.97,  50.41, 'Table 2; EDM2+-S in Table 3'),
    ('EDM2-M',    256, 'A',    498,     181,   'Table 3 (rounded)'),
    ('EDM2-L',    320, 'A',    777,     282,   'Table 3 (rounded)'),
    ('EDM2-XL',   384, 'A',    1119,    406,   'Table 3 (rounded)'),
    ('EDM2+-L',   320, 'G*',   426,     138,   'Table 3 (rounded)'),
    ('EDM2+-XL',  384, 'G*',   613,     199,   'Table 3 (rounded)'),
]

IMAGENET64 = dict(img_resolution=64, img_channels=3, label_dim=1000)

def paper_table():
    """Count every row of PAPER_ROWS; returns a list of dicts (name, mparams, gflops, paper values)."""
    rows = []
    for name, channels, block, paper_m, paper_g, source in PAPER_ROWS:
        result = flops.count(flops.build_meta(model_channels=channels, block=block, **IMAGENET64))
        rows.append(dict(name=name, mparams=round(result['params'] / 1e6, 4), gflops=round(result['flops'] / 1e9, 4),
                         paper_mparams=paper_m, paper_gflops=paper_g, source=source))
    return rows

#----------------------------------------------------------------------------

def load_for_counting(net, verbose=True):
    """Network to count: a preset name or a network file (.pkl/.pt). Rebuilt on the meta device when possible."""
    if net in presets.PRESETS:
        return flops.build_meta(**presets.network_kwargs(net)), 'meta'
    from networks.loading import load_network
    module = load_network(net, verbose=verbose)
    if hasattr(module, 'init_kwargs') and type(module).__name__ == 'Precond':
        try:
            with torch.device('meta'):
                return type(module)(*module.init_args, **module.init_kwargs), 'meta'
        except Exception:  # pylint: disable=broad-except
            pass  # foreign source (e.g. an EDM2 pickle): count the loaded module itself
    return module.float().eval(), 'cpu'

def print_report(result, out=print):
    for line in flops.headline(result):
        out(line)
    out('')
    out(f'{"Op":<24s}{"Count":>8s}{"Gflops":>12s}')
    out('-' * 44)
    for name, (num, fl) in sorted(result['per_op'].items(), key=lambda kv: (-kv[1][1], kv[0])):
        out(f'{name:<24s}{num:>8d}{fl / 1e9:>12.3f}')
    out('-' * 44)
    out(f'{"Total":<24s}{sum(n for n, _ in result["per_op"].values()):>8d}{result["flops"] / 1e9:>12.3f}')

def _build(kwargs):
    try:
        return flops.build_meta(**kwargs)
    except ValueError as e:
        raise click.ClickException(str(e))
    except RuntimeError as e:  # sizes beyond what a tensor can describe, e.g. --channels=1000000000
        raise click.ClickException(f'the network cannot be built ({cli.one_line(e)}); check --channels and '
                                   '--expansion') from None

#----------------------------------------------------------------------------

@click.command()
@click.argument('net', required=False, metavar='[PRESET|PKL|PT|URL]')
# Build a network from options instead (defaults: ImageNet-64, 1000 classes).
@click.option('--block', help='Block variant', metavar='NAME', type=click.Choice(list(BLOCK_VARIANTS)))
@click.option('--channels', help='Base width (model_channels)', metavar='INT', type=click.IntRange(min=1))
@click.option('--expansion', help='Expansion ratio e of the wide layers', metavar='FLOAT', type=cli.FloatRange(min=0, min_open=True))
@click.option('--kernel', help='Depthwise kernel size k (odd)', metavar='INT', type=int)
@click.option('--resolution', help='Input resolution (a power of two)', metavar='INT', type=int)
@click.option('--img-channels', help='Input channels (3 = RGB, 4 = latents)', metavar='INT', type=click.IntRange(min=1))
@click.option('--label-dim', help='Number of classes (0 = unconditional)', metavar='INT', type=click.IntRange(min=0))
# Output.
@click.option('--paper', help='Print Tables 1-3 of the paper: our counts, the paper\'s and the difference', is_flag=True)
@click.option('--json', 'as_json', help='Print JSON instead of a table', is_flag=True)
def cmdline(net, block, channels, expansion, kernel, resolution, img_channels, label_dim, paper, as_json):
    """Count parameters and GFLOPs per sample (EDM2's convention: eval mode, batch 1).

    NET is a preset name (e.g. edm2plus-img64-s), a network file, or omitted to build one from the options.

    Network pickles (.pkl) run the Python code stored inside them when loaded: load only pickles you trust, or
    convert them once with "python -m networks.export IN.pkl OUT.pt" into the weights-only .pt format, which every
    tool accepts and which never runs code.
    """
    cli.refuse_torchrun('count_flops.py')

    if paper:
        rows = paper_table()
        if as_json:
            click.echo(json.dumps([dict(name=r['name'], mparams=r['mparams'], gflops=r['gflops']) for r in rows], indent=2))
            return
        click.echo(f'{"config":<10s}{"base":>5s}{"Mparams":>10s}{"paper":>9s}{"diff":>8s}{"GFLOPs":>10s}{"paper":>9s}{"diff":>8s}  source')
        for (name, channels_, *_), r in zip(PAPER_ROWS, rows):
            click.echo(f'{name:<10s}{channels_:>5d}{r["mparams"]:>10.2f}{r["paper_mparams"]:>9.2f}{r["mparams"] - r["paper_mparams"]:>+8.2f}'
                       f'{r["gflops"]:>10.2f}{r["paper_gflops"]:>9.2f}{r["gflops"] - r["paper_gflops"]:>+8.2f}  {r["source"]}')
        return

    options = dict(block=block, model_channels=channels, expansion=expansion, kernel=kernel,
                   img_resolution=resolution, img_channels=img_channels, label_dim=label_dim)
    if net is None or net in presets.PRESETS:
        # A preset (EDM2-S at ImageNet-64 when none is named) with the options; --block brings the variant's e, k and
        # width (presets.variant_architecture) unless --channels, --expansion or --kernel say otherwise.
        kwargs = presets.network_kwargs(net or 'edm2-img64-s', **options)
        explicit = [k for k in ('expansion', 'kernel') if options[k] is not None]
        try:
            presets.check_architecture(kwargs, explicit=explicit)
        except ValueError as e:
            raise click.ClickException(str(e))
        module, device = _build(kwargs), 'meta'
        name = f'{net or "block " + kwargs["block"]}: {flops.describe(kwargs)}'
    else:
        given = [f'--{k}' for k, v in options.items() if v is not None and k in ('block', 'expansion', 'kernel')]
        if given:
            raise click.ClickException(f'{", ".join(given)} cannot be combined with a network file')
        with cli.os_errors():
            try:
                module, device = load_for_counting(net, verbose=not as_json)  # --json: nothing but JSON
            except ValueError as e:
                raise click.ClickException(str(e)) from None
        name = net
    if not as_json:
        click.echo(f'Counting {name} ...')
    result = flops.count(module, resolution=resolution, channels=img_channels, label_dim=label_dim, device=device)
    if as_json:
        click.echo(json.dumps([dict(name=name, mparams=result['params'] / 1e6, gflops=result['flops'] / 1e9)], indent=2))
    else:
        print_report(result, out=click.echo)

main = cmdline  # the command's earlier name, for scripts that import it

if __name__ == '__main__':
    cli.run(cmdline)
