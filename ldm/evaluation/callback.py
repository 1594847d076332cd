"""The evaluation protocol during training: every N steps, sample fixed prompts from fixed seeds and log the registry's
metrics (`ldm.evaluation.metrics`; by default subject fidelity, as the adapter paper's code logged CLIP image-image
similarity), so runs can be compared by their learning curves. Wired through the config like any callback:

    lightning:
      callbacks:
        subject_fidelity:
          target: ldm.evaluation.callback.SubjectFidelity
          params: {every_n_train_steps: 100, backend: dino, weights: models/dino-vits16,
                   metrics: [subject_fidelity, prior_preservation, subject_leakage]}
"""
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch

from ldm.evaluation.backends import EvaluationError, MetricBackend, get_backend
from ldm.evaluation.metrics import CLASS, SUBJECT, Samples, check_keys, load_images, measure
from ldm.evaluation.sampling import prompt_seed_pairs, sample_images
from ldm.models.diffusion.sampling import DEFAULT_SAMPLER
from ldm.modules.adapters import adapters_enable

log = logging.getLogger(__name__)


class SubjectFidelity(pl.Callback):
    """Logs `eval/<column>` of the chosen registry metrics (default subject fidelity, `eval/<backend>_i`) every N steps.

    The subject prompts default to the subject prompt of the training data, the class prompt to the class data's;
    class-sample metrics compare the model with its adapters on and off from the same noise. Sampling uses its own
    noise (the training RNG is left alone) and runs on rank 0 only. The backend is built from local `weights` when
    training starts.
    """

    def __init__(self, every_n_train_steps: int = 100, backend: str = "dino", weights: Optional[str] = None,
                 prompts: Optional[Sequence[str]] = None, seeds: Sequence[int] = (0, 1), ddim_steps: int = 20,
                 scale: float = 7.5, sampler: str = DEFAULT_SAMPLER, log_on_start: bool = True,
                 metrics: Sequence[str] = ("subject_fidelity",), class_prompt: Optional[str] = None):
        self.every_n_train_steps, self.backend_name, self.weights = every_n_train_steps, backend, weights
        self.prompts, self.seeds, self.ddim_steps, self.scale = prompts, list(seeds), ddim_steps, scale
        self.sampler, self.log_on_start = sampler, log_on_start
        self.metrics = check_keys(list(metrics))  # an unknown name fails when the config is built
        self.class_prompt = class_prompt
        self.backend: Optional[MetricBackend] = None
        self.references: Optional[torch.Tensor] = None
        self.subject_name: Optional[str] = None
        self.size = 0
        self.history: List[Tuple[int, Dict[str, float]]] = []

    @property
    def key(self) -> str:
        """The logged name of the first metric (e.g. eval/dino_i)."""
        return f"eval/{self.metrics[0].column(self.backend_name)}"

    def setup_metric(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the backend and read the instance images (and the class prompt, when needed) once."""
        dataset = trainer.datamodule.dataset("instance")
        self.size = dataset.size
        self.prompts = list(self.prompts or dataset.prompts[:1])
        if any(m.samples == CLASS for m in self.metrics) and not self.class_prompt:
            if "reg" not in trainer.datamodule.configs:
                raise EvaluationError("class-sample metrics during training need class data (--reg_data_root) or "
                                      "the callback's class_prompt")
            self.class_prompt = trainer.datamodule.dataset("reg").prompts[0]
        self.backend = get_backend(self.backend_name, self.weights, pl_module.device)
        self.references = load_images(dataset.paths, self.size)
        self.subject_name = Path(dataset.data_root).name  # the subject rates' look

    def _draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prompts: Sequence[str]) -> torch.Tensor:
        return sample_images(pl_module, prompt_seed_pairs(prompts, self.seeds), self.size, self.ddim_steps, self.scale,
                             self.sampler, context=trainer.precision_plugin.forward_context())

    @torch.no_grad()
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Dict[str, float]:
        """{column: value} of the chosen metrics on fresh samples."""
        was_training = pl_module.training
        pl_module.eval()
        samples = Samples(references=self.references, subject_name=self.subject_name)
        try:
            if any(m.samples == SUBJECT for m in self.metrics):
                samples.subject = self._draw(trainer, pl_module, self.prompts)
                samples.texts = [p for p in self.prompts for _ in self.seeds]
            if any(m.samples == CLASS for m in self.metrics):
                samples.class_tuned = self._draw(trainer, pl_module, [self.class_prompt])
                adapters_enable(pl_module, False)
                try:
                    samples.class_base = self._draw(trainer, pl_module, [self.class_prompt])
                finally:
                    adapters_enable(pl_module, True)
        finally:
            pl_module.train(was_training)
        return measure({self.backend_name: self.backend}, samples, keys=[m.key for m in self.metrics])

    def log_metric(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or (self.history and self.history[-1][0] == trainer.global_step):
            return  # (several batches share a step under gradient accumulation)
        if self.backend is None:
            self.setup_metric(trainer, pl_module)
        values = {f"eval/{k}": v for k, v in self.measure(trainer, pl_module).items()}
        self.history.append((trainer.global_step, values))
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
        log.info("step %d: %s", trainer.global_step, ", ".join(f"{k} {v:.4f}" for k, v in values.items()))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.log_on_start and trainer.global_step == 0:
            self.log_metric(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_train_steps > 0 and step > 0 and step % self.every_n_train_steps == 0:
            self.log_metric(trainer, pl_module)
