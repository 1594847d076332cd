"""The training config of the tiny base model (configs/tiny-world/train-base*.yaml): its keys and their ranges,
checked before any work, so a misspelt key or a number out of range is refused with its name instead of being
ignored or found an hour into training.
"""
import difflib
from pathlib import Path
from typing import Any, Dict, List, Sequence

from omegaconf import DictConfig, OmegaConf

from ldm.checks import ConfigError, SEED_MAX, check_number, check_output, check_writable_place
from ldm.config import parse_override


LATENT_FACTOR = 8  # the autoencoder's downsampling: image sizes are multiples of it

# key: (low, high, integer, low_open, high_open)
STAGE_NUMBERS = {"steps": (0, None, True), "batch_size": (1, None, True), "lr": (0, None, False, True)}
NUMBERS: Dict[str, tuple] = {
    "seed": (0, SEED_MAX, True), "data.num_images": (1, None, True), "data.size": (LATENT_FACTOR, None, True),
    **{f"vae.{k}": v for k, v in STAGE_NUMBERS.items()}, "vae.kl_weight": (0, None), "vae.l2_weight": (0, None),
    **{f"decoder.{k}": v for k, v in STAGE_NUMBERS.items()}, "decoder.l2_weight": (0, None),
    **{f"diffusion.{k}": v for k, v in STAGE_NUMBERS.items()}, "diffusion.warmup_steps": (0, None, True),
    "diffusion.p_uncond": (0, 1), "diffusion.ema_decay": (0, 1, False, False, True),
    "diffusion.checkpoint_every": (1, None, True),
}
# may be left out or null (off); checked when set. min_snr_gamma: the min-SNR-gamma loss weighting (ldm.tinyworld.base)
# crop: train the autoencoder (decoder) on random crops of that many pixels (a fully convolutional one: attn_type none)
# checkpoint_minutes: how much wall clock a kill may lose (default 5)
OPTIONAL_NUMBERS: Dict[str, tuple] = {"diffusion.min_snr_gamma": (0, None, False, True),
                                      "vae.crop": (LATENT_FACTOR, None, True), "decoder.crop": (LATENT_FACTOR, None, True),
                                      "checkpoint_minutes": (0, None, False, True),
                                      "diffusion.offset_noise": (0, 1)}
PATHS = ("model_config", "out", "work_dir")
CHOICES = {"vae.world": ("base", "probe", "closeup"), "data.world": ("base", "closeup"),
           "diffusion.ema_warmup": (True, False)}
OPTIONAL = ("init", "vae.world", "data.world", "diffusion.ema_warmup", "decoder", *OPTIONAL_NUMBERS)  # may be left out (decoder: null skips 3)


def known_keys() -> List[str]:
    return [*NUMBERS, *OPTIONAL_NUMBERS, *PATHS, *CHOICES, "init", "decoder"]


def leaf_keys(config: Any, prefix: str = "") -> List[str]:
    """The dotted keys of a config's values (a null section counts as a value)."""
    if not isinstance(config, (dict, DictConfig)):
        return [prefix]
    keys = []
    for k, v in config.items():
        keys += leaf_keys(v, f"{prefix}{k}.") if isinstance(v, (dict, DictConfig)) else [f"{prefix}{k}"]
    return keys


def check_base_config(config: DictConfig) -> None:
    """Every key known, every number in range, the files there and the output new (nothing is overwritten)."""
    data = OmegaConf.to_container(config, resolve=True)
    for key in leaf_keys(data):
        if key not in known_keys():
            near = difflib.get_close_matches(key, known_keys(), n=1)
            raise ConfigError(f"unknown key '{key}' in the tiny base training config"
                              + (f"; did you mean '{near[0]}'?" if near else f"; keys: {', '.join(known_keys())}"))
    for key, bounds in {**NUMBERS, **OPTIONAL_NUMBERS}.items():
        if key.startswith("decoder.") and not data.get("decoder"):
            continue
        value = OmegaConf.select(config, key)
        if value is None and key in OPTIONAL_NUMBERS:
            continue
        try:
            check_number(value, key, *bounds)
        except ValueError as e:
            raise ConfigError(f"{e}{' (the key is missing)' if value is None else ''}") from None
    size = data["data"]["size"]
    if size % LATENT_FACTOR:
        raise ConfigError(f"data.size must be a multiple of {LATENT_FACTOR} (the autoencoder's factor), got {size}")
    for key in ("vae.crop", "decoder.crop"):
        crop = OmegaConf.select(config, key)
        if crop is not None and (crop % LATENT_FACTOR or crop > size):
            raise ConfigError(f"{key} must be a multiple of {LATENT_FACTOR} and at most data.size ({size}), got {crop}")
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(config, key)
        if value is not None and (value not in allowed or type(value) not in {type(a) for a in allowed}):
            raise ConfigError(f"{key} must be one of {', '.join(map(str, allowed))}, got {value!r}")
    _check_files(data)


def _check_files(data: Dict[str, Any]) -> None:
    missing = [k for k in PATHS if not isinstance(data.get(k), str) or not data[k]]
    if missing:
        raise ConfigError(f"the tiny base training config needs {', '.join(missing)} (a path)")
    if not Path(data["model_config"]).is_file():
        raise ConfigError(f"model_config: no config file at '{data['model_config']}'")
    init = data.get("init") or []
    init = [init] if isinstance(init, str) else init
    if not isinstance(init, list) or not all(isinstance(p, str) and p for p in init):
        raise ConfigError(f"init must be a base model file or a list of them (parts of one), got {data.get('init')!r}")
    for path in init:
        if not Path(path).exists():
            raise ConfigError(f"init: no base model file at {path}: train one with configs/tiny-world/train-base.yaml "
                              "or set init to the shipped models/ldm/tiny-sd-v1/model.safetensors")
    check_output(data["out"], "out", suffixes=(".safetensors",), inputs=init)
    check_writable_place(Path(data["work_dir"]) / "x", "work_dir")  # a folder that can be made (or is reused)


def apply_overrides(config: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """KEY=VALUE overrides (VALUE is YAML) on a copy of `config`; unknown keys are refused by `check_base_config`."""
    config = OmegaConf.create(OmegaConf.to_container(config))
    for item in overrides:
        key, value = parse_override(item)
        OmegaConf.update(config, key, value, force_add=True)
    return config
