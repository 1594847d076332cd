"""Images for people: tensors in [-1, 1] as PIL images, and grids of them with labels under the tiles and beside the
rows, drawn with PIL's default font and visible spaces."""

import math
from typing import List, Optional, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont


def to_pil(images: torch.Tensor) -> List[Image.Image]:
    """Images in [-1, 1] (b, 3, h, w) -> PIL images."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).cpu().numpy()]


def word_gap(font: ImageFont.FreeTypeFont) -> float:
    """The space drawn between words: at least 0.4 em (PIL's default font draws a 1-2 px space at small sizes, and
    "photo of a sks star" read as "photoofasksstar")."""
    return max(font.getlength(" "), 0.4 * font.size)


def text_length(text: str, font: ImageFont.FreeTypeFont) -> float:
    """The width of one line as `draw_words` draws it."""
    words = text.split(" ")
    return sum(font.getlength(w) for w in words) + (len(words) - 1) * word_gap(font)


def draw_words(draw: ImageDraw.ImageDraw, xy: Sequence[float], text: str, font: ImageFont.FreeTypeFont,
               fill: str = "white") -> None:
    """One line of text, word by word with `word_gap` between them."""
    x, y = xy
    for word in text.split(" "):
        draw.text((x, y), word, fill=fill, font=font)
        x += font.getlength(word) + word_gap(font)


def wrap_label(text: str, font: ImageFont.FreeTypeFont, width: float, max_lines: int = 6) -> List[str]:
    """`text` broken into lines of at most `width` pixels, at spaces where it can (inside a word where one is
    wider); lines beyond `max_lines` are dropped and the last kept line ends with an ellipsis."""
    lines: List[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if text_length(candidate, font) <= width or not line and len(word) <= 1:
                line = candidate
                continue
            if line:
                lines.append(line)
            while len(word) > 1 and font.getlength(word) > width:  # a word wider than the room: break it
                cut = max(1, next(i for i in range(len(word), 0, -1) if font.getlength(word[:i]) <= width
                                  or i == 1))
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and text_length(last + "...", font) > width:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last + "..."]
    return lines


MIN_LABELLED_TILE = 128  # px: labelled tiles narrower than this are enlarged (nearest neighbour) to stay readable


def image_grid(images: Sequence[Image.Image], n_rows: int, labels: Optional[Sequence[str]] = None,
               row_labels: Optional[Sequence[str]] = None) -> Image.Image:
    """Tile equally sized images row by row, `n_rows` images per row (as CompVis' --n_rows), 2 px apart.

    `labels` (one per image, lines split on newlines) are written under the images, wrapped to the image width, and
    `row_labels` (one per row) in a margin on the left, with PIL's default font and visible spaces. Labelled images
    narrower than MIN_LABELLED_TILE are enlarged by a whole factor (each pixel a block: nothing is smoothed) so that
    their labels have room to be read.
    """
    if (labels or row_labels) and images[0].width < MIN_LABELLED_TILE:
        k = math.ceil(MIN_LABELLED_TILE / images[0].width)
        images = [im.resize((im.width * k, im.height * k), Image.Resampling.NEAREST) for im in images]
    n_cols = max(1, min(n_rows, len(images)))
    rows = (len(images) + n_cols - 1) // n_cols
    w, h = images[0].size
    font = ImageFont.load_default(size=max(12, w // 24))
    line_h = font.getbbox("Ag")[3] + 2
    wrapped = [wrap_label(t, font, w) for t in labels] if labels else []
    label_h = max(len(t) for t in wrapped) * line_h + 2 if labels else 0
    margin = int(max(text_length(t, font) for t in row_labels)) + 8 if row_labels else 0
    grid = Image.new("RGB", (margin + n_cols * (w + 2) + 2, rows * (h + 2 + label_h) + 2))
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        x, y = margin + 2 + (i % n_cols) * (w + 2), 2 + (i // n_cols) * (h + 2 + label_h)
        grid.paste(im, (x, y))
        for j, line in enumerate(wrapped[i] if labels else []):
            draw_words(draw, (x, y + h + 1 + j * line_h), line, font)
    for r, text in enumerate(row_labels or []):
        draw_words(draw, (4, 2 + r * (h + 2 + label_h) + (h - line_h) // 2), text, font)
    return grid
