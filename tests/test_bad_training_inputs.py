"""Bad input to main_dream_booth.py and the Python training API, one row each: one clear line naming the problem (no
traceback, a non-zero exit) or the correct behaviour, and nothing that existed before the call changed (every file
under the test's folder hashed before and after; a refused run leaves no run dir behind)."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from PIL import Image

import main_dream_booth
from conftest import REPO, covering, snapshot
from ldm.models.diffusion import ddpm
from ldm.checks import ConfigError
from ldm.util.instantiate import instantiate_from_config
from ldm.util.targets import resolve_target
from test_train import BASES, argv, base_ckpt, world  # noqa: F401 - fixtures

SUBPROCESS = "lightning.callbacks.evil={target: subprocess.call, params: {args: [touch, PWNED]}}"


def refused(args, message, capsys, root):
    """main_dream_booth.main(args) exits non-zero with one line matching `message` (a flag the common parser of
    ldm/checks.py refuses: `main_dream_booth.py: error: ...`), no traceback; nothing under `root` changed."""
    before = snapshot(root)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main_dream_booth.main(args)
    text = info.value.code
    assert isinstance(text, str) and re.match(r"(main_dream_booth\.py: )?error: ", text), text
    assert len(text.splitlines()) == 1 and "Traceback" not in text and re.search(message, text), text
    assert snapshot(root) == before, "a refused call changed or left files"
    return text


# ---- a run dir to resume, made without training (config.yaml as main_dream_booth.py writes it) ------------------
def fake_run(world, tmp_path, ckpt_bytes=None, config_text=None, **ckpt):
    run = tmp_path / "logs" / "2024-01-01T00-00-00_old"
    (run / "checkpoints").mkdir(parents=True)
    config = OmegaConf.merge(*[OmegaConf.load(REPO / b) for b in BASES])
    config.model.params.ckpt_path = str(world["ckpt"])
    config.data.params.train.params.data_root = str(world["data"])
    del config.data.params["reg"]
    (run / "config.yaml").write_text(config_text if config_text is not None else OmegaConf.to_yaml(config))
    if ckpt_bytes is not None:
        (run / "checkpoints" / "last.ckpt").write_bytes(ckpt_bytes)
    elif ckpt:
        torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    return run


def image(folder: Path, name: str, size) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 128, np.uint8)).save(folder / name)
    return folder


# ---- flags, names and configs: (extra arguments, expected message) ----------------------------------------------
CLI_ROWS = [
    # run names that would leave --logdir or not be a folder name
    (["-n", "../../x"], r"run name '\.\./\.\./x' cannot be the name of a folder under --logdir"),
    (["-n", "a/b"], r"run name 'a/b' cannot be the name of a folder"),
    (["-n", ".."], r"run name '\.\.' cannot be"),
    (["-n", ".hidden"], r"run name '\.hidden' cannot be"),
    (["-n", "my dog"], r"run name 'my dog' cannot be"),
    (["-n", "x" * 101], r"cannot be the name of a folder"),
    # targets: a config is code
    ([SUBPROCESS], r"refused to build target 'subprocess\.call'.*--allow_any_target"),
    (["lightning.callbacks.evil={target: torch.load, params: {f: x.pt, weights_only: false}}"],
     r"refused to build target 'torch\.load'.*--allow_any_target"),
    (["lightning.callbacks.evil={target: torch.distributed.elastic.multiprocessing.subprocess_handler."
      "SubprocessHandler}"], r"refused to build target 'torch\.distributed\..*SubprocessHandler'"),
    (["lightning.callbacks.evil={target: ldm.train.Path, params: {}}"], r"'ldm\.train\.Path' \(pathlib\.Path\)"),
    (["lightning.callbacks.evil={target: ldm.util.nearest}"], r"'ldm\.util\.nearest' \(a function, not a class\)"),
    (["lightning.callbacks.evil={target: os.system, params: {command: 'touch PWNED'}}"], r"'os\.system'"),
    (["model.target=builtins.eval"], r"refused to build target 'builtins\.eval'"),
    (["lightning.callbacks.x={target: ldm.callbacks.NoSuchCallback}"], r"has no attribute 'NoSuchCallback'"),
    # misspelt keys, refused with the nearest valid key
    (["model.params.reg_wieght=0.5"], r"model\.params\.reg_wieght: .*DreamBoothLatentDiffusion has no parameter "
                                      r"'reg_wieght' \(did you mean 'reg_weight'\?\)"),
    (["data.params.batch_sise=2"], r"data\.params\.batch_sise: .*did you mean 'batch_size'"),
    (["data.params.train.params.repeat=3"], r"data\.params\.train\.params\.repeat: .*DreamBoothDataset.*'repeats'"),
    (["lightning.trainer.max_step=3"], r"lightning\.trainer\.max_step: .*did you mean 'max_steps'"),
    (["lightning.modelcheckpoint.params.every_n_train_step=2"], r"did you mean 'every_n_train_steps'"),
    (["lightning.callbacks.image_logger.params.batch_frequncy=2"], r"ImageLogger.*did you mean 'batch_frequency'"),
    (["model.params.unet_config.params.num_head_channel=8"], r"UNetModel has no parameter 'num_head_channel' "
                                                             r"\(did you mean 'num_head_channels'\?\)"),
    (["data.params.class_image_sampler.step=3"], r"class_image_sampler\.step .*did you mean 'steps'"),
    (["model.params.first_stage_config.params.embed_dm=4"], r"did you mean 'embed_dim'"),
    (["model.params.cond_stage_config.params.max_lenght=77"], r"did you mean 'max_length'"),
    # every number range-checked, NaN included
    (["lr=.nan"], r"model\.base_learning_rate must be a finite number > 0, got nan"),
    (["lr=-1e-4"], r"model\.base_learning_rate must be a finite number > 0, got -0\.0001"),
    (["lr=fast"], r"model\.base_learning_rate must be a finite number > 0, got 'fast'"),
    (["data.params.batch_size=0"], r"data\.params\.batch_size must be an integer >= 1, got 0"),
    (["data.params.batch_size=1.5"], r"data\.params\.batch_size must be an integer >= 1, got 1\.5"),
    (["--max_steps", "-5"], r"max_steps \(--max_steps\) must be an integer >= 1 \(or -1: no limit\), got -5"),
    (["--max_steps", "0"], r"max_steps \(--max_steps\) must be an integer >= 1 \(or -1: no limit\), got 0"),
    (["lightning.trainer.max_steps=.inf"], r"max_steps .*must be an integer >= 1 \(or -1: no limit\), got inf"),
    (["lightning.trainer.max_epochs=0"], r"max_epochs must be an integer >= 1 \(or -1: no limit\), got 0"),
    (["data.params.train.params.size=0"], r"data\.params\.train\.params\.size must be an integer >= 8, got 0"),
    (["data.params.reg.params.size=-32"], r"data\.params\.reg\.params\.size must be an integer >= 8, got -32"),
    (["data.params.train.params.repeats=0"], r"repeats must be an integer >= 1, got 0"),
    (["data.params.train.params.flip_p=1.5"], r"flip_p must be a finite number in \[0, 1\], got 1\.5"),
    (["model.params.reg_weight=-1"], r"model\.params\.reg_weight must be a finite number >= 0, got -1"),
    (["model.params.reg_weight=.nan"], r"reg_weight must be a finite number >= 0, got nan"),
    (["model.params.lr_warmup_steps=-3"], r"lr_warmup_steps must be an integer >= 0, got -3"),
    (["model.params.text_encoder_lr=0"], r"text_encoder_lr must be a finite number > 0 \(or null\), got 0"),
    (["model.params.adam_epsilon=0"], r"adam_epsilon must be a finite number > 0, got 0"),
    (["model.params.adam_weight_decay=-0.1"], r"adam_weight_decay must be a finite number >= 0"),
    (["model.params.timesteps=0"], r"timesteps must be an integer >= 1, got 0"),
    (["model.params.linear_start=0"], r"linear_start must be a finite number in \(0, 1\), got 0"),
    (["data.params.num_class_images=-1"], r"num_class_images must be an integer >= 0, got -1"),
    (["data.params.num_workers=-2"], r"num_workers must be an integer >= 0, got -2"),
    (["data.params.reg_batch_size=0"], r"reg_batch_size must be an integer >= 1 \(or null\), got 0"),
    (["lightning.modelcheckpoint.params.every_n_train_steps=0"], r"every_n_train_steps must be an integer >= 1"),
    (["lightning.trainer.accumulate_grad_batches=0"], r"accumulate_grad_batches must be an integer >= 1"),
    (["lightning.trainer.gradient_clip_val=-1"], r"gradient_clip_val must be a finite number >= 0"),
    (["lightning.callbacks.image_logger.params.ddim_steps=0"], r"image_logger\.params\.ddim_steps must be an integer"),
    (["lightning.callbacks.image_logger.params.max_images=0"], r"max_images must be an integer >= 1"),
    (["--accelerator", "tpu"], r"accelerator 'tpu' is not available on this machine: pass --accelerator cpu"),
    (["--accelerator", "tensor-core"], r"accelerator 'tensor-core' is not one of auto, cpu, .*gpu"),
    (["--precision", "8-bit"], r"precision '8-bit' is not one of 32-true"),
    (["--devices", "0"], r"devices \(--devices\) must be at least 1"),
    (["--num_nodes", "0"], r"num_nodes \(--num_nodes\) must be an integer >= 1, got 0"),
    # the common parser checks the seed as it parses (ldm.checks.seed_int); the Python API checks it before any work
    (["-s", "-1"], r"--seed: must be an integer in \[0, 4294967295\], got '-1'"),
    (["-s", str(2 ** 32)], r"--seed: must be an integer in \[0, 4294967295\], got '4294967296'"),
    # settings that are not numbers
    (["model.params.train_level=[adaptor]"],
     r"train_level .*'adaptor'.* is not valid: a list of \['adapter', 'unet'\]"),
    (["model.params.adam_betas=[0.9, 1.5]"], r"each of adam_betas must be a finite number in \[0, 1\), got 1\.5"),
    (["data.params.class_image_sampler.steps=0"], r"class_image_sampler\.steps must be an integer >= 1, got 0"),
    # argparse: a typo is not a config override, a count is a number
    (["--dataroot", "x"], r"unrecognized arguments: --dataroot"),
    (["--max_steps", "many"], r"argument --max_steps: invalid int value: 'many'"),
    (["--scale_lr", "maybe"], r"expected a boolean \(True/False\), got 'maybe'"),
]


def root(extra, message) -> str:
    """What a row sets: a flag, or a config root (model, data, lightning, an alias)."""
    return "flag" if extra[0].startswith("-") else extra[0].split(".")[0].split("=")[0]


# make test-fast: one row of each root
@pytest.mark.parametrize("extra,message", covering(CLI_ROWS, root),
                         ids=[f"{i:02d}-{r[0][0][:40]}" for i, r in enumerate(CLI_ROWS)])
def test_bad_flags_and_configs(world, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    refused(argv(world, *extra), message, capsys, tmp_path)
    assert not (tmp_path / "PWNED").exists()


def test_accelerator_gpu_without_cuda(world, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    refused(argv(world, "--accelerator", "gpu"), r"accelerator 'gpu' is not available on this machine", capsys,
            tmp_path)


# ---- files: configs, checkpoints, base weights, images ----------------------------------------------------------
def test_yaml_syntax_errors_name_the_file(world, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  params: [1,\n")
    refused(argv(world, "--base", str(bad)), r"config file '.*bad\.yaml' is not valid YAML", capsys, tmp_path)
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    refused(argv(world, "--base", str(tmp_path / "list.yaml")), r"must hold a mapping", capsys, tmp_path)
    refused(argv(world, "--base", str(tmp_path / "nowhere.yaml")), r"config file not found: '.*nowhere\.yaml'",
            capsys, tmp_path)
    run = fake_run(world, tmp_path, config_text="model: {target: [\n")
    refused(["-r", str(run), "-t"], r"config file '.*config\.yaml' is not valid YAML", capsys, tmp_path)


@pytest.mark.parametrize("content,message", [
    (b"", r"last\.ckpt': the file is empty \(0 bytes\).*move it away to train the run again from step 0"),
    (b"\x80\x02garbage" * 50, r"last\.ckpt': the file is truncated, corrupt or not a checkpoint.*move it away"),
    (None, r"last\.ckpt' is not a main_dream_booth\.py training checkpoint"),
], ids=["zero-byte", "corrupt", "not-a-training-checkpoint"])
def test_unreadable_last_ckpt_on_resume(world, tmp_path, capsys, content, message):
    run = fake_run(world, tmp_path, content) if content is not None else fake_run(world, tmp_path, weights=[1, 2])
    refused(["-r", str(run), "-t"], message, capsys, tmp_path)


def test_resuming_a_run_whose_config_runs_a_program(world, tmp_path, capsys, monkeypatch):
    """The issue's case: a downloaded run dir with a callback `target: subprocess.call` must not run it."""
    monkeypatch.chdir(tmp_path)
    run = fake_run(world, tmp_path)
    config = OmegaConf.load(run / "config.yaml")
    config.lightning.callbacks.evil = {"target": "subprocess.call", "params": {"args": ["touch", "PWNED"]}}
    (run / "config.yaml").write_text(OmegaConf.to_yaml(config))
    refused(["-r", str(run), "-t"], r"refused to build target 'subprocess\.call'.*pass --allow_any_target",
            capsys, tmp_path)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("name,write,message", [
    ("zero-byte", lambda p: p.write_bytes(b""), r"'.*base\.safetensors': the file is empty \(0 bytes\)"),
    ("missing", None, r"base weights not found: '.*base\.safetensors'"),
    ("text", lambda p: p.write_text("not weights " * 100), r"base\.safetensors': the file is truncated, corrupt"),
    ("zero-byte-ckpt", lambda p: p.write_bytes(b""), r"'.*base\.ckpt': the file is empty"),
])
def test_bad_base_weights(world, tmp_path, capsys, name, write, message):
    path = tmp_path / ("base.ckpt" if name.endswith("ckpt") else "base.safetensors")
    if write:
        write(path)
    refused(argv({**world, "ckpt": path}), message, capsys, tmp_path)


