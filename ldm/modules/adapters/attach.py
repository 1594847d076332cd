"""Attaching adapters to a network, and the run-time switches: injection, freezing, enable, scale, removal.

Block adapters read the tensor at an input position `din` of a block, compute a = f(t) and add scale * a to the tensor
at an output position `dout`, so everything downstream of `dout` sees it. A block that takes adapters says so by its
class attribute `ADAPTER_KIND` ("transformer", "resblock"), reports the width at each of its named points in
`adapter_widths()`, and calls `taps(name, t)` at those points in its forward; the adapters live in `block.adapters`,
an `AdapterSet` of named groups (one group per adapter config, e.g. one per loaded directory), so their keys are
`<block>.adapters.<group>.<i>.<param>`.

Projection forms (LoRA, (IA)^3, ...) sit on the Linear and 1x1 Conv2d modules their `target` names (LoCon, LoHa, LoKr
and DoRA also on other convolutions). Such a module keeps its
weights and keys and carries `module.adapters` the same way; a forward hook returns y + sum(scale * a(x, y, module)),
every form seeing the base x and y. Every added key contains ".adapters." (`is_added_key`), so base checkpoints load
unchanged. A network that takes adapters (the UNet, the text encoder) names its role by `ADAPTER_ROLE`. Nothing here
imports a network class: blocks and networks are found by what they expose.
"""
import logging
import re
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn

from ldm.modules.adapters.base import ProjectionForm
from ldm.modules.adapters.positions import PROJECTION
from ldm.modules.adapters.rows import Rows, gather, pick, place
from ldm.modules.adapters.schema import form_of, forms, parse_adapter_config
from ldm.modules.adapters.spec import (DEFAULT_GROUP, AdapterConfigError, AdapterDirError, AdapterSpec, check_number,
                                      describe)

log = logging.getLogger(__name__)
ROLE_NAMES = {"unet": "UNet", "cond_stage_model": "text encoder"}  # for logs and errors
ADDED_KEY = ".adapters."


def is_added_key(key: str) -> bool:
    """Keys of modules this package adds to a network (adapters, LoRA, (IA)^3), absent from base checkpoints."""
    return ADDED_KEY in key


def match_targets(model: nn.Module, target: Union[str, Tuple[str, ...]], where: str = "target",
                  form: Type[ProjectionForm] = ProjectionForm) -> List[Tuple[str, nn.Module]]:
    """(path, module) of the modules of `model` that `target` names and `form` takes (by default: Linear and 1x1
    Conv2d), in model order; an error names a miss."""
    modules = [(p, m) for p, m in model.named_modules() if p and "adapters" not in p.split(".")]
    examples = ", ".join([p for p, m in modules if form.takes(m)][:6])
    if isinstance(target, str):
        found = {p for p, m in modules if form.takes(m) and re.fullmatch(target, p)}
        if not found:
            raise AdapterConfigError(f"{where}: the regex {target!r} matches no {form.HOSTS} path of this "
                                     f"{type(model).__name__}; its paths are e.g. {examples}")
    else:
        found = set()
        for name in target:
            hits = [(p, m) for p, m in modules if p == name or p.endswith("." + name)]
            if not hits:
                raise AdapterConfigError(f"{where}: no module of this {type(model).__name__} is named {name!r}; its "
                                         f"{form.HOSTS} modules are e.g. {examples}")
            # modules without weights of that name (the Identity skip_connection of a ResBlock that keeps its
            # width) are passed over, as long as the name finds some module the form takes
            bad = [(p, m) for p, m in hits if not form.takes(m) and (hasattr(m, "weight") or
                                                                     not any(form.takes(h) for _, h in hits))]
            if bad:
                raise AdapterConfigError(f"{where}: {bad[0][0]} is {_kind_of(bad[0][1])}, not a {form.HOSTS}; "
                                         f"{form.TITLE or 'projection forms'} go{'es' if form.TITLE else ''} on "
                                         f"those, e.g. {examples}" + _conv_hint(form, bad[0][1]))
            found.update(p for p, m in hits if form.takes(m))
    return [(p, m) for p, m in modules if p in found]


def _kind_of(m: nn.Module) -> str:
    """"a 3x3 Conv2d", "a Linear", ... for messages."""
    size = getattr(m, "kernel_size", None)
    if size:
        return f"a {'x'.join(map(str, size))} {type(m).__name__}"
    return f"{'an' if type(m).__name__[0] in 'AEIOU' else 'a'} {type(m).__name__}"


