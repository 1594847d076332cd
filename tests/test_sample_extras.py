"""sample.py for real use: DPM-Solver++, the invisible watermark, the safety checker, adapter scale sweeps, labels."""
import copy
import logging
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from conftest import TINY_CONFIG, covering, diffusers_sample
from ldm.checkpoint import save_state_dict
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler, make_dpm_timesteps
from ldm.modules.adapters import inject_adapters
from ldm.modules.safety import checker_config, clip_input, read_checker_weights
from ldm.modules.watermark import WATERMARK_TEXT, read_watermark
from ldm.util.images import image_grid
from test_diffusion import _GaussianData

BASE = ["--config", str(TINY_CONFIG), "--random_init", "--H", "32", "--W", "32", "--ddim_steps", "4",
        "--n_samples", "2", "--n_iter", "1", "--scale", "3.0"]



def _pixels(paths):
    return [np.asarray(Image.open(p)) for p in paths]


# ---- DPM-Solver++ ------------------------------------------------------------------------------------------------
def test_dpm_timesteps():
    assert list(make_dpm_timesteps(4, 1000)) == [250, 500, 749, 999]
    for bad in (0, 1000):
        with pytest.raises(ValueError, match="DPM-Solver\\+\\+ steps"):
            make_dpm_timesteps(bad, 1000)


@pytest.mark.slow
def test_dpm_solver_matches_diffusers(tiny_model):
    """Step for step equal to diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2) on our timesteps."""
    from diffusers import DPMSolverMultistepScheduler
    sched = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="sigma_min")
    sched.set_timesteps(timesteps=[int(t) for t in make_dpm_timesteps(20, 1000)[::-1]])  # >= 15: no lower order
    c = tiny_model.get_learned_conditioning(["a red star", "a blue circle"])
    uc = tiny_model.get_learned_conditioning(["", ""])
    x_T, x = diffusers_sample(tiny_model, sched, c, uc)
    ours, _ = DPMSolverSampler(tiny_model).sample(20, 2, (4, 4, 4), c, 5.0, uc, x_T=x_T, verbose=False)
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)


def test_dpm_solver_is_second_order_on_the_exact_ode(tiny_model_readonly):
    """Gaussian data (exact ODE solution known): 4x the steps cut the error > 6x (first order: ~4x), and at equal
    steps on the same grid it beats its first-order form (DPM-Solver++1, i.e. DDIM on that grid)."""
    data = _GaussianData(tiny_model_readonly.alphas_cumprod)
    x_T = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def error(steps, order=2):
        out, _ = DPMSolverSampler(data, order).sample(steps, 1, (1, 8, 8), torch.zeros(1, 1, 1), x_T=x_T,
                                                       verbose=False)
        return (out - data.exact(x_T, 999)).abs().max().item()

    assert error(800) < error(200) / 6      # measured: 1.0e-3 vs 1.2e-2
    assert error(800, 1) > error(200, 1) / 6  # measured: 6.5e-3 vs 2.4e-2, so the bound above tells the orders apart
    assert error(200) < error(200, 1) / 1.5


@pytest.mark.slow
def test_dpm_solver_converges_to_ddim_on_the_tiny_model(tiny_model):
    """Against many-step DDIM (500 steps, starting at t=999 as DPM-Solver++ does): the error falls with the steps,
    and at 20 steps it is far below DDIM's and below its own first-order form's on the same grid."""
    c = tiny_model.get_learned_conditioning(["a red star", "a blue circle"])
    uc = tiny_model.get_learned_conditioning(["", ""])
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))

    def run(sampler, steps):
        with torch.no_grad():
            return sampler.sample(steps, 2, (4, 4, 4), c, 7.5, uc, x_T=x_T, verbose=False)[0]

    reference = run(DDIMSampler(tiny_model), 500)

    def error(sampler, steps):  # relative RMS distance to the reference
        return ((run(sampler, steps) - reference).norm() / reference.norm()).item()

    dpm = DPMSolverSampler(tiny_model)
    errors = [error(dpm, s) for s in (5, 10, 20, 100)]  # measured: 0.077, 0.034, 0.014, 0.0034
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01
    assert errors[2] < error(DDIMSampler(tiny_model), 20) / 5        # measured: 0.014 vs 0.25
    assert errors[2] < error(DPMSolverSampler(tiny_model, 1), 20) / 1.5  # measured: 0.014 vs 0.031


