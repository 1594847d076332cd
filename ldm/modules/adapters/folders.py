"""peft folders written from an adapter group: what `PeftModel.from_pretrained(network, folder)` loads, for the forms
peft has (LoRA and LoCon without a Tucker mid as LORA, DoRA as LORA with use_dora, LoHa as LOHA, LoKr as LOKR).

A folder holds one network: `adapter_config.json` (peft_type, r, alpha / lora_alpha, target_modules by full path,
rank_pattern and alpha_pattern where modules differ, and the form's own fields) and `adapter_model.safetensors` with
keys `base_model.model.<path>.<peft tensor name>`, where <path> is the diffusers path in UNet2DConditionModel or the
path in transformers' CLIPTextModel. Each update folds its strength into its factors, so every module's alpha equals its
rank (scale 1). A group on both networks is written as `<folder>/unet` and `<folder>/text_encoder`; the reader
(`ldm.modules.adapters.sources`) takes either.
"""
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List

import torch.nn as nn

from ldm.checkpoint import save_state_dict
from ldm.modules.adapters.files import external_names, projection_updates
from ldm.modules.adapters.io import write_dir
from ldm.modules.adapters.sources import ALPHA_KEY, FOLDER_WEIGHTS, PEFT_CONFIG
from ldm.modules.adapters.spec import DEFAULT_GROUP, AdapterConfigError

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."


def peft_folder_contents(model: nn.Module, name: str = DEFAULT_GROUP) -> Dict[str, tuple]:
    """{network ("unet", "text_encoder"): (adapter_config.json dict, tensors)} of group `name`."""
    names, by_network = external_names(model), defaultdict(dict)
    for path, u in projection_updates(model, name).items():
        if path not in names:
            raise AdapterConfigError(f"{path} has no diffusers name (peft folders here name the modules of SD v1's "
                                     "UNet and CLIP text encoder); keep this group as an adapter directory")
        head, local = names[path].split(".", 1)
        by_network[head][local] = u
    return {head: _folder(updates, head) for head, updates in by_network.items()}


def _folder(updates: Dict[str, Any], head: str) -> tuple:
    for path, u in updates.items():
        if not type(u).PEFT_TYPE:
            u.peft_tensors(path)  # an update peft has no form for refuses with its reason
    types = {type(u).PEFT_TYPE for u in updates.values()}
    extra: Dict[str, Any] = {}
    agree = len(types) == 1
    for u in updates.values():  # every update's peft fields (those it does not care about left out) must agree
        for k, v in u.peft_config().items():
            agree = agree and extra.setdefault(k, v) == v
    if not agree:
        found = ", ".join(sorted({type(u).__name__ for u in updates.values()}))
        raise AdapterConfigError(f"a peft folder holds one adapter type with one set of options, but the {head} has "
                                 f"{found} updates {'with different options ' if len(types) == 1 else ''}that peft "
                                 "cannot hold together: write a kohya / LyCORIS file, or keep the adapter directory")
    peft_type = types.pop()
    ranks = {path: _rank(u) for path, u in updates.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank; the others by pattern
    differ = {p: k for p, k in ranks.items() if k != r}
    config = {"peft_type": peft_type, "r": r, ALPHA_KEY[peft_type]: r, "target_modules": sorted(updates),
              "rank_pattern": differ, "alpha_pattern": dict(differ), "base_model_name_or_path": None,
              "inference_mode": True, "task_type": None, **extra}
    tensors = {k: v.detach().contiguous() for path, u in updates.items()
               for k, v in u.peft_tensors(PEFT_PREFIX + path).items()}
    return config, tensors


def _rank(update: Any) -> int:
    return int(update.layout()[1])  # every low-rank update's layout is (kind, rank, ...)


def save_peft_folder(model: nn.Module, path: str, name: str = DEFAULT_GROUP) -> List[Path]:
    """Write group `name` as a peft folder (one network) or as `<path>/unet` and `<path>/text_encoder`; returns the
    folders written, atomically (`write_dir`); `path` must not exist or be an empty folder (nothing is overwritten)."""
    contents, path = peft_folder_contents(model, name), Path(path)
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        raise AdapterConfigError(f"'{path}' exists and is not an empty folder; not overwriting it")

    def write(tmp: Path) -> None:
        for head, (config, tensors) in contents.items():
            folder = tmp if len(contents) == 1 else tmp / head
            folder.mkdir(exist_ok=True)
            save_state_dict(tensors, str(folder / FOLDER_WEIGHTS["peft"][0]), metadata={"format": "pt"})
            (folder / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
            log.info("wrote a peft %s folder for the %s (%d modules)", config["peft_type"], head,
                     len(config["target_modules"]))
    write_dir(path, write)
    return [path] if len(contents) == 1 else [path / head for head in contents]
