"""EDM2 checkpoint compatibility in both directions (docs/compatibility.md §1-§3).

EDM2-written files come from tests/edm2_standin.py: a fresh interpreter that sees only a stand-in of EDM2's package
tree (its own version-6 persistence and an independent EDM2-layout CONFIG A network) writes snapshots exactly as
EDM2 lays them out. They must load in every tool of ours; our snapshots must load in that stand-in environment.
"""

import importlib
import os
import pickle
import pickletools
import sys
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dnnlib
from networks import edm2plus, loading
from torch_utils import persistence

import edm2_standin

#----------------------------------------------------------------------------
# Helpers.

@pytest.fixture(scope='module')
def edm2(tmp_path_factory):
    return edm2_standin.edm2_files(tmp_path_factory)

@pytest.fixture(scope='module')
def expected(edm2):
    return torch.load(edm2 / 'expected.pt')

def outputs(net, exp, labels=True):
    with torch.no_grad():
        return net(exp['x'], exp['sigma'], exp['labels'] if labels else None, return_logvar=True)

def assert_close(a, b):
    torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5)

# Globals an EDM2 network pickle references (docs/compatibility.md §2).
EDM2_GLOBALS = {('dnnlib.util', 'EasyDict'), ('torch_utils.persistence', '_reconstruct_persistent_obj'),
                ('collections', 'OrderedDict'), ('torch._utils', '_rebuild_parameter'),
                ('torch._utils', '_rebuild_tensor_v2'), ('torch.storage', '_load_from_bytes'),
                ('torch.nn.modules.container', 'ModuleDict')}

def pickle_globals(data):
    """(module, name) of every global a pickle imports, read statically with pickletools (nothing is run)."""
    found, pushed, memo = set(), [], {}
    for op, arg, _pos in pickletools.genops(data):
        if op.name in ('SHORT_BINUNICODE', 'BINUNICODE', 'BINUNICODE8', 'UNICODE'):
            pushed.append(arg)
        elif op.name == 'MEMOIZE':
            memo[len(memo)] = pushed[-1] if pushed else None
        elif op.name in ('PUT', 'BINPUT', 'LONG_BINPUT'):
            memo[arg] = pushed[-1] if pushed else None
        elif op.name in ('GET', 'BINGET', 'LONG_BINGET'):
            pushed.append(memo.get(arg))
        elif op.name == 'STACK_GLOBAL':  # module and name are the two strings pushed last
            found.add((pushed[-2], pushed[-1]))
            pushed.append(None)
        elif op.name == 'GLOBAL':
            found.add(tuple(arg.split(' ', 1)))
            pushed.append(None)
        else:
            pushed.append(None)
    return found

#----------------------------------------------------------------------------
# Names EDM2's pickles, embedded sources and configs refer to (docs/compatibility.md §1).

SPEC_NAMES = {
    'dnnlib': 'EasyDict make_cache_dir_path',
    'dnnlib.util': 'EasyDict Logger make_cache_dir_path set_cache_dir format_time format_time_brief open_url is_url '
                   'construct_class_by_name call_func_by_name get_obj_by_name get_module_from_obj_name '
                   'get_obj_from_module is_top_level_function get_top_level_function_name tuple_product '
                   'get_dtype_and_ctype is_pickleable list_dir_recursively_with_ignore copy_files_and_create_dirs '
                   'get_module_dir_by_obj_name',
    'torch_utils.persistence': 'persistent_class is_persistent import_hook _reconstruct_persistent_obj',
    'torch_utils.misc': 'const_like constant set_random_seed InfiniteSampler ddp_sync check_ddp_consistency '
                        'print_module_summary copy_params_and_buffers params_and_buffers named_params_and_buffers '
                        'assert_shape profiled_function suppress_tracer_warnings pinned_buf tile_images symbolic_assert',
    'torch_utils.distributed': 'init get_rank get_world_size should_stop should_suspend request_suspend '
                               'update_progress print0 CheckpointIO',
    'torch_utils.training_stats': 'init_multiprocessing report report0 Collector default_collector',
    'training.encoders': 'Encoder StandardRGBEncoder StabilityVAEEncoder load_stability_vae',
    'training.networks_edm2': 'normalize resample mp_silu mp_sum mp_cat MPFourier MPConv Block UNet Precond',
}

