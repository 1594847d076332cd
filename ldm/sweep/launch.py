"""Running a prepared sweep: each run is an ordinary `python -m ldm.train -r <run dir> -t` process (its RunRequest
as a command line; the child process keeps a crash, a leak or a thread setting of one run from the others); with
--pack, runs that can share a base model train as packs (`ldm.train.pack`), one process each.

Locally one after another, or N at a time with one device each; or one run by index (a SLURM array task, or a line
of scripts/sweep.py --print_jobs). Finished runs are skipped; failed ones are retried, continuing
from their last checkpoint. Two launchers on one sweep folder never start one run twice: a launcher claims a run by a
lock in its folder (`.launch.lock`, held while the run's process runs) and checks its state again under the lock.
"""
import logging
import os
import queue
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Union

from omegaconf import OmegaConf

from ldm.checks import file_lock
from ldm.sweep.runs import CONFIG, FAILED, SweepRun, mark_done, mark_failed, mark_running, read_json, run_state
from ldm.sweep.spec import SweepError
from ldm.train import NEXT, RunRequest, finished_at
from ldm.train.pack_plan import group_runs, pack_capacity
from ldm.train.request import with_options

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]  # the child runs here, so `ldm` is this checkout's
LOG_FILE = "train.log"
CLAIM = ".launch.lock"


@contextmanager
def claimed(run: SweepRun) -> Iterator[bool]:
    """Whether this launcher may start `run` now: it holds the run's lock (until the block ends) and the run is
    neither done nor running (checked under the lock, so another launcher's start is seen)."""
    with file_lock(run.dir / CLAIM, blocking=False) as mine:
        yield mine and run.state not in ("done", "running")


def request(run: SweepRun, device: Optional[str] = None, train: bool = True,
            allow_any_target: bool = False) -> RunRequest:
    """The run's RunRequest: resume in its own folder (step 0 when it has no checkpoint yet) with its run options;
    `allow_any_target` passes --allow_any_target on (the user's own classes in the configs; a sweep file cannot)."""
    base = RunRequest(resume=str(Path(run.dir).resolve()), train=train, allow_any_target=allow_any_target,
                      gpus=f"{device}," if device is not None else None)
    return with_options(base, run.flags)


def command(run: SweepRun, python: str = sys.executable, device: Optional[str] = None, train: bool = True,
            allow_any_target: bool = False) -> List[str]:
    """The run's process: `python -m ldm.train` with its RunRequest."""
    return [python, "-m", "ldm.train", *request(run, device, train, allow_any_target).to_argv()]


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def thread_env(parallel: int, cpus: Optional[int] = None) -> Dict[str, str]:
    """The environment of a run process when `parallel` share this machine's CPUs: each gets its share of the cores
    as its thread count (torch's default, one thread per core in every process, oversubscribes the cores and slowed
    a tiny-world run 10x at --parallel 2 on 2 cores); a thread count the user set is kept."""
    env = dict(os.environ)
    if parallel > 1 and not any(v in env for v in THREAD_VARS):
        share = str(max(1, (cpus or os.cpu_count() or 1) // parallel))
        env.update({v: share for v in THREAD_VARS})
    return env


def launch(run: SweepRun, device: Optional[str] = None, python: str = sys.executable, train: bool = True,
           allow_any_target: bool = False, parallel: int = 1) -> bool:
    """Run one run's process to its end, output appended to its train.log; True when it finished training. With
    `parallel` > 1 (runs at once on this machine) the process gets its share of the CPU cores as threads."""
    cmd = command(run, python, device, train, allow_any_target=allow_any_target)
    with open(run.dir / LOG_FILE, "a") as out:
        out.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO),
                                env=thread_env(parallel))
        if train:
            mark_running(run.dir, proc.pid)
        code = proc.wait()
    return settle(run, code, run.dir / LOG_FILE) if train else code == 0


def settle(run: SweepRun, code: int, log_file: Path) -> bool:
    """After the run's process ended with `code`: True when the run is done, else it is marked failed (with its own
    message when it got as far as training, and where its output is)."""
    if code == 0 and run_state(run.dir) != "done" and finished_at(run.dir) is not None:
        # killed after its final checkpoint but before done.json: the run said "already finished"
        mark_done(run.dir, {"global_step": finished_at(run.dir)})
    if code == 0 and run_state(run.dir) == "done":
        return True
    reason = f"exit code {code}" if code else "the process ended without finishing training"
    earlier = read_json(run.dir / FAILED)  # the run's own message (RunMarker), when it got as far as training
    mark_failed(run.dir, (f"{earlier['reason']}; " if earlier else "") + f"{reason}; see {log_file}")
    return False


