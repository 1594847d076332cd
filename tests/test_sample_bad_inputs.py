"""sample.py refuses bad input before any work: one clear line naming the flag and the fix, no traceback, a non-zero
exit, and nothing that existed changed (the output folder hashed before and after). Then: outputs never overwrite a
file, also with two sample.py processes writing into one folder at once."""
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sample
from conftest import REPO, TINY_CONFIG, covering, snapshot
from ldm.util.numbered import save_numbered

TINY_CKPT = REPO / "models" / "ldm" / "tiny-sd-v1" / "model.safetensors"
BASE = ["--config", str(TINY_CONFIG), "--random_init", "--H", "32", "--W", "32", "--ddim_steps", "2",
        "--n_samples", "1", "--n_iter", "1"]
READ_ONLY = "/sys/sample-outdir" if os.geteuid() == 0 else "{tmp}/read-only/out"  # root writes through chmod

# (arguments, what the one line must say); {tmp} is the test's folder, {out} the existing output folder
ROWS = [
    (["--scale", "nan"], "argument --scale: must be a finite number >= 0, got 'nan'"),
    (["--scale", "inf"], "argument --scale: must be a finite number >= 0, got 'inf'"),
    (["--scale", "-1"], "argument --scale: must be a finite number >= 0, got '-1'"),
    (["--scale", "high"], "argument --scale: must be a finite number >= 0, got 'high'"),
    (["--adapter_scale", "nan", "--adapter_path", "{tmp}/a"], "argument --adapter_scale: must be a finite number"),
    (["--adapter_scale=-inf", "--adapter_path", "{tmp}/a"], "argument --adapter_scale: must be a finite number"),
    (["--n_rows", "-2"], "argument --n_rows: must be an integer >= 0, got '-2'"),
    (["--ddim_eta", "-1"], "argument --ddim_eta: must be a finite number >= 0, got '-1'"),
    (["--ddim_eta", "nan"], "argument --ddim_eta: must be a finite number >= 0, got 'nan'"),
    (["--n_samples", "0"], "argument --n_samples: must be an integer >= 1, got '0'"),
    (["--n_samples", "1.5"], "argument --n_samples: must be an integer >= 1, got '1.5'"),
    (["--n_iter", "0"], "argument --n_iter: must be an integer >= 1, got '0'"),
    (["--H", "0"], "argument --H: must be an integer >= 1, got '0'"),
    (["--W", "-64"], "argument --W: must be an integer >= 1, got '-64'"),
    (["--H", "30"], "--H and --W must be multiples of 16 (--f 8 x the UNet's downsampling 2), got 30x32"),
    (["--ddim_steps", "0"], "argument --ddim_steps: must be an integer >= 1, got '0'"),
    (["--ddim_steps", "-3"], "argument --ddim_steps: must be an integer >= 1, got '-3'"),
    (["--ddim_steps", "2000"], "--ddim_steps 2000 is more than the 1000 steps ddim can take on the model's 1000"),
    (["--ddim_steps", "1000", "--sampler", "dpm++2m"], "--ddim_steps 1000 is more than the 999 steps dpm++2m"),
    (["--strength", "0", "--init-img", "{tmp}/init.png"], "argument --strength: must be a finite number in (0, 1], got '0'"),
    (["--strength", "1.5", "--init-img", "{tmp}/init.png"], "argument --strength: must be a finite number in (0, 1]"),
    (["--strength", "nan", "--init-img", "{tmp}/init.png"], "argument --strength: must be a finite number in (0, 1]"),
    (["--seed", "-1"], "argument --seed: must be an integer in [0, "),
    (["--C", "3"], "--C 3 differs from the model's latent channels 4: drop --C"),
    (["--f", "4"], "--f 4 differs from the model's autoencoder downsampling factor 8: drop --f"),
    (["--init-img", "{tmp}/notes.txt"], "--init-img '{tmp}/notes.txt' is not an image PIL can read"),
    (["--init-img", "{tmp}/truncated.png"], "--init-img '{tmp}/truncated.png' is not an image PIL can read"),
    (["--init-img", "{tmp}/absent.png"], "--init-img not found: '{tmp}/absent.png'"),
    (["--outdir", "{tmp}/notes.txt/out"], "--outdir '{tmp}/notes.txt/out' lies under '{tmp}/notes.txt', which is a "
                                          "file, not a folder"),
    (["--outdir", "{tmp}/notes.txt"], "--outdir '{tmp}/notes.txt' is a file, not a folder"),
    (["--outdir", READ_ONLY], f"--outdir '{READ_ONLY}' cannot be written"),
    (["--adapter_path", "{tmp}/absent"], "--adapter_path not found: '{tmp}/absent'"),
    (["--adapter_path", "{tmp}/a", "--adapter_scale", "1", "--adapter_scale", "2"], "give one --adapter_scale per "
                                                                                     "--adapter_path"),
    (["--adapter_scale_sweep", "0,nan", "--adapter_path", "{tmp}/a"], "--adapter_scale_sweep takes comma-separated "
                                                                      "numbers"),
    (["--adapter_config", "{tmp}/notes.txt"], "--adapter_config builds the adapters of an original-format "
                                              "--adapter_path: add one"),
    (["--adapter_path", "{tmp}/a", "--adapter_config", "{tmp}/adapters.yaml"], "holds no UNet adapter config"),
    (["--config", "{tmp}/absent.yaml"], "--config not found: '{tmp}/absent.yaml'"),
    (["--from-file", "{tmp}/absent.txt"], "prompt file not found"),
    (["--from-file", "{tmp}/empty.txt"], "is empty: put one prompt per line"),
    (["--sampler", "euler"], "argument --sampler: invalid choice: 'euler'"),
    (["--precision", "half"], "argument --precision: invalid choice: 'half'"),
    (["--plms", "--dpm_solver"], "pick one sampler: --plms or --dpm_solver"),
    (["--dpm_solver", "--ddim_eta", "0.5"], "dpm++2m is deterministic; drop --ddim_eta"),
    (["--gif"], "--gif animates an adapter scale sweep"),
    (["--skip_save", "--skip_grid"], "--skip_save and --skip_grid together would save nothing"),
    (["--n_sample", "2"], "unrecognized arguments: --n_sample 2"),  # no abbreviations: a misspelling is refused
]
NO_CONFIG_ROWS = [  # without --config / --random_init: the checkpoint and the config found for it
    (["--ckpt", "{tmp}/absent.ckpt"], "checkpoint not found: '{tmp}/absent.ckpt'"),
    ([], "checkpoint not found: 'models/ldm/stable-diffusion-v1/model.ckpt' (--ckpt takes an SD v1 .ckpt / "
         ".safetensors file or a diffusers model folder; to try the project's tiny model: --ckpt "
         "models/ldm/tiny-sd-v1/model.safetensors)"),
    (["--ckpt", str(TINY_CKPT), "--config", str(TINY_CONFIG)], "Pass --config configs/tiny-world/tiny-sd-v1.yaml "
                                                               "(these weights fit it)"),
    (["--ckpt", str(TINY_CKPT), "--adapter_path", "{tmp}/notes.txt"], "is not a LoRA file"),
    (["--ckpt", str(TINY_CKPT), "--H", "32"], "--H and --W must be multiples of 64 (--f 8 x the UNet's downsampling "
                                              "8), got 32x64"),  # was a traceback deep in the UNet
]