@pytest.mark.parametrize("size,message", [((1, 1), r"'.*tiny\.png' is 1x1 pixels: training images need at least 8 px"),
                                          ((6000, 6), r"'.*tiny\.png' is 6000x6 pixels")], ids=["1x1", "6000x6"])
def test_images_too_small_are_refused_with_their_name(world, tmp_path, capsys, size, message):
    image(world["data"], "tiny.png", size)
    refused(argv(world), message, capsys, tmp_path)


# ---- the Python API ---------------------------------------------------------------------------------------------
def test_python_api_refusals(world, tmp_path):
    from ldm.data.datamodule import DataModuleFromConfig
    from ldm.data.dreambooth import DataError, DreamBoothDataset
    from ldm.train import run
    before = snapshot(tmp_path)
    rows = [
        (lambda: DreamBoothDataset(world["data"], size=0), ConfigError, r"size must be an integer >= 8, got 0"),
        (lambda: DreamBoothDataset(world["data"], repeats=0), ConfigError, r"repeats must be an integer >= 1"),
        (lambda: DreamBoothDataset(world["data"], flip_p=float("nan")), ConfigError, r"flip_p .* got nan"),
        (lambda: DataModuleFromConfig(batch_size=0, train={}), ConfigError, r"batch_size must be an integer >= 1"),
        (lambda: DataModuleFromConfig(batch_size=1, train={}, batch_sise=2), ConfigError,
         r"no parameter 'batch_sise' \(did you mean 'batch_size'\?\)"),
        (lambda: DataModuleFromConfig(batch_size=1, train={}, class_image_sampler={"steps": -1}), ConfigError,
         r"class_image_sampler\.steps must be an integer >= 1"),
        (lambda: instantiate_from_config({"target": "subprocess.call", "params": {"args": ["true"]}}), ConfigError,
         r"refused to build target 'subprocess\.call'"),
        (lambda: instantiate_from_config({"target": "ldm.data.datamodule.DataModuleFromConfig",
                                          "params": {"batch_size": 1, "trian": {}}}), ConfigError,
         r"params\.trian: .*did you mean 'train'"),
        (lambda: instantiate_from_config("a string"), ConfigError, r"expected a config with a 'target' key"),
        (lambda: instantiate_from_config({"target": "torch.nn.Identity", "params": [1]}), ConfigError,
         r"must be a mapping of keyword arguments"),
        (lambda: run(main_dream_booth.parse_args(argv(world, "lr=.nan"))), ConfigError,
         r"base_learning_rate must be a finite number > 0"),
        (lambda: run(main_dream_booth.parse_args(argv(world, "-n", "../x"))), ConfigError, r"run name '\.\./x'"),
        (lambda: DreamBoothDataset(image(tmp_path / "one", "a.png", (4, 64))), DataError, r"a\.png' is 4x64 pixels"),
    ]
    for make, error, message in rows:
        with pytest.raises(error, match=message):
            make()
    for leftover in (tmp_path / "one",):  # the image this test wrote itself
        for p in leftover.iterdir():
            p.unlink()
        leftover.rmdir()
    assert snapshot(tmp_path) == before


