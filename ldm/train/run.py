"""One training run: a `RunRequest` (configs, overrides, flags) -> checks -> log dir, model, data, Lightning Trainer,
fit.

Everything that can be checked is checked before any work (targets allowed, keys known, numbers in range, files
readable). Log dir layout: <logdir>/<YYYY-mm-ddTHH-MM-SS>_<name>/ (created exclusively, `ldm.rundir`) holding
config.yaml (the merged config, enough to resume), checkpoints/ (<step>-adapters/ and last.ckpt with the trained state
only), images/, tensorboard/, csv/<session>/, train_stats.json (all sessions) and .lock.
"""
import errno
import logging
import os
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException
from lightning_fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from ldm.callbacks import (AdapterCheckpoint, AtomicCheckpointIO, RunCheckpoint, StepProgressBar, StopOnSignal,
                           TrainStats, precision_plugins, quiet_lightning)
from ldm.checkpoint import (CheckpointError, DiskFullError, atomic_write, check_file, is_disk_full,
                            read_training_checkpoint)
from ldm.config import apply_override, check_targets, load_configs
from ldm.data.class_images import ensure_class_images
from ldm.data.dreambooth import DataError, format_prompt, usable_images
from ldm.models.diffusion.dreambooth import scaled_learning_rate
from ldm.modules.adapters import adapters_enable
from ldm.rundir import (check_confined, check_run_name, clean_temporaries, create_run_dir, describe_kept, discard,
                        override_keys, prune_empty, resume_command, run_lock, slug, timestamp)
from ldm.checks import ConfigError, check_number
from ldm.train.request import RunRequest
from ldm.util.instantiate import check_keys, instantiate_from_config
from ldm.util.targets import any_target_allowed

log = logging.getLogger(__name__)

LOGDIR_ENV = "LDM_RUN_LOGDIR"  # hands the run's log dir to the processes Lightning launches for DDP
CONFIG_FILE, LAST_CKPT = "config.yaml", "last.ckpt"


# ---- configuration ----------------------------------------------------------------------------------------------
def resolve_resume(resume: str) -> Tuple[Path, Optional[Path]]:
    """-r LOGDIR or -r LOGDIR/checkpoints/last.ckpt -> (log dir, checkpoint to resume from or None)."""
    path = Path(resume)
    if path.is_file():
        return path.parent.parent, path
    if not (path / CONFIG_FILE).is_file():
        raise ConfigError(f"cannot resume from '{resume}': expected a run's log dir (holding {CONFIG_FILE}) or "
                          f"its checkpoints/{LAST_CKPT}")
    ckpt = path / "checkpoints" / LAST_CKPT
    return path, ckpt if ckpt.is_file() else None


def load_config(request: RunRequest, resume_logdir: Optional[Path]) -> DictConfig:
    """The run's config: its saved config.yaml when resuming, then --base files in order, key=value overrides, flags
    (the config language of `ldm.config`)."""
    files = ([resume_logdir / CONFIG_FILE] if resume_logdir else []) + [Path(b) for b in request.base]
    if not files:
        raise ConfigError("no config: pass --base CONFIG (e.g. configs/sd-inject-dreambooth/attn2o-ffni.yaml)")
    config = load_configs(files)
    for item in request.overrides:
        apply_override(config, item)
    for root in ("model", "data"):
        if root not in config:
            raise ConfigError(f"the config has no '{root}' section: merge a training config such as "
                              "configs/stable-diffusion/v1-finetune-dreambooth.yaml")
    request.apply_to(config)
    return config


def check_data_config(config: DictConfig) -> None:
    """Fail early, before any weights load, on a missing image folder or a class image folder without a class. A
    data config without `reg` (a caption dataset, configs/stable-diffusion/v1-finetune-captions.yaml) trains without
    prior preservation."""
    data = config.data.params
    root = OmegaConf.select(data, "train.params.data_root")
    if not root:
        raise ConfigError("no training images: pass --data_root DIR, the subject images or the caption folder (or set "
                          "data.params.train.params.data_root)")
    if "reg" in data:
        if not OmegaConf.select(data, "reg.params.data_root"):
            log.warning("no --reg_data_root: training without prior preservation")
            del data["reg"]
        elif not OmegaConf.select(data, "reg.params.class_word"):
            raise ConfigError("--reg_data_root is set but no class word: pass --class_word (e.g. dog), the class "
                              "the subject belongs to, so class images and prompts can be made")
    weights = OmegaConf.select(config, "model.params.ckpt_path")
    if not weights:
        raise ConfigError("no base weights: pass --actual_resume SD.ckpt (an SD v1 .ckpt or .safetensors, or a diffusers folder)")
    if not Path(weights).is_dir():  # a diffusers model folder is checked when it is read
        check_file(weights, "base weights")


