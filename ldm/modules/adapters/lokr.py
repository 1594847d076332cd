"""LoKr (Edalati et al. 2022, "KronA: Parameter Efficient Tuning with Kronecker Adapter", arXiv 2212.10650; in
LyCORIS, Yeh et al. 2023, arXiv 2309.14859) as a projection form of the adapter design space:
ΔW = alpha / rank * w1 ⊗ w2, the Kronecker product of a small (a, c) matrix and a large (b, d) one, out = a·b, in = c·d.

The split of out and in into a·b and c·d is `factorization(dim, factor)`: the pair of divisors nearest each other, or
`factor` and dim / factor, the smaller part going to w1 (LyCORIS; `split: lycoris`) or `factor` going to w1 (peft;
`split: peft`); the two differ only when factor > sqrt(dim). w2 is low rank, w2_a (b, rank) @ w2_b (rank, d·kh·kw),
unless rank >= max(b, d) / 2, where it is full (b, d[, kh, kw]); w1 is full unless `decompose_both` and rank <
max(a, c) / 2 (then w1_a (a, rank) @ w1_b (rank, c)); `tucker` rebuilds a kxk w2 from t2 (rank, rank, kh, kw), w2_a
(rank, b), w2_b (rank, d). These are LyCORIS' and peft's rules, so the same options give either library's shapes. Init
as LyCORIS: w1 (or its factors) and w2_a kaiming-uniform, w2_b (or a full w2) zero, the identity.
Keys: `<module>.adapters.<group>.<i>.w1` ... `.t2`; in kohya / LyCORIS files `lokr_w1` ... `lokr_t2` and `alpha`, in
peft folders the same names.
"""
import math
from dataclasses import dataclass, replace
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ldm.modules.adapters.base import ProjectionForm, Update, is_weight_layer, weight_forward
from ldm.modules.adapters.lora import LowRankOptions, tucker_option
from ldm.modules.adapters.options import bool_option, choice_option, custom_option
from ldm.modules.adapters.spec import AdapterConfigError, AdapterDirError, AdapterSpec

NAMES = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")  # ours; files prefix them with lokr_
Shapes = Dict[str, Tuple[int, ...]]


SPLITS = ("lycoris", "peft")


def factorization(dimension: int, factor: int = -1, split: str = "lycoris") -> Tuple[int, int]:
    """(m, n) with m * n = dimension: `factor` and dimension / factor when factor divides it (sorted, m <= n, by
    LyCORIS; in that order by peft), else the divisor pair nearest each other with m <= n and m <= factor (-1: no
    bound). LyCORIS' and peft's rules, restated."""
    if factor > 0 and dimension % factor == 0:
        pair = (factor, dimension // factor)
        return pair if split == "peft" else (min(pair), max(pair))
    factor = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        new_m = next(k for k in range(m + 1, dimension + 1) if dimension % k == 0)
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return min(m, n), max(m, n)


def lokr_shapes(shape: Tuple[int, ...], rank: int, factor: int, decompose_both: bool, tucker: bool,
                split: str = "lycoris") -> Shapes:
    """The parameter shapes of a LoKr of a weight of `shape` (out, in[, kh, kw])."""
    (a, b), (c, d) = factorization(shape[0], factor, split), factorization(shape[1], factor, split)
    kernel = tuple(shape[2:])
    shapes: Shapes = {}
    if decompose_both and rank < max(a, c) / 2:
        shapes.update(w1_a=(a, rank), w1_b=(rank, c))
    else:
        shapes.update(w1=(a, c))
    if rank >= max(b, d) / 2:
        shapes.update(w2=(b, d, *kernel))
    elif tucker and any(k != 1 for k in kernel):
        shapes.update(t2=(rank, rank, *kernel), w2_a=(rank, b), w2_b=(rank, d))
    else:
        shapes.update(w2_a=(b, rank), w2_b=(rank, d * math.prod(kernel)))
    return shapes


def kron_delta(t: Dict[str, torch.Tensor], shape: Tuple[int, ...]) -> torch.Tensor:
    """w1 ⊗ w2 in fp32, shaped `shape` (the host weight's), each factor rebuilt from its parts first."""
    t = {k: v.float() for k, v in t.items()}
    w1 = t["w1"] if "w1" in t else t["w1_a"] @ t["w1_b"]
    if "w2" in t:
        w2 = t["w2"]
    elif "t2" in t:
        w2 = torch.einsum("ijhw,ip,jr->prhw", t["t2"], t["w2_a"], t["w2_b"])
    else:
        w2 = t["w2_a"] @ t["w2_b"].flatten(1)
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous()).reshape(shape)


