"""What every function form answers for itself (ldm/modules/adapters/base.py), over every form in the registry, and
the claim of docs/architecture.md that a new form is one class plus one registry line: a toy form added in this file
alone works through injection, switches, training, directories and merging, with nothing else changed. `make test-fast`
runs each behaviour for one form (the identity at init for a bottleneck and a projection form)."""
import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from ldm.modules.adapters import (FORMS, POSITIONS, AdapterConfigError, ProjectionForm, adapter_blocks,
                                  adapter_parameters, adapters_enable, freeze_except_adapters, inject_adapters,
                                  load_adapter_from_dir, merge_adapters, planned_parameter_count, remove_adapters,
                                  save_adapter_to_dir, save_lora_file, set_adapter_scale)
from ldm.modules.adapters import schema
from ldm.modules.adapters.base import ProjectionOptions
from ldm.modules.adapters.options import number_option

from conftest import covering

# One config per form of the registry, on the tiny UNet (each must cover its form; the test below checks that).
ONE_OF_EACH = {
    "inout/transformer": {"transformer_adp_config": [{"din": "attn2o", "dout": "ffni", "mid_dim": 4}]},
    "inout/resblock": {"resblock_adp_config": {"din": "resi", "dout": "reso", "mid_dim": 2}},
    "lora": {"projection_adp_config": [{"type": "lora", "target": ["to_q", "proj_in"], "rank": 2}]},
    "locon": {"projection_adp_config": [{"type": "locon", "target": ["to_v", "in_layers.2", "op"], "rank": 2},
                                        {"type": "locon", "target": ["out_layers.3"], "rank": 2, "tucker": True}]},
    "loha": {"projection_adp_config": [{"type": "loha", "target": ["to_k", "proj_out", "in_layers.2"], "rank": 2,
                                        "alpha": 1.0}, {"type": "loha", "target": ["out_layers.3"], "rank": 1,
                                                        "tucker": True}]},
    "lokr": {"projection_adp_config": [{"type": "lokr", "target": ["to_out.0", "emb_layers.1", "op"], "rank": 2},
                                       {"type": "lokr", "target": ["in_layers.2"], "rank": 1, "decompose_both": True,
                                        "tucker": True}]},
    "dora": {"projection_adp_config": [{"type": "dora", "target": ["to_q", "in_layers.2"], "rank": 2, "alpha": 4.0}]},
    "ia3": {"projection_adp_config": [{"type": "ia3", "target": ["to_k", "ff.net.2"], "learn_biases": True}]},
}


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 4, 4, generator=g), torch.tensor([3, 700]), torch.randn(2, 5, 32, generator=g)


def test_the_configs_cover_every_form_of_the_registry():
    covered = {(s.kind, s.type) for config in ONE_OF_EACH.values() for s in schema.parse_adapter_config(config)}
    assert covered == {(f.KIND, f.NAME) for f in FORMS}


@pytest.mark.parametrize("name", covering(list(ONE_OF_EACH)))
def test_each_form_counts_its_parameters_without_being_built(tiny_model, name):
    planned = planned_parameter_count(tiny_model.unet, ONE_OF_EACH[name])
    assert planned > 0
    assert inject_adapters(tiny_model.unet, ONE_OF_EACH[name]) == planned
    assert sum(p.numel() for p in adapter_parameters(tiny_model.unet)) == planned


def test_blocks_name_exactly_the_positions_of_their_kind(tiny_model):
    """The points a block reports (adapter_widths) and taps in its forward are the positions the schema knows."""
    seen = {kind: set() for kind in POSITIONS}

    class Recorder:
        def __init__(self, kind):
            self.kind = kind

        def taps(self):
            def tap(name, t):
                seen[self.kind].add(name)
                return t
            return tap

    blocks = adapter_blocks(tiny_model.unet)
    assert {kind for _, _, kind, _ in blocks} == set(POSITIONS)
    for _, block, kind, widths in blocks:
        assert set(widths) == set(POSITIONS[kind]["din"]) | set(POSITIONS[kind]["dout"])
        block.adapters = Recorder(kind)
    with torch.no_grad():
        tiny_model.unet(*inputs())
    assert seen == {kind: set(p["din"]) | set(p["dout"]) for kind, p in POSITIONS.items()}


# ---- a new form in one class and one registry line ---------------------------------------------------------------
@dataclass(frozen=True)
class GainOptions(ProjectionOptions):
    bound: float = number_option(1.0, low=0, low_open=True, help="the largest gain")


