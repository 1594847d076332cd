"""Base weights from a file or a diffusers model folder, in the original SD v1 layout: the one reader of base models.

A diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `scheduler/`; weights as safetensors, or
`.bin` read with `torch.load(weights_only=True)`; sharded, and `fp16` variants, included) is converted key by key
(ldm.modules.diffusers_layout); the noise-schedule buffers come from its scheduler config and `scale_factor` from
the VAE's `scaling_factor`, so the result is what an original `.ckpt` holds. SD 2.x and SDXL folders are named as
such before anything is read.
The way out: `write_diffusers_folder` writes our model as a StableDiffusionPipeline folder (configs derived from our
config, transformers' CLIPTokenizer files made from the CLIP vocabulary our tokenizer reads, SD v1's PNDM scheduler,
no safety checker).
"""
import inspect
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import CheckpointError, load_state_dict, save_state_dict
from ldm.checks import check_output
from ldm.modules.diffusers_layout import LayoutError, UNetStructure, from_diffusers, to_diffusers
from ldm.modules.diffusionmodules.util import make_beta_schedule, schedule_buffers
from ldm.modules.encoders.clip_tokenizer import BOS_ID, EOS_ID, SPECIAL_TOKENS, load_vocab
from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from ldm.util.targets import get_obj_from_str

log = logging.getLogger(__name__)

NETWORKS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
CONFIG_FILES = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                "scheduler": "scheduler_config.json"}
DIFFUSERS_VERSION = "0.42.1"  # the diffusers release the written layout was checked against
DEFAULT_SCALING_FACTOR = 0.18215  # diffusers' AutoencoderKL default, SD v1's
# beta_schedule names: diffusers' -> ours (make_beta_schedule); SD v1's "linear" is linear in sqrt(beta)
BETA_SCHEDULES = {"scaled_linear": "linear", "linear": "sqrt_linear"}
SUPPORTED = ("this project implements Stable Diffusion v1 (CLIP ViT-L/14 text encoder, cross_attention_dim 768; "
             "v1.x checkpoints and folders, and the tiny model of configs/tiny-world/)")
LAYOUT = "a diffusers SD v1 folder has model_index.json, unet/, vae/, text_encoder/ and scheduler/"


class DiffusersFolderError(CheckpointError):
    """A diffusers folder that is incomplete, unreadable or of another architecture."""


def read_base_weights(path: str) -> Dict[str, torch.Tensor]:
    """Base weights in the original SD v1 layout, from a `.ckpt`/`.safetensors` file or a diffusers model folder."""
    if not Path(path).exists():
        raise CheckpointError(f"checkpoint not found: '{path}' (pass an SD v1 .ckpt / .safetensors file or a "
                              "diffusers model folder)")
    return read_diffusers_folder(path) if Path(path).is_dir() else load_state_dict(path)


def read_diffusers_folder(path: str) -> Dict[str, torch.Tensor]:
    """A diffusers SD v1 model folder as the state dict of an original checkpoint (networks, schedule buffers,
    scale_factor), read safely; errors name the missing part or the architecture the folder is."""
    folder = Path(path)
    index = read_json(folder / "model_index.json", f"'{folder}' is a folder but not a diffusers model folder (no "
                  "model_index.json): pass an SD v1 .ckpt / .safetensors file, or a diffusers folder; " + LAYOUT)
    _refuse_sdxl(folder, index)
    missing = [f"{name}/" for name in CONFIG_FILES if not (folder / name).is_dir()]
    if missing:
        raise DiffusersFolderError(f"diffusers folder '{folder}' has no {', '.join(missing)}: {LAYOUT}")
    configs = {name: read_json(folder / name / file, f"diffusers folder '{folder}' has no {name}/{file}")
               for name, file in CONFIG_FILES.items()}
    _refuse_sd2(folder, configs)
    parts = {name: read_weights(folder / name, stem) for name, stem in NETWORKS.items()}
    try:
        sd = from_diffusers(parts)
    except LayoutError as e:
        raise DiffusersFolderError(f"diffusers folder '{folder}' is not an SD v1 model: {e}") from None
    sd.update(schedule_state(configs["scheduler"], f"'{folder / 'scheduler'}'"))
    sd["scale_factor"] = torch.tensor(_number(configs["vae"], "scaling_factor", DEFAULT_SCALING_FACTOR,
                                              f"'{folder / 'vae'}'", positive=True), dtype=torch.float32)
    log.info("read diffusers folder %s (%s)", folder, index.get("_class_name", "pipeline"))
    return sd


