"""Packed training (issue 24): several runs in one process on one base model, their UNet calls in one batch.

Equivalence at tiny size: the packed UNet output and adapter gradients equal each run's own computation to 1e-5 (fp32)
for mixed forms and positions; after 30 packed steps each run's losses and adapter weights equal its separate run's
(the tolerance and why: README, "Packed training"); a NaN planted in one run leaves the others bit-identical to the
pack without it. Each run's folder holds what a separate run writes, `-r` on one run works alone, a killed pack
resumes every run, runs that cannot share train alone with the reason, and `scripts/sweep.py --pack` packs a sweep.
"""
import copy
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace

import pytest
import pytorch_lightning as pl
import torch

from conftest import REPO, build_tiny
from ldm.checkpoint import load_state_dict, save_state_dict
from ldm.modules.adapters import Rows, adapter_parameters, inject_adapters, mount_group
from ldm.modules.adapters.rows import pick
from ldm.train import RunRequest, run, train_runs
from ldm.train.pack_plan import group_runs, memory_per_run, run_config
from test_train import BASES, TE_LORA, write_images

MIXED = [  # (adapter_config, what it exercises)
    ({"transformer_adp_config": [{"din": "attn2o", "dout": "ffni", "mid_dim": 4, "init": "default"}]}, "attn2o-ffni"),
    ({"transformer_adp_config": [{"din": "transo", "dout": "transo", "mid_dim": 6, "method": "silu",
                                  "init": "default"}]}, "transo-transo"),
    ({"resblock_adp_config": {"din": "resi", "dout": "reso", "mid_dim": 3, "init": "default"}}, "ResBlock"),
    ({"projection_adp_config": [{"type": "lora", "target": ["to_q", "to_v", "proj_in"], "rank": 2,
                                 "init": "default"}]}, "LoRA"),
    ({"projection_adp_config": [{"type": "ia3", "target": ["attn2.to_k", "ff.net.2"], "on_input": True},
                                {"type": "lora", "target": ["to_out.0"], "rank": 3, "init": "default"}],
      "transformer_adp_config": [{"din": "attn2c", "dout": "attn2c", "mid_dim": 2, "init": "default"}]},
     "mixed: (IA)^3 on an input, LoRA, attn2c"),
]


# ---- the UNet call: output and gradients --------------------------------------------------------------------------
def point_unets(base):
    """One UNet per run (its own adapters, non-zero) and the runner: the base UNet with every run's group mounted."""
    torch.manual_seed(0)
    points = []
    for config, _ in MIXED:
        unet = copy.deepcopy(base)
        inject_adapters(unet, config)
        with torch.no_grad():
            for p in adapter_parameters(unet):
                p.add_(0.05 * torch.randn_like(p))  # (IA)^3 starts at 0 and zero-init layers too: make them act
        points.append(unet)
    runner = copy.deepcopy(base)
    groups = [mount_group(unet, runner, "default", f"run{i}") for i, unet in enumerate(points)]
    return points, runner, groups


def inputs(n, rows=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 4, 8, 8, generator=g), torch.randint(0, 1000, (rows,), generator=g),
             torch.randn(rows, 77, 32, generator=g)) for _ in range(n)]


@pytest.mark.slow
def test_packed_unet_output_and_adapter_grads_equal_each_runs_own_to_1e_5():
    base = build_tiny().model.diffusion_model.float()
    points, runner, groups = point_unets(base)
    data = inputs(len(points))
    separate, grads = [], []
    for unet, (x, t, c) in zip(points, data):
        out = unet(x, t, context=c)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        separate.append(out.detach())
        grads.append([p.grad.clone() for p in adapter_parameters(unet)])
        unet.zero_grad()
    offset = 0
    for group, (x, _, _) in zip(groups, data):
        for g in group:
            g.rows = Rows(offset, offset + len(x))
        offset += len(x)
    x, t, c = (torch.cat(parts) for parts in zip(*data))
    packed = runner(x, t, context=c)
    outs = packed.split([len(x) for x, _, _ in data])
    sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs).backward()
    for (_, what), unet, own, out, own_grads in zip(MIXED, points, separate, outs, grads):
        assert (out - own).abs().max() <= 1e-5, what
        for p, g in zip(adapter_parameters(unet), own_grads):
            assert g.abs().max() > 0 and (p.grad - g).abs().max() <= 1e-5 * max(1.0, g.abs().max().item()), what
    # without rows a group acts on every row: a run's adapters on a batch of its own are the plain model
    for g in groups[0]:
        g.rows = None
    for group in groups[1:]:
        for g in group:
            g.rows = Rows(0, 0)
    x, t, c = data[0]
    assert torch.equal(runner(x, t, context=c), points[0](x, t, context=c))


