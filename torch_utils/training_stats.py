"""Training statistics: cheap `report(name, value)` calls anywhere, summed across ranks by a `Collector` (spec §7.4).

Every report adds the moments [count, sum, sum of squares] of the value's finite elements to a per-name
accumulator. `Collector.update()` all-reduces those accumulators over ranks and exposes the mean/std of what
was reported since its previous update. All ranks must report the same names in the same order.
"""

import re

import numpy as np
import torch

import dnnlib

#----------------------------------------------------------------------------

_num_moments = 3                # [number of finite elements, sum, sum of squares]
_reduce_dtype = torch.float32   # Values are converted to this before the moments are taken.
_counter_dtype = torch.float64  # Moments are accumulated in double precision.
_rank = 0                       # This process's rank.
_sync_device = None             # Device used for the cross-rank all-reduce (None: single process).
_sync_called = False            # Has a Collector synchronised yet? (init_multiprocessing must come first.)
_counters = dict()              # name -> device -> accumulated moments.
_cumulative = dict()            # name -> moments already collected (on the CPU).

#----------------------------------------------------------------------------

def init_multiprocessing(rank, sync_device):
    """Declare this process's rank and the device used for all-reduce (None when there is a single process)."""
    global _rank, _sync_device
    if _sync_called and (rank, sync_device) != (_rank, _sync_device):
        raise RuntimeError('init_multiprocessing() must be called before the first Collector.update()')
    _rank = rank
    _sync_device = sync_device

#----------------------------------------------------------------------------

def report(name, value):
    """Add the finite elements of `value` to statistic `name`; return `value` unchanged."""
    if name not in _counters:
        _counters[name] = dict()

    elems = torch.as_tensor(value)
    if elems.numel() == 0:
        return value   # Only registers the name (keeps name lists equal across ranks).

    elems = elems.detach().flatten().to(_reduce_dtype)
    finite = torch.isfinite(elems)
    elems = torch.where(finite, elems, torch.zeros_like(elems))
    moments = torch.stack([
        finite.sum().to(_reduce_dtype),
        elems.sum(),
        elems.square().sum(),
    ]).to(_counter_dtype)
    assert moments.ndim == 1 and moments.shape[0] == _num_moments

    device = moments.device
    if device not in _counters[name]:
        _counters[name][device] = torch.zeros_like(moments)
    _counters[name][device].add_(moments)
    return value

def report0(name, value):
    """report() on rank 0 only; other ranks register the name with an empty value so name lists stay equal."""
    report(name, value if _rank == 0 else [])
    return value

#----------------------------------------------------------------------------

class Collector:
    """Periodically gathers the statistics whose names fully match `regex`.

    update() makes the values reported since the previous update() (or since construction) available through
    num(), mean(), std(), as_dict() and collector[name]. With keep_previous=True a name without new data keeps
    its previous values instead of becoming empty.
    """

    def __init__(self, regex='.*', keep_previous=False):
        self._regex = re.compile(regex)
        self._keep_previous = keep_previous
        self._cumulative = dict()
        self._moments = dict()
        self.update()
        self._moments.clear()

    def names(self):
        """All matching statistic names, in the order they were first reported."""
        return [name for name in _counters if self._regex.fullmatch(name)]

    def update(self):
        if not self._keep_previous:
            self._moments.clear()
        for name, cumulative in _sync(self.names()):
            if name not in self._cumulative:
                self._cumulative[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
            delta = cumulative - self._cumulative[name]
            self._cumulative[name].copy_(cumulative)
            if float(delta[0]) != 0 or name not in self._moments:
                self._moments[name] = delta

    def _get_delta(self, name):
        assert self._regex.fullmatch(name)
        if name not in self._moments:
            self._moments[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
        return self._moments[name]

    def num(self, name):
        """Number of finite scalars reported for `name` in the last interval."""
        return int(self._get_delta(name)[0])

    def mean(self, name):
        """Mean of the finite scalars reported for `name` in the last interval (NaN when none)."""
        delta = self._get_delta(name)
        if int(delta[0]) == 0:
            return float('nan')
        return float(delta[1] / delta[0])

    def std(self, name):
        """Population standard deviation of the last interval (0 for one scalar, NaN when none)."""
        delta = self._get_delta(name)
        if int(delta[0]) == 0 or not np.isfinite(float(delta[1])):
            return float('nan')
        if int(delta[0]) == 1:
            return float(0)
        mean = float(delta[1] / delta[0])
        raw_var = float(delta[2] / delta[0])
        return float(np.sqrt(max(raw_var - np.square(mean), 0)))

    def as_dict(self):
        """EasyDict name -> EasyDict(num, mean, std) for every statistic seen so far."""
        stats = dnnlib.EasyDict()
        for name in self._moments:
            stats[name] = dnnlib.EasyDict(num=self.num(name), mean=self.mean(name), std=self.std(name))
        return stats

    def __getitem__(self, name):
        return self.mean(name)

#----------------------------------------------------------------------------

def _sync(names):
    """Return [(name, cumulative moments on CPU)] summed over devices and, when distributed, over ranks."""
    global _sync_called
    if len(names) == 0:
        return []
    _sync_called = True

    # All ranks must agree on the names, or the all-reduce below would silently mix statistics.
    if _sync_device is not None:
        value = hash(tuple(tuple(ord(c) for c in name) for name in names))
        other = torch.tensor([value], dtype=torch.int64, device=_sync_device)
        torch.distributed.broadcast(tensor=other, src=0)
        if int(other.cpu()) != value:
            raise ValueError('Training statistics are inconsistent between ranks')

    # Sum the new moments of every device into one vector per name.
    deltas = []
    device = _sync_device if _sync_device is not None else torch.device('cpu')
    for name in names:
        delta = torch.zeros([_num_moments], dtype=_counter_dtype, device=device)
        for counter in _counters[name].values():
            delta.add_(counter.to(device))
            counter.copy_(torch.zeros_like(counter))
        deltas.append(delta)
    deltas = torch.stack(deltas)

    if _sync_device is not None:
        torch.distributed.all_reduce(deltas)

    deltas = deltas.cpu()
    for idx, name in enumerate(names):
        if name not in _cumulative:
            _cumulative[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
        _cumulative[name].add_(deltas[idx])
    return [(name, _cumulative[name]) for name in names]

#----------------------------------------------------------------------------

default_collector = Collector()

#----------------------------------------------------------------------------