def _conv_hint(form: Type[ProjectionForm], m: nn.Module) -> str:
    """Which forms take the module a form refused, when some do."""
    others = [f.NAME for f in forms(PROJECTION).values() if f.takes(m)]
    return f" (type {', '.join(others)} take{'s' if len(others) == 1 else ''} it)" if others else ""


# ---- attaching adapters -----------------------------------------------------------------------------------------
class AdapterGroup(nn.ModuleList):
    """The adapters one config puts on one block or projection, with the group's run-time switch and strength, and
    (for several runs in one batch, `ldm.modules.adapters.rows`) the rows it acts on and the random state its
    adapters draw from."""

    def __init__(self, adapters: List[nn.Module]):
        super().__init__(adapters)
        self.enabled = True
        self.scale = 1.0  # multiplies every adapter's own config scale
        self.rows: Optional[Rows] = None  # None: every row of the batch
        self.random: Callable[[], ContextManager] = nullcontext  # entered around the group's adapters


class AdapterSet(nn.ModuleDict):
    """`module.adapters`: the adapter groups of a block or projection by name."""

    def active(self) -> List[Tuple[nn.Module, float, AdapterGroup]]:
        """(adapter, effective scale, its group) for the adapters of every enabled group, leaving out those scaled to
        0 and those of groups with no rows in the batch."""
        triples = [(a, a.spec.scale * g.scale, g) for g in self.values() if g.enabled for a in g]
        return [(a, s, g) for a, s, g in triples if s != 0 and (g.rows is None or not g.rows.empty)]

    def taps(self) -> Optional[Callable[[str, torch.Tensor], torch.Tensor]]:
        """A fresh `taps(name, t)` for one forward pass of a block, or None when no adapter is active."""
        active = self.active()
        if not active:
            return None
        pending: Dict[str, list] = {}

        def taps(name: str, t: torch.Tensor) -> torch.Tensor:
            for a, s, g in active:                            # adapters reading here store s * f(t) for their dout
                if a.spec.din == name:
                    with g.random():
                        d = s * a(pick(t, g.rows))
                    gather(pending.setdefault(a.spec.dout, []), g.rows, d)
            parts = pending.pop(name, None)                   # ... and those writing here add it
            return t if parts is None else place(t, parts)
        return taps


def _projection_hook(host: nn.Module, args: Tuple[torch.Tensor, ...], y: torch.Tensor) -> Optional[torch.Tensor]:
    """Forward hook of a projection with adapters: y + sum(s * a(x, y, host)); None (y itself) when none is active."""
    active = host.adapters.active()
    if not active:
        return None
    x, parts = args[0], []
    for a, s, g in active:
        with g.random():
            gather(parts, g.rows, s * a(pick(x, g.rows), pick(y, g.rows), host))
    return place(y, parts)


def _is_block(m: nn.Module) -> bool:
    """A block that taps its named points itself (the others carry projection forms through a forward hook)."""
    return bool(getattr(m, "ADAPTER_KIND", None))


def adapter_blocks(net: nn.Module) -> List[Tuple[str, nn.Module, str, Dict[str, int]]]:
    """(path, block, kind, width at each position) for every block of `net` that can carry block adapters."""
    return [(path, m, m.ADAPTER_KIND, m.adapter_widths()) for path, m in net.named_modules()
            if getattr(m, "ADAPTER_KIND", None)]


