"""Building blocks shared by the UNet: schedules, timestep embedding, normalisation, checkpointing."""
import math
from typing import Callable, Dict

import numpy as np
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint


def make_beta_schedule(schedule: str, n_timestep: int, linear_start: float = 1e-4, linear_end: float = 2e-2) -> np.ndarray:
    """Beta schedule of the original code; SD v1 uses "linear" (really linear in sqrt(beta))."""
    if schedule == "linear":
        betas = np.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=np.float64) ** 2
    elif schedule == "sqrt_linear":
        betas = np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64)
    elif schedule == "sqrt":
        betas = np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64) ** 0.5
    else:
        raise ValueError(f"unknown beta schedule '{schedule}': use linear, sqrt_linear or sqrt")
    return betas


def schedule_buffers(betas: np.ndarray) -> Dict[str, np.ndarray]:
    """The forward process and its posterior for `betas` (float64): the buffers of LatentDiffusion and of the
    original checkpoints, by name."""
    alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    return {
        "betas": betas, "alphas_cumprod": alphas_cumprod, "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
    }


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
    """Gather a[t] per batch element and shape it to broadcast against x."""
    out = a.gather(-1, t)
    return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps, as in SD v1.  (N,) -> (N, dim)"""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with fp32 statistics whatever the input dtype (the original's fp16 safeguard).

    torch's group_norm kernels accumulate half/bf16 inputs in fp32 themselves, so when input and parameters share a
    dtype (fp32, or a model cast to bf16/fp16) no upcast is needed; the original's x.float() with bf16 parameters
    fails on the CPU ("mixed dtype"). Mixed dtypes (fp32 parameters, bf16 input under autocast) upcast as before.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            return super().forward(x)
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> nn.Module:
    """The UNet's standard normalisation layer: 32-group GroupNorm."""
    return GroupNorm32(32, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters so it starts as a no-op, and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def checkpoint(func: Callable, *args, flag: bool = False):
    """Gradient checkpointing that works when the base is frozen and only small added modules train.

    The original CompVis helper (reentrant, with an explicit parameter list) fails there with "One of the
    differentiated Tensors does not require grad"; the non-reentrant torch implementation does not.
    """
    if flag and torch.is_grad_enabled():
        return torch_checkpoint(func, *args, use_reentrant=False)
    return func(*args)
