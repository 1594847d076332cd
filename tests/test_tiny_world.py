"""The tiny world: the synthetic scenes, the base-model training code, the shipped weights and the probe."""
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from conftest import KEYS_TSV, REPO, TINY_CONFIG
from ldm.data.synthetic import (PROBE_TEXTURES, SHAPES, SUBJECT, SUBJECTS, SyntheticScenes, caption, random_scene, render,
                                render_uint8, scene_rng, subject_scene, to_tensor, write_subject_images)
from ldm.checks import ConfigError, OutputPathError
from ldm.tinyworld.base import diffusion_loss, min_snr_weights, render_images, train_base, update_ema
from ldm.tinyworld.base_config import check_base_config
from ldm.tinyworld.metrics import prompt_attributes
from ldm.util.instantiate import instantiate_from_config

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


def test_closeup_world_is_the_base_world_large_and_centred():
    """The v3 world: the same random numbers draw the same shapes, colours, fills and backgrounds as the base world,
    every object large and centred; captions never name a size or a place (a full one names everything else)."""
    rng = random.Random(0)
    for i in range(200):
        base, closeup = random_scene(scene_rng(3, i)), random_scene(scene_rng(3, i), "closeup")
        assert closeup == base.__class__(**{**base.__dict__, "size": "large", "position": "center"})
        named = prompt_attributes(caption(closeup, rng, full=True, world="closeup"))
        expected = dict(shape=base.shape, colour=base.colour, background=base.background)
        if base.texture != "plain":
            expected["texture"] = base.texture
        assert named == expected
        assert not {"size", "position"} & set(prompt_attributes(caption(closeup, rng, world="closeup")))
    assert SyntheticScenes(4, 32, seed=1, world="closeup")[2]["scene"]["position"] == "center"


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


@pytest.mark.parametrize("name", list(SUBJECTS))
def test_shipped_instance_images_are_the_generator_s(tmp_path, name):
    subject = SUBJECTS[name]
    shipped = sorted((REPO / "assets" / "tiny-world" / name).glob("*.png"))
    made = write_subject_images(tmp_path, n=5, size=64, seed=subject.seed, subject=subject.scene)  # how it was made
    assert [p.name for p in shipped] == [p.name for p in made]
    from PIL import Image
    import numpy as np
    for a, b in zip(shipped, made):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), a.name


@pytest.mark.slow
def test_subjects_differ_and_their_looks_are_never_drawn_by_the_base_worlds():
    """Four subjects (shape, fill, outline and colours vary); the probe reads each one's look in unseen images of it and
    not in scenes of the worlds the base models learn."""
    from ldm.tinyworld.metrics import TinyWorldMetric
    metric = TinyWorldMetric()
    assert len({(s.scene.shape, s.scene.texture, s.scene.outline, s.scene.colour) for s in SUBJECTS.values()}) == 4
    assert len({s.class_word for s in SUBJECTS.values()}) == 4
    world = torch.stack([to01(render(random_scene(scene_rng(8, i), w))) for i in range(60) for w in ("base", "closeup")])
    for subject in SUBJECTS.values():
        assert subject.scene.texture == "checkered" or subject.scene.outline  # what the base world never draws
        assert subject.class_word == subject.scene.shape
        images = torch.stack([to01(render(subject_scene(scene_rng(7, i), subject.scene))) for i in range(24)])
        assert metric.subject_rate(images, dict(subject.look)) >= 0.95, subject.name
        assert metric.subject_rate(world, dict(subject.look)) <= 0.02, subject.name


# ---- training the base model ---------------------------------------------------------------------------------------
def test_autoencoder_without_mid_attention_has_no_such_weights():
    from ldm.modules.diffusionmodules.model import Decoder, Encoder
    dd = dict(ch=32, out_ch=3, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], in_channels=3, resolution=32,
              z_channels=4)
    for cls in (Encoder, Decoder):
        plain, none = cls(**dd), cls(**dd, attn_type="none")
        assert {k for k in plain.state_dict() if "attn_1" in k} and not any("attn_1" in k for k in none.state_dict())
        assert set(none.state_dict()) < set(plain.state_dict())
    with pytest.raises(ValueError, match="attn_type must be one of vanilla, none, got 'linear'"):
        Encoder(**dd, attn_type="linear")


