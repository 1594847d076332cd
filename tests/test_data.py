"""DreamBooth data: every image format and mode, EXIF, crops, flips, captions, bad folders and class images."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.class_images import ensure_class_images
from ldm.data.dreambooth import DataError, DreamBoothDataset, list_images, load_image

RED, GREEN, BLUE, GREY, WHITE = (220, 20, 30), (20, 200, 40), (30, 40, 210), (128, 128, 128), (255, 255, 255)


def _px(x: torch.Tensor) -> np.ndarray:
    """(3, h, w) in [-1, 1] -> (h, w, 3) float pixels in [0, 255]."""
    return ((x.permute(1, 2, 0).numpy() + 1) * 127.5)


def _close(pixel, colour, tol=12):
    return np.abs(np.asarray(pixel, dtype=float) - np.asarray(colour, dtype=float)).max() <= tol


def _solid(path, colour=RED, size=(40, 30), mode="RGB", **save):
    Image.new(mode, size, colour).save(path, **save)
    return path


def _stripes(path, colours, w=60, h=20):
    """Vertical stripes of equal width, left to right."""
    a = np.zeros((h, w, 3), np.uint8)
    for i, c in enumerate(colours):
        a[:, i * w // len(colours):(i + 1) * w // len(colours)] = c
    Image.fromarray(a).save(path)
    return path


@pytest.mark.parametrize("name", ["a.jpg", "a.jpeg", "a.png", "a.webp", "a.bmp", "A.JPG", "a.PNG"])
def test_every_format(tmp_path, name):
    _solid(tmp_path / name, quality=95) if name.lower().endswith(("jpg", "jpeg")) else _solid(tmp_path / name)
    assert list_images(tmp_path) == [tmp_path / name]
    x = load_image(tmp_path / name, 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert _close(_px(x)[8, 8], RED)


def test_transparency_is_composited_on_white(tmp_path):
    a = np.zeros((20, 20, 4), np.uint8)
    a[:, :10] = (*BLUE, 255)          # opaque left half
    a[:, 10:] = (255, 0, 0, 0)        # fully transparent (red underneath) right half
    Image.fromarray(a, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(a[..., [0, 3]].copy(), "LA").save(tmp_path / "la.png")
    p = Image.new("P", (20, 20), 1)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.save(tmp_path / "p.png", transparency=1)
    px = _px(load_image(tmp_path / "rgba.png", 20))
    assert _close(px[10, 2], BLUE, 1) and _close(px[10, 17], WHITE, 1)
    assert _close(_px(load_image(tmp_path / "la.png", 20))[10, 17], WHITE, 1)
    assert _close(_px(load_image(tmp_path / "p.png", 20))[10, 10], WHITE, 1)


def test_grey_palette_and_cmyk(tmp_path):
    _solid(tmp_path / "l.png", 100, mode="L")
    p = Image.new("P", (20, 20), 2)
    p.putpalette([0] * 6 + list(GREEN) + [0] * 759)
    p.save(tmp_path / "p.png")
    _solid(tmp_path / "cmyk.jpg", (0, 255, 255, 0), mode="CMYK", quality=95)  # pure red in CMYK
    assert _close(_px(load_image(tmp_path / "l.png", 8))[4, 4], (100, 100, 100), 1)
    assert _close(_px(load_image(tmp_path / "p.png", 8))[4, 4], GREEN, 1)
    assert _close(_px(load_image(tmp_path / "cmyk.jpg", 8))[4, 4], (255, 0, 0), 12)


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))  # (4, 256)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")
    row = _px(load_image(tmp_path / "g16.png", 256, center_crop=False))[2, :, 0]
    assert row[0] < 3 and row[-1] > 252 and abs(row[128] - 128) < 4
    assert np.all(np.diff(row[4:-4]) > 0)  # a ramp all the way, no saturation


@pytest.mark.parametrize("orientation, corner", [(1, "top-left"), (6, "top-right"), (8, "bottom-left")])
def test_exif_orientation(tmp_path, orientation, corner):
    a = np.full((32, 64, 3), GREY, np.uint8)
    a[:16, :16] = RED  # marker in the stored top-left corner of a landscape image
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(tmp_path / "o.jpg", exif=exif.tobytes(), quality=95)
    px = _px(load_image(tmp_path / "o.jpg", 64, center_crop=False))  # displayed portrait (6, 8) squashed to square
    corners = {"top-left": px[4, 4], "top-right": px[4, 59], "bottom-left": px[59, 4], "bottom-right": px[59, 59]}
    assert _close(corners.pop(corner), RED, 20)
    assert all(_close(c, GREY, 20) for c in corners.values())


def test_center_crop_keeps_the_middle_and_no_crop_squashes(tmp_path):
    _stripes(tmp_path / "wide.png", [RED, GREEN, BLUE])
    cropped = _px(load_image(tmp_path / "wide.png", 10))
    assert cropped.shape == (10, 10, 3) and all(_close(cropped[5, i], GREEN, 2) for i in (0, 5, 9))
    squashed = _px(load_image(tmp_path / "wide.png", 30, center_crop=False))
    assert _close(squashed[15, 1], RED, 2) and _close(squashed[15, 15], GREEN, 2) and _close(squashed[15, 28], BLUE, 2)


def _subject(tmp_path, n=3):
    for i in range(n):
        _stripes(tmp_path / f"img{i}.png", [RED, BLUE], w=20)
    return tmp_path


def test_flips_are_seeded_and_both_occur(tmp_path):
    root = _subject(tmp_path, 1)
    ds = DreamBoothDataset(root, size=8, repeats=40, seed=3)
    items = [ds[i] for i in range(len(ds))]
    flips = [it["flipped"] for it in items]
    assert 5 < sum(flips) < 35
    for it in items:
        left = _px(it["image"])[4, 0]
        assert _close(left, BLUE if it["flipped"] else RED, 2)
    assert [it["flipped"] for it in DreamBoothDataset(root, size=8, repeats=40, seed=3)] == flips
    assert [it["flipped"] for it in DreamBoothDataset(root, size=8, repeats=40, seed=4)] != flips
    unseeded = DreamBoothDataset(root, size=8, repeats=40)
    torch.manual_seed(0)
    a = [it["flipped"] for it in unseeded]
    torch.manual_seed(0)
    assert [it["flipped"] for it in unseeded] == a
    assert not any(it["flipped"] for it in DreamBoothDataset(root, size=8, repeats=10, flip_p=0.0))


def test_repeats_indices_and_views(tmp_path):
    ds = DreamBoothDataset(_subject(tmp_path, 3), size=8, repeats=4)
    assert len(ds) == 12 and [ds[i]["index"] for i in range(12)] == [0, 1, 2] * 4
    with pytest.raises(IndexError):
        ds[12]
    views = list(ds.views())
    assert [(v["index"], v["flipped"]) for v in views] == [(i, f) for i in range(3) for f in (False, True)]
    assert torch.equal(views[1]["image"], views[0]["image"].flip(-1))
    assert len(list(DreamBoothDataset(tmp_path, size=8, flip_p=0.0).views())) == 3


def test_captions_templates_and_class_prompts(tmp_path):
    root = _subject(tmp_path, 2)
    (root / "img1.txt").write_text("a sks dog on the beach\n")
    ds = DreamBoothDataset(root, size=8, class_word="cat", placeholder_token="zwx")
    assert [ds[i]["caption"] for i in range(2)] == ["photo of a zwx cat", "a sks dog on the beach"]
    named = DreamBoothDataset(root, size=8, class_word="cat", templates=["a {token} {class_word}, studio"])
    assert named[0]["caption"] == "a sks cat, studio"
    reg = DreamBoothDataset(root, size=8, class_word="cat", reg=True)
    assert reg[0]["caption"] == "photo of a cat"
    reg2 = DreamBoothDataset(root, size=8, class_word="cat", reg=True, class_templates=["a {class_word} photo"])
    assert reg2[0]["caption"] == "a cat photo"
    many = DreamBoothDataset(root, size=8, templates=["a {} {}", "the {} {}"], repeats=30, seed=0)
    assert {many[i]["caption"] for i in range(0, 60, 2)} == {"a sks dog", "the sks dog"}
    with pytest.raises(ValueError, match="subject"):
        DreamBoothDataset(root, size=8, templates=["photo of {subject}"])


def test_missing_and_empty_folders_are_named(tmp_path):
    with pytest.raises(DataError, match="nowhere.*expected a folder holding images"):
        DreamBoothDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="empty.*holds no image files"):
        list_images(tmp_path / "empty")


def test_corrupt_files_skipped_with_one_warning(tmp_path, caplog):
    root = _subject(tmp_path, 2)
    (root / "notes.md").write_text("not an image")
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    good = (root / "img0.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(root / "full.jpg")
    (root / "cut.jpg").write_bytes((root / "full.jpg").read_bytes()[:2000])
    (root / "full.jpg").unlink()
    (root / "._img0.png").write_bytes(b"macOS resource fork")
    with caplog.at_level(logging.WARNING):
        ds = DreamBoothDataset(root, size=8)
    assert [p.name for p in ds.paths] == ["img0.png", "img1.png"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and all(n in warnings[0] for n in ("bad.png", "truncated.png", "cut.jpg"))
    assert "notes.md" not in warnings[0] and "._img0.png" not in warnings[0]
    (root / "img0.png").write_bytes(b"garbage")
    (root / "img1.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=str(root.name)):
        DreamBoothDataset(root, size=8)
    with pytest.raises(DataError, match="img0.png"):
        load_image(root / "img0.png", 8)


def test_ensure_class_images_fills_once_and_is_seeded(tmp_path, tiny_model_readonly):
    def fill(folder, seed=0):
        folder.mkdir(exist_ok=True)
        if not (folder / "class-00000.png").exists():
            _solid(folder / "class-00000.png", GREY, (32, 32))
        return ensure_class_images(tiny_model_readonly, folder, "photo of a dog", num_class_images=3, batch_size=2,
                                   steps=2, seed=seed, size=32)

    a = fill(tmp_path / "a")
    assert [p.name for p in a] == ["class-00000.png", "class-00001.png", "class-00002.png"]
    assert all(Image.open(p).size == (32, 32) for p in a)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()}
    assert fill(tmp_path / "a") == a
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()} == before  # nothing written
    b = fill(tmp_path / "b")
    c = fill(tmp_path / "c", seed=1)
    pixels = [[np.asarray(Image.open(p)) for p in run[1:]] for run in (a, b, c)]
    assert all(np.array_equal(x, y) for x, y in zip(pixels[0], pixels[1]))
    assert not np.array_equal(pixels[0][0], pixels[2][0])
    assert not np.array_equal(pixels[0][0], pixels[0][1])
    assert len(ensure_class_images(tiny_model_readonly, tmp_path / "new" / "dir", "dog", num_class_images=1,
                                   batch_size=2, steps=2, size=32)) == 1  # a missing folder is created
