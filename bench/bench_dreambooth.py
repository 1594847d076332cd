"""DreamBooth training step: our attn2o-ffni adapter vs full fine-tuning vs diffusers' UNet with a PEFT LoRA.

One step = instance + class sample (batch 1+1 by default) through the UNet, eps-MSE, backward, AdamW step on the
trained parameters. Every variant gets the same precomputed latents and text contexts (our trainer caches them, so
the VAE and text encoder are not part of a step), the same weights, dtype and thread count. Timing is interleaved
(ABC CBA ...) in one process; peak memory is measured per variant in a fresh process.

  adapter  our DreamBoothLatentDiffusion.shared_step, attn2o -> ffni adapter (mid_dim 60), base frozen
  full     the same UNet, every parameter trained (the DreamBooth baseline)
  lora     diffusers UNet2DConditionModel + PEFT LoRA rank 4 on to_q/to_k/to_v/to_out.0, base frozen

    python bench/bench_dreambooth.py                                  # CPU, reduced UNet (channels 64), 128 px
    python bench/bench_dreambooth.py --size sd --device cuda --latent 64 --dtype bf16 --repeats 30
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]

from bench_unet import device_name, diffusers_twin, git_commit, synchronize, time_interleaved
from ldm.util.instantiate import instantiate_from_config

ADAPTER_CONFIG = REPO / "configs" / "sd-inject-dreambooth" / "attn2o-ffni.yaml"
TINY_CONFIGS = [REPO / "configs" / "tests" / "tiny-inference.yaml",  # the test toy, for checking the code quickly
                REPO / "configs" / "stable-diffusion" / "v1-finetune-dreambooth.yaml",
                REPO / "configs" / "tests" / "tiny-dreambooth.yaml"]
VARIANTS = ("adapter", "full", "lora")
AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["sd", "small", "tiny"], default="small",
                   help="sd: the SD v1 UNet; small: the same architecture with model_channels 64 (CPU); tiny: the "
                        "tests' toy model (checks the code in seconds)")
    p.add_argument("--latent", type=int, default=16, help="latent side (SD v1 at 512 px: 64)")
    p.add_argument("--batch", type=int, default=1, help="instance samples per step (as many class samples)")
    p.add_argument("--dtype", choices=sorted(AMP), default="fp32", help="autocast dtype; weights stay fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in every variant")
    p.add_argument("--memory-only", choices=VARIANTS, help=argparse.SUPPRESS)  # the per-variant child process
    p.add_argument("--memory-steps", type=int, default=3, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def model_config(size: str):
    """The DreamBooth config with the attn2o -> ffni adapter at `size` (sd, small or tiny)."""
    if size == "tiny":
        return OmegaConf.merge(*[OmegaConf.load(f) for f in TINY_CONFIGS])
    config = OmegaConf.load(ADAPTER_CONFIG)
    if size == "small":
        config.model.params.unet_config.params.model_channels = 64
    return config


def build_model(config, variant: str, device: torch.device) -> torch.nn.Module:
    """Our DreamBoothLatentDiffusion with random weights (zero-initialised convs re-drawn so gradients flow)."""
    torch.manual_seed(0)
    params = config.model.params
    params.train_level = ["unet"] if variant == "full" else ["adapter"]
    if variant == "full":
        params.unet_config.params.pop("adapter_config", None)
    with torch.device(device):  # initialised where it runs: a GPU draws 1.07 B random weights in a moment
        model = instantiate_from_config(config.model)
    for name, m in model.unet.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and ".adapters." not in name and not m.weight.any():
            m.reset_parameters()
    return model


def lora_unet(ours: torch.nn.Module, config, device: torch.device) -> torch.nn.Module:
    """diffusers' twin of our base UNet (same weights) with a PEFT LoRA, rank 4, on the attention projections."""
    from peft import LoraConfig
    unet = diffusers_twin(ours.unet, config.model).to(device)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return unet.train()


def make_loss(variant: str, model: torch.nn.Module, lora: Optional[torch.nn.Module], batch: Dict,
              device: torch.device) -> Tuple[Callable[[], torch.Tensor], List[torch.nn.Parameter]]:
    """The variant's loss on `batch` (cached latents and contexts) and the parameters it trains."""
    if variant == "lora":
        params = [p for p in lora.parameters() if p.requires_grad]
        z, c = torch.cat([batch["z"], batch["z_reg"]]), torch.cat([batch["c"], batch["c_reg"]])

        def loss_fn():
            t = torch.randint(0, 1000, (z.shape[0],), device=device)
            noise = torch.randn_like(z)
            eps = lora(model.q_sample(z, t, noise), t, c).sample
            return torch.nn.functional.mse_loss(eps.float(), noise.float())
        return loss_fn, params
    model.train()
    n = len(batch["x"])  # image indices as plain ints: the latent cache keys on them
    items = {part: {"image": batch["x"], "caption": batch[f"captions_{part}"], "index": list(range(n)),
                    "flipped": [False] * n} for part in ("instance", "reg")}
    return (lambda: model.shared_step(items)[0]), model.trained_parameters()


