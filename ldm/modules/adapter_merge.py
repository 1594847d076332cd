"""Folding projection adapters into the base weights, and combining two LoRAs: what `scripts/merge.py` runs.

The modes of cloneofsimo/lora's `lora_add`, side by side, for adapters 1 and 2 and a weight α (`--alpha`); ΔW is an
adapter's update at its saved scale (LoRA: alpha / rank * up @ down; (IA)^3 without learned biases: W * w):
  upl    W' = W + α·ΔW                   a base SD checkpoint plus one LoRA or (IA)^3, written as a full checkpoint
                                         in the original layout (loads anywhere an SD v1 checkpoint does)
  lpl    up = α·up1 + (1-α)·up2,         cloneofsimo's LoRA + LoRA: needs the same modules and ranks; ΔW has cross
         down = α·down1 + (1-α)·down2    terms, e.g. at α = 0.5 it is (up1 + up2)(down1 + down2) / 4
  exact  ΔW = α·ΔW1 + (1-α)·ΔW2          exactly: ranks concatenated (r1 + r2); modules of either LoRA
lpl and exact fold each alpha / rank into up first and write a LoRA with alpha = rank: an adapter directory, or a
kohya / diffusers `.safetensors` file.
"""
import logging
from typing import Dict, Optional

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from ldm.checkpoint import load_into, save_state_dict
from ldm.models.diffusion.ddpm import is_added_key
from ldm.modules.adapter_config import DEFAULT_GROUP, AdapterConfigError
from ldm.modules.adapter_io import load_adapter_from_dir, save_adapter_to_dir
from ldm.modules.diffusers_folder import read_base_weights
from ldm.modules.adapters import group_adapters, is_projection, remove_adapters, set_adapter_scale
from ldm.modules.lora import LoRAFactors, mix_factors, stack_factors
from ldm.modules.lora_export import FORMATS, install_updates, projection_updates, save_lora_file
from ldm.util import instantiate_from_config

log = logging.getLogger(__name__)

MODES = ("upl", "lpl", "exact")


def merge_adapters(model: nn.Module, name: str = DEFAULT_GROUP) -> int:
    """Fold group `name` into the weights it adapts, at its current strength, and remove it; returns the number of
    modules changed. The output is the unmerged model's (group enabled) up to rounding."""
    entries = group_adapters(model, name)
    for path, host, group in entries:
        _check_mergeable(path, host, group, name)
    deltas = [(host, sum(a.spec.scale * group.scale * a.delta_weight(host) for a in group))
              for _, host, group in entries]
    remove_adapters(model, name)
    with torch.no_grad():
        for host, delta in deltas:
            host.weight.add_(delta.to(host.weight.dtype))
    log.info("merged adapter group '%s' into %d modules", name, len(deltas))
    return len(deltas)


def _check_mergeable(path: str, host: nn.Module, group: nn.Module, name: str) -> None:
    if not is_projection(host):
        raise AdapterConfigError(f"group {name!r} has block adapters ({group[0].spec.describe()}) on {path}: "
                                 "nonlinear bottlenecks cannot be folded into the weights; only LoRA and (IA)^3 "
                                 "without learn_biases merge")
    readers = [g for g, group in host.adapters.items() if g != name and any(getattr(a, "READS_BASE", False)
                                                                          for a in group)]
    if readers:
        raise AdapterConfigError(f"group {readers[0]!r} has (IA)^3 on {path}, which rescales that module's base "
                                 f"output: merging {name!r} under it would change it; merge or remove {readers[0]!r} "
                                 "first")


def save_base_checkpoint(model: nn.Module, path: str) -> None:
    """Write `model`'s weights without adapter keys: a full SD checkpoint in the original layout (.ckpt or
    .safetensors)."""
    save_state_dict({k: v for k, v in model.state_dict().items() if not is_added_key(k)}, path)


def base_model(config: str, ckpt: Optional[str] = None) -> nn.Module:
    """The model of `config` without its adapter configs, built on the meta device (no memory, no init), with the
    weights of `ckpt` assigned when given: names and shapes for file work, or a real model to merge into."""
    cfg = OmegaConf.load(config)
    for part in ("unet_config", "cond_stage_config"):
        params = OmegaConf.select(cfg, f"model.params.{part}.params")
        if params is not None:
            params.pop("adapter_config", None)
    with torch.device("meta"):
        model = instantiate_from_config(cfg.model)
    if ckpt:
        load_into(model, read_base_weights(ckpt), source=f"checkpoint '{ckpt}'", optional=is_added_key)
    return model


def merge_into_checkpoint(config: str, ckpt: str, adapter_path: str, output: str, alpha: float = 1.0) -> None:
    """upl: W' = W + alpha·ΔW for the adapter at `adapter_path` (directory or LoRA file) on base `ckpt`, written to
    `output`."""
    model = base_model(config, ckpt)
    load_adapter_from_dir(model, adapter_path, "merge")
    set_adapter_scale(model, alpha, "merge")
    merge_adapters(model, "merge")
    save_base_checkpoint(model, output)


def combine_updates(a: Dict[str, LoRAFactors], b: Dict[str, LoRAFactors], mode: str, alpha: float
                    ) -> Dict[str, LoRAFactors]:
    """Two LoRAs (per module path) combined by `mode` lpl or exact (see the module docstring)."""
    if mode == "lpl":
        differ = sorted(set(a) ^ set(b))
        if differ:
            raise AdapterConfigError(f"lpl mixes LoRAs on the same modules, but {len(differ)} module(s) are in only "
                                     f"one, e.g. {differ[0]}; use --mode exact")
        return {p: mix_factors(a[p], b[p], alpha) for p in a}
    if mode != "exact":
        raise AdapterConfigError(f"unknown LoRA + LoRA mode {mode!r}; allowed: lpl, exact")
    terms = {p: [] for p in list(a) + [p for p in b if p not in a]}
    for part, weight in ((a, alpha), (b, 1 - alpha)):
        for p, f in part.items():
            terms[p].append(f.scaled(weight))
    return {p: stack_factors(fs) for p, fs in terms.items()}


def _lora_updates(model: nn.Module, path: str, group: str) -> Dict[str, LoRAFactors]:
    load_adapter_from_dir(model, path, group)
    updates = projection_updates(model, group)
    ia3 = [p for p, u in updates.items() if not isinstance(u, LoRAFactors)]
    if ia3:
        raise AdapterConfigError(f"lpl and exact combine LoRAs, but '{path}' holds (IA)^3 on {len(ia3)} module(s), "
                                 f"e.g. {ia3[0]}; merge it into a checkpoint with --mode upl instead")
    return updates


def combine_loras(config: str, path_1: str, path_2: str, output: str, mode: str = "exact", alpha: float = 0.5,
                  fmt: str = "kohya") -> None:
    """lpl / exact: combine the LoRAs at `path_1` and `path_2` (directories or files) for the model of `config`, and
    write an adapter directory, or a `fmt` (kohya / diffusers) file when `output` ends in .safetensors."""
    if fmt not in FORMATS:
        raise AdapterConfigError(f"unknown LoRA file format {fmt!r}; allowed: {', '.join(FORMATS)}")
    model = base_model(config)  # meta: names and shapes only, the LoRA tensors are real
    combined = combine_updates(_lora_updates(model, path_1, "lora1"), _lora_updates(model, path_2, "lora2"), mode,
                               alpha)
    install_updates(model, combined, "merged", f"{mode} merge of '{path_1}' and '{path_2}'")
    if str(output).endswith(".safetensors"):
        save_lora_file(model, output, "merged", fmt)
    else:
        save_adapter_to_dir(model, output, "merged")
