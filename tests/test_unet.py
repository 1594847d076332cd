"""The SD v1 UNet: equivalence with diffusers, checkpoint layout, checkpointing with a frozen base, precisions."""
import ast
import importlib.util
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import covering
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.util.instantiate import count_params, instantiate_from_config

REPO = Path(__file__).resolve().parents[1]
# shared/ sits inside the checkout on some machines and beside it on others
KEYS_TSV = next((p for p in (REPO / "shared" / "sd-v1-keys.tsv", REPO.parent / "shared" / "sd-v1-keys.tsv")
                 if p.exists()), REPO / "shared" / "sd-v1-keys.tsv")
SD_CONFIG = REPO / "configs" / "stable-diffusion" / "v1-inference.yaml"
TINY_CONFIG = REPO / "configs" / "tests" / "tiny-inference.yaml"
# SD v1's shape in miniature: 2 res blocks per level, attention on all levels but the last (as SD's [4, 2, 1] of 4)
SMALL_UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
                  num_res_blocks=2, channel_mult=[1, 2, 2], num_heads=2, use_spatial_transformer=True,
                  transformer_depth=1, context_dim=32, use_checkpoint=False, legacy=False)


def load_bench():
    """bench/bench_unet.py as a module: its diffusers twin is the one the benchmark times, so it is tested here."""
    spec = importlib.util.spec_from_file_location("bench_unet", REPO / "bench" / "bench_unet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_config(unet_params: dict = None):
    """The tiny full-model config, optionally with other UNet params (diffusers' config builder reads the VAE too)."""
    config = OmegaConf.load(TINY_CONFIG).model
    if unet_params is not None:
        config.params.unet_config.params = unet_params
    return config


def random_unet(config, seed: int = 0) -> UNetModel:
    """A UNet with nothing left at its structured init: zero convs random, norms' (1, 0) perturbed; eval mode."""
    torch.manual_seed(seed)
    unet = instantiate_from_config(config.params.unet_config)
    with torch.no_grad():
        for p in unet.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
            elif not p.any():  # out, proj_out, out_layers convs: zero would hide everything behind them
                p.normal_(0.0, 0.05)
    return unet.eval()


def inputs(context_dim: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 7, context_dim, generator=g)
    return x, torch.tensor([10, 980]), context


@pytest.mark.parametrize("unet_params", covering([None, SMALL_UNET]), ids=["tiny-config", "small-sd-shaped"])
def test_matches_diffusers_unet(unet_params):
    pytest.importorskip("diffusers")
    config = model_config(unet_params)
    unet = random_unet(config)
    ref = load_bench().diffusers_twin(unet, config)  # diffusers' own converter, strict load
    x, t, context = inputs(config.params.unet_config.params.context_dim)
    with torch.no_grad():
        ours, theirs = unet(x, t, context), ref(x, t, encoder_hidden_states=context).sample
    diff = (ours - theirs).abs().max().item()
    print(f"max abs diff vs diffusers: {diff:.3g}")
    assert ours.shape == x.shape
    assert ours.abs().max() > 1e-1 and (ours[0] - ours[1]).abs().max() > 1e-2  # not a near-constant output
    assert diff <= 1e-4


@pytest.mark.skipif(not KEYS_TSV.exists(), reason=f"sd-v1-keys.tsv not found in {REPO}/shared or {REPO.parent}/shared")
def test_sd_v1_state_dict_matches_checkpoint_layout():
    with torch.device("meta"):
        model = instantiate_from_config(OmegaConf.load(SD_CONFIG).model)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {}
    for line in KEYS_TSV.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split("\t")
            expected[key] = tuple(int(s) for s in shape.split(",") if s)
    assert len(expected) == 1143
    assert sorted(set(ours) ^ set(expected)) == []
    assert {k: s for k, s in ours.items() if expected[k] != s} == {}
    assert count_params(model.model.diffusion_model) == 859_520_964
    assert count_params(model.first_stage_model) == 83_653_863
    assert count_params(model.cond_stage_model) == 123_060_480


def test_gradient_checkpointing_with_frozen_base():
    """Only two small layers train, both inside blocks whose inputs need no grad (the reentrant helper's blind spot)."""
    config = model_config(SMALL_UNET)
    unet = random_unet(config).train()
    unet.requires_grad_(False)
    trainable = {"input_blocks.1.0.emb_layers.1", "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0"}
    modules = dict(unet.named_modules())
    for name in trainable:
        modules[name].requires_grad_(True)
    calls = []
    modules["input_blocks.1.1.transformer_blocks.0.attn2"].register_forward_hook(lambda *_: calls.append(1))
    x, t, context = inputs(32)
    grads = {}
    for enabled in (False, True):
        unet.set_gradient_checkpointing(enabled)
        unet.zero_grad(set_to_none=True)
        calls.clear()
        unet(x, t, context).square().mean().backward()
        assert len(calls) == (2 if enabled else 1)  # the block really was recomputed in backward
        grads[enabled] = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
    assert set(grads[False]) == set(grads[True]) == {f"{n}.{p}" for n in trainable for p in ("weight", "bias")}
    for name, g in grads[False].items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(grads[True][name], g, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_bf16_autocast_and_full_bf16_forward():
    config = model_config(SMALL_UNET)
    unet = random_unet(config)
    x, t, context = inputs(32)
    with torch.no_grad():
        ref = unet(x, t, context)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = unet(x, t, context)
        full = unet.to(torch.bfloat16)(x.bfloat16(), t, context.bfloat16())
    assert torch.isfinite(ref).all()
    for out in (mixed, full):
        assert out.shape == x.shape and torch.isfinite(out.float()).all()
        assert (out.float() - ref).norm() / ref.norm() < 0.05  # bf16 rounding, not a different function
    assert full.dtype == torch.bfloat16


def test_no_device_literals_in_ldm():
    """Devices come from tensors and modules; only the device helpers (ldm.util.devices.pick_device, which chooses
    one, and ldm.checks.device_arg, which checks the user's) may name CUDA."""
    literal = re.compile(r"""\.cuda\(|["']cuda(:\d+)?["']""")
    helpers = {REPO / "ldm" / "util" / "devices.py": "pick_device", REPO / "ldm" / "checks.py": "device_arg"}
    allowed = {path: [(n.lineno, n.end_lineno) for n in ast.walk(ast.parse(path.read_text()))
                      if isinstance(n, ast.FunctionDef) and n.name == name] for path, name in helpers.items()}
    assert all(allowed.values()), "a device helper named here has moved: update this test"
    offenders = []
    for path in sorted((REPO / "ldm").rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if literal.search(line) and not any(a <= i <= b for a, b in allowed.get(path, [])):
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert offenders == []
