"""sample.py end to end on the tiny config: files written, bit-for-bit repeatable, img2img, clear errors."""
import numpy as np
import pytest
from PIL import Image

import sample
from conftest import TINY_CONFIG

BASE = ["--config", str(TINY_CONFIG), "--random_init", "--H", "32", "--W", "32", "--ddim_steps", "4",
        "--n_samples", "2", "--n_iter", "1", "--scale", "3.0"]


def _pixels(path):
    return np.asarray(Image.open(path))


def test_writes_samples_and_grid(tmp_path):
    written = sample.main(BASE + ["--prompt", "a red star", "--outdir", str(tmp_path), "--n_iter", "2"])
    names = sorted(p.relative_to(tmp_path).as_posix() for p in written)
    assert names == ["grid-0000.png", "samples/00000.png", "samples/00001.png", "samples/00002.png",
                     "samples/00003.png"]
    assert Image.open(tmp_path / "samples" / "00000.png").size == (32, 32)
    again = sample.main(BASE + ["--prompt", "a red star", "--outdir", str(tmp_path), "--skip_grid"])
    assert sorted(p.name for p in again) == ["00004.png", "00005.png"]  # numbering continues, nothing overwritten


@pytest.mark.parametrize("extra", [[], ["--plms"], ["--fixed_code"], ["--ddim_eta", "1.0"]])
def test_seeded_runs_are_bit_identical(tmp_path, extra):
    a = sample.main(BASE + extra + ["--outdir", str(tmp_path / "a"), "--skip_grid"])
    b = sample.main(BASE + extra + ["--outdir", str(tmp_path / "b"), "--skip_grid"])
    c = sample.main(BASE + extra + ["--outdir", str(tmp_path / "c"), "--skip_grid", "--seed", "7"])
    assert all(np.array_equal(_pixels(x), _pixels(y)) for x, y in zip(a, b))
    assert not np.array_equal(_pixels(a[0]), _pixels(c[0]))


def test_from_file_and_img2img(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red star\n\na blue circle\n")
    written = sample.main(BASE + ["--from-file", str(prompts), "--outdir", str(tmp_path / "f"), "--skip_grid"])
    assert len(written) == 4
    init = tmp_path / "init.png"
    Image.fromarray(np.full((40, 48, 3), 200, dtype=np.uint8)).save(init)
    out = sample.main(BASE + ["--init-img", str(init), "--strength", "0.5", "--outdir", str(tmp_path / "i")])
    assert Image.open(out[0]).size == (32, 32)


@pytest.mark.parametrize("args,message", [
    (["--from-file", "{tmp}/empty.txt"], "is empty"),
    (["--from-file", "{tmp}/absent.txt"], "prompt file not found"),
    (["--H", "30"], "multiples of 16 \\(--f 8 x the UNet's downsampling 2\\)"),
    (["--init-img", "{tmp}/absent.png"], "--init-img not found"),
    (["--init-img", "{tmp}/empty.txt", "--strength", "1.5"], "--strength"),
])
def test_bad_input_gets_one_clear_message(tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(SystemExit, match=message):
        sample.main(BASE + [a.format(tmp=tmp_path) for a in args] + ["--outdir", str(tmp_path / "o")])


def test_missing_checkpoint_and_bad_config(tmp_path):
    with pytest.raises(SystemExit, match="checkpoint not found"):
        sample.main(["--config", str(TINY_CONFIG), "--ckpt", str(tmp_path / "none.ckpt"), "--outdir", str(tmp_path)])
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY_CONFIG.read_text().replace("ldm.models.autoencoder.AutoencoderKL",
                                                   "ldm.models.autoencoder.AutoencoderXL"))
    with pytest.raises(SystemExit, match="has no attribute 'AutoencoderXL'"):
        sample.main(["--config", str(bad), "--random_init", "--outdir", str(tmp_path)])
