"""Adapter directories: one adapter group as safetensors plus the config that built it, written atomically; the paper
code's directories (one `<module path>.pt` state dict per adapter module), read safely; and, through the same
`load_adapter_from_dir`, kohya / A1111 / diffusers / peft LoRA and (IA)^3 files (`.safetensors`, or `.pt` / `.bin` /
`.ckpt` read safely) and peft / diffusers LoRA folders (`ldm.modules.adapters.files`, `.sources`).

A group may span the UNet and the text encoder: `adapter_config.yaml` then holds `adapter_config` (the UNet's) and
`cond_stage_adapter_config` (the text encoder's), and the text encoder's keys in `adapters.safetensors` start with
`cond_stage_model.`; UNet keys are relative to the UNet, as in directories of UNet adapters only.
"""
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
import yaml

from ldm.checkpoint import CheckpointError, load_into, load_state_dict, save_state_dict
from ldm.modules.adapters.attach import (adapter_blocks, adapter_groups, adapter_networks, adapter_state_dict,
                                         inject_adapters, network, restored_on_error)
from ldm.modules.adapters.files import load_lora_file
from ldm.modules.adapters.schema import config_from_specs, form_of, parse_adapter_config
from ldm.modules.adapters.sources import FILE_SUFFIXES, folder_kind
from ldm.modules.adapters.spec import DEFAULT_GROUP, AdapterConfigError, AdapterDirError, AdapterSpec, describe

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.yaml"
WEIGHTS_FILE = "adapters.safetensors"
# The original code (Xiang-cd/unet-finetune, `UNetModel_inject.save_adapter_to_dir`) writes one file per block adapter,
# named by the form's PAPER_SUFFIX, and the same tensors again under this suffix, which is ignored.
ORIGINAL_DUPLICATE = ".adapter_inout.adp.pt"
# per network role: its section of adapter_config.yaml and the prefix of its keys in adapters.safetensors
SECTION = {"unet": "adapter_config", "cond_stage_model": "cond_stage_adapter_config"}
KEY_PREFIX = {"unet": "", "cond_stage_model": "cond_stage_model."}
ACCEPTED = (f"an adapter path is an adapter directory, a LoRA / (IA)^3 file ({', '.join(FILE_SUFFIXES)}) or a peft / "
            "diffusers LoRA folder")


