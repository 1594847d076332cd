"""Adapters (Xiang et al. 2023) on the tiny UNet, over every position pair x every method, as peft tests its methods:
zero init is the identity, only adapters train, save/load and the original format round-trip, disable gives the base;
SD-size parameter counts on the meta device; clear errors for bad configs and directories; sample.py with adapters."""
import copy
import logging

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import sample
from conftest import REPO, TINY_CONFIG, covering, randomize_zero_layers
from ldm.checkpoint import save_state_dict
from ldm.modules.adapters import io as adapter_io
from ldm.modules.adapters import (CONFIG_FILE, METHODS, WEIGHTS_FILE, AdapterConfigError, AdapterDirError,
                                  adapter_blocks, adapter_groups, adapter_parameters, freeze_except_adapters,
                                  inject_adapters, parse_adapter_config, remove_adapters, set_adapter_scale,
                                  valid_pairs)
from ldm.util.instantiate import count_params, instantiate_from_config
from scripts import make_adapter_configs

PAPER_PAIRS = ["attn1i-attn1i", "attn1i-attn2i", "attn1i-ffni", "attn1i-transo", "attn1o-attn2i", "attn1o-ffni",
               "attn1o-transo", "attn2c-attn2c", "attn2i-attn2i", "attn2i-ffni", "attn2i-transo", "attn2o-ffni",
               "attn2o-transo", "ffni-ffni", "ffni-transo", "ffno-transo", "transo-transo", "resi-resi", "resi-reso",
               "reso-reso"]
# every valid position pair x every method; make test-fast runs the few that show each din, dout and method once (the
# file tests: one transformer and one ResBlock pair)
GRID = [pytest.param(din, dout, m, id=f"{din}-{dout}-{m}") for _, din, dout in valid_pairs() for m in METHODS]
CASES = covering(GRID, lambda din, dout, m: din, lambda din, dout, m: dout, lambda din, dout, m: m)
KIND_CASES = covering(GRID, lambda din, dout, m: din.startswith("res"))


def adapter_cfg(din, dout, method="default", init="zero", mid_dim=None, scale=1.0):
    res = din.startswith("res")
    mid_dim = (3 if res else 8) if mid_dim is None else mid_dim
    entry = dict(type="inout", din=din, dout=dout, mid_dim=mid_dim, method=method, scale=scale, init=init)
    return {"resblock_adp_config": entry} if res else {"transformer_adp_config": [entry]}


def tiny_unet_config(**overrides):
    config = OmegaConf.to_container(OmegaConf.load(TINY_CONFIG).model.params.unet_config)
    config["params"].update(overrides)
    return config



def tiny_unet():
    """The tiny UNet with its zero-initialised output layers randomised, so adapters anywhere reach the output."""
    torch.manual_seed(0)
    return randomize_zero_layers(instantiate_from_config(tiny_unet_config())).eval()


@pytest.fixture(scope="module")
def shared():
    """Two identical tiny UNets built once per module (building or deep-copying one costs more than a test)."""
    unets = tiny_unet(), tiny_unet()
    return unets, [p.detach().clone() for p in unets[0].parameters()]


@pytest.fixture
def unets(shared):
    """The shared UNets, put back after each test: adapters removed, base weights and flags as built."""
    models, reference = shared
    yield models
    for unet in models:
        for name in list(adapter_groups(unet)):
            remove_adapters(unet, name)
        with torch.no_grad():
            for p, r in zip(unet.parameters(), reference):
                p.copy_(r)  # undo whatever a failing test changed
        unet.requires_grad_(True)


@pytest.fixture
def base(unets):
    return unets[0]


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 4, 4, generator=g), torch.tensor([3, 700]), torch.randn(2, 5, 32, generator=g)


@pytest.fixture(scope="module")
def base_out(shared, inputs):
    return run(shared[0][0], inputs)


def run(unet, inputs):
    with torch.no_grad():
        return unet(*inputs)


def add(unet, config, name="default", seed=0):
    """`unet` with the adapters of `config` injected in place, initialised from `seed`."""
    torch.manual_seed(seed)
    inject_adapters(unet, config, name)
    return unet


