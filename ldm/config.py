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

Where a config comes from is looked up here too. The model config of a base checkpoint when none is given
(`find_config`), in this order: `<checkpoint stem>.yaml` or `config.yaml` beside the file; the config the file names
in its safetensors metadata (`config`: a path, relative to the working directory or the repository; the tiny model's
file names configs/tiny-world/tiny-sd-v1.yaml); for a diffusers model folder, a config made from the folder's own
`unet/`, `vae/`, `text_encoder/` and `scheduler/` configs; else SD v1's configs/stable-diffusion/v1-inference.yaml.
Which of the project's configs a checkpoint fits when the given one does not: `fitting_configs`, `config_fix`. The
UNet adapter config in a file: `adapter_config_from_file`.
"""
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import safe_open

from ldm.checkpoint import load_into
from ldm.modules.adapters import (KIND_FIELDS, SECTIONS, AdapterConfigError, block_kind, form_fields, forms,
                                  is_added_key, section_value)
from ldm.modules.diffusers_folder import BETA_SCHEDULES, read_base_weights, read_json
from ldm.checks import ConfigError, parse_yaml_value
from ldm.util.instantiate import check_target_config, instantiate_from_config

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
    """Check every `{target, params}` node of a config before anything is built
    (`ldm.util.instantiate.check_target_config`: target allowed, keys known, numbers in range). Adapter configs (whose
    entries have a `target` field of their own) are the adapter package's to check."""
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


# ---- which config: beside a checkpoint, named in it, a diffusers folder's, the one its weights fit ------------
REPO = Path(__file__).resolve().parents[1]
SD_V1_CONFIG = Path("configs/stable-diffusion/v1-inference.yaml")
METADATA_CONFIG = "config"  # the safetensors metadata key naming a checkpoint's config (scripts/train_tiny_base.py)
CONFIG_DIR = Path("configs")


def in_repo(path: Path) -> Path:
    """`path` as given when it exists from here, else relative to the repository."""
    return path if path.exists() or path.is_absolute() else REPO / path


def config_beside(ckpt: str) -> Optional[Path]:
    """The config file that goes with checkpoint `ckpt`: beside it, or named in its metadata; None if none."""
    p = Path(ckpt)
    if p.is_file():
        for candidate in (p.with_suffix(".yaml"), p.parent / "config.yaml"):
            if candidate.is_file():
                return candidate
    named = _metadata_config(p)
    return None if named is None else in_repo(Path(named))


def _metadata_config(path: Path) -> Optional[str]:
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(METADATA_CONFIG)
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the weight reader, with its reason
        return None


def find_config(ckpt: Optional[str]) -> Tuple[DictConfig, str]:
    """The config for base checkpoint `ckpt` (a file or a diffusers folder) and a description of where it came
    from."""
    beside = config_beside(ckpt) if ckpt else None
    if beside is not None:
        if not beside.is_file():
            raise ConfigError(f"checkpoint '{ckpt}' names its config '{beside}', which does not exist: pass --config")
        return load_yaml_config(beside), f"'{beside}' (found for '{ckpt}')"
    if ckpt and Path(ckpt).is_dir() and (Path(ckpt) / "model_index.json").is_file():
        return config_from_diffusers_folder(Path(ckpt)), f"the configs of diffusers folder '{ckpt}'"
    return load_configs([in_repo(SD_V1_CONFIG)]), f"SD v1's '{SD_V1_CONFIG}' (the default)"


