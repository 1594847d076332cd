"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353) as a projection form of
the adapter design space: the host's weight is split into a magnitude and a direction, the direction gets a LoRA
(LoCon on convolutions) update and the magnitude m is learned:

    W' = m ⊙ (W + ΔW) / ||W + ΔW||,   ΔW = alpha / rank * up @ down,

the norm taken per output channel (`axis: output`, peft's and LyCORIS' default) or per input channel (`axis: input`,
LyCORIS' older wd_on_out: false, the one AUTOMATIC1111 reads). We learn m as an offset from the norm of the base
weight, m = ||W|| + magnitude with `magnitude` zero at init: the same function and the same gradients as DoRA's m
initialised to ||W|| (the base is frozen), and the identity at init however late the base weights are loaded. Files
hold m itself (kohya / LyCORIS `dora_scale`, peft `lora_magnitude_vector`), so reading and writing them needs the base
weights. At strength s the update is s · (W' - W), as AUTOMATIC1111 and ComfyUI apply a DoRA file's multiplier.
Keys: `<module>.adapters.<group>.<i>.down.weight`, `.up.weight` (`.mid.weight`), `.magnitude`.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ldm.modules.adapters.base import KEEP_AS_DIRECTORY, weight_forward
from ldm.modules.adapters.lora import LoCon, LoRAFactors, LowRankOptions, tucker_option
from ldm.modules.adapters.options import choice_option
from ldm.modules.adapters.spec import AdapterConfigError, AdapterDirError, AdapterSpec

AXES = ("output", "input")


def weight_norm(w: torch.Tensor, axis: str) -> torch.Tensor:
    """||w|| per output channel (out, 1, ...) or per input channel (1, in, ...), fp32, keeping dims to broadcast."""
    w = w.float()
    if axis == "output":
        return w.flatten(1).norm(dim=1).view(-1, *[1] * (w.dim() - 1))
    return w.transpose(0, 1).flatten(1).norm(dim=1).view(1, -1, *[1] * (w.dim() - 2))


def decomposed(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, axis: str) -> torch.Tensor:
    """W' - W for W' = m ⊙ (W + ΔW) / ||W + ΔW|| (fp32); `magnitude` m shaped as weight_norm's result."""
    merged = weight.float() + delta
    return merged * (magnitude / weight_norm(merged, axis)) - weight.float()


@dataclass(frozen=True)
class DoRAFactors(LoRAFactors):
    """One module's DoRA update: the LoRA factors of the direction, the magnitude m (absolute, as files hold it:
    (out, 1[, 1, 1]) or (1, in[, 1, 1])) and its axis."""
    magnitude: Optional[torch.Tensor] = None
    axis: str = "output"

    KOHYA_OPTIONAL = LoRAFactors.KOHYA_OPTIONAL | {"dora_scale", "lora_magnitude_vector"}
    DIFFUSERS_SUFFIXES = {".lora_magnitude_vector": "lora_magnitude_vector"}  # peft's: (out,), convs (1, out, 1, 1)
    MIXABLE = False
    PEFT_DORA = True

    @classmethod
    def claims(cls, names: frozenset) -> bool:
        """LoRA tensors and one magnitude: kohya / LyCORIS `dora_scale` or peft's `lora_magnitude_vector`."""
        return super().claims(names) and len(names & {"dora_scale", "lora_magnitude_vector"}) == 1

    @classmethod
    def from_tensors(cls, tensors: Dict[str, torch.Tensor], host: nn.Module, where: str) -> "DoRAFactors":
        lora = LoRAFactors.from_tensors(tensors, host, where)
        n_out, n_in = host.weight.shape[:2]
        ones = [1] * (host.weight.dim() - 2)
        if "lora_magnitude_vector" in tensors:  # peft: per output channel, (out,) or for convs (1, out, 1, 1)
            m = tensors["lora_magnitude_vector"]
            if m.numel() != n_out:
                raise AdapterDirError(f"{where}: peft's DoRA magnitude of shape {tuple(m.shape)} does not fit a module "
                                      f"with {n_out} outputs: the file was made for another model")
            return cls(lora.down, lora.up, lora.alpha, lora.mid, m.reshape(n_out, 1, *ones), "output")
        m = tensors["dora_scale"]
        if tuple(m.shape) == (n_out, 1, *ones):  # LyCORIS wd_on_out (its default)
            axis = "output"
        elif tuple(m.shape) == (1, n_in, *ones):
            axis = "input"
        else:
            raise AdapterDirError(f"{where}: DoRA magnitude (dora_scale) of shape {tuple(m.shape)} fits neither the "
                                  f"outputs ({n_out}, 1) nor the inputs (1, {n_in}) of this module: the file was made "
                                  "for another model")
        return cls(lora.down, lora.up, lora.alpha, lora.mid, m, axis)

    def delta(self) -> torch.Tensor:
        raise AdapterConfigError("a DoRA update's ΔW depends on the base weight: use delta_of(weight)")

    def delta_of(self, weight: torch.Tensor) -> torch.Tensor:
        """W' - W for the base weight `weight` (fp32)."""
        return decomposed(weight, LoRAFactors.delta(self), self.magnitude.float(), self.axis)

    def kohya_tensors(self, key: str) -> Dict[str, torch.Tensor]:
        return {**super().kohya_tensors(key), f"{key}.dora_scale": self.magnitude}

    def diffusers_tensors(self, key: str) -> Dict[str, torch.Tensor]:
        raise AdapterConfigError(f"{key}: diffusers' LoRA loader does not take DoRA: write it as a kohya / LyCORIS "
                                 "file or a peft folder")

    def peft_tensors(self, key: str) -> Dict[str, torch.Tensor]:
        if self.axis != "output":
            raise AdapterConfigError(f"{key}: peft's DoRA normalises per output channel; this one (axis input) has no "
                                     "peft form: write it as a kohya / LyCORIS file")
        m = self.magnitude.flatten()  # peft's shape: (out,) for a Linear, (1, out, 1, 1) for a convolution
        m = m if self.magnitude.dim() == 2 else m.view(1, -1, *[1] * (self.magnitude.dim() - 2))
        return {**super().diffusers_tensors(key), f"{key}.lora_magnitude_vector": m}

    def peft_config(self) -> Dict[str, Any]:
        return {"use_dora": True}

    def layout(self) -> tuple:
        return "dora", self.rank, self.alpha, self.mid is not None, self.axis

    def config_entry(self, targets: list) -> Dict[str, Any]:
        return {"type": "dora", "target": targets, "rank": self.rank, "alpha": self.alpha,
                "tucker": self.mid is not None, "axis": self.axis}

    def adapter_tensors(self, host: nn.Module) -> Dict[str, torch.Tensor]:
        base = weight_norm(_base_weight(host, "read a DoRA file"), self.axis)
        return {**super().adapter_tensors(host), "magnitude": (self.magnitude.float() - base).flatten()}

    def scaled(self, s: float) -> "DoRAFactors":
        if s != 1:
            raise AdapterConfigError(f"a DoRA update at strength {s:g} is s · (W' - W), which no DoRA file states "
                                     f"(they hold strength 1): {KEEP_AS_DIRECTORY}, or set its scale to 1")
        return self

    @classmethod
    def combine(cls, parts: List["DoRAFactors"], where: str) -> "DoRAFactors":
        if len(parts) == 1:
            return parts[0]
        raise AdapterConfigError(f"{where}: {len(parts)} DoRA updates on one module; a file holds one per module: "
                                 f"{KEEP_AS_DIRECTORY}")


def _base_weight(host: nn.Module, what: str) -> torch.Tensor:
    if host.weight.is_meta:
        raise AdapterDirError(f"to {what}, DoRA needs the base weights (its magnitude is stated relative to their "
                              "norm): load the base checkpoint first (e.g. --ckpt)")
    return host.weight


@dataclass(frozen=True)
class DoRAOptions(LowRankOptions):
    tucker: bool = tucker_option()
    axis: str = choice_option(AXES, "output", help="normalise W + ΔW per output channel (peft, LyCORIS) or per input "
                                                   "channel (LyCORIS wd_on_out: false, AUTOMATIC1111)")


class DoRA(LoCon):
    """Weight-decomposed LoRA: a learned magnitude times the LoRA-updated direction of a Linear's or Conv2d's weight."""
    NAME = "dora"
    TITLE = "DoRA"
    Options = DoRAOptions
    UPDATE = DoRAFactors
    READS_BASE = "renormalises that module's weight"

    @classmethod
    def parameter_count(cls, spec: AdapterSpec, dim_in: int, dim_out: int, kernel: Tuple[int, ...] = ()) -> int:
        width = dim_out if spec.options.axis == "output" else dim_in
        return super().parameter_count(spec, dim_in, dim_out, kernel) + width

    def __init__(self, spec: AdapterSpec, host: nn.Module):
        super().__init__(spec, host)
        self.axis = spec.options.axis
        width = host.weight.shape[0 if self.axis == "output" else 1]
        self.magnitude = nn.Parameter(torch.zeros(width))  # m - ||W||: zero is DoRA's init m = ||W||

    def zero_init_(self) -> None:
        super().zero_init_()
        nn.init.zeros_(self.magnitude)

    def _magnitude(self, weight: torch.Tensor) -> torch.Tensor:
        """m = ||W|| + magnitude, shaped to broadcast over the weight (the base norm takes no gradient: W is frozen)."""
        base = weight_norm(weight.detach(), self.axis)
        return base + self.magnitude.float().view(base.shape)

    def delta_weight(self, host: nn.Module) -> torch.Tensor:
        return decomposed(host.weight, self.factors().delta(), self._magnitude(host.weight), self.axis)

    def forward(self, x: torch.Tensor, y: torch.Tensor, host: nn.Module) -> torch.Tensor:
        return weight_forward(host, x, self.delta_weight(host).to(x.dtype))  # (W' - W) x: (..., out) / (b, out, h, w)

    def update(self, scale: float = 1.0, host: Optional[nn.Module] = None) -> DoRAFactors:
        f = self.factors()
        m = self._magnitude(_base_weight(host, "write a DoRA file"))
        return DoRAFactors(f.down, f.up, f.alpha, f.mid, m.detach(), self.axis).scaled(scale)
