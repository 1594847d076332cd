"""Checks of what a user hands in, shared by the scripts and the library: numbers in range (NaN and infinities
refused), devices, text files that are UTF-8, YAML without repeated keys, and output paths that can be written without
losing anything, with errors that name the problem and the fix; and the file lock two processes use not to do one job
twice.

Scripts parse with `ArgumentParser` (defaults in --help, one-line errors, no abbreviations) and the argparse `type=`
functions (`int_in`, `float_in`, `finite_float`, `positive_int`, `seed_int`,
`int_list`, `device_arg`) so that a bad number stops `parse_args` before any work; the library and config checks call
`check_number`; every script checks its outputs with `check_output` (or claims a fresh folder with `fresh_dir`) before
it reads a weight.
"""
import argparse
import math
import numbers
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import filelock
import torch
import yaml

PathLike = Union[str, os.PathLike]


class ConfigError(ValueError):
    """A config names something that does not exist, is missing a required field, or holds a number out of range."""


class OutputPathError(ValueError):
    """An output path that would overwrite something, lies inside an input, or cannot be written."""


# ---- numbers ----------------------------------------------------------------------------------------------------
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def yaml_number(value: Any) -> Any:
    """`value`, with a string in exponent notation (1e-4, which YAML 1.1 reads as text) as the float it means."""
    return float(value) if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()) else value


def parse_yaml_value(text: str) -> Any:
    """A command-line VALUE as YAML (1e-4 included as a float; empty text is None)."""
    return yaml_number(yaml.safe_load(text)) if text.strip() else None


def check_number(value: Any, what: str, low: Optional[float] = None, high: Optional[float] = None,
                 integer: bool = False, low_open: bool = False, high_open: bool = False, optional: bool = False,
                 hint: str = "", error: type = ConfigError) -> Any:
    """`value` when it is a finite number (an int when `integer`; 1e-4 written as YAML 1.1 text included) within
    [low, high] (open ends as asked; None too when `optional`); else `error` naming `what`, the value, the allowed
    range and the `hint`."""
    if value is None and optional:
        return None
    value = yaml_number(value)
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok and not isinstance(value, numbers.Integral):  # (huge ints are fine; float() of them would overflow)
        ok = math.isfinite(value) and (not integer or float(value).is_integer())
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        rule = describe_range(low, high, integer, low_open, high_open) + (" (or null)" if optional else "")
        raise error(f"{what} must be {rule}{f' ({hint})' if hint else ''}, got {value!r}")
    return int(value) if integer else value


def describe_range(low: Optional[float], high: Optional[float], integer: bool = False, low_open: bool = False,
                   high_open: bool = False) -> str:
    """'an integer >= 1', 'a finite number in (0, 1)', ..."""
    kind = "an integer" if integer else "a finite number"
    lo, hi = (str(v) if isinstance(v, int) else f"{v:g}" for v in (low or 0, high or 0))
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {lo}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {hi}"
    return kind


def _argtype(parse: Callable[[str], Any], name: str, **bounds: Any) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return check_number(parse(text), "the value", **bounds)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {describe_range(**bounds)}, got {text!r}") from None
    convert.__name__ = name
    return convert


def int_in(low: Optional[int] = None, high: Optional[int] = None) -> Callable[[str], int]:
    """argparse type: an integer in [low, high]."""
    return _argtype(int, "int", low=low, high=high, integer=True)


