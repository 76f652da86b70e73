"""The weights-only network format (.pt) and the converter from snapshot pickles: `python -m networks.export IN OUT`.

A snapshot pickle runs the code stored inside it when loaded (docs/compatibility.md §2). The weights-only file holds no code:
it is a `torch.save` of a plain dict

    format        'edm2plus-weights'
    version       1
    architecture  JSON text: {"network": {"class_name", "init_args", "init_kwargs"},
                              "encoder": {"class_name", "init_args", "init_kwargs"} or null,
                              "dataset_kwargs": {...} or null, "loss": {"class_name", "init_kwargs"} or null,
                              "source": file it was exported from}
    state_dict    {name: tensor} of the network, in the stored dtype (float16 for snapshots: small files)

and is read with `torch.load(weights_only=True)`, whose unpickler only rebuilds tensors and plain containers. Class
names are looked up in fixed tables of our own classes (never imported by name from the file), so the file decides
only the arguments of those constructors and the values of the tensors. Every tool reads it through
networks.loading, wherever it accepts a network path.
"""

import json
import os

import click
import torch

import dnnlib
from networks import loading
from torch_utils import cli

_LOSS_ATTRS = ('P_mean', 'P_std', 'sigma_data')  # EDM2Loss state (docs/compatibility.md §3)

#----------------------------------------------------------------------------
# Writing.

def weights_dict(snapshot, source=None):
    """The dict stored in a weights-only file, for a snapshot (EasyDict with `ema`, as from load_snapshot)."""
    net = loading.to_native(snapshot['ema'], name=source)
    if not loading.is_native(net):
        raise ValueError(f'{source or "network"}: cannot export: its {type(net).__name__} cannot be rebuilt as '
                         'networks.edm2plus.Precond')
    try:
        encoder = _describe_encoder(snapshot.get('encoder'))
    except ValueError as e:
        raise ValueError(f'{source or "network"}: {e}') from None
    arch = dict(network=dict(class_name='networks.edm2plus.Precond', init_args=list(net.init_args),
                             init_kwargs=dict(net.init_kwargs)),
                encoder=encoder,
                dataset_kwargs=(dict(snapshot['dataset_kwargs']) if snapshot.get('dataset_kwargs') is not None else None),
                loss=_describe_loss(snapshot.get('loss_fn')),
                source=(os.path.basename(source) if source is not None else None))
    try:
        text = json.dumps(arch, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f'{source or "network"}: cannot export: the architecture is not expressible in JSON ({e})') from None
    state = {key: value.detach().cpu().clone() for key, value in net.state_dict().items()}
    return dict(format=loading.WEIGHTS_FORMAT, version=loading.WEIGHTS_VERSION, architecture=text, state_dict=state)

def _describe_encoder(encoder):
    if encoder is None:
        return None
    class_name = f'training.encoders.{type(encoder).__name__}'
    if class_name not in loading.ALLOWED_CLASSES['encoder'] or getattr(encoder, '_init_kwargs', None) is None:
        raise ValueError(f'cannot export the encoder {type(encoder).__name__}: not one of ours, or it did not record '
                         'its constructor arguments')
    init_args, init_kwargs = list(encoder._init_args or []), dict(encoder._init_kwargs)  # pylint: disable=protected-access
    vae_name = getattr(encoder, 'vae_name', None)
    if isinstance(vae_name, str):  # the VAE it decodes with now, also when set after construction
        if init_args:
            init_args[0] = vae_name  # StabilityVAEEncoder's first parameter, in EDM2 too
        else:
            init_kwargs['vae_name'] = vae_name
    return dict(class_name=class_name, init_args=init_args, init_kwargs=init_kwargs)

def _describe_loss(loss_fn):
    if loss_fn is None or type(loss_fn).__name__ != 'EDM2Loss':
        return None  # Tools do not use the loss; an unknown one is simply left out.
    return dict(class_name='training.loss.EDM2Loss', init_kwargs={k: getattr(loss_fn, k) for k in _LOSS_ATTRS if hasattr(loss_fn, k)})

def save_weights(snapshot, path, source=None):
    """Write `snapshot` (a dict with `ema`) as a weights-only file at `path`, atomically."""
    data = weights_dict(snapshot, source=source)
    with dnnlib.util.atomic_write(path, 'wb') as f:
        torch.save(data, f)
    return data

def _check_not_input(in_path, out_path):
    reason = cli.input_overwrite(out_path, {'IN': in_path})
    if reason is not None:
        raise ValueError(reason)

def export(in_path, out_path, verbose=True):
    """Convert the network file `in_path` (a pickle, ours or EDM2's, or a weights-only file) to `out_path`."""
    _check_not_input(in_path, out_path)
    snapshot = loading.load_snapshot(in_path, verbose=verbose)
    data = save_weights(snapshot, out_path, source=in_path)
    if verbose:
        num = sum(t.numel() for t in data['state_dict'].values())
        dtypes = sorted({str(t.dtype).replace('torch.', '') for t in data['state_dict'].values()})
        print(f'Wrote {out_path}: {len(data["state_dict"])} tensors, {num / 1e6:.2f}M values ({", ".join(dtypes)}), '
              f'{os.path.getsize(out_path) / 2**20:.1f} MiB')

#----------------------------------------------------------------------------

@click.command(help=f"""Convert a network snapshot into the weights-only .pt format.

\b
python -m networks.export network-snapshot-0008388-0.050.pkl net-0008388-0.050.pt
python -m networks.export edm2-img512-xs-2147483-0.135.pkl edm2-img512-xs-0.135.pt

IN is a snapshot pickle written by EDM2 or by EDM2+ (path or URL). OUT holds only tensors and a JSON description of
the architecture, is loaded with torch.load(weights_only=True), and is accepted by every tool wherever a network
path is. {loading.PICKLE_WARNING} Converting reads IN once, so IN must be a file you trust.""")
@click.argument('in_path', metavar='IN', type=str)
@click.argument('out_path', metavar='OUT', type=str)
@click.option('--overwrite', help='Replace OUT if it exists', is_flag=True)
def cmdline(in_path, out_path, overwrite):
    with cli.os_errors(out_path):
        try:
            _check_not_input(in_path, out_path)
            cli.check_output_file(out_path, overwrite=overwrite)
            export(in_path, out_path)
        except ValueError as e:
            raise cli.CliError(str(e)) from None

main = cmdline  # the command's earlier name, for scripts that import it

if __name__ == '__main__':
    cli.run(cmdline)