def test_rows_repeat_in_each_block_of_a_guided_batch():
    """Classifier-free guidance doubles the batch (uncond, cond): a group's rows repeat in each block."""
    base = build_tiny().model.diffusion_model.float()
    points, runner, groups = point_unets(base)
    data = inputs(2, rows=3)
    for group, start in zip(groups, (0, 3)):
        for g in group:
            g.rows = Rows(start, start + 3, period=6)
    for group in groups[2:]:
        for g in group:
            g.rows = Rows(0, 0)
    x = torch.cat([data[0][0], data[1][0]])
    t = torch.cat([data[0][1], data[1][1]])
    c = torch.cat([data[0][2], data[1][2]])
    uc = torch.zeros_like(c)
    with torch.no_grad():
        both = runner(torch.cat([x, x]), torch.cat([t, t]), context=torch.cat([uc, c])).chunk(2)
        for k, (unet, (xi, ti, ci)) in enumerate(zip(points, data)):
            own = unet(torch.cat([xi, xi]), torch.cat([ti, ti]), context=torch.cat([uc[:3], ci])).chunk(2)
            for half, own_half in zip(both, own):
                assert (half[3 * k:3 * k + 3] - own_half).abs().max() <= 1e-5
    assert torch.equal(pick(torch.arange(12), Rows(1, 3, period=6)), torch.tensor([1, 2, 7, 8]))


# ---- whole runs -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    ckpt = root / "tiny.safetensors"
    save_state_dict(build_tiny().state_dict(), str(ckpt))
    return {"ckpt": ckpt, "data": write_images(root / "subject"), "reg": root / "class", "root": root}


FAST = ("lightning.callbacks.image_logger.params.disabled=true", "lightning.modelcheckpoint.params.every_n_train_steps=10")
NO_BLOCKS = "model.params.unet_config.params.adapter_config.transformer_adp_config=[]"
POINTS = [  # name, seed, extra bases, overrides: four mixed runs that differ in form, position, lr, reg_weight, steps
    ("attn2o-ffni", 0, (), ()),
    ("transo", 1, (), ("din=transo", "dout=transo", "lr=3e-4", "model.params.reg_weight=0.5")),
    ("resblock", 2, (), ("din=resi", "dout=reso", "mid_dim=4", "method=silu")),
    ("lora-te", 3, (TE_LORA,), (NO_BLOCKS, "model.params.unet_config.params.adapter_config.projection_adp_config.0"
                                           ".dropout=0.1")),
]
STEPS = {"lora-te": 20}  # a run that finishes early leaves the pack; the others go on


def requests(world, logdir, steps=30, points=POINTS):
    return [RunRequest(base=tuple(str(REPO / b) for b in (*BASES, *bases)), overrides=(*FAST, *extra), train=True,
                       actual_resume=str(world["ckpt"]), data_root=str(world["data"]), class_word="cat",
                       reg_data_root=str(world["reg"]), max_steps=min(steps, STEPS.get(name, steps)), seed=seed,
                       name=name,
                       logdir=str(world["root"] / logdir)) for name, seed, bases, extra in points]


def losses(logdir):
    (path,) = (logdir / "csv").glob("*/metrics.csv")
    with open(path) as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def final_adapters(logdir):
    last = max((logdir / "checkpoints").glob("*-adapters"), key=lambda p: int(p.name.split("-")[0]))
    return last.name, load_state_dict(str(last / "adapters.safetensors"))


def files(logdir):
    """The run dir's files, with the CSV session's time stamp left out."""
    return sorted(str(p.relative_to(logdir)).split("/")[0] + ("/" + p.name if p.parent.name == "checkpoints" else "")
                  for p in logdir.rglob("*") if p.is_file() and "csv" not in p.parts and "tensorboard" not in p.parts)


@pytest.fixture(scope="module")
def trained(tiny_world):
    """The four runs trained separately and as one pack."""
    separate = [run(r) for r in requests(tiny_world, "separate")]
    packed = train_runs(requests(tiny_world, "packed"))
    assert [e for _, e in packed] == [None] * len(POINTS)
    return separate, [p for p, _ in packed]


