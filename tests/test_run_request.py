"""RunRequest: one definition of a training run. The command line is generated from it and parses back into it, the
sweep launcher and the demo hand requests to the one training entry, no flag is spelled twice, the alias help comes
from where the aliases are defined, and `python -m ldm.train` is main_dream_booth.py's command line."""
import ast
import subprocess
import sys
from dataclasses import fields, replace

import pytest
from omegaconf import OmegaConf

import main_dream_booth
from conftest import REPO
from test_train import BASES
from ldm.checks import ConfigError
from ldm.config import KEY_ALIASES, alias_names
from ldm.train import RunRequest, parse_args, run
from ldm.train.request import (CONFIG_OPTIONS, NEXT, PATH_OPTIONS, RUN_OPTIONS, SWEEP_OPTIONS, alias_help, flags,
                               with_options, write_option)

FULL = RunRequest(base=("a.yaml", "b.yaml"), overrides=("lr=3e-4", "mid_dim=8"), resume="logs/x", train=True,
                  actual_resume="sd.ckpt", name="dog", seed=7, logdir="out", data_root="data/dog",
                  reg_data_root="data/class", class_word="dog", scale_lr=True, max_steps=12, allow_any_target=True,
                  gpus="0,", accelerator="gpu", devices=2, num_nodes=1, strategy="ddp", precision="bf16-mixed")


def test_a_request_and_its_command_line_round_trip():
    assert main_dream_booth.parse_args(FULL.to_argv()) == FULL
    assert main_dream_booth.parse_args(RunRequest().to_argv()) == RunRequest()
    assert RunRequest().to_argv() == []
    assert RunRequest(resume="r", train=True, seed=2).to_argv() == ["-r", "r", "-t", "-s", "2"]
    # overrides may come anywhere, also after --base (which takes every following word)
    request = main_dream_booth.parse_args(["--base", "a.yaml", "lr=1e-3", "-t", "steps=5"])
    assert request.base == ("a.yaml",) and request.overrides == ("lr=1e-3", "steps=5") and request.train


def test_several_runs_on_one_command_line_are_a_pack():
    requests = parse_args(["-b", "a.yaml", "-s", "1", NEXT, "-b", "b.yaml", "lr=1"])
    assert [r.base for r in requests] == [("a.yaml",), ("b.yaml",)] and requests[0].seed == 1
    assert requests[1].overrides == ("lr=1",) and requests[1].seed == 23
    with pytest.raises(SystemExit, match="none of them may be empty"):
        parse_args(["-b", "a.yaml", NEXT])


def test_each_flag_is_declared_once_and_the_sweep_keys_come_from_it():
    names = [n for f in flags() for n in f.metadata["names"]]
    assert len(names) == len(set(names))
    assert set(SWEEP_OPTIONS) == set(CONFIG_OPTIONS) | set(RUN_OPTIONS)
    assert set(CONFIG_OPTIONS) == {"data_root", "reg_data_root", "class_word", "actual_resume", "max_steps"}
    assert set(PATH_OPTIONS) == {"data_root", "reg_data_root", "actual_resume"}
    assert "allow_any_target" not in SWEEP_OPTIONS and "resume" not in SWEEP_OPTIONS  # a sweep file cannot set them
    # no module of the library lists flag names of its own any more
    for path in [*(REPO / "ldm").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple):
                values = {getattr(e, "value", None) for e in node.value.elts}
                assert not {"seed", "scale_lr", "gpus"} <= values, f"{path}: a second list of flags"


def test_config_options_write_where_the_request_says():
    config = OmegaConf.create({"data": {"params": {"train": {"params": {}}}}})
    RunRequest(data_root="d", class_word="cat", actual_resume="w", max_steps=3).apply_to(config)
    assert config.data.params.train.params == {"data_root": "d", "class_word": "cat"}  # no reg section: skipped
    assert config.model.params.ckpt_path == "w" and config.lightning.trainer.max_steps == 3
    with pytest.raises(ConfigError, match="--reg_data_root given but the config has no data.params.reg section"):
        write_option(config, "reg_data_root", "r")
    assert with_options(RunRequest(), {"seed": 3, "precision": "32"}) == RunRequest(seed=3, precision="32")
    with pytest.raises(ConfigError, match="'name' is not a run option"):
        with_options(RunRequest(), {"name": "x"})


def test_the_alias_help_lists_every_alias_from_the_registry(capsys):
    text = " ".join(alias_help().split())
    for alias in alias_names():
        assert f"{alias} (" in text, alias
    for alias in ("rank", "alpha", "target", "dropout", "on_input", "init", "din", "dout", "mid_dim", "method"):
        assert f" {alias} (" in text
    assert "rank (dora, locon, loha, lokr, lora)" in text and "on_input (ia3)" in text and "scale (every form)" in text
    assert all(key in text for key in KEY_ALIASES.values())
    with pytest.raises(SystemExit):
        main_dream_booth.main(["--help"])
    assert "rank (dora, locon, loha, lokr, lora)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.slow
def test_python_m_ldm_train_is_the_same_command_line():
    result = subprocess.run([sys.executable, "-m", "ldm.train", "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0 and "--actual_resume" in result.stdout and "python -m ldm.train" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "ldm.train", "--dataroot", "x"], cwd=REPO, capture_output=True,
                         text=True)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "python -m ldm.train: error: unrecognized arguments: --dataroot x (config overrides are written KEY=VALUE) "
        "(see python -m ldm.train --help)"]


def test_the_python_api_checks_what_the_parser_checks(tmp_path):
    with pytest.raises(ConfigError, match=r"--seed must be an integer in \[0, 4294967295\], got -1"):
        run(RunRequest(base=tuple(str(REPO / b) for b in BASES), seed=-1, logdir=str(tmp_path)))
    assert not any(tmp_path.iterdir())
    assert {f.name for f in fields(RunRequest)} >= {f.name for f in flags()}
    with pytest.raises(Exception):
        replace(RunRequest(), seed=1).seed = 2  # frozen: read, never written