@pytest.mark.parametrize('module', list(SPEC_NAMES))
def test_edm2_names_exist(module):
    mod = importlib.import_module(module)
    missing = [name for name in SPEC_NAMES[module].split() if not hasattr(mod, name)]
    assert missing == []

def test_persistence_version_and_edm2_class_names():
    assert persistence._version == 6
    import psutil  # imported by the source of EDM2's training-loop module (the loss)  # noqa: F401
    net = dnnlib.util.construct_class_by_name(class_name='training.networks_edm2.Precond', **edm2_standin.TINY)
    assert isinstance(net, edm2plus.Precond)
    assert dnnlib.util.get_obj_by_name('training.networks_edm2.mp_sum') is edm2plus.mp_sum

#----------------------------------------------------------------------------
# EDM2-written snapshots in our environment.

def test_edm2_file_layout(edm2):
    data = (edm2 / 'phema-0000008-0.070.pkl').read_bytes()
    assert pickle_globals(data) == EDM2_GLOBALS  # the stand-in writes what EDM2 writes
    snap = loading.load_snapshot(edm2 / 'phema-0000008-0.070.pkl', native=False, verbose=False)
    assert list(snap) == ['encoder', 'dataset_kwargs', 'loss_fn', 'ema']
    assert type(snap.ema).__module__.startswith('_imported_module_')  # EDM2's class, run from the embedded source
    assert {t.dtype for t in snap.ema.state_dict().values()} == {torch.float16}  # Fourier buffers included
    assert not snap.ema.training

def test_edm2_snapshot_foreign_module_reproduces_edm2(edm2, expected):
    snap = loading.load_snapshot(edm2 / 'phema-0000008-0.070.pkl', native=False, verbose=False)
    D, logvar = outputs(snap.ema, expected)
    assert torch.equal(D, expected['phema_D']) and torch.equal(logvar, expected['phema_logvar'])
    torch.manual_seed(1)
    with torch.no_grad():
        loss = snap.loss_fn(net=snap.ema, images=expected['x'], labels=expected['labels'])  # EDM2's loss source ran here
    assert torch.equal(loss, expected['phema_loss'])
    assert torch.equal(snap.encoder.decode(expected['x']), expected['phema_decoded'])

@pytest.mark.parametrize('name,cond', [('phema-0000008-0.070.pkl', True), ('guide-uncond.pkl', False)])
def test_edm2_snapshot_converts_to_native(edm2, expected, name, cond):
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a failed conversion warns
        snap = loading.load_snapshot(edm2 / name, verbose=False)
    net = snap.ema
    assert type(net) is edm2plus.Precond and loading.is_native(net)
    foreign = loading.load_snapshot(edm2 / name, native=False, verbose=False).ema
    # Same tensors in the same order and dtype (float16 kept), strict load into a freshly built native net.
    assert [(k, v.dtype, v.shape) for k, v in net.state_dict().items()] == \
           [(k, v.dtype, v.shape) for k, v in foreign.state_dict().items()]
    fresh = edm2plus.Precond(*foreign.init_args, **foreign.init_kwargs)
    fresh.load_state_dict(foreign.state_dict(), strict=True)
    # Cast like the snapshot: float16 gains round gain/sqrt(fan_in) in float16 in EDM2 too (~1e-4 in D vs float32).
    fresh = fresh.to(torch.float16).eval()
    prefix = 'phema' if cond else 'guide'
    for module in (net, fresh):
        D, logvar = outputs(module, expected, labels=cond)
        assert_close(D, expected[f'{prefix}_D'])
        assert_close(logvar, expected[f'{prefix}_logvar'])
    assert (net.label_dim, net.img_resolution, net.img_channels) == (4 if cond else 0, 8, 3)
    assert not net.training and not any(p.requires_grad for p in net.parameters())

