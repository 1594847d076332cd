"""The tiny world: procedurally drawn, captioned scenes (one shape on a background), deterministic from a seed.

A scene is a shape (8 kinds) with a colour, a fill texture, a size, a position and a rotation, on a coloured
background (plain, gradient or grainy). Captions describe a random subset of the attributes, so the class prompt
"photo of a star" stands for stars of any colour, size and place: the prior DreamBooth must preserve.
The base world never draws the `checkered` fill or an `outline`; the demo subject (`SUBJECT`) has both, so a
base model has never seen it. The probe world (`world="probe"`) draws them too, for the metric models. The close-up
world (`world="closeup"`, the v3 tiny model's) is the base world with every object large and centred, as DreamBooth's
subject photos are: its captions never name a size or a place.
"""
import math
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "hexagon")
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (40, 170, 60),
    "blue": (40, 80, 220), "purple": (140, 50, 190), "pink": (245, 130, 190), "white": (245, 245, 245),
    "black": (25, 25, 25), "gray": (130, 130, 130),
}
TEXTURES = ("plain", "striped", "spotted")
PROBE_TEXTURES = TEXTURES + ("checkered",)
SIZES = {"small": 0.2, "large": 0.34}  # circumradius as a fraction of the image side
POSITIONS = {"center": (0.5, 0.5), "left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3), "bottom": (0.5, 0.7)}
BACKGROUNDS = ("plain", "gradient", "grainy")
PREFIXES = ("", "a photo of ", "photo of ", "an image of ", "a picture of ")
SUPERSAMPLE = 4
WORLDS = ("base", "probe", "closeup")
FIXED_PLACE = {"closeup"}  # worlds whose objects are all large and centred (captions name neither)


def check_world(world: str, allowed: Sequence[str] = WORLDS) -> None:
    if world not in allowed:
        raise ValueError(f"unknown world '{world}': expected one of {', '.join(allowed)}")


@dataclass(frozen=True)
class Scene:
    """Everything that decides one image (the caption picks which parts it mentions)."""
    shape: str
    colour: str
    texture: str
    size: str
    position: str
    background: str
    bg_style: str
    rotation: float = 0.0
    jitter: Tuple[float, float] = (0.0, 0.0)
    second_colour: Optional[str] = None  # checkered fill
    outline: bool = False
    grain_seed: int = 0


# The demo subject: a star with an orange-and-blue checkered fill and a black outline (never in the base world).
SUBJECT = Scene(shape="star", colour="orange", texture="checkered", size="large", position="center",
                background="white", bg_style="plain", second_colour="blue", outline=True)
SUBJECT_CLASS = "star"


@dataclass(frozen=True)
class Subject:
    """A tiny-world DreamBooth subject: a look no world the base models learn ever draws (a checkered fill or an
    outline), its class word, and `look`: what the probe must read in an image for it to show the subject."""
    name: str
    scene: Scene
    class_word: str
    look: Tuple[Tuple[str, str], ...]
    seed: int  # of its instance images (write_subject_images)


# Subjects for studies that need more than one (shape, fill, outline and colours all vary between them). Each has an
# assets/tiny-world/<name>/ folder of 5 instance images; "sks-star" is the demo's.
SUBJECTS: Dict[str, Subject] = {s.name: s for s in (
    Subject("sks-star", SUBJECT, "star", (("texture", "checkered"), ("outline", "yes")), 2024),
    Subject("spotted-heart", replace(SUBJECT, shape="heart", colour="purple", texture="spotted", second_colour=None),
            "heart", (("colour", "purple"), ("texture", "spotted"), ("outline", "yes")), 2025),
    Subject("checkered-cross", replace(SUBJECT, shape="cross", colour="yellow", second_colour="black", outline=False),
            "cross", (("colour", "yellow"), ("texture", "checkered"), ("outline", "no")), 2026),
    Subject("striped-hexagon", replace(SUBJECT, shape="hexagon", colour="green", texture="striped",
                                       second_colour=None), "hexagon",
            (("colour", "green"), ("texture", "striped"), ("outline", "yes")), 2027),
)}



def random_scene(rng: random.Random, world: str = "base") -> Scene:
    """A scene drawn uniformly over the attributes of `world` ("base": what the v1/v2 base models see; "probe": more;
    "closeup": the base world's scenes made large and centred, drawn with the same random numbers)."""
    check_world(world)
    colour = rng.choice(list(COLOURS))
    background = rng.choice([c for c in COLOURS if c != colour])
    texture = rng.choice(PROBE_TEXTURES if world == "probe" else TEXTURES)
    second = rng.choice([c for c in COLOURS if c not in (colour, background)]) if texture == "checkered" else None
    scene = Scene(shape=rng.choice(SHAPES), colour=colour, texture=texture, size=rng.choice(list(SIZES)),
                  position=rng.choice(list(POSITIONS)), background=background, bg_style=rng.choice(BACKGROUNDS),
                  rotation=rng.uniform(-0.3, 0.3), jitter=(rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)),
                  second_colour=second, outline=world == "probe" and rng.random() < 0.3,
                  grain_seed=rng.randrange(2 ** 31))
    return replace(scene, size="large", position="center") if world in FIXED_PLACE else scene


