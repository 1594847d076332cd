"""Training the tiny base model from scratch on the synthetic world: autoencoder, then UNet + text encoder.

Stage 1 fits the KL autoencoder on pixels (L1 + L2 + a tiny KL, as a stand-in for SD's perceptual/GAN loss, which
simple flat shapes do not need). Stage 2 caches the posterior moments of every image and sets `scale_factor` to
1 / std of the latents (SD v1's 0.18215 was found the same way). Stage 3 (optional) trains the decoder alone on
those latents for sharper images. Stage 4 trains the UNet and the text encoder
together on sampled latents with the SD v1 eps loss, dropping captions with probability p_uncond so classifier-free
guidance works, and keeps an EMA of both; the EMA weights are what ships. Every stage checkpoints atomically and a
killed run resumes where it stopped.
"""
import logging
import math
import random
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ldm.checkpoint import atomic_write, load_into, save_state_dict
from ldm.data.synthetic import Scene, caption, random_scene, render_uint8, scene_rng
from ldm.modules.diffusers_folder import read_base_weights
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

log = logging.getLogger(__name__)


def render_images(num: int, size: int, seed: int, world: str = "base") -> Tuple[torch.Tensor, List[Scene]]:
    """`num` scenes of `world` and their images as one (num, 3, size, size) uint8 tensor."""
    images = torch.empty(num, 3, size, size, dtype=torch.uint8)
    scenes = []
    for i in tqdm(range(num), desc=f"render {world} scenes", unit="img", mininterval=2):
        scene = random_scene(scene_rng(seed, i), world)
        images[i] = render_uint8(scene, size)
        scenes.append(scene)
    return images, scenes


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: linear warmup, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class StageState:
    """Resumable state of one stage in `work_dir/<name>.pt` (plain tensors and numbers: loads weights_only)."""

    def __init__(self, work_dir: Path, name: str):
        self.path = Path(work_dir) / f"{name}.pt"

    def load(self) -> Dict:
        return torch.load(self.path, map_location="cpu", weights_only=True) if self.path.is_file() else {}

    def save(self, state: Dict) -> None:
        atomic_write(self.path, lambda tmp: torch.save(state, tmp))


