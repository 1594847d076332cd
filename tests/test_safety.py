"""Nothing silently wrong, round 3 (issue 26): a table of bad inputs of the kinds a new user still met on c33ed4f --
weights holding NaN or inf, checkpoints with pickled code, run configs that write outside their run dir, sweep files
with repeated keys or colliding factors, study tables with repeated runs, empty factor cells or infinities, text files
in other encodings, over-long prompts, decompression-bomb images -- and, as real subprocesses, Ctrl-C / SIGTERM during
training and full disks.

A row is (what is called, its arguments, the files it sets up, what it must say). An "error" row must exit non-zero
(an API row: raise the expected type) with one line matching the message, no traceback, and nothing that existed
changed (every file under the world and the row's folder hashed before and after, lock files aside); a "warning" row's
input is usable: it must succeed and warn with a line matching the message. A failing row's assertion starts with what
happened instead (traceback / silent / unclear), which is how the counts in the report were taken.
"""
import errno
import importlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, SETTLED_NS, TINY_CONFIG, build_tiny, covering, snapshot
from ldm.checkpoint import save_state_dict
from ldm.modules.adapters import lora_state_dict, save_adapter_to_dir
from test_bad_inputs import LORA, with_group, write_images
from test_train import BASES

CFG = str(TINY_CONFIG)
TRAIN_BASES = [str(REPO / b) for b in BASES]
POISON = "model.diffusion_model.out.2.bias"  # a base weight every row may poison


