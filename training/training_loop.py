"""The EDM2 training loop on CUDA or CPU, single process or under torchrun.

`training_loop(**config)` is what `train_edm2plus.py` calls with the config it also writes to
training_options.json. Everything that decides the result (data order, noise levels, noise, dropout) is a function
of (seed, rank, cur_nimg), so a run that is interrupted and resumed from its newest `training-state-*.pt` continues
exactly as if it had never stopped (for the same number of processes).

A run that cannot go on (a corrupt image, a loss that is NaN/Inf for a whole status tick, weights that are no longer
finite, a training state that cannot be applied) raises TrainingError with a one-line message; it never writes a
snapshot or training state with non-finite weights, so the last good training state stays the newest.
"""

import copy
import json
import math
import os
import pickle
import re
import sys
import time
import zipfile

import numpy as np
import psutil
import torch

import dnnlib
from networks import fastpaths
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import training_stats
from training.loss import EDM2Loss  # noqa: F401  (EDM2 configs name it `training.training_loop.EDM2Loss`)

class TrainingError(RuntimeError):
    """Training cannot continue; the message is one line that says where and why."""

#----------------------------------------------------------------------------
# Learning-rate schedule (EDM2 paper eq. 15): ref_lr, scaled down by 1/sqrt(t / t_ref) once t exceeds ref_batches
# optimizer steps, and by a linear warm-up over the first rampup_Mimg million images. Either part is off when 0.

def learning_rate_schedule(cur_nimg, batch_size, ref_lr=100e-4, ref_batches=70e3, rampup_Mimg=10):
    decay = np.sqrt(max(cur_nimg / (ref_batches * batch_size), 1)) if ref_batches > 0 else 1
    warmup = min(cur_nimg / (rampup_Mimg * 1e6), 1) if rampup_Mimg > 0 else 1
    return float(ref_lr / decay * warmup)

#----------------------------------------------------------------------------
# Batch bookkeeping. Raises ValueError with a readable message, so that CLIs can report it.

def batch_layout(batch_size, batch_gpu, world_size):
    """Return (per-process micro-batch b, per-process share of the batch, accumulation rounds)."""
    if batch_size % world_size != 0:
        raise ValueError(f'batch size {batch_size} is not divisible by the number of processes ({world_size})')
    batch_gpu_total = batch_size // world_size
    if batch_gpu is None or batch_gpu == 0 or batch_gpu > batch_gpu_total:
        batch_gpu = batch_gpu_total
    if batch_gpu_total % batch_gpu != 0:
        raise ValueError(f'per-process batch {batch_gpu_total} (batch {batch_size} / {world_size} processes) '
                         f'is not divisible by --batch-gpu={batch_gpu}')
    return batch_gpu, batch_gpu_total, batch_gpu_total // batch_gpu

def check_intervals(batch_size, total_nimg, slice_nimg=None, status_nimg=None, snapshot_nimg=None, checkpoint_nimg=None):
    """Intervals must be whole batches; snapshot/checkpoint also whole multiples of 1024 images, because file
    names hold nimg // 1000 and post-hoc EMA maps kimg back to nimg assuming multiples of 1024."""
    if total_nimg <= 0 or total_nimg % batch_size != 0:
        raise ValueError(f'duration {total_nimg} must be a positive multiple of the batch size {batch_size}')
    for name, value, granularity in [('slice', slice_nimg, batch_size), ('status', status_nimg, batch_size),
                                     ('snapshot', snapshot_nimg, math.lcm(batch_size, 1024)),
                                     ('checkpoint', checkpoint_nimg, math.lcm(batch_size, 1024))]:
        if value is not None and (value <= 0 or value % granularity != 0):
            raise ValueError(f'{name} interval {value} must be a positive multiple of {granularity} images')

#----------------------------------------------------------------------------
# stats.jsonl: one line per status tick, `%g` numbers except kimg/timestamp (`%.3f`), bare NaN for any non-finite
# value (not strict JSON, as EDM2 writes it; Python's json module reads it).

def format_stats_line(items):
    """items: [(name, float)] -> one JSON object line (with trailing newline)."""
    fields = []
    for name, value in items:
        value = float(value)
        if not math.isfinite(value):
            text = 'NaN'
        elif name in ('Progress/kimg', 'timestamp'):
            text = f'{value:.3f}'
        else:
            text = f'{value:g}'
        fields.append(f'{json.dumps(name)}: {text}')
    return '{' + ', '.join(fields) + '}\n'