def test_edm2_conversion_falls_back_when_attributes_differ(edm2):
    foreign = loading.load_snapshot(edm2 / 'phema-0000008-0.070.pkl', native=False, verbose=False).ema
    foreign.unet.enc['8x8_block0'].res_balance = 0.4  # not what the recorded constructor arguments build
    with pytest.warns(UserWarning, match='res_balance'):
        assert loading.to_native(foreign) is foreign
    foreign.unet.enc['8x8_block0'].res_balance = 0.3
    assert loading.is_native(loading.to_native(foreign, verify=True))

def test_load_network_dtype_and_device(edm2):
    net = loading.load_network(str(edm2 / 'guide-uncond.pkl'), device='cpu', dtype=torch.float32, verbose=False)
    assert loading.is_native(net) and {p.dtype for p in net.parameters()} == {torch.float32}

#----------------------------------------------------------------------------
# Every tool, given EDM2-written files.

def test_generate_images_cli_with_edm2_net_and_gnet(edm2, tmp_path):
    import generate_images
    from sampling.generate import generate_images as generate
    net = str(edm2 / 'phema-0000008-0.070.pkl')
    args = ['--net', net, '--seeds', '0-2', '--steps', '3', '--batch', '3']
    runner = CliRunner()
    result = runner.invoke(generate_images.cmdline, args + ['--outdir', str(tmp_path / 'plain')])
    assert result.exit_code == 0, result.output
    plain = [np.asarray(PIL.Image.open(tmp_path / 'plain' / f'{s:06d}.png')) for s in range(3)]
    # Same seeds through the library with EDM2's own (foreign) module: the native rebuild changes nothing visible.
    foreign = loading.load_snapshot(net, native=False, verbose=False)
    ref = next(iter(generate(foreign.ema, encoder=foreign.encoder, seeds=[0, 1, 2], num_steps=3, verbose=False)))
    for img, want in zip(plain, ref.images.permute(0, 2, 3, 1).numpy()):
        assert np.abs(img.astype(int) - want.astype(int)).max() <= 1
    # As the guiding network (an EDM2 unconditional net, i.e. classifier-free guidance).
    result = runner.invoke(generate_images.cmdline, args + ['--outdir', str(tmp_path / 'guided'),
                                                            '--gnet', str(edm2 / 'guide-uncond.pkl'), '--guidance', '2'])
    assert result.exit_code == 0, result.output
    guided = [np.asarray(PIL.Image.open(tmp_path / 'guided' / f'{s:06d}.png')) for s in range(3)]
    assert all(g.shape == (8, 8, 3) for g in guided)
    assert any(not np.array_equal(g, p) for g, p in zip(guided, plain))

def test_count_flops_cli_with_edm2_pickle(edm2):
    import json
    import count_flops
    from networks import flops
    result = CliRunner().invoke(count_flops.cmdline, [str(edm2 / 'phema-0000008-0.070.pkl'), '--json'])
    assert result.exit_code == 0, result.output
    row = json.loads(result.output)[0]
    foreign = loading.load_snapshot(edm2 / 'phema-0000008-0.070.pkl', native=False, verbose=False).ema
    assert row['mparams'] * 1e6 == pytest.approx(sum(p.numel() for p in foreign.parameters()))
    native = flops.count(flops.build_meta(**edm2_standin.TINY), device='meta')
    assert row['gflops'] * 1e9 == pytest.approx(native['flops'])

