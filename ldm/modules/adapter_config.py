"""The `adapter_config` schema of the adapter design space: positions, validated specs, and the registry of function
forms (Xiang et al. 2023, arXiv 2303.18181, plus LoRA and (IA)^3). Attaching them to a model is `ldm.modules.adapters`.

One schema, the `adapter_config` of the UNet (`unet_config.params`) or of the text encoder (`cond_stage_config.params`,
projection forms only); each section is a mapping or a list of them, and the forms combine freely in one model:

    adapter_config:
      transformer_adp_config:   # the paper's block adapters: din -> dout inside every BasicTransformerBlock
        - {type: inout, din: attn2o, dout: ffni, mid_dim: 60, method: default, scale: 1.0, init: zero}
      resblock_adp_config: {type: inout, din: resi, dout: reso, mid_dim: 7}
      projection_adp_config:    # forms on Linear / 1x1 Conv2d modules
        - {type: lora, target: [to_q, to_k, to_v, to_out.0], rank: 4, alpha: 4.0, dropout: 0.0}
        - {type: ia3, target: [attn1.to_k, attn1.to_v, attn2.to_k, attn2.to_v]}
        - {type: ia3, target: [ff.net.2], on_input: true}

`target` is either a list of names, each matching every module whose path (relative to the network) is that name or
ends with "." + name, or one string: a regular expression matched in full against the paths of the network's Linear
and 1x1 Conv2d modules (peft's `target_modules` convention). `scale` multiplies the form's output; `init: zero` makes
a fresh adapter the identity. The fields of each form are its class's `OPTIONS` (`ldm.modules.lora`, `ldm.modules.ia3`).
"""
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch.nn as nn
from omegaconf import DictConfig, ListConfig, OmegaConf

# The residual stream of a BasicTransformerBlock in data-flow order; attn2c (the context) is a side input of attn2.
STREAM = ("attn1i", "attn1o", "attn2i", "attn2o", "ffni", "ffno", "transo")
POSITIONS = {
    "transformer": {"din": STREAM + ("attn2c",), "dout": ("attn1i", "attn2i", "ffni", "transo", "attn2c")},
    "resblock": {"din": ("resi", "reso"), "dout": ("resi", "reso")},
}
PROJECTION = "projection"  # the kind of the forms that sit on Linear / 1x1 Conv2d modules
# the paper's config keys, and ours for the projection forms
SECTIONS = {"transformer_adp_config": "transformer", "resblock_adp_config": "resblock",
            "projection_adp_config": PROJECTION}
METHODS = {"relu": nn.ReLU, "sig": nn.Sigmoid, "silu": nn.SiLU, "ident": nn.Identity, "default": nn.ReLU}
INITS = ("zero", "default")  # zero: the last layer starts at 0, so a fresh adapter is exactly the identity
DEFAULT_GROUP = "default"
REQUIRED = object()
COMMON_FIELDS = {"type": "inout", "din": REQUIRED, "dout": REQUIRED, "scale": 1.0, "init": "zero"}
KIND_FIELDS = {"transformer": COMMON_FIELDS, "resblock": COMMON_FIELDS,
               PROJECTION: {"type": REQUIRED, "scale": 1.0, "init": "zero"}}


class AdapterConfigError(ValueError):
    """An adapter config, or an adapter directory, that is invalid or does not fit the model."""


def is_valid_pair(kind: str, din: str, dout: str) -> bool:
    """Whether `dout` lies at or downstream of `din` in a `kind` block (attn2c pairs only with attn2c)."""
    if din not in POSITIONS[kind]["din"] or dout not in POSITIONS[kind]["dout"]:
        return False
    if "attn2c" in (din, dout):
        return din == dout
    order = STREAM if kind == "transformer" else POSITIONS["resblock"]["din"]
    return order.index(dout) >= order.index(din)


def valid_pairs() -> List[Tuple[str, str, str]]:
    """Every valid (kind, din, dout), in data-flow order."""
    return [(kind, i, o) for kind, pos in POSITIONS.items() for i in pos["din"] for o in pos["dout"]
            if is_valid_pair(kind, i, o)]


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


# ---- the registry of function forms: one small class each, by `type` per kind ------------------------------------
ADAPTER_TYPES: Dict[str, Dict[str, type]] = {kind: {} for kind in SECTIONS.values()}


def register(kind: str, name: str) -> Callable[[type], type]:
    """Class decorator: make a function form available to `kind` modules as `type: name`.

    A form declares its config fields in `OPTIONS` (REQUIRED or a default), validates them in `check`, may narrow the
    allowed `init`s in `INITS`, and has `zero_init_` to start as a no-op. A block form is built as
    `cls(spec, dim_in, dim_out)` and maps the tensor at din (width dim_in) to the addend for dout (width dim_out). A
    projection form is built as `cls(spec, host)` for its Linear / 1x1 Conv2d `host`, maps (x, y, host) to an addend
    for y = host(x), and gives `delta_weight(host)`, the equivalent change of host.weight, where one exists.
    """
    def wrap(cls: type) -> type:
        ADAPTER_TYPES[kind][name] = cls
        return cls
    return wrap


