"""PLMS sampling (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds")."""
from typing import Optional, Tuple

import numpy as np
import torch

from ldm.models.diffusion.ddim import ddim_update, make_ddim_timesteps
from ldm.models.diffusion.guidance import guided_eps
from ldm.models.diffusion.sampler import Sampler


class PLMSSampler(Sampler):
    """Linear multistep noise estimates on DDIM's grid and update; the first step uses the pseudo improved Euler
    method."""

    TITLE = "PLMS"
    SHORTHAND = "--plms"

    def timesteps(self, num_steps: int) -> np.ndarray:
        return make_ddim_timesteps(num_steps, self.model.num_timesteps)

    def _step(self, x: torch.Tensor, e_t: torch.Tensor, index: int, generator: Optional[torch.Generator]
              ) -> Tuple[torch.Tensor, torch.Tensor]:
        return ddim_update(x, e_t, float(self.ddim_alphas[index]), float(self.ddim_alphas_prev[index]))

    def _reset(self) -> None:
        self.old_eps = []

    def _eps(self, x, t, c, uc, scale, index, generator):
        e_t = guided_eps(self.model, x, t, c, uc, scale)
        old = self.old_eps
        if not old:
            # Heun-like start: average with the estimate at the next timestep.
            x_prev, _ = self._step(x, e_t, index, generator)
            t_next = torch.full_like(t, int(self.ddim_timesteps[max(index - 1, 0)]))
            e_prime = (e_t + guided_eps(self.model, x_prev, t_next, c, uc, scale)) / 2
        elif len(old) == 1:
            e_prime = (3 * e_t - old[-1]) / 2
        elif len(old) == 2:
            e_prime = (23 * e_t - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        self.old_eps = (old + [e_t])[-3:]
        return e_prime
