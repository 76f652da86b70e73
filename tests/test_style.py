"""One style across the tree: section separators, blank lines, and how a script runs its command.

The convention (the one most files already followed):
- A section separator is `#` and 76 `-` (77 columns) at the start of a line, never indented (a section inside a
  function is a function of its own). One blank line comes before it; after it comes the section's heading comment,
  or one blank line and then code. A file does not end with one.
- Never two blank lines in a row (inside string literals anything goes), and one blank line before each top-level
  `def` or `class` (above its decorators and the comment lines attached to it).
- A file ends with exactly one newline.
- A script's click command is named `cmdline`, and its `if __name__ == '__main__':` block is
  `cli.run(cmdline)` (torch_utils.cli.run prepares the process), with `spawn_workers=True` where it trains.
"""

import ast
import io
import os
import re
import subprocess
import tokenize

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEPARATOR = '#' + '-' * 76
LOOKS_LIKE_SEPARATOR = re.compile(r'\s*#\s*([-=])\1{3,}\s*')
MAIN_BLOCK = re.compile(r"if __name__ == '__main__':\n    cli\.run\(cmdline(, spawn_workers=True)?\)\n")

#----------------------------------------------------------------------------
# The checks, on the text of one file.

def string_lines(text):
    """Numbers (1-based) of the lines that lie inside a multi-line string literal, after its first line."""
    inside = set()
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.STRING and token.end[0] > token.start[0]:
            inside.update(range(token.start[0] + 1, token.end[0] + 1))
    return inside

def style_problems(path, text):
    """One line per problem: `<path>:<line>: <what to change>`."""
    lines = text.split('\n')
    if lines[-1] == '':
        lines.pop()
    strings = string_lines(text)
    code = lambda n: n not in strings  # 1-based line n is outside string literals
    blank = lambda n: 1 <= n <= len(lines) and lines[n - 1].strip() == '' and code(n)
    problems = []
    say = lambda n, what: problems.append(f'{path}:{n}: {what}')

    for n, line in enumerate(lines, 1):
        if not code(n) or not LOOKS_LIKE_SEPARATOR.fullmatch(line):
            continue
        if line != SEPARATOR:
            if line[:1].isspace():
                say(n, 'indented separator: make the section a function of its own, or delete the line')
            else:
                say(n, 'separator must be "#" and 76 "-" (77 columns), with nothing else on the line')
            continue
        if n > 1 and (not blank(n - 1) or blank(n - 2)):
            say(n, 'put exactly one blank line before this separator')
        if n == len(lines):
            say(n, 'delete this separator: a file does not end with one')
        elif blank(n + 1) and (blank(n + 2) or n + 2 > len(lines) or lines[n + 1] == SEPARATOR):
            say(n, 'a separator is followed by its heading comment, or by one blank line and code')
        elif not blank(n + 1) and not lines[n].lstrip().startswith('#'):
            say(n, 'put one blank line (or the section\'s heading comment) after this separator')
        elif lines[n] == SEPARATOR:
            say(n, 'two separators in a row: delete one')

    for n in range(2, len(lines) + 1):
        if blank(n) and blank(n - 1):
            say(n, 'two blank lines in a row: delete one')
    if lines and lines[-1].strip() == '':
        say(len(lines), 'blank line at the end of the file: delete it')
    if text and not text.endswith('\n'):
        say(len(lines), 'end the file with a newline')

    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            top = min([node.lineno] + [d.lineno for d in node.decorator_list])  # a decorator's line holds its @
            while top > 1 and lines[top - 2].startswith('#') and code(top - 1):  # comment lines attached above
                top -= 1
            if top > 1 and not blank(top - 1):
                say(top, f'put one blank line before this top-level definition ({node.name})')
    return problems

