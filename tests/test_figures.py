"""Pictures of figures/: line plots, the post-hoc EMA sweep plot (with plot_sweep.py and the sweep readers of
metrics/sweeps.py), training curves and the labelled class grid."""

import json
import os

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner
from PIL import Image

import plot_sweep
from figures import charts, grids
from metrics import sweeps

def _pixels_of(img, color, tol=40):
    a = np.asarray(img.convert('RGB')).astype(int)
    return np.all(np.abs(a - np.array(color)) < tol, axis=-1)

def test_line_plot_draws_series_where_they_are(tmp_path):
    path = tmp_path / 'plot.png'
    charts.line_plot(path, [('', [0, 1], [0, 1]), ('', [0, 1], [0.9, 0.9])], title='T', xlabel='x',
                    ylabel='y', size=(400, 300))  # no labels: no legend to confuse the pixel checks
    img = Image.open(path)
    assert img.format == 'PNG' and img.size == (400, 300)
    rising = _pixels_of(img, charts.COLORS[0])
    flat = _pixels_of(img, charts.COLORS[1])
    ys, xs = np.nonzero(rising)
    assert len(xs) > 200
    # y = x: the line rises from bottom-left to top-right (image rows grow downwards).
    assert np.corrcoef(xs, ys)[0, 1] < -0.95
    # The flat series lies near the top of its drawn extent, along a horizontal band.
    fy, fx = np.nonzero(flat)
    assert np.ptp(fx) > 200 and np.percentile(fy, 50) < np.percentile(ys, 20)
    # With labels, a legend adds a sample of each colour.
    charts.line_plot(tmp_path / 'legend.png', [('rising', [0, 1], [0, 1]), ('flat', [0, 1], [0.9, 0.9])],
                    size=(400, 300))
    legend_img = Image.open(tmp_path / 'legend.png')
    assert _pixels_of(legend_img, charts.COLORS[1]).sum() > flat.sum() + 20
    assert sorted(os.listdir(tmp_path)) == ['legend.png', 'plot.png']

def test_line_plot_log_axes_and_bad_values(tmp_path):
    x = np.arange(1, 1001)
    y = 1 / x
    y[10] = np.nan
    y[20] = -1  # not drawable on a log axis: breaks the line instead of failing
    charts.line_plot(tmp_path / 'log.png', [('', x, y)], logx=True, logy=True)
    line = _pixels_of(Image.open(tmp_path / 'log.png'), charts.COLORS[0])
    ys, xs = np.nonzero(line)
    assert np.corrcoef(xs, ys)[0, 1] > 0.95  # a falling straight line in log-log space
    charts.line_plot(tmp_path / 'empty.png', [('nothing', [], [])])
    assert Image.open(tmp_path / 'empty.png').size == (800, 500)
    with pytest.raises(ValueError, match='2 x values but 3 y values'):
        charts.line_plot(tmp_path / 'bad.png', [('bad', [1, 2], [1, 2, 3])])
    assert not os.path.exists(tmp_path / 'bad.png')

def test_ticks():
    ticks, labels = charts._linear_ticks(-0.04, 1.04)
    assert labels == ['0.0', '0.2', '0.4', '0.6', '0.8', '1.0']
    ticks, labels = charts._log_ticks(0, 3)
    assert labels == ['1', '10', '100', '1000']
    ticks, labels = charts._log_ticks(np.log10(2.5), np.log10(60))
    assert labels == ['5', '10', '20', '50']

def test_sweep_plot_marks_best(tmp_path):
    stds = np.round(np.arange(0.01, 0.2501, 0.01), 3)
    results = {s: 3 + 40 * (s - 0.13) ** 2 for s in stds}
    best = charts.sweep_plot(tmp_path / 'sweep.png', results, metric='FID')
    assert best[''][0] == pytest.approx(0.13)
    best = charts.sweep_plot(tmp_path / 'two.png', {'XS': results, 'S': {s: v - 1 + s for s, v in results.items()}})
    assert best['XS'][0] == pytest.approx(0.13) and best['S'][0] == pytest.approx(0.12)
    assert _pixels_of(Image.open(tmp_path / 'two.png'), (200, 0, 0), tol=30).sum() > 50  # the red best markers
    best = charts.sweep_plot(tmp_path / 'max.png', results, lower_is_better=False)
    assert best[''][0] == pytest.approx(0.01)
    with pytest.raises(ValueError, match='no finite'):
        charts.sweep_plot(tmp_path / 'nan.png', {0.1: float('nan')})

