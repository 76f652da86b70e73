"""Plot a metric against the EMA length σ_rel for post-hoc EMA sweeps (like Figure 5 of the EDM2 paper).

Example: python plot_sweep.py --results=fid-xs.json --results=fid-s.json --metric=fid --out=sweep.png
Library: metrics.sweeps.read_sweep_runs and figures.charts.sweep_plot. sweep_phema.py measures a sweep and
writes its results.jsonl and plot in one command.
"""

import os

import click

from figures.charts import sweep_plot
from torch_utils import cli
from metrics.sweeps import read_sweep_runs

@click.command()
# Main options.
@click.option('--results', help='Results of one sweep (JSON, JSON lines or CSV); repeat to compare sweeps',
              metavar='FILE', type=str, required=True, multiple=True)
@click.option('--out', help='Output PNG', metavar='PNG', type=str, required=True)
@click.option('--metric', help='Metric to plot when the results hold several (e.g. fid)', metavar='NAME', type=str,
              default=None)
# Appearance.
@click.option('--title', help='Plot title', metavar='STR', type=str, default='')
@click.option('--higher-is-better', help='Mark the largest value as best instead of the smallest', is_flag=True)
@click.option('--logy', help='Logarithmic metric axis', is_flag=True)
@click.option('--overwrite', help='Replace --out if it exists', is_flag=True)
def cmdline(results, out, metric, title, higher_is_better, logy, overwrite):
    """Plot metric versus EMA length for one or more post-hoc EMA sweeps, marking the best EMA length.

    \b
    A results file maps EMA lengths to a metric, for example (JSON):
      {"phema/phema-0002147-0.050.pkl": 3.41, "phema/phema-0002147-0.100.pkl": 3.12}
      {"0.050": {"fid": 3.41, "fd_dinov2": 95.1}, "0.100": {"fid": 3.12, "fd_dinov2": 90.2}}
    or CSV with a header:  std,fid  /  0.050,3.41  /  0.100,3.12
    or the results.jsonl of sweep_phema.py (one curve per run it holds).
    Values must be finite numbers.
    """
    sweeps = {}
    try:
        for path in results:  # small files: read (and checked) before the output is looked at
            stem = os.path.splitext(os.path.basename(path))[0] if len(results) > 1 else ''
            for run, sweep in read_sweep_runs(path, metric=metric).items():
                sweeps[': '.join(part for part in (stem, run) if part)] = sweep
    except (ValueError, FileNotFoundError) as e:
        raise cli.CliError(str(e)) from None
    cli.check_output_file(out, overwrite=overwrite, make_folders=False)
    cli.check_not_input(out, [('--results', path) for path in results])
    with cli.os_errors(out):
        best = sweep_plot(out, sweeps, metric=metric or 'metric', title=title, lower_is_better=not higher_is_better,
                          logy=logy)
    for label, (std, value) in best.items():
        print(f'{label + ": " if label else ""}best {metric or "metric"} {value:g} at σ_rel {std:.3f}')
    print(f'Saved {out}')

if __name__ == '__main__':
    cli.run(cmdline)
