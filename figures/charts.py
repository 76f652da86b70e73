"""Small line plots drawn with Pillow only (no plotting stack): training curves and post-hoc EMA sweeps.

`line_plot` is the general tool; `curves_plot` draws curves with their best points marked (a metric along training
runs, against the guidance weight, ...); `sweep_plot` draws a metric against the EMA length σ_rel with the best value
marked, like Figure 5 of the EDM2 paper; `training_curves` stacks the loss and learning-rate curves of training runs.
(metrics/sweeps.py reads the results file of a sweep.)
"""

import json
import math
import os
import tempfile

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

import dnnlib

# Distinguishable line colours (RGB), used in order.
COLORS = [(31, 100, 180), (230, 110, 20), (40, 150, 60), (200, 40, 40), (130, 90, 190), (120, 80, 60),
          (220, 100, 170), (110, 110, 110), (170, 170, 30), (20, 170, 190)]

_SS = 2  # Draw at twice the size and downsample: smooth lines without an anti-aliasing renderer.

#----------------------------------------------------------------------------
# Axis ticks.

def _nice_step(span, target=6):
    """A step of the form {1, 2, 5}·10^k giving about `target` intervals over `span`."""
    raw = span / target
    base = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if m * base >= raw * 0.999:
            return m * base
    return 10 * base

def _linear_ticks(lo, hi):
    step = _nice_step(hi - lo)
    first = math.ceil(lo / step - 1e-9)
    ticks = [k * step for k in range(first, math.floor(hi / step + 1e-9) + 1)]
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    big = max(abs(lo), abs(hi)) >= 1e6 or step < 1e-4
    labels = [f'{t:.3g}' if big else f'{t:.{decimals}f}' for t in ticks]
    return ticks, labels

def _log_ticks(lo, hi):
    """Ticks in log10 space: whole decades, plus 2 and 5 when the range spans less than about two decades."""
    mults = (1,) if hi - lo > 2.2 else (1, 2, 5)
    ticks = []
    for k in range(math.floor(lo) - 1, math.ceil(hi) + 1):
        for m in mults:
            t = k + math.log10(m)
            if lo - 1e-9 <= t <= hi + 1e-9:
                ticks.append(t)
    if len(ticks) < 2:  # less than one decade: fall back to linear ticks on the values
        values, labels = _linear_ticks(10 ** lo, 10 ** hi)
        return [math.log10(v) for v in values if v > 0], [l for v, l in zip(values, labels) if v > 0]
    return ticks, [f'{10 ** t:g}' for t in ticks]

def _axis_range(values, log):
    """(lo, hi) in plotting space covering `values` with a small margin."""
    if len(values) == 0:
        return (-1.0, 1.0) if log else (0.0, 1.0)
    lo, hi = float(np.min(values)), float(np.max(values))
    if hi - lo < 1e-12 * max(1.0, abs(lo)):
        pad = 0.5 if log else max(abs(lo) * 0.1, 0.5)
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.04
    return lo - pad, hi + pad

#----------------------------------------------------------------------------
# Drawing.

def _font(size):
    return ImageFont.load_default(size=size * _SS)

def _text_size(draw, text, font):
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0], box[3] - box[1]

def _to_plot_space(xs, ys, logx, logy):
    """Float arrays in plotting space; points that cannot be drawn (non-finite, ≤0 on a log axis) become NaN."""
    xs = np.asarray(xs, dtype=np.float64).ravel()
    ys = np.asarray(ys, dtype=np.float64).ravel()
    if xs.shape != ys.shape:
        raise ValueError(f'series has {xs.size} x values but {ys.size} y values')
    with np.errstate(divide='ignore', invalid='ignore'):
        if logx:
            xs = np.where(xs > 0, np.log10(np.where(xs > 0, xs, 1)), np.nan)
        if logy:
            ys = np.where(ys > 0, np.log10(np.where(ys > 0, ys, 1)), np.nan)
    bad = ~(np.isfinite(xs) & np.isfinite(ys))
    xs[bad] = np.nan
    ys[bad] = np.nan
    return xs, ys

