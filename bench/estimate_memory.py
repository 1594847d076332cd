"""Peak CUDA memory of an SD v1 DreamBooth step, estimated without a GPU: the step runs on fake tensors.

The step is bench/gpu_check.py's DreamBooth item (bench_dreambooth.make_loss): SD v1 (UNet, VAE, text encoder with
fp32 weights, on the device), 512 px, cached latents, autocast, backward, AdamW; ours = our attn2o-ffni adapter
through DreamBoothLatentDiffusion.shared_step, lora = diffusers' UNet + PEFT LoRA rank 4. fp16 runs with a GradScaler
(scale, unscale_, and the step of a finite step: the inf check reads a value, which fake tensors have not). A pack of
K: batch K+K through one UNet whose every adapter is K adapters, each on its own 2 rows (instance + class); this is
our stand-in until packed training lands (issue 24 items 2-6).

Method (bench/fake_cuda.py): the models are built on the meta device and turned into fake tensors (shapes, no data:
nothing is allocated), two steps run (the first fills the latent cache), and LiveBytes adds up the storages alive after
every aten op, each rounded to CUDA's 512-byte blocks: the peak is the estimate of torch.cuda.max_memory_allocated().
CUDA autocast is applied by CudaAutocast on fake CPU tensors (a fake CUDA backward needs a driver); before each
estimate the forward is traced under torch's own CUDA autocast on fake CUDA tensors, and the estimate is refused unless
the two forwards are the same op for op (names, shapes, dtypes). SDPA runs flash attention, as a GPU does for fp16/bf16.
Not counted: the CUDA context, kernel workspaces (cuBLAS, cuDNN convolution), allocator slack and fragmentation.
--validate checks the method on the CPU: real runs at a small size, fake estimate vs what the step really allocated.

    python bench/estimate_memory.py --append bench/RESULTS.md     # SD v1 rows (a few minutes; little real memory)
    python bench/estimate_memory.py --validate                     # CPU: estimate vs measured, small size
    python bench/estimate_memory.py --size tiny --variants adapter --dtypes bf16 --checkpointing off   # seconds
"""
import argparse
import copy
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.autograd.graph import _engine_run_backward

import bench_dreambooth as db
from bench_unet import git_commit
from fake_cuda import CUDA_BLOCK, CudaAutocast, LiveBytes, cuda_autocast, fakeify, first_difference, \
    run_traced
from ldm.checkpoint import atomic_write
from ldm.modules.adapters.attach import AdapterGroup
from ldm.util.instantiate import instantiate_from_config

BENCH = Path(__file__).resolve().parent
LATENT = {"sd": 64, "small": 16, "tiny": 4}
GOAL_GIB = 12e9 / 2**30  # the goal for one run without checkpointing: 12 GB
WHAT = {"adapter": "ours, adapter attn2o-ffni", "lora": "diffusers + PEFT LoRA r4"}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(LATENT), default="sd", help="sd: SD v1; small: model_channels 64; tiny")
    p.add_argument("--latent", type=int, help="latent side (default: 64 for sd = 512 px, 16 small, 4 tiny)")
    p.add_argument("--variants", default="adapter,lora,pack", help="adapter, lora, pack (ours, K points)")
    p.add_argument("--pack", type=int, default=8, help="points in a pack (batch K+K)")
    p.add_argument("--dtypes", default="fp16,bf16", help="autocast dtypes: fp16, bf16, fp32 (none)")
    p.add_argument("--checkpointing", default="off,on")
    p.add_argument("--append", help="Markdown file the rows are appended to (as a new section)")
    p.add_argument("--validate", action="store_true", help="the CPU check: fake estimate vs real runs, small size")
    p.add_argument("--real", help=argparse.SUPPRESS)  # a validation child: one real CPU run, JSON spec
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    bad = sorted(set(args.variants.split(",")) - {"adapter", "lora", "pack"}) + \
        sorted(set(args.dtypes.split(",")) - set(db.AMP)) + sorted(set(args.checkpointing.split(",")) - {"off", "on"})
    if bad:
        sys.exit(f"error: unknown value(s) {bad}: --variants adapter,lora,pack --dtypes fp16,bf16,fp32 "
                 "--checkpointing off,on")
    if not 1 <= args.pack <= 64:
        sys.exit(f"error: --pack must be in [1, 64], got {args.pack}")
    if args.latent is not None and not 1 <= args.latent <= 256:
        sys.exit(f"error: --latent must be in [1, 256], got {args.latent}")
    if args.append and not Path(args.append).parent.is_dir():
        sys.exit(f"error: the folder of --append '{args.append}' does not exist")


