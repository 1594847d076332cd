"""A sweep folder: the manifest, one run folder per grid point, and the markers that say how far each run got.

    <sweep_dir>/sweep.json            the manifest: spec hash, the spec, the runs (name, levels), dropped combinations
    <sweep_dir>/sweep.yaml            the sweep file as given
    <sweep_dir>/runs/<run>/config.yaml   the run's merged config; `main_dream_booth.py -r <run> -t` trains it there
    <sweep_dir>/runs/<run>/levels.json   its factor levels, command-line flags and the sweep's hash
    <sweep_dir>/runs/<run>/{running,done,failed}.json   markers; train.log   the run's output when the sweep launched it

The run folder is the run's log dir, so checkpoints/<step>-adapters, last.ckpt and train_stats.json land in it. The
markers are written by `RunMarker`, a callback every run config carries (so a plain main_dream_booth.py call on a
cluster writes them too), and by the launcher when a run's process fails before training starts.
"""
import copy
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytorch_lightning as pl
from omegaconf import OmegaConf

from ldm.checkpoint import atomic_write
from ldm.sweep.spec import Grid, Run, SweepError, expand, load_spec, spec_hash

log = logging.getLogger(__name__)

MANIFEST, SPEC_COPY, RUNS = "sweep.json", "sweep.yaml", "runs"
CONFIG, LEVELS = "config.yaml", "levels.json"
DONE, RUNNING, FAILED = "done.json", "running.json", "failed.json"
STATES = ("done", "running", "failed", "pending")
MARKER_CALLBACK = "sweep_marker"
HEARTBEAT_S = 60.0


def write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, default=str) + "\n"
    atomic_write(str(path), lambda tmp: Path(tmp).write_text(text))


def read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass
class SweepRun:
    """A run of a prepared sweep folder: index in the manifest, name, folder, levels and command-line flags."""
    index: int
    name: str
    dir: Path
    levels: Dict[str, Any]
    flags: Dict[str, Any]

    @property
    def state(self) -> str:
        return run_state(self.dir)


# ---- preparing the folder ---------------------------------------------------------------------------------------
def plan(spec_path: str, sweep_dir: str, root: Optional[Path] = None) -> Tuple[Dict[str, Any], str, Grid]:
    """Expand the sweep file and check that `sweep_dir` may hold it, writing nothing: (spec, hash, grid)."""
    spec = load_spec(spec_path)
    digest, sweep_dir = spec_hash(spec), Path(sweep_dir)
    check_owner(sweep_dir, digest)
    grid = expand(spec, root)
    for run in grid.runs:
        check_run_owner(sweep_dir / RUNS / run.name, digest)
    return spec, digest, grid


def planned_runs(grid: Grid, sweep_dir: str) -> List[SweepRun]:
    """The runs of a planned grid in `sweep_dir`, in grid order, without writing anything (their states come from
    whatever run folders already exist)."""
    return [SweepRun(i, r.name, Path(sweep_dir) / RUNS / r.name, r.levels, r.flags) for i, r in enumerate(grid.runs)]


def check_base_weights(grid: Grid) -> None:
    """Every run's base weights (`actual_resume`, i.e. model.params.ckpt_path) must be a file, or a clear error."""
    for path in sorted({str(OmegaConf.select(r.config, "model.params.ckpt_path") or "") for r in grid.runs}):
        if not path:
            raise SweepError("the sweep sets no base weights: add actual_resume=FILE (an SD v1 .ckpt or "
                             ".safetensors) to its overrides")
        if not Path(path).is_file():
            raise SweepError(f"base weights not found: '{path}' (actual_resume; relative paths are taken from the "
                             "folder scripts/sweep.py runs in): put the file there or fix the path")


def prepare(spec_path: str, sweep_dir: str, root: Optional[Path] = None) -> List[SweepRun]:
    """Expand the sweep file into `sweep_dir` (manifest and one folder per run); returns the runs in grid order.

    A folder made from another sweep file is refused; an existing run folder keeps its config (it may have started).
    """
    spec, digest, grid = plan(spec_path, sweep_dir, root)
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json(sweep_dir / MANIFEST, manifest(spec, digest, grid))
    atomic_write(str(sweep_dir / SPEC_COPY), lambda tmp: Path(tmp).write_text(Path(spec_path).read_text()))
    for run in grid.runs:
        write_run(sweep_dir / RUNS / run.name, run, digest)
    log.info("sweep %s: %d runs in %s", digest, len(grid.runs), sweep_dir)
    return load_runs(sweep_dir)


def manifest(spec: Dict[str, Any], digest: str, grid: Grid) -> Dict[str, Any]:
    return {"spec_hash": digest, "spec": spec,
            "runs": [{"name": r.name, "levels": r.levels, "flags": r.flags} for r in grid.runs],
            "dropped": [{"levels": levels, "reason": reason} for levels, reason in grid.dropped]}


