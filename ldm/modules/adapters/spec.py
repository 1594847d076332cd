"""One validated adapter config entry (`AdapterSpec`) and the package's errors."""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from ldm.checks import check_number as check_any_number
from ldm.modules.adapters.positions import PROJECTION


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()  # a field default meaning "must be given"
INITS = ("zero", "default")  # zero: the form starts as the identity; default: PyTorch's init (the paper's code)
DEFAULT_GROUP = "default"


class AdapterConfigError(ValueError):
    """An adapter config, or an adapter directory or file, that is invalid or does not fit the model."""


class AdapterDirError(AdapterConfigError):
    """An adapter directory or file that is missing, damaged, or made for another model or adapter config."""


@dataclass(frozen=True)
class AdapterSpec:
    """One validated config entry: which modules (`kind`), the form (`type`), where it reads and writes, its size.

    Projection forms have no din/dout (None): their `target` option says where they go. `options` is the form's
    typed `Options` (ldm.modules.adapters.options), e.g. BottleneckOptions(mid_dim=60, method="default"): the one
    checked copy of the form's fields, read as `spec.options.mid_dim`.
    """
    kind: str
    type: str
    din: Optional[str]
    dout: Optional[str]
    scale: float
    init: str
    options: Any  # the form's Options instance (frozen, so specs compare and hash by value)

    def layout(self) -> tuple:
        """What fixes the weights' meaning and shapes (scale and init do not)."""
        return self.kind, self.type, self.din, self.dout, self.options

    def describe(self) -> str:
        where = [] if self.kind == PROJECTION else [f"{self.din}->{self.dout}"]
        return " ".join(where + [self.type] + [f"{k} {_short(v)}" for k, v in self.options.items()])

    def to_dict(self) -> Dict[str, Any]:
        where = {} if self.kind == PROJECTION else {"din": self.din, "dout": self.dout}
        return {"type": self.type, **where, **self.options.to_dict(), "scale": self.scale, "init": self.init}


def _short(value: Any) -> str:
    """A config value for one-line summaries: long target lists are cut."""
    if isinstance(value, tuple):
        return ",".join(value[:4]) + (f",+{len(value) - 4} more" if len(value) > 4 else "")
    return str(value)


def describe(specs: List[AdapterSpec]) -> str:
    """A one-line summary of specs for logs and errors, e.g. "attn2o->ffni inout mid_dim 60 method default"."""
    return ", ".join(s.describe() for s in specs) or "no adapters"


def check_number(value: Any, where: str, **limits: Any) -> Any:
    """`value` if it is a finite number in the range (`ldm.checks.check_number`'s limits), else an
    AdapterConfigError naming the field and the range."""
    return check_any_number(value, where, error=AdapterConfigError, **limits)