def with_adapters(base, config, name="default", seed=0):
    return add(copy.deepcopy(base), config, name, seed)


# ---- behaviour over every position pair x every method -----------------------------------------------------------
def test_every_paper_pair_is_valid():
    pairs = [f"{din}-{dout}" for _, din, dout in valid_pairs()]
    assert set(PAPER_PAIRS) <= set(pairs) and len(pairs) == len(set(pairs))


@pytest.mark.parametrize("din,dout,method", CASES)
def test_zero_init_leaves_output_bit_identical(base, inputs, base_out, din, dout, method):
    unet = add(base, adapter_cfg(din, dout, method))
    assert adapter_parameters(unet)
    assert torch.equal(run(unet, inputs), base_out)


@pytest.mark.parametrize("din,dout,method", CASES)
def test_default_init_changes_output_and_disable_restores_base(base, inputs, base_out, din, dout, method):
    unet = add(base, adapter_cfg(din, dout, method, init="default"))
    out = run(unet, inputs)
    assert (out - base_out).abs().max() > 1e-4
    unet.adapters_enable(False)
    assert torch.equal(run(unet, inputs), base_out)
    unet.adapters_enable(True)
    assert torch.equal(run(unet, inputs), out)


@pytest.mark.parametrize("din,dout,method", KIND_CASES)
def test_one_step_changes_only_adapters(base, inputs, din, dout, method):
    unet = add(base, adapter_cfg(din, dout, method))  # zero init: the last layer gets the first gradient
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    params = freeze_except_adapters(unet)
    assert sum(p.numel() for p in params) == count_params(unet, trainable_only=True) > 0
    opt = torch.optim.SGD(params, lr=0.1)
    unet(*inputs).square().mean().backward()
    opt.step()
    changed = {k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".adapters." in k for k in changed)
    assert {k.split(".adapters.")[0] for k in changed} == {p for p, b, _, _ in adapter_blocks(unet) if b.adapters}
    assert all(p.grad is None for n, p in unet.named_parameters() if ".adapters." not in n)


@pytest.mark.parametrize("din,dout,method", KIND_CASES)
def test_save_load_round_trip(unets, inputs, tmp_path, din, dout, method):
    src, fresh = unets
    add(src, adapter_cfg(din, dout, method, init="default", scale=2))
    src.save_adapter_to_dir(tmp_path / "adapters")
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    fresh.load_adapter_from_dir(tmp_path / "adapters")  # no adapters yet: the directory's own config builds them
    assert torch.equal(run(fresh, inputs), run(src, inputs))


def write_original_dir(unet, path, name="default"):
    """What the paper's code writes: torch.save(module.state_dict()) per adapter module, named by module path."""
    path.mkdir()
    for block_path, block, kind, _ in adapter_blocks(unet):
        if block.adapters is None:
            continue
        adapter = block.adapters[name][0]
        sd = {k: v.clone() for k, v in adapter.state_dict().items()}
        if kind == "transformer":
            assert list(sd) == ["adp.0.weight", "adp.0.bias", "adp.2.weight", "adp.2.bias"]
            torch.save(sd, path / f"{block_path}.adapter_inout.pt")
            torch.save(adapter.adp.state_dict(), path / f"{block_path}.adapter_inout.adp.pt")  # its duplicate
        else:
            assert list(sd) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
            torch.save(sd, path / f"{block_path}.adapter.pt")


@pytest.mark.parametrize("din,dout,method", KIND_CASES)
def test_original_format_dir_loads(unets, inputs, tmp_path, din, dout, method):
    src = add(unets[0], adapter_cfg(din, dout, method, init="default"))
    write_original_dir(src, tmp_path / "999-adapters")
    dst = add(unets[1], adapter_cfg(din, dout, method), seed=1)  # built from the model's config, zero init
    dst.load_adapter_from_dir(tmp_path / "999-adapters")
    assert torch.equal(run(dst, inputs), run(src, inputs))


