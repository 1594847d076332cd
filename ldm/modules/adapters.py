"""The adapter design space of Xiang et al. 2023, "A Closer Look at Parameter-Efficient Tuning in Diffusion Models"
(arXiv 2303.18181): positions, function forms, injection, freezing and run-time switches.

An adapter reads the tensor at an input position `din` of a block, computes a = f(t) and adds scale * a to the tensor
at an output position `dout`, so everything downstream of `dout` sees it. The UNet blocks only call
`taps(name, t)` at their named points (`BasicTransformerBlock._forward`, `ResBlock._forward`); the adapters live in
`block.adapters`, an `AdapterSet` of named groups (one group per adapter config, e.g. one per loaded directory), so
their keys are `<block>.adapters.<group>.<i>.<param>`. Directory save/load is in `ldm.modules.adapter_io`.
"""
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
from omegaconf import DictConfig, ListConfig, OmegaConf

from ldm.modules.attention import BasicTransformerBlock
from ldm.modules.diffusionmodules.openaimodel import ResBlock
from ldm.modules.diffusionmodules.util import normalization

log = logging.getLogger(__name__)

# The residual stream of a BasicTransformerBlock in data-flow order; attn2c (the context) is a side input of attn2.
STREAM = ("attn1i", "attn1o", "attn2i", "attn2o", "ffni", "ffno", "transo")
POSITIONS = {
    "transformer": {"din": STREAM + ("attn2c",), "dout": ("attn1i", "attn2i", "ffni", "transo", "attn2c")},
    "resblock": {"din": ("resi", "reso"), "dout": ("resi", "reso")},
}
SECTIONS = {"transformer_adp_config": "transformer", "resblock_adp_config": "resblock"}  # the paper's config keys
METHODS = {"relu": nn.ReLU, "sig": nn.Sigmoid, "silu": nn.SiLU, "ident": nn.Identity, "default": nn.ReLU}
INITS = ("zero", "default")  # zero: the last layer starts at 0, so a fresh adapter is exactly the identity
DEFAULT_GROUP = "default"
REQUIRED = object()
COMMON_FIELDS = {"type": "inout", "din": REQUIRED, "dout": REQUIRED, "scale": 1.0, "init": "zero"}


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
    """One validated config entry: which blocks (`kind`), the form (`type`), where it reads and writes, its size."""
    kind: str
    type: str
    din: str
    dout: str
    scale: float
    init: str
    options: Tuple[Tuple[str, Any], ...] = ()  # form-specific fields, e.g. (("mid_dim", 60), ("method", "default"))

    def layout(self) -> tuple:
        """What fixes the weights' meaning and shapes (scale and init do not)."""
        return self.kind, self.type, self.din, self.dout, self.options

    def describe(self) -> str:
        return " ".join([f"{self.din}->{self.dout}", self.type] + [f"{k} {v}" for k, v in self.options])

    def to_dict(self) -> Dict[str, Any]:
        return {"type": self.type, "din": self.din, "dout": self.dout, **dict(self.options), "scale": self.scale,
                "init": self.init}


def describe(specs: List[AdapterSpec]) -> str:
    """A one-line summary of specs for logs and errors, e.g. "attn2o->ffni inout mid_dim 60 method default"."""
    return ", ".join(s.describe() for s in specs) or "no adapters"


# ---- function forms: one small class each, registered by `type` per block kind ----------------------------------
ADAPTER_TYPES: Dict[str, Dict[str, type]] = {kind: {} for kind in POSITIONS}


def register(kind: str, name: str) -> Callable[[type], type]:
    """Class decorator: make a function form available to `kind` blocks as `type: name`.

    A form (later LoRA, (IA)^3, ...) declares its config fields in `OPTIONS` (REQUIRED or a default), validates them
    in `check`, is built as `cls(spec, dim_in, dim_out)`, maps the tensor at din (width dim_in) to the addend for dout
    (width dim_out), and has `zero_init_` to start as a no-op.
    """
    def wrap(cls: type) -> type:
        ADAPTER_TYPES[kind][name] = cls
        return cls
    return wrap