def float_in(low: Optional[float] = None, high: Optional[float] = None, low_open: bool = False,
             high_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite float in the range (NaN and infinities are refused)."""
    return _argtype(float, "float", low=low, high=high, low_open=low_open, high_open=high_open)


finite_float = float_in()
positive_int = int_in(1)
non_negative_int = int_in(0)
SEED_MAX = 2 ** 32 - 1  # what numpy's and Lightning's seeding take
seed_int = int_in(0, SEED_MAX)


def int_list(low: Optional[int] = None, high: Optional[int] = None, unique: bool = True) -> Callable[[str], list]:
    """argparse type: comma-separated integers in [low, high] ("0,1,2,3"), at least one, none twice when `unique`."""
    one = int_in(low, high)

    def convert(text: str) -> list:
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"must be comma-separated integers like 0,1,2,3, got {text!r}")
        values = [one(s) for s in items]
        if unique and len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"lists a value twice ({text!r}): each would give the same result again")
        return values
    convert.__name__ = "list of int"
    return convert


def device_arg(text: str) -> str:
    """argparse type: a torch device this machine has ('cpu', 'cuda', 'cuda:1', 'mps', ...)."""
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"'{text}' is not a torch device ({str(e).splitlines()[0][:120]}): use "
                                         "cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise argparse.ArgumentTypeError(f"'{text}': this machine has {count} CUDA device(s)"
                                             + (f" (cuda:0 to cuda:{count - 1})" if count else "; use cpu"))
    return text


# ---- command lines -----------------------------------------------------------------------------------------------
class ArgumentParser(argparse.ArgumentParser):
    """argparse with help that shows defaults, errors as one line (`prog: error: ...`, exit status 1, no usage
    dump) the way the scripts' own checks report, and no abbreviated options (a misspelt --n_sample is refused,
    not taken for --n_samples)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:
        sys.exit(f"{self.prog}: error: {message} (see {self.prog} --help)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Help with each option's default (none shown for flags and options without one), descriptions kept as
    written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, [], argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


# ---- text files -------------------------------------------------------------------------------------------------
def read_text(path: PathLike, what: str = "text file", error: type = ValueError) -> str:
    """The content of a UTF-8 text file (a byte-order mark is dropped); a file in another encoding (Latin-1,
    Windows-1252, UTF-16) is `error`, naming the line and the byte, rather than text decoded wrongly."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        guess = " (UTF-16?)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else " (Latin-1 or Windows-1252?)"
        raise error(f"{what} '{path}' is not UTF-8 text: byte 0x{data[e.start]:02x} on line {line} cannot be "
                    f"decoded{guess}; save it as UTF-8") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader, refusing a mapping that lists a key twice (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"found duplicate key {key!r}: a key given twice would silently keep only the last",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def safe_load_unique(text: str) -> Any:
    """YAML `text` as yaml.safe_load reads it, but a key repeated in one mapping is a yaml.YAMLError (as the config
    loader refuses it)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


# ---- output paths -----------------------------------------------------------------------------------------------
def _is_within(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def _existing_ancestor(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            return parent
    return Path(path.anchor or ".")


def check_writable_place(path: PathLike, what: str = "output") -> Path:
    """The folder `path` would be created in must be creatable: its nearest existing ancestor a writable directory
    (tried for real, so read-only file systems and permissions are both caught; nothing is left behind)."""
    if not str(path).strip():
        raise OutputPathError(f"{what} is empty: name a path")
    path = Path(os.path.abspath(path))
    ancestor = _existing_ancestor(path)
    if not ancestor.is_dir():
        raise OutputPathError(f"{what} '{path}' lies under '{ancestor}', which is a file, not a folder: choose a path "
                              "in a folder")
    try:
        os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=".write-test-"))
    except OSError as e:
        raise OutputPathError(f"{what} '{path}' cannot be written: '{ancestor}' is not writable ({e.strerror}); "
                              "choose a folder you can write to") from None
    return path


def check_output_dir(path: PathLike, what: str = "output folder") -> Path:
    """`path` as a folder that exists and can be written, or can be made, checked before any work and without
    creating anything (files are added to it, none replaced)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputPathError(f"{what} '{p}' is a file, not a folder: pass another path")
    check_writable_place(p / "x" if p.is_dir() else p, what)
    return p


def check_output(path: PathLike, what: str = "output", kind: str = "file", inputs: Iterable[Optional[PathLike]] = (),
                 suffixes: Optional[Sequence[str]] = None) -> Path:
    """Refuse an output `path` that would lose something, before any work: one that exists (a file, or a folder
    that is not empty; `kind` "dir" accepts an empty folder), is or lies inside one of `inputs`, has a suffix not in
    `suffixes` (when given; "" stands for no suffix), or cannot be created. Returns the path."""
    if not str(path).strip():
        raise OutputPathError(f"{what} is empty: name a path")
    path = Path(path)
    if suffixes is not None and path.suffix.lower() not in suffixes:
        allowed = " or ".join("no suffix (a folder)" if s == "" else s for s in suffixes)
        raise OutputPathError(f"{what} '{path}' has the suffix '{path.suffix}'; it must have {allowed}, which picks "
                              "the format")
    full = Path(os.path.abspath(path)).resolve()
    for source in (s for s in inputs if s is not None and str(s)):
        given = Path(os.path.abspath(source)).resolve()
        if _is_within(full, given):
            where = "" if full == given else "inside "
            raise OutputPathError(f"{what} '{path}' is {where}the input '{source}': writing there would change the "
                                  "input; choose another path")
    empty_dir = kind == "dir" and path.is_dir() and not any(path.iterdir())
    if not empty_dir and (path.exists() or path.is_symlink()):
        thing = ("a folder that is not empty" if any(path.iterdir()) else "a folder") if path.is_dir() else "a file"
        raise OutputPathError(f"{what} '{path}' already exists ({thing}); nothing is overwritten: choose a new path or "
                              "move it away")
    check_writable_place(path / "x" if empty_dir else path, what)
    return path


def fresh_dir(path: PathLike, what: str = "output folder") -> Path:
    """Create and return folder `path`, or, when something is there already, the first free `path-2`, `path-3`, ...
    beside it (created exclusively, so two processes never share one)."""
    path = Path(path)
    check_writable_place(path, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10000):
        candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise OutputPathError(f"{what}: '{path}' and 9,999 numbered folders beside it exist; choose another path")


# ---- one job, one process ---------------------------------------------------------------------------------------
LOCK_SUFFIX = ".lock"


@contextmanager
def file_lock(path: PathLike, blocking: bool = True) -> Iterator[bool]:
    """An exclusive lock on the dedicated lock file `path` (its name ends in .lock; it is created when missing, and
    its content is never read or written); yields whether it was taken (always, when `blocking`). The lock goes with
    the process, so a killed holder never leaves it taken; child processes do not inherit it. The `filelock` package
    takes it (flock on POSIX, LockFileEx on Windows); a file of the user's is never locked, as a lock library may
    truncate or, on Windows, remove the file it locks."""
    path = Path(path)
    if not path.name.endswith(LOCK_SUFFIX):
        raise ValueError(f"file_lock takes a dedicated lock file named *{LOCK_SUFFIX}, got '{path}'")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(path))
        lock.acquire(timeout=-1 if blocking else 0)
    except filelock.Timeout:
        yield False
        return
    except OSError as e:
        raise OutputPathError(f"cannot take the lock '{path}' ({e.strerror or e}): the folder must be "
                              "writable") from None
    try:
        yield True
    finally:
        lock.release()
