"""Training runs lose nothing: SIGKILL at several points (inside checkpoint and adapter-directory writes included) and
the run still reaches its final step with every file loadable, temporary files cleaned at the next session, and
train_stats.json counting every session; run dirs are exclusive; a finished run is left alone."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from PIL import Image

import main_dream_booth
from conftest import REPO, snapshot
from ldm import rundir
from ldm.checkpoint import load_state_dict
from ldm.checks import ConfigError
from test_train import argv, base_ckpt, metrics, world  # noqa: F401 - fixtures

FAST = ["lightning.callbacks.image_logger.params.disabled=true", "data.params.train.params.repeats=1"]


def session(args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    env.pop("LDM_RUN_LOGDIR", None)
    return subprocess.run([sys.executable, str(REPO / "main_dream_booth.py"), *args], env=env, capture_output=True,
                          text=True, timeout=600)


def temporaries(logdir: Path):
    return sorted(str(p.relative_to(logdir)) for p in logdir.rglob(".tmp-*"))


def check_loads(logdir: Path):
    """Every file a killed session left loads: config, checkpoint, adapter directories, stats, images, CSV."""
    OmegaConf.load(logdir / "config.yaml")
    ckpt = logdir / "checkpoints" / "last.ckpt"
    step = torch.load(ckpt, weights_only=True)["global_step"] if ckpt.exists() else 0
    for folder in (logdir / "checkpoints").glob("[0-9]*-adapters"):
        assert load_state_dict(str(folder / "adapters.safetensors"))
        assert yaml.safe_load((folder / "adapter_config.yaml").read_text())["adapter_config"]
    if (logdir / "train_stats.json").exists():
        json.loads((logdir / "train_stats.json").read_text())
    for png in (logdir / "images").glob("*.png"):
        Image.open(png).load()
    return step


@pytest.mark.slow
def test_sigkill_at_every_kind_of_write_resumes_to_the_final_step(world):
    kill = "lightning.callbacks.kill={target: killswitch.KillSwitch, params: {step: 4, where: adapters}}"
    common = ["--allow_any_target", "lightning.trainer.max_steps=6"]
    # session 1: killed inside the adapter-directory write of step 4 (last.ckpt is at step 2)
    result = session(argv(world, kill, *common, *FAST, reg=False))
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    logdir = next(world["logs"].iterdir())
    assert check_loads(logdir) == 2 and temporaries(logdir) == [next(
        p for p in temporaries(logdir) if p.startswith("checkpoints/.tmp-3-adapters-"))]
    # session 2: cleans that up; killed with nothing yet written into last.ckpt's temporary file at step 4
    result = session(["-r", str(logdir), "-t", *common, "lightning.callbacks.kill.params.where=ckpt-empty"])
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert "removed checkpoints/.tmp-3-adapters-" in result.stderr
    left = temporaries(logdir)
    assert len(left) == 1 and left[0].startswith("checkpoints/.tmp-") and left[0].endswith("last.ckpt")
    assert (logdir / left[0]).stat().st_size == 0  # the zero-byte file of the issue
    assert check_loads(logdir) == 2 and (logdir / "checkpoints" / "3-adapters").is_dir()
    # session 3: killed with half of the final step's last.ckpt written (its adapters are complete)
    result = session(["-r", str(logdir), "-t", *common, "lightning.callbacks.kill.params.where=ckpt-half",
                      "lightning.callbacks.kill.params.step=6"])
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    left = temporaries(logdir)
    assert len(left) == 1 and left[0].endswith("last.ckpt") and (logdir / left[0]).stat().st_size > 0
    assert check_loads(logdir) == 4 and (logdir / "checkpoints" / "5-adapters").is_dir()
    # session 4, in this process: cleans up and finishes the run
    main_dream_booth.main(["-r", str(logdir), "-t", *common, "lightning.callbacks.kill.params.where=none"])
    assert temporaries(logdir) == [] and check_loads(logdir) == 6
    assert sorted(p.name for p in (logdir / "checkpoints").iterdir()) == [
        "1-adapters", "3-adapters", "5-adapters", "last.ckpt"]
    # the stats count the sessions whose steps reached a checkpoint: 0-2 (session 1), 2-4 (session 3), 4-6 (here)
    stats = json.loads((logdir / "train_stats.json").read_text())
    assert stats["steps"] == 6 and [(s["start_step"], s["end_step"]) for s in stats["sessions"]] == [
        (0, 2), (2, 4), (4, 6)]
    assert stats["seconds"] == pytest.approx(sum(s["seconds"] for s in stats["sessions"]), abs=0.01)
    assert stats["steps_per_second"] == pytest.approx(6 / stats["seconds"], rel=1e-3)
    # no empty CSV session folder is left (killed sessions' included); the last one logged steps 4 and 5
    assert all((d / "metrics.csv").is_file() for d in (logdir / "csv").iterdir())
    assert [int(r["step"]) for r in metrics(logdir) if r.get("train/loss")] == [4, 5]


@pytest.mark.slow
def test_a_finished_run_is_left_alone_and_progress_counts_steps(world, capsys, caplog):
    logdir = main_dream_booth.main(argv(world, "--max_steps", "3", *FAST, reg=False))
    out = capsys.readouterr().out
    assert "steps: 100%" in out and "3/3" in out and "Epoch" not in out and "v_num" not in out
    before = snapshot(logdir)
    (logdir / ".tmp-abcd1234train_stats.json").write_text("{")  # as a kill in the final stats write leaves it
    caplog.set_level("INFO", logger="ldm")
    assert main_dream_booth.main(["-r", str(logdir), "-t"]) == logdir
    assert f"'{logdir}' already finished at step 3" in caplog.text
    assert snapshot(logdir) == before  # the leftover went; no new event file, CSV session, config or checkpoint
    # a longer run continues it: the bar counts on from the checkpoint's step
    main_dream_booth.main(["-r", str(logdir), "-t", "--max_steps", "5"])
    out = capsys.readouterr().out
    assert "5/5" in out and "/3" not in out, out
    stats = json.loads((logdir / "train_stats.json").read_text())
    assert stats["steps"] == 5 and [s["steps"] for s in stats["sessions"]] == [3, 2]


@pytest.mark.slow
def test_two_runs_started_at_once_with_one_name_get_two_dirs(world):
    """Both processes are given the same timestamp, so their names collide for certain."""
    code = ("import sys, ldm.rundir, main_dream_booth; ldm.rundir.timestamp = lambda: '2030-01-01T00-00-00'; "
            "main_dream_booth.main(sys.argv[1:])")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    procs = [subprocess.Popen([sys.executable, "-c", code, *argv(world, f"model.params.reg_weight={w}", reg=False,
                                                                  train=False)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w in (0.25, 0.75)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    dirs = sorted(p.name for p in world["logs"].iterdir())
    assert dirs == ["2030-01-01T00-00-00-2_test", "2030-01-01T00-00-00_test"]
    weights = sorted(OmegaConf.load(world["logs"] / d / "config.yaml").model.params.reg_weight for d in dirs)
    assert weights == [0.25, 0.75]  # each run its own config: nothing clobbered


# ---- the pieces ------------------------------------------------------------------------------------------------
def test_run_dirs_are_created_exclusively(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "timestamp", lambda: "T")
    first, created = rundir.create_run_dir(tmp_path / "a" / "logs", "x")
    second, _ = rundir.create_run_dir(tmp_path / "a" / "logs", "x")
    assert (first.name, second.name) == ("T_x", "T-2_x")
    assert created == [first, tmp_path / "a" / "logs", tmp_path / "a"]
    rundir.discard([second, tmp_path / "a" / "logs"])  # the parent still holds the first run: kept
    assert not second.exists() and first.is_dir()
    (first / "config.yaml").write_text("model: {}")
    rundir.discard(created)  # a run dir holding a file is a run: kept
    assert (first / "config.yaml").is_file()
    for bad in ("../x", "a/b", "..", ".x", "a b", "", "x" * 101, "a\\b", "x:y", "é"):
        with pytest.raises(ConfigError, match="cannot be the name of a folder"):
            rundir.create_run_dir(tmp_path, bad)
    assert rundir.slug("my config (v2).yaml") == "my_config__v2_.yaml" and rundir.slug("../..") == "run"


def test_a_run_dir_is_trained_by_one_process_at_a_time(tmp_path):
    with rundir.run_lock(tmp_path):
        with pytest.raises(ConfigError, match="is being trained by another process right now"):
            with rundir.run_lock(tmp_path):
                pass
    with rundir.run_lock(tmp_path):  # released when the first holder ended
        pass


def test_only_our_own_temporary_names_are_cleaned(tmp_path):
    ckpts, images = tmp_path / "checkpoints", tmp_path / "images"
    ours = [ckpts / ".tmp-abcd_123last.ckpt", tmp_path / ".tmp-0a1b2c3dtrain_stats.json",
            tmp_path / ".tmp-zzzzzzzzconfig.yaml", images / ".tmp-q1w2e3r4step-000010.png",
            tmp_path / ".tmp-a1b2c3d4running.json"]
    theirs = [ckpts / ".tmp-notes.txt", ckpts / "my.tmp-abcd1234last.ckpt", ckpts / ".tmp-abcd1234last.ckpt.bak",
              tmp_path / ".tmp-abcdefghnotes.yaml", tmp_path / "data" / ".tmp-abcdefghconfig.yaml",
              ckpts / "3-adapters" / ".tmp-abcdefghlast.ckpt"]
    for p in ours + theirs:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    (ckpts / ".tmp-3-adapters-k2j3h4g5").mkdir()
    (ckpts / ".tmp-3-adapters-k2j3h4g5" / "adapters.safetensors").write_bytes(b"x")
    (ckpts / ".tmp-7-adapters-style-abcdefgh").mkdir()
    (ckpts / ".tmp-mine").mkdir()
    (ckpts / ".old-5-adapters-0123abcd").mkdir()  # killed mid-replacement: 5-adapters missing, restored
    (ckpts / ".old-5-adapters-0123abcd" / "adapter_config.yaml").write_text("x")
    (ckpts / "1-adapters").mkdir()
    (ckpts / ".old-1-adapters-89abcdef").mkdir()  # the replacement is in place: the old copy goes
    (tmp_path / "csv" / "2024-01-01T00-00-00").mkdir(parents=True)
    (tmp_path / "csv" / "2024-01-01T00-00-01").mkdir()
    (tmp_path / "csv" / "2024-01-01T00-00-01" / "metrics.csv").write_text("step\n")
    done = rundir.clean_temporaries(tmp_path)
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)
    assert not (ckpts / ".tmp-3-adapters-k2j3h4g5").exists() and not (ckpts / ".tmp-7-adapters-style-abcdefgh").exists()
    assert (ckpts / ".tmp-mine").is_dir()
    assert (ckpts / "5-adapters" / "adapter_config.yaml").read_text() == "x"
    assert not (ckpts / ".old-1-adapters-89abcdef").exists() and (ckpts / "1-adapters").is_dir()
    assert sorted(p.name for p in (tmp_path / "csv").iterdir()) == ["2024-01-01T00-00-01"]
    assert "restored checkpoints/5-adapters/" in done


def test_a_sweep_run_killed_after_its_final_checkpoint_counts_as_done(tmp_path):
    """Killed between its final last.ckpt and done.json, a sweep run is done when relaunched (main_dream_booth.py says
    "already finished" and exits 0), not failed over and over."""
    from ldm.sweep import launch
    from ldm.sweep.runs import SweepRun, mark_running, run_state
    run = SweepRun(0, "seed-0", tmp_path / "seed-0", {"seed": 0}, {})
    (run.dir / "checkpoints").mkdir(parents=True)
    (run.dir / "config.yaml").write_text("lightning: {trainer: {max_steps: 2}}\n")
    torch.save({"state_dict": {}, "global_step": 1}, run.dir / "checkpoints" / "last.ckpt")
    mark_running(run.dir, 2 ** 22 + 12345)  # the killed process
    assert not launch.launch(run, python="true") and run_state(run.dir) == "failed"  # step 1 of 2: not done
    torch.save({"state_dict": {}, "global_step": 2}, run.dir / "checkpoints" / "last.ckpt")
    assert launch.launch(run, python="true") and run_state(run.dir) == "done"
