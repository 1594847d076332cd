"""Packed training: several DreamBooth runs in one process on one frozen base model, their UNet calls in one batch.

Each run is an ordinary run (`ldm.train.run`, with its own Lightning Trainer, data, optimizer, schedule, gradient
clipping, NaN check, checkpoints and logs in its own run dir), in a thread of its own that takes turns with the
others (`ldm.train.lockstep`: each run draws from its own random state, as in a process of its own). What the runs
share: the base weights (loaded once; every run's model holds the same tensors), one "runner" UNet on those weights
that carries every run's adapters as a group acting on that run's rows of the batch (`ldm.modules.adapters.rows`),
and the caches of latents and text embeddings of runs with the same data. Each training step's UNet calls of all runs
go through the runner as one batch, and their losses through one backward pass; a run whose loss is not finite stops
alone, and a finished run leaves the pack while the others go on. Which runs can share a pack: `ldm.train.pack_plan`.
"""
import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from ldm.checks import ConfigError
from ldm.modules.adapters import AdapterGroup, Rows, is_added_key, mount_group
from ldm.train.lockstep import Lockstep
from ldm.train.pack_plan import group_runs
from ldm.train.request import RunRequest
from ldm.train.run import Hooks, run
from ldm.util.instantiate import instantiate_from_config

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 60.0


@dataclass
class UNetCall:
    """One run's UNet call of a training step, with the grad and autocast modes it was made under."""
    x: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor
    grad: bool
    autocast: Tuple[str, bool, torch.dtype]

    @classmethod
    def of(cls, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> "UNetCall":
        device = x.device.type
        return cls(x, t, context, torch.is_grad_enabled(),
                   (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)))


class PackSlot:
    """A run's seat in a pack (`model.pack_slot`): its training UNet calls and backward passes go through the pack."""

    def __init__(self, pack: "Pack", index: int):
        self.pack, self.index = pack, index
        self.rows = 0

    @property
    def size(self) -> int:
        return len(self.pack.requests)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        self.rows = x.shape[0]
        return self.pack.lockstep.sync(self.index, "forward", UNetCall.of(x, t, context), weight=self.rows)

    def backward(self, loss: torch.Tensor) -> None:
        self.pack.lockstep.sync(self.index, "backward", loss, weight=self.rows)

    def seconds(self) -> float:
        """The run's share of the pack's time so far (train_stats.json counts it)."""
        return self.pack.lockstep.seconds(self.index)


