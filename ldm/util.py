"""Small helpers shared across the package: config instantiation and a few one-liners."""
import importlib
import logging
import re
from inspect import isfunction
from typing import Any, List, Mapping, Optional, Sequence

import torch
import yaml
from PIL import Image, ImageDraw, ImageFont


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def yaml_number(value: Any) -> Any:
    """`value`, with a string in exponent notation (1e-4, which YAML 1.1 reads as text) as the float it means."""
    return float(value) if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()) else value


def parse_yaml_value(text: str) -> Any:
    """A command-line VALUE as YAML (1e-4 included as a float; empty text is None)."""
    return yaml_number(yaml.safe_load(text)) if text.strip() else None


def setup_logging(timestamps: bool = True) -> None:
    """The scripts' log format: `12:03:04 INFO ldm.sweep.runs: ...` (INFO and above, on stderr)."""
    fmt = "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s " + fmt if timestamps else fmt, datefmt="%H:%M:%S")


class ConfigError(ValueError):
    """A config names something that does not exist or is missing a required field."""


def optional_import(name: str, needed_for: str, fix: str, error: type = ImportError) -> Any:
    """Module `name` of an optional package, or `error` saying what needs it and how to get it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise error(f"{needed_for} needs {name.split('.')[0]} ({e}): {fix}") from None


def exists(x: Any) -> bool:
    return x is not None


def default(val: Any, d: Any) -> Any:
    """`val` if it is set, else `d` (called first when it is a function)."""
    if exists(val):
        return val
    return d() if isfunction(d) else d


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Import `package.module.Name` and return `Name`, with an error that says which part is wrong."""
    module_name, _, cls = string.rpartition(".")
    if not module_name:
        raise ConfigError(f"target '{string}' is not a dotted path like 'ldm.models.diffusion.ddpm.LatentDiffusion'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"target '{string}': cannot import module '{module_name}' ({e})") from None
    if reload:
        module = importlib.reload(module)
    if not hasattr(module, cls):
        raise ConfigError(f"target '{string}': module '{module_name}' has no attribute '{cls}'")
    return getattr(module, cls)


def instantiate_from_config(config: Mapping) -> Any:
    """Build `config.target(**config.params)`; the CompVis config convention."""
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise ConfigError(f"expected a config with a 'target' key, got keys {list(config.keys())}")
    return get_obj_from_str(config["target"])(**config.get("params", dict()))


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def load_model_from_config(config: Mapping, ckpt: Optional[str] = None) -> torch.nn.Module:
    """Build `config.model` and, when given, load base weights from `ckpt`; returns the model in eval mode."""
    model = instantiate_from_config(config["model"])
    if ckpt:
        model.init_from_ckpt(ckpt)
    return model.eval()


def pick_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_pil(images: torch.Tensor) -> List[Image.Image]:
    """Images in [-1, 1] (b, 3, h, w) -> PIL images."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).cpu().numpy()]


def _fit(text: str, font: ImageFont.FreeTypeFont, width: float) -> str:
    """`text` cut (with an ellipsis) to fit `width` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def image_grid(images: Sequence[Image.Image], n_rows: int, labels: Optional[Sequence[str]] = None,
               row_labels: Optional[Sequence[str]] = None) -> Image.Image:
    """Tile equally sized images row by row, `n_rows` images per row (as CompVis' --n_rows), 2 px apart.

    `labels` (one per image, lines split on newlines) are written under the images, `row_labels` (one per row) in a
    margin on the left, with PIL's default font; text wider than its room is cut with an ellipsis.
    """
    n_cols = max(1, min(n_rows, len(images)))
    rows = (len(images) + n_cols - 1) // n_cols
    w, h = images[0].size
    font = ImageFont.load_default(size=max(12, w // 32))
    line_h = font.getbbox("Ag")[3] + 2
    label_h = max(len(t.split("\n")) for t in labels) * line_h + 2 if labels else 0
    margin = int(max(font.getlength(t) for t in row_labels)) + 8 if row_labels else 0
    grid = Image.new("RGB", (margin + n_cols * (w + 2) + 2, rows * (h + 2 + label_h) + 2))
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        x, y = margin + 2 + (i % n_cols) * (w + 2), 2 + (i // n_cols) * (h + 2 + label_h)
        grid.paste(im, (x, y))
        for j, line in enumerate(labels[i].split("\n") if labels else []):
            draw.text((x, y + h + 1 + j * line_h), _fit(line, font, w), fill="white", font=font)
    for r, text in enumerate(row_labels or []):
        draw.text((4, 2 + r * (h + 2 + label_h) + (h - line_h) // 2), text, fill="white", font=font)
    return grid