# ---- the step -------------------------------------------------------------------------------------------------
class SlicedAdapter(torch.nn.Module):
    """K copies of an adapter, copy i on the i-th K-th of the batch: K design points sharing one UNet pass."""

    def __init__(self, adapter: torch.nn.Module, k: int):
        super().__init__()
        self.copies = torch.nn.ModuleList(copy.deepcopy(adapter) for _ in range(k))
        self.spec = adapter.spec

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([a(x) for a, x in zip(self.copies, t.chunk(len(self.copies)))])


def pack_adapters(model: torch.nn.Module, k: int) -> None:
    """Every adapter of `model` becomes K adapters, each on its own slice of the batch (trained, as the original)."""
    for group in [m for m in model.modules() if isinstance(m, AdapterGroup)]:
        for i, adapter in enumerate(list(group)):
            group[i] = SlicedAdapter(adapter, k)


def build(spec: SimpleNamespace, device: torch.device, fake: Optional[FakeTensorMode]):
    """Our model (and diffusers' LoRA UNet) of `spec`, fake on `device` (built on meta) or real; the batch; loss."""
    config = db.model_config(spec.size)
    config.model.params.train_level = ["adapter"]
    torch.manual_seed(0)
    with torch.device("meta" if fake else device):
        model = instantiate_from_config(config.model)
    model.unet.set_gradient_checkpointing(spec.checkpointing)
    if spec.variant == "pack":
        pack_adapters(model, spec.pack)
    lora = None
    if spec.variant == "lora":
        lora = db.lora_unet(model, config, torch.device("meta") if fake else device)
        if spec.checkpointing:
            lora.enable_gradient_checkpointing()
        model.model.diffusion_model = torch.nn.Identity()  # only diffusers' UNet runs
    if fake:
        for m in (model, lora):
            if m is not None:
                fakeify(m, fake, device)
    with fake or torch.device(device):
        batch = db.make_batch(model, spec.pack if spec.variant == "pack" else 1, spec.latent, device)
    loss_fn, params = db.make_loss("lora" if spec.variant == "lora" else "adapter", model, lora, batch, device)
    return [m for m in (model, lora) if m is not None] + list(batch.values()), loss_fn, params


def make_step(loss_fn, params, dtype: str, autocast, emulated: bool):
    """Autocast forward, backward, AdamW; fp16 through a GradScaler. With an `emulated` autocast (CudaAutocast, a
    TorchFunctionMode) the backward runs inside it, so that checkpointed blocks recompute under it, as they do under
    torch.autocast; it is started on the autograd engine directly, because a Tensor.backward() call would itself go
    through the mode and run with the mode switched off."""
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    scaler = torch.amp.GradScaler("cpu") if dtype == "fp16" else None

    def backward(loss):
        loss = scaler.scale(loss) if scaler else loss
        if emulated:
            _engine_run_backward((loss,), (torch.ones_like(loss),), False, False, (), allow_unreachable=True,
                                 accumulate_grad=True)
        else:
            loss.backward()

    def step():
        with autocast():
            loss = loss_fn()
            if emulated:
                backward(loss)
        if not emulated:
            backward(loss)
        if scaler:
            scaler.unscale_(optimizer)
        optimizer.step()
        if scaler:
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return step


def measure(resident, step, granule: int) -> Dict[str, int]:
    """Bytes before the steps, peak over both steps, peak of the second (latent cache filled)."""
    live = LiveBytes(granule)
    tensors = [t for t in resident if isinstance(t, (torch.Tensor, torch.nn.Module))]
    live.add(*tensors)
    resident_bytes = live.current
    with live:
        with torch.profiler.record_function("step 1"):  # markers for the validation's profiler
            step()
        first, casts = live.peak, live.casts_at_peak
        live.reset_peak()
        with torch.profiler.record_function("step 2"):
            step()
    casts = casts if first > live.peak else live.casts_at_peak
    return {"resident": resident_bytes, "peak": max(first, live.peak), "steady": live.peak, "op": live.peak_op,
            "casts": casts}