def config_from_diffusers_folder(folder: Path) -> DictConfig:
    """Our model config for an SD v1 diffusers folder: SD v1's config with the sizes of the folder's UNet, VAE,
    text encoder and noise schedule (the inverse of ldm.modules.diffusers_folder.diffusers_configs)."""
    parts = (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
             ("scheduler", "scheduler_config.json"))
    unet, vae, text, sched = (read_json(folder / part / name, f"diffusers folder '{folder}' has no {part}/{name}")
                              for part, name in parts)
    try:
        config = load_configs([in_repo(SD_V1_CONFIG)])
        m = config.model.params
        channels = list(unet["block_out_channels"])
        heads = unet.get("attention_head_dim", 8)
        m.unet_config.params.update(
            image_size=unet["sample_size"], in_channels=unet["in_channels"], out_channels=unet["out_channels"],
            model_channels=channels[0], channel_mult=[c // channels[0] for c in channels],
            num_res_blocks=unet["layers_per_block"], context_dim=unet["cross_attention_dim"],
            num_heads=heads if isinstance(heads, int) else heads[0],
            transformer_depth=unet.get("transformer_layers_per_block", 1),
            attention_resolutions=[2 ** i for i, kind in enumerate(unet["down_block_types"]) if "CrossAttn" in kind])
        vae_channels = list(vae["block_out_channels"])
        m.first_stage_config.params.embed_dim = vae["latent_channels"]
        m.first_stage_config.params.ddconfig.update(
            z_channels=vae["latent_channels"], resolution=vae["sample_size"], ch=vae_channels[0],
            ch_mult=[c // vae_channels[0] for c in vae_channels], num_res_blocks=vae["layers_per_block"],
            in_channels=vae["in_channels"], out_ch=vae["out_channels"],
            attn_type="vanilla" if vae.get("mid_block_add_attention", True) else "none")
        m.cond_stage_config.params = {
            "width": text["hidden_size"], "layers": text["num_hidden_layers"], "heads": text["num_attention_heads"],
            "max_length": text["max_position_embeddings"], "vocab_size": text["vocab_size"],
            "mlp_ratio": text["intermediate_size"] / text["hidden_size"]}
        m.update(image_size=unet["sample_size"], scale_factor=vae.get("scaling_factor", 0.18215),
                 timesteps=sched.get("num_train_timesteps", 1000), linear_start=sched.get("beta_start", 0.00085),
                 linear_end=sched.get("beta_end", 0.012),
                 beta_schedule=BETA_SCHEDULES.get(sched.get("beta_schedule", "scaled_linear"), "linear"))
    except (KeyError, TypeError, ZeroDivisionError) as e:
        raise ConfigError(f"diffusers folder '{folder}': its configs lack or misstate {e}: pass --config") from None
    return config


def fitting_configs(ckpt: str) -> List[Path]:
    """The project's configs (under configs/, one per distinct base model) whose model has exactly the weight names
    and shapes of `ckpt`: what to suggest when the given config does not fit."""
    try:
        shapes = {k: tuple(v.shape) for k, v in read_base_weights(ckpt).items()}
    except Exception:  # noqa: BLE001 - the caller already has the real error; this only looks for a hint
        return []
    found, seen = [], set()
    for path in sorted(in_repo(CONFIG_DIR).rglob("*.yaml")):
        try:
            config = load_yaml_config(path)
            sizes = _sizes(config)
            if sizes is None or sizes in seen or sizes[:3] != _weight_sizes(shapes):
                continue
            seen.add(sizes)
            expected = build_base_model(config).state_dict()  # meta device: names and shapes only
        except Exception:  # noqa: BLE001 - a fragment or a config of something else: not a candidate
            continue
        if all(shapes.get(k) == tuple(v.shape) for k, v in expected.items() if not is_added_key(k)):
            found.append(path.relative_to(REPO) if path.is_relative_to(REPO) else path)
    return found


def _sizes(config: DictConfig) -> Optional[Tuple]:
    """(UNet model_channels, context_dim, text-encoder width, the rest of the base model's sizes) of a full model
    config; None for a fragment."""
    params = OmegaConf.select(config, "model.params")
    if not isinstance(params, DictConfig) or not {"unet_config", "first_stage_config"} <= set(params):
        return None
    unet = OmegaConf.to_container(params.unet_config.get("params", {}), resolve=True)
    unet.pop("adapter_config", None)
    text = OmegaConf.to_container(params.get("cond_stage_config", {}).get("params", {}), resolve=True)
    text.pop("adapter_config", None)
    rest = json.dumps([unet, text, OmegaConf.to_container(params.first_stage_config, resolve=True)], sort_keys=True)
    return unet.get("model_channels"), unet.get("context_dim"), text.get("width", 768), rest


def _weight_sizes(shapes: Dict[str, Tuple[int, ...]]) -> Tuple:
    """(UNet model_channels, context_dim, text-encoder width) of a base checkpoint's weights."""
    conv_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight", (None,))
    to_k = next((v for k, v in shapes.items() if k.endswith("attn2.to_k.weight")), (None, None))
    width = shapes.get("cond_stage_model.transformer.text_model.final_layer_norm.weight", (None,))
    return conv_in[0], to_k[1], width[0]


def config_fix(ckpt: str, message: str) -> str:
    """For base weights that do not fit the config (`message`): the fix, naming the project's configs they fit."""
    if "does not match the model" not in message:
        return ""
    fits = fitting_configs(ckpt)
    return (f" Pass --config {fits[0]} (these weights fit it)" if fits else
            " Pass the config these weights were made with: --config CONFIG.yaml")


def adapter_config_from_file(path: str) -> Dict[str, Any]:
    """The UNet adapter config in a YAML file: a model config's, an adapter directory's adapter_config.yaml's, or
    the sections themselves (transformer_adp_config, ...)."""
    config = load_yaml_config(path)
    found = pop_adapter_configs(config)["unet"] if "model" in config else config.get("adapter_config", config)
    if not found or not set(found) & set(SECTIONS):
        raise ConfigError(f"'{path}' holds no UNet adapter config: expected a model config with "
                          "model.params.unet_config.params.adapter_config, or adapter_config: with "
                          f"{' / '.join(SECTIONS)}")
    return found
