"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685) and LoCon (LoRA on
convolutions, LyCORIS: Yeh et al. 2023, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
Evaluation", arXiv 2309.14859) as projection forms of the adapter design space:
y = W x + scale * (alpha / rank) * up(down(dropout(x))), with up zero at init.

On a Linear, down and up are Linear(in -> rank) and Linear(rank -> out); on a convolution (LoCon) down is a convolution
with the host's kernel, stride and padding and up a 1x1 conv, so their weights have the shapes kohya / LyCORIS files
use ([rank, in, kh, kw], [out, rank, 1, 1]). With `tucker` (LyCORIS' use_tucker, kohya's `lora_mid`) a kxk host gets
down 1x1 [rank, in, 1, 1], mid kxk [rank, rank, kh, kw], up 1x1. Keys: `<module>.adapters.<group>.<i>.down.weight`,
`.mid.weight`, `.up.weight`. `LoRAFactors` is one module's update as plain tensors, the form that merging, files and
LoRA + LoRA arithmetic work on.
"""
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ldm.modules.adapters.base import ProjectionForm, ProjectionOptions, Update, is_weight_layer
from ldm.modules.adapters.options import bool_option, int_option, number_option
from ldm.modules.adapters.spec import AdapterConfigError, AdapterDirError, AdapterSpec


def kernel_of(host: nn.Module) -> Tuple[int, ...]:
    """The host's kernel size: () for a Linear, (kh, kw) for a convolution."""
    return tuple(host.weight.shape[2:])


def low_rank_delta(down: torch.Tensor, up: torch.Tensor, mid: Optional[torch.Tensor]) -> torch.Tensor:
    """up @ down in fp32, shaped like the host weight: (out, in) or (out, in, kh, kw); with a Tucker `mid` (rank, rank,
    kh, kw) between the 1x1 down and up."""
    u, d = up.flatten(1).float(), down.flatten(1).float()
    if mid is None:
        return (u @ d).view(u.shape[0], down.shape[1], *down.shape[2:])
    return torch.einsum("oa,abhw,bi->oihw", u, mid.float(), d)


