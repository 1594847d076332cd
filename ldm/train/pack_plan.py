"""Which runs can share a pack, and how many fit in memory.

Runs share a pack when they share everything their UNet calls have in common: the base model (weights file and
network config), the image sizes, the precision and device, and the options that act on the whole UNet. Each run may
differ in its adapters (any form and position), learning rate, reg_weight, steps, batch size, seed and data. A run
that fine-tunes the whole UNet, trains on several devices, compiles its UNet or draws adapter dropout under gradient
checkpointing trains alone; the reason is logged.
"""
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.checkpoint import CheckpointError
from ldm.config import ADAPTER_CONFIGS, pop_adapter_configs
from ldm.data.dreambooth import DataError
from ldm.modules.adapters import AdapterConfigError, adapter_parameters
from ldm.train.request import RunRequest
from ldm.train.run import load_config, resolve_resume, trainer_kwargs
from ldm.util.devices import pick_device
from ldm.util.instantiate import instantiate_from_config

log = logging.getLogger(__name__)

# model.params that each run of a pack may set for itself (the optimiser, the loss, its adapters, its caching)
PER_RUN = ("ckpt_path", "reg_weight", "text_encoder_lr", "lr_warmup_steps", "adam_betas", "adam_weight_decay",
           "adam_epsilon", "use_8bit_adam", "cache_latents", "train_level")
MEMORY_SHARE = 0.6  # of the memory at hand, for --pack auto: activations are estimated, allocators fragment


def describe(request: RunRequest) -> str:
    """A run's name for messages: its run dir, its name, or its last config."""
    return request.resume or request.name or (Path(request.base[-1]).stem if request.base else "run")


def run_config(request: RunRequest) -> DictConfig:
    """The merged config the run would train with (its saved config.yaml when it resumes)."""
    resume_logdir = resolve_resume(request.resume)[0] if request.resume else None
    return load_config(request, resume_logdir)


def pack_key(request: RunRequest) -> Tuple[Optional[Dict[str, Any]], str]:
    """(what a pack's runs must share, "") or (None, why the run trains alone)."""
    try:
        config = run_config(request)
        trainer = trainer_kwargs(config, request)
    except (ValueError, CheckpointError, DataError) as e:
        return None, f"its config cannot be read here ({e}); it reports that alone"
    params = config.model.get("params", {})
    if "unet" in (params.get("train_level") or ()):
        return None, "it fine-tunes the whole UNet (train_level unet): its UNet weights are its own"
    if params.get("compile"):
        return None, "it compiles its UNet (model.params.compile): a compiled UNet serves one run"
    devices = trainer.get("devices", 1)
    several = (isinstance(devices, (list, tuple)) and len(devices) > 1) or devices in (-1, "-1", "auto") or \
        (isinstance(devices, int) and devices > 1) or int(trainer.get("num_nodes", 1) or 1) > 1
    if several:
        return None, "it trains on several devices (DDP): a pack runs on one device"
    if params.get("gradient_checkpointing") and adapter_dropout(config):
        return None, "its adapters draw dropout under gradient checkpointing (recomputed steps would draw anew)"
    network = OmegaConf.create({"model": OmegaConf.to_container(config.model, resolve=True)})
    pop_adapter_configs(network)  # each run's adapters are its own
    network.model.pop("base_learning_rate", None)
    for key in PER_RUN:
        network.model.get("params", {}).pop(key, None)
    sizes = [OmegaConf.select(config, f"data.params.{p}.params.size") for p in ("train", "reg")]
    return {"base weights": str(Path(str(params.get("ckpt_path"))).resolve()), "model": OmegaConf.to_yaml(network),
            "image size": sizes, "precision": str(trainer.get("precision")),
            "device": (str(trainer.get("accelerator")), str(devices)), "allow_any_target": request.allow_any_target}, ""


def adapter_dropout(config: DictConfig) -> bool:
    """Whether an adapter entry of the config has dropout > 0."""
    for path in ADAPTER_CONFIGS.values():
        adapters = OmegaConf.select(config, path)
        for section in (OmegaConf.to_container(adapters, resolve=True) if adapters is not None else {}).values():
            entries = [section] if isinstance(section, dict) else section or []
            if any(float(e.get("dropout", 0) or 0) > 0 for e in entries):
                return True
    return False


def group_runs(requests: Sequence[RunRequest], size: Optional[int] = None) -> List[List[int]]:
    """The runs (indices) grouped into packs of up to `size` (None: all that can share), in order; a run that cannot
    share is a group of its own, and the reason is logged."""
    keys, packs, alone = [], [], []
    for i, request in enumerate(requests):
        key, reason = pack_key(request)
        if key is None:
            log.info("%s trains alone: %s", describe(request), reason)
            alone.append([i])
            continue
        for k, members in keys:
            if k == key and (size is None or len(members) < size):
                members.append(i)
                break
        else:
            if keys and not any(k == key for k, _ in keys):
                differ = [name for name in key if key[name] != keys[0][0][name]]
                log.info("%s goes into another pack than %s: another %s", describe(request),
                         describe(requests[keys[0][1][0]]), " and ".join(differ))
            keys.append((key, [i]))
            packs.append(keys[-1][1])
    return sorted(packs + alone, key=lambda g: g[0])


# ---- how many fit ---------------------------------------------------------------------------------------------------
def available_memory(device: torch.device) -> int:
    """Bytes free for new allocations: on a GPU what CUDA reports free, on the CPU the kernel's MemAvailable."""
    if device.type != "cpu":  # pick_device: CUDA or the CPU
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def memory_per_run(config: DictConfig) -> int:
    """Bytes one run adds to a pack: the activations its rows keep for the backward pass (measured on the meta
    device: shapes without memory) and its adapters' weights, gradients and two Adam moments."""
    model_config = OmegaConf.create(OmegaConf.to_container(config.model, resolve=True))
    model_config.params.pop("ckpt_path", None)
    with torch.device("meta"):
        model = instantiate_from_config(model_config)
    data = config.data.params
    rows = int(data.batch_size) * (2 if "reg" in data and float(model_config.params.get("reg_weight", 1)) > 0 else 1)
    size = int(OmegaConf.select(data, "train.params.size", default=512))
    x = torch.zeros(rows, *model.latent_shape(size, size), device="meta")
    context = torch.zeros(rows, 77, model.unet.context_dim, device="meta")
    saved = [0]

    def keep(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = model.unet(x, torch.zeros(rows, dtype=torch.long, device="meta"), context=context)
    adapters = sum(p.numel() * p.element_size() for p in adapter_parameters(model))
    return saved[0] + 2 * out.numel() * out.element_size() + 4 * adapters


def pack_capacity(request: RunRequest, device: Optional[torch.device] = None) -> int:
    """How many runs like `request` fit in one pack in the memory at hand (--pack auto), at least 1."""
    try:
        config = run_config(request)
        per_run = memory_per_run(config)
    except (ValueError, CheckpointError, DataError, AdapterConfigError, RuntimeError) as e:
        log.warning("%s: cannot estimate its memory (%s): it trains alone", describe(request), e)
        return 1
    device = device or pick_device()
    free = available_memory(device)
    fits = max(1, int(MEMORY_SHARE * free / max(per_run, 1)))
    log.info("--pack auto: %.0f MiB per run, %.0f MiB free on %s: up to %d runs a pack", per_run / 2 ** 20,
             free / 2 ** 20, device, fits)
    return fits
