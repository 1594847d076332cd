"""The Stable Diffusion safety checker (CompVis' and diffusers' `StableDiffusionSafetyChecker`), from a local file.

A CLIP vision tower and projection embed each image; its cosine similarity to 17 concept embeddings (and 3
"special care" ones, which make the others stricter) above per-concept thresholds flags it. The model is built from
diffusers' class with a CLIP config read off the weights' shapes, so nothing is downloaded, and the CLIP image
preprocessing is done here.
"""
import re
from math import isqrt
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
from PIL import Image

from ldm.checkpoint import CheckpointError, load_into, load_state_dict
from ldm.util.imports import optional_import

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_HEAD_DIM = 64  # every CLIP ViT (ViT-L/14: 1024 wide, 16 heads); shapes alone do not give the head count
VISION = "vision_model.vision_model."  # the released checker's key layout (transformers 4 names)
REQUIRED = ("concept_embeds", "special_care_embeds", "concept_embeds_weights", "special_care_embeds_weights",
            "visual_projection.weight", VISION + "embeddings.patch_embedding.weight",
            VISION + "embeddings.position_embedding.weight", VISION + "encoder.layers.0.mlp.fc1.weight")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
FIX = ("pass the safety checker's weights (safety_checker/model.safetensors or pytorch_model.bin of an SD v1 model "
       "repository, or that folder), or drop --safety_checker")


class SafetyCheckerError(ValueError):
    """Safety checker weights that are missing, unreadable or of another kind."""


def _weights_file(path: Path) -> Path:
    """`path`, or the weights file inside it when it is a folder."""
    if not path.exists():
        raise SafetyCheckerError(f"safety checker weights not found: '{path}'; {FIX}")
    if path.is_dir():
        found = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
        if not found:
            raise SafetyCheckerError(f"'{path}' holds no {' or '.join(WEIGHT_FILES)}; {FIX}")
        return found[0]
    return path


def _kind_hint(sd: Dict[str, torch.Tensor]) -> str:
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in sd):
        return " (it looks like a Stable Diffusion checkpoint)"
    if any(".adapters." in k for k in sd):
        return " (it looks like adapter weights)"
    return ""


def read_checker_weights(path: str) -> Dict[str, torch.Tensor]:
    """The checker's tensors from a safetensors or torch (weights_only) file, keys in the released layout."""
    file = _weights_file(Path(path))
    try:
        sd = load_state_dict(str(file))
    except CheckpointError as e:
        raise SafetyCheckerError(f"{e}; {FIX}") from None
    # transformers 5 names the vision tower one level shallower: accept those files too.
    sd = {re.sub(r"^vision_model\.(?!vision_model\.)", VISION, k): v for k, v in sd.items()}
    missing = [k for k in REQUIRED if k not in sd]
    if missing:
        raise SafetyCheckerError(f"'{file}' is not a Stable Diffusion safety checker: it has no "
                                 f"{', '.join(missing[:3])}{_kind_hint(sd)}; {FIX}")
    return sd


def checker_config(sd: Dict[str, torch.Tensor]) -> Any:
    """The `CLIPConfig` whose vision tower and projection have the shapes of `sd`."""
    from transformers import CLIPConfig
    hidden, channels, patch, _ = sd[VISION + "embeddings.patch_embedding.weight"].shape
    side = isqrt(sd[VISION + "embeddings.position_embedding.weight"].shape[0] - 1)
    layers = {int(m.group(1)) for k in sd if (m := re.match(re.escape(VISION) + r"encoder\.layers\.(\d+)\.", k))}
    projection = sd["visual_projection.weight"].shape[0]
    if hidden % CLIP_HEAD_DIM:
        raise SafetyCheckerError(f"the safety checker's vision width {hidden} is not a multiple of CLIP's head width "
                                 f"{CLIP_HEAD_DIM}: not a CLIP vision tower; {FIX}")
    vision = dict(hidden_size=hidden, intermediate_size=sd[VISION + "encoder.layers.0.mlp.fc1.weight"].shape[0],
                  num_hidden_layers=len(layers), num_attention_heads=hidden // CLIP_HEAD_DIM, num_channels=channels,
                  image_size=side * patch, patch_size=patch, projection_dim=projection)
    return CLIPConfig(vision_config=vision, projection_dim=projection)


def _to_model_layout(sd: Dict[str, torch.Tensor], model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Rename the released layout's keys to the installed transformers' names, when those differ."""
    if any(k.startswith(VISION) for k in model.state_dict()):
        return sd
    return {k.replace(VISION, "vision_model.", 1): v for k, v in sd.items()}


def clip_input(images: List[Image.Image], size: int) -> torch.Tensor:
    """CLIP's image preprocessing: shortest side to `size` (bicubic), centre crop, [0, 1], mean/std.  -> (b, 3, s, s)"""
    batch = []
    for im in images:
        w, h = im.size  # the long side scales to floor(size * long / short), as in transformers
        im = im.convert("RGB").resize((size, size * h // w) if w <= h else (size * w // h, size), Image.BICUBIC)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        im = im.crop((left, top, left + size, top + size))
        batch.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (torch.stack(batch) - mean) / std


def _checker_class() -> Any:
    return optional_import("diffusers.pipelines.stable_diffusion.safety_checker", "the safety checker",
                           "pip install diffusers transformers, or drop --safety_checker",
                           SafetyCheckerError).StableDiffusionSafetyChecker


class SafetyChecker:
    """Replaces the images the SD safety checker flags by black ones, counting them."""

    def __init__(self, path: str, device: torch.device):
        sd = read_checker_weights(path)
        cls = _checker_class()
        config = checker_config(sd)
        self.model = cls(config).eval()
        try:
            load_into(self.model, _to_model_layout(sd, self.model), source=f"safety checker '{path}'")
        except CheckpointError as e:
            raise SafetyCheckerError(f"{e}; {FIX}") from None
        self.model.to(device)
        self.image_size = config.vision_config.image_size
        self.checked, self.flagged = 0, 0

    @torch.no_grad()
    def __call__(self, images: List[Image.Image]) -> List[Image.Image]:
        """The images with the flagged ones blacked out."""
        x = clip_input(images, self.image_size).to(next(self.model.parameters()).device)
        _, flags = self.model(x, images=x.clone())  # it blackens its `images` argument; we only use the flags
        self.checked, self.flagged = self.checked + len(images), self.flagged + sum(flags)
        return [Image.new("RGB", im.size) if flag else im for im, flag in zip(images, flags)]
