"""Post-hoc EMA reconstruction from saved snapshots (EDM2 paper Sec. 3.2 and Appendix C.2; file names and
formats in docs/compatibility.md §3 and §6).

`reconstruct_phema` streams over the input snapshots once per batch of outputs, so memory holds one input network
plus the batch of outputs. The coefficients come from training.phema.solve_posthoc_coefficients.
"""

import copy
import math
import os
import pickle
import re

import numpy as np
import torch

import dnnlib
from networks.loading import count_non_finite, load_snapshot
from torch_utils import cli
from torch_utils import misc
from training.phema import name_collision, solve_posthoc_coefficients

MAX_STD = 0.289  # σ_rel limit of the tools; 1/sqrt(12) ≈ 0.2887 corresponds to γ = 0.

#----------------------------------------------------------------------------
# File naming (docs/compatibility.md §3).

_PKL_NAME = re.compile(r'(.*)-(\d+)-(\d+\.\d+)\.pkl')

def kimg_to_nimg(kimg):
    """Image count of a snapshot named with `kimg` = nimg // 1000.

    The name loses the last three digits; EDM2 recovers them by assuming nimg is a multiple of 1024, i.e. the
    largest multiple of 1024 that still floors to `kimg`. Raises ValueError when no such multiple exists.
    """
    kimg = int(kimg)
    nimg = (kimg * 1000 + 999) // 1024 * 1024
    if kimg < 0 or nimg // 1000 != kimg:
        raise ValueError(f'kimg {kimg} does not correspond to a multiple of 1024 images')
    return nimg

def output_path(out_dir, out_prefix, out_nimg, std):
    """`<out_dir>/<out_prefix>-{nimg//1000:07d}-{std:.3f}.pkl`."""
    return os.path.join(out_dir, f'{out_prefix}-{out_nimg // 1000:07d}-{std:.3f}.pkl')

def parse_pickle_name(name):
    """EasyDict(prefix, kimg, std) for a file name matching `<prefix>-<kimg>-<std>.pkl`, else None."""
    m = _PKL_NAME.fullmatch(os.path.basename(name))
    if m is None:
        return None
    return dnnlib.EasyDict(prefix=m.group(1), kimg=int(m.group(2)), std=float(m.group(3)))

def list_input_pickles(in_dir, in_prefix=None, in_std=None):
    """Snapshots in `in_dir` (not recursive) as EasyDict(path, nimg, std), sorted by (nimg, std).

    `in_prefix` keeps only names with that prefix; `in_std` (list of floats) keeps only those stds, compared at the
    three decimals that the file names hold.
    """
    if not os.path.isdir(in_dir):
        raise FileNotFoundError(f'Input directory does not exist: {in_dir}')
    keep_stds = None if in_std is None else {f'{s:.3f}' for s in in_std}
    pkls = []
    for name in sorted(os.listdir(in_dir)):
        path = os.path.join(in_dir, name)
        info = parse_pickle_name(name)
        if info is None or not os.path.isfile(path):
            continue
        if in_prefix is not None and info.prefix != in_prefix:
            continue
        if keep_stds is not None and f'{info.std:.3f}' not in keep_stds:
            continue
        try:
            nimg = kimg_to_nimg(info.kimg)
        except ValueError as e:
            raise ValueError(f'{path}: {e}; cannot recover its training time') from None
        pkls.append(dnnlib.EasyDict(path=path, nimg=nimg, std=info.std))
    return sorted(pkls, key=lambda p: (p.nimg, p.std))

#----------------------------------------------------------------------------
# Std lists such as '0.010,0.015,...,0.250'.

