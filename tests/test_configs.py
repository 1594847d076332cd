"""Every YAML in configs/ parses and its model builds (on the meta device: no weights, no network); `make test-fast`
builds one of each folder."""
import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, covering
from ldm.checks import ConfigError
from ldm.util.instantiate import count_params, instantiate_from_config

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
# Fragments (no UNet of their own) are tested merged after these, as --base would merge them.
FRAGMENT_BASES = {"tests": ["configs/tests/tiny-inference.yaml", "configs/stable-diffusion/v1-finetune-dreambooth.yaml"],
                  "tiny-world": ["configs/tiny-world/tiny-sd-v1.yaml",
                                 "configs/stable-diffusion/v1-finetune-dreambooth.yaml"],
                  "": ["configs/sd-inject-dreambooth/attn2o-ffni.yaml"]}


def merged(path):
    config = OmegaConf.load(path)
    if OmegaConf.select(config, "model.params.unet_config.target") is not None or "model" not in config:
        return config  # a whole model config, or not a model config at all (e.g. a training recipe)
    bases = FRAGMENT_BASES.get(path.parent.name, FRAGMENT_BASES[""])
    return OmegaConf.merge(*[OmegaConf.load(REPO / b) for b in bases if REPO / b != path], config)


# make test-fast: one of each folder (the generated sd-inject-dreambooth ones are also compared with their generator)
@pytest.mark.parametrize("path", covering(CONFIGS, lambda p: p.parent.name),
                         ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_config_builds(path):
    config = merged(path)
    if "model" not in config:
        pytest.skip("not a model config")
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    assert count_params(model) > 0
    if "data" in config:  # datasets are built lazily, so this needs no image folder
        assert instantiate_from_config(config.data).configs["instance"].target
    for callback in OmegaConf.select(config, "lightning.callbacks", default={}).values():
        assert instantiate_from_config(callback) is not None


@pytest.mark.slow
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
