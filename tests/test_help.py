"""Every tool's --help, for every (sub)command: it renders, and no option shows a range bound of None (click prints
'[x<=None]' for a range type with neither bound)."""

import importlib

import click
import pytest

TOOLS = ['train_edm2plus', 'train_edm2', 'generate_images', 'calculate_metrics', 'reconstruct_phema', 'sweep_phema',
         'dataset_tool', 'count_flops', 'plot_sweep', 'demo', 'toy_example']

def commands(name):
    """(path, command) for the tool's click command and, for a group, each of its subcommands."""
    module = importlib.import_module(name)
    main = {id(obj): obj for obj in vars(module).values() if isinstance(obj, click.Command)
            and obj.callback is not None and getattr(obj.callback, '__module__', None) == name}
    main = list(main.values())  # once each, also under an alias (count_flops.main = cmdline)
    assert len(main) >= 1, f'{name}: no click command found'
    # The top command is the one no other command of the module contains.
    subs = {id(c) for g in main if isinstance(g, click.Group) for c in g.commands.values()}
    (top,) = [c for c in main if id(c) not in subs]
    yield f'{name}.py', top
    if isinstance(top, click.Group):
        for sub_name, sub in top.commands.items():
            yield f'{name}.py {sub_name}', sub

def help_text(path, command):
    with click.Context(command, info_name=path) as ctx:
        return command.get_help(ctx)

@pytest.mark.parametrize('name', TOOLS)
def test_help_has_no_none_bounds(name):
    found = list(commands(name))
    for path, command in found:
        text = help_text(path, command)
        assert '--' in text, path
        assert 'None]' not in text and '<=None' not in text and '>=None' not in text, f'{path} --help:\n{text}'

def test_unbounded_float_options_show_no_range():
    # The options the issue names; a bounded float option still shows its range.
    texts = {path: help_text(path, c) for m in ('train_edm2', 'generate_images') for path, c in commands(m)}
    assert '--P_mean FLOAT' in texts['train_edm2.py'] and '--P_std' in texts['train_edm2.py']
    line = next(l for l in texts['train_edm2.py'].splitlines() if '--P_std' in l)
    assert 'x>0' in line, line
    for option in ('--guidance', '--S_noise'):
        line = next(l for l in texts['generate_images.py'].splitlines() if option in l)
        assert '[x' not in line, line
