"""Caption-dataset fine-tuning (ldm/data/captions.py, configs/stable-diffusion/v1-finetune-captions.yaml): both folder
layouts, every bad folder, and main_dream_booth.py training each function form on a tiny caption folder without the
DreamBooth prior."""
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import main_dream_booth
from conftest import REPO
from ldm.checkpoint import load_state_dict
from ldm.data.captions import CaptionDataset
from ldm.data.dreambooth import DataError
from test_train import base_ckpt, metrics, write_images  # noqa: F401  (base_ckpt is a fixture)

BASES = ["configs/tests/tiny-inference.yaml", "configs/stable-diffusion/v1-finetune-captions.yaml"]
TINY_RUN = ["data.params.num_workers=0", "data.params.batch_size=2", "data.params.train.params.size=32",
            "lightning.trainer.max_steps=2", "lightning.trainer.precision=32-true", "lightning.trainer.benchmark=false",
            "lightning.trainer.log_every_n_steps=1", "lightning.trainer.enable_model_summary=false",
            "lightning.modelcheckpoint.params.every_n_train_steps=2",
            "lightning.callbacks.image_logger.params={batch_frequency: 2, max_images: 1, ddim_steps: 2}"]
BOTTLENECK = "model.params.unet_config.params.adapter_config={transformer_adp_config: [{din: attn2o, dout: ffni, " \
             "mid_dim: 8}]}"
FORMS = {"bottleneck": ([], [BOTTLENECK]), "lora": (["configs/lora/lora-attn-r4.yaml"], []),
         "lora-text-encoder": (["configs/lora/lora-unet-te-r4.yaml"], []), "ia3": (["configs/lora/ia3.yaml"], [])}


def captioned(folder: Path, layout: str = "txt", n: int = 3) -> Path:
    """A folder of n images captioned "caption i" by .txt files or by a metadata.jsonl."""
    write_images(folder, n)
    names = sorted(p.name for p in folder.glob("*.png"))
    if layout == "txt":
        for i, name in enumerate(names):
            (folder / name).with_suffix(".txt").write_text(f"caption {i}\n")
    else:
        lines = [json.dumps({"file_name": name, "text": f"caption {i}"}) for i, name in enumerate(names)]
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


# ---- the dataset ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["txt", "metadata"])
def test_each_image_comes_with_its_caption(tmp_path, layout):
    ds = CaptionDataset(captioned(tmp_path, layout), size=32, repeats=2, seed=0)
    assert len(ds) == 6 and ds.prompts == ["caption 0"]
    for i in range(len(ds)):
        item = ds[i]
        assert item["caption"] == f"caption {item['index']}" and item["image"].shape == (3, 32, 32)
    assert sorted({(v["index"], v["caption"]) for v in ds.views()}) == [(i, f"caption {i}") for i in range(3)]


def test_metadata_wins_over_txt_files(tmp_path):
    folder = captioned(tmp_path, "metadata")
    (folder / "subject-0.txt").write_text("from the txt file")
    assert CaptionDataset(folder, size=32).caption(0) == "caption 0"


def write_metadata(folder: Path, *lines: str) -> Path:
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.parametrize("lines,message", [
    (['{"file_name": "subject-0.png", "text": "a"}', '{"file_name": "subject-1.png", "text": "b"}'],
     r"1 image\(s\) in '.*' have no caption, e.g. subject-2.png: add a line .* to metadata.jsonl"),
    (['{"file_name": "subject-0.png", "text": "a"}', '{"file_name": "gone.png", "text": "b"}'],
     r"names 'gone.png', which is not a file in '.*': fix the file_name or remove the line"),
    (['{"file_name": "subject-0.png", "text": "a"}', 'not json'], r"line 2 is not JSON .*one object per line"),
    (['{"file_name": "subject-0.png", "caption": "a"}'], r"line 1 needs the string fields file_name and text"),
    (['{"file_name": "subject-0.png", "text": "a"}', '{"file_name": "subject-0.png", "text": "b"}'],
     r"line 2 names 'subject-0.png' a second time"),
    (['{"file_name": "sub/x.png", "text": "a"}'], r"names 'sub/x.png' in a subfolder: put the images beside"),
])
def test_bad_metadata_is_a_clear_error(tmp_path, lines, message):
    folder = write_images(tmp_path / "d", 3)
    (folder / "sub").mkdir()
    write_images(folder / "sub", 1)
    (folder / "sub" / "subject-0.png").rename(folder / "sub" / "x.png")
    with pytest.raises(DataError, match=message):
        CaptionDataset(write_metadata(folder, *lines), size=32)


