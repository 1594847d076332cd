"""DDIM sampling (Song et al. 2021, "Denoising Diffusion Implicit Models"), with img2img encode/decode."""
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.guidance import guided_eps


def make_ddim_timesteps(num_ddim_steps: int, num_ddpm_steps: int) -> np.ndarray:
    """`num_ddim_steps` uniformly spaced DDPM timesteps, shifted by one as in the original (the first is t=1).

    Equal to the original for step counts that divide the DDPM steps (and to diffusers' "leading" spacing with
    steps_offset 1 for any count); the original's range() gave one step too many, past the schedule, for others.
    """
    if not 0 < num_ddim_steps <= num_ddpm_steps:
        raise ValueError(f"number of sampling steps must be in 1..{num_ddpm_steps}, got {num_ddim_steps}")
    c = num_ddpm_steps // num_ddim_steps
    ts = np.arange(num_ddim_steps) * c
    return ts + 1 if ts[-1] + 1 < num_ddpm_steps else ts  # every DDPM step (c = 1): 0..999, not past the end


# Keyword arguments of the original CompVis `DDIMSampler.sample` that this sampler does not implement, with the
# values that mean "off": scripts written for the original still run, and a value that would change the result warns.
COMPVIS_ONLY_KWARGS: Dict[str, Any] = {
    "normals_sequence": None, "img_callback": None, "quantize_x0": False, "mask": None, "x0": None, "temperature": 1.0,
    "noise_dropout": 0.0, "score_corrector": None, "corrector_kwargs": None, "log_every_t": 100,
    "dynamic_threshold": None, "ucg_schedule": None,
}


def check_compvis_kwargs(kwargs: Dict[str, Any]) -> None:
    """Reject unknown sampler arguments; warn about original-only ones set to a value this sampler would ignore."""
    unknown = sorted(k for k in kwargs if k not in COMPVIS_ONLY_KWARGS)
    if unknown:
        raise TypeError(f"sample() got unexpected keyword argument(s) {unknown}: see DDIMSampler.sample for the "
                        f"supported ones (guidance is `unconditional_guidance_scale`)")
    for key, value in kwargs.items():
        if value is not COMPVIS_ONLY_KWARGS[key] and value != COMPVIS_ONLY_KWARGS[key]:
            warnings.warn(f"sample(): `{key}` of the original CompVis sampler is not supported here and is ignored",
                          stacklevel=3)


class DDIMSampler:
    """DDIM with classifier-free guidance; `PLMSSampler` reuses everything but the noise estimate."""

    def __init__(self, model):
        self.model = model

    def make_schedule(self, ddim_num_steps: int, ddim_eta: float = 0.0) -> None:
        """alpha_t, alpha_prev and sigma_t at the selected timesteps (fp64 math, stored in fp32)."""
        ac = self.model.alphas_cumprod.double().cpu()
        ts = self.timesteps(ddim_num_steps)
        alphas = ac[ts]
        alphas_prev = torch.cat([ac[:1], ac[ts[:-1]]])
        sigmas = ddim_eta * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
        self.ddim_timesteps = ts
        self.ddim_alphas, self.ddim_alphas_prev, self.ddim_sigmas = alphas.float(), alphas_prev.float(), sigmas.float()

    def timesteps(self, num_steps: int) -> np.ndarray:
        """The DDPM timesteps the model is evaluated at, ascending; each step lands on the one below (or t=0)."""
        return make_ddim_timesteps(num_steps, self.model.num_timesteps)

    def _step(self, x: torch.Tensor, e_t: torch.Tensor, index: int, generator: Optional[torch.Generator]
              ) -> Tuple[torch.Tensor, torch.Tensor]:
        """x_{t-1} and the predicted x_0 from x_t and a noise estimate (DDIM eq. 12)."""
        a_t, a_prev, sigma = (float(v[index]) for v in (self.ddim_alphas, self.ddim_alphas_prev, self.ddim_sigmas))
        pred_x0 = (x - (1 - a_t) ** 0.5 * e_t) / a_t ** 0.5
        dir_xt = (1.0 - a_prev - sigma ** 2) ** 0.5 * e_t
        x_prev = a_prev ** 0.5 * pred_x0 + dir_xt
        if sigma > 0:
            x_prev = x_prev + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x_prev, pred_x0

    def _eps(self, x, t, c, uc, scale, index, generator):
        return guided_eps(self.model, x, t, c, uc, scale)

    def _reset(self) -> None:
        """Clear per-run state (PLMS keeps its past noise estimates)."""

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: Sequence[int], conditioning: torch.Tensor,
               unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Optional[torch.Tensor] = None,
               eta: float = 0.0, x_T: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
               verbose: bool = True, callback: Optional[Callable] = None, **compvis_kwargs: Any) -> Tuple[torch.Tensor, dict]:
        """Sample latents (batch_size, *shape) in S steps; returns (samples, {"pred_x0": [...]}).

        Arguments only the original CompVis sampler has (`COMPVIS_ONLY_KWARGS`) are accepted and ignored, with a
        warning when set to anything but their default; any other unknown argument is an error.
        """
        check_compvis_kwargs(compvis_kwargs)
        self.make_schedule(S, eta)
        device = self.model.betas.device
        x = x_T if x_T is not None else torch.randn((batch_size, *shape), generator=generator, device=device)
        return self._run(x, conditioning, len(self.ddim_timesteps), unconditional_guidance_scale,
                         unconditional_conditioning, generator, verbose, callback)

    def _run(self, x, c, n_steps, scale, uc, generator, verbose, callback):
        self._reset()
        intermediates: List[torch.Tensor] = []
        steps = list(reversed(range(n_steps)))
        for i, index in enumerate(tqdm(steps, desc=f"{type(self).__name__[:-7]} sampling", disable=not verbose)):
            t = torch.full((x.shape[0],), int(self.ddim_timesteps[index]), device=x.device, dtype=torch.long)
            e_t = self._eps(x, t, c, uc, scale, index, generator)
            x, pred_x0 = self._step(x, e_t, index, generator)
            intermediates.append(pred_x0)
            if callback is not None:
                callback(i, x, pred_x0)
        return x, {"pred_x0": intermediates}

    @torch.no_grad()
    def stochastic_encode(self, x0: torch.Tensor, t_enc: int, generator: Optional[torch.Generator] = None,
                          noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Noise x0 to the DDIM step t_enc (img2img) with `noise` (default: drawn from `generator`); call
        make_schedule first."""
        a = float(self.ddim_alphas[t_enc])
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return a ** 0.5 * x0 + (1 - a) ** 0.5 * noise

    @torch.no_grad()
    def decode(self, x_latent: torch.Tensor, cond: torch.Tensor, t_start: int, unconditional_guidance_scale=1.0,
               unconditional_conditioning=None, generator=None, verbose=True) -> torch.Tensor:
        """Denoise from DDIM step t_start - 1 down to 0 (img2img)."""
        x, _ = self._run(x_latent, cond, t_start, unconditional_guidance_scale, unconditional_conditioning,
                         generator, verbose, None)
        return x