def test_random_crops_are_windows_of_the_images():
    from ldm.tinyworld.base import random_crops
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16)
    crops, offsets = random_crops(x, 8, torch.Generator().manual_seed(0), align=4)
    assert crops.shape == (2, 3, 8, 8) and offsets.max() <= 2
    for img, crop, (y, x0) in zip(x, crops, (offsets * 4).tolist()):
        assert torch.equal(crop, img[:, y:y + 8, x0:x0 + 8])
    same, zero = random_crops(x, None, torch.Generator())
    assert same is x and not zero.any()


def _v3_config(tmp_path, **steps):
    """The v3 recipe's features at toy size: an f = 4 autoencoder without mid attention trained on crops, the
    close-up world."""
    config = _train_config(tmp_path, **steps)
    config.model_config = str(REPO / "configs" / "tiny-world" / "tiny-sd-v1-f4.yaml")
    config.data = {"num_images": 8, "size": 32, "world": "closeup"}
    config.vae.crop, config.vae.steps = 16, steps.get("vae", 3)
    return config


@pytest.mark.slow
def test_a_killed_or_paused_run_continues_as_an_uninterrupted_one(tmp_path):
    """Stopped by the sitting's clock after each save (stop_after ~ 0), restarted until done: the same weights as one
    uninterrupted run, bit for bit (the generators are saved with the weights)."""
    from ldm.tinyworld.base import Paused
    whole = train_base(_v3_config(tmp_path / "a", diffusion=3), torch.device("cpu"))
    config = _v3_config(tmp_path / "b", diffusion=3)
    config.checkpoint_minutes = 1e-9  # save after every step
    pauses = 0
    while True:
        try:
            pieces = train_base(config, torch.device("cpu"), stop_after=1e-9)
            break
        except Paused as e:
            assert "run the same command again to continue" in str(e)
            pauses += 1
            assert pauses < 20
    assert pauses == 2 + 1 + 2  # vae steps 1, 2 of 3; decoder 1 of 2; diffusion 1, 2 of 3
    with safe_open(str(whole), "pt") as a, safe_open(str(pieces), "pt") as b:
        assert a.metadata() == b.metadata() == {"format": "pt", "config": config.model_config, "world": "closeup"}
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    assert sorted(p.name for p in (tmp_path / "b" / "w").glob("images-*")) == [
        "images-closeup-seed0-8x32px.pt", "images-probe-seed1-8x32px.pt"]
    assert (tmp_path / "b" / "w" / "moments-probe-4.pt").is_file()  # stage 3 draws at most 2 steps x 2 images


@pytest.mark.slow
def test_the_autoencoder_product_starts_a_later_run(tmp_path):
    """Stages 1-3 leave autoencoder.safetensors (autoencoder + latent scale, fp16); init from it trains the UNet and
    text encoder on the same latents without training the autoencoder again."""
    first = train_base(_v3_config(tmp_path / "a"), torch.device("cpu"))
    product = tmp_path / "a" / "w" / "autoencoder.safetensors"
    with safe_open(str(product), "pt") as f, safe_open(str(first), "pt") as whole:
        assert {k for k in f.keys() if k != "scale_factor"} == {k for k in whole.keys() if k.startswith("first_stage")}
        assert all(torch.equal(f.get_tensor(k), whole.get_tensor(k)) for k in f.keys())
    config = _v3_config(tmp_path / "b", vae=0)
    config.init, config.decoder, config.seed = [str(product)], None, 9
    second = train_base(config, torch.device("cpu"))
    with safe_open(str(first), "pt") as a, safe_open(str(second), "pt") as b:
        for key in a.keys():
            same = torch.equal(a.get_tensor(key), b.get_tensor(key))
            if key.startswith("first_stage_model.") or key == "scale_factor":
                assert same, key  # the autoencoder and the latent scale come from the product
            elif key.startswith(("model.", "cond_stage_model.")) and a.get_tensor(key).dim() >= 2:
                assert not same, key  # the UNet and text encoder start afresh (another seed) and train


