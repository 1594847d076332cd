"""LoRA, LoCon, LoHa, LoKr, DoRA and (IA)^3 files other tools read and write: kohya / AUTOMATIC1111 / ComfyUI /
LyCORIS safetensors, diffusers' `pytorch_lora_weights.safetensors`, peft's state dicts and folders, written from an
adapter group and read back into one.

Names. A module of our UNet is named by its diffusers path and a text-encoder module by transformers' CLIPTextModel
path (`text_model.encoder.layers.N.self_attn.q_proj`), both from `ldm.modules.diffusers_layout`, which derives the
UNet's block numbering from its structure numbers.
  kohya      `lora_unet_<diffusers path, . -> _>` / `lora_te_<CLIP path, . -> _>` + `.lora_down.weight`,
             `.lora_up.weight`, `.alpha` (ΔW = alpha / rank * up @ down; LoCon: down with the conv's kernel, or
             `.lora_mid.weight` between 1x1 down and up; DoRA: `.dora_scale`); LyCORIS' LoHa `.hada_w1_a` ...
             `.hada_t2`, LoKr `.lokr_w1` | `.lokr_w1_a/_b`, `.lokr_w2` | `.lokr_w2_a/_b` (+ `.lokr_t2`); (IA)^3
             `.weight` + `.on_input` (LyCORIS / A1111: W' = W * (1 + weight); LyCORIS writes a conv's as (1, C, 1, 1)).
             Each update class (lora.py, loha.py, lokr.py, dora.py, ia3.py) says its names; other LyCORIS kinds
             (GLoRA, full diff, OFT, BOFT, norms) are refused by name (`REFUSED_KINDS`).
  diffusers  `unet.<diffusers path>.lora_A.weight` / `.lora_B.weight`, `text_encoder.<CLIP path>...` (peft's
             names; alpha / rank is folded into lora_B, since the file carries no alpha). LoRA only.
  peft       a folder per network, `adapter_config.json` + `adapter_model.safetensors` (`base_model.model.<path>.`
             + lora_A / lora_B (+ lora_magnitude_vector for DoRA), hada_w1_a ..., lokr_w1 ...): `folders.py`.
Read back also: LDM-path kohya names (`lora_unet_input_blocks_1_1_...`), `lora_te1_` (diffusers'
`convert_state_dict_to_kohya`), CLIP paths without `text_model.` (transformers 5.6+), diffusers' older suffixes
(`.lora.down.weight`, `.lora_linear_layer.up.weight`), peft's names of one network (`down_blocks.0...lora_A.weight`,
`base_model.model.` in front from PeftModel.save_pretrained). What the files say about strength (alpha tensors,
diffusers' metadata, peft's adapter_config.json) and which file types are read: `ldm.modules.adapters.sources`.
"""
import difflib
import logging
from collections import defaultdict
from typing import Dict, List, Optional, Tuple, Type

import torch
import torch.nn as nn

from ldm.checkpoint import load_into, save_state_dict
from ldm.modules.adapters.attach import (adapter_groups, adapter_networks, group_adapters, inject_adapters,
                                         network, restored_on_error)
from ldm.modules.adapters.base import Update, is_weight_layer
from ldm.modules.adapters.schema import FORMS
from ldm.modules.adapters.sources import fill_alphas, read_lora_source
from ldm.modules.adapters.spec import DEFAULT_GROUP, AdapterConfigError, AdapterDirError
from ldm.modules.diffusers_layout import (TEXT_MODEL, UNetStructure, text_path_from_diffusers, text_path_to_diffusers,
                                          unet_block_map, unet_path_to_diffusers)

log = logging.getLogger(__name__)

# what files hold: each update class once, the more specific first (DoRA's tensors are LoRA's plus dora_scale)
UPDATES: Tuple[Type[Update], ...] = tuple(sorted(dict.fromkeys(f.UPDATE for f in FORMS if getattr(f, "UPDATE", None)),
                                                 key=lambda u: -len(u.__mro__)))
