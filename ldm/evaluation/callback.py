"""Subject fidelity during training: every N steps, sample fixed prompts from fixed seeds and log their similarity to
the instance images (as the adapter paper's code logged CLIP image-image similarity), so runs can be compared by their
learning curves. Wired through the config like any callback:

    lightning:
      callbacks:
        subject_fidelity:
          target: ldm.evaluation.callback.SubjectFidelity
          params: {every_n_train_steps: 100, backend: dino, weights: models/dino-vits16}
"""
import logging
from typing import Any, List, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch

from ldm.evaluation.backends import MetricBackend, get_backend
from ldm.evaluation.metrics import load_images, subject_fidelity
from ldm.evaluation.sampling import prompt_seed_pairs, sample_images
from ldm.evaluation.table import SUBJECT, metric_column

log = logging.getLogger(__name__)


class SubjectFidelity(pl.Callback):
    """Logs `eval/<backend>_i`, the mean cosine similarity of fixed-seed samples to the instance images, every N steps.

    The prompts default to the subject prompt of the training data; sampling uses its own noise (the training RNG is
    left alone) and runs on rank 0 only. The backend is built from local `weights` when training starts.
    """

    def __init__(self, every_n_train_steps: int = 100, backend: str = "dino", weights: Optional[str] = None,
                 prompts: Optional[Sequence[str]] = None, seeds: Sequence[int] = (0, 1), ddim_steps: int = 20,
                 scale: float = 7.5, sampler: str = "ddim", log_on_start: bool = True):
        self.every_n_train_steps, self.backend_name, self.weights = every_n_train_steps, backend, weights
        self.prompts, self.seeds, self.ddim_steps, self.scale = prompts, list(seeds), ddim_steps, scale
        self.sampler, self.log_on_start = sampler, log_on_start
        self.backend: Optional[MetricBackend] = None
        self.references: Optional[torch.Tensor] = None
        self.size = 0
        self.history: List[Tuple[int, float]] = []

    @property
    def key(self) -> str:
        return f"eval/{metric_column(self.backend_name, SUBJECT)}"

    def setup_metric(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the backend and read the instance images once."""
        dataset = trainer.datamodule.dataset("instance")
        self.size = dataset.size
        self.prompts = list(self.prompts or dataset.prompts[:1])
        self.backend = get_backend(self.backend_name, self.weights, pl_module.device)
        self.references = load_images(dataset.paths, self.size)

    @torch.no_grad()
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        was_training = pl_module.training
        pl_module.eval()
        try:
            pairs = prompt_seed_pairs(self.prompts, self.seeds)
            images = sample_images(pl_module, pairs, self.size, self.ddim_steps, self.scale, self.sampler,
                                   context=trainer.precision_plugin.forward_context())
        finally:
            pl_module.train(was_training)
        return subject_fidelity(self.backend, images, self.references)

    def log_metric(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or (self.history and self.history[-1][0] == trainer.global_step):
            return  # (several batches share a step under gradient accumulation)
        if self.backend is None:
            self.setup_metric(trainer, pl_module)
        value = self.measure(trainer, pl_module)
        self.history.append((trainer.global_step, value))
        for logger in trainer.loggers:
            logger.log_metrics({self.key: value}, step=trainer.global_step)
        log.info("step %d: %s %.4f", trainer.global_step, self.key, value)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.log_on_start and trainer.global_step == 0:
            self.log_metric(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_train_steps > 0 and step > 0 and step % self.every_n_train_steps == 0:
            self.log_metric(trainer, pl_module)
