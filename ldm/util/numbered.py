"""Numbered files (grid-0003.png) that never replace one: the next free number, and a set of files written together
under it, created exclusively."""

import re
from pathlib import Path
from typing import Callable, List, Sequence

from ldm.checkpoint import atomic_write


def next_number(directory: Path, names: Sequence[str]) -> int:
    """1 + the largest number in the files of `directory` named like one of `names` ("grid-{:04}.png"), else 0."""
    used = [-1]
    for name in names:
        head, rest = name.split("{", 1)
        pattern = re.compile(re.escape(head) + r"(\d+)" + re.escape(rest.split("}", 1)[1]))
        used += [int(m.group(1)) for f in directory.iterdir() if (m := pattern.fullmatch(f.name))]
    return max(used) + 1


def save_numbered(directory: Path, names: Sequence[str], writers: Sequence[Callable[[str], None]]) -> List[Path]:
    """Write one file per name (`names[i].format(n)` by `writers[i](tmp_path)`) under the next number n that none
    of them uses in `directory`; files are created exclusively, so writers running at once never overwrite each
    other (a number taken meanwhile moves all of them on to the next)."""
    directory.mkdir(parents=True, exist_ok=True)
    n = next_number(directory, names)
    while True:
        done: List[Path] = []
        try:
            for name, write in zip(names, writers):
                atomic_write(directory / name.format(n), write, replace=False)
                done.append(directory / name.format(n))
            return done
        except FileExistsError:
            for path in done:  # ours, written a moment ago: the set moves on together
                path.unlink()
            n += 1
