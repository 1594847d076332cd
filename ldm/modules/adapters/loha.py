"""LoHa (Hyeon-Woo et al. 2022, "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated Learning",
arXiv 2108.06098; in LyCORIS, Yeh et al. 2023, arXiv 2309.14859) as a projection form of the adapter design space:
ΔW = alpha / rank * (w1_a @ w1_b) ⊙ (w2_a @ w2_b), so a rank-r LoHa reaches rank r² with the parameters of a rank-2r
LoRA.

w1_a, w2_a are (out, rank) and w1_b, w2_b (rank, in * kh * kw) (a convolution's update flattened, as LyCORIS and peft
store it); with `tucker` (LyCORIS use_tucker, peft use_effective_conv2d) a kxk convolution's update is rebuilt from
t1, t2 (rank, rank, kh, kw) with w1_a, w2_a (rank, out) and w1_b, w2_b (rank, in). Init as LyCORIS: w1_b, w2_b
normal(0, 1), w1_a normal(0, 0.1), w2_a zero (the identity). Keys: `<module>.adapters.<group>.<i>.w1_a` ... `.t2`;
in kohya / LyCORIS files `hada_w1_a` ... `hada_t2` and `alpha`, in peft folders the same names without `alpha`.
"""
from dataclasses import dataclass, replace
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ldm.modules.adapters.base import ProjectionForm, Update, is_weight_layer, weight_forward
from ldm.modules.adapters.lora import LowRankOptions, tucker_option
from ldm.modules.adapters.spec import AdapterDirError, AdapterSpec

NAMES = ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")  # ours; files prefix them with hada_


def hada_delta(t: Dict[str, torch.Tensor], shape: Tuple[int, ...]) -> torch.Tensor:
    """(w1_a @ w1_b) ⊙ (w2_a @ w2_b) in fp32, shaped `shape` (the host weight's); with t1, t2 the Tucker rebuild."""
    t = {k: v.float() for k, v in t.items()}
    if "t1" in t:
        one = torch.einsum("ijhw,jr,ip->prhw", t["t1"], t["w1_b"], t["w1_a"])
        two = torch.einsum("ijhw,jr,ip->prhw", t["t2"], t["w2_b"], t["w2_a"])
        return one * two
    return ((t["w1_a"] @ t["w1_b"]) * (t["w2_a"] @ t["w2_b"])).view(shape)


@dataclass(frozen=True)
class HadaFactors(Update):
    """One module's LoHa update: its factors by our names (w1_a ... t2), alpha, and the host weight's shape."""
    factors: Dict[str, torch.Tensor]
    alpha: float
    shape: Tuple[int, ...]

    KOHYA_TENSORS = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})
    KOHYA_OPTIONAL = frozenset({"alpha", "hada_t1", "hada_t2"})
    DIFFUSERS_SUFFIXES = {f".hada_{n}": f"hada_{n}" for n in NAMES}  # peft's names
    PEFT_TYPE = "LOHA"

    @property
    def rank(self) -> int:
        return self.factors["w1_b"].shape[0]

    @property
    def tucker(self) -> bool:
        return "t1" in self.factors

    def delta(self) -> torch.Tensor:
        return (self.alpha / self.rank) * hada_delta(self.factors, self.shape)

    @classmethod
    def rank_of(cls, tensors: Dict[str, torch.Tensor]) -> Optional[int]:
        return tensors["hada_w1_b"].shape[0]

    @classmethod
    def with_scale(cls, tensors: Dict[str, torch.Tensor], scale: float) -> Dict[str, torch.Tensor]:
        return {**tensors, "alpha": torch.tensor(scale * cls.rank_of(tensors))}

    @classmethod
    def from_tensors(cls, tensors: Dict[str, torch.Tensor], host: nn.Module, where: str) -> "HadaFactors":
        factors = {n: tensors[f"hada_{n}"] for n in NAMES if f"hada_{n}" in tensors}
        if ("t1" in factors) != ("t2" in factors):
            raise AdapterDirError(f"{where}: a LoHa has both hada_t1 and hada_t2 or neither: the file is damaged")
        rank, shape = factors["w1_b"].shape[0], tuple(host.weight.shape)
        want = hada_shapes(shape, rank, "t1" in factors)
        got = {n: tuple(v.shape) for n, v in factors.items()}
        if got != want:
            raise AdapterDirError(f"{where}: LoHa factors {got} do not fit a {type(host).__name__} of weight shape "
                                  f"{shape} (rank {rank} needs {want}): the file was made for another model")
        alpha = float(tensors["alpha"]) if "alpha" in tensors else float(rank)
        return cls(factors, alpha, shape)

    def kohya_tensors(self, key: str) -> Dict[str, torch.Tensor]:
        return {**{f"{key}.hada_{n}": v for n, v in self.factors.items()}, f"{key}.alpha": torch.tensor(self.alpha)}

    def peft_tensors(self, key: str) -> Dict[str, torch.Tensor]:
        w = dict(self.factors)  # alpha / rank folded into w1_a: peft's config then says alpha = r
        w["w1_a"] = w["w1_a"] * (self.alpha / self.rank)
        return {f"{key}.hada_{n}": v for n, v in w.items()}

    def peft_config(self) -> Dict[str, Any]:
        conv = any(k != 1 for k in self.shape[2:])  # peft's effective conv only changes kxk convolutions
        return {"use_effective_conv2d": self.tucker} if conv else {}

    def layout(self) -> tuple:
        return "loha", self.rank, self.alpha, self.tucker

    def config_entry(self, targets: list) -> Dict[str, Any]:
        return {"type": "loha", "target": targets, "rank": self.rank, "alpha": self.alpha, "tucker": self.tucker}

    def adapter_tensors(self, host: nn.Module) -> Dict[str, torch.Tensor]:
        return dict(self.factors)

    def scaled(self, s: float) -> "HadaFactors":
        return replace(self, alpha=self.alpha * s)