def make_step(variant: str, model: torch.nn.Module, lora: Optional[torch.nn.Module], batch: Dict,
              amp: Optional[torch.dtype], device: torch.device, optimizer_class: type = torch.optim.AdamW
              ) -> Callable[[], None]:
    """One optimiser step of the variant on `batch` (cached latents and contexts)."""
    loss_fn, params = make_loss(variant, model, lora, batch, device)
    optimizer = optimizer_class(params, lr=1e-5)

    def step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def make_batch(model: torch.nn.Module, n: int, latent: int, device: torch.device) -> Dict:
    """Images, captions, and the latents/contexts they encode to (computed once, as our trainer's cache)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand((n, 3, latent * 8, latent * 8), generator=g) * 2 - 1).to(device)
    captions = {"instance": ["photo of a sks dog"] * n, "reg": ["photo of a dog"] * n}
    with torch.no_grad():
        z = model.get_first_stage_encoding(model.encode_first_stage(x))
        c = {k: model.get_learned_conditioning(v) for k, v in captions.items()}
    return {"x": x, "z": z, "z_reg": z.clone(), "c": c["instance"], "c_reg": c["reg"],
            "captions_instance": captions["instance"], "captions_reg": captions["reg"]}


def build_variant(args, variant: str, device: torch.device):
    """The variant's step function and its trained parameter count."""
    config = model_config(args.size)
    model = build_model(config, "adapter" if variant == "adapter" else "full", device)  # lora: no adapters
    model.unet.set_gradient_checkpointing(args.checkpointing)
    batch = make_batch(model, args.batch, args.latent, device)
    lora = None
    if variant == "lora":
        lora = lora_unet(model, config, device)
        if args.checkpointing:
            lora.enable_gradient_checkpointing()
        model.model.diffusion_model = torch.nn.Identity()  # only diffusers' UNet runs: do not count ours
        trained = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    else:
        trained = sum(p.numel() for p in model.trained_parameters())
    return make_step(variant, model, lora, batch, AMP[args.dtype], device), trained


def peak_memory(args, variant: str, device: torch.device) -> int:
    """Peak bytes while a fresh process takes 3 steps of the variant (GPU: allocated; CPU: peak RSS, all models)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-only", variant, "--device", str(device),
           "--size", args.size, "--latent", str(args.latent), "--batch", str(args.batch), "--dtype", args.dtype,
           "--threads", str(args.threads)] + (["--checkpointing"] if args.checkpointing else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"]


def measure_memory(args, device: torch.device) -> Dict[str, object]:
    """The child process's side of peak_memory: peak bytes over --memory-steps steps, the resident bytes before them
    (the models and the cached batch), and each step's seconds."""
    step, _ = build_variant(args, args.memory_only, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:  # Linux: reset the peak RSS (VmHWM) so that building the models does not count
        Path("/proc/self/clear_refs").write_text("5")
        base = _status_bytes("VmRSS:")
    seconds = []
    for _ in range(args.memory_steps):
        t0 = time.perf_counter()
        step()
        synchronize(device)
        seconds.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _status_bytes("VmHWM:")
    return {"peak_bytes": peak, "base_bytes": base, "step_s": seconds}


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS:, VmHWM:) in bytes."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field))) * 1024


def main(argv: Optional[List[str]] = None) -> List[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory_only:
        print(json.dumps(measure_memory(args, device)))
        return []
    variants = [v for v in args.variants.split(",") if v]
    steps, trained = {}, {}
    for v in variants:
        steps[v], trained[v] = build_variant(args, v, device)
    times = time_interleaved(steps, device, args.repeats, args.warmup)
    del steps
    rows = []
    for v in variants:
        ms = statistics.median(times[v])
        rows.append({"variant": v, "ms": ms, "it_s": 1e3 / ms, "trained": trained[v],
                     "peak_bytes": peak_memory(args, v, device)})
    base = next((r["ms"] for r in rows if r["variant"] == "adapter"), rows[0]["ms"])
    print(f"device: {device_name(device)}; commit {git_commit()}; torch {torch.__version__}; size {args.size}, "
          f"batch {args.batch}+{args.batch}, latent {args.latent}, {args.dtype}, checkpointing {args.checkpointing}")
    print("| variant | trained params | ms / step | it/s | time vs adapter | peak memory GiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['variant']} | {r['trained']:,} | {r['ms']:.1f} | {r['it_s']:.2f} | {r['ms'] / base:.2f} | "
              f"{r['peak_bytes'] / 2**30:.2f} |")
    return rows


if __name__ == "__main__":
    main()
