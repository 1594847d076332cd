"""Folding projection adapters into the base weights, and combining two LoRAs: what `scripts/merge.py` runs.

The modes of cloneofsimo/lora's `lora_add`, side by side, for adapters 1 and 2 and a weight α (`--alpha`); ΔW is an
adapter's update at its saved scale (LoRA / LoCon: alpha / rank * up @ down; LoHa, LoKr: their products; DoRA: the
renormalised weight minus W; (IA)^3 without learned biases: W * w), each form's `delta_weight`:
  upl    W' = W + α·ΔW                   a base SD checkpoint plus one adapter of a linear form, as a full checkpoint
                                         in the original layout (loads anywhere an SD v1 checkpoint does)
  lpl    up = α·up1 + (1-α)·up2,         cloneofsimo's LoRA + LoRA: needs the same modules and ranks; ΔW has cross
         down = α·down1 + (1-α)·down2    terms, e.g. at α = 0.5 it is (up1 + up2)(down1 + down2) / 4
  exact  ΔW = α·ΔW1 + (1-α)·ΔW2          exactly: ranks concatenated (r1 + r2); modules of either LoRA
lpl and exact fold each alpha / rank into up first and write a LoRA with alpha = rank: an adapter directory, or a
kohya / diffusers `.safetensors` file.
"""
import logging
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn

from ldm.checkpoint import save_state_dict
from ldm.checks import check_output
from ldm.modules.adapters.attach import group_adapters, is_added_key, remove_adapters, set_adapter_scale
from ldm.modules.adapters.base import Update
from ldm.modules.adapters.files import FORMATS, install_updates, projection_updates, save_lora_file
from ldm.modules.adapters.io import load_adapter_from_dir, save_adapter_to_dir
from ldm.modules.adapters.spec import DEFAULT_GROUP, AdapterConfigError

log = logging.getLogger(__name__)

MODES = ("upl", "lpl", "exact")
# The output's suffix picks its format: a full checkpoint for upl; an adapter folder or a LoRA file for lpl / exact.
CHECKPOINT_SUFFIXES = (".ckpt", ".safetensors")
LORA_SUFFIXES = ("", ".safetensors")


def check_merge_output(mode: str, output: str, inputs: Sequence[Optional[str]], fmt: Optional[str] = None,
                       what: str = "output") -> Path:
    """Refuse, before any work, an output that is or lies inside an input, exists, has a suffix that names no
    format of `mode`, or cannot be created; and a LoRA file format (`fmt`) where no LoRA file is written."""
    if mode not in MODES:
        raise AdapterConfigError(f"unknown merge mode {mode!r}; allowed: {', '.join(MODES)}")
    upl = mode == "upl"
    path = check_output(output, what, "file" if upl else "dir", inputs,
                        CHECKPOINT_SUFFIXES if upl else LORA_SUFFIXES)
    if fmt is not None and (upl or path.suffix != ".safetensors"):
        raise AdapterConfigError(f"--format {fmt} picks the LoRA file format of lpl / exact into a .safetensors file; "
                                 f"'{output}' is {'a checkpoint' if upl else 'an adapter folder'}: leave --format out")
    if fmt is not None and fmt not in FORMATS:
        raise AdapterConfigError(f"unknown LoRA file format {fmt!r}; allowed: {', '.join(FORMATS)}")
    return path


def merge_adapters(model: nn.Module, name: str = DEFAULT_GROUP) -> int:
    """Fold group `name` into the weights it adapts, at its current strength, and remove it; returns the number of
    modules changed. The output is the unmerged model's (group enabled) up to rounding."""
    entries = group_adapters(model, name)
    for path, host, group in entries:
        _check_mergeable(path, host, group, name)
    deltas = [(host, sum(a.spec.scale * group.scale * a.delta_weight(host) for a in group))
              for _, host, group in entries]  # every delta (a form without one refuses) before anything changes
    remove_adapters(model, name)
    with torch.no_grad():
        for host, delta in deltas:
            host.weight.add_(delta.to(host.weight.dtype))
    log.info("merged adapter group '%s' into %d modules", name, len(deltas))
    return len(deltas)


