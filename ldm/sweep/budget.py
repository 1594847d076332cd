"""Equal parameter budgets in a sweep: `budget: N` in a sweep file sets, in every run, the size field (mid_dim, rank)
of every adapter entry whose form has one, so that the run's adapter parameter count is nearest N (one size per run,
shared by all its sized entries; `ldm.modules.adapters.fit_budget`). Forms without a size ((IA)^3) keep their count.
The counts come from the forms' own `parameter_count` on the run's networks built on the meta device (no memory, no
weights), so comparisons between positions or forms are not confounded by size.
"""
import logging
from typing import Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.config import ADAPTER_CONFIGS
from ldm.modules.adapters import fit_budget
from ldm.util.instantiate import instantiate_from_config

log = logging.getLogger(__name__)
NETWORK_CONFIGS = {"unet": "model.params.unet_config", "cond_stage_model": "model.params.cond_stage_config"}


def _network(config: DictConfig, role: str) -> torch.nn.Module:
    """The run's `role` network without adapters, on the meta device."""
    node = OmegaConf.to_container(OmegaConf.select(config, NETWORK_CONFIGS[role]), resolve=True)
    node.get("params", {}).pop("adapter_config", None)
    with torch.device("meta"):
        return instantiate_from_config(node)


def apply_budget(config: DictConfig, budget: int) -> Tuple[Optional[int], int]:
    """Set the sizes of the run's adapter entries for `budget` parameters, in place: (size or None when no entry has
    one, parameter count)."""
    roles = [role for role, path in ADAPTER_CONFIGS.items() if OmegaConf.select(config, path)]
    networks = [(_network(config, role), OmegaConf.select(config, ADAPTER_CONFIGS[role])) for role in roles]
    configs, size, count = fit_budget(networks, budget)
    for role, adapter_config in zip(roles, configs):
        OmegaConf.update(config, ADAPTER_CONFIGS[role], adapter_config, merge=False)
    return size, count