# LyCORIS module kinds (lycoris/modules/*.py) we do not implement, by the tensor names that mark them
REFUSED_KINDS = (("GLoRA", {"a1.weight"}), ("full weight difference (LyCORIS full)", {"diff"}),
                 ("OFT / BOFT", {"oft_blocks"}), ("norm-layer (LyCORIS norms)", {"w_norm"}),
                 ("T-LoRA", {"lambda_layer"}), ("LoHa with DoRA", {"hada_w1_a", "dora_scale"}),
                 ("LoKr with DoRA", {"lokr_w1", "dora_scale"}), ("LoKr with DoRA", {"lokr_w1_a", "dora_scale"}),
                 ("LoKr with a Tucker w1 (lokr_t1)", {"lokr_t1"}))
FORMATS = ("kohya", "diffusers")
KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te"}
KOHYA_TEXT_PREFIXES = ("lora_te", "lora_te1")  # kohya sd-scripts for SD v1; diffusers' convert_state_dict_to_kohya
DIFFUSERS_PREFIX = {"unet": "unet", "cond_stage_model": "text_encoder"}
PEFT_PREFIX = "base_model.model."  # PeftModel.save_pretrained's key prefix
MODEL_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "model_ema.")
UNET_FIRST = tuple(f"{b}." for b in ("down_blocks", "mid_block", "up_blocks", "conv_in", "time_embedding",
                                     "input_blocks", "middle_block", "output_blocks"))
NETWORK_STARTS = (("second text encoder", ("lora_te2_", "text_encoder_2.")),
                  ("text encoder", ("lora_te_", "lora_te1_", "text_encoder.", "text_model.", "encoder.layers.")),
                  ("UNet", ("lora_unet_", "unet.") + UNET_FIRST))
NETWORK_ORDER = ["UNet", "text encoder", "second text encoder", "no SD v1 network"]



# ---- names ------------------------------------------------------------------------------------------------------
def unet_blocks(unet: nn.Module) -> Dict[str, str]:
    """LDM path -> diffusers path of every block of the UNet, from its structure numbers (`channel_mult`,
    `num_res_blocks`, `attention_levels`): the block numbering of diffusers' LDM conversion."""
    return unet_block_map(UNetStructure(len(unet.channel_mult), unet.num_res_blocks, frozenset(unet.attention_levels)))


def external_names(model: nn.Module, every_module: bool = False) -> Dict[str, str]:
    """Path in `model` -> "unet.<diffusers path>" / "text_encoder.<CLIP path>" for every Linear and Conv2d others can
    name (every module with such a name, if `every_module`)."""
    names = {}
    for role, (prefix, net) in adapter_networks(model).items():
        root = f"{prefix}." if prefix else ""
        blocks = unet_blocks(net) if role == "unet" else {}
        for path, m in net.named_modules():
            if not (every_module or is_weight_layer(m)) or "adapters" in path.split("."):
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
        parts = [a.update(a.spec.scale, host) for a in group]
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
            host = net.get_submodule(path)
            load_into(host.adapters[name][0], u.adapter_tensors(host), source=f"{source}, {path}")


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
    """Load a kohya / A1111 / diffusers / peft LoRA or (IA)^3 file (or peft / diffusers LoRA folder) into a new group
    `name` of `model`."""
    if name in adapter_groups(model):
        raise AdapterDirError(f"the model already has an adapter group {name!r}; load '{path}' into a new one")
    lora = read_lora_source(path)
    updates = read_lora_state_dict(model, lora.tensors, lora.source, lora.configs)
    with restored_on_error(model, name):
        install_updates(model, updates, name, lora.source)
    log.info("loaded %s into adapter group '%s': %d modules", lora.source, name, len(updates))