def append_line(path, line):
    # One write() on an O_APPEND descriptor: a killed process leaves either the whole line or none of it.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode('utf-8'))
    finally:
        os.close(fd)

def trim_stats(path, cur_nimg):
    """Drop stats.jsonl lines written after the training state we resume from (they will be written again),
    and any line a killed run left unparsable; keeps the file's curves single-valued."""
    if not os.path.isfile(path):
        return
    with open(path, 'r', encoding='utf-8') as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            nimg = round(float(json.loads(line)['Progress/kimg']) * 1000)
        except (ValueError, KeyError, TypeError):
            continue
        if cur_nimg > 0 and nimg <= cur_nimg:
            kept.append(line if line.endswith('\n') else line + '\n')
    if kept != lines:
        with dnnlib.util.atomic_write(path, 'w') as f:
            f.writelines(kept)

def remove_stale_temp_files(run_dir):
    # atomic_write's temporary files left behind by a killed run (never under a final name).
    for entry in os.scandir(run_dir):
        if re.fullmatch(r'\.(network-snapshot-|training-state-|stats\.jsonl|training_options\.json).*\.tmp', entry.name):
            try:
                os.remove(entry.path)
            except OSError:
                pass

#----------------------------------------------------------------------------
# Snapshot pickle: EasyDict(encoder, dataset_kwargs, loss_fn, ema) with the EMA net in float16 on CPU.

def save_snapshot(path, encoder, dataset_kwargs, loss_fn, ema_net):
    data = dnnlib.EasyDict(encoder=encoder, dataset_kwargs=dnnlib.EasyDict(dataset_kwargs), loss_fn=loss_fn)
    data.ema = copy.deepcopy(ema_net).cpu().eval().requires_grad_(False).to(torch.float16)
    with dnnlib.util.atomic_write(path, 'wb') as f:
        pickle.dump(data, f)

def snapshot_name(cur_nimg, ema_suffix, at_stop=False):
    """`network-snapshot-<kimg>-<std>.pkl`, the post-hoc EMA inputs. A snapshot taken where a time limit stopped
    the run, off the snapshot interval, ends in `-stop.pkl` instead, so that post-hoc EMA does not take it as an
    input (its inputs stay on EDM2's schedule); it can still be sampled from like any snapshot."""
    return f'network-snapshot-{cur_nimg // 1000:07d}{ema_suffix}{"-stop" if at_stop else ""}.pkl'

#----------------------------------------------------------------------------
# Finite weights and readable data: the checks that end a run with a TrainingError.

def first_non_finite(named_modules):
    """'<label>.<parameter>' of the first parameter with a NaN/Inf value among [(label, module)], else None."""
    names, flags = [], []
    for label, module in named_modules:
        for name, param in module.named_parameters():
            names.append(f'{label}.{name}')
            flags.append(torch.isfinite(param).all())
    finite = torch.stack(flags).cpu().tolist() if flags else []  # one device sync for all of them
    return next((name for name, ok in zip(names, finite) if not ok), None)

def data_error_message(error):
    """The one-line message of a data error; errors raised in a DataLoader worker arrive as the worker's formatted
    traceback, whose last line holds the original message."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith('Caught '):
        prefix = f'{type(error).__name__}: '
        return lines[-1][len(prefix):] if lines[-1].startswith(prefix) else lines[-1]
    return ' '.join(lines)

#----------------------------------------------------------------------------
# Resume from the newest training state that is a complete file. torch.save writes a zip archive whose directory
# is at its end, so a truncated file is recognised without reading it all.

_STATE_NAME = re.compile(r'training-state-(\d+)\.pt')

def training_state_files(run_dir):
    """The training states in run_dir (not recursive), newest first."""
    found = []
    for entry in os.scandir(run_dir):
        match = _STATE_NAME.fullmatch(entry.name)
        if match is not None and entry.is_file():
            found.append((float(match.group(1)), entry.path))
    return [path for _, path in sorted(found, reverse=True)]

def incomplete_reason(path):
    """Why `path` is not a complete training-state archive, or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (OSError, zipfile.BadZipFile) as e:
        return f'{type(e).__name__}: {e}'
    return None