def parse_std_list(text):
    """Sorted unique floats from a comma list; `a,b,...,c` continues the progression a, b in steps of b-a up to c.

    Accepts a string or an iterable of numbers. Raises ValueError with EDM2's messages.
    """
    tokens = text.split(',') if isinstance(text, str) else list(text)
    values = []
    pending = False  # True right after '...': the next float closes the progression.
    for token in tokens:
        if isinstance(token, str):
            token = token.strip()
        if token == '...':
            if pending:
                raise ValueError("'...' must be followed by at least one float")
            if len(values) < 2:
                raise ValueError("'...' must be preceded by at least two floats")
            pending = True
            continue
        try:
            value = float(token)
        except (TypeError, ValueError):
            raise ValueError(f"'{token}' is not a float") from None
        if pending:
            prevprev, prev = values[-2], values[-1]
            if prev == prevprev:
                raise ValueError("The floats preceding '...' must not be equal")
            step = prev - prevprev
            exact = (value - prev) / step - 1
            count = round(exact)
            if count <= 0:
                raise ValueError("'...' must correspond to a non-empty interval")
            if abs(count - exact) > 1e-4:
                raise ValueError("'...' must correspond to an evenly spaced interval")
            values += [prev + step * (j + 1) for j in range(count)]
            pending = False
        values.append(value)
    if pending:
        raise ValueError("'...' must be followed by at least one float")
    for value in values:
        if not 0 < value < MAX_STD:  # also rejects NaN
            raise ValueError(f'Relative standard deviation must be positive and less than {MAX_STD}')
    values = sorted(set(values))
    # Two lengths that round alike would be written to one file (and records of a sweep would merge them).
    collision = name_collision(values)
    if collision is not None:
        a, b = collision
        raise ValueError(f'{a:g} and {b:g} are the same EMA length at the three decimals that file names hold '
                         f'({a:.3f}); give lengths that differ in the first three decimals')
    return values

def check_outputs_not_inputs(in_pkls, out_dir, out_prefix, out_nimg, out_std):
    """ValueError if a reconstruction would be written over one of its input snapshots (e.g. --outdir=--indir with
    --outprefix=network-snapshot): the input would be lost, and read back in place of the reconstruction. `out_std`
    is a list of stds as parse_std_list returns it (checked already)."""
    if out_dir is None:
        return
    inputs = [('--indir', p.path) for p in in_pkls]
    for std in out_std:
        reason = cli.input_overwrite(output_path(out_dir, out_prefix, out_nimg, std), inputs)
        if reason is not None:
            raise ValueError(reason + '; choose another --outdir or --outprefix')

#----------------------------------------------------------------------------
# Reconstruction (EDM2 paper Appendix C.2).

def _check_finite_output(out):
    """Never write a non-finite reconstruction: finite inputs (load_snapshot checks them) can still overflow
    float16 when the solved coefficients are large."""
    count, first = count_non_finite(out.net)
    if count:
        where = out.pkl_path if out.pkl_path is not None else f'the reconstruction with std {out.std:g}'
        raise ValueError(f'{where}: not written: {count} weight value(s) are not finite in float16, first in '
                         f'{first}; choose inputs and stds closer together')

def _param_signature(net):
    return [(name, tuple(p.shape)) for name, p in net.named_parameters()]