def save_adapter_to_dir(model: nn.Module, path: str, name: str = DEFAULT_GROUP) -> Path:
    """Write adapter group `name` of `model` (a UNet, or a LatentDiffusion whose text encoder may carry part of the
    group) to directory `path`: its weights and the config that built them, atomically.

    Everything is written into a temporary sibling directory that is renamed into place, so a crash never leaves a
    half-written directory that loads. An existing adapter directory at `path` is replaced; anything else is kept.
    """
    nets = {role: net for role, (_, net) in adapter_networks(model).items()
            if name in getattr(net, "adapter_specs", {})}
    if not nets:
        raise AdapterDirError(f"no adapter group {name!r} to save; the model has: "
                              f"{', '.join(adapter_groups(model)) or 'none'}")
    config = {SECTION[role]: config_from_specs(net.adapter_specs[name]) for role, net in nets.items()}
    weights = {KEY_PREFIX[role] + k: v for role, net in nets.items() for k, v in adapter_state_dict(net, name).items()}
    path = Path(path)
    if path.exists() and not (path.is_dir() and ((path / CONFIG_FILE).exists() or not any(path.iterdir()))):
        raise AdapterDirError(f"'{path}' exists and is not an adapter directory; not overwriting it")
    text = f"# adapter group '{name}', written by ldm.modules.adapters\n" + yaml.safe_dump(config, sort_keys=False)

    def write(tmp: Path) -> None:
        save_state_dict(weights, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(text)
    write_dir(path, write)
    log.info("saved adapter group '%s' (%s) to %s", name, describe(adapter_groups(model)[name]), path)
    return path


def write_dir(path: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary sibling of `path` with `write(tmp)` and rename it into place (an existing `path` is replaced
    as a whole), so a crash never leaves a half-written folder that loads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".tmp-{path.name}-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # the permissions of a plain mkdir, not mkdtemp's private 0700
    try:
        write(tmp)
        _replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(new: Path, path: Path) -> None:
    if not path.exists():
        os.replace(new, path)
        return
    old = path.with_name(f".old-{path.name}-{uuid.uuid4().hex[:8]}")
    os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def load_adapter_from_dir(model: nn.Module, path: str, name: str = DEFAULT_GROUP, adapter_config: Any = None) -> None:
    """Load an adapter directory, ours (safetensors + config) or the paper code's, a kohya / A1111 / diffusers / peft
    LoRA or (IA)^3 file, or a peft / diffusers LoRA folder, into group `name` of `model` (a UNet, or a LatentDiffusion
    for text-encoder parts).

    When `model` has no group `name`, it is injected first from the directory's own config, from the file's tensors,
    or, for an original-format directory (which carries no config), from `adapter_config`. An existing group must have
    the directory's layout.
    """
    path = Path(path)
    if path.is_file() or (folder_kind(path) and not (path / CONFIG_FILE).is_file()):
        return load_lora_file(model, str(path), name)
    if not path.is_dir():
        raise AdapterDirError(f"adapter path not found: '{path}' ({ACCEPTED})")
    if not (path / CONFIG_FILE).is_file() and not any(path.glob("*.pt")):
        raise AdapterDirError(f"'{path}' is not an adapter directory: it holds neither {CONFIG_FILE} and "
                              f"{WEIGHTS_FILE} nor the original code's <module path>.pt files ({ACCEPTED})")
    with restored_on_error(model, name):
        if (path / CONFIG_FILE).is_file():
            _load_ours(model, path, name)
        else:
            _load_original(model, path, name, adapter_config)
    log.info("loaded adapter group '%s' (%s) from %s", name, describe(adapter_groups(model)[name]), path)


def _read_config(path: Path) -> Dict[str, List[AdapterSpec]]:
    """The specs of each network role in the directory's config."""
    try:
        config = yaml.safe_load((path / CONFIG_FILE).read_text()) or {}
        unknown = sorted(set(config) - set(SECTION.values()))
        if unknown or not config:
            raise AdapterConfigError(f"expected the key(s) {', '.join(SECTION.values())}, got {', '.join(unknown)}")
        return {role: parse_adapter_config(config[key]) for role, key in SECTION.items() if key in config}
    except (yaml.YAMLError, AttributeError, TypeError, AdapterConfigError) as e:
        raise AdapterDirError(f"'{path / CONFIG_FILE}' is not a valid adapter config: "
                              f"{' '.join(str(e).splitlines()[:3])}") from None


def _ensure_group(net: nn.Module, name: str, specs: Optional[List[AdapterSpec]], source: str) -> None:
    """Inject group `name` into network `net` from `specs` when absent; else check it has the same layout."""
    have = adapter_groups(net).get(name)
    if have is None:
        if specs is None:
            raise AdapterDirError(f"{source} is in the original code's format, which carries no adapter config: build "
                                  f"the model with the adapter config it was trained with (e.g. --config "
                                  f"configs/sd-inject-dreambooth/<din>-<dout>.yaml), or pass adapter_config")
        inject_adapters(net, config_from_specs(specs), name)
        return
    if specs is not None and [s.layout() for s in specs] != [s.layout() for s in have]:
        raise AdapterDirError(f"{source} was made with another adapter config: the directory has {describe(specs)}; "
                              f"the model's group '{name}' has {describe(have)}")
    if specs is not None and [s.scale for s in specs] != [s.scale for s in have]:
        log.warning("%s was saved with scale(s) %s; keeping the model's %s", source, [s.scale for s in specs],
                    [s.scale for s in have])


def _load_ours(model: nn.Module, path: Path, name: str) -> None:
    source = f"adapter directory '{path}'"
    sections = _read_config(path)
    nets = {role: network(model, role, source) for role in sections}
    for role, specs in sections.items():
        _ensure_group(nets[role], name, specs, source)
    sd = _read(path / WEIGHTS_FILE)
    stray = [k for k in sd if _role_of(k) not in nets]
    if stray:
        raise AdapterDirError(f"{source} holds weights of a network its config does not adapt, e.g. {stray[0]}")
    for role, net in nets.items():
        part = {k[len(KEY_PREFIX[role]):]: v for k, v in sd.items() if _role_of(k) == role}
        _copy_into(net, name, {k.replace(".adapters.", f".adapters.{name}.", 1): v for k, v in part.items()}, source)


def _role_of(key: str) -> str:
    """The network a key of adapters.safetensors belongs to."""
    return "cond_stage_model" if key.startswith(KEY_PREFIX["cond_stage_model"]) else "unet"


def _load_original(model: nn.Module, path: Path, name: str, adapter_config: Any) -> None:
    source = f"original-format adapter directory '{path}'"
    unet = network(model, "unet", source)
    _ensure_group(unet, name, None if adapter_config is None else parse_adapter_config(adapter_config), source)
    sd, used, missing = {}, set(), []
    for block_path, block, _, _ in adapter_blocks(unet):
        group = block.adapters[name] if block.adapters is not None and name in block.adapters else None
        if group is None:
            continue
        if len(group) != 1:
            raise AdapterDirError(f"{source}: the original format holds one adapter per block, but group '{name}' has "
                                  f"{len(group)} on {block_path}")
        file = block_path + form_of(group[0].spec).PAPER_SUFFIX
        if not (path / file).is_file():
            missing.append(file)
            continue
        used.add(file)
        sd.update({f"{block_path}.adapters.{name}.0.{k}": v for k, v in _read(path / file).items()})
    extra = sorted(f.name for f in path.glob("*.pt") if f.name not in used and not f.name.endswith(ORIGINAL_DUPLICATE))
    if missing or extra:
        raise AdapterDirError(
            f"{source} was made with another adapter config or model: the model's group '{name}' "
            f"({describe(adapter_groups(unet)[name])}) needs {len(used) + len(missing)} files"
            + (f"; missing {len(missing)}, e.g. {', '.join(missing[:3])}" if missing else "")
            + (f"; {len(extra)} file(s) fit no adapter of the model, e.g. {', '.join(extra[:3])}" if extra else ""))
    _copy_into(unet, name, sd, source)


def _read(file: Path) -> Dict[str, torch.Tensor]:
    if not file.is_file():
        raise AdapterDirError(f"'{file.parent}' lacks {file.name}")
    try:
        return load_state_dict(str(file))  # safetensors, or torch.load(weights_only=True): never runs pickled code
    except CheckpointError as e:
        raise AdapterDirError(str(e)) from None


def _copy_into(net: nn.Module, name: str, sd: Dict[str, torch.Tensor], source: str) -> None:
    """Copy `sd` into group `name`, failing with the missing, unexpected or mis-shaped keys."""
    marker = f".adapters.{name}."
    try:
        load_into(net, sd, source=source, optional=lambda k: marker not in k)
    except CheckpointError as e:
        raise AdapterDirError(str(e)) from None