def read_json(path: Path, missing: str) -> Dict[str, Any]:
    """The JSON object in `path`; a DiffusersFolderError says `missing` when there is no such file, else what is wrong."""
    if not path.is_file():
        raise DiffusersFolderError(missing)
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DiffusersFolderError(f"cannot read '{path}': not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DiffusersFolderError(f"'{path}' is not a JSON object")
    return data


def _refuse_sdxl(folder: Path, index: Mapping[str, Any]) -> None:
    unet = folder / "unet" / "config.json"
    hits = ["text_encoder_2"] if "text_encoder_2" in index or (folder / "text_encoder_2").is_dir() else []
    if unet.is_file() and read_json(unet, "").get("addition_embed_type") == "text_time":
        hits.append("unet addition_embed_type 'text_time'")
    if hits:
        raise DiffusersFolderError(f"'{folder}' is a Stable Diffusion XL folder ({', '.join(hits)}); {SUPPORTED}")


def _refuse_sd2(folder: Path, configs: Mapping[str, Mapping[str, Any]]) -> None:
    hidden = configs["text_encoder"].get("hidden_size")
    context = configs["unet"].get("cross_attention_dim")
    if hidden == 1024 or context == 1024:
        raise DiffusersFolderError(f"'{folder}' is a Stable Diffusion 2.x folder (OpenCLIP ViT-H text encoder: "
                                   f"text_encoder hidden_size {hidden}, unet cross_attention_dim {context}); "
                                   f"{SUPPORTED}")
    if configs["scheduler"].get("prediction_type", "epsilon") != "epsilon":
        raise DiffusersFolderError(f"'{folder}' predicts {configs['scheduler']['prediction_type']!r} (Stable "
                                   f"Diffusion 2.x-v and others); SD v1 predicts the noise ('epsilon'); {SUPPORTED}")


def weight_files(folder: Path, stem: str) -> List[Path]:
    """The weight file(s) of one component: `stem`.safetensors or .bin (transformers' pytorch_model.bin too), the
    fp16 variant when only it is there, or the shards an `.index.json` lists."""
    stems = [stem, "pytorch_model"] if stem == "model" else [stem]
    names = [f"{s}{variant}{ext}" for variant in ("", ".fp16") for ext in (".safetensors", ".bin") for s in stems]
    for name in names:
        if (folder / name).is_file():
            return [folder / name]
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(read_json(index, "").get("weight_map", {}).values()))
            bad = [s for s in shards if Path(s).name != s or not (folder / s).is_file()]
            if bad or not shards:
                raise DiffusersFolderError(f"'{index}' lists shards that are not files beside it: "
                                           f"{', '.join(bad) or 'none'}")
            return [folder / s for s in shards]
    raise DiffusersFolderError(f"'{folder}' holds no weights: expected {names[0]} (or {', '.join(names[1:3])}, "
                               "an fp16 variant, or shards with an .index.json)")


def read_weights(folder: Path, stem: str) -> Dict[str, torch.Tensor]:
    """The tensors of one component folder (`unet/`, `vae/`, `text_encoder/`), read safely."""
    sd: Dict[str, torch.Tensor] = {}
    for file in weight_files(folder, stem):
        sd.update(load_state_dict(str(file)))
    return sd


def _number(config: Mapping[str, Any], key: str, default: float, where: str, positive: bool = False) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (positive and value <= 0):
        raise DiffusersFolderError(f"{where}: {key} is {value!r}; expected a finite {'positive ' * positive}number")
    return float(value)


def schedule_state(config: Mapping[str, Any], where: str) -> Dict[str, torch.Tensor]:
    """The noise-schedule buffers of an original checkpoint (betas, alphas_cumprod, ...) for a diffusers scheduler
    config (diffusers' defaults where it is silent)."""
    n = config.get("num_train_timesteps", 1000)
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise DiffusersFolderError(f"{where}: num_train_timesteps is {n!r}; expected an integer >= 2")
    if config.get("trained_betas") is not None:
        try:
            betas = np.asarray(config["trained_betas"], dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise DiffusersFolderError(f"{where}: trained_betas is not a list of numbers") from None
    else:
        name = config.get("beta_schedule", "linear")
        if name not in BETA_SCHEDULES:
            raise DiffusersFolderError(f"{where}: beta_schedule {name!r} is not one this model has (SD v1 uses "
                                       f"'scaled_linear'); allowed: {', '.join(BETA_SCHEDULES)}, or trained_betas")
        start, end = (_number(config, k, d, where, positive=True) for k, d in (("beta_start", 1e-4),
                                                                                ("beta_end", 0.02)))
        betas = make_beta_schedule(BETA_SCHEDULES[name], n, start, end)
    if len(betas) != n or not ((betas > 0) & (betas < 1)).all():
        raise DiffusersFolderError(f"{where}: the betas must be {n} numbers in (0, 1)")
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in schedule_buffers(betas).items()}


