"""torch_utils: seeds and data order, training statistics, checkpoints, persistence, small helpers."""

import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import persistence
from torch_utils import training_stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#----------------------------------------------------------------------------
# Seeds: Python's tuple hash (values computed with CPython 3.11, 64-bit).

@pytest.mark.parametrize('args, seed', [
    ((0, 0), 397586535), ((0, 1), 16979904), ((1, 0), 1403689752), ((0, 0, 0), 360982090),
    ((0, 0, 2048), 386374691), ((0, 1, 2048), 50315110), ((0, 0, 4096), 411767292),
])
def test_seed_reference_values(args, seed):
    assert misc.seed_from_tuple(*args) == seed

def test_tuple_hash_matches_cpython():
    rnd = random.Random(1)
    for _ in range(2000):
        items = tuple(rnd.choice([rnd.randrange(0, 1 << 20), rnd.randrange(-(1 << 70), 1 << 70), -1]) for _ in range(rnd.randrange(0, 5)))
        assert misc.tuple_hash(items) == hash(items)

def test_set_random_seed_seeds_torch_and_numpy():
    assert misc.set_random_seed(0, 1, 2048) == 50315110
    a = (torch.randn(3), np.random.rand(3))
    misc.set_random_seed(0, 1, 2048)
    b = (torch.randn(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    torch.manual_seed(50315110)
    assert torch.equal(torch.randn(3), a[0])

def test_format_time_reference_values():
    assert dnnlib.util.format_time(59.4) == '59s'
    assert dnnlib.util.format_time(132) == '2m 12s'
    assert dnnlib.util.format_time(3600 + 61) == '1h 01m 01s'
    assert dnnlib.util.format_time(2 * 86400 + 3 * 3600 + 4 * 60 + 5) == '2d 03h 04m'

def test_format_time_brief_reference_values():
    brief = dnnlib.util.format_time_brief
    assert [brief(v) for v in (0, 59.6, 60, 132, 3600 + 61, 86399, 86400, 2 * 86400 + 3 * 3600 + 4 * 60)] == \
        ['0s', '1m 00s', '1m 00s', '2m 12s', '1h 01m', '23h 59m', '1d 00h', '2d 03h']
    assert dnnlib.util.format_time(86399) == '23h 59m 59s' and dnnlib.util.format_time(2.5) == '2s'  # half to even

def test_cache_dir_search_order(monkeypatch, tmp_path):
    for var in ('DNNLIB_CACHE_DIR', 'HOME', 'USERPROFILE'):
        monkeypatch.delenv(var, raising=False)
    # Without HOME: the password database's home, never the shared temporary folder (tests/test_trust.py goes on).
    home = os.path.expanduser('~')
    assert dnnlib.util.make_cache_dir_path('downloads') == os.path.join(home, '.cache', 'dnnlib', 'downloads')
    monkeypatch.setenv('USERPROFILE', '/u')
    assert dnnlib.make_cache_dir_path('x') == os.path.join('/u', '.cache', 'dnnlib', 'x')
    monkeypatch.setenv('HOME', '/h')
    assert dnnlib.make_cache_dir_path('x') == os.path.join('/h', '.cache', 'dnnlib', 'x')
    monkeypatch.setenv('DNNLIB_CACHE_DIR', '/d')
    assert dnnlib.make_cache_dir_path('x', 'y') == os.path.join('/d', 'x', 'y')
    monkeypatch.setattr(dnnlib.util, '_cache_dir', None)
    dnnlib.util.set_cache_dir(str(tmp_path))
    assert dnnlib.make_cache_dir_path('x') == os.path.join(str(tmp_path), 'x')

def test_logger_tees_stdout_and_stderr_into_the_file(tmp_path, capsys):
    path = tmp_path / 'log.txt'
    with dnnlib.util.Logger(file_name=str(path), file_mode='a') as logger:
        assert sys.stdout is logger and sys.stderr is logger
        print('hello')
        print('oops', file=sys.stderr)
        sys.stdout.write(b'bytes\n')
    assert sys.stdout is not logger and sys.stderr is not logger
    assert path.read_text() == 'hello\noops\nbytes\n'
    assert capsys.readouterr().out == 'hello\noops\nbytes\n'  # both streams go to the original stdout

#----------------------------------------------------------------------------
# InfiniteSampler.

def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]

def test_infinite_sampler_order_follows_epoch_hash():
    data = list(range(10))
    stream = _take(misc.InfiniteSampler(data, seed=3), 25)
    for epoch in range(3):
        order = np.arange(10)
        np.random.RandomState(hash((3, epoch)) % (1 << 31)).shuffle(order)
        assert stream[epoch * 10: epoch * 10 + 10] == list(order[:len(stream[epoch * 10: epoch * 10 + 10])])
    assert sorted(stream[:10]) == data and sorted(stream[10:20]) == data   # each epoch is a permutation
    assert stream[:10] != stream[10:20]                                    # and a different one
    assert _take(misc.InfiniteSampler(data, shuffle=False), 12) == data + [0, 1]

def test_infinite_sampler_resumes_and_splits_across_ranks():
    data = list(range(7))
    stream = _take(misc.InfiniteSampler(data, seed=5), 40)
    assert _take(misc.InfiniteSampler(data, seed=5, start_idx=13), 27) == stream[13:]
    ranks = [_take(misc.InfiniteSampler(data, rank=r, num_replicas=2, seed=5, start_idx=4), 18) for r in range(2)]
    interleaved = [x for pair in zip(*ranks) for x in pair]
    assert interleaved == stream[4:40]

def test_infinite_sampler_in_a_dataloader():
    loader = torch.utils.data.DataLoader(list(range(5)), sampler=misc.InfiniteSampler(list(range(5)), seed=0), batch_size=4)
    batch = next(iter(loader))
    assert batch.tolist() == _take(misc.InfiniteSampler(list(range(5)), seed=0), 4)

#----------------------------------------------------------------------------
# Small tensor/module helpers.

def test_constant_is_cached_and_const_like_follows_ref():
    a = misc.constant([1, 2], shape=[3, 2], dtype=torch.float32)
    assert a.shape == (3, 2) and a[2].tolist() == [1.0, 2.0]
    assert misc.constant([1, 2], shape=[3, 2], dtype=torch.float32) is a
    b = misc.const_like(torch.zeros(1, dtype=torch.float64), 0.5)
    assert b.dtype == torch.float64 and b.item() == 0.5

def test_tile_images():
    x = torch.arange(6 * 1 * 2 * 2).reshape(6, 1, 2, 2)
    grid = misc.tile_images(x, w=3, h=2)
    assert grid.shape == (1, 4, 6)
    assert torch.equal(grid[:, 0:2, 4:6], x[2])     # row 0, column 2
    assert torch.equal(grid[:, 2:4, 0:2], x[3])     # row 1, column 0

def test_assert_shape():
    misc.assert_shape(torch.zeros(2, 3), [None, 3])
    with pytest.raises(AssertionError, match='dimension 1'):
        misc.assert_shape(torch.zeros(2, 3), [2, 4])

def test_copy_params_and_buffers_and_summary(capsys):
    src = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    dst = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    torch.nn.init.constant_(src[0].weight, 0.25)
    misc.copy_params_and_buffers(src, dst, require_all=True)
    assert torch.equal(dst[0].weight, src[0].weight)
    assert len(misc.params_and_buffers(src)) == 4 + 3
    misc.print_module_summary(src.eval(), [torch.zeros(2, 3)])
    out = capsys.readouterr().out
    total = [line for line in out.splitlines() if line.startswith('Total')][0].split()
    assert total[1:3] == [str(3 * 4 + 4 + 4 + 4), str(4 + 4 + 1)]   # parameters, buffers
    assert '[2, 4]' in out and 'float32' in out

def test_copy_params_and_buffers_require_all_checks_before_copying():
    src, dst = torch.nn.Linear(3, 4, bias=False), torch.nn.Linear(3, 4)
    before = dst.weight.detach().clone()
    with pytest.raises(KeyError, match="'bias'"):
        misc.copy_params_and_buffers(src, dst, require_all=True)
    assert torch.equal(dst.weight, before)  # nothing copied
    misc.copy_params_and_buffers(src, dst)
    assert torch.equal(dst.weight, src.weight)

class _Twice(torch.nn.Module):
    """Blocks in a ModuleDict (never called itself) and a tuple output: call depth differs from name depth."""
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleDict(dict(a=torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU()),
                                               b=torch.nn.Linear(3, 2, bias=False)))
        self.register_buffer('scale', torch.ones(5))
    def forward(self, x):
        y = self.blocks['a'](x)
        return y, self.blocks['b'](y).half()

