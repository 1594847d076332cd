"""The tiny world: the synthetic scenes, the base-model training code, the shipped weights and the probe."""
import random

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from conftest import REPO, TINY_CONFIG
from ldm.data.synthetic import (PROBE_TEXTURES, SHAPES, SUBJECT, SyntheticScenes, caption, random_scene, render,
                                scene_rng, subject_scene, to_tensor, write_subject_images)
from ldm.checks import OutputPathError
from ldm.tinyworld.base import train_base
from ldm.tinyworld.metrics import prompt_attributes
from ldm.util import ConfigError, instantiate_from_config

def to01(img):
    return (to_tensor(img) + 1) / 2




# ---- the synthetic world -------------------------------------------------------------------------------------------
def test_scenes_are_deterministic_and_varied():
    a, b = SyntheticScenes(8, size=32, seed=5), SyntheticScenes(8, size=32, seed=5)
    assert torch.equal(a[3]["image"], b[3]["image"]) and a[3]["caption"] == b[3]["caption"]
    assert not torch.equal(a[3]["image"], a[4]["image"])
    assert not torch.equal(a[3]["image"], SyntheticScenes(8, size=32, seed=6)[3]["image"])
    x = a[0]["image"]
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1


def test_captions_name_the_shape_and_a_full_caption_names_everything():
    rng = random.Random(0)
    for i in range(200):
        scene = random_scene(scene_rng(1, i))
        assert scene.shape in caption(scene, rng).split()
        named = prompt_attributes(caption(scene, rng, full=True))
        expected = dict(shape=scene.shape, colour=scene.colour, size=scene.size, position=scene.position,
                        background=scene.background)
        if scene.texture != "plain":
            expected["texture"] = scene.texture
        assert named == expected, (caption(scene, rng, full=True), named)


def test_prompt_attributes_parses_demo_prompts():
    assert prompt_attributes("photo of a sks star") == {"shape": "star"}
    assert prompt_attributes("a large striped red heart on a blue background at the left") == dict(
        size="large", texture="striped", colour="red", shape="heart", background="blue", position="left")
    assert prompt_attributes("an orange circle on an orange background") == dict(colour="orange", shape="circle",
                                                                                background="orange")


def test_subject_look_is_never_in_the_base_world():
    base = [random_scene(scene_rng(2, i)) for i in range(500)]
    probe = [random_scene(scene_rng(2, i), world="probe") for i in range(500)]
    assert not any(s.texture == "checkered" or s.outline for s in base)
    assert {s.texture for s in probe} == set(PROBE_TEXTURES) and any(s.outline for s in probe)
    assert {s.shape for s in base} == set(SHAPES)
    subject = subject_scene(random.Random(0))
    assert (subject.shape, subject.texture, subject.outline, subject.size) == (SUBJECT.shape, "checkered", True, "large")


def test_render_and_subject_images(tmp_path):
    with pytest.raises(ValueError, match="unknown shape 'blob'"):
        render(SUBJECT.__class__(**{**SUBJECT.__dict__, "shape": "blob"}))
    with pytest.raises(ValueError, match="unknown world"):
        SyntheticScenes(world="mars")
    paths = write_subject_images(tmp_path, n=3, size=48, seed=1)
    assert [p.name for p in paths] == ["00.png", "01.png", "02.png"]
    from PIL import Image
    assert Image.open(paths[0]).size == (48, 48)


def test_shipped_instance_images_are_the_generator_s(tmp_path):
    shipped = sorted((REPO / "assets" / "tiny-world" / "sks-star").glob("*.png"))
    made = write_subject_images(tmp_path, n=5, size=64, seed=2024)  # how assets/tiny-world/sks-star was written
    assert [p.name for p in shipped] == [p.name for p in made]
    from PIL import Image
    import numpy as np
    for a, b in zip(shipped, made):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), a.name


# ---- training the base model ---------------------------------------------------------------------------------------
def _train_config(tmp_path, **stage_steps):
    return OmegaConf.create({
        "model_config": str(TINY_CONFIG), "out": str(tmp_path / "tiny.safetensors"), "work_dir": str(tmp_path / "w"),
        "seed": 0, "data": {"num_images": 16, "size": 32},
        "vae": {"world": "probe", "steps": stage_steps.get("vae", 2), "batch_size": 2, "lr": 1e-3, "kl_weight": 1e-6, "l2_weight": 1.0},
        "decoder": {"steps": 2, "batch_size": 2, "lr": 1e-3, "l2_weight": 1.0},
        "diffusion": {"steps": stage_steps.get("diffusion", 2), "batch_size": 4, "lr": 1e-3, "warmup_steps": 1,
                      "p_uncond": 0.5, "ema_decay": 0.5, "checkpoint_every": 1}})