def subject_scene(rng: random.Random, subject: Scene = SUBJECT) -> Scene:
    """A subject (the demo's by default) in a random setting, large and centred (instance images and held-out
    references are close-ups, as DreamBooth's are): background, its style, a small rotation and offset vary."""
    hidden = (subject.colour, subject.second_colour) + (("black",) if subject.outline else ())  # an outline on black
    background = rng.choice([c for c in COLOURS if c not in hidden])                             # is not there
    rng.choice(list(POSITIONS))  # drawn and not used (v1/v2 placed subjects anywhere): later draws keep their values
    return replace(subject, size="large", position="center",
                   background=background, bg_style=rng.choice(BACKGROUNDS), rotation=rng.uniform(-0.3, 0.3),
                   jitter=(rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)), grain_seed=rng.randrange(2 ** 31))


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, rng: random.Random, full: bool = False, world: str = "base") -> str:
    """A caption naming the shape and a random subset of the rest ("a photo of a small red star on the left"); in a
    world of large, centred objects ("closeup") never the size or the place."""
    keep = (lambda p: True) if full else (lambda p: rng.random() < p)
    place = world not in FIXED_PLACE
    words = [scene.size] if keep(0.4) and place else []
    if scene.texture != "plain" and scene.texture != "checkered" and keep(0.7):
        words.append(scene.texture)
    if keep(0.8):
        words.append(scene.colour)
    words.append(scene.shape)
    prefix = "" if full else rng.choice(PREFIXES)
    text = f"{prefix}{article(words[0])} {' '.join(words)}"
    if keep(0.6):
        text += f" on {article(scene.background)} {scene.background} background"
    if keep(0.4) and place:
        text += " in the center" if scene.position == "center" else f" at the {scene.position}"
    return text


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> List[Tuple[float, float]]:
    """Vertices of `shape` (circle and heart as fine polygons) centred at (cx, cy) with circumradius r."""
    def ring(n: int, radii: Sequence[float], start: float) -> List[Tuple[float, float]]:
        return [(cx + r * radii[k % len(radii)] * math.cos(start + rot + 2 * math.pi * k / n),
                 cy + r * radii[k % len(radii)] * math.sin(start + rot + 2 * math.pi * k / n)) for k in range(n)]
    if shape == "circle":
        return ring(64, [0.85], 0.0)
    if shape == "square":
        return ring(4, [0.9], math.pi / 4)
    if shape == "triangle":
        return ring(3, [1.0], -math.pi / 2)
    if shape == "star":
        return ring(10, [1.0, 0.45], -math.pi / 2)
    if shape == "diamond":
        return ring(4, [1.0, 0.7], -math.pi / 2)
    if shape == "hexagon":
        return ring(6, [0.95], 0.0)
    if shape == "cross":
        a, b = 0.9, 0.3
        pts = [(b, a), (b, b), (a, b), (a, -b), (b, -b), (b, -a), (-b, -a), (-b, -b), (-a, -b), (-a, b), (-b, b),
               (-b, a)]
    elif shape == "heart":
        pts = [(16 * math.sin(t) ** 3 / 17, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t)
                                               - math.cos(4 * t)) / 17) for t in np.linspace(0, 2 * math.pi, 64)]
    else:
        raise ValueError(f"unknown shape '{shape}': expected one of {', '.join(SHAPES)}")
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _background(scene: Scene, n: int) -> np.ndarray:
    """(n, n, 3) float background: flat, a vertical gradient to a darker shade, or flat with grain."""
    base = np.array(COLOURS[scene.background], dtype=np.float32)
    img = np.broadcast_to(base, (n, n, 3)).copy()
    if scene.bg_style == "gradient":
        img *= np.linspace(1.0, 0.6, n, dtype=np.float32)[:, None, None]
    elif scene.bg_style == "grainy":
        img += np.random.default_rng(scene.grain_seed).normal(0, 18, (n, n, 1)).astype(np.float32)
    return img