# ---- log dir ----------------------------------------------------------------------------------------------------
def make_logdir(request: RunRequest) -> Tuple[Path, List[Path]]:
    """A new <logdir>/<timestamp>_<name>, created exclusively (`ldm.rundir.create_run_dir`) and shared with DDP worker
    processes through the environment; returns it and the folders made for it."""
    if os.environ.get(LOGDIR_ENV) and rank_zero_only.rank != 0:
        return Path(os.environ[LOGDIR_ENV]), []
    name = check_run_name(request.name) if request.name else slug(Path(request.base[-1]).stem if request.base
                                                                    else "run")
    return create_run_dir(Path(request.logdir), name)


def save_config(config: DictConfig, logdir: Path) -> None:
    if rank_zero_only.rank == 0:
        text = OmegaConf.to_yaml(config)
        atomic_write(str(logdir / CONFIG_FILE), lambda tmp: Path(tmp).write_text(text))


# ---- trainer ----------------------------------------------------------------------------------------------------
def parse_gpus(gpus: str) -> List[int]:
    """The paper's --gpus: '0,' or '0,1,3' (indices) or '2' (a count)."""
    text = gpus.strip()
    try:
        if "," in text:
            return [int(g) for g in text.split(",") if g.strip()]
        return list(range(int(text)))
    except ValueError:
        raise ConfigError(f"--gpus '{gpus}' is not a list of GPU indices like '0,' or '0,1'") from None


def default_precision(accelerator: str) -> str:
    """bf16-mixed on GPUs that have bf16, 16-mixed on older GPUs, fp32 on the CPU."""
    if accelerator != "cpu" and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def trainer_kwargs(config: DictConfig, request: RunRequest) -> Dict[str, Any]:
    """Lightning Trainer arguments: lightning.trainer, then --gpus and Lightning's own flags."""
    kw = dict(OmegaConf.to_container(config.get("lightning", {}).get("trainer", {}), resolve=True))
    gpus = request.gpus if request.gpus is not None else kw.pop("gpus", None)
    kw.pop("gpus", None)
    if gpus is not None and str(gpus).strip():
        devices = parse_gpus(str(gpus))
        if not torch.cuda.is_available() or max(devices, default=0) >= torch.cuda.device_count():
            raise ConfigError(f"--gpus {gpus} asks for GPU(s) {devices} but torch sees "
                              f"{torch.cuda.device_count()} CUDA device(s): leave out --gpus to train on the CPU")
        kw.update(accelerator="gpu", devices=devices)
        if len(devices) > 1:
            kw.setdefault("strategy", "ddp")
    for flag in ("accelerator", "devices", "num_nodes", "strategy", "precision"):
        if getattr(request, flag) is not None:
            kw[flag] = getattr(request, flag)
    kw.setdefault("accelerator", "auto")
    kw.setdefault("devices", 1)
    if kw.get("precision", "auto") == "auto":
        kw["precision"] = default_precision(kw["accelerator"])
    return kw


def checkpoint_params(config: DictConfig) -> Dict[str, Any]:
    """lightning.modelcheckpoint.params, with every_n_train_steps (default 500)."""
    params = OmegaConf.select(config, "lightning.modelcheckpoint.params", default=None) or {}
    params = dict(OmegaConf.to_container(OmegaConf.create(params), resolve=True))
    params.setdefault("every_n_train_steps", 500)
    return params


def callbacks(config: DictConfig, logdir: Path, progress_bar: bool = True) -> List[pl.Callback]:
    """The lightning.callbacks of the config plus checkpointing (adapters + last.ckpt), run statistics, a clean stop on
    Ctrl-C / SIGTERM and a progress bar of steps."""
    params = checkpoint_params(config)
    params.update(dirpath=str(logdir / "checkpoints"), save_top_k=0, save_last=True, enable_version_counter=False)
    result = [AdapterCheckpoint(params["every_n_train_steps"]), TrainStats(), RunCheckpoint(**params), StopOnSignal()]
    result += [StepProgressBar()] if progress_bar else []
    extra = OmegaConf.select(config, "lightning.callbacks", default=None) or {}
    return result + [instantiate_from_config(cfg) for cfg in extra.values()]


