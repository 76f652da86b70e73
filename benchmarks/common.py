"""Option handling shared by the A-vs-G* benchmark scripts."""

import os

import click
import torch

from torch_utils import distributed as dist

IMPLEMENTATIONS = ('reference', 'fast')

def setup(device, impls, threads):
    """Check --device/--impls/--threads and apply --threads. Returns (device, chosen implementations, description
    of the device for the first line of output)."""
    device = torch.device(device) if device else dist.device()
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise click.ClickException('--device=cuda: no CUDA device is available')
    chosen = [s.strip() for s in impls.split(',') if s.strip()]
    for name in chosen:
        if name not in IMPLEMENTATIONS:
            raise click.ClickException(f'--impls: unknown implementation "{name}" (choose from reference, fast)')
    if threads is not None:
        torch.set_num_threads(threads)
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else \
        f'CPU, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}'
    return device, chosen, where