def read_lora_state_dict(model: nn.Module, sd: Dict[str, torch.Tensor], source: str,
                         configs: Optional[Dict[str, dict]] = None) -> Dict[str, Update]:
    """The updates of a kohya, diffusers or peft LoRA state dict (with its peft LoraConfigs by network, see
    ldm.modules.adapters.sources), keyed by path in `model`; errors name what does not fit."""
    names = _accepted_names(model)
    grouped = _split_modules(sd, source)
    found = {n: _resolve(n, names) for n in grouped}
    unknown = [n for n, ext in found.items() if ext is None]
    if unknown:
        _unknown_error(model, unknown, len(grouped), source, names)
    modules, written_as = {}, {}
    for n, ext in found.items():
        if ext in modules:
            raise AdapterDirError(f"{source} names one module twice: {written_as[ext]} and {n}")
        modules[ext], written_as[ext] = dict(grouped[n]), n
    classes = {ext: update_class(t, f"{source}: {written_as[ext]}") for ext, t in modules.items()}
    fill_alphas(modules, classes, configs or {}, source)
    paths, named = {ext: path for path, ext in external_names(model).items()}, dict(model.named_modules())
    return {paths[ext]: classes[ext].from_tensors(t, named[paths[ext]], f"{source}: {written_as[ext]}")
            for ext, t in modules.items()}


def _text_spellings(clip_path: str) -> List[str]:
    """A CLIP path with and without transformers' `text_model.` level (transformers 5.6+ drop it, and so do files
    diffusers writes with them, kohya ones included); kept when diffusers_layout reads it back to the same module."""
    short = clip_path[len(TEXT_MODEL):] if clip_path.startswith(TEXT_MODEL) else clip_path
    ours = text_path_from_diffusers(clip_path)
    return [s for s in dict.fromkeys((clip_path, short)) if text_path_from_diffusers(s) == ours]


def _accepted_names(model: nn.Module, every_module: bool = False) -> Dict[str, str]:
    """Every name a file may give a module of `model` -> its external name ("unet.<diffusers path>",
    "text_encoder.<CLIP path>"): diffusers / peft names, kohya names of diffusers paths, kohya names of the UNet's LDM
    paths (`lora_unet_input_blocks_1_1_...`), text-encoder names with and without `text_model`, `lora_te_` and
    `lora_te1_`. Projections only, unless `every_module`."""
    nets = adapter_networks(model)
    unet_root = f"{nets['unet'][0]}." if nets.get("unet", ("",))[0] else ""
    names = {}
    for path, ext in external_names(model, every_module).items():
        head, inner = ext.split(".", 1)
        if head == DIFFUSERS_PREFIX["unet"]:
            names.update({ext: ext, kohya_name(ext): ext,
                          f"{KOHYA_PREFIX['unet']}_{path[len(unet_root):].replace('.', '_')}": ext})
            continue
        for spelling in _text_spellings(inner):
            names[f"{head}.{spelling}"] = ext
            names.update({f"{p}_{spelling.replace('.', '_')}": ext for p in KOHYA_TEXT_PREFIXES})
    return names


def _resolve(name: str, names: Dict[str, str]) -> Optional[str]:
    """The external name of a file's module name: as written, without peft's `base_model.model.`, or (peft's
    get_peft_model_state_dict of one network) with the network's prefix added."""
    name = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
    candidates = [name] + ([f"{head}.{name}" for head in DIFFUSERS_PREFIX.values()]
                           if not name.startswith(("lora_",) + tuple(f"{h}." for h in DIFFUSERS_PREFIX.values()))
                           else [])
    return next((names[c] for c in candidates if c in names), None)


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
                whole = " (it is a model checkpoint: pass it as --ckpt)" if key.startswith(MODEL_PREFIXES) else ""
                raise AdapterDirError(f"{source}: key {key!r} is neither kohya (lora_unet_..., lora_te_...) nor "
                                      "diffusers / peft (unet.<path>.lora_A.weight, text_encoder.<path>.lora_B.weight, "
                                      f"<path>.lora_A.weight){whole}")
            module_name, tensor = key[:-len(suffix)], DIFFUSERS_SUFFIXES[suffix]
        grouped[module_name][tensor] = value
    return grouped