@pytest.mark.slow
def test_sample_py_dpm_solver_is_seeded(tmp_path):
    def run(name, *extra):
        return _pixels(sample.main(BASE + ["--outdir", str(tmp_path / name), "--skip_grid", *extra]))

    a, b, ddim = run("a", "--dpm_solver"), run("b", "--dpm_solver"), run("ddim")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], ddim[0])


@pytest.mark.parametrize("args,message", [
    (["--dpm_solver", "--plms"], "pick one sampler"),
    (["--dpm_solver", "--ddim_eta", "1.0"], "deterministic"),
    (["--dpm_solver", "--init-img", "x.png"], "img2img uses DDIM; drop --dpm_solver"),
])
def test_dpm_solver_option_errors(tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        sample.main(BASE + args + ["--outdir", str(tmp_path)])


# ---- invisible watermark -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flat_ckpt(tiny_model_session, tmp_path_factory):
    """The tiny model with a decoder that paints flat grey: the DWT-DCT mark needs images that are not noise."""
    sd = dict(tiny_model_session.state_dict())
    for k in ("first_stage_model.decoder.conv_out.weight", "first_stage_model.decoder.conv_out.bias"):
        sd[k] = torch.zeros_like(sd[k])
    path = tmp_path_factory.mktemp("flat") / "flat.safetensors"
    save_state_dict(sd, str(path))
    return path


@pytest.mark.slow
def test_saved_png_carries_the_watermark(flat_ckpt, tmp_path):
    args = ["--config", str(TINY_CONFIG), "--ckpt", str(flat_ckpt), "--H", "256", "--W", "256", "--ddim_steps", "2",
            "--n_samples", "1", "--n_iter", "1"]
    marked = sample.main(args + ["--outdir", str(tmp_path / "m")])
    plain = sample.main(args + ["--outdir", str(tmp_path / "p"), "--no-watermark"])
    assert [read_watermark(Image.open(p)) for p in marked] == [WATERMARK_TEXT] * 2  # the sample and the grid
    assert read_watermark(Image.open(plain[0])) != WATERMARK_TEXT
    diff = np.abs(_pixels(marked)[0].astype(int) - _pixels(plain)[0])
    assert 0 < diff.max() <= 40  # invisible: small changes


@pytest.mark.slow
def test_small_images_are_saved_unmarked_with_one_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        marked = sample.main(BASE + ["--outdir", str(tmp_path / "m")])
    warnings = [r for r in caplog.records if "too small for the invisible watermark" in r.getMessage()]
    assert len(warnings) == 1
    plain = sample.main(BASE + ["--outdir", str(tmp_path / "p"), "--no-watermark"])
    assert all(np.array_equal(x, y) for x, y in zip(_pixels(marked), _pixels(plain)))


@pytest.mark.slow
def test_missing_watermark_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imwatermark", None)  # makes `import imwatermark` fail
    with pytest.raises(SystemExit, match="pip install invisible-watermark.*--no-watermark"):
        sample.main(BASE + ["--outdir", str(tmp_path)])
    assert len(sample.main(BASE + ["--outdir", str(tmp_path), "--no-watermark"])) == 3


# ---- safety checker ----------------------------------------------------------------------------------------------
def _released_layout(sd):
    """Keys as in the released safety checker (transformers 4 names: `vision_model.vision_model.*`)."""
    return {re.sub(r"^vision_model\.(?!vision_model\.)", "vision_model.vision_model.", k): v for k, v in sd.items()}


def tiny_checker(path, images):
    """A stand-in safety checker (tiny CLIP vision tower) that flags exactly the first of two `images`."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig
    torch.manual_seed(0)
    config = CLIPConfig(vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=1, image_size=32, patch_size=8), projection_dim=16)
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        e = torch.nn.functional.normalize(checker.visual_projection(checker.vision_model(clip_input(images, 32))[1]))
        checker.concept_embeds[0] = e[0] - e[1]  # positive cosine with image 0, negative with image 1
        checker.concept_embeds_weights.fill_(2.0)  # thresholds above any cosine: the other concepts never fire
        checker.concept_embeds_weights[0] = 0.0
        checker.special_care_embeds_weights.fill_(2.0)
    save_state_dict(_released_layout(checker.state_dict()), str(path))
    return path


@pytest.mark.slow
def test_safety_checker_blackens_the_flagged_image(tmp_path, caplog):
    args = BASE + ["--no-watermark", "--skip_grid"]
    plain = _pixels(sample.main(args + ["--outdir", str(tmp_path / "plain")]))
    checker = tiny_checker(tmp_path / "checker.safetensors", [Image.fromarray(a) for a in plain])
    with caplog.at_level(logging.INFO):
        checked = _pixels(sample.main(args + ["--safety_checker", str(checker), "--outdir", str(tmp_path / "c")]))
    assert not checked[0].any() and plain[0].any()  # flagged: black
    assert np.array_equal(checked[1], plain[1])
    assert "1 of 2 images flagged" in caplog.text


def test_checker_config_from_the_released_checkers_shapes():
    """SD v1's checker (CLIP ViT-L/14 vision tower, 768-d projection), on the meta device: its config comes back."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig
    vit_l14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=224, patch_size=14)
    with torch.device("meta"):
        checker = StableDiffusionSafetyChecker(CLIPConfig(vision_config=vit_l14, projection_dim=768))
    config = checker_config(_released_layout(checker.state_dict()))
    assert {k: getattr(config.vision_config, k) for k in vit_l14} == vit_l14 and config.projection_dim == 768


