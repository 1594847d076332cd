"""The shared bad-input table (issue 15): every script but sample.py / main_dream_booth.py and the Python API behind
them, given what a careless user or a demanding tester gives them.

Each row is (what is called, its arguments, the files to set up, the expected message). A script row runs the
script's `main(argv)` in-process and asserts a non-zero exit with one clear line that matches the message; an API row
asserts the exception type and message. Every row asserts that no traceback reached stderr and that nothing that
existed before the call changed (the shared fixture folder and the row's own folder are hashed before and after; a
refused call creates nothing either). A few rows run as real subprocesses to check the real stderr. Behaviour that is
not a refusal (fresh output names, two processes on one sweep or one results table) has its own tests at the end.
"""
import importlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from PIL import Image

from conftest import REPO, TINY_CONFIG, build_tiny, covering, snapshot
from ldm.checkpoint import save_state_dict
from ldm.modules.adapters import inject_adapters, lora_state_dict, save_adapter_to_dir

CFG = str(TINY_CONFIG)
TINY_TRAIN = [str(REPO / b) for b in ("configs/tests/tiny-inference.yaml",
                                      "configs/stable-diffusion/v1-finetune-dreambooth.yaml",
                                      "configs/tests/tiny-dreambooth.yaml")]
LORA = {"projection_adp_config": [{"type": "lora", "target": ["attn1.to_q", "attn2.to_v"], "rank": 2, "alpha": 2.0}]}
IA3 = {"projection_adp_config": [{"type": "ia3", "target": ["attn1.to_k", "attn1.to_v"]}]}
BOTTLENECK = {"resblock_adp_config": {"din": "resi", "dout": "reso", "mid_dim": 2}}


