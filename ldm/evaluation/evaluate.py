"""Evaluating trained runs: sample a fixed prompt set with fixed seeds, compute the protocol's metrics (the registry of
`ldm.evaluation.metrics`), add a row to the table. Every sample is drawn by `draw`.

A run is a folder holding the merged config.yaml of its training and checkpoints/<step>-adapters (a sweep's run
folder, or any main_dream_booth.py log dir). The model is rebuilt from that config (base weights from its
model.params.ckpt_path) and the adapters are loaded from the directory, as `sample.py --adapter_path` does.
"""
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.checkpoint import CheckpointError, atomic_write, load_trained_parameters
from ldm.checks import SEED_MAX, check_number, file_lock
from ldm.config import load_yaml_config
from ldm.data.dreambooth import format_prompt, usable_images
from ldm.evaluation.backends import EvaluationError, MetricBackend
from ldm.evaluation.fid import FrechetDistance
from ldm.evaluation.metrics import CLASS, METRICS, Samples, load_images, measure
from ldm.evaluation.sampling import prompt_seed_pairs, sample_images
from ldm.evaluation.table import SUBJECT_COLUMN, done_runs, upsert_row
from ldm.models.diffusion.sampling import DEFAULT_SAMPLER
from ldm.modules.adapters import (WEIGHTS_FILE, adapter_groups, adapter_parameters, adapters_enable, describe,
                                  load_adapter_from_dir)
from ldm.sweep.runs import load_runs  # evaluation works on plain runs too; sweeps are one source
from ldm.util.images import image_grid, to_pil
from ldm.util.instantiate import load_model_from_config

log = logging.getLogger(__name__)

# Prompts in the spirit of DreamBooth's evaluation set; {token} is the placeholder (sks), {class_word} the class.
DEFAULT_PROMPTS = ("photo of a {token} {class_word}", "a {token} {class_word} on the beach",
                   "a {token} {class_word} in the snow", "a red {token} {class_word}")
ADAPTER_DIR = re.compile(r"^(\d+)-adapters$")
EVAL_LOCK = ".eval.lock"  # a run's evaluation claim (a dedicated file: a lock never touches config.yaml)
STATS = {"seconds": "train_seconds", "steps": "train_steps", "steps_per_second": "train_steps_per_second",
         "peak_gpu_memory_bytes": "peak_gpu_memory_bytes", "peak_host_memory_bytes": "peak_host_memory_bytes"}


@dataclass
class EvalSettings:
    """What each run is evaluated on: prompt templates x seeds, the sampler, and the adapter step."""
    prompts: Sequence[str] = DEFAULT_PROMPTS
    seeds: Sequence[int] = (0, 1, 2, 3)
    steps: int = 50
    scale: float = 7.5
    sampler: str = DEFAULT_SAMPLER
    batch_size: int = 8
    step: Optional[int] = None  # which checkpoints/<step>-adapters; None: the last
    save_grid: bool = True
    prior_prompt: Optional[str] = "photo of a {class_word}"  # prior preservation on it; None: not measured

    def __post_init__(self):
        """Every number in range and every template usable, before any run is sampled."""
        try:
            check_number(self.steps, "steps", 1, integer=True)
            check_number(self.scale, "scale", integer=False)
            check_number(self.batch_size, "batch_size", 1, integer=True)
            if self.step is not None:
                check_number(self.step, "step", 0, integer=True)
            for seed in self.seeds:
                check_number(seed, "each seed", 0, SEED_MAX, integer=True)
        except ValueError as e:
            raise EvaluationError(str(e)) from None
        if not self.seeds or not self.prompts:
            raise EvaluationError(f"{'seeds' if not self.seeds else 'prompts'}: give at least one")
        for template in [*self.prompts, *([self.prior_prompt] if self.prior_prompt else [])]:
            check_template(template)


def check_template(template: str) -> None:
    """A prompt template must fill from {token} and {class_word} (or positional {}); an EvaluationError otherwise."""
    try:
        format_prompt(template, {"token": "sks", "class_word": "dog"})
    except (ValueError, IndexError, KeyError) as e:
        message = str(e) if str(e).startswith("prompt template") else \
            f"prompt template '{template}' is not a valid template ({e}); write {{token}} and {{class_word}}, and " \
            "{{ }} for a literal brace"
        raise EvaluationError(message) from None


