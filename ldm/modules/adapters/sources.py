"""LoRA files (and LyCORIS / peft files of the other linear forms) as other tools write them: which file types are
read (safely), and what a file says about each module's strength besides its tensors.

File types (`read_lora_source`):
  `.safetensors`                    tensors, and diffusers' `lora_adapter_metadata` (see below)
  `.pt` / `.pth` / `.bin` / `.ckpt`  a dict of named tensors (torch.save), read by ldm.checkpoint's safe reader: no
                                    pickled code ever runs
  a peft folder                     `adapter_config.json` + `adapter_model.safetensors` (or `.bin`):
                                    `PeftModel.save_pretrained` of one network; peft types LORA (use_dora too),
                                    LOHA, LOKR
  a folder of peft folders          `unet/` and / or `text_encoder/`, each a peft folder (as
                                    `ldm.modules.adapters.folders` writes a group on both networks, and diffengine)
  a diffusers folder                `pytorch_lora_weights.safetensors` (or `.bin`): `save_lora_weights`

Strength. ΔW = alpha / rank * up @ down (peft: scaling = lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`;
LoHa / LoKr configs call it `alpha`). A module's alpha is its own `.alpha` tensor (kohya, A1111, LyCORIS) or comes
from its network's peft config: diffusers' `save_lora_weights` stores those in the safetensors metadata
`lora_adapter_metadata` (JSON, fields prefixed `unet.` / `text_encoder.`: `lora_alpha`, `alpha_pattern`,
`rank_pattern`, `r`, `use_rslora`, ...), a peft folder in `adapter_config.json`. A pattern key matches a module name as
peft matches it (the name ends with it, after a dot). The scale a config gives is written into the tensors the way a
kohya file states it (each update class's `with_scale`). A file that gives neither is read with alpha = rank (scale 1),
the default of kohya, diffusers and peft files, and the loader says so.
"""
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
from safetensors import safe_open

from ldm.checkpoint import CheckpointError, load_state_dict
from ldm.modules.adapters.spec import AdapterDirError

log = logging.getLogger(__name__)

METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
FILE_SUFFIXES = (".safetensors",) + TORCH_SUFFIXES
PEFT_CONFIG = "adapter_config.json"
PEFT_NETWORKS = ("unet", "text_encoder")  # the subfolders of a folder of peft folders
FOLDER_WEIGHTS = {"peft": ("adapter_model.safetensors", "adapter_model.bin"),
                  "diffusers": ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")}
PEFT_DEFAULT_ALPHA = 8  # peft's lora_alpha / alpha when a config leaves it out
PEFT_DEFAULT_R = 8
PEFT_TYPES = ("LORA", "LOHA", "LOKR")  # the peft adapter types read here (LORA with use_dora too)
ALPHA_KEY = {"LORA": "lora_alpha", "LOHA": "alpha", "LOKR": "alpha"}
REFUSED_FLAGS = {"lora_bias": "a LoRA bias on lora_B", "use_qalora": "QA-LoRA", "layer_replication": "layer "
                 "replication", "unbalanced_factorization": "LoKr's unbalanced factorisation"}
EXPECTED = ("a LoRA file is .safetensors or a torch file (.pt, .pth, .bin, .ckpt) holding a dict of named tensors "
            "(kohya lora_unet_... / lora_te_..., diffusers unet.<path>.lora_A.weight, peft <path>.lora_A.weight)")


@dataclass
class LoraSource:
    """A LoRA file's tensors, its peft LoraConfig per network ("unet", "text_encoder"; "" for the one network of a
    peft folder), and its description for messages."""
    tensors: Dict[str, torch.Tensor]
    source: str
    configs: Dict[str, dict] = field(default_factory=dict)


def folder_kind(path: Path) -> Optional[str]:
    """"peft", "peft networks" (unet/ and / or text_encoder/ peft folders) or "diffusers" for a folder those tools
    write an adapter into, else None."""
    if not path.is_dir():
        return None
    if (path / PEFT_CONFIG).is_file():
        return "peft"
    if any((path / n / PEFT_CONFIG).is_file() for n in PEFT_NETWORKS):
        return "peft networks"
    return "diffusers" if any((path / f).is_file() for f in FOLDER_WEIGHTS["diffusers"]) else None


def _read_peft_networks(path: Path) -> LoraSource:
    """A folder of per-network peft folders as one source: keys and configs under "unet." / "text_encoder."."""
    tensors, configs = {}, {}
    for head in PEFT_NETWORKS:
        if (path / head / PEFT_CONFIG).is_file():
            part = read_lora_source(str(path / head))
            prefix = "base_model.model."
            tensors.update({f"{head}.{k[len(prefix):] if k.startswith(prefix) else k}": v
                            for k, v in part.tensors.items()})
            configs[head] = part.configs[""]
    return LoraSource(tensors, f"peft folders '{path}/{{{','.join(configs)}}}'", configs)


def read_lora_source(path: str) -> LoraSource:
    """The tensors and configs of a LoRA file or a peft / diffusers folder, read safely."""
    path = Path(path)
    kind = folder_kind(path)
    if kind == "peft networks":
        return _read_peft_networks(path)
    if kind is not None:
        file = next((path / f for f in FOLDER_WEIGHTS[kind] if (path / f).is_file()), None)
        if file is None:
            raise AdapterDirError(f"peft folder '{path}' has {PEFT_CONFIG} but no weights: expected "
                                  f"{' or '.join(FOLDER_WEIGHTS['peft'])} beside it")
        source = read_lora_source(str(file))
        if kind == "peft":
            source.configs = {"": _read_peft_config(path / PEFT_CONFIG)}
            source.source = f"peft folder '{path}'"
        return source
    if path.suffix not in FILE_SUFFIXES:
        raise AdapterDirError(f"'{path}' is not a LoRA file: {EXPECTED}")
    source = f"LoRA file '{path}'"
    try:
        tensors = load_state_dict(str(path))
    except CheckpointError as e:
        raise AdapterDirError(f"{e}. Expected: {EXPECTED}; a list of tensors without names (cloneofsimo's "
                              "lora_diffusion .pt) cannot be mapped to modules") from None
    configs = _read_metadata(path, source) if path.suffix == ".safetensors" else {}
    for head, config in configs.items():
        check_lora_config(config, f"{source} ({head} in its {METADATA_KEY})")
    return LoraSource(tensors, source, configs)


def _read_metadata(path: Path, source: str) -> Dict[str, dict]:
    """diffusers' per-network LoraConfig fields from the safetensors metadata: {"unet": {...}, "text_encoder": ...}."""
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise AdapterDirError(f"{source}: its {METADATA_KEY} is not valid JSON ({e})") from None
    if not isinstance(flat, dict):
        raise AdapterDirError(f"{source}: its {METADATA_KEY} is not a JSON object")
    configs: Dict[str, dict] = {}
    for key, value in flat.items():
        head, _, name = key.partition(".")
        configs.setdefault(head, {})[name] = value
    return configs


def _read_peft_config(file: Path) -> dict:
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterDirError(f"'{file}' is not a valid peft adapter config: {e}") from None
    if not isinstance(config, dict):
        raise AdapterDirError(f"'{file}' is not a valid peft adapter config: not a JSON object")
    check_lora_config(config, f"'{file}'")
    return config


def peft_type(config: Mapping[str, Any]) -> str:
    return str(config.get("peft_type") or "LORA").upper()


def check_lora_config(config: Mapping[str, Any], where: str) -> None:
    """Refuse a peft config this loader would read wrong: another peft type, LoRA biases, bad numbers."""
    if peft_type(config) not in PEFT_TYPES:
        raise AdapterDirError(f"{where} is a peft {config.get('peft_type')} adapter; peft adapters read here are LoRA "
                              "(and DoRA), LoHa and LoKr (kohya / LyCORIS / A1111 (IA)^3 files are read too)")
    refused = [what for flag, what in REFUSED_FLAGS.items() if config.get(flag)]
    if refused:
        raise AdapterDirError(f"{where} uses {', '.join(refused)}, which this loader does not implement: the file "
                              "would load with the wrong weights")
    for name in ("lora_alpha", "alpha", "r"):
        if name in config and not _positive(config[name]):
            raise AdapterDirError(f"{where}: {name} must be a positive number, got {config[name]!r}")
    for name in ("alpha_pattern", "rank_pattern"):
        patterns = config.get(name) or {}
        if not isinstance(patterns, dict) or not all(_positive(v) for v in patterns.values()):
            raise AdapterDirError(f"{where}: {name} must map module names to positive numbers, got {patterns!r}")
        for key in patterns:
            try:
                re.compile(key)
            except re.error as e:
                raise AdapterDirError(f"{where}: {name} key {key!r} is not a valid regular expression ({e})") from None


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def pattern_value(patterns: Mapping[str, Any], name: str) -> Optional[Any]:
    """The value of the first pattern key that `name` ends with (after a dot, or whole), as peft's get_pattern_key."""
    return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", name)), None)


def config_scale(config: Mapping[str, Any], name: str, rank: Optional[int], where: str) -> float:
    """The scale (alpha / r, rsLoRA: alpha / sqrt(r)) of module `name` under a peft config; a rank the tensors show is
    checked against r / rank_pattern."""
    expected = pattern_value(config.get("rank_pattern") or {}, name)
    expected = config.get("r") if expected is None else expected
    if rank is not None and expected is not None and int(expected) != rank:
        raise AdapterDirError(f"{where}: its tensors have rank {rank}, its LoRA config (r, rank_pattern) says "
                              f"{int(expected)}: the file is inconsistent")
    r = rank if rank is not None else int(PEFT_DEFAULT_R if expected is None else expected)
    alpha = pattern_value(config.get("alpha_pattern") or {}, name)
    alpha = float(config.get(ALPHA_KEY[peft_type(config)], PEFT_DEFAULT_ALPHA) if alpha is None else alpha)
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def fill_alphas(modules: Dict[str, Dict[str, torch.Tensor]], classes: Mapping[str, Any], configs: Mapping[str, dict],
                source: str) -> None:
    """Give each module of `modules` ({"unet.<path>" / "text_encoder.<path>": kohya-named tensors}, read by the update
    class `classes[name]`) its strength: its own `alpha` tensor, else its network's peft config (written into the
    tensors by the class's `with_scale`), else alpha = rank, said in the log."""
    assumed: List[str] = []
    for name, tensors in modules.items():
        cls, (head, local) = classes[name], name.split(".", 1)
        config = configs.get(head, configs.get(""))
        if "alpha" in tensors and not math.isfinite(float(tensors["alpha"])):
            raise AdapterDirError(f"{source}: {name} has alpha {float(tensors['alpha'])}: the file is damaged")
        rank = cls.rank_of(tensors)
        if config is None:
            assumed += [] if "alpha" in tensors or rank is None else [name]
            continue
        if cls.PEFT_TYPE != peft_type(config):
            raise AdapterDirError(f"{source}: {name} holds {cls.__name__} tensors but its peft config is of type "
                                  f"{peft_type(config)}: the file contradicts itself")
        says = bool(config.get("use_dora"))
        if says != cls.PEFT_DORA:
            raise AdapterDirError(f"{source}: {name}: its peft config {'says' if says else 'does not say'} use_dora "
                                  f"but its tensors {'have no' if says else 'have a'} DoRA magnitude "
                                  "(lora_magnitude_vector): the file contradicts itself")
        scale = config_scale(config, local, rank, f"{source}: {name}")
        if "alpha" in tensors and rank is not None and not math.isclose(float(tensors["alpha"]), scale * rank,
                                                                       rel_tol=1e-6):
            raise AdapterDirError(f"{source}: {name} has alpha {float(tensors['alpha']):g} as a tensor and "
                                  f"{scale * rank:g} from its LoRA config: the file contradicts itself")
        modules[name] = cls.with_scale({k: v for k, v in tensors.items() if k != "alpha"}, scale)
    if assumed:
        log.info("%s gives no alpha for %d of its LoRA modules (no .alpha tensors, no %s or %s): assuming alpha = "
                 "rank (scale 1), the kohya / diffusers / peft default; if it was trained with another lora_alpha, "
                 "its strength is off by lora_alpha / rank (set it with --adapter_scale)", source, len(assumed),
                 METADATA_KEY, PEFT_CONFIG)
