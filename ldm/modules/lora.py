"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685) as a projection form
of the adapter design space: y = W x + scale * (alpha / rank) * up(down(dropout(x))), with up zero at init.

On a Linear, down and up are Linear(in -> rank) and Linear(rank -> out); on a 1x1 Conv2d they are 1x1 convs, so their
weights have the shapes kohya files use ([rank, in, 1, 1], [out, rank, 1, 1]). Keys:
`<module>.adapters.<group>.<i>.down.weight` and `.up.weight`. `LoRAFactors` is one module's update as plain tensors,
the form that merging and export work on; `stack_factors` and `mix_factors` combine two of them.
"""
from dataclasses import dataclass, replace
from typing import Any, Dict, List

import torch
import torch.nn as nn

from ldm.modules.adapter_config import (PROJECTION, REQUIRED, AdapterConfigError, AdapterSpec, ProjectionOptions,
                                        check_positive_int, register)


@dataclass(frozen=True)
class LoRAFactors:
    """One module's update ΔW = alpha / rank * up @ down, down (rank, in[, 1, 1]) and up (out, rank[, 1, 1])."""
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

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


@register(PROJECTION, "lora")
class LoRA(ProjectionOptions, nn.Module):
    """Low-rank update of a Linear or 1x1 Conv2d: `rank`, `alpha` (default: rank, i.e. scaling 1), `dropout` on x."""
    OPTIONS = {**ProjectionOptions.OPTIONS, "rank": REQUIRED, "alpha": None, "dropout": 0.0}

    @classmethod
    def check(cls, options: Dict[str, Any], where: str) -> Dict[str, Any]:
        options = super().check(options, where)
        rank = check_positive_int(options["rank"], f"{where}.rank")
        alpha = rank if options["alpha"] is None else options["alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
            raise AdapterConfigError(f"{where}.alpha must be a positive number (omit it for alpha = rank), "
                                     f"got {alpha!r}")
        dropout = options["dropout"]
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise AdapterConfigError(f"{where}.dropout must be a number in [0, 1), got {dropout!r}")
        return {**options, "alpha": float(alpha), "dropout": float(dropout)}

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

    def delta_weight(self, host: nn.Module) -> torch.Tensor:
        """ΔW (fp32, host.weight's shape) with host(x) + self(x, ., host) = (W + ΔW) x."""
        return self.factors().delta()