def line_plot(path, series, title='', xlabel='', ylabel='', logx=False, logy=False, marks=(), size=(800, 500),
              info=None):
    """Write a PNG line plot to `path` (atomically).

    series: list of (label, xs, ys); points that cannot be drawn (NaN, inf, ≤0 on a log axis) break the line.
    marks:  list of (label, x, y) points to highlight, e.g. the best value of a sweep.
    info:   optional {key: text} stored as PNG text chunks (PIL's Image.open(path).text reads them back).
    """
    prepared = [(str(label), *_to_plot_space(xs, ys, logx, logy)) for label, xs, ys in series]
    mark_pts = [(str(label), *_to_plot_space([x], [y], logx, logy)) for label, x, y in marks]
    all_x = np.concatenate([xs for _, xs, _ in prepared + mark_pts] + [np.zeros(0)])
    all_y = np.concatenate([ys for _, _, ys in prepared + mark_pts] + [np.zeros(0)])
    x_lo, x_hi = _axis_range(all_x[np.isfinite(all_x)], logx)
    y_lo, y_hi = _axis_range(all_y[np.isfinite(all_y)], logy)
    x_ticks, x_labels = (_log_ticks if logx else _linear_ticks)(x_lo, x_hi)
    y_ticks, y_labels = (_log_ticks if logy else _linear_ticks)(y_lo, y_hi)

    W, H = size[0] * _SS, size[1] * _SS
    img = Image.new('RGB', (W, H), 'white')
    draw = ImageDraw.Draw(img)
    font, title_font = _font(13), _font(16)
    black, grey = (0, 0, 0), (225, 225, 225)

    # Plot area: leave room for the title, the tick labels and the axis labels.
    tick_w = max([_text_size(draw, l, font)[0] for l in y_labels] + [0])
    line_h = _text_size(draw, 'Hg0', font)[1]
    left = tick_w + 22 * _SS + (line_h + 10 * _SS if ylabel else 0)
    top = (_text_size(draw, title, title_font)[1] + 22 * _SS) if title else 16 * _SS
    right = W - 24 * _SS
    bottom = H - (line_h + 18 * _SS) - (line_h + 10 * _SS if xlabel else 0)

    def px(x):
        return left + (x - x_lo) / (x_hi - x_lo) * (right - left)

    def py(y):
        return bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)

    # Grid, ticks and tick labels.
    for t, label in zip(x_ticks, x_labels):
        x = px(t)
        draw.line([(x, top), (x, bottom)], fill=grey, width=_SS)
        draw.line([(x, bottom), (x, bottom + 5 * _SS)], fill=black, width=_SS)
        w, _ = _text_size(draw, label, font)
        draw.text((x - w / 2, bottom + 8 * _SS), label, fill=black, font=font)
    for t, label in zip(y_ticks, y_labels):
        y = py(t)
        draw.line([(left, y), (right, y)], fill=grey, width=_SS)
        draw.line([(left - 5 * _SS, y), (left, y)], fill=black, width=_SS)
        w, h = _text_size(draw, label, font)
        draw.text((left - 8 * _SS - w, y - h / 2 - 2 * _SS), label, fill=black, font=font)
    draw.rectangle([left, top, right, bottom], outline=black, width=_SS)

    # Title and axis labels; the y label is drawn on its own image and rotated.
    if title:
        w, _ = _text_size(draw, title, title_font)
        draw.text(((left + right) / 2 - w / 2, 8 * _SS), title, fill=black, font=title_font)
    if xlabel:
        w, _ = _text_size(draw, xlabel, font)
        draw.text(((left + right) / 2 - w / 2, H - line_h - 12 * _SS), xlabel, fill=black, font=font)
    if ylabel:
        w, h = _text_size(draw, ylabel, font)
        label_img = Image.new('RGB', (w + 4 * _SS, h + 8 * _SS), 'white')
        ImageDraw.Draw(label_img).text((2 * _SS, 0), ylabel, fill=black, font=font)
        label_img = label_img.rotate(90, expand=True)
        img.paste(label_img, (6 * _SS, int((top + bottom) / 2 - label_img.height / 2)))

    # Series: polylines broken at undrawable points; dots when there are few points.
    for k, (label, xs, ys) in enumerate(prepared):
        color = COLORS[k % len(COLORS)]
        run = []
        for x, y in list(zip(xs, ys)) + [(np.nan, np.nan)]:
            if np.isfinite(x):
                run.append((px(x), py(y)))
                continue
            if len(run) >= 2:
                draw.line(run, fill=color, width=2 * _SS, joint='curve')
            if np.sum(np.isfinite(xs)) <= 60:
                for cx, cy in run:
                    draw.ellipse([cx - 3 * _SS, cy - 3 * _SS, cx + 3 * _SS, cy + 3 * _SS], fill=color)
            run = []

    # Pixel positions of all data points, to place labels where they hide the least data.
    pts = np.array([(px(x), py(y)) for _, xs, ys in prepared for x, y in zip(xs, ys) if np.isfinite(x)]
                   ).reshape(-1, 2)

    placed = []  # boxes of the labels already drawn: a new label must not cover one

    def least_crowded(boxes):
        def count(box):
            x0, y0, x1, y1 = box
            inside = (pts[:, 0] >= x0) & (pts[:, 0] <= x1) & (pts[:, 1] >= y0) & (pts[:, 1] <= y1)
            covered = sum(x0 < b[2] and b[0] < x1 and y0 < b[3] and b[1] < y1 for b in placed)
            return int(inside.sum()) + len(pts) * covered
        return min(boxes, key=count)

    # Highlighted points.
    for label, xs, ys in mark_pts:
        if not np.isfinite(xs[0]):
            continue
        cx, cy = px(xs[0]), py(ys[0])
        r = 7 * _SS
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(200, 0, 0), width=2 * _SS)
        w, h = _text_size(draw, label, font)
        g = r + 4 * _SS
        step = h + 4 * _SS  # further rows below and above, for when nearby labels hold the nearest ones
        candidates = [(cx + dx, cy + dy) for k in range(4) for dy in (g + k * step, -g - (k + 1) * step)
                      for dx in (-w / 2, g, -g - w)]
        candidates = [(x, y) for x, y in candidates if x >= left and x + w <= right and y >= top and
                      y + h + 4 * _SS <= bottom] or candidates
        box = least_crowded([(x, y, x + w, y + h + 4 * _SS) for x, y in candidates])
        placed.append(box)
        draw.text(box[:2], label, fill=(200, 0, 0), font=font)

    # Legend, in the corner of the plot area that hides the fewest data points.
    labels = [(label, COLORS[k % len(COLORS)]) for k, (label, _, _) in enumerate(prepared) if label]
    if labels:
        sample = 24 * _SS
        w = max(_text_size(draw, l, font)[0] for l, _ in labels) + sample + 20 * _SS
        row = line_h + 8 * _SS
        h = row * len(labels) + 6 * _SS
        m = 8 * _SS
        x0, y0 = least_crowded([(x, y, x + w, y + h) for y in (top + m, bottom - m - h)
                                for x in (right - m - w, left + m)])[:2]
        draw.rectangle([x0, y0, x0 + w, y0 + h], fill='white', outline=(150, 150, 150), width=_SS)
        for i, (label, color) in enumerate(labels):
            y = y0 + 6 * _SS + i * row + line_h / 2 + 2 * _SS
            draw.line([(x0 + 6 * _SS, y), (x0 + 6 * _SS + sample, y)], fill=color, width=2 * _SS)
            draw.text((x0 + 12 * _SS + sample, y - line_h / 2 - 3 * _SS), label, fill=black, font=font)

    img = img.resize(size, Image.LANCZOS)
    png_info = PngInfo()
    for key, text in (info or {}).items():
        png_info.add_text(key, text)
    with dnnlib.util.atomic_write(path, 'wb') as f:
        img.save(f, format='png', pnginfo=png_info)