# ---- parameter counts at SD v1 size (meta device: no memory, no weights) -----------------------------------------
@pytest.mark.parametrize("pair,mid_dim,expected", covering([("attn2o-ffni", 60, 1_511_040),
                                                            ("attn2c-attn2c", 60, 1_487_808),
                                                            ("resi-resi", 6, 3_303_492), ("resi-reso", 7, 3_224_794),
                                                            ("reso-reso", 9, 3_326_598)],
                                                           lambda pair, mid_dim, expected: pair.startswith("res")))
def test_sd_size_parameter_counts(caplog, pair, mid_dim, expected):
    caplog.set_level(logging.INFO)
    config = OmegaConf.to_container(OmegaConf.load(REPO / "configs/stable-diffusion/v1-inference.yaml")
                                    .model.params.unet_config)
    config["params"]["adapter_config"] = adapter_cfg(*pair.split("-"), mid_dim=mid_dim)
    with torch.device("meta"):
        unet = instantiate_from_config(config)
    assert sum(p.numel() for p in adapter_parameters(unet)) == expected
    assert count_params(unet) - expected == 859_520_964
    assert f"{expected:,} parameters, {100 * expected / 859_520_964:.3f}% of the UNet's 859,520,964" in caplog.text


# ---- groups, several adapters per block, integration -------------------------------------------------------------
def test_several_adapters_per_block_are_all_kept(base, inputs):
    a, b = (adapter_cfg(d, o, "sig", init="default")["transformer_adp_config"][0]
            for d, o in [("attn2o", "ffni"), ("attn1i", "transo")])
    both = with_adapters(base, {"transformer_adp_config": [a, b], **adapter_cfg("resi", "reso")})
    one = with_adapters(base, {"transformer_adp_config": [a]})
    one.load_state_dict(both.state_dict(), strict=False)  # same weights for the first adapter of every block
    assert not torch.equal(run(both, inputs), run(one, inputs))
    with torch.no_grad():
        for _, block, kind, _ in adapter_blocks(both):
            if kind == "transformer":
                for p in block.adapters["default"][1].parameters():
                    p.zero_()
    assert torch.equal(run(both, inputs), run(one, inputs))


def test_named_groups_scales_and_state_dict_keys(base, inputs, base_out, tmp_path):
    assert not any("adapters" in k for k in base.state_dict())
    unet = with_adapters(base, adapter_cfg("attn2o", "ffni", init="default"), name="adapter1")
    inject_adapters(unet, adapter_cfg("reso", "reso", init="default"), name="adapter2")
    assert list(adapter_groups(unet)) == ["adapter1", "adapter2"]
    keys = [k for k in unet.state_dict() if k not in base.state_dict()]
    assert "input_blocks.1.1.transformer_blocks.0.adapters.adapter1.0.adp.0.weight" in keys
    assert "input_blocks.1.0.adapters.adapter2.0.4.weight" in keys and all(".adapters." in k for k in keys)
    set_adapter_scale(unet, 0.0, "adapter2")
    only1 = run(unet, inputs)
    unet.adapters_enable(False, "adapter2")
    assert torch.equal(run(unet, inputs), only1)
    unet.adapters_enable(True, "adapter2")
    set_adapter_scale(unet, 1.0, "adapter2")
    assert not torch.equal(run(unet, inputs), only1)
    assert len(freeze_except_adapters(unet, "adapter1")) == 4 * 7  # 7 transformer blocks x (2 weights, 2 biases)
    unet.save_adapter_to_dir(tmp_path / "a1", name="adapter1")
    other = copy.deepcopy(base)
    other.load_adapter_from_dir(tmp_path / "a1", name="mine")
    assert torch.equal(run(other, inputs), only1)
    unet.adapters_enable(False)
    assert torch.equal(run(unet, inputs), base_out)


def test_int_scale_and_dict_or_list_sections_are_accepted():
    specs = parse_adapter_config({"resblock_adp_config": [{"din": "resi", "dout": "reso", "mid_dim": 7, "scale": 1}],
                                  "transformer_adp_config": {"din": "attn2o", "dout": "ffni", "mid_dim": 60}})
    assert [(s.kind, s.scale, s.init, s.options.method) for s in specs] == [
        ("transformer", 1.0, "zero", "default"), ("resblock", 1.0, "zero", "default")]