@dataclass(frozen=True)
class LoRAFactors(Update):
    """One module's update ΔW = alpha / rank * up @ down, down (rank, in[, kh, kw]) and up (out, rank[, 1, 1]); or,
    with a Tucker `mid` (rank, rank, kh, kw), ΔW = alpha / rank * up ×mid× down (LyCORIS' lora_mid)."""
    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    mid: Optional[torch.Tensor] = None

    KOHYA_TENSORS = frozenset({"lora_down.weight", "lora_up.weight"})
    KOHYA_OPTIONAL = frozenset({"alpha", "lora_mid.weight"})
    DIFFUSERS_SUFFIXES = {".lora_A.weight": "lora_down.weight", ".lora_B.weight": "lora_up.weight",
                          ".lora.down.weight": "lora_down.weight", ".lora.up.weight": "lora_up.weight",
                          ".lora_linear_layer.down.weight": "lora_down.weight",
                          ".lora_linear_layer.up.weight": "lora_up.weight", ".alpha": "alpha"}
    PEFT_TYPE = "LORA"
    MIXABLE = True

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """ΔW in fp32, shaped like the module's weight: (out, in) or (out, in, kh, kw)."""
        return (self.alpha / self.rank) * low_rank_delta(self.down, self.up, self.mid)

    def scaled(self, s: float) -> "LoRAFactors":
        """The same update times s."""
        return replace(self, alpha=self.alpha * s)

    def folded(self) -> "LoRAFactors":
        """The same update with alpha / rank folded into up, so alpha = rank."""
        return replace(self, up=self.up * (self.alpha / self.rank), alpha=float(self.rank))

    # ---- files --------------------------------------------------------------------------------------------------
    @classmethod
    def rank_of(cls, tensors: Dict[str, torch.Tensor]) -> Optional[int]:
        return tensors["lora_down.weight"].shape[0]

    @classmethod
    def from_tensors(cls, tensors: Dict[str, torch.Tensor], host: nn.Module, where: str) -> "LoRAFactors":
        """kohya / LyCORIS tensors (lora_down.weight, lora_up.weight[, lora_mid.weight, alpha]) checked against the
        module they go on."""
        down, up, mid = tensors["lora_down.weight"], tensors["lora_up.weight"], tensors.get("lora_mid.weight")
        kernel = kernel_of(host)
        if kernel and down.dim() == 2 and up.dim() == 2:  # a Linear-shaped LoRA of a 1x1 conv: the same map
            down, up = down[..., None, None], up[..., None, None]
        rank, n_out, n_in = down.shape[0], host.weight.shape[0], host.weight.shape[1]
        ones = (1,) * len(kernel)
        want_down = (rank, n_in, *(ones if mid is not None else kernel))
        fits = tuple(down.shape) == want_down and tuple(up.shape) == (n_out, rank, *ones)
        if mid is not None:
            fits = fits and bool(kernel) and tuple(mid.shape) == (rank, rank, *kernel)
        if not fits:
            mid_text = "" if mid is None else f", lora_mid {tuple(mid.shape)}"
            raise AdapterDirError(f"{where}: lora_down {tuple(down.shape)}, lora_up {tuple(up.shape)}{mid_text} do not "
                                  f"fit a {'x'.join(map(str, kernel)) + ' ' if kernel else ''}{type(host).__name__} "
                                  f"with {n_in} inputs and {n_out} outputs: the file was made for another model")
        alpha = float(tensors["alpha"]) if "alpha" in tensors else float(rank)  # kohya: no alpha means alpha = rank
        return cls(down, up, alpha, mid)

    @classmethod
    def with_scale(cls, tensors: Dict[str, torch.Tensor], scale: float) -> Dict[str, torch.Tensor]:
        """The tensors with the strength a peft config gives them (scale = lora_alpha / r) as kohya's alpha."""
        return {**tensors, "alpha": torch.tensor(scale * cls.rank_of(tensors))}

    def kohya_tensors(self, key: str) -> Dict[str, torch.Tensor]:
        mid = {} if self.mid is None else {f"{key}.lora_mid.weight": self.mid}
        return {f"{key}.lora_down.weight": self.down, f"{key}.lora_up.weight": self.up, **mid,
                f"{key}.alpha": torch.tensor(self.alpha)}

    def diffusers_tensors(self, key: str) -> Dict[str, torch.Tensor]:
        if self.mid is not None:
            raise AdapterConfigError(f"{key}: a LoCon with a Tucker mid weight (lora_mid) has no diffusers / peft "
                                     "form; write it as a kohya / LyCORIS file")
        f = self.folded()  # peft's files carry no alpha: alpha / rank goes into lora_B
        return {f"{key}.lora_A.weight": f.down, f"{key}.lora_B.weight": f.up}

    def peft_tensors(self, key: str) -> Dict[str, torch.Tensor]:
        return self.diffusers_tensors(key)

    def peft_config(self) -> Dict[str, Any]:
        return {"use_dora": False}

    def layout(self) -> tuple:
        conv = self.mid is not None or any(k != 1 for k in self.down.shape[2:])
        return ("locon" if conv else "lora"), self.rank, self.alpha, self.mid is not None

    def config_entry(self, targets: list) -> Dict[str, Any]:
        name, rank, alpha, tucker = self.layout()
        return {"type": name, "target": targets, "rank": rank, "alpha": alpha,
                **({"tucker": True} if tucker else {})}

    def adapter_tensors(self, host: nn.Module) -> Dict[str, torch.Tensor]:
        mid = {} if self.mid is None else {"mid.weight": self.mid}
        down, up = self.down, self.up
        if isinstance(host, nn.Linear):  # our Linear hosts take 2-D factors
            down, up = down.flatten(1), up.flatten(1)
        return {"down.weight": down, "up.weight": up, **mid}

    # ---- arithmetic ---------------------------------------------------------------------------------------------
    @classmethod
    def combine(cls, parts: List["LoRAFactors"], where: str) -> "LoRAFactors":
        return parts[0] if len(parts) == 1 else stack_factors(parts)

    def lpl_mix(self, other: "LoRAFactors", alpha: float) -> "LoRAFactors":
        return mix_factors(self, other, alpha)

    @classmethod
    def exact_sum(cls, weighted: List[Tuple["LoRAFactors", float]]) -> "LoRAFactors":
        return stack_factors([f.scaled(w) for f, w in weighted])


def _no_mid(parts: List[LoRAFactors], what: str) -> None:
    if any(p.mid is not None for p in parts):
        raise AdapterConfigError(f"{what} works on plain low-rank factors; a LoCon with a Tucker mid weight (lora_mid) "
                                 "cannot be stacked or mixed: merge it into a checkpoint with --mode upl instead")


def stack_factors(parts: List[LoRAFactors]) -> LoRAFactors:
    """One LoRA whose ΔW is exactly the sum of the parts' ΔWs: ranks concatenated, each alpha/rank folded into up."""
    _no_mid(parts, "adding LoRAs")
    parts = [p.folded() for p in parts]
    return LoRAFactors(torch.cat([p.down for p in parts]), torch.cat([p.up for p in parts], dim=1),
                       float(sum(p.rank for p in parts)))


def mix_factors(a: LoRAFactors, b: LoRAFactors, alpha: float) -> LoRAFactors:
    """cloneofsimo `lora_add --mode lpl`: up = α·up_a + (1-α)·up_b and down = α·down_a + (1-α)·down_b, after
    folding each alpha / rank into up. ΔW is then (α·up_a + (1-α)·up_b)(α·down_a + (1-α)·down_b), with cross terms."""
    _no_mid([a, b], "lpl")
    if a.down.shape != b.down.shape or a.up.shape != b.up.shape:
        raise AdapterConfigError(f"lpl mixes factors of equal shapes, got down {tuple(a.down.shape)} vs "
                                 f"{tuple(b.down.shape)} (ranks {a.rank} and {b.rank}); use the exact mode instead")
    a, b = a.folded(), b.folded()
    return LoRAFactors(alpha * a.down + (1 - alpha) * b.down, alpha * a.up + (1 - alpha) * b.up, float(a.rank))