@pytest.fixture
def world(tmp_path):
    """Inputs of every kind next to an output folder that already holds a run's files."""
    (tmp_path / "notes.txt").write_text("not an image\n")
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "a").mkdir()
    (tmp_path / "adapters.yaml").write_text("something: else\n")
    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "init.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "init.png").read_bytes()[:60])
    out = tmp_path / "out"
    (out / "samples").mkdir(parents=True)
    for name in ("samples/00000.png", "samples/00003.png", "grid-0000.png"):
        Image.new("RGB", (32, 32), (len(name), 0, 0)).save(out / name)
    if os.geteuid() != 0:
        (tmp_path / "read-only").mkdir()
        (tmp_path / "read-only").chmod(0o555)
    return tmp_path


def refused(argv, capsys):
    """The one-line message sample.main exits with (no other exception escapes it: no traceback)."""
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    assert e.value.code not in (0, None)
    message = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err
    assert "Traceback" not in message and len(message.strip().splitlines()) == 1, message
    return message


# make test-fast: the first row with a config and the first without
@pytest.mark.parametrize("args,message", covering(ROWS + NO_CONFIG_ROWS, lambda a, m: (a, m) in ROWS),
                         ids=[" ".join(a)[:60] or "defaults" for a, _ in ROWS + NO_CONFIG_ROWS])