def test_checker_weights_in_either_transformers_layout_and_folders(tmp_path):
    released = tiny_checker(tmp_path / "model.safetensors", [Image.new("RGB", (32, 32), c) for c in ("red", "blue")])
    sd = read_checker_weights(str(released))
    (tmp_path / "new").mkdir()
    save_state_dict({k.replace("vision_model.vision_model.", "vision_model.", 1): v for k, v in sd.items()},
                    str(tmp_path / "new" / "model.safetensors"))
    torch.save(sd, tmp_path / "checker.bin")
    for source in (tmp_path, tmp_path / "new", tmp_path / "checker.bin"):
        assert read_checker_weights(str(source)).keys() == sd.keys()


@pytest.mark.parametrize("shape,size", [((48, 64), 32), ((40, 40), 32), ((512, 768), 224)])
def test_clip_preprocessing_matches_transformers(shape, size):
    from transformers import CLIPImageProcessor
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(shape[::-1], Image.BICUBIC)]
    ref = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})(
        images=images, return_tensors="pt").pixel_values
    torch.testing.assert_close(clip_input(images, size), ref, atol=0.035, rtol=0)  # resampling: <= 2 grey levels


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_session, tmp_path_factory):
    """A base checkpoint whose output layers are non-zero (so adapters show) and two adapter directories."""
    tmp = tmp_path_factory.mktemp("adapters")
    save_state_dict(tiny_model_session.state_dict(), str(tmp / "tiny.safetensors"))
    configs = {"a1": {"transformer_adp_config": [dict(type="inout", din="attn2o", dout="ffni", mid_dim=8,
                                                      method="default", init="default")]},
               "a2": {"resblock_adp_config": dict(type="inout", din="resi", dout="reso", mid_dim=3,
                                                  method="default", init="default")}}
    for name, config in configs.items():
        torch.manual_seed(1)
        unet = copy.deepcopy(tiny_model_session.unet)
        inject_adapters(unet, config)
        unet.save_adapter_to_dir(tmp / name)
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize("source,message", [
    ("absent.safetensors", "safety checker weights not found"),
    ("tiny.safetensors", "not a Stable Diffusion safety checker.*looks like a Stable Diffusion checkpoint"),
    ("a1/adapters.safetensors", "not a Stable Diffusion safety checker.*looks like adapter weights"),
    ("a1/adapter_config.yaml", "cannot read checkpoint"),
    ("a1", "holds no model.safetensors or pytorch_model.bin"),
])
def test_bad_safety_checker_file_is_one_clear_error(adapter_dirs, tmp_path, source, message):
    with pytest.raises(SystemExit, match=f"error: .*{message}.*drop --safety_checker"):
        sample.main(BASE + ["--safety_checker", str(adapter_dirs / source), "--outdir", str(tmp_path)])


