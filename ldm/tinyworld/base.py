"""Training the tiny base model from scratch on the synthetic world: autoencoder, then UNet + text encoder.

Stage 1 fits the KL autoencoder on pixels (L1 + L2 + a tiny KL, as a stand-in for SD's perceptual/GAN loss, which
simple flat shapes do not need). Stage 2 caches the posterior moments of every image and sets `scale_factor` to
1 / std of the latents (SD v1's 0.18215 was found the same way). Stage 3 (optional) trains the decoder alone on
those latents for sharper images. Stage 4 trains the UNet and the text encoder together on sampled latents with the
SD v1 eps loss (optionally min-SNR-gamma weighted), dropping captions with probability p_uncond so classifier-free
guidance works, and keeps an EMA of both; the EMA weights are what ships.

Every stage checkpoints atomically every few minutes of wall clock (with its random generators, so a resumed stage
draws what an uninterrupted one would) and a killed run resumes where it stopped, losing minutes at most. A sitting
can be bounded (`stop_after` minutes: the run saves and stops, and the same command continues it later). The rendered
images are kept in the work dir, and the autoencoder's weights are written there as a small product of their own
(`autoencoder.safetensors`) once stages 1-3 are done, so a later run (`init`) can start from them.
"""
import logging
import math
import multiprocessing
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm.auto import tqdm

from ldm.checkpoint import atomic_write, load_into, save_state_dict
from ldm.config import load_yaml_config
from ldm.data.synthetic import Scene, caption, random_scene, render, scene_rng
from ldm.modules.diffusers_folder import read_base_weights
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.tinyworld.base_config import check_base_config
from ldm.util.instantiate import instantiate_from_config

log = logging.getLogger(__name__)


def _render_range(world: str, seed: int, size: int, start: int, stop: int) -> Tuple[np.ndarray, List[Scene]]:
    """Scenes start..stop-1 of `world` and their images as one (n, size, size, 3) uint8 array."""
    scenes = [random_scene(scene_rng(seed, i), world) for i in range(start, stop)]
    return np.stack([np.asarray(render(s, size)) for s in scenes]), scenes