class LeavePack(pl.Callback):
    """When its training ends (or fails), a run hands the shared base weights back before Lightning's teardown moves
    its model to the CPU, which would move them away from the runs that go on."""

    def __init__(self, pack: "Pack", index: int):
        self.pack, self.index = pack, index

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.pack.leave(self.index, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.pack.leave(self.index, pl_module)


class Member(Hooks):
    """The hooks of a run in a pack: its model is built on the shared base and joins the runner."""
    progress_bar = False  # one bar per run, all in one terminal, would only garble; the pack logs its progress

    def __init__(self, pack: "Pack", index: int):
        self.pack, self.index = pack, index

    def build_model(self, config: DictConfig) -> pl.LightningModule:
        return self.pack.build_model(self.index, config)

    def joined(self, model: pl.LightningModule, trainer: pl.Trainer) -> None:
        self.pack.join(self.index, model, trainer)


class Pack:
    """Runs of one base model (checked by `ldm.train.pack_plan`) trained together; `train()` runs them."""

    def __init__(self, requests: Sequence[RunRequest]):
        self.requests = list(requests)
        self.lockstep = Lockstep(len(self.requests), {"forward": self._forward, "backward": self._backward})
        self.owner: Optional[pl.LightningModule] = None  # the first model built: it loaded the base weights
        self.runner: Optional[torch.nn.Module] = None
        self.groups: Dict[int, List[AdapterGroup]] = {}
        self.caches: Dict[Tuple[str, str], dict] = {}
        self.data: Dict[int, str] = {}  # each run's data config: runs with the same data share cached latents
        self.last_log = time.monotonic()

    def train(self) -> List[Tuple[Optional[Path], Optional[BaseException]]]:
        """Train every run; per run (its log dir, None) or (None, the error it stopped with)."""
        log.info("training %d runs as one pack", len(self.requests))
        return self.lockstep.run([lambda r=r, i=i: run(r, Member(self, i)) for i, r in enumerate(self.requests)])

    # ---- the shared base ------------------------------------------------------------------------------------------
    def build_model(self, index: int, config: DictConfig) -> pl.LightningModule:
        """The run's model: the first one loads the base weights; the others are built alike (so their adapters
        start from the random state their own process would have) and take the first one's base tensors."""
        self.data[index] = OmegaConf.to_yaml(OmegaConf.masked_copy(config.data.params, ["train", "reg"]))
        if self.owner is None:
            self.owner = instantiate_from_config(config.model)
            self.runner = runner_unet(config, self.owner)
            return self.owner
        model_config = copy.deepcopy(config.model)
        model_config.params.pop("ckpt_path", None)
        model = instantiate_from_config(model_config)
        share_base(self.owner, model)
        return model

    def join(self, index: int, model: pl.LightningModule, trainer: pl.Trainer) -> None:
        """Seat the run: its training calls go through the pack, its UNet adapters act on its rows of the runner,
        and it shares the caches of runs with the same data."""
        model.pack_slot = PackSlot(self, index)
        groups = mount_group(model.unet, self.runner, "default", f"run{index}")
        for group in groups:
            group.rows = Rows(0, 0)  # no rows until its first round
            if draws_random(group):  # e.g. LoRA dropout: drawn from the run's own random state
                group.random = lambda i=index: self.lockstep.own_random(i)
        self.groups[index] = groups
        model._moments = self.caches.setdefault(("moments", self.data[index]), {})
        if not model.text_encoder_trains:  # a frozen text encoder: one embedding per caption for every run
            model._contexts = self.caches.setdefault(("contexts", ""), {})
        trainer.callbacks.append(LeavePack(self, index))

    def leave(self, index: int, model: pl.LightningModule) -> None:
        """The run is done: its groups get no rows, and its model drops the shared base tensors."""
        for group in self.groups.get(index, []):
            group.rows = Rows(0, 0)
        model.pack_slot = None
        shared = {id(t) for k, t in self.owner.state_dict(keep_vars=True).items() if not is_added_key(k)}
        for module in model.modules():
            for name, p in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if id(p) in shared:
                    empty = torch.empty(0, dtype=p.dtype)
                    setattr(module, name, torch.nn.Parameter(empty, requires_grad=False)
                            if isinstance(p, torch.nn.Parameter) else empty)

    # ---- rounds ---------------------------------------------------------------------------------------------------
    def _forward(self, calls: List[Tuple[int, UNetCall]]) -> List[torch.Tensor]:
        """One UNet call for every run's rows: each run's adapters act on its own rows."""
        first = calls[0][1]
        if any((c.grad, c.autocast) != (first.grad, first.autocast) for _, c in calls):
            raise ConfigError("the runs of a pack must train under one precision")
        sizes, offset = [c.x.shape[0] for _, c in calls], 0
        for groups in self.groups.values():
            for group in groups:
                group.rows = Rows(0, 0)
        for (i, _), n in zip(calls, sizes):
            for group in self.groups[i]:
                group.rows = Rows(offset, offset + n)
            offset += n
        device, enabled, dtype = first.autocast
        with torch.set_grad_enabled(first.grad), torch.autocast(device, dtype=dtype, enabled=enabled):
            out = self.runner(torch.cat([c.x for _, c in calls]), torch.cat([c.t for _, c in calls]),
                              context=torch.cat([c.context for _, c in calls]))
        self._progress(len(calls), offset)
        return list(out.split(sizes))

    @staticmethod
    def _backward(calls: List[Tuple[int, torch.Tensor]]) -> List[None]:
        """One backward pass for every run's loss (each run's adapters get the gradient of its own loss)."""
        torch.autograd.backward([loss for _, loss in calls])
        return [None] * len(calls)

    def _progress(self, runs: int, rows: int) -> None:
        if time.monotonic() - self.last_log > PROGRESS_EVERY_S:
            self.last_log = time.monotonic()
            log.info("pack: step %d, %d of %d runs training (%d rows a step)", self.lockstep.rounds_done // 2 + 1,
                     runs, len(self.requests), rows)


def runner_unet(config: DictConfig, owner: pl.LightningModule) -> torch.nn.Module:
    """The UNet of `config` without adapters, on the owner's base tensors (built on the meta device: no memory)."""
    unet_config = copy.deepcopy(config.model.params.unet_config)
    unet_config.params.pop("adapter_config", None)
    with torch.device("meta"):
        runner = instantiate_from_config(unet_config)
    state = {k: v for k, v in owner.unet.state_dict(keep_vars=True).items() if not is_added_key(k)}
    runner.load_state_dict(state, strict=True, assign=True)
    runner.set_gradient_checkpointing(bool(OmegaConf.select(config, "model.params.gradient_checkpointing")))
    return runner.eval()


def share_base(owner: torch.nn.Module, model: torch.nn.Module) -> None:
    """Make `model` hold `owner`'s base tensors (parameters and buffers, not the adapters): one copy in memory."""
    shared = {k: v for k, v in owner.state_dict(keep_vars=True).items() if not is_added_key(k)}
    missing, unexpected = model.load_state_dict(shared, strict=False, assign=True)
    bad = [k for k in missing if not is_added_key(k)] + list(unexpected)
    if bad:
        raise ConfigError(f"the runs of a pack must have one base model; this run's differs at {bad[0]}")


def draws_random(group: AdapterGroup) -> bool:
    """Whether the group's adapters draw random numbers when training (dropout)."""
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in group.modules())


def train_runs(requests: Sequence[RunRequest], size: Optional[int] = None
               ) -> List[Tuple[Optional[Path], Optional[BaseException]]]:
    """Train the runs, those that can share in packs of up to `size` (`ldm.train.pack_plan`), the others alone; per
    run, in order, (its log dir, None) or (None, the error it stopped with)."""
    results: List[Tuple[Optional[Path], Optional[BaseException]]] = [(None, None)] * len(requests)
    for group in group_runs(requests, size):
        if len(group) == 1:
            try:
                results[group[0]] = (run(requests[group[0]]), None)
            except Exception as e:  # noqa: BLE001: one run's failure does not stop the others
                results[group[0]] = (None, e)
            continue
        for i, result in zip(group, Pack([requests[i] for i in group]).train()):
            results[i] = result
    return results