@dataclass(frozen=True)
class LowRankOptions(ProjectionOptions):
    """The fields of every low-rank form (LoRA, LoCon, LoHa, LoKr, DoRA)."""
    rank: int = int_option(help="the rank r of the update (LoHa: of each factor; LoKr: of the large factor)")
    alpha: Optional[float] = number_option(None, optional=True, low=0, low_open=True, hint="omit it for alpha = rank",
                                           help="the update is scaled by alpha / rank (null: alpha = rank, scale 1)")

    def normalised(self, where: str) -> "LowRankOptions":
        return self if self.alpha is not None else replace(self, alpha=float(self.rank))


def tucker_option() -> Any:
    return bool_option(False, help="on kxk convolutions: factor the kernel through a rank x rank x kh x kw core "
                                   "(LyCORIS use_tucker / lora_mid, peft use_effective_conv2d)")


@dataclass(frozen=True)
class LoRAOptions(LowRankOptions):
    dropout: float = number_option(0.0, low=0, high=1, high_open=True, help="dropout on the input of the update")


class LoRA(ProjectionForm):
    """Low-rank update of a Linear or 1x1 Conv2d: `rank`, `alpha` (default: rank, i.e. scaling 1), `dropout` on x."""
    NAME = "lora"
    TITLE = "LoRA"
    Options = LoRAOptions
    SIZE = "rank"
    UPDATE = LoRAFactors

    @classmethod
    def parameter_count(cls, spec: AdapterSpec, dim_in: int, dim_out: int, kernel: Tuple[int, ...] = ()) -> int:
        r, area = spec.options.rank, _area(kernel)
        if getattr(spec.options, "tucker", False) and area > 1:
            return r * (dim_in + r * area + dim_out)
        return r * (dim_in * area + dim_out)

    def __init__(self, spec: AdapterSpec, host: nn.Module):
        super().__init__()
        rank = spec.options.rank
        self.scaling = spec.options.alpha / rank
        self.dropout = nn.Dropout(getattr(spec.options, "dropout", 0.0))
        self.mid = None
        if isinstance(host, nn.Linear):
            self.down = nn.Linear(host.in_features, rank, bias=False)
            self.up = nn.Linear(rank, host.out_features, bias=False)
            return
        conv = dict(stride=host.stride, padding=host.padding, dilation=host.dilation, bias=False)
        if getattr(spec.options, "tucker", False) and _area(host.kernel_size) > 1:
            self.down = nn.Conv2d(host.in_channels, rank, 1, bias=False)
            self.mid = nn.Conv2d(rank, rank, host.kernel_size, **conv)
        else:
            self.down = nn.Conv2d(host.in_channels, rank, host.kernel_size, **conv)
        self.up = nn.Conv2d(rank, host.out_channels, 1, bias=False)

    def zero_init_(self) -> None:
        nn.init.zeros_(self.up.weight)  # down (and mid) keep PyTorch's kaiming init, as in the paper

    def lora(self, x: torch.Tensor) -> torch.Tensor:
        """(alpha / rank) * up(mid(down(dropout(x)))): (..., in) -> (..., out); convs (b, c, h, w) -> (b, c', h', w')"""
        h = self.down(self.dropout(x))
        return self.scaling * self.up(h if self.mid is None else self.mid(h))

    def forward(self, x: torch.Tensor, y: torch.Tensor, host: nn.Module) -> torch.Tensor:
        return self.lora(x)

    def factors(self) -> LoRAFactors:
        mid = None if self.mid is None else self.mid.weight
        return LoRAFactors(self.down.weight, self.up.weight, self.scaling * self.down.weight.shape[0], mid)

    def update(self, scale: float = 1.0, host: Optional[nn.Module] = None) -> LoRAFactors:
        return self.factors().scaled(scale)

    def delta_weight(self, host: nn.Module) -> torch.Tensor:
        return self.factors().delta()


def _area(kernel: Tuple[int, ...]) -> int:
    area = 1
    for k in kernel:
        area *= k
    return area


@dataclass(frozen=True)
class LoConOptions(LoRAOptions):
    tucker: bool = tucker_option()


class LoCon(LoRA):
    """LoRA on any Linear or (ungrouped) Conv2d, ResBlock and sampler 3x3 convolutions included (LyCORIS' LoCon)."""
    NAME = "locon"
    TITLE = "LoCon"
    Options = LoConOptions
    HOSTS = "Linear or Conv2d"

    @classmethod
    def takes(cls, m: nn.Module) -> bool:
        return is_weight_layer(m)