def estimate(spec: SimpleNamespace, target: str) -> Dict:
    """The estimate for `target` "cuda" (CudaAutocast, checked against torch's on fake CUDA) or "cpu" (torch's CPU
    autocast), on fake CPU tensors."""
    amp = db.AMP[spec.dtype]
    t0 = time.time()
    if target == "cuda" and amp is not None:
        check_emulation(spec, amp)
    fake = FakeTensorMode()
    resident, loss_fn, params = build(spec, torch.device("cpu"), fake)
    if target == "cuda":
        autocast = lambda: CudaAutocast(amp)  # noqa: E731
    else:
        autocast = lambda: torch.autocast("cpu", dtype=amp, enabled=amp is not None)  # noqa: E731
    with fake:
        result = measure(resident, make_step(loss_fn, params, spec.dtype, autocast, target == "cuda"),
                         CUDA_BLOCK if target == "cuda" else 1)
    result["trained"] = sum(p.numel() for p in params)
    result["seconds"] = round(time.time() - t0, 1)
    return result


def check_emulation(spec: SimpleNamespace, amp: torch.dtype) -> None:
    """Refuse to estimate unless the first step's forward under CudaAutocast (fake CPU) is, op for op, the forward
    under torch's own CUDA autocast (fake CUDA)."""
    traces = []
    for device in ("cuda", "cpu"):
        fake = FakeTensorMode()
        _, loss_fn, _ = build(spec, torch.device(device), fake)
        with fake:
            if device == "cuda":
                with cuda_autocast(amp), CudaAutocast(amp, policy=False):
                    traces.append(run_traced(loss_fn))
            else:
                with CudaAutocast(amp):
                    traces.append(run_traced(loss_fn))
    diff = first_difference(*traces)
    if diff:
        raise RuntimeError(f"CudaAutocast differs from torch's CUDA autocast for {spec}: {diff}")
    spec.checked_ops = len(traces[0])


# ---- rows -----------------------------------------------------------------------------------------------------
def specs(args: argparse.Namespace) -> List[SimpleNamespace]:
    latent = args.latent or LATENT[args.size]
    return [SimpleNamespace(variant=v, dtype=d, checkpointing=c == "on", size=args.size, latent=latent, pack=args.pack)
            for v in args.variants.split(",") for d in args.dtypes.split(",") for c in args.checkpointing.split(",")]


def row(spec: SimpleNamespace, r: Dict, stamp: str) -> str:
    gib = {k: r[k] / 2**30 for k in ("peak", "resident", "steady")}
    k = spec.pack if spec.variant == "pack" else 1
    what = (f"ours, pack of {k} attn2o-ffni points (stand-in)" if spec.variant == "pack" else WHAT[spec.variant])
    goal = "" if spec.checkpointing or spec.variant == "pack" else \
        ("yes" if gib["peak"] <= GOAL_GIB else "**no**") + f" (12 GB = {GOAL_GIB:.2f} GiB)"
    notes = (f"models + batch {gib['resident']:.2f} GiB; after the cache is filled {gib['steady']:.2f} GiB; "
             f"cast copies of weights alive at the peak {r['casts'] / 2**30:.2f} GiB; "
             f"{r['trained']:,} trained params; " + (f"forward checked op for op ({spec.checked_ops} ops)"
                                                     if hasattr(spec, "checked_ops") else "no autocast to check"))
    dtype = "fp32, no autocast" if spec.dtype == "fp32" else f"{spec.dtype} autocast"
    return (f"| {stamp} | {what} | {dtype} | {'on' if spec.checkpointing else 'off'} | "
            f"{k} + {k}, {spec.latent * 8} px | **{gib['peak']:.2f}** | {goal} | {notes} |")


HEADER = ("| date, commit, torch | variant | dtype | gradient checkpointing | batch | estimated peak GiB | "
          "one run <= 12 GB | notes |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n")


def section(lines: List[str], args: argparse.Namespace) -> str:
    return (f"## Estimated CUDA peak memory {datetime.date.today()}: fake tensors, no GPU (commit {git_commit()})\n\n"
            f"`python bench/estimate_memory.py --size {args.size} --variants {args.variants} --dtypes {args.dtypes} "
            f"--checkpointing {args.checkpointing} --pack {args.pack}`\n\n" + HEADER + "\n".join(lines) + "\n")