@dataclass
class Drawn:
    """A run's samples drawn together with other runs' (`ldm.evaluation.packed`): its prompts' images, the prior
    prompt's by the run and by the base model, and its adapter_size entries."""
    images: torch.Tensor
    prior_tuned: Optional[torch.Tensor]
    prior_base: Optional[torch.Tensor]
    adapter: Dict[str, Any]


@dataclass
class Metrics:
    """The metric backends (by name) and, optionally, FID against reference images."""
    backends: Dict[str, MetricBackend] = field(default_factory=dict)
    fid: Optional[FrechetDistance] = None  # one for all runs: it keeps the reference statistics
    fid_reference: Optional[str] = None


# ---- one run ----------------------------------------------------------------------------------------------------
def adapter_dir(run_dir: Path, step: Optional[int] = None) -> Path:
    """checkpoints/<step>-adapters of the run: the given step, or the last one."""
    found = {int(m.group(1)): p for p in (run_dir / "checkpoints").glob("*-adapters")
             if (m := ADAPTER_DIR.match(p.name))}
    if not found:
        raise EvaluationError(f"'{run_dir}' has no trained adapters (checkpoints/<step>-adapters): has it trained?")
    if step is not None and step not in found:
        raise EvaluationError(f"'{run_dir}' has no checkpoints/{step}-adapters; it has steps {sorted(found)}")
    return found[max(found) if step is None else step]


def run_config(run_dir: Path) -> DictConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise EvaluationError(f"'{run_dir}' is not a run folder: it has no config.yaml")
    return load_yaml_config(path)


def check_steps(runs: Sequence[Path], steps: int) -> None:
    """Sampling steps beyond a run's diffusion schedule are refused before any run is sampled (a run whose config
    cannot be read fails on its own later)."""
    for run_dir in runs:
        try:
            timesteps = int(OmegaConf.select(run_config(Path(run_dir)), "model.params.timesteps", default=1000))
        except ValueError:
            continue
        if steps > timesteps:
            raise EvaluationError(f"--steps {steps} is more than the {timesteps} diffusion steps of the model of run "
                                  f"'{run_dir}': use at most {timesteps}")


def load_run_model(config: DictConfig, adapters: Path, device: torch.device) -> torch.nn.Module:
    """The run's model (base weights from its config's ckpt_path) with the trained adapters of `adapters`; a run that
    trained the whole UNet (`train_level: [unet]`, the DreamBooth baseline) also gets its UNet from the run's
    checkpoints/last.ckpt, which must then be the checkpoint of the same step."""
    model = load_model_from_config(config)
    load_adapter_from_dir(model, str(adapters))
    if trains_unet(config):
        load_trained_unet(model, adapters.parent / "last.ckpt", int(adapters.name.split("-")[0]) + 1)
    return model.to(device).eval()


def trains_unet(config: DictConfig) -> bool:
    """Whether the run fine-tuned the whole UNet (`train_level: [unet]`), not only adapters."""
    return "unet" in (OmegaConf.select(config, "model.params.train_level") or ())


def load_trained_unet(model: torch.nn.Module, path: Path, step: int) -> None:
    """The trained parameters of the run's training checkpoint (main_dream_booth.py's last.ckpt) into `model`."""
    saved = load_trained_parameters(model, str(path))
    if saved != step:
        raise EvaluationError(f"'{path}' is from step {saved}, not {step}: a run that trains the whole UNet can only "
                              f"be evaluated at its last step (leave --step out)")


def subject_fields(config: DictConfig) -> Dict[str, str]:
    """{token, class_word} of the run's subject data."""
    train = OmegaConf.select(config, "data.params.train.params") or {}
    return {"token": str(train.get("placeholder_token", "sks")), "class_word": str(train.get("class_word", ""))}