@pytest.mark.parametrize("key,value,message", [
    ("vae.crop", 12, "vae.crop must be a multiple of 8 and at most data.size"),
    ("vae.crop", 64, "vae.crop must be a multiple of 8 and at most data.size \\(32\\)"),
    ("decoder.crop", 0, "decoder.crop must be"),
    ("checkpoint_minutes", 0, "checkpoint_minutes must be a finite number > 0"),
    ("data.world", "mars", "data.world must be one of base, closeup"),
    ("init", [3], "init must be a base model file or a list of them"),
    ("diffusion.offset_noise", 1.5, "diffusion.offset_noise must be"),
    ("diffusion.offset_noise", float("nan"), "diffusion.offset_noise must be"),
    ("diffusion.ema_warmup", "yes", "diffusion.ema_warmup must be one of True, False, got 'yes'"),
    ("diffusion.ema_warmup", 1, "diffusion.ema_warmup must be one of True, False, got 1"),
])
def test_v3_training_keys_are_checked(tmp_path, key, value, message):
    config = _v3_config(tmp_path)
    check_base_config(config)
    OmegaConf.update(config, key, value, force_add=True)
    with pytest.raises(ConfigError, match=message):
        check_base_config(config)


def _train_config(tmp_path, **stage_steps):
    return OmegaConf.create({
        "model_config": str(TINY_CONFIG), "out": str(tmp_path / "tiny.safetensors"), "work_dir": str(tmp_path / "w"),
        "seed": 0, "data": {"num_images": 16, "size": 32},
        "vae": {"world": "probe", "steps": stage_steps.get("vae", 2), "batch_size": 2, "lr": 1e-3, "kl_weight": 1e-6, "l2_weight": 1.0},
        "decoder": {"steps": 2, "batch_size": 2, "lr": 1e-3, "l2_weight": 1.0},
        "diffusion": {"steps": stage_steps.get("diffusion", 2), "batch_size": 4, "lr": 1e-3, "warmup_steps": 1,
                      "p_uncond": 0.5, "ema_decay": 0.5, "checkpoint_every": 1}})


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["train-base.yaml", "train-base-continue.yaml", "train-base-v3.yaml",
                                    "train-base-v3-gpu.yaml"])
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