def test_print_module_summary_rows_follow_call_depth(capsys):
    misc.print_module_summary(_Twice(), [torch.zeros(4, 2)], max_nesting=1)
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert rows[0] == ['_Twice', 'Parameters', 'Buffers', 'Output', 'shape', 'Datatype']
    # Depth 1 (blocks.a, blocks.b) listed; blocks.a's Linear (depth 2) is counted in blocks.a.
    assert rows[2:-2] == [['blocks.a', '9', '-', '[4,', '3]', 'float32'],
                          ['blocks.b', '6', '-', '[4,', '2]', 'float32'],
                          ['<top-level>:0', '-', '5', '[4,', '3]', 'float32'],
                          ['<top-level>:1', '-', '-', '[4,', '2]', 'float16']]
    assert rows[-1] == ['Total', '15', '5', '-', '-']
    misc.print_module_summary(_Twice(), [torch.zeros(4, 2)], max_nesting=2)
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    # blocks.a adds nothing now (its ReLU produced its output, its Linear holds the parameters): skipped.
    assert names[2:-2] == ['blocks.a.0', 'blocks.a.1', 'blocks.b', '<top-level>:0', '<top-level>:1']

def test_ddp_sync_is_transparent_without_ddp():
    module = torch.nn.Linear(2, 2)
    with misc.ddp_sync(module, sync=False):
        module(torch.ones(1, 2)).sum().backward()
    assert module.weight.grad is not None
    misc.check_ddp_consistency(module)  # single process: nothing to compare, must not fail

