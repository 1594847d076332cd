"""Classifier-free guidance (Ho & Salimans 2022), the one function every sampler calls for its noise estimate."""
from typing import Optional

import torch


def guided_eps(model, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, uc: Optional[torch.Tensor] = None,
               scale: float = 1.0) -> torch.Tensor:
    """eps_uc + scale * (eps_c - eps_uc), in one batched UNet call; plain eps_c when scale is 1 or uc is None."""
    if uc is None or scale == 1.0:
        return model.apply_model(x, t, c)
    e_uc, e_c = model.apply_model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uc, c])).chunk(2)
    return e_uc + scale * (e_c - e_uc)
