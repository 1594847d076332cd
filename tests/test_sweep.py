"""Design-space sweeps: grid expansion with invalid combinations dropped, aliases, the sweep folder and its markers,
a resumable sweep of tiny trainings (one run crashes, the rerun skips the finished run and retries it), job lists,
and bad input."""
import json
import os
import re
import socket
import time
from dataclasses import fields
from pathlib import Path

import pytest
import pytorch_lightning as pl
import yaml
from omegaconf import OmegaConf

from conftest import REPO
from ldm.sweep import launch
from ldm.sweep.runs import DONE, FAILED, RUNNING, load_runs, prepare, run_state, summary
from ldm.sweep.spec import SweepError, check_spec, config_keys, expand, load_spec, spec_hash
from ldm.train.request import RunRequest
from scripts import sweep as sweep_script

TINY = [str(REPO / b) for b in ("configs/tests/tiny-inference.yaml",
                                "configs/stable-diffusion/v1-finetune-dreambooth.yaml",
                                "configs/tests/tiny-dreambooth.yaml")]
ADAPTERS = "model.params.unet_config.params.adapter_config"


def spec_of(factors, overrides=(), rules=None):
    spec = {"base": TINY, "overrides": list(overrides), "factors": factors}
    return {**spec, "rules": rules} if rules else spec


def write_spec(path: Path, spec) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def adapters_of(run):
    return OmegaConf.to_container(OmegaConf.select(run.config, ADAPTERS))


# ---- the grid ---------------------------------------------------------------------------------------------------
def test_grid_drops_invalid_pairs_with_the_adapter_schemas_reason(caplog):
    caplog.set_level("INFO", logger="ldm.sweep")
    grid = expand(spec_of({"din": {"key": "din", "levels": ["attn1i", "attn2o", "attn2c", "resi"]},
                           "dout": {"key": "dout", "levels": ["ffni", "attn2c", "reso"]},
                           "seed": {"key": "seed", "levels": [0, 1]}}))
    names = [r.name for r in grid.runs]
    assert names == [f"din-{i}_dout-{o}_seed-{s}" for i, o in [("attn1i", "ffni"), ("attn2o", "ffni"),
                                                               ("attn2c", "attn2c"), ("resi", "reso")]
                     for s in (0, 1)]
    assert len(grid.dropped) == 4 * 3 * 2 - 8
    reasons = {(lv["din"], lv["dout"]): r for lv, r in grid.dropped}
    assert "not a valid pair" in reasons[("attn2o", "attn2c")]
    assert "unknown position 'ffni' for resblock adapters" in reasons[("resi", "ffni")]  # the schema's own words
    assert "dropped {'din': 'attn1i', 'dout': 'attn2c', 'seed': 0}" in caplog.text
    assert "16 of 24 combinations dropped" in caplog.text
    # ResBlock positions move the entry to resblock_adp_config; the seed is a main_dream_booth.py flag
    res = next(r for r in grid.runs if r.levels["din"] == "resi")
    assert list(adapters_of(res)) == ["resblock_adp_config"]  # one entry: a mapping, as the paper writes it
    assert adapters_of(res)["resblock_adp_config"]["mid_dim"] == 8 and res.flags == {"seed": 0}
    pair = next(r for r in grid.runs if r.levels["din"] == "attn2o")
    assert adapters_of(pair)["transformer_adp_config"][0] == {
        "type": "inout", "din": "attn2o", "dout": "ffni", "mid_dim": 8, "method": "default", "scale": 1.0,
        "init": "zero"}


