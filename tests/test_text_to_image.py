"""The one text-to-image path: the sampler registry, every caller equal to it on the same noise, every sampler in the
image logger and for class images, the latent size from the model, sample.py's sampler and --C/--f options."""
import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import sample
from conftest import REPO, TINY_CONFIG, build_tiny, covering
from ldm.callbacks import ImageLogger
from ldm.data.class_images import class_image_noise, ensure_class_images
from ldm.evaluation.sampling import prompt_seed_pairs, sample_images
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.sampling import (SAMPLERS, make_sampler, sampler_name, seed_noise, seeds_noise,
                                           text_to_image, text_to_image_batches)
from ldm.util.images import to_pil
from ldm.util.instantiate import instantiate_from_config, load_model_from_config

PROMPTS = ["a red star", "a blue ball", "a green cube"]
BASE = ["--config", str(TINY_CONFIG), "--random_init", "--H", "32", "--W", "32", "--ddim_steps", "3",
        "--n_samples", "2", "--n_iter", "1", "--scale", "3.0", "--no-watermark", "--skip_grid"]
TRAINER = SimpleNamespace(datamodule=None, precision_plugin=SimpleNamespace(forward_context=contextlib.nullcontext))


def _pixels(paths):
    return [np.asarray(Image.open(p)) for p in paths]


# ---- the registry -------------------------------------------------------------------------------------------------
def test_registry_names_alias_and_error():
    assert list(SAMPLERS) == ["ddim", "plms", "dpm++2m"]
    model = build_tiny()
    assert type(make_sampler("ddim", model)) is DDIMSampler and type(make_sampler("plms", model)) is PLMSSampler
    assert type(make_sampler("dpm++2m", model)) is DPMSolverSampler
    assert type(make_sampler("dpm_solver", model)) is DPMSolverSampler and sampler_name("dpm_solver") == "dpm++2m"
    with pytest.raises(ValueError, match="unknown sampler 'euler'; choose from ddim, plms, dpm\\+\\+2m, dpm_solver"):
        make_sampler("euler", model)


def test_bad_requests_fail_before_any_batch(tiny_model):
    calls = []
    tiny_model.get_learned_conditioning = lambda texts: calls.append(texts)  # any work would land here
    noise = seeds_noise([0, 1], (4, 4, 4))
    for kwargs, message in [
        (dict(noise=noise[:1]), "one noise tensor per prompt"),
        (dict(sampler="plms", eta=0.5), "deterministic"),
        (dict(eta=float("nan")), "eta >= 0"),
        (dict(scale=float("nan")), "finite"),
        (dict(init_latent=noise[:1], strength=1.5), "strength"),
        (dict(init_latent=noise[:1], sampler="dpm++2m"), "img2img works with the ddim sampler"),
        (dict(batch_size=0), "batch size"),
        (dict(steps=0), "sampling steps"),
        (dict(height=30), "multiples of the autoencoder's downsampling factor 8"),
    ]:
        with pytest.raises(ValueError, match=message):
            text_to_image_batches(tiny_model, PROMPTS[:2], **kwargs)  # not iterated: the call itself refuses
    with pytest.raises(ValueError, match="no prompts"):
        text_to_image_batches(tiny_model, [])
    assert calls == []


@pytest.mark.slow
def test_batches_do_not_change_images_and_train_mode_comes_back(tiny_model):
    noise = seeds_noise([5, 6, 7], (4, 4, 4))
    tiny_model.train()
    batches = list(text_to_image_batches(tiny_model, PROMPTS, noise, steps=3, scale=3.0, batch_size=2))
    assert [len(b) for b in batches] == [2, 1] and tiny_model.training
    for batch, part in zip(batches, (slice(0, 2), slice(2, 3))):  # a batch is exactly its own call
        assert torch.equal(batch, text_to_image(tiny_model, PROMPTS[part], noise[part], steps=3, scale=3.0))
    one_batch = text_to_image(tiny_model, PROMPTS, noise, steps=3, scale=3.0)  # float rounding may differ by batch
    torch.testing.assert_close(torch.cat(batches), one_batch, rtol=1e-4, atol=1e-5)
    assert torch.equal(seeds_noise([5, 6], (4, 4, 4))[1], seed_noise(6, (4, 4, 4)))