def entry_point_problems(path, text):
    """A script's `if __name__ == '__main__':` block runs its `cmdline` through cli.run."""
    found = re.search(r"^if __name__ == '__main__':", text, re.M)
    if found is None:
        return []
    start = found.start()
    problems = []
    if not MAIN_BLOCK.fullmatch(text[start:]):
        problems.append(f"{path}: end the file with `if __name__ == '__main__':` and, indented, `cli.run(cmdline)` "
                        f'(`cli.run(cmdline, spawn_workers=True)` for training) as the only statement, with '
                        f'`from torch_utils import cli` among the imports')
    if not re.search(r'^(def cmdline\(|cmdline = )', text, re.M):
        problems.append(f'{path}: name the click command `cmdline` (keep `main = cmdline` if others import `main`)')
    return problems

#----------------------------------------------------------------------------
# The tree.

def tracked_python_files():
    try:
        out = subprocess.run(['git', 'ls-files', '*.py'], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip('not a git checkout')
    return [path for path in out.split() if os.path.isfile(os.path.join(ROOT, path))]

def test_every_python_file_follows_the_style():
    problems = []
    for path in tracked_python_files():
        with open(os.path.join(ROOT, path), encoding='utf-8') as f:
            problems += style_problems(path, f.read())
    assert not problems, 'Style (see tests/test_style.py):\n' + '\n'.join(problems)

def test_every_script_runs_its_cmdline_through_cli_run():
    problems = []
    for path in tracked_python_files():
        if not path.startswith('tests/'):
            with open(os.path.join(ROOT, path), encoding='utf-8') as f:
                problems += entry_point_problems(path, f.read())
    assert not problems, 'Entry points (see tests/test_style.py):\n' + '\n'.join(problems)

#----------------------------------------------------------------------------
# The checks find what they are for.

GOOD = f'''"""A module."""

import os

{SEPARATOR}
# Helpers.

def one():
    text = """

    two blank lines inside a string are fine
    """
    return text

@decorator(
    argument=1)
def two():
    pass

{SEPARATOR}

class Three:
    pass

if __name__ == '__main__':
    cli.run(cmdline)
'''

@pytest.mark.parametrize('before, after, message', [
    (SEPARATOR, '# ' + '-' * 70, 'separator must be "#" and 76 "-"'),
    ('    return text', f'    {SEPARATOR}\n    return text', 'indented separator'),
    ('import os\n\n', 'import os\n', 'one blank line before this separator'),
    ('import os\n\n', 'import os\n\n\n', 'two blank lines in a row'),
    ('# Helpers.\n\n', '', 'after this separator'),
    ('    pass\n\nif', f'    pass\n\n{SEPARATOR}\n\nif', None),
    ("    cli.run(cmdline)\n", f"    cli.run(cmdline)\n\n{SEPARATOR}\n", 'a file does not end with one'),
    ('    return text\n\n@', '    return text\n@', 'one blank line before this top-level definition (two)'),
    ("    cli.run(cmdline)\n", "    cli.run(cmdline)\n\n", 'blank line at the end of the file'),
])
def test_style_problems_are_found(before, after, message):
    assert style_problems('m.py', GOOD) == []
    bad = GOOD.replace(before, after, 1)
    assert bad != GOOD
    found = style_problems('m.py', bad)
    if message is None:
        assert found == []  # a separator before the main block is fine
    else:
        assert len(found) >= 1 and any(message in problem for problem in found), found
        assert all(re.match(r'm\.py:\d+: ', problem) for problem in found)

def test_entry_point_problems_are_found():
    assert entry_point_problems('t.py', 'def cmdline():\n    pass\n' + GOOD[GOOD.index('if __name__'):]) == []
    assert entry_point_problems('t.py', 'x = 1\n') == []
    old = "@click.command()\ndef main():\n    pass\n\nif __name__ == '__main__':\n    main()\n"
    found = entry_point_problems('t.py', old)
    assert len(found) == 2 and 'cli.run(cmdline)' in found[0] and 'name the click command `cmdline`' in found[1]