def test_model_params_are_checked_before_anything_is_built(monkeypatch):
    config = OmegaConf.merge(*[OmegaConf.load(REPO / b) for b in BASES])
    params = OmegaConf.to_container(config.model.params)
    built = []
    monkeypatch.setattr(ddpm, "DiffusionWrapper", lambda *a, **k: built.append(1))
    for bad, message in ((dict(reg_wieght=0.5), r"no parameter 'reg_wieght' \(did you mean 'reg_weight'\?\)"),
                         (dict(reg_weight=float("inf")), r"reg_weight must be a finite number >= 0, got inf"),
                         (dict(linear_end=0.0001), r"linear_end \(0\.0001\) must be above linear_start"),
                         (dict(adam_betas=[0.9]), r"adam_betas must be two numbers")):
        with pytest.raises(ConfigError, match=message):
            resolve_target(config.model.target)(**{**params, **bad})
    assert not built  # refused before the UNet was built or any weights loaded


def test_image_size_warnings_name_the_files(tmp_path, caplog):
    from ldm.data.dreambooth import DreamBoothDataset
    folder = image(tmp_path / "data", "wide.png", (400, 40))
    image(folder, "small.png", (12, 12))
    image(folder, "fine.png", (64, 64))
    caplog.set_level("WARNING", logger="ldm")
    DreamBoothDataset(folder, size=64)
    assert "aspect ratio over 4:1" in caplog.text and "wide.png (400x40)" in caplog.text
    assert "upscaled more than 4x to 64 px" in caplog.text and "small.png (12x12)" in caplog.text
    assert "fine.png" not in caplog.text


