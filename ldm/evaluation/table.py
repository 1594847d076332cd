"""The results table: one CSV row per run, rewritten atomically under a lock, so a crash never leaves half a table.

Its metric columns are named here, once: `<backend>_i` subject fidelity (DINO, CLIP-I), `<backend>_t` prompt fidelity
(CLIP-T), `<backend>_prior` prior preservation, and `fid` (lower is better; every other metric is higher-is-better).
"""
import csv
import fcntl
import io
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List

from ldm.checkpoint import atomic_write

RUN = "run"  # the key column
SUBJECT, PROMPT, PRIOR = "_i", "_t", "_prior"  # suffixes of a backend's metric columns
METRIC_SUFFIXES = {SUBJECT: "subject fidelity", PROMPT: "prompt fidelity", PRIOR: "prior preservation"}
FID = "fid"


def metric_column(backend: str, suffix: str) -> str:
    """The column of one backend's metric, e.g. ('dino', SUBJECT) -> 'dino_i'."""
    if suffix not in METRIC_SUFFIXES:
        raise ValueError(f"unknown metric suffix '{suffix}'; known: {', '.join(METRIC_SUFFIXES)}")
    return f"{backend}{suffix}"


def is_metric_column(name: str) -> bool:
    """Whether a column holds a metric that evaluation writes (<backend>_i, _t, _prior, or fid)."""
    return name == FID or (name.endswith(tuple(METRIC_SUFFIXES)) and name not in METRIC_SUFFIXES)


def higher_is_better(name: str) -> bool:
    """The direction of a metric: FID is a distance (lower is better); similarities and rates are higher-is-better."""
    return name != FID


def read_rows(path: Path) -> List[Dict[str, str]]:
    """The table's rows (strings, as CSV holds them); none when the file does not exist yet."""
    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside the table, so two evaluations writing it do not lose each other's rows."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def to_csv(rows: List[Dict[str, Any]]) -> str:
    """Rows as CSV text; the columns are the union of the rows' keys in first-seen order, `run` first."""
    columns = [RUN] + [k for k in dict.fromkeys(k for r in rows for k in r) if k != RUN]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def upsert_row(path: Path, row: Dict[str, Any]) -> None:
    """Add `row` to the table at `path`, replacing an earlier row of the same run."""
    with locked(path):
        rows = [r for r in read_rows(path) if r.get(RUN) != str(row[RUN])] + [row]
        text = to_csv(rows)
        atomic_write(str(path), lambda tmp: Path(tmp).write_text(text))


def done_runs(path: Path) -> List[str]:
    """Runs that already have a row."""
    return [r[RUN] for r in read_rows(path)]
