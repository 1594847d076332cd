"""What every function form of the adapter design space answers for itself.

A form is a small `nn.Module` class listed in `ldm.modules.adapters.schema.FORMS`. It declares its config fields as a
typed dataclass (`Options`, with defaults, ranges and help), starts as a no-op (`zero_init_`), counts its parameters
without being built (`parameter_count`), names the field that sizes it (`SIZE`, for parameter budgets), and says what
it can become beyond its forward: a change of the host's weight (`delta_weight`, for merging) and a plain-tensor
`Update` (for kohya / LyCORIS / diffusers / peft files and LoRA arithmetic). A form that cannot do one of these inherits
the refusal here, with the reason, so nothing else in the package branches on a form's type.

Block forms (`KIND` "transformer" / "resblock") are built as `cls(spec, dim_in, dim_out)` and map the tensor at din
(width dim_in) to the addend for dout (width dim_out). Projection forms (`KIND` "projection") are built as
`cls(spec, host)` for a module the form `takes` (Linear / 1x1 Conv2d; some forms any Conv2d) and map (x, y, host) to an
addend for y = host(x).
"""
import re
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.adapters.options import Options, custom_option
from ldm.modules.adapters.positions import PROJECTION
from ldm.modules.adapters.spec import INITS, AdapterConfigError, AdapterDirError, AdapterSpec

KEEP_AS_DIRECTORY = "keep it as an adapter directory"


class AdapterForm(nn.Module):
    """Base class of the function forms."""
    KIND = ""          # "transformer", "resblock" or "projection"
    NAME = ""          # the config's `type`
    TITLE = ""         # its name in messages
    Options: Type[Options] = Options  # its config fields (a frozen dataclass; see ldm.modules.adapters.options)
    SIZE: Optional[str] = None  # the integer field that sets its size (mid_dim, rank), for parameter budgets
    INITS = INITS      # the allowed `init` values
    READS_BASE = ""    # what it does with the host's weight, when its addend depends on it (merging under it changes it)
    spec: AdapterSpec

    @classmethod
    def parameter_count(cls, spec: AdapterSpec, dim_in: int, dim_out: int, kernel: Tuple[int, ...] = ()) -> int:
        """Parameters of this form for `spec` between widths dim_in and dim_out (a projection: its host's in/out, and
        the kernel size of a convolution host)."""
        raise NotImplementedError

    def zero_init_(self) -> None:
        """Make the form's output zero, so a fresh adapter leaves the model unchanged."""
        raise NotImplementedError

    def delta_weight(self, host: nn.Module) -> torch.Tensor:
        """ΔW (fp32, host.weight's shape) with host(x) + self(x, host(x), host) = (W + ΔW) x."""
        raise AdapterConfigError(f"{self.describe_form()} cannot be folded into the weights (only linear updates of a "
                                 f"module can, such as LoRA, LoCon, LoHa, LoKr, DoRA and (IA)^3 without learn_biases); "
                                 f"{KEEP_AS_DIRECTORY}")

    def update(self, scale: float = 1.0, host: Optional[nn.Module] = None) -> "Update":
        """The form's update at `scale` as plain tensors, for kohya / diffusers files and LoRA arithmetic (`host`: the
        module it sits on, for updates stated relative to its weight)."""
        raise AdapterConfigError(f"{self.describe_form()} has no kohya / LyCORIS / diffusers / peft file form (those "
                                 f"files hold linear updates of a module's weight); {KEEP_AS_DIRECTORY}")

    def describe_form(self) -> str:
        spec = getattr(self, "spec", None)
        return f"the {self.TITLE} {spec.describe() if spec else self.NAME}"


def check_target(target: Any, where: str) -> Union[str, Tuple[str, ...]]:
    """A list of module names (as a tuple) or one valid regular expression."""
    if isinstance(target, str):
        try:
            re.compile(target)
        except re.error as e:
            raise AdapterConfigError(f"{where}: {target!r} is not a valid regular expression ({e})") from None
        return target
    if not isinstance(target, (list, tuple)) or not target or not all(isinstance(t, str) and t for t in target):
        raise AdapterConfigError(f"{where} must be a list of module names (e.g. [attn1.to_q, attn1.to_v]) "
                                 f"or one regular expression string, got {target!r}")
    return tuple(target)


@dataclass(frozen=True)
class ProjectionOptions(Options):
    """Where a projection form goes."""
    target: Any = custom_option(check_target, "a list of module names, or one regular expression", help=(
        "the modules: names matching the paths equal to them or ending in '.' + name, or one regex matched in full"))


def is_projection(m: nn.Module) -> bool:
    """A Linear, or a Conv2d that acts as one on every pixel (1x1 kernel, stride 1, no padding, one group)."""
    if isinstance(m, nn.Linear):
        return True
    return (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.dilation == (1, 1)
            and m.padding in ((0, 0), "valid") and m.groups == 1)


def is_weight_layer(m: nn.Module) -> bool:
    """A Linear or an ungrouped Conv2d of any kernel: the modules whose weight a linear update can change."""
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


