"""The measurements of bench/gpu_check.py, one function per item; each takes the Check and records rows.

Random weights throughout (no SD weights are downloaded): speed and memory do not depend on the values, and the
diffusers twins hold exactly our weights (bench_unet.diffusers_twin, bench/twins.py), so numerics compare like with
like. Timings are medians of interleaved calls (bench_unet.time_interleaved) after warmups; as many repeats as the
item's time allows, at least one.
"""
import copy
import gc
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import bench_dreambooth as db
from bench_unet import build_ours, diffusers_twin, freeze_except, synchronize, time_interleaved, unet_config
from ldm.models.diffusion.sampling import seeds_noise, text_to_image
from ldm.modules.adapters import (Rows, adapter_carriers, adapter_groups, adapter_parameters, config_from_specs,
                                  inject_adapters)
from ldm.modules.fastpaths import adamw_options, compile_module, to_channels_last
from ldm.util.instantiate import instantiate_from_config
from twins import diffusers_pipeline

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROMPT = "a photograph of an astronaut riding a horse"
# latent side, UNet batch (CFG: 2 x 1), DDIM steps, txt2img batches, guidance, repeats, warmups
SIZES = {
    "sd": dict(latent=64, batch=2, steps=50, batches=(1, 4), scale=7.5, repeats=10, warmup=2, dtypes=("fp16", "bf16"),
               train_dtype="bf16"),
    "tiny": dict(latent=4, batch=2, steps=3, batches=(1, 2), scale=7.5, repeats=1, warmup=0, dtypes=("fp16", "bf16"),
                 train_dtype="bf16"),
}
SIZE_NAMES = {"sd": "sd", "tiny": "tiny"}  # --size -> bench_unet's / bench_dreambooth's size name


def versions() -> List[str]:
    """Library versions for the section header."""
    out = [f"torch {torch.__version__}" + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else "")]
    for name in ("diffusers", "peft", "transformers", "bitsandbytes"):
        try:
            out.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            out.append(f"no {name}")
    return out


def release(device: torch.device) -> None:
    """Give the GPU memory of dropped models back (a CPU run skips it: gc.collect costs seconds there)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")  # Linux: restart the peak RSS (VmHWM) count


def peak_gib(device: torch.device) -> float:
    """Peak since reset_peak: GPU memory allocated, or on the CPU the process's peak RSS (everything resident)."""
    synchronize(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    status = Path("/proc/self/status").read_text() if Path("/proc/self/status").exists() else ""
    kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)
    return kb / 2**20


def timed(check, fns: Dict[str, Callable[[], None]], repeats: Optional[int] = None,
          warmup: Optional[int] = None) -> Dict[str, float]:
    """Median ms per call of each fn, interleaved; repeats cut down to what the item's time left allows."""
    size = check.size
    times = time_interleaved(fns, check.device, 1, size["warmup"] if warmup is None else warmup)
    round_s = sum(v[0] for v in times.values()) / 1e3
    want = min(size["repeats"], repeats or size["repeats"])
    more = max(0, min(want - 1, int((check.left() - 5) / max(round_s, 1e-3))))
    for k, v in time_interleaved(fns, check.device, more, 0).items():
        times[k] += v
    return {k: statistics.median(v) for k, v in times.items()}


def shape_of(check, batch: Optional[int] = None) -> str:
    n = check.size["latent"]
    return f"{batch or check.size['batch']} x 4x{n}x{n}"


