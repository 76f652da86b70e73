"""Training statistics: cheap `report(name, value)` calls anywhere, summed across ranks by a `Collector`.

A report adds three moments of the value's finite elements, [count, sum, sum of squares], to a pending
accumulator of its name. Synchronising moves every pending accumulator into a running total (all-reduced over
ranks when there are several); a Collector remembers the totals it saw last time, so what it shows after
`update()` is exactly what was reported since its previous `update()`. Every rank must report the same names in
the same order, or the all-reduce would add up different statistics.
"""

import hashlib
import math
import re

import torch

import dnnlib

#----------------------------------------------------------------------------
# Module state. Moments are taken in float32 (the values' precision) and accumulated in float64.

_MOMENTS = 3
_TOTAL_DTYPE = torch.float64

_rank = 0               # This process's rank.
_sync_device = None     # Where ranks all-reduce (None: a single process, nothing to reduce).
_synced_once = False    # After the first synchronisation the rank and device may no longer change.
_pending = {}           # name -> {device: moments reported there since the last synchronisation}
_totals = {}            # name -> CPU moments of everything synchronised so far

def init_multiprocessing(rank, sync_device):
    """Declare this process's rank and the device used for all-reduce (None when there is a single process)."""
    global _rank, _sync_device
    if _synced_once and (rank, sync_device) != (_rank, _sync_device):
        raise RuntimeError('init_multiprocessing() must be called before the first Collector.update()')
    _rank, _sync_device = rank, sync_device

#----------------------------------------------------------------------------
# Reporting.

def _moments(value):
    """float64 [number of finite elements, their sum, sum of their squares] (sums in float32), None if empty."""
    x = torch.as_tensor(value)
    if x.numel() == 0:
        return None
    x = x.detach().flatten().to(torch.float32)
    finite = torch.isfinite(x)
    x = torch.where(finite, x, torch.zeros_like(x))
    return torch.stack([finite.sum().to(torch.float32), x.sum(), x.square().sum()]).to(_TOTAL_DTYPE)

def report(name, value):
    """Add the finite elements of `value` to statistic `name` and return `value` unchanged.

    An empty value only registers the name, which keeps the lists of names equal across ranks.
    """
    per_device = _pending.setdefault(name, {})
    moments = _moments(value)
    if moments is not None:
        if moments.device not in per_device:
            per_device[moments.device] = torch.zeros_like(moments)
        per_device[moments.device].add_(moments)
    return value

def report0(name, value):
    """report() on rank 0; the other ranks register the name with an empty value."""
    report(name, value if _rank == 0 else [])
    return value

#----------------------------------------------------------------------------
# Synchronisation.

def _names_digest(names):
    """A 63-bit fingerprint of the ordered name list, equal on every rank that reported the same names."""
    digest = hashlib.sha256('\n'.join(names).encode('utf-8')).digest()
    return int.from_bytes(digest[:8], 'little') >> 1

def _synchronise(names):
    """Fold the pending moments of `names` (all devices, all ranks) into the totals; return {name: total}."""
    global _synced_once
    if not names:
        return {}
    _synced_once = True
    distributed = _sync_device is not None

    if distributed:  # rank 0's fingerprint against ours: a mismatch would silently mix statistics
        mine = _names_digest(names)
        theirs = torch.tensor([mine], dtype=torch.int64, device=_sync_device)
        torch.distributed.broadcast(tensor=theirs, src=0)
        if int(theirs.item()) != mine:
            raise ValueError('Training statistics are inconsistent between ranks')

    table = torch.zeros([len(names), _MOMENTS], dtype=_TOTAL_DTYPE, device=_sync_device if distributed else 'cpu')
    for row, name in zip(table, names):
        for accumulated in _pending[name].values():
            row.add_(accumulated.to(table.device))
            accumulated.zero_()
    if distributed:
        torch.distributed.all_reduce(table)

    result = {}
    for row, name in zip(table.cpu(), names):
        if name not in _totals:
            _totals[name] = torch.zeros([_MOMENTS], dtype=_TOTAL_DTYPE)
        result[name] = _totals[name].add_(row)
    return result

#----------------------------------------------------------------------------

class Collector:
    """The statistics whose names fully match `regex`, as reported between the last two update() calls.

    Read them with num(), mean(), std(), as_dict() or collector[name] (the mean). With keep_previous=True, a name
    that received nothing new keeps the values of the interval where it last did.
    """

    def __init__(self, regex='.*', keep_previous=False):
        self._regex = re.compile(regex)
        self._keep_previous = keep_previous
        self._seen = {}       # name -> totals at the previous update()
        self._interval = {}   # name -> moments of the last interval, in the order names are shown
        self.update()         # what was reported before construction does not count
        self._interval.clear()

    def names(self):
        """All matching statistic names, in the order they were first reported."""
        return [name for name in _pending if self._regex.fullmatch(name)]

    def update(self):
        """Make the values reported since the previous update() the current ones."""
        if not self._keep_previous:
            self._interval.clear()
        for name, total in _synchronise(self.names()).items():
            previous = self._seen.get(name)
            delta = total - (previous if previous is not None else torch.zeros_like(total))
            self._seen[name] = total.clone()
            if name not in self._interval or float(delta[0]) != 0:
                self._interval[name] = delta

    def _counts(self, name):
        """(count, sum, sum of squares) of the last interval; an unseen name enters as empty."""
        if not self._regex.fullmatch(name):
            raise KeyError(f'Statistic {name!r} does not match this collector\'s regex {self._regex.pattern!r}')
        if name not in self._interval:
            self._interval[name] = torch.zeros([_MOMENTS], dtype=_TOTAL_DTYPE)
        n, total, total_sq = self._interval[name].tolist()
        return int(n), total, total_sq

    def num(self, name):
        """Number of finite scalars reported for `name` in the last interval."""
        return self._counts(name)[0]

    def mean(self, name):
        """Mean of the finite scalars reported for `name` in the last interval (NaN when none)."""
        n, total, _ = self._counts(name)
        return total / n if n else float('nan')

    def std(self, name):
        """Population standard deviation, sqrt(E[x^2] - E[x]^2), of the last interval (0 for one scalar, NaN for none)."""
        n, total, total_sq = self._counts(name)
        if n == 0 or not math.isfinite(total):
            return float('nan')
        if n == 1:
            return 0.0
        mean = total / n
        return math.sqrt(max(total_sq / n - mean * mean, 0))

    def as_dict(self):
        """EasyDict name -> EasyDict(num, mean, std) for every statistic of the last interval."""
        return dnnlib.EasyDict({name: dnnlib.EasyDict(num=self.num(name), mean=self.mean(name), std=self.std(name))
                                for name in list(self._interval)})

    def __getitem__(self, name):
        return self.mean(name)

#----------------------------------------------------------------------------

default_collector = Collector()
