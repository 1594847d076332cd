"""Packed evaluation: the samples of several runs of one base model drawn in shared batches.

The base model is loaded once and each run's adapters are loaded into it as a group that acts on that run's rows of
a batch (`ldm.modules.adapters.rows`; classifier-free guidance doubles the batch, the rows repeat). Every image is
drawn from its seed's noise as `sample_images` draws it alone, and every row is computed as its run computes it alone,
so the images are the unpacked ones (up to float rounding: tests/test_pack_eval.py). The class prompt's images by the
base model (prior preservation) are drawn once per prompt for the whole pack. `PackedDraws` hands each run's samples
to `ldm.evaluation.evaluate.evaluate_runs`.
"""
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.checkpoint import CheckpointError
from ldm.config import pop_adapter_configs
from ldm.data.dreambooth import format_prompt
from ldm.evaluation.evaluate import (Drawn, EvalSettings, adapter_dir, adapter_size, image_size, prompts_for,
                                     run_config, subject_fields, trains_unet)
from ldm.evaluation.sampling import prompt_seed_pairs, sample_images
from ldm.modules.adapters import Rows, adapter_carriers, load_adapter_from_dir, remove_adapters
from ldm.util.instantiate import load_model_from_config

log = logging.getLogger(__name__)
Pairs = List[Tuple[str, int]]


def pack_key(config: DictConfig) -> Optional[str]:
    """What runs sampled in one batch must share (base model and image size); None for a run that fine-tuned the
    whole UNet (its UNet is its own)."""
    if trains_unet(config):
        return None
    model = OmegaConf.create({"model": OmegaConf.to_container(config.model, resolve=True)})
    pop_adapter_configs(model)
    return OmegaConf.to_yaml(model) + f"size: {image_size(config)}"


def packs_of(runs: Sequence[Path], size: int) -> List[List[Path]]:
    """The runs in packs of up to `size` runs that can share a batch, in order (the others alone)."""
    groups: Dict[str, List[List[Path]]] = {}
    packs = []
    for run_dir in runs:
        try:
            key = pack_key(run_config(Path(run_dir)))
        except ValueError:  # an unreadable config fails on its own, with its message, when it is evaluated
            key = None
        if key is None:
            packs.append([run_dir])
            continue
        chunks = groups.setdefault(key, [])
        if not chunks or len(chunks[-1]) >= size:
            chunks.append([])
            packs.append(chunks[-1])
        chunks[-1].append(run_dir)
    return packs


def set_rows(model: torch.nn.Module, rows: Dict[str, Rows]) -> None:
    """Each adapter group of `model` acts on its rows (a group not named acts on none)."""
    for _, module in adapter_carriers(model):
        for name, group in module.adapters.items():
            group.rows = rows.get(name, Rows(0, 0))


def sample_runs(model: torch.nn.Module, pairs: Dict[str, Pairs], size: int, settings: EvalSettings,
                rows_per_batch: int) -> Dict[str, torch.Tensor]:
    """Images (len(pairs[g]), 3, size, size) in [0, 1] of each group g's (prompt, seed) pairs, drawn in batches of
    `rows_per_batch` rows that hold several groups' rows (an empty list of pairs: the base model)."""
    flat = [(group, pair) for group, group_pairs in pairs.items() for pair in group_pairs]
    drawn = []
    for start in range(0, len(flat), rows_per_batch):
        batch = flat[start:start + rows_per_batch]
        rows: Dict[str, Rows] = {}
        for k, (group, _) in enumerate(batch):
            rows[group] = Rows(rows[group].start if group in rows else k, k + 1, period=len(batch))
        set_rows(model, rows)
        drawn.append(sample_images(model, [pair for _, pair in batch], size, settings.steps, settings.scale,
                                   settings.sampler, batch_size=len(batch)))
    images = torch.cat(drawn).split([len(p) for p in pairs.values()])
    return dict(zip(pairs, images))


def draw_pack(runs: Sequence[Path], settings: EvalSettings, device: torch.device) -> Dict[Path, Drawn]:
    """The samples of runs of one base model (`packs_of`), drawn with the base model loaded once."""
    configs = [run_config(Path(r)) for r in runs]
    adapters = [adapter_dir(Path(r), settings.step) for r in runs]
    model = load_model_from_config(configs[0])
    remove_adapters(model, "default")  # the config's fresh adapters: each run's come from its directory
    groups = [f"run{i}" for i in range(len(runs))]
    for group, path in zip(groups, adapters):
        load_adapter_from_dir(model, str(path), group)
    model = model.to(device).eval()
    size, rows = image_size(configs[0]), settings.batch_size * len(runs)
    pairs = {g: prompt_seed_pairs(prompts_for(c, settings.prompts)[0], settings.seeds) for g, c in zip(groups, configs)}
    images = sample_runs(model, pairs, size, settings, rows)
    tuned = base = {g: None for g in groups}
    if settings.prior_prompt:
        prompts = {g: format_prompt(settings.prior_prompt, subject_fields(c)) for g, c in zip(groups, configs)}
        tuned = sample_runs(model, {g: prompt_seed_pairs([p], settings.seeds) for g, p in prompts.items()}, size,
                            settings, rows)
        plain = {p: sample_runs(model, {"": prompt_seed_pairs([p], settings.seeds)}, size, settings, rows)[""]
                 for p in sorted(set(prompts.values()))}  # the base model: no group has rows
        base = {g: plain[p] for g, p in prompts.items()}
    set_rows(model, {})
    log.info("drew the samples of %d runs in one pack", len(runs))
    return {Path(r): Drawn(images[g], tuned[g], base[g], adapter_size(a, model, g))
            for r, g, a in zip(runs, groups, adapters)}


class PackedDraws:
    """`draw` for `evaluate_runs`: a run's samples, drawn with the other runs of its pack on first request."""

    def __init__(self, runs: Sequence[Path], size: int, settings: EvalSettings, device: torch.device):
        self.packs = packs_of(runs, size)
        self.settings, self.device = settings, device
        self.drawn: Dict[Path, Drawn] = {}

    def __call__(self, run_dir: Path) -> Optional[Drawn]:
        run_dir = Path(run_dir)
        if run_dir not in self.drawn:
            pack = next((p for p in self.packs if run_dir in map(Path, p)), [run_dir])
            if len(pack) == 1:
                return None  # alone: evaluate_run draws it itself
            self.packs.remove(pack)
            try:
                self.drawn.update(draw_pack(pack, self.settings, self.device))
            except (ValueError, CheckpointError) as e:  # each run is then drawn alone and reports its own error
                log.warning("the pack of %s could not be drawn together (%s): its runs are drawn alone",
                            ", ".join(Path(r).name for r in pack), e)
                self.packs += [[r] for r in pack]
                return None
        return self.drawn.pop(run_dir)