def unet_inputs(check, dtype: torch.dtype = torch.float32, batch: Optional[int] = None):
    """x, t, context, target of the UNet at this size."""
    g = torch.Generator().manual_seed(1)
    b, n = batch or check.size["batch"], check.size["latent"]
    ctx_dim = unet_config(SIZE_NAMES[check.args.size]).params.unet_config.params.context_dim
    x = torch.randn(b, 4, n, n, generator=g)
    context = torch.randn(b, 77, ctx_dim, generator=g)
    target = torch.randn(b, 4, n, n, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    d = check.device
    return x.to(d, dtype), t.to(d), context.to(d, dtype), target.to(d)


def unet_pair(check) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """Our SD v1 UNet (random weights) and diffusers' with the same weights, fp32, on the device, eval mode."""
    config = unet_config(SIZE_NAMES[check.args.size])
    ours = build_ours(config)
    return ours.to(check.device), diffusers_twin(ours, config).to(check.device)


def call(model: torch.nn.Module, x, t, context) -> torch.Tensor:
    """Either model's noise prediction."""
    if hasattr(model, "input_blocks"):
        return model(x, t, context)
    return model(x, t, encoder_hidden_states=context, return_dict=False)[0]


# ---- numerics -------------------------------------------------------------------------------------------------
def numerics(check) -> None:
    """Autocast vs fp32 (TF32 off) max relative error of the UNet output, ours and diffusers'; adapter dtypes."""
    ours, theirs = unet_pair(check)
    x, t, context, _ = unet_inputs(check)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        ref = {m: call(m, x, t, context).float() for m in (ours, theirs)}
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for name in check.size["dtypes"]:
            errors = []
            for m in (ours, theirs):
                with torch.autocast(check.device.type, dtype=DTYPES[name]):
                    out = call(m, x, t, context).float()
                errors.append(((out - ref[m]).abs().max() / ref[m].abs().max()).item())
            check.row("numerics: UNet forward, autocast vs fp32, max abs error / max abs fp32 output", name,
                      shape_of(check), f"{errors[0]:.2e}", f"diffusers {errors[1]:.2e}", errors[0] / errors[1],
                      "same weights and input; TF32 off in the fp32 reference")
    del ours, theirs, ref
    release(check.device)
    for name in check.size["dtypes"]:
        adapter_dtypes(check, name)


def adapter_dtypes(check, name: str) -> None:
    """One DreamBooth step of the adapter under autocast `name`: trained weights and grads must stay fp32."""
    step, model = dreambooth_step(check, "adapter", name)
    trained = model.trained_parameters()
    before = [p.detach().clone() for p in trained]
    grads = {}
    hooks = [p.register_post_accumulate_grad_hook(lambda p: grads.__setitem__(id(p), p.grad.dtype)) for p in trained]
    step()
    for h in hooks:
        h.remove()
    bad = [p.dtype for p in trained if p.dtype != torch.float32] + [d for d in grads.values() if d != torch.float32]
    moved = sum(not torch.equal(a, p.detach()) for a, p in zip(before, trained))
    finite = all(torch.isfinite(p).all() for p in trained)
    verdict = "fp32 weights and grads" if not bad and len(grads) == len(trained) else f"NOT fp32: {bad[:3]}"
    check.row("numerics: trained adapter weights through an autocast DreamBooth step", name, shape_of(check, 1),
              verdict, notes=f"{len(trained)} tensors, {moved} changed by the step, all finite: {finite}")


# ---- UNet -----------------------------------------------------------------------------------------------------
def unet(check) -> None:
    """Forward with weights cast to each dtype, and a train step under autocast, ours vs diffusers."""
    ours, theirs = unet_pair(check)
    for name in check.size["dtypes"]:
        dtype = DTYPES[name]
        x, t, context, target = unet_inputs(check, dtype)
        cast = {"ours": copy.deepcopy(ours).to(dtype), "diffusers": copy.deepcopy(theirs).to(dtype)}

        def forward(m):
            with torch.no_grad():
                call(m, x, t, context)
        ms = timed(check, {k: (lambda m=m: forward(m)) for k, m in cast.items()})
        check.row("UNet forward, weights cast, ms", name, shape_of(check), f"{ms['ours']:.2f}",
                  f"diffusers {ms['diffusers']:.2f}", ms["ours"] / ms["diffusers"], "eval, no_grad, SDPA")
        del cast
        release(check.device)
    n = {k: freeze_except(m) for k, m in (("ours", ours), ("diffusers", theirs))}
    x, t, context, target = unet_inputs(check)
    for name in check.size["dtypes"]:
        def train(m, dtype=DTYPES[name]):
            with torch.autocast(check.device.type, dtype=dtype):
                loss = F.mse_loss(call(m, x, t, context).float(), target)
            loss.backward()
            m.zero_grad(set_to_none=True)
        for m in (ours, theirs):
            m.train()
        ms = timed(check, {"ours": lambda: train(ours), "diffusers": lambda: train(theirs)})
        check.row("UNet train step (fwd + bwd), fp32 weights + autocast, ms", name, shape_of(check),
                  f"{ms['ours']:.2f}", f"diffusers {ms['diffusers']:.2f}", ms["ours"] / ms["diffusers"],
                  f"frozen base, {n['ours']:,} params train (attn2.to_out.0.weight)")


# ---- DreamBooth -----------------------------------------------------------------------------------------------
def dreambooth_step(check, variant: str, dtype: str, checkpointing: bool = False,
                    compile_backend: Optional[str] = None, optimizer_class: type = torch.optim.AdamW):
    """bench_dreambooth's step of `variant` (adapter, full, lora) at this size, batch 1+1, cached latents."""
    args = SimpleNamespace(size=SIZE_NAMES[check.args.size], latent=check.size["latent"], batch=1, dtype=dtype,
                           checkpointing=checkpointing)
    config = db.model_config(args.size)
    model = db.build_model(config, "adapter" if variant == "adapter" else "full", check.device)
    model.unet.set_gradient_checkpointing(checkpointing)
    batch = db.make_batch(model, 1, args.latent, check.device)
    lora = None
    if variant == "lora":
        lora = db.lora_unet(model, config, check.device)
        if checkpointing:
            lora.enable_gradient_checkpointing()
        model.model.diffusion_model = torch.nn.Identity()  # only diffusers' UNet runs
    if compile_backend:
        compile_module(lora if lora is not None else model.unet, check.device, backend=compile_backend)
    return db.make_step(variant, model, lora, batch, db.AMP[dtype], check.device, optimizer_class), model


def dreambooth(check) -> None:
    """it/s and peak memory of the adapter, full fine-tuning and PEFT LoRA, checkpointing off and on."""
    dtype = check.size["train_dtype"]
    for checkpointing in (False, True):
        ref = None
        for variant in ("lora", "adapter", "full"):
            step, model = dreambooth_step(check, variant, dtype, checkpointing)
            reset_peak(check.device)
            ms = timed(check, {variant: step})[variant]
            mem = peak_gib(check.device)
            del step, model
            release(check.device)
            ref = ref or (ms, mem)
            what = {"lora": "diffusers + PEFT LoRA r4", "adapter": "ours, adapter attn2o-ffni",
                    "full": "ours, full fine-tuning"}[variant]
            check.row(f"DreamBooth step, cached latents, {what}: ms (it/s), peak GiB", dtype, shape_of(check, 2),
                      f"{ms:.1f} ({1e3 / ms:.2f} it/s), {mem:.2f} GiB",
                      f"LoRA {ref[0]:.1f} ms, {ref[1]:.2f} GiB", ms / ref[0],
                      f"gradient checkpointing {'on' if checkpointing else 'off'}; memory ratio {mem / ref[1]:.2f}"
                      + ("; CPU peak RSS of the whole process" if check.device.type == "cpu" else ""))


# ---- packed training ------------------------------------------------------------------------------------------
PACK_RUNS = 8


def packed_step(model: torch.nn.Module, batch: Dict, runs: int, amp: Optional[torch.dtype],
                device: torch.device) -> Callable[[], None]:
    """One step of `runs` attn2o-ffni runs packed as ldm.train.pack packs them: every run's adapters a group on its
    rows (1 + 1) of one UNet call, one backward pass, an AdamW per run."""
    unet = model.unet
    config = config_from_specs(adapter_groups(unet)["default"])
    names = ["default"] + [f"run{i}" for i in range(1, runs)]
    for name in names[1:]:
        inject_adapters(unet, config, name)
    for i, name in enumerate(names):
        for _, module in adapter_carriers(unet):
            module.adapters[name].rows = Rows(2 * i, 2 * i + 2)
    optimizers = [torch.optim.AdamW(adapter_parameters(unet, name), lr=1e-5) for name in names]
    z = torch.cat([batch["z"], batch["z_reg"]] * runs)
    c = torch.cat([batch["c"], batch["c_reg"]] * runs)
    model.train()

    def step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            t = torch.randint(0, 1000, (z.shape[0],), device=device)
            noise = torch.randn_like(z)
            eps = model.apply_model(model.q_sample(z, t, noise), t, c)
            per_run = F.mse_loss(eps.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3)).view(runs, 2)
        per_run.mean(dim=1).sum().backward()  # the sum of the runs' losses: each run's adapters get its own gradient
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return step