def check_positive_int(value: Any, where: str) -> int:
    """`value` if it is an int > 0, else an error naming the field."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterConfigError(f"{where} must be a positive integer, got {value!r}")
    return value


class BottleneckOptions:
    """Config fields shared by the paper's two `inout` forms: bottleneck width and activation."""
    OPTIONS = {"mid_dim": REQUIRED, "method": "default"}

    @classmethod
    def check(cls, options: Dict[str, Any], where: str) -> Dict[str, Any]:
        check_positive_int(options["mid_dim"], f"{where}.mid_dim")
        if options["method"] not in METHODS:
            raise AdapterConfigError(f"{where}.method: unknown method {options['method']!r}; "
                                     f"allowed: {', '.join(METHODS)}")
        return options


class ProjectionOptions:
    """The field every projection form has: `target`, the modules it goes on (names or a regex, see above)."""
    OPTIONS = {"target": REQUIRED}

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


# ---- config parsing ---------------------------------------------------------------------------------------------
def parse_adapter_config(config: Any) -> List[AdapterSpec]:
    """Validate an `adapter_config` (the paper's schema; sections may be a dict or a list) into AdapterSpecs."""
    if isinstance(config, (DictConfig, ListConfig)):
        config = OmegaConf.to_container(config, resolve=True)
    if not isinstance(config, Mapping):
        raise AdapterConfigError(f"adapter_config must be a mapping with keys {', '.join(SECTIONS)}, "
                                 f"got {type(config).__name__}")
    unknown = sorted(set(config) - set(SECTIONS))
    if unknown:
        raise AdapterConfigError(f"adapter_config: unknown key(s) {', '.join(map(str, unknown))}; "
                                 f"allowed: {', '.join(SECTIONS)}")
    specs = []
    for section, kind in SECTIONS.items():
        entries = config.get(section) or []
        entries = [entries] if isinstance(entries, Mapping) else entries
        if not isinstance(entries, list):
            raise AdapterConfigError(f"adapter_config.{section} must be a mapping or a list of mappings")
        specs += [_parse_entry(kind, entry, f"{section}[{i}]") for i, entry in enumerate(entries)]
    return specs


def _parse_entry(kind: str, entry: Any, where: str) -> AdapterSpec:
    if not isinstance(entry, Mapping):
        raise AdapterConfigError(f"{where} must be a mapping with fields type, din, dout, ..., got {entry!r}")
    forms, common = ADAPTER_TYPES[kind], KIND_FIELDS[kind]
    name = entry.get("type", common["type"])
    if name is REQUIRED:
        raise AdapterConfigError(f"{where}: missing field type; allowed: {', '.join(forms)}")
    form = forms.get(name)
    if form is None:
        home = [s for s, k in SECTIONS.items() if name in ADAPTER_TYPES[k]]
        raise AdapterConfigError(f"{where}.type: unknown adapter type {name!r} for {kind} blocks; allowed: "
                                 f"{', '.join(forms)}" + (f" ({name!r} entries go under {home[0]})" if home else ""))
    fields = {**common, **form.OPTIONS}
    unknown = sorted(set(entry) - set(fields))
    if unknown:
        raise AdapterConfigError(f"{where}: unknown field(s) {', '.join(map(str, unknown))}; "
                                 f"allowed: {', '.join(fields)}")
    v = {k: entry.get(k, default) for k, default in fields.items()}
    missing = [k for k, x in v.items() if x is REQUIRED]
    if missing:
        raise AdapterConfigError(f"{where}: missing field(s) {', '.join(missing)}")
    if kind != PROJECTION:
        _check_positions(kind, v["din"], v["dout"], where)
    if isinstance(v["scale"], bool) or not isinstance(v["scale"], (int, float)):
        raise AdapterConfigError(f"{where}.scale must be a number, got {v['scale']!r}")
    inits = getattr(form, "INITS", INITS)
    if v["init"] not in inits:
        raise AdapterConfigError(f"{where}.init: unknown init {v['init']!r}; allowed: {', '.join(inits)}")
    options = form.check({k: v[k] for k in form.OPTIONS}, where)
    return AdapterSpec(kind, name, v.get("din"), v.get("dout"), float(v["scale"]), v["init"], tuple(options.items()))


def _check_positions(kind: str, din: str, dout: str, where: str) -> None:
    for field, value in (("din", din), ("dout", dout)):
        if value not in POSITIONS[kind][field]:
            raise AdapterConfigError(f"{where}.{field}: unknown position {value!r} for {kind} adapters; "
                                     f"allowed: {', '.join(POSITIONS[kind][field])}")
    if not is_valid_pair(kind, din, dout):
        ok = [o for o in POSITIONS[kind]["dout"] if is_valid_pair(kind, din, o)]
        raise AdapterConfigError(f"{where}: din {din} -> dout {dout} is not a valid pair (dout must not lie "
                                 f"upstream of din; attn2c pairs only with attn2c); allowed dout for din "
                                 f"{din}: {', '.join(ok)}")


def config_from_specs(specs: List[AdapterSpec]) -> Dict[str, List[Dict[str, Any]]]:
    """The `adapter_config` mapping (paper schema, every field explicit) that parses back into `specs`."""
    return {section: [s.to_dict() for s in specs if s.kind == kind]
            for section, kind in SECTIONS.items() if any(s.kind == kind for s in specs)}
