"""Invisible watermark on generated images, as CompVis' txt2img.py does ("StableDiffusionV1", DWT-DCT method).

Uses the `invisible-watermark` package (`imwatermark`), imported only when a watermark is made or read.
"""
import logging
from typing import Any

import numpy as np
from PIL import Image

from ldm.util.imports import optional_import

log = logging.getLogger(__name__)

WATERMARK_TEXT = "StableDiffusionV1"
MIN_PIXELS = 256 * 256  # imwatermark refuses smaller images: the DWT-DCT blocks need the room


def _imwatermark() -> Any:
    return optional_import("imwatermark", "the invisible watermark",
                           "pip install invisible-watermark (or pass --no-watermark)")


def make_encoder(text: str = WATERMARK_TEXT) -> Any:
    """An `imwatermark.WatermarkEncoder` that writes `text`."""
    encoder = _imwatermark().WatermarkEncoder()
    encoder.set_watermark("bytes", text.encode("utf-8"))
    return encoder


def can_carry(img: Image.Image) -> bool:
    """Whether `img` is big enough for the watermark."""
    return img.width * img.height >= MIN_PIXELS


def _bgr(img: Image.Image) -> np.ndarray:
    """`img` as the contiguous uint8 BGR array imwatermark works on."""
    return np.ascontiguousarray(np.asarray(img.convert("RGB"))[:, :, ::-1])


def put_watermark(img: Image.Image, encoder: Any) -> Image.Image:
    """`img` with the encoder's mark in it."""
    return Image.fromarray(np.ascontiguousarray(encoder.encode(_bgr(img), "dwtDct")[:, :, ::-1]))


def read_watermark(img: Image.Image, length: int = len(WATERMARK_TEXT)) -> str:
    """The `length`-byte mark in `img`, decoded as UTF-8 (unreadable bytes become U+FFFD)."""
    decoder = _imwatermark().WatermarkDecoder("bytes", 8 * length)
    return decoder.decode(_bgr(img), "dwtDct").decode("utf-8", errors="replace")


class Watermarker:
    """Marks every image big enough to carry `text`; leaves smaller ones as they are, with one warning."""

    def __init__(self, text: str = WATERMARK_TEXT):
        self.encoder = make_encoder(text)
        self.warned = False

    def __call__(self, img: Image.Image) -> Image.Image:
        if can_carry(img):
            return put_watermark(img, self.encoder)
        if not self.warned:
            log.warning("images under %d pixels (this one is %dx%d) are too small for the invisible watermark: "
                        "saving them unmarked", MIN_PIXELS, img.width, img.height)
            self.warned = True
        return img
