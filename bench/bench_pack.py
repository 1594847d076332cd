"""Packed training and evaluation vs one run per process, on the tiny-world design-space study, side by side here.

    python bench/bench_pack.py train [--steps 150] [--pack_arm "--pack auto"]  # sweep.py --parallel 2 vs packed
    python bench/bench_pack.py memory [--runs 20 --steps 10]        # peak RSS: one run vs a pack of 20
    python bench/bench_pack.py evaluate --sweep DIR [--pack 8]      # evaluate.py --pack 1 vs --pack 8
    python bench/bench_pack.py equal [--steps 30]                   # packed vs separate weights, and a control
    python bench/bench_pack.py same --sweeps A,B                    # two sweeps' runs compared (train's arms)

`train` runs the study's sweep (configs/sweeps/tiny-world-position-pairs.yaml: 20 position pairs x 2 seeds; --din and
--seeds take a subset, --steps shortens every run) into fresh sweep folders, the two arms alternating (A B, then B A,
...), each arm a scripts/sweep.py process as a user starts it: today's `--parallel 2` (two run processes with one
thread each) and the packed one (--pack_arm: `--pack auto` is one process with a thread per core; `--pack auto
--parallel 2` two packs with one thread each). The class images are made once beforehand and shared. Each arm reports
its wall time, the part of it the runs spent in their training loops (so runs with fewer steps can be scaled to the
study's), and the load average before and after (the machine is shared: other jobs slow both arms); then `same`
compares the two arms' runs (losses and final adapter weights, run by run). `memory` trains
one run, then 20 runs as one pack (`python -m ldm.train A --next B ...`), and reports each process's peak RSS.
`evaluate` scores a trained sweep twice with the study's settings (--eval_seeds: fewer seeds), one run at a time and
packed, alternating, and checks that both give the same table. `equal` trains four mixed runs of the test model (as
tests/test_pack.py: attn2o-ffni, transo-transo with another lr and reg_weight, a ResBlock adapter, LoRA with dropout on
the UNet and the text encoder) separately and packed, one thread, and as a control separately with oneDNN's
convolutions off (PyTorch's own kernels: a change that only regroups float sums, as packing does), and reports how far
the losses and adapter weights differ from the separate runs. Rows are appended to --results (bench/RESULTS.md).
"""
import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml

from bench_unet import git_commit
from ldm.train import RunRequest

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "configs" / "sweeps" / "tiny-world-position-pairs.yaml"
PROMPTS = REPO / "configs" / "sweeps" / "tiny-world-prompts.txt"
EVAL = ["--metric", "tinyworld", "--prompts", str(PROMPTS), "--steps", "25", "--scale", "5.0", "--batch_size", "64"]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("train", "memory", "evaluate", "equal", "same"))
    p.add_argument("--out", default="outputs/bench-pack", help="scratch folder (sweeps, logs)")
    p.add_argument("--steps", type=int, default=150, help="training steps of every run (the study: 150)")
    p.add_argument("--din", help="comma-separated din levels (default: the study's 10)")
    p.add_argument("--seeds", default="0,1", help="seed levels (the study: 0,1)")
    p.add_argument("--repeats", type=int, default=1, help="pairs of arms (A B, B A, ...)")
    p.add_argument("--pack_arm", default="--pack auto", help="train: scripts/sweep.py's flags in the packed arm")
    p.add_argument("--threads", type=int, default=1, help="memory, evaluate: threads of each process")
    p.add_argument("--runs", type=int, default=20, help="memory: runs in the pack")
    p.add_argument("--sweep", help="evaluate: a trained sweep folder")
    p.add_argument("--sweeps", help="same: two sweep folders of one sweep file, A,B")
    p.add_argument("--pack", type=int, default=8, help="evaluate: runs per pack")
    p.add_argument("--eval_seeds", type=int, default=16, help="evaluate: seeds per prompt (the study: 16)")
    p.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"))
    return p.parse_args(argv)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "CPU")
    return f"{cpu}, {os.cpu_count()} cores"