def test_aliases_keys_flags_mapping_levels_and_rules(tmp_path):
    spec = spec_of({"method": {"key": "method", "levels": ["relu", "silu"]},
                    "lr": {"key": "lr", "levels": [1e-4]},
                    "steps": {"key": "steps", "levels": [7]},
                    "reg": {"key": "model.params.reg_weight", "levels": [0.5]},
                    "subject": {"levels": {"cat": {"data_root": "cat", "class_word": "cat"},
                                           "dog": {"data_root": str(tmp_path / "dog"), "class_word": "dog"}}}},
                   overrides=["data_root=default", "scale_lr=False", "mid_dim=4", "model.params.text_encoder_lr=5e-5",
                              "lightning.callbacks.image_logger.params.disabled=true"],
                   rules=[{"when": {"method": "silu", "subject": "dog"}, "set": {"scale": 0.5}}])
    grid = expand(spec, root=tmp_path)
    assert len(grid.runs) == 4 and not grid.dropped
    run = {r.name: r for r in grid.runs}["method-silu_lr-0.0001_steps-7_reg-0.5_subject-dog"]
    c = run.config
    assert c.model.base_learning_rate == 1e-4 and c.lightning.trainer.max_steps == 7
    assert c.model.params.text_encoder_lr == 5e-5  # 5e-5 is a float, though YAML 1.1 reads it as text
    assert c.model.params.reg_weight == 0.5 and c.lightning.callbacks.image_logger.params.disabled is True
    assert c.data.params.train.params.data_root == str(tmp_path / "dog")
    assert c.data.params.train.params.class_word == c.data.params.reg.params.class_word == "dog"
    entry = adapters_of(run)["transformer_adp_config"][0]
    assert (entry["method"], entry["mid_dim"], entry["scale"]) == ("silu", 4, 0.5)  # fixed override, then the rule
    cat = {r.name: r for r in grid.runs}["method-silu_lr-0.0001_steps-7_reg-0.5_subject-cat"]
    assert cat.config.data.params.train.params.data_root == str(tmp_path / "cat")  # relative to the root
    assert adapters_of(cat)["transformer_adp_config"][0]["scale"] == 1.0
    assert run.flags == {"scale_lr": False}


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted((REPO / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_sweep_files_in_configs_expand(path):
    assert expand(load_spec(path), root=REPO).runs


@pytest.mark.slow
def test_position_pairs_reproduces_the_papers_configs():
    """The example sweep: 20 valid pairs x 2 seeds, each with exactly the model of configs/sd-inject-dreambooth/."""
    grid = expand(load_spec(REPO / "configs/sweeps/position-pairs.yaml"), root=REPO)
    assert len(grid.runs) == 40 and len(grid.dropped) == 100
    pairs = {f"{r.levels['din']}-{r.levels['dout']}" for r in grid.runs}
    committed = sorted(p.stem for p in (REPO / "configs/sd-inject-dreambooth").glob("*.yaml"))
    assert sorted(pairs) == committed
    for run in grid.runs:
        paper = OmegaConf.load(REPO / f"configs/sd-inject-dreambooth/{run.levels['din']}-{run.levels['dout']}.yaml")
        assert OmegaConf.select(run.config, ADAPTERS) == OmegaConf.select(paper, ADAPTERS), run.name
        assert {k: v for k, v in run.config.model.params.items() if k != "ckpt_path"} == paper.model.params
    assert {r.flags["seed"] for r in grid.runs} == {0, 1}


@pytest.mark.slow
def test_tiny_world_study_expands_to_40_runs_that_build():
    """The tiny-world study: the same 20 pairs x 2 seeds on the tiny base model and the demo subject, each run's model
    builds (meta device, base weights left out), with the adapter sizes the sweep file states."""
    import torch
    from ldm.modules.adapters import adapter_parameters
    from ldm.util.instantiate import instantiate_from_config
    grid = expand(load_spec(REPO / "configs/sweeps/tiny-world-position-pairs.yaml"), root=REPO)
    paper = expand(load_spec(REPO / "configs/sweeps/position-pairs.yaml"), root=REPO)
    assert len(grid.runs) == 40 and [r.levels for r in grid.runs] == [r.levels for r in paper.runs]
    sizes = {("resi", "resi"): 73_676, ("resi", "reso"): 61_516, ("reso", "reso"): 71_202, ("attn2c", "attn2c"): 34_048}
    built = {}
    for run in grid.runs:
        c, pair = run.config, (run.levels["din"], run.levels["dout"])
        assert c.model.params.ckpt_path == str(REPO / "models/ldm/tiny-sd-v1/model.safetensors")
        assert c.data.params.train.params.data_root == str(REPO / "assets/tiny-world/sks-star")
        assert c.data.params.reg.params.data_root == str(REPO / "outputs/tiny-world-study/class-images")
        assert c.data.params.train.params.class_word == c.data.params.reg.params.class_word == "star"
        assert c.lightning.trainer.max_steps == 150 and c.data.params.train.params.size == 64
        assert run.flags == {"seed": run.levels["seed"]}  # the seeds of a pair differ only in main_dream_booth.py -s
        if pair in built:
            assert c == built[pair], run.name
            continue
        built[pair] = c
        model_config = OmegaConf.masked_copy(c.model, ["target", "params"])
        del model_config.params["ckpt_path"]  # the base weights are not needed to build (nor part of the repo)
        with torch.device("meta"):
            model = instantiate_from_config(model_config)
        assert sum(p.numel() for p in adapter_parameters(model)) == sizes.get(pair, 28_768), run.name
    assert len(built) == 20
    assert (REPO / "assets/tiny-world/sks-star").is_dir()


# ---- bad input --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factors,message", [
    ({"x": {"key": "model.params.no_such_key", "levels": [1]}}, "unknown key 'model.params.no_such_key'"),
    ({"x": {"key": "dinn", "levels": ["attn1i"]}}, "unknown key 'dinn'.*alias"),
    ({"x": {"key": "din", "levels": []}}, "non-empty list"),
    ({"x": {"key": "din", "levles": ["a"]}}, "expected"),
    ({"x": {"key": "seed", "levels": [1, 1]}}, "lists a level twice"),
    ({"x": {"levels": ["a", "b"]}}, "has no 'key'"),
])
def test_bad_factors(factors, message):
    with pytest.raises(SweepError, match=message):
        expand(spec_of(factors))