def check_owner(sweep_dir: Path, digest: str) -> None:
    """Refuse a sweep folder that holds another sweep."""
    found = read_json(sweep_dir / MANIFEST)
    if (sweep_dir / MANIFEST).exists() and found is None:
        raise SweepError(f"'{sweep_dir / MANIFEST}' is unreadable: remove the sweep folder or choose another one")
    if found is not None and found.get("spec_hash") != digest:
        raise SweepError(f"'{sweep_dir}' holds another sweep (spec hash {found.get('spec_hash')}, this sweep file's is "
                         f"{digest}): pass another --sweep_dir, or remove that folder to start over")


def check_run_owner(run_dir: Path, digest: str) -> None:
    """Refuse a run folder that another sweep (or a plain training run) wrote."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    levels = read_json(run_dir / LEVELS)
    if levels is None or levels.get("sweep") != digest:
        other = levels.get("sweep") if levels else "none: not a sweep run"
        raise SweepError(f"run folder '{run_dir}' belongs to another sweep (its sweep hash: {other}; this sweep's: "
                         f"{digest}): move it away or use another --sweep_dir")


def write_run(run_dir: Path, run: Run, digest: str) -> None:
    """The run's config.yaml (with the marker callback) and levels.json; an existing config is kept."""
    if not (run_dir / CONFIG).exists():
        config = copy.deepcopy(run.config)
        OmegaConf.update(config, f"lightning.callbacks.{MARKER_CALLBACK}",
                         {"target": "ldm.sweep.runs.RunMarker", "params": {"sweep": digest}}, force_add=True)
        text = OmegaConf.to_yaml(config)
        atomic_write(str(run_dir / CONFIG), lambda tmp: Path(tmp).write_text(text))
    write_json(run_dir / LEVELS, {"sweep": digest, "run": run.name, "levels": run.levels, "flags": run.flags})


def load_runs(sweep_dir: str) -> List[SweepRun]:
    """The runs of a prepared sweep folder, in grid order."""
    sweep_dir = Path(sweep_dir)
    found = read_json(sweep_dir / MANIFEST)
    if found is None:
        raise SweepError(f"'{sweep_dir}' is not a sweep folder (no readable {MANIFEST}): run scripts/sweep.py "
                         "SWEEP.yaml --sweep_dir DIR first")
    return [SweepRun(i, r["name"], sweep_dir / RUNS / r["name"], r["levels"], r.get("flags", {}))
            for i, r in enumerate(found["runs"])]


# ---- states -----------------------------------------------------------------------------------------------------
def _alive(marker: Dict[str, Any], stale_after_s: float) -> bool:
    """Whether the process of a running marker still runs: by pid on this host, by its heartbeat elsewhere."""
    if marker.get("host") == socket.gethostname():
        try:
            os.kill(int(marker["pid"]), 0)
            return True
        except (OSError, KeyError, ValueError):
            return False
    return time.time() - float(marker.get("updated", 0)) < stale_after_s


def run_state(run_dir: Path, stale_after_s: float = 1800.0) -> str:
    """done, running, failed (an error, or a running marker whose process is gone) or pending."""
    if (run_dir / DONE).exists():
        return "done"
    running = read_json(run_dir / RUNNING)
    if running is not None:
        return "running" if _alive(running, stale_after_s) else "failed"
    return "failed" if (run_dir / FAILED).exists() else "pending"


def mark_running(run_dir: Path, pid: int) -> None:
    (run_dir / FAILED).unlink(missing_ok=True)
    now = time.time()
    write_json(run_dir / RUNNING, {"host": socket.gethostname(), "pid": pid, "started": now, "updated": now})


def mark_failed(run_dir: Path, reason: str) -> None:
    write_json(run_dir / FAILED, {"reason": reason, "time": time.time()})
    (run_dir / RUNNING).unlink(missing_ok=True)


def mark_done(run_dir: Path, info: Dict[str, Any]) -> None:
    write_json(run_dir / DONE, {**info, "time": time.time()})
    (run_dir / RUNNING).unlink(missing_ok=True)
    (run_dir / FAILED).unlink(missing_ok=True)


def summary(runs: List[SweepRun]) -> Dict[str, List[str]]:
    """Run names by state."""
    by_state: Dict[str, List[str]] = {s: [] for s in STATES}
    for run in runs:
        by_state[run.state].append(run.name)
    return by_state


# ---- the callback every run carries ----------------------------------------------------------------------------
class RunMarker(pl.Callback):
    """Writes running.json at the start of training (refreshed every minute), done.json at its end, failed.json on an
    exception, in the run's log dir; rank 0 only."""

    def __init__(self, sweep: str = ""):
        self.sweep, self.last_beat = sweep, 0.0

    def _dir(self, trainer: pl.Trainer) -> Path:
        return Path(trainer.default_root_dir)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            mark_running(self._dir(trainer), os.getpid())
            self.last_beat = time.monotonic()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.is_global_zero and time.monotonic() - self.last_beat > HEARTBEAT_S:
            marker = read_json(self._dir(trainer) / RUNNING) or {}
            write_json(self._dir(trainer) / RUNNING, {**marker, "updated": time.time(), "step": trainer.global_step})
            self.last_beat = time.monotonic()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            mark_done(self._dir(trainer), {"sweep": self.sweep, "global_step": trainer.global_step})

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.is_global_zero:
            mark_failed(self._dir(trainer), f"{type(exception).__name__}: {exception}")