def test_reconstruct_phema_cli_with_edm2_snapshots(edm2, tmp_path):
    import reconstruct_phema
    from training.phema import solve_posthoc_coefficients
    result = CliRunner().invoke(reconstruct_phema.cmdline, ['--indir', str(edm2 / 'run'), '--outdir', str(tmp_path),
                                                         '--outstd', '0.070'])
    assert result.exit_code == 0, result.output
    out = loading.load_snapshot(tmp_path / 'phema-0000008-0.070.pkl', verbose=False)
    assert list(out) == ['encoder', 'dataset_kwargs', 'loss_fn', 'ema']
    assert out.dataset_kwargs.path == 'datasets/tiny.zip'
    ins = [(4096, 0.05), (4096, 0.1), (8192, 0.05), (8192, 0.1)]
    coefs = solve_posthoc_coefficients([n for n, _ in ins], [s for _, s in ins], 8192, [0.07])[:, 0]
    nets = [loading.load_snapshot(edm2 / 'run' / f'network-snapshot-{n // 1000:07d}-{s:.3f}.pkl', native=False,
                                  verbose=False).ema for n, s in ins]
    for name, p in out.ema.named_parameters():
        want = sum(float(c) * dict(net.named_parameters())[name].float() for c, net in zip(coefs, nets))
        torch.testing.assert_close(p.float(), want, rtol=2e-3, atol=2e-3)  # float16 storage

class PooledColours(torch.nn.Module):
    """Cheap detector stand-in with the interface of NVIDIA's Inception pickle (uint8 in, features out)."""

    def forward(self, img, return_features: bool = False):
        x = torch.nn.functional.adaptive_avg_pool2d(img.to(torch.float32), 2).flatten(1) / 255
        return torch.cat([x, x * x], dim=1)

@pytest.mark.slow  # sampling and three feature passes
def test_calculate_metrics_gen_with_edm2_net_and_gnet(edm2, tmp_path):
    import re
    import calculate_metrics
    from networks import export
    detector = str(tmp_path / 'detector.pt')
    torch.jit.save(torch.jit.script(PooledColours()), detector)
    rng = np.random.RandomState(0)
    os.makedirs(tmp_path / 'data')
    for i in range(6):
        PIL.Image.fromarray(rng.randint(0, 256, [8, 8, 3], dtype=np.uint8)).save(tmp_path / 'data' / f'{i}.png')
    runner = CliRunner()
    common = ['--metrics=fid', f'--detector={detector}']
    result = runner.invoke(calculate_metrics.cmdline, ['ref', f'--data={tmp_path / "data"}', f'--dest={tmp_path / "ref.pkl"}',
                                                       '--workers=0'] + common)
    assert result.exit_code == 0, result.output
    # gen always takes 32 steps, so one run covers both formats: EDM2's pickle as --net, a weights-only export of
    # EDM2's unconditional net as --gnet (test_export.py shows that both formats give identical images).
    export.export(str(edm2 / 'guide-uncond.pkl'), str(tmp_path / 'guide-uncond.pt'), verbose=False)
    result = runner.invoke(calculate_metrics.cmdline, [
        'gen', f'--net={edm2 / "phema-0000008-0.070.pkl"}', f'--gnet={tmp_path / "guide-uncond.pt"}', '--guidance=2',
        f'--ref={tmp_path / "ref.pkl"}', '--seeds=0-3'] + common)
    assert result.exit_code == 0, result.output
    fid = float(re.search(r'fid = (\S+)', result.output).group(1))
    assert np.isfinite(fid) and fid > 0

#----------------------------------------------------------------------------
# Our snapshots in EDM2's environment (a fresh interpreter with only the stand-in core on sys.path).