def prompts_for(config: DictConfig, templates: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(sampling prompts, their text for prompt fidelity): the placeholder token is left out of the latter."""
    fields = subject_fields(config)
    prompts = [format_prompt(t, fields) for t in templates]
    plain = [" ".join(format_prompt(t, {**fields, "token": ""}).split()) for t in templates]
    return prompts, plain


def image_size(config: DictConfig) -> int:
    return int(OmegaConf.select(config, "data.params.train.params.size", default=512))


def instance_images(config: DictConfig, size: int) -> torch.Tensor:
    root = OmegaConf.select(config, "data.params.train.params.data_root")
    if not root:
        raise EvaluationError("the run's config has no data.params.train.params.data_root (the subject images)")
    return load_images(usable_images(root), size)


def train_stats(run_dir: Path) -> Dict[str, Any]:
    """Training time and peak memory from the run's train_stats.json (ldm.callbacks.TrainStats)."""
    path = run_dir / "train_stats.json"
    stats = json.loads(path.read_text()) if path.is_file() else {}
    return {column: stats[key] for key, column in STATS.items() if key in stats}


def adapter_size(adapters: Path, model: torch.nn.Module, group: str = "default") -> Dict[str, Any]:
    """Trainable (adapter) parameters, the adapter file's size in bytes, and a one-line description (of `group`)."""
    groups = adapter_groups(model)
    params = sum(p.numel() for p in adapter_parameters(model, group if group in groups else None))
    weights = adapters / WEIGHTS_FILE
    return {"trainable_parameters": params, "adapter_bytes": weights.stat().st_size if weights.is_file() else "",
            "adapter": describe(groups.get(group, []))}


def draw(model: torch.nn.Module, pairs: Sequence[Tuple[str, int]], size: int, settings: EvalSettings
         ) -> torch.Tensor:
    """The samples of (prompt, seed) pairs: every image evaluation measures is drawn here."""
    return sample_images(model, pairs, size, settings.steps, settings.scale, settings.sampler, settings.batch_size)


def class_samples(model: torch.nn.Module, prompt: str, size: int, settings: EvalSettings,
                  base_model: Optional[torch.nn.Module] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The class prompt sampled by the fine-tuned model and by the base model from the same seeds (DreamBooth's
    prior). Without `base_model` the base is `model` with its adapters off (right when only adapters trained)."""
    pairs = prompt_seed_pairs([prompt], settings.seeds)
    tuned = draw(model, pairs, size, settings)
    if base_model is not None:
        return tuned, draw(base_model, pairs, size, settings)
    adapters_enable(model, False)
    try:
        return tuned, draw(model, pairs, size, settings)
    finally:
        adapters_enable(model, True)


def prior_metrics(model: torch.nn.Module, metrics: Metrics, prompt: str, size: int, settings: EvalSettings,
                  base_model: Optional[torch.nn.Module] = None, references: Optional[torch.Tensor] = None
                  ) -> Dict[str, float]:
    """The registry's class-sample metrics (`<backend>_prior`, and with `references` `<backend>_leak`, ...)."""
    tuned, base = class_samples(model, prompt, size, settings, base_model)
    keys = [k for k, m in METRICS.items() if m.samples == CLASS]
    return measure(metrics.backends, Samples(references=references, class_tuned=tuned, class_base=base), keys=keys)


def draw_alone(config: DictConfig, adapters: Path, settings: EvalSettings, device: torch.device) -> Drawn:
    """One run's samples, drawn by its own model."""
    model = load_run_model(config, adapters, device)
    prompts, _ = prompts_for(config, settings.prompts)
    size = image_size(config)
    images = draw(model, prompt_seed_pairs(prompts, settings.seeds), size, settings)
    tuned = base = None
    if settings.prior_prompt:  # a fine-tuned UNet is compared with the base weights, not just with adapters off
        base_model = load_model_from_config(config).to(device).eval() if trains_unet(config) else None
        tuned, base = class_samples(model, format_prompt(settings.prior_prompt, subject_fields(config)), size,
                                    settings, base_model)
    return Drawn(images, tuned, base, adapter_size(adapters, model))


def evaluate_run(run_dir: Path, metrics: Metrics, settings: EvalSettings, device: torch.device,
                 drawn: Optional[Drawn] = None) -> Dict[str, Any]:
    """Sample (unless `drawn` holds the run's samples, drawn in a pack), measure and describe one run: its
    results-table row."""
    run_dir = Path(run_dir)
    config, adapters = run_config(run_dir), adapter_dir(run_dir, settings.step)
    drawn = drawn or draw_alone(config, adapters, settings, device)
    images = drawn.images
    if settings.save_grid:  # replaces the grid of an earlier evaluation of this step (--force), atomically
        grid = image_grid(to_pil(images * 2 - 1), len(settings.seeds))
        atomic_write(str(run_dir / "eval" / f"samples-{adapters.name}.png"), lambda tmp: grid.save(tmp, format="PNG"))
    _, texts = prompts_for(config, settings.prompts)
    samples = Samples(subject=images, texts=[t for t in texts for _ in settings.seeds],
                      references=instance_images(config, image_size(config)), fid_reference=metrics.fid_reference,
                      subject_name=subject_name(config), class_tuned=drawn.prior_tuned, class_base=drawn.prior_base)
    row = {"run": run_dir.name, SUBJECT_COLUMN: subject_name(config), **run_levels(run_dir)}
    row.update(measure(metrics.backends, samples, metrics.fid))
    row.update(drawn.adapter, adapter_step=int(adapters.name.split("-")[0]), n_samples=len(images))
    row.update(train_stats(run_dir))
    return row


def subject_name(config: DictConfig) -> str:
    """The name of the run's instance-image folder: its subject outside a sweep with a `subject` factor, and the
    name a classifier backend knows the subject's look by."""
    root = OmegaConf.select(config, "data.params.train.params.data_root") or ""
    return Path(str(root)).name


def run_levels(run_dir: Path) -> Dict[str, Any]:
    """The run's factor levels (a sweep run's levels.json), else none."""
    path = run_dir / "levels.json"
    return dict(json.loads(path.read_text()).get("levels", {})) if path.is_file() else {}


# ---- many runs --------------------------------------------------------------------------------------------------
def find_runs(paths: Sequence[str]) -> List[Path]:
    """Run folders to evaluate: a sweep folder's finished runs (in grid order), or run folders as given."""
    found = []
    for p in map(Path, paths):
        if (p / "sweep.json").is_file():
            runs = load_runs(str(p))
            found += [r.dir for r in runs if r.state == "done"]
            if not any(r.state == "done" for r in runs):
                log.warning("sweep '%s' has no finished run yet", p)
        elif (p / "config.yaml").is_file():
            found.append(p)
        else:
            raise EvaluationError(f"'{p}' is neither a sweep folder (sweep.json) nor a run folder (config.yaml)")
    return found


def evaluate_runs(runs: Sequence[Path], table: Path, metrics: Metrics, settings: EvalSettings, device: torch.device,
                  skip: Sequence[str] = (), force: bool = False,
                  draw: Optional[Callable[[Path], Drawn]] = None) -> Dict[str, str]:
    """Evaluate each run not in `skip` and upsert its row into `table` as soon as it is done; returns the failures
    (run name -> reason). Another process evaluating the same runs is taken into account: each run is claimed by a
    lock (EVAL_LOCK in its folder) while it is evaluated, a run claimed elsewhere is put off to the end, and (unless
    `force`) a run whose row appeared meanwhile is skipped, so each run is evaluated and written once. `draw` gives a
    run's samples drawn with other runs' (`ldm.evaluation.packed.PackedDraws`); without it each run samples alone."""
    failed: Dict[str, str] = {}
    deferred = []
    for run_dir in runs:
        if run_dir.name in skip:
            log.info("%s: already in %s (pass --force to evaluate again)", run_dir.name, table)
        elif not _claimed_evaluation(run_dir, table, metrics, settings, device, failed, force, False, draw):
            log.info("%s: being evaluated by another process; coming back to it at the end", run_dir.name)
            deferred.append(run_dir)
    for run_dir in deferred:
        _claimed_evaluation(run_dir, table, metrics, settings, device, failed, force, True, draw)
    return failed


def _claimed_evaluation(run_dir: Path, table: Path, metrics: Metrics, settings: EvalSettings, device: torch.device,
                        failed: Dict[str, str], force: bool, blocking: bool,
                        draw: Optional[Callable[[Path], Drawn]] = None) -> bool:
    """Evaluate one run under its lock; False when another process holds the lock (and `blocking` is False)."""
    with file_lock(Path(run_dir) / EVAL_LOCK, blocking) as claimed:
        if not claimed:
            return False
        if not force and run_dir.name in done_runs(table):
            log.info("%s: evaluated by another process meanwhile", run_dir.name)
            return True
        try:
            row = evaluate_run(run_dir, metrics, settings, device, draw(run_dir) if draw else None)
        except (ValueError, CheckpointError) as e:  # EvaluationError, DataError, AdapterConfigError: one bad run
            # does not stop the others
            log.error("%s: not evaluated: %s", run_dir.name, e)
            failed[run_dir.name] = str(e)
            return True
        upsert_row(table, row)
        log.info("%s: %s", run_dir.name, ", ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float)))
    return True
