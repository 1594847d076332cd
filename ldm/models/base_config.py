"""The model config of a base checkpoint when none is given, which of the project's configs a checkpoint fits when
the given one does not.

Looked for in this order: `<checkpoint stem>.yaml` or `config.yaml` beside the file; the config the file names in its
safetensors metadata (`config`: a path, relative to the working directory or the repository; the tiny model's file
names configs/tiny-world/tiny-sd-v1.yaml); for a diffusers model folder, a config made from the folder's own
`unet/`, `vae/`, `text_encoder/` and `scheduler/` configs; else SD v1's configs/stable-diffusion/v1-inference.yaml.
"""
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open

from ldm.config import build_base_model, load_configs, load_yaml_config, pop_adapter_configs
from ldm.modules.adapters import SECTIONS, is_added_key
from ldm.modules.diffusers_folder import BETA_SCHEDULES, read_base_weights, read_json
from ldm.checks import ConfigError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
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
            in_channels=vae["in_channels"], out_ch=vae["out_channels"])
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