def test_curves_plot_keeps_its_points_and_chooses_log_axes(tmp_path):
    curves = {'a': [(600, 40.0), (60, 300.0), (6000, 20.0)], 'b': [(120, 200.0), (1200, 30.0)]}
    best = charts.curves_plot(tmp_path / 'c.png', curves, xlabel='training wall time (minutes)', ylabel='FID',
                              names={'a': 'A (EDM2)'}, x_scale=60)
    assert best == {'a': (6000.0, 20.0), 'b': (1200.0, 30.0)}
    img = Image.open(tmp_path / 'c.png')
    # The PNG keeps the points as given (x unscaled), sorted by x, and the best of each curve.
    assert json.loads(img.text['points']) == {'a': [[60.0, 300.0], [600.0, 40.0], [6000.0, 20.0]],
                                              'b': [[120.0, 200.0], [1200.0, 30.0]]}
    assert json.loads(img.text['best']) == {'a': [6000.0, 20.0], 'b': [1200.0, 30.0]}
    assert _pixels_of(img, (200, 0, 0), tol=30).sum() > 50  # the red best markers
    # Log axes where the values span a decade: y = 1000/x is a straight falling line on log-log axes.
    assert charts.log_reads_better([2, 20]) and not charts.log_reads_better([2, 19])
    assert not charts.log_reads_better([-1, 100]) and not charts.log_reads_better([])
    x = np.arange(1, 1001)
    charts.curves_plot(tmp_path / 'log.png', {'': list(zip(x, 1000 / x))}, xlabel='x', ylabel='y')
    ys, xs = np.nonzero(_pixels_of(Image.open(tmp_path / 'log.png'), charts.COLORS[0]))
    assert np.corrcoef(xs, ys)[0, 1] > 0.95
    with pytest.raises(ValueError, match='no finite'):
        charts.curves_plot(tmp_path / 'nan.png', {'a': [(1, float('nan'))]}, xlabel='x', ylabel='y')

def test_read_sweep_results_formats(tmp_path):
    (tmp_path / 'a.json').write_text(json.dumps({'phema/phema-0002147-0.050.pkl': 3.5, '0.100': 3.1}))
    assert sweeps.read_sweep_results(str(tmp_path / 'a.json')) == {0.05: 3.5, 0.1: 3.1}
    (tmp_path / 'b.json').write_text(json.dumps({'0.05': {'fid': 3.5, 'fd_dinov2': 90}, '0.1': {'fid': 3.1,
                                                                                             'fd_dinov2': 80}}))
    assert sweeps.read_sweep_results(str(tmp_path / 'b.json'), metric='fd_dinov2') == {0.05: 90, 0.1: 80}
    with pytest.raises(ValueError, match='choose one'):
        sweeps.read_sweep_results(str(tmp_path / 'b.json'))
    (tmp_path / 'c.jsonl').write_text('{"net": "x/phema-0000032-0.070.pkl", "fid": 4.0}\n{"std": 0.08, "fid": 3.0}\n')
    assert sweeps.read_sweep_results(str(tmp_path / 'c.jsonl')) == {0.07: 4.0, 0.08: 3.0}
    (tmp_path / 'd.csv').write_text('std,fid\n0.050,3.41\n0.100,3.12\n')
    assert sweeps.read_sweep_results(str(tmp_path / 'd.csv'), metric='fid') == {0.05: 3.41, 0.1: 3.12}
    (tmp_path / 'e.json').write_text('{"not-a-std": 1}')
    with pytest.raises(ValueError, match='cannot tell the EMA length of "not-a-std"'):
        sweeps.read_sweep_results(str(tmp_path / 'e.json'))
    with pytest.raises(FileNotFoundError):
        sweeps.read_sweep_results(str(tmp_path / 'missing.json'))