class Gain(ProjectionForm):
    """A toy form: y + g * y with a learned per-output gain g (zero at init)."""
    NAME = "gain"
    TITLE = "gain"
    Options = GainOptions

    @classmethod
    def parameter_count(cls, spec, dim_in, dim_out, kernel=()):
        return dim_out

    def __init__(self, spec, host):
        super().__init__()
        self.bound = spec.options.bound
        self.g = nn.Parameter(torch.zeros(host.weight.shape[0]))

    def zero_init_(self):
        nn.init.zeros_(self.g)

    def forward(self, x, y, host):
        g = self.bound * torch.tanh(self.g)
        return y * (g.view(-1, 1, 1) if isinstance(host, nn.Conv2d) else g)


@pytest.fixture
def with_gain(monkeypatch):
    monkeypatch.setattr(schema, "FORMS", schema.FORMS + (Gain,))  # the one registry line


def test_a_new_form_works_everywhere_with_nothing_else_changed(with_gain, tiny_model, tmp_path):
    config = {"projection_adp_config": [{"type": "gain", "target": ["to_out.0", "proj_out"], "bound": 0.5}]}
    unet = tiny_model.unet
    x = inputs()
    with torch.no_grad():
        base = unet(*x)
    added = inject_adapters(unet, config)
    assert added == planned_parameter_count(unet, config) > 0
    with torch.no_grad():
        assert torch.equal(unet(*x), base)  # identity at init
    trained = freeze_except_adapters(unet)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.SGD(trained, lr=1.0)
    unet(*x).square().mean().backward()
    opt.step()
    changed = {k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".adapters." in k for k in changed)  # only the form's weights trained
    with torch.no_grad():
        tuned = unet(*x)
        adapters_enable(unet, False)
        assert torch.equal(unet(*x), base)
        adapters_enable(unet, True)
    save_adapter_to_dir(unet, str(tmp_path / "gain"))
    other = copy.deepcopy(tiny_model)
    remove_adapters(other.unet)
    load_adapter_from_dir(other.unet, str(tmp_path / "gain"))  # built from the directory's own config
    with torch.no_grad():
        assert torch.equal(other.unet(*x), tuned)
    with pytest.raises(AdapterConfigError, match="the gain .* cannot be folded into the weights"):
        merge_adapters(unet)  # what it cannot do, it refuses with the base class's reason


def test_a_new_forms_bad_field_is_refused_with_its_name(with_gain, tiny_model):
    with pytest.raises(AdapterConfigError, match=r"projection_adp_config\[0\]\.bound must be a finite number > 0"):
        inject_adapters(tiny_model.unet, {"projection_adp_config": [{"type": "gain", "target": ["to_q"], "bound": -1}]})


def test_an_adapter_directory_written_before_the_package_moved_still_loads(tiny_model):
    """tests/data/adapters-2923570: every form on the tiny model's UNet and text encoder, saved by the code at commit
    2923570 (before ldm/modules/adapters/ existed), with the outputs that code computed."""
    data = Path(__file__).parent / "data"
    expected = load_file(str(data / "adapters-2923570-expected.safetensors"))
    load_adapter_from_dir(tiny_model, str(data / "adapters-2923570"))
    with torch.no_grad():  # equal up to float reordering (thread counts and CPUs differ); a wrong load is O(0.1) off
        unet_out = tiny_model.unet(expected["x"], expected["t"], context=expected["c"])
        text_out = tiny_model.cond_stage_model(["a photo of sks dog", "a painting"])
    assert (unet_out - expected["unet_out"]).abs().max() < 1e-5
    assert (text_out - expected["text_out"]).abs().max() < 1e-5


