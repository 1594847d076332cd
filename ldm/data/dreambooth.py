"""DreamBooth data (Ruiz et al. 2023): a folder of subject images, or of class images for prior preservation."""
import logging
import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from ldm.checks import read_text
from ldm.util.instantiate import check_ranges

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MIN_SIDE = 8  # pixels: smaller images carry no subject, and the VAE's downsampling factor is 8
MAX_ASPECT, MAX_UPSCALE = 4, 4  # beyond these a training image is mostly cropped away or blurry: warned about
PathLike = Union[str, Path]


class DataError(ValueError):
    """A data folder or image that cannot be used, with a message naming it."""


def list_images(folder: PathLike) -> List[Path]:
    """Image files directly in `folder` (by extension, case-insensitive, hidden files skipped), sorted by name."""
    folder = Path(folder)
    expected = f"expected a folder holding images ({', '.join(IMAGE_EXTENSIONS)})"
    if not folder.is_dir():
        raise DataError(f"image folder '{folder}' does not exist or is not a folder: {expected}")
    # Hidden files are skipped: macOS '._x.jpg' resource forks and atomic_write's '.tmp-*' leftovers are not images.
    paths = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file())
    if not paths:
        raise DataError(f"image folder '{folder}' holds no image files: {expected}")
    return paths


def _to_8bit(img: Image.Image) -> Image.Image:
    """Scale a 16/32-bit single-channel image ('I;16*', 'I', 'F') to 'L' instead of letting PIL clip it at 255."""
    x = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or x.max() > 255:  # 16-bit range, as 16-bit PNG/TIFF greyscale opens as 'I'
        x = np.clip(x, 0, 65535) / 257.0
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))  # (h, w) uint8 -> mode L


def open_rgb(path: PathLike, draft: Optional[int] = None) -> Image.Image:
    """Open an image as 8-bit RGB: EXIF orientation applied, transparency composited on white, 16-bit scaled.

    `draft` lets a JPEG decode at a reduced scale (at least draft x draft), for cheap checks.
    """
    with Image.open(path) as img:
        if draft:
            img.draft(img.mode, (draft, draft))
        img = ImageOps.exif_transpose(img)
        img.load()
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")


def to_square(img: Image.Image, size: int, center_crop: bool = True) -> Image.Image:
    """Centre-crop to a square then resize to size x size; center_crop=False squashes the whole image."""
    if center_crop:
        w, h = img.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
    return img.resize((size, size), Image.Resampling.LANCZOS)


def _uint8_chw(path: PathLike, size: int, center_crop: bool) -> torch.Tensor:
    try:
        img = to_square(open_rgb(path), size, center_crop)
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image '{path}' ({type(e).__name__}: {e})") from None
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # (3, size, size)


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def load_image(path: PathLike, size: int, center_crop: bool = True) -> torch.Tensor:
    """One image as a (3, size, size) float tensor in [-1, 1]."""
    return _to_float(_uint8_chw(path, size, center_crop))


def image_problem(path: PathLike) -> Optional[str]:
    """None when PIL reads the image (its integrity check, then a cheap JPEG-draft decode to RGB); else what is wrong:
    'too large' (more pixels than PIL decodes: a decompression bomb, or far more than training needs) or unreadable."""
    try:
        with Image.open(path) as img:
            img.verify()
        open_rgb(path, draft=64)  # verify() leaves the file unusable and misses truncated JPEGs and odd modes
    except Image.DecompressionBombError as e:
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(pixels.group(1)):,} pixels" if pixels else "too many pixels"
        return f"too large ({size}; PIL decodes at most {2 * Image.MAX_IMAGE_PIXELS:,}): resize it"
    except Exception:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, struct.error...) on bad files
        return "unreadable (unknown format, truncated or corrupt)"
    return None


def check_images(paths: Sequence[Path]) -> Tuple[List[Path], Dict[Path, str]]:
    """Split paths into (readable, {unreadable: what is wrong}) by `image_problem`."""
    ok, bad = [], {}
    for p in paths:
        problem = image_problem(p)
        if problem:
            bad[p] = problem
        else:
            ok.append(p)
    return ok, bad


