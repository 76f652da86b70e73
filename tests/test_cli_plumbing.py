"""The command-line tools' shared plumbing: torch_utils/cli.py and distributed.process_group()."""

import errno
import os
import subprocess
import sys
import textwrap

import click
import pytest
import torch
from click.testing import CliRunner

import dnnlib
from torch_utils import cli
from torch_utils import distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#----------------------------------------------------------------------------
# Option types, through click as the tools use them.

def parse(param_type, text):
    """(exit code, value or the one-line message) of parsing `text` with `param_type` as --x."""
    @click.command()
    @click.option('--x', type=param_type)
    def command(x):
        click.echo(repr(x))
    result = CliRunner().invoke(command, [f'--x={text}'])
    lines = result.output.strip().splitlines()
    return result.exit_code, (eval(lines[-1], {'inf': float('inf')}) if result.exit_code == 0 else lines[-1])  # pylint: disable=eval-used

def test_int_list_ranges_and_bounds():
    assert parse(cli.IntList(), '1,2,5-7') == (0, [1, 2, 5, 6, 7])
    assert parse(cli.IntList(), '') == (0, [])
    assert parse(cli.IntList(), '-3,4') == (0, [-3, 4])
    code, msg = parse(cli.IntList(), '7-5')
    assert code == 2 and 'range "7-5" is empty' in msg and '--x' in msg
    code, msg = parse(cli.IntList(), '1,a')
    assert code == 2 and '"a" is neither an integer nor a range a-b' in msg
    code, msg = parse(cli.IntList(min=8), '16,4')
    assert code == 2 and '4 is not in the range x>=8' in msg
    code, msg = parse(cli.IntList(min_len=1), '')
    assert code == 2 and 'at least 1 value' in msg
    assert cli.parse_int_list(range(3)) == [0, 1, 2]

def test_float_types_refuse_nan_and_inf():
    assert parse(cli.FloatRange(min=0, min_open=True), '0.5') == (0, 0.5)
    for text in ['nan', 'inf', '-inf']:
        code, msg = parse(cli.FloatRange(), text)
        assert code == 2 and 'not a finite number' in msg, text
    assert parse(cli.FloatRange(min=0, allow_inf=True), 'inf') == (0, float('inf'))
    code, msg = parse(cli.FloatRange(min=0, min_open=True), '0')
    assert code == 2 and 'not in the range x>0' in msg
    assert parse(cli.FloatList(min=0, max=0.289, min_open=True, max_open=True), '0.05,0.1') == (0, [0.05, 0.1])
    code, msg = parse(cli.FloatList(min=0, max=0.289, min_open=True, max_open=True), '0.05,0.3')
    assert code == 2 and '0.3 is not in the range 0<x<0.289' in msg
    code, msg = parse(cli.FloatList(), '0.05,nan')
    assert code == 2 and 'nan is not in the range' in msg
    code, msg = parse(cli.FloatList(), '0.05,x')
    assert code == 2 and 'not a comma-separated list of numbers' in msg

def test_nimg_suffixes_and_minimum():
    assert parse(cli.Nimg(), '128Ki') == (0, 128 << 10)
    assert parse(cli.Nimg(), '8Mi') == (0, 8 << 20)
    assert parse(cli.Nimg(), '2Gi') == (0, 2 << 30)
    assert parse(cli.Nimg(), '1000') == (0, 1000)
    code, msg = parse(cli.Nimg(), '12Ki3')
    assert code == 2 and 'not an image count' in msg
    code, msg = parse(cli.Nimg(min=1), '0')
    assert code == 2 and 'x>=1' in msg

def test_interval():
    assert parse(cli.Interval(), '0.1,2') == (0, (0.1, 2.0))
    assert parse(cli.Interval(), '0.1,inf') == (0, (0.1, float('inf')))
    for text in ['2,1', 'nan,1', '1', '-1,2']:
        code, msg = parse(cli.Interval(), text)
        assert code == 2 and 'LO' in msg, text

def test_parsed_passes_the_parsers_message():
    def parse_even(text):
        value = int(text)
        if value % 2:
            raise ValueError(f'{value} is odd')
        return value
    assert parse(cli.Parsed(parse_even), '4') == (0, 4)
    code, msg = parse(cli.Parsed(parse_even), '3')
    assert code == 2 and '3 is odd' in msg

#----------------------------------------------------------------------------
# One-line errors.

def test_one_line():
    assert cli.one_line(ValueError('first\n  second')) == 'first'
    assert cli.one_line(ValueError('a   b'), with_type=True) == 'ValueError: a b'
    assert cli.one_line(KeyError()) == 'KeyError'
    assert cli.os_error_line(OSError(errno.ENOSPC, 'No space left on device'), 'x.png') == \
        'x.png: No space left on device'
    assert cli.os_error_line(FileNotFoundError(errno.ENOENT, 'No such file or directory', 'a.zip'), 'x') == \
        'a.zip: No such file or directory'
    assert cli.os_error_line(FileNotFoundError('net.pkl: no such network file'), 'x') == 'net.pkl: no such network file'
    assert cli.CliError('two\nlines').message == 'two lines'

def test_os_errors_becomes_click_error():
    @click.command()
    def command():
        with cli.os_errors('out.png'):
            raise OSError(errno.ENOSPC, 'No space left on device')
    result = CliRunner().invoke(command, [])
    assert result.exit_code == 1
    assert result.output == 'Error: out.png: No space left on device\n'

