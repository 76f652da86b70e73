"""The harness of the tables of command-line cases (tests/test_bad_inputs.py, tests/test_trust.py): a case names a
tool of CLI_TOOLS and its arguments; run_tool() runs the tool's click command in this process under a time limit,
and files_under() gives the bytes of every file, so that a test can tell what a refused call changed."""

import importlib
import os
import re
import signal

from click.testing import CliRunner

# name -> (module, click command, leading arguments such as a sub-command)
CLI_TOOLS = {
    'train':    ('train_edm2plus', 'cmdline', []),
    'edm2':     ('train_edm2', 'cmdline', []),
    'generate': ('generate_images', 'cmdline', []),
    'calc':     ('calculate_metrics', 'cmdline', ['calc']),
    'gen':      ('calculate_metrics', 'cmdline', ['gen']),
    'ref':      ('calculate_metrics', 'cmdline', ['ref']),
    'phema':    ('reconstruct_phema', 'cmdline', []),
    'sweep':    ('sweep_phema', 'cmdline', []),
    'plot':     ('plot_sweep', 'cmdline', []),
    'flops':    ('count_flops', 'cmdline', []),
    'convert':  ('dataset_tool', 'cmdline', ['convert']),
    'encode':   ('dataset_tool', 'cmdline', ['encode']),
    'decode':   ('dataset_tool', 'cmdline', ['decode']),
    'export':   ('networks.export', 'cmdline', []),
    'demo':     ('demo', 'cmdline', []),
    'toytrain': ('toy_example', 'cmdline', ['train']),
    'toyplot':  ('toy_example', 'cmdline', ['plot']),
}

def run_tool(tool, args, time_limit):
    """click's Result of `tool` (a key of CLI_TOOLS) with `args`. A call still running after `time_limit` seconds
    raises TimeoutError: a bad input must be refused before the work starts."""
    module_name, command_name, prefix = CLI_TOOLS[tool]
    command = getattr(importlib.import_module(module_name), command_name)
    def too_long(_signum, _frame):
        raise TimeoutError(f'still running after {time_limit} s: the bad input was not caught before the work')
    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(time_limit)
    try:
        return CliRunner().invoke(command, prefix + list(args))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)

def files_under(root):
    """{path relative to root: bytes} of every regular file under root (symbolic links are not followed)."""
    files = {}
    for folder, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                with open(path, 'rb') as f:
                    files[os.path.relpath(path, root)] = f.read()
    return files

def error_lines(output):
    return [line for line in output.splitlines() if line.startswith('Error:')]

def check_refusal(case, result):
    """The call ended as `case` (its id, exit code and pattern) says: one line `Error: ...` matching the pattern, the
    expected exit code, no traceback. Prints `TABLE | id | exit code | line` (pytest -s shows what each case prints)."""
    output = result.output
    shown = error_lines(output) or [repr(result.exception)]
    print(f'\nTABLE | {case.id} | {result.exit_code} | {shown[-1]}')
    assert 'Traceback' not in output, output
    assert isinstance(result.exception, SystemExit), (result.exception, output)
    assert result.exit_code == case.code, output
    lines = error_lines(output)
    assert len(lines) == 1, output
    assert re.search(case.pattern, lines[0]), lines[0]
