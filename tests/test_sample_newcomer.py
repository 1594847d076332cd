"""sample.py as a newcomer drives it: the config comes with the checkpoint (beside it, named in its metadata, a
diffusers folder's own configs), images have the model's size, weights that do not fit name the config they fit,
and an original-format adapter directory takes its adapter config from --adapter_config."""
import shutil

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file

import sample
from conftest import REPO, TINY_CONFIG
from ldm.config import config_from_diffusers_folder, find_config, load_configs
from ldm.util.instantiate import instantiate_from_config
from test_adapters import adapter_cfg, with_adapters, write_original_dir

TINY_CKPT = REPO / "models" / "ldm" / "tiny-sd-v1" / "model.safetensors"
WORLD_CONFIG = REPO / "configs" / "tiny-world" / "tiny-sd-v1.yaml"
FAST = ["--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", "--skip_grid", "--prompt", "a photo of a red star"]


def pixels(paths):
    return [np.asarray(Image.open(p)) for p in paths]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny model's sample with its config given explicitly."""
    out = tmp_path_factory.mktemp("ref")
    return pixels(sample.main(["--ckpt", str(TINY_CKPT), "--config", str(WORLD_CONFIG), "--outdir", str(out)] + FAST))


@pytest.mark.slow
def test_the_tiny_model_needs_only_its_checkpoint(reference, tmp_path):
    """The README's first command: the config named in the file's metadata, 64x64 images (its own size)."""
    assert find_config(str(TINY_CKPT))[1].startswith(f"'{WORLD_CONFIG.relative_to(REPO)}'")
    found = pixels(sample.main(["--ckpt", str(TINY_CKPT), "--outdir", str(tmp_path)] + FAST))
    assert found[0].shape == (64, 64, 3) and np.array_equal(found[0], reference[0])


@pytest.mark.slow
@pytest.mark.parametrize("beside", ["model.yaml", "config.yaml"])
def test_a_config_beside_the_checkpoint_is_used(reference, tmp_path, beside):
    ckpt = tmp_path / "model.safetensors"
    save_file(load_file(TINY_CKPT), ckpt)  # no metadata: only the file beside it can say
    assert find_config(str(ckpt))[1].startswith("SD v1's")
    shutil.copy(WORLD_CONFIG, tmp_path / beside)
    assert find_config(str(ckpt))[1] == f"'{tmp_path / beside}' (found for '{ckpt}')"
    found = pixels(sample.main(["--ckpt", str(ckpt), "--outdir", str(tmp_path / "out")] + FAST))
    assert np.array_equal(found[0], reference[0])


@pytest.mark.slow
def test_weights_that_do_not_fit_name_the_config_they_fit(tmp_path):
    ckpt = tmp_path / "model.safetensors"
    save_file(load_file(TINY_CKPT), ckpt)  # no config anywhere: SD v1's is tried, and does not fit
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(ckpt), "--outdir", str(tmp_path / "out")] + FAST)
    message = str(e.value.code)
    assert message.startswith(f"error: checkpoint '{ckpt}' does not match the model: ")
    assert message.endswith("Pass --config configs/tiny-world/tiny-sd-v1.yaml (these weights fit it)")
    assert "\n" not in message and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_diffusers_folder_brings_its_own_config(reference, tmp_path):
    from scripts import export_diffusers
    folder = tmp_path / "tiny-diffusers"
    export_diffusers.main(["--config", str(WORLD_CONFIG), "--ckpt", str(TINY_CKPT), "--outdir", str(folder)])
    derived, ours = config_from_diffusers_folder(folder), load_configs([WORLD_CONFIG])
    built = [instantiate_from_config(c.model) for c in (derived, ours)]
    shapes = [{k: v.shape for k, v in m.state_dict().items()} for m in built]
    assert shapes[0] == shapes[1]
    assert built[0].pixel_size == built[1].pixel_size == 64
    found = pixels(sample.main(["--ckpt", str(folder), "--outdir", str(tmp_path / "out")] + FAST))
    assert np.array_equal(found[0], reference[0])


@pytest.mark.slow
def test_adapter_config_builds_an_original_format_directory(tmp_path):
    config = OmegaConf.load(WORLD_CONFIG)
    unet = instantiate_from_config(config.model.params.unet_config)  # the adapters' shapes: the tiny model's UNet
    write_original_dir(with_adapters(unet, adapter_cfg("attn2o", "ffni", init="default")), tmp_path / "orig")
    config.model.params.unet_config.params.adapter_config = adapter_cfg("attn2o", "ffni")
    OmegaConf.save(config, tmp_path / "tiny-attn2o-ffni.yaml")
    (tmp_path / "adapter_config.yaml").write_text(OmegaConf.to_yaml({"adapter_config": adapter_cfg("attn2o",
                                                                                                   "ffni")}))
    small = ["--ckpt", str(TINY_CKPT)] + FAST
    run = small + ["--adapter_path", str(tmp_path / "orig")]
    with pytest.raises(SystemExit, match="carries no adapter config"):
        sample.main(run + ["--outdir", str(tmp_path / "none")])
    by_config = pixels(sample.main(run + ["--config", str(tmp_path / "tiny-attn2o-ffni.yaml"), "--outdir",
                                          str(tmp_path / "c")]))
    plain = pixels(sample.main(small + ["--outdir", str(tmp_path / "p")]))
    for given in (tmp_path / "tiny-attn2o-ffni.yaml", tmp_path / "adapter_config.yaml"):  # a model config or ours
        found = pixels(sample.main(run + ["--adapter_config", str(given), "--outdir", str(tmp_path / given.stem)]))
        assert np.array_equal(found[0], by_config[0])
    assert not np.array_equal(plain[0], by_config[0])  # the adapters were applied