def timed(cmd: List[str], threads: Optional[int] = None, log: Optional[Path] = None) -> Dict[str, float]:
    """Run `cmd` in the repository: wall seconds, the peak RSS of the process (and its children), load before/after."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(var, None)  # each arm sets the threads it runs with, as a user's command would
        if threads:
            env[var] = str(threads)
    load = os.getloadavg()[0]
    start = time.monotonic()
    with open(log or os.devnull, "a") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    if status:
        sys.exit(f"error: {' '.join(cmd[:4])} ... failed (status {status}); see {log}")
    return {"wall": wall, "rss": usage.ru_maxrss * 1024, "load_before": load, "load_after": os.getloadavg()[0]}


def study_spec(out: Path, steps: int, din: Optional[str], seeds: str) -> Path:
    """The study's sweep file with shorter runs or fewer levels, and its own class-image folder."""
    spec = yaml.safe_load(SPEC.read_text())
    overrides = [o for o in spec["overrides"] if not o.startswith(("max_steps=", "reg_data_root="))]
    spec["overrides"] = overrides + [f"max_steps={steps}", f"reg_data_root={out / 'class-images'}"]
    if din:
        spec["factors"]["din"]["levels"] = din.split(",")
    spec["factors"]["seed"]["levels"] = [int(s) for s in seeds.split(",")]
    path = out / f"study-{steps}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def study_request(out: Path, steps: int, name: str, **kw) -> RunRequest:
    """One run of the study (attn2o -> ffni), as the sweep would make it."""
    spec = yaml.safe_load(SPEC.read_text())
    return RunRequest(base=tuple(str(REPO / b) for b in spec["base"]), train=True, max_steps=steps, name=name,
                      actual_resume=str(REPO / "models/ldm/tiny-sd-v1/model.safetensors"),
                      data_root=str(REPO / "assets/tiny-world/sks-star"), class_word="star",
                      reg_data_root=str(out / "class-images"), logdir=str(out / "memory"),
                      overrides=("mid_dim=16", "lightning.callbacks.image_logger.params.disabled=true"), **kw)


def class_images(out: Path) -> None:
    """The shared class images, made once before any timing (set-up only: no -t)."""
    from dataclasses import replace
    request = replace(study_request(out, 1, "setup"), train=False, logdir=str(out / "setup"))
    timed([sys.executable, "-m", "ldm.train", *request.to_argv()], threads=1, log=out / "setup.log")