LOAD_OURS_IN_EDM2 = '''
import os, pickle
import torch
import dnnlib
env = os.path.dirname(os.path.abspath(__file__))
assert dnnlib.__file__.startswith(env), dnnlib.__file__
for name in ('networks', 'training', 'sampling', 'metrics'):  # our packages must be out of reach
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(f'{name} is importable in the EDM2 stand-in')
exp = torch.load(sys.argv[1])
for name in sys.argv[2:]:
    with open(name, 'rb') as f:
        data = pickle.load(f)
    assert type(data) is dnnlib.util.EasyDict and list(data) == ['encoder', 'dataset_kwargs', 'loss_fn', 'ema'], list(data)
    ema = data.ema
    assert type(ema).__module__.startswith('_imported_module_') and type(ema).__name__ == 'Precond'
    assert sys.modules[type(ema).__module__]._faster is None  # no faster path came with the pickle
    key = os.path.basename(name)
    with torch.no_grad():
        D, logvar = ema(exp['x'], exp['sigma'], exp['labels'], return_logvar=True)
        assert torch.equal(D, exp[key + ':D']) and torch.equal(logvar, exp[key + ':logvar']), key
        rebuilt = type(ema)(*ema.init_args, **ema.init_kwargs).to(torch.float16).eval()  # as EDM2 does with a config
        rebuilt.load_state_dict(ema.state_dict(), strict=True)
        assert torch.equal(rebuilt(exp['x'], exp['sigma'], exp['labels']), D), key
        torch.manual_seed(1)
        assert torch.equal(data.loss_fn(net=ema, images=exp['x'], labels=exp['labels']), exp[key + ':loss']), key
    assert torch.equal(data.encoder.decode(exp['x']), exp[key + ':decoded']), key
    assert data.dataset_kwargs.class_name == 'training.dataset.ImageFolderDataset'
    print('ok', key, type(ema).__module__)
'''

def test_our_snapshots_load_in_edm2_environment(tmp_path):
    from training.encoders import StandardRGBEncoder
    from training.loss import EDM2Loss
    from training.training_loop import save_snapshot
    torch.manual_seed(0)
    exp = dict(x=torch.randn([3, 3, 8, 8]), sigma=torch.tensor([0.05, 0.7, 12.0]), labels=torch.eye(4)[[0, 2, 3]])
    paths = []
    for block in ('A', 'G*'):
        net = edm2plus.Precond(**edm2_standin.TINY, block=block)
        with torch.no_grad():
            for p in net.parameters():
                if p.ndim == 0:
                    p.fill_(0.7)
        path = tmp_path / f'network-snapshot-0000008-0.050-{block.replace("*", "star")}.pkl'
        save_snapshot(path, StandardRGBEncoder(), dict(class_name='training.dataset.ImageFolderDataset',
                      path='datasets/tiny.zip', use_labels=True), EDM2Loss(), net)
        assert pickle_globals(path.read_bytes()) <= EDM2_GLOBALS  # e.g. no networks.* or training.* globals
        snap = loading.load_snapshot(path, verbose=False)
        key = path.name
        with torch.no_grad(), edm2plus.reference_mode():  # EDM2's code runs the reference network alone
            exp[key + ':D'], exp[key + ':logvar'] = outputs(snap.ema, exp)
            torch.manual_seed(1)
            exp[key + ':loss'] = snap.loss_fn(net=snap.ema, images=exp['x'], labels=exp['labels'])
        exp[key + ':decoded'] = snap.encoder.decode(exp['x'])
        paths.append(path)
    torch.save(exp, tmp_path / 'expected.pt')
    env = tmp_path / 'edm2env'
    edm2_standin.write_tree(env, edm2_standin.CORE)  # numpy, torch, dnnlib, persistence, misc: nothing else
    out = edm2_standin.run_isolated(env, 'import sys\n' + LOAD_OURS_IN_EDM2, tmp_path / 'expected.pt', *paths)
    assert out.count('ok ') == 2, out

#----------------------------------------------------------------------------
# Bad files: one clear line naming the file.

def bad_file_message(path, **kwargs):
    with pytest.raises((loading.NetworkFileError, FileNotFoundError)) as info:
        loading.load_snapshot(path, verbose=False, **kwargs)
    message = str(info.value)
    assert str(path) in message and '\n' not in message
    return message

