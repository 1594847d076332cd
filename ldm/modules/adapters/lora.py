"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685) as a projection form
of the adapter design space: y = W x + scale * (alpha / rank) * up(down(dropout(x))), with up zero at init.

On a Linear, down and up are Linear(in -> rank) and Linear(rank -> out); on a 1x1 Conv2d they are 1x1 convs, so their
weights have the shapes kohya files use ([rank, in, 1, 1], [out, rank, 1, 1]). Keys:
`<module>.adapters.<group>.<i>.down.weight` and `.up.weight`. `LoRAFactors` is one module's update as plain tensors,
the form that merging, files and LoRA + LoRA arithmetic work on.
"""
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn

from ldm.modules.adapters.base import ProjectionForm, Update
from ldm.modules.adapters.spec import REQUIRED, AdapterConfigError, AdapterDirError, AdapterSpec, check_number, \
    check_positive_int


@dataclass(frozen=True)
class LoRAFactors(Update):
    """One module's update ΔW = alpha / rank * up @ down, down (rank, in[, 1, 1]) and up (out, rank[, 1, 1])."""
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    KOHYA_TENSORS = frozenset({"lora_down.weight", "lora_up.weight"})
    KOHYA_OPTIONAL = frozenset({"alpha"})
    DIFFUSERS_SUFFIXES = {".lora_A.weight": "lora_down.weight", ".lora_B.weight": "lora_up.weight",
                          ".lora.down.weight": "lora_down.weight", ".lora.up.weight": "lora_up.weight",
                          ".lora_linear_layer.down.weight": "lora_down.weight",
                          ".lora_linear_layer.up.weight": "lora_up.weight", ".alpha": "alpha"}
    MIXABLE = True

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """ΔW in fp32, shaped like the module's weight: (out, in) or (out, in, 1, 1)."""
        w = self.up.flatten(1).float() @ self.down.flatten(1).float()
        return (self.alpha / self.rank) * w.view(w.shape + self.down.shape[2:])

    def scaled(self, s: float) -> "LoRAFactors":
        """The same update times s."""
        return replace(self, alpha=self.alpha * s)

    def folded(self) -> "LoRAFactors":
        """The same update with alpha / rank folded into up, so alpha = rank."""
        return LoRAFactors(self.down, self.up * (self.alpha / self.rank), float(self.rank))

    # ---- files --------------------------------------------------------------------------------------------------
    @classmethod
    def from_tensors(cls, tensors: Dict[str, torch.Tensor], host: nn.Module, where: str) -> "LoRAFactors":
        """kohya tensors (lora_down.weight, lora_up.weight[, alpha]) checked against the module they go on."""
        conv = isinstance(host, nn.Conv2d)
        n_in, n_out = host.weight.shape[1], host.weight.shape[0]
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        if conv and down.dim() == 2 and up.dim() == 2:  # a Linear-shaped LoRA of a 1x1 conv: the same map
            down, up = down[..., None, None], up[..., None, None]
        rank, tail = down.shape[0], (1, 1) if conv else ()
        if tuple(down.shape) != (rank, n_in, *tail) or tuple(up.shape) != (n_out, rank, *tail):
            raise AdapterDirError(f"{where}: lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} do not fit a "
                                  f"{type(host).__name__} with {n_in} inputs and {n_out} outputs: the file was made "
                                  "for another model")
        alpha = float(tensors["alpha"]) if "alpha" in tensors else float(rank)  # kohya: no alpha means alpha = rank
        return cls(down, up, alpha)

    def kohya_tensors(self, key: str) -> Dict[str, torch.Tensor]:
        return {f"{key}.lora_down.weight": self.down, f"{key}.lora_up.weight": self.up,
                f"{key}.alpha": torch.tensor(self.alpha)}

    def diffusers_tensors(self, key: str) -> Dict[str, torch.Tensor]:
        f = self.folded()  # peft's files carry no alpha: alpha / rank goes into lora_B
        return {f"{key}.lora_A.weight": f.down, f"{key}.lora_B.weight": f.up}

    def layout(self) -> tuple:
        return "lora", self.rank, self.alpha

    def config_entry(self, targets: list) -> Dict[str, Any]:
        return {"type": "lora", "target": targets, "rank": self.rank, "alpha": self.alpha}

    def adapter_tensors(self) -> Dict[str, torch.Tensor]:
        return {"down.weight": self.down, "up.weight": self.up}

    # ---- arithmetic ---------------------------------------------------------------------------------------------
    @classmethod
    def combine(cls, parts: List["LoRAFactors"], where: str) -> "LoRAFactors":
        return parts[0] if len(parts) == 1 else stack_factors(parts)

    def lpl_mix(self, other: "LoRAFactors", alpha: float) -> "LoRAFactors":
        return mix_factors(self, other, alpha)

    @classmethod
    def exact_sum(cls, weighted: List[Tuple["LoRAFactors", float]]) -> "LoRAFactors":
        return stack_factors([f.scaled(w) for f, w in weighted])