# ---- the shared fixture folder ----------------------------------------------------------------------------------
def with_group(model, config, seed):
    inject_adapters(model.model.diffusion_model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def write_images(folder: Path, n: int = 2, size: int = 32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = np.full((size, size, 3), 40 * i, np.uint8)
        a[4:20, 6:22] = (220, 30, 30)
        Image.fromarray(a).save(folder / f"subject-{i}.png")
    return folder


def write_run(run_dir: Path, base: Path, subject: Path, seed: int = 0) -> Path:
    """A finished tiny DreamBooth run as evaluate.py sees it: config.yaml and checkpoints/0-adapters."""
    config = OmegaConf.merge(*[OmegaConf.load(b) for b in TINY_TRAIN])
    config.model.params.ckpt_path = str(base)
    config.data.params.train.params.data_root = str(subject)
    config.data.params.train.params.class_word = "cube"
    run_dir.mkdir(parents=True)
    OmegaConf.save(config, run_dir / "config.yaml")
    model = build_tiny()
    inject_adapters(model.model.diffusion_model, config.model.params.unet_config.params.adapter_config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    save_adapter_to_dir(model.model.diffusion_model, run_dir / "checkpoints" / "0-adapters")
    return run_dir


def results_table() -> str:
    rows = ["run,din,seed,dino_i,note"]
    for i, din in enumerate(["attn1i", "attn2o", "ffni"] * 2):
        rows.append(f"r{i},{din},{i // 3},{0.5 + 0.01 * i},x")
    return "\n".join(rows) + "\n"


def sweep_spec(levels=("attn2o", "attn1i")) -> Dict:
    return {"base": TINY_TRAIN, "overrides": ["max_steps=2"], "factors": {"din": {"key": "din", "levels": list(levels)}}}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return build_world(tmp_path_factory.mktemp("world"))


def build_world(w: Path) -> Path:
    """Inputs every row may read: a tiny base checkpoint, LoRA / (IA)^3 / bottleneck adapter directories, a kohya
    file, a results table, a sweep file and its prepared folder, a finished run, subject images and a plain file."""
    model = build_tiny()
    save_state_dict(model.state_dict(), str(w / "base.safetensors"))
    for name, config, seed in (("lora", LORA, 0), ("lora2", LORA, 1), ("ia3", IA3, 2), ("bottleneck", BOTTLENECK, 3)):
        save_adapter_to_dir(with_group(build_tiny(), config, seed).model.diffusion_model, w / name)
    kohya = with_group(build_tiny(), LORA, 4)
    save_state_dict(lora_state_dict(kohya, fmt="kohya"), str(w / "kohya.safetensors"), metadata={"format": "pt"})
    (w / "results.csv").write_text(results_table())
    (w / "file.txt").write_text("a plain file\n")
    (w / "spec.yaml").write_text(yaml.safe_dump(sweep_spec()))
    (w / "other-spec.yaml").write_text(yaml.safe_dump(sweep_spec(("attn2o",))))
    from ldm.sweep.runs import prepare
    prepare(str(w / "spec.yaml"), str(w / "sweep"))
    write_run(w / "run", w / "base.safetensors", write_images(w / "subject"))
    (w / "empty").mkdir()
    return w


@pytest.fixture(scope="module")
def readonly(tmp_path_factory) -> Path:
    """A folder nothing can be created in: a 0555 folder, or for root (whom permissions do not stop) /sys."""
    if os.geteuid() != 0:
        folder = tmp_path_factory.mktemp("readonly")
        folder.chmod(0o555)
        return folder
    try:
        os.rmdir(tempfile.mkdtemp(dir="/sys"))
    except OSError:
        return Path("/sys")
    pytest.skip("no read-only folder available to root here")


# ---- files a row sets up in its own folder T ----------------------------------------------------------------------
def text(name: str, content) -> Callable[[Path, Path], None]:
    def setup(w: Path, t: Path) -> None:
        path = t / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return setup


def copy_dir(src: str, name: str, **replace) -> Callable[[Path, Path], None]:
    """A copy of the world's folder `src` as T/name, with files replaced by the given contents."""
    def setup(w: Path, t: Path) -> None:
        (t / name).mkdir(parents=True)
        for f in (w / src).iterdir():
            (t / name / f.name).write_bytes(f.read_bytes())
        for file, content in replace.items():
            target = t / name / file.replace("__", ".")
            target.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def both(*setups: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    def setup(w: Path, t: Path) -> None:
        for s in setups:
            s(w, t)
    return setup


PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01" + bytes(range(256))
TINY_BASE = {"model_config": CFG, "work_dir": "{T}/w", "seed": 0, "data": {"num_images": 4, "size": 32},
             "vae": {"world": "base", "steps": 1, "batch_size": 2, "lr": 1e-3, "kl_weight": 1e-6, "l2_weight": 1.0},
             "decoder": None,
             "diffusion": {"steps": 1, "batch_size": 2, "lr": 1e-3, "warmup_steps": 0, "p_uncond": 0.1,
                           "ema_decay": 0.9, "checkpoint_every": 1}}


def base_config(**change) -> Callable[[Path, Path], None]:
    def setup(w: Path, t: Path) -> None:
        config = OmegaConf.create(json.loads(json.dumps(TINY_BASE).replace("{T}", str(t))))
        config.out = str(t / "tiny.safetensors")
        for key, value in change.items():
            OmegaConf.update(config, key.replace("__", "."), value, force_add=True)
        OmegaConf.save(config, t / "base.yaml")
    return setup


# ---- the table --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """A script (module under scripts/) with argv, or an API call(w, t), and the message it must give."""
    id: str
    category: str  # output | number | file | flags
    target: str  # script name, or "api"
    args: Tuple[str, ...] = ()
    message: str = ""
    setup: Optional[Callable[[Path, Path], None]] = None
    call: Optional[Callable[[Path, Path], object]] = None
    error: type = SystemExit


def S(id, category, script, args, message, setup=None):
    return Row(id, category, script, tuple(args), message, setup)


def A(id, category, call, error, message, setup=None):
    return Row(id, category, "api", (), message, setup, call, error)


UPL = ["--config", CFG, "--mode", "upl", "--path_1", "{W}/base.safetensors", "--path_2", "{W}/lora"]
EXACT = ["--config", CFG, "--mode", "exact", "--path_1", "{W}/lora", "--path_2", "{W}/lora2"]
OUT_ERR = "already exists .*nothing is overwritten"
MERGE = [
    S("alpha-nan", "number", "merge", UPL + ["--alpha", "nan", "--output_path", "{T}/m.ckpt"],
      r"argument --alpha: must be a finite number, got 'nan'"),
    S("alpha-inf", "number", "merge", EXACT + ["--alpha", "inf", "--output_path", "{T}/m"], r"--alpha: .*got 'inf'"),
    S("alpha-minus-inf", "number", "merge", EXACT + ["--alpha=-inf", "--output_path", "{T}/m"], r"--alpha: .*-inf"),
    S("alpha-text", "number", "merge", UPL + ["--alpha", "strong", "--output_path", "{T}/m.ckpt"],
      r"--alpha: must be a finite number, got 'strong'"),
    S("out-is-base", "output", "merge", UPL + ["--output_path", "{W}/base.safetensors"],
      r"output_path '.*base.safetensors' is the input .*choose another path"),
    S("out-is-lora", "output", "merge", EXACT + ["--output_path", "{W}/lora2"], r"is the input '.*lora2'"),
    S("out-inside-lora", "output", "merge", EXACT + ["--output_path", "{W}/lora/merged"],
      r"is inside the input '.*lora'"),
    S("out-inside-lora-file", "output", "merge", EXACT + ["--output_path", "{W}/lora/m.safetensors"],
      r"inside the input"),
    S("out-txt-upl", "output", "merge", UPL + ["--output_path", "{T}/m.txt"],
      r"has the suffix '.txt'; it must have .ckpt or .safetensors"),
    S("out-ckpt-exact", "output", "merge", EXACT + ["--output_path", "{T}/m.ckpt"],
      r"suffix '.ckpt'; it must have no suffix \(a folder\) or .safetensors"),
    S("out-exists-file", "output", "merge", UPL + ["--output_path", "{T}/old.ckpt"], OUT_ERR, text("old.ckpt", "x")),
    S("out-exists-dir", "output", "merge", EXACT + ["--output_path", "{W}/ia3"], OUT_ERR),
    S("out-under-file", "output", "merge", UPL + ["--output_path", "{W}/file.txt/m.ckpt"], r"which is a file"),
    S("out-empty", "output", "merge", UPL + ["--output_path", ""], r"--output_path is empty"),
    S("format-upl", "flags", "merge", UPL + ["--format", "diffusers", "--output_path", "{T}/m.ckpt"],
      r"--format .*lpl / exact"),
    S("format-dir", "flags", "merge", EXACT + ["--format", "diffusers", "--output_path", "{T}/m"],
      r"--format .*\.safetensors"),
    S("lora-bad-config", "file", "merge", UPL[:-1] + ["{T}/bad", "--output_path", "{T}/m.ckpt"],
      r"adapter_config.yaml' is not a valid adapter config", copy_dir("lora", "bad", adapter_config__yaml="[1, 2")),
    S("lora-truncated", "file", "merge", UPL[:-1] + ["{T}/bad", "--output_path", "{T}/m.ckpt"],
      r"truncated, corrupt", copy_dir("lora", "bad", adapters__safetensors=b"\x10\x00\x00")),
    S("lora-zero-byte", "file", "merge", EXACT[:-1] + ["{T}/bad", "--output_path", "{T}/m"],
      r"the file is empty \(0 bytes\)", copy_dir("lora", "bad", adapters__safetensors=b"")),
    S("base-zero-byte", "file", "merge", ["--config", CFG, "--mode", "upl", "--path_1", "{T}/b.ckpt", "--path_2",
                                          "{W}/lora", "--output_path", "{T}/m.ckpt"],
      r"cannot read checkpoint '.*b.ckpt': the file is empty \(0 bytes\)", text("b.ckpt", b"")),
    S("base-text", "file", "merge", ["--config", CFG, "--mode", "upl", "--path_1", "{T}/b.safetensors", "--path_2",
                                     "{W}/lora", "--output_path", "{T}/m.ckpt"],
      r"cannot read checkpoint", text("b.safetensors", "not weights")),
    S("base-missing", "file", "merge", ["--config", CFG, "--mode", "upl", "--path_1", "{T}/none.ckpt", "--path_2",
                                        "{W}/lora", "--output_path", "{T}/m.ckpt"], r"checkpoint not found"),
    S("base-empty-dir", "file", "merge", ["--config", CFG, "--mode", "upl", "--path_1", "{W}/empty", "--path_2",
                                          "{W}/lora", "--output_path", "{T}/m.ckpt"], r"is a folder but not a diffusers model folder"),
    S("base-other-model", "file", "merge", UPL[2:] + ["--output_path", "{T}/m.ckpt"], r"does not match the model"),
    S("lora-missing", "file", "merge", EXACT[:-1] + ["{T}/none", "--output_path", "{T}/m"],
      r"adapter path not found"),
    S("lora-not-adapters", "file", "merge", EXACT[:-1] + ["{W}/empty", "--output_path", "{T}/m"],
      r"is not an adapter directory"),
    S("config-missing", "file", "merge", ["--config", "{T}/none.yaml"] + UPL[2:] + ["--output_path", "{T}/m.ckpt"],
      r"config file not found"),
    S("config-yaml", "file", "merge", ["--config", "{T}/c.yaml"] + UPL[2:] + ["--output_path", "{T}/m.ckpt"],
      r"config file '.*c.yaml' is not valid YAML", text("c.yaml", "model: [1, 2\n")),
    S("config-not-a-model", "file", "merge", ["--config", "{W}/spec.yaml"] + EXACT[2:] + ["--output_path", "{T}/m"],
      r"the config has no model section"),
    S("exact-ia3", "file", "merge", EXACT[:-1] + ["{W}/ia3", "--output_path", "{T}/m"],
      r"merge it into a checkpoint with --mode upl"),
]

KOHYA = ["--config", CFG, "--input", "{W}/kohya.safetensors"]
DIR_IN = ["--config", CFG, "--input", "{W}/lora"]
CONVERT = [
    S("out-is-input", "output", "convert_lora", KOHYA + ["--output", "{W}/kohya.safetensors", "--to", "kohya"],
      r"--output '.*kohya.safetensors' is the input"),
    S("out-exists-file", "output", "convert_lora", DIR_IN + ["--output", "{T}/k.safetensors", "--to", "kohya"],
      OUT_ERR, text("k.safetensors", "mine")),
    S("out-exists-adapter-dir", "output", "convert_lora", KOHYA + ["--output", "{W}/lora2", "--to", "dir"], OUT_ERR),
    S("out-exists-diffusers-dir", "output", "convert_lora", KOHYA + ["--output", "{T}/d", "--to", "diffusers"],
      OUT_ERR, text("d/notes.md", "mine")),
    S("out-txt-kohya", "output", "convert_lora", DIR_IN + ["--output", "{T}/k.txt", "--to", "kohya"],
      r"suffix '.txt'; it must have .safetensors"),
    S("out-safetensors-dir", "output", "convert_lora", KOHYA + ["--output", "{T}/d.safetensors", "--to", "dir"],
      r"suffix '.safetensors'; it must have no suffix \(a folder\)"),
    S("out-inside-input", "output", "convert_lora", DIR_IN + ["--output", "{W}/lora/k.safetensors", "--to", "kohya"],
      r"inside the input"),
    S("out-under-file", "output", "convert_lora", DIR_IN + ["--output", "{W}/file.txt/k.safetensors", "--to",
                                                            "kohya"], r"which is a file"),
    S("in-missing", "file", "convert_lora", ["--config", CFG, "--input", "{T}/none", "--output", "{T}/o", "--to",
                                             "dir"], r"adapter path not found"),
    S("in-garbage", "file", "convert_lora", ["--config", CFG, "--input", "{T}/g.safetensors", "--output", "{T}/o",
                                             "--to", "dir"], r"truncated, corrupt", text("g.safetensors", PNG)),
    S("in-bad-config", "file", "convert_lora", ["--config", CFG, "--input", "{T}/bad", "--output", "{T}/o.safetensors",
                                                "--to", "kohya"],
      r"not a valid adapter config", copy_dir("lora", "bad", adapter_config__yaml="adapter_config: 3\n")),
    S("in-zero-weights", "file", "convert_lora", ["--config", CFG, "--input", "{T}/bad", "--output", "{T}/o.safetensors",
                                                  "--to", "kohya"],
      r"the file is empty \(0 bytes\)", copy_dir("lora", "bad", adapters__safetensors=b"")),
    S("in-unknown-keys", "file", "convert_lora", ["--config", CFG, "--input", "{T}/u.safetensors", "--output",
                                                  "{T}/o", "--to", "dir"], r"is neither kohya",
      lambda w, t: save_state_dict({"model.weight": torch.zeros(2)}, str(t / "u.safetensors"))),
    S("in-bottleneck", "file", "convert_lora", ["--config", CFG, "--input", "{W}/bottleneck", "--output",
                                                "{T}/o.safetensors", "--to", "kohya"], r"bottleneck"),
    S("in-empty-dir", "file", "convert_lora", ["--config", CFG, "--input", "{W}/empty", "--output", "{T}/o", "--to",
                                               "dir"], r"is not an adapter directory"),
    S("config-missing", "file", "convert_lora", ["--config", "{T}/none.yaml", "--input", "{W}/lora", "--output",
                                                 "{T}/o", "--to", "dir"], r"config file not found"),
    S("out-exists-peft-dir", "output", "convert_lora", KOHYA + ["--output", "{T}/p", "--to", "peft"], OUT_ERR,
      text("p/notes.md", "mine")),
    S("ckpt-missing", "file", "convert_lora", DIR_IN + ["--ckpt", "{T}/none.ckpt", "--output", "{T}/o.safetensors",
                                                        "--to", "kohya"], r"checkpoint not found"),
    S("ia3-to-peft", "file", "convert_lora", ["--config", CFG, "--input", "{W}/ia3", "--output", "{T}/p", "--to",
                                              "peft"], r"write \(IA\)\^3 as a kohya / A1111 file"),
]

EXPORT = ["--config", CFG, "--ckpt", "{W}/base.safetensors"]
EXPORTS = [
    S("alpha-nan", "number", "export_diffusers", EXPORT + ["--alpha", "nan", "--outdir", "{T}/o"],
      r"--alpha: must be a finite number, got 'nan'"),
    S("alpha-inf", "number", "export_diffusers", EXPORT + ["--alpha", "inf", "--outdir", "{T}/o"], r"--alpha: .*inf"),
    S("out-not-empty", "output", "export_diffusers", EXPORT + ["--outdir", "{W}/lora2"], OUT_ERR),
    S("out-is-file", "output", "export_diffusers", EXPORT + ["--outdir", "{W}/file.txt"], OUT_ERR),
    S("out-under-file", "output", "export_diffusers", EXPORT + ["--outdir", "{W}/file.txt/o"], r"which is a file"),
    S("out-inside-ckpt", "output", "export_diffusers", ["--config", CFG, "--ckpt", "{W}/sweep", "--outdir",
                                                        "{W}/sweep/export"], r"inside the input '.*sweep'"),
    S("out-is-adapter", "output", "export_diffusers", EXPORT + ["--adapter_path", "{W}/empty", "--outdir",
                                                                "{W}/empty"], r"is the input '.*empty'"),
    S("ckpt-zero-byte", "file", "export_diffusers", ["--config", CFG, "--ckpt", "{T}/b.ckpt", "--outdir", "{T}/o"],
      r"cannot read checkpoint", text("b.ckpt", b"")),
    S("ckpt-missing", "file", "export_diffusers", ["--config", CFG, "--ckpt", "{T}/no.ckpt", "--outdir", "{T}/o"],
      r"checkpoint not found"),
    S("ckpt-empty-dir", "file", "export_diffusers", ["--config", CFG, "--ckpt", "{W}/empty", "--outdir", "{T}/o"],
      r"is a folder but not a diffusers model folder"),
    S("config-not-a-model", "file", "export_diffusers", ["--config", "{T}/c.yaml", "--ckpt", "{W}/base.safetensors",
                                                         "--outdir", "{T}/o"], r"the config has no model section",
      text("c.yaml", "lightning: {trainer: {max_steps: 3}}\n")),
    S("adapter-corrupt", "file", "export_diffusers", EXPORT + ["--adapter_path", "{T}/bad", "--outdir", "{T}/o"],
      r"not a valid adapter config", copy_dir("lora", "bad", adapter_config__yaml="\x00\x01")),
    S("config-yaml", "file", "export_diffusers", ["--config", "{T}/c.yaml", "--ckpt", "{W}/base.safetensors",
                                                  "--outdir", "{T}/o"], r"not valid YAML", text("c.yaml", "a: b: c\n")),
]

EVAL = ["{W}/run", "--metric", "tinyworld"]
EVALUATE = [
    S("batch-0", "number", "evaluate", EVAL + ["--batch_size", "0"], r"--batch_size: must be an integer >= 1, got '0'"),
    S("batch-neg", "number", "evaluate", EVAL + ["--batch_size", "-1"], r"--batch_size: must be an integer >= 1"),
    S("eval-pack-0", "number", "evaluate", EVAL + ["--pack", "0"], r"--pack: must be an integer >= 1, got '0'"),
    S("steps-0", "number", "evaluate", EVAL + ["--steps", "0"], r"--steps: must be an integer >= 1"),
    S("steps-neg", "number", "evaluate", EVAL + ["--steps", "-3"], r"--steps: must be an integer >= 1"),
    S("steps-float", "number", "evaluate", EVAL + ["--steps", "2.5"], r"--steps: must be an integer >= 1, got '2.5'"),
    S("steps-too-many", "number", "evaluate", EVAL + ["--steps", "5000", "--table", "{T}/r.csv"],
      r"--steps 5000 is more than the 1000 diffusion steps .*run"),
    S("steps-huge", "number", "evaluate", EVAL + ["--steps", "9" * 40, "--table", "{T}/r.csv"],
      r"--steps 9{40} is more than the 1000 diffusion steps"),
    S("scale-nan", "number", "evaluate", EVAL + ["--scale", "nan"], r"--scale: must be a finite number, got 'nan'"),
    S("scale-inf", "number", "evaluate", EVAL + ["--scale", "inf"], r"--scale: must be a finite number"),
    S("seeds-empty", "number", "evaluate", EVAL + ["--seeds", ""], r"--seeds: must be comma-separated integers"),
    S("seeds-text", "number", "evaluate", EVAL + ["--seeds", "a,b"], r"--seeds: must be an integer in \[0, "),
    S("seeds-twice", "number", "evaluate", EVAL + ["--seeds", "0,0"], r"--seeds: lists a value twice"),
    S("seeds-negative", "number", "evaluate", EVAL + ["--seeds", "-1"], r"--seeds: must be an integer in \[0, "),
    S("step-negative", "number", "evaluate", EVAL + ["--step", "-1"], r"--step: must be an integer >= 0"),
    S("table-under-file", "output", "evaluate", EVAL + ["--table", "{W}/file.txt/r.csv"], r"which is a file"),
    S("table-is-dir", "output", "evaluate", EVAL + ["--table", "{W}/empty"], r"is a folder, not a results table"),
    S("table-not-results", "output", "evaluate", EVAL + ["--table", "{W}/run/config.yaml"],
      r"'.*config.yaml' is not a results table \(a CSV whose first column is 'run'\)"),
    S("table-binary", "output", "evaluate", EVAL + ["--table", "{T}/r.csv"], r"is not a results table",
      text("r.csv", PNG)),
    S("prompts-binary", "file", "evaluate", EVAL + ["--prompts", "{T}/p.txt"], r"prompt file .* is not text",
      text("p.txt", PNG)),
    S("prompts-field", "file", "evaluate", EVAL + ["--prompts", "{T}/p.txt"],
      r"prompt template 'a \{tokn\} dog' uses a field other than", text("p.txt", "a {tokn} dog\n")),
    S("prompts-brace", "file", "evaluate", EVAL + ["--prompts", "{T}/p.txt"],
      r"prompt template 'a \{token dog' is not a valid template", text("p.txt", "a {token dog\n")),
    S("prior-field", "flags", "evaluate", EVAL + ["--prior_prompt", "a {klass}"], r"uses a field other than"),
    S("device-tpu", "flags", "evaluate", EVAL + ["--device", "tpu"], r"--device: 'tpu' is not a torch device"),
    S("not-a-run", "file", "evaluate", ["{W}/empty", "--metric", "tinyworld"], r"neither a sweep folder"),
    S("run-config-yaml", "file", "evaluate", ["{T}/run", "--metric", "tinyworld", "--table", "{T}/r.csv"],
      r"config.yaml' is not valid YAML", text("run/config.yaml", "model: [\n")),
    S("metric-unknown", "flags", "evaluate", ["{W}/run", "--metric", "dinov9"], r"unknown metric backend 'dinov9'"),
    S("no-metric", "flags", "evaluate", ["{W}/run"], r"choose at least one --metric"),
]

ANOVA_T = ["{T}/r.csv", "--factors", "din"]
ANOVA = [
    S("alpha-2", "number", "anova", ["{W}/results.csv", "--factors", "din", "--alpha", "2"],
      r"--alpha must be between 0 and 1"),
    S("alpha-nan", "number", "anova", ["{W}/results.csv", "--factors", "din", "--alpha", "nan"],
      r"--alpha must be between 0 and 1"),
    S("empty-file", "file", "anova", ANOVA_T, r"results table '.*r.csv' is empty", text("r.csv", "")),
    S("not-csv", "file", "anova", ANOVA_T, r"'.*r.csv' is not a CSV table", text("r.csv", PNG)),
    S("ragged-csv", "file", "anova", ANOVA_T, r"is not a CSV table",
      text("r.csv", "run,din,dino_i\na,b,0.1\nc,d,0.2,9,9\n")),
    S("text-metric", "file", "anova", ANOVA_T + ["--metrics", "dino_i"],
      r"column dino_i holds text \('high' in run r2\)",
      text("r.csv", results_table().replace("0.52,x", "high,x"))),
    S("nan-metric", "file", "anova", ANOVA_T + ["--metrics", "dino_i"], r"dino_i has no finite value in any row",
      text("r.csv", "run,din,dino_i\na,x,nan\nb,y,\nc,x,inf\n")),
    S("header-only", "file", "anova", ANOVA_T, r"has no rows", text("r.csv", "run,din,dino_i\n")),
    S("table-is-dir", "file", "anova", ["{W}/empty", "--factors", "din"], r"is a folder, not a results table"),
    S("out-under-file", "output", "anova", ["{W}/results.csv", "--factors", "din", "--out", "{W}/file.txt/a"],
      r"which is a file"),
    S("sweep-json-corrupt", "file", "anova", ["{T}/r.csv"], r"sweep.json' .*not valid JSON",
      both(text("r.csv", results_table()), text("sweep.json", "{nope"))),
    S("sweep-json-shape", "file", "anova", ["{T}/r.csv"], r"sweep.json' .*no spec.factors",
      both(text("r.csv", results_table()), text("sweep.json", '{"spec": []}'))),
    S("factor-unknown", "flags", "anova", ["{W}/results.csv", "--factors", "dout"], r"no column\(s\) dout"),
    S("metric-is-factor-text", "flags", "anova", ["{W}/results.csv", "--factors", "seed", "--metrics", "din"],
      r"column din holds text"),
    S("interaction-bad", "flags", "anova", ["{W}/results.csv", "--factors", "din", "--interactions", "din-seed"],
      r"interaction 'din-seed'"),
    S("blocks-unknown", "flags", "anova", ["{W}/results.csv", "--factors", "din", "--blocks", "batch"],
      r"no column\(s\) batch"),
    S("plan-negative", "number", "anova", ["{W}/results.csv", "--factors", "din", "--plan", "-0.01"],
      r"the difference to detect must be a positive number"),
    S("plan-nan", "number", "anova", ["{W}/results.csv", "--factors", "din", "--plan", "nan"],
      r"the difference to detect must be a positive number"),
    S("covariate-text", "flags", "anova", ["{W}/results.csv", "--factors", "din", "--covariates", "run"],
      r"covariate run is not a finite number"),
    S("covariate-unknown", "flags", "anova", ["{W}/results.csv", "--factors", "din", "--covariates", "batch"],
      r"no column\(s\) batch"),
]

SPEC = ["{W}/spec.yaml", "--sweep_dir", "{T}/sw"]
SWEEP = [
    S("parallel-0", "number", "sweep", SPEC + ["--parallel", "0"], r"--parallel: must be an integer >= 1, got '0'"),
    S("parallel-neg", "number", "sweep", SPEC + ["--parallel", "-2"], r"--parallel: must be an integer >= 1"),
    S("pack-0", "number", "sweep", SPEC + ["--pack", "0"], r"--pack: must be a number of runs >= 1, or auto, got '0'"),
    S("pack-nan", "number", "sweep", SPEC + ["--pack", "nan"], r"--pack: must be a number of runs >= 1, or auto"),
    S("index-and-pack", "flags", "sweep", SPEC + ["--run_index", "0", "--pack", "2"],
      r"--run_index runs one run: --pack does not apply"),
    S("run-index-neg", "number", "sweep", SPEC + ["--run_index", "-1"], r"--run_index: must be an integer >= 0"),
    S("run-index-beyond", "number", "sweep", SPEC + ["--run_index", "2"],
      r"--run_index 2 is out of range: the sweep has runs 0..1"),
    S("run-index-beyond-jobs", "number", "sweep", ["{W}/spec.yaml", "--sweep_dir", "{W}/sweep", "--run_index", "7"],
      r"--run_index 7 is out of range"),
    S("devices-empty", "flags", "sweep", SPEC + ["--devices", ","], r"--devices: must be comma-separated integers"),
    S("devices-too-few", "flags", "sweep", SPEC + ["--devices", "0", "--parallel", "2"],
      r"--parallel 2 needs at least 2 --devices"),
    S("jobs-and-index", "flags", "sweep", SPEC + ["--print_jobs", "--run_index", "0"],
      r"--print_jobs cannot be combined with --run_index"),
    S("jobs-and-prepare", "flags", "sweep", SPEC + ["--print_jobs", "--prepare_only"],
      r"--print_jobs cannot be combined with --prepare_only"),
    S("index-and-parallel", "flags", "sweep", SPEC + ["--run_index", "0", "--parallel", "2"],
      r"--run_index runs one run: --parallel does not apply"),
    S("python-missing", "flags", "sweep", SPEC + ["--python", "{T}/no-python"], r"--python '.*no-python' not found"),
    S("spec-yaml", "file", "sweep", ["{T}/s.yaml", "--sweep_dir", "{T}/sw"], r"sweep file '.*s.yaml' is not valid YAML",
      text("s.yaml", "factors: {din: [\n")),
    S("spec-empty", "file", "sweep", ["{T}/s.yaml", "--sweep_dir", "{T}/sw"], r"expected a mapping with keys",
      text("s.yaml", "")),
    S("spec-list", "file", "sweep", ["{T}/s.yaml", "--sweep_dir", "{T}/sw"], r"expected a mapping with keys",
      text("s.yaml", "- a\n- b\n")),
    S("spec-unknown-key", "file", "sweep", ["{T}/s.yaml", "--sweep_dir", "{T}/sw"], r"unknown key\(s\) factor;",
      text("s.yaml", yaml.safe_dump({"base": TINY_TRAIN, "factor": {}}))),
    S("spec-binary", "file", "sweep", ["{T}/s.yaml", "--sweep_dir", "{T}/sw"], r"sweep file '.*s.yaml' is not",
      text("s.yaml", PNG)),
    S("spec-missing", "file", "sweep", ["{T}/none.yaml", "--sweep_dir", "{T}/sw"], r"sweep file not found"),
    S("spec-base-yaml", "file", "sweep", ["{T}/s.yaml", "--sweep_dir", "{T}/sw"], r"c.yaml' is not valid YAML",
      both(text("c.yaml", "model: {a: [\n"),
           lambda w, t: (t / "s.yaml").write_text(yaml.safe_dump(
               {"base": [str(t / "c.yaml")], "factors": {"s": {"key": "seed", "levels": [0]}}})))),
    S("sweep-dir-under-file", "output", "sweep", ["{W}/spec.yaml", "--sweep_dir", "{W}/file.txt/sw"],
      r"which is a file"),
    S("sweep-dir-other", "output", "sweep", ["{W}/other-spec.yaml", "--sweep_dir", "{W}/sweep"],
      r"holds another sweep"),
    S("sweep-dir-foreign", "output", "sweep", ["{W}/spec.yaml", "--sweep_dir", "{W}/lora"],
      r"is not a sweep folder but holds other files \(adapter_config.yaml, adapters.safetensors\)"),
    S("level-nan", "number", "sweep", ["{T}/s.yaml", "--sweep_dir", "{T}/sw"], r"'lr' is set to nan: a number in a "
      "sweep file must be finite", text("s.yaml", yaml.safe_dump({**sweep_spec(), "factors": {
          "lr": {"key": "lr", "levels": [1e-4, float("nan")]}}}))),
    S("override-inf", "number", "sweep", ["{T}/s.yaml", "--sweep_dir", "{T}/sw"], r"is set to inf",
      text("s.yaml", yaml.safe_dump({**sweep_spec(), "overrides": ["lr=.inf"]}))),
    S("status-not-sweep", "file", "sweep", ["status", "{W}/empty"], r"is not a sweep folder"),
    S("status-missing", "file", "sweep", ["status", "{T}/nowhere"], r"is not a sweep folder"),
    S("status-corrupt", "file", "sweep", ["status", "{T}"], r"sweep.json.*is not a sweep manifest|unreadable",
      text("sweep.json", "{\"runs\": 5}")),
    S("status-truncated", "file", "sweep", ["status", "{T}"], r"sweep.json", text("sweep.json", "{\"runs\": [")),
]

MAKE = [
    S("outdir-under-file", "output", "make_adapter_configs", ["--outdir", "{W}/file.txt/c"], r"which is a file"),
    S("outdir-foreign-file", "output", "make_adapter_configs", ["--outdir", "{T}/c"],
      r"attn1i-attn1i.yaml' exists and was not written by scripts/make_adapter_configs.py",
      text("c/attn1i-attn1i.yaml", "mine: 1\n")),
    S("base-missing", "file", "make_adapter_configs", ["--outdir", "{T}/c", "--base", "{T}/none.yaml"],
      r"config file not found"),
    S("base-yaml", "file", "make_adapter_configs", ["--outdir", "{T}/c", "--base", "{T}/b.yaml"],
      r"is not valid YAML", text("b.yaml", "x: [\n")),
]

DEMO = [
    S("steps-0", "number", "demo", ["--outdir", "{T}/d", "--steps", "0"], r"--steps: must be an integer >= 1"),
    S("steps-neg", "number", "demo", ["--outdir", "{T}/d", "--steps", "-5"], r"--steps: must be an integer >= 1"),
    S("steps-text", "number", "demo", ["--outdir", "{T}/d", "--steps", "many"], r"--steps: must be an integer"),
    S("n-0", "number", "demo", ["--outdir", "{T}/d", "--n", "0"], r"--n: must be an integer >= 1"),
    S("seed-neg", "number", "demo", ["--outdir", "{T}/d", "--seed", "-1"], r"--seed: must be an integer in \[0, "),
    S("outdir-under-file", "output", "demo", ["--outdir", "{W}/file.txt/d"], r"which is a file"),
]

REPORT = [
    S("seeds-text", "number", "tiny_world_report", ["--outdir", "{T}/r", "--seeds", "a"],
      r"--seeds: must be an integer in \[0, "),
    S("seeds-empty", "number", "tiny_world_report", ["--outdir", "{T}/r", "--seeds", ""],
      r"--seeds: must be comma-separated integers"),
    S("seeds-twice", "number", "tiny_world_report", ["--outdir", "{T}/r", "--seeds", "1,1"], r"lists a value twice"),
    S("steps-0", "number", "tiny_world_report", ["--outdir", "{T}/r", "--steps", "0"], r"--steps: must be an integer"),
    S("n-0", "number", "tiny_world_report", ["--outdir", "{T}/r", "--n", "0"], r"--n: must be an integer >= 1"),
    S("quality-neg", "number", "tiny_world_report", ["--outdir", "{T}/r", "--quality_n", "-1"], r"--quality_n: "),
    S("outdir-under-file", "output", "tiny_world_report", ["--outdir", "{W}/file.txt/r"], r"which is a file"),
]

TB = ["--config", "{T}/base.yaml"]
BASE = [
    S("config-missing", "file", "train_tiny_base", ["--config", "{T}/none.yaml"], r"config file not found"),
    S("config-yaml", "file", "train_tiny_base", ["--config", "{T}/c.yaml"], r"not valid YAML", text("c.yaml", "a: [\n")),
    S("override-typo", "flags", "train_tiny_base", TB + ["diffusion.stpes=5"],
      r"unknown key 'diffusion.stpes'.*did you mean 'diffusion.steps'", base_config()),
    S("override-not-kv", "flags", "train_tiny_base", TB + ["diffusion.steps"], r"is not KEY=VALUE", base_config()),
    S("num-images-0", "number", "train_tiny_base", TB + ["data.num_images=0"],
      r"data.num_images must be an integer >= 1, got 0", base_config()),
    S("lr-nan", "number", "train_tiny_base", TB + ["vae.lr=.nan"], r"vae.lr must be a finite number > 0, got nan",
      base_config()),
    S("lr-text", "number", "train_tiny_base", TB + ["vae.lr=fast"], r"vae.lr must be a finite number > 0",
      base_config()),
    S("batch-0", "number", "train_tiny_base", TB + ["diffusion.batch_size=0"], r"diffusion.batch_size must be",
      base_config()),
    S("steps-neg", "number", "train_tiny_base", TB + ["diffusion.steps=-1"], r"diffusion.steps must be an integer >= 0",
      base_config()),
    S("p-uncond-2", "number", "train_tiny_base", TB + ["diffusion.p_uncond=2"], r"diffusion.p_uncond must be .*\[0, 1\]",
      base_config()),
    S("ema-1.5", "number", "train_tiny_base", TB + ["diffusion.ema_decay=1.5"], r"diffusion.ema_decay must be",
      base_config()),
    S("size-30", "number", "train_tiny_base", TB + ["data.size=30"], r"data.size must be a multiple of 8",
      base_config()),
    S("seed-neg", "number", "train_tiny_base", TB + ["seed=-1"], r"seed must be an integer in \[0, ", base_config()),
    S("world-mars", "flags", "train_tiny_base", TB + ["vae.world=mars"], r"vae.world must be one of base, probe",
      base_config()),
    S("out-exists-shipped", "output", "train_tiny_base", ["work_dir={T}/w", "out=models/ldm/tiny-sd-v1/model.safetensors"],
      r"out '.*models/ldm/tiny-sd-v1/model.safetensors' already exists"),
    S("out-is-init", "output", "train_tiny_base", TB + ["init={W}/base.safetensors", "out={W}/base.safetensors"],
      r"out '.*base.safetensors' is the input", base_config()),
    S("out-under-file", "output", "train_tiny_base", TB + ["out={W}/file.txt/m.safetensors"], r"which is a file",
      base_config()),
    S("out-suffix", "output", "train_tiny_base", TB + ["out={T}/m.ckpt"], r"suffix '.ckpt'; it must have .safetensors",
      base_config()),
    S("init-missing", "file", "train_tiny_base", TB + ["init={T}/none.safetensors"], r"init: no base model file",
      base_config()),
    S("device-tpu", "flags", "train_tiny_base", TB + ["--device", "tpu"], r"--device: 'tpu' is not a torch device",
      base_config()),
]

PROBE = [
    S("num-images-0", "number", "train_tiny_probe", ["--num_images", "0", "--out", "{T}/p.safetensors"],
      r"--num_images: must be an integer >= 1"),
    S("steps-neg", "number", "train_tiny_probe", ["--steps", "-1", "--out", "{T}/p.safetensors"], r"--steps: must be an integer >= 1"),
    S("batch-0", "number", "train_tiny_probe", ["--batch_size", "0", "--out", "{T}/p.safetensors"], r"--batch_size: "),
    S("seed-neg", "number", "train_tiny_probe", ["--seed", "-1", "--out", "{T}/p.safetensors"], r"--seed: must be an integer in \[0, "),
    S("out-exists-shipped", "output", "train_tiny_probe", [], r"probe.safetensors' already exists"),
    S("out-under-file", "output", "train_tiny_probe", ["--out", "{W}/file.txt/p.safetensors"], r"which is a file"),
    S("out-suffix", "output", "train_tiny_probe", ["--out", "{T}/p.txt"], r"suffix '.txt'; it must have .safetensors"),
]


# ---- API rows ---------------------------------------------------------------------------------------------------
def meta_model():
    from ldm.config import build_base_model, load_configs
    return build_base_model(load_configs([CFG]))


def real_model(w: Path):
    from ldm.config import build_base_model, load_configs
    return build_base_model(load_configs([CFG]), str(w / "base.safetensors"))


def api_combine(w, t):
    from ldm.modules.adapters import combine_loras
    combine_loras(meta_model(), str(w / "lora"), str(w / "lora2"), str(w / "lora"))


def api_merge(w, t):
    from ldm.modules.adapters import merge_into_checkpoint
    merge_into_checkpoint(real_model(w), str(w / "lora"), str(w / "lora" / "m.ckpt"))


def api_merge_txt(w, t):
    from ldm.modules.adapters import merge_into_checkpoint
    merge_into_checkpoint(real_model(w), str(w / "lora"), str(t / "m.txt"))


def api_upsert(w, t):
    from ldm.evaluation.table import upsert_row
    upsert_row(w / "run" / "config.yaml", {"run": "a", "x": 1})


def api_settings(**kw):
    def call(w, t):
        from ldm.evaluation.evaluate import EvalSettings
        EvalSettings(**kw)
    return call


def api_run_all(w, t):
    from ldm.sweep.launch import run_all
    from ldm.sweep.runs import load_runs
    run_all(load_runs(str(w / "sweep")), parallel=0)


def api_run_index(w, t):
    from ldm.sweep.launch import run_index
    from ldm.sweep.runs import load_runs
    run_index(load_runs(str(w / "sweep")), -1)


def api_load_runs(w, t):
    from ldm.sweep.runs import load_runs
    load_runs(str(t))


def api_load_spec(w, t):
    from ldm.sweep.spec import load_spec
    load_spec(str(t / "s.yaml"))


def api_load_configs(w, t):
    from ldm.config import load_configs
    load_configs([str(t / "c.yaml")])


def api_analyse(table):
    def call(w, t):
        import io
        import pandas as pd
        from ldm.evaluation.study import analyse
        analyse(pd.read_csv(io.StringIO(table)), ["dino_i"], ["din"])
    return call


def api_read_table(w, t):
    from ldm.evaluation.study import read_table
    read_table(t / "r.csv")


def api_write_diffusers(w, t):
    from ldm.modules.diffusers_folder import write_diffusers_folder
    write_diffusers_folder({}, OmegaConf.load(CFG).model, str(w / "lora"))


def api_read_base(w, t):
    from ldm.modules.diffusers_folder import read_base_weights
    read_base_weights(str(w / "empty"))


def api_train_base(w, t):
    from ldm.tinyworld.base import train_base
    train_base(OmegaConf.load(t / "base.yaml"), torch.device("cpu"))


def api_check(fn, *args, **kw):
    def call(w, t):
        import ldm.checks
        getattr(ldm.checks, fn)(*[a.format(W=w, T=t) if isinstance(a, str) else a for a in args], **kw)
    return call


def api_parse_override(item):
    def call(w, t):
        from ldm.config import parse_override
        parse_override(item)
    return call


def api_load_adapter(w, t):
    from ldm.modules.adapters import load_adapter_from_dir
    load_adapter_from_dir(meta_model(), str(t / "bad"))


def api_check_table(w, t):
    from ldm.evaluation.table import check_table
    check_table(w / "file.txt")


def api_probe(**kw):
    def call(w, t):
        from ldm.tinyworld.probe import train_probe
        train_probe(**kw)
    return call


def _errors():
    """The exception types API rows expect, imported lazily (the table is built at collection time)."""
    from ldm.checkpoint import CheckpointError
    from ldm.checks import OutputPathError
    from ldm.evaluation.anova import AnalysisError
    from ldm.evaluation.backends import EvaluationError
    from ldm.modules.adapters import AdapterConfigError
    from ldm.sweep.spec import SweepError
    from ldm.checks import ConfigError
    return dict(checkpoint=CheckpointError, output=OutputPathError, analysis=AnalysisError,
                evaluation=EvaluationError, adapter=AdapterConfigError, sweep=SweepError, config=ConfigError)


E = _errors()
API = [
    A("combine-into-input", "output", api_combine, E["output"], r"is the input"),
    A("merge-into-input", "output", api_merge, E["output"], r"inside the input"),
    A("merge-suffix", "output", api_merge_txt, E["output"], r"suffix '.txt'"),
    A("upsert-not-a-table", "output", api_upsert, E["evaluation"], r"is not a results table"),
    A("check-table-file", "output", api_check_table, E["evaluation"], r"is not a results table"),
    A("settings-steps-0", "number", api_settings(steps=0), ValueError, r"steps must be an integer >= 1"),
    A("settings-seeds-empty", "number", api_settings(seeds=[]), ValueError, r"seeds: give at least one"),
    A("settings-scale-nan", "number", api_settings(scale=math.nan), ValueError, r"scale must be a finite number"),
    A("settings-batch-0", "number", api_settings(batch_size=0), ValueError, r"batch_size must be an integer >= 1"),
    A("run-all-parallel-0", "number", api_run_all, E["sweep"], r"--parallel must be at least 1"),
    A("run-index-neg", "number", api_run_index, E["sweep"], r"--run_index -1 is out of range"),
    A("load-runs-corrupt", "file", api_load_runs, E["sweep"], r"sweep.json", text("sweep.json", "[1, 2]")),
    A("load-spec-binary", "file", api_load_spec, E["sweep"], r"is not", text("s.yaml", PNG)),
    A("load-configs-binary", "file", api_load_configs, E["config"], r"not valid YAML", text("c.yaml", PNG)),
    A("analyse-all-nan", "file", api_analyse("run,din,dino_i\na,x,\nb,y,\n"), E["analysis"], r"no finite value"),
    A("analyse-text", "file", api_analyse("run,din,dino_i\na,x,0.1\nb,y,zero\nc,y,0.2\n"), E["analysis"],
      r"holds text \('zero' in run b\)"),
    A("read-table-empty", "file", api_read_table, E["analysis"], r"is empty", text("r.csv", "")),
    A("diffusers-out-not-empty", "output", api_write_diffusers, E["output"], OUT_ERR),
    A("read-base-empty-dir", "file", api_read_base, E["checkpoint"], r"is a folder but not a diffusers model folder"),
    A("train-base-images-0", "number", api_train_base, E["config"], r"data.num_images",
      base_config(**{"data.num_images": 0})),
    A("train-base-unknown-key", "flags", api_train_base, E["config"], r"unknown key 'vae.stepz'.*did you mean 'vae.steps'",
      base_config(**{"vae.stepz": 3})),
    A("train-base-out-exists", "output", api_train_base, E["output"], r"already exists",
      base_config(out=str(REPO / "models/ldm/tiny-sd-v1/model.safetensors"))),
    A("probe-images-0", "number", api_probe(num_images=0), ValueError, r"num_images must be an integer >= 1"),
    A("check-number-nan", "number", api_check("check_number", math.nan, "x", 0, 1), ValueError,
      r"x must be a finite number in \[0, 1\], got nan"),
    A("check-number-bool", "number", api_check("check_number", True, "n", integer=True), ValueError,
      r"n must be an integer"),
    A("check-output-exists", "output", api_check("check_output", "{W}/file.txt"), E["output"], OUT_ERR),
    A("check-output-empty-dir-file", "output", api_check("check_output", "{W}/empty"), E["output"], OUT_ERR),
    A("fresh-dir-under-file", "output", api_check("fresh_dir", "{W}/file.txt/x"), E["output"], r"which is a file"),
    A("override-no-key", "flags", api_parse_override("=5"), E["config"], r"is not KEY=VALUE"),
    A("override-bad-yaml", "flags", api_parse_override("a.b=[1"), E["config"], r"not valid YAML"),
    A("adapter-dir-bad-yaml", "file", api_load_adapter, E["adapter"], r"not a valid adapter config",
      copy_dir("lora", "bad", adapter_config__yaml="adapter_config: [\n")),
]

ROWS = [(f"{r.target}:{r.id}", r) for group in (MERGE, CONVERT, EXPORTS, EVALUATE, ANOVA, SWEEP, MAKE, DEMO, REPORT,
                                                 BASE, PROBE, API) for r in group]


def test_the_table_is_big_enough_and_ids_are_unique():
    ids = [i for i, _ in ROWS]
    assert len(ids) >= 100 and len(set(ids)) == len(ids)


def fill(arg: str, w: Path, t: Path) -> str:
    return arg.replace("{W}", str(w)).replace("{T}", str(t))


def message_of(exc: SystemExit, err: str) -> str:
    """The user's message of a SystemExit: its text, or argparse's `prog: error: ...` line."""
    if isinstance(exc.code, str):
        return exc.code
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the scripts' defaults are relative to the repository


# make test-fast: the rows that show each script (and the API) and each category once
@pytest.mark.parametrize("row", covering([r for _, r in ROWS], lambda r: r.target, lambda r: r.category),
                         ids=[i for i, _ in ROWS])
def test_bad_input(row: Row, world, tmp_path, capsys, in_repo):
    t = tmp_path / "t"
    t.mkdir()
    if row.setup:
        row.setup(world, t)
    before = snapshot(world, t)
    if row.target == "api":
        with pytest.raises(row.error) as e:
            row.call(world, t)
        message = str(e.value)
    else:
        module = importlib.import_module(f"scripts.{row.target}")
        with pytest.raises(SystemExit) as e:
            module.main([fill(a, world, t) for a in row.args])
        err = capsys.readouterr().err
        assert e.value.code not in (0, None)
        assert "Traceback" not in err
        message = message_of(e.value, err)
        assert "\n" not in message.strip()
    assert re.search(row.message, message), message
    assert snapshot(world, t) == before


READONLY = [
    ("merge", UPL + ["--output_path", "{R}/m.ckpt"]),
    ("convert_lora", DIR_IN + ["--output", "{R}/o", "--to", "dir"]),
    ("export_diffusers", EXPORT + ["--outdir", "{R}/o"]),
    ("evaluate", EVAL + ["--table", "{R}/r.csv"]),
    ("anova", ["{W}/results.csv", "--factors", "din", "--out", "{R}/a"]),
    ("sweep", ["{W}/spec.yaml", "--sweep_dir", "{R}/sw"]),
    ("make_adapter_configs", ["--outdir", "{R}/c"]),
    ("demo", ["--outdir", "{R}/d"]),
    ("tiny_world_report", ["--outdir", "{R}/r"]),
    ("train_tiny_probe", ["--out", "{R}/p.safetensors"]),
]


@pytest.mark.parametrize("script,args", READONLY, ids=[s for s, _ in READONLY])
def test_an_output_in_a_read_only_place_is_refused_before_any_work(script, args, world, readonly, capsys, in_repo):
    before = snapshot(world)
    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"scripts.{script}").main([a.replace("{R}", str(readonly)).replace("{W}", str(world))
                                                           for a in args])
    assert re.search(r"cannot be written: .* is not writable", str(e.value.code)), e.value.code
    assert "Traceback" not in capsys.readouterr().err
    assert snapshot(world) == before


# ---- the real stderr of a few, as subprocesses --------------------------------------------------------------------
SUBPROCESS = [("merge", "out-is-base"), ("convert_lora", "in-garbage"), ("evaluate", "batch-0"),
              ("anova", "empty-file"), ("sweep", "run-index-beyond")]


@pytest.mark.slow
def test_real_stderr_has_one_clear_line_and_no_traceback(world, tmp_path):
    """Started together (imports dominate); each exits non-zero with its message as the last stderr line."""
    rows = dict(ROWS)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = []
    for script, id in SUBPROCESS:
        row = rows[f"{script}:{id}"]
        t = tmp_path / f"{script}-{id}"
        t.mkdir()
        if row.setup:
            row.setup(world, t)
        argv = [sys.executable, str(REPO / "scripts" / f"{script}.py")] + [fill(a, world, t) for a in row.args]
        procs.append((row, subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            text=True)))
    for row, proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode != 0, (row.id, out, err)
        assert "Traceback" not in err, err
        last = err.strip().splitlines()[-1]
        assert re.search(row.message, last), (row.id, err)


# ---- nothing lost: fresh names, and two processes on one job ---------------------------------------------------------
def test_fresh_dir_writes_next_to_what_exists_and_never_shares_a_folder(tmp_path):
    from ldm.checks import fresh_dir
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    (tmp_path / "out-2").write_text("a file in the way")
    assert fresh_dir(tmp_path / "new") == tmp_path / "new"
    assert fresh_dir(tmp_path / "out") == tmp_path / "out-3"
    got = []
    threads = [threading.Thread(target=lambda: got.append(fresh_dir(tmp_path / "out"))) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(set(got)) == 8 and tmp_path / "out" not in got
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_anova_twice_writes_a_second_report_beside_the_first(world, tmp_path):
    from scripts import anova
    (tmp_path / "results.csv").write_text(results_table())
    first = anova.main([str(tmp_path / "results.csv"), "--factors", "din"])
    before = snapshot(first.parent)
    second = anova.main([str(tmp_path / "results.csv"), "--factors", "din"])
    assert first.parent == tmp_path / "analysis" and second.parent == tmp_path / "analysis-2"
    assert snapshot(first.parent) == before and second.read_text() == first.read_text()


@pytest.mark.slow
def test_make_adapter_configs_replaces_only_its_own_files(tmp_path):
    from scripts import make_adapter_configs
    paths = make_adapter_configs.main(["--outdir", str(tmp_path)])
    assert len(paths) == 20 and all(p.read_text() == (REPO / "configs" / "sd-inject-dreambooth" / p.name).read_text()
                                    for p in paths)
    assert make_adapter_configs.main(["--outdir", str(tmp_path)]) == paths  # its own files: regenerated


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_two_evaluations_of_one_sweep_evaluate_and_write_each_run_once(world, tmp_path):
    """Run 0 is held by the test (as another evaluation would hold it), so both processes put it off and then wait
    for it; runs 1 and 2 go to whichever claims them first. Each run is evaluated by exactly one process."""
    from ldm.checks import file_lock
    from ldm.evaluation.evaluate import EVAL_LOCK
    runs = [write_run(tmp_path / f"run{i}", world / "base.safetensors", world / "subject", seed=i) for i in range(3)]
    (tmp_path / "p.txt").write_text("photo of a {token} {class_word}\n")
    argv = [sys.executable, str(REPO / "scripts" / "evaluate.py"), *map(str, runs), "--metric", "tinyworld",
            "--table", str(tmp_path / "results.csv"), "--seeds", "0", "--steps", "2", "--prior_prompt", "none",
            "--prompts", str(tmp_path / "p.txt"), "--device", "cpu"]
    logs = [tmp_path / f"eval{i}.log" for i in range(2)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with file_lock(runs[0] / EVAL_LOCK) as held:
        assert held
        procs = [subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
                 for log in logs]
        wait_for(lambda: all("run0: being evaluated by another process" in log.read_text() for log in logs),
                 "both evaluations to put run 0 off")
    assert [p.wait(timeout=600) for p in procs] == [0, 0], [log.read_text()[-2000:] for log in logs]
    text = "".join(log.read_text() for log in logs)
    assert [text.count(f"run{i}: tinyworld_i") for i in range(3)] == [1, 1, 1], text[-3000:]
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert sorted(r.split(",")[0] for r in rows[1:]) == ["run0", "run1", "run2"]


FAKE_PYTHON = """#!/bin/sh
# stands in for `python -m ldm.train -r RUN -t ...`: notes the run, takes a while, finishes it
while [ "$1" != "-r" ]; do shift; done
echo "$2" >> "{log}"
sleep 2
echo '{{}}' > "$2/done.json"
"""


@pytest.mark.slow
def test_two_launchers_on_one_sweep_start_each_run_once(tmp_path):
    """Two sweep.py processes on one folder, with a stand-in for the training process; run 0 is held by the test (a
    third launcher), so both leave it alone. Each other run is started exactly once."""
    from ldm.checks import file_lock
    from ldm.sweep.runs import load_runs, prepare
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**sweep_spec(), "factors": {"seed": {"key": "seed", "levels": [0, 1, 2, 3]}}}))
    runs = prepare(str(spec), str(tmp_path / "sw"))
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PYTHON.format(log=tmp_path / "started.log"))
    fake.chmod(0o755)
    argv = [sys.executable, str(REPO / "scripts" / "sweep.py"), str(spec), "--sweep_dir", str(tmp_path / "sw"),
            "--python", str(fake)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with file_lock(runs[0].dir / ".launch.lock") as held:
        assert held
        procs = [subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for _ in range(2)]
        outputs = [p.communicate(timeout=600)[0] for p in procs]
    started = (tmp_path / "started.log").read_text().split()
    assert sorted(started) == sorted(str(r.dir) for r in runs[1:]), outputs
    assert [r.state for r in load_runs(str(tmp_path / "sw"))] == ["pending", "done", "done", "done"]
    assert all("left alone" in out for out in outputs)