def render_images(num: int, size: int, seed: int, world: str = "base",
                  workers: Optional[int] = None) -> Tuple[torch.Tensor, List[Scene]]:
    """`num` scenes of `world` and their images as one (num, 3, size, size) uint8 tensor.

    Drawing a scene takes about 7 ms of Python, so 10,000 of them take over a minute on one core: `workers`
    processes draw chunks of them (default: one per core, at most 16, for 2,000 scenes or more on 4 or more cores;
    each process pays a few seconds to import torch, which does not pay off on 2 busy cores). Scene i depends only on
    (seed, i), so the result is the same for any number of workers.
    """
    cores = len(os.sched_getaffinity(0))
    workers = workers or (min(cores, 16) if num >= 2000 and cores >= 4 else 1)
    chunks = min(max(4 * workers, 20), num)  # chunks, not scenes, cross between processes; 20 for a progress bar
    jobs = [(world, seed, size, num * k // chunks, num * (k + 1) // chunks) for k in range(chunks)]
    with ExitStack() as stack:
        # spawned workers: no forked copy of a parent that may hold CUDA or OpenMP state
        pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
                                   ) if workers > 1 else None
        parts = list(tqdm((pool.map if pool else map)(_render_range, *zip(*jobs)), total=len(jobs),
                          desc=f"render {world} scenes", unit="chunk", mininterval=2))
    images = torch.from_numpy(np.concatenate([a for a, _ in parts])).permute(0, 3, 1, 2).contiguous()
    return images, [scene for _, chunk in parts for scene in chunk]


def cached_images(work_dir: Path, num: int, size: int, seed: int, world: str) -> Tuple[torch.Tensor, List[Scene]]:
    """`render_images`, kept in work_dir so a resumed run does not draw them again (the scenes are cheap to redraw:
    no pixels)."""
    path = Path(work_dir) / f"images-{world}-seed{seed}-{num}x{size}px.pt"
    if path.is_file():
        images = torch.load(path, map_location="cpu", weights_only=True)
        return images, [random_scene(scene_rng(seed, i), world) for i in range(num)]
    images, scenes = render_images(num, size, seed, world)
    atomic_write(path, lambda tmp: torch.save(images, tmp))
    return images, scenes


class Paused(Exception):
    """The sitting's time is up: everything is saved and the same command continues the run."""


class Sitting:
    """When a stage saves (every `checkpoint_minutes` of wall clock, so a kill loses minutes) and when the run stops
    (`stop_after` minutes after it started; None: when it is done)."""

    def __init__(self, checkpoint_minutes: float = 5.0, stop_after: Optional[float] = None):
        self.every = 60 * checkpoint_minutes
        self.deadline = time.monotonic() + 60 * stop_after if stop_after else None
        self.last_save = time.monotonic()

    def over(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def save_due(self) -> bool:
        if time.monotonic() - self.last_save < self.every and not self.over():
            return False
        self.last_save = time.monotonic()
        return True

    def check(self, stage: str, step: int, total: int) -> None:
        """Raise Paused (after the caller has saved) when the sitting's time is up."""
        if self.over():
            raise Paused(f"stopped after the sitting's time at step {step} of {total} of stage {stage}; everything "
                         f"is saved: run the same command again to continue")


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: linear warmup, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class StageState:
    """Resumable state of one stage in `work_dir/<name>.pt` (plain tensors and numbers: loads weights_only), with
    torch's global generator (noise and timesteps are drawn from it), so a resumed run draws what an uninterrupted
    one would."""

    def __init__(self, work_dir: Path, name: str):
        self.path = Path(work_dir) / f"{name}.pt"

    def load(self) -> Dict:
        if not self.path.is_file():
            return {}
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return state

    def save(self, state: Dict) -> None:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        state = {**state, "torch_rng": torch.get_rng_state(), "cuda_rng": cuda}
        atomic_write(self.path, lambda tmp: torch.save(state, tmp))


def _pixels(images: torch.Tensor, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    return images[idx].to(device).float() / 127.5 - 1


def fit_stage(name: str, desc: str, net: torch.nn.Module, cfg: DictConfig, work_dir: Path, seed: int, warmup: int,
              batch_loss: Callable[[torch.Generator], torch.Tensor], sitting: Sitting) -> None:
    """Train `net` for cfg.steps AdamW steps of `batch_loss(generator)`, resumable from work_dir/<name>.pt (weights,
    optimiser and generator); a finished stage just loads its weights."""
    stage = StageState(work_dir, name)
    state = stage.load()
    if state.get("done"):
        net.load_state_dict(state["model"])
        return
    net.requires_grad_(True).train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
    start = state.get("step", 0)
    g = torch.Generator().manual_seed(seed + start)
    if state:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if "generator" in state:  # older state files: reseeded as before
            g.set_state(state["generator"])
    bar = tqdm(range(start, cfg.steps), desc=desc, initial=start, total=cfg.steps)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * warmup_cosine(step, cfg.steps, warmup)
        loss = batch_loss(g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step + 1 == cfg.steps:  # .item() waits for the GPU: not every step
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step + 1 < cfg.steps and sitting.save_due():
            stage.save({"model": net.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                        "generator": g.get_state()})
            sitting.check(name, step + 1, cfg.steps)
    net.requires_grad_(False).eval()
    stage.save({"model": net.state_dict(), "done": True})


def random_crops(x: torch.Tensor, crop: Optional[int], g: torch.Generator, align: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """A random `crop` x `crop` window of each image in x (offsets multiples of `align`), and the offsets (b, 2) in
    units of `align`; x itself (offsets 0) when crop is None or the full size."""
    size = x.shape[-1]
    if not crop or crop >= size:
        return x, torch.zeros(len(x), 2, dtype=torch.long)
    offsets = torch.randint((size - crop) // align + 1, (len(x), 2), generator=g)
    starts = (offsets * align).tolist()
    return torch.stack([img[:, y:y + crop, x0:x0 + crop] for img, (y, x0) in zip(x, starts)]), offsets


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, l2_weight: float) -> torch.Tensor:
    return (rec - x).abs().mean() + l2_weight * F.mse_loss(rec, x)


def train_vae(vae: torch.nn.Module, images: torch.Tensor, cfg: DictConfig, work_dir: Path, seed: int,
              sitting: Optional[Sitting] = None) -> None:
    """Stage 1: fit the autoencoder (random flips; random `cfg.crop` px crops when set, for a fully convolutional
    autoencoder: a quarter of the cost per image at half the side; the autoencoder never sees captions)."""
    device = next(vae.parameters()).device
    crop = cfg.get("crop")

    def batch_loss(g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(images), (cfg.batch_size,), generator=g)
        x = _pixels(random_crops(images[idx], crop, g)[0], torch.arange(len(idx)), device)
        x = torch.where(torch.rand(len(x), 1, 1, 1, generator=g).to(device) < 0.5, x.flip(-1), x)
        posterior = vae.encode(x)
        rec = vae.decode(posterior.sample())
        return reconstruction_loss(rec, x, cfg.l2_weight) + cfg.kl_weight * posterior.kl().mean()

    fit_stage("vae", "stage 1/4: autoencoder", vae, cfg, work_dir, seed, 100, batch_loss, sitting or Sitting())


@torch.no_grad()
def encode_moments(vae: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Stage 2: posterior moments (num, 2 * embed_dim, h, w) of every image, on the CPU."""
    device = next(vae.parameters()).device
    out = [vae.encode(_pixels(images, torch.arange(i, min(i + batch_size, len(images))), device)).parameters.cpu()
           for i in tqdm(range(0, len(images), batch_size), desc="stage 2/4: encode latents")]
    return torch.cat(out)


def finetune_decoder(vae: torch.nn.Module, images: torch.Tensor, moments: torch.Tensor, cfg: DictConfig,
                     work_dir: Path, seed: int, sitting: Optional[Sitting] = None) -> None:
    """Stage 3: more training for the decoder alone on the cached latents (as SD's ft-MSE VAE decoders were made).

    The encoder, and so the latents the UNet learns, stay fixed: this stage is independent of stage 4. With
    `cfg.crop`, the decoder sees matching crops of the latents and the images (offsets on the latent grid).
    """
    device = next(vae.parameters()).device
    decoder = torch.nn.ModuleDict({"post_quant_conv": vae.post_quant_conv, "decoder": vae.decoder})
    f = images.shape[-1] // moments.shape[-1]
    crop = cfg.get("crop")

    def batch_loss(g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(images), (cfg.batch_size,), generator=g)
        z = DiagonalGaussianDistribution(moments[idx]).sample(g)
        z, offsets = random_crops(z, crop // f if crop else None, g)
        x = images[idx]
        if crop and crop < x.shape[-1]:
            x = torch.stack([img[:, f * y:f * y + crop, f * x0:f * x0 + crop] for img, (y, x0) in zip(x, offsets.tolist())])
        return reconstruction_loss(vae.decode(z.to(device)), _pixels(x, torch.arange(len(x)), device), cfg.l2_weight)

    fit_stage("decoder", "stage 3/4: decoder", decoder, cfg, work_dir, seed + 1, 50, batch_loss, sitting or Sitting())


def latent_scale(moments: torch.Tensor, seed: int) -> float:
    """1 / std of sampled latents, so the UNet sees unit-variance inputs (SD v1's scale_factor)."""
    z = DiagonalGaussianDistribution(moments).sample(torch.Generator().manual_seed(seed))
    return float(1.0 / z.flatten().std())


def captions_for(scenes: List[Scene], idx: torch.Tensor, rng: random.Random, p_uncond: float,
                 world: str = "base") -> List[str]:
    """A fresh random caption per drawn scene; the empty prompt with probability p_uncond."""
    return ["" if rng.random() < p_uncond else caption(scenes[i], rng, world=world) for i in idx.tolist()]


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR(t), gamma) / SNR(t), SNR = alpha_bar / (1 - alpha_bar): min-SNR-gamma weights for eps-prediction
    (Hang et al. 2023). 1 where the noise is heavy (SNR <= gamma); the nearly clean timesteps, whose easy eps targets
    would otherwise pull the shared weights their way, count less."""
    alpha_bar = alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    return snr.clamp(max=gamma) / snr


def diffusion_loss(model: torch.nn.Module, z: torch.Tensor, cond: torch.Tensor,
                   min_snr_gamma: Optional[float] = None, offset_noise: Optional[float] = None) -> torch.Tensor:
    """The eps loss at uniformly drawn timesteps, drawn as `LatentDiffusion.forward` draws them (None, None: exactly
    its loss); with `min_snr_gamma`, each sample's loss weighted by `min_snr_weights`; with `offset_noise`, the noise
    gets a per-image, per-channel constant of that standard deviation (see `offset_noise`)."""
    t = torch.randint(0, model.num_timesteps, (z.shape[0],), device=z.device)
    per_sample, loss = model.p_losses(z, cond, t, noisy(z, offset_noise) if offset_noise else None)
    if min_snr_gamma is None:
        return loss
    return (min_snr_weights(model.alphas_cumprod, t, min_snr_gamma) * per_sample).mean()


def noisy(z: torch.Tensor, offset: float) -> torch.Tensor:
    """Gaussian noise plus a constant per image and channel of std `offset` ("offset noise", Guttenberg 2023).

    SD v1's schedule leaves signal at its last timestep (sqrt(alpha_bar) = 0.068), and in a 16 x 16 latent the noise's
    mean has a std of only 1/16, so a model can read an image's mean colour (the background, in the tiny world) from
    the noisy latent itself, and at sampling time it reads it from the starting noise instead of the prompt: v3 without
    offset noise drew the prompted background in 9% of samples (chance 10%) while it drew shapes and colours in
    80-90%. A per-channel offset of std 0.3 makes that mean uninformative, so the prompt decides it."""
    return torch.randn_like(z) + offset * torch.randn(z.shape[0], z.shape[1], 1, 1, device=z.device, dtype=z.dtype)


@torch.no_grad()
def update_ema(ema: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * state for floating-point tensors (one foreach call: one GPU launch per
    chunk of tensors instead of one per tensor), a copy for the rest."""
    floats = [k for k, v in state.items() if v.is_floating_point()]
    torch._foreach_lerp_([ema[k] for k in floats], [state[k] for k in floats], 1 - decay)
    for k in state.keys() - set(floats):
        ema[k].copy_(state[k])


def train_diffusion(model: torch.nn.Module, moments: torch.Tensor, scenes: List[Scene], cfg: DictConfig,
                    work_dir: Path, seed: int, sitting: Optional[Sitting] = None, world: str = "base") -> None:
    """Stage 4: UNet + text encoder on cached latents, eps loss (min-SNR-gamma weighted when cfg.min_snr_gamma is
    set), caption dropout, EMA; loads the EMA at the end. Saves every cfg.checkpoint_every steps and whenever the
    sitting says so (weights, optimiser, EMA and both generators: a resumed run continues the same draws)."""
    sitting = sitting or Sitting()
    nets = torch.nn.ModuleDict({"model": model.model, "cond_stage_model": model.cond_stage_model})
    nets.requires_grad_(True)
    model.cond_stage_model.frozen = False  # FrozenCLIPEmbedder keeps itself in eval mode while frozen
    model.train()
    params = list(nets.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    ema = {k: v.detach().clone() for k, v in nets.state_dict().items()}
    stage = StageState(work_dir, "diffusion")
    state = stage.load()
    start = state.get("step", 0)
    g, rng = torch.Generator().manual_seed(seed + start), random.Random(seed + start)
    if state:
        nets.load_state_dict(state["nets"])
        opt.load_state_dict(state["opt"])
        ema = state["ema"]
        if "generator" in state:  # older state files: reseeded as before
            g.set_state(state["generator"])
            rng.setstate(_tuples(state["rng"]))
    device = model.betas.device
    bar = tqdm(range(start, cfg.steps), desc="stage 4/4: UNet + text encoder", initial=start, total=cfg.steps)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * warmup_cosine(step, cfg.steps, cfg.warmup_steps)
        idx = torch.randint(len(moments), (cfg.batch_size,), generator=g)
        z = model.scale_factor * DiagonalGaussianDistribution(moments[idx]).sample(g).to(device)
        cond = model.get_learned_conditioning(captions_for(scenes, idx, rng, cfg.p_uncond, world))
        loss = diffusion_loss(model, z, cond, cfg.get("min_snr_gamma"), cfg.get("offset_noise"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        # with ema_warmup, the decay grows as (1 + step) / (10 + step) up to ema_decay (CompVis' LitEma): early
        # averages do not keep the random initial weights
        decay = min(cfg.ema_decay, (1 + step) / (10 + step)) if cfg.get("ema_warmup") else cfg.ema_decay
        update_ema(ema, nets.state_dict(), decay)
        if step % 25 == 0 or step + 1 == cfg.steps:  # .item() waits for the GPU: not every step
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps or sitting.save_due():
            stage.save({"nets": nets.state_dict(), "opt": opt.state_dict(), "ema": ema, "step": step + 1,
                        "generator": g.get_state(), "rng": rng.getstate()})
            if step + 1 < cfg.steps:
                sitting.check("diffusion", step + 1, cfg.steps)
    nets.load_state_dict(ema)
    nets.requires_grad_(False)
    model.cond_stage_model.freeze()
    model.eval()


def _tuples(value):
    """random.Random.getstate() after a torch.save round trip (lists back to tuples)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def load_base_weights(model: torch.nn.Module, path: str) -> bool:
    """Start from a trained base model (the shipped fp16 file included) or a part of one (the autoencoder product of
    an earlier run); its keys must be this config's. Returns whether it held the latent scale."""
    if not Path(path).exists():
        raise FileNotFoundError(f"init: no base model file at {path}: train one with configs/tiny-world/train-base.yaml "
                                f"or set init to the shipped models/ldm/tiny-sd-v1/model.safetensors")
    state = {k: v.float() if v.is_floating_point() else v for k, v in read_base_weights(path).items()}
    load_into(model, state, f"init {path}", optional=lambda k: True)
    fresh = [part for part in NETS if not any(k.startswith(part) for k in state)]
    log.info("continuing from %s%s", path, f" ({', '.join(fresh)} not in it: as they are)" if fresh else "")
    return "scale_factor" in state


NETS = ("model.", "first_stage_model.", "cond_stage_model.")


def shipped_state_dict(model: torch.nn.Module, parts: Sequence[str] = NETS) -> Dict[str, torch.Tensor]:
    """The SD v1 key layout (only the networks in `parts`, with the latent scale; all: the whole model, schedule
    buffers too); network weights in fp16 (half the file), buffers and scale in fp32."""
    state = model.state_dict()
    keep = [k for k in state if k.startswith(tuple(parts)) or set(parts) == set(NETS) or k == "scale_factor"]
    return {k: state[k].half() if k.startswith(NETS) and state[k].is_floating_point() else state[k] for k in keep}


def cached(path: Path, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A tensor kept in `path` (made once, written atomically)."""
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    value = make()
    atomic_write(path, lambda tmp: torch.save(value, tmp))
    return value


def init_files(config: DictConfig) -> List[str]:
    init = config.get("init")
    return [] if not init else [init] if isinstance(init, str) else list(init)


def train_base(config: DictConfig, device: torch.device, stop_after: Optional[float] = None) -> Path:
    """All four stages; writes the shipped safetensors file (a new file: `out` must not exist) and returns its
    path, or raises `Paused` when the sitting of `stop_after` minutes ends first. The config is checked first
    (`ldm.tinyworld.base_config`)."""
    check_base_config(config)
    torch.manual_seed(config.seed)
    work_dir = Path(config.work_dir)
    sitting = Sitting(config.get("checkpoint_minutes") or 5.0, stop_after)
    model = instantiate_from_config(load_yaml_config(config.model_config).model).to(device)
    scale_from_init = any([load_base_weights(model, path) for path in init_files(config)])
    world = config.data.get("world", "base")
    images, scenes = cached_images(work_dir, config.data.num_images, config.data.size, config.seed, world)
    # The autoencoder is a generic codec: `vae.world: probe` trains it on the wider world (checkered fills,
    # outlines) that the diffusion model never sees, so a new subject can still be drawn.
    vae_world = config.vae.get("world", world)
    vae_images = images if vae_world == world else cached_images(work_dir, len(images), config.data.size,
                                                                 config.seed + 1, vae_world)[0]
    vae = model.first_stage_model
    train_vae(vae, vae_images, config.vae, work_dir, config.seed, sitting)
    moments = cached(work_dir / f"moments-{world}.pt", lambda: encode_moments(vae, images))
    if not scale_from_init:  # a continued UNet keeps the latent scale it was trained with
        model.scale_factor.fill_(latent_scale(moments, config.seed))
    log.info("latent scale_factor %.5f", model.scale_factor.item())
    if config.get("decoder"):
        if vae_images is not images:  # latents of as many of the codec's images as stage 3 can draw, not more
            vae_images = vae_images[:min(len(vae_images), config.decoder.steps * config.decoder.batch_size)]
        codec_moments = moments if vae_images is images else cached(
            work_dir / f"moments-{vae_world}-{len(vae_images)}.pt", lambda: encode_moments(vae, vae_images))
        finetune_decoder(vae, vae_images, codec_moments, config.decoder, work_dir, config.seed, sitting)
    product = work_dir / "autoencoder.safetensors"
    if not product.exists():  # stages 1-3 done: their product, small enough to keep (init: [it] starts from it)
        save_state_dict(shipped_state_dict(model, ["first_stage_model."]), str(product), metadata=_metadata(config))
        log.info("wrote the autoencoder (and latent scale) to %s", product)
    train_diffusion(model, moments, scenes, config.diffusion, work_dir, config.seed, sitting, world)
    out = Path(config.out)
    save_state_dict(shipped_state_dict(model), str(out), metadata=_metadata(config))
    log.info("wrote %s", out)
    return out


def _metadata(config: DictConfig) -> Dict[str, str]:
    """What a model file says of itself: the config to build it with and the world it was trained on."""
    return {"format": "pt", "config": str(config.model_config), "world": config.data.get("world", "base")}
