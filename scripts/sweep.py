"""Design-space sweeps: expand a sweep file into one DreamBooth run per grid point and run them.

    python scripts/sweep.py configs/sweeps/position-pairs.yaml --sweep_dir sweeps/pairs            # one after another
    python scripts/sweep.py configs/sweeps/position-pairs.yaml --sweep_dir sweeps/pairs --parallel 4 --devices 0,1,2,3
    python scripts/sweep.py configs/sweeps/position-pairs.yaml --sweep_dir sweeps/pairs --pack auto   # packed runs
    python scripts/sweep.py configs/sweeps/position-pairs.yaml --sweep_dir sweeps/pairs --print_jobs > jobs.txt
    python scripts/sweep.py configs/sweeps/position-pairs.yaml --sweep_dir sweeps/pairs --run_index $SLURM_ARRAY_TASK_ID
    python scripts/sweep.py status sweeps/pairs

With --pack K (or auto: as many as fit in memory) the runs that share a base model train K at a time in one process,
their UNet calls in one batch (ldm/train/pack.py); each run's folder holds what it would hold trained alone.
Re-running skips finished runs and retries failed ones (from their last checkpoint). The sweep file format is in
ldm/sweep/spec.py. The sweep folder is reused on purpose (that is how a sweep resumes), but only by the same sweep
file: a folder of another sweep is refused. Two launchers on one folder never start one run twice.
"""
import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Union

from ldm.checks import ArgumentParser, ConfigError, OutputPathError, int_list, non_negative_int, positive_int
from ldm.modules.adapters import AdapterConfigError
from ldm.sweep.launch import run_all, run_index
from ldm.sweep.runs import STATES, check_base_weights, load_runs, plan, planned_runs, prepare, summary
from ldm.sweep.spec import SweepError
from ldm.util.logs import setup_logging

USER_ERRORS = (SweepError, ConfigError, AdapterConfigError, OutputPathError)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["status"]:
        p = ArgumentParser(prog="sweep.py status", description="done / running / failed / pending runs")
        p.add_argument("sweep_dir", help="a sweep folder made by scripts/sweep.py")
        p.add_argument("-v", "--verbose", action="store_true", help="list every run with its state")
        opt = p.parse_args(argv[1:])
        opt.command = "status"
        return opt
    p = ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="'scripts/sweep.py status SWEEP_DIR' shows the progress of a sweep")
    p.add_argument("spec", help="the sweep file (YAML): base, overrides, factors, rules")
    p.add_argument("--sweep_dir", help="where the runs go (default: sweeps/<sweep file name>)")
    p.add_argument("--parallel", type=positive_int, default=1, help="processes at a time (default 1): runs, or packs")
    p.add_argument("--pack", type=pack_size, help="train up to K runs per process on one base model, their UNet "
                                                   "calls batched (auto: as many as fit in the memory at hand, "
                                                   "spread over the --parallel processes)")
    p.add_argument("--devices", type=int_list(0), help="GPU indices to spread the runs over, one per run: 0,1,2,3")
    p.add_argument("--print_jobs", action="store_true",
                   help="print one shell command per unfinished run (this script with --run_index, from this folder) "
                        "and stop; writes nothing, checks the base weights")
    p.add_argument("--run_index", type=non_negative_int,
                   help="run only the run with this index (0-based, e.g. a SLURM array task)")
    p.add_argument("--prepare_only", action="store_true", help="write the run folders and stop")
    p.add_argument("--python", default=None, help="Python for the runs (default: this one; 'python' in --print_jobs)")
    p.add_argument("--allow_any_target", action="store_true",
                   help="pass --allow_any_target to every run: the configs may build your own classes")
    opt = p.parse_args(argv)
    opt.command = "run"
    opt.sweep_dir = opt.sweep_dir or str(Path("sweeps") / Path(opt.spec).stem)
    opt.devices = [str(d) for d in opt.devices] if opt.devices else None
    problem = flag_conflict(opt)
    if problem:
        p.error(problem)
    return opt


def pack_size(text: str) -> Union[int, str]:
    """argparse type of --pack: a number of runs >= 1, or auto."""
    if text == "auto":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a number of runs >= 1, or auto, got {text!r}") from None