@dataclass(frozen=True)
class KronFactors(Update):
    """One module's LoKr update: its factors by our names (w1 ... t2), the scale of w1 ⊗ w2, the host weight's shape,
    and the options that give these shapes (rank, factor, decompose_both, tucker, split)."""
    factors: Dict[str, torch.Tensor]
    scale: float
    shape: Tuple[int, ...]
    rank: int
    factor: int
    decompose_both: bool
    tucker: bool
    split: str = "lycoris"

    KOHYA_TENSORS = frozenset()
    KOHYA_OPTIONAL = frozenset({"alpha"} | {f"lokr_{n}" for n in NAMES})
    DIFFUSERS_SUFFIXES = {f".lokr_{n}": f"lokr_{n}" for n in NAMES}  # peft's names
    PEFT_TYPE = "LOKR"

    @classmethod
    def claims(cls, names: frozenset) -> bool:
        return bool({"lokr_w1", "lokr_w1_a"} & names) and super().claims(names)

    def delta(self) -> torch.Tensor:
        return self.scale * kron_delta(self.factors, self.shape)

    @classmethod
    def rank_of(cls, tensors: Dict[str, torch.Tensor]) -> Optional[int]:
        return None  # a full w1 and w2 show no rank: peft's r is taken as it is

    @classmethod
    def with_scale(cls, tensors: Dict[str, torch.Tensor], scale: float) -> Dict[str, torch.Tensor]:
        """peft's alpha / r folded into w1 (or w1_a), with the alpha that makes LyCORIS' own scale 1."""
        first = "lokr_w1" if "lokr_w1" in tensors else "lokr_w1_a"
        return {**tensors, first: tensors[first] * scale, "alpha": torch.tensor(float(_lycoris_dim(tensors)))}

    @classmethod
    def from_tensors(cls, tensors: Dict[str, torch.Tensor], host: nn.Module, where: str) -> "KronFactors":
        """LyCORIS tensors; its scale is alpha / dim with dim the rank of w1_a or w2_a, and 1 when w1 and w2 are
        both full."""
        factors = {n: tensors[f"lokr_{n}"] for n in NAMES if f"lokr_{n}" in tensors}
        if "w2_b" in factors and "t2" not in factors:
            factors["w2_b"] = factors["w2_b"].flatten(1)
        shape = tuple(host.weight.shape)
        rank, factor, both, tucker, split = _infer_options(factors, shape, where)
        dim = _lycoris_dim(tensors)
        scale = 1.0 if dim is None or "alpha" not in tensors else float(tensors["alpha"]) / dim
        return cls(factors, scale, shape, rank, factor, both, tucker, split)

    def _folded(self) -> Dict[str, torch.Tensor]:
        w = dict(self.factors)
        first = "w1" if "w1" in w else "w1_a"
        w[first] = w[first] * self.scale
        return w

    def kohya_tensors(self, key: str) -> Dict[str, torch.Tensor]:
        w = {f"lokr_{n}": v for n, v in self._folded().items()}  # the scale in w1: read as 1 by LyCORIS and ComfyUI
        return {**{f"{key}.{n}": v for n, v in w.items()}, f"{key}.alpha": torch.tensor(float(_lycoris_dim(w) or 1))}

    def peft_tensors(self, key: str) -> Dict[str, torch.Tensor]:
        peft = lokr_shapes(self.shape, self.rank, self.factor, self.decompose_both, self.tucker, "peft")
        if peft != {n: tuple(v.shape) for n, v in self.factors.items()}:
            raise AdapterConfigError(f"{key}: this LoKr splits its dimensions as LyCORIS does (factor {self.factor} > "
                                     "sqrt(dim) puts the smaller part in w1), which peft's factorisation cannot "
                                     "state: train it with split: peft, or write a kohya / LyCORIS file")
        return {f"{key}.lokr_{n}": v for n, v in self._folded().items()}

    def peft_config(self) -> Dict[str, Any]:
        conv = any(k != 1 for k in self.shape[2:])  # peft's effective conv only changes kxk convolutions
        return {"decompose_both": self.decompose_both, "decompose_factor": self.factor,
                **({"use_effective_conv2d": self.tucker} if conv else {})}

    def layout(self) -> tuple:
        return "lokr", self.rank, self.scale * self.rank, self.factor, self.decompose_both, self.tucker, self.split

    def config_entry(self, targets: list) -> Dict[str, Any]:
        _, rank, alpha, factor, both, tucker, split = self.layout()
        return {"type": "lokr", "target": targets, "rank": rank, "alpha": alpha, "factor": factor,
                "decompose_both": both, "tucker": tucker, "split": split}

    def adapter_tensors(self, host: nn.Module) -> Dict[str, torch.Tensor]:
        return dict(self.factors)

    def scaled(self, s: float) -> "KronFactors":
        return replace(self, scale=self.scale * s)