# ---- the way out ----------------------------------------------------------------------------------------------------
def write_diffusers_folder(sd: Mapping[str, torch.Tensor], model_config: Mapping, outdir: str,
                           half: bool = False) -> None:
    """Write our model (`sd`: original layout, adapters merged or absent; `model_config`: the config's `model`
    node) as a diffusers StableDiffusionPipeline folder, with no safety checker; into a temporary sibling that is
    renamed into place, never over an existing non-empty `outdir`."""
    out = check_outdir(outdir)
    try:
        parts = to_diffusers(sd)
    except LayoutError as e:
        raise DiffusersFolderError(f"the model has no diffusers layout: {e}") from None
    configs = diffusers_configs(model_config, sd)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        for name, weights in parts.items():
            (tmp / name).mkdir()
            weights = {k: v.half() if half and v.is_floating_point() else v for k, v in weights.items()}
            save_state_dict(weights, str(tmp / name / f"{NETWORKS[name]}.safetensors"), metadata={"format": "pt"})
        for name, file in CONFIG_FILES.items():
            (tmp / name).mkdir(exist_ok=True)
            _write_json(tmp / name / file, configs[name])
        _write_json(tmp / "model_index.json", configs["model_index"])
        write_tokenizer(tmp / "tokenizer", configs["text_encoder"]["max_position_embeddings"])
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes a 0700 folder
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("wrote diffusers folder %s", out)


def check_outdir(outdir: str, inputs: Sequence[Optional[str]] = (), what: str = "output folder") -> Path:
    """`outdir` as a Path, refused when it exists and is not an empty folder, is or lies inside one of `inputs`, or
    cannot be created (nothing is overwritten)."""
    return check_output(outdir, what, "dir", inputs)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _params(node: Mapping[str, Any]) -> Dict[str, Any]:
    """A config node's params over the defaults of its target's constructor."""
    signature = inspect.signature(get_obj_from_str(node["target"]).__init__)
    defaults = {k: p.default for k, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}
    return {**defaults, **(node.get("params") or {})}


def diffusers_configs(model_config: Mapping, sd: Mapping[str, torch.Tensor]) -> Dict[str, Dict[str, Any]]:
    """config.json of unet/, vae/, text_encoder/, scheduler/ and model_index.json for our model config."""
    cfg = OmegaConf.to_container(OmegaConf.create(dict(model_config)), resolve=True)
    model = _params(cfg)
    return {"unet": unet_config(_params(model["unet_config"])),
            "vae": vae_config(_params(model["first_stage_config"]), float(sd["scale_factor"])),
            "text_encoder": text_encoder_config(_params(model["cond_stage_config"])),
            "scheduler": scheduler_config(model, sd["betas"]),
            "model_index": {"_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                            "feature_extractor": [None, None], "image_encoder": [None, None],
                            "requires_safety_checker": False, "safety_checker": [None, None],
                            "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers",
                                                                                          "CLIPTextModel"],
                            "tokenizer": ["transformers", "CLIPTokenizer"],
                            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}}


