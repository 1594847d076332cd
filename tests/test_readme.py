"""The README's copy-paste commands for the tiny model run as pasted into a fresh shell after `make demo`: the marked
block as one bash script, in a fresh folder that holds the repository's entry points, configs, models, assets and the
virtual environment (so outputs land there), with nothing of that environment on the PATH until the block activates
it."""
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

MARKER = "<!-- tiny-model commands"
LINKED = ("sample.py", "main_dream_booth.py", "scripts", "configs", "models", "assets")


def readme_block() -> str:
    """The README's bash block after MARKER, as written."""
    text = (REPO / "README.md").read_text()
    assert text.count(MARKER) == 1, "the README must mark exactly one block of tiny-model commands"
    return text.split(MARKER, 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]


def readme_commands() -> List[str]:
    """The commands of the README block: comments dropped, backslash continuations joined."""
    lines = readme_block().replace("\\\n", " ").splitlines()
    return [line.split(" #", 1)[0].strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def venv_dir() -> Path:
    """The virtual environment running the tests (`make test`'s .venv): the block activates its like."""
    prefix = Path(sys.prefix)
    if prefix == Path(sys.base_prefix) or not (prefix / "bin" / "activate").is_file():
        pytest.skip("the tests do not run in a virtual environment: the README block activates .venv")
    return prefix


def test_the_block_is_found_and_holds_what_it_promises():
    commands = readme_commands()
    assert commands[0] == "source .venv/bin/activate"
    commands = commands[1:]
    assert len(commands) == 4 and all(c.startswith("python ") for c in commands)
    assert commands[0] == 'python sample.py --ckpt models/ldm/tiny-sd-v1/model.safetensors --prompt "a photo of a ' \
                          'red star"'


@pytest.mark.slow
def test_every_tiny_model_command_runs_as_written(tmp_path):
    for name in LINKED:
        (tmp_path / name).symlink_to(REPO / name)
    venv = venv_dir()
    (tmp_path / ".venv").symlink_to(venv)
    path = [p for p in os.environ["PATH"].split(os.pathsep) if Path(p).resolve() != (venv / "bin").resolve()]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    # a fresh shell: no environment on the PATH; PYTHONPATH only names the code under test (the venv's editable
    # install names it too, unless the tests run from a copy); threads only change the speed
    env.update(PATH=os.pathsep.join(path), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    run = subprocess.run(["bash", "-e", "-c", readme_block()], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=1800)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    samples = sorted((tmp_path / "outputs" / "txt2img-samples" / "samples").glob("*.png"))
    assert len(samples) == 6 + 3 and Image.open(samples[0]).size == (64, 64)  # 3 x 2 plain, 3 x 1 with the adapter
    grids = sorted((tmp_path / "outputs" / "txt2img-samples").glob("grid-*.png"))
    assert [g.name for g in grids] == ["grid-0000.png", "grid-0001.png"]
    (run_dir,) = (tmp_path / "outputs" / "runs").glob("*_my_star")
    assert (run_dir / "checkpoints" / "99-adapters" / "adapters.safetensors").is_file()
    assert len(list((tmp_path / "outputs" / "class-star").glob("*.png"))) == 16
    assert (tmp_path / "outputs" / "demo-quick" / "before_after.png").is_file()
    assert (tmp_path / "outputs" / "demo-quick" / "metrics.json").is_file()
    plain, tuned = (np.asarray(Image.open(samples[i])) for i in (0, 6))
    assert not np.array_equal(plain, tuned)


def test_the_v3_numbers_are_those_of_its_files():
    """The README's v3 numbers are those of the committed report files (docs/tiny-world/v3/), as printed."""
    import json
    readme = (REPO / "README.md").read_text()
    text = " ".join(readme[readme.index("- **v3: trained on this CPU"):readme.index("- **DreamBooth on the demo")].split())
    quality = json.loads((REPO / "docs/tiny-world/v3/base-quality.json").read_text())
    for key, name in (("shape", "shape"), ("colour", "colour"), ("texture", "texture"), ("background", "background")):
        low, high = quality[key]["ci95"]
        assert f"{name} {quality[key]['value']:.3f} ({low:.3f}-{high:.3f}" in text, key
    assert f"prompt fidelity {quality['prompt_fidelity']['value']:.3f}" in text
    assert f"({quality['ae_subject_look']['ci95'][0]:.3f}-1.000; goal 0.9)" in text
    demo = json.loads((REPO / "docs/tiny-world/v3/demo-metrics.json").read_text())
    assert f"in {round(demo['subject_rate'] * 16)} of 16 ({demo['subject_rate']:.2f}," in text
    assert f"class similarity to the base {demo['class_similarity_to_base']:.3f}" in text
    assert f"prompt fidelity {demo['prompt_fidelity']:.3f} against the base model's " \
           f"{demo['prompt_fidelity_base']:.3f}" in text