# ---- the world: good and bad files every row may read ------------------------------------------------------------
def poisoned(sd: Dict[str, torch.Tensor], key: Optional[str] = None, value: float = float("nan"),
             dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """A copy of `sd` with one value of tensor `key` (default: the first floating one) set to `value`."""
    sd = {k: v.clone() for k, v in sd.items()}
    key = key or next(k for k, v in sd.items() if v.is_floating_point())
    sd[key] = sd[key].to(dtype or sd[key].dtype)
    sd[key].view(-1)[0] = value
    return sd


def write_raw(sd: Dict[str, torch.Tensor], path: Path, metadata=None) -> Path:
    """Tensors written as they are (ldm.checkpoint refuses to write NaN, as a bad tool or a damaged copy would not)."""
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    else:
        torch.save({"state_dict": sd}, path)
    return path


def poison_dir(src: Path, dst: Path, value: float, dtype: Optional[torch.dtype] = None) -> Path:
    """A copy of adapter directory `src` whose adapters.safetensors holds `value` once."""
    from safetensors.torch import load_file
    dst.mkdir(parents=True)
    (dst / "adapter_config.yaml").write_text((src / "adapter_config.yaml").read_text())
    write_raw(poisoned(load_file(str(src / "adapters.safetensors")), value=value, dtype=dtype),
              dst / "adapters.safetensors")
    return dst


class SystemCall:
    """Pickles as a call of os.system (a harmless command): pickled code."""

    def __reduce__(self):
        return (os.system, ("true",))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A 100-byte PNG whose header says side x side pixels (PIL refuses > 2 x MAX_IMAGE_PIXELS as a bomb)."""
    header = side.to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + png_chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("world")
    base = build_tiny().state_dict()
    save_state_dict(base, str(w / "base.safetensors"))
    write_raw(poisoned(base, POISON), w / "base-nan.safetensors")
    write_raw(poisoned(base, POISON, float("inf")), w / "base-inf.ckpt")
    write_raw(poisoned(base, POISON, 1e5), w / "base-big.safetensors")  # finite, but not in float16
    torch.save({"state_dict": base, "callbacks": {"x": SystemCall()}}, w / "base-code.ckpt")
    lora = with_group(build_tiny(), LORA, 0)
    save_adapter_to_dir(lora.model.diffusion_model, w / "lora")
    poison_dir(w / "lora", w / "lora-nan", float("nan"))
    poison_dir(w / "lora", w / "lora-inf", float("inf"))
    poison_dir(w / "lora", w / "lora-bf16-nan", float("nan"), torch.bfloat16)
    kohya = lora_state_dict(lora, fmt="kohya")
    save_state_dict(kohya, str(w / "kohya.safetensors"), metadata={"format": "pt"})
    write_raw(poisoned(kohya), w / "kohya-nan.safetensors", metadata={"format": "pt"})
    torch.save({**kohya, "x": SystemCall()}, w / "kohya-code.pt")
    write_images(w / "subject")
    (w / "empty").mkdir()
    train_once(w)
    return w


def train_once(w: Path) -> None:
    """w/trained: a tiny run trained 2 steps (config.yaml, last.ckpt with its optimizer state, 1-adapters)."""
    import main_dream_booth
    logdir = main_dream_booth.main([fill(a, w, w) for a in TRAIN] + [
        "-t", "--max_steps", "2", "lightning.callbacks.image_logger.params.disabled=true"])
    logdir.rename(w / "trained")
    (w / "logs").rmdir()
    config = OmegaConf.load(w / "trained" / "config.yaml")  # -r: the run dir's own config names its folder nowhere
    assert config.model.params.ckpt_path == str(w / "base.safetensors")


# ---- files a row sets up in its own folder T --------------------------------------------------------------------
def text(name: str, content) -> Callable[[Path, Path], None]:
    def setup(w: Path, t: Path) -> None:
        path = t / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def run_config(world: Path) -> OmegaConf:
    config = OmegaConf.merge(*[OmegaConf.load(b) for b in TRAIN_BASES])
    config.model.params.ckpt_path = str(world / "base.safetensors")
    config.data.params.train.params.data_root = str(world / "subject")
    del config.data.params["reg"]
    return config


def a_run(callbacks: Optional[dict] = None, ckpt: Optional[Callable[[Path], dict]] = None, **keys
          ) -> Callable[[Path, Path], None]:
    """T/run: a run dir as main_dream_booth.py writes it (config.yaml, with these lightning.callbacks and dotted keys
    changed), with checkpoints/last.ckpt = ckpt(world) when given."""
    def setup(w: Path, t: Path) -> None:
        config = run_config(w)
        for name, node in (callbacks or {}).items():
            config.lightning.callbacks[name] = json.loads(json.dumps(node).replace("{T}", str(t)))
        for key, value in keys.items():
            OmegaConf.update(config, key.replace("__", "."), value.replace("{T}", str(t)) if isinstance(value, str)
                             else value, force_add=True)
        (t / "run" / "checkpoints").mkdir(parents=True)
        (t / "run" / "config.yaml").write_text(OmegaConf.to_yaml(config))
        if ckpt is not None:
            torch.save(ckpt(w), t / "run" / "checkpoints" / "last.ckpt")
    return setup


def unet_trained(w: Path) -> dict:
    """A checkpoint of a run that trained the whole UNet (train_level [unet]), one UNet value NaN."""
    from safetensors.torch import load_file
    unet = {k: v for k, v in load_file(str(w / "base.safetensors")).items() if k.startswith("model.diffusion_model.")}
    return {"state_dict": poisoned(unet, POISON), "global_step": 2}


def trained_run(value: float, where: str = "state_dict", code: bool = False) -> Callable[[Path, Path], None]:
    """T/run: a copy of the world's trained run whose last.ckpt holds `value` once in its weights (`where`
    "state_dict") or its optimizer state ("optimizer"), or pickled code."""
    def setup(w: Path, t: Path) -> None:
        import shutil
        shutil.copytree(w / "trained", t / "run")
        ckpt = torch.load(t / "run" / "checkpoints" / "last.ckpt", weights_only=False)
        if where == "state_dict":
            ckpt["state_dict"] = poisoned(ckpt["state_dict"], value=value)
        else:
            moments = next(s for s in ckpt["optimizer_states"][0]["state"].values())
            moments["exp_avg_sq"].view(-1)[0] = value
        if code:
            ckpt["x"] = SystemCall()
        torch.save(ckpt, t / "run" / "checkpoints" / "last.ckpt")
    return setup


def sweep_file(text_: str) -> Callable[[Path, Path], None]:
    bases = "[" + ", ".join(TRAIN_BASES) + "]"
    return text("s.yaml", text_.replace("{BASES}", bases))


def table(*rows: str) -> Callable[[Path, Path], None]:
    return text("r.csv", "run,din,seed,dino_i\n" + "\n".join(rows) + "\n")


GOOD_ROWS = ["r0,attn1i,0,0.50", "r1,attn2o,0,0.60", "r2,ffni,0,0.55", "r3,attn1i,1,0.52", "r4,attn2o,1,0.63",
             "r5,ffni,1,0.50"]


def with_row(i: int, row: str) -> Tuple[str, ...]:
    rows = list(GOOD_ROWS)
    rows[i] = row
    return tuple(rows)


def exported(w: Path, t: Path) -> None:
    """T/diffusers: the tiny base as a diffusers folder, one UNet value NaN."""
    from safetensors.torch import load_file
    from ldm.modules.diffusers_folder import write_diffusers_folder
    write_diffusers_folder(build_tiny().state_dict(), OmegaConf.load(CFG).model, str(t / "diffusers"))
    unet = t / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors"
    write_raw(poisoned(load_file(str(unet))), unet, metadata={"format": "pt"})


def evaluated_run(w: Path, t: Path) -> None:
    """T/run: a finished tiny run (config.yaml, checkpoints/0-adapters) whose adapters hold a NaN."""
    from test_bad_inputs import write_run
    write_run(t / "good", w / "base.safetensors", w / "subject")
    (t / "run" / "checkpoints").mkdir(parents=True)
    (t / "run" / "config.yaml").write_text((t / "good" / "config.yaml").read_text())
    poison_dir(t / "good" / "checkpoints" / "0-adapters", t / "run" / "checkpoints" / "0-adapters", float("nan"))
    import shutil
    shutil.rmtree(t / "good")


def images_with(*names: str, bomb: bool = True, caption: Optional[bytes] = None) -> Callable[[Path, Path], None]:
    """T/images: subject images (`names`), a decompression bomb when `bomb`, a caption file of the first when given."""
    def setup(w: Path, t: Path) -> None:
        folder = t / "images"
        folder.mkdir(parents=True)
        for name in names:
            (folder / name).write_bytes((w / "subject" / "subject-0.png").read_bytes())
        if bomb:
            bomb_png(folder / "bomb.png")
        if caption is not None:
            (folder / Path(names[0]).with_suffix(".txt")).write_bytes(caption)
    return setup


# ---- the table --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """A script (its module) with argv, or an API call(w, t); the message of its error (or its warning)."""
    id: str
    kind: str  # weights | pickle | confinement | sweep | table | text | prompt | image
    target: str
    args: Tuple[str, ...] = ()
    message: str = ""
    setup: Optional[Callable[[Path, Path], None]] = None
    call: Optional[Callable[[Path, Path], object]] = None
    expect: str = "error"  # or "warning": the input is usable


def E(id, kind, target, args, message, setup=None):
    return Row(id, kind, target, tuple(args), message, setup)


def W(id, kind, target, args, message, setup=None):
    return Row(id, kind, target, tuple(args), message, setup, expect="warning")


def A(id, kind, call, message, setup=None, expect="error"):
    return Row(id, kind, "api", (), message, setup, call, expect)


NAN = r"holds non-finite weights: tensor '.*' has 1 NaN and 0 inf of its \d+ values.*use an earlier checkpoint"
INF = r"holds non-finite weights: tensor '.*' has 0 NaN and 1 inf"
NOT_WRITTEN = r"refusing to write .*tensor '.*' holds .*nothing was written"
CODE = r"holds pickled code: loading it with plain pickle would call (posix|nt)\.system\. Nothing in it was run"
OUTSIDE = r"is '.*', outside the run dir '.*': a config .* may only make a run write inside its own folder"
UPL = ["--config", CFG, "--mode", "upl", "--path_1", "{W}/base.safetensors", "--path_2", "{W}/lora",
       "--output_path", "{T}/m.safetensors"]
EXACT = ["--config", CFG, "--mode", "exact", "--path_1", "{W}/lora", "--path_2", "{W}/lora", "--output_path", "{T}/m"]
SAMPLE = ["--config", CFG, "--ckpt", "{W}/base.safetensors", "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1",
          "--outdir", "{T}/out", "--no-watermark"]
TRAIN = ["--base", *TRAIN_BASES, "--actual_resume", "{W}/base.safetensors", "-n", "x", "--data_root", "{W}/subject",
         "--logdir", "{T}/logs", "--class_word", "cat"]
RESUME = ["-r", "{T}/run", "-t"]
EVAL = ["{T}/run", "--metric", "tinyworld", "--table", "{T}/r.csv", "--seeds", "0", "--steps", "2", "--device", "cpu"]
SPEC = ["{T}/s.yaml", "--sweep_dir", "{T}/sw", "--prepare_only"]
ANOVA = ["{T}/r.csv", "--factors", "din", "--out", "{T}/out"]
SWEEP_HEAD = "base: {BASES}\nfactors:\n"


def replace(args, flag, value):
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


WEIGHTS = [
    E("merge-base-nan", "weights", "merge", replace(UPL, "--path_1", "{W}/base-nan.safetensors"), NAN),
    E("merge-base-inf-ckpt", "weights", "merge", replace(UPL, "--path_1", "{W}/base-inf.ckpt"), INF),
    E("merge-lora-nan", "weights", "merge", replace(UPL, "--path_2", "{W}/lora-nan"), NAN),
    E("merge-lora-inf", "weights", "merge", replace(UPL, "--path_2", "{W}/lora-inf"), INF),
    E("merge-lora-bf16-nan", "weights", "merge", replace(UPL, "--path_2", "{W}/lora-bf16-nan"), NAN),
    E("merge-exact-kohya-nan", "weights", "merge", replace(EXACT, "--path_2", "{W}/kohya-nan.safetensors"), NAN),
    E("merge-lpl-lora-nan", "weights", "merge", replace(replace(EXACT, "--path_1", "{W}/lora-nan"), "--mode", "lpl"),
      NAN),
    E("merge-alpha-overflow", "weights", "merge", UPL + ["--alpha", "1e300"], NOT_WRITTEN),
    E("convert-kohya-nan", "weights", "convert_lora", ["--config", CFG, "--input", "{W}/kohya-nan.safetensors",
                                                       "--output", "{T}/o", "--to", "dir"], NAN),
    E("convert-dir-inf", "weights", "convert_lora", ["--config", CFG, "--input", "{W}/lora-inf", "--output",
                                                     "{T}/o.safetensors", "--to", "kohya"], INF),
    E("convert-dir-nan-diffusers", "weights", "convert_lora", ["--config", CFG, "--input", "{W}/lora-nan", "--output",
                                                               "{T}/o", "--to", "diffusers"], NAN),
    E("export-ckpt-nan", "weights", "export_diffusers", ["--config", CFG, "--ckpt", "{W}/base-nan.safetensors",
                                                         "--outdir", "{T}/o"], NAN),
    E("export-ckpt-inf", "weights", "export_diffusers", ["--config", CFG, "--ckpt", "{W}/base-inf.ckpt", "--outdir",
                                                         "{T}/o"], INF),
    E("export-half-overflow", "weights", "export_diffusers", ["--config", CFG, "--ckpt", "{W}/base-big.safetensors",
                                                              "--half", "--outdir", "{T}/o"], NOT_WRITTEN),
    E("export-adapter-nan", "weights", "export_diffusers",
      ["--config", CFG, "--ckpt", "{W}/base.safetensors", "--adapter_path", "{W}/lora-nan", "--outdir", "{T}/o"], NAN),
    E("sample-adapter-nan", "weights", "sample", SAMPLE + ["--adapter_path", "{W}/lora-nan"], NAN),
    E("sample-adapter-inf", "weights", "sample", SAMPLE + ["--adapter_path", "{W}/lora-inf"], INF),
    E("sample-kohya-nan", "weights", "sample", SAMPLE + ["--adapter_path", "{W}/kohya-nan.safetensors"], NAN),
    E("sample-ckpt-nan", "weights", "sample", replace(SAMPLE, "--ckpt", "{W}/base-nan.safetensors"), NAN),
    E("sample-trained-ckpt-nan", "weights", "sample", SAMPLE + ["--trained_ckpt", "{T}/run/checkpoints/last.ckpt"],
      NAN, a_run(ckpt=unet_trained)),
    E("train-base-nan", "weights", "main_dream_booth", replace(TRAIN, "--actual_resume", "{W}/base-nan.safetensors"),
      NAN),
    E("train-resume-ckpt-nan", "weights", "main_dream_booth", RESUME, NAN, trained_run(float("nan"))),
    E("train-resume-optimizer-inf", "weights", "main_dream_booth", RESUME,
      r"holds non-finite weights: tensor 'optimizer_states\.0\.state\.\d+\.exp_avg_sq' has 0 NaN and 1 inf",
      trained_run(float("inf"), "optimizer")),
    E("evaluate-adapters-nan", "weights", "evaluate", EVAL, r"1 run\(s\) could not be evaluated: run \(.*" + NAN,
      evaluated_run),
    A("read-diffusers-folder-nan", "weights", lambda w, t: __import__("ldm.modules.diffusers_folder", fromlist=["x"])
      .read_base_weights(str(t / "diffusers")), NAN, exported),
    A("save-inf", "weights", lambda w, t: save_state_dict({"w": torch.tensor([float("inf")])}, str(t / "w.ckpt")),
      NOT_WRITTEN),
]

PICKLE = [
    E("merge-base-code", "pickle", "merge", replace(UPL, "--path_1", "{W}/base-code.ckpt"), CODE),
    E("sample-ckpt-code", "pickle", "sample", replace(SAMPLE, "--ckpt", "{W}/base-code.ckpt"), CODE),
    E("convert-lora-pt-code", "pickle", "convert_lora", ["--config", CFG, "--input", "{W}/kohya-code.pt", "--output",
                                                         "{T}/o", "--to", "dir"], CODE),
    E("export-plain-pickle-code", "pickle", "export_diffusers", ["--config", CFG, "--ckpt", "{T}/p.ckpt", "--outdir",
                                                                 "{T}/o"], CODE,
      lambda w, t: (t / "p.ckpt").write_bytes(__import__("pickle").dumps({"x": SystemCall()}))),
    E("train-resume-ckpt-code", "pickle", "main_dream_booth", RESUME, CODE,
      trained_run(0.0, code=True)),
    E("train-base-code", "pickle", "main_dream_booth", replace(TRAIN, "--actual_resume", "{W}/base-code.ckpt"), CODE),
]


def linked_out(w: Path, t: Path) -> None:
    """T/run whose ModelCheckpoint writes to run/link/x, where run/link is a symbolic link to T/elsewhere."""
    a_run({"ckpt": {**CHECKPOINT, "params": {**CHECKPOINT["params"], "dirpath": str(t / "run" / "link" / "x")}}})(w, t)
    (t / "elsewhere").mkdir()
    (t / "run" / "link").symlink_to(t / "elsewhere")


CHECKPOINT = {"target": "pytorch_lightning.callbacks.ModelCheckpoint",
              "params": {"dirpath": "{T}/elsewhere", "every_n_train_steps": 1, "save_top_k": -1}}
CONFINEMENT = [
    E("resume-checkpoint-dirpath", "confinement", "main_dream_booth", RESUME,
      r"lightning\.callbacks\.ckpt\.params\.dirpath " + OUTSIDE, a_run({"ckpt": CHECKPOINT})),
    E("resume-checkpoint-dirpath-relative", "confinement", "main_dream_booth", RESUME, OUTSIDE,
      a_run({"ckpt": {**CHECKPOINT, "params": {**CHECKPOINT["params"], "dirpath": "../elsewhere"}}})),
    E("resume-checkpoint-filename-escape", "confinement", "main_dream_booth", RESUME, r"params\.filename " + OUTSIDE,
      a_run({"ckpt": {**CHECKPOINT, "params": {"every_n_train_steps": 1, "filename": "../../../elsewhere/x"}}})),
    E("resume-adapter-checkpoint-dirpath", "confinement", "main_dream_booth", RESUME, OUTSIDE,
      a_run({"more": {"target": "ldm.callbacks.AdapterCheckpoint",
                      "params": {"every_n_train_steps": 1, "dirpath": "{T}/elsewhere"}}})),
    E("resume-on-exception-dirpath", "confinement", "main_dream_booth", RESUME, OUTSIDE,
      a_run({"oops": {"target": "pytorch_lightning.callbacks.OnExceptionCheckpoint",
                      "params": {"dirpath": "{T}/elsewhere"}}})),
    E("resume-modelcheckpoint-params-dirpath", "confinement", "main_dream_booth", RESUME,
      r"lightning\.modelcheckpoint\.params\.dirpath " + OUTSIDE,
      a_run(lightning__modelcheckpoint__params__dirpath="{T}/elsewhere")),
    E("resume-default-root-dir", "confinement", "main_dream_booth", RESUME,
      r"lightning\.trainer\.default_root_dir " + OUTSIDE, a_run(lightning__trainer__default_root_dir="{T}/elsewhere")),
    E("resume-symlink-escape", "confinement", "main_dream_booth", RESUME, OUTSIDE, linked_out),
    E("base-config-callback-outside", "confinement", "main_dream_booth",
      ["--base", *TRAIN_BASES, "{T}/extra.yaml", *TRAIN[1 + len(TRAIN_BASES):]], OUTSIDE,
      text("extra.yaml", "lightning:\n  callbacks:\n    ckpt:\n      target: pytorch_lightning.callbacks."
                         "ModelCheckpoint\n      params: {dirpath: ../elsewhere, every_n_train_steps: 1}\n")),
    E("resume-trainer-logger", "confinement", "main_dream_booth", RESUME,
      r"lightning\.trainer or a Lightning flag was rejected: .*logger",
      a_run(lightning__trainer__logger=False)),
]

SWEEPS = [
    E("spec-top-key-twice", "sweep", "sweep", SPEC, r"found duplicate key 'factors'",
      sweep_file(SWEEP_HEAD + "  din: {key: din, levels: [attn1i]}\nfactors:\n  seed: {key: seed, levels: [0, 1]}\n")),
    E("spec-factor-twice", "sweep", "sweep", SPEC, r"found duplicate key 'din'",
      sweep_file(SWEEP_HEAD + "  din: {key: din, levels: [attn1i, ffni]}\n  din: {key: dout, levels: [ffni]}\n")),
    E("spec-level-key-twice", "sweep", "sweep", SPEC, r"found duplicate key 'data_root'",
      sweep_file(SWEEP_HEAD + "  subject:\n    levels:\n      a: {data_root: x, data_root: y}\n")),
    E("spec-override-twice", "sweep", "sweep", SPEC, r"found duplicate key 'lr'",
      sweep_file("base: {BASES}\noverrides: {lr: 1.0e-4, lr: 2.0e-4}\nfactors:\n  seed: {key: seed, levels: [0]}\n")),
    E("factors-same-key", "sweep", "sweep", SPEC, r"factors 'a' and 'b' both set din: in every run one would silently "
      r"override the other", sweep_file(SWEEP_HEAD + "  a: {key: din, levels: [attn1i]}\n  b: {key: din, levels: "
                                        "[attn2o, ffni]}\n")),
    E("factors-alias-and-key", "sweep", "sweep", SPEC, r"factors 'lr' and 'rate' both set model\.base_learning_rate",
      sweep_file(SWEEP_HEAD + "  lr: {key: lr, levels: [1.0e-4]}\n  rate: {key: model.base_learning_rate, levels: "
                              "[2.0e-4, 3.0e-4]}\n")),
    E("factors-steps-and-flag", "sweep", "sweep", SPEC, r"both set lightning\.trainer\.max_steps",
      sweep_file(SWEEP_HEAD + "  steps: {key: steps, levels: [2]}\n  long: {key: max_steps, levels: [3, 4]}\n")),
    E("factors-levels-and-key", "sweep", "sweep", SPEC, r"factors 'subject' and 'data' both set "
      r"data\.params\.train\.params\.data_root",
      sweep_file(SWEEP_HEAD + "  subject:\n    levels:\n      dog: {data_root: d, class_word: dog}\n"
                              "  data: {key: data_root, levels: [x, y]}\n")),
]

TABLES = [
    E("table-run-twice", "table", "anova", ANOVA, r"lists run r1 on lines 3, 8: a run counts once",
      table(*GOOD_ROWS, "r1,attn2o,0,0.60")),
    E("table-run-twice-other-values", "table", "anova", ANOVA, r"lists run r4 on lines 6, 8",
      table(*GOOD_ROWS, "r4,ffni,1,0.9")),
    E("table-empty-factor-cell", "table", "anova", ANOVA, r"column din is empty on line\(s\) 4 of the results table",
      table(*with_row(2, "r2,,0,0.55"))),
    E("table-blank-factor-cell", "table", "anova", ANOVA, r"column din is empty on line\(s\) 3",
      table(*with_row(1, "r1, ,0,0.55"))),
    E("table-empty-block-cell", "table", "anova", ANOVA, r"column seed is empty on line\(s\) 7",
      table(*with_row(5, "r5,ffni,,0.50"))),
    W("table-inf-metric", "table", "anova", ANOVA, r"dino_i is infinite in 1 row\(s\) \(r1\): left out",
      table(*with_row(1, "r1,attn2o,0,inf"))),
    W("table-minus-inf-metric", "table", "anova", ANOVA, r"dino_i is infinite in 2 row\(s\) \(r0, r3\)",
      table("r0,attn1i,0,-inf", *GOOD_ROWS[1:3], "r3,attn1i,1,-inf", *GOOD_ROWS[4:])),
]

LATIN1 = "a photo of a caf\u00e9 dog\n".encode("latin-1")
TEXTS = [
    E("sample-from-file-latin1", "text", "sample", SAMPLE + ["--from-file", "{T}/p.txt"],
      r"prompt file '.*p.txt' is not UTF-8 text: byte 0xe9 on line 1 .*Latin-1.*save it as UTF-8",
      text("p.txt", LATIN1)),
    E("sample-from-file-utf16", "text", "sample", SAMPLE + ["--from-file", "{T}/p.txt"],
      r"is not UTF-8 text: byte 0xff on line 1 cannot be decoded \(UTF-16\?\)",
      text("p.txt", "a photo\n".encode("utf-16"))),
    E("sample-from-file-latin1-line-3", "text", "sample", SAMPLE + ["--from-file", "{T}/p.txt"],
      r"byte 0xe9 on line 3", text("p.txt", b"one\ntwo\n" + LATIN1)),
    E("train-caption-latin1", "text", "main_dream_booth",
      replace(TRAIN, "--data_root", "{T}/images"), r"caption file '.*a.txt' is not UTF-8 text: byte 0xe9",
      images_with("a.png", "b.png", bomb=False, caption=LATIN1)),
    A("captions-metadata-latin1", "text", lambda w, t: __import__("ldm.data.captions", fromlist=["x"]).read_metadata(
        t / "metadata.jsonl"), r"captions file '.*metadata.jsonl' is not UTF-8 text: byte 0xe9 on line 2",
      text("metadata.jsonl", b'{"file_name": "a.png", "text": "x"}\n{"file_name": "b.png", "text": "caf\xe9"}\n')),
    E("evaluate-prompts-latin1", "text", "evaluate", EVAL + ["--prompts", "{T}/p.txt"], r"is not text \(UTF-8\)",
      text("p.txt", LATIN1)),
]

LONG = "a photo of a sks dog " * 20
PROMPTS = [
    W("sample-prompt-too-long", "prompt", "sample", SAMPLE + ["--prompt", LONG],
      r"prompt is 120 tokens, more than the 75 the text encoder reads: everything after '.*' is ignored"),
    W("sample-from-file-long-line", "prompt", "sample", SAMPLE + ["--from-file", "{T}/p.txt"],
      r"prompt is 120 tokens, more than the 75", text("p.txt", "a short one\n" + LONG + "\n")),
    A("tokenizer-long-caption", "prompt", lambda w, t: __import__("ldm.modules.encoders.clip_tokenizer", fromlist=["x"])
      .CLIPTokenizer()([LONG + "in the snow", "short"]), r"prompt is 123 tokens", expect="warning"),
]

TOO_LARGE = r"is too large \(400,000,000 pixels; PIL decodes at most 178,956,970\): resize it"
IMAGES = [
    E("sample-init-img-bomb", "image", "sample", SAMPLE + ["--init-img", "{T}/bomb.png"], r"--init-img '.*bomb.png' "
      + TOO_LARGE, lambda w, t: bomb_png(t / "bomb.png")),
    E("train-only-a-bomb", "image", "main_dream_booth", replace(TRAIN, "--data_root", "{T}/images"),
      r"holds no usable images: each is unreadable or too large", images_with()),
    W("train-a-bomb-among-images", "image", "main_dream_booth", replace(TRAIN, "--data_root", "{T}/images"),
      r"skipping 1 unusable image\(s\) in '.*images': bomb.png " + TOO_LARGE, images_with("a.png", "b.png")),
    A("check-image-file-bomb", "image", lambda w, t: __import__("ldm.data.dreambooth", fromlist=["x"])
      .check_image_file(t / "bomb.png", "image"), r"image '.*bomb.png' " + TOO_LARGE,
      lambda w, t: bomb_png(t / "bomb.png")),
]

ROWS = [(f"{r.kind}:{r.id}", r) for group in (WEIGHTS, PICKLE, CONFINEMENT, SWEEPS, TABLES, TEXTS, PROMPTS, IMAGES)
        for r in group]


def test_the_table_has_60_rows_or_more_and_ids_are_unique():
    ids = [i for i, _ in ROWS]
    assert len(ids) >= 60 and len(set(ids)) == len(ids)


def fill(arg: str, w: Path, t: Path) -> str:
    return arg.replace("{W}", str(w)).replace("{T}", str(t))


def call_row(row: Row, w: Path, t: Path) -> Tuple[str, str]:
    """Run a row: ("error", its message), ("ok", ""), or ("traceback", the exception) when something other than a
    one-line exit (a script) or an error of ours (an API row: an exception class of ldm, or a plain ValueError or
    RuntimeError) escaped."""
    try:
        if row.target == "api":
            row.call(w, t)
        else:
            module = importlib.import_module(row.target if row.target in ("sample", "main_dream_booth")
                                             else f"scripts.{row.target}")
            module.main([fill(a, w, t) for a in row.args])
    except SystemExit as e:
        if e.code in (0, None):
            return "ok", ""
        return "error", e.code if isinstance(e.code, str) else f"exit status {e.code}"
    except Exception as e:  # noqa: BLE001 - what the row raised decides its outcome
        ours = type(e).__module__.startswith("ldm.") or type(e) in (ValueError, RuntimeError)
        return ("error" if row.target == "api" and ours else "traceback"), f"{type(e).__name__}: {e}"
    return "ok", ""


# make test-fast: the rows that show each script (and the API) and each kind once
@pytest.mark.parametrize("row", covering([r for _, r in ROWS], lambda r: r.target, lambda r: r.kind),
                         ids=[i for i, _ in ROWS])
def test_bad_input(row: Row, world, tmp_path, capsys, caplog, monkeypatch):
    t = tmp_path / "t"
    t.mkdir()
    monkeypatch.chdir(t)  # relative paths of a row ('../elsewhere') stay in the test's folder
    if row.setup:
        row.setup(world, t)
    before = snapshot(world, tmp_path)
    caplog.set_level(logging.WARNING)
    outcome, message = call_row(row, world, t)
    err = capsys.readouterr().err
    if row.expect == "warning":
        said = caplog.text + err
        assert outcome == "ok", f"{outcome if outcome == 'traceback' else 'unclear'}: refused a usable input: {message}"
        assert re.search(row.message, said), f"silent: no warning matching {row.message!r}: {said[-1500:]}"
        after = snapshot(world, tmp_path)
        assert {p: after.get(p) for p in before} == before, "unclear: an input changed"
        return
    assert outcome != "ok", "silent: the input was accepted"
    assert outcome == "error", f"traceback: {message}"
    assert "Traceback" not in err, f"traceback: {err[-2000:]}"
    assert "\n" not in message.strip() and re.search(row.message, message), f"unclear: {message}"
    assert snapshot(world, tmp_path) == before, "unclear: a refused call changed or left files"



@pytest.mark.parametrize("change", [lambda w: (w / "a" / "x.txt").write_text("y"),
                                    lambda w: (w / "a" / "x.txt").unlink(), lambda w: (w / "new.txt").write_bytes(b""),
                                    lambda w: (w / "a" / "empty").mkdir(),
                                    lambda w: (w / "run.eval.lock").write_text("4242"),
                                    lambda w: os.mkfifo(w / "a" / "pipe")],
                         ids=["changed", "removed", "new-empty-file", "new-folder", "written-lock", "fifo"])
def test_snapshot_sees_what_a_refused_call_could_change_or_leave(change, tmp_path):
    """The tree hash behind every "changed or left nothing" check sees each change (a FIFO without blocking on it);
    only an empty lock file, which an evaluation's claim leaves, does not count."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("x")
    before = snapshot(tmp_path)
    (tmp_path / "run.eval.lock").touch()
    assert snapshot(tmp_path) == before
    change(tmp_path)
    assert snapshot(tmp_path) != before