def row(cells: List[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def append(results: str, title: str, header: List[str], rows: List[List[str]], notes: str) -> None:
    text = f"\n### {title}\n\n{notes}\n\n{row(header)}\n{row(['---'] * len(header))}\n"
    text += "\n".join(row(r) for r in rows) + "\n"
    with open(results, "a") as f:
        f.write(text)
    print(text)


def train(opt: argparse.Namespace, out: Path) -> None:
    spec = study_spec(out, opt.steps, opt.din, opt.seeds)
    arms = {"--parallel 2": ["--parallel", "2"], opt.pack_arm: opt.pack_arm.split()}
    rows, walls, loops = [], {a: [] for a in arms}, {a: [] for a in arms}
    for repeat in range(opt.repeats):
        for k, arm in enumerate(list(arms) if repeat % 2 == 0 else list(arms)[::-1]):
            sweep = out / f"sweep-{'pack' if '--pack' in arm else 'parallel'}-{repeat}"
            cmd = [sys.executable, "scripts/sweep.py", str(spec), "--sweep_dir", str(sweep), *arms[arm]]
            r = timed(cmd, threads=None, log=out / f"{sweep.name}.log")
            loop = loop_seconds(sweep, at_once(arms[arm]))
            walls[arm].append(r["wall"])
            loops[arm].append(loop)
            rows.append([arm, str(repeat + 1), f"{r['wall']:.0f}", f"{loop:.0f}", f"{r['wall'] - loop:.0f}",
                         f"{r['load_before']:.1f} -> {r['load_after']:.1f}"])
    ratio = [p / q for p, q in zip(walls["--parallel 2"], walls[opt.pack_arm])]
    loop_ratio = [p / q for p, q in zip(loops["--parallel 2"], loops[opt.pack_arm])]
    rows.append([f"ratio (--parallel 2 / {opt.pack_arm})", "", ", ".join(f"{x:.2f}" for x in ratio),
                 ", ".join(f"{x:.2f}" for x in loop_ratio), "", ""])
    append(opt.results, f"Packed training, tiny-world study, {datetime.date.today()}: {machine()}, commit "
           f"{git_commit()}", ["arm", "repeat", "wall s (training)", "of it the training loops",
                               "the rest (start-up, set-up)", "load average (1 min) before -> after"], rows,
           f"`python bench/bench_pack.py train --steps {opt.steps} --repeats {opt.repeats}"
           f"{' --din ' + opt.din if opt.din else ''} --seeds {opt.seeds} --pack_arm '{opt.pack_arm}'`: "
           f"{len(sweep_runs(spec))} runs x {opt.steps} steps, class images made beforehand. The training loops: "
           "the runs' `train_stats.json` seconds (from the first to the last step; a packed run counts its share of "
           "the pack's time) summed, over the processes that ran at once.")
    opt.sweeps = f"{out / 'sweep-parallel-0'},{out / 'sweep-pack-0'}"
    same(opt, out)  # the two arms trained the same runs: how far apart are they?


def at_once(args: List[str]) -> int:
    """How many processes a scripts/sweep.py command line runs at once (its --parallel)."""
    return int(args[args.index("--parallel") + 1]) if "--parallel" in args else 1


def loop_seconds(sweep: Path, at_once: int) -> float:
    """The time the sweep's runs spent in their training loops, in wall seconds: their train_stats.json seconds
    summed over the runs, over the processes that ran at once (a packed run's seconds are its share of the pack's)."""
    stats = [json.loads(p.read_text())["seconds"] for p in (sweep / "runs").glob("*/train_stats.json")]
    return sum(stats) / at_once


def sweep_runs(spec: Path) -> List[str]:
    from ldm.sweep.spec import expand, load_spec
    return [r.name for r in expand(load_spec(str(spec)), REPO).runs]


def memory(opt: argparse.Namespace, out: Path) -> None:
    one = study_request(out, opt.steps, "one")
    pack = []
    for i in range(opt.runs):
        pack += (["--next"] if i else []) + study_request(out, opt.steps, f"p{i}", seed=i % 2).to_argv()
    rows, rss = [], {}
    for name, argv in (("one run", one.to_argv()), (f"pack of {opt.runs}", pack)):
        r = timed([sys.executable, "-m", "ldm.train", *argv], threads=opt.threads, log=out / "memory.log")
        rss[name] = r["rss"]
        rows.append([name, f"{r['rss'] / 2 ** 20:.0f}", f"{r['wall']:.0f}", f"{r['load_before']:.1f}"])
    rows.append(["ratio (pack / one run)", f"{rss[f'pack of {opt.runs}'] / rss['one run']:.2f}", "", ""])
    append(opt.results, f"Packed training, peak memory, {datetime.date.today()}: {machine()}, commit {git_commit()}",
           ["process", "peak RSS MiB", "wall s", "load average"], rows,
           f"`python bench/bench_pack.py memory --runs {opt.runs} --steps {opt.steps}`: the study's attn2o-ffni run "
           f"(batch 4 + 4, 64 px), one process each, {opt.threads} thread(s); peak RSS from wait4.")


def evaluate(opt: argparse.Namespace, out: Path) -> None:
    rows, walls, tables = [], {}, {}
    for repeat in range(opt.repeats):
        for pack in ((1, opt.pack) if repeat % 2 == 0 else (opt.pack, 1)):
            table = out / f"eval-pack{pack}-{repeat}.csv"
            seeds = ",".join(map(str, range(opt.eval_seeds)))
            r = timed([sys.executable, "scripts/evaluate.py", opt.sweep, *EVAL, "--seeds", seeds, "--table",
                       str(table), "--pack", str(pack)], threads=opt.threads, log=out / "evaluate.log")
            walls.setdefault(pack, []).append(r["wall"])
            tables[pack] = table
            rows.append([f"--pack {pack}", str(repeat + 1), f"{r['wall']:.0f}",
                         f"{r['load_before']:.1f} -> {r['load_after']:.1f}"])
    a, b = (list(csv.DictReader(open(tables[p]))) for p in (1, opt.pack))
    diff = max(abs(float(x[k]) - float(y[k])) for x, y in zip(a, b) for k in x if k.startswith("tinyworld_"))
    ratios = [p / q for p, q in zip(walls[1], walls[opt.pack])]
    rows.append(["ratio (--pack 1 / --pack N)", "", ", ".join(f"{x:.2f}" for x in ratios),
                 f"largest metric difference {diff:.2g}"])
    append(opt.results, f"Packed evaluation, tiny-world study, {datetime.date.today()}: {machine()}, commit "
           f"{git_commit()}", ["arm", "repeat", "wall s", "load average (1 min) before -> after"], rows,
           f"`python bench/bench_pack.py evaluate --sweep {opt.sweep} --pack {opt.pack} --eval_seeds "
           f"{opt.eval_seeds}`: {len(a)} runs, the study's settings (4 prompts, 25 steps, scale 5, batch 64, prior "
           f"prompt) with {opt.eval_seeds} seeds per prompt (the study: 16), {opt.threads} thread(s).")


MIXED = [  # name, seed, extra configs, overrides (tests/test_pack.py trains the same four)
    ("attn2o-ffni", 0, (), ()),
    ("transo", 1, (), ("din=transo", "dout=transo", "lr=3e-4", "model.params.reg_weight=0.5")),
    ("resblock", 2, (), ("din=resi", "dout=reso", "mid_dim=4", "method=silu")),
    ("lora-te", 3, ("configs/lora/lora-unet-te-r4.yaml",),
     ("model.params.unet_config.params.adapter_config.transformer_adp_config=[]",
      "model.params.unet_config.params.adapter_config.projection_adp_config.0.dropout=0.1")),
]
TEST_BASES = ("configs/tests/tiny-inference.yaml", "configs/stable-diffusion/v1-finetune-dreambooth.yaml",
              "configs/tests/tiny-dreambooth.yaml")


def tiny_world_files(out: Path) -> Tuple[Path, Path]:
    """The test model with random weights (its zero-initialised layers made to act) and three subject images."""
    import numpy as np
    import torch
    from omegaconf import OmegaConf
    from PIL import Image
    from ldm.checkpoint import save_state_dict
    from ldm.util.instantiate import instantiate_from_config
    ckpt, data = out / "tiny.safetensors", out / "subject"
    if not ckpt.exists():
        torch.manual_seed(0)
        model = instantiate_from_config(OmegaConf.load(REPO / TEST_BASES[0]).model)
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not m.weight.any():
                m.reset_parameters()
        save_state_dict(model.state_dict(), str(ckpt))
    data.mkdir(exist_ok=True)
    for i in range(3):
        a = np.zeros((40, 48, 3), np.uint8)
        a[..., 0], a[8:30, 6 + 4 * i:26 + 4 * i] = 200, (20, 220, 50)
        Image.fromarray(a).save(data / f"subject-{i}.png")
    return ckpt, data


def mixed_runs(out: Path, name: str, steps: int) -> List[RunRequest]:
    ckpt, data = tiny_world_files(out)
    return [RunRequest(base=tuple(str(REPO / b) for b in (*TEST_BASES, *bases)), train=True, seed=seed, name=run,
                       overrides=("lightning.callbacks.image_logger.params.disabled=true", *extra),
                       actual_resume=str(ckpt), data_root=str(data), class_word="cat", reg_data_root=str(out / "class"),
                       max_steps=steps, logdir=str(out / name)) for run, seed, bases, extra in MIXED]


def run_result(logdir: Path) -> Tuple[Dict, List[float]]:
    """A run's last adapter weights and its logged losses."""
    from ldm.checkpoint import load_state_dict
    last = max((logdir / "checkpoints").glob("*-adapters"), key=lambda p: int(p.name.split("-")[0]))
    with open(next((logdir / "csv").glob("*/metrics.csv"))) as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    return load_state_dict(str(last / "adapters.safetensors")), losses


def differences(one: Tuple[Dict, List[float]], other: Tuple[Dict, List[float]]) -> List[float]:
    """Largest loss difference, % of weights off by > 1e-5, largest weight difference, largest weight."""
    import torch
    (w, loss), (v, other_loss) = one, other
    if len(loss) != len(other_loss) or set(w) != set(v):
        raise SystemExit("error: the runs compared logged different steps or hold different adapters")
    diff = torch.cat([(w[k] - v[k]).flatten() for k in w]).abs()
    return [max(abs(a - b) for a, b in zip(loss, other_loss)), 100 * (diff > 1e-5).float().mean().item(),
            diff.max().item(), max(x.abs().max().item() for x in w.values())]


def cells(d: List[float]) -> List[str]:
    return [f"{d[0]:.1e}", f"{d[1]:.2f}", f"{d[2]:.1e}", f"{d[3]:.2f}"]


DIFF_HEADER = ["largest loss difference", "% weights off by > 1e-5", "largest weight difference", "largest weight"]


def equal(opt: argparse.Namespace, out: Path) -> None:
    import torch
    from ldm.train import run, train_runs

    torch.set_num_threads(1)
    separate = [run_result(run(r)) for r in mixed_runs(out, "separate", opt.steps)]
    packed = [run_result(p) for p, _ in train_runs(mixed_runs(out, "packed", opt.steps))]
    with torch.backends.mkldnn.flags(enabled=False):  # PyTorch's own convolution kernels: other float sums
        control = [run_result(run(r)) for r in mixed_runs(out, "no-onednn", opt.steps)]
    rows = []
    for (name, *_), own, others in zip(MIXED, separate, zip(packed, control)):
        for what, other in zip(("packed", "separate, oneDNN off (control)"), others):
            rows.append([name, what, *cells(differences(own, other))])
    append(opt.results, f"Packed training vs separate runs, {datetime.date.today()}: {machine()}, commit "
           f"{git_commit()}", ["run", "compared with the separate run (1 thread)", *DIFF_HEADER], rows,
           f"`python bench/bench_pack.py equal --steps {opt.steps}`: the four mixed runs of tests/test_pack.py, "
           f"{opt.steps} steps (the LoRA run 20 in the test; here all {opt.steps}), AdamW.")


def same(opt: argparse.Namespace, out: Path) -> None:
    """The runs of two sweeps of one sweep file (e.g. the two arms of `train`) compared run by run."""
    a, b = (Path(s) for s in opt.sweeps.split(","))
    names = sorted(p.name for p in (a / "runs").iterdir())
    if names != sorted(p.name for p in (b / "runs").iterdir()):
        raise SystemExit(f"error: {a} and {b} hold different runs")
    d = [differences(run_result(a / "runs" / n), run_result(b / "runs" / n)) for n in names]
    worst = [max(x[k] for x in d) for k in range(4)]
    append(opt.results, f"Packed vs unpacked study runs, {datetime.date.today()}: {machine()}, commit {git_commit()}",
           ["runs", *[f"{h} (the worst run)" for h in DIFF_HEADER]], [[str(len(names)), *cells(worst)]],
           f"`python bench/bench_pack.py same --sweeps {opt.sweeps}`: each run of the one sweep against the same run "
           "of the other (losses at every logged step, adapter weights at the last checkpoint).")


def main(argv: Optional[List[str]] = None) -> None:
    opt = parse_args(argv)
    out = Path(opt.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if opt.what in ("train", "memory") and not (out / "class-images").is_dir():
        class_images(out)
    {"train": train, "memory": memory, "evaluate": evaluate, "equal": equal, "same": same}[opt.what](opt, out)


if __name__ == "__main__":
    main()
