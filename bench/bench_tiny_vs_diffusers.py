"""The tiny world, side by side with diffusers: DreamBooth steps per second and DDIM sampling, ours vs diffusers + PEFT.

Both sides hold the same weights: the shipped tiny SD v1 (models/ldm/tiny-sd-v1), converted to diffusers with
diffusers' own converters (bench/twins.py). Timing is interleaved (ABAB, then BABA) in one process after warmups.

dreambooth  one optimiser step on the demo's batch (4 subject + 4 class images, 64 px):
            ours   DreamBoothLatentDiffusion.shared_step with the demo's attn2o -> ffni adapter (mid_dim 64), AdamW,
                   the trainer's LR schedule; latents and text contexts cached (our default: the VAE and the text
                   encoder run once per image view and caption, here during the warmup steps)
            nocache  the same with cache_latents false
            theirs the loop of diffusers' examples/dreambooth/train_dreambooth_lora.py with its defaults: nothing
                   cached (VAE encode and text encoder every step), PEFT LoRA rank 4 on to_q/to_k/to_v/to_out.0,
                   DDPMScheduler.add_noise, instance + prior MSE, clip_grad_norm_ 1.0, AdamW 5e-4, LR scheduler step,
                   loss.item() for the log
            Data loading is outside the timed step on both sides (the same image tensors and captions each step).
sampling    25 DDIM steps, guidance 5, 64 px, batch 1 and 4, end to end (text encoder, sampler, VAE decode):
            ours   ldm.models.diffusion.sampling.text_to_image (the project's one text-to-image path, DDIM)
            theirs StableDiffusionPipeline with a DDIMScheduler set up as ours, from the same x_T (the images are
                   compared: they must agree)

    python bench/bench_tiny_vs_diffusers.py --threads 1 --clock cpu --repeats 9
"""
import argparse
import datetime
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from bench_unet import device_name, git_commit, time_interleaved
from ldm.models.diffusion.sampling import seeds_noise, text_to_image
from ldm.tinyworld.demo import DEMO_FRAGMENTS
from ldm.tinyworld.evaluate import BASE_CKPT, BASE_CONFIG, CLASS_PROMPT, SUBJECT_PROMPT, load_references
from ldm.util.instantiate import instantiate_from_config
from twins import diffusers_pipeline


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="dreambooth,sampling", help="comma-separated: dreambooth, sampling")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="DreamBooth: subject images per step (as many class images)")
    p.add_argument("--batches", default="1,4", help="sampling: images per call")
    p.add_argument("--steps", type=int, default=25, help="sampling: DDIM steps")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall time, or this process's CPU time (with --threads 1 on a busy machine: robust to load)")
    return p.parse_args(argv)


def demo_model(cache: bool = True) -> torch.nn.Module:
    """The demo's DreamBoothLatentDiffusion (tiny base weights, attn2o -> ffni adapter), in training mode."""
    config = OmegaConf.merge(*[OmegaConf.load(f) for f in (BASE_CONFIG, *DEMO_FRAGMENTS)])
    config.model.params.ckpt_path = str(BASE_CKPT)
    config.model.params.cache_latents = cache
    torch.manual_seed(0)
    model = instantiate_from_config(config.model)
    model.learning_rate = config.model.base_learning_rate
    return model.train()


def demo_batch(n: int) -> Dict[str, Dict]:
    """n subject images and n stand-in class images (the subject images again), as the data module yields them."""
    refs = load_references() * 2 - 1
    x = refs[torch.arange(n) % len(refs)]
    items = {}
    for part, caption in (("instance", SUBJECT_PROMPT), ("reg", CLASS_PROMPT)):
        items[part] = {"image": x.clone(), "caption": [caption] * n, "index": torch.arange(n),
                       "flipped": torch.zeros(n, dtype=torch.bool)}
    return items