# ---- what is accepted -------------------------------------------------------------------------------------------
class MarkerPlCallback(pl.Callback):
    """A user's own Lightning callback: writes MARKED in the working folder when built."""

    def __init__(self, text: str = "built"):
        Path("MARKED").write_text(text)


def test_own_code_with_the_flag_and_original_compvis_keys_are_accepted(world, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    own = "lightning.callbacks.mine={target: test_bad_training_inputs.MarkerPlCallback, params: {text: hi}}"
    compvis = ["model.params.monitor=val/loss_simple_ema", "model.params.log_every_t=200", "data.params.wrap=false",
               "lightning.callbacks.image_logger.params.increase_log_steps=false"]
    refused(argv(world, own, *compvis, reg=False, train=False), r"refused to build target "
            r"'test_bad_training_inputs\.MarkerPlCallback'.*--allow_any_target", capsys, tmp_path)
    assert not (tmp_path / "MARKED").exists()  # refused before its module was even imported
    logdir = main_dream_booth.main(argv(world, own, *compvis, "--allow_any_target", reg=False, train=False))
    assert (tmp_path / "MARKED").read_text() == "hi"
    assert OmegaConf.load(logdir / "config.yaml").model.params.monitor == "val/loss_simple_ema"


def test_train_stats_of_sessions_feed_evaluate(tmp_path):
    """evaluate.py copies the accumulated totals (all sessions) into results.csv."""
    from ldm.evaluation.evaluate import train_stats
    stats = {"steps": 240, "seconds": 100.0, "steps_per_second": 2.4, "sessions": [
        {"start_step": 0, "end_step": 235, "steps": 235, "seconds": 98.0},
        {"start_step": 235, "end_step": 240, "steps": 5, "seconds": 2.0}]}
    (tmp_path / "train_stats.json").write_text(json.dumps(stats))
    assert train_stats(tmp_path) == {"train_seconds": 100.0, "train_steps": 240, "train_steps_per_second": 2.4}


def test_a_sweep_file_cannot_allow_any_target(tmp_path):
    """Only the person running scripts/sweep.py can pass --allow_any_target on; a sweep file is refused trying."""
    from ldm.sweep.runs import plan
    from ldm.sweep.spec import SweepError
    from test_sweep import spec_of, write_spec
    for setting in ("allow_any_target=true", "--allow_any_target=true"):
        spec = write_spec(tmp_path / "s.yaml", spec_of({"seed": {"key": "seed", "levels": [0]}}, [setting]))
        with pytest.raises(SweepError, match="allow_any_target"):
            plan(str(spec), str(tmp_path / "sw"))
    assert not (tmp_path / "sw").exists()