def test_bad_input_is_one_line_and_changes_nothing(world, capsys, args, message):
    fill = {"tmp": world, "out": world / "out"}
    base = BASE if (args, message) in ROWS else []
    outdir = [] if "--outdir" in args else ["--outdir", str(world / "out")]
    before = snapshot(world)
    text = refused(base + [a.format(**fill) for a in args] + outdir, capsys)
    assert message.format(**fill) in text
    assert text.startswith("error: ") or text.startswith("sample.py: error: ")
    assert snapshot(world) == before


@pytest.mark.slow
def test_a_bad_number_as_a_user_sees_it(tmp_path):
    """The real command line: one line on stderr, exit status 1, no traceback, before the model is even built."""
    result = subprocess.run([sys.executable, str(REPO / "sample.py"), "--scale", "nan", "--outdir", str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["sample.py: error: argument --scale: must be a finite number >= 0, got "
                                                  "'nan' (see sample.py --help)"]
    assert not list(tmp_path.iterdir())


def test_help_shows_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per option: no hyphen breaks inside the checked text
    with pytest.raises(SystemExit) as e:
        sample.parse_args(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("(default: 50)", "(default: 7.5)", "(default: outputs/txt2img-samples)", "(default: 42)",
                     "default: the model's, from its config: 512 for SD v1, 64 for the tiny model",
                     "(default: models/ldm/stable-diffusion-v1/model.ckpt)"):
        assert expected in text, expected
    assert "(default: None)" not in text and "(default: False)" not in text


# ---- never overwrite --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_numbers_continue_after_the_largest_and_never_fill_a_gap(world):
    out = world / "out"
    before = snapshot(out)
    written = sample.main(BASE + ["--outdir", str(out), "--n_samples", "2"])
    assert sorted(p.relative_to(out).as_posix() for p in written) == ["grid-0001.png", "samples/00004.png",
                                                                      "samples/00005.png"]
    after = snapshot(out)
    assert all(after[k] == v for k, v in before.items())  # the earlier files are untouched
    assert not list(out.rglob(".tmp-*"))


def test_writers_at_once_never_share_a_number(tmp_path):
    """Many threads saving into one folder: every file is written once, under its own number."""
    def write(i):
        save_numbered(tmp_path, ["grid-{:04}.png", "sweep-{:04}.gif"],
                      [lambda t: Path(t).write_text(f"grid {i}"), lambda t: Path(t).write_text(f"gif {i}")])
    threads = [threading.Thread(target=write, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    grids = sorted(tmp_path.glob("grid-*.png"))
    assert len(grids) == 16 and {p.read_text() for p in grids} == {f"grid {i}" for i in range(16)}
    for g in grids:  # a grid and its GIF always share the number
        assert (tmp_path / g.name.replace("grid", "sweep").replace(".png", ".gif")).read_text() == \
            g.read_text().replace("grid", "gif")
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.slow
def test_two_sample_processes_into_one_outdir(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "sample.py")] + BASE + ["--outdir", str(out), "--n_samples", "2", "--n_iter",
                                                              "3", "--no-watermark"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen(cmd + ["--seed", str(seed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             cwd=tmp_path, env=env) for seed in (1, 2)]
    for run in runs:
        _, err = run.communicate(timeout=900)
        assert run.returncode == 0, err.decode()[-2000:]
    samples, grids = sorted((out / "samples").glob("*.png")), sorted(out.glob("grid-*.png"))
    assert [p.name for p in samples] == [f"{i:05}.png" for i in range(12)]
    assert [p.name for p in grids] == ["grid-0000.png", "grid-0001.png"]
    pixels = {p.name: np.asarray(Image.open(p)) for p in samples}
    # the two seeds give different images: 12 files of 12 distinct images means no file was written twice
    assert len({a.tobytes() for a in pixels.values()}) == 12