def test_snapshot_reads_a_remembered_file_again_once_it_is_rewritten(tmp_path, monkeypatch):
    """Settled files are hashed once and known by their stat after that: a same-size rewrite still shows (its ctime
    moves), also for a file the clock says settled a moment after it was written."""
    f = tmp_path / "x.txt"
    f.write_text("x")
    time.sleep(0.05)  # past the kernel's coarse timestamp tick, so the rewrite below gets a later ctime
    now = time.time_ns()
    monkeypatch.setattr(time, "time_ns", lambda: now + 2 * SETTLED_NS)
    before = snapshot(tmp_path)
    assert snapshot(tmp_path) == before
    f.write_text("y")
    assert snapshot(tmp_path) != before


# ---- confinement: a path given on the command line is the user's choice ------------------------------------------
def test_a_path_given_on_the_command_line_may_point_outside_the_run_dir(tmp_path, world):
    from ldm.checks import ConfigError
    from ldm.rundir import check_confined, override_keys
    a_run({"ckpt": CHECKPOINT})(world, tmp_path)
    config = OmegaConf.load(tmp_path / "run" / "config.yaml")
    with pytest.raises(ConfigError, match=OUTSIDE):
        check_confined(config, tmp_path / "run")
    check_confined(config, tmp_path / "run", override_keys([f"lightning.callbacks.ckpt.params.dirpath={tmp_path}"]))
    check_confined(config, tmp_path / "run", override_keys(["lightning.callbacks.ckpt={target: x}"]))
    config.lightning.callbacks.ckpt.params.dirpath = str(tmp_path / "run" / "mine")  # inside: fine
    check_confined(config, tmp_path / "run")


