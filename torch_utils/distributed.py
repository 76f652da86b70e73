"""Process-group set-up, rank-aware printing and resumable checkpoints.

Launch with `torchrun` (one process per GPU, or any number of CPU processes) or run plain `python`: without a
launcher, or with a world size of 1, no process group is created and every helper here acts as a single process.
The backend is nccl when CUDA is available, else gloo.
"""

import contextlib
import datetime
import importlib
import os
import re
import socket

import torch

import dnnlib
from . import misc
from . import training_stats

#----------------------------------------------------------------------------
# Process group.

def _find_free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('', 0))
        return s.getsockname()[1]

def _elastic_attempt_store(timeout):
    """Under torchrun, a key-value store of this restart attempt's own, or None elsewhere.

    torchrun (elastic agent) keeps one TCP store for the whole job and hands it to the workers of every restart
    attempt. The process group's rendezvous keys (each rank's address, arrival counters) of an attempt whose
    worker died are still there when the restarted workers meet: a new rank may connect to a dead peer's address
    or wait for a counter that already passed, and then fail or hang. A prefix per attempt
    (TORCHELASTIC_RESTART_COUNT) gives each attempt fresh keys.
    """
    if os.environ.get('TORCHELASTIC_USE_AGENT_STORE') != 'True':
        return None
    client = torch.distributed.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']),
                                        is_master=False, timeout=timeout)
    attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')
    return torch.distributed.PrefixStore(f'edm2plus/attempt{attempt}', client)

def init():
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, ...), if there is one.

    Also selects this process's CUDA device (LOCAL_RANK) and tells training_stats where to all-reduce.
    Safe to call more than once.
    """
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size > 1 and not torch.distributed.is_initialized():
        os.environ.setdefault('MASTER_ADDR', 'localhost')
        os.environ.setdefault('MASTER_PORT', str(_find_free_port()))
        os.environ.setdefault('RANK', '0')
        os.environ.setdefault('LOCAL_RANK', '0')
        backend = 'nccl' if torch.cuda.is_available() else 'gloo'
        if os.name == 'nt':
            backend = 'gloo'  # NCCL is not available on Windows.
        timeout = datetime.timedelta(minutes=float(os.environ.get('EDM2PLUS_DIST_TIMEOUT_MIN', '30')))
        # Imported while a process group exists (as the first TorchDispatchMode does, e.g. networks.flops' count),
        # torch.distributed._shard keeps references to the default group, so that destroy_process_group() cannot
        # free it: gloo's worker threads then live on into the interpreter's exit, where one of them may abort the
        # process ("terminate called without an active exception") after all the work is done. Imported before the
        # group exists, it holds none (a 17 ms import).
        importlib.import_module('torch.distributed._shard')
        store = _elastic_attempt_store(timeout)
        if store is not None:
            torch.distributed.init_process_group(backend=backend, store=store, rank=int(os.environ['RANK']),
                                                 world_size=world_size, timeout=timeout)
        else:
            init_method = 'env://?use_libuv=False' if os.name == 'nt' else 'env://'
            torch.distributed.init_process_group(backend=backend, init_method=init_method, timeout=timeout)

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count())

    sync_device = None
    if get_world_size() > 1:
        sync_device = torch.device('cuda') if torch.distributed.get_backend() == 'nccl' else torch.device('cpu')
    training_stats.init_multiprocessing(rank=get_rank(), sync_device=sync_device)

def shutdown(meet=True):
    """Leave the process group, if there is one. With `meet`, all ranks first wait for each other, so that no
    rank tears down its gloo connections while another still uses them (gloo's worker threads may abort a
    process whose peer vanished mid-call). Pass meet=False on an error path, where other ranks may never come."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            if meet:
                torch.distributed.barrier()
        finally:
            torch.distributed.destroy_process_group()

@contextlib.contextmanager
def process_group():
    """`with process_group() as device:` runs the block as one rank of torchrun's process group, if there is one,
    on this process's device (see device()). A group that this call created is left on the way out: after a
    barrier when the block succeeded, at once when it raised (the other ranks may never arrive). A group that was
    already there stays, for its owner to close."""
    owner = int(os.environ.get('WORLD_SIZE', '1')) > 1 and not torch.distributed.is_initialized()
    init()
    ok = False
    try:
        yield device()
        ok = True
    finally:
        if owner:
            shutdown(meet=ok)

