"""Parameter budgets: the paper's sizes as the rule they follow, sizes fitted to a budget by the forms' own counts,
and the sweep option that gives every run of a study the same budget (the tiny-world form study)."""
import copy

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from conftest import REPO, covering
from ldm.config import ADAPTER_CONFIGS, load_configs
from ldm.modules.adapters import (AdapterConfigError, adapter_parameters, fit_budget, inject_adapters,
                                  paper_mid_dim, parse_adapter_config, valid_pairs, with_size)
from ldm.sweep.budget import _network
from ldm.sweep.spec import SweepError, check_spec, expand, load_spec

FORMS_SWEEP = REPO / "configs/sweeps/tiny-world-forms.yaml"


def test_the_papers_sizes_follow_one_rule():
    """60 in transformer blocks; in ResBlocks the width nearest 3.3M parameters on SD v1: the paper's 6, 7, 9."""
    unet = _network(load_configs([REPO / "configs/stable-diffusion/v1-inference.yaml"]), "unet")
    sizes = {(din, dout): paper_mid_dim(unet, kind, din, dout) for kind, din, dout in valid_pairs()}
    assert {k: v for k, v in sizes.items() if k[0].startswith("res")} == {("resi", "resi"): 6, ("resi", "reso"): 7,
                                                                          ("reso", "reso"): 9}
    assert {v for k, v in sizes.items() if not k[0].startswith("res")} == {60}


CONFIGS = {
    "bottleneck": {"transformer_adp_config": [{"din": "attn2o", "dout": "ffni", "mid_dim": 3}]},
    "resblock": {"resblock_adp_config": {"din": "resi", "dout": "reso", "mid_dim": 1}},
    "lora+ia3": {"projection_adp_config": [{"type": "lora", "target": ["to_q", "to_v"], "rank": 1},
                                           {"type": "ia3", "target": ["to_k"]}]},
    "locon": {"projection_adp_config": [{"type": "locon", "target": ["in_layers.2"], "rank": 1, "alpha": 2.0}]},
    "lokr": {"projection_adp_config": [{"type": "lokr", "target": ["to_q", "ff.net.2"], "rank": 1, "factor": 2}]},
    "dora": {"projection_adp_config": [{"type": "dora", "target": ["to_out.0"], "rank": 1}]},
}


@pytest.mark.parametrize("name,budget", covering([(n, b) for b in (3_000, 20_000) for n in CONFIGS],
                                                 lambda name, budget: budget))
def test_the_fitted_size_gives_the_count_nearest_the_budget(tiny_model, name, budget):
    unet = tiny_model.unet
    (config,), size, count = fit_budget([(unet, CONFIGS[name])], budget)

    def built(s):
        net = copy.deepcopy(unet)
        return inject_adapters(net, with_size(CONFIGS[name], s))
    assert built(size) == count  # the forms' counts are what injection builds
    for other in (size - 1, size + 1):
        if other >= 1:
            assert abs(built(other) - budget) >= abs(count - budget)
    assert config == with_size(CONFIGS[name], size)


def test_with_size_sets_only_sized_fields_and_an_omitted_alpha_follows_the_rank():
    config = with_size(CONFIGS["lora+ia3"], 5)
    specs = parse_adapter_config(config)
    assert [(s.type, getattr(s.options, "rank", None)) for s in specs] == [("lora", 5), ("ia3", None)]
    assert specs[0].options.alpha == 5.0  # the entry left alpha out: alpha = rank, scale 1
    assert parse_adapter_config(with_size(CONFIGS["locon"], 4))[0].options.alpha == 2.0
    assert with_size(CONFIGS["resblock"], 7)["resblock_adp_config"]["mid_dim"] == 7  # a mapping stays a mapping


def test_a_config_without_a_sized_form_keeps_its_count(tiny_model):
    ia3 = {"projection_adp_config": [{"type": "ia3", "target": ["to_k", "to_v"]}]}
    (config,), size, count = fit_budget([(tiny_model.unet, ia3)], 10_000)
    assert config == ia3 and size is None and count == inject_adapters(tiny_model.unet, ia3)
    with pytest.raises(AdapterConfigError, match="budget must be a positive integer"):
        fit_budget([(tiny_model.unet, ia3)], 0)


@pytest.mark.slow
def test_the_tiny_world_form_study_has_every_form_at_the_budget():
    """Seven forms x 2 seeds; every sized form within 5.5% of the budget by the count of the model the run builds."""
    spec = load_spec(FORMS_SWEEP)
    grid = expand(spec, root=REPO)
    assert len(grid.runs) == 14 and not grid.dropped
    assert {r.levels["form"] for r in grid.runs} == {"bottleneck", "lora", "locon", "loha", "lokr", "dora", "ia3"}
    for run in grid.runs:
        unet = _network(run.config, "unet")
        n = inject_adapters(unet, OmegaConf.select(run.config, ADAPTER_CONFIGS["unet"]))
        types = {s.type for s in parse_adapter_config(OmegaConf.select(run.config, ADAPTER_CONFIGS["unet"]))}
        assert types == {"inout" if run.levels["form"] == "bottleneck" else run.levels["form"]}
        if run.levels["form"] == "ia3":
            assert n == 6_912
        else:
            assert abs(n - spec["budget"]) / spec["budget"] <= 0.055, (run.name, n)
        assert sum(p.numel() for p in adapter_parameters(unet)) == n


@pytest.mark.parametrize("budget", [0, -5, 1.5, "many", True])
def test_a_bad_budget_is_refused(budget):
    spec = yaml.safe_load(FORMS_SWEEP.read_text())
    with pytest.raises(SweepError, match="'budget' must be a positive integer"):
        check_spec({**spec, "budget": budget})


@pytest.mark.slow
def test_the_form_study_is_analysed_with_form_as_its_factor(tmp_path):
    """The form study's table as scripts/evaluate.py writes it (one row per run: form, seed, trainable_parameters,
    metrics), with a planted effect of one form, goes through scripts/anova.py with the sweep's factors: form."""
    import json

    import numpy as np
    import pandas as pd
    from scripts import anova as anova_script
    spec, rng = load_spec(FORMS_SWEEP), np.random.default_rng(0)
    runs = expand(spec, root=REPO).runs
    table = pd.DataFrame([{"run": r.name, **r.levels, "trainable_parameters": spec["budget"],
                           "dino_i": 0.5 + (0.2 if r.levels["form"] == "loha" else 0.0) + rng.normal(0, 0.01)}
                          for r in runs])
    table.to_csv(tmp_path / "results.csv", index=False)
    (tmp_path / "sweep.json").write_text(json.dumps({"spec": spec}))
    report = anova_script.main([str(tmp_path / "results.csv"), "--metrics", "dino_i"]).read_text()
    assert "Factors: form. Blocks: seed." in report and "**form drives dino_i**" in report