def our_step(model: torch.nn.Module, batch: Dict) -> Callable[[], None]:
    """What Lightning does in one training step of ours: shared_step, the finite check, backward, AdamW, schedule."""
    config = model.configure_optimizers()
    optimizer, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    flips = torch.Generator().manual_seed(0)
    images = {k: part["image"] for k, part in batch.items()}

    def step():
        for k, part in batch.items():  # the dataset's random flips (flip_p 0.5): two cached views per image
            part["flipped"] = torch.rand(len(part["flipped"]), generator=flips) < 0.5
            part["image"] = torch.where(part["flipped"][:, None, None, None], images[k].flip(-1), images[k])
        loss, _ = model.shared_step(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError("non-finite loss")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return step


def their_step(pipe, batch: Dict, betas: torch.Tensor) -> Callable[[], None]:
    """The train_dreambooth_lora.py loop body with its defaults (see the module docstring)."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]))
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    schedule = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=500, num_training_steps=10_000)
    scheduler = DDPMScheduler(num_train_timesteps=len(betas), trained_betas=betas.numpy())
    pixel_values = torch.cat([batch["instance"]["image"], batch["reg"]["image"]])
    captions = batch["instance"]["caption"] + batch["reg"]["caption"]
    input_ids = pipe.tokenizer(captions, truncation=True, padding="max_length", max_length=77,
                               return_tensors="pt").input_ids  # their dataset tokenizes in __getitem__

    def step():
        latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
        eps = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
        noisy = scheduler.add_noise(latents, eps, t)
        context = text_encoder(input_ids, attention_mask=None, return_dict=False)[0]
        pred = unet(noisy, t, context, return_dict=False)[0]
        pred, pred_prior = pred.chunk(2)
        target, target_prior = eps.chunk(2)
        loss = F.mse_loss(pred.float(), target.float()) + F.mse_loss(pred_prior.float(), target_prior.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        loss.detach().item()
    return step


def dreambooth_rows(args) -> List[dict]:
    """ms per DreamBooth step: ours (cached), ours (no cache), diffusers + PEFT LoRA."""
    batch = demo_batch(args.batch)
    ours, nocache = demo_model(cache=True), demo_model(cache=False)
    pipe = diffusers_pipeline(demo_model(), OmegaConf.load(BASE_CONFIG).model)  # base weights only
    steps = {"ours": our_step(ours, batch), "ours, no cache": our_step(nocache, demo_batch(args.batch)),
             "diffusers + PEFT": their_step(pipe, batch, ours.betas.detach().double())}
    times = time_interleaved(steps, torch.device("cpu"), args.repeats, args.warmup, CLOCKS[args.clock])
    return summarise(f"DreamBooth step, batch {args.batch}+{args.batch}, 64 px", times, "diffusers + PEFT")


def sampling_rows(args) -> List[dict]:
    """s per call of 25-step DDIM sampling, ours vs StableDiffusionPipeline, from the same x_T."""
    model = instantiate_from_config(OmegaConf.load(BASE_CONFIG).model)
    model.init_from_ckpt(str(BASE_CKPT))
    model.eval()
    pipe = diffusers_pipeline(model, OmegaConf.load(BASE_CONFIG).model)
    rows = []
    for n in (int(b) for b in args.batches.split(",")):
        x_T = seeds_noise(range(n), model.latent_shape(64, 64))
        calls = {"ours": lambda: text_to_image(model, [SUBJECT_PROMPT] * n, x_T, steps=args.steps, scale=5.0),
                 "diffusers": lambda: pipe([SUBJECT_PROMPT] * n, num_inference_steps=args.steps, guidance_scale=5.0,
                                           height=64, width=64, latents=x_T.clone(), output_type="pt").images}
        ours = (calls["ours"]().clamp(-1, 1) + 1) / 2  # [-1, 1] -> [0, 1], as the pipeline's images
        diff = (ours - calls["diffusers"]()).abs().max().item()
        print(f"sampling batch {n}: max |ours - diffusers| = {diff:.2g} (images in [0, 1])", file=sys.stderr)
        times = time_interleaved(calls, torch.device("cpu"), args.repeats, args.warmup, CLOCKS[args.clock])
        rows += summarise(f"sampling {args.steps} DDIM steps, batch {n}, 64 px", times, "diffusers",
                          f"max image difference {diff:.1g}")
    return rows


def summarise(what: str, times: Dict[str, List[float]], reference: str, notes: str = "") -> List[dict]:
    """One row per variant: median ms and its speed relative to the reference (reference ms / ms)."""
    ref = statistics.median(times[reference])
    return [{"what": what, "variant": k, "ms": statistics.median(v), "speedup": ref / statistics.median(v),
             "spread": (min(v), max(v)), "notes": notes} for k, v in times.items()]


def main(argv: Optional[List[str]] = None) -> List[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import diffusers
    import peft
    print(f"{datetime.date.today()}; {device_name(torch.device('cpu'))}; commit {git_commit()}; torch "
          f"{torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}; {args.threads} thread(s); "
          f"{args.clock} clock; median of {args.repeats} after {args.warmup} warmups")
    print("| what | variant | ms | speed vs reference | min-max ms | load average | notes |")
    print("| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    rows = []
    for part, fn in (("dreambooth", dreambooth_rows), ("sampling", sampling_rows)):
        if part not in args.parts.split(","):
            continue
        load = os.getloadavg()[0]
        for r in fn(args):
            rows.append(r)
            print(f"| {r['what']} | {r['variant']} | {r['ms']:.1f} | **{r['speedup']:.2f}x** | "
                  f"{r['spread'][0]:.0f}-{r['spread'][1]:.0f} | {load:.1f}-{os.getloadavg()[0]:.1f} | {r['notes']} |",
                  flush=True)
    return rows


if __name__ == "__main__":
    main()
