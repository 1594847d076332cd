"""Lightning callbacks and plugins of the training runs: sample grids, adapter directories, atomic checkpoints, stats."""
import json
import logging
import resource
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from ldm.checkpoint import atomic_write
from ldm.models.diffusion.sampling import sampler_name, seed_noise, text_to_image
from ldm.modules.adapters import adapter_groups, save_adapter_to_dir
from ldm.util import image_grid, to_pil

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file and renamed into place, and loaded without pickled code."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: str, storage_options: Optional[Any] = None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(str(path), lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, path: str, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> Dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


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
        if _every(trainer.global_step, self.every_n_train_steps):
            self._save(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module)


class ImageLogger(pl.Callback):
    """Samples fixed prompts from fixed noise every N steps into images/step-NNNNNN.png, so the subject can be watched.

    The default prompts are the subject prompt and the class prompt of the training data (a caption dataset's first
    caption). Sampling uses its own generator (the training RNG is left alone) and `sampler` (a name of
    `ldm.models.diffusion.sampling.SAMPLERS`, DDIM by default). The grid has one row per prompt.
    """

    def __init__(self, batch_frequency: int = 500, max_images: int = 8, prompts: Optional[Sequence[str]] = None,
                 seed: int = 42, ddim_steps: int = 50, scale: float = 7.0, log_on_start: bool = True,
                 disabled: bool = False, sampler: str = "ddim", **unused: Any):
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
    """Steps per second and peak memory of the run, logged at the end and written to train_stats.json."""

    def __init__(self) -> None:
        self.start, self.first_step, self.steps = 0.0, 0, 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _on_gpu(pl_module):
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self.start, self.first_step = time.perf_counter(), trainer.global_step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = time.perf_counter() - self.start
        steps = trainer.global_step - self.first_step
        stats = {"steps": steps, "seconds": round(seconds, 3), "steps_per_second": round(steps / max(seconds, 1e-9), 4),
                 "trained_parameters": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
                 "device": str(pl_module.device)}
        if _on_gpu(pl_module):
            stats["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(pl_module.device)
        stats["peak_host_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if trainer.is_global_zero:
            path = Path(trainer.default_root_dir) / "train_stats.json"
            atomic_write(str(path), lambda tmp: Path(tmp).write_text(json.dumps(stats, indent=2) + "\n"))
            log.info("trained %d steps in %.1f s (%.2f it/s)%s", steps, seconds, stats["steps_per_second"],
                     f"; peak GPU memory {stats['peak_gpu_memory_bytes'] / 2**30:.2f} GiB"
                     if "peak_gpu_memory_bytes" in stats else "")
