"""PLMS sampling (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds")."""
import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.guidance import guided_eps


class PLMSSampler(DDIMSampler):
    """Linear multistep noise estimates on DDIM's update; the first step uses the pseudo improved Euler method."""

    def make_schedule(self, ddim_num_steps: int, ddim_eta: float = 0.0) -> None:
        if ddim_eta != 0:
            raise ValueError("PLMS is deterministic: ddim_eta must be 0")
        super().make_schedule(ddim_num_steps, 0.0)

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
