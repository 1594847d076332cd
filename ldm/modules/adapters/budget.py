"""Sizes for a parameter budget: the size field of every form (`SIZE`: mid_dim, rank) set so that an adapter config's
parameter count, by the forms' own `parameter_count`, is nearest a budget; and the paper's sizes, stated as the rule
they follow.

Xiang et al. 2023 (arXiv 2303.18181) use mid_dim 60 in transformer blocks and, in ResBlocks, the widths whose adapters
have about 3.3M parameters on SD v1: 6 (resi -> resi, 3.30M), 7 (resi -> reso, 3.22M), 9 (reso -> reso, 3.33M) are the
nearest to 3.3M of their pair (tests/test_budget.py checks it), so a new ResBlock pair gets its size by the same rule.
"""
import copy
from dataclasses import replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch.nn as nn
from omegaconf import OmegaConf

from ldm.modules.adapters.attach import host_dims, placement
from ldm.modules.adapters.positions import SECTION_OF, SECTIONS, section_value
from ldm.modules.adapters.schema import KIND_FIELDS, form_of, forms, parse_adapter_config
from ldm.modules.adapters.spec import AdapterConfigError, AdapterSpec

PAPER_TRANSFORMER_MID_DIM = 60
PAPER_RESBLOCK_PARAMETERS = 3_300_000
MAX_SIZE = 4096  # the largest size a budget search tries


def _sized(spec: AdapterSpec, size: int) -> AdapterSpec:
    field = form_of(spec).SIZE
    return spec if field is None else replace(spec, options=replace(spec.options, **{field: size}))


class Counter:
    """The parameter count of adapter configs on their networks as a function of one size for every sized form,
    placed once (no module is built)."""

    def __init__(self, networks: Sequence[Tuple[nn.Module, Any]]):
        self.placed = [(s, host_dims(s, host, dims)) for net, config in networks if config
                       for host, specs, dims in placement(net, parse_adapter_config(config)) for s in specs]
        self.sized = sorted({f"{s.type} {form_of(s).SIZE}" for s, _ in self.placed if form_of(s).SIZE})

    def __call__(self, size: int) -> int:
        return sum(form_of(s).parameter_count(_sized(s, size), *dims) for s, dims in self.placed)


def size_for_budget(count: Counter, budget: int) -> Tuple[int, int]:
    """(size, count) with the count nearest `budget` (the smaller size on a tie). Counts grow with the size for every
    form (LoKr's steps down once, where w2 turns full, and stays), so the search stops once the count is past the
    budget by more than the best miss."""
    best = (1, count(1))
    for size in range(2, MAX_SIZE + 1):
        n = count(size)
        if abs(n - budget) < abs(best[1] - budget):
            best = (size, n)
        if n - budget > abs(best[1] - budget):
            break
    return best


def with_size(adapter_config: Any, size: int) -> Dict[str, Any]:
    """`adapter_config` (the paper's schema) with the size field of every sized entry set to `size`."""
    config = OmegaConf.to_container(adapter_config, resolve=True) if OmegaConf.is_config(adapter_config) \
        else copy.deepcopy(dict(adapter_config))
    for section, kind in SECTIONS.items():
        value = config.get(section)
        if not value:
            continue
        entries = [dict(e) for e in ([value] if isinstance(value, Mapping) else value)]
        for e in entries:
            form = forms(kind).get(e.get("type", KIND_FIELDS[kind]["type"]))
            if form is not None and form.SIZE:
                e[form.SIZE] = size
        config[section] = section_value(section, entries)
    return config


def fit_budget(networks: Sequence[Tuple[nn.Module, Any]], budget: int
               ) -> Tuple[List[Any], Optional[int], int]:
    """The adapter configs of `networks` ([(network, adapter_config or None)]) with one size for every sized entry,
    chosen so the total parameter count is nearest `budget`: (configs, size, count). Without a sized entry (only
    (IA)^3) the configs are returned as they are, with size None and their count."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise AdapterConfigError(f"a parameter budget must be a positive integer, got {budget!r}")
    count = Counter(networks)
    if not count.sized:
        return [config for _, config in networks], None, count(1)
    size, n = size_for_budget(count, budget)
    return [with_size(config, size) if config else config for _, config in networks], size, n


def paper_mid_dim(unet: nn.Module, kind: str, din: str, dout: str) -> int:
    """The paper's bottleneck width for a position pair: 60 in transformer blocks; in ResBlocks the width whose
    adapters on `unet` (SD v1) have the count nearest 3.3M."""
    if kind == "transformer":
        return PAPER_TRANSFORMER_MID_DIM
    config = {SECTION_OF[kind]: {"type": "inout", "din": din, "dout": dout, "mid_dim": 1}}
    return size_for_budget(Counter([(unet, config)]), PAPER_RESBLOCK_PARAMETERS)[0]