def test_bad_network_files(edm2, tmp_path):
    good = (edm2 / 'phema-0000008-0.070.pkl').read_bytes()
    cases = {
        'text.pkl': (b'hello, not a pickle\n', 'not a network file'),
        'empty.pkl': (b'', 'empty file'),
        'truncated.pkl': (good[:len(good) // 2], 'truncated'),
        'stats.pkl': (pickle.dumps(dict(num_images=10, fid=dict(mu=np.zeros(2), sigma=np.eye(2)))), 'without the key "ema"'),
        'list.pkl': (pickle.dumps([1, 2, 3]), 'holds a list'),
        'not-module.pkl': (pickle.dumps(dict(ema=np.zeros(3))), '"ema" is a ndarray'),
    }
    for name, (content, words) in cases.items():
        (tmp_path / name).write_bytes(content)
        assert words in bad_file_message(tmp_path / name), name
    assert 'no such network file' in bad_file_message(tmp_path / 'missing.pkl')

def test_bad_embedded_source_is_reported_and_forgotten(tmp_path):
    meta = dict(type='class', version=6, module_src='import not_a_module_anywhere\n', class_name='Precond', state={})
    class Fake:
        def __reduce__(self):
            return (persistence._reconstruct_persistent_obj, (meta,))
    (tmp_path / 'bad.pkl').write_bytes(pickle.dumps(dnnlib.EasyDict(ema=Fake())))
    before = {m for m in sys.modules if m.startswith('_imported_module_')}
    assert 'ModuleNotFoundError' in bad_file_message(tmp_path / 'bad.pkl')
    assert {m for m in sys.modules if m.startswith('_imported_module_')} == before
    assert meta['module_src'] not in persistence._src_to_module
    meta['version'] = 5
    (tmp_path / 'v5.pkl').write_bytes(pickle.dumps(dnnlib.EasyDict(ema=Fake())))
    assert 'version 5' in bad_file_message(tmp_path / 'v5.pkl')

def test_training_states_are_not_networks(tmp_path):
    from torch_utils.distributed import CheckpointIO
    net = edm2plus.Precond(**edm2_standin.TINY)
    CheckpointIO(state=dnnlib.EasyDict(cur_nimg=0), net=net, optimizer=torch.optim.Adam(net.parameters())).save(
        tmp_path / 'training-state-0000000.pt', verbose=False)
    assert 'a training state' in bad_file_message(tmp_path / 'training-state-0000000.pt')
    # EDM2's training states hold an EasyDict: refused without running anything.
    with open(tmp_path / 'training-state-edm2.pt', 'wb') as f:
        torch.save(dict(state=dnnlib.EasyDict(cur_nimg=0, total_elapsed_time=0.0), net=net.state_dict()), f)
    assert 'refused' in bad_file_message(tmp_path / 'training-state-edm2.pt')
    data = (tmp_path / 'training-state-0000000.pt').read_bytes()
    (tmp_path / 'cut.pt').write_bytes(data[:len(data) // 2])
    assert 'corrupt' in bad_file_message(tmp_path / 'cut.pt')

def test_generate_images_cli_reports_bad_file(tmp_path):
    import generate_images
    (tmp_path / 'x.pkl').write_bytes(pickle.dumps({'fid': 1}))
    result = CliRunner().invoke(generate_images.cmdline, ['--net', str(tmp_path / 'x.pkl'), '--outdir', str(tmp_path / 'o')])
    assert result.exit_code == 1
    assert f'{tmp_path / "x.pkl"}: not a network snapshot' in result.output
    assert not (tmp_path / 'o').exists()

def test_help_warns_that_pickles_run_code():
    import count_flops
    import generate_images
    from networks import export
    for command in (generate_images.cmdline, count_flops.cmdline, export.cmdline):
        text = ' '.join(CliRunner().invoke(command, ['--help']).output.split())
        assert 'run the Python code stored inside them' in text and 'python -m networks.export' in text, command.name
