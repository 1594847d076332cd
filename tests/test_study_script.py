"""scripts/tiny_world_study.sh, driven with a stand-in Python that records its commands: a study over several subjects
stamps every subject's class-image folder with the base model's hash (and refuses folders made from another base
model), and the analysis is asked for the plan; the report folder gets the results table."""
import os
import subprocess
import sys

import pytest

from conftest import REPO

STUB = """#!{python}
import pathlib, sys
args = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(" ".join(args) + "\\n")
if args[0] == "scripts/evaluate.py":
    pathlib.Path(args[1], "results.csv").write_text("run,subject\\n")
if args[0] == "scripts/anova.py":
    out = pathlib.Path(args[args.index("--out") + 1])
    out.mkdir(parents=True)
    (out / "report.md").write_text("report")
    print("- To detect 0.015 ...")
    print(f"report in {{out / 'report.md'}}")
"""

SPEC = """name: subjects
base: [configs/tiny-world/tiny-sd-v1.yaml]
overrides:
  - actual_resume={base}
  # reg_data_root: {tmp}/not-a-folder-of-this-study (a comment: not stamped)
factors:
  subject:
    levels:
      star: {{data_root: assets/tiny-world/sks-star, class_word: star, reg_data_root: {tmp}/class-star}}
      heart: {{data_root: {tmp}/heart, class_word: heart, reg_data_root: {tmp}/class-heart}}
  seed: {{key: seed, levels: [0, 1, 2]}}
"""


def run_study(tmp_path, base):
    log = tmp_path / "commands.log"
    stub = tmp_path / "python"
    stub.write_text(STUB.format(python=sys.executable, log=str(log)))
    stub.chmod(0o755)
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(base=base, tmp=tmp_path))
    env = {**os.environ, "PYTHON": str(stub), "SPEC": str(spec), "SWEEP_DIR": str(tmp_path / "sweep"),
           "REPORT_DIR": str(tmp_path / "report")}
    done = subprocess.run(["bash", str(REPO / "scripts" / "tiny_world_study.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    return done, (log.read_text().splitlines() if log.exists() else [])


def test_study_script_with_several_subjects(tmp_path):
    base = tmp_path / "base.safetensors"
    base.write_bytes(b"weights")
    done, commands = run_study(tmp_path, base)
    assert done.returncode == 0, done.stderr
    digest = (tmp_path / "sweep" / ".base-model.sha256").read_text().strip()
    for folder in ("class-star", "class-heart"):
        assert (tmp_path / folder / ".base-model.sha256").read_text().strip() == digest
    assert not (tmp_path / "not-a-folder-of-this-study").exists()
    assert [c.split()[0] for c in commands] == ["scripts/sweep.py", "scripts/evaluate.py", "scripts/anova.py"]
    assert "--factors din dout --plan 0.015 --out" in commands[2]
    assert (tmp_path / "report" / "results.csv").is_file()
    base.write_bytes(b"other weights")  # a class-image folder made from another base model is refused
    done, _ = run_study(tmp_path, base)
    assert done.returncode == 1 and "was made from another base model" in done.stderr


@pytest.mark.slow
def test_the_v3_study_spec_has_four_subjects_by_their_folders(tmp_path):
    """configs/sweeps/tiny-world-study-v3.yaml (issue 25's re-run): the 20 pairs x 4 subjects x 3 seeds, each subject
    with its own folder (named as its level, the name its subject rate's look is found by), class word and class-image
    folder; the study script refuses it while its base model is missing."""
    from ldm.sweep.spec import expand, load_spec
    grid = expand(load_spec(REPO / "configs/sweeps/tiny-world-study-v3.yaml"), root=REPO)
    assert len(grid.runs) == 240 and len({(r.levels["din"], r.levels["dout"]) for r in grid.runs}) == 20
    subjects = {}
    for run in grid.runs:
        train, reg = run.config.data.params.train.params, run.config.data.params.reg.params
        subjects.setdefault(run.levels["subject"], set()).add((train.data_root, train.class_word, reg.data_root,
                                                               reg.class_word))
    assert len(subjects) == 4 and all(len(v) == 1 for v in subjects.values())
    for name, ((folder, word, classes, reg_word),) in subjects.items():
        assert os.path.basename(folder) == name and word == reg_word and word in name
    assert len({classes for ((_, _, classes, _),) in subjects.values()}) == 4
    assert {r.levels["seed"] for r in grid.runs} == {0, 1, 2}
    prompts = (REPO / "configs/sweeps/tiny-world-prompts-v3.txt").read_text().splitlines()
    assert len(prompts) == 4 and all(p.startswith("photo of a {token} {class_word}") for p in prompts)
    assert grid.runs[0].config.model.params.ckpt_path == str(REPO / "models/ldm/tiny-sd-v1-f4/model.safetensors")
    if not (REPO / "models/ldm/tiny-sd-v1-f4/model.safetensors").exists():
        done = subprocess.run(["bash", str(REPO / "scripts" / "tiny_world_study.sh")], capture_output=True, text=True,
                              env={**os.environ, "SPEC": "configs/sweeps/tiny-world-study-v3.yaml",
                                   "SWEEP_DIR": str(tmp_path / "sweep")}, timeout=60)
        assert done.returncode == 1 and "does not exist: train it first" in done.stderr
        assert not (tmp_path / "sweep").exists()