def device():
    """The device this process computes on: its CUDA device (init() picks it from LOCAL_RANK) if CUDA is
    available, else the CPU."""
    return torch.device('cuda', torch.cuda.current_device()) if torch.cuda.is_available() else torch.device('cpu')

def is_distributed():
    """True when a process group with more than one process is active."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1

def get_rank():
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0

def get_world_size():
    return torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1

def barrier():
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        torch.distributed.barrier()

def broadcast_bool(flag):
    """Rank 0's value of `flag` on every rank (so that all ranks take the same branch)."""
    if not is_distributed():
        return bool(flag)
    device = torch.device('cuda') if torch.distributed.get_backend() == 'nccl' else torch.device('cpu')
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    torch.distributed.broadcast(value, src=0)
    return bool(value.item())

def on_rank0(fn):
    """Run fn() on rank 0 only and give its (small, picklable) result to every rank. An error is raised on rank 0;
    the other ranks stop quietly (SystemExit 1), so that a user sees it once. In a single process: fn()."""
    result, error = None, None
    if get_rank() == 0:
        try:
            result = fn()
        except Exception as e:  # pylint: disable=broad-except
            error = e
    if not broadcast_bool(error is None):
        if error is not None:
            raise error
        raise SystemExit(1)
    if is_distributed():
        box = [result]
        torch.distributed.broadcast_object_list(box, src=0)
        result = box[0]
    return result

def rank0_first(fn):
    """Run fn() on every rank, rank 0 before the others (so that a file it downloads is downloaded once, and the
    others read it from the cache). Rank 0 lets the others go on even when fn() fails there, so that no rank is left
    waiting for it."""
    if get_rank() != 0:
        barrier()
    try:
        return fn()
    finally:
        if get_rank() == 0:
            barrier()

#----------------------------------------------------------------------------
# Hooks through which a cluster scheduler could follow and interrupt training. Nothing here talks to one, so
# progress reports are dropped and training is never asked to stop or suspend.

def update_progress(cur, total):
    """Report that `cur` of `total` units (kimg) are done."""

def request_suspend():
    """Ask the scheduler to suspend this job and resume it later."""

def should_stop():
    """Whether the scheduler wants training to end now."""
    return False

def should_suspend():
    """Whether the scheduler wants training to save its state and suspend."""
    return False

#----------------------------------------------------------------------------

def print0(*args, **kwargs):
    """print() on rank 0 only."""
    if get_rank() == 0:
        print(*args, **kwargs)

#----------------------------------------------------------------------------
# Checkpoints: one torch.save'd dict with an entry per named object.
# We store plain dicts and tensors only, so that torch.load(weights_only=True) (the default since PyTorch 2.6)
# can read them without executing code; states written by EDM2 also hold an EasyDict, which is read as a dict.

def _object_state(obj):
    if obj is None:
        return None
    if isinstance(obj, dict):
        return {key: _object_state(value) if isinstance(value, dict) else value for key, value in obj.items()}
    if hasattr(obj, 'state_dict'):
        return obj.state_dict()
    if hasattr(obj, '__getstate__'):
        return obj.__getstate__()
    return obj.__dict__

def load_checkpoint_file(path):
    """torch.load a training state onto the CPU without running code from it, whatever it holds: torch's
    weights-only unpickler (tensors and plain containers), with EDM2's attribute dicts (dnnlib.util.EasyDict) read
    as plain dicts. A state that needs anything else raises misc.CodeRefusedError; it is never unpickled with code."""
    return misc.load_weights_only(path, os.path.basename(path), allow=[(dict, 'dnnlib.util.EasyDict')])

class CheckpointIO:
    """Saves and restores a fixed set of named objects (dicts, modules, optimizers, EMA trackers)."""

    def __init__(self, **objs):
        self._objs = objs

    def save(self, path, verbose=True):
        if verbose:
            print0(f'Saving {path} ... ', end='', flush=True)
        data = {name: _object_state(obj) for name, obj in self._objs.items()}
        if get_rank() == 0:
            with dnnlib.util.atomic_write(path, 'wb') as f:
                torch.save(data, f)
        if verbose:
            print0('done')

    def load(self, path, verbose=True):
        if verbose:
            print0(f'Loading {path} ... ', end='', flush=True)
        try:
            data = load_checkpoint_file(path)
        except BaseException:
            if verbose:
                print0('failed')  # the error that follows starts a line of its own
            raise
        for name, obj in self._objs.items():
            state = data[name]
            if obj is None:
                pass
            elif isinstance(obj, dict):
                obj.clear()
                obj.update(state)
            elif hasattr(obj, 'load_state_dict'):
                obj.load_state_dict(state)
            elif hasattr(obj, '__setstate__'):
                obj.__setstate__(state)
            else:
                obj.__dict__.clear()
                obj.__dict__.update(state)
        if verbose:
            print0('done')

    def load_latest(self, run_dir, pattern=r'training-state-(\d+).pt', verbose=True):
        """Load the file in run_dir whose name fully matches `pattern` with the largest number; return its path."""
        path = find_latest(run_dir, pattern)
        if path is not None:
            self.load(path, verbose=verbose)
        return path