def test_a_run_request_flag_that_writes_config_keys_is_one_setting_with_them():
    """Every RunRequest field with a ConfigKey is in the sweep's mapping with the keys it declares, so two factors
    setting one of them under either spelling are refused (--class_word writes two keys)."""
    declared = {f.name: tuple(target.key for target in f.metadata["config"])
                for f in fields(RunRequest) if f.metadata.get("config")}
    assert {"max_steps", "data_root", "reg_data_root", "actual_resume", "class_word"} <= set(declared)
    for name, keys in declared.items():
        assert config_keys(name) == keys
        for key in keys:
            with pytest.raises(SweepError, match=f"factors 'flag' and 'key' both set {re.escape(key)}"):
                check_spec(spec_of({"flag": {"key": name, "levels": ["a"]}, "key": {"key": key, "levels": ["b"]}}))


def test_no_valid_combination_and_adapters_missing():
    with pytest.raises(SweepError, match="no valid combination: all 2 were dropped .*not a valid pair"):
        expand(spec_of({"din": {"key": "din", "levels": ["ffno", "transo"]}, "dout": {"key": "dout",
                                                                                       "levels": ["attn1i"]}}))
    no_adapters = {"base": TINY[:2], "factors": {"din": {"key": "din", "levels": ["attn1i"]}}}
    with pytest.raises(SweepError, match="has none under model.params.unet_config"):
        expand(no_adapters)


def test_bad_spec_files(tmp_path):
    with pytest.raises(SweepError, match="sweep file not found"):
        load_spec(tmp_path / "none.yaml")
    with pytest.raises(SweepError, match="unknown key.*factorz"):
        load_spec(write_spec(tmp_path / "a.yaml", {"base": TINY, "factorz": {}}))
    with pytest.raises(SweepError, match="'base' must be a list"):
        load_spec(write_spec(tmp_path / "b.yaml", {"base": "x.yaml", "factors": {"s": {"key": "seed", "levels": [0]}}}))
    with pytest.raises(SweepError, match="base config.*not found"):
        expand(spec_of({"s": {"key": "seed", "levels": [0]}}) | {"base": ["nowhere.yaml"]}, root=tmp_path)
    with pytest.raises(SweepError, match="rules\\[0\\].when names unknown factor"):
        expand(spec_of({"s": {"key": "seed", "levels": [0]}}, rules=[{"when": {"t": 1}, "set": {"scale": 1}}]))


# ---- the sweep folder -------------------------------------------------------------------------------------------
def small_spec(tmp_path, **extra):
    return write_spec(tmp_path / "sweep.yaml", spec_of({"din": {"key": "din", "levels": ["attn2o", "attn2c"]},
                                                        "dout": {"key": "dout", "levels": ["ffni", "attn2c"]}},
                                                       **extra))