def packed(check) -> None:
    """Point-steps per second of a pack of 8 attn2o-ffni runs (batch 1+1 each) vs one run, same autocast."""
    dtype = check.size["train_dtype"]
    one, model = dreambooth_step(check, "adapter", dtype)
    batch = db.make_batch(model, 1, check.size["latent"], check.device)
    pack = packed_step(copy.deepcopy(model), batch, PACK_RUNS, db.AMP[dtype], check.device)
    ms = timed(check, {"one": one, "pack": pack})
    per_point = ms["pack"] / PACK_RUNS
    check.row(f"packed DreamBooth step, {PACK_RUNS} runs attn2o-ffni vs one run: ms per run-step",
              dtype, shape_of(check, 2 * PACK_RUNS), f"{per_point:.1f} ms ({1e3 / per_point:.2f} run-steps/s)",
              f"one run {ms['one']:.1f} ms ({1e3 / ms['one']:.2f} steps/s)", per_point / ms["one"],
              f"speed-up {ms['one'] / per_point:.2f}x (goal >= 3x); UNet call, backward and optimisers only (the "
              "Lightning loop of each run is not in it)")


# ---- txt2img --------------------------------------------------------------------------------------------------
def sd_model(check) -> Tuple[torch.nn.Module, object]:
    """Our LatentDiffusion at this size (VAE, text encoder, UNet; random weights), fp32, eval, and its config."""
    files = {"sd": ["configs/stable-diffusion/v1-inference.yaml"], "tiny": ["configs/tests/tiny-inference.yaml"]}
    config = OmegaConf.merge(*[OmegaConf.load(REPO / f) for f in files[check.args.size]])
    torch.manual_seed(0)
    with torch.device(check.device):
        model = instantiate_from_config(config.model)
    for m in model.unet.modules():  # zero-initialised output convs would make every UNet output 0
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not m.weight.any():
            m.reset_parameters()
    return model.eval(), config.model