def set_aside(path):
    """Rename `path` to `<path>.corrupt` (or `.corrupt1`, ... if taken); never deletes anything."""
    for idx in range(1000):
        aside = f'{path}.corrupt{idx or ""}'
        if not os.path.exists(aside):
            os.rename(path, aside)
            return aside
    raise TrainingError(f'{path}: cannot set it aside (too many {os.path.basename(path)}.corrupt* files)')

def resume_newest(checkpoint, run_dir, rank):
    """Load the newest complete training state into `checkpoint`'s objects; return its path (None: none found).
    Incomplete ones are named and set aside (rank 0 renames them); a complete one that fails to load is an error,
    and so is having none left after setting some aside (a fresh start would overwrite the run's snapshots)."""
    set_aside_paths = []
    for path in training_state_files(run_dir):
        reason = incomplete_reason(path)
        if reason is None:
            try:
                checkpoint.load(path)
            except Exception as e:  # pylint: disable=broad-except
                first = (str(e).strip().splitlines() or [''])[0]
                raise TrainingError(f'{path}: cannot resume from this training state ({type(e).__name__}: {first})') from None
            return path
        dist.print0(f'Warning: {path}: unreadable training state ({reason}); setting it aside and resuming from an '
                    f'earlier one.')
        if rank == 0:
            dist.print0(f'Set aside as {set_aside(path)}')
        set_aside_paths.append(path)
    if set_aside_paths:
        raise TrainingError(f'{run_dir}: no readable training state left to resume from (set aside: '
                            f'{", ".join(os.path.basename(p) for p in set_aside_paths)}); not starting over in this directory')
    return None

#----------------------------------------------------------------------------
# The parts that training builds, and how they are prepared.

def training_device(device):
    """torch.device to train on: `device`, else CUDA when available, else the CPU; a CUDA device with its index."""
    device = torch.device(device) if device is not None else dist.device()
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', torch.cuda.current_device())
    return device

def use_exact_float32(cudnn_benchmark):
    """Float32 arithmetic as EDM2 trains with it: no TF32, no reduced-precision float16 reductions."""
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False

def build_parts(dataset_kwargs, encoder_kwargs, network_kwargs, device, dataset=None):
    """(dataset, encoder, network), each built from its kwargs; `dataset`, if given, is the dataset that
    dataset_kwargs describe, already opened by the caller (train_edm2plus.py probes it), and is not opened again."""
    dist.print0('Loading dataset...')
    if dataset is None:
        dataset = dnnlib.util.construct_class_by_name(**dataset_kwargs)
    dist.print0('Setting up encoder...')
    encoder = dnnlib.util.construct_class_by_name(**encoder_kwargs)
    dist.print0('Constructing network...')
    return dataset, encoder, network_for(dataset, encoder, network_kwargs, device)

def network_for(dataset, encoder, network_kwargs, device):
    """The network, in training mode on `device`, whose resolution, channels and label length are those of the first
    dataset item after `encode_latents` (which draws from the global RNG for VAE latents, before the network's
    initialisation does)."""
    image, label = dataset[0]
    x = encoder.encode_latents(torch.as_tensor(image).to(device)[None])
    net = dnnlib.util.construct_class_by_name(img_resolution=x.shape[-1], img_channels=x.shape[1],
                                              label_dim=label.shape[-1], **network_kwargs)
    return net.train().requires_grad_(True).to(device)

def print_summary(net, batch_gpu, device):
    """The module table for one micro-batch of zeros at sigma = 1."""
    side = net.img_resolution
    example = dict(x=[batch_gpu, net.img_channels, side, side], sigma=[batch_gpu], labels=[batch_gpu, net.label_dim])
    inputs = [torch.ones(shape, device=device) if key == 'sigma' else torch.zeros(shape, device=device)
              for key, shape in example.items()]
    misc.print_module_summary(net, inputs, max_nesting=2)