# ---- packs ------------------------------------------------------------------------------------------------------
def packs_of(runs: Sequence[SweepRun], pack: Union[int, str], allow_any_target: bool = False, parallel: int = 1
             ) -> List[List[SweepRun]]:
    """The runs in packs of up to `pack` of runs that can share one (`ldm.train.pack_plan`; the others alone), in grid
    order. "auto": as many as fit in the memory at hand, shared by `parallel` packs, and the runs spread evenly over
    the `parallel` processes (so none idles while one trains them all)."""
    requests = [request(r, allow_any_target=allow_any_target) for r in runs]
    packs = []
    for group in group_runs(requests):
        size = pack if pack != "auto" else max(1, min(pack_capacity(requests[group[0]]) // parallel,
                                                      -(-len(group) // parallel)))
        packs += [[runs[i] for i in group[k:k + size]] for k in range(0, len(group), size)]
    return sorted(packs, key=lambda p: p[0].index)


def pack_command(runs: Sequence[SweepRun], python: str = sys.executable, device: Optional[str] = None,
                 allow_any_target: bool = False) -> List[str]:
    """One process for the pack: `python -m ldm.train` with the runs' requests separated by --next."""
    argv = [python, "-m", "ldm.train"]
    for k, run in enumerate(runs):
        argv += ([NEXT] if k else []) + request(run, device, True, allow_any_target).to_argv()
    return argv


def launch_pack(runs: Sequence[SweepRun], log_dir: Path, device: Optional[str] = None, python: str = sys.executable,
                allow_any_target: bool = False, parallel: int = 1) -> Dict[str, bool]:
    """Train the runs as one pack to its end; its output goes to <log_dir>/<first run>+<n>.log (each run's train.log
    says so). Returns each run's success."""
    cmd = pack_command(runs, python, device, allow_any_target)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / f"{runs[0].name}+{len(runs) - 1}.log"
    stamp = time.strftime('%Y-%m-%d %H:%M:%S')
    with open(log_file, "a") as out:
        out.write(f"\n# {stamp}: {shlex.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO), env=thread_env(parallel))
        for run in runs:
            mark_running(run.dir, proc.pid)
            with open(run.dir / LOG_FILE, "a") as own:
                own.write(f"\n# {stamp}: trained in a pack of {len(runs)} runs; its output is in {log_file}\n")
        code = proc.wait()
    # a pack's exit status is not 0 when one of its runs failed; the others judge by their own markers
    return {run.name: settle(run, 0 if run_state(run.dir) == "done" or finished_at(run.dir) is not None else code,
                             log_file) for run in runs}


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


def prepare_class_images(run: SweepRun, python: str, allow_any_target: bool = False) -> None:
    """Fill the class image folder once (the run without -t) before parallel runs share it."""
    config = OmegaConf.load(run.dir / CONFIG)
    if not OmegaConf.select(config, "data.params.reg.params.data_root"):
        return
    with claimed(run) as mine:  # not when another launcher has the run (it makes them)
        if mine:
            log.info("class images first, with %s", run.name)
            if not launch(run, python=python, train=False, allow_any_target=allow_any_target):
                raise SweepError(f"setting up {run.name} (class images) failed: see {run.dir / LOG_FILE}")


def run_all(runs: Sequence[SweepRun], parallel: int = 1, devices: Optional[Sequence[str]] = None,
            python: str = sys.executable, allow_any_target: bool = False,
            pack: Optional[Union[int, str]] = None, pack_logs: Optional[Path] = None) -> Dict[str, bool]:
    """Launch every run that is not done, `parallel` processes at a time (each with one of `devices`, when given);
    with `pack` (a size or "auto") the runs that can share train in packs, one process each, logs in `pack_logs`."""
    if parallel < 1:
        raise SweepError(f"--parallel must be at least 1, got {parallel}")
    if devices and len(devices) < parallel:
        raise SweepError(f"--parallel {parallel} needs at least {parallel} --devices (one per run), got "
                         f"{','.join(devices)}")
    pending = to_run(runs)
    log.info("%d of %d runs to do", len(pending), len(runs))
    if parallel > 1 and pending:
        prepare_class_images(pending[0], python, allow_any_target)
    units = packs_of(pending, pack, allow_any_target, parallel) if pack and pending else [[r] for r in pending]
    pool: "queue.Queue[Optional[str]]" = queue.Queue()
    for device in (list(devices) if devices else [None] * parallel):
        pool.put(device)

    def one(unit: List[SweepRun]) -> Dict[str, bool]:
        device = pool.get()
        try:
            with ExitStack() as stack:
                mine = [r for r in unit if stack.enter_context(claimed(r))]
                for r in unit:
                    if r not in mine:
                        log.info("%s: done or started by another launcher meanwhile, left alone", r.name)
                if not mine:
                    return {r.name: True for r in unit}
                names = ", ".join(r.name for r in mine)
                log.info("start %s%s", names if len(mine) == 1 else f"a pack of {len(mine)}: {names}",
                         f" on device {device}" if device is not None else "")
                start = time.monotonic()
                if len(mine) == 1:
                    results = {mine[0].name: launch(mine[0], device, python, allow_any_target=allow_any_target,
                                                    parallel=parallel)}
                else:
                    results = launch_pack(mine, Path(pack_logs or mine[0].dir.parent), device, python,
                                          allow_any_target, parallel)
            for r in mine:
                log.info("%s %s after %.0f s%s", r.name, "done" if results[r.name] else "FAILED",
                         time.monotonic() - start, "" if results[r.name] else f" (see {r.dir / LOG_FILE})")
            return {**{r.name: True for r in unit if r not in mine}, **results}
        finally:
            pool.put(device)

    with ThreadPoolExecutor(max_workers=parallel) as executor:
        done: Dict[str, bool] = {}
        for results in executor.map(one, units):
            done.update(results)
    return {r.name: done[r.name] for r in pending}


def run_index(runs: Sequence[SweepRun], index: int, device: Optional[str] = None,
              python: str = sys.executable, allow_any_target: bool = False) -> bool:
    """Run the run at `index` (0-based, grid order) unless it is done: one task of a scheduler's array."""
    if not 0 <= index < len(runs):
        raise SweepError(f"--run_index {index} is out of range: the sweep has runs 0..{len(runs) - 1}")
    run = runs[index]
    if run.state == "done":
        log.info("%s is already done", run.name)
        return True
    with claimed(run) as mine:
        if not mine:
            log.info("%s is done or running elsewhere: left alone", run.name)
            return True
        return launch(run, device, python, allow_any_target=allow_any_target)
