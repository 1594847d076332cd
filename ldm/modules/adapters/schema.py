"""The `adapter_config` schema: the registry of function forms and the parsing of configs into `AdapterSpec`s.

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

Every entry has `scale` (multiplies the form's output) and `init` (`zero`: a fresh adapter is the identity); block
entries have `din` and `dout` (`ldm.modules.adapters.positions`); the other fields are the form's typed `Options`
(their defaults, ranges and help: `options_help()`, docs/adapter-forms.md).
"""
from typing import Any, Dict, List, Mapping, Tuple, Type

from omegaconf import DictConfig, ListConfig, OmegaConf

from ldm.modules.adapters.base import AdapterForm
from ldm.modules.adapters.bottleneck import InOutAdapter, ResInOutAdapter
from ldm.modules.adapters.dora import DoRA
from ldm.modules.adapters.ia3 import IA3
from ldm.modules.adapters.loha import LoHa
from ldm.modules.adapters.lokr import LoKr
from ldm.modules.adapters.lora import LoCon, LoRA
from ldm.modules.adapters.positions import POSITIONS, PROJECTION, SECTIONS, is_valid_pair
from ldm.modules.adapters.spec import INITS, REQUIRED, AdapterConfigError, AdapterSpec, check_number

# The function forms, one line each; a form's KIND says which blocks take it and NAME is its config `type`.
FORMS: Tuple[Type[AdapterForm], ...] = (
    InOutAdapter,
    ResInOutAdapter,
    LoRA,
    LoCon,
    LoHa,
    LoKr,
    DoRA,
    IA3,
)
COMMON_FIELDS = {"scale": 1.0, "init": "zero"}
BLOCK_FIELDS = {"type": "inout", "din": REQUIRED, "dout": REQUIRED, **COMMON_FIELDS}
KIND_FIELDS = {"transformer": BLOCK_FIELDS, "resblock": BLOCK_FIELDS, PROJECTION: {"type": REQUIRED, **COMMON_FIELDS}}


def forms(kind: str) -> Dict[str, Type[AdapterForm]]:
    """The forms `kind` modules take, by config `type`."""
    return {f.NAME: f for f in FORMS if f.KIND == kind}


def form_of(spec: AdapterSpec) -> Type[AdapterForm]:
    """The form class that builds `spec`."""
    return forms(spec.kind)[spec.type]


def form_fields() -> Dict[str, Tuple[str, ...]]:
    """Every config field of every form -> the sections whose entries may have it (for the config language's
    aliases: `mid_dim=64` sets that field of the entries that have it)."""
    fields: Dict[str, Tuple[str, ...]] = {}
    for section, kind in SECTIONS.items():
        for form in forms(kind).values():
            for name in (*KIND_FIELDS[kind], *form.Options.names()):
                if section not in fields.get(name, ()):
                    fields[name] = fields.get(name, ()) + (section,)
    return fields


def parse_adapter_config(config: Any) -> List[AdapterSpec]:
    """Validate an `adapter_config` (the paper's schema; sections may be a dict or a list) into AdapterSpecs."""
    if isinstance(config, (DictConfig, ListConfig)):
        config = OmegaConf.to_container(config, resolve=True)
    if not isinstance(config, Mapping):
        raise AdapterConfigError(f"adapter_config must be a mapping with keys {', '.join(SECTIONS)}, "
                                 f"got {type(config).__name__}")
    unknown = sorted(map(str, set(config) - set(SECTIONS)))
    if unknown:
        raise AdapterConfigError(f"adapter_config: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(SECTIONS)}")
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
    available, common = forms(kind), KIND_FIELDS[kind]
    name = entry.get("type", common["type"])
    if name is REQUIRED:
        raise AdapterConfigError(f"{where}: missing field type; allowed: {', '.join(available)}")
    form = available.get(name)
    if form is None:
        home = [s for s, k in SECTIONS.items() if name in forms(k)]
        raise AdapterConfigError(f"{where}.type: unknown adapter type {name!r} for {kind} blocks; allowed: "
                                 f"{', '.join(available)}" + (f" ({name!r} entries go under {home[0]})" if home else ""))
    fields = (*common, *form.Options.names())
    unknown = sorted(map(str, set(entry) - set(fields)))
    if unknown:
        raise AdapterConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(fields)}")
    v = {k: entry.get(k, default) for k, default in common.items()}
    missing = [k for k, x in v.items() if x is REQUIRED]
    if missing:
        raise AdapterConfigError(f"{where}: missing field(s) {', '.join(missing)}")
    if kind != PROJECTION:
        _check_positions(kind, v["din"], v["dout"], where)
    scale = check_number(v["scale"], f"{where}.scale")
    if v["init"] not in form.INITS:
        raise AdapterConfigError(f"{where}.init: unknown init {v['init']!r}; allowed: {', '.join(form.INITS)}")
    options = form.Options.parse({k: entry[k] for k in form.Options.names() if k in entry}, where)
    return AdapterSpec(kind, name, v.get("din"), v.get("dout"), scale, v["init"], options)


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


# ---- help -------------------------------------------------------------------------------------------------------
COMMON_HELP = {"type": "the form (see below); block sections default to inout",
               "din": "the block position the adapter reads (transformer: attn1i ... transo, attn2c; ResBlock: resi, "
                      "reso)",
               "dout": "the block position it adds to, at or downstream of din",
               "scale": "multiplies the form's output (its strength); set_adapter_scale multiplies it again at run "
                        "time",
               "init": "zero: a fresh adapter leaves the model unchanged; default: PyTorch's init (the paper's code)"}


def options_help(markdown: bool = False) -> str:
    """Every config field of every form, with its default, allowed values and help, from the forms' typed Options:
    the text of --help epilogs (markdown=False) and of docs/adapter-forms.md (markdown=True)."""
    common = [("type", "inout / required", ", ".join(sorted({f.NAME for f in FORMS})), COMMON_HELP["type"]),
              ("din, dout", "required (block forms)", "positions", COMMON_HELP["din"] + "; " + COMMON_HELP["dout"]),
              ("scale", "1.0", "a finite number", COMMON_HELP["scale"]),
              ("init", "zero", ", ".join(INITS), COMMON_HELP["init"])]
    tables = [("every entry", common)]
    seen = set()
    for form in FORMS:
        if form.Options in seen:
            continue
        seen.add(form.Options)
        names = ", ".join(f"{f.NAME} ({f.KIND})" for f in FORMS if f.Options is form.Options)
        owner = next(c for c in form.__mro__ if "Options" in vars(c))  # the class that declares these fields
        tables.append((f"{names}: {(owner.__doc__ or '').splitlines()[0].rstrip('.')}", form.Options.help_rows()))
    return "\n".join(_render(title, rows, markdown) for title, rows in tables)


def _render(title: str, rows: List[Tuple[str, str, str, str]], markdown: bool) -> str:
    if markdown:
        lines = [f"### {title}", "", "| field | default | allowed | what it does |", "|---|---|---|---|"]
        return "\n".join(lines + [f"| `{n}` | {d} | {r} | {h} |" for n, d, r, h in rows]) + "\n"
    return "\n".join([f"{title}"] + [f"  {n} ({d}; {r}): {h}" for n, d, r, h in rows])