def txt2img_calls(check, model, pipe, n: int) -> Dict[str, Callable[[], None]]:
    """Our text-to-image path (autocast, as sample.py on a GPU) and StableDiffusionPipeline, batch n."""
    size, px = check.size, check.size["latent"] * 8
    x_T = seeds_noise(range(n), model.latent_shape(px, px))
    half = torch.float16 if check.device.type == "cuda" else torch.bfloat16

    def ours(m=model):
        with torch.autocast(check.device.type, dtype=half):
            text_to_image(m, [PROMPT] * n, x_T, steps=size["steps"], scale=size["scale"]).cpu()

    def theirs():
        pipe([PROMPT] * n, num_inference_steps=size["steps"], guidance_scale=size["scale"], height=px, width=px,
             output_type="pt")
    return {"ours": ours, "diffusers": theirs}


def txt2img(check) -> None:
    """Seconds per image, 50 DDIM steps with guidance, batch 1 and 4: ours (autocast; fp16 weights) vs diffusers."""
    model, config = sd_model(check)
    half = torch.float16 if check.device.type == "cuda" else torch.bfloat16
    pipe = diffusers_pipeline(model, config).to(dtype=half)
    model16 = copy.deepcopy(model).to(half)
    name = "fp16" if half == torch.float16 else "bf16"
    for n in check.size["batches"]:
        calls = txt2img_calls(check, model, pipe, n)
        calls["ours, half weights"] = txt2img_calls(check, model16, pipe, n)["ours"]
        ms = timed(check, calls, repeats=3, warmup=min(1, check.size["warmup"]))
        for k in ("ours", "ours, half weights"):
            check.row(f"txt2img {check.size['steps']} DDIM steps, guidance {check.size['scale']:g}, {k}: s / image",
                      name, f"{n} x {check.size['latent'] * 8}px", f"{ms[k] / n / 1e3:.3f}",
                      f"diffusers {ms['diffusers'] / n / 1e3:.3f}", ms[k] / ms["diffusers"],
                      "eager; ours: fp32 weights + autocast (sample.py's default)" if k == "ours" else
                      "eager; ours with the whole model cast, under autocast; diffusers in fp16")