def build_trainer(config: DictConfig, request: RunRequest, logdir: Path, progress_bar: bool = True) -> pl.Trainer:
    """A Trainer writing CSV and TensorBoard logs and atomic checkpoints under `logdir` (Lightning's adverts and its
    warning about our own full checkpoints left out of the log)."""
    quiet_lightning()
    # One CSV file per session (Lightning's CSVLogger empties an existing metrics.csv); TensorBoard appends.
    stamp = session = timestamp()
    for n in range(2, 1000):
        if not (logdir / "csv" / session).exists():
            break
        session = f"{stamp}-{n}"
    # rows are appended at every logging step, so a killed session keeps its metrics
    loggers = [pl.loggers.CSVLogger(str(logdir), name="csv", version=session, flush_logs_every_n_steps=1),
               pl.loggers.TensorBoardLogger(str(logdir), name="tensorboard", version="")]
    kw, precision = precision_plugins(trainer_kwargs(config, request))
    if not progress_bar:
        kw["enable_progress_bar"] = False
    try:
        return pl.Trainer(default_root_dir=str(logdir), logger=loggers, plugins=[AtomicCheckpointIO(), *precision],
                          callbacks=callbacks(config, logdir, kw.get("enable_progress_bar", True)), **kw)
    except (TypeError, ValueError, MisconfigurationException) as e:
        raise ConfigError(f"lightning.trainer or a Lightning flag was rejected: {e}") from None


