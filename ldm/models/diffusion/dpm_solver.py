"""DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models").

The multistep second-order solver ("dpmsolver++", order 2, the 2M of the paper's Algorithm 2) on SD's discrete-time
schedule, as the official ldm integration runs it (method="multistep", order=2, lower_order_final=True).
"""
import math
from typing import Optional, Tuple

import numpy as np
import torch

from ldm.models.diffusion.sampler import Sampler


def make_dpm_timesteps(num_steps: int, num_ddpm_steps: int) -> np.ndarray:
    """DPM-Solver's "time_uniform" grid for a discrete schedule, from t=N-1 down to 0, rounded to DDPM timesteps.

    Returns the `num_steps` evaluation timesteps ascending; the final step lands on t=0 (alpha = alphas_cumprod[0]),
    where DDIM's ends too. Rounding keeps the UNet on the integer timesteps it was trained on.
    """
    if not 0 < num_steps < num_ddpm_steps:
        raise ValueError(f"number of DPM-Solver++ steps must be in 1..{num_ddpm_steps - 1}, got {num_steps}")
    return np.round(np.linspace(0, num_ddpm_steps - 1, num_steps + 1)).astype(np.int64)[1:]


def half_log_snr(alpha_cumprod: float) -> float:
    """lambda_t = log(alpha_t / sigma_t), with alpha_t^2 = alphas_cumprod[t] and sigma_t^2 = 1 - alpha_t^2."""
    return 0.5 * math.log(alpha_cumprod / (1.0 - alpha_cumprod))


class DPMSolverSampler(Sampler):
    """DPM-Solver++(2M): the guided noise estimate on its own time grid, with a second-order multistep update.

    The first step is first order (it equals DDIM), as is the last one when there are fewer than 10 steps (the
    official `lower_order_final`, which steadies guided sampling at very few steps). `order=1` is DPM-Solver++1,
    i.e. DDIM on this sampler's time grid.
    """

    TITLE = "DPM-Solver++(2M)"
    ALIASES = ("dpm_solver",)  # its earlier name (scripts/evaluate.py --sampler dpm_solver)
    SHORTHAND = "--dpm_solver"

    def __init__(self, model, order: int = 2):
        if order not in (1, 2):
            raise ValueError(f"DPM-Solver++ order must be 1 or 2, got {order}")
        super().__init__(model)
        self.order = order

    @classmethod
    def max_steps(cls, num_timesteps: int) -> int:
        return num_timesteps - 1  # its grid spans t = N-1 .. 0: at most N-1 steps land on distinct timesteps

    def timesteps(self, num_steps: int) -> np.ndarray:
        return make_dpm_timesteps(num_steps, self.model.num_timesteps)

    def _reset(self) -> None:
        self.prev = None  # (x0 prediction, lambda) of the previous step

    def _step(self, x: torch.Tensor, e_t: torch.Tensor, index: int, generator: Optional[torch.Generator]
              ) -> Tuple[torch.Tensor, torch.Tensor]:
        """x at the next timestep and the x0 prediction, from x at this one and its noise estimate (Alg. 2)."""
        a_s, a_t = float(self.ddim_alphas[index]), float(self.ddim_alphas_prev[index])
        lambda_s, lambda_t = half_log_snr(a_s), half_log_snr(a_t)
        h = lambda_t - lambda_s
        pred_x0 = (x - (1 - a_s) ** 0.5 * e_t) / a_s ** 0.5
        d = pred_x0
        lower_order_final = index == 0 and len(self.ddim_timesteps) < 10
        if self.order == 2 and self.prev is not None and not lower_order_final:
            prev_x0, prev_lambda = self.prev
            r = (lambda_s - prev_lambda) / h
            d = pred_x0 + (pred_x0 - prev_x0) / (2 * r)
        self.prev = (pred_x0, lambda_s)
        x_next = ((1 - a_t) / (1 - a_s)) ** 0.5 * x - a_t ** 0.5 * math.expm1(-h) * d
        return x_next, pred_x0