#----------------------------------------------------------------------------
# Output-path checks.

def test_check_output_file(tmp_path):
    cli.check_output_file(str(tmp_path / 'new' / 'deeper' / 'x.png'))  # folders that do not exist yet are fine
    assert not (tmp_path / 'new').exists()
    existing = tmp_path / 'x.png'
    existing.write_bytes(b'keep')
    with pytest.raises(click.ClickException, match=r'x\.png: already exists; pass --overwrite to replace it'):
        cli.check_output_file(str(existing))
    cli.check_output_file(str(existing), overwrite=True)
    with pytest.raises(click.ClickException, match='is a directory'):
        cli.check_output_file(str(tmp_path))
    with pytest.raises(click.ClickException, match='is not a directory'):
        cli.check_output_file(str(existing / 'y.png'))
    with pytest.raises(click.ClickException, match='cannot write there'):
        cli.check_output_file('/proc/edm2plus-test/x.png')
    assert existing.read_bytes() == b'keep'
    assert sorted(os.listdir(tmp_path)) == ['x.png']  # the write probe leaves nothing behind

def test_check_output_dir(tmp_path):
    cli.check_output_dir(str(tmp_path / 'a' / 'b'))
    cli.check_output_dir(str(tmp_path))
    (tmp_path / 'f').write_bytes(b'')
    with pytest.raises(click.ClickException, match='exists and is not a directory'):
        cli.check_output_dir(str(tmp_path / 'f'))
    with pytest.raises(click.ClickException, match='is not a directory'):
        cli.check_output_dir(str(tmp_path / 'f' / 'sub'))

def test_atomic_write_names_the_destination_on_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / 'out.bin'
    path.write_bytes(b'old')
    def full_fsync(_fd):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(os, 'fsync', full_fsync)
    with pytest.raises(OSError) as info:
        with dnnlib.util.atomic_write(path) as f:
            f.write(b'new')
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert path.read_bytes() == b'old' and os.listdir(tmp_path) == ['out.bin']

#----------------------------------------------------------------------------
# Process group.

def test_process_group_single_process(monkeypatch):
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    with dist.process_group() as device:
        assert device == dist.device()
        assert device.type == ('cuda' if torch.cuda.is_available() else 'cpu')
        assert not torch.distributed.is_initialized()

SCRIPT = textwrap.dedent('''
    import sys, torch
    from torch_utils import distributed as dist
    fail = sys.argv[1] == 'fail'
    try:
        with dist.process_group() as device:
            x = torch.tensor([dist.get_rank() + 1.0])
            torch.distributed.all_reduce(x)
            print('sum', x.item(), device.type, flush=True)
            if fail and dist.get_rank() == 1:
                raise RuntimeError('rank 1 fails')
    except RuntimeError as e:
        print('error', e, flush=True)
    print('left', torch.distributed.is_initialized(), flush=True)
''')

FREED_SCRIPT = textwrap.dedent('''
    import os, torch
    from networks import flops
    from torch_utils import distributed as dist
    threads = lambda: len(os.listdir('/proc/self/task'))
    before = threads()
    with dist.process_group():
        flops.count(flops.build_meta(img_resolution=8, img_channels=3, label_dim=0, model_channels=16,
                                     channel_mult=[1], num_blocks=1, attn_resolutions=[]))
    print('threads', before, threads(), flush=True)
''')

@pytest.mark.skipif(not os.path.isdir('/proc/self/task'), reason='counts threads in /proc')
def test_process_group_is_freed_after_a_flop_count():
    """A FLOP count inside the group (its TorchDispatchMode imports torch.distributed._shard, which then holds the
    group) must not keep the group alive past shutdown: gloo's threads are gone when the block ends, so none is
    left to abort the process at exit (seen as 'terminate called without an active exception' in 2-rank sweeps)."""
    port = str(dist._find_free_port())  # pylint: disable=protected-access
    procs = []
    for rank in range(2):
        env = dict(os.environ, WORLD_SIZE='2', RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1',
                   MASTER_PORT=port, PYTHONPATH=ROOT, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
        procs.append(subprocess.Popen([sys.executable, '-c', FREED_SCRIPT], env=env, cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for p in procs:
        out = p.communicate(timeout=120)[0]
        assert p.returncode == 0, out
        before, after = [int(n) for n in out.split('threads ')[-1].split()]
        assert after == before, out

@pytest.mark.parametrize('mode', ['ok', 'fail'])
def test_process_group_two_ranks(mode):
    """Both ranks join, work, and leave the group; a rank whose block raises leaves without waiting for a barrier
    (so it never hangs), and the other rank's barrier then ends with an error instead of waiting forever."""
    port = str(dist._find_free_port())  # pylint: disable=protected-access
    procs = []
    for rank in range(2):
        env = dict(os.environ, WORLD_SIZE='2', RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1',
                   MASTER_PORT=port, PYTHONPATH=ROOT, EDM2PLUS_DIST_TIMEOUT_MIN='0.5', CUDA_VISIBLE_DEVICES='')
        procs.append(subprocess.Popen([sys.executable, '-c', SCRIPT, mode], env=env, cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    for out in outputs:
        assert 'sum 3.0 cpu' in out, out
    if mode == 'ok':
        for p, out in zip(procs, outputs):
            assert p.returncode == 0 and 'left False' in out, out
    else:
        assert 'error rank 1 fails' in outputs[1] and 'left False' in outputs[1], outputs[1]
