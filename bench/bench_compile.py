"""What torch.compile gives on this machine: eager vs compiled (ldm.modules.fastpaths.compile_module on the UNet, the
path of `sample.py --compile` and `model.params.compile: true`) for three workloads of the tiny models.

  sample  tiny SD v1 (models/ldm/tiny-sd-v1): ldm.models.diffusion.sampling.text_to_image (the one text-to-image
          path), 4 prompts, 25 DDIM steps, guidance 5, batch 4, 64 px (the demo's and the evaluation's sampling)
  demo    one step of the demo's DreamBooth run (batch 4+4 at 64 px, attn2o -> ffni adapter; see
          bench_tiny_vs_diffusers.py: shared_step, backward, AdamW), the loop `make demo` runs 400 times
  tests   one step of the tests' tiny DreamBooth model (configs/tests, batch 1+1 at 32 px), the loop
          tests/test_train.py runs 2-4 times per run

Each (workload, mode) runs in a fresh process with an empty inductor cache (a cold start, as a user's first run);
--warm-cache reuses one cache folder, as a second run of the same command would. Prints the first call (compile
included for compiled), the median of the next calls, and the number of calls after which compiling pays.

    python bench/bench_compile.py --workloads demo,sample --calls 8 --timeout 420 --clock cpu   # bench/RESULTS.md
    python bench/bench_compile.py --workloads tests --calls 4
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from omegaconf import OmegaConf

import bench_dreambooth as db
from bench_tiny_vs_diffusers import demo_batch, demo_model, our_step
from bench_unet import device_name, git_commit
from ldm.models.diffusion.sampling import seeds_noise, text_to_image
from ldm.modules.fastpaths import compile_module, is_compiled
from ldm.tinyworld.evaluate import BASE_CKPT, BASE_CONFIG, SUBJECT_PROMPT
from ldm.util.instantiate import load_model_from_config

BENCH = Path(__file__).resolve().parent
WORKLOADS = ("tests", "demo", "sample")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, from {', '.join(WORKLOADS)}")
    p.add_argument("--calls", type=int, default=6, help="calls per process (the first one compiles)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per process")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="clock of the calls after the first: wall time, or this process's CPU time (with --threads 1 "
                        "on a busy machine: robust to load); the first call is always wall time, as the compile "
                        "runs in worker processes too")
    p.add_argument("--warm-cache", action="store_true", help="one inductor cache for all processes (else a fresh one "
                                                              "each: a cold start)")
    p.add_argument("--child", nargs=2, metavar=("WORKLOAD", "MODE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def workload(name: str) -> Tuple[torch.nn.Module, Callable[[], None]]:
    """The workload's model and one call of it (models built here, before the clock starts)."""
    if name == "sample":
        model = load_model_from_config(OmegaConf.load(BASE_CONFIG), str(BASE_CKPT))
        x_T = seeds_noise(range(4), model.latent_shape(64, 64))
        return model, lambda: text_to_image(model, [SUBJECT_PROMPT] * 4, x_T, steps=25, scale=5.0)
    if name == "demo":
        model = demo_model()
        return model, our_step(model, demo_batch(4))
    model = db.build_model(db.model_config("tiny"), "adapter", torch.device("cpu"))
    batch = db.make_batch(model, 1, 4, torch.device("cpu"))
    return model, db.make_step("adapter", model, None, batch, None, torch.device("cpu"))


def child(name: str, mode: str, calls: int) -> Dict:
    """Time `calls` calls of the workload in this process; the first one compiles in compiled mode."""
    model, fn = workload(name)
    if mode == "compiled":
        compile_module(model.unet, torch.device("cpu"))
    times = {"wall": [], "cpu": []}
    for _ in range(calls):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times["wall"].append(time.perf_counter() - t0)
        times["cpu"].append(time.process_time() - c0)
    return {"first_s": times["wall"][0], "rest_ms": {k: [t * 1e3 for t in v[1:]] for k, v in times.items()},
            "compiled": is_compiled(model.unet)}


def run_child(args, name: str, mode: str, cache: str) -> Dict:
    """One (workload, mode) in a fresh process (own session: on a timeout it and its compile workers are stopped)."""
    path = os.pathsep.join(filter(None, (str(BENCH.parent), os.environ.get("PYTHONPATH"))))  # this checkout's ldm
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, PYTHONPATH=path)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, mode, "--calls", str(args.calls),
           "--threads", str(args.threads)]
    t0 = time.time()
    child_process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True)
    try:
        out, err = child_process.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child_process.pid, signal.SIGKILL)
        child_process.communicate()
        return {"error": f"no result in {args.timeout:.0f} s (stopped)"}
    if child_process.returncode != 0:
        return {"error": ((err or "").strip().splitlines() or [f"exit {child_process.returncode}"])[-1][:200]}
    result = json.loads(out.strip().splitlines()[-1])
    result["process_s"] = time.time() - t0
    result["rest_ms"] = result["rest_ms"][args.clock]
    return result


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(*args.child, args.calls)))
        return
    shared = tempfile.mkdtemp(prefix="inductor-")
    print(f"{device_name(torch.device('cpu'))}; commit {git_commit()}; torch {torch.__version__}; load average "
          f"{os.getloadavg()[0]:.1f}; {'warm' if args.warm_cache else 'cold'} inductor cache; {args.calls} calls; "
          f"{args.clock} clock after the first call")
    print("| workload | mode | first call s | median of the next calls, ms | steady ratio compiled / eager | "
          "compiling pays after | process s | load average |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in [w for w in args.workloads.split(",") if w]:
        load = os.getloadavg()[0]
        res = {m: run_child(args, name, m, shared if args.warm_cache else tempfile.mkdtemp(prefix="inductor-"))
               for m in ("eager", "compiled")}
        load = f"{load:.1f}-{os.getloadavg()[0]:.1f}"
        for mode, r in res.items():
            if "error" in r:
                print(f"| {name} | {mode} | error: {r['error']} | | | | | {load} |", flush=True)
                continue
            med = statistics.median(r["rest_ms"]) if r["rest_ms"] else float("nan")
            ratio, pays = "", ""
            if mode == "compiled" and "error" not in res["eager"] and r["rest_ms"] and res["eager"]["rest_ms"]:
                eager_ms = statistics.median(res["eager"]["rest_ms"])
                ratio = f"{med / eager_ms:.2f}"
                gain = (eager_ms - med) / 1e3
                extra = r["first_s"] - res["eager"]["first_s"]
                pays = f"{extra / gain:.0f} calls" if gain > 0 else "never (not faster)"
            print(f"| {name} | {mode}{'' if r.get('compiled', True) or mode == 'eager' else ' (fell back)'} | "
                  f"{r['first_s']:.1f} | {med:.1f} | {ratio} | {pays} | {r['process_s']:.0f} | {load} |", flush=True)


if __name__ == "__main__":
    main()
