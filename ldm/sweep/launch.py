"""Running a prepared sweep: each run is an ordinary `main_dream_booth.py -r <run dir> -t` process.

Locally one after another, or N at a time with one device each; or one run by index (a SLURM array task, or a line
of scripts/sweep.py --print_jobs). Finished runs are skipped; failed ones are retried, continuing
from their last checkpoint.
"""
import logging
import queue
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import OmegaConf

from ldm.sweep.runs import CONFIG, FAILED, SweepRun, mark_failed, mark_running, read_json, run_state
from ldm.sweep.spec import SweepError

log = logging.getLogger(__name__)

MAIN = Path(__file__).resolve().parents[2] / "main_dream_booth.py"
LOG_FILE = "train.log"


def flag_args(flags: Dict[str, Any]) -> List[str]:
    """main_dream_booth.py arguments for the run's command-line flags (seed is -s)."""
    args = []
    for key, value in flags.items():
        args += ["-s" if key == "seed" else f"--{key}", str(value)]
    return args


def command(run: SweepRun, python: str = sys.executable, device: Optional[str] = None, train: bool = True,
            main: Path = MAIN) -> List[str]:
    """The run's main_dream_booth.py command: resume in its own folder (step 0 when it has no checkpoint yet)."""
    args = [python, str(main), "-r", str(run.dir)] + (["-t"] if train else []) + flag_args(run.flags)
    return args + (["--gpus", f"{device},"] if device is not None else [])


def launch(run: SweepRun, device: Optional[str] = None, python: str = sys.executable, train: bool = True) -> bool:
    """Run one run's process to its end, output appended to its train.log; True when it finished training."""
    cmd = command(run, python, device, train)
    with open(run.dir / LOG_FILE, "a") as out:
        out.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=str(MAIN.parent))
        if train:
            mark_running(run.dir, proc.pid)
        code = proc.wait()
    if not train:
        return code == 0
    if code == 0 and run_state(run.dir) == "done":
        return True
    reason = f"exit code {code}" if code else "the process ended without finishing training"
    earlier = read_json(run.dir / FAILED)  # the run's own message (RunMarker), when it got as far as training
    mark_failed(run.dir, (f"{earlier['reason']}; " if earlier else "") + f"{reason}; see {run.dir / LOG_FILE}")
    return False


def to_run(runs: Sequence[SweepRun]) -> List[SweepRun]:
    """The runs to launch: not done and not running elsewhere (those are reported and left alone)."""
    chosen = []
    for run in runs:
        state = run.state
        if state == "running":
            log.info("%s: running elsewhere, left alone", run.name)
        elif state != "done":
            chosen.append(run)
    return chosen


def prepare_class_images(run: SweepRun, python: str) -> None:
    """Fill the class image folder once (main_dream_booth.py without -t) before parallel runs share it."""
    config = OmegaConf.load(run.dir / CONFIG)
    if OmegaConf.select(config, "data.params.reg.params.data_root"):
        log.info("class images first, with %s", run.name)
        if not launch(run, python=python, train=False):
            raise SweepError(f"setting up {run.name} (class images) failed: see {run.dir / LOG_FILE}")


def run_all(runs: Sequence[SweepRun], parallel: int = 1, devices: Optional[Sequence[str]] = None,
            python: str = sys.executable) -> Dict[str, bool]:
    """Launch every run that is not done, `parallel` at a time (each with one of `devices`, when given)."""
    if parallel < 1:
        raise SweepError(f"--parallel must be at least 1, got {parallel}")
    if devices and len(devices) < parallel:
        raise SweepError(f"--parallel {parallel} needs at least {parallel} --devices (one per run), got "
                         f"{','.join(devices)}")
    pending = to_run(runs)
    log.info("%d of %d runs to do", len(pending), len(runs))
    if parallel > 1 and pending:
        prepare_class_images(pending[0], python)
    pool: "queue.Queue[Optional[str]]" = queue.Queue()
    for device in (list(devices) if devices else [None] * parallel):
        pool.put(device)

    def one(run: SweepRun) -> bool:
        device = pool.get()
        try:
            log.info("start %s%s", run.name, f" on device {device}" if device is not None else "")
            start = time.monotonic()
            ok = launch(run, device, python)
            log.info("%s %s after %.0f s%s", run.name, "done" if ok else "FAILED", time.monotonic() - start,
                     "" if ok else f" (see {run.dir / LOG_FILE})")
            return ok
        finally:
            pool.put(device)

    with ThreadPoolExecutor(max_workers=parallel) as executor:
        return dict(zip([r.name for r in pending], executor.map(one, pending)))


def run_index(runs: Sequence[SweepRun], index: int, device: Optional[str] = None,
              python: str = sys.executable) -> bool:
    """Run the run at `index` (0-based, grid order) unless it is done: one task of a scheduler's array."""
    if not 0 <= index < len(runs):
        raise SweepError(f"--run_index {index} is out of range: the sweep has runs 0..{len(runs) - 1}")
    run = runs[index]
    if run.state == "done":
        log.info("%s is already done", run.name)
        return True
    return launch(run, device, python)