@pytest.mark.slow
def test_30_packed_steps_equal_the_separate_runs(trained):
    separate, packed = trained
    for (name, *_), own, mine in zip(POINTS, separate, packed):
        assert files(mine) == files(own), name  # the run dir holds what a separate run writes
        assert losses(mine) == pytest.approx(losses(own), rel=1e-5, abs=1e-6), name  # same data, noise, timesteps
        (step, theirs), (step_packed, ours) = final_adapters(own), final_adapters(mine)
        assert step == step_packed == ("19-adapters" if name == "lora-te" else "29-adapters")
        diff = torch.cat([(theirs[k] - ours[k]).flatten() for k in theirs]).abs()
        moved = torch.cat([theirs[k].flatten() for k in theirs]).abs().max()
        # Adam divides by the root of the second moment: where a gradient is rounding noise its sign decides the
        # step, so a few weights differ by up to a few learning rates (the README has the measurement)
        assert (diff > 1e-5).float().mean() <= 0.02 and diff.max() <= 0.02 * moved, (name, diff.max())
        stats = json.loads((mine / "train_stats.json").read_text())
        assert stats["sessions"][-1]["pack_size"] == len(POINTS) and 0 < stats["seconds"]


class PlantNaN(pl.Callback):
    """Writes NaN into the run's first adapter weight after step `step` (a diverging run)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == self.step:
            with torch.no_grad():
                adapter_parameters(pl_module)[0].fill_(float("nan"))


@pytest.mark.slow
def test_a_nan_in_one_run_stops_it_alone_and_leaves_the_others_bit_identical(tiny_world, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "tests"))
    plain = requests(tiny_world, "nan-free", steps=8)
    planted = [replace(r, logdir=str(tiny_world["root"] / "nan"), allow_any_target=True) for r in plain]
    plain = [replace(r, allow_any_target=True) for r in plain]
    planted[1] = replace(planted[1], overrides=(*planted[1].overrides,
                                                 "lightning.callbacks.nan={target: test_pack.PlantNaN, params: "
                                                 "{step: 3}}"))
    clean, dirty = train_runs(plain), train_runs(planted)
    assert "the loss is nan at step 3" in str(dirty[1][1])
    assert all(e is None for k, (_, e) in enumerate(dirty) if k != 1)
    for k in (0, 2, 3):
        ours, theirs = final_adapters(dirty[k][0])[1], final_adapters(clean[k][0])[1]
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), POINTS[k][0]
        assert losses(dirty[k][0]) == losses(clean[k][0])


@pytest.mark.slow
def test_one_run_of_a_pack_resumes_alone_and_a_killed_pack_resumes_every_run(tiny_world, trained, tmp_path):
    _, packed = trained
    copy_of = shutil.copytree(packed[0], tmp_path / packed[0].name)
    resumed = run(RunRequest(resume=str(copy_of), train=True, max_steps=32))  # -r on one run of the pack, alone
    assert resumed == copy_of and final_adapters(resumed)[0] == "31-adapters"
    sessions = json.loads((resumed / "train_stats.json").read_text())["sessions"]
    assert [(s["steps"], s.get("pack_size")) for s in sessions] == [(30, 4), (2, None)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    kill = "lightning.callbacks.kill={target: killswitch.KillSwitch, params: {step: 3, where: step}}"
    argv = []
    for k, r in enumerate(requests(tiny_world, "killed", steps=6, points=POINTS[:3])):
        extra = (kill,) if k == 1 else ()
        argv += (["--next"] if k else []) + replace(r, allow_any_target=True, overrides=(*r.overrides, *extra)).to_argv()
    first = subprocess.run([sys.executable, "-m", "ldm.train", *argv], cwd=REPO, env=env, capture_output=True, text=True)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    dirs = sorted((tiny_world["root"] / "killed").iterdir())
    again = []
    for k, d in enumerate(sorted(dirs, key=lambda d: [p[0] for p in POINTS].index(d.name.split("_", 1)[1]))):
        again += (["--next"] if k else []) + RunRequest(resume=str(d), train=True, allow_any_target=True,
                                                        overrides=("lightning.callbacks.kill.params.where=none",)
                                                        if "transo" in d.name else ()).to_argv()
    second = subprocess.run([sys.executable, "-m", "ldm.train", *again], cwd=REPO, env=env, capture_output=True,
                            text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    for d in dirs:
        assert torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
        assert final_adapters(d)[0] == "5-adapters"


@pytest.mark.slow
def test_runs_that_cannot_share_train_alone_with_the_reason(tiny_world, caplog):
    caplog.set_level("INFO", logger="ldm.train")
    reqs = requests(tiny_world, "alone", steps=1)[:2]
    whole = replace(reqs[1], overrides=(*reqs[1].overrides, "model.params.train_level=[unet]"))
    bigger = replace(reqs[0], overrides=(*reqs[0].overrides, "data.params.train.params.size=40",
                                         "data.params.reg.params.size=40"))
    assert group_runs([reqs[0], whole, bigger, reqs[1]]) == [[0, 3], [1], [2]]
    assert "fine-tunes the whole UNet" in caplog.text and "another image size" in caplog.text
    assert group_runs(reqs * 3, size=4) == [[0, 1, 2, 3], [4, 5]]


@pytest.mark.slow
def test_memory_per_run_grows_with_its_rows(tiny_world):
    request = requests(tiny_world, "memory", steps=1)[0]
    one = memory_per_run(run_config(request))
    two = memory_per_run(run_config(replace(request, overrides=(*request.overrides, "data.params.batch_size=2"))))
    assert 0 < one < two <= 2.2 * one


@pytest.mark.slow
def test_a_sweep_trains_in_packs(tmp_path, tiny_world):
    import yaml
    from ldm.sweep.runs import load_runs
    from scripts import sweep as sweep_script
    spec = {"base": [str(REPO / b) for b in BASES],
            "overrides": [f"actual_resume={tiny_world['ckpt']}", f"data_root={tiny_world['data']}", "max_steps=2",
                          "lightning.callbacks.image_logger.params.disabled=true", "class_word=cat",
                          f"reg_data_root={tiny_world['reg']}"],
            "factors": {"din": {"key": "din", "levels": ["attn2o", "transo", "resi"]},
                        "seed": {"key": "seed", "levels": [0, 1]}},
            "rules": [{"when": {"din": "resi"}, "set": {"dout": "reso", "mid_dim": 2}},
                      {"when": {"din": "transo"}, "set": {"dout": "transo"}}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(SystemExit, match="--pack: must be a number of runs >= 1, or auto"):
        sweep_script.main([str(tmp_path / "s.yaml"), "--pack", "0"])
    assert sweep_script.main([str(tmp_path / "s.yaml"), "--sweep_dir", str(tmp_path / "sw"), "--pack", "4"]) == 0
    runs = load_runs(str(tmp_path / "sw"))
    assert [r.state for r in runs] == ["done"] * 6
    logs = sorted((tmp_path / "sw" / "packs").iterdir())
    assert [p.name for p in logs] == ["din-attn2o_seed-0+3.log", "din-resi_seed-0+1.log"]
    assert all("trained in a pack of" in (r.dir / "train.log").read_text() for r in runs)
    assert json.loads((runs[0].dir / "train_stats.json").read_text())["sessions"][0]["pack_size"] == 4


@pytest.mark.slow
def test_the_tiny_world_study_packs(tmp_path, monkeypatch):
    """All 40 runs of the study can share one base model: --pack 8 makes 5 packs of 8, in grid order; --pack auto
    with --parallel 2 gives each process half of the runs (when they fit), or packs of what fits."""
    from ldm.sweep import launch
    from ldm.sweep.runs import prepare
    runs = prepare(str(REPO / "configs/sweeps/tiny-world-position-pairs.yaml"), str(tmp_path / "sw"), root=REPO)
    packs = launch.packs_of(runs, 8)
    assert [len(p) for p in packs] == [8] * 5 and [r for p in packs for r in p] == runs
    assert launch.pack_command(packs[0], "py")[:3] == ["py", "-m", "ldm.train"]
    assert launch.pack_command(packs[0], "py").count("--next") == 7
    for capacity, parallel, sizes in ((1000, 2, [20, 20]), (1000, 3, [14, 14, 12]), (1000, 1, [40]),
                                      (30, 2, [15, 15, 10])):
        monkeypatch.setattr(launch, "pack_capacity", lambda request, c=capacity: c)
        packs = launch.packs_of(runs, "auto", parallel=parallel)
        assert [len(p) for p in packs] == sizes and [r for p in packs for r in p] == runs
