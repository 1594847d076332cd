"""bench/gpu_check.py at tiny size on the CPU: every item runs and writes its rows (a GPU session must not be the
first to run this code), failures and overruns become rows, and the diffusers twin pipeline draws our images."""
import importlib
import time

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, TINY_CONFIG
from ldm.models.diffusion.sampling import seeds_noise, text_to_image

with pytest.MonkeyPatch.context() as path:  # imported as `python bench/gpu_check.py` runs: bench/ first on the path
    path.syspath_prepend(str(REPO / "bench"))
    gpu_check, gpu_items, twins = (importlib.import_module(m) for m in ("gpu_check", "gpu_items", "twins"))

TINY = ["--device", "cpu", "--size", "tiny", "--threads", "1"]


def rows_of(rows, prefix):
    return [r for r in rows if r["item"].startswith(prefix)]


@pytest.mark.slow
def test_every_item_runs_at_tiny_size_and_appends_its_rows(tmp_path, monkeypatch):
    results = tmp_path / "RESULTS.md"
    results.write_text("# earlier results\n\n| a | b |\n")
    compiled = []  # compiling even the toy UNet takes minutes on a busy CPU: the compiled item's wiring is checked
    monkeypatch.setattr(gpu_items, "compile_module", lambda m, device, **kw: compiled.append(type(m).__name__) or 1)
    rows = gpu_check.main(TINY + ["--results", str(results), "--budget", "3600"])
    assert not [r for r in rows if r["ours"] in ("error", "stopped", "skipped") and r["item"] != "8-bit AdamW "
                "(bitsandbytes)"], rows
    assert all(r[c] for r in rows for c in ("date", "device", "commit", "torch"))

    numerics = rows_of(rows, "numerics: UNet forward")
    assert [r["dtype"] for r in numerics] == ["fp16", "bf16"]
    assert all(0 < float(r["ours"]) < 0.05 and 0.5 < float(r["ratio"]) < 2 for r in numerics)
    assert [r["ours"] for r in rows_of(rows, "numerics: trained adapter")] == ["fp32 weights and grads"] * 2
    assert len(rows_of(rows, "UNet forward")) == 2 and len(rows_of(rows, "UNet train step")) == 2
    dreambooth = rows_of(rows, "DreamBooth step")
    assert len(dreambooth) == 6 and all(float(r["ratio"]) > 0 and "GiB" in r["ours"] for r in dreambooth)
    (packed,) = rows_of(rows, "packed DreamBooth step")
    assert float(packed["ratio"]) > 0 and "run-steps/s" in packed["ours"] and "speed-up" in packed["notes"]
    assert len(rows_of(rows, "txt2img")) == 4 and len(rows_of(rows, "fast path")) == 3
    assert len(rows_of(rows, "8-bit AdamW")) == 1
    assert len(rows_of(rows, "compiled")) == 3 and compiled == ["UNetModel", "UNetModel", "UNet2DConditionModel"]

    text = results.read_text()
    assert text.startswith("# earlier results\n\n| a | b |\n\n## GPU check ")  # nothing before the run is lost
    assert text.count("\n| 20") == len(rows) and "--device cpu --size tiny" in text
    assert all(line.count("|") == len(gpu_check.COLUMNS) + 1 for line in text.splitlines() if line.startswith("| 20"))


@pytest.mark.slow
def test_a_failing_or_overrunning_item_leaves_a_row_and_the_run_goes_on(tmp_path, monkeypatch):
    def slow(check):
        check.row("unet", "", "", "first")
        time.sleep(60)
    monkeypatch.setattr(gpu_items, "numerics", lambda check: 1 / 0)
    monkeypatch.setattr(gpu_items, "unet", slow)
    monkeypatch.setattr(gpu_items, "adam8bit", lambda check: check.row("adam8bit", "", "", "ran"))
    start = time.monotonic()
    rows = gpu_check.main(TINY + ["--results", str(tmp_path / "r.md"), "--items", "numerics,unet,adam8bit",
                                  "--budget", "4"])
    assert time.monotonic() - start < 30
    assert [(r["item"], r["ours"]) for r in rows] == [("numerics", "error"), ("unet", "first"), ("unet", "stopped"),
                                                      ("adam8bit", "ran")]
    assert "ZeroDivisionError" in rows[0]["notes"] and "budget" in rows[2]["notes"]


@pytest.mark.parametrize("args, message", [
    (["--items", "numerics,warp"], "unknown item"),
    (["--budget", "nan"], "--budget must be seconds"),
    (["--threads", "-1"], "--threads must be"),
    (["--results", str(REPO / "bench" / "RESULTS.md")], "must not write bench/RESULTS.md"),
    (["--results", "/nonexistent/folder/r.md"], "does not exist"),
])
def test_bad_options_are_refused_before_any_work(args, message, capsys):
    with pytest.raises(SystemExit, match=message):
        gpu_check.main(TINY + args)


@pytest.mark.slow
def test_diffusers_twin_pipeline_draws_our_images(tiny_model):
    pipe = twins.diffusers_pipeline(tiny_model, OmegaConf.load(TINY_CONFIG).model)
    prompts = ["a red star", "a blue circle on a green background"]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, tiny_model.cond_stage_model.tokenize(prompts))
    x_T = seeds_noise(range(2), tiny_model.latent_shape(32, 32))
    ours = (text_to_image(tiny_model, prompts, x_T, steps=4, scale=5.0).clamp(-1, 1) + 1) / 2
    theirs = pipe(prompts, num_inference_steps=4, guidance_scale=5.0, height=32, width=32, latents=x_T,
                  output_type="pt").images
    assert ours.shape == theirs.shape and (ours - theirs).abs().max() < 1e-4
    assert (ours[0] - ours[1]).abs().max() > 1e-2  # not a constant image
