"""What the v3 tiny base model (f = 4 autoencoder, 16x16 latents) costs and buys, measured on this machine.

    python bench/bench_tiny_v3.py steps [--recipe configs/tiny-world/train-base-v3.yaml] [--threads 1]
                                                                                  # per-stage step costs
    python bench/bench_tiny_v3.py vae --steps 400 --batch 16                        # f = 4 vs f = 8 autoencoder

`steps`: for each training stage of scripts/train_tiny_base.py (autoencoder, decoder, UNet + text encoder), run by
the recipe's own stage functions at the recipe's batch sizes and crops on random data of the stage's shapes, and the
recipe's arithmetic (steps x cost; the encoding of its latents and the drawing of its scenes too): CPU time per step
(one thread, process CPU time, so other jobs on the machine do not inflate it much; the difference of a 1 + R-step and
a 1-step run, so set-up cancels), FLOPs per step (torch's FlopCounterMode: convolutions, matmuls, attention), aten ops
per step (on a GPU each is a kernel launch or less; the CPU path runs the optimiser, clipping and EMA per tensor,
which CUDA runs as foreach calls), and the same step at batch 1 on 8x8 latents, where dispatch and Python dominate
(the host floor). Also the CPU time to draw a scene and to draw and tokenize a batch of captions. These are the
inputs of the GPU estimate in configs/tiny-world/train-base-v3.yaml.

`vae`: trains the f = 4 and the f = 8 autoencoder of those configs from scratch with stage 1 of the recipe (the same
probe-world images, seed, batch, steps and learning rate), then measures them as the report does
(`ldm.tinyworld.evaluate.autoencoder_quality`): what the probe reads in reconstructions of held-out base-world scenes
and of unseen subject images, next to what it reads in the drawn images.
"""
import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ldm.data.synthetic import caption, random_scene, render_uint8, scene_rng
from ldm.tinyworld.base import finetune_decoder, render_images, train_diffusion, train_vae
from ldm.tinyworld.evaluate import autoencoder_quality
from ldm.tinyworld.metrics import TinyWorldMetric
from ldm.util.instantiate import instantiate_from_config

REPO = Path(__file__).resolve().parents[1]
MODELS = {"v2-f8": REPO / "configs/tiny-world/tiny-sd-v1.yaml", "v3-f4": REPO / "configs/tiny-world/tiny-sd-v1-f4.yaml"}


