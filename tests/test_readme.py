"""The README's copy-paste commands for the tiny model run as written: each command of the marked block, in order, in
a fresh folder that holds the repository's entry points, configs, models and assets (so outputs land there)."""
import os
import subprocess
import sys
from typing import List

import numpy as np
from PIL import Image

from conftest import REPO

MARKER = "<!-- tiny-model commands"
LINKED = ("sample.py", "main_dream_booth.py", "scripts", "configs", "models", "assets")


def readme_commands() -> List[str]:
    """The commands of the README block after MARKER: comments dropped, backslash continuations joined."""
    text = (REPO / "README.md").read_text()
    assert text.count(MARKER) == 1, "the README must mark exactly one block of tiny-model commands"
    block = text.split(MARKER, 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_the_block_is_found_and_holds_what_it_promises():
    commands = readme_commands()
    assert len(commands) == 4 and all(c.startswith("python ") for c in commands)
    assert commands[0] == 'python sample.py --ckpt models/ldm/tiny-sd-v1/model.safetensors --prompt "a photo of a ' \
                          'red star"'


def test_every_tiny_model_command_runs_as_written(tmp_path):
    for name in LINKED:
        (tmp_path / name).symlink_to(REPO / name)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # threads only change the speed
    for command in readme_commands():
        run = subprocess.run(["bash", "-c", sys.executable + command[len("python"):]], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=1800)
        assert run.returncode == 0 and "Traceback" not in run.stderr, f"$ {command}\n{run.stderr[-3000:]}"
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
