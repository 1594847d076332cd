"""The results table: one CSV row per run, rewritten atomically under a lock, so a crash never leaves half a table
and two evaluations writing one table lose nothing. A file that is not a results table is never written.

Its metric columns, their names and directions are the registry's (`ldm.evaluation.metrics.METRICS`): e.g.
`<backend>_i` subject fidelity, `<backend>_t` prompt fidelity, `<backend>_prior` prior preservation,
`<backend>_leak` subject leakage (lower is better), `fid` (lower is better).
"""
import csv
import io
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List

from ldm.checkpoint import atomic_write
from ldm.checks import OutputPathError, check_writable_place, file_lock
from ldm.evaluation.backends import EvaluationError
from ldm.evaluation.metrics import metric_of_column

RUN = "run"  # the key column
SUBJECT_COLUMN = "subject"  # the subject a run was trained on: a sweep's `subject` level, else its data folder's name


def is_metric_column(name: str) -> bool:
    """Whether a column holds a metric of the registry (<backend>_i, _t, _prior, _leak, ..., fid)."""
    return metric_of_column(name) is not None


def higher_is_better(name: str) -> bool:
    """The direction of a metric column, from the registry (similarities and rates up, leakage and FID down); a
    column that is no registry metric counts as higher-is-better."""
    metric = metric_of_column(name)
    return metric.higher_is_better if metric else True


def read_rows(path: Path) -> List[Dict[str, str]]:
    """The table's rows (strings, as CSV holds them); none when the file does not exist yet."""
    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_table(path: Path, what: str = "results table") -> Path:
    """Refuse, before any work, a table path that is a folder, a file that is not a results table (a CSV whose first
    column is `run`), or a place that cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise EvaluationError(f"{what} '{path}' is a folder, not a results table: name a .csv file (e.g. "
                              f"'{path / 'results.csv'}')")
    if path.exists():
        try:
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            header = [f"unreadable: {e}"]
        if header[:1] != [RUN]:
            raise EvaluationError(f"'{path}' is not a results table (a CSV whose first column is '{RUN}'): rows are "
                                  "only added to tables evaluate.py wrote; pass another --table")
        return path
    try:
        return check_writable_place(path, what)
    except OutputPathError as e:
        raise EvaluationError(str(e)) from None


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside the table, so two evaluations writing it do not lose each other's rows."""
    with file_lock(Path(f"{path}.lock")):
        yield


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
    check_table(path)
    with locked(path):
        rows = [r for r in read_rows(path) if r.get(RUN) != str(row[RUN])] + [row]
        text = to_csv(rows)
        atomic_write(str(path), lambda tmp: Path(tmp).write_text(text))


def done_runs(path: Path) -> List[str]:
    """Runs that already have a row."""
    return [r[RUN] for r in read_rows(path)]
