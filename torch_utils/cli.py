"""Plumbing shared by the command-line tools: how a tool runs, option types, output-path checks and one-line errors.

Every tool reports a problem the user can fix as one line, `Error: <what>: <why>`, with exit code 1 and no
traceback (click.ClickException). Options are checked when click parses them, and outputs are checked before any
work starts, so that a long job never fails at its very end because of a typo in a path.
"""

import contextlib
import math
import os
import re
import tempfile

import click

#----------------------------------------------------------------------------
# Running a tool. Every script ends with `if __name__ == '__main__': cli.run(cmdline)`: its click command is named
# `cmdline`, and this is the one place that prepares a tool's process.

def run(command, spawn_workers=False):
    """Prepare this process, then run the click command `command` as the program. The CPU allocator keeps freed
    memory for reuse (misc.keep_freed_cpu_memory; importing `networks` does the same for library users). With
    spawn_workers, data-loader worker processes start as fresh interpreters instead of forks of this process, which
    may have initialised CUDA (the training scripts)."""
    import torch  # pylint: disable=import-outside-toplevel  (the option types above need no torch)
    from torch_utils import misc  # pylint: disable=import-outside-toplevel
    misc.keep_freed_cpu_memory()
    if spawn_workers:
        torch.multiprocessing.set_start_method('spawn')
    command()  # pylint: disable=no-value-for-parameter

#----------------------------------------------------------------------------
# One-line messages.

def one_line(e, with_type=False):
    """The first non-empty line of an exception's message, whitespace collapsed; `Type: message` with `with_type`
    (or the bare type name when the message is empty). Library errors such as torch.load's run over many lines."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    text = ' '.join(lines[0].split()) if lines else ''
    if with_type or not text:
        return f'{type(e).__name__}: {text}' if text else type(e).__name__
    return text

def os_error_line(e, path=None):
    """`<path>: <reason>` for an OSError. `path` stands in for a system error that names no file (a failed write()
    on an open file); an OSError raised with a message of its own keeps that message."""
    if e.strerror is None:
        return one_line(e)
    where = e.filename if e.filename is not None else path
    return f'{os.fsdecode(where)}: {e.strerror}' if where is not None else e.strerror

class CliError(click.ClickException):
    """An error that click prints as `Error: <message>` (exit code 1). The message is made one line."""

    def __init__(self, message):
        super().__init__(' '.join(str(message).split()))

@contextlib.contextmanager
def os_errors(path=None):
    """Turn any OSError raised inside the block into `Error: <path>: <reason>` (a full disk, a read-only folder, a
    file vanished). `path` names errors that carry no file name, e.g. a failed write() on an open file."""
    try:
        yield
    except OSError as e:
        raise CliError(os_error_line(e, path)) from None

def refuse_torchrun(tool):
    """Stop a tool that runs in one process when torchrun started several copies of it (they would all write the
    same outputs). The message keeps EDM2's wording."""
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        raise CliError(f'Distributed execution is not supported. ({tool} runs in one process: start it without torchrun)')

#----------------------------------------------------------------------------
# Output paths, checked before any work is done.

def _nearest_existing(path):
    """The path itself or its closest ancestor that exists (the folder a new file or folder would be made in)."""
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path