def test_img2img_is_ddim_encode_then_decode(tiny_model_readonly):
    """The one function's img2img is DDIM's stochastic_encode + decode from step int(strength * steps)."""
    init, noise = seed_noise(1, (1, 4, 4, 4)), seeds_noise([2, 3], (4, 4, 4))
    images = text_to_image(tiny_model_readonly, PROMPTS[:2], noise, init_latent=init, strength=0.5, steps=6, scale=3.0)
    ddim = DDIMSampler(tiny_model_readonly)
    ddim.make_schedule(6)
    c = tiny_model_readonly.get_learned_conditioning(PROMPTS[:2])
    uc = tiny_model_readonly.get_learned_conditioning(["", ""])
    z = ddim.decode(ddim.stochastic_encode(init.expand(2, -1, -1, -1), 2, noise=noise), c, 3, 3.0, uc, verbose=False)
    assert torch.equal(images, tiny_model_readonly.decode_first_stage(z))
    plain = text_to_image(tiny_model_readonly, PROMPTS[:2], noise, steps=6, scale=3.0)
    assert not torch.allclose(images, plain)  # the init latent matters


# ---- every caller is the one function on its own noise ------------------------------------------------------------
@pytest.mark.parametrize("sampler", covering(["ddim", "dpm_solver"]))
def test_evaluation_equals_text_to_image(tiny_model_readonly, sampler):
    pairs = prompt_seed_pairs(PROMPTS[:2], [3, 4])
    images = sample_images(tiny_model_readonly, pairs, 32, steps=3, scale=3.0, sampler=sampler, batch_size=3)
    noise = seeds_noise([s for _, s in pairs], tiny_model_readonly.latent_shape(32, 32))
    direct = text_to_image(tiny_model_readonly, [p for p, _ in pairs], noise, sampler=sampler, steps=3, scale=3.0,
                           batch_size=3)
    assert torch.equal(images, (direct.clamp(-1, 1) + 1) / 2)


def test_image_logger_equals_text_to_image(tiny_model_readonly):
    logger = ImageLogger(max_images=4, prompts=PROMPTS[:2], seed=9, ddim_steps=3, scale=5.0)
    images = logger.sample(TRAINER, tiny_model_readonly)
    noise = seed_noise(9, (2, 4, 4, 4)).repeat(2, 1, 1, 1)  # the same two starting points for each prompt
    direct = text_to_image(tiny_model_readonly, [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2, noise, steps=3, scale=5.0)
    assert torch.equal(images, direct)


def test_class_images_equal_text_to_image(tiny_model_readonly, tmp_path):
    paths = ensure_class_images(tiny_model_readonly, tmp_path, "photo of a dog", num_class_images=3, batch_size=2,
                                steps=3, seed=4, size=32)
    noise = torch.stack([class_image_noise(4, k, (4, 4, 4)) for k in range(3)])
    direct = text_to_image(tiny_model_readonly, ["photo of a dog"] * 3, noise, steps=3, scale=7.5, batch_size=2)
    assert [p.name for p in paths] == ["class-00000.png", "class-00001.png", "class-00002.png"]
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(_pixels(paths), to_pil(direct)))


@pytest.mark.slow
def test_sample_py_equals_text_to_image(tmp_path):
    """sample.py: its generator seeded with --seed, --fixed_code's x_T drawn first, then the one function."""
    written = sample.main(BASE + ["--prompt", PROMPTS[0], "--fixed_code", "--outdir", str(tmp_path)])
    torch.manual_seed(42)  # as sample.py does before building the --random_init model
    model = load_model_from_config(OmegaConf.load(TINY_CONFIG))
    generator = torch.Generator().manual_seed(42)
    x_T = torch.randn((2, 4, 4, 4), generator=generator)
    direct = text_to_image(model, [PROMPTS[0]] * 2, x_T, steps=3, scale=3.0, generator=generator)
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(_pixels(written), to_pil(direct)))


# ---- every sampler in the image logger and for class images --------------------------------------------------------
@pytest.mark.slow
def test_every_sampler_in_the_image_logger_and_for_class_images(tiny_model, tmp_path):
    logged, generated = {}, {}
    for name in SAMPLERS:
        logger = instantiate_from_config({"target": "ldm.callbacks.ImageLogger", "params": {
            "max_images": 2, "prompts": PROMPTS[:1], "ddim_steps": 4, "scale": 3.0, "sampler": name}})
        logged[name] = logger.sample(TRAINER, tiny_model)
        noise = seed_noise(logger.seed, (2, 4, 4, 4))
        assert torch.equal(logged[name], text_to_image(tiny_model, PROMPTS[:1] * 2, noise, sampler=name, steps=4,
                                                       scale=3.0))
        class_image_sampler = {"batch_size": 2, "steps": 4, "sampler": name}  # as data.params.class_image_sampler
        paths = ensure_class_images(tiny_model, tmp_path / name, "photo of a cat", 2, size=32, **class_image_sampler)
        generated[name] = _pixels(paths)
        noise = torch.stack([class_image_noise(0, k, (4, 4, 4)) for k in range(2)])
        direct = text_to_image(tiny_model, ["photo of a cat"] * 2, noise, sampler=name, steps=4)
        assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(generated[name], to_pil(direct)))
    for a, b in (("ddim", "plms"), ("ddim", "dpm++2m"), ("plms", "dpm++2m")):  # each sampler really is used
        assert not torch.equal(logged[a], logged[b])
        assert not np.array_equal(generated[a][0], generated[b][0])


