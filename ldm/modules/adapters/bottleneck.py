"""The paper's block adapters (Xiang et al. 2023, arXiv 2303.18181): a bottleneck `inout` form for transformer blocks
and one for ResBlocks. Nonlinear, so they have neither a merged weight nor a LoRA file form (the base class says so).
"""
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
import torch.nn as nn

from ldm.modules.adapters.base import KEEP_AS_DIRECTORY, AdapterForm
from ldm.modules.adapters.options import Options, choice_option, int_option
from ldm.modules.adapters.spec import AdapterConfigError, AdapterSpec
from ldm.modules.diffusionmodules.util import normalization

METHODS = {"relu": nn.ReLU, "sig": nn.Sigmoid, "silu": nn.SiLU, "ident": nn.Identity, "default": nn.ReLU}


@dataclass(frozen=True)
class BottleneckOptions(Options):
    """The paper's bottleneck: its width and activation."""
    mid_dim: int = int_option(help="bottleneck width (the paper: 60 in transformer blocks; ResBlocks 6, 7, 9)")
    method: str = choice_option(tuple(METHODS), "default", help="activation between the two layers (default: ReLU)")


class BottleneckForm(AdapterForm):
    """The paper's bottleneck `inout`: Linear-act-Linear in transformer blocks, norm-SiLU-conv-act-conv in ResBlocks."""
    NAME = "inout"
    Options = BottleneckOptions
    SIZE = "mid_dim"
    PAPER_SUFFIX = ""  # the file suffix of this block's adapter in the paper code's directories

    def delta_weight(self, host: nn.Module) -> torch.Tensor:
        raise AdapterConfigError(f"{self.describe_form()}: nonlinear bottlenecks cannot be folded into the weights; "
                                 "only the linear projection forms (LoRA, LoCon, LoHa, LoKr, DoRA, (IA)^3 without "
                                 "learn_biases) merge")

    def update(self, scale: float = 1.0, host: Optional[nn.Module] = None) -> Any:
        raise AdapterConfigError(f"{self.describe_form()}: nonlinear bottlenecks have no LoRA equivalent, so they "
                                 f"cannot be written to kohya / diffusers files; {KEEP_AS_DIRECTORY}")


class InOutAdapter(BottleneckForm):
    """Token-wise bottleneck MLP Linear(dim->mid)-act-Linear(mid->dim), the paper's `AdapterForward` (keys adp.*)."""
    KIND = "transformer"
    TITLE = "transformer-block adapter"
    PAPER_SUFFIX = ".adapter_inout.pt"

    def __init__(self, spec: AdapterSpec, dim_in: int, dim_out: int):
        super().__init__()
        mid = spec.options.mid_dim
        self.adp = nn.Sequential(nn.Linear(dim_in, mid), METHODS[spec.options.method](), nn.Linear(mid, dim_out))

    @classmethod
    def parameter_count(cls, spec: AdapterSpec, dim_in: int, dim_out: int, kernel: Tuple[int, ...] = ()) -> int:
        mid = spec.options.mid_dim
        return dim_in * mid + mid + mid * dim_out + dim_out

    def zero_init_(self) -> None:
        nn.init.zeros_(self.adp[-1].weight)
        nn.init.zeros_(self.adp[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adp(x)                                   # (b, n, c_in) -> (b, n, c_out)


class ResInOutAdapter(BottleneckForm, nn.Sequential):
    """GroupNorm32-SiLU-conv3x3(in->mid)-act-conv3x3(mid->out), the paper's ResBlock adapter (keys 0.*, 2.*, 4.*).

    (b, c_in, h, w) -> (b, c_out, h, w); c_in, c_out are the channel counts at din and dout.
    """
    KIND = "resblock"
    TITLE = "ResBlock adapter"
    PAPER_SUFFIX = ".adapter.pt"

    def __init__(self, spec: AdapterSpec, dim_in: int, dim_out: int):
        mid = spec.options.mid_dim
        super().__init__(normalization(dim_in), nn.SiLU(), nn.Conv2d(dim_in, mid, 3, padding=1),
                         METHODS[spec.options.method](), nn.Conv2d(mid, dim_out, 3, padding=1))

    @classmethod
    def parameter_count(cls, spec: AdapterSpec, dim_in: int, dim_out: int, kernel: Tuple[int, ...] = ()) -> int:
        mid = spec.options.mid_dim
        return 2 * dim_in + (9 * dim_in * mid + mid) + (9 * mid * dim_out + dim_out)

    def zero_init_(self) -> None:
        nn.init.zeros_(self[-1].weight)
        nn.init.zeros_(self[-1].bias)
