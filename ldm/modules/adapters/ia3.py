"""(IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning",
arXiv 2205.05638) as a projection form of the adapter design space: a learned vector w rescales a module's output
channels, W' = diag(1 + w) W, or with `on_input` its input channels, W' = W diag(1 + w) (the FFN's hidden activation
when the target is `ff.net.2`). w starts at 0, the convention of tripplyons/sd-ia3 and LyCORIS (peft's ones-initialised
vector is 1 + w). `learn_biases` adds a learned bias b after the rescaling (sd-ia3); then no merged weight exists.

For SD v1 on the keys and values of attn1 and attn2 (sd-ia3's placement) this is 49,920 parameters. Keys:
`<module>.adapters.<group>.<i>.weight` (and `.bias`).
"""
from dataclasses import dataclass, replace
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ldm.modules.adapters.base import (KEEP_AS_DIRECTORY, ProjectionForm, ProjectionOptions, Update, is_weight_layer,
                                       weight_forward)
from ldm.modules.adapters.options import bool_option
from ldm.modules.adapters.spec import AdapterConfigError, AdapterDirError, AdapterSpec


def _channels(v: torch.Tensor, host: nn.Module) -> torch.Tensor:
    """Per-channel vector v shaped to broadcast over the host's input or output: last dim (Linear), dim 1 (conv)."""
    return v.view(-1, 1, 1) if isinstance(host, nn.Conv2d) else v


@dataclass(frozen=True)
class IA3Vector(Update):
    """One module's (IA)^3 update as a plain tensor: W' = W * (1 + weight), on its input channels if `on_input`.

    In kohya / A1111 / LyCORIS files: `<module>.weight` and `<module>.on_input`; LyCORIS writes the vector of a
    convolution as (1, C, 1, 1), A1111 and we as (C,)."""
    weight: torch.Tensor
    on_input: bool

    KOHYA_TENSORS = frozenset({"weight", "on_input"})

    @classmethod
    def from_tensors(cls, tensors: Dict[str, torch.Tensor], host: nn.Module, where: str) -> "IA3Vector":
        n_in, n_out = host.weight.shape[1], host.weight.shape[0]
        on_input = bool(tensors["on_input"].item())
        weight, width = tensors["weight"], n_in if on_input else n_out
        if host.weight.dim() == 4 and tuple(weight.shape) == (1, width, 1, 1):  # LyCORIS' conv vector
            weight = weight.flatten()
        if tuple(weight.shape) != (width,):
            need = f"({width},)" + (f" or (1, {width}, 1, 1)" if host.weight.dim() == 4 else "")
            raise AdapterDirError(f"{where}: (IA)^3 vector of shape {tuple(tensors['weight'].shape)} (on_input "
                                  f"{on_input}) does not fit a {type(host).__name__} with {n_in} inputs and {n_out} "
                                  f"outputs, which takes {need}: the file was made for another model")
        return cls(weight, on_input)

    def kohya_tensors(self, key: str) -> Dict[str, torch.Tensor]:
        return {f"{key}.weight": self.weight, f"{key}.on_input": torch.tensor(self.on_input)}

    def layout(self) -> tuple:
        return "ia3", self.on_input

    def config_entry(self, targets: list) -> Dict[str, Any]:
        return {"type": "ia3", "target": targets, "on_input": self.on_input}

    def adapter_tensors(self, host: nn.Module) -> Dict[str, torch.Tensor]:
        return {"weight": self.weight}

    def peft_tensors(self, key: str) -> Dict[str, torch.Tensor]:
        raise AdapterConfigError(f"{key}: peft's IA3 folders name their modules feedforward or not, a choice our "
                                 "(IA)^3 files leave to on_input; write (IA)^3 as a kohya / A1111 file or keep the "
                                 "adapter directory")

    def scaled(self, s: float) -> "IA3Vector":
        return replace(self, weight=self.weight * s)


@dataclass(frozen=True)
class IA3Options(ProjectionOptions):
    on_input: bool = bool_option(False, help="rescale the input channels (e.g. the FFN's hidden activation on "
                                             "ff.net.2) instead of the output channels")
    learn_biases: bool = bool_option(False, help="add a learned bias after the rescaling (sd-ia3); then there is no "
                                                 "merged weight and no file form")


class IA3(ProjectionForm):
    """Rescales a Linear's or Conv2d's output channels by 1 + w (input channels with `on_input: true`)."""
    NAME = "ia3"
    TITLE = "(IA)^3"
    Options = IA3Options
    HOSTS = "Linear or Conv2d"
    INITS = ("zero",)  # the method's init: w = 0 is the identity
    READS_BASE = "rescales that module's base output"
    UPDATE = IA3Vector

    @classmethod
    def parameter_count(cls, spec: AdapterSpec, dim_in: int, dim_out: int, kernel: Tuple[int, ...] = ()) -> int:
        width = dim_in if spec.options.on_input else dim_out
        return width * (2 if spec.options.learn_biases else 1)

    @classmethod
    def takes(cls, m: nn.Module) -> bool:
        return is_weight_layer(m)

    def __init__(self, spec: AdapterSpec, host: nn.Module):
        super().__init__()
        self.on_input = spec.options.on_input
        width = host.weight.shape[1] if self.on_input else host.weight.shape[0]
        self.weight = nn.Parameter(torch.zeros(width))
        self.bias = nn.Parameter(torch.zeros(width)) if spec.options.learn_biases else None

    def zero_init_(self) -> None:
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor, host: nn.Module) -> torch.Tensor:
        if self.on_input:                                  # W (w * x + b): the host's weight on the rescaled part
            h = x * _channels(self.weight, host)
            if self.bias is not None:
                h = h + _channels(self.bias, host)
            return weight_forward(host, h, host.weight)
        wx = y if host.bias is None else y - _channels(host.bias, host)
        out = wx * _channels(self.weight, host)            # w * (W x), the bias of the host left alone
        return out if self.bias is None else out + _channels(self.bias, host)

    def update(self, scale: float = 1.0, host: Optional[nn.Module] = None) -> IA3Vector:
        """The update at `scale` as a plain tensor; (IA)^3 with learned biases has none."""
        if self.bias is not None:
            raise AdapterConfigError("(IA)^3 with learn_biases: true adds a bias the module does not have, so it can "
                                     "neither be merged into the weights nor written as a kohya/A1111 (IA)^3 file; "
                                     f"{KEEP_AS_DIRECTORY}")
        return IA3Vector(self.weight * scale, self.on_input)

    def delta_weight(self, host: nn.Module) -> torch.Tensor:
        """ΔW (fp32, host.weight's shape) with host(x) + self(x, host(x), host) = (W + ΔW) x."""
        w = self.update().weight.float()
        shape = [1, -1] if self.on_input else [-1, 1]
        return host.weight.float() * w.view(shape + [1] * (host.weight.dim() - 2))