def test_gradient_checkpointing_with_frozen_base(base, inputs):
    unet = with_adapters(base, adapter_cfg("attn2o", "ffni"))
    unet.set_gradient_checkpointing(True)
    params = freeze_except_adapters(unet)
    unet.train()
    unet(*inputs).square().mean().backward()
    assert all(p.grad is not None for p in params)


def test_base_checkpoint_loads_into_model_with_adapters(tiny_model, tmp_path):
    path = tmp_path / "base.safetensors"
    save_state_dict(tiny_model.state_dict(), str(path))
    inject_adapters(tiny_model.unet, adapter_cfg("attn2c", "attn2c", init="default"))
    adapters = {k: v.clone() for k, v in tiny_model.state_dict().items() if ".adapters." in k}
    tiny_model.init_from_ckpt(str(path))  # adapter keys are optional for a base SD checkpoint
    assert adapters and all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in adapters.items())


# ---- bad input ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config,message", [
    (adapter_cfg("attn3i", "ffni"), r"transformer_adp_config\[0\]\.din: unknown position 'attn3i'.*allowed: attn1i, "),
    (adapter_cfg("attn2o", "ffno"), r"\.dout: unknown position 'ffno'.*allowed: attn1i, attn2i, ffni, transo, attn2c"),
    (adapter_cfg("ffno", "attn2i"), r"din ffno -> dout attn2i is not a valid pair.*allowed dout for din ffno: transo"),
    (adapter_cfg("attn2c", "ffni"), r"not a valid pair.*attn2c pairs only with attn2c"),
    (adapter_cfg("attn1i", "attn2c"), r"not a valid pair"),
    (adapter_cfg("reso", "resi"), r"din reso -> dout resi is not a valid pair.*allowed dout for din reso: reso"),
    ({"resblock_adp_config": {"din": "attn2o", "dout": "reso", "mid_dim": 4}}, r"unknown position 'attn2o' for resb"),
    (adapter_cfg("attn2o", "ffni", method="gelu"), r"method: unknown method 'gelu'; allowed: relu, sig, silu, ident"),
    (adapter_cfg("attn2o", "ffni", init="xavier"), r"init: unknown init 'xavier'; allowed: zero, default"),
    (adapter_cfg("attn2o", "ffni", scale="big"), r"scale must be a finite number"),
    ({"transformer_adp_config": [{"type": "lora", "din": "attn2o", "dout": "ffni"}]},
     r"type: unknown adapter type 'lora' for transformer blocks; allowed: inout"),
    ({"transformer_adp_config": [{"din": "attn2o", "dout": "ffni", "mid": 3}]}, r"unknown field\(s\) mid; allowed"),
    ({"transformer_adp_config": [{"din": "attn2o", "mid_dim": 3}]}, r"missing field\(s\) dout"),
    ({"transformer_adapters": []}, r"unknown key\(s\) transformer_adapters; allowed: transformer_adp_config"),
] + [(adapter_cfg("attn2o", "ffni", mid_dim=m), r"mid_dim must be a positive integer") for m in (0, -3, 2.5, "60")])
def test_bad_config_is_a_clear_error(base, config, message):
    with pytest.raises(AdapterConfigError, match=message):
        add(base, config)
    assert not adapter_groups(base)
    assert issubclass(AdapterConfigError, ValueError)


def test_bad_config_in_yaml_fails_at_build():
    with pytest.raises(ValueError, match="unknown method 'tanh'"):
        instantiate_from_config(tiny_unet_config(adapter_config=adapter_cfg("ffni", "ffni", method="tanh")))