def adapter_carriers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(path, module) of every block or projection of `model` that carries adapters now."""
    return [(p, m) for p, m in model.named_modules() if isinstance(getattr(m, "adapters", None), AdapterSet)]


def adapter_networks(model: nn.Module) -> Dict[str, Tuple[str, nn.Module]]:
    """The networks in `model` that take adapters, by role ("unet", "cond_stage_model": the text encoder), each with its
    path in `model` ("" when `model` is the network itself)."""
    found: Dict[str, Tuple[str, nn.Module]] = {}
    for path, m in model.named_modules():
        role = getattr(m, "ADAPTER_ROLE", None)
        if role is not None and role not in found:
            found[role] = (path, m)
    return found


def network(model: nn.Module, role: str, source: str) -> nn.Module:
    """The `role` network of `model`, or an error saying the source needs the whole model."""
    nets = adapter_networks(model)
    if role not in nets:
        raise AdapterDirError(f"{source} adapts the {ROLE_NAMES[role]}, which this {type(model).__name__} does not "
                              f"contain: load it into the whole model (LatentDiffusion), e.g. "
                              f"load_adapter_from_dir(model, path)")
    return nets[role][1]


def adapter_groups(model: nn.Module) -> Dict[str, List[AdapterSpec]]:
    """The adapter groups injected into `model` or its networks (UNet, text encoder), by name, with their specs."""
    groups: Dict[str, List[AdapterSpec]] = {}
    for m in model.modules():
        for name, specs in getattr(m, "adapter_specs", {}).items():
            groups[name] = groups.get(name, []) + specs
    return groups


def build_adapter(spec: AdapterSpec, dims: Optional[Dict[str, int]] = None, host: Optional[nn.Module] = None
                  ) -> nn.Module:
    """The module of `spec`: a block form for a block with the given position widths, a projection form for `host`."""
    form = form_of(spec)
    adapter = form(spec, host) if spec.kind == PROJECTION else form(spec, dims[spec.din], dims[spec.dout])
    if spec.init == "zero":
        adapter.zero_init_()
    adapter.spec = spec
    return adapter


def placement(model: nn.Module, specs: List[AdapterSpec]
               ) -> List[Tuple[nn.Module, List[AdapterSpec], Optional[Dict[str, int]]]]:
    """(host, its specs in config order, position widths or None) for every module the specs go on."""
    blocks = adapter_blocks(model)
    unplaced = [s for s in specs if s.kind != PROJECTION and all(kind != s.kind for _, _, kind, _ in blocks)]
    if unplaced:
        raise AdapterConfigError(f"no block of this {type(model).__name__} takes the adapters {describe(unplaced)}")
    plan = [(block, mine, dims) for _, block, kind, dims in blocks for mine in [[s for s in specs if s.kind == kind]]
            if mine]
    hosts: Dict[str, Tuple[nn.Module, List[AdapterSpec]]] = {}
    for i, s in enumerate(s for s in specs if s.kind == PROJECTION):
        for path, m in match_targets(model, s.options.target, f"projection_adp_config[{i}].target", form_of(s)):
            hosts.setdefault(path, (m, []))[1].append(s)
    return plan + [(m, mine, None) for m, mine in hosts.values()]


def _attach(host: nn.Module, name: str, group: AdapterGroup) -> None:
    if getattr(host, "adapters", None) is None:
        host.adapters = AdapterSet()
        if not _is_block(host):
            host._adapter_hook = host.register_forward_hook(_projection_hook)
    host.adapters[name] = group


def _detach(host: nn.Module, name: str) -> None:
    del host.adapters[name]
    if len(host.adapters):
        return
    if not _is_block(host):  # back to a plain module: no hook, no attribute
        host._adapter_hook.remove()
        del host._adapter_hook, host.adapters
    else:
        host.adapters = None


def inject_adapters(model: nn.Module, adapter_config: Any, name: str = DEFAULT_GROUP) -> int:
    """Attach the adapters of `adapter_config` to `model` (a UNet; a text encoder takes projection forms) as group
    `name`. Returns the number of parameters added, which is also logged with its share of the model.
    """
    specs = parse_adapter_config(adapter_config)
    if not isinstance(name, str) or not name.isidentifier():
        raise AdapterConfigError(f"adapter group name must be a Python identifier, got {name!r}")
    if name in getattr(model, "adapter_specs", {}):
        raise AdapterConfigError(f"the model already has an adapter group {name!r}; give the new one another name")
    plan = placement(model, specs)  # every error before anything is attached
    base = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in adapter_parameters(model))
    added = 0
    for host, mine, dims in plan:
        ref = next(host.parameters())
        group = AdapterGroup([build_adapter(s, dims, host) for s in mine]).to(device=ref.device, dtype=ref.dtype)
        _attach(host, name, group)
        added += sum(p.numel() for p in group.parameters())
    model.adapter_specs = {**getattr(model, "adapter_specs", {}), name: specs}
    what = ROLE_NAMES.get(getattr(model, "ADAPTER_ROLE", None), type(model).__name__)
    log.info("adapter group '%s' (%s) on %d modules: %s parameters, %.3f%% of the %s's %s", name, describe(specs),
             len(plan), f"{added:,}", 100.0 * added / max(base, 1), what, f"{base:,}")
    return added


def mount_group(src: nn.Module, dst: nn.Module, name: str, as_name: str) -> List[AdapterGroup]:
    """Put group `name` of network `src` on the same modules of `dst` (a network of the same structure, e.g. one
    sharing its weights) as group `as_name`. The adapter modules are shared; the new groups' switches, rows and random
    state are their own, so `src` is unaffected. Returns the new groups."""
    mounted = []
    for path, m in adapter_carriers(src):
        if name in m.adapters:
            group = AdapterGroup(list(m.adapters[name]))
            group.enabled, group.scale = m.adapters[name].enabled, m.adapters[name].scale
            _attach(dst.get_submodule(path), as_name, group)
            mounted.append(group)
    if not mounted:
        raise AdapterConfigError(f"no adapter group {name!r} to mount; the model has: "
                                 f"{', '.join(adapter_groups(src)) or 'none'}")
    dst.adapter_specs = {**getattr(dst, "adapter_specs", {}), as_name: adapter_groups(src)[name]}
    return mounted


def _groups(model: nn.Module, name: Optional[str]) -> List[AdapterGroup]:
    if name is not None and name not in adapter_groups(model):
        raise AdapterConfigError(f"no adapter group {name!r}; the model has: "
                                 f"{', '.join(adapter_groups(model)) or 'none'}")
    return [g for m in model.modules() if isinstance(m, AdapterSet) for n, g in m.items() if name in (None, n)]


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


def adapters_enable(model: nn.Module, enabled: bool = True, name: Optional[str] = None) -> None:
    """Switch the adapters (of group `name`, or all) on or off; off gives the base model's output exactly."""
    for g in _groups(model, name):
        g.enabled = enabled