#----------------------------------------------------------------------------
# Training statistics.

def test_training_stats_moments_ignore_non_finite():
    collector = training_stats.Collector(regex='Test/.*')
    training_stats.report('Test/a', torch.tensor([1.0, 2.0, float('nan'), 3.0, float('inf')]))
    training_stats.report('Test/a', 6.0)
    training_stats.report0('Test/b', [])
    collector.update()
    assert collector.num('Test/a') == 4
    assert collector.mean('Test/a') == pytest.approx(3.0)
    assert collector.std('Test/a') == pytest.approx(np.std([1, 2, 3, 6]))
    assert np.isnan(collector.mean('Test/b')) and collector.num('Test/b') == 0
    assert list(collector.as_dict().keys()) == ['Test/a', 'Test/b']
    collector.update()  # nothing new since the last update
    assert collector.num('Test/a') == 0 and np.isnan(collector['Test/a'])

def test_training_stats_collectors_see_only_their_own_interval():
    training_stats.report('Test2/early', 5.0)
    late = training_stats.Collector(regex='Test2/.*')  # what was reported before it existed does not count
    keep = training_stats.Collector(regex='Test2/.*', keep_previous=True)
    training_stats.report('Test2/early', torch.tensor([1.0, 3.0]))
    training_stats.report('Test2/x', -2.0)
    late.update()
    keep.update()
    assert (late.num('Test2/early'), late.mean('Test2/early'), late.std('Test2/early')) == (2, 2.0, 1.0)
    assert late.std('Test2/x') == 0.0 and late['Test2/x'] == -2.0
    training_stats.report('Test2/x', 4.0)
    late.update()
    keep.update()
    assert late.num('Test2/early') == 0 and late['Test2/x'] == 4.0
    assert keep.num('Test2/early') == 2 and keep['Test2/early'] == 2.0  # kept from the interval before
    assert list(keep.as_dict()) == ['Test2/early', 'Test2/x']
    with pytest.raises(KeyError, match='Other/y'):
        late.num('Other/y')

#----------------------------------------------------------------------------
# Persistence: pickles that carry their module's source.

PERSISTENT_MODULE = '''
import torch
from torch_utils import persistence

@persistence.persistent_class
class Scaler(torch.nn.Module):
    """Multiplies by a learned gain."""
    def __init__(self, channels, gain=2.0):
        super().__init__()
        self.channels = channels
        self.gain = torch.nn.Parameter(torch.full([channels], float(gain)))

    def forward(self, x):
        return x * self.gain

@persistence.persistent_class
class Holder:
    def __init__(self, item):
        self.item = item
'''

