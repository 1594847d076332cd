"""Adapter directories: one adapter group as safetensors plus the config that built it, written atomically; and the
paper code's directories (one `<module path>.pt` state dict per adapter module), read safely."""
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import yaml

from ldm.checkpoint import CheckpointError, load_into, load_state_dict, save_state_dict
from ldm.modules.adapters import (DEFAULT_GROUP, AdapterConfigError, AdapterSpec, adapter_blocks, adapter_groups,
                                  adapter_state_dict, config_from_specs, describe, inject_adapters,
                                  parse_adapter_config, remove_adapters)

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.yaml"
WEIGHTS_FILE = "adapters.safetensors"
# The original code's file names (Xiang-cd/unet-finetune, `UNetModel_inject.save_adapter_to_dir`)
ORIGINAL_SUFFIX = {"transformer": ".adapter_inout.pt", "resblock": ".adapter.pt"}
ORIGINAL_DUPLICATE = ".adapter_inout.adp.pt"  # the same tensors again under another prefix; ignored


class AdapterDirError(AdapterConfigError):
    """An adapter directory that is missing, damaged, or made for another model or adapter config."""


def save_adapter_to_dir(unet: nn.Module, path: str, name: str = DEFAULT_GROUP) -> Path:
    """Write adapter group `name` to directory `path`: its weights and the config that built them, atomically.

    Everything is written into a temporary sibling directory that is renamed into place, so a crash never leaves a
    half-written directory that loads. An existing adapter directory at `path` is replaced; anything else is kept.
    """
    specs = adapter_groups(unet).get(name)
    if specs is None:
        raise AdapterDirError(f"no adapter group {name!r} to save; the UNet has: "
                              f"{', '.join(adapter_groups(unet)) or 'none'}")
    path = Path(path)
    if path.exists() and not (path.is_dir() and ((path / CONFIG_FILE).exists() or not any(path.iterdir()))):
        raise AdapterDirError(f"'{path}' exists and is not an adapter directory; not overwriting it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".tmp-{path.name}-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # the permissions of a plain mkdir, not mkdtemp's private 0700
    try:
        save_state_dict(adapter_state_dict(unet, name), str(tmp / WEIGHTS_FILE))
        text = yaml.safe_dump({"adapter_config": config_from_specs(specs)}, sort_keys=False)
        (tmp / CONFIG_FILE).write_text(f"# adapter group '{name}', written by ldm.modules.adapter_io\n{text}")
        _replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("saved adapter group '%s' (%s) to %s", name, describe(specs), path)
    return path


def _replace_dir(new: Path, path: Path) -> None:
    if not path.exists():
        os.replace(new, path)
        return
    old = path.with_name(f".old-{path.name}-{uuid.uuid4().hex[:8]}")
    os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def load_adapter_from_dir(unet: nn.Module, path: str, name: str = DEFAULT_GROUP, adapter_config: Any = None) -> None:
    """Load an adapter directory into group `name` of `unet`: ours (safetensors + config) or the paper code's.

    When `unet` has no group `name`, it is injected first from the directory's own config, or, for an original-format
    directory (which carries no config), from `adapter_config`. An existing group must have the directory's layout.
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterDirError(f"adapter directory not found: '{path}'")
    if not (path / CONFIG_FILE).is_file() and not any(path.glob("*.pt")):
        raise AdapterDirError(f"'{path}' is not an adapter directory: it holds neither {CONFIG_FILE} and "
                              f"{WEIGHTS_FILE} nor the original code's <module path>.pt files")
    injected = name not in adapter_groups(unet)
    try:
        if (path / CONFIG_FILE).is_file():
            _load_ours(unet, path, name)
        else:
            _load_original(unet, path, name, adapter_config)
    except AdapterConfigError:
        if injected and name in adapter_groups(unet):
            remove_adapters(unet, name)  # leave the model as it was
        raise
    log.info("loaded adapter group '%s' (%s) from %s", name, describe(adapter_groups(unet)[name]), path)


def _read_config(path: Path) -> List[AdapterSpec]:
    try:
        config = (yaml.safe_load((path / CONFIG_FILE).read_text()) or {}).get("adapter_config")
        return parse_adapter_config(config)
    except (yaml.YAMLError, AttributeError, AdapterConfigError) as e:
        raise AdapterDirError(f"'{path / CONFIG_FILE}' is not a valid adapter config: {e}") from None


def _ensure_group(unet: nn.Module, name: str, specs: Optional[List[AdapterSpec]], source: str) -> None:
    """Inject group `name` from `specs` when absent; else check the group was built from the same layout."""
    have = adapter_groups(unet).get(name)
    if have is None:
        if specs is None:
            raise AdapterDirError(f"{source} is in the original code's format, which carries no adapter config: build "
                                  f"the model with the adapter config it was trained with (e.g. --config "
                                  f"configs/sd-inject-dreambooth/<din>-<dout>.yaml), or pass adapter_config")
        inject_adapters(unet, config_from_specs(specs), name)
        return
    if specs is not None and [s.layout() for s in specs] != [s.layout() for s in have]:
        raise AdapterDirError(f"{source} was made with another adapter config: the directory has {describe(specs)}; "
                              f"the model's group '{name}' has {describe(have)}")
    if specs is not None and [s.scale for s in specs] != [s.scale for s in have]:
        log.warning("%s was saved with scale(s) %s; keeping the model's %s", source, [s.scale for s in specs],
                    [s.scale for s in have])


def _load_ours(unet: nn.Module, path: Path, name: str) -> None:
    source = f"adapter directory '{path}'"
    _ensure_group(unet, name, _read_config(path), source)
    sd = _read(path / WEIGHTS_FILE)
    _copy_into(unet, name, {k.replace(".adapters.", f".adapters.{name}.", 1): v for k, v in sd.items()}, source)


def _load_original(unet: nn.Module, path: Path, name: str, adapter_config: Any) -> None:
    source = f"original-format adapter directory '{path}'"
    _ensure_group(unet, name, None if adapter_config is None else parse_adapter_config(adapter_config), source)
    sd, used, missing = {}, set(), []
    for block_path, block, kind, _ in adapter_blocks(unet):
        group = block.adapters[name] if block.adapters is not None and name in block.adapters else None
        if group is None:
            continue
        if len(group) != 1:
            raise AdapterDirError(f"{source}: the original format holds one adapter per block, but group '{name}' has "
                                  f"{len(group)} on {block_path}")
        file = block_path + ORIGINAL_SUFFIX[kind]
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


def _copy_into(unet: nn.Module, name: str, sd: Dict[str, torch.Tensor], source: str) -> None:
    """Copy `sd` into group `name`, failing with the missing, unexpected or mis-shaped keys."""
    marker = f".adapters.{name}."
    try:
        load_into(unet, sd, source=source, optional=lambda k: marker not in k)
    except CheckpointError as e:
        raise AdapterDirError(str(e)) from None
