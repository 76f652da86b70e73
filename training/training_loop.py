"""The EDM2 training loop (spec §2.2-§2.14) on CUDA or CPU, single process or under torchrun.

`training_loop(**config)` is what `train_edm2plus.py` calls with the config it also writes to
training_options.json. Everything that decides the result (data order, noise levels, noise, dropout) is a function
of (seed, rank, cur_nimg) (spec §2.12), so a run that is interrupted and resumed from its newest
`training-state-*.pt` continues exactly as if it had never stopped (for the same number of processes).
"""

import copy
import json
import math
import os
import pickle
import re
import sys
import time

import numpy as np
import psutil
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import training_stats
from training.loss import EDM2Loss  # noqa: F401  (EDM2 configs name it `training.training_loop.EDM2Loss`)

#----------------------------------------------------------------------------
# Learning-rate schedule (spec §2.4; EDM2 paper eq. 15): constant ref_lr after a linear warm-up over rampup_Mimg
# million images, then inverse-square-root decay once ref_batches optimizer steps have been taken.

def learning_rate_schedule(cur_nimg, batch_size, ref_lr=100e-4, ref_batches=70e3, rampup_Mimg=10):
    lr = ref_lr
    if ref_batches > 0:
        lr /= np.sqrt(max(cur_nimg / (ref_batches * batch_size), 1))
    if rampup_Mimg > 0:
        lr *= min(cur_nimg / (rampup_Mimg * 1e6), 1)
    return float(lr)

#----------------------------------------------------------------------------
# Batch bookkeeping (spec §2.3). Raises ValueError with a readable message, so that CLIs can report it.

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
    names hold nimg // 1000 and post-hoc EMA maps kimg back to nimg assuming multiples of 1024 (spec §3.6)."""
    if total_nimg <= 0 or total_nimg % batch_size != 0:
        raise ValueError(f'duration {total_nimg} must be a positive multiple of the batch size {batch_size}')
    for name, value, granularity in [('slice', slice_nimg, batch_size), ('status', status_nimg, batch_size),
                                     ('snapshot', snapshot_nimg, math.lcm(batch_size, 1024)),
                                     ('checkpoint', checkpoint_nimg, math.lcm(batch_size, 1024))]:
        if value is not None and (value <= 0 or value % granularity != 0):
            raise ValueError(f'{name} interval {value} must be a positive multiple of {granularity} images')

#----------------------------------------------------------------------------
# stats.jsonl (spec §2.10): one line per status tick, `%g` numbers except kimg/timestamp (`%.3f`), bare NaN.

def format_stats_line(items):
    """items: [(name, float)] -> one JSON object line (with trailing newline)."""
    fields = []
    for name, value in items:
        value = float(value)
        if math.isnan(value):
            text = 'NaN'
        elif math.isinf(value):
            text = 'Infinity' if value > 0 else '-Infinity'
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
# Snapshot pickle (spec §2.10): EasyDict(encoder, dataset_kwargs, loss_fn, ema) with the EMA net in float16 on CPU.

def save_snapshot(path, encoder, dataset_kwargs, loss_fn, ema_net):
    data = dnnlib.EasyDict(encoder=encoder, dataset_kwargs=dnnlib.EasyDict(dataset_kwargs), loss_fn=loss_fn)
    data.ema = copy.deepcopy(ema_net).cpu().eval().requires_grad_(False).to(torch.float16)
    with dnnlib.util.atomic_write(path, 'wb') as f:
        pickle.dump(data, f)

#----------------------------------------------------------------------------