def check_writable_folder(folder, shown):
    """Fail unless a file can be created in `folder` (catches read-only file systems and /proc-like folders that
    os.access cannot judge when running as root). Nothing is left behind."""
    if not os.path.isdir(folder):
        raise CliError(f'{shown}: {folder} is not a directory')
    try:
        fd, probe = tempfile.mkstemp(prefix='.write-test-', dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise CliError(f'{shown}: cannot write there ({e.strerror or one_line(e)})') from None

def check_output_file(path, overwrite=False, overwrite_flag='--overwrite', make_folders=True):
    """Fail now (CliError) unless `path` can be written as a regular file: not a directory, not an existing file
    unless `overwrite`, and in a folder that exists (or, with make_folders, can be made) and accepts new files.
    With overwrite_flag=None an existing file is always refused."""
    if os.path.isdir(path):
        raise CliError(f'{path}: is a directory; expected a file name')
    if os.path.lexists(path):
        if not os.path.isfile(path):
            raise CliError(f'{path}: exists and is not a regular file')
        if not overwrite:
            hint = f'; pass {overwrite_flag} to replace it' if overwrite_flag else ''
            raise CliError(f'{path}: already exists{hint}')
    folder = os.path.dirname(os.path.abspath(path))
    if not make_folders and not os.path.lexists(folder):
        raise CliError(f'{path}: the folder {folder} does not exist')
    check_writable_folder(_nearest_existing(folder), path)

def check_output_dir(path):
    """Fail now (CliError) unless `path` is a folder, or can be made one, in which new files can be created."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise CliError(f'{path}: exists and is not a directory')
    check_writable_folder(_nearest_existing(path), path)

#----------------------------------------------------------------------------
# No tool writes over one of its own inputs, through any alias (a symlink, a hard link, another spelling of the
# path), and no output folder that is replaced or filled contains an input or lies inside one.

def same_file(a, b):
    """Whether the paths `a` and `b` name one file or folder: the same inode where both exist (hard links, bind
    mounts, symlinks), else the same real path."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)

def is_inside(path, folder):
    """Whether `path` lies somewhere below the folder `folder` (through symlinks too); False for the folder itself."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    parent = os.path.dirname(path)
    while parent != path:
        if parent == folder or (os.path.exists(parent) and os.path.exists(folder) and same_file(parent, folder)):
            return True
        path, parent = parent, os.path.dirname(parent)
    return False

def input_overwrite(output, inputs, folders=False):
    """Why writing `output` would damage one of `inputs` ({option: path} or [(option, path)]; None and URLs are
    skipped), as a one-line message starting with `output`, or None. With `folders`, `output` is a folder that is
    written into or replaced as a whole, so an input inside it, or it inside an input folder, counts too."""
    for option, path in (inputs.items() if isinstance(inputs, dict) else inputs):
        if path is None or '://' in str(path):
            continue
        path = os.fspath(path)
        if same_file(output, path):
            return f'{output}: is the input {option}={path} (the same file, through a link or another spelling); ' \
                   'an output must not overwrite an input'
        if folders and is_inside(path, output):
            return f'{output}: contains the input {option}={path}; an output must not overwrite an input'
        if folders and os.path.isdir(path) and is_inside(output, path):
            return f'{output}: lies inside the input {option}={path}; an output must not be written into an input'
    return None

def check_not_input(output, inputs, folders=False):
    """CliError (see input_overwrite) if writing `output` would damage one of `inputs`."""
    reason = input_overwrite(output, inputs, folders)
    if reason is not None:
        raise CliError(reason)

#----------------------------------------------------------------------------
# Option types. Each accepts its own output type as well (defaults, programmatic calls), and fails with a message
# that gives the allowed form or range.

def _range_text(lo, hi, lo_open=False, hi_open=False):
    """A range written as click writes its own, e.g. `0<x<0.289`, `x>=1`."""
    left = f'{lo}{"<" if lo_open else "<="}' if lo is not None else ''
    right = f'{"<" if hi_open else "<="}{hi}' if hi is not None else ''
    if lo is not None and hi is None:
        return f'x{">" if lo_open else ">="}{lo}'
    return f'{left}x{right}'

def _out_of_range(x, lo, hi, lo_open=False, hi_open=False):
    return ((lo is not None and (x < lo or (lo_open and x == lo))) or
            (hi is not None and (x > hi or (hi_open and x == hi))))

class FloatRange(click.FloatRange):
    """click.FloatRange that also refuses NaN (which passes every comparison) and, unless allow_inf, infinities."""

    def __init__(self, min=None, max=None, min_open=False, max_open=False,  # pylint: disable=redefined-builtin
                 allow_inf=False):
        super().__init__(min=min, max=max, min_open=min_open, max_open=max_open)
        self.allow_inf = allow_inf

    def _describe_range(self):
        # click writes 'x<=None' for a range with neither bound; an unbounded option has no range to show.
        return '' if self.min is None and self.max is None else super()._describe_range()

    def convert(self, value, param, ctx):
        x = super().convert(value, param, ctx)
        if math.isnan(x) or (math.isinf(x) and not self.allow_inf):
            self.fail(f'{value!r} is not a finite number.', param, ctx)
        return x

MAX_LIST_LENGTH = 10_000_000  # values in one list option: 10 M seeds already take ~400 MB as Python integers

def parse_int_list(text):
    """Integers from a comma list where `a-b` stands for a..b inclusive, e.g. '1,2,5-10' (lists, tuples and ranges
    pass through as lists). Raises ValueError naming the part that is neither, or a list longer than
    MAX_LIST_LENGTH (before it is built, so that 0-999999999999 is an error rather than a full memory)."""
    if isinstance(text, (list, tuple, range)):
        return [int(x) for x in text]
    values = []
    for part in str(text).split(','):
        part = part.strip()
        bounds = re.fullmatch(r'(-?\d+)-(-?\d+)', part)
        if bounds is not None:
            lo, hi = int(bounds.group(1)), int(bounds.group(2))
            if lo > hi:
                raise ValueError(f'range "{part}" is empty (start > end)')
            if len(values) + (hi - lo + 1) > MAX_LIST_LENGTH:
                raise ValueError(f'"{part}" makes the list longer than {MAX_LIST_LENGTH:,} values')
            values.extend(range(lo, hi + 1))
            continue
        try:
            values.append(int(part))
        except ValueError:
            raise ValueError(f'"{part}" is neither an integer nor a range a-b') from None
    return values

class IntList(click.ParamType):
    """A comma list of integers and ranges a-b ('0-63,100'), or '' for none; every value in [min, max]; at least
    min_len items; with `unique`, no value twice (e.g. seeds, which name output files)."""
    name = 'list'

    def __init__(self, min=None, max=None, min_len=0, unique=False):  # pylint: disable=redefined-builtin
        self.min, self.max, self.min_len, self.unique = min, max, min_len, unique

    def convert(self, value, param, ctx):
        try:
            values = [] if isinstance(value, str) and value.strip() == '' else parse_int_list(value)
        except (TypeError, ValueError) as e:
            self.fail(str(e), param, ctx)
        if len(values) < self.min_len:
            self.fail(f'{value!r}: give at least {self.min_len} value{"s" if self.min_len > 1 else ""}.', param, ctx)
        bad = [x for x in values if _out_of_range(x, self.min, self.max)]
        if bad:
            self.fail(f'{bad[0]} is not in the range {_range_text(self.min, self.max)}.', param, ctx)
        if self.unique:
            twice = first_duplicate(values)
            if twice is not None:
                self.fail(f'{twice} is given twice.', param, ctx)
        return values

def first_duplicate(values):
    """The first value of `values` that appeared before, or None."""
    seen = set()
    for value in values:
        if value in seen:
            return value
        seen.add(value)
    return None

class FloatList(click.ParamType):
    """A comma list of finite floats ('0.05,0.1'), each within the given bounds; at least min_len items."""
    name = 'list'

    def __init__(self, min=None, max=None, min_open=False, max_open=False,  # pylint: disable=redefined-builtin
                 min_len=0):
        self.bounds = (min, max, min_open, max_open)
        self.min_len = min_len

    def convert(self, value, param, ctx):
        parts = value if isinstance(value, (list, tuple)) else [p for p in str(value).split(',') if p.strip() != '']
        try:
            values = [float(x) for x in parts]
        except (TypeError, ValueError):
            self.fail(f'{value!r} is not a comma-separated list of numbers.', param, ctx)
        if len(values) < self.min_len:
            self.fail(f'{value!r}: give at least {self.min_len} value{"s" if self.min_len > 1 else ""}.', param, ctx)
        for x in values:
            if not math.isfinite(x) or _out_of_range(x, *self.bounds):
                self.fail(f'{x:g} is not in the range {_range_text(*self.bounds)}.', param, ctx)
        return values

class Nimg(click.ParamType):
    """An image count: an integer with an optional binary suffix Ki (2^10), Mi (2^20) or Gi (2^30), e.g. 128Ki."""
    name = 'nimg'
    SHIFTS = {'': 0, 'Ki': 10, 'Mi': 20, 'Gi': 30}

    def __init__(self, min=0):  # pylint: disable=redefined-builtin
        self.min = min

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            count = value
        else:
            match = re.fullmatch(r'\s*(\d+)\s*(Ki|Mi|Gi)?\s*', str(value))
            if match is None:
                self.fail(f'{value!r} is not an image count (an integer, optionally followed by Ki, Mi or Gi).',
                          param, ctx)
            count = int(match.group(1)) << self.SHIFTS[match.group(2) or '']
        if self.min is not None and count < self.min:
            self.fail(f'{value} is not in the range x>={self.min}.', param, ctx)
        return count

class Interval(click.ParamType):
    """A closed interval LO,HI of non-negative numbers with LO <= HI (HI may be inf)."""
    name = 'interval'

    def convert(self, value, param, ctx):
        parts = value if isinstance(value, (tuple, list)) else str(value).split(',')
        try:
            lo, hi = (float(v) for v in parts)
        except (TypeError, ValueError):
            self.fail(f'{value!r} is not of the form LO,HI (two numbers).', param, ctx)
        if not 0 <= lo <= hi:  # also false for NaN
            self.fail(f'{value!r} must satisfy 0 <= LO <= HI.', param, ctx)
        return (lo, hi)

class Parsed(click.ParamType):
    """Any value that a parser function turns into what the tool needs; the parser's ValueError becomes the
    message. For list syntaxes that belong to one library (e.g. the '...' progressions of EMA lengths)."""

    def __init__(self, parse, name='list'):
        self.parse, self.name = parse, name

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        try:
            return self.parse(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)
