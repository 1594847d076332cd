"""A training run of main_dream_booth.py: configs and command line -> log dir, model, data, Lightning Trainer, fit.

Log dir layout: <logdir>/<YYYY-mm-ddTHH-MM-SS>_<name>/ holding config.yaml (the merged config, enough to resume),
checkpoints/ (<step>-adapters/ and last.ckpt with the trained state only), images/, tensorboard/, csv/ and
train_stats.json.
"""
import argparse
import logging
import os
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from ldm.callbacks import AdapterCheckpoint, AtomicCheckpointIO, TrainStats
from ldm.checkpoint import atomic_write
from ldm.config import apply_flags, apply_override, load_configs
from ldm.data.class_images import ensure_class_images
from ldm.data.dreambooth import DataError, format_prompt, usable_images
from ldm.models.diffusion.dreambooth import scaled_learning_rate
from ldm.modules.adapters import adapters_enable
from ldm.util import ConfigError, instantiate_from_config

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


def load_config(opt: argparse.Namespace, resume_logdir: Optional[Path]) -> DictConfig:
    """The run's config: its saved config.yaml when resuming, then --base files in order, key=value overrides, flags
    (the config language of `ldm.config`)."""
    files = ([resume_logdir / CONFIG_FILE] if resume_logdir else []) + [Path(b) for b in opt.base]
    if not files:
        raise ConfigError("no config: pass --base CONFIG (e.g. configs/sd-inject-dreambooth/attn2o-ffni.yaml)")
    config = load_configs(files)
    for item in opt.overrides:
        apply_override(config, item)
    for root in ("model", "data"):
        if root not in config:
            raise ConfigError(f"the config has no '{root}' section: merge a training config such as "
                              "configs/stable-diffusion/v1-finetune-dreambooth.yaml")
    apply_flags(config, opt)
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
    if not OmegaConf.select(config, "model.params.ckpt_path"):
        raise ConfigError("no base weights: pass --actual_resume SD.ckpt (an SD v1 .ckpt or .safetensors, or a diffusers folder)")


# ---- log dir ----------------------------------------------------------------------------------------------------
def make_logdir(opt: argparse.Namespace) -> Path:
    """<logdir>/<timestamp>_<name>, shared with DDP worker processes through the environment; checked writable."""
    if os.environ.get(LOGDIR_ENV) and rank_zero_only.rank != 0:
        return Path(os.environ[LOGDIR_ENV])
    name = opt.name or (Path(opt.base[-1]).stem if opt.base else "run")
    logdir = Path(opt.logdir) / f"{datetime.now().strftime('%Y-%m-%dT%H-%M-%S')}_{name}"
    try:
        logdir.mkdir(parents=True, exist_ok=True)
        probe = logdir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to the log dir '{logdir}' ({e.strerror}): pass --logdir with a folder you "
                          "can write to") from None
    return logdir


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


def trainer_kwargs(config: DictConfig, opt: argparse.Namespace) -> Dict[str, Any]:
    """Lightning Trainer arguments: lightning.trainer, then --gpus and Lightning's own flags."""
    kw = dict(OmegaConf.to_container(config.get("lightning", {}).get("trainer", {}), resolve=True))
    gpus = opt.gpus if opt.gpus is not None else kw.pop("gpus", None)
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
        if getattr(opt, flag) is not None:
            kw[flag] = getattr(opt, flag)
    kw.setdefault("accelerator", "auto")
    kw.setdefault("devices", 1)
    if kw.get("precision", "auto") == "auto":
        kw["precision"] = default_precision(kw["accelerator"])
    return kw


def callbacks(config: DictConfig, logdir: Path) -> List[pl.Callback]:
    """The lightning.callbacks of the config plus checkpointing (adapters + last.ckpt) and run statistics."""
    params = OmegaConf.select(config, "lightning.modelcheckpoint.params", default=None) or {}
    params = dict(OmegaConf.to_container(OmegaConf.create(params), resolve=True))
    params.setdefault("every_n_train_steps", 500)
    params.update(dirpath=str(logdir / "checkpoints"), save_top_k=0, save_last=True, enable_version_counter=False)
    result = [AdapterCheckpoint(params["every_n_train_steps"]), TrainStats(), pl.callbacks.ModelCheckpoint(**params)]
    extra = OmegaConf.select(config, "lightning.callbacks", default=None) or {}
    return result + [instantiate_from_config(cfg) for cfg in extra.values()]


def build_trainer(config: DictConfig, opt: argparse.Namespace, logdir: Path) -> pl.Trainer:
    """A Trainer writing CSV and TensorBoard logs and atomic checkpoints under `logdir`."""
    # One CSV file per session (Lightning's CSVLogger empties an existing metrics.csv); TensorBoard appends.
    stamp = session = datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    for n in range(2, 1000):
        if not (logdir / "csv" / session).exists():
            break
        session = f"{stamp}-{n}"
    loggers = [pl.loggers.CSVLogger(str(logdir), name="csv", version=session),
               pl.loggers.TensorBoardLogger(str(logdir), name="tensorboard", version="")]
    kw = trainer_kwargs(config, opt)
    try:
        return pl.Trainer(default_root_dir=str(logdir), logger=loggers, callbacks=callbacks(config, logdir),
                          plugins=[AtomicCheckpointIO()], **kw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"lightning.trainer or a Lightning flag was rejected: {e}") from None


# ---- the run ----------------------------------------------------------------------------------------------------
def learning_rate(config: DictConfig, opt: argparse.Namespace, trainer: pl.Trainer) -> float:
    """model.base_learning_rate, scaled by batch size x devices x nodes x accumulation when --scale_lr."""
    base_lr = float(config.model.get("base_learning_rate", 1e-4))
    if not opt.scale_lr:
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


def run(opt: argparse.Namespace) -> Path:
    """Set up and (with opt.train) fit one DreamBooth run; returns its log dir."""
    resume_logdir, ckpt = resolve_resume(opt.resume) if opt.resume else (None, None)
    config = load_config(opt, resume_logdir)
    check_data_config(config)
    logdir = resume_logdir or make_logdir(opt)
    if resume_logdir and ckpt is None:
        log.warning("'%s' has no checkpoint yet: training it from step 0", logdir)
    pl.seed_everything(opt.seed, workers=True)
    # Intended here: the frozen base stays in eval mode, and data is reshuffled when a run resumes mid-epoch.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch")
    datamodule = instantiate_from_config(config.data)
    datamodule.dataset("instance")  # a bad subject folder fails here, before the base weights load
    trainer = build_trainer(config, opt, logdir)
    model = instantiate_from_config(config.model)
    model.learning_rate = learning_rate(config, opt, trainer)
    if ckpt:  # refuse a checkpoint of other adapters before config.yaml is rewritten with their config
        model.on_load_checkpoint(AtomicCheckpointIO().load_checkpoint(str(ckpt)))
    prepare_class_images(model, datamodule, trainer)
    save_config(config, logdir)
    log.info("run dir %s: %s", logdir, model.describe_trained())
    if not opt.train:
        log.info("set up only (pass -t to train)")
        return logdir
    os.environ[LOGDIR_ENV] = str(logdir)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    finally:
        os.environ.pop(LOGDIR_ENV, None)
    return logdir