class _BottleneckOptions:
    """Config fields shared by the paper's two `inout` forms: bottleneck width and activation."""
    OPTIONS = {"mid_dim": REQUIRED, "method": "default"}

    @classmethod
    def check(cls, options: Dict[str, Any], where: str) -> Dict[str, Any]:
        mid = options["mid_dim"]
        if isinstance(mid, bool) or not isinstance(mid, int) or mid <= 0:
            raise AdapterConfigError(f"{where}.mid_dim must be a positive integer, got {mid!r}")
        if options["method"] not in METHODS:
            raise AdapterConfigError(f"{where}.method: unknown method {options['method']!r}; "
                                     f"allowed: {', '.join(METHODS)}")
        return options


@register("transformer", "inout")
class InOutAdapter(_BottleneckOptions, nn.Module):
    """Token-wise bottleneck MLP Linear(dim->mid)-act-Linear(mid->dim), the paper's `AdapterForward` (keys adp.*)."""

    def __init__(self, spec: AdapterSpec, dim_in: int, dim_out: int):
        super().__init__()
        o = dict(spec.options)
        self.adp = nn.Sequential(nn.Linear(dim_in, o["mid_dim"]), METHODS[o["method"]](),
                                 nn.Linear(o["mid_dim"], dim_out))

    def zero_init_(self) -> None:
        nn.init.zeros_(self.adp[-1].weight)
        nn.init.zeros_(self.adp[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adp(x)                                   # (b, n, c_in) -> (b, n, c_out)


@register("resblock", "inout")
class ResInOutAdapter(_BottleneckOptions, nn.Sequential):
    """GroupNorm32-SiLU-conv3x3(in->mid)-act-conv3x3(mid->out), the paper's ResBlock adapter (keys 0.*, 2.*, 4.*).

    (b, c_in, h, w) -> (b, c_out, h, w); c_in, c_out are the channel counts at din and dout.
    """

    def __init__(self, spec: AdapterSpec, dim_in: int, dim_out: int):
        o = dict(spec.options)
        super().__init__(normalization(dim_in), nn.SiLU(), nn.Conv2d(dim_in, o["mid_dim"], 3, padding=1),
                         METHODS[o["method"]](), nn.Conv2d(o["mid_dim"], dim_out, 3, padding=1))

    def zero_init_(self) -> None:
        nn.init.zeros_(self[-1].weight)
        nn.init.zeros_(self[-1].bias)


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
    forms = ADAPTER_TYPES[kind]
    form = forms.get(entry.get("type", COMMON_FIELDS["type"]))
    if form is None:
        raise AdapterConfigError(f"{where}.type: unknown adapter type {entry['type']!r} for {kind} blocks; "
                                 f"allowed: {', '.join(forms)}")
    fields = {**COMMON_FIELDS, **form.OPTIONS}
    unknown = sorted(set(entry) - set(fields))
    if unknown:
        raise AdapterConfigError(f"{where}: unknown field(s) {', '.join(map(str, unknown))}; "
                                 f"allowed: {', '.join(fields)}")
    v = {k: entry.get(k, default) for k, default in fields.items()}
    missing = [k for k, x in v.items() if x is REQUIRED]
    if missing:
        raise AdapterConfigError(f"{where}: missing field(s) {', '.join(missing)}")
    for field in ("din", "dout"):
        if v[field] not in POSITIONS[kind][field]:
            raise AdapterConfigError(f"{where}.{field}: unknown position {v[field]!r} for {kind} adapters; "
                                     f"allowed: {', '.join(POSITIONS[kind][field])}")
    if not is_valid_pair(kind, v["din"], v["dout"]):
        ok = [o for o in POSITIONS[kind]["dout"] if is_valid_pair(kind, v["din"], o)]
        raise AdapterConfigError(f"{where}: din {v['din']} -> dout {v['dout']} is not a valid pair (dout must not lie "
                                 f"upstream of din; attn2c pairs only with attn2c); allowed dout for din "
                                 f"{v['din']}: {', '.join(ok)}")
    if isinstance(v["scale"], bool) or not isinstance(v["scale"], (int, float)):
        raise AdapterConfigError(f"{where}.scale must be a number, got {v['scale']!r}")
    if v["init"] not in INITS:
        raise AdapterConfigError(f"{where}.init: unknown init {v['init']!r}; allowed: {', '.join(INITS)}")
    options = form.check({k: v[k] for k in form.OPTIONS}, where)
    return AdapterSpec(kind, v["type"], v["din"], v["dout"], float(v["scale"]), v["init"], tuple(options.items()))


def config_from_specs(specs: List[AdapterSpec]) -> Dict[str, List[Dict[str, Any]]]:
    """The `adapter_config` mapping (paper schema, every field explicit) that parses back into `specs`."""
    return {section: [s.to_dict() for s in specs if s.kind == kind]
            for section, kind in SECTIONS.items() if any(s.kind == kind for s in specs)}


# ---- attaching adapters to the UNet ------------------------------------------------------------------------------
class AdapterGroup(nn.ModuleList):
    """The adapters one config puts on one block, with the group's run-time switch and strength."""

    def __init__(self, adapters: List[nn.Module]):
        super().__init__(adapters)
        self.enabled = True
        self.scale = 1.0  # multiplies every adapter's own config scale


class AdapterSet(nn.ModuleDict):
    """`block.adapters`: the block's adapter groups by name; `taps()` gives the block its tap function."""

    def taps(self) -> Optional[Callable[[str, torch.Tensor], torch.Tensor]]:
        """A fresh `taps(name, t)` for one forward pass, or None when no adapter is active."""
        active = [(a, a.spec.scale * g.scale) for g in self.values() if g.enabled for a in g]
        active = [(a, s) for a, s in active if s != 0]
        if not active:
            return None
        pending: Dict[str, torch.Tensor] = {}

        def taps(name: str, t: torch.Tensor) -> torch.Tensor:
            for a, s in active:                               # adapters reading here store s * f(t) for their dout
                if a.spec.din == name:
                    d = s * a(t)
                    pending[a.spec.dout] = d if a.spec.dout not in pending else pending[a.spec.dout] + d
            add = pending.pop(name, None)                     # ... and those writing here add it
            return t if add is None else t + add
        return taps


def adapter_blocks(unet: nn.Module) -> List[Tuple[str, nn.Module, str, Dict[str, int]]]:
    """(path, block, kind, width at each position) for every block of `unet` that can carry adapters."""
    blocks = []
    for path, m in unet.named_modules():
        if isinstance(m, BasicTransformerBlock):
            dim, context_dim = m.norm1.normalized_shape[0], m.attn2.to_k.in_features
            blocks.append((path, m, "transformer", {**{p: dim for p in STREAM}, "attn2c": context_dim}))
        elif isinstance(m, ResBlock):
            blocks.append((path, m, "resblock", {"resi": m.channels, "reso": m.out_channels}))
    return blocks


def adapter_groups(unet: nn.Module) -> Dict[str, List[AdapterSpec]]:
    """The adapter groups injected into `unet`, by name, with the specs that built them."""
    return getattr(unet, "adapter_specs", {})


def build_adapter(spec: AdapterSpec, dims: Dict[str, int]) -> nn.Module:
    """The module of `spec` for a block with the given position widths."""
    adapter = ADAPTER_TYPES[spec.kind][spec.type](spec, dims[spec.din], dims[spec.dout])
    if spec.init == "zero":
        adapter.zero_init_()
    adapter.spec = spec
    return adapter


def inject_adapters(unet: nn.Module, adapter_config: Any, name: str = DEFAULT_GROUP) -> int:
    """Attach the adapters of `adapter_config` to every matching block of `unet` as group `name`.

    Returns the number of parameters added, which is also logged with its share of the UNet.
    """
    specs = parse_adapter_config(adapter_config)
    if not isinstance(name, str) or not name.isidentifier():
        raise AdapterConfigError(f"adapter group name must be a Python identifier, got {name!r}")
    if name in adapter_groups(unet):
        raise AdapterConfigError(f"the UNet already has an adapter group {name!r}; give the new one another name")
    base = sum(p.numel() for p in unet.parameters()) - sum(p.numel() for p in adapter_parameters(unet))
    added, n_blocks = 0, 0
    for path, block, kind, dims in adapter_blocks(unet):
        mine = [s for s in specs if s.kind == kind]
        if not mine:
            continue
        ref = next(block.parameters())
        group = AdapterGroup([build_adapter(s, dims) for s in mine]).to(device=ref.device, dtype=ref.dtype)
        if block.adapters is None:
            block.adapters = AdapterSet()
        block.adapters[name] = group
        added += sum(p.numel() for p in group.parameters())
        n_blocks += 1
    if specs and not n_blocks:
        raise AdapterConfigError(f"no block of this UNet takes the adapters {describe(specs)}")
    unet.adapter_specs = {**adapter_groups(unet), name: specs}
    log.info("adapter group '%s' (%s) on %d blocks: %s parameters, %.3f%% of the UNet's %s", name, describe(specs),
             n_blocks, f"{added:,}", 100.0 * added / max(base, 1), f"{base:,}")
    return added


def _groups(unet: nn.Module, name: Optional[str]) -> List[AdapterGroup]:
    if name is not None and name not in adapter_groups(unet):
        raise AdapterConfigError(f"no adapter group {name!r}; the UNet has: "
                                 f"{', '.join(adapter_groups(unet)) or 'none'}")
    return [g for m in unet.modules() if isinstance(m, AdapterSet) for n, g in m.items() if name in (None, n)]


def adapter_parameters(model: nn.Module, name: Optional[str] = None) -> List[nn.Parameter]:
    """The adapter parameters in `model` (of group `name`, or of all groups), each once."""
    groups = [g for m in model.modules() if isinstance(m, AdapterSet) for n, g in m.items() if name in (None, n)]
    return list({id(p): p for g in groups for p in g.parameters()}.values())


def freeze_except_adapters(model: nn.Module, name: Optional[str] = None) -> List[nn.Parameter]:
    """Freeze every parameter of `model` but the adapters' (of group `name`, or all); returns those, each once."""
    trainable = adapter_parameters(model, name)
    if not trainable:
        raise AdapterConfigError(f"the model has no adapter parameters to train (group {name or 'any'}): "
                                 "set unet_config.params.adapter_config or call inject_adapters first")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    return trainable


def adapters_enable(unet: nn.Module, enabled: bool = True, name: Optional[str] = None) -> None:
    """Switch the adapters (of group `name`, or all) on or off; off gives the base model's output exactly."""
    for g in _groups(unet, name):
        g.enabled = enabled


def set_adapter_scale(unet: nn.Module, scale: float, name: str = DEFAULT_GROUP) -> None:
    """Set group `name`'s strength, a factor on its adapters' config scales (0 gives the output without it)."""
    for g in _groups(unet, name):
        g.scale = float(scale)


def adapter_state_dict(unet: nn.Module, name: str = DEFAULT_GROUP) -> Dict[str, torch.Tensor]:
    """Group `name`'s weights keyed `<block>.adapters.<i>.<param>`: the group name is left out, so they load as any."""
    _groups(unet, name)
    return {f"{path}.adapters.{k}": v for path, block, _, _ in adapter_blocks(unet)
            if block.adapters is not None and name in block.adapters
            for k, v in block.adapters[name].state_dict().items()}


def remove_adapters(unet: nn.Module, name: str = DEFAULT_GROUP) -> None:
    """Detach adapter group `name` from every block of `unet`."""
    _groups(unet, name)
    for _, block, _, _ in adapter_blocks(unet):
        if block.adapters is not None and name in block.adapters:
            del block.adapters[name]
            if not len(block.adapters):
                block.adapters = None
    unet.adapter_specs = {k: v for k, v in adapter_groups(unet).items() if k != name}
