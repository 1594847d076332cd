"""The sampler base: the loop over a step grid, classifier-free guidance, img2img, and what a sampler can do.

A sampler says what it can do in class attributes (`ETA`, `STOCHASTIC`, `IMG2IMG`, `max_steps`, its `ALIASES` and
the CompVis `SHORTHAND` flag); everything else (the registry, `text_to_image`, sample.py, the plan) asks the class.
A subclass gives its time grid (`timesteps`) and its update (`_step`), and may override the noise estimate (`_eps`,
e.g. a multistep combination) and `_sigmas` (fresh noise per step).
"""
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.guidance import guided_eps

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
        raise TypeError(f"sample() got unexpected keyword argument(s) {unknown}: see Sampler.sample for the "
                        f"supported ones (guidance is `unconditional_guidance_scale`)")
    for key, value in kwargs.items():
        if value is not COMPVIS_ONLY_KWARGS[key] and value != COMPVIS_ONLY_KWARGS[key]:
            warnings.warn(f"sample(): `{key}` of the original CompVis sampler is not supported here and is ignored",
                          stacklevel=3)


class Sampler:
    """A sampler over a LatentDiffusion (anything with `apply_model`, `alphas_cumprod`, `num_timesteps`, `betas`)."""

    TITLE = "sampler"  # its name in messages and progress bars
    ETA = False  # takes DDIM's eta: eta > 0 adds fresh noise at each step
    STOCHASTIC = False  # draws fresh noise at every step whatever eta (an ancestral sampler)
    IMG2IMG = False  # offered for img2img (noise an init latent to a step, denoise from there)
    ALIASES: Tuple[str, ...] = ()  # other names the registry accepts for it
    SHORTHAND: Optional[str] = None  # the sample.py flag (CompVis txt2img.py's) that picks it, e.g. "--plms"

    def __init__(self, model):
        self.model = model

    @classmethod
    def max_steps(cls, num_timesteps: int) -> int:
        """The most steps it can take on a model of `num_timesteps` training timesteps (the fewest is 1)."""
        return num_timesteps

    @classmethod
    def without_eta(cls) -> str:
        """Why eta must be 0 for it (only asked when ETA is False)."""
        return "draws fresh noise at every step and takes no eta" if cls.STOCHASTIC else "is deterministic"

    # ---- what a subclass gives --------------------------------------------------------------------------------------
    def timesteps(self, num_steps: int) -> np.ndarray:
        """The DDPM timesteps the model is evaluated at, ascending; each step lands on the one below (or t=0)."""
        raise NotImplementedError(f"{type(self).__name__} gives no time grid: define timesteps()")

    def _step(self, x: torch.Tensor, e_t: torch.Tensor, index: int, generator: Optional[torch.Generator]
              ) -> Tuple[torch.Tensor, torch.Tensor]:
        """x at the next timestep and the predicted x_0, from x at grid step `index` and its noise estimate."""
        raise NotImplementedError(f"{type(self).__name__} gives no update: define _step()")

    def _eps(self, x, t, c, uc, scale, index, generator):
        """The noise estimate the update uses: the guided one (a multistep sampler combines several)."""
        return guided_eps(self.model, x, t, c, uc, scale)

    def _sigmas(self, alphas: torch.Tensor, alphas_prev: torch.Tensor, eta: float) -> torch.Tensor:
        """Standard deviation of the fresh noise each step adds (fp64): none here."""
        return torch.zeros_like(alphas)

    def _reset(self) -> None:
        """Clear per-run state (a multistep sampler keeps its past estimates)."""

    # ---- the schedule and the loop ----------------------------------------------------------------------------------
    def make_schedule(self, ddim_num_steps: int, ddim_eta: float = 0.0) -> None:
        """alpha_t, alpha_prev and sigma_t at the grid's timesteps (fp64 math, stored in fp32; CompVis' names)."""
        most = self.max_steps(self.model.num_timesteps)
        if not 0 < ddim_num_steps <= most:
            raise ValueError(f"number of sampling steps must be in 1..{most} ({self.TITLE} on "
                             f"{self.model.num_timesteps} training timesteps), got {ddim_num_steps}")
        if ddim_eta != 0 and not self.ETA:
            raise ValueError(f"{self.TITLE} {self.without_eta()}: ddim_eta must be 0")
        ac = self.model.alphas_cumprod.double().cpu()
        ts = self.timesteps(ddim_num_steps)
        alphas = ac[ts]
        alphas_prev = torch.cat([ac[:1], ac[ts[:-1]]])
        sigmas = self._sigmas(alphas, alphas_prev, ddim_eta)
        self.ddim_timesteps = ts
        self.ddim_alphas, self.ddim_alphas_prev, self.ddim_sigmas = alphas.float(), alphas_prev.float(), sigmas.float()

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: Sequence[int], conditioning: torch.Tensor,
               unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Optional[torch.Tensor] = None,
               eta: float = 0.0, x_T: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
               verbose: bool = True, callback: Optional[Callable] = None, **compvis_kwargs: Any
               ) -> Tuple[torch.Tensor, dict]:
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
        for i, index in enumerate(tqdm(steps, desc=f"{self.TITLE} sampling", disable=not verbose)):
            t = torch.full((x.shape[0],), int(self.ddim_timesteps[index]), device=x.device, dtype=torch.long)
            e_t = self._eps(x, t, c, uc, scale, index, generator)
            x, pred_x0 = self._step(x, e_t, index, generator)
            intermediates.append(pred_x0)
            if callback is not None:
                callback(i, x, pred_x0)
        return x, {"pred_x0": intermediates}

    # ---- img2img (offered where IMG2IMG says so) --------------------------------------------------------------------
    @torch.no_grad()
    def stochastic_encode(self, x0: torch.Tensor, t_enc: int, generator: Optional[torch.Generator] = None,
                          noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Noise x0 to grid step t_enc (img2img) with `noise` (default: drawn from `generator`); call make_schedule
        first."""
        a = float(self.ddim_alphas[t_enc])
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return a ** 0.5 * x0 + (1 - a) ** 0.5 * noise

    @torch.no_grad()
    def decode(self, x_latent: torch.Tensor, cond: torch.Tensor, t_start: int, unconditional_guidance_scale=1.0,
               unconditional_conditioning=None, generator=None, verbose=True) -> torch.Tensor:
        """Denoise from grid step t_start - 1 down to 0 (img2img)."""
        x, _ = self._run(x_latent, cond, t_start, unconditional_guidance_scale, unconditional_conditioning,
                         generator, verbose, None)
        return x