def check_image_file(path: PathLike, what: str = "image") -> None:
    """A ValueError unless `path` is an image file PIL can read (`image_problem`)."""
    if not Path(path).is_file():
        raise ValueError(f"{what} not found: '{path}'")
    problem = image_problem(path)
    if problem and problem.startswith("too large"):
        raise ValueError(f"{what} '{path}' is {problem}")
    if problem:
        raise ValueError(f"{what} '{path}' is not an image PIL can read (unknown format, truncated or corrupt): pass "
                         "a PNG or JPEG")


def usable_images(folder: PathLike) -> List[Path]:
    """list_images(folder) without unreadable files, which are logged in one warning (with what is wrong with each)."""
    ok, bad = check_images(list_images(folder))
    if bad:
        log.warning("skipping %d unusable image(s) in '%s': %s", len(bad), folder,
                    "; ".join(f"{p.name} is {why}" for p, why in bad.items()))
    return ok


def check_image_sizes(paths: Sequence[Path], size: int, center_crop: bool = True) -> None:
    """Refuse images with a side under MIN_SIDE pixels; warn, naming the files, about images whose centre crop keeps
    less than a quarter of them (aspect ratio over 4) or that are upscaled more than 4x to `size`."""
    narrow, small = [], []
    for p in paths:
        with Image.open(p) as img:
            w, h = img.size
        if min(w, h) < MIN_SIDE:
            raise DataError(f"image '{p}' is {w}x{h} pixels: training images need at least {MIN_SIDE} px on each side "
                            f"(they are resized to {size}x{size}); remove it from the folder")
        if max(w, h) > MAX_ASPECT * min(w, h):
            narrow.append(f"{p.name} ({w}x{h})")
        if size > MAX_UPSCALE * (min(w, h) if center_crop else max(w, h)):
            small.append(f"{p.name} ({w}x{h})")
    if narrow:
        log.warning("%d image(s) in '%s' have an aspect ratio over %d:1, so %s: %s", len(narrow), paths[0].parent,
                    MAX_ASPECT, "the centre crop keeps less than a quarter of each" if center_crop else
                    "squashing them to a square distorts them", ", ".join(narrow))
    if small:
        log.warning("%d image(s) in '%s' are upscaled more than %dx to %d px (blurry training targets): %s",
                    len(small), paths[0].parent, MAX_UPSCALE, size, ", ".join(small))


def format_prompt(template: str, fields: Dict[str, str]) -> str:
    """Fill a prompt template from `fields`, positionally ({}) and by name ({class_word}); a clear error otherwise."""
    try:
        return template.format(*fields.values(), **fields)
    except (IndexError, KeyError) as e:
        raise ValueError(f"prompt template '{template}' uses a field other than positional {{}} or "
                         f"{', '.join('{' + k + '}' for k in fields)} ({type(e).__name__}: {e})") from None