def sd_v1_alpha_bar() -> np.ndarray:
    """SD v1's alpha_bar(t) in float64, from its published schedule (betas linear in sqrt from 0.00085 to 0.012)."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1 - betas)


def test_min_snr_weights_follow_the_formula():
    """Hang et al. 2023, eps-prediction: weight(t) = min(SNR(t), gamma) / SNR(t), SNR = alpha_bar / (1 - alpha_bar)."""
    model = instantiate_from_config(OmegaConf.load(TINY_CONFIG).model)
    t = torch.tensor([0, 10, 100, 250, 500, 999])
    snr = sd_v1_alpha_bar()[t.numpy()] / (1 - sd_v1_alpha_bar()[t.numpy()])
    for gamma in (1.0, 5.0, 20.0):
        expected = np.minimum(snr, gamma) / snr
        assert np.allclose(min_snr_weights(model.alphas_cumprod, t, gamma).numpy(), expected, rtol=1e-4, atol=0)
    weights = min_snr_weights(model.alphas_cumprod, t, 5.0)
    assert weights[0] < 0.01 and weights[-1] == 1.0 and torch.all(weights[:-1] <= weights[1:])  # clean steps count less
    assert torch.all(min_snr_weights(model.alphas_cumprod, t, 1e9) == 1.0)


def test_diffusion_loss_is_the_model_s_loss_without_gamma_and_weighted_with_it():
    model = instantiate_from_config(OmegaConf.load(TINY_CONFIG).model)
    z, cond = torch.randn(6, 4, 8, 8), model.get_learned_conditioning(6 * ["a red star"])
    torch.manual_seed(3)
    plain = model(z, cond)[1]
    torch.manual_seed(3)
    assert torch.equal(diffusion_loss(model, z, cond, None), plain)  # v2's recipe trains exactly as before
    torch.manual_seed(3)
    t = torch.randint(0, model.num_timesteps, (6,))  # the same draws diffusion_loss makes
    per_sample = model.p_losses(z, cond, t)[0]
    torch.manual_seed(3)
    weighted = diffusion_loss(model, z, cond, 5.0)
    assert torch.allclose(weighted, (min_snr_weights(model.alphas_cumprod, t, 5.0) * per_sample).mean(), rtol=1e-6)
    assert weighted <= plain


def test_offset_noise_adds_one_constant_per_image_and_channel():
    from ldm.tinyworld.base import noisy
    z = torch.zeros(2000, 4, 16, 16)
    torch.manual_seed(0)
    plain = torch.randn_like(z)
    torch.manual_seed(0)
    offset = noisy(z, 0.3) - plain  # the same first draw, then the offsets
    assert torch.allclose(offset, offset[:, :, :1, :1].expand_as(offset), atol=1e-6)  # one value per image, channel
    assert offset[:, :, 0, 0].std().item() == pytest.approx(0.3, rel=0.05)
    model = instantiate_from_config(OmegaConf.load(TINY_CONFIG).model)
    z, cond = torch.randn(6, 4, 8, 8), model.get_learned_conditioning(6 * ["a red star"])
    torch.manual_seed(3)
    t = torch.randint(0, model.num_timesteps, (6,))
    expected = model.p_losses(z, cond, t, noisy(z, 0.3))[1]
    torch.manual_seed(3)
    assert torch.equal(diffusion_loss(model, z, cond, None, 0.3), expected)


@pytest.mark.slow
def test_ema_warmup_keeps_little_of_the_initial_weights(tmp_path):
    """With ema_warmup the shipped EMA after a few steps is near the trained weights; without, near the start."""
    from ldm.tinyworld.base import StageState
    results = {}
    for warm in (False, True):
        config = _train_config(tmp_path / str(warm), diffusion=4)
        config.diffusion.ema_decay, config.diffusion.ema_warmup = 0.999, warm
        train_base(config, torch.device("cpu"))
        state = StageState(tmp_path / str(warm) / "w", "diffusion").load()
        key = "model.diffusion_model.input_blocks.0.0.weight"
        results[warm] = (state["ema"][key] - state["nets"][key]).abs().mean() / state["nets"][key].abs().mean()
    assert results[True] < 0.2 * results[False]


@pytest.mark.parametrize("gamma,message", [(0, "got 0"), (-1.0, "got -1"), (float("nan"), "got nan"),
                                           ("five", "got 'five'"), (float("inf"), "got inf")])
def test_min_snr_gamma_is_range_checked(tmp_path, gamma, message):
    config = _train_config(tmp_path)
    config.diffusion.min_snr_gamma = 5.0
    check_base_config(config)
    config.diffusion.min_snr_gamma = None  # off, as when the key is left out
    check_base_config(config)
    config.diffusion.min_snr_gamma = gamma
    with pytest.raises(ConfigError, match=f"diffusion.min_snr_gamma must be a finite number > 0, {message}"):
        check_base_config(config)


@pytest.mark.slow
def test_render_images_is_the_same_with_worker_processes():
    serial, scenes = render_images(6, 32, 5, "probe", workers=1)
    parallel, parallel_scenes = render_images(6, 32, 5, "probe", workers=2)
    assert torch.equal(serial, parallel) and scenes == parallel_scenes
    assert torch.equal(serial[4], render_uint8(random_scene(scene_rng(5, 4), "probe"), 32))


@pytest.mark.parametrize("name", ["tiny-sd-v1.yaml", "tiny-sd-v1-f4.yaml"])
def test_tiny_world_models_keep_sd_v1_keys(name):
    """Every UNet and text-encoder key of the tiny models is an SD v1 key, and so is every autoencoder key but the
    1x1 shortcuts (the tiny autoencoders change width at other levels)."""
    if not KEYS_TSV.exists():
        pytest.skip(f"no SD v1 key list at {KEYS_TSV}")
    sd_keys = {line.split("\t")[0] for line in KEYS_TSV.read_text().splitlines() if line and not line.startswith("#")}
    with torch.device("meta"):
        model = instantiate_from_config(OmegaConf.load(REPO / "configs" / "tiny-world" / name).model)
    keys = set(model.state_dict())
    same = {k for k in keys if not k.startswith("first_stage_model.")}
    assert same <= sd_keys, sorted(same - sd_keys)[:5]
    vae = {k for k in keys - same if ".nin_shortcut." not in k}
    assert vae <= sd_keys, sorted(vae - sd_keys)[:5]


def test_update_ema_is_the_per_tensor_lerp():
    g = torch.Generator().manual_seed(0)
    state = {**{f"w{i}": torch.randn(7, 3, generator=g) for i in range(5)}, "count": torch.tensor(4)}
    ema = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else torch.tensor(0) for k, v in state.items()}
    expected = {k: v.lerp(state[k], 1 - 0.99) if v.is_floating_point() else state[k] for k, v in ema.items()}
    update_ema(ema, state, 0.99)
    assert all(torch.equal(ema[k], expected[k]) for k in state)


@pytest.mark.slow
def test_gpu_script_trains_the_v3_recipe_on_the_cpu(tmp_path):
    """scripts/train_tiny_world_gpu.sh, as the device runs it (less the wheels), on train-base-v3.yaml with a few
    steps per stage and 32 px images: the model comes back in parts that join into a loadable f = 4 model."""
    env = {**os.environ, "RUN": str(tmp_path / "run"), "OUT": str(tmp_path / "out"), "PYTHON": sys.executable,
           "SKIP_REPORT": "1", "PYTHONPATH": str(REPO)}
    script = str(REPO / "scripts" / "train_tiny_world_gpu.sh")
    shrink = ["data.num_images=8", "data.size=32", "vae.steps=2", "vae.batch_size=2", "decoder.steps=1",
              "decoder.batch_size=2", "diffusion.steps=2", "diffusion.batch_size=2"]
    done = subprocess.run(["bash", script, "run", *shrink], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"train.log", "SHA256SUMS", "model.safetensors.part-00",
                                               "model.safetensors.part-01"}
    assert all(p.stat().st_size <= 16 * 2 ** 20 for p in out.iterdir())  # what the device machine returns
    assert "training: exit 0" in (out / "train.log").read_text()
    joined = tmp_path / "model.safetensors"
    done = subprocess.run(["bash", script, "join", str(out), str(joined)], capture_output=True, text=True)
    assert done.returncode == 0 and "as trained" in done.stdout, done.stdout + done.stderr
    assert joined.read_bytes() == (tmp_path / "run" / "model.safetensors").read_bytes()
    model = instantiate_from_config(OmegaConf.load(REPO / "configs/tiny-world/tiny-sd-v1-f4.yaml").model)
    model.init_from_ckpt(str(joined))
    assert model.downsampling_factor == 4 and model.pixel_size == 64
    again = subprocess.run(["bash", script, "run", *shrink], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 2 and "exists; nothing is overwritten" in again.stderr  # a fresh folder, or nothing
    (out / "model.safetensors.part-01").write_bytes(b"x")
    done = subprocess.run(["bash", script, "join", str(out), str(tmp_path / "bad.safetensors")], capture_output=True,
                          text=True)
    assert done.returncode == 1 and "do not add up" in done.stderr and not (tmp_path / "bad.safetensors").exists()


class _Posterior:
    def __init__(self, z):
        self.z = z

    def mode(self):
        return self.z


class _PixelCodec(torch.nn.Module):
    """An 'autoencoder' that keeps the pixels (invert: and flips them), for checking autoencoder_quality's wiring."""

    def __init__(self, invert: bool = False):
        super().__init__()
        self.sign = torch.nn.Parameter(torch.tensor(-1.0 if invert else 1.0))

    def encode(self, x):
        return _Posterior(x)

    def decode(self, z):
        return self.sign * z