#----------------------------------------------------------------------------
# Curves with their best point marked: post-hoc EMA sweeps (EDM2 paper Fig. 5: metric versus EMA length σ_rel),
# a metric along training (against images, wall time or compute), a metric against the guidance weight.

def log_reads_better(values):
    """A log axis for positive values that span at least a factor of 10 (a decade); a linear one otherwise."""
    values = [float(v) for v in values if math.isfinite(float(v))]
    return bool(values) and min(values) > 0 and max(values) >= 10 * min(values)

def curves_plot(path, curves, xlabel, ylabel, title='', names=None, x_scale=1.0, logx=None, logy=None,
                lower_is_better=True, mark_text=None, info_key='points'):
    """Draw one line per curve and mark the best point of each; write the PNG atomically.

    curves:    {key: [(x, y), ...]} (any order; drawn sorted by x).
    names:     {key: legend text} (default: the key itself).
    x_scale:   x is drawn as x / x_scale (e.g. 60 to draw seconds as minutes); the PNG's text chunks keep x as given.
    logx/logy: True/False, or None for log_reads_better().
    mark_text: f(key, x, y) -> the text beside the best point (default: the value).
    Returns {key: (x, y)} of the best points. The PNG carries what it shows as JSON text chunks: `info_key` =
    {key: [[x, y], ...]} and 'best' = {key: [x, y]}.
    """
    names = names or {}
    series, marks, best, points = [], [], {}, {}
    for key, pts in curves.items():
        pts = sorted((float(x), float(y)) for x, y in pts)
        finite = [(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
        if not finite:
            raise ValueError(f'{key or "the curve"}: no finite {ylabel} value')
        x_best, y_best = (min if lower_is_better else max)(finite, key=lambda p: p[1])
        best[key] = (x_best, y_best)
        points[key] = [list(p) for p in pts]
        series.append((names.get(key, key), [x / x_scale for x, _ in pts], [y for _, y in pts]))
        text = mark_text(key, x_best, y_best) if mark_text is not None else f'{y_best:.4g}'
        marks.append((text, x_best / x_scale, y_best))
    all_x = [x for _, xs, _ in series for x in xs]
    all_y = [y for _, _, ys in series for y in ys]
    info = {info_key: json.dumps(points), 'best': json.dumps({key: list(b) for key, b in best.items()})}
    line_plot(path, series, title=title, xlabel=xlabel, ylabel=ylabel, marks=marks, info=info,
              logx=log_reads_better(all_x) if logx is None else logx,
              logy=log_reads_better(all_y) if logy is None else logy)
    return best

def sweep_plot(path, results, metric='FID', title='', lower_is_better=True, logy=False):
    """Plot a metric against σ_rel and mark the best value.

    results: dict std → value for one sweep, or dict label → (dict std → value) for several sweeps (e.g. one per
    network size). Returns {label: (best_std, best_value)}. The PNG carries what it shows as JSON text chunks:
    'sweep' = {label: [[std, value], ...]} and 'best' = {label: [std, value]}.
    """
    if results and all(isinstance(v, dict) for v in results.values()):
        sweeps = results
    else:
        sweeps = {'': results}
    return curves_plot(path, {label: list(sweep.items()) for label, sweep in sweeps.items()},
                       xlabel='EMA length sigma_rel', ylabel=metric, title=title, logx=False, logy=logy,
                       lower_is_better=lower_is_better, info_key='sweep',
                       mark_text=lambda label, s, v: f'{label + ": " if label else ""}{v:.4g} at {s:.3f}')

#----------------------------------------------------------------------------
# Training curves. Loss and learning rate have different scales: two line plots (one series per run) stacked into
# one PNG.

def training_curves(path, runs):
    """runs: dict label -> list of stats.jsonl records (dicts with 'Progress/kimg'). Writes the loss and
    learning-rate curves of every run to `path` (atomically); a record without a value leaves a gap."""
    loss, lr = [], []
    for label, records in runs.items():
        kimg = [float(r['Progress/kimg']) for r in records]
        loss.append((label, kimg, [float(r.get('Loss/loss', np.nan)) for r in records]))
        lr.append((label, kimg, [float(r.get('Loss/learning_rate', np.nan)) for r in records]))
    with tempfile.TemporaryDirectory() as tmp:
        parts = [os.path.join(tmp, 'loss.png'), os.path.join(tmp, 'lr.png')]
        line_plot(parts[0], loss, title='Training loss (mean over each status interval)',
                  xlabel='training images (thousands)', ylabel='loss')
        line_plot(parts[1], lr, title='Learning rate', xlabel='training images (thousands)', ylabel='learning rate')
        images = [Image.open(p).convert('RGB') for p in parts]
    out = Image.new('RGB', (max(i.width for i in images), sum(i.height for i in images)), 'white')
    for i, image in enumerate(images):
        out.paste(image, (0, sum(j.height for j in images[:i])))
    with dnnlib.util.atomic_write(path, 'wb') as f:
        out.save(f, format='png')
