"""The weights-only network format (networks/export.py): round trips, tools, and that it never runs code."""

import builtins
import json
import pickle

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dnnlib
from networks import edm2plus, export, loading
from torch_utils import persistence
import training.encoders  # noqa: F401  (imported now: importing runs exec, which a test forbids)
import training.loss  # noqa: F401

import edm2_standin

@pytest.fixture(scope='module')
def edm2(tmp_path_factory):
    return edm2_standin.edm2_files(tmp_path_factory)

@pytest.fixture(scope='module')
def exported(edm2, tmp_path_factory):
    """The EDM2-written reconstruction and unconditional net, converted with the CLI."""
    out = tmp_path_factory.mktemp('exported')
    for name in ('phema-0000008-0.070', 'guide-uncond'):
        result = CliRunner().invoke(export.cmdline, [str(edm2 / f'{name}.pkl'), str(out / f'{name}.pt')])
        assert result.exit_code == 0, result.output
    return out

def outputs(net, exp, labels=True):
    with torch.no_grad():
        return net(exp['x'], exp['sigma'], exp['labels'] if labels else None, return_logvar=True)

def no_code_allowed(monkeypatch):
    """Make every way of running pickled code fail loudly."""
    def forbidden(*_args, **_kwargs):
        raise AssertionError('code-running unpickler used')
    class ForbiddenUnpickler:
        def __init__(self, *_args, **_kwargs):
            forbidden()
    monkeypatch.setattr(pickle, 'load', forbidden)
    monkeypatch.setattr(pickle, 'loads', forbidden)
    monkeypatch.setattr(pickle, 'Unpickler', ForbiddenUnpickler)
    monkeypatch.setattr(persistence, '_src_to_module_obj', forbidden)  # runs the source stored in a pickle
    monkeypatch.setattr(builtins, 'exec', forbidden)

#----------------------------------------------------------------------------

def test_edm2_pickle_round_trip_is_identical(edm2, exported, monkeypatch):
    exp = torch.load(edm2 / 'expected.pt')
    from_pkl = loading.load_snapshot(edm2 / 'phema-0000008-0.070.pkl', verbose=False)
    raw = torch.load(exported / 'phema-0000008-0.070.pt', weights_only=True)
    assert set(raw) == {'format', 'version', 'architecture', 'state_dict'}
    assert {t.dtype for t in raw['state_dict'].values()} == {torch.float16}  # stored as in the snapshot
    arch = json.loads(raw['architecture'])
    assert arch['network'] == dict(class_name='networks.edm2plus.Precond', init_args=[],
                                   init_kwargs=json.loads(json.dumps(edm2_standin.TINY)))
    assert arch['encoder']['class_name'] == 'training.encoders.StandardRGBEncoder'

    no_code_allowed(monkeypatch)
    from_pt = loading.load_snapshot(exported / 'phema-0000008-0.070.pt', verbose=False)
    monkeypatch.undo()
    assert loading.is_native(from_pt.ema) and not from_pt.ema.training
    for a, b in zip(outputs(from_pt.ema, exp), outputs(from_pkl.ema, exp)):
        assert torch.equal(a, b)
    assert [(k, v.dtype) for k, v in from_pt.ema.state_dict().items()] == \
           [(k, v.dtype) for k, v in from_pkl.ema.state_dict().items()]
    assert torch.equal(from_pt.encoder.decode(exp['x']), exp['phema_decoded'])
    assert dict(from_pt.dataset_kwargs) == dict(from_pkl.dataset_kwargs)
    assert (from_pt.loss_fn.P_mean, from_pt.loss_fn.P_std, from_pt.loss_fn.sigma_data) == (-0.8, 1.6, 0.5)

def test_our_snapshot_round_trip_is_identical(tmp_path):
    from training.encoders import StandardRGBEncoder
    from training.loss import EDM2Loss
    from training.training_loop import save_snapshot
    torch.manual_seed(0)
    net = edm2plus.Precond(**edm2_standin.TINY, block='G*')
    with torch.no_grad():
        net.unet.out_gain.fill_(0.8)
    save_snapshot(tmp_path / 'snap.pkl', StandardRGBEncoder(), dict(class_name='training.dataset.ImageFolderDataset',
                  path='x.zip', use_labels=True), EDM2Loss(), net)
    export.export(str(tmp_path / 'snap.pkl'), str(tmp_path / 'snap.pt'), verbose=False)
    a = loading.load_network(str(tmp_path / 'snap.pkl'), verbose=False)
    b = loading.load_network(str(tmp_path / 'snap.pt'), verbose=False)
    exp = dict(x=torch.randn([2, 3, 8, 8]), sigma=torch.tensor([0.2, 5.0]), labels=torch.eye(4)[[1, 3]])
    for u, v in zip(outputs(a, exp), outputs(b, exp)):
        assert torch.equal(u, v)
    assert b.unet.enc['8x8_block0'].steps == a.unet.enc['8x8_block0'].steps  # the G* recipe, rebuilt from JSON