def set_adapter_scale(model: nn.Module, scale: float, name: str = DEFAULT_GROUP) -> None:
    """Set group `name`'s strength, a factor on its adapters' config scales (0 gives the output without it)."""
    scale = check_number(scale, f"the scale of adapter group {name!r}")
    for g in _groups(model, name):
        g.scale = scale


def group_adapters(model: nn.Module, name: str = DEFAULT_GROUP) -> List[Tuple[str, nn.Module, AdapterGroup]]:
    """(path, module, its part of group `name`) for every block or projection carrying that group."""
    _groups(model, name)
    return [(p, m, m.adapters[name]) for p, m in adapter_carriers(model) if name in m.adapters]


def adapter_state_dict(model: nn.Module, name: str = DEFAULT_GROUP) -> Dict[str, torch.Tensor]:
    """Group `name`'s weights keyed `<module>.adapters.<i>.<param>`: the group name is left out, so they load as any."""
    _groups(model, name)
    return {f"{path}.adapters.{k}": v for path, m in adapter_carriers(model) if name in m.adapters
            for k, v in m.adapters[name].state_dict().items()}


def remove_adapters(model: nn.Module, name: str = DEFAULT_GROUP) -> None:
    """Detach adapter group `name` from every block and projection of `model`."""
    _groups(model, name)
    for _, m in adapter_carriers(model):
        if name in m.adapters:
            _detach(m, name)
    for m in model.modules():
        if name in getattr(m, "adapter_specs", {}):
            m.adapter_specs = {k: v for k, v in m.adapter_specs.items() if k != name}


@contextmanager
def restored_on_error(model: nn.Module, name: str) -> Iterator[None]:
    """Remove group `name` again if the block fails after injecting it: a failed load leaves the model as it was."""
    injected = name not in adapter_groups(model)
    try:
        yield
    except AdapterConfigError:
        if injected and name in adapter_groups(model):
            remove_adapters(model, name)
        raise


def planned_parameter_count(model: nn.Module, adapter_config: Any) -> int:
    """The parameters `adapter_config` would add to `model`, computed by the forms without building anything."""
    total = 0
    for host, specs, dims in placement(model, parse_adapter_config(adapter_config)):
        for s in specs:
            total += form_of(s).parameter_count(s, *host_dims(s, host, dims))
    return total


def host_dims(spec: AdapterSpec, host: nn.Module, dims: Optional[Dict[str, int]]
              ) -> Tuple[int, int, Tuple[int, ...]]:
    """(dim_in, dim_out, kernel) a form's parameter_count takes: the block's widths at din and dout, or the host
    weight's in, out and kernel size."""
    if dims is not None:
        return dims[spec.din], dims[spec.dout], ()
    return host.weight.shape[1], host.weight.shape[0], tuple(host.weight.shape[2:])