@pytest.mark.slow
def test_autoencoder_quality_reads_what_the_autoencoder_keeps():
    from ldm.tinyworld.evaluate import autoencoder_quality
    from ldm.tinyworld.metrics import TinyWorldMetric
    metric = TinyWorldMetric()
    kept = autoencoder_quality(_PixelCodec(), metric, n=24, subject_n=8)
    assert kept["reconstructions"]["mean_abs_error"] < 1e-6 and kept["images"]["mean_abs_error"] == 0
    for key, value in kept["images"].items():
        assert kept["reconstructions"][key] == pytest.approx(value, abs=1e-5), key
    assert kept["images"]["colour"] > 0.9 and kept["images"]["subject_rate"] > 0.7
    inverted = autoencoder_quality(_PixelCodec(invert=True), metric, n=24, subject_n=8)["reconstructions"]
    assert inverted["colour"] < 0.5 and inverted["subject_rate"] < 0.5 and inverted["mean_abs_error"] > 0.1


def test_report_refuses_a_missing_model_before_any_work(tmp_path, capsys):
    import scripts.tiny_world_report as report
    outdir = tmp_path / "report"
    with pytest.raises(SystemExit, match="--ckpt: no file at '.*none.safetensors'"):
        report.main(["--outdir", str(outdir), "--ckpt", str(tmp_path / "none.safetensors"), "--no_dreambooth"])
    with pytest.raises(SystemExit, match="--config: no file at"):
        report.main(["--outdir", str(outdir), "--config", str(tmp_path / "none.yaml")])
    assert not outdir.exists()