def test_a_folder_holding_only_hidden_files_takes_a_sweep(tmp_path):
    """scripts/tiny_world_study.sh stamps the sweep folder with its base model's hash before the sweep starts."""
    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / ".base-model.sha256").write_text("0" * 64)
    assert len(prepare(str(small_spec(tmp_path)), str(tmp_path / "sw"))) == 2
    (tmp_path / "sw2").mkdir()
    (tmp_path / "sw2" / "notes.txt").write_text("mine")
    with pytest.raises(SweepError, match=r"holds other files \(notes.txt\)"):
        prepare(str(small_spec(tmp_path)), str(tmp_path / "sw2"))


def test_prepare_writes_runs_and_refuses_another_sweep(tmp_path):
    spec = small_spec(tmp_path)
    runs = prepare(str(spec), str(tmp_path / "sw"))
    assert [r.name for r in runs] == ["din-attn2o_dout-ffni", "din-attn2c_dout-attn2c"]
    manifest = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert manifest["spec_hash"] == spec_hash(load_spec(spec)) and len(manifest["dropped"]) == 2
    levels = json.loads((runs[0].dir / "levels.json").read_text())
    assert levels["levels"] == {"din": "attn2o", "dout": "ffni"} and levels["sweep"] == manifest["spec_hash"]
    config = OmegaConf.load(runs[0].dir / "config.yaml")
    assert config.lightning.callbacks.sweep_marker.target == "ldm.sweep.runs.RunMarker"
    assert summary(runs)["pending"] == [r.name for r in runs]
    assert prepare(str(spec), str(tmp_path / "sw"))[1].name == runs[1].name  # same sweep again: fine
    other = write_spec(tmp_path / "other.yaml", spec_of({"din": {"key": "din", "levels": ["attn2o"]}}))
    with pytest.raises(SweepError, match="holds another sweep .*pass another --sweep_dir"):
        prepare(str(other), str(tmp_path / "sw"))
    # a run folder copied in from another sweep is refused too
    (tmp_path / "sw2" / "runs").mkdir(parents=True)
    prepare(str(other), str(tmp_path / "sw2"))
    foreign = tmp_path / "sw3" / "runs" / "din-attn2o_dout-ffni"
    foreign.mkdir(parents=True)
    (foreign / "levels.json").write_text(json.dumps({"sweep": "0123456789abcdef"}))
    with pytest.raises(SweepError, match="run folder .* belongs to another sweep"):
        prepare(str(spec), str(tmp_path / "sw3"))


def test_states_from_markers(tmp_path):
    runs = prepare(str(small_spec(tmp_path)), str(tmp_path / "sw"))
    run = runs[0].dir
    assert run_state(run) == "pending"
    (run / RUNNING).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "updated": time.time()}))
    assert run_state(run) == "running"
    # a killed process leaves its running marker behind: its pid is gone, so the run counts as failed
    (run / RUNNING).write_text(json.dumps({"host": socket.gethostname(), "pid": 2 ** 22 + 12345}))
    assert run_state(run) == "failed"
    # on another host only the heartbeat tells
    (run / RUNNING).write_text(json.dumps({"host": "elsewhere", "pid": 1, "updated": time.time() - 7200}))
    assert run_state(run) == "failed"
    (run / RUNNING).unlink()
    (run / FAILED).write_text("{}")
    assert run_state(run) == "failed"
    (run / DONE).write_text("{}")
    assert run_state(run) == "done"