def training_loop(
    dataset_kwargs      = dict(class_name='training.dataset.ImageFolderDataset', path=None),
    encoder_kwargs      = dict(class_name='training.encoders.StandardRGBEncoder'),
    data_loader_kwargs  = dict(class_name='torch.utils.data.DataLoader', pin_memory=True, num_workers=2, prefetch_factor=2),
    network_kwargs      = dict(class_name='networks.edm2plus.Precond'),
    loss_kwargs         = dict(class_name='training.loss.EDM2Loss'),
    optimizer_kwargs    = dict(class_name='torch.optim.Adam', betas=(0.9, 0.99)),
    lr_kwargs           = dict(func_name='training.training_loop.learning_rate_schedule'),
    ema_kwargs          = dict(class_name='training.phema.PowerFunctionEMA'),  # None: no EMA, raw snapshots

    run_dir             = '.',      # Output directory (snapshots, checkpoints, stats.jsonl).
    seed                = 0,        # Global seed; everything random derives from (seed, rank, cur_nimg).
    batch_size          = 2048,     # Total batch over all processes and accumulation rounds.
    batch_gpu           = None,     # Per-process micro-batch limit; None = no limit.
    total_nimg          = 8<<30,    # Train until this many images.
    slice_nimg          = None,     # Stop this invocation after this many images; None = no limit.
    status_nimg         = 128<<10,  # Status line + stats.jsonl interval; None = disable.
    snapshot_nimg       = 8<<20,    # Network snapshot interval; None = disable.
    checkpoint_nimg     = 128<<20,  # Training-state interval; None = disable.

    loss_scaling        = 1,        # Loss multiplier before backward (not undone; spec §2.6).
    force_finite        = True,     # Replace NaN/Inf gradients by zero.
    cudnn_benchmark     = True,     # torch.backends.cudnn.benchmark.
    device              = None,     # None: CUDA when available, else CPU.
    time_limit          = None,     # Wall-clock seconds for this invocation; None = no limit (beyond EDM2).
    compile             = False,    # torch.compile the training forward pass (beyond EDM2).
    progress            = None,     # tqdm progress bar; None = when stdout is a terminal (beyond EDM2).
):
    #------------------------------------------------------------------------
    # Initialise.

    start_time = time.time()
    prev_status_time = start_time
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if device is None:
        device = torch.device('cuda') if torch.cuda.is_available() else torch.device('cpu')
    device = torch.device(device)
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', torch.cuda.current_device())
    misc.set_random_seed(seed, rank)
    # Exact float32 arithmetic as in EDM2 (spec §2.7): no TF32, no reduced-precision fp16 reductions.
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False

    # Batch layout and intervals (spec §2.3).
    batch_gpu, batch_gpu_total, num_accumulation_rounds = batch_layout(batch_size, batch_gpu, world_size)
    check_intervals(batch_size, total_nimg, slice_nimg, status_nimg, snapshot_nimg, checkpoint_nimg)

    # Dataset and encoder; the first item fixes the network's interface (spec §2.2).
    dist.print0('Loading dataset...')
    dataset_obj = dnnlib.util.construct_class_by_name(**dataset_kwargs)
    ref_image, ref_label = dataset_obj[0]
    dist.print0('Setting up encoder...')
    encoder = dnnlib.util.construct_class_by_name(**encoder_kwargs)
    ref_image = encoder.encode_latents(torch.as_tensor(ref_image).to(device).unsqueeze(0))

    # Network.
    dist.print0('Constructing network...')
    interface_kwargs = dict(img_resolution=ref_image.shape[-1], img_channels=ref_image.shape[1], label_dim=ref_label.shape[-1])
    net = dnnlib.util.construct_class_by_name(**network_kwargs, **interface_kwargs)
    net.train().requires_grad_(True).to(device)
    if rank == 0:
        misc.print_module_summary(net, [
            torch.zeros([batch_gpu, net.img_channels, net.img_resolution, net.img_resolution], device=device),
            torch.ones([batch_gpu], device=device),
            torch.zeros([batch_gpu, net.label_dim], device=device),
        ], max_nesting=2)

    # Training state. DDP broadcasts rank 0's initial weights; the EMA copies are taken after that.
    dist.print0('Setting up training state...')
    state = dnnlib.EasyDict(cur_nimg=0, total_elapsed_time=0)
    ddp = net
    if dist.is_distributed():
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == 'cuda' else None)
    train_net = torch.compile(ddp) if compile else ddp
    loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)
    optimizer = dnnlib.util.construct_class_by_name(params=net.parameters(), **optimizer_kwargs)
    ema = dnnlib.util.construct_class_by_name(net=net, **ema_kwargs) if ema_kwargs is not None else None
    checkpoint = dist.CheckpointIO(state=state, net=net, loss_fn=loss_fn, optimizer=optimizer, ema=ema)
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        remove_stale_temp_files(run_dir)
    checkpoint.load_latest(run_dir)
    dist.barrier()
    if rank == 0:
        trim_stats(os.path.join(run_dir, 'stats.jsonl'), state.cur_nimg)

    # Where this invocation stops.
    stop_at_nimg = total_nimg
    if slice_nimg is not None:
        granularity = checkpoint_nimg if checkpoint_nimg is not None else snapshot_nimg if snapshot_nimg is not None else batch_size
        slice_end_nimg = (state.cur_nimg + slice_nimg) // granularity * granularity
        stop_at_nimg = min(stop_at_nimg, max(slice_end_nimg, state.cur_nimg + batch_size))
    if state.cur_nimg >= stop_at_nimg:
        dist.print0(f'Nothing to do: training already reached {state.cur_nimg // 1000} kimg (duration {total_nimg // 1000} kimg).')
        return state.cur_nimg
    dist.print0(f'Training from {state.cur_nimg // 1000} kimg to {stop_at_nimg // 1000} kimg:')
    dist.print0()

    # Data order continues where the checkpoint left off (spec §7.2).
    dataset_sampler = misc.InfiniteSampler(dataset=dataset_obj, rank=rank, num_replicas=world_size, seed=seed, start_idx=state.cur_nimg)
    data_loader_kwargs = dict(data_loader_kwargs)
    if data_loader_kwargs.get('num_workers', 0) == 0:
        data_loader_kwargs.pop('prefetch_factor', None)  # only valid with worker processes
    if device.type != 'cuda':
        data_loader_kwargs['pin_memory'] = False
    dataset_iterator = iter(dnnlib.util.construct_class_by_name(dataset=dataset_obj, sampler=dataset_sampler,
                                                                batch_size=batch_gpu, **data_loader_kwargs))

    # A wall-clock limit stops at a multiple of lcm(batch, 1024) images, so that the final snapshot has a valid
    # post-hoc EMA name (spec §3.6): at the first such point from which the next one would not be reached in the
    # time left, judged by this invocation's speed so far. Every invocation trains at least one such block.
    stop_granularity = math.lcm(batch_size, 1024)
    deadline = start_time + time_limit if time_limit is not None else None
    def time_is_up():
        now = time.time()
        sec_per_img = (now - loop_start_time) / (state.cur_nimg - start_nimg)
        return dist.broadcast_bool(now + sec_per_img * stop_granularity > deadline)

    # Progress bar on rank 0, written to the real terminal (not into log.txt).
    if progress is None:
        progress = sys.__stdout__ is not None and sys.__stdout__.isatty()
    bar = None
    if progress and rank == 0:
        import tqdm  # pylint: disable=import-outside-toplevel
        bar = tqdm.tqdm(total=stop_at_nimg, initial=state.cur_nimg, unit='img', unit_scale=True, dynamic_ncols=True,
                        file=sys.__stderr__, desc='Training', leave=False)

    #------------------------------------------------------------------------
    # Main loop (spec §2.9).

    start_nimg = state.cur_nimg
    prev_status_nimg = state.cur_nimg
    cumulative_training_time = 0
    stopped_early = False
    stats_jsonl = os.path.join(run_dir, 'stats.jsonl')
    loop_start_time = time.time()
    while True:
        done = (state.cur_nimg >= stop_at_nimg)
        if not done and deadline is not None and state.cur_nimg > start_nimg and state.cur_nimg % stop_granularity == 0 and time_is_up():
            done = stopped_early = True
        resumed_here = (state.cur_nimg == start_nimg and start_nimg != 0)
        status_due = status_nimg is not None and (done or state.cur_nimg % status_nimg == 0) and not resumed_here
        snapshot_due = snapshot_nimg is not None and (state.cur_nimg % snapshot_nimg == 0 or stopped_early) and not resumed_here
        checkpoint_due = checkpoint_nimg is not None and (done or state.cur_nimg % checkpoint_nimg == 0) and state.cur_nimg != start_nimg
        if bar is not None and (status_due or snapshot_due or checkpoint_due):
            bar.clear()  # printed lines go above the bar

        #--------------------------------------------------------------------
        # Status line and stats.jsonl (spec §2.13), not at the very start of a resumed run.

        if status_due:
            cur_time = time.time()
            state.total_elapsed_time += cur_time - prev_status_time
            cur_process = psutil.Process(os.getpid())
            cpu_memory_usage = sum(p.memory_info().rss for p in [cur_process] + cur_process.children(recursive=True))
            on_cuda = device.type == 'cuda'
            fields = ['Status:']
            fields += ['kimg',        f"{training_stats.report0('Progress/kimg', state.cur_nimg / 1e3):<9.1f}"]
            fields += ['time',        f"{dnnlib.util.format_time(training_stats.report0('Timing/total_sec', state.total_elapsed_time)):<12s}"]
            fields += ['sec/tick',    f"{training_stats.report0('Timing/sec_per_tick', cur_time - prev_status_time):<8.2f}"]
            fields += ['sec/kimg',    f"{training_stats.report0('Timing/sec_per_kimg', cumulative_training_time / max(state.cur_nimg - prev_status_nimg, 1) * 1e3):<7.3f}"]
            fields += ['maintenance', f"{training_stats.report0('Timing/maintenance_sec', cur_time - prev_status_time - cumulative_training_time):<7.2f}"]
            fields += ['cpumem',      f"{training_stats.report0('Resources/cpu_mem_gb', cpu_memory_usage / 2**30):<6.2f}"]
            fields += ['gpumem',      f"{training_stats.report0('Resources/peak_gpu_mem_gb', torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else 0):<6.2f}"]
            fields += ['reserved',    f"{training_stats.report0('Resources/peak_gpu_mem_reserved_gb', torch.cuda.max_memory_reserved(device) / 2**30 if on_cuda else 0):<6.2f}"]
            dist.print0(' '.join(fields))
            trained_this_tick = state.cur_nimg > prev_status_nimg
            cumulative_training_time = 0
            prev_status_nimg = state.cur_nimg
            prev_status_time = cur_time
            if on_cuda:
                torch.cuda.reset_peak_memory_stats(device)

            # Collect statistics of all ranks; rank 0 writes them.
            training_stats.default_collector.update()
            if trained_this_tick and training_stats.default_collector.num('Loss/loss') == 0:
                dist.print0(f'Warning: the loss was NaN/Inf throughout the tick ending at kimg {state.cur_nimg / 1e3:.1f} '
                            f'(non-finite gradients are zeroed, so nothing was learned); check the data, --lr and --ls.')
            if rank == 0:
                items = [(name, value.mean) for name, value in training_stats.default_collector.as_dict().items()]
                append_line(stats_jsonl, format_stats_line(items + [('timestamp', time.time())]))

            # Cluster hooks (no-ops here, as in EDM2).
            dist.update_progress(state.cur_nimg // 1000, stop_at_nimg // 1000)
            if state.cur_nimg == stop_at_nimg and state.cur_nimg < total_nimg:
                dist.request_suspend()
            if dist.should_stop() or dist.should_suspend():
                done = True

        #--------------------------------------------------------------------
        # Network snapshots, one per tracked EMA (rank 0). A fresh run writes them at nimg 0 too; a run stopped
        # by its time limit always ends with one.

        if snapshot_due and rank == 0:
            for ema_net, ema_suffix in (ema.get() if ema is not None else [(net, '')]):
                fname = f'network-snapshot-{state.cur_nimg // 1000:07d}{ema_suffix}.pkl'
                print(f'Saving {fname} ... ', end='', flush=True)
                save_snapshot(os.path.join(run_dir, fname), encoder, dataset_kwargs, loss_fn, ema_net)
                print('done')

        #--------------------------------------------------------------------
        # Training state: at every interval and always at the end, never at the start (spec §2.9.3).

        if checkpoint_due:
            checkpoint.save(os.path.join(run_dir, f'training-state-{state.cur_nimg // 1000:07d}.pt'))
            misc.check_ddp_consistency(net)

        if bar is not None and (status_due or snapshot_due or checkpoint_due):
            bar.refresh()
        if done:
            break

        #--------------------------------------------------------------------
        # One optimizer step: `num_accumulation_rounds` micro-batches per process (spec §2.9.5-7).

        batch_start_time = time.time()
        misc.set_random_seed(seed, rank, state.cur_nimg)
        optimizer.zero_grad(set_to_none=True)
        for round_idx in range(num_accumulation_rounds):
            with misc.ddp_sync(ddp, (round_idx == num_accumulation_rounds - 1)):
                images, labels = next(dataset_iterator)
                images = encoder.encode_latents(images.to(device))
                loss = loss_fn(net=train_net, images=images, labels=labels.to(device))
                training_stats.report('Loss/loss', loss)
                # Sum over elements, mean over this process's images; DDP averages over processes (spec §2.6).
                loss.sum().mul(loss_scaling / batch_gpu_total).backward()

        lr = float(dnnlib.util.call_func_by_name(cur_nimg=state.cur_nimg, batch_size=batch_size, **lr_kwargs))
        training_stats.report('Loss/learning_rate', lr)
        for g in optimizer.param_groups:
            g['lr'] = lr
        if force_finite:
            for param in net.parameters():
                if param.grad is not None:
                    torch.nan_to_num(param.grad, nan=0, posinf=0, neginf=0, out=param.grad)
        optimizer.step()

        state.cur_nimg += batch_size
        if ema is not None:
            ema.update(cur_nimg=state.cur_nimg, batch_size=batch_size)
        cumulative_training_time += time.time() - batch_start_time
        if bar is not None:
            bar.update(batch_size)

    #------------------------------------------------------------------------
    # Done.

    if bar is not None:
        bar.close()
    if stopped_early:
        dist.print0(f'Stopped at the time limit ({time_limit / 60:g} min) at kimg {state.cur_nimg / 1e3:.1f}; '
                    f'rerun the same command to continue.')
    return state.cur_nimg

#----------------------------------------------------------------------------