# ---- behaviour over every form of the registry (as peft tests every method) -------------------------------------
def randomized(model, seed=0):
    """Non-zero adapter weights (a zero-initialised form shows nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def unet_out(unet, x):
    with torch.no_grad():
        return unet(*x)


@pytest.mark.parametrize("name", covering(list(ONE_OF_EACH), lambda name: name.split("/")[0] == "inout"))
def test_each_form_is_the_identity_at_init_and_trains_only_itself(tiny_model, name):
    unet, x = tiny_model.unet, inputs()
    base = unet_out(unet, x)
    inject_adapters(unet, ONE_OF_EACH[name])
    assert (unet_out(unet, x) - base).abs().max() < 1e-6  # DoRA: W' = W up to the rounding of its norm
    trained = freeze_except_adapters(unet)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    torch.optim.SGD(trained, lr=0.1).zero_grad()
    unet(*x).square().mean().backward()
    assert all(p.grad is not None for p in trained)
    torch.optim.SGD(trained, lr=0.1).step()
    changed = {k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".adapters." in k for k in changed)


@pytest.mark.parametrize("name", covering(list(ONE_OF_EACH)))
def test_each_form_switches_scales_and_round_trips_a_directory(tiny_model, name, tmp_path):
    unet, x = tiny_model.unet, inputs()
    base = unet_out(unet, x)
    inject_adapters(unet, ONE_OF_EACH[name])
    tuned = unet_out(randomized(unet), x)
    assert (tuned - base).abs().max() > 1e-3
    adapters_enable(unet, False)
    assert torch.equal(unet_out(unet, x), base)
    adapters_enable(unet, True)
    set_adapter_scale(unet, 0.0)
    assert torch.equal(unet_out(unet, x), base)
    set_adapter_scale(unet, 1.0)
    save_adapter_to_dir(unet, str(tmp_path / name))
    other = copy.deepcopy(tiny_model)
    remove_adapters(other.unet)
    load_adapter_from_dir(other.unet, str(tmp_path / name))
    assert torch.equal(unet_out(other.unet, x), tuned)


MERGEABLE = [n for n in ONE_OF_EACH if n not in ("inout/transformer", "inout/resblock", "ia3")]  # ia3: learn_biases


@pytest.mark.parametrize("name,scale", covering([(n, s) for n in MERGEABLE for s in (1.0, 0.6)], lambda n, s: s))
def test_linear_forms_merge_into_the_base_at_any_strength(tiny_model, name, scale):
    unet, x = tiny_model.unet, inputs()
    inject_adapters(unet, ONE_OF_EACH[name])
    set_adapter_scale(randomized(unet), scale)
    tuned = unet_out(unet, x)
    assert merge_adapters(unet) > 0 and not adapter_parameters(unet)
    assert (unet_out(unet, x) - tuned).abs().max() < 1e-5


@pytest.mark.parametrize("name", covering(MERGEABLE))
def test_linear_forms_round_trip_a_kohya_file(tiny_model, name, tmp_path):
    unet, x = tiny_model.unet, inputs()
    inject_adapters(unet, ONE_OF_EACH[name])
    tuned = unet_out(randomized(unet), x)
    save_lora_file(unet, str(tmp_path / "f.safetensors"))
    other = copy.deepcopy(tiny_model)
    remove_adapters(other.unet)
    load_adapter_from_dir(other.unet, str(tmp_path / "f.safetensors"))
    assert (unet_out(other.unet, x) - tuned).abs().max() < 1e-5


# ---- the scripts take every linear form ---------------------------------------------------------------------------
@pytest.fixture
def base_ckpt(tiny_model_session, tmp_path):
    from ldm.checkpoint import save_state_dict
    path = tmp_path / "base.safetensors"
    save_state_dict(tiny_model_session.state_dict(), str(path))
    return str(path)


def saved_group(tiny_model, name, path):
    inject_adapters(tiny_model.unet, ONE_OF_EACH[name])
    randomized(tiny_model.unet)
    save_adapter_to_dir(tiny_model, str(path))
    return tiny_model


@pytest.mark.slow
@pytest.mark.parametrize("name", ["locon", "loha", "lokr", "dora"])
def test_merge_script_folds_each_linear_form_into_a_checkpoint(tiny_model, tiny_model_session, base_ckpt, tmp_path,
                                                               name):
    from scripts import merge
    from conftest import TINY_CONFIG
    model, x = saved_group(tiny_model, name, tmp_path / "a"), inputs()
    set_adapter_scale(model.unet, 0.5)
    out = merge.main(["--mode", "upl", "--path_1", base_ckpt, "--path_2", str(tmp_path / "a"), "--alpha", "0.5",
                      "--output_path", str(tmp_path / "m.safetensors"), "--config", str(TINY_CONFIG)])
    merged = copy.deepcopy(tiny_model_session)
    merged.init_from_ckpt(str(out))
    assert (unet_out(merged.unet, x) - unet_out(model.unet, x)).abs().max() < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["locon", "loha", "lokr", "dora"])
def test_convert_script_writes_each_form_as_kohya_and_peft(tiny_model, tiny_model_session, base_ckpt, tmp_path, name):
    from scripts import convert_lora
    from conftest import TINY_CONFIG
    model, x = saved_group(tiny_model, name, tmp_path / "a"), inputs()
    run = ["--config", str(TINY_CONFIG), "--ckpt", base_ckpt, "--input", str(tmp_path / "a")]
    for to, output in (("kohya", tmp_path / "k.safetensors"), ("peft", tmp_path / "p")):
        if to == "peft" and name != "dora":  # these configs mix Tucker and plain kxk parts: one peft config cannot
            with pytest.raises(SystemExit, match="no diffusers / peft form|peft cannot hold together"):
                convert_lora.main(run + ["--output", str(output), "--to", to])
            assert not output.exists()
            continue
        written = convert_lora.main(run + ["--output", str(output), "--to", to])
        back = copy.deepcopy(tiny_model_session)
        load_adapter_from_dir(back, str(written))
        assert (unet_out(back.unet, x) - unet_out(model.unet, x)).abs().max() < 1e-5


def test_dora_files_need_the_base_weights(tiny_model, tmp_path):
    from scripts import convert_lora
    from conftest import TINY_CONFIG
    saved_group(tiny_model, "dora", tmp_path / "a")
    with pytest.raises(SystemExit, match="DoRA needs the base weights .* --ckpt"):
        convert_lora.main(["--config", str(TINY_CONFIG), "--input", str(tmp_path / "a"), "--output",
                           str(tmp_path / "k.safetensors"), "--to", "kohya"])
    assert not (tmp_path / "k.safetensors").exists()


SD_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
SD_COUNTS = [  # the README's table of parameters at SD v1 size
    ({"type": "lora", "target": SD_ATTN, "rank": 4}, 797_184),
    ({"type": "dora", "target": SD_ATTN, "rank": 4}, 897_024),
    ({"type": "loha", "target": SD_ATTN, "rank": 4}, 1_594_368),
    ({"type": "lokr", "target": SD_ATTN, "rank": 4}, 106_496),
    ({"type": "lokr", "target": SD_ATTN, "rank": 8, "factor": 8}, 207_488),
    ({"type": "locon", "target": SD_ATTN + ["in_layers.2", "out_layers.3", "skip_connection", "op", "conv"],
      "rank": 4}, 3_111_424),
]


def test_sd_size_parameter_counts_of_the_readme():
    from conftest import REPO
    from ldm.config import load_configs
    from ldm.sweep.budget import _network
    unet = _network(load_configs([REPO / "configs/stable-diffusion/v1-inference.yaml"]), "unet")
    for entry, count in SD_COUNTS:
        assert planned_parameter_count(unet, {"projection_adp_config": [entry]}) == count, entry


@pytest.mark.parametrize("name", covering(["lora", "locon", "loha", "lokr", "dora"]))
def test_each_update_states_the_forms_weight_change(tiny_model, name):
    """The plain-tensor update (what files hold) gives the same ΔW as the built form it came from."""
    from ldm.modules.adapters import group_adapters
    inject_adapters(tiny_model.unet, ONE_OF_EACH[name])
    randomized(tiny_model.unet)
    for _, host, group in group_adapters(tiny_model.unet):
        for a in group:
            u = a.update(1.0, host)
            delta = u.delta_of(host.weight) if name == "dora" else u.delta()
            assert (delta - a.delta_weight(host)).abs().max() < 1e-6


def test_dora_is_the_identity_when_the_base_loads_after_injection(tiny_model_session, tmp_path):
    """A UNet built from a config injects its adapters before the checkpoint loads: DoRA's magnitude, an offset from
    ||W||, still starts as the identity on the loaded weights."""
    from omegaconf import OmegaConf
    from conftest import TINY_CONFIG
    from ldm.checkpoint import save_state_dict
    from ldm.util.instantiate import instantiate_from_config
    save_state_dict(tiny_model_session.state_dict(), str(tmp_path / "base.safetensors"))
    config = OmegaConf.load(TINY_CONFIG).model
    config.params.unet_config.params.adapter_config = ONE_OF_EACH["dora"]
    model = instantiate_from_config(config).eval()
    model.init_from_ckpt(str(tmp_path / "base.safetensors"))
    x = inputs()
    assert (unet_out(model.unet, x) - unet_out(tiny_model_session.unet, x)).abs().max() < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["locon", "loha", "lokr", "dora"])
def test_each_new_form_trains_with_main_dream_booth(name, tmp_path, tiny_model_session):
    """Two DreamBooth steps of the form (config-language override of the adapter config): its adapters are saved,
    changed by training, and load back into the base model."""
    import json
    import main_dream_booth
    from ldm.checkpoint import save_state_dict
    from test_train import argv, write_images
    save_state_dict(tiny_model_session.state_dict(), str(tmp_path / "base.safetensors"))
    world = {"ckpt": tmp_path / "base.safetensors", "data": write_images(tmp_path / "subject"), "reg": tmp_path / "r",
             "logs": tmp_path / "logs"}
    override = "model.params.unet_config.params.adapter_config=" + json.dumps(
        {"transformer_adp_config": [], **ONE_OF_EACH[name]})
    logdir = main_dream_booth.main(argv(world, "--max_steps", "2", override, reg=False))
    (saved,) = sorted((Path(logdir) / "checkpoints").glob("*-adapters"))
    model = copy.deepcopy(tiny_model_session)
    load_adapter_from_dir(model, str(saved))
    assert {s.type for s in adapter_groups_of(model)} == {name}
    x = inputs()  # a fresh form is the identity: a changed output means training moved its zero-initialised parts
    assert not torch.equal(unet_out(model.unet, x), unet_out(tiny_model_session.unet, x))


def adapter_groups_of(model):
    from ldm.modules.adapters import adapter_groups
    return adapter_groups(model)["default"]