# Flags that each make the script do one other thing than running the sweep
SINGLE_JOBS = {"--print_jobs": "prints the commands", "--prepare_only": "writes the run folders only",
               "--run_index": "runs one run"}


def flag_conflict(opt: argparse.Namespace) -> Optional[str]:
    """What is wrong with the combination of flags (each alone is checked by its type), or None."""
    given = [f for f, v in zip(SINGLE_JOBS, (opt.print_jobs, opt.prepare_only, opt.run_index is not None)) if v]
    if len(given) > 1:
        return f"{given[0]} cannot be combined with {given[1]}: choose one"
    if given and opt.parallel != 1:
        return f"{given[0]} {SINGLE_JOBS[given[0]]}: --parallel does not apply"
    if given and opt.pack:
        return f"{given[0]} {SINGLE_JOBS[given[0]]}: --pack does not apply"
    if opt.devices and len(opt.devices) < opt.parallel:
        return f"--parallel {opt.parallel} needs at least {opt.parallel} --devices (one per run), got {len(opt.devices)}"
    if opt.python and not opt.print_jobs and shutil.which(opt.python) is None:
        return f"--python '{opt.python}' not found: pass the path of a Python executable (default: this one)"
    return None


def print_status(sweep_dir: str, verbose: bool) -> Dict[str, List[str]]:
    runs = load_runs(sweep_dir)
    by_state = summary(runs)
    if verbose:
        for run in runs:
            print(f"{run.index:4d}  {run.state:8s}  {run.name}")
    print(" / ".join(f"{state} {len(by_state[state])}" for state in STATES) + f"  ({len(runs)} runs in {sweep_dir})")
    for name in by_state["failed"]:
        print(f"failed: {name} (see {Path(sweep_dir) / 'runs' / name / 'train.log'})")
    return by_state


def job_lines(opt: argparse.Namespace) -> List[str]:
    """One shell command per run that is not done: this script with --run_index, run from this folder (the sweep
    file's relative paths are taken from it); each job prepares the sweep folder itself. Nothing is written here."""
    _, _, grid = plan(opt.spec, opt.sweep_dir)
    check_base_weights(grid)
    here, script = shlex.quote(os.getcwd()), str(Path(__file__).resolve())
    flag = ["--allow_any_target"] if opt.allow_any_target else []
    return [f"cd {here} && " + shlex.join([opt.python or "python", script, opt.spec, "--sweep_dir", opt.sweep_dir,
                                           "--run_index", str(run.index), *flag])
            for run in planned_runs(grid, opt.sweep_dir) if run.state != "done"]


def run(opt: argparse.Namespace) -> int:
    """Print the jobs, or prepare the sweep folder and then run one run or all; returns the number of failed runs."""
    if opt.print_jobs:
        print("\n".join(job_lines(opt)))
        return 0
    planned = plan(opt.spec, opt.sweep_dir)
    if opt.run_index is not None and opt.run_index >= len(planned[2].runs):  # before anything is written
        raise SweepError(f"--run_index {opt.run_index} is out of range: the sweep has runs 0..{len(planned[2].runs) - 1}")
    runs = prepare(opt.spec, opt.sweep_dir, planned=planned)
    if opt.prepare_only:
        print(f"{len(runs)} runs prepared in {opt.sweep_dir}")
        return 0
    python = opt.python or sys.executable
    if opt.run_index is not None:
        device = opt.devices[0] if opt.devices else None
        return 0 if run_index(runs, opt.run_index, device, python, opt.allow_any_target) else 1
    results = run_all(runs, opt.parallel, opt.devices, python, opt.allow_any_target, opt.pack,
                      Path(opt.sweep_dir) / "packs")
    print_status(opt.sweep_dir, verbose=False)
    return sum(not ok for ok in results.values())


def main(argv: Optional[List[str]] = None) -> int:
    opt = parse_args(argv)
    setup_logging()
    try:
        if opt.command == "status":
            print_status(opt.sweep_dir, opt.verbose)
            return 0
        failed = run(opt)
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")
    if failed:
        sys.exit(f"error: {failed} run(s) failed; run the same command again to retry them")
    return 0


if __name__ == "__main__":
    main()