# ---- adapter scale sweep and labels ------------------------------------------------------------------------------
def _sweep_args(adapter_dirs, *extra):
    return ["--config", str(TINY_CONFIG), "--ckpt", str(adapter_dirs / "tiny.safetensors"), "--H", "32", "--W", "32",
            "--ddim_steps", "3", "--n_samples", "2", "--n_iter", "2", "--ddim_eta", "1.0", *extra]


@pytest.mark.slow
def test_sweep_scale_zero_is_the_base_model_bit_for_bit(adapter_dirs, tmp_path):
    a1, a2 = ["--adapter_path", str(adapter_dirs / "a1")], ["--adapter_path", str(adapter_dirs / "a2")]
    base = _pixels(sample.main(_sweep_args(adapter_dirs, "--outdir", str(tmp_path / "base"), "--skip_grid")))
    out = sample.main(_sweep_args(adapter_dirs, *a1, *a2, "--adapter_scale", "2", "--adapter_scale", "0.5",
                                  "--adapter_scale_sweep", "0,0.5", "--outdir", str(tmp_path / "sweep")))
    half = _pixels(sample.main(_sweep_args(adapter_dirs, *a1, *a2, "--outdir", str(tmp_path / "half"),
                                           "--adapter_scale", "1", "--adapter_scale", "0.25", "--skip_grid")))
    sweep, grid = _pixels(out[:-1]), _pixels(out[-1:])[0]
    # saved per batch: scale 0 then scale 0.5, 2 images each; two batches (eta 1 draws noise at every step)
    assert all(np.array_equal(x, y) for x, y in zip(sweep[0:2] + sweep[4:6], base))
    assert all(np.array_equal(x, y) for x, y in zip(sweep[2:4] + sweep[6:8], half))  # 0.5 x each --adapter_scale
    assert not np.array_equal(sweep[0], sweep[2])
    assert grid.shape == (2 * 34 + 2, 4 * 34 + 2, 3)  # rows = scales, columns = every image of a scale
    assert np.array_equal(grid[2 + 34:2 + 34 + 32, 2 + 34:2 + 34 + 32], sweep[3])  # row 0.5, column 1


@pytest.mark.slow
def test_sweep_gif_and_labels(adapter_dirs, tmp_path):
    args = _sweep_args(adapter_dirs, "--adapter_path", str(adapter_dirs / "a1"), "--adapter_scale_sweep",
                       "0,0.5,1", "--n_iter", "1", "--skip_save", "--no-watermark")  # the watermark depends on size
    plain = Image.open(sample.main(args + ["--outdir", str(tmp_path / "p")])[0])
    grid_path, gif_path = sample.main(args + ["--outdir", str(tmp_path / "l"), "--label", "--gif"])
    labelled, gif = np.asarray(Image.open(grid_path)), Image.open(gif_path)
    assert gif_path.name == "sweep-0000.gif" and gif.n_frames == 3
    cols = (plain.size[0] - 2) // 34
    lw, lh = labelled.shape[1], labelled.shape[0]
    margin, strip = lw - (cols * 130 + 2), (lh - 2) // 3 - 130  # 32 px tiles enlarged 4x (MIN_LABELLED_TILE)
    assert margin > 20 and strip > 10  # a margin for "scale 0.5", a strip under each row for prompt and seed
    tile = np.asarray(plain)[2:34, 2:34].repeat(4, 0).repeat(4, 1)
    assert np.array_equal(labelled[2:130, margin + 2:margin + 130], tile)  # the images: each pixel a 4x4 block
    assert labelled[2 + 128:2 + 128 + strip, margin:].any()               # text under the first row
    row_label = [labelled[2 + r * (130 + strip):2 + r * (130 + strip) + 128, :margin] for r in range(3)]
    assert all(x.any() for x in row_label) and not np.array_equal(row_label[1], row_label[2])  # "0.5" vs "1"