# ---- Ctrl-C and SIGTERM during training -------------------------------------------------------------------------
def session(args, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    env.pop("LDM_RUN_LOGDIR", None)
    return subprocess.Popen([sys.executable, str(REPO / "main_dream_booth.py"), *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def training(world: Path, t: Path, *extra: str) -> list:
    return [fill(a, world, t) for a in TRAIN] + ["-t", "lightning.callbacks.image_logger.params.disabled=true",
                                                 "data.params.train.params.repeats=1", *extra]


def temporaries(logdir: Path):
    return sorted(str(p.relative_to(logdir)) for p in logdir.rglob(".tmp-*"))


def step_of(logdir: Path) -> int:
    return torch.load(logdir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]


RESUME_LINE = r"resume with: python main_dream_booth.py -r (\S+) -t$"


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_during_a_step_writes_that_step_and_says_how_to_resume(world, tmp_path, sig):
    """The signal arrives while step 3 is in progress (sent by the process to itself, a real signal): step 3 finishes,
    its adapter directory and last.ckpt are written, the process exits 128 + the signal with one line; resumed, the
    run reaches its final step."""
    kill = f"lightning.callbacks.sig={{target: killswitch.SendSignal, params: {{step: 3, sig: {sig}}}}}"
    proc = session(training(world, tmp_path, "--allow_any_target", kill, "lightning.trainer.max_steps=6"), tmp_path)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + getattr(signal, sig), err[-3000:]
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and re.match(rf"training stopped by {sig} after step 3: its last.ckpt and adapter "
                                               r"directory are written; " + RESUME_LINE, last), err[-3000:]
    logdir = Path(re.search(RESUME_LINE, last).group(1))
    assert step_of(logdir) == 3 and (logdir / "checkpoints" / "2-adapters").is_dir() and temporaries(logdir) == []
    import main_dream_booth
    main_dream_booth.main(["-r", str(logdir), "-t", "--allow_any_target",
                           "lightning.callbacks.sig.params.step=100"])
    assert step_of(logdir) == 6
    stats = json.loads((logdir / "train_stats.json").read_text())
    assert [(s["start_step"], s["end_step"]) for s in stats["sessions"]] == [(0, 3), (3, 6)]


@pytest.mark.slow
def test_sigterm_from_another_process_stops_the_run_at_the_step_it_reached(world, tmp_path):
    """SIGTERM as a scheduler sends it, from outside, once the run has written its first adapter directory."""
    proc = session(training(world, tmp_path, "lightning.trainer.max_steps=5000"), tmp_path)
    deadline = time.monotonic() + 600
    while not list((tmp_path / "logs").glob("*/checkpoints/1-adapters")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-3000:]
    stopped = int(re.search(r"training stopped by SIGTERM after step (\d+):", err).group(1))
    logdir = next((tmp_path / "logs").iterdir())
    assert 2 <= stopped < 5000 and step_of(logdir) == stopped and temporaries(logdir) == []
    assert (logdir / "checkpoints" / f"{stopped - 1}-adapters").is_dir()


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_and_still_says_how_to_resume(world, tmp_path):
    kill = "lightning.callbacks.sig={target: killswitch.SendSignal, params: {step: 3, sig: SIGINT, times: 2}}"
    proc = session(training(world, tmp_path, "--allow_any_target", kill, "lightning.trainer.max_steps=6"), tmp_path)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode != 0 and "Traceback" not in err, err[-3000:]
    assert re.search(r"stopped at once by a second signal: the run keeps checkpoints/last.ckpt .*; resume with: "
                     r"python main_dream_booth.py -r ", err), err[-3000:]
    logdir = next((tmp_path / "logs").iterdir())
    assert step_of(logdir) == 2 and temporaries(logdir) == []


# ---- a full disk ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("where,what", [("ckpt", r"writing '.*checkpoints/last.ckpt' \(the previous file is kept"),
                                        ("adapters", r"writing '.*adapters.safetensors' \(no file was written"),
                                        ("image", r"writing '.*images/step-000004.png' \(no file was written"),
                                        ("csv", r"no space left on the device while training \(\[Errno 28\] No "
                                                r"space left on device\)")])
def test_a_full_disk_during_training_says_so_names_what_was_kept_and_leaves_no_partial_file(world, tmp_path, where,
                                                                                           what):
    """The disk fills up inside a write of step 4 (simulated in the training process: the writer fails with what it
    reports on a full disk, after half-writing its temporary file where it writes one)."""
    full = f"lightning.callbacks.full={{target: killswitch.FillDisk, params: {{step: 4, where: {where}}}}}"
    args = training(world, tmp_path, "--allow_any_target", full, "lightning.trainer.max_steps=6",
                    "lightning.callbacks.image_logger.params.disabled=false")
    proc = session(args, tmp_path)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert re.match(r"error: .*" + what, last) and re.search(
        r"the run keeps checkpoints/last.ckpt and \d adapter director(y|ies) \(newest checkpoints/\d-adapters\); free "
        r"some space, then " + RESUME_LINE, last), last
    logdir = next((tmp_path / "logs").iterdir())
    assert temporaries(logdir) == [] and step_of(logdir) in (2, 4)  # what was kept loads
    if where == "ckpt":  # space freed: the run resumes from the kept step
        import main_dream_booth
        main_dream_booth.main(["-r", str(logdir), "-t", "--allow_any_target",
                               "lightning.callbacks.full.params.where=none"])
        assert step_of(logdir) == 6


@pytest.mark.slow
@pytest.mark.parametrize("fail_at", [2, "grid"])
def test_a_full_disk_in_sample_outdir_says_so_names_what_was_kept_and_leaves_no_partial_file(world, tmp_path,
                                                                                            monkeypatch, fail_at):
    import sample
    from PIL import Image
    save, calls = Image.Image.save, []

    def save_fills_the_disk(im, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == fail_at or (fail_at == "grid" and "grid" in str(fp)):
            Path(fp).write_bytes(b"\x89PNG half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(im, fp, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "save", save_fills_the_disk)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        sample.main(replace([fill(a, world, tmp_path) for a in SAMPLE], "--n_iter", "3"))
    message = str(e.value.code)
    kept = "00000.png" if fail_at == 2 else r"00000.png \.\.\. samples/00002.png"
    assert re.match(rf"error: no space left on the device writing '.*(samples/00001|grid-0000).png' \(no file was "
                    rf"written; nothing partial is left\); the \d file\(s\) written before it are kept in '.*out' "
                    rf"\(samples/{kept}\); free some space and run again$", message), message
    assert not list(out.rglob(".tmp-*"))
    for png in out.rglob("*.png"):
        Image.open(png).load()


def test_torch_save_on_a_really_full_file_system_is_a_disk_full_error(tmp_path):
    """torch.save says 'unexpected pos' on a full disk; measured on a real 256 KiB tmpfs (mounting one needs root with
    CAP_SYS_ADMIN: skipped elsewhere)."""
    from ldm.checkpoint import DiskFullError, atomic_write
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (small / "old.ckpt").write_bytes(b"kept")
        with pytest.raises(DiskFullError, match=r"writing '.*old.ckpt' \(the previous file is kept"):
            atomic_write(small / "old.ckpt", lambda tmp: torch.save({"w": torch.zeros(1 << 20)}, tmp))
        assert sorted(p.name for p in small.iterdir()) == ["old.ckpt"] and (small / "old.ckpt").read_bytes() == b"kept"
    finally:
        subprocess.run(["umount", str(small)])


# ---- the lock of a run, a sweep run, a results table: the filelock package -------------------------------------------
HOLD = ("import sys, time; from ldm.checks import file_lock\nwith file_lock(sys.argv[1]):\n"
        "    print('held', flush=True)\n    time.sleep(600)\n")


@pytest.mark.slow
def test_a_lock_held_by_another_process_is_refused_and_freed_when_it_is_killed(tmp_path):
    from ldm.checks import file_lock
    lock = tmp_path / "job" / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with file_lock(lock, blocking=False) as mine:
        assert not mine
    holder.kill()
    holder.wait()
    with file_lock(lock, blocking=False) as mine:
        assert mine
    assert lock.read_bytes() == b""  # nothing is written into a lock file


def test_only_dedicated_lock_files_are_locked(tmp_path):
    from ldm.checks import file_lock
    (tmp_path / "config.yaml").write_text("model: {}\n")
    with pytest.raises(ValueError, match=r"file_lock takes a dedicated lock file named \*\.lock"):
        with file_lock(tmp_path / "config.yaml"):
            pass
    assert (tmp_path / "config.yaml").read_text() == "model: {}\n"