def update_class(tensors: Dict[str, torch.Tensor], where: str) -> Type[Update]:
    """The update class whose tensor names (kohya's) these are; a LyCORIS kind we do not implement is named."""
    names = frozenset(tensors)
    for cls in UPDATES:
        if cls.claims(names):
            return cls
    refused = next((kind for kind, marks in REFUSED_KINDS if marks <= names), None)
    if refused:
        raise AdapterDirError(f"{where}: tensors {', '.join(sorted(names))} are a {refused} module, which is not "
                              "supported here (supported: LoRA / LoCon, LoHa, LoKr, DoRA, (IA)^3)")
    known = "; ".join(f"{cls.__name__} ({', '.join(sorted(cls.KOHYA_TENSORS | cls.KOHYA_OPTIONAL))})" for cls in UPDATES)
    raise AdapterDirError(f"{where}: tensors {', '.join(sorted(names))} are none of the updates read here: {known}")


def _network_of(name: str) -> str:
    """Which network a file's module name is written for, from its prefix or its first path component."""
    name = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
    for network_name, starts in NETWORK_STARTS:
        if name.startswith(starts):
            return network_name
    return "no SD v1 network"


def _unknown_error(model: nn.Module, unknown: List[str], total: int, source: str, names: Dict[str, str]) -> None:
    """Say which modules of a file match none of `model`, per network, with examples and the nearest name here."""
    by_network: Dict[str, List[str]] = defaultdict(list)
    for n in unknown:
        by_network[_network_of(n)].append(n)
    if by_network.get("text encoder") and "cond_stage_model" not in adapter_networks(model):
        text = by_network["text encoder"]
        network(model, "cond_stage_model", f"{source} ({len(text)} text-encoder modules, e.g. {text[0]})")
    parts = []
    for net in sorted(by_network, key=NETWORK_ORDER.index):
        found = by_network[net]
        near = difflib.get_close_matches(found[0], list(names), n=1, cutoff=0.5)
        first = found[0] + (f" (nearest name here: {near[0]})" if near else "")
        parts.append(f"{net}: {len(found)}, e.g. {', '.join([first] + found[1:3])}")
    raise AdapterDirError(f"{source} does not fit this model: {len(unknown)} of its {total} modules have no "
                          f"counterpart here ({'; '.join(parts)}). {_unknown_cause(model, unknown, by_network)}")


def _unknown_cause(model: nn.Module, unknown: List[str], by_network: Dict[str, List[str]]) -> str:
    """What the unmatched names say about the file: SDXL's second text encoder, updates of modules no form takes
    (norms, embeddings), foreign names, or a model of another size."""
    if by_network.get("second text encoder"):
        return ("It adapts a second text encoder (lora_te2_ / text_encoder_2), which SDXL has and SD v1 does not: "
                "it is an SDXL file")
    every, paths = _accepted_names(model, every_module=True), {e: p for p, e in external_names(model, True).items()}
    named = dict(model.named_modules())
    other = [(n, named[paths[every[_resolve(n, every)]]]) for n in unknown if _resolve(n, every)]
    if other:
        n, m = other[0]
        kind = f"a {'x'.join(map(str, m.kernel_size))} {type(m).__name__}" if hasattr(m, "kernel_size") \
            else f"a {type(m).__name__}"
        return (f"{len(other)} of them are modules no form here takes, e.g. {n} ({kind}): updates of Linear and "
                "Conv2d modules load (LyCORIS' norm-layer and embedding training is not supported)")
    if by_network.get("no SD v1 network"):
        return ("Names of no SD v1 network read as neither kohya (lora_unet_..., lora_te_...), diffusers (unet.<path>, "
                "text_encoder.<path>) nor peft (<path>.lora_A.weight) names of this model's modules")
    return ("This model has no modules of those names: the file was made for a model of another size or layout "
            "(e.g. full-size SD v1 and this config differ in levels, blocks or text-encoder layers)")
