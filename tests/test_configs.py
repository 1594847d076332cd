"""Every YAML in configs/ parses and its model builds (on the meta device: no weights, no network)."""
import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO
from ldm.util import ConfigError, count_params, instantiate_from_config

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_config_builds(path):
    config = OmegaConf.load(path)
    if "model" not in config:
        pytest.skip("not a model config")
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    assert count_params(model) > 0


def test_sd_v1_parameter_counts():
    with torch.device("meta"):
        model = instantiate_from_config(OmegaConf.load(REPO / "configs/stable-diffusion/v1-inference.yaml").model)
    assert count_params(model.model.diffusion_model) == 859_520_964
    assert count_params(model.first_stage_model) == 83_653_863
    assert count_params(model.cond_stage_model) == 123_060_480


@pytest.mark.parametrize("config,message", [
    ({"target": "ldm.nowhere.Model"}, "cannot import module 'ldm.nowhere'"),
    ({"target": "ldm.util.Nothing"}, "has no attribute 'Nothing'"),
    ({"target": "Model"}, "not a dotted path"),
    ({"params": {}}, "'target' key"),
])
def test_unknown_target_is_named(config, message):
    with pytest.raises(ConfigError, match=message):
        instantiate_from_config(config)