# ---- the probe (metric model) ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_probe_reads_held_out_scenes():
    from ldm.tinyworld.probe import load_probe, probe_accuracy
    acc = probe_accuracy(load_probe(), num=200, seed=4242)  # measured on 1,000: shape 0.87, outline 0.95, rest >= 0.98
    assert acc["shape"] > 0.75 and acc["outline"] > 0.85
    assert min(acc[k] for k in ("colour", "texture", "size", "position", "background")) > 0.93


@pytest.mark.slow
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


def test_the_demo_uses_the_cores_other_work_leaves_idle(monkeypatch):
    """On 2 cores with another job on one (load 1.2), 1 thread; idle, 2; a thread count the user set is kept."""
    import ldm.util.devices as util
    threads = torch.get_num_threads()
    monkeypatch.setattr(util.os, "sched_getaffinity", lambda pid: {0, 1})
    try:
        for var in util.THREAD_VARS:
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setattr(util.os, "getloadavg", lambda: (1.2, 1.0, 0.5))
        assert util.use_idle_cores() == 1 == torch.get_num_threads() and os.environ["OMP_NUM_THREADS"] == "1"
        for var in util.THREAD_VARS:
            monkeypatch.delenv(var)
        monkeypatch.setattr(util.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
        assert util.use_idle_cores() == 2 == torch.get_num_threads()
        monkeypatch.setattr(util.os, "getloadavg", lambda: (5.0, 5.0, 5.0))
        assert util.use_idle_cores() == 2  # the user's (here: the last call's) setting is kept
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("stop", ["during training", "before training"])
def test_ctrl_c_ends_the_demo_with_one_line(monkeypatch, tmp_path, capsys, stop):
    """Ctrl-C in the demo's training (StopOnSignal's TrainingInterrupted) or outside it (KeyboardInterrupt) ends it
    with one line naming where its outputs are, no traceback and no sampling from untrained adapters."""
    import scripts.demo as demo
    from ldm.callbacks import TrainingInterrupted
    sampled = []

    def interrupted(*args, **kwargs):
        if stop == "during training":
            raise TrainingInterrupted("training stopped by SIGINT after step 3", 2)
        raise KeyboardInterrupt

    monkeypatch.setattr("ldm.tinyworld.demo.train", interrupted)
    monkeypatch.setattr("ldm.tinyworld.demo.load_tiny_model", lambda *a: sampled.append(a))
    monkeypatch.setattr(demo, "use_idle_cores", lambda: 1)
    with pytest.raises(SystemExit) as stopped:
        demo.main(["--outdir", str(tmp_path / "demo")])
    message = str(stopped.value.code)
    assert "\n" not in message and "stopped by Ctrl-C" in message and str(tmp_path / "demo") in message
    assert not sampled


@pytest.mark.slow
def test_the_committed_v3_autoencoder_loads_and_reconstructs_close_up_scenes():
    """models/ldm/tiny-sd-v1-f4/autoencoder.safetensors, the v3 recipe's stages 1-3 (`init: [it]` with vae.steps 0 and
    no decoder stage trains the UNet alone): every first-stage key of the f = 4 config, finite, and unseen close-up
    scenes come back within a mean absolute error of 0.1 of [0, 1] (measured 0.018; an untrained one: 0.31)."""
    from ldm.checkpoint import load_into
    from ldm.modules.diffusers_folder import read_base_weights
    path = REPO / "models" / "ldm" / "tiny-sd-v1-f4" / "autoencoder.safetensors"
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["config"] == "configs/tiny-world/tiny-sd-v1-f4.yaml" and "scale_factor" in f.keys()
    model = instantiate_from_config(OmegaConf.load(REPO / "configs" / "tiny-world" / "tiny-sd-v1-f4.yaml").model)
    state = {k: v.float() for k, v in read_base_weights(str(path)).items()}
    assert set(state) - {"scale_factor"} == {k for k in model.state_dict() if k.startswith("first_stage_model.")}
    assert all(torch.isfinite(v).all() for v in state.values())
    load_into(model, state, "autoencoder", optional=lambda k: not k.startswith("first_stage_model."))
    images, _ = render_images(8, 64, seed=12345, world="closeup")
    x = images.float() / 127.5 - 1
    with torch.no_grad():
        rec = model.first_stage_model.decode(model.first_stage_model.encode(x).mode())
    assert ((rec.clamp(-1, 1) - x).abs().mean() / 2).item() < 0.1


@pytest.mark.parametrize("model", ["v2", "v3"])
def test_the_demo_trains_on_the_model_named(monkeypatch, tmp_path, model):
    """`scripts/demo.py --model v3` trains and samples on v3's config and weights (v2, the default, on v2's)."""
    import scripts.demo as demo
    from ldm.tinyworld.evaluate import BASE_CKPT, TINY_MODELS
    requests = []

    def stop(request):
        requests.append(request)
        raise KeyboardInterrupt

    monkeypatch.setattr("ldm.tinyworld.demo.run", stop)
    monkeypatch.setattr(demo, "use_idle_cores", lambda: 1)
    with pytest.raises(SystemExit):
        demo.main(["--outdir", str(tmp_path / "demo"), "--model", model])
    config, ckpt = TINY_MODELS[model]
    assert requests[0].base[0] == str(config) and requests[0].actual_resume == str(ckpt)
    assert demo.parse_args([]).model == next(k for k, (_, c) in TINY_MODELS.items() if c == BASE_CKPT) == "v2"
