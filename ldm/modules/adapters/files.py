"""LoRA and (IA)^3 files other tools read: kohya / AUTOMATIC1111 / ComfyUI safetensors and diffusers'
`pytorch_lora_weights.safetensors`, written from an adapter group and read back into one.

Names. A module of our UNet is named by its diffusers path and a text-encoder module by transformers' CLIPTextModel
path (`text_model.encoder.layers.N.self_attn.q_proj`), both from `ldm.modules.diffusers_layout`, which derives the
UNet's block numbering from its structure numbers.
  kohya      `lora_unet_<diffusers path, . -> _>` / `lora_te_<CLIP path, . -> _>` + `.lora_down.weight`,
             `.lora_up.weight`, `.alpha` (ΔW = alpha / rank * up @ down); (IA)^3 as `.weight` + `.on_input`
             (LyCORIS / A1111: W' = W * (1 + weight)). Read back also: LDM-path names (`lora_unet_input_blocks_1_1_...`)
             and `lora_te1_`.
  diffusers  `unet.<diffusers path>.lora_A.weight` / `.lora_B.weight`, `text_encoder.<CLIP path>...` (peft's
             names; alpha / rank is folded into lora_B, since the file carries no alpha). LoRA only.
"""
from collections import defaultdict
from typing import Dict, List, Optional, Tuple, Type

import torch
import torch.nn as nn

from ldm.checkpoint import load_into, load_state_dict, save_state_dict
from ldm.modules.adapters.attach import (adapter_groups, adapter_networks, group_adapters, inject_adapters,
                                         is_projection, network, restored_on_error)
from ldm.modules.adapters.base import Update
from ldm.modules.adapters.schema import FORMS
from ldm.modules.adapters.spec import DEFAULT_GROUP, AdapterConfigError, AdapterDirError
from ldm.modules.diffusers_layout import UNetStructure, text_path_to_diffusers, unet_block_map, unet_path_to_diffusers

UPDATES: Tuple[Type[Update], ...] = tuple(f.UPDATE for f in FORMS if getattr(f, "UPDATE", None))  # what files hold
FORMATS = ("kohya", "diffusers")
KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te"}
DIFFUSERS_PREFIX = {"unet": "unet", "cond_stage_model": "text_encoder"}


# ---- names ------------------------------------------------------------------------------------------------------
def unet_blocks(unet: nn.Module) -> Dict[str, str]:
    """LDM path -> diffusers path of every block of the UNet, from its structure numbers (`channel_mult`,
    `num_res_blocks`, `attention_levels`): the block numbering of diffusers' LDM conversion."""
    return unet_block_map(UNetStructure(len(unet.channel_mult), unet.num_res_blocks, frozenset(unet.attention_levels)))


def external_names(model: nn.Module) -> Dict[str, str]:
    """Path in `model` -> "unet.<diffusers path>" / "text_encoder.<CLIP path>" for every projection others can name."""
    names = {}
    for role, (prefix, net) in adapter_networks(model).items():
        root = f"{prefix}." if prefix else ""
        blocks = unet_blocks(net) if role == "unet" else {}
        for path, m in net.named_modules():
            if not is_projection(m) or "adapters" in path.split("."):
                continue
            ext = unet_path_to_diffusers(path, blocks) if role == "unet" else text_path_to_diffusers(path)
            if ext is not None:
                names[root + path] = f"{DIFFUSERS_PREFIX[role]}.{ext}"
    return names


def kohya_name(external: str) -> str:
    """"unet.down_blocks.0.x" -> "lora_unet_down_blocks_0_x"; "text_encoder.text_model.y" -> "lora_te_text_model_y"."""
    head, path = external.split(".", 1)
    return f"{KOHYA_PREFIX[head]}_{path.replace('.', '_')}"


# ---- a group as plain tensors, and back -------------------------------------------------------------------------
def projection_updates(model: nn.Module, name: str = DEFAULT_GROUP) -> Dict[str, Update]:
    """Group `name` per module path of `model` as plain-tensor Updates, each at its config `scale` (the run-time
    set_adapter_scale strength is left out, as in adapter directories); several updates of one kind on a module are
    combined by their class (LoRAs stacked exactly). A form without a file form refuses with its reason."""
    updates: Dict[str, Update] = {}
    for path, host, group in group_adapters(model, name):
        parts = [a.update(a.spec.scale) for a in group]
        kinds = {type(u) for u in parts}
        if len(kinds) > 1:
            raise AdapterConfigError(f"group {name!r} puts {' and '.join(sorted(k.__name__ for k in kinds))} updates "
                                     f"on {path}: a file holds one update per module; keep it as an adapter directory")
        updates[path] = type(parts[0]).combine(parts, f"group {name!r} on {path}")
    return updates


def install_updates(model: nn.Module, updates: Dict[str, Update], name: str, source: str) -> None:
    """Inject group `name` holding exactly `updates` (keyed by path in `model`) into the model's networks."""
    for prefix, net in adapter_networks(model).values():  # disjoint paths, or the model is the one network
        root = f"{prefix}." if prefix else ""
        mine = {p[len(root):]: u for p, u in updates.items() if p.startswith(root)}
        if not mine:
            continue
        inject_adapters(net, {"projection_adp_config": _entries(mine)}, name)
        for path, u in mine.items():
            load_into(net.get_submodule(path).adapters[name][0], u.adapter_tensors(), source=f"{source}, {path}")


def _entries(updates: Dict[str, Update]) -> List[dict]:
    """projection_adp_config entries for `updates`: one per update layout (form and its sizes), targets by path."""
    groups: Dict[tuple, List[str]] = defaultdict(list)
    first: Dict[tuple, Update] = {}
    for path, u in updates.items():
        groups[u.layout()].append(path)
        first.setdefault(u.layout(), u)
    return [first[layout].config_entry(paths) for layout, paths in groups.items()]