def _lycoris_dim(tensors: Dict[str, torch.Tensor]) -> Optional[int]:
    """The `dim` of alpha / dim in a LoKr file (kohya names): the rank of its factorised parts (w2_b's, else w1_b's,
    as ComfyUI reads it; LyCORIS reads the same); None when w1 and w2 are both full (then the scale is 1)."""
    for name in ("lokr_w2_b", "lokr_w1_b"):
        if name in tensors:
            return tensors[name].shape[0]
    return None


def _infer_options(f: Dict[str, torch.Tensor], shape: Tuple[int, ...], where: str
                   ) -> Tuple[int, int, bool, bool, str]:
    """(rank, factor, decompose_both, tucker, split) whose lokr_shapes are the shapes of factors `f`, or an error."""
    tucker, both = "t2" in f, "w1_a" in f
    a, c = (f["w1"].shape if "w1" in f else (f["w1_a"].shape[0], f["w1_b"].shape[1]))
    if "w1_a" in f:
        rank = f["w1_a"].shape[1]
    elif "w2_a" in f:
        rank = f["w2_a"].shape[0 if tucker else 1]
    else:  # both full: any rank >= max(b, d) / 2 gives that
        rank = max(shape[0] // a, shape[1] // c)
    got = {n: tuple(v.shape) for n, v in f.items()}
    for split in SPLITS:
        for factor in dict.fromkeys((-1, a, c, max(a, c), min(a, c), shape[0] // a, shape[1] // c)):
            if (factor >= 1 or factor == -1) and lokr_shapes(shape, rank, factor, both, tucker, split) == got:
                return rank, factor, both, tucker, split
    raise AdapterDirError(f"{where}: LoKr factors {got} do not fit a weight of shape {shape} under LyCORIS' and peft's "
                          "factorisation rules (e.g. LyCORIS' unbalanced_factorization, or a file made for another "
                          "model)")


def _check_factor(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (value == -1 or value >= 1):
        raise AdapterConfigError(f"{where} must be -1 (divisors nearest each other) or a positive integer, "
                                 f"got {value!r}")
    return value


@dataclass(frozen=True)
class LoKrOptions(LowRankOptions):
    factor: int = custom_option(_check_factor, "-1 or a positive integer", -1,
                                help="split out and in as factor x dim/factor (-1: the divisors nearest each other)")
    decompose_both: bool = bool_option(False, help="also write the small factor w1 as a rank-`rank` product")
    tucker: bool = tucker_option()
    split: str = choice_option(SPLITS, "lycoris", help="with factor > sqrt(dim): the smaller part goes to w1 "
                                                       "(lycoris) or factor does (peft)")


class LoKr(ProjectionForm):
    """Kronecker product of a small and a (low-rank) large factor, on a Linear or Conv2d (LyCORIS / peft LoKr)."""
    NAME = "lokr"
    TITLE = "LoKr"
    Options = LoKrOptions
    SIZE = "rank"
    UPDATE = KronFactors
    HOSTS = "Linear or Conv2d"

    @classmethod
    def takes(cls, m: nn.Module) -> bool:
        return is_weight_layer(m)

    @classmethod
    def shapes(cls, spec: AdapterSpec, shape: Tuple[int, ...]) -> Shapes:
        o = spec.options
        return lokr_shapes(shape, o.rank, o.factor, o.decompose_both, o.tucker, o.split)

    @classmethod
    def parameter_count(cls, spec: AdapterSpec, dim_in: int, dim_out: int, kernel: Tuple[int, ...] = ()) -> int:
        return sum(math.prod(s) for s in cls.shapes(spec, (dim_out, dim_in, *kernel)).values())

    def __init__(self, spec: AdapterSpec, host: nn.Module):
        super().__init__()
        self.scaling = spec.options.alpha / spec.options.rank
        self.shape = tuple(host.weight.shape)
        for name, shape in self.shapes(spec, self.shape).items():
            w = torch.empty(shape)
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            self.register_parameter(name, nn.Parameter(w))

    def zero_init_(self) -> None:
        nn.init.zeros_(self.w2 if hasattr(self, "w2") else self.w2_b)

    def factors(self) -> Dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in NAMES if hasattr(self, n)}

    def delta_weight(self, host: nn.Module) -> torch.Tensor:
        return self.scaling * kron_delta(self.factors(), self.shape)

    def forward(self, x: torch.Tensor, y: torch.Tensor, host: nn.Module) -> torch.Tensor:
        return weight_forward(host, x, self.delta_weight(host).to(x.dtype))  # ΔW x: (..., out) / (b, out, h, w)

    def update(self, scale: float = 1.0, host: Optional[nn.Module] = None) -> KronFactors:
        o = self.spec.options
        return KronFactors(self.factors(), self.scaling * scale, self.shape, o.rank, o.factor, o.decompose_both,
                           o.tucker, o.split)
