"""LatentDiffusion: the SD v1 eps-prediction diffusion model over the latents of a frozen autoencoder.

Only what SD v1 uses (Rombach et al. 2022): no pixel-space parent class, no VQ, inpainting or layout paths.
"""
import inspect
import logging
from typing import Any, Dict, List, Optional, Tuple, Union

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.checkpoint import load_into
from ldm.modules.adapters import is_added_key
from ldm.modules.diffusers_folder import read_base_weights
from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule, schedule_buffers
from ldm.checks import ConfigError
from ldm.util.defaults import default
from ldm.util.instantiate import check_ranges, instantiate_from_config, nearest

log = logging.getLogger(__name__)


class DiffusionWrapper(nn.Module):
    """Holds the UNet as `diffusion_model`, which gives the checkpoint its `model.diffusion_model.` keys."""

    def __init__(self, diff_model_config: Dict, conditioning_key: str = "crossattn"):
        super().__init__()
        if conditioning_key != "crossattn":
            raise ValueError(f"conditioning_key '{conditioning_key}' is not supported: SD v1 uses 'crossattn'")
        self.diffusion_model = instantiate_from_config(diff_model_config)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.diffusion_model(x, t, context=context)


class LatentDiffusion(pl.LightningModule):
    """Text-conditioned latent diffusion with a frozen VAE (`first_stage_model`) and text encoder."""

    # Keys of the original configs that concern training code we do not carry (EMA, logging); accepted, unused.
    _IGNORED = ("num_timesteps_cond", "log_every_t", "monitor", "cond_stage_forward", "scheduler_config",
                "embedding_reg_weight", "cosine_s", "given_betas", "original_elbo_weight", "l_simple_weight",
                "learn_logvar", "logvar_init", "use_positional_encodings", "clip_denoised", "v_posterior")
    # numbers checked before anything is built (ldm.util.instantiate.check_ranges), from a config or the Python API
    PARAM_RANGES = {"timesteps": dict(low=1, integer=True), "linear_start": dict(low=0, high=1, low_open=True, high_open=True),
                    "linear_end": dict(low=0, high=1, low_open=True, high_open=True), "scale_factor": dict(low=0, low_open=True),
                    "image_size": dict(low=1, integer=True), "channels": dict(low=1, integer=True)}

    def __init__(self, unet_config: Dict, first_stage_config: Dict, cond_stage_config: Dict,
                 timesteps: int = 1000, beta_schedule: str = "linear", linear_start: float = 0.00085,
                 linear_end: float = 0.012, scale_factor: float = 0.18215, image_size: int = 64, channels: int = 4,
                 first_stage_key: str = "image", cond_stage_key: str = "caption",
                 conditioning_key: str = "crossattn", cond_stage_trainable: bool = False,
                 parameterization: str = "eps", loss_type: str = "l2", use_ema: bool = False,
                 scale_by_std: bool = False, ckpt_path: Optional[str] = None, **kwargs: Any):
        super().__init__()
        unknown = sorted(k for k in kwargs if k not in self._IGNORED)
        if unknown:  # a misspelt key would be silently unused
            known = [*inspect.signature(type(self).__init__).parameters, *inspect.signature(LatentDiffusion.__init__)
                     .parameters, *self._IGNORED]
            raise ConfigError(f"{type(self).__name__} has no parameter '{unknown[0]}'"
                              f"{nearest(unknown[0], [k for k in known if k not in ('self', 'args', 'kwargs')])}")
        check_ranges(LatentDiffusion, locals())
        if linear_end <= linear_start:
            raise ConfigError(f"linear_end ({linear_end}) must be above linear_start ({linear_start})")
        if parameterization != "eps" or loss_type != "l2" or use_ema or scale_by_std:
            raise ValueError("this LatentDiffusion implements SD v1 training as published: parameterization 'eps', "
                             "loss_type 'l2', use_ema false, scale_by_std false")
        self.image_size, self.channels = image_size, channels
        self.first_stage_key, self.cond_stage_key = first_stage_key, cond_stage_key
        self.cond_stage_trainable = cond_stage_trainable  # the original's name: encode captions inside the step
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.first_stage_model = self._frozen(instantiate_from_config(first_stage_config))
        self.cond_stage_model = self._frozen(instantiate_from_config(cond_stage_config))
        self.register_buffer("scale_factor", torch.tensor(scale_factor))
        self.register_schedule(beta_schedule, timesteps, linear_start, linear_end)
        if ckpt_path:
            self.init_from_ckpt(ckpt_path)

    @staticmethod
    def _frozen(model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad = False
        return model.eval()

    def train(self, mode: bool = True) -> "LatentDiffusion":
        """The autoencoder and text encoder stay in eval mode: they are never trained here."""
        super().train(mode)
        self.first_stage_model.eval()
        self.cond_stage_model.eval()
        return self

    def register_schedule(self, beta_schedule: str, timesteps: int, linear_start: float, linear_end: float) -> None:
        """Buffers of the forward process and its posterior, in fp32 as in the original checkpoints."""
        betas = make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end)
        self.num_timesteps = int(timesteps)
        for name, value in schedule_buffers(betas).items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32))

    def init_from_ckpt(self, path: str) -> None:
        """Load an original SD v1 checkpoint or a diffusers folder; keys of added modules (adapters) may be absent."""
        load_into(self, read_base_weights(path), source=f"checkpoint '{path}'", optional=is_added_key)
        log.info("loaded base weights from %s", path)

    @property
    def unet(self) -> nn.Module:
        return self.model.diffusion_model

    # ---- the latent space ---------------------------------------------------------------------------------------
    @property
    def downsampling_factor(self) -> int:
        """Pixels per latent cell along each side: the autoencoder's f (8 for SD v1)."""
        return self.first_stage_model.downsampling_factor

    @property
    def pixel_size(self) -> int:
        """Side in pixels of the images that the config's latent `image_size` decodes to (512 for SD v1)."""
        return self.image_size * self.downsampling_factor

    def latent_shape(self, height: int, width: int) -> Tuple[int, int, int]:
        """(channels, height / f, width / f): the latent of a height x width image (both multiples of f)."""
        f = self.downsampling_factor
        if height % f or width % f or height < f or width < f:
            raise ValueError(f"image height and width must be positive multiples of the autoencoder's "
                             f"downsampling factor {f}, got {height}x{width}")
        return self.channels, height // f, width // f

    # ---- the three networks -------------------------------------------------------------------------------------
    @torch.no_grad()
    def get_learned_conditioning(self, c: Union[str, List[str]]) -> torch.Tensor:
        """Text -> (b, 77, 768) context."""
        return self.cond_stage_model.encode(c)

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor):
        """Image in [-1, 1] (b, 3, H, W) -> the VAE's posterior over unscaled latents."""
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, posterior, sample: bool = True,
                                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Posterior -> scaled latent z (b, 4, H/f, W/f) that the UNet works on."""
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> image in [-1, 1] (not clamped)."""
        return self.first_stage_model.decode(z / self.scale_factor)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The UNet's noise prediction for x_t at timesteps t given the text context."""
        return self.model(x_noisy, t, context=cond)

    # ---- diffusion ----------------------------------------------------------------------------------------------
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0)."""
        noise = default(noise, lambda: torch.randn_like(x_start))
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_0 implied by x_t and a noise prediction."""
        return (extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise)

    def p_losses(self, x_start: torch.Tensor, cond: torch.Tensor, t: torch.Tensor,
                 noise: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-sample eps-prediction MSE (b,) and the mean over the batch."""
        noise = default(noise, lambda: torch.randn_like(x_start))
        eps = self.apply_model(self.q_sample(x_start, t, noise), t, cond)
        per_sample = F.mse_loss(eps.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
        return per_sample, per_sample.mean()

    def forward(self, z: torch.Tensor, cond: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Training loss on scaled latents z with uniformly drawn timesteps."""
        t = torch.randint(0, self.num_timesteps, (z.shape[0],), device=z.device, generator=generator)
        return self.p_losses(z, cond, t)