# ---- CUDA fast paths ------------------------------------------------------------------------------------------
def fastpaths(check) -> None:
    """TF32 on vs off (fp32 train step), fused vs foreach AdamW (full UNet), channels-last vs NCHW (forward)."""
    ours, _ = unet_pair(check)
    tf32_row(check, ours)
    fused_adamw_row(check, ours)
    channels_last_row(check, ours)


def tf32_row(check, unet_model: torch.nn.Module) -> None:
    """An fp32 train step (frozen base) with TF32 matmuls on vs off."""
    x, t, context, target = unet_inputs(check)
    n = freeze_except(unet_model)
    unet_model.train()

    def train(tf32: bool):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        loss = F.mse_loss(call(unet_model, x, t, context).float(), target)
        loss.backward()
        unet_model.zero_grad(set_to_none=True)
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        ms = timed(check, {"tf32": lambda: train(True), "fp32": lambda: train(False)})
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    check.row("fast path: TF32 matmuls, fp32 UNet train step, ms", "fp32", shape_of(check), f"{ms['tf32']:.2f}",
              f"TF32 off {ms['fp32']:.2f}", ms["tf32"] / ms["fp32"],
              f"{n:,} params train; ldm.modules.fastpaths.use_tf32")


def fused_adamw_row(check, unet_model: torch.nn.Module) -> None:
    """AdamW over every UNet parameter (random gradients): fused vs foreach."""
    params = list(unet_model.parameters())
    for p in params:
        p.requires_grad_(True)
        p.grad = torch.randn_like(p) * 1e-3
    opts = {"fused": torch.optim.AdamW(params, lr=1e-5, **adamw_options(params) or {"fused": True}),
            "foreach": torch.optim.AdamW(params, lr=1e-5, foreach=True)}
    ms = timed(check, {k: o.step for k, o in opts.items()})
    unet_model.zero_grad(set_to_none=True)
    check.row("fast path: fused AdamW step, all UNet params, ms", "fp32", f"{sum(p.numel() for p in params):,} params",
              f"{ms['fused']:.2f}", f"foreach {ms['foreach']:.2f}", ms["fused"] / ms["foreach"],
              "ldm.modules.fastpaths.adamw_options (fused on CUDA only)")