# ---- checks before any work -------------------------------------------------------------------------------------
PRECISIONS = ("32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "16-true", "bf16-true", "64-true", "64")
# numbers of the run that no class checks itself: (key, ldm.checks.check_number options)
RUN_NUMBERS = (("model.base_learning_rate", dict(low=0, low_open=True)),
               ("lightning.modelcheckpoint.params.every_n_train_steps", dict(low=1, integer=True)),
               ("lightning.trainer.accumulate_grad_batches", dict(low=1, integer=True)),
               ("lightning.trainer.log_every_n_steps", dict(low=1, integer=True)),
               ("lightning.trainer.gradient_clip_val", dict(low=0, optional=True)))


def check_steps(name: str, value: Any) -> None:
    """max_steps / max_epochs: a count >= 1, or -1 for no limit."""
    if value is not None and value != -1 and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{name} must be an integer >= 1 (or -1: no limit), got {value!r}")


def check_accelerator(name: str) -> None:
    """A Lightning accelerator name ('gpu', 'auto' or one of its registry) that this machine has."""
    registry = pl.accelerators.AcceleratorRegistry
    names = sorted({"auto", "gpu", *registry.available_accelerators()})
    if name not in names:
        raise ConfigError(f"accelerator '{name}' is not one of {', '.join(names)}")
    gpus = (pl.accelerators.CUDAAccelerator, pl.accelerators.MPSAccelerator)
    available = (name == "auto" or (name == "gpu" and any(a.is_available() for a in gpus))
                 or (name in registry and registry[name]["accelerator"].is_available()))
    if not available:
        raise ConfigError(f"accelerator '{name}' is not available on this machine: pass --accelerator cpu (or leave "
                          "it out)")


def check_run(config: DictConfig, request: RunRequest) -> Dict[str, Any]:
    """Everything that can be checked before any work: every target of the config (allowed, keys known, numbers in
    range), the run's own numbers, the Lightning settings and flags. Returns the Trainer arguments."""
    if request.seed is not None:
        check_number(request.seed, "--seed", 0, 2 ** 32 - 1, integer=True)
    check_targets(config)
    for key, limits in RUN_NUMBERS:
        value = OmegaConf.select(config, key, default=None)
        if value is not None:
            check_number(value, key, **limits)
    check_keys(pl.callbacks.ModelCheckpoint, list(checkpoint_params(config)), "lightning.modelcheckpoint.params")
    kw = trainer_kwargs(config, request)
    check_keys(pl.Trainer, list(kw), "lightning.trainer")
    check_steps("lightning.trainer.max_steps (--max_steps)", kw.get("max_steps"))
    check_steps("lightning.trainer.max_epochs", kw.get("max_epochs"))
    check_number(kw.get("num_nodes", 1), "lightning.trainer.num_nodes (--num_nodes)", 1, integer=True)
    check_accelerator(str(kw["accelerator"]))
    devices = kw["devices"]
    if not (devices == "auto" or isinstance(devices, (list, tuple)) or (isinstance(devices, str) and "," in devices)):
        check_number(devices, "devices (--devices: a count, a list like 0,1, or auto)", -1, integer=True)
        if devices == 0:
            raise ConfigError("devices (--devices) must be at least 1, or -1 for all, a list like 0,1, or auto")
    if str(kw["precision"]) not in PRECISIONS:
        raise ConfigError(f"precision '{kw['precision']}' is not one of {', '.join(PRECISIONS)} (or auto)")
    return kw


# ---- the run ----------------------------------------------------------------------------------------------------
def learning_rate(config: DictConfig, request: RunRequest, trainer: pl.Trainer) -> float:
    """model.base_learning_rate, scaled by batch size x devices x nodes x accumulation when --scale_lr."""
    base_lr = float(config.model.get("base_learning_rate", 1e-4))
    if not request.scale_lr:
        log.info("learning rate %.2e (not scaled; --scale_lr True scales it)", base_lr)
        return base_lr
    lr = scaled_learning_rate(base_lr, int(config.data.params.batch_size), trainer.num_devices, trainer.num_nodes,
                              trainer.accumulate_grad_batches)
    log.info("learning rate %.2e = %.2e (base) x %d (batch) x %d (devices) x %d (nodes) x %d (accumulation)", lr,
             base_lr, config.data.params.batch_size, trainer.num_devices, trainer.num_nodes,
             trainer.accumulate_grad_batches)
    return lr


def _count_images(folder: str) -> int:
    try:
        return len(usable_images(folder))
    except DataError:
        return 0


def prepare_class_images(model: pl.LightningModule, datamodule: pl.LightningDataModule, trainer: pl.Trainer,
                         timeout_s: float = 3600.0) -> None:
    """Fill the class image folder with the base model (adapters off); other ranks wait for rank 0 to finish."""
    reg = datamodule.configs.get("reg")
    if reg is None:
        return
    folder, wanted = reg.params.data_root, datamodule.num_class_images
    if rank_zero_only.rank != 0:
        deadline = time.monotonic() + timeout_s
        while _count_images(folder) < wanted:
            if time.monotonic() > deadline:
                raise DataError(f"waited {timeout_s:.0f} s for rank 0 to generate class images in '{folder}'")
            time.sleep(5)
        return
    templates = reg.params.get("class_templates", ["photo of a {}"])
    prompt = format_prompt(templates[0], {"class_word": reg.params.class_word})
    model.to(trainer.strategy.root_device)
    adapters_enable(model, False)  # the base model's images: UNet and text-encoder adapters off
    try:
        with trainer.precision_plugin.forward_context():
            ensure_class_images(model, folder, prompt, wanted, size=reg.params.get("size", 512),
                                **datamodule.class_image_sampler)
    finally:
        adapters_enable(model, True)


def finished_step(checkpoint: Optional[Dict[str, Any]], config: DictConfig) -> Optional[int]:
    """The checkpoint's step when it has reached lightning.trainer.max_steps (the run is done), else None."""
    max_steps = OmegaConf.select(config, "lightning.trainer.max_steps", default=-1)
    if checkpoint is None or max_steps is None or max_steps < 1:
        return None
    return checkpoint["global_step"] if checkpoint["global_step"] >= max_steps else None


def finished_at(logdir: Path) -> Optional[int]:
    """The step of a run dir's last.ckpt when it has reached the run's max_steps, else None (unfinished, or no
    readable checkpoint or config)."""
    ckpt = logdir / "checkpoints" / LAST_CKPT
    try:
        return finished_step(read_training_checkpoint(str(ckpt)), load_configs([logdir / CONFIG_FILE]))
    except (CheckpointError, ConfigError):
        return None


class Hooks:
    """What a run lets its host change: how the model is built and what happens once it is. A plain run builds its
    model from the config; a packed run (`ldm.train.pack`) shares one frozen base model with the other runs."""
    progress_bar = True

    def build_model(self, config: DictConfig) -> pl.LightningModule:
        return instantiate_from_config(config.model)

    def joined(self, model: pl.LightningModule, trainer: pl.Trainer) -> None:
        """The run's model and trainer are set up (before class images and training)."""


def setup(config: DictConfig, request: RunRequest, logdir: Path, checkpoint: Optional[Dict[str, Any]],
          hooks: Hooks) -> Tuple[pl.Trainer, pl.LightningModule, pl.LightningDataModule]:
    """Data, trainer, model (checked against the checkpoint) and class images; then config.yaml is written."""
    pl.seed_everything(request.seed, workers=True)
    # Intended here: the frozen base stays in eval mode, and data is reshuffled when a run resumes mid-epoch.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch")
    datamodule = instantiate_from_config(config.data)
    datamodule.dataset("instance")  # a bad subject folder fails here, before the base weights load
    trainer = build_trainer(config, request, logdir, hooks.progress_bar)
    model = hooks.build_model(config)
    model.learning_rate = learning_rate(config, request, trainer)
    if checkpoint:  # refuse a checkpoint of other adapters before config.yaml is rewritten with their config
        model.on_load_checkpoint(checkpoint)
    hooks.joined(model, trainer)
    prepare_class_images(model, datamodule, trainer)
    save_config(config, logdir)
    log.info("run dir %s: %s", logdir, model.describe_trained())
    return trainer, model, datamodule


def fit(trainer: pl.Trainer, model: pl.LightningModule, datamodule: pl.LightningDataModule, logdir: Path,
        ckpt: Optional[Path]) -> None:
    """trainer.fit, resuming from `ckpt`; a CSV session folder that got no rows is removed afterwards. A full disk is a
    DiskFullError, and a stop by Ctrl-C / SIGTERM a TrainingInterrupted, both naming what the run keeps and how to
    resume it."""
    os.environ[LOGDIR_ENV] = str(logdir)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    except Exception as e:  # noqa: BLE001 - a full disk shows as OSError, or as a library's own error (atomic_write)
        if not is_disk_full(e):
            raise
        what = str(e) if isinstance(e, DiskFullError) else f"no space left on the device while training ({e})"
        raise DiskFullError(errno.ENOSPC, f"{what}; {describe_kept(logdir)}; free some space, then resume with: "
                                          f"{resume_command(logdir)}") from None
    finally:
        os.environ.pop(LOGDIR_ENV, None)
        csv = next((lg for lg in trainer.loggers if isinstance(lg, pl.loggers.CSVLogger)), None)
        if csv is not None and rank_zero_only.rank == 0:
            prune_empty(Path(csv.log_dir))
    for callback in trainer.callbacks:
        if isinstance(callback, StopOnSignal):
            callback.raise_if_stopped(resume_command(logdir))


def run(request: RunRequest, hooks: Optional[Hooks] = None) -> Path:
    """Set up and (with request.train) fit one DreamBooth run; returns its log dir. Configs may name targets outside
    the allow-list of `ldm.util.targets` only with request.allow_any_target."""
    with any_target_allowed(request.allow_any_target):
        return _run(request, hooks or Hooks())


def _run(request: RunRequest, hooks: Hooks) -> Path:
    resume_logdir, ckpt = resolve_resume(request.resume) if request.resume else (None, None)
    config = load_config(request, resume_logdir)
    check_run(config, request)
    check_data_config(config)
    checkpoint = read_training_checkpoint(str(ckpt)) if ckpt else None
    done = finished_step(checkpoint, config)
    first_rank = rank_zero_only.rank == 0
    logdir, created = (resume_logdir, []) if resume_logdir else make_logdir(request)
    try:
        check_confined(config, logdir, override_keys(request.overrides))
        with run_lock(logdir) if first_rank else nullcontext():
            if resume_logdir and first_rank:
                clean_temporaries(logdir)  # what killed writes left; nothing else is touched
            if done is not None:
                log.info("'%s' already finished at step %d (lightning.trainer.max_steps %d): nothing to do; pass "
                         "--max_steps N to train it further", logdir, done, config.lightning.trainer.max_steps)
                return logdir
            if resume_logdir and ckpt is None:
                log.warning("'%s' has no checkpoint yet: training it from step 0", logdir)
            trainer, model, datamodule = setup(config, request, logdir, checkpoint, hooks)
            created = []  # config.yaml is written: the run dir is a run from here on, kept whatever happens
            if not request.train:
                log.info("set up only (pass -t to train)")
                return logdir
            fit(trainer, model, datamodule, logdir, ckpt)
    finally:
        if created:
            discard(created)
    return logdir