def _fill(scene: Scene, n: int, r: float) -> np.ndarray:
    """(n, n, 3) float fill of the shape: flat colour, stripes, spots or a checkerboard in the second colour."""
    fg = np.array(COLOURS[scene.colour], dtype=np.float32)
    img = np.broadcast_to(fg, (n, n, 3)).copy()
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    period = max(r / 2.2, 2.0)
    if scene.texture == "striped":
        mask = ((xx + yy) / period) % 2 < 1
        img[mask] *= 0.55
    elif scene.texture == "spotted":
        mask = ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) < (period / 4) ** 2
        img[mask] = 255 - img[mask] * 0.5
    elif scene.texture == "checkered":
        mask = ((xx // period + yy // period) % 2) == 1
        img[mask] = np.array(COLOURS[scene.second_colour or "white"], dtype=np.float32)
    return img


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw `scene` at 4x and downsample (antialiasing), giving a size x size RGB image."""
    n = size * SUPERSAMPLE
    px, py = POSITIONS[scene.position]
    cx, cy = (px + scene.jitter[0]) * n, (py + scene.jitter[1]) * n
    r = SIZES[scene.size] * n
    pts = _polygon(scene.shape, cx, cy, r, scene.rotation)
    mask = Image.new("L", (n, n), 0)
    ImageDraw.Draw(mask).polygon(pts, fill=255)
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255
    img = _background(scene, n) * (1 - alpha) + _fill(scene, n, r) * alpha
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if scene.outline:
        ImageDraw.Draw(out).line(pts + pts[:1], fill=(10, 10, 10), width=max(n // 40, 1), joint="curve")
    return out.resize((size, size), Image.Resampling.LANCZOS)


def scene_rng(seed: int, index: int) -> random.Random:
    """The generator of item `index` of a world seeded with `seed` (independent of order and workers)."""
    return random.Random(seed * 1_000_003 + index)


def render_uint8(scene: Scene, size: int = 64) -> torch.Tensor:
    """`render` as a (3, size, size) uint8 tensor (how datasets of many scenes are kept in memory)."""
    return torch.from_numpy(np.array(render(scene, size))).permute(2, 0, 1)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


class SyntheticScenes(torch.utils.data.Dataset):
    """`length` captioned scenes of the tiny world, item i always the same for a seed: {"image", "caption", "scene"}.

    `world="base"` is what the tiny base model trains on; `"probe"` adds the checkered fill and outlines (metric
    models); `"subject"` draws the demo subject in random settings with "sks star"-style captions left to the caller.
    """

    def __init__(self, length: int = 10000, size: int = 64, seed: int = 0, world: str = "base"):
        check_world(world, WORLDS + ("subject",))
        self.length, self.size, self.seed, self.world = length, size, seed, world

    def __len__(self) -> int:
        return self.length

    def scene(self, i: int) -> Tuple[Scene, random.Random]:
        rng = scene_rng(self.seed, i)
        return (subject_scene(rng) if self.world == "subject" else random_scene(rng, self.world)), rng

    def __getitem__(self, i: int) -> Dict[str, Union[torch.Tensor, str, Dict]]:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} scenes")
        scene, rng = self.scene(i)
        return {"image": to_tensor(render(scene, self.size)), "caption": caption(scene, rng, world=self.world),
                "scene": asdict(scene)}


def write_subject_images(folder: Union[str, Path], n: int = 5, size: int = 64, seed: int = 0,
                         subject: Scene = SUBJECT) -> List[Path]:
    """Write n instance images of a subject (the demo's by default) as PNGs (the assets/ folders are made this way:
    `SUBJECTS[name]`'s scene and seed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i:02d}.png"
        render(subject_scene(scene_rng(seed, i), subject), size).save(path)
        paths.append(path)
    return paths