@pytest.mark.parametrize("args,message", covering([
    (["--adapter_scale_sweep", "0,a", "--adapter_path", "{a1}"], "comma-separated numbers"),
    (["--adapter_scale_sweep", "0,,1", "--adapter_path", "{a1}"], "comma-separated numbers"),
    (["--adapter_scale_sweep", "0,nan", "--adapter_path", "{a1}"], "comma-separated numbers"),
    (["--adapter_scale_sweep", "0,1"], "add at least one --adapter_path"),
    (["--gif"], "add --adapter_scale_sweep"),
]))
def test_bad_sweep_is_one_clear_error(adapter_dirs, tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        sample.main(BASE + [a.format(a1=adapter_dirs / "a1") for a in args] + ["--outdir", str(tmp_path)])


@pytest.mark.slow
def test_labelled_grid_of_a_plain_run(tmp_path):
    args = BASE + ["--skip_save", "--no-watermark"]  # the watermark depends on the grid's size
    plain = np.asarray(Image.open(sample.main(args + ["--outdir", str(tmp_path / "p")])[0]))
    labelled = np.asarray(Image.open(sample.main(args + ["--outdir", str(tmp_path / "l"), "--label"])[0]))
    n = (plain.shape[1] - 2) // 34  # 32 px tiles, enlarged 4x under labels so that they can be read; no row labels
    assert labelled.shape[1] == n * 130 + 2 and labelled.shape[0] > 130 + 10
    assert np.array_equal(labelled[2:130, 2:130], plain[2:34, 2:34].repeat(4, 0).repeat(4, 1))
    assert labelled[130:].any()


def test_image_grid_labels_wrap_inside_their_tile():
    """A label wider than its image is wrapped at spaces (nothing cut off, "photo of a..." was), each line within the
    image's width, and drawn inside its own tile."""
    from PIL import ImageFont
    from ldm.util.images import wrap_label
    text = "a photo of a small red star"
    font = ImageFont.load_default(size=10)
    lines = wrap_label(text, font, 40)
    assert " ".join(lines) == text and len(lines) > 2 and all(font.getlength(line) <= 40 for line in lines)
    assert wrap_label("abcdefghijklmnopqrstuvwxyz" * 2, font, 40)[0] != "abcdefghijklmnopqrstuvwxyz" * 2  # broken up
    most = wrap_label(" ".join(["word"] * 40), font, 40, max_lines=3)  # beyond max_lines: the end is marked
    assert len(most) == 3 and most[-1].endswith("...") and font.getlength(most[-1]) <= 40
    black = [Image.new("RGB", (40, 40))] * 2
    text = "a photo of a small striped red star on a blue background at the left"
    lines = wrap_label(text, ImageFont.load_default(size=12), 160)  # the grid's font, in a tile enlarged 4x
    assert len(lines) >= 3
    long = np.asarray(image_grid(black, 2, labels=[f"{text}\nseed 1", "b\nseed 2"]))
    blank = np.asarray(image_grid(black, 2, labels=["\n" * len(lines), "b\nseed 2"]))  # as many empty lines
    short = np.asarray(image_grid(black, 2, labels=["a\nseed 1", "b\nseed 2"]))
    # 40 px tiles are enlarged 4x (MIN_LABELLED_TILE) so that a label has room
    assert long.shape == blank.shape and long.shape[1] == 2 * 162 + 2 and long.shape[0] > short.shape[0] + 20
    assert long[162:, :162].any() and np.array_equal(long[:, 163:], blank[:, 163:])  # the text stays in its tile


def test_grid_labels_keep_visible_spaces():
    """PIL's default font draws a 1-2 px space at small sizes ("photoofasksstar"): words are drawn apart, at least
    0.4 em, and the wrapped lines are measured that way."""
    from PIL import ImageFont
    from ldm.util.images import text_length, word_gap
    font = ImageFont.load_default(size=12)
    assert word_gap(font) >= 0.4 * 12 > font.getlength(" ")
    assert text_length("photo of a sks star", font) == pytest.approx(
        font.getlength("photoofasksstar") + 4 * word_gap(font))
    black = [Image.new("RGB", (64, 64))]
    spaced, joined = (np.asarray(image_grid(black, 1, labels=[t])) for t in ("a b", "ab"))
    ink = lambda a: np.nonzero(a[130:].any(axis=(0, 2)))[0]  # the label's columns with ink
    assert ink(spaced).max() - ink(joined).max() >= int(0.4 * 12) - 1