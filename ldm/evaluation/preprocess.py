"""A metric model's image preprocessing, read from its weights folder's own `preprocessor_config.json`.

transformers parses the file (`AutoImageProcessor`, so every format it reads is read: the legacy `size: 224`, a
`feature_extractor_type`, ...); the settings are then applied here to a batch tensor, exactly as transformers 5's
torchvision backend applies them (tested equal to the processor loaded from the same file). Why the application
stays hand-written: transformers' processors take a list of images and, before version 5, resize with PIL (up to one
8-bit level per pixel apart on the test images), so calling them would tie the scores to the installed version.

A folder without the file is preprocessed as the model family's published weights are (facebook/dino-vits16's file,
or CLIPImageProcessor's defaults at the model's image size), with a warning that names the folder: weights trained
with other preprocessing must bring their file. A file that asks for something not applied here (padding, another
interpolation, ...) is refused by name, never half-applied.
"""
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

log = logging.getLogger(__name__)

PREPROCESSOR_FILE = "preprocessor_config.json"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# PIL resampling codes of the file -> torchvision's, as transformers' torchvision backend maps them (tensors can be
# resized with these three; PIL's box, hamming and lanczos have no tensor resize)
RESAMPLE = {0: InterpolationMode.NEAREST_EXACT, 2: InterpolationMode.BILINEAR, 3: InterpolationMode.BICUBIC}
APPLIED = ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> uint8, rounded as ldm.util.images.to_pil rounds an image saved as PNG."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


@dataclass(frozen=True)
class Preprocess:
    """Resize uint8 images (to `size` = (height, width), or the shorter side to `shortest_edge`), optionally
    centre-crop to `crop`, then rescale and normalise, fused as transformers fuses them."""
    size: Optional[Tuple[int, int]] = None
    shortest_edge: Optional[int] = None
    interpolation: InterpolationMode = InterpolationMode.BILINEAR
    crop: Optional[Tuple[int, int]] = None
    rescale: Optional[float] = 1 / 255
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None

    def resized(self, height: int, width: int) -> Tuple[int, int]:
        """The (height, width) after the resize; the longer side is truncated as transformers truncates it."""
        if self.shortest_edge is not None:
            s = self.shortest_edge
            return (int(s * height / width), s) if width <= height else (s, int(s * width / height))
        return self.size if self.size is not None else (height, width)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> the model's pixel_values (on the CPU, where transformers' processors run)."""
        x = to_uint8(images.cpu())
        if self.size is not None or self.shortest_edge is not None:
            x = TF.resize(x, list(self.resized(*x.shape[-2:])), self.interpolation, antialias=True)
        if self.crop is not None:
            (h, w), (ch, cw) = x.shape[-2:], self.crop
            if ch > h or cw > w:
                raise ValueError(f"the centre crop {ch}x{cw} is larger than the resized image {h}x{w}")
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[..., top:top + ch, left:left + cw]
        scale = 1.0 / self.rescale if self.rescale else 1.0
        if self.mean is not None:  # rescale fused into the normalisation, as transformers does
            mean, std = torch.tensor(self.mean) * scale, torch.tensor(self.std) * scale
            return (x.float() - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        return x.float() / scale


def _get(obj: Any, name: str) -> Any:
    """A field of a transformers size (a dict before version 5, a SizeDict since)."""
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def from_processor(processor: Any, where: str) -> Preprocess:
    """The Preprocess of a parsed transformers image processor; a ValueError names a setting not applied here."""
    extra = sorted(k for k, v in vars(processor).items() if k.startswith("do_") and v and k not in APPLIED)
    if extra:
        raise ValueError(f"{where} asks for {', '.join(extra)}, which the metric backends do not apply")
    size, shortest, interpolation = None, None, InterpolationMode.BILINEAR
    if getattr(processor, "do_resize", False):
        s = processor.size
        if _get(s, "shortest_edge") is not None and _get(s, "height") is None and not _get(s, "longest_edge"):
            shortest = int(_get(s, "shortest_edge"))
        elif _get(s, "height") is not None and _get(s, "width") is not None and not _get(s, "shortest_edge"):
            size = (int(_get(s, "height")), int(_get(s, "width")))
        else:
            raise ValueError(f"{where}: resize to {s} is not supported (height and width, or shortest_edge alone)")
        resample = int(getattr(processor, "resample", 2) or 0)
        if resample not in RESAMPLE:
            raise ValueError(f"{where}: resample {resample} is not supported; supported: {sorted(RESAMPLE)} "
                             "(nearest, bilinear, bicubic)")
        interpolation = RESAMPLE[resample]
    crop = None
    if getattr(processor, "do_center_crop", False):
        c = processor.crop_size
        crop = (int(_get(c, "height")), int(_get(c, "width")))
    rescale = float(processor.rescale_factor) if getattr(processor, "do_rescale", False) else None
    normalise = bool(getattr(processor, "do_normalize", False))
    mean = tuple(map(float, processor.image_mean)) if normalise else None
    std = tuple(map(float, processor.image_std)) if normalise else None
    return Preprocess(size, shortest, interpolation, crop, rescale, mean, std)


def parse_processor(config: Dict[str, Any], where: str) -> Preprocess:
    """A preprocessor_config.json mapping, parsed by transformers' AutoImageProcessor."""
    import transformers  # the backends that read these files need it; imported with them, never at start-up
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / PREPROCESSOR_FILE).write_text(json.dumps(config))
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(tmp, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{where} cannot be read by transformers' AutoImageProcessor: {e}") from None
    return from_processor(processor, where)


def folder_preprocess(folder: Path, default: Dict[str, Any], backend: str) -> Preprocess:
    """The preprocessing of the metric model in `folder`: its own preprocessor_config.json, else `default` (the
    published weights' file) with a warning."""
    path = Path(folder) / PREPROCESSOR_FILE
    if not path.is_file():
        log.warning("'%s' has no %s: the '%s' metric preprocesses as %s; put the weights' own %s there if they were "
                    "trained with other preprocessing", folder, PREPROCESSOR_FILE, backend,
                    default.get("_source", "the published weights do"), PREPROCESSOR_FILE)
        return parse_processor({k: v for k, v in default.items() if k != "_source"}, f"the default of '{backend}'")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"'{path}' is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"'{path}' must hold a JSON object (a transformers image processor config)")
    return parse_processor(config, f"'{path}'")


def dino_default(image_size: int = 224) -> Dict[str, Any]:
    """facebook/dino-vits16's preprocessor_config.json (ViTImageProcessor) at the model's image size: resize to
    size x size, bilinear, no crop, ImageNet mean/std."""
    return {"_source": "facebook/dino-vits16's file does (resize to 224x224 at that model's size, bilinear, no crop, "
                       "ImageNet mean/std)",
            "image_processor_type": "ViTImageProcessor", "do_resize": True,
            "size": {"height": image_size, "width": image_size}, "resample": 2, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(IMAGENET_MEAN),
            "image_std": list(IMAGENET_STD)}


def clip_default(image_size: int = 224) -> Dict[str, Any]:
    """CLIPImageProcessor's defaults (the openai/clip-vit-* files) at the model's image size: shorter side to size,
    bicubic, centre crop size x size, CLIP mean/std."""
    return {"_source": "openai/clip-vit-*'s files do (shorter side to the model's image size, bicubic, centre crop, "
                       "CLIP mean/std)",
            "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
            "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}
