"""The config language of training, sampling and sweeps: CompVis `target`/`params` YAML files merged in order, then
`KEY=VALUE` overrides (then the training flags that write into the config: `ldm.train.request.RunRequest`).

    main_dream_booth.py --base a.yaml b.yaml model.params.reg_weight=0.5 mid_dim=64 lr=3e-4 --data_root data/dog
    sample.py --config a.yaml b.yaml ...
    sweep files: base [a.yaml, b.yaml], overrides, factor keys

A KEY is a dotted config key (list items by index: a.0.b) or an alias: `lr` (model.base_learning_rate), `steps`
(lightning.trainer.max_steps), and every field of every adapter form (`din`, `dout`, `mid_dim`, `method`, `rank`,
`alpha`, `dropout`, `target`, `on_input`, `scale`, `init`, ...), which sets that field of every adapter entry whose form
has it, in the UNet's and the text encoder's `adapter_config` (an entry whose `din` becomes a ResBlock position moves to
the ResBlock section). VALUE is YAML (1e-4 is a float, as YAML 1.2 reads it).
"""
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.checkpoint import load_into
from ldm.modules.adapters import (KIND_FIELDS, SECTIONS, AdapterConfigError, block_kind, form_fields, forms,
                                  is_added_key, section_value)
from ldm.modules.diffusers_folder import read_base_weights
from ldm.checks import ConfigError
from ldm.util import check_target_config, instantiate_from_config, parse_yaml_value

CONFIG_ROOTS = ("model", "data", "lightning")
KEY_ALIASES = {"lr": "model.base_learning_rate", "steps": "lightning.trainer.max_steps"}
ADAPTER_CONFIGS = {"unet": "model.params.unet_config.params.adapter_config",
                   "cond_stage_model": "model.params.cond_stage_config.params.adapter_config"}


def adapter_aliases() -> Dict[str, Sequence[str]]:
    """Alias -> the adapter_config sections whose entries may have that field (every form's fields but `type`)."""
    return {k: v for k, v in form_fields().items() if k != "type"}


def alias_names() -> List[str]:
    return [*adapter_aliases(), *KEY_ALIASES]


# ---- files ------------------------------------------------------------------------------------------------------
def load_yaml_config(path: Any) -> DictConfig:
    """One config file, with an error that names the file and the YAML problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: '{path}'")
    try:
        config = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()
        raise ConfigError(f"config file '{path}' is not valid YAML: {' '.join(first[:3])}") from None
    if not isinstance(config, DictConfig):
        raise ConfigError(f"config file '{path}' must hold a mapping (model:, data:, lightning:), got a "
                          f"{type(config).__name__}")
    return config


def load_configs(paths: Sequence[Any]) -> DictConfig:
    """The config files merged left to right (later files override earlier ones)."""
    if not paths:
        raise ConfigError("no config: pass a config file (e.g. configs/sd-inject-dreambooth/attn2o-ffni.yaml)")
    try:
        return OmegaConf.merge(*[load_yaml_config(p) for p in paths])
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot merge the configs {', '.join(map(str, paths))}: {e}") from None


# ---- overrides --------------------------------------------------------------------------------------------------
def parse_override(item: str) -> tuple:
    """KEY=VALUE -> (key, YAML value)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{item}' is not KEY=VALUE (e.g. model.params.reg_weight=0.5)")
    try:
        value = parse_yaml_value(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot apply the override '{item}': the value is not valid YAML "
                          f"({str(e).splitlines()[0]})") from None
    return key, value


def apply_override(config: DictConfig, item: str) -> None:
    """Apply one KEY=VALUE (see the module docstring). A key outside the config's sections is an error (it would be
    silently unused)."""
    key, value = parse_override(item)
    set_key(config, key, value, new_ok=True, where=f"override '{item}'")


def set_key(config: DictConfig, key: str, value: Any, new_ok: bool = True, where: str = "") -> None:
    """Set an alias or a dotted key; `new_ok=False` refuses a dotted key that does not exist in the config."""
    key = KEY_ALIASES.get(key, key)
    where = f"{where}: " if where else ""
    if key in adapter_aliases():
        set_adapter_field(config, key, value)
        return
    if not new_ok and ("." not in key or OmegaConf.select(config, key, default=_MISSING) is _MISSING):
        raise ConfigError(f"{where}unknown key '{key}': not in the merged config and not an alias. Use a dotted "
                          f"config key that exists (e.g. model.params.reg_weight) or an alias "
                          f"({', '.join(alias_names())})")
    if key.split(".")[0] not in (*CONFIG_ROOTS, *config.keys()):
        raise ConfigError(f"{where}'{key.split('.')[0]}' is not a section of the config: write a dotted key such as "
                          f"model.params.reg_weight=0.5, or an alias ({', '.join(alias_names())})")
    try:
        OmegaConf.update(config, key, value, force_add=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}cannot set '{key}' to {value!r}: {e}") from None