# ---- files ------------------------------------------------------------------------------------------------------
def lora_state_dict(model: nn.Module, name: str = DEFAULT_GROUP, fmt: str = "kohya") -> Dict[str, torch.Tensor]:
    """Group `name` as the tensors of a kohya or diffusers file."""
    if fmt not in FORMATS:
        raise AdapterConfigError(f"unknown LoRA file format {fmt!r}; allowed: {', '.join(FORMATS)}")
    names, sd = external_names(model), {}
    for path, u in projection_updates(model, name).items():
        if path not in names:
            raise AdapterConfigError(f"{path} has no diffusers name (the export maps the modules of SD v1's UNet and "
                                     f"CLIP text encoder); keep this group as an adapter directory")
        sd.update(u.diffusers_tensors(names[path]) if fmt == "diffusers" else u.kohya_tensors(kohya_name(names[path])))
    return sd


def save_lora_file(model: nn.Module, path: str, name: str = DEFAULT_GROUP, fmt: str = "kohya") -> None:
    """Write group `name` to a kohya or diffusers `.safetensors` file, atomically."""
    if not str(path).endswith(".safetensors"):
        raise AdapterConfigError(f"LoRA files are .safetensors; got '{path}'")
    save_state_dict(lora_state_dict(model, name, fmt), str(path), metadata={"format": "pt"})


def load_lora_file(model: nn.Module, path: str, name: str = DEFAULT_GROUP) -> None:
    """Load a kohya / A1111 / diffusers LoRA or (IA)^3 `.safetensors` file into a new group `name` of `model`."""
    source = f"LoRA file '{path}'"
    if name in adapter_groups(model):
        raise AdapterDirError(f"the model already has an adapter group {name!r}; load {source} into a new one")
    updates = read_lora_state_dict(model, load_state_dict(path), source)
    with restored_on_error(model, name):
        install_updates(model, updates, name, source)


def read_lora_state_dict(model: nn.Module, sd: Dict[str, torch.Tensor], source: str) -> Dict[str, Update]:
    """The updates of a kohya or diffusers LoRA state dict, keyed by path in `model`; errors name what does not fit."""
    modules, names = dict(model.named_modules()), _reverse_names(model)
    grouped = _split_modules(sd, source)
    unknown = [n for n in grouped if n not in names]
    if unknown:
        _unknown_error(model, unknown, len(grouped), source)
    return {names[n]: _update(t, modules[names[n]], f"{source}: {n}") for n, t in grouped.items()}


def _reverse_names(model: nn.Module) -> Dict[str, str]:
    """Every name a file may give a projection of `model` (kohya, kohya with LDM paths, lora_te1_, diffusers) ->
    its path."""
    nets = adapter_networks(model)
    unet_root = f"{nets['unet'][0]}." if nets.get("unet", ("",))[0] else ""
    names = {}
    for path, ext in external_names(model).items():
        key = kohya_name(ext)
        names.update({ext: path, key: path})
        if ext.startswith("unet."):
            names[f"lora_unet_{path[len(unet_root):].replace('.', '_')}"] = path
        else:
            names[f"lora_te1_{key[len('lora_te_'):]}"] = path
    return names


DIFFUSERS_SUFFIXES = {k: v for u in UPDATES for k, v in u.DIFFUSERS_SUFFIXES.items()}  # diffusers / peft -> kohya


def _split_modules(sd: Dict[str, torch.Tensor], source: str) -> Dict[str, Dict[str, torch.Tensor]]:
    """{module name: {tensor name: tensor}}, tensor names in kohya's terms (lora_down.weight, lora_up.weight, alpha)."""
    grouped: Dict[str, Dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in sd.items():
        if key.startswith("lora_"):
            module_name, tensor = key.split(".", 1)
        else:
            suffix = next((s for s in DIFFUSERS_SUFFIXES if key.endswith(s)), None)
            if suffix is None:
                raise AdapterDirError(f"{source}: key {key!r} is neither kohya (lora_unet_..., lora_te_...) nor "
                                      "diffusers (unet.<path>.lora_A.weight, text_encoder.<path>.lora_B.weight)")
            module_name, tensor = key[:-len(suffix)], DIFFUSERS_SUFFIXES[suffix]
        grouped[module_name][tensor] = value
    return grouped


def _update(tensors: Dict[str, torch.Tensor], host: nn.Module, where: str) -> Update:
    """One module's Update, read by the update class whose tensor names these are, checked against the module."""
    names = frozenset(tensors)
    for cls in UPDATES:
        if cls.claims(names):
            return cls.from_tensors(tensors, host, where)
    known = "; ".join(f"{cls.__name__} ({', '.join(sorted(cls.KOHYA_TENSORS | cls.KOHYA_OPTIONAL))})" for cls in UPDATES)
    raise AdapterDirError(f"{where}: tensors {', '.join(sorted(names))} are none of the updates read here: {known}; "
                          "LyCORIS LoHa / LoKr / DoRA / full-diff modules are not supported here")


def _unknown_error(model: nn.Module, unknown: List[str], total: int, source: str) -> None:
    text = [n for n in unknown if n.startswith(("lora_te", "text_encoder."))]
    if text and "cond_stage_model" not in adapter_networks(model):
        network(model, "cond_stage_model", f"{source} ({len(text)} text-encoder modules, e.g. {text[0]})")
    raise AdapterDirError(f"{source} does not fit this model: {len(unknown)} of its {total} modules have no "
                          f"counterpart here, e.g. {', '.join(unknown[:3])}. It was made for another architecture "
                          "(SD 2.x and SDXL differ), or adapts modules LoRA does not take here (3x3 convs)")