def unet_config(p: Mapping[str, Any]) -> Dict[str, Any]:
    """UNet2DConditionModel's config for UNetModel params `p`."""
    s = UNetStructure.from_config(p["channel_mult"], p["num_res_blocks"], p["attention_resolutions"])
    channels = [p["model_channels"] * m for m in p["channel_mult"]]
    # diffusers' attention_head_dim is the number of heads for SD v1 (a misnomer it keeps for compatibility)
    heads = p["num_heads"] if p["num_heads"] != -1 else [c // p["num_head_channels"] for c in channels]
    return {"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
            "attention_head_dim": heads, "block_out_channels": channels, "center_input_sample": False,
            "cross_attention_dim": p["context_dim"], "downsample_padding": 1, "flip_sin_to_cos": True,
            "freq_shift": 0, "down_block_types": ["CrossAttnDownBlock2D" if i in s.attention_levels
                                                  else "DownBlock2D" for i in range(s.levels)],
            "up_block_types": ["CrossAttnUpBlock2D" if i in s.attention_levels else "UpBlock2D"
                               for i in reversed(range(s.levels))],
            "in_channels": p["in_channels"], "out_channels": p["out_channels"], "layers_per_block": s.num_res_blocks,
            "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32, "sample_size": p["image_size"],
            "transformer_layers_per_block": p["transformer_depth"], "use_linear_projection": False,
            "upcast_attention": False, "only_cross_attention": False}


def vae_config(p: Mapping[str, Any], scale_factor: float) -> Dict[str, Any]:
    """AutoencoderKL's config for our AutoencoderKL params `p` and the model's latent `scale_factor`."""
    dd = p["ddconfig"]
    if dd.get("attn_resolutions") or p["embed_dim"] != dd["z_channels"] or dd.get("give_pre_end") \
            or dd.get("tanh_out"):
        raise DiffusersFolderError("diffusers' AutoencoderKL has no attention outside its mid block, embed_dim = "
                                   "z_channels, and no give_pre_end / tanh_out: this autoencoder config is not SD v1's")
    levels = len(dd["ch_mult"])
    return {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
            "block_out_channels": [dd["ch"] * m for m in dd["ch_mult"]],
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "in_channels": dd["in_channels"], "out_channels": dd["out_ch"], "latent_channels": dd["z_channels"],
            "layers_per_block": dd["num_res_blocks"], "norm_num_groups": 32, "sample_size": dd["resolution"],
            "scaling_factor": scale_factor, "force_upcast": True,
            "mid_block_add_attention": dd.get("attn_type", "vanilla") != "none"}


def text_encoder_config(p: Mapping[str, Any]) -> Dict[str, Any]:
    """transformers' CLIPTextConfig for FrozenCLIPEmbedder params `p`."""
    skip = p["layers"] - FrozenCLIPEmbedder.layer_to_depth(p["layer"], p["layers"])
    if skip:
        log.warning("the text encoder uses layer %r: call the diffusers pipeline with clip_skip=%d to match",
                    p["layer"], skip)
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "attention_dropout": 0.0,
            "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID, "hidden_act": "quick_gelu",
            "hidden_size": p["width"], "initializer_factor": 1.0, "initializer_range": 0.02,
            "intermediate_size": int(p["width"] * p["mlp_ratio"]), "layer_norm_eps": 1e-5,
            "max_position_embeddings": p["max_length"], "num_attention_heads": p["heads"],
            "num_hidden_layers": p["layers"], "projection_dim": p["width"], "vocab_size": p["vocab_size"]}


def scheduler_config(p: Mapping[str, Any], betas: torch.Tensor) -> Dict[str, Any]:
    """SD v1's PNDM scheduler config with the model's noise schedule (`betas`, the checkpoint's buffer): by name when
    the config's schedule gives exactly these betas, else as trained_betas."""
    config = {"_class_name": "PNDMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
              "num_train_timesteps": len(betas), "beta_start": p["linear_start"], "beta_end": p["linear_end"],
              "beta_schedule": "scaled_linear", "trained_betas": None, "prediction_type": "epsilon",
              "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
              "clip_sample": False}
    name = {ours: theirs for theirs, ours in BETA_SCHEDULES.items()}.get(p["beta_schedule"])
    expected = torch.tensor(make_beta_schedule(p["beta_schedule"], p["timesteps"], p["linear_start"],
                                               p["linear_end"]), dtype=torch.float32)
    if name and expected.shape == betas.shape and torch.equal(expected, betas.float()):
        config["beta_schedule"] = name
    else:
        config["trained_betas"] = betas.double().tolist()
    return config


def write_tokenizer(folder: Path, max_length: int) -> None:
    """transformers' CLIPTokenizer files (vocab.json, merges.txt) made from the CLIP BPE vocabulary our tokenizer
    reads from the installed open_clip package."""
    encoder, ranks = load_vocab()
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
    merges = sorted(ranks, key=ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    special = {"bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[1], "unk_token": SPECIAL_TOKENS[1],
               "pad_token": SPECIAL_TOKENS[1]}  # SD v1 pads with EOS
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "tokenizer_config.json", {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length,
                                                   "do_lower_case": True, "errors": "replace", **special})