def test_train_base_writes_a_loadable_sd_layout_file_and_resumes(tmp_path):
    config = _train_config(tmp_path)
    out = train_base(config, torch.device("cpu"))
    model = instantiate_from_config(OmegaConf.load(TINY_CONFIG).model)
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        assert keys == set(model.state_dict())
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
        assert f.get_tensor("alphas_cumprod").dtype == torch.float32
        scale = float(f.get_tensor("scale_factor"))
    assert scale != pytest.approx(0.18215) and 0.05 < scale < 20  # measured from the latents, not the config's
    model.init_from_ckpt(str(out))
    # stage 3 trained the decoder alone: it differs from stage 1's, the encoder does not
    vae = torch.load(tmp_path / "w" / "vae.pt", weights_only=True)["model"]
    decoder = torch.load(tmp_path / "w" / "decoder.pt", weights_only=True)["model"]
    assert not torch.equal(decoder["decoder.conv_out.weight"], vae["decoder.conv_out.weight"])
    assert torch.equal(model.first_stage_model.encoder.conv_in.weight, vae["encoder.conv_in.weight"].half().float())
    assert torch.equal(model.first_stage_model.decoder.conv_out.weight,
                       decoder["decoder.conv_out.weight"].half().float())
    # a longer run resumes from the stage checkpoints: the autoencoder is not retrained, diffusion goes on from step 2
    state = torch.load(tmp_path / "w" / "diffusion.pt", weights_only=True)
    assert state["step"] == 2
    longer = _train_config(tmp_path, diffusion=3)
    with pytest.raises(OutputPathError, match="out '.*tiny.safetensors' already exists"):  # never overwritten
        train_base(longer, torch.device("cpu"))
    longer.out = str(tmp_path / "longer.safetensors")
    train_base(longer, torch.device("cpu"))
    assert torch.load(tmp_path / "w" / "diffusion.pt", weights_only=True)["step"] == 3


def test_train_base_continues_from_init_keeping_the_latent_scale(tmp_path):
    first = train_base(_train_config(tmp_path / "a"), torch.device("cpu"))
    config = _train_config(tmp_path / "b", vae=0, diffusion=0)
    config.init, config.decoder, config.seed = str(first), None, 5  # another seed: a fresh start would differ
    second = train_base(config, torch.device("cpu"))
    with safe_open(str(first), "pt") as a, safe_open(str(second), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # zero steps: init, unchanged
    config.work_dir, config.diffusion.steps, config.out = str(tmp_path / "c"), 2, str(tmp_path / "c.safetensors")
    third = train_base(config, torch.device("cpu"))
    with safe_open(str(first), "pt") as a, safe_open(str(third), "pt") as c:
        assert torch.equal(a.get_tensor("scale_factor"), c.get_tensor("scale_factor"))  # the UNet's latent scale
        key = "model.diffusion_model.input_blocks.0.0.weight"
        assert not torch.equal(a.get_tensor(key), c.get_tensor(key))
    config.out = str(tmp_path / "fourth.safetensors")
    config.init = str(tmp_path / "nothing.safetensors")
    with pytest.raises(ConfigError, match="init: no base model file"):
        train_base(config, torch.device("cpu"))
    config.init = config.out = str(first)
    with pytest.raises(OutputPathError, match="is the input"):
        train_base(config, torch.device("cpu"))


@pytest.mark.parametrize("recipe", ["train-base.yaml", "train-base-continue.yaml"])
def test_training_recipes_run_as_written(recipe, tmp_path):
    """The shipped recipes, shrunk to one step per stage (the continuation starts from the shipped model)."""
    config = OmegaConf.load(REPO / "configs" / "tiny-world" / recipe)
    shrink = {"data.num_images": 4, "vae.steps": 1, "vae.batch_size": 2, "diffusion.steps": 1,
              "diffusion.batch_size": 2, "work_dir": str(tmp_path / "w"), "out": str(tmp_path / "m.safetensors")}
    if config.decoder:
        shrink.update({"decoder.steps": 1, "decoder.batch_size": 2})
    for key, value in shrink.items():
        OmegaConf.update(config, key, value)
    out = train_base(config, torch.device("cpu"))
    instantiate_from_config(OmegaConf.load(REPO / config.model_config).model).init_from_ckpt(str(out))


# ---- the probe (metric model) ---------------------------------------------------------------------------------------
def test_probe_reads_held_out_scenes():
    from ldm.tinyworld.probe import load_probe, probe_accuracy
    acc = probe_accuracy(load_probe(), num=200, seed=4242)  # measured on 1,000: shape 0.87, outline 0.95, rest >= 0.98
    assert acc["shape"] > 0.75 and acc["outline"] > 0.85
    assert min(acc[k] for k in ("colour", "texture", "size", "position", "background")) > 0.93


def test_tinyworld_backend_scores_right_prompts_above_wrong_ones():
    from ldm.evaluation.backends import get_backend
    from ldm.evaluation.metrics import subject_fidelity
    metric = get_backend("tinyworld")
    scenes = [random_scene(scene_rng(77, i)) for i in range(16)]
    images = torch.stack([(to01(render(s))) for s in scenes])
    rng = random.Random(0)
    right = [caption(s, rng, full=True) for s in scenes]
    wrong = [caption(t, rng, full=True) for t in scenes[1:] + scenes[:1]]
    assert metric.text_image_score(images, right).mean() > metric.text_image_score(images, wrong).mean() + 0.3
    assert subject_fidelity(metric, images[:1], images[:1]) == pytest.approx(1.0, abs=1e-5)
    subject = torch.stack([to01(render(subject_scene(random.Random(i)))) for i in range(8)])
    assert metric.subject_rate(subject) >= 0.75 and metric.subject_rate(images) <= 0.1