def channels_last_row(check, unet_model: torch.nn.Module) -> None:
    """The UNet forward (fp16 on CUDA) with channels-last weights and input vs NCHW."""
    half = torch.float16 if check.device.type == "cuda" else torch.float32
    nchw = copy.deepcopy(unet_model).eval().to(half)
    nhwc = to_channels_last(copy.deepcopy(nchw))
    x, t, context, _ = unet_inputs(check, half)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def forward(m, inp):
        with torch.no_grad():
            call(m, inp, t, context)
    ms = timed(check, {"cl": lambda: forward(nhwc, x_cl), "nchw": lambda: forward(nchw, x)})
    check.row("fast path: channels-last UNet forward, ms", str(half).split(".")[-1], shape_of(check),
              f"{ms['cl']:.2f}", f"NCHW {ms['nchw']:.2f}", ms["cl"] / ms["nchw"],
              "ldm.modules.fastpaths.to_channels_last; below 1 means worth turning on")


def adam8bit(check) -> None:
    """Full fine-tuning steps with bitsandbytes' AdamW8bit vs torch AdamW (a skip row without bitsandbytes)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        check.row("8-bit AdamW (bitsandbytes)", "", "", "skipped", notes="bitsandbytes is not installed")
        return
    dtype = check.size["train_dtype"]
    results = {}
    for name, cls in (("adamw8bit", bnb.optim.AdamW8bit), ("adamw", torch.optim.AdamW)):
        step, _ = dreambooth_step(check, "full", dtype, optimizer_class=cls)
        reset_peak(check.device)
        results[name] = (timed(check, {name: step})[name], peak_gib(check.device))
        del step
        release(check.device)
    (ms8, mem8), (ms, mem) = results["adamw8bit"], results["adamw"]
    check.row("8-bit AdamW, full fine-tuning step: ms, peak GiB", dtype, shape_of(check, 2),
              f"{ms8:.1f} ms, {mem8:.2f} GiB", f"AdamW {ms:.1f} ms, {mem:.2f} GiB", ms8 / ms,
              f"memory ratio {mem8 / mem:.2f}; use_8bit_adam: true")


# ---- torch.compile --------------------------------------------------------------------------------------------
def compiled(check) -> None:
    """torch.compile vs eager: txt2img batch 1 (our half weights), then the adapter and the LoRA DreamBooth steps."""
    backend = check.args.compile_backend
    model, _ = sd_model(check)
    half = torch.float16 if check.device.type == "cuda" else torch.bfloat16
    model = model.to(half)
    eager = txt2img_calls(check, model, None, 1)["ours"]
    ms_eager = timed(check, {"e": eager}, repeats=2, warmup=min(1, check.size["warmup"]))["e"]
    t0 = _now(check)
    compile_module(model.unet, check.device, backend=backend)
    eager()  # compiles on the first call
    first = _now(check) - t0
    ms = timed(check, {"c": eager}, repeats=2, warmup=0)["c"]
    check.row(f"compiled txt2img {check.size['steps']} DDIM steps, batch 1: s / image", str(half).split(".")[-1],
              f"1 x {check.size['latent'] * 8}px", f"{ms / 1e3:.3f}", f"eager {ms_eager / 1e3:.3f}", ms / ms_eager,
              f"backend {backend}; first call {first:.1f} s (compile); anchor: diffusers + compile on an H100 0.83 s")
    del model, eager
    release(check.device)
    dtype = check.size["train_dtype"]
    for variant in ("adapter", "lora"):
        step, model = dreambooth_step(check, variant, dtype)
        ms_eager = timed(check, {"e": step}, repeats=5)["e"]
        del step, model
        release(check.device)
        step, model = dreambooth_step(check, variant, dtype, compile_backend=backend)
        t0 = _now(check)
        step()
        first = _now(check) - t0
        reset_peak(check.device)
        ms = timed(check, {"c": step}, repeats=5)["c"]
        check.row(f"compiled DreamBooth step, {variant}: ms", dtype, shape_of(check, 2), f"{ms:.1f}",
                  f"eager {ms_eager:.1f}", ms / ms_eager, f"backend {backend}; first step {first:.1f} s (compile); "
                  f"peak {peak_gib(check.device):.2f} GiB; gradient checkpointing off")
        del step, model
        release(check.device)


def _now(check) -> float:
    synchronize(check.device)
    return time.perf_counter()