@pytest.mark.slow
def test_jobs_and_run_index(tmp_path, capsys, monkeypatch):
    weights = tmp_path / "base.safetensors"
    spec = small_spec(tmp_path, overrides=[f"actual_resume={weights}"])
    sweep = tmp_path / "sw"
    with pytest.raises(SystemExit, match=f"error: base weights not found: '{weights}'"):
        sweep_script.main([str(spec), "--sweep_dir", str(sweep), "--print_jobs"])
    with pytest.raises(SystemExit, match="sets no base weights: add actual_resume=FILE"):
        no_weights = write_spec(tmp_path / "no-weights.yaml", spec_of({"din": {"key": "din", "levels": ["attn2o"]}}))
        sweep_script.main([str(no_weights), "--sweep_dir", str(sweep), "--print_jobs"])
    weights.write_bytes(b"weights")
    monkeypatch.chdir(tmp_path)
    sweep_script.main([str(spec), "--sweep_dir", "sw", "--print_jobs"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert not sweep.exists()  # --print_jobs writes nothing
    assert lines == [f"cd {tmp_path} && python {REPO / 'scripts' / 'sweep.py'} {spec} --sweep_dir sw --run_index {i}"
                     for i in (0, 1)]
    prepare(str(spec), str(sweep))
    (sweep / "runs" / "din-attn2o_dout-ffni" / DONE).write_text("{}")
    sweep_script.main([str(spec), "--sweep_dir", "sw", "--print_jobs"])
    assert capsys.readouterr().out.strip().splitlines() == lines[1:]  # finished runs are not listed
    assert sweep_script.main([str(spec), "--sweep_dir", "sw", "--run_index", "0"]) == 0  # done
    with pytest.raises(SystemExit, match="--run_index 5 is out of range"):
        sweep_script.main([str(spec), "--sweep_dir", "sw", "--run_index", "5"])
    with pytest.raises(SystemExit, match="error: unknown key 'nope'"):
        bad = write_spec(tmp_path / "bad.yaml", spec_of({"x": {"key": "nope", "levels": [1]}}))
        sweep_script.main([str(bad), "--sweep_dir", str(tmp_path / "bad")])
    other = write_spec(tmp_path / "other.yaml", spec_of({"din": {"key": "din", "levels": ["attn2o"]}},
                                                       overrides=[f"actual_resume={weights}"]))
    with pytest.raises(SystemExit, match="holds another sweep"):  # checked without writing, too
        sweep_script.main([str(other), "--sweep_dir", "sw", "--print_jobs"])


def test_parallel_runs_get_one_device_each(tmp_path, monkeypatch):
    runs = prepare(str(write_spec(tmp_path / "s.yaml", spec_of({"seed": {"key": "seed", "levels": [0, 1, 2, 3]}}))),
                   str(tmp_path / "sw"))
    busy, seen = set(), []

    def fake_launch(run, device=None, python=None, train=True, allow_any_target=False, parallel=1):
        assert device not in busy  # a device is never shared by two runs at once
        busy.add(device)
        seen.append(device)
        time.sleep(0.05)
        busy.discard(device)
        (run.dir / DONE).write_text("{}")
        return True

    monkeypatch.setattr(launch, "launch", fake_launch)
    results = launch.run_all(runs, parallel=2, devices=["0", "1"])
    assert all(results.values()) and len(results) == 4 and set(seen) == {"0", "1"}
    assert launch.run_all(runs, parallel=2, devices=["0", "1"]) == {}  # all done: nothing to do
    with pytest.raises(SweepError, match="needs at least 3 --devices"):
        launch.run_all(runs, parallel=3, devices=["0", "1"])
    assert launch.command(runs[0], "py", device="1")[-2:] == ["--gpus", "1,"]
    assert launch.command(runs[2], "py")[-2:] == ["-s", "2"]
    assert "--allow_any_target" not in launch.command(runs[0], "py")  # only when the sweep's caller passes it
    assert launch.command(runs[0], "py", device="1", allow_any_target=True)[-3:] == ["--allow_any_target", "--gpus",
                                                                                      "1,"]


def test_parallel_runs_share_class_images_made_first(tmp_path, monkeypatch):
    spec = spec_of({"seed": {"key": "seed", "levels": [0, 1]}}, [f"reg_data_root={tmp_path / 'class'}",
                                                                   "class_word=cat"])
    runs = prepare(str(write_spec(tmp_path / "s.yaml", spec)), str(tmp_path / "sw"))
    calls = []

    def fake_launch(run, device=None, python=None, train=True, allow_any_target=False, parallel=1):
        calls.append((run.name, train))
        if train:
            (run.dir / DONE).write_text("{}")
        return True

    monkeypatch.setattr(launch, "launch", fake_launch)
    launch.run_all(runs, parallel=2)
    assert calls[0] == ("seed-0", False)  # set up only (main_dream_booth.py without -t): the class images
    assert sorted(calls[1:]) == [("seed-0", True), ("seed-1", True)]


# ---- a real sweep of tiny trainings -----------------------------------------------------------------------------
class CrashOnce(pl.Callback):
    """Simulates a crashed run: the run whose folder name contains `match` raises at step `step`, the first time."""

    def __init__(self, match: str, step: int = 1):
        self.match, self.step = match, step

    def on_train_batch_end(self, trainer, *args):
        root = Path(trainer.default_root_dir)
        sentinel = root / "crashed-once"
        if self.match in root.name and trainer.global_step == self.step and not sentinel.exists():
            sentinel.write_text("yes")
            raise RuntimeError("simulated crash")


@pytest.fixture
def tiny_sweep(tmp_path, monkeypatch):
    from conftest import build_tiny
    from ldm.checkpoint import save_state_dict
    from test_train import write_images
    ckpt = tmp_path / "tiny.safetensors"
    save_state_dict(build_tiny().state_dict(), str(ckpt))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "tests"), str(REPO)]))
    monkeypatch.delenv("LDM_RUN_LOGDIR", raising=False)
    overrides = [f"actual_resume={ckpt}", f"data_root={write_images(tmp_path / 'subject')}", "max_steps=2",
                 "lightning.callbacks.image_logger.params.disabled=true",
                 "lightning.callbacks.crash={target: test_sweep.CrashOnce, params: {match: seed-1}}"]
    return write_spec(tmp_path / "sweep.yaml", spec_of({"seed": {"key": "seed", "levels": [0, 1]}}, overrides))