class OpCounter(TorchDispatchMode):
    """Counts aten calls (views included: an upper bound on kernel launches, as some ops launch none)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def build(name: str) -> torch.nn.Module:
    return instantiate_from_config(OmegaConf.load(MODELS[name]).model)


def stage_runner(name: str, stage: str, batch: int, size: int, crop: Optional[int] = None) -> Callable[[int, Path], None]:
    """run(steps, work_dir): that many steps of the recipe's own stage function on a fresh model and random data of
    the stage's shapes (images `size` px, `crop` px crops when set), as scripts/train_tiny_base.py runs them."""
    cfg = {"batch_size": batch, "lr": 1e-4, "l2_weight": 1.0, "kl_weight": 1e-6, "warmup_steps": 1, "p_uncond": 0.1,
           "ema_decay": 0.99, "min_snr_gamma": 5.0, "crop": crop}
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (512, 3, size, size), dtype=torch.uint8, generator=g)
    scenes = [random_scene(scene_rng(0, i)) for i in range(512)]

    def run(steps: int, work_dir: Path) -> None:
        model = build(name)
        f, c = model.first_stage_model.downsampling_factor, model.channels
        stage_cfg = OmegaConf.create({**cfg, "steps": steps, "checkpoint_every": max(steps, 1)})
        moments = torch.cat([torch.randn(512, c, size // f, size // f, generator=g),
                             torch.full((512, c, size // f, size // f), -6.0)], 1)
        if stage == "vae":
            train_vae(model.first_stage_model, images, stage_cfg, work_dir, 0)
        elif stage == "decoder":
            finetune_decoder(model.first_stage_model, images, moments, stage_cfg, work_dir, 0)
        else:
            train_diffusion(model, moments, scenes, stage_cfg, work_dir, 0)
    return run


def cpu_seconds(fn: Callable[[], None]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def per_step(run: Callable[[int, Path], None], repeats: int) -> float:
    """CPU ms per step: (time of 1 + repeats steps - time of 1 step) / repeats, each from scratch (set-up cancels),
    after an untimed one-step run (first-call costs: allocations, kernel selection)."""
    with tempfile.TemporaryDirectory() as w, tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        run(1, Path(w))
        one = cpu_seconds(lambda: run(1, Path(a)))
        more = cpu_seconds(lambda: run(1 + repeats, Path(b)))
    return 1000 * (more - one) / repeats


def count(run: Callable[[int, Path], None]) -> Dict[str, float]:
    """FLOPs and aten ops of one step (a one-step run less a zero-step run: set-up and saving cancel)."""
    out = []
    for steps in (0, 1):
        with tempfile.TemporaryDirectory() as work, FlopCounterMode(display=False) as flops, OpCounter() as ops:
            run(steps, Path(work))
        out.append((flops.get_total_flops(), ops.count))
    return {"gflop": (out[1][0] - out[0][0]) / 1e9, "ops": out[1][1] - out[0][1]}


def run_steps(opt: argparse.Namespace) -> None:
    torch.set_num_threads(opt.threads)
    recipe = OmegaConf.load(opt.recipe)
    name = next(k for k, v in MODELS.items() if v.name == Path(recipe.model_config).name)
    size, stages = recipe.data.size, [s for s in ("vae", "decoder", "diffusion") if recipe.get(s)]
    print(f"{opt.recipe}: model {name}; torch {torch.__version__}, {opt.threads} thread(s), process CPU time; the "
          f"recipe's stage functions; host floor: batch 1, 8x8 latents (arithmetic small: dispatch and Python "
          f"dominate)\n")
    print("| stage | batch | crop | CPU ms/step | GFLOP/step | aten ops/step | host floor ms/step | steps | CPU min |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    total = 0.0
    for stage in stages:
        cfg = recipe[stage]
        run = stage_runner(name, stage, cfg.batch_size, size, cfg.get("crop"))
        c = count(run)
        f = 4 if "f4" in name else 8
        floor = per_step(stage_runner(name, stage, 1, 8 * f), 5)  # 8x8 latents: the least the UNet takes
        ms = per_step(run, opt.repeats)
        total += ms * cfg.steps / 60000
        print(f"| {stage} | {cfg.batch_size} | {cfg.get('crop') or '-'} | {ms:.0f} | {c['gflop']:.1f} | {c['ops']} | "
              f"{floor:.1f} | {cfg.steps} | {ms * cfg.steps / 60000:.1f} |", flush=True)
    vae = build(name).first_stage_model.eval()
    x = torch.rand(64, 3, size, size) * 2 - 1
    with torch.no_grad():
        encode_ms = 1000 * cpu_seconds(lambda: vae.encode(x)) / 64
    start = time.process_time()
    for i in range(200):
        render_uint8(random_scene(scene_rng(0, i), recipe.data.get("world", "base")), size)
    render_ms = 1000 * (time.process_time() - start) / 200
    n = recipe.data.num_images
    codec = min(n, recipe.decoder.steps * recipe.decoder.batch_size) if recipe.get("decoder") else 0
    extra = (2 * n * render_ms + (n + codec) * encode_ms) / 60000
    tokenizer = build(name).cond_stage_model.tokenizer
    rng = random.Random(0)
    scenes = [random_scene(scene_rng(0, i)) for i in range(recipe.diffusion.batch_size)]
    text_ms = 1000 * statistics.median(cpu_seconds(lambda: tokenizer([caption(s, rng) for s in scenes]))
                                       for _ in range(5))
    print(f"\ndraw one {size}x{size} scene: {render_ms:.2f} ms; encode one image: {encode_ms:.1f} ms; draw and tokenize "
          f"{recipe.diffusion.batch_size} captions: {text_ms:.1f} ms (in the diffusion step above)\n"
          f"drawing 2 x {n} scenes and encoding {n} + {codec} of them: {extra:.1f} CPU min\n"
          f"the recipe: {total + extra:.0f} CPU min = {(total + extra) / 60:.2f} h at {opt.threads} thread(s)")


def run_vae(opt: argparse.Namespace) -> None:
    torch.set_num_threads(opt.threads)
    images, _ = render_images(opt.images, 64, opt.seed, "probe")  # the recipe's vae.world
    cfg = OmegaConf.create({"steps": opt.steps, "batch_size": opt.batch, "lr": opt.lr, "kl_weight": 1e-6,
                            "l2_weight": 1.0})
    metric = TinyWorldMetric()
    rows = {}
    for name in MODELS:
        torch.manual_seed(opt.seed)
        vae = build(name).first_stage_model
        start = time.time()
        with tempfile.TemporaryDirectory() as work:
            train_vae(vae, images, cfg, Path(work), opt.seed)
        seconds = time.time() - start
        quality = autoencoder_quality(vae.eval(), metric, n=opt.eval_n)
        rows.setdefault("drawn images (no autoencoder)", quality["images"])
        rows[f"{name} reconstructions ({seconds:.0f} s to train)"] = quality["reconstructions"]
    keys = list(next(iter(rows.values())))
    print(f"\nstage 1 from scratch: {opt.images} probe-world images, {opt.steps} steps, batch {opt.batch}, "
          f"lr {opt.lr}, seed {opt.seed}; the probe on {opt.eval_n} held-out base-world scenes and 48 unseen subject "
          f"images; torch {torch.__version__}, {opt.threads} threads\n")
    print("| images read by the probe | " + " | ".join(keys) + " |")
    print("| --- |" + " --- |" * len(keys))
    for label, row in rows.items():
        print(f"| {label} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("steps", help="per-stage step costs and the recipe's arithmetic")
    s.add_argument("--recipe", default=str(REPO / "configs/tiny-world/train-base-v3.yaml"), help="training recipe")
    s.add_argument("--repeats", type=int, default=2, help="timed steps per stage")
    s.add_argument("--threads", type=int, default=1, help="torch threads")
    v = sub.add_parser("vae", help="f = 4 vs f = 8 autoencoder after the same training")
    v.add_argument("--steps", type=int, default=400)
    v.add_argument("--batch", type=int, default=16)
    v.add_argument("--lr", type=float, default=1e-3)
    v.add_argument("--images", type=int, default=4000)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--eval_n", type=int, default=300)
    v.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    opt = parse_args(argv)
    run_steps(opt) if opt.what == "steps" else run_vae(opt)


if __name__ == "__main__":
    sys.exit(main())
