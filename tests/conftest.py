"""Shared fixtures and helpers: the tiny SD v1 config and model (built once, random weights made non-trivial), a
folder tree's snapshot."""
import copy
import hashlib
import os
from pathlib import Path
from typing import Dict

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util.instantiate import instantiate_from_config

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tests" / "tiny-inference.yaml"
# The reference list of SD v1 checkpoint keys and shapes: shared/ beside or inside the repository
KEYS_TSV = next((p for p in (REPO / "shared" / "sd-v1-keys.tsv", REPO.parent / "shared" / "sd-v1-keys.tsv")
                 if p.exists()), REPO / "shared" / "sd-v1-keys.tsv")


def randomize_zero_layers(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give zero-initialised output layers random values so tests of the full network are not blind to them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def build_tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = instantiate_from_config(OmegaConf.load(TINY_CONFIG).model)
    return randomize_zero_layers(model, seed).eval()


def snapshot(*folders: Path) -> Dict[str, str]:
    """Path -> content hash of every file (and a marker for every folder and every other entry) under `folders`, empty
    lock files aside (an evaluation claims a run with its dedicated `.eval.lock`, whose content is never written): equal
    snapshots before and after a refused call show it changed, added and left nothing."""
    found = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for d in dirs:
                found[os.path.join(root, d)] = "dir"
            for f in files:
                p = os.path.join(root, f)
                if f.endswith(".lock") and os.path.isfile(p) and os.path.getsize(p) == 0:
                    continue
                found[p] = hashlib.sha256(Path(p).read_bytes()).hexdigest() if os.path.isfile(p) else "special"
    return found


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and lose ~10x when the two cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def diffusers_sample(model, sched, c, uc, scale=5.0, seed=3):
    """(x_T, x_0) of a diffusers scheduler's loop over our model with our guidance, for sampler equivalence tests."""
    from ldm.models.diffusion.guidance import guided_eps
    x_T = torch.randn(c.shape[0], 4, 4, 4, generator=torch.Generator().manual_seed(seed))
    x = x_T
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(guided_eps(model, x, t.repeat(c.shape[0]), c, uc, scale), t, x).prev_sample
    return x_T, x


@pytest.fixture(scope="session")
def tiny_model_session():
    return build_tiny()


@pytest.fixture
def tiny_model(tiny_model_session):
    """A fresh copy of the tiny LatentDiffusion (random weights, eval mode) for each test."""
    return copy.deepcopy(tiny_model_session)


@pytest.fixture(scope="session")
def tiny_dino(tmp_path_factory):
    """A random-weight DINO-style ViT (transformers' format, DINO's layer-norm eps), saved once per session."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("dino")
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                                    image_size=32, patch_size=8, layer_norm_eps=1e-6)
    transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A random-weight CLIP (transformers' format), saved once per session."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    config = transformers.CLIPConfig(text_config=small, vision_config={**small, "image_size": 32, "patch_size": 8},
                                     projection_dim=16)
    transformers.CLIPModel(config).save_pretrained(path)
    return path