def make_optimizer(params, optimizer_kwargs):
    """The optimizer that optimizer_kwargs describe. torch's Adam and AdamW get their fused implementation (one
    kernel for all parameters, on CPU and CUDA) unless the kwargs choose one: their default on a CPU loops over the
    parameters in Python, and the fused kernel computes the same update (up to float rounding; tested)."""
    kwargs = dict(optimizer_kwargs)
    params = list(params)
    if kwargs.get('class_name') in ('torch.optim.Adam', 'torch.optim.AdamW') and 'fused' not in kwargs and \
            'foreach' not in kwargs and all(p.device.type in ('cpu', 'cuda') and p.is_floating_point() for p in params):
        kwargs['fused'] = True
    return dnnlib.util.construct_class_by_name(params=params, **kwargs)

# torch.compile's modes. 'reduce-overhead' records the compiled forward and backward as CUDA graphs (on a CPU it
# compiles as 'default'): every step has the same shapes, so they are recorded once and replayed.
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')

def parse_compile(text):
    """--compile's value: a boolean (true: 'default') or one of COMPILE_MODES. Returns False or the mode."""
    word = str(text).strip().lower()
    if word in ('false', 'no', 'off', '0', 'none'):
        return False
    if word in ('true', 'yes', 'on', '1'):
        return 'default'
    if word in COMPILE_MODES:
        return word
    raise ValueError(f'{text!r} is neither a boolean nor a torch.compile mode ({", ".join(COMPILE_MODES)})')

def compile_net(net, compile):
    """net wrapped in torch.compile in the mode `compile` (anything parse_compile takes; False/None: net itself)."""
    mode = parse_compile(compile) if compile else False
    return torch.compile(net, mode=mode) if mode else net

def batches(dataset, rank, seed, start_nimg, batch_gpu, data_loader_kwargs, device):
    """An endless iterator over this process's micro-batches, in the data order that continues at image start_nimg.
    Options that only mean something with worker processes or CUDA are dropped where they would fail."""
    kwargs = dict(data_loader_kwargs)
    if kwargs.get('num_workers', 0) == 0:
        kwargs.pop('prefetch_factor', None)
    if device.type != 'cuda':
        kwargs['pin_memory'] = False
    sampler = misc.InfiniteSampler(dataset=dataset, rank=rank, num_replicas=dist.get_world_size(), seed=seed,
                                   start_idx=start_nimg)
    return iter(dnnlib.util.construct_class_by_name(dataset=dataset, sampler=sampler, batch_size=batch_gpu, **kwargs))

def progress_bar(progress, total, initial):
    """tqdm bar on rank 0, on the real terminal (never in log.txt); progress=None: when stdout is a terminal."""
    if progress is None:
        progress = sys.__stdout__ is not None and sys.__stdout__.isatty()
    if not progress or dist.get_rank() != 0:
        return None
    import tqdm  # pylint: disable=import-outside-toplevel
    return tqdm.tqdm(total=total, initial=initial, unit='img', unit_scale=True, dynamic_ncols=True,
                     file=sys.__stderr__, desc='Training', leave=False)

def stop_point(cur_nimg, total_nimg, slice_nimg, batch_size, checkpoint_nimg, snapshot_nimg):
    """The image count at which this invocation stops: total_nimg, or with slice_nimg the end of the slice, rounded
    down to the saving interval (at least one step)."""
    if slice_nimg is None:
        return total_nimg
    granularity = next(n for n in (checkpoint_nimg, snapshot_nimg, batch_size) if n is not None)
    slice_end = (cur_nimg + slice_nimg) // granularity * granularity
    return min(total_nimg, max(slice_end, cur_nimg + batch_size))

def apply_gradients(net, optimizer, lr, force_finite):
    """Adam step at learning rate `lr`; with `force_finite`, NaN/Inf gradient entries count as 0 (float16 needs it)."""
    for group in optimizer.param_groups:
        group['lr'] = lr
    grads = [param.grad for param in net.parameters() if param.grad is not None] if force_finite else []
    # One norm per gradient in one call tells whether any entry is NaN or Inf (the norm is then too, or overflows,
    # which only costs the per-tensor pass below), instead of a pass per tensor in every step.
    if grads and not torch.stack(torch._foreach_norm(grads)).isfinite().all():
        for grad in grads:
            grad.nan_to_num_(nan=0, posinf=0, neginf=0)
    optimizer.step()