def test_tools_accept_weights_files(edm2, exported, tmp_path):
    import count_flops
    import generate_images
    runner = CliRunner()
    images = {}
    for kind in ('pkl', 'pt'):
        src = edm2 if kind == 'pkl' else exported
        result = runner.invoke(generate_images.cmdline, [
            '--net', str(src / f'phema-0000008-0.070.{kind}'), '--gnet', str(src / f'guide-uncond.{kind}'),
            '--guidance', '1.5', '--seeds', '0-1', '--steps', '2', '--outdir', str(tmp_path / kind)])
        assert result.exit_code == 0, result.output
        images[kind] = [np.asarray(PIL.Image.open(tmp_path / kind / f'{s:06d}.png')) for s in range(2)]
    for a, b in zip(images['pkl'], images['pt']):
        assert np.array_equal(a, b)
    counts = []
    for path in (edm2 / 'phema-0000008-0.070.pkl', exported / 'phema-0000008-0.070.pt'):
        result = runner.invoke(count_flops.cmdline, [str(path), '--json'])
        assert result.exit_code == 0, result.output
        row = json.loads(result.output)[0]
        counts.append((row['mparams'], row['gflops']))
    assert counts[0] == counts[1] and counts[0][0] > 0

#----------------------------------------------------------------------------
# Refusals: nothing from the file runs.

class Payload:
    """Unpickling this creates a file (stands for arbitrary code)."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, 'w'))

def test_malicious_weights_file_is_refused(tmp_path):
    marker = tmp_path / 'pwned'
    good = export.weights_dict(dnnlib.EasyDict(ema=edm2plus.Precond(**edm2_standin.TINY)))
    with open(tmp_path / 'evil.pt', 'wb') as f:
        torch.save(dict(good, extra=Payload(marker)), f)
    with pytest.raises(loading.NetworkFileError, match='evil.pt: refused'):
        loading.load_snapshot(tmp_path / 'evil.pt', verbose=False)
    assert not marker.exists()
    # The architecture can only name our own classes.
    arch = json.loads(good['architecture'])
    arch['network']['class_name'] = 'os.system'
    with open(tmp_path / 'foreign.pt', 'wb') as f:
        torch.save(dict(good, architecture=json.dumps(arch)), f)
    with pytest.raises(loading.NetworkFileError, match="foreign.pt: invalid weights-only file: unknown network class 'os.system'"):
        loading.load_snapshot(tmp_path / 'foreign.pt', verbose=False)
    # Weights that do not fit the description.
    state = dict(good['state_dict'])
    state.pop('unet.out_gain')
    with open(tmp_path / 'short.pt', 'wb') as f:
        torch.save(dict(good, state_dict=state), f)
    with pytest.raises(loading.NetworkFileError, match='short.pt: invalid weights-only file: the weights do not fit'):
        loading.load_snapshot(tmp_path / 'short.pt', verbose=False)

def test_pickles_can_be_refused(tmp_path):
    marker = tmp_path / 'pwned'
    (tmp_path / 'evil.pkl').write_bytes(pickle.dumps(dict(ema=Payload(marker))))
    with pytest.raises(loading.NetworkFileError, match='evil.pkl: is a pickle'):
        loading.load_snapshot(tmp_path / 'evil.pkl', verbose=False, allow_pickle=False)
    assert not marker.exists()

def test_export_cli_errors(edm2, tmp_path):
    runner = CliRunner()
    (tmp_path / 'stats.pkl').write_bytes(pickle.dumps(dict(fid=dict(mu=0))))
    result = runner.invoke(export.cmdline, [str(tmp_path / 'stats.pkl'), str(tmp_path / 'out.pt')])
    assert result.exit_code == 1 and 'stats.pkl: not a network snapshot' in result.output
    assert not (tmp_path / 'out.pt').exists()
    same = tmp_path / 'same.pkl'
    same.write_bytes((edm2 / 'guide-uncond.pkl').read_bytes())
    result = runner.invoke(export.cmdline, [str(same), str(same)])
    assert result.exit_code == 1 and 'must not overwrite an input' in result.output
    assert same.read_bytes() == (edm2 / 'guide-uncond.pkl').read_bytes()
    # A foreign network that our Precond cannot rebuild is not exported.
    snap = loading.load_snapshot(edm2 / 'guide-uncond.pkl', native=False, verbose=False)
    snap.ema.unet.dec['4x4_in0'].attn_balance = 0.5
    with pytest.warns(UserWarning), pytest.raises(ValueError, match='cannot export'):
        export.weights_dict(snap)
