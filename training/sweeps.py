"""The results file of a post-hoc EMA sweep (EDM2 paper Sec. 3.2, Fig. 5): metric values per EMA length σ_rel.

`read_sweep_runs` reads every run of a file, `read_sweep_results` a file with one run; figures.charts.sweep_plot
draws what they return.
"""

import csv
import io
import json
import math
import os

from training.posthoc import parse_pickle_name

def _std_of(key):
    """σ_rel from a float-like key or from a reconstruction/snapshot file name such as phema-0002147-0.050.pkl."""
    info = parse_pickle_name(str(key))
    if info is not None:
        return info.std
    try:
        return float(key)
    except (TypeError, ValueError):
        raise ValueError(f'cannot tell the EMA length of "{key}"; use a std or a <prefix>-<kimg>-<std>.pkl name') \
            from None


def _pick_metric(record, metric, where):
    """The value of `metric` in a dict record; with metric None the record must hold exactly one number."""
    numbers = {k: v for k, v in record.items() if k not in ('std', 'net', 'path', 'pkl')
               and _is_number(v)}
    if metric is None:
        if len(numbers) != 1:
            raise ValueError(f'{where}: found metrics {sorted(numbers)}; choose one')
        return float(next(iter(numbers.values())))
    if metric not in record:
        raise ValueError(f'{where}: no metric "{metric}" (found {sorted(numbers)})')
    return _number(record[metric], where)


def _number(v, where):
    if not _is_number(v):
        raise ValueError(f'{where}: "{v}" is not a number')
    return float(v)


def _is_number(v):
    try:
        float(v)
        return not isinstance(v, bool)
    except (TypeError, ValueError):
        return False


def _add_point(points, std, value, where):
    """points[std] = value, unless another entry already gave that EMA length (e.g. "0.05" and "0.050", or two rows
    of one std): which of the two values is meant cannot be told."""
    if std in points:
        raise ValueError(f'{where}: σ_rel {std:g} appears twice in the results (values {points[std]:g} and '
                         f'{value:g}); keep one')
    points[std] = value


def read_sweep_runs(path, metric=None):
    """{run label: {std: value}} from a results file; every value and std must be a finite number.

    Accepted: JSON object {std or pkl name: value or {metric: value}}; JSON list or JSON-lines of records with a
    'std' (or 'net'/'path'/'pkl' file name) key and metric keys; CSV with a header holding 'std' (or 'net'/'path'/
    'pkl') and metric columns; sweep_phema.py's results.jsonl, whose records name their 'metric', 'value' and
    'run' (one curve per run; when a point was measured more than once, its last record counts). The other formats
    hold one run, labelled ''. `metric` chooses the metric when there are several.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: no such results file')
    with open(path, encoding='utf-8') as f:
        try:
            text = f.read()
        except UnicodeDecodeError:
            raise ValueError(f'{path}: not a text file (JSON, JSON lines or CSV)') from None
    if path.lower().endswith('.csv'):
        records = list(csv.DictReader(io.StringIO(text)))
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError:
            try:
                records = [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError as e:
                raise ValueError(f'{path}: neither JSON, JSON lines nor CSV ({e})') from None
    runs = {}
    if isinstance(records, dict):
        runs[''] = {}
        for key, value in records.items():
            _add_point(runs[''], _std_of(key), _pick_metric(value, metric, f'{path}: {key}') if isinstance(value, dict)
                       else _number(value, f'{path}: {key}'), f'{path}: {key}')
    else:
        if not isinstance(records, list):
            raise ValueError(f'{path}: expected a JSON object or a list of records')
        bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
        if bad is not None:
            raise ValueError(f'{path}: record {bad + 1} is not an object')
        long = records and all('metric' in r and 'value' in r for r in records)
        if long:  # sweep_phema.py: one record per (run, std, metric)
            found = sorted({str(r['metric']) for r in records})
            if metric is None and len(found) != 1:
                raise ValueError(f'{path}: found metrics {found}; choose one')
            if metric is not None and metric not in found:
                raise ValueError(f'{path}: no metric "{metric}" (found {found})')
            records = [r for r in records if r['metric'] == (metric or found[0])]
        for i, record in enumerate(records):
            where = f'{path}: record {i + 1}'
            key = next((record[k] for k in ('std', 'net', 'path', 'pkl') if k in record), None)
            if key is None:
                raise ValueError(f'{where} has no "std" (or "net") field')
            value = _number(record['value'], where) if long else _pick_metric(record, metric, where)
            points = runs.setdefault(str(record.get('run', '')) if long else '', {})
            if long:
                points[_std_of(key)] = value  # a point measured again: its last record counts
            else:
                _add_point(points, _std_of(key), value, where)
    if not any(runs.values()):
        raise ValueError(f'{path}: no results found')
    # NaN or inf would be drawn as a gap and could be reported as the best point: refuse them with the point named.
    for label, sweep in runs.items():
        run = f'run "{label}", ' if label else ''
        for std, value in sweep.items():
            if not math.isfinite(std):
                raise ValueError(f'{path}: {run}σ_rel {std:g} is not a finite number')
            if not math.isfinite(value):
                raise ValueError(f'{path}: {run}σ_rel {std:g}: {metric or "value"} is {value:g}, '
                                 f'not a finite number')
    return runs


def read_sweep_results(path, metric=None):
    """dict std → value of a results file that holds one run (formats as read_sweep_runs)."""
    runs = read_sweep_runs(path, metric=metric)
    if len(runs) != 1:
        raise ValueError(f'{path}: holds the runs {sorted(runs)}; read it with read_sweep_runs')
    return next(iter(runs.values()))