def status_fields(state, tick, now, device):
    """The status line's fields at time `now`, each reported to training_stats (stats.jsonl) as it is formatted.
    `tick` holds the time and image count where the tick started and the seconds spent in optimizer steps since."""
    process = psutil.Process(os.getpid())
    cpu_bytes = sum(p.memory_info().rss for p in [process] + process.children(recursive=True))
    cuda = device.type == 'cuda'
    rows = [('kimg', 'Progress/kimg', state.cur_nimg / 1e3, '<9.1f'),
            ('time', 'Timing/total_sec', state.total_elapsed_time, None),
            ('sec/tick', 'Timing/sec_per_tick', now - tick.time, '<8.2f'),
            ('sec/kimg', 'Timing/sec_per_kimg', tick.step_time / max(state.cur_nimg - tick.nimg, 1) * 1e3, '<7.3f'),
            ('maintenance', 'Timing/maintenance_sec', now - tick.time - tick.step_time, '<7.2f'),
            ('cpumem', 'Resources/cpu_mem_gb', cpu_bytes / 2**30, '<6.2f'),
            ('gpumem', 'Resources/peak_gpu_mem_gb', torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0, '<6.2f'),
            ('reserved', 'Resources/peak_gpu_mem_reserved_gb',
             torch.cuda.max_memory_reserved(device) / 2**30 if cuda else 0, '<6.2f')]
    fields = ['Status:']
    for label, stat, value, spec in rows:
        value = training_stats.report0(stat, value)
        fields += [label, f'{dnnlib.util.format_time(value):<12s}' if spec is None else format(value, spec)]
    return fields

#----------------------------------------------------------------------------
# One invocation of the training loop, phase by phase. training_loop() below calls them in order.