def test_other_bad_folders(tmp_path):
    folder = captioned(tmp_path / "txt")
    (folder / "subject-1.txt").unlink()
    (folder / "subject-2.txt").write_text("  \n")  # an empty caption is no caption
    with pytest.raises(DataError, match=r"2 image\(s\) .* have no caption, e.g. subject-1.png, subject-2.png: write "
                                        r"its caption into subject-1.txt beside it"):
        CaptionDataset(folder, size=32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        CaptionDataset(tmp_path / "empty", size=32)
    with pytest.raises(DataError, match="class_word, placeholder_token do\\(es\\) not apply: drop --class_word"):
        CaptionDataset(captioned(tmp_path / "ok"), class_word="dog", placeholder_token="sks")


# ---- training ---------------------------------------------------------------------------------------------------
def argv(folder, ckpt, logs, *extra, fragments=()):
    return ["--base", *[str(REPO / b) for b in BASES + list(fragments)], "--actual_resume", str(ckpt), "-n", "captions",
            "--data_root", str(folder), "--logdir", str(logs), "-t", *TINY_RUN, *extra]


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
def test_every_form_trains_on_a_caption_folder(tmp_path, base_ckpt, form):  # noqa: F811
    fragments, overrides = FORMS[form]
    logdir = main_dream_booth.main(argv(captioned(tmp_path / "data", "metadata"), base_ckpt, tmp_path / "logs",
                                        *overrides, fragments=fragments))
    config = OmegaConf.load(logdir / "config.yaml")
    assert "reg" not in config.data.params and config.data.params.train.target == "ldm.data.captions.CaptionDataset"
    rows = [r for r in metrics(logdir) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [0, 1] and all(not r.get("train/loss_prior") for r in rows)
    weights = load_state_dict(str(logdir / "checkpoints" / "1-adapters" / "adapters.safetensors"))
    assert max(v.abs().max().item() for v in weights.values()) > 0  # zero-initialised parts have moved
    assert any(k.startswith("cond_stage_model.") for k in weights) == (form == "lora-text-encoder")
    state = torch.load(logdir / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 2 and all(".adapters." in k for k in state["state_dict"])
    assert (logdir / "images" / "step-000000.png").is_file()  # the image logger samples the first caption


@pytest.mark.slow
def test_caption_runs_fail_clearly(tmp_path, base_ckpt):  # noqa: F811
    folder = captioned(tmp_path / "data")
    (folder / "subject-2.txt").unlink()
    logs = tmp_path / "logs"
    with pytest.raises(SystemExit, match="have no caption, e.g. subject-2.png"):
        main_dream_booth.main(argv(folder, base_ckpt, logs, fragments=["configs/lora/ia3.yaml"]))
    (folder / "subject-2.txt").write_text("caption 2")
    with pytest.raises(SystemExit, match="drop --class_word"):
        main_dream_booth.main(argv(folder, base_ckpt, logs, "--class_word", "cat", fragments=["configs/lora/ia3.yaml"]))
    with pytest.raises(SystemExit, match="--reg_data_root given but the config has no data.params.reg section"):
        main_dream_booth.main(argv(folder, base_ckpt, logs, "--reg_data_root", str(tmp_path / "reg"),
                                   fragments=["configs/lora/ia3.yaml"]))
    with pytest.raises(SystemExit, match="the model has no adapters"):
        main_dream_booth.main(argv(folder, base_ckpt, logs))