@pytest.fixture(scope="module")
def saved(shared, tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "attn2o-ffni"
    with_adapters(shared[0][0], adapter_cfg("attn2o", "ffni", init="default")).save_adapter_to_dir(path)
    return path


def _load_error(unet, path, message, **kw):
    groups = dict(adapter_groups(unet))
    with pytest.raises(AdapterDirError, match=message):
        unet.load_adapter_from_dir(path, **kw)
    assert adapter_groups(unet) == groups  # a failed load leaves the model as it was


def test_directory_errors(base, saved, tmp_path):
    _load_error(copy.deepcopy(base), tmp_path / "absent", "adapter path not found")
    (tmp_path / "empty").mkdir()
    _load_error(copy.deepcopy(base), tmp_path / "empty", "not an adapter directory")
    _load_error(with_adapters(base, adapter_cfg("attn1i", "attn2i")), saved,
                "another adapter config: the directory has attn2o->ffni inout mid_dim 8 method default; the model's "
                "group 'default' has attn1i->attn2i inout mid_dim 8")
    wider = randomize_zero_layers(instantiate_from_config(tiny_unet_config(model_channels=64, context_dim=16)))
    _load_error(wider, saved, r"does not match the model: .*mis-shaped key\(s\), e.g. input_blocks.1.1.")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / CONFIG_FILE).write_text((saved / CONFIG_FILE).read_text())
    (broken / WEIGHTS_FILE).write_bytes((saved / WEIGHTS_FILE).read_bytes()[:-100])
    _load_error(copy.deepcopy(base), broken, "truncated")
    (broken / CONFIG_FILE).write_text("adapter_config: {transformer_adp_config: [{din: attn2o, dout: up, mid_dim: 8}]}")
    _load_error(copy.deepcopy(base), broken, r"is not a valid adapter config: .*unknown position 'up'")


def test_original_format_errors(base, tmp_path):
    src = with_adapters(base, adapter_cfg("attn2o", "ffni", init="default"))
    write_original_dir(src, tmp_path / "orig")
    _load_error(copy.deepcopy(base), tmp_path / "orig", "carries no adapter config")
    _load_error(with_adapters(base, adapter_cfg("resi", "reso")), tmp_path / "orig",
                r"missing 8, e.g. input_blocks.1.0.adapter.pt.*7 file\(s\) fit no adapter")
    _load_error(with_adapters(base, adapter_cfg("attn2o", "ffni", mid_dim=5)), tmp_path / "orig",
                r"mis-shaped key\(s\), e.g. input_blocks.1.1.transformer_blocks.0.adapters.default.0.adp.0.weight: "
                r"file \(8, 32\) vs model \(5, 32\)")
    victim = next((tmp_path / "orig").glob("*adapter_inout.pt"))
    victim.write_bytes(victim.read_bytes()[:50])
    _load_error(with_adapters(base, adapter_cfg("attn2o", "ffni")), tmp_path / "orig", "truncated")
    fresh = copy.deepcopy(base)  # the config can also come with the call (sample.py --config)
    write_original_dir(src, tmp_path / "orig2")
    fresh.load_adapter_from_dir(tmp_path / "orig2", adapter_config=adapter_cfg("attn2o", "ffni"))
    assert set(adapter_groups(fresh)) == {"default"}


