"""(IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning",
arXiv 2205.05638) as a projection form of the adapter design space: a learned vector w rescales a module's output
channels, W' = diag(1 + w) W, or with `on_input` its input channels, W' = W diag(1 + w) (the FFN's hidden activation
when the target is `ff.net.2`). w starts at 0, the convention of tripplyons/sd-ia3 and LyCORIS (peft's ones-initialised
vector is 1 + w). `learn_biases` adds a learned bias b after the rescaling (sd-ia3); then no merged weight exists.

For SD v1 on the keys and values of attn1 and attn2 (sd-ia3's placement) this is 49,920 parameters. Keys:
`<module>.adapters.<group>.<i>.weight` (and `.bias`).
"""
from dataclasses import dataclass
from typing import Any, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.adapter_config import PROJECTION, AdapterConfigError, AdapterSpec, ProjectionOptions, register


def _channels(v: torch.Tensor, host: nn.Module) -> torch.Tensor:
    """Per-channel vector v shaped to broadcast over the host's input or output: last dim (Linear), dim 1 (conv)."""
    return v.view(-1, 1, 1) if isinstance(host, nn.Conv2d) else v


@dataclass(frozen=True)
class IA3Vector:
    """One module's (IA)^3 update as a plain tensor: W' = W * (1 + weight), on its input channels if `on_input`."""
    weight: torch.Tensor
    on_input: bool


@register(PROJECTION, "ia3")
class IA3(ProjectionOptions, nn.Module):
    """Rescales a Linear's or 1x1 Conv2d's output channels by 1 + w (input channels with `on_input: true`)."""
    OPTIONS = {**ProjectionOptions.OPTIONS, "on_input": False, "learn_biases": False}
    INITS = ("zero",)  # the method's init: w = 0 is the identity
    READS_BASE = True  # its addend depends on the host's weight, so merging another group under it changes it

    @classmethod
    def check(cls, options: Dict[str, Any], where: str) -> Dict[str, Any]:
        options = super().check(options, where)
        for flag in ("on_input", "learn_biases"):
            if not isinstance(options[flag], bool):
                raise AdapterConfigError(f"{where}.{flag} must be true or false, got {options[flag]!r}")
        return options

    def __init__(self, spec: AdapterSpec, host: nn.Module):
        super().__init__()
        self.on_input = spec.option("on_input")
        width = host.weight.shape[1] if self.on_input else host.weight.shape[0]
        self.weight = nn.Parameter(torch.zeros(width))
        self.bias = nn.Parameter(torch.zeros(width)) if spec.option("learn_biases") else None

    def zero_init_(self) -> None:
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor, host: nn.Module) -> torch.Tensor:
        if self.on_input:                                  # W (w * x + b): the host's weight on the rescaled part
            h = x * _channels(self.weight, host)
            if self.bias is not None:
                h = h + _channels(self.bias, host)
            return F.linear(h, host.weight) if isinstance(host, nn.Linear) else F.conv2d(h, host.weight)
        wx = y if host.bias is None else y - _channels(host.bias, host)
        out = wx * _channels(self.weight, host)            # w * (W x), the bias of the host left alone
        return out if self.bias is None else out + _channels(self.bias, host)

    def vector(self, strength: float = 1.0) -> IA3Vector:
        """The update at `strength` as a plain tensor; (IA)^3 with learned biases has none."""
        if self.bias is not None:
            raise AdapterConfigError("(IA)^3 with learn_biases: true adds a bias the module does not have, so it can "
                                     "neither be merged into the weights nor written as a kohya/A1111 (IA)^3 file; "
                                     "keep it as an adapter directory")
        return IA3Vector(self.weight * strength, self.on_input)

    def delta_weight(self, host: nn.Module) -> torch.Tensor:
        """ΔW (fp32, host.weight's shape) with host(x) + self(x, host(x), host) = (W + ΔW) x."""
        w = self.vector().weight.float()
        shape = [1, -1] if self.on_input else [-1, 1]
        return host.weight.float() * w.view(shape + [1] * (host.weight.dim() - 2))