def _check_mergeable(path: str, host: nn.Module, group: nn.Module, name: str) -> None:
    readers = [(g, a) for g, other in host.adapters.items() if g != name for a in other if a.READS_BASE]
    if readers:
        g, a = readers[0]
        raise AdapterConfigError(f"group {g!r} has {a.TITLE} on {path}, which {a.READS_BASE}: merging {name!r} under it "
                                 f"would change it; merge or remove {g!r} first")


def save_base_checkpoint(model: nn.Module, path: str) -> None:
    """Write `model`'s weights without adapter keys: a full SD checkpoint in the original layout (.ckpt or
    .safetensors)."""
    save_state_dict({k: v for k, v in model.state_dict().items() if not is_added_key(k)}, path)


def merge_into_checkpoint(model: nn.Module, adapter_path: str, output: str, alpha: float = 1.0) -> None:
    """upl: W' = W + alpha·ΔW for the adapter at `adapter_path` (directory or LoRA file) on `model` (the base, with
    real weights), written to `output` as a full checkpoint (.ckpt or .safetensors; an existing file is refused)."""
    check_merge_output("upl", output, [adapter_path])
    load_adapter_from_dir(model, adapter_path, "merge")
    set_adapter_scale(model, alpha, "merge")
    merge_adapters(model, "merge")
    save_base_checkpoint(model, output)


def combine_updates(a: Dict[str, Update], b: Dict[str, Update], mode: str, alpha: float) -> Dict[str, Update]:
    """Two LoRAs (per module path) combined by `mode` lpl or exact (see the module docstring)."""
    if mode == "lpl":
        differ = sorted(set(a) ^ set(b))
        if differ:
            raise AdapterConfigError(f"lpl mixes LoRAs on the same modules, but {len(differ)} module(s) are in only "
                                     f"one, e.g. {differ[0]}; use --mode exact")
        return {p: a[p].lpl_mix(b[p], alpha) for p in a}
    if mode != "exact":
        raise AdapterConfigError(f"unknown LoRA + LoRA mode {mode!r}; allowed: lpl, exact")
    terms = {p: [] for p in list(a) + [p for p in b if p not in a]}
    for part, weight in ((a, alpha), (b, 1 - alpha)):
        for p, u in part.items():
            terms[p].append((u, weight))
    return {p: type(ws[0][0]).exact_sum(ws) for p, ws in terms.items()}


def _mixable_updates(model: nn.Module, path: str, group: str) -> Dict[str, Update]:
    load_adapter_from_dir(model, path, group)
    updates = projection_updates(model, group)
    other = [p for p, u in updates.items() if not u.MIXABLE]
    if other:
        raise AdapterConfigError(f"lpl and exact combine LoRAs, but '{path}' holds {type(updates[other[0]]).__name__} "
                                 f"updates on {len(other)} module(s), e.g. {other[0]}; merge it into a checkpoint with "
                                 "--mode upl instead")
    return updates


def combine_loras(model: nn.Module, path_1: str, path_2: str, output: str, mode: str = "exact", alpha: float = 0.5,
                  fmt: str = "kohya") -> None:
    """lpl / exact: combine the LoRAs at `path_1` and `path_2` (directories or files) for `model` (a base model, on
    the meta device is enough: names and shapes), and write an adapter directory, or a `fmt` (kohya / diffusers) file
    when `output` ends in .safetensors; an existing output is refused."""
    check_merge_output(mode, output, [path_1, path_2], fmt if str(output).endswith(".safetensors") else None)
    combined = combine_updates(_mixable_updates(model, path_1, "lora1"), _mixable_updates(model, path_2, "lora2"), mode,
                               alpha)
    install_updates(model, combined, "merged", f"{mode} merge of '{path_1}' and '{path_2}'")
    if str(output).endswith(".safetensors"):
        save_lora_file(model, output, "merged", fmt)
    else:
        save_adapter_to_dir(model, output, "merged")
