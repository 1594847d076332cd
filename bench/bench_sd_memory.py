"""Peak memory of a DreamBooth step at full SD v1 size on the CPU: our adapter vs diffusers + PEFT LoRA.

SD v1 (UNet 859.5 M, VAE, CLIP ViT-L/14 text encoder; random weights), 512 px images (64x64 latents), batch 1+1,
a few steps of bench_dreambooth.py's step (ours: DreamBoothLatentDiffusion.shared_step with the attn2o -> ffni
adapter, cached latents; LoRA: diffusers' UNet2DConditionModel + PEFT rank 4 on to_q/to_k/to_v/to_out.0), with and
without gradient checkpointing, fp32 and bf16 autocast (fp32 weights). One configuration per fresh process, one
process at a time; each starts only when /proc/meminfo shows --min-free-gib available, else the run stops and says
so. Peak = the process's peak RSS over the steps (VmHWM reset after the models are built and the batch encoded);
"models" = its RSS before the first step, so peak - models is what training adds.

    nice -n 19 python bench/bench_sd_memory.py                      # 8 processes, minutes each on 2 cores
    python bench/bench_sd_memory.py --size tiny --min-free-gib 1    # the code path in seconds
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from bench_unet import device_name, git_commit

BENCH = Path(__file__).resolve().parent
LATENT = {"sd": 64, "small": 16, "tiny": 4}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(LATENT), default="sd")
    p.add_argument("--variants", default="adapter,lora")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--checkpointing", default="off,on")
    p.add_argument("--steps", type=int, default=2, help="optimiser steps per process")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--min-free-gib", type=float, default=14.0, help="MemAvailable needed before each process")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per process")
    return p.parse_args(argv)


def available_gib() -> float:
    """MemAvailable of /proc/meminfo in GiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    raise OSError("no MemAvailable in /proc/meminfo")


def measure(args, variant: str, dtype: str, checkpointing: bool) -> Dict:
    """One configuration in a fresh bench_dreambooth.py process; its JSON, or {"error": ...}."""
    cmd = [sys.executable, str(BENCH / "bench_dreambooth.py"), "--memory-only", variant, "--memory-steps",
           str(args.steps), "--device", "cpu", "--size", args.size, "--latent", str(LATENT[args.size]), "--batch", "1",
           "--dtype", dtype, "--threads", str(args.threads)] + (["--checkpointing"] if checkpointing else [])
    t0 = time.time()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result in {args.timeout:.0f} s"}
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines()
        why = "killed (out of memory?)" if done.returncode in (-9, 137) else (tail[-1] if tail else "")
        return {"error": f"exit {done.returncode}: {why}"[:300]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = time.time() - t0
    return result


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{device_name(torch.device('cpu'))}; commit {git_commit()}; torch {torch.__version__}; size {args.size}, "
          f"batch 1+1, latent {LATENT[args.size]}, {args.steps} steps per process")
    print("| variant | dtype | gradient checkpointing | peak GiB | models GiB | training adds GiB | s / step | "
          "available before GiB | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    rows = []
    for dtype in args.dtypes.split(","):
        for ckpt in args.checkpointing.split(","):
            for variant in args.variants.split(","):
                free = available_gib()
                if free < args.min_free_gib:
                    print(f"stopped: {free:.1f} GiB available, {args.min_free_gib:g} needed; the remaining "
                          "configurations did not run", flush=True)
                    return rows
                r = measure(args, variant, dtype, ckpt == "on")
                r.update(variant=variant, dtype=dtype, checkpointing=ckpt, free_gib=free, load=os.getloadavg()[0])
                rows.append(r)
                if "error" in r:
                    print(f"| {variant} | {dtype} | {ckpt} | failed: {r['error']} | | | | {free:.1f} | "
                          f"{r['load']:.1f} |", flush=True)
                    continue
                peak, base = r["peak_bytes"] / 2**30, r["base_bytes"] / 2**30
                steps = ", ".join(f"{s:.0f}" for s in r["step_s"])
                print(f"| {variant} | {dtype} | {ckpt} | {peak:.2f} | {base:.2f} | {peak - base:.2f} | {steps} | "
                      f"{free:.1f} | {r['load']:.1f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
