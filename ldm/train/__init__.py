"""Training: one entry for every caller (`main_dream_booth.py`, `python -m ldm.train`, the sweep launcher, the
tiny-world demo, packed runs), in-process: `run(RunRequest(...))`.

    request.py   RunRequest: a run's configs, overrides and flags, declared once (the command line is made from it)
    run.py       one run: checks before any work, log dir, model, data, Lightning Trainer, resume
    pack_plan.py which runs can share a pack, and how many fit in memory
    lockstep.py  threads that take turns, each with its own random state, and meet in rounds
    pack.py      packed training: runs on one base model, their UNet calls in one batch (`train_runs`)
    __main__.py  `python -m ldm.train ARGS`, the same command line as main_dream_booth.py
"""
import logging
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from ldm.callbacks import TrainingInterrupted
from ldm.checkpoint import CheckpointError, DiskFullError
from ldm.checks import ConfigError
from ldm.data.dreambooth import DataError
from ldm.models.diffusion.dreambooth import NonFiniteLossError
from ldm.modules.adapters import AdapterConfigError
from ldm.modules.diffusers_layout import LayoutError
from ldm.train.lockstep import PackStopped
from ldm.train.pack import train_runs
from ldm.train.pack_plan import describe
from ldm.train.request import NEXT, RunRequest, parse_requests, request_parser
from ldm.train.run import (CONFIG_FILE, LAST_CKPT, Hooks, default_precision, finished_at, parse_gpus,  # noqa: F401
                           resolve_resume, run)

log = logging.getLogger(__name__)

# What a user can fix (a config, a flag, a file): reported as one line, without a traceback.
USER_ERRORS = (ConfigError, DataError, CheckpointError, AdapterConfigError, LayoutError, NonFiniteLossError,
               DiskFullError)
DESCRIPTION = "DreamBooth with prior preservation that trains adapters (Xiang et al. 2023), in PyTorch Lightning."


def parse_args(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> List[RunRequest]:
    """The training command line (one run, or several separated by --next) as RunRequests."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return parse_requests(argv, request_parser(prog, DESCRIPTION))


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> List[Path]:
    """Parse and train (several runs: as packs, `ldm.train.pack`); an error a user can fix is one line per run, and
    the exit status is non-zero when any run failed. Returns the runs' log dirs."""
    requests = parse_args(argv, prog)
    try:
        logdirs = _train(requests)
    except TrainingInterrupted as e:  # Ctrl-C / SIGTERM during training: its step is written
        sys.stderr.write(f"{e}\n")  # one line, and the shell's exit status for the signal (sys.exit(str) gives 1)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C outside the training steps (setup, class images), or in a pack
        sys.stderr.write("interrupted by Ctrl-C outside the training steps: run the command again (-r LOGDIR "
                         "continues a run that has a checkpoint)\n")
        sys.exit(130)
    for logdir in logdirs:
        log.info("outputs in %s", logdir)
    return logdirs


def _train(requests: List[RunRequest]) -> List[Path]:
    """One run, or several as packs; errors a user can fix exit with one line per run."""
    if len(requests) == 1:
        try:
            logdirs = [run(requests[0])]
        except USER_ERRORS as e:
            sys.exit(f"error: {e}")
    else:
        results = train_runs(requests)
        failed = [(r, e) for r, (_, e) in zip(requests, results) if e is not None]
        for _, e in failed:
            if not isinstance(e, USER_ERRORS + (PackStopped,)):
                raise e
        if failed:
            sys.exit("\n".join(f"error: {describe(r)}: {e}" for r, e in failed))
        logdirs = [logdir for logdir, _ in results]
    return logdirs


__all__ = ["NEXT", "USER_ERRORS", "Hooks", "RunRequest", "finished_at", "main", "parse_args", "run", "train_runs"]