class TrainingRun:
    """What one call of training_loop trains, and where it stands. Built by the set-up phase (the constructor);
    then `report_and_save()` (status, snapshots, training state) and `step()` alternate until report_and_save() says the
    invocation is done; `close()` cleans up. `o` is training_loop's arguments, by name."""

    def __init__(self, o):
        self.o = o
        self.start_time = time.time()
        self.rank = dist.get_rank()
        self.device = training_device(o.device)
        misc.set_random_seed(o.seed, self.rank)
        use_exact_float32(o.cudnn_benchmark)
        self.batch_gpu, self.batch_gpu_total, self.rounds = batch_layout(o.batch_size, o.batch_gpu,
                                                                         dist.get_world_size())
        net_path = fastpaths.training_path_for(self.device.type, o.train_path)
        self.dataset, self.encoder, self.net = build_parts(o.dataset_kwargs, o.encoder_kwargs, o.network_kwargs,
                                                           self.device, o.dataset)
        if self.rank == 0:
            print_summary(self.net, self.batch_gpu, self.device)
        dist.print0(f'Network path in training: {net_path} (train_path={o.train_path} on {self.device.type})')
        self._set_up_training_state()
        self._resume()
        self.stop_at_nimg = stop_point(self.state.cur_nimg, o.total_nimg, o.slice_nimg, o.batch_size,
                                       o.checkpoint_nimg, o.snapshot_nimg)
        self.start_nimg = self.state.cur_nimg
        self.stopped_early = False
        self.iterator = self.bar = None

    def _set_up_training_state(self):
        """Optimizer, loss, EMA and the training state that checkpoints hold. DDP broadcasts rank 0's initial
        weights; the EMA copies are taken after that."""
        o = self.o
        dist.print0('Setting up training state...')
        self.state = dnnlib.EasyDict(cur_nimg=0, total_elapsed_time=0)
        self.ddp = self.net
        if dist.is_distributed():
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.device] if self.device.type == 'cuda' else None)
        self.train_net = compile_net(self.ddp, o.compile)
        self.loss_fn = dnnlib.util.construct_class_by_name(**o.loss_kwargs)
        self.optimizer = make_optimizer(self.net.parameters(), o.optimizer_kwargs)
        self.ema = dnnlib.util.construct_class_by_name(net=self.net, **o.ema_kwargs) if o.ema_kwargs is not None else None
        self.checkpoint = dist.CheckpointIO(state=self.state, net=self.net, loss_fn=self.loss_fn,
                                            optimizer=self.optimizer, ema=self.ema)
        self.weights = [('net', self.net)] + [(f'ema[{idx}]', ema_net) for idx, ema_net in
                                              enumerate(getattr(self.ema, 'emas', []))]

    def _resume(self):
        """Continue from the newest complete training state in run_dir, if any; stats.jsonl is trimmed to it."""
        run_dir = self.o.run_dir
        if self.rank == 0:
            os.makedirs(run_dir, exist_ok=True)
            remove_stale_temp_files(run_dir)
        dist.barrier()
        resume_newest(self.checkpoint, run_dir, self.rank)
        dist.barrier()
        if self.rank == 0:
            trim_stats(os.path.join(run_dir, 'stats.jsonl'), self.state.cur_nimg)

    def start(self):
        """Start the clocks, the data and the progress bar; nothing trained yet."""
        dist.print0(f'Training from {self.state.cur_nimg // 1000} kimg to {self.stop_at_nimg // 1000} kimg:')
        dist.print0()
        o = self.o
        self.iterator = batches(self.dataset, self.rank, o.seed, self.start_nimg, self.batch_gpu,
                                o.data_loader_kwargs, self.device)
        self.bar = progress_bar(o.progress, self.stop_at_nimg, self.start_nimg)
        self.tick = dnnlib.EasyDict(time=self.start_time, nimg=self.start_nimg, step_time=0)
        self.loop_start_time = time.time()

    # A time limit stops the run at a multiple of lcm(batch, 1024) images, so that the final snapshot and training
    # state have names that map back to their image count: at the first such point from which the next one would not
    # be reached in the time left, judged by this invocation's speed so far. Every invocation trains at least once.

    def _time_is_up(self):
        o, nimg = self.o, self.state.cur_nimg
        granularity = math.lcm(o.batch_size, 1024)
        if o.time_limit is None or nimg <= self.start_nimg or nimg % granularity != 0:
            return False
        now = time.time()
        sec_per_img = (now - self.loop_start_time) / (nimg - self.start_nimg)
        return dist.broadcast_bool(now + sec_per_img * granularity > self.start_time + o.time_limit)

    def report_and_save(self):
        """Between two steps: the status line and stats.jsonl, the snapshots and the training state, each when it
        is due; nothing is saved once a weight is NaN/Inf. Returns True when this invocation is done."""
        o, nimg = self.o, self.state.cur_nimg
        done = nimg >= self.stop_at_nimg
        if not done and self._time_is_up():
            done = self.stopped_early = True
        on_interval = lambda interval: interval is not None and nimg % interval == 0
        resumed_here = nimg == self.start_nimg != 0  # the state just loaded was reported and saved by its own run
        status_due = o.status_nimg is not None and (done or on_interval(o.status_nimg)) and not resumed_here
        snapshot_due = o.snapshot_nimg is not None and (on_interval(o.snapshot_nimg) or self.stopped_early) and \
            not resumed_here
        checkpoint_due = o.checkpoint_nimg is not None and (done or on_interval(o.checkpoint_nimg)) and \
            nimg != self.start_nimg
        if not (status_due or snapshot_due or checkpoint_due):
            return done
        if self.bar is not None:
            self.bar.clear()  # printed lines go above the bar
        where = f'kimg {nimg / 1e3:.1f}'
        if status_due:
            done = self._report_status(where) or done
        bad = first_non_finite(self.weights)  # all ranks hold the same weights, so they all stop here together
        if bad is not None:
            raise TrainingError(f'the weights are no longer finite at {where} ({bad} has NaN/Inf); stopped '
                                f'without saving; check --lr and --ls')
        if snapshot_due and self.rank == 0:
            self._save_snapshots(at_stop=not on_interval(o.snapshot_nimg))
        if checkpoint_due:
            self.checkpoint.save(os.path.join(o.run_dir, f'training-state-{nimg // 1000:07d}.pt'))
            misc.check_ddp_consistency(self.net)
        if self.bar is not None:
            self.bar.refresh()
        return done

    def _report_status(self, where):
        """Print the status line, append the tick's statistics to stats.jsonl (rank 0), start the next tick. Returns
        True when the cluster asks training to stop (never, here)."""
        state, tick = self.state, self.tick
        now = time.time()
        state.total_elapsed_time += now - tick.time
        dist.print0(' '.join(status_fields(state, tick, now, self.device)))
        trained = state.cur_nimg > tick.nimg
        tick.update(time=now, nimg=state.cur_nimg, step_time=0)
        if self.device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(self.device)
        collector = training_stats.default_collector
        collector.update()  # the means over every rank
        if self.rank == 0:
            items = [(name, value.mean) for name, value in collector.as_dict().items()] + [('timestamp', time.time())]
            append_line(os.path.join(self.o.run_dir, 'stats.jsonl'), format_stats_line(items))
        if trained and collector.num('Loss/loss') == 0:
            raise TrainingError(f'the loss was NaN/Inf throughout the tick ending at {where}; stopped without saving '
                                f'(non-finite gradients are zeroed, so nothing was learned); check the data, --lr and --ls')
        dist.update_progress(state.cur_nimg // 1000, self.stop_at_nimg // 1000)  # cluster hooks, no-ops as in EDM2
        if state.cur_nimg == self.stop_at_nimg < self.o.total_nimg:
            dist.request_suspend()
        return dist.should_stop() or dist.should_suspend()

    def _save_snapshots(self, at_stop):
        """One snapshot per tracked EMA (the raw network without EMA); `at_stop` names one off the interval."""
        pairs = self.ema.get() if self.ema is not None else [(self.net, '')]
        for ema_net, suffix in pairs:
            name = snapshot_name(self.state.cur_nimg, suffix, at_stop=at_stop)
            print(f'Saving {name} ... ', end='', flush=True)
            save_snapshot(os.path.join(self.o.run_dir, name), self.encoder, self.o.dataset_kwargs, self.loss_fn, ema_net)
            print('done')

    def step(self):
        """One optimizer step over batch_size images: gradients summed over the micro-batches of every process,
        then Adam and the EMA."""
        o, state = self.o, self.state
        started = time.time()
        misc.set_random_seed(o.seed, self.rank, state.cur_nimg)  # noise, dropout: a function of where we are
        self.optimizer.zero_grad(set_to_none=True)
        for idx in range(self.rounds):
            with misc.ddp_sync(self.ddp, sync=idx == self.rounds - 1):
                self._accumulate(*self._next_batch())
        lr = float(dnnlib.util.call_func_by_name(cur_nimg=state.cur_nimg, batch_size=o.batch_size, **o.lr_kwargs))
        training_stats.report('Loss/learning_rate', lr)
        apply_gradients(self.net, self.optimizer, lr, o.force_finite)
        state.cur_nimg += o.batch_size
        if self.ema is not None:
            self.ema.update(cur_nimg=state.cur_nimg, batch_size=o.batch_size)
        self.tick.step_time += time.time() - started
        if self.bar is not None:
            self.bar.update(o.batch_size)

    def _next_batch(self):
        try:
            images, labels = next(self.iterator)
        except (OSError, ValueError) as e:
            raise TrainingError(f'{data_error_message(e)} (in the step after kimg {self.state.cur_nimg / 1e3:.1f}; '
                                f'stopped without saving anything from that step)') from None
        return self.encoder.encode_latents(images.to(self.device)), labels.to(self.device)

    def _accumulate(self, images, labels):
        with fastpaths.training_path(self.o.train_path):
            loss = self.loss_fn(net=self.train_net, images=images, labels=labels)
        training_stats.report('Loss/loss', loss)
        # Sum over elements, mean over this process's images; DDP averages over processes.
        loss.sum().mul(self.o.loss_scaling / self.batch_gpu_total).backward()

    def close(self):
        """Clean up, however the loop ended: the progress bar goes."""
        if self.bar is not None:
            self.bar.close()

#----------------------------------------------------------------------------

# What training_loop builds when a caller leaves a part out (read only): dicts of `class_name` (`func_name` for the
# schedule) and the constructor's arguments, as training_options.json stores them.
DEFAULT_PARTS = dict(
    dataset_kwargs      = dict(class_name='training.dataset.ImageFolderDataset', path=None),
    encoder_kwargs      = dict(class_name='training.encoders.StandardRGBEncoder'),
    network_kwargs      = dict(class_name='networks.edm2plus.Precond'),
    loss_kwargs         = dict(class_name='training.loss.EDM2Loss'),
    lr_kwargs           = dict(func_name='training.training_loop.learning_rate_schedule'),
    optimizer_kwargs    = dict(class_name='torch.optim.Adam', betas=(0.9, 0.99)),
    ema_kwargs          = dict(class_name='training.phema.PowerFunctionEMA'),
    data_loader_kwargs  = dict(class_name='torch.utils.data.DataLoader', num_workers=2, prefetch_factor=2,
                               pin_memory=True),
)

def check_options(batch_size, batch_gpu, total_nimg, slice_nimg, status_nimg, snapshot_nimg, checkpoint_nimg,
                  device, train_path, **_):
    """Refuse inconsistent sizes and an unknown training path (ValueError) before anything is built or written."""
    batch_layout(batch_size, batch_gpu, dist.get_world_size())
    check_intervals(batch_size, total_nimg, slice_nimg, status_nimg, snapshot_nimg, checkpoint_nimg)
    fastpaths.training_path_for(training_device(device).type, train_path)

def training_loop(
    # What to build (ema_kwargs=None: no EMA, raw snapshots).
    dataset_kwargs=DEFAULT_PARTS['dataset_kwargs'], encoder_kwargs=DEFAULT_PARTS['encoder_kwargs'],
    network_kwargs=DEFAULT_PARTS['network_kwargs'], loss_kwargs=DEFAULT_PARTS['loss_kwargs'],
    lr_kwargs=DEFAULT_PARTS['lr_kwargs'], optimizer_kwargs=DEFAULT_PARTS['optimizer_kwargs'],
    ema_kwargs=DEFAULT_PARTS['ema_kwargs'], data_loader_kwargs=DEFAULT_PARTS['data_loader_kwargs'],
    # Where, and the schedule in images: one step = batch_size images (in micro-batches of at most batch_gpu per
    # process); status line + stats.jsonl, snapshots and training states every status/snapshot/checkpoint_nimg
    # (None: never); this invocation stops after slice_nimg (None: at total_nimg).
    run_dir='.', seed=0,
    batch_size=2048, batch_gpu=None,
    total_nimg=8 << 30, slice_nimg=None,
    status_nimg=128 << 10, snapshot_nimg=8 << 20, checkpoint_nimg=128 << 20,
    # Arithmetic: loss multiplier before backward (never undone), zeroing of NaN/Inf gradients, cuDNN autotuning,
    # device (None: CUDA when available, else CPU).
    loss_scaling=1, force_finite=True, cudnn_benchmark=True, device=None,
    # Beyond EDM2: wall-clock seconds for this invocation, torch.compile of the network (False, True or one of
    # COMPILE_MODES), a tqdm progress bar (None: when stdout is a terminal), the network's path in training (one of
    # networks.fastpaths.TRAINING_PATHS; 'auto': the training path on a CPU, the reference path on CUDA), and the
    # dataset that dataset_kwargs describe if the caller has opened it already (it is then not opened again).
    time_limit=None, compile=False, progress=None, train_path='auto', dataset=None,
):
    """Train until total_nimg (or the end of this slice, or the time limit); return the image count reached.

    The phases, in order: the options are checked (before anything is written), the run directory is locked, the
    set-up (TrainingRun) builds the parts, resumes and decides where to stop; then report_and_save() (status line,
    stats.jsonl, snapshots, training state) and step() (one optimizer step) alternate until it is done, and close()
    cleans up however it ended. Importing this module (it imports `networks`) makes glibc keep freed memory
    (torch_utils.misc.keep_freed_cpu_memory), which training on a CPU needs for its speed."""
    o = dnnlib.EasyDict(locals())  # every argument, by name
    check_options(**o)  # a refused option leaves run_dir untouched
    with dist.run_dir_lock(run_dir):  # one training per run directory (train_edm2plus.py holds it already)
        run = TrainingRun(o)
        if run.state.cur_nimg >= run.stop_at_nimg:
            dist.print0(f'Nothing to do: training already reached {run.state.cur_nimg // 1000} kimg '
                        f'(duration {total_nimg // 1000} kimg).')
            return run.state.cur_nimg
        run.start()
        try:
            while not run.report_and_save():
                run.step()
        finally:
            run.close()
    if run.stopped_early:
        dist.print0(f'Stopped at the time limit ({time_limit / 60:g} min) at kimg {run.state.cur_nimg / 1e3:.1f}; '
                    f'rerun the same command to continue.')
    return run.state.cur_nimg
