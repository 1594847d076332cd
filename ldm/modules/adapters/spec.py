"""One validated adapter config entry (`AdapterSpec`), the package's errors and the field checks forms share."""
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from ldm.modules.adapters.positions import PROJECTION

REQUIRED = object()  # a field default meaning "must be given"
INITS = ("zero", "default")  # zero: the form starts as the identity; default: PyTorch's init (the paper's code)
DEFAULT_GROUP = "default"


class AdapterConfigError(ValueError):
    """An adapter config, or an adapter directory or file, that is invalid or does not fit the model."""


class AdapterDirError(AdapterConfigError):
    """An adapter directory or file that is missing, damaged, or made for another model or adapter config."""


@dataclass(frozen=True)
class AdapterSpec:
    """One validated config entry: which modules (`kind`), the form (`type`), where it reads and writes, its size.

    Projection forms have no din/dout (None): their `target` option says where they go.
    """
    kind: str
    type: str
    din: Optional[str]
    dout: Optional[str]
    scale: float
    init: str
    options: Tuple[Tuple[str, Any], ...] = ()  # form-specific fields, e.g. (("mid_dim", 60), ("method", "default"))

    def layout(self) -> tuple:
        """What fixes the weights' meaning and shapes (scale and init do not)."""
        return self.kind, self.type, self.din, self.dout, self.options

    def option(self, key: str) -> Any:
        return dict(self.options)[key]

    def describe(self) -> str:
        where = [] if self.kind == PROJECTION else [f"{self.din}->{self.dout}"]
        return " ".join(where + [self.type] + [f"{k} {_short(v)}" for k, v in self.options])

    def to_dict(self) -> Dict[str, Any]:
        where = {} if self.kind == PROJECTION else {"din": self.din, "dout": self.dout}
        options = {k: list(v) if isinstance(v, tuple) else v for k, v in self.options}
        return {"type": self.type, **where, **options, "scale": self.scale, "init": self.init}


def _short(value: Any) -> str:
    """A config value for one-line summaries: long target lists are cut."""
    if isinstance(value, tuple):
        return ",".join(value[:4]) + (f",+{len(value) - 4} more" if len(value) > 4 else "")
    return str(value)


def describe(specs: List[AdapterSpec]) -> str:
    """A one-line summary of specs for logs and errors, e.g. "attn2o->ffni inout mid_dim 60 method default"."""
    return ", ".join(s.describe() for s in specs) or "no adapters"


# ---- field checks -----------------------------------------------------------------------------------------------
def check_positive_int(value: Any, where: str) -> int:
    """`value` if it is an int > 0, else an error naming the field."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterConfigError(f"{where} must be a positive integer, got {value!r}")
    return value


def check_number(value: Any, where: str, low: float = -math.inf, high: float = math.inf, low_open: bool = False,
                 high_open: bool = False, hint: str = "") -> float:
    """`value` as a float if it is a finite number in the range, else an error naming the field and the range."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        if (low, low_open, high) == (0, True, math.inf):
            what = "a positive number"
        elif (low, high) == (-math.inf, math.inf):
            what = "a number"
        else:
            what = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise AdapterConfigError(f"{where} must be {what}{f' ({hint})' if hint else ''}, got {value!r}")
    return float(value)


def check_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise AdapterConfigError(f"{where} must be true or false, got {value!r}")
    return value
