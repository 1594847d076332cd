"""What every function form of the adapter design space answers for itself.

A form is a small `nn.Module` class listed in `ldm.modules.adapters.schema.FORMS`. It declares its config fields
(`OPTIONS`), validates them (`check`), starts as a no-op (`zero_init_`), counts its parameters without being built
(`parameter_count`), and says what it can become beyond its forward: a change of the host's weight (`delta_weight`,
for merging) and a plain-tensor `Update` (for kohya / diffusers files and LoRA arithmetic). A form that cannot do one of
these inherits the refusal here, with the reason, so nothing else in the package branches on a form's type.

Block forms (`KIND` "transformer" / "resblock") are built as `cls(spec, dim_in, dim_out)` and map the tensor at din
(width dim_in) to the addend for dout (width dim_out). Projection forms (`KIND` "projection") are built as
`cls(spec, host)` for a Linear / 1x1 Conv2d `host` and map (x, y, host) to an addend for y = host(x).
"""
import re
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from ldm.modules.adapters.positions import PROJECTION
from ldm.modules.adapters.spec import INITS, REQUIRED, AdapterConfigError, AdapterSpec

KEEP_AS_DIRECTORY = "keep it as an adapter directory"


class AdapterForm(nn.Module):
    """Base class of the function forms."""
    KIND = ""          # "transformer", "resblock" or "projection"
    NAME = ""          # the config's `type`
    TITLE = ""         # its name in messages
    OPTIONS: Dict[str, Any] = {}  # form-specific fields: REQUIRED or a default
    INITS = INITS      # the allowed `init` values
    READS_BASE = ""    # what it does with the host's weight, when its addend depends on it (merging under it changes it)
    spec: AdapterSpec

    @classmethod
    def check(cls, options: Dict[str, Any], where: str) -> Dict[str, Any]:
        """The form's fields, validated and normalised (an error names the field)."""
        return options

    @classmethod
    def parameter_count(cls, spec: AdapterSpec, dim_in: int, dim_out: int) -> int:
        """Parameters of this form for `spec` between widths dim_in and dim_out (a projection: its host's in/out)."""
        raise NotImplementedError

    def zero_init_(self) -> None:
        """Make the form's output zero, so a fresh adapter leaves the model unchanged."""
        raise NotImplementedError

    def delta_weight(self, host: nn.Module) -> torch.Tensor:
        """ΔW (fp32, host.weight's shape) with host(x) + self(x, host(x), host) = (W + ΔW) x."""
        raise AdapterConfigError(f"{self.describe_form()} cannot be folded into the weights (only linear updates of a "
                                 f"projection can, such as LoRA and (IA)^3 without learn_biases); {KEEP_AS_DIRECTORY}")

    def update(self, scale: float = 1.0) -> "Update":
        """The form's update at `scale` as plain tensors, for kohya / diffusers files and LoRA arithmetic."""
        raise AdapterConfigError(f"{self.describe_form()} has no kohya / diffusers file form (those files hold LoRA "
                                 f"and (IA)^3 updates of projections); {KEEP_AS_DIRECTORY}")

    def describe_form(self) -> str:
        spec = getattr(self, "spec", None)
        return f"the {self.TITLE} {spec.describe() if spec else self.NAME}"


class ProjectionForm(AdapterForm):
    """A form on Linear / 1x1 Conv2d modules, chosen by `target`: a list of names (each matching the module paths
    equal to it or ending with "." + it) or one regular expression matched in full against the paths."""
    KIND = PROJECTION
    OPTIONS: Dict[str, Any] = {"target": REQUIRED}
    UPDATE: Optional[type] = None  # its plain-tensor Update class, when it has one

    @classmethod
    def check(cls, options: Dict[str, Any], where: str) -> Dict[str, Any]:
        target = options["target"]
        if isinstance(target, str):
            try:
                re.compile(target)
            except re.error as e:
                raise AdapterConfigError(f"{where}.target: {target!r} is not a valid regular expression "
                                         f"({e})") from None
            return options
        if not isinstance(target, (list, tuple)) or not target or not all(isinstance(t, str) and t for t in target):
            raise AdapterConfigError(f"{where}.target must be a list of module names (e.g. [attn1.to_q, attn1.to_v]) "
                                     f"or one regular expression string, got {target!r}")
        return {**options, "target": tuple(target)}


class Update:
    """One module's update as plain tensors: what files hold and what LoRA arithmetic works on.

    Each subclass says how it is written (`kohya_tensors`, `diffusers_tensors`), recognised and read back
    (`KOHYA_TENSORS`, `from_tensors`), turned into a config entry and adapter weights (`layout`, `config_entry`,
    `adapter_tensors`), scaled, combined with others on the same module (`combine`), and, for LoRA, mixed with
    another LoRA (`lpl_mix`, `exact_sum`).
    """
    KOHYA_TENSORS: frozenset = frozenset()  # tensor names (after the module name) that mark this update in a file
    KOHYA_OPTIONAL: frozenset = frozenset()  # tensor names it may also have
    DIFFUSERS_SUFFIXES: Dict[str, str] = {}  # diffusers / peft key suffix -> kohya tensor name
    MIXABLE = False  # whether cloneofsimo's LoRA + LoRA arithmetic (lpl, exact) applies

    @classmethod
    def claims(cls, names: frozenset) -> bool:
        """Whether a module's tensors (kohya names) are an update of this class."""
        return cls.KOHYA_TENSORS <= names <= cls.KOHYA_TENSORS | cls.KOHYA_OPTIONAL

    @classmethod
    def from_tensors(cls, tensors: Dict[str, torch.Tensor], host: nn.Module, where: str) -> "Update":
        raise NotImplementedError

    def kohya_tensors(self, key: str) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def diffusers_tensors(self, key: str) -> Dict[str, torch.Tensor]:
        raise AdapterConfigError(f"diffusers' loaders take LoRA only: write {type(self).__name__} updates as a kohya "
                                 f"file (A1111, ComfyUI, LyCORIS read it) or {KEEP_AS_DIRECTORY}")

    def layout(self) -> tuple:
        """Updates with equal layouts share one config entry."""
        raise NotImplementedError

    def config_entry(self, targets: list) -> Dict[str, Any]:
        raise NotImplementedError

    def adapter_tensors(self) -> Dict[str, torch.Tensor]:
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