@pytest.mark.slow
def test_sweep_resumes_after_a_crashed_run(tiny_sweep, tmp_path, capsys):
    sweep_dir = tmp_path / "sw"
    with pytest.raises(SystemExit, match="1 run\\(s\\) failed; run the same command again"):
        sweep_script.main([str(tiny_sweep), "--sweep_dir", str(sweep_dir), "--allow_any_target"])
    ok, crashed = [r.dir for r in load_runs(str(sweep_dir))]
    assert run_state(ok) == "done" and run_state(crashed) == "failed"
    assert "simulated crash" in json.loads((crashed / FAILED).read_text())["reason"]
    assert (ok / "checkpoints" / "1-adapters" / "adapters.safetensors").is_file()
    assert json.loads((ok / "train_stats.json").read_text())["steps"] == 2
    capsys.readouterr()
    sweep_script.main(["status", str(sweep_dir)])
    assert "done 1 / running 0 / failed 1 / pending 0" in capsys.readouterr().out
    done_before = (ok / DONE).stat().st_mtime_ns
    assert sweep_script.main([str(tiny_sweep), "--sweep_dir", str(sweep_dir), "--allow_any_target"]) == 0
    assert (ok / DONE).stat().st_mtime_ns == done_before  # the finished run was skipped
    assert (ok / "train.log").read_text().count("-m ldm.train -r") == 1
    assert run_state(crashed) == "done" and not (crashed / FAILED).exists()
    assert (crashed / "train.log").read_text().count("-m ldm.train -r") == 2  # retried once
    assert (crashed / "checkpoints" / "1-adapters").is_dir()
    capsys.readouterr()
    sweep_script.main(["status", str(sweep_dir), "-v"])
    assert "done 2 / running 0 / failed 0 / pending 0" in capsys.readouterr().out


def test_parallel_runs_share_the_cores_as_threads(monkeypatch):
    for var in launch.THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
    assert not any(v in launch.thread_env(1, cpus=8) for v in launch.THREAD_VARS)  # one run: torch's default
    assert launch.thread_env(2, cpus=8)["OMP_NUM_THREADS"] == "4"
    assert launch.thread_env(3, cpus=2)["MKL_NUM_THREADS"] == "1"  # never below one thread
    monkeypatch.setenv("OMP_NUM_THREADS", "6")  # the user's choice stays
    assert launch.thread_env(2, cpus=8)["OMP_NUM_THREADS"] == "6" and "MKL_NUM_THREADS" not in launch.thread_env(2, 8)
