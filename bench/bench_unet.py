"""Time our UNet against diffusers' UNet2DConditionModel carrying the same weights.

Two workloads, interleaved (ours, diffusers, ours, ...) after a warmup so drifts in clock or cache hit both alike:
  forward  eval mode, no_grad;
  train    forward + MSE loss + backward with the base frozen and only a small subset trainable
           (every cross-attention output projection, `attn2.to_out.0.weight`: the same parameter name in both models).
Prints a Markdown table row per workload with the median milliseconds and the ratio ours / diffusers.

    python bench/bench_unet.py                          # SD v1 size, batch 2, 32x32 latents, fp32, CPU
    python bench/bench_unet.py --device cuda --latent 64 --dtype bf16
"""
import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]

from ldm.modules.adapters import is_added_key
from ldm.util.instantiate import instantiate_from_config

CONFIGS = {"sd": REPO / "configs" / "stable-diffusion" / "v1-inference.yaml",
           "tiny": REPO / "configs" / "tests" / "tiny-inference.yaml"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRAINABLE = "attn2.to_out.0.weight"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(CONFIGS), default="sd", help="UNet config: SD v1 or the test toy")
    p.add_argument("--latent", type=int, default=32, help="latent height = width (SD v1 at 512 px: 64)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="both models are cast to it")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mode", choices=["forward", "train", "both"], default="both")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per model and workload")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions per model and workload")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU threads (both models)")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on in both (train)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def unet_config(size: str):
    """The full model config (diffusers' config builder reads the VAE part too) for --size."""
    return OmegaConf.load(CONFIGS[size]).model


def build_ours(config, seed: int = 0) -> torch.nn.Module:
    """Our UNetModel with random weights; its zero-initialised convs get torch's default init so no output is zero."""
    torch.manual_seed(seed)
    unet = instantiate_from_config(config.params.unet_config)
    for m in unet.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not m.weight.any():
            m.reset_parameters()
    return unet.eval()


def diffusers_twin(unet: torch.nn.Module, config) -> torch.nn.Module:
    """diffusers.UNet2DConditionModel loaded strictly with a copy of `unet`'s base weights (adapters left out) via
    diffusers' own converter."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint,
                                                     create_unet_diffusers_config_from_ldm)
    checkpoint = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items() if not is_added_key(k)}
    original_config = {"model": OmegaConf.to_container(config, resolve=True)}
    diffusers_config = create_unet_diffusers_config_from_ldm(original_config, checkpoint)
    converted = convert_ldm_unet_checkpoint(checkpoint, diffusers_config)
    with torch.device("meta"):  # no random init of a second 860M-parameter model
        ref = UNet2DConditionModel(**diffusers_config)
    ref.load_state_dict({k: v.detach().clone() for k, v in converted.items()}, strict=True, assign=True)
    return ref.eval()


def freeze_except(model: torch.nn.Module, suffix: str = TRAINABLE) -> int:
    """Freeze everything but parameters whose name ends with `suffix`; returns the trainable count."""
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(suffix))
        n += p.numel() if p.requires_grad else 0
    return n


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize()


def time_interleaved(fns: Dict[str, Callable[[], None]], device: torch.device, repeats: int,
                     warmup: int, clock: Callable[[], float] = time.perf_counter) -> Dict[str, List[float]]:
    """Run each fn `warmup` times, then `repeats` rounds of one call each (ABAB...); milliseconds per call.

    `clock` time.process_time counts this process's CPU time instead of wall time: with one thread on a shared,
    busy CPU it leaves out the time other processes hold the cores."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for r in range(repeats):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]  # ABBA: neither model always runs first
        for k in order:
            synchronize(device)
            t0 = clock()
            fns[k]()
            synchronize(device)
            times[k].append((clock() - t0) * 1e3)
    return times


def git_commit() -> str:
    """Short HEAD, with "+dirty" when ldm/ has uncommitted changes (the numbers are then not HEAD's)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "ldm"], cwd=REPO).returncode != 0
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        cpu = platform.processor() or platform.machine()
        try:
            cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        return f"{cpu}, {torch.get_num_threads()} threads"
    return str(device)


def main(argv: Optional[List[str]] = None) -> List[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config = unet_config(args.size)
    t0 = time.perf_counter()
    ours = build_ours(config, args.seed)
    theirs = diffusers_twin(ours, config)
    ours, theirs = ours.to(device, dtype), theirs.to(device, dtype)
    ours.set_gradient_checkpointing(args.checkpointing)
    if args.checkpointing:
        theirs.enable_gradient_checkpointing()
    print(f"built both UNets ({sum(p.numel() for p in ours.parameters()):,} params each) "
          f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    g = torch.Generator().manual_seed(args.seed + 1)
    b, n = args.batch, args.latent
    ctx_dim = config.params.unet_config.params.context_dim
    x = torch.randn(b, 4, n, n, generator=g).to(device, dtype)
    t = torch.randint(0, 1000, (b,), generator=g).to(device)
    context = torch.randn(b, 77, ctx_dim, generator=g).to(device, dtype)
    target = torch.randn(b, 4, n, n, generator=g).to(device)
    calls = {"ours": lambda: ours(x, t, context),
             "diffusers": lambda: theirs(x, t, encoder_hidden_states=context, return_dict=False)[0]}

    with torch.no_grad():
        diff = (calls["ours"]().float() - calls["diffusers"]().float()).abs().max().item()
    print(f"max |ours - diffusers| on the benchmark input: {diff:.3g} ({args.dtype})", file=sys.stderr)

    workloads = {}
    if args.mode in ("forward", "both"):
        def forward(call):
            with torch.no_grad():
                call()
        workloads["forward"] = {k: (lambda c=c: forward(c)) for k, c in calls.items()}
    if args.mode in ("train", "both"):
        n_train = {k: freeze_except(m) for k, m in (("ours", ours), ("diffusers", theirs))}
        assert n_train["ours"] == n_train["diffusers"], n_train
        print(f"train: frozen base, {n_train['ours']:,} trainable params ({TRAINABLE})", file=sys.stderr)

        def train_step(call, model):
            loss = F.mse_loss(call().float(), target)
            loss.backward()
            model.zero_grad(set_to_none=True)
        workloads["train"] = {k: (lambda c=c, m=m: train_step(c, m))
                              for (k, c), m in zip(calls.items(), (ours, theirs))}

    rows = []
    print("| date | device | torch | commit | size | dtype | batch x latent | mode | ms ours | ms diffusers | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for mode, fns in workloads.items():
        for m in (ours, theirs):
            m.train(mode == "train")
        times = time_interleaved(fns, device, args.repeats, args.warmup)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = dict(date=datetime.date.today().isoformat(), device=device_name(device), torch=torch.__version__,
                   commit=git_commit(), size=args.size, dtype=args.dtype, shape=f"{b} x {n}x{n}", mode=mode,
                   ours=med["ours"], diffusers=med["diffusers"], ratio=med["ours"] / med["diffusers"])
        rows.append(row)
        print(f"| {row['date']} | {row['device']} | {row['torch']} | {row['commit']} | {row['size']} | "
              f"{row['dtype']} | {row['shape']} | {mode} | {row['ours']:.1f} | {row['diffusers']:.1f} | "
              f"{row['ratio']:.3f} |", flush=True)
        print(f"  {mode} all ms: ours {[round(v, 1) for v in times['ours']]}, "
              f"diffusers {[round(v, 1) for v in times['diffusers']]}; load average {os.getloadavg()[0]:.1f}",
              file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