def test_plot_sweep_cli(tmp_path):
    (tmp_path / 'xs.csv').write_text('std,fid\n0.05,3.4\n0.10,3.1\n0.15,3.3\n')
    (tmp_path / 's.csv').write_text('std,fid\n0.05,2.9\n0.10,2.8\n0.15,2.6\n')
    out = tmp_path / 'sweep.png'
    result = CliRunner().invoke(plot_sweep.cmdline, ['--results', str(tmp_path / 'xs.csv'), '--results',
                                                  str(tmp_path / 's.csv'), '--out', str(out), '--metric', 'fid'])
    assert result.exit_code == 0, result.output
    assert 'xs: best fid 3.1 at σ_rel 0.100' in result.output and 's: best fid 2.6 at σ_rel 0.150' in result.output
    assert Image.open(out).format == 'PNG'
    result = CliRunner().invoke(plot_sweep.cmdline, ['--results', str(tmp_path / 'nope.csv'), '--out', str(out)])
    assert result.exit_code == 1 and 'nope.csv: no such results file' in result.output

def test_training_curves_stack_loss_and_learning_rate(tmp_path):
    records = [{'Progress/kimg': k, 'Loss/loss': 1 / (1 + k), 'Loss/learning_rate': 0.01} for k in range(10)]
    records.append({'Progress/kimg': 10})  # no values: a gap, not an error
    charts.training_curves(tmp_path / 'curves.png', {'A': records, 'B': records[:5]})
    img = Image.open(tmp_path / 'curves.png')
    assert img.size == (800, 1000)  # two default-sized plots stacked
    top, bottom = np.asarray(img)[:500], np.asarray(img)[500:]
    for part in (top, bottom):
        assert _pixels_of(Image.fromarray(part), charts.COLORS[0]).sum() > 100
        assert _pixels_of(Image.fromarray(part), charts.COLORS[1]).sum() > 50
    assert sorted(os.listdir(tmp_path)) == ['curves.png']

def test_label_grid(tmp_path):
    rng = np.random.default_rng(0)
    grid = rng.integers(0, 256, size=(3 * 4, 5 * 4, 3), dtype=np.uint8)  # 3 classes x 5 seeds of 4x4
    PIL.Image.fromarray(grid).save(tmp_path / 'grid.png')
    grids.label_grid(str(tmp_path / 'grid.png'), str(tmp_path / 'labelled.png'), ['a', 'bb', 'Ankle boot'], 5, scale=3)
    out = np.array(PIL.Image.open(tmp_path / 'labelled.png'))
    assert out.shape[0] == 36 and out.shape[1] > 60
    assert (out[:, -60:] == grid.repeat(3, 0).repeat(3, 1)).all()
    assert (out[:, :out.shape[1] - 60] < 128).any()  # some text was drawn

def test_best_labels_of_close_points_do_not_cover_each_other(tmp_path, monkeypatch):
    """Two runs ending 1% apart in time and value (as A and G* of demo.py --compare can): each best point's value
    is written where the other's is not."""
    drawn = []
    text = charts.ImageDraw.ImageDraw.text
    def spy(draw, xy, label, *args, **kwargs):
        if label in ('64.62', '64.51'):
            w, h = charts._text_size(draw, label, kwargs['font'])  # pylint: disable=protected-access
            drawn.append((xy[0], xy[1], xy[0] + w, xy[1] + h))
        return text(draw, xy, label, *args, **kwargs)
    monkeypatch.setattr(charts.ImageDraw.ImageDraw, 'text', spy)
    curves = {'G*': [(174, 73.3), (536, 66.9), (879, 64.62)], 'A': [(188, 71.7), (535, 66.3), (895, 64.51)]}
    charts.curves_plot(tmp_path / 'c.png', curves, xlabel='training wall time (minutes)', ylabel='FID', x_scale=60)
    (a0, b0, a1, b1), (c0, d0, c1, d1) = drawn
    assert a1 <= c0 or c1 <= a0 or b1 <= d0 or d1 <= b0, drawn