_MISSING = object()


# ---- adapter field aliases --------------------------------------------------------------------------------------
def adapter_entries(config: DictConfig, role: str) -> Dict[str, List[Dict[str, Any]]]:
    """The entries of each section of a network's adapter_config as plain dicts ({} when it has none)."""
    adapters = OmegaConf.select(config, ADAPTER_CONFIGS[role])
    if adapters is None:
        return {}
    adapters = OmegaConf.to_container(adapters, resolve=True) if OmegaConf.is_config(adapters) else adapters
    if not isinstance(adapters, Mapping):
        raise AdapterConfigError(f"{ADAPTER_CONFIGS[role]} must be a mapping with keys {', '.join(SECTIONS)}")
    entries = {}
    for section in SECTIONS:
        value = adapters.get(section) or []
        entries[section] = [dict(value)] if isinstance(value, Mapping) else [dict(e) for e in value]
    return entries


def _has_field(section: str, entry: Dict[str, Any], field: str) -> bool:
    kind = SECTIONS[section]
    form = forms(kind).get(entry.get("type", KIND_FIELDS[kind]["type"]))
    return field in KIND_FIELDS[kind] or (form is not None and field in form.Options.names())


def set_adapter_field(config: DictConfig, field: str, value: Any) -> None:
    """Set `field` of every adapter entry (UNet and text encoder) whose form has it; a block entry whose din changes
    kind moves to that kind's section."""
    changed = 0
    for role, path in ADAPTER_CONFIGS.items():
        sections = adapter_entries(config, role)
        if not sections:
            continue
        moved: Dict[str, List[Dict[str, Any]]] = {s: [] for s in SECTIONS}
        for section, entries in sections.items():
            for entry in entries:
                if _has_field(section, entry, field):
                    entry[field] = value
                    changed += 1
                target = section
                if field == "din" and SECTIONS[section] != "projection":
                    target = next(s for s, k in SECTIONS.items() if k == block_kind(str(value)))
                moved[target].append(entry)
        OmegaConf.update(config, path, {s: section_value(s, e) for s, e in moved.items() if e}, merge=False,
                         force_add=True)
    if not changed:
        raise ConfigError(f"'{field}' sets that field of the adapter entries whose form has it, but the merged config "
                          f"has none under {' or '.join(ADAPTER_CONFIGS.values())}: start from an adapter config "
                          "such as configs/sd-inject-dreambooth/attn2o-ffni.yaml or configs/lora/lora-attn-r4.yaml")


def pop_adapter_configs(config: DictConfig) -> Dict[str, Any]:
    """Take the adapter_configs out of a model config (UNet and text encoder), e.g. to build the base model only;
    returns them by network role (None where there was none)."""
    popped = {}
    for role, path in ADAPTER_CONFIGS.items():
        params = OmegaConf.select(config, path.rsplit(".", 1)[0])
        popped[role] = params.pop("adapter_config", None) if params is not None else None
    return popped


# ---- targets ----------------------------------------------------------------------------------------------------
def check_targets(config: Any, skip: Sequence[str] = ("adapter_config",)) -> None:
    """Check every `{target, params}` node of a config before anything is built (`ldm.util.check_target_config`:
    target allowed, keys known, numbers in range). Adapter configs (whose entries have a `target` field of their
    own) are the adapter package's to check."""
    if isinstance(config, DictConfig):
        if isinstance(config.get("target"), str):
            check_target_config(config)
        for key in set(config.keys()) - set(skip):
            check_targets(config.get(key), skip)
    elif isinstance(config, ListConfig):
        for item in config:
            check_targets(item, skip)


# ---- models from configs ----------------------------------------------------------------------------------------
def build_base_model(config: DictConfig, ckpt: Optional[str] = None, meta: bool = True) -> torch.nn.Module:
    """The model of `config` without its adapter configs (the config is not changed), on the meta device by default
    (no memory, no init: names and shapes for file work), with the weights of `ckpt` (a checkpoint file or a diffusers
    folder) assigned when given."""
    if not isinstance(config.get("model"), DictConfig) or "target" not in config.model:
        raise ConfigError("the config has no model section with a target: pass a model config such as "
                          "configs/stable-diffusion/v1-inference.yaml")
    config = OmegaConf.create(OmegaConf.to_container(config, resolve=False))
    pop_adapter_configs(config)
    if "ckpt_path" in config.model.get("params", {}):
        del config.model.params["ckpt_path"]
    with torch.device("meta") if meta else nullcontext():
        model = instantiate_from_config(config.model)
    if ckpt:
        load_into(model, read_base_weights(ckpt), source=f"checkpoint '{ckpt}'", optional=is_added_key)
    return model