@pytest.fixture
def persistent_module(tmp_path, monkeypatch):
    (tmp_path / 'persistent_mod_for_test.py').write_text(PERSISTENT_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    yield importlib.import_module('persistent_mod_for_test')
    sys.modules.pop('persistent_mod_for_test', None)

def test_persistent_pickle_layout_and_round_trip(persistent_module):
    Scaler = persistent_module.Scaler
    assert Scaler.__name__ == 'Scaler' and Scaler.__qualname__ == 'Scaler' and Scaler.__doc__ == 'Multiplies by a learned gain.'
    assert Scaler.__module__ == 'persistent_mod_for_test' and persistence.persistent_class(Scaler) is Scaler
    net = Scaler(3, gain=0.5)
    assert persistence.is_persistent(net) and persistence.is_persistent(Scaler)
    assert not persistence.is_persistent(type('Sub', (Scaler,), {})) and not persistence.is_persistent(torch.nn.Linear)
    assert net.init_args == (3,) and net.init_kwargs == dict(gain=0.5) and isinstance(net.init_kwargs, dnnlib.EasyDict)

    func, (meta,), state = net.__reduce__()[:3]
    assert func is persistence._reconstruct_persistent_obj and state is None
    assert list(meta) == ['type', 'version', 'module_src', 'class_name', 'state']
    assert (meta['type'], meta['version'], meta['module_src'], meta['class_name']) == ('class', 6, PERSISTENT_MODULE, 'Scaler')
    assert meta['state']['channels'] == 3 and meta['state']['_init_args'] == (3,)

    same = pickle.loads(pickle.dumps(net))  # same source already imported: the original class
    assert type(same) is Scaler and torch.equal(same.gain, net.gain)
    # A source not imported yet runs in a fresh module (as in a process that never imported it).
    fresh = persistence._reconstruct_persistent_obj(dict(meta, module_src=PERSISTENT_MODULE + '# other copy\n'))
    assert type(fresh).__module__.startswith('_imported_module_') and type(fresh).__name__ == 'Scaler'
    assert persistence.is_persistent(fresh) and torch.equal(fresh(torch.ones(3)), torch.full([3], 0.5))
    again = pickle.loads(pickle.dumps(fresh))
    assert type(again) is type(fresh)  # its source is known now: no second module

def test_persistent_checks_at_construction_and_import_hooks(persistent_module, monkeypatch):
    Holder = persistent_module.Holder
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        Holder(lambda: 0)  # not picklable: refused when constructed, not at the first snapshot
    holder = Holder(dict(t=torch.zeros(2), a=np.ones(2), n=[1, 'x']))
    assert pickle.loads(pickle.dumps(holder)).item['n'] == [1, 'x']
    seen = []
    def hook(meta):
        seen.append(meta.class_name)
        meta.state.item = 'patched'
        return meta
    monkeypatch.setattr(persistence, '_import_hooks', [])
    persistence.import_hook(hook)
    assert pickle.loads(pickle.dumps(Holder(1))).item == 'patched' and seen == ['Holder']

#----------------------------------------------------------------------------
# Distributed helpers and checkpoints.

def test_single_process_helpers(monkeypatch):
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    dist.init()
    assert dist.get_rank() == 0 and dist.get_world_size() == 1 and not dist.is_distributed()
    dist.barrier()
    assert dist.broadcast_bool(True) is True

def test_checkpoint_roundtrip_weights_only(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters())
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    state = dnnlib.EasyDict(cur_nimg=2048, total_elapsed_time=1.5)

    class Plain:  # an object without state_dict: saved through its attribute dict
        def __init__(self):
            self.P_mean = -0.4
    plain = Plain()
    path = tmp_path / 'training-state-0000002.pt'
    dist.CheckpointIO(state=state, net=net, loss_fn=plain, optimizer=opt).save(str(path))
    assert os.listdir(tmp_path) == ['training-state-0000002.pt']             # no temporary left behind
    raw = torch.load(str(path), map_location='cpu', weights_only=True)        # plain data only
    assert type(raw['state']) is dict and raw['loss_fn'] == {'P_mean': -0.4}

    net2, state2, plain2 = torch.nn.Linear(3, 2), dnnlib.EasyDict(), Plain()
    plain2.P_mean = 0
    opt2 = torch.optim.Adam(net2.parameters())
    io = dist.CheckpointIO(state=state2, net=net2, loss_fn=plain2, optimizer=opt2)
    assert io.load_latest(str(tmp_path)) == str(path)
    assert isinstance(state2, dnnlib.EasyDict) and state2.cur_nimg == 2048
    assert torch.equal(net2.weight, net.weight) and plain2.P_mean == -0.4
    assert torch.equal(opt2.state_dict()['state'][0]['exp_avg'], opt.state_dict()['state'][0]['exp_avg'])

def test_checkpoint_written_by_edm2_with_easydict_loads(tmp_path):
    # EDM2 stores `state` as an EasyDict, which torch >= 2.6's weights-only default rejects.
    path = tmp_path / 'training-state-0000001.pt'
    torch.save(dict(state=dnnlib.EasyDict(cur_nimg=1024, total_elapsed_time=3.0)), str(path))
    state = dnnlib.EasyDict()
    dist.CheckpointIO(state=state).load(str(path))
    assert state.cur_nimg == 1024

def test_find_latest_uses_the_largest_number(tmp_path):
    for name in ['training-state-0000009.pt', 'training-state-0000010.pt', 'training-state-0000011.pt.tmp',
                 'xtraining-state-0000099.pt']:
        (tmp_path / name).write_bytes(b'')
    os.mkdir(tmp_path / 'training-state-0000050.pt')  # not a regular file
    assert dist.find_latest(str(tmp_path)) == str(tmp_path / 'training-state-0000010.pt')
    assert dist.find_latest(str(tmp_path / 'missing')) is None

def test_easydict_pickles_by_name():
    assert b'dnnlib.util' in pickle.dumps(dnnlib.EasyDict(a=1))

#----------------------------------------------------------------------------
# CPU allocator tuning (misc.keep_freed_cpu_memory).

ALLOCATOR_PROBE = r'''
import sys, torch
from torch_utils import misc
def in_heap(ptr):
    for line in open('/proc/self/maps'):
        if line.rstrip().endswith('[heap]'):
            lo, hi = (int(v, 16) for v in line.split()[0].split('-'))
            if lo <= ptr < hi:
                return True
    return False
big = 64 << 20  # above glibc's largest mmap threshold (32 MiB)
before = in_heap(torch.empty(big, dtype=torch.uint8).data_ptr())
applied = misc.keep_freed_cpu_memory()
after = in_heap(torch.empty(big, dtype=torch.uint8).data_ptr())
print(before, applied, after)
'''

@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc only')
def test_keep_freed_cpu_memory_serves_large_tensors_from_the_heap():
    env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}
    out = subprocess.run([sys.executable, '-c', ALLOCATOR_PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ['False', 'True', 'True']  # a fresh mmap before, the heap after
    env['MALLOC_MMAP_MAX_'] = '65536'  # the user's own glibc setting wins
    out = subprocess.run([sys.executable, '-c', ALLOCATOR_PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ['False', 'False', 'False']

@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc only')
def test_release_freed_cpu_memory_undoes_it():
    """benchmarks/inference.py measures memory after this: large tensors are fresh mmaps again."""
    probe = ALLOCATOR_PROBE + 'print(misc.release_freed_cpu_memory(), in_heap(torch.empty(big, dtype=torch.uint8).data_ptr()))\n'
    env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}
    out = subprocess.run([sys.executable, '-c', probe], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ['False', 'True', 'True', 'True', 'False']

# Whoever uses the networks gets the setting too: importing `networks` (or the training loop, which imports it), or
# running any tool through cli.run. Each case runs in a fresh process whose environment leaves glibc's default.
HEAP_CHECK = ALLOCATOR_PROBE.split('before = ')[0] + '''
before = in_heap(torch.empty(big, dtype=torch.uint8).data_ptr())
{prepare}
print(before, in_heap(torch.empty(big, dtype=torch.uint8).data_ptr()))
'''

@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc only')
@pytest.mark.parametrize('prepare', [
    'import networks',
    'from training import training_loop',
    'import click, contextlib\nfrom torch_utils import cli\nwith contextlib.suppress(SystemExit):\n    cli.run(click.command()(lambda: None))',
])
def test_networks_and_tools_keep_freed_cpu_memory(prepare):
    env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}
    run = lambda env: subprocess.run([sys.executable, '-c', HEAP_CHECK.format(prepare=prepare)], cwd=ROOT, env=env,
                                     capture_output=True, text=True).stdout.split()
    assert run(env) == ['False', 'True']
    assert run(dict(env, MALLOC_MMAP_MAX_='65536')) == ['False', 'False']  # the documented way out