def find_latest(run_dir, pattern=r'training-state-(\d+).pt'):
    """The regular file in run_dir (not recursive) fully matching `pattern` with the largest number, or None."""
    if not os.path.isdir(run_dir):
        return None
    best, best_num = None, None
    for entry in os.scandir(run_dir):
        match = re.fullmatch(pattern, entry.name)
        if match is not None and entry.is_file():
            num = float(match.group(1))
            if best_num is None or num > best_num:
                best, best_num = entry.path, num
    return best

#----------------------------------------------------------------------------
# Run-directory lock: one writer per run directory. Not part of EDM2.
#
# Two trainings in one --outdir (a job requeued while the first still runs) would interleave their training states,
# snapshots and stats.jsonl. The first one holds an exclusive flock() on <run_dir>/<name> for as long as it runs;
# the operating system drops the lock when the process ends, however it ends (SIGKILL, a lost node's NFS lease), so
# a dead run never blocks its own resumption and nobody has to delete anything. The file itself stays and says who
# held it last. Under torchrun, rank 0 holds the lock and tells the other ranks whether it got it.

class RunDirBusyError(RuntimeError):
    """Another live process holds the run directory; the message is one line naming it (PID, host, start time)."""

_held_locks = {}  # real path of the lock file -> [file descriptor, number of holders in this process]

def _lock_file_holder(fd):
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode('utf-8', 'replace').strip()
    except OSError:
        text = ''
    return text or 'a process that has not written its name yet'

def acquire_run_dir(run_dir, name='training.lock', what='training'):
    """Take the lock on `run_dir` in this process (re-entrant: a process may take its own lock again). Returns a
    function that releases it. Raises RunDirBusyError while another process holds it. On a file system without
    locks (flock fails with ENOLCK or EOPNOTSUPP) it prints a warning and goes on unlocked."""
    import fcntl  # pylint: disable=import-outside-toplevel  (POSIX)
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.realpath(os.path.join(run_dir, name))
    if path in _held_locks:
        _held_locks[path][1] += 1
        return lambda: _release(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_file_holder(fd)
        os.close(fd)
        raise RunDirBusyError(f'{run_dir}: in use by another {what} ({holder}); two runs in one directory would '
                              f'overwrite each other\'s files: wait for it to end or stop it, or choose another '
                              f'directory') from None
    except OSError as e:
        os.close(fd)
        print(f'Warning: {path}: cannot lock the run directory ({e.strerror}); make sure that no other {what} uses it')
        return lambda: None
    started = datetime.datetime.now().isoformat(timespec='seconds')
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'PID {os.getpid()} on host {socket.gethostname()}, started {started}\n'.encode(), 0)
    _held_locks[path] = [fd, 1]
    return lambda: _release(path)

def _release(path):
    entry = _held_locks.get(path)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held_locks[path]
        os.close(entry[0])  # drops the flock

@contextlib.contextmanager
def run_dir_lock(run_dir, name='training.lock', what='training'):
    """`with run_dir_lock(run_dir):` holds the run directory's lock for the block; call it on every rank. Rank 0
    takes the lock (acquire_run_dir) and broadcasts the outcome, so that every rank raises the same
    RunDirBusyError when another process holds it, and none waits for a rank that stopped."""
    release, error, message = (lambda: None), None, None
    if get_rank() == 0:
        try:
            release = acquire_run_dir(run_dir, name, what)
        except Exception as e:  # pylint: disable=broad-except  (e.g. an unwritable folder: the others must not wait)
            error, message = e, str(e)
    if is_distributed():
        box = [message]
        torch.distributed.broadcast_object_list(box, src=0)
        message = box[0]
    if error is not None:
        raise error
    if message is not None:
        raise RunDirBusyError(message)
    try:
        yield
    finally:
        release()