class DreamBoothDataset(torch.utils.data.Dataset):
    """Subject (or, with reg=True, class) images with captions and random horizontal flips.

    Prompt templates are `str.format` strings. Subject templates get the positional fields
    (placeholder_token, class_word) and the named fields {token} and {class_word}: "photo of a {} {}" and
    "photo of a {token} {class_word}" are the same prompt. Class templates get (class_word,) and {class_word}.
    A `<stem>.txt` beside an image replaces the template for that image. One template is drawn per item.
    Items: {"image": (3, size, size) float in [-1, 1], "caption": str, "index": image index, "flipped": bool}.
    Flips and template draws use the global torch RNG, or with `seed` a private generator (in a DataLoader worker
    mixed with torch's per-worker, per-epoch seed). Decoded images are kept as uint8 when `cache_images`.
    """

    PARAM_RANGES = {"size": dict(low=MIN_SIDE, integer=True), "repeats": dict(low=1, integer=True),
                    "flip_p": dict(low=0, high=1)}

    def __init__(self, data_root: PathLike, size: int = 512, class_word: str = "dog", placeholder_token: str = "sks",
                 templates: Sequence[str] = ("photo of a {} {}",), reg: bool = False,
                 class_templates: Sequence[str] = ("photo of a {}",), repeats: int = 1, flip_p: float = 0.5,
                 center_crop: bool = True, seed: Optional[int] = None, cache_images: bool = True):
        check_ranges(DreamBoothDataset, locals())
        self.data_root, self.size, self.reg = Path(data_root), size, reg
        self.repeats, self.flip_p, self.center_crop, self.cache_images = repeats, flip_p, center_crop, cache_images
        self.paths = usable_images(self.data_root)
        if not self.paths:
            raise DataError(f"image folder '{self.data_root}' holds no usable images: each is unreadable or too large "
                            "(see the warning above)")
        check_image_sizes(self.paths, size, center_crop)
        if not (class_templates if reg else templates):
            raise ValueError("need at least one prompt template")
        fields = dict(class_word=class_word) if reg else dict(token=placeholder_token, class_word=class_word)
        self.prompts = [format_prompt(t, fields) for t in (class_templates if reg else templates)]
        self.captions = [self._caption_file(p) for p in self.paths]
        self.seed, self._generator, self._worker_seed = seed, None, None
        self._cache: Dict[int, torch.Tensor] = {}

    @staticmethod
    def _caption_file(path: Path) -> Optional[str]:
        txt = path.with_suffix(".txt")
        caption = read_text(txt, "caption file", DataError).strip() if txt.is_file() else ""
        return caption or None

    def __len__(self) -> int:
        return len(self.paths) * self.repeats

    def _rng(self) -> Optional[torch.Generator]:
        """The dataset's generator when seeded (None: the global torch RNG, which DataLoader seeds per worker)."""
        if self.seed is None:
            return None
        info = torch.utils.data.get_worker_info()
        worker_seed = info.seed if info is not None else None
        if self._generator is None or worker_seed != self._worker_seed:
            # In a DataLoader worker, fold in torch's per-worker, per-epoch seed so workers and epochs differ.
            self._generator = torch.Generator().manual_seed((self.seed * 1_000_003 + (worker_seed or 0)) % 2 ** 32)
            self._worker_seed = worker_seed
        return self._generator

    def _pixels(self, index: int) -> torch.Tensor:
        """The (3, size, size) uint8 image; cached as uint8 (a quarter of float32) when cache_images is set."""
        if index in self._cache:
            return self._cache[index]
        x = _uint8_chw(self.paths[index], self.size, self.center_crop)
        if self.cache_images:
            self._cache[index] = x
        return x

    def caption(self, index: int, template: int = 0) -> str:
        """The caption of image `index`: its .txt file if any, else prompt template number `template`."""
        return self.captions[index] or self.prompts[template]

    def view(self, index: int, flipped: bool) -> torch.Tensor:
        """Image `index` as a (3, size, size) float tensor in [-1, 1], mirrored left-right when `flipped`."""
        x = _to_float(self._pixels(index))
        return x.flip(-1) if flipped else x

    def __getitem__(self, i: int) -> Dict[str, Union[torch.Tensor, str, int, bool]]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of length {len(self)}")
        index = i % len(self.paths)
        g = self._rng()
        flipped = bool(torch.rand((), generator=g) < self.flip_p)
        template = int(torch.randint(len(self.prompts), (), generator=g)) if len(self.prompts) > 1 else 0
        return {"image": self.view(index, flipped), "caption": self.caption(index, template),
                "index": index, "flipped": flipped}

    def views(self) -> Iterator[Dict[str, Union[torch.Tensor, str, int, bool]]]:
        """Every distinct (index, flipped) view once, for caching latents; flipped views only when flip_p > 0."""
        flips = [False] * (self.flip_p < 1) + [True] * (self.flip_p > 0)
        for index in range(len(self.paths)):
            for flipped in flips:
                yield {"image": self.view(index, flipped), "caption": self.caption(index),
                       "index": index, "flipped": flipped}