def reconstruct_phema(in_pkls, out_std, out_nimg=None, out_dir=None, out_prefix='phema', skip_existing=False,
                      max_batch_size=8, verbose=True):
    """Reconstruct the EMA networks with relative stds `out_std` at training time `out_nimg` from snapshots.

    `in_pkls`: records EasyDict(path, nimg, std) as from list_input_pickles. `out_nimg` defaults to the latest
    input time and must equal some input's time. Returns an iterable (with len = batches × inputs) that does the
    work while it is consumed; each step yields EasyDict(step_idx, num_steps, out), where `out` lists
    EasyDict(net, nimg, std, pkl_data, pkl_path) after the last input of a batch and is empty otherwise.
    With `out_dir` set, every output is written there (atomically) in the snapshot format (docs/compatibility.md §3).
    """
    # Inputs: snapshots at nimg 0 say nothing about the trajectory and are ignored.
    in_pkls = [dnnlib.EasyDict(p) for p in in_pkls if p['nimg'] > 0]
    if out_nimg is None:
        if len(in_pkls) == 0:
            raise ValueError('No valid input pickles found')
        out_nimg = max(p.nimg for p in in_pkls)
    elif not any(p.nimg == out_nimg for p in in_pkls):
        raise ValueError('Reconstruction time must match one of the input pickles')
    in_pkls = sorted([p for p in in_pkls if p.nimg <= out_nimg], key=lambda p: (p.nimg, p.std))
    if len(in_pkls) == 0:
        raise ValueError('No valid input pickles found')
    if len({(p.nimg, p.std) for p in in_pkls}) != len(in_pkls):
        raise ValueError('Several input pickles share the same time and std; select one run with --inprefix')

    # Outputs, split into near-equal batches.
    out_std = parse_std_list(out_std)
    check_outputs_not_inputs(in_pkls, out_dir, out_prefix, out_nimg, out_std)
    if skip_existing and out_dir is not None:
        out_std = [s for s in out_std if not os.path.isfile(output_path(out_dir, out_prefix, out_nimg, s))]
    num_batches = math.ceil(len(out_std) / max_batch_size)
    batches = [list(b) for b in np.array_split(np.array(out_std, dtype=np.float64), num_batches)] if out_std else []

    if verbose:
        print(f'Loading {len(in_pkls)} input pickles...')
        for p in in_pkls:
            print('    ' + p.path)
        print(f'Reconstructing {len(out_std)} output pickles in {len(batches)} batches...')
        for i, batch in enumerate(batches):
            for std in batch:
                path = output_path(out_dir, out_prefix, out_nimg, std) if out_dir is not None else '<not saved>'
                print(f'    batch {i}: {path}')

    num_steps = len(batches) * len(in_pkls)
    return misc.SizedIterable(_reconstruct(in_pkls, batches, out_nimg, out_dir, out_prefix, num_steps), num_steps)

@torch.no_grad()
def _reconstruct(in_pkls, batches, out_nimg, out_dir, out_prefix, num_steps):
    step_idx = 0
    for batch in batches:
        coefs = solve_posthoc_coefficients([p.nimg for p in in_pkls], [p.std for p in in_pkls], out_nimg, batch)
        outs = []
        for i, in_pkl in enumerate(in_pkls):
            data = load_snapshot(in_pkl.path, verbose=False, native=False)  # Outputs keep the inputs' classes.
            net = data.ema.to(torch.float32)  # Accumulate in float32; snapshots are float16.
            if i == 0:
                # Outputs inherit the first input's dict (encoder, dataset_kwargs, loss_fn).
                signature = _param_signature(net)
                for std in batch:
                    pkl_data = copy.deepcopy(data)
                    for p in pkl_data.ema.parameters():
                        p.zero_()
                    path = output_path(out_dir, out_prefix, out_nimg, std) if out_dir is not None else None
                    outs.append(dnnlib.EasyDict(net=pkl_data.ema, nimg=out_nimg, std=std, pkl_data=pkl_data,
                                                pkl_path=path))
            elif _param_signature(net) != signature:
                raise ValueError(f'{in_pkl.path}: network differs from {in_pkls[0].path}; '
                                 'inputs must come from one training run')
            for k, out in enumerate(outs):
                for p_out, p_in in zip(out.net.parameters(), net.parameters()):
                    p_out.add_(p_in, alpha=float(coefs[i, k]))
                for b_out, b_in in zip(out.net.buffers(), net.buffers()):
                    b_out.copy_(b_in)  # Buffers end up equal to the last input's.
            del data, net

            if i == len(in_pkls) - 1:
                for out in outs:
                    out.net.to(torch.float16).eval().requires_grad_(False)  # Snapshot format.
                    _check_finite_output(out)
                    if out.pkl_path is not None:
                        with dnnlib.util.atomic_write(out.pkl_path, 'wb') as f:
                            pickle.dump(out.pkl_data, f)
            step_idx += 1
            yield dnnlib.EasyDict(step_idx=step_idx - 1, num_steps=num_steps,
                                  out=outs if i == len(in_pkls) - 1 else [])