def stack_factors(parts: List[LoRAFactors]) -> LoRAFactors:
    """One LoRA whose ΔW is exactly the sum of the parts' ΔWs: ranks concatenated, each alpha/rank folded into up."""
    parts = [p.folded() for p in parts]
    return LoRAFactors(torch.cat([p.down for p in parts]), torch.cat([p.up for p in parts], dim=1),
                       float(sum(p.rank for p in parts)))


def mix_factors(a: LoRAFactors, b: LoRAFactors, alpha: float) -> LoRAFactors:
    """cloneofsimo `lora_add --mode lpl`: up = α·up_a + (1-α)·up_b and down = α·down_a + (1-α)·down_b, after
    folding each alpha / rank into up. ΔW is then (α·up_a + (1-α)·up_b)(α·down_a + (1-α)·down_b), with cross terms."""
    if a.down.shape != b.down.shape or a.up.shape != b.up.shape:
        raise AdapterConfigError(f"lpl mixes factors of equal shapes, got down {tuple(a.down.shape)} vs "
                                 f"{tuple(b.down.shape)} (ranks {a.rank} and {b.rank}); use the exact mode instead")
    a, b = a.folded(), b.folded()
    return LoRAFactors(alpha * a.down + (1 - alpha) * b.down, alpha * a.up + (1 - alpha) * b.up, float(a.rank))


class LoRA(ProjectionForm):
    """Low-rank update of a Linear or 1x1 Conv2d: `rank`, `alpha` (default: rank, i.e. scaling 1), `dropout` on x."""
    NAME = "lora"
    TITLE = "LoRA"
    OPTIONS = {**ProjectionForm.OPTIONS, "rank": REQUIRED, "alpha": None, "dropout": 0.0}
    UPDATE = LoRAFactors

    @classmethod
    def check(cls, options: Dict[str, Any], where: str) -> Dict[str, Any]:
        options = super().check(options, where)
        rank = check_positive_int(options["rank"], f"{where}.rank")
        alpha = rank if options["alpha"] is None else options["alpha"]
        alpha = check_number(alpha, f"{where}.alpha", low=0, low_open=True, hint="omit it for alpha = rank")
        dropout = check_number(options["dropout"], f"{where}.dropout", low=0, high=1, high_open=True)
        return {**options, "alpha": alpha, "dropout": dropout}

    @classmethod
    def parameter_count(cls, spec: AdapterSpec, dim_in: int, dim_out: int) -> int:
        return spec.option("rank") * (dim_in + dim_out)

    def __init__(self, spec: AdapterSpec, host: nn.Module):
        super().__init__()
        rank = spec.option("rank")
        self.scaling = spec.option("alpha") / rank
        self.dropout = nn.Dropout(spec.option("dropout"))
        if isinstance(host, nn.Conv2d):
            self.down = nn.Conv2d(host.in_channels, rank, 1, bias=False)
            self.up = nn.Conv2d(rank, host.out_channels, 1, bias=False)
        else:
            self.down = nn.Linear(host.in_features, rank, bias=False)
            self.up = nn.Linear(rank, host.out_features, bias=False)

    def zero_init_(self) -> None:
        nn.init.zeros_(self.up.weight)  # down keeps PyTorch's kaiming init, as in the paper

    def forward(self, x: torch.Tensor, y: torch.Tensor, host: nn.Module) -> torch.Tensor:
        return self.scaling * self.up(self.down(self.dropout(x)))   # (..., in) -> (..., out); convs: (b, c, h, w)

    def factors(self) -> LoRAFactors:
        return LoRAFactors(self.down.weight, self.up.weight, self.scaling * self.down.weight.shape[0])

    def update(self, scale: float = 1.0) -> LoRAFactors:
        return self.factors().scaled(scale)

    def delta_weight(self, host: nn.Module) -> torch.Tensor:
        return self.factors().delta()
