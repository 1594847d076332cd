"""Shared fixtures: the tiny SD v1 config and model (built once, random weights made non-trivial)."""
import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tests" / "tiny-inference.yaml"


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


@pytest.fixture(scope="session")
def tiny_model_session():
    return build_tiny()


@pytest.fixture
def tiny_model(tiny_model_session):
    """A fresh copy of the tiny LatentDiffusion (random weights, eval mode) for each test."""
    return copy.deepcopy(tiny_model_session)
