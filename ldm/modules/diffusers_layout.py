"""Names of SD v1's three networks in the original (CompVis) layout and in diffusers' / transformers' layout.

Pure functions on key names and state dicts; no network class is imported, so checkpoint readers, the adapter
package (LoRA module names for kohya / diffusers files) and the diffusers folder reader and writer all share them.

UNet. The blocks map by position, from three structure numbers (`UNetStructure`: levels, ResBlocks per level, which
levels have attention): `input_blocks.{k}.{0,1}` -> `down_blocks.{level}.{resnets,attentions}.{j}` (a Downsample
block -> `down_blocks.{level}.downsamplers.0`), `middle_block.{0,1,2}` -> `mid_block.{resnets.0,attentions.0,
resnets.1}`, `output_blocks.{k}` -> `up_blocks.{i}...` with `up_blocks.0` the deepest level. Inside a ResBlock
`in_layers.0/2`, `emb_layers.1`, `out_layers.0/3`, `skip_connection` are `norm1`, `conv1`, `time_emb_proj`,
`norm2`, `conv2`, `conv_shortcut`; inside a SpatialTransformer the names are the same in both.
VAE. `{encoder,decoder}.{down,up}.{i}.block.{j}` -> `..._blocks.{i}.resnets.{j}` (the decoder's levels reversed),
`mid.block_{1,2}` / `mid.attn_1` -> `mid_block.resnets.{0,1}` / `mid_block.attentions.0` whose 1x1 convs
q/k/v/proj_out are diffusers' linear to_q/to_k/to_v/to_out.0 (older diffusers: query/key/value/proj_attn).
Text encoder. transformers' CLIPTextModel paths: `text_model.X` up to transformers 5.5 and in SD v1 releases, `X`
from 5.6 (the `text_model` level was dropped); read with or without it, written with it (both versions read it).
"""
import re
from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."  # FrozenCLIPEmbedder.transformer holds transformers' `text_model`
TEXT_MODEL = "text_model."
COMPONENTS = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": TEXT_PREFIX}

UNET_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
            "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
            "middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
            "middle_block.2": "mid_block.resnets.1"}
UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
DOWNSAMPLER = {"op": "conv"}
VAE_TOP = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
VAE_ATTENTION_LEGACY = {"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
DROPPED = ("position_ids",)  # buffers some files carry that hold no weights


class LayoutError(ValueError):
    """Keys that have no place in the other layout (another architecture, or a part SD v1 does not have)."""


# ---- structure ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UNetStructure:
    """What fixes the UNet's block numbering: levels, ResBlocks per level (down path), levels with attention."""
    levels: int
    num_res_blocks: int
    attention_levels: FrozenSet[int]

    @classmethod
    def from_config(cls, channel_mult: Sequence[int], num_res_blocks: int, attention_resolutions: Iterable[int]
                    ) -> "UNetStructure":
        """From UNetModel's params: a level has attention when its downsampling factor is an attention
        resolution."""
        resolutions = set(attention_resolutions)
        return cls(len(channel_mult), num_res_blocks,
                   frozenset(level for level in range(len(channel_mult)) if 2 ** level in resolutions))

    @classmethod
    def from_ldm_keys(cls, keys: Iterable[str]) -> "UNetStructure":
        """From the UNet's own key or module names (`input_blocks.N.M...`, no `model.diffusion_model.` prefix)."""
        blocks: Dict[int, set] = {}
        for key in keys:
            m = re.match(r"input_blocks\.(\d+)\.(\d+)(?:\.|$)(op)?", key)
            if m and int(m.group(1)):
                blocks.setdefault(int(m.group(1)), set()).add("down" if m.group(3) else m.group(2))
        level, counts, attention = 0, [0], set()
        for k in sorted(blocks):
            if "down" in blocks[k]:
                level, counts = level + 1, counts + [0]
                continue
            counts[level] += 1
            attention.update([level] if "1" in blocks[k] else [])
        if not blocks or len(set(counts)) != 1:
            raise LayoutError(f"not an SD v1 UNet layout: ResBlocks per level {counts} (input_blocks from "
                              f"{len(blocks)} keys); every level must have the same number")
        return cls(len(counts), counts[0], frozenset(attention))

    @classmethod
    def from_diffusers_keys(cls, keys: Iterable[str]) -> "UNetStructure":
        """From UNet2DConditionModel key names (`down_blocks.L.resnets.J...`)."""
        resnets: Dict[int, int] = {}
        attention = set()
        for key in keys:
            m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.", key)
            if m:
                level = int(m.group(1))
                resnets[level] = max(resnets.get(level, 0), int(m.group(3)) + 1)
                attention.update([level] if m.group(2) == "attentions" else [])
        if not resnets or sorted(resnets) != list(range(len(resnets))) or len(set(resnets.values())) != 1:
            raise LayoutError(f"not an SD v1 UNet layout: ResBlocks per down block {resnets or 'none found'}")
        return cls(len(resnets), resnets[0], frozenset(attention))


@dataclass(frozen=True)
class VAEStructure:
    """Levels and ResnetBlocks per encoder level of the autoencoder (the decoder has one more per level)."""
    levels: int
    num_res_blocks: int

    @classmethod
    def from_keys(cls, keys: Iterable[str], diffusers: bool = False) -> "VAEStructure":
        """From the autoencoder's key names, ours (`encoder.down.I.block.J`) or diffusers'."""
        pattern = (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\." if diffusers
                   else r"encoder\.down\.(\d+)\.block\.(\d+)\.")
        found = [tuple(map(int, m.groups())) for m in (re.match(pattern, k) for k in keys) if m]
        if not found:
            raise LayoutError("no autoencoder encoder blocks found (encoder.down... keys)")
        return cls(max(i for i, _ in found) + 1, max(j for _, j in found) + 1)


# ---- block maps ---------------------------------------------------------------------------------------------------
def unet_block_map(s: UNetStructure) -> Dict[str, str]:
    """LDM path -> diffusers path of every block of the UNet (ResBlocks, SpatialTransformers, down/upsamplers) and
    of its top-level layers (time_embed.0, input_blocks.0.0, out.0, ...)."""
    blocks, k = dict(UNET_TOP), 1
    for level in range(s.levels):
        for j in range(s.num_res_blocks):
            blocks[f"input_blocks.{k}.0"] = f"down_blocks.{level}.resnets.{j}"
            if level in s.attention_levels:
                blocks[f"input_blocks.{k}.1"] = f"down_blocks.{level}.attentions.{j}"
            k += 1
        if level < s.levels - 1:
            blocks[f"input_blocks.{k}.0"] = f"down_blocks.{level}.downsamplers.0"
            k += 1
    k = 0
    for up in range(s.levels):  # up_blocks.0 is the deepest level, output_blocks.0's
        attention = s.levels - 1 - up in s.attention_levels
        for j in range(s.num_res_blocks + 1):
            blocks[f"output_blocks.{k}.0"] = f"up_blocks.{up}.resnets.{j}"
            if attention:
                blocks[f"output_blocks.{k}.1"] = f"up_blocks.{up}.attentions.{j}"
            if up < s.levels - 1 and j == s.num_res_blocks:
                blocks[f"output_blocks.{k}.{2 if attention else 1}"] = f"up_blocks.{up}.upsamplers.0"
            k += 1
    return blocks


def vae_block_map(s: VAEStructure) -> Dict[str, str]:
    """LDM path -> diffusers path of every block of the autoencoder and of its top-level layers."""
    blocks = dict(VAE_TOP)
    for part, down in (("encoder", True), ("decoder", False)):
        blocks.update({f"{part}.conv_in": f"{part}.conv_in", f"{part}.norm_out": f"{part}.conv_norm_out",
                       f"{part}.conv_out": f"{part}.conv_out", f"{part}.mid.block_1": f"{part}.mid_block.resnets.0",
                       f"{part}.mid.block_2": f"{part}.mid_block.resnets.1",
                       f"{part}.mid.attn_1": f"{part}.mid_block.attentions.0"})
        for i in range(s.levels):
            theirs = f"{part}.down_blocks.{i}" if down else f"{part}.up_blocks.{s.levels - 1 - i}"
            ours = f"{part}.down.{i}" if down else f"{part}.up.{i}"
            for j in range(s.num_res_blocks + (0 if down else 1)):
                blocks[f"{ours}.block.{j}"] = f"{theirs}.resnets.{j}"
            if (i < s.levels - 1) if down else i:
                sampler = "downsample" if down else "upsample"
                blocks[f"{ours}.{sampler}"] = f"{theirs}.{sampler}rs.0"
    return blocks


# ---- one path -----------------------------------------------------------------------------------------------------
def _unet_inner(diffusers_block: str) -> Optional[Dict[str, str]]:
    """Renames inside a UNet block (ours -> diffusers), None for the same names."""
    return UNET_RESNET if ".resnets." in diffusers_block else DOWNSAMPLER if ".downsamplers." in diffusers_block \
        else None


def _vae_inner(diffusers_block: str) -> Optional[Dict[str, str]]:
    return VAE_RESNET if ".resnets." in diffusers_block else VAE_ATTENTION if ".attentions." in diffusers_block \
        else None


def _map_path(path: str, blocks: Mapping[str, str], inner_names, reverse: bool = False) -> Optional[str]:
    """`path` (a module or a key) with its longest block prefix and its inner names renamed; None if it has no
    counterpart (an adapter, a parameterless layer, a block the other side lacks)."""
    if "adapters" in path.split("."):
        return None
    parts = path.split(".")
    for n in range(len(parts), 0, -1):
        head, inner = ".".join(parts[:n]), ".".join(parts[n:])
        if head not in blocks:
            continue
        target = blocks[head]
        names = inner_names(head if reverse else target)
        if not inner or names is None:
            return f"{target}.{inner}" if inner else target
        if reverse:
            names = {v: k for k, v in names.items()}
        name = next((k for k in sorted(names, key=len, reverse=True) if inner == k or inner.startswith(k + ".")),
                    None)
        return None if name is None else f"{target}.{names[name]}{inner[len(name):]}"
    return None


def unet_path_to_diffusers(path: str, blocks: Mapping[str, str]) -> Optional[str]:
    """Our UNet path (`input_blocks.1.1.transformer_blocks.0.attn1.to_q`, a module or a key) -> diffusers' path, with
    `blocks` = unet_block_map(...); None when it has no diffusers counterpart."""
    return _map_path(path, blocks, _unet_inner)


def unet_path_from_diffusers(path: str, blocks: Mapping[str, str]) -> Optional[str]:
    """diffusers' UNet path -> ours (the inverse of unet_path_to_diffusers, with the same `blocks`)."""
    return _map_path(path, {v: k for k, v in blocks.items()}, _unet_inner, reverse=True)


def text_path_to_diffusers(path: str) -> Optional[str]:
    """Our text-encoder path inside FrozenCLIPEmbedder (`transformer.text_model.encoder...`) -> transformers'
    CLIPTextModel path (`text_model.encoder...`)."""
    root = TEXT_PREFIX[len("cond_stage_model."):]
    return path[len(root):] if path.startswith(root + TEXT_MODEL) and "adapters" not in path.split(".") else None


def text_path_from_diffusers(path: str) -> str:
    """transformers' CLIPTextModel path, with or without the `text_model.` level -> ours inside
    FrozenCLIPEmbedder."""
    return TEXT_PREFIX[len("cond_stage_model."):] + (path if path.startswith(TEXT_MODEL) else TEXT_MODEL + path)


# ---- whole state dicts ----------------------------------------------------------------------------------------------
def _convert(sd: Mapping[str, torch.Tensor], rename) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    out, unmapped = {}, []
    for key, value in sd.items():
        new = rename(key)
        if new is None:
            unmapped.append(key)
        else:
            out[new] = value
    return out, unmapped


def _vae_attention_shape(key: str, value: torch.Tensor, to_conv: bool) -> torch.Tensor:
    """The mid-block attention's q/k/v/proj_out weight under our name `key`: 1x1 conv (ours) <-> linear
    (diffusers)."""
    if ".attn_1." not in key or not key.endswith(".weight"):
        return value
    if to_conv:
        return value[:, :, None, None] if value.dim() == 2 else value
    return value[:, :, 0, 0] if value.dim() == 4 else value


def _strict(converted: Tuple[Dict[str, torch.Tensor], List[str]], what: str) -> Dict[str, torch.Tensor]:
    sd, unmapped = converted
    if unmapped:
        raise LayoutError(f"{len(unmapped)} {what} key(s) have no counterpart, e.g. {', '.join(unmapped[:3])}")
    return sd


def to_diffusers(sd: Mapping[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
    """Our full state dict (original layout) -> {"unet": ..., "vae": ..., "text_encoder": ...} state dicts in
    diffusers' / transformers' layout; keys outside the three networks (schedule buffers, adapters) are left out."""
    parts = {name: {k[len(p):]: v for k, v in sd.items() if k.startswith(p) and ".adapters." not in k}
             for name, p in COMPONENTS.items()}
    unet = unet_block_map(UNetStructure.from_ldm_keys(parts["unet"]))
    vae = vae_block_map(VAEStructure.from_keys(parts["vae"]))
    vae_sd = {k: _vae_attention_shape(k, v, to_conv=False) for k, v in parts["vae"].items()}
    return {"unet": _strict(_convert(parts["unet"], lambda k: unet_path_to_diffusers(k, unet)), "UNet"),
            "vae": _strict(_convert(vae_sd, lambda k: _map_path(k, vae, _vae_inner)), "VAE"),
            "text_encoder": {k: v for k, v in parts["text_encoder"].items() if not k.endswith(DROPPED)}}


def from_diffusers(parts: Mapping[str, Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """{"unet": ..., "vae": ..., "text_encoder": ...} in diffusers' / transformers' layout -> our state dict
    (original layout) of the three networks; LayoutError names keys that have no place in SD v1."""
    unet = unet_block_map(UNetStructure.from_diffusers_keys(parts["unet"]))
    vae_sd = {_legacy_vae_name(k): v for k, v in parts["vae"].items()}
    vae = {v: k for k, v in vae_block_map(VAEStructure.from_keys(vae_sd, diffusers=True)).items()}
    sd = {UNET_PREFIX + k: v for k, v in _strict(_convert(
        parts["unet"], lambda k: unet_path_from_diffusers(k, unet)), "UNet").items()}
    vae_ours = _strict(_convert(vae_sd, lambda k: _map_path(k, vae, _vae_inner, reverse=True)), "VAE")
    sd.update({VAE_PREFIX + k: _vae_attention_shape(k, v, to_conv=True) for k, v in vae_ours.items()})
    sd.update({"cond_stage_model." + text_path_from_diffusers(k): v
               for k, v in parts["text_encoder"].items() if not k.endswith(DROPPED)})
    return sd


def _legacy_vae_name(key: str) -> str:
    """diffusers' older VAE attention names (query, key, value, proj_attn) -> today's (to_q, ...)."""
    m = re.match(r"(.*\.mid_block\.attentions\.0\.)(query|key|value|proj_attn)(\..*)", key)
    return m.group(1) + VAE_ATTENTION[VAE_ATTENTION_LEGACY[m.group(2)]] + m.group(3) if m else key