def test_save_is_atomic_and_never_clobbers(base, saved, tmp_path, monkeypatch):
    unet = with_adapters(base, adapter_cfg("ffni", "transo", init="default"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(AdapterDirError, match="is not an adapter directory; not overwriting"):
        unet.save_adapter_to_dir(tmp_path / "mine")
    target = tmp_path / "ckpt"
    unet.save_adapter_to_dir(target)
    before = (target / WEIGHTS_FILE).read_bytes()

    def crash(sd, path, metadata=None):
        open(path, "wb").write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(adapter_io, "save_state_dict", crash)
    for dest in (target, tmp_path / "new"):
        with pytest.raises(KeyboardInterrupt):
            unet.save_adapter_to_dir(dest)
    assert (target / WEIGHTS_FILE).read_bytes() == before and not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "mine"]  # no temp directories left behind
    with pytest.raises(AdapterDirError, match="no adapter group 'x'"):
        unet.save_adapter_to_dir(tmp_path / "x", name="x")


# ---- configs and sample.py ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_configs_and_the_forms_doc_are_up_to_date(tmp_path):
    """`make configs` regenerates both; a stale committed file fails here."""
    written = make_adapter_configs.main(["--outdir", str(tmp_path), "--docs", str(tmp_path / "forms.md")])
    assert (tmp_path / "forms.md").read_text() == (REPO / "docs" / "adapter-forms.md").read_text(), \
        "rerun make configs (docs/adapter-forms.md)"
    committed = REPO / "configs" / "sd-inject-dreambooth"
    assert sorted(p.name for p in written) == sorted(p.name for p in committed.glob("*.yaml"))
    assert {f"{p.stem}" for p in written} >= set(PAPER_PAIRS)
    for p in written:
        assert p.read_text() == (committed / p.name).read_text(), f"rerun scripts/make_adapter_configs.py ({p.name})"
        specs = parse_adapter_config(OmegaConf.load(p).model.params.unet_config.params.adapter_config)
        assert [f"{s.din}-{s.dout}" for s in specs] == [p.stem]


def _pixels(paths):
    return [np.asarray(Image.open(p)) for p in paths]


@pytest.fixture(scope="module")
def sample_setup(tiny_model_session, tmp_path_factory):
    """A base checkpoint whose output layers are non-zero (so adapters show), and two adapter directories."""
    tmp = tmp_path_factory.mktemp("sample")
    save_state_dict(tiny_model_session.state_dict(), str(tmp / "tiny.safetensors"))
    for name, (din, dout) in {"a1": ("attn2o", "ffni"), "a2": ("resi", "reso")}.items():
        with_adapters(tiny_model_session.unet, adapter_cfg(din, dout, init="default")).save_adapter_to_dir(tmp / name)
    args = ["--config", str(TINY_CONFIG), "--ckpt", str(tmp / "tiny.safetensors"), "--H", "32", "--W", "32",
            "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", "--skip_grid"]
    return tmp, args


@pytest.mark.slow
def test_sample_with_adapter_dirs(sample_setup, tmp_path):
    tmp, args = sample_setup
    a1, a2 = ["--adapter_path", str(tmp / "a1")], ["--adapter_path", str(tmp / "a2")]
    plain = _pixels(sample.main(args + ["--outdir", str(tmp_path / "plain")]))
    with_a1 = _pixels(sample.main(args + a1 + ["--outdir", str(tmp_path / "a1")]))
    zero = _pixels(sample.main(args + a1 + ["--adapter_scale", "0", "--outdir", str(tmp_path / "zero")]))
    both = _pixels(sample.main(args + a1 + a2 + ["--adapter_scale", "1", "--adapter_scale", "0",
                                                 "--outdir", str(tmp_path / "both")]))
    assert not np.array_equal(plain[0], with_a1[0])
    assert np.array_equal(plain[0], zero[0])
    assert np.array_equal(both[0], with_a1[0])  # each directory keeps its own scale


@pytest.mark.slow
def test_sample_random_init_and_original_format(sample_setup, base, tmp_path):
    tmp, _ = sample_setup
    args = ["--config", str(TINY_CONFIG), "--random_init", "--H", "32", "--W", "32", "--ddim_steps", "2",
            "--n_samples", "1", "--n_iter", "1", "--skip_grid"]
    assert len(sample.main(args + ["--adapter_path", str(tmp / "a1"), "--outdir", str(tmp_path / "r")])) == 1
    src = with_adapters(base, adapter_cfg("attn2o", "ffni", init="default"))
    write_original_dir(src, tmp_path / "orig")
    with pytest.raises(SystemExit, match="carries no adapter config"):
        sample.main(args + ["--adapter_path", str(tmp_path / "orig"), "--outdir", str(tmp_path / "o")])
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.unet_config.params.adapter_config = adapter_cfg("attn2o", "ffni")
    OmegaConf.save(config, tmp_path / "tiny-attn2o-ffni.yaml")
    args[1] = str(tmp_path / "tiny-attn2o-ffni.yaml")
    assert len(sample.main(args + ["--adapter_path", str(tmp_path / "orig"), "--outdir", str(tmp_path / "o")])) == 1
    with pytest.raises(SystemExit, match="one --adapter_scale per --adapter_path"):
        sample.main(args + ["--adapter_path", str(tmp / "a1"), "--adapter_scale", "1", "--adapter_scale", "2"])
    with pytest.raises(SystemExit, match="--adapter_path not found"):
        sample.main(args + ["--adapter_path", str(tmp_path / "nowhere"), "--outdir", str(tmp_path / "o")])