def hada_shapes(shape: Tuple[int, ...], rank: int, tucker: bool) -> Dict[str, Tuple[int, ...]]:
    """The factor shapes of a rank-`rank` LoHa of a weight of `shape` (Tucker only where the kernel is not 1x1)."""
    out, n_in, kernel = shape[0], shape[1], shape[2:]
    if tucker and any(k != 1 for k in kernel):
        return {"w1_a": (rank, out), "w1_b": (rank, n_in), "w2_a": (rank, out), "w2_b": (rank, n_in),
                "t1": (rank, rank, *kernel), "t2": (rank, rank, *kernel)}
    flat = n_in * int(torch.tensor(kernel).prod()) if kernel else n_in
    return {"w1_a": (out, rank), "w1_b": (rank, flat), "w2_a": (out, rank), "w2_b": (rank, flat)}


@dataclass(frozen=True)
class LoHaOptions(LowRankOptions):
    tucker: bool = tucker_option()


class LoHa(ProjectionForm):
    """Hadamard product of two low-rank updates of a Linear or Conv2d (LyCORIS / peft LoHa)."""
    NAME = "loha"
    TITLE = "LoHa"
    Options = LoHaOptions
    SIZE = "rank"
    UPDATE = HadaFactors
    HOSTS = "Linear or Conv2d"

    @classmethod
    def takes(cls, m: nn.Module) -> bool:
        return is_weight_layer(m)

    @classmethod
    def parameter_count(cls, spec: AdapterSpec, dim_in: int, dim_out: int, kernel: Tuple[int, ...] = ()) -> int:
        shapes = hada_shapes((dim_out, dim_in, *kernel), spec.options.rank, spec.options.tucker)
        return sum(int(torch.tensor(s).prod()) for s in shapes.values())

    def __init__(self, spec: AdapterSpec, host: nn.Module):
        super().__init__()
        self.scaling = spec.options.alpha / spec.options.rank
        self.shape = tuple(host.weight.shape)
        for name, shape in hada_shapes(self.shape, spec.options.rank, spec.options.tucker).items():
            std = 1.0 if name.endswith("_b") else 0.1
            self.register_parameter(name, nn.Parameter(torch.randn(shape) * std))

    def zero_init_(self) -> None:
        nn.init.zeros_(self.w2_a)

    def factors(self) -> Dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in NAMES if hasattr(self, n)}

    def delta_weight(self, host: nn.Module) -> torch.Tensor:
        return self.scaling * hada_delta(self.factors(), self.shape)

    def forward(self, x: torch.Tensor, y: torch.Tensor, host: nn.Module) -> torch.Tensor:
        return weight_forward(host, x, self.delta_weight(host).to(x.dtype))  # ΔW x: (..., out) / (b, out, h, w)

    def update(self, scale: float = 1.0, host: Optional[nn.Module] = None) -> HadaFactors:
        return HadaFactors(self.factors(), self.scaling * self.spec.options.rank * scale, self.shape)
