"""Where the work runs: the device (CUDA when there is one) and the CPU threads (the cores other work leaves idle)."""

import os

import torch


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def use_idle_cores() -> int:
    """Set torch's threads (and OMP/MKL's for child processes) to the cores other work leaves idle now: the cores less
    the 1-minute load average, at least 1 (on 2 cores with another job on one, torch's default of 2 threads waits on
    the busy core at every parallel op: several times slower than 1). A thread count the user set is kept. Returns
    the thread count."""
    if any(v in os.environ for v in THREAD_VARS):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores - round(os.getloadavg()[0]))
    torch.set_num_threads(threads)
    os.environ.update({v: str(threads) for v in THREAD_VARS})
    return threads


def pick_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