def _pixels(images: torch.Tensor, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    return images[idx].to(device).float() / 127.5 - 1


def fit_stage(name: str, desc: str, net: torch.nn.Module, cfg: DictConfig, work_dir: Path, seed: int, warmup: int,
              batch_loss: Callable[[torch.Generator], torch.Tensor]) -> None:
    """Train `net` for cfg.steps AdamW steps of `batch_loss(generator)`, resumable from work_dir/<name>.pt; a finished
    stage just loads its weights."""
    stage = StageState(work_dir, name)
    state = stage.load()
    if state.get("done"):
        net.load_state_dict(state["model"])
        return
    net.requires_grad_(True).train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
    start = state.get("step", 0)
    if state:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    g = torch.Generator().manual_seed(seed + start)
    bar = tqdm(range(start, cfg.steps), desc=desc, initial=start, total=cfg.steps)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * warmup_cosine(step, cfg.steps, warmup)
        loss = batch_loss(g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % 250 == 0 and step + 1 < cfg.steps:
            stage.save({"model": net.state_dict(), "opt": opt.state_dict(), "step": step + 1})
    net.requires_grad_(False).eval()
    stage.save({"model": net.state_dict(), "done": True})


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, l2_weight: float) -> torch.Tensor:
    return (rec - x).abs().mean() + l2_weight * F.mse_loss(rec, x)


def train_vae(vae: torch.nn.Module, images: torch.Tensor, cfg: DictConfig, work_dir: Path, seed: int) -> None:
    """Stage 1: fit the autoencoder (random flips; the autoencoder never sees captions)."""
    device = next(vae.parameters()).device

    def batch_loss(g: torch.Generator) -> torch.Tensor:
        x = _pixels(images, torch.randint(len(images), (cfg.batch_size,), generator=g), device)
        x = torch.where(torch.rand(len(x), 1, 1, 1, generator=g).to(device) < 0.5, x.flip(-1), x)
        posterior = vae.encode(x)
        rec = vae.decode(posterior.sample())
        return reconstruction_loss(rec, x, cfg.l2_weight) + cfg.kl_weight * posterior.kl().mean()

    fit_stage("vae", "stage 1/4: autoencoder", vae, cfg, work_dir, seed, 100, batch_loss)


@torch.no_grad()
def encode_moments(vae: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Stage 2: posterior moments (num, 2 * embed_dim, h, w) of every image, on the CPU."""
    device = next(vae.parameters()).device
    out = [vae.encode(_pixels(images, torch.arange(i, min(i + batch_size, len(images))), device)).parameters.cpu()
           for i in tqdm(range(0, len(images), batch_size), desc="stage 2/4: encode latents")]
    return torch.cat(out)


def finetune_decoder(vae: torch.nn.Module, images: torch.Tensor, moments: torch.Tensor, cfg: DictConfig,
                     work_dir: Path, seed: int) -> None:
    """Stage 3: more training for the decoder alone on the cached latents (as SD's ft-MSE VAE decoders were made).

    The encoder, and so the latents the UNet learns, stay fixed: this stage is independent of stage 4.
    """
    device = next(vae.parameters()).device
    decoder = torch.nn.ModuleDict({"post_quant_conv": vae.post_quant_conv, "decoder": vae.decoder})

    def batch_loss(g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(images), (cfg.batch_size,), generator=g)
        z = DiagonalGaussianDistribution(moments[idx]).sample(g).to(device)
        return reconstruction_loss(vae.decode(z), _pixels(images, idx, device), cfg.l2_weight)

    fit_stage("decoder", "stage 3/4: decoder", decoder, cfg, work_dir, seed + 1, 50, batch_loss)


def latent_scale(moments: torch.Tensor, seed: int) -> float:
    """1 / std of sampled latents, so the UNet sees unit-variance inputs (SD v1's scale_factor)."""
    z = DiagonalGaussianDistribution(moments).sample(torch.Generator().manual_seed(seed))
    return float(1.0 / z.flatten().std())


def captions_for(scenes: List[Scene], idx: torch.Tensor, rng: random.Random, p_uncond: float) -> List[str]:
    """A fresh random caption per drawn scene; the empty prompt with probability p_uncond."""
    return ["" if rng.random() < p_uncond else caption(scenes[i], rng) for i in idx.tolist()]


def train_diffusion(model: torch.nn.Module, moments: torch.Tensor, scenes: List[Scene], cfg: DictConfig,
                    work_dir: Path, seed: int) -> None:
    """Stage 4: UNet + text encoder on cached latents, eps loss, caption dropout, EMA; loads the EMA at the end."""
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
    if state:
        nets.load_state_dict(state["nets"])
        opt.load_state_dict(state["opt"])
        ema = state["ema"]
    device = model.betas.device
    g, rng = torch.Generator().manual_seed(seed + start), random.Random(seed + start)
    bar = tqdm(range(start, cfg.steps), desc="stage 4/4: UNet + text encoder", initial=start, total=cfg.steps)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * warmup_cosine(step, cfg.steps, cfg.warmup_steps)
        idx = torch.randint(len(moments), (cfg.batch_size,), generator=g)
        z = model.scale_factor * DiagonalGaussianDistribution(moments[idx]).sample(g).to(device)
        cond = model.get_learned_conditioning(captions_for(scenes, idx, rng, cfg.p_uncond))
        _, loss = model(z, cond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for k, v in nets.state_dict().items():
                ema[k].lerp_(v, 1 - cfg.ema_decay) if v.is_floating_point() else ema[k].copy_(v)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            stage.save({"nets": nets.state_dict(), "opt": opt.state_dict(), "ema": ema, "step": step + 1})
    nets.load_state_dict(ema)
    nets.requires_grad_(False)
    model.cond_stage_model.freeze()
    model.eval()


def shipped_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The SD v1 key layout; network weights in fp16 (half the file), schedule buffers and scale in fp32."""
    nets = ("model.", "first_stage_model.", "cond_stage_model.")
    return {k: v.half() if k.startswith(nets) and v.is_floating_point() else v for k, v in model.state_dict().items()}


def load_base_weights(model: torch.nn.Module, path: str) -> None:
    """Start from a trained base model (the shipped fp16 file included); its layout must be this config's."""
    if not Path(path).exists():
        raise FileNotFoundError(f"init: no base model file at {path}: train one with configs/tiny-world/train-base.yaml "
                                f"or set init to the shipped models/ldm/tiny-sd-v1/model.safetensors")
    state = {k: v.float() if v.is_floating_point() else v for k, v in read_base_weights(path).items()}
    load_into(model, state, f"init {path}")
    log.info("continuing from %s", path)


def train_base(config: DictConfig, device: torch.device) -> Path:
    """All four stages; writes the shipped safetensors file and returns its path."""
    torch.manual_seed(config.seed)
    work_dir = Path(config.work_dir)
    model = instantiate_from_config(OmegaConf.load(config.model_config).model).to(device)
    if config.get("init"):  # continue training a base model: every stage starts from its weights
        load_base_weights(model, config.init)
    images, scenes = render_images(config.data.num_images, config.data.size, config.seed)
    # The autoencoder is a generic codec: `vae.world: probe` trains it on the wider world (checkered fills,
    # outlines) that the diffusion model never sees, so a new subject can still be drawn.
    vae_world = config.vae.get("world", "base")
    vae_images = images if vae_world == "base" else render_images(len(images), config.data.size, config.seed + 1,
                                                                  vae_world)[0]
    train_vae(model.first_stage_model, vae_images, config.vae, work_dir, config.seed)
    moments = encode_moments(model.first_stage_model, images)
    if not config.get("init"):  # a continued UNet keeps the latent scale it was trained with
        model.scale_factor.fill_(latent_scale(moments, config.seed))
    log.info("latent scale_factor %.5f", model.scale_factor.item())
    if config.get("decoder"):
        codec_moments = moments if vae_images is images else encode_moments(model.first_stage_model, vae_images)
        finetune_decoder(model.first_stage_model, vae_images, codec_moments, config.decoder, work_dir, config.seed)
    train_diffusion(model, moments, scenes, config.diffusion, work_dir, config.seed)
    out = Path(config.out)
    save_state_dict(shipped_state_dict(model), str(out), metadata={"format": "pt", "config": str(config.model_config)})
    log.info("wrote %s", out)
    return out