def test_misspelt_sampler_in_the_image_logger_or_for_class_images(tiny_model_readonly, tmp_path):
    with pytest.raises(ValueError, match="unknown sampler 'dim'"):
        ImageLogger(sampler="dim")
    with pytest.raises(ValueError, match="unknown sampler 'dim'"):
        ensure_class_images(tiny_model_readonly, tmp_path / "new", "dog", num_class_images=1, sampler="dim")
    assert not (tmp_path / "new").exists()


# ---- the latent size comes from the model --------------------------------------------------------------------------
@pytest.mark.parametrize("config,ch_mult,factor", covering([
    (TINY_CONFIG, None, 8), (TINY_CONFIG, [1, 1, 1], 4), (REPO / "configs/tiny-world/tiny-sd-v1.yaml", None, 8)],
    lambda config, ch_mult, factor: factor))
def test_latent_shape_from_the_config(config, ch_mult, factor):
    config = OmegaConf.load(config)
    if ch_mult is not None:
        config.model.params.first_stage_config.params.ddconfig.ch_mult = ch_mult
    torch.manual_seed(0)
    model = instantiate_from_config(config.model).eval()
    assert model.downsampling_factor == factor and model.pixel_size == model.image_size * factor
    assert model.latent_shape(4 * factor, 6 * factor) == (4, 4, 6)
    latent = model.encode_first_stage(torch.zeros(1, 3, 4 * factor, 6 * factor)).mode()  # what the VAE really does
    assert latent.shape[1:] == model.latent_shape(4 * factor, 6 * factor)
    with pytest.raises(ValueError, match=f"multiples of the autoencoder's downsampling factor {factor}"):
        model.latent_shape(4 * factor + 1, 4 * factor)


def test_sd_v1_autoencoder_downsamples_by_8():
    ddconfig = OmegaConf.load(REPO / "configs/stable-diffusion/v1-inference.yaml").model.params.first_stage_config
    with torch.device("meta"):  # the factor is the architecture's: no 84M weights to initialise
        assert instantiate_from_config(ddconfig).downsampling_factor == 8


# ---- sample.py: --sampler, its shorthands, --C and --f --------------------------------------------------------------
@pytest.mark.slow
def test_sample_py_sampler_option_and_shorthands(tmp_path):
    def run(name, *extra):
        return _pixels(sample.main(BASE + ["--outdir", str(tmp_path / name), *extra]))

    dpm, shorthand, both = run("a", "--sampler", "dpm++2m"), run("b", "--dpm_solver"), run("c", "--sampler",
                                                                                       "dpm++2m", "--dpm_solver")
    assert all(np.array_equal(x, y) and np.array_equal(x, z) for x, y, z in zip(dpm, shorthand, both))
    plms, ddim = run("p", "--sampler", "plms"), run("d", "--sampler", "ddim")
    assert all(np.array_equal(x, y) for x, y in zip(plms, run("q", "--plms")))
    assert all(np.array_equal(x, y) for x, y in zip(ddim, run("e")))
    # (--random_init leaves the UNet's zero-initialised output layer at zero: eps = 0, and PLMS's multistep average of
    # zeros lands where DDIM does; DPM-Solver's other time grid still differs)
    assert not np.array_equal(dpm[0], ddim[0])
    assert all(np.array_equal(x, y) for x, y in zip(ddim, run("f", "--f", "8", "--C", "4")))  # the model's values


@pytest.mark.parametrize("args,message", [
    (["--sampler", "ddim", "--plms"], "pick one sampler: --sampler ddim or --plms"),
    (["--sampler", "plms", "--dpm_solver"], "pick one sampler: --sampler plms or --dpm_solver"),
    (["--sampler", "plms", "--init-img", "x.png"], "img2img uses DDIM; drop --sampler plms"),
    (["--sampler", "dpm++2m", "--ddim_eta", "0.5"], "dpm\\+\\+2m is deterministic; drop --ddim_eta"),
    (["--ddim_eta", "nan"], "--ddim_eta: must be a finite number >= 0, got .nan."),
    (["--f", "4"], "^error: --f 4 differs from the model's autoencoder downsampling factor 8: drop --f"),
    (["--C", "3"], "^error: --C 3 differs from the model's latent channels 4: drop --C"),
])
def test_sample_py_sampler_and_latent_errors(tmp_path, args, message):
    with pytest.raises(SystemExit, match=message) as error:
        sample.main(BASE + args + ["--outdir", str(tmp_path)])
    assert "\n" not in str(error.value.code)  # one line, no traceback
    assert not list(tmp_path.rglob("*.png"))
