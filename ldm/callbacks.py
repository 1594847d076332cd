"""Lightning callbacks and plugins of the training runs: sample grids, adapter directories, atomic checkpoints, stats,
fp16 mixed precision on every device, and a clean stop on Ctrl-C / SIGTERM."""
import json
import logging
import resource
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.plugins.precision import MixedPrecision, Precision

from ldm.checkpoint import atomic_write, check_finite, read_training_checkpoint, training_tensors
from ldm.models.diffusion.sampling import DEFAULT_SAMPLER, sampler_name, seed_noise, text_to_image
from ldm.modules.adapters import adapter_groups, save_adapter_to_dir
from ldm.rundir import describe_kept, resume_command
from ldm.util.images import image_grid, to_pil

log = logging.getLogger(__name__)

# Lightning lines that say nothing about this run: an advert, and a default being applied that our callbacks set
LIGHTNING_NOISE = ("💡 Tip:", "`weights_only` was not set")
LIGHTNING_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(LIGHTNING_NOISE)


def quiet_lightning() -> None:
    """Drop LIGHTNING_NOISE from the log (Lightning's loggers and their handlers: records of its child loggers
    reach those handlers without passing the parents' filters), and Lightning's warning about torch's own pytree API
    (LIGHTNING_WARNINGS: nothing a user can act on). Idempotent."""
    for message in LIGHTNING_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning_utilities", ""):
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):
            if not any(isinstance(f, _DropNoise) for f in target.filters):
                target.addFilter(_DropNoise())


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file and renamed into place, and loaded without pickled code."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: str, storage_options: Optional[Any] = None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        check_finite(training_tensors(checkpoint), f"'{path}'", writing=True)
        atomic_write(str(path), lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, path: str, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> Dict[str, Any]:
        return read_training_checkpoint(path)  # on the CPU; Lightning moves the states where they belong


FP16_MIXED = ("16-mixed", "16")  # Lightning's names of fp16 autocast + GradScaler ("16" is its old alias)


def _runs_on_cpu(accelerator: Any) -> bool:
    """Whether Lightning will run on the CPU for this accelerator flag ('auto' picks an accelerator it finds)."""
    if str(accelerator) == "auto":
        found = (pl.accelerators.CUDAAccelerator, pl.accelerators.MPSAccelerator, pl.accelerators.XLAAccelerator)
        return not any(a.is_available() for a in found)
    return str(accelerator) == "cpu"


def precision_plugins(trainer_kw: Dict[str, Any]) -> Tuple[Dict[str, Any], List[Precision]]:
    """Trainer arguments and precision plugins in which 16-mixed means fp16 autocast with a GradScaler on every device.

    Lightning swaps 16-mixed for bf16-mixed on the CPU; torch's CPU autocast runs float16 and `torch.amp.GradScaler`
    scales on the CPU, so there the same plugin Lightning builds for a GPU is built for the CPU instead: CI then runs
    the fp16 path of GPUs without bf16 (scaled loss, unscaled gradients, steps skipped on inf/NaN). Other precisions
    and devices are left to Lightning."""
    if str(trainer_kw.get("precision")) not in FP16_MIXED or not _runs_on_cpu(trainer_kw.get("accelerator", "auto")):
        return trainer_kw, []
    return {k: v for k, v in trainer_kw.items() if k != "precision"}, [MixedPrecision("16-mixed", "cpu")]


def _every(step: int, frequency: int) -> bool:
    return frequency > 0 and step > 0 and step % frequency == 0


class AdapterCheckpoint(pl.Callback):
    """Writes the trained adapters to checkpoints/<step>-adapters every N steps and at the end (as the paper's code).

    <step> is the index of the last step taken, counted from 0: after 1000 steps the folder is 999-adapters. A group
    on the UNet and the text encoder goes into one directory (`ldm.modules.adapters.io`); other groups than "default"
    into <step>-adapters-<group>.
    """

    def __init__(self, every_n_train_steps: int = 500, dirpath: Optional[str] = None):
        self.every_n_train_steps, self.dirpath = every_n_train_steps, dirpath
        self.saved_step = -1

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step == self.saved_step or step == 0:
            return
        self.saved_step = step
        if not trainer.is_global_zero:
            return
        root = Path(self.dirpath or Path(trainer.default_root_dir) / "checkpoints")
        for name in adapter_groups(pl_module):
            suffix = "adapters" if name == "default" else f"adapters-{name}"
            save_adapter_to_dir(pl_module, str(root / f"{step - 1}-{suffix}"), name)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # The last step's adapters are written here too, before Lightning's last.ckpt of that step (checkpoint
        # callbacks run last): a last.ckpt at the final step means the final adapter directory is complete.
        if _every(trainer.global_step, self.every_n_train_steps) or trainer.global_step == trainer.max_steps:
            self._save(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module)


class RunCheckpoint(pl.callbacks.ModelCheckpoint):
    """Lightning's last.ckpt every N steps, and also at the run's final step, which Lightning skips when max_steps is
    not a multiple of N (a finished run would look unfinished and train its last steps again when resumed). Written
    after that step's adapter directory (checkpoint callbacks run last)."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        if trainer.global_step == trainer.max_steps:
            self._save_last(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Training that ends before max_steps (stopped by a signal, StopOnSignal, or by max_epochs) keeps its last step
        # too, after that step's adapter directory (AdapterCheckpoint.on_train_end runs first).
        self._save_last(trainer)

    def _save_last(self, trainer: pl.Trainer) -> None:
        saved = getattr(self, "_last_global_step_saved", -1)  # Lightning's own record of the step it saved
        if trainer.global_step > 0 and saved != trainer.global_step:
            trainer.save_checkpoint(str(Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"),
                                    weights_only=False)  # a full checkpoint, to resume from (and no log line)
            self._last_global_step_saved = trainer.global_step


class TrainingInterrupted(Exception):
    """Training stopped by a signal, its last step written; `exit_code` is the shell's 128 + signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopOnSignal(pl.Callback):
    """Ctrl-C (SIGINT) or SIGTERM during training finishes the step in progress and stops training, so its end writes
    that step's adapter directory and last.ckpt as usual (atomically, `RunCheckpoint.on_train_end`); the caller then
    raises `TrainingInterrupted` (`raise_if_stopped`). A second signal acts at once (SIGINT: KeyboardInterrupt; SIGTERM:
    the default, end the process); the temporary file of a write it cuts is removed then, or at the next session.
    Handlers are installed in the main thread of one process only (not under DDP)."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.received: Optional[int] = None  # the signal, once one came
        self.stopped_at: Optional[int] = None  # the step training stopped after
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        log.warning("%s: stopping after the step in progress, then writing last.ckpt (send it again to stop at once)",
                    signal.Signals(signum).name)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1 or threading.current_thread() is not threading.main_thread():
            return
        for name in self.SIGNALS:
            signum = getattr(signal, name, None)
            if signum is not None:
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._handle)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        finished = 0 < trainer.max_steps <= trainer.global_step  # a signal in the final step: the run ends as usual
        if self.received is not None and self.stopped_at is None and not finished:
            trainer.should_stop = True
            self.stopped_at = trainer.global_step

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()
        if isinstance(exception, KeyboardInterrupt) and self.received is not None:  # a second signal
            log.warning("stopped at once by a second signal: %s; resume with: %s",
                        describe_kept(Path(trainer.default_root_dir)), resume_command(Path(trainer.default_root_dir)))

    def raise_if_stopped(self, resume: str) -> None:
        """TrainingInterrupted naming the signal, the step and the command `resume` that continues the run, when a
        signal stopped training."""
        if self.stopped_at is not None:
            raise TrainingInterrupted(f"training stopped by {signal.Signals(self.received).name} after step "
                                      f"{self.stopped_at}: its last.ckpt and adapter directory are written; resume "
                                      f"with: {resume}", self.received)


class ImageLogger(pl.Callback):
    """Samples fixed prompts from fixed noise every N steps into images/step-NNNNNN.png, so the subject can be watched.

    The default prompts are the subject prompt and the class prompt of the training data (a caption dataset's first
    caption). Sampling uses its own generator (the training RNG is left alone) and `sampler` (a name of
    `ldm.models.diffusion.sampling.SAMPLERS`, DDIM by default). The grid has one row per prompt.
    """

    # keys of the original CompVis ImageLogger, accepted and unused; the numbers checked before training starts
    _IGNORED = ("clamp", "increase_log_steps", "rescale", "log_on_batch_idx", "log_first_step", "log_images_kwargs")
    PARAM_RANGES = {"batch_frequency": dict(low=0, integer=True), "max_images": dict(low=1, integer=True),
                    "ddim_steps": dict(low=1, integer=True), "scale": dict(low=0), "seed": dict(low=0, integer=True)}

    def __init__(self, batch_frequency: int = 500, max_images: int = 8, prompts: Optional[Sequence[str]] = None,
                 seed: int = 42, ddim_steps: int = 50, scale: float = 7.0, log_on_start: bool = True,
                 disabled: bool = False, sampler: str = DEFAULT_SAMPLER, **unused: Any):
        if unused:
            log.info("ImageLogger ignores %s", ", ".join(sorted(unused)))
        self.batch_frequency, self.max_images, self.prompts = batch_frequency, max_images, prompts
        self.seed, self.ddim_steps, self.scale = seed, ddim_steps, scale
        self.log_on_start, self.disabled = log_on_start, disabled
        self.sampler = sampler_name(sampler)  # a misspelt name fails when the callback is built, not at step 0

    def _prompts(self, trainer: pl.Trainer) -> List[str]:
        if self.prompts:
            return list(self.prompts)
        datasets = getattr(trainer.datamodule, "datasets", {})
        return [datasets[k].prompts[0] for k in ("instance", "reg") if k in datasets]

    def _size(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        dataset = getattr(trainer.datamodule, "datasets", {}).get("instance")
        return getattr(dataset, "size", pl_module.pixel_size)

    @torch.no_grad()
    def sample(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.Tensor:
        """(len(prompts) * n, 3, H, W) images in [-1, 1], n = max_images // len(prompts) per prompt."""
        prompts = self._prompts(trainer)
        n = max(1, self.max_images // max(1, len(prompts)))
        size = self._size(trainer, pl_module)
        x_T = seed_noise(self.seed, (n, *pl_module.latent_shape(size, size))).repeat(len(prompts), 1, 1, 1)
        texts = [p for p in prompts for _ in range(n)]
        with trainer.precision_plugin.forward_context():
            images = text_to_image(pl_module, texts, x_T, sampler=self.sampler, steps=self.ddim_steps,
                                   scale=self.scale)
        return images.float().cpu()

    def log_images(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.disabled or not trainer.is_global_zero:
            return
        prompts = self._prompts(trainer)
        images = self.sample(trainer, pl_module)
        n = images.shape[0] // max(1, len(prompts))
        path = Path(trainer.default_root_dir) / "images" / f"step-{trainer.global_step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid = image_grid(to_pil(images), n)
        atomic_write(str(path), lambda tmp: grid.save(tmp, format="PNG"))
        for logger in trainer.loggers:
            if isinstance(logger, pl.loggers.TensorBoardLogger):
                logger.experiment.add_image("samples", np.asarray(grid), trainer.global_step, dataformats="HWC")
        log.info("step %d: samples of %s in %s", trainer.global_step, prompts, path)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.log_on_start and trainer.global_step == 0:
            self.log_images(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if _every(trainer.global_step, self.batch_frequency):
            self.log_images(trainer, pl_module)


def _on_gpu(module: torch.nn.Module) -> bool:
    return next(module.parameters()).is_cuda


class TrainStats(pl.Callback):
    """Steps, time and peak memory of the run over all its sessions, in train_stats.json.

    The sessions so far travel in each checkpoint (this callback's state), so a resumed run adds its session to those
    that reached the checkpoint it resumes from: a 240-step run killed after its checkpoint at step 235 and resumed
    reports 240 steps, the time of both sessions (the steps a kill loses are redone, and counted once) and the steps
    per second over all of them. train_stats.json is rewritten with every checkpoint and at the end.
    """

    def __init__(self) -> None:
        self.sessions: List[Dict[str, Any]] = []  # the earlier sessions, restored from the checkpoint
        self.start, self.first_step, self.step, self.device = 0.0, 0, 0, "cpu"
        self.gpu, self.trained, self.started = False, 0, False
        self.clock, self.pack_size = time.perf_counter, 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.gpu = _on_gpu(pl_module)
        if self.gpu:
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        slot = getattr(pl_module, "pack_slot", None)  # a run in a pack (ldm.train.pack) counts its share of the time
        self.clock, self.pack_size = (slot.seconds, slot.size) if slot is not None else (time.perf_counter, 0)
        self.start, self.first_step, self.started = self.clock(), trainer.global_step, True
        self.step, self.device = trainer.global_step, str(pl_module.device)
        self.trained = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.step = trainer.global_step

    def session(self) -> Dict[str, Any]:
        """This session so far."""
        seconds = self.clock() - self.start
        record = {"start_step": self.first_step, "end_step": self.step, "steps": self.step - self.first_step,
                  "seconds": round(seconds, 3), "device": self.device,
                  "peak_host_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        if self.pack_size:
            record["pack_size"] = self.pack_size
        if self.gpu:
            record["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return record

    def state_dict(self) -> Dict[str, Any]:
        return {"sessions": self.sessions + [self.session()]} if self.started else {"sessions": self.sessions}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.sessions = [s for s in state_dict.get("sessions", []) if s.get("steps", 0) > 0]

    def stats(self) -> Dict[str, Any]:
        """The run's totals (steps, seconds, steps_per_second, peaks) and its sessions."""
        sessions = self.sessions + [self.session()]
        steps, seconds = sum(s["steps"] for s in sessions), sum(s["seconds"] for s in sessions)
        stats = {"steps": steps, "seconds": round(seconds, 3),
                 "steps_per_second": round(steps / max(seconds, 1e-9), 4), "trained_parameters": self.trained,
                 "device": self.device}
        for key in ("peak_gpu_memory_bytes", "peak_host_memory_bytes"):
            if any(key in s for s in sessions):
                stats[key] = max(s.get(key, 0) for s in sessions)
        return {**stats, "sessions": sessions}

    def write(self, trainer: pl.Trainer) -> Dict[str, Any]:
        stats = self.stats()
        if trainer.is_global_zero:
            path = Path(trainer.default_root_dir) / "train_stats.json"
            atomic_write(str(path), lambda tmp: Path(tmp).write_text(json.dumps(stats, indent=2) + "\n"))
        return stats

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: Dict[str, Any]
                           ) -> None:
        self.write(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stats = self.write(trainer)
        session = stats["sessions"][-1]
        log.info("trained %d steps in %.1f s (%.2f it/s)%s; the run: %d steps in %d session(s), %.1f s",
                 session["steps"], session["seconds"], session["steps"] / max(session["seconds"], 1e-9),
                 f"; peak GPU memory {session['peak_gpu_memory_bytes'] / 2**30:.2f} GiB"
                 if "peak_gpu_memory_bytes" in session else "", stats["steps"], len(stats["sessions"]),
                 stats["seconds"])


class StepProgressBar(TQDMProgressBar):
    """Lightning's progress bar counting optimiser steps of the whole run: '115/240' after a resume at step 100 (not
    the batches of the current epoch, nor 'Epoch 3/-2' when training is bounded by steps)."""

    def on_train_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_start(trainer, *args)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.initial = 0
        bar.n = trainer.global_step  # a resumed run counts on from its checkpoint
        bar.set_description("steps")

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        pass  # one bar for the whole run, not one per epoch (Lightning skips this hook when resuming at an epoch's end)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the CSV session's name, not a number
        return metrics

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        bar, n = self.train_progress_bar, trainer.global_step
        if bar is not None and self._should_update(n, bar.total) and not bar.disable:
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()
