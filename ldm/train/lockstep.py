"""Threads that run one at a time and meet in rounds: the machinery of packed training (`ldm.train.pack`).

Each thread is one training run with a Lightning Trainer of its own. Only the thread holding the turn runs, and the
global random state (torch's CPU and CUDA generators, numpy's, Python's) travels with the turn, so each run draws
its data order, noise and timesteps from its own stream exactly as it would in a process of its own. A run that
reaches a shared call (`sync`: its UNet call, its backward pass) parks there; when no run can go on, the parked calls
of one kind are executed as one round (backward passes first, so a round never mixes steps) by the thread holding the
turn, and their runs go on. The order is fixed (round robin by index), so a pack is deterministic.
"""
import logging
import os
import random
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

log = logging.getLogger(__name__)
SEED_ENV = "PL_GLOBAL_SEED"  # Lightning's seed_everything keeps the seed here (its dataloader workers read it)


class PackStopped(RuntimeError):
    """The pack was interrupted; the run stops at its next shared call (its last checkpoint is good)."""


def rng_state() -> Dict[str, Any]:
    """The process's global random state: Python, numpy, torch CPU and (once initialised) CUDA, and the seed."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "gpu": cuda, "seed": os.environ.get(SEED_ENV)}


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore `rng_state()`. A state saved before CUDA started gets the CUDA generators its seed gives them (as
    torch's lazy seeding does in a process of its own)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        if state["gpu"] is not None:
            torch.cuda.set_rng_state_all(state["gpu"])
        elif state["seed"] is not None:
            torch.cuda.manual_seed_all(int(state["seed"]))
    if state["seed"] is None:
        os.environ.pop(SEED_ENV, None)
    else:
        os.environ[SEED_ENV] = state["seed"]


@dataclass
class Parked:
    """A shared call waiting for its round: its kind, input, weight (its share of the round's time) and outcome."""
    kind: str
    payload: Any
    weight: float
    result: Any = None
    error: Optional[BaseException] = None


class Lockstep:
    """N threads taking turns; `rounds[kind](calls)` executes the parked calls [(index, payload)] of one kind and
    returns their results in order. Backward rounds go before forward rounds."""

    ORDER = ("backward", "forward")

    def __init__(self, n: int, rounds: Dict[str, Callable[[List[Tuple[int, Any]]], List[Any]]]):
        self.n, self.rounds = n, rounds
        self._cond = threading.Condition()
        self._turn: Optional[int] = None
        self._alive = [False] * n
        self._parked: Dict[int, Parked] = {}
        self._rng: List[Optional[Dict[str, Any]]] = [None] * n
        self._seconds = [0.0] * n
        self._since = 0.0
        self.stopping = False
        self.rounds_done = 0

    # ---- running the threads -------------------------------------------------------------------------------------
    def run(self, targets: Sequence[Callable[[], Any]]) -> List[Tuple[Any, Optional[BaseException]]]:
        """Run each target in its own thread, in turns; returns (result, None) or (None, exception) per target."""
        results: List[Tuple[Any, Optional[BaseException]]] = [(None, None)] * self.n
        start = rng_state()

        def body(i: int) -> None:
            self._acquire(i)
            try:
                results[i] = (targets[i](), None)
            except BaseException as e:  # noqa: BLE001: the run's failure is its own; the others go on
                results[i] = (None, e)
            finally:
                self._leave(i)

        self._rng = [dict(start) for _ in range(self.n)]
        self._alive = [True] * self.n
        threads = [threading.Thread(target=body, args=(i,), name=f"pack-{i}", daemon=True) for i in range(self.n)]
        for t in threads:
            t.start()
        self._give(0)
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.5)
        except KeyboardInterrupt:
            self.stopping = True  # each run stops at its next shared call
            log.warning("interrupted: the runs of the pack stop at their next step")
            for t in threads:
                t.join()
            raise
        set_rng_state(start)
        return results

    def sync(self, i: int, kind: str, payload: Any, weight: float = 1.0) -> Any:
        """Park thread `i`'s shared call until its round has run; returns its result (or raises its error)."""
        if self.stopping:
            raise PackStopped("the pack was interrupted")
        parked = self._parked[i] = Parked(kind, payload, weight)
        self._release(i)
        self._acquire(i)
        if parked.error is not None:
            raise parked.error
        return parked.result

    def seconds(self, i: int) -> float:
        """Thread `i`'s time so far: its own turns and its share of the rounds it took part in."""
        return self._seconds[i] + (time.perf_counter() - self._since if self._turn == i else 0.0)

    @contextmanager
    def own_random(self, i: int) -> Iterator[None]:
        """Within the block (part of a round), the global random state is thread `i`'s, as in its own process."""
        current = rng_state()
        set_rng_state(self._rng[i])
        try:
            yield
        finally:
            self._rng[i] = rng_state()
            set_rng_state(current)

    # ---- turns ----------------------------------------------------------------------------------------------------
    def _acquire(self, i: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._turn == i)
        set_rng_state(self._rng[i])
        self._since = time.perf_counter()

    def _release(self, i: int) -> None:
        self._seconds[i] += time.perf_counter() - self._since
        self._rng[i] = rng_state()
        self._pass(i)

    def _leave(self, i: int) -> None:
        self._seconds[i] += time.perf_counter() - self._since
        self._alive[i] = False
        self._parked.pop(i, None)
        self._pass(i)

    def _give(self, i: Optional[int]) -> None:
        with self._cond:
            self._turn = i
            self._cond.notify_all()

    def _pass(self, i: int) -> None:
        """Give the turn to the next thread that can go on, executing rounds while none can."""
        while True:
            ready = [j for j in (*range(i + 1, self.n), *range(i + 1)) if self._alive[j] and j not in self._parked]
            if ready:
                return self._give(ready[0])
            kind = next((k for k in self.ORDER if any(p.kind == k for p in self._parked.values())), None)
            if kind is None:
                return self._give(None)  # every thread has ended
            self._execute(kind)

    def _execute(self, kind: str) -> None:
        """Run the round of the parked calls of `kind`; their threads can go on afterwards."""
        calls = sorted((j, p) for j, p in self._parked.items() if p.kind == kind)
        start = time.perf_counter()
        try:
            results = self.rounds[kind]([(j, p.payload) for j, p in calls])
        except Exception as e:  # noqa: BLE001: every run of the round gets the error
            error = RuntimeError(f"the pack's shared {kind} pass failed: {type(e).__name__}: {e}")
            error.__cause__ = e
            results = [None] * len(calls)
            for _, p in calls:
                p.error = error
        seconds, total = time.perf_counter() - start, sum(p.weight for _, p in calls) or 1.0
        for (j, p), result in zip(calls, results):
            p.result = result
            self._seconds[j] += seconds * p.weight / total
            del self._parked[j]
        self.rounds_done += 1
