"""The tiny world's own feature extractor: a small CNN that reads every attribute of a scene.

It plays the parts DINO and CLIP play in the DreamBooth metrics (Ruiz et al. 2023): its penultimate features give
subject fidelity (cosine similarity to the instance images, like DINO / CLIP-I), and its attribute heads check a
prompt's words against an image (like CLIP-T). It trains on the probe world, which also draws the checkered fill and
outlines the base model never sees, with blur and noise so that it reads generated images as well as drawn ones.
"""
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ldm.checkpoint import load_into, load_state_dict, save_state_dict
from ldm.checks import check_number, check_output
from ldm.data.synthetic import (COLOURS, POSITIONS, PROBE_TEXTURES, SHAPES, SIZES, Scene, random_scene,
                                render_uint8, scene_rng)

# attribute -> its values, in head order
ATTRIBUTES: Dict[str, Tuple[str, ...]] = {
    "shape": SHAPES, "colour": tuple(COLOURS), "texture": PROBE_TEXTURES, "size": tuple(SIZES),
    "position": tuple(POSITIONS), "background": tuple(COLOURS), "outline": ("no", "yes"),
}
DEFAULT_PROBE = Path(__file__).resolve().parents[2] / "models" / "tiny-world" / "probe.safetensors"


def labels(scene: Scene) -> Dict[str, int]:
    """The class index of each attribute of a scene."""
    values = {**{k: getattr(scene, k) for k in ATTRIBUTES if k != "outline"}, "outline": "yes" if scene.outline else "no"}
    return {k: ATTRIBUTES[k].index(v) for k, v in values.items()}


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU())


class TinyWorldProbe(nn.Module):
    """64x64 image in [-1, 1] -> 256-d features and one logit vector per attribute."""

    def __init__(self, width: int = 32, features: int = 256):
        super().__init__()
        self.body = nn.Sequential(_block(3, width), _block(width, 2 * width), _block(2 * width, 4 * width),
                                  _block(4 * width, 4 * width))  # (b, 4w, 4, 4)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 16, features), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(features, len(v)) for k, v in ATTRIBUTES.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True) if x.shape[-1] != 64 else x
        return self.embed(self.body(x))  # (b, features)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        f = self.features(x)
        return f, {k: head(f) for k, head in self.heads.items()}


def degrade(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random blur and noise, so the probe also reads the softer images a diffusion model draws."""
    sigma = float(torch.rand((), generator=g)) * 1.5
    if sigma > 0.3:
        k = torch.arange(-3, 4, dtype=torch.float32)
        w = torch.exp(-k ** 2 / (2 * sigma ** 2))
        w = (w / w.sum()).to(x)
        x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), w.view(1, 1, 1, 7).expand(3, 1, 1, 7), groups=3)
        x = F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), w.view(1, 1, 7, 1).expand(3, 1, 7, 1), groups=3)
    return x + torch.randn(x.shape, generator=g).to(x) * float(torch.rand((), generator=g)) * 0.1


def probe_data(num: int, seed: int, size: int = 64) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """`num` probe-world images (uint8) and their attribute labels."""
    images = torch.empty(num, 3, size, size, dtype=torch.uint8)
    ys: Dict[str, List[int]] = {k: [] for k in ATTRIBUTES}
    for i in tqdm(range(num), desc="render probe scenes", mininterval=2):
        scene = random_scene(scene_rng(seed, i), world="probe")
        images[i] = render_uint8(scene, size)
        for k, v in labels(scene).items():
            ys[k].append(v)
    return images, {k: torch.tensor(v) for k, v in ys.items()}


def train_probe(num_images: int = 8000, steps: int = 1500, batch_size: int = 64, lr: float = 2e-3,
                seed: int = 1) -> TinyWorldProbe:
    """Train the probe from scratch (a few minutes on a CPU core)."""
    for value, what, low in ((num_images, "num_images", 1), (steps, "steps", 1), (batch_size, "batch_size", 1),
                             (seed, "seed", 0)):
        check_number(value, what, low, integer=True)
    check_number(lr, "lr", 0, low_open=True)
    torch.manual_seed(seed)
    images, ys = probe_data(num_images, seed)
    probe = TinyWorldProbe()
    opt = torch.optim.AdamW(probe.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="train probe")
    for _ in bar:
        idx = torch.randint(num_images, (batch_size,), generator=g)
        _, logits = probe(degrade(images[idx].float() / 127.5 - 1, g))
        loss = sum(F.cross_entropy(logits[k], ys[k][idx]) for k in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return probe.eval()


@torch.no_grad()
def probe_accuracy(probe: TinyWorldProbe, num: int = 1000, seed: int = 12345) -> Dict[str, float]:
    """Per-attribute accuracy on held-out probe-world scenes (a different seed from training)."""
    images, ys = probe_data(num, seed)
    _, logits = probe(images.float() / 127.5 - 1)
    return {k: float((logits[k].argmax(-1) == ys[k]).float().mean()) for k in ATTRIBUTES}


def save_probe(probe: TinyWorldProbe, path: Path = DEFAULT_PROBE) -> None:
    """Write the probe's weights to a .safetensors file that does not exist yet (the shipped one is never replaced
    by accident)."""
    check_output(path, "probe weights", suffixes=(".safetensors",))
    save_state_dict(probe.state_dict(), str(path), metadata={"format": "pt", "model": "TinyWorldProbe"})


def load_probe(path: Path = DEFAULT_PROBE) -> TinyWorldProbe:
    """The shipped probe (models/tiny-world/probe.safetensors), in eval mode."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"tiny-world probe weights '{path}' not found: they ship in the repository "
                                f"(models/tiny-world/); retrain them with `python scripts/train_tiny_probe.py`")
    probe = TinyWorldProbe()
    load_into(probe, load_state_dict(str(path)), source=f"probe '{path}'")
    return probe.eval()
