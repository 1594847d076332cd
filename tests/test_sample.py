"""sample.py end to end on the tiny config: files written, bit-for-bit repeatable, img2img, clear errors; one model
build and one frozen plan."""
import dataclasses
import functools

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import sample
from conftest import REPO, TINY_CONFIG, covering
from ldm.checkpoint import save_state_dict
from ldm.config import build_base_model
from ldm.models import txt2img
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.models.sampling_plan import ModelSource, load_model

TINY_CKPT = REPO / "models" / "ldm" / "tiny-sd-v1" / "model.safetensors"

BASE = ["--config", str(TINY_CONFIG), "--random_init", "--H", "32", "--W", "32", "--ddim_steps", "4",
        "--n_samples", "2", "--n_iter", "1", "--scale", "3.0"]


def _pixels(path):
    return np.asarray(Image.open(path))


def test_writes_samples_and_grid(tmp_path):
    written = sample.main(BASE + ["--prompt", "a red star", "--outdir", str(tmp_path), "--n_iter", "2"])
    names = sorted(p.relative_to(tmp_path).as_posix() for p in written)
    assert names == ["grid-0000.png", "samples/00000.png", "samples/00001.png", "samples/00002.png",
                     "samples/00003.png"]
    assert Image.open(tmp_path / "samples" / "00000.png").size == (32, 32)
    again = sample.main(BASE + ["--prompt", "a red star", "--outdir", str(tmp_path), "--skip_grid"])
    assert sorted(p.name for p in again) == ["00004.png", "00005.png"]  # numbering continues, nothing overwritten


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--plms"], ["--fixed_code"], ["--ddim_eta", "1.0"]])
def test_seeded_runs_are_bit_identical(tmp_path, extra):
    a = sample.main(BASE + extra + ["--outdir", str(tmp_path / "a"), "--skip_grid"])
    b = sample.main(BASE + extra + ["--outdir", str(tmp_path / "b"), "--skip_grid"])
    c = sample.main(BASE + extra + ["--outdir", str(tmp_path / "c"), "--skip_grid", "--seed", "7"])
    assert all(np.array_equal(_pixels(x), _pixels(y)) for x, y in zip(a, b))
    assert not np.array_equal(_pixels(a[0]), _pixels(c[0]))


@pytest.mark.slow
def test_from_file_and_img2img(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red star\n\na blue circle\n")
    written = sample.main(BASE + ["--from-file", str(prompts), "--outdir", str(tmp_path / "f"), "--skip_grid"])
    assert len(written) == 4
    init = tmp_path / "init.png"
    Image.fromarray(np.full((40, 48, 3), 200, dtype=np.uint8)).save(init)
    out = sample.main(BASE + ["--init-img", str(init), "--strength", "0.5", "--outdir", str(tmp_path / "i")])
    assert Image.open(out[0]).size == (32, 32)


@pytest.mark.parametrize("args,message", [
    (["--from-file", "{tmp}/empty.txt"], "is empty"),
    (["--from-file", "{tmp}/absent.txt"], "prompt file not found"),
    (["--H", "30"], "multiples of 16 \\(--f 8 x the UNet's downsampling 2\\)"),
    (["--init-img", "{tmp}/absent.png"], "--init-img not found"),
    (["--init-img", "{tmp}/empty.txt", "--strength", "1.5"], "--strength"),
])
def test_bad_input_gets_one_clear_message(tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(SystemExit, match=message):
        sample.main(BASE + [a.format(tmp=tmp_path) for a in args] + ["--outdir", str(tmp_path / "o")])


def test_missing_checkpoint_and_bad_config(tmp_path):
    with pytest.raises(SystemExit, match="checkpoint not found"):
        sample.main(["--config", str(TINY_CONFIG), "--ckpt", str(tmp_path / "none.ckpt"), "--outdir", str(tmp_path)])
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY_CONFIG.read_text().replace("ldm.models.autoencoder.AutoencoderKL",
                                                   "ldm.models.autoencoder.AutoencoderXL"))
    with pytest.raises(SystemExit, match="has no attribute 'AutoencoderXL'"):
        sample.main(["--config", str(bad), "--random_init", "--outdir", str(tmp_path)])


# ---- the plan and the model ------------------------------------------------------------------------------------
@pytest.mark.parametrize("source,device,size", covering([(["--config", str(TINY_CONFIG), "--random_init"], "cpu", 32),
                                                         (["--ckpt", str(TINY_CKPT)], "meta", 64)]))
def test_one_model_build_and_options_read_not_written(tmp_path, monkeypatch, source, device, size):
    """sample.py builds its model once (from a checkpoint: on the meta device, the file's tensors assigned; else
    initialised from --seed), leaves its parsed options as parsed, and renders from one frozen SamplingPlan."""
    builds, parsed, plans = [], [], []
    real_init, real_parse, real_render = LatentDiffusion.__init__, sample.parse_args, txt2img.render_all

    @functools.wraps(real_init)  # (its signature is read to check config keys)
    def counted(self, *args, **kwargs):
        builds.append(torch.empty(0).device.type)  # the device the model is built on
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(LatentDiffusion, "__init__", counted)
    monkeypatch.setattr(sample, "parse_args", lambda argv: parsed.append(real_parse(argv)) or parsed[-1])
    monkeypatch.setattr(txt2img, "render_all", lambda model, plan, *a: plans.append(plan) or real_render(
        model, plan, *a))
    args = source + ["--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", "--skip_grid", "--outdir", str(tmp_path)]
    sample.main(args)
    assert builds == [device]
    assert vars(parsed[0]) == vars(real_parse(args))
    (plan,) = plans
    assert (plan.height, plan.width, plan.sampler, plan.steps, plan.prompts) == (size, size, "ddim", 2, (
        "a painting of a virus monster playing guitar",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.height = 64


@pytest.mark.slow
def test_weights_take_the_models_dtype(tmp_path):
    """A half-precision checkpoint samples as its float32 copy does (the file's tensors are cast, as a copy into a
    built model casts them)."""
    from ldm.models.diffusion.sampling import seeds_noise, text_to_image
    torch.manual_seed(0)
    sd = build_base_model(OmegaConf.load(TINY_CONFIG), meta=False).state_dict()
    save_state_dict({k: v.half() for k, v in sd.items()}, str(tmp_path / "half.safetensors"))
    save_state_dict({k: v.half().float() for k, v in sd.items()}, str(tmp_path / "float.safetensors"))
    noise = seeds_noise([0], (4, 4, 4))
    images = []
    for name in ("half", "float"):
        model = load_model(ModelSource((str(TINY_CONFIG),), str(tmp_path / f"{name}.safetensors")), torch.device("cpu"))
        assert {p.dtype for p in model.parameters()} == {torch.float32} and not any(p.is_meta for p in
                                                                                    model.parameters())
        images.append(text_to_image(model, ["a red star"], noise, steps=2))
    assert torch.equal(*images)