# ---- validation on the CPU ------------------------------------------------------------------------------------
VALIDATION = [("adapter", "fp32", False), ("adapter", "fp32", True), ("lora", "fp32", False), ("pack", "fp32", False),
              ("adapter", "bf16", False), ("adapter", "bf16", True)]


VALIDATION_HEADER = ("| variant | dtype | checkpointing | size | estimated MiB (2 steps / step 2) | counted on real "
                     "tensors MiB | allocator peak MiB (2 steps / step 2) | peak RSS MiB | estimated / allocator "
                     "(2 steps / step 2) | estimated / RSS |\n|" + " --- |" * 10 + "\n")


def real_run(spec: SimpleNamespace) -> Dict:
    """One real CPU run (in this process): what LiveBytes counts, the allocator's peak (profiler memory events)
    and the peak RSS, each minus its value before the steps."""
    torch.set_num_threads(1)
    resident, loss_fn, params = build(spec, torch.device("cpu"), None)
    amp = db.AMP[spec.dtype]
    step = make_step(loss_fn, params, spec.dtype, lambda: torch.autocast("cpu", dtype=amp, enabled=amp is not None),
                     False)
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak RSS count
    rss0 = _status_kib("VmRSS:")
    acts = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=acts, profile_memory=True) as prof:
        counted = measure(resident, step, 1)
    events = prof.profiler.kineto_results.events()
    second = next(e.start_ns() for e in events if e.name() == "step 2")
    live = peak = steady = 0
    for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
        steady = max(steady, live) if e.start_ns() >= second else steady
    return {"counted": counted["peak"] - counted["resident"], "allocator": peak, "allocator_steady": steady,
            "rss": (_status_kib("VmHWM:") - rss0) * 1024}


def _status_kib(field: str) -> int:
    lines = Path("/proc/self/status").read_text().splitlines()
    return int(next(line.split()[1] for line in lines if line.startswith(field)))


def validate(args: argparse.Namespace) -> List[str]:
    size, latent = ("small", args.latent or 32) if args.size == "sd" else (args.size, args.latent or LATENT[args.size])
    lines = []
    for variant, dtype, ckpt in VALIDATION:
        spec = SimpleNamespace(variant=variant, dtype=dtype, checkpointing=ckpt, size=size, latent=latent,
                               pack=min(args.pack, 4))
        est = estimate(spec, "cpu")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--real", json.dumps(vars(spec))]
        real = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        adds, steady = est["peak"] - est["resident"], est["steady"] - est["resident"]
        mib = {k: v / 2**20 for k, v in real.items()}
        lines.append(f"| {variant} | {dtype} | {'on' if ckpt else 'off'} | {size}, {latent * 8} px | "
                     f"{adds / 2**20:.1f} / {steady / 2**20:.1f} | {mib['counted']:.1f} | {mib['allocator']:.1f} / "
                     f"{mib['allocator_steady']:.1f} | {mib['rss']:.1f} | {adds / real['allocator']:.3f} / "
                     f"{steady / real['allocator_steady']:.3f} | {adds / real['rss']:.3f} |")
        print(lines[-1], flush=True)
    return lines


def main(argv: Optional[List[str]] = None) -> List[str]:
    args = parse_args(argv)
    if args.real:
        print(json.dumps(real_run(SimpleNamespace(**json.loads(args.real)))))
        return []
    check_args(args)
    if args.validate:
        print(VALIDATION_HEADER, end="")
        return validate(args)
    stamp = f"{datetime.date.today()}, {git_commit()}, torch {torch.__version__}"
    before = Path(args.append).read_text().rstrip("\n") + "\n\n" if args.append and Path(args.append).exists() else ""
    lines = []
    for spec in specs(args):
        r = estimate(spec, "cuda")
        lines.append(row(spec, r, stamp))
        print(lines[-1], f"[{r['seconds']} s; peak at {r['op']}]", flush=True)
        if args.append:  # rewritten (atomically) after each row: a stopped run keeps the rows it has
            text = before + section(lines, args)
            atomic_write(args.append, lambda tmp: Path(tmp).write_text(text))
    return lines


if __name__ == "__main__":
    main()