def weight_forward(host: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`host`'s operation on x with another weight (no bias): x @ weight.T, or the convolution with the host's stride,
    padding and dilation."""
    if isinstance(host, nn.Linear):
        return F.linear(x, weight)
    return F.conv2d(x, weight, None, host.stride, host.padding, host.dilation, host.groups)


class ProjectionForm(AdapterForm):
    """A form on the Linear / 1x1 Conv2d modules (or, when it `takes` them, other convolutions) chosen by `target`: a
    list of names (each matching the module paths equal to it or ending with "." + it) or one regular expression
    matched in full against the paths."""
    KIND = PROJECTION
    Options = ProjectionOptions
    UPDATE: Optional[type] = None  # its plain-tensor Update class, when it has one
    HOSTS = "Linear or 1x1 Conv2d"  # what it takes, in messages

    @classmethod
    def takes(cls, m: nn.Module) -> bool:
        """Whether the form can sit on module `m`."""
        return is_projection(m)


class Update:
    """One module's update as plain tensors: what files hold and what LoRA arithmetic works on.

    Each subclass says how it is written (`kohya_tensors`: kohya / A1111 / LyCORIS names; `diffusers_tensors`;
    `peft_tensors` with its `PEFT_TYPE`), recognised and read back (`KOHYA_TENSORS`, `from_tensors`; `rank_of` and
    `with_scale` for the strength a peft config gives it), turned into a config entry and adapter weights (`layout`,
    `config_entry`, `adapter_tensors`), scaled, combined with others on the same module (`combine`), and, for LoRA,
    mixed with another LoRA (`lpl_mix`, `exact_sum`).
    """
    KOHYA_TENSORS: frozenset = frozenset()  # tensor names (after the module name) that mark this update in a file
    KOHYA_OPTIONAL: frozenset = frozenset()  # tensor names it may also have
    DIFFUSERS_SUFFIXES: Dict[str, str] = {}  # diffusers / peft key suffix -> kohya tensor name
    PEFT_TYPE = ""  # the peft_type of the peft folders that hold it ("" when peft has none we read)
    PEFT_DORA = False  # whether its peft config has use_dora
    MIXABLE = False  # whether cloneofsimo's LoRA + LoRA arithmetic (lpl, exact) applies

    @classmethod
    def claims(cls, names: frozenset) -> bool:
        """Whether a module's tensors (kohya names) are an update of this class."""
        return cls.KOHYA_TENSORS <= names <= cls.KOHYA_TENSORS | cls.KOHYA_OPTIONAL

    @classmethod
    def from_tensors(cls, tensors: Dict[str, torch.Tensor], host: nn.Module, where: str) -> "Update":
        raise NotImplementedError

    @classmethod
    def rank_of(cls, tensors: Dict[str, torch.Tensor]) -> Optional[int]:
        """The rank a peft config states for these tensors (None when they do not show it)."""
        return None

    @classmethod
    def with_scale(cls, tensors: Dict[str, torch.Tensor], scale: float) -> Dict[str, torch.Tensor]:
        """The tensors with the strength `scale` (a peft config's alpha / r) written the way kohya files state it."""
        raise AdapterDirError(f"{cls.__name__} updates take no strength from a peft config")

    def kohya_tensors(self, key: str) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def diffusers_tensors(self, key: str) -> Dict[str, torch.Tensor]:
        raise AdapterConfigError(f"diffusers' loaders take LoRA only: write {type(self).__name__} updates as a kohya "
                                 f"file (A1111, ComfyUI, LyCORIS read it), as a peft folder where peft has the form, "
                                 f"or {KEEP_AS_DIRECTORY}")

    def peft_tensors(self, key: str) -> Dict[str, torch.Tensor]:
        """The tensors of a peft folder (keys `<key>.<peft name>`), the strength folded in (the config says scale 1)."""
        raise AdapterConfigError(f"peft has no form for {type(self).__name__} updates that we write: write them as a "
                                 f"kohya / LyCORIS file or {KEEP_AS_DIRECTORY}")

    def peft_config(self) -> Dict[str, Any]:
        """This update's fields of the peft config (besides r and alpha, which are the rank and scale 1)."""
        return {}

    def layout(self) -> tuple:
        """Updates with equal layouts share one config entry."""
        raise NotImplementedError

    def config_entry(self, targets: list) -> Dict[str, Any]:
        raise NotImplementedError

    def adapter_tensors(self, host: nn.Module) -> Dict[str, torch.Tensor]:
        """The weights of the form `config_entry` builds on `host`, by parameter name."""
        raise NotImplementedError

    def scaled(self, s: float) -> "Update":
        raise NotImplementedError

    @classmethod
    def combine(cls, parts: list, where: str) -> "Update":
        """Several updates of this class on one module as one (the sum of their effects)."""
        if len(parts) == 1:
            return parts[0]
        raise AdapterConfigError(f"{where}: {len(parts)} {cls.__name__} updates on one module; a file holds one per "
                                 f"module: {KEEP_AS_DIRECTORY}")

    def lpl_mix(self, other: "Update", alpha: float) -> "Update":
        """lpl: the factors mixed, alpha * self + (1 - alpha) * other (LoRA only)."""
        raise AdapterConfigError(f"lpl and exact combine LoRAs, not {type(self).__name__} updates")

    @classmethod
    def exact_sum(cls, weighted: list) -> "Update":
        """exact: one update whose effect is exactly sum(w * effect) over [(update, w), ...] (LoRA only)."""
        raise AdapterConfigError(f"lpl and exact combine LoRAs, not {cls.__name__} updates")
