"""ldm.modules.fastpaths: torch.compile in place with an eager fallback and a clear message, the CUDA-only fast paths (TF32,
fused AdamW) off on the CPU, and the wiring of `model.params.compile` and `sample.py --compile`."""
import logging

import pytest
import torch
from omegaconf import OmegaConf

import ldm.modules.fastpaths as fastpaths
import main_dream_booth
import sample
from conftest import REPO, TINY_CONFIG
from ldm.modules.fastpaths import adamw_options, apply_fast_paths, compile_module, is_compiled, use_tf32
from ldm.util.instantiate import instantiate_from_config
from test_train import BASES, argv, base_ckpt, world  # noqa: F401 (base_ckpt and world are fixtures)

CPU = torch.device("cpu")


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


def failing_backend(gm, example_inputs):
    raise RuntimeError("no code generator for this machine")


@pytest.mark.slow
def test_compiled_module_keeps_its_keys_and_outputs():
    model, x = mlp(), torch.randn(3, 8)
    expected, keys = model(x), list(model.state_dict())
    assert compile_module(model, CPU, backend="eager") and is_compiled(model)
    assert torch.allclose(model(x), expected) and list(model.state_dict()) == keys  # no _orig_mod. prefix
    assert compile_module(model, CPU, backend="eager")  # a second call is a no-op


@pytest.mark.slow
def test_a_backend_that_fails_falls_back_to_eager_with_a_warning(caplog):
    model, x = mlp(), torch.randn(3, 8)
    expected = model(x)
    assert compile_module(model, CPU, backend=failing_backend)
    with caplog.at_level(logging.WARNING, logger="ldm.modules.fastpaths"):
        out = model(x)
    assert torch.equal(out, expected) and not is_compiled(model)
    assert "torch.compile failed" in caplog.text and "runs eager from now on" in caplog.text
    caplog.clear()
    model(x)
    assert not caplog.text  # once eager, it stays eager without more warnings


@pytest.mark.slow
def test_an_error_of_the_model_itself_still_raises():
    class Broken(torch.nn.Module):
        def forward(self, x):
            return x @ torch.ones(5, 5)  # wrong shape whatever the compiler

    model = Broken()
    compile_module(model, CPU, backend="eager")
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        model(torch.ones(2, 3))


def test_no_cpp_compiler_means_eager_with_the_reason(monkeypatch, caplog):
    monkeypatch.setattr(fastpaths.shutil, "which", lambda name: None)
    model = mlp()
    with caplog.at_level(logging.WARNING, logger="ldm.modules.fastpaths"):
        assert not compile_module(model, CPU)
    assert "needs a C++ compiler" in caplog.text and "Running eager" in caplog.text
    assert not is_compiled(model) and "forward" not in vars(model)


def test_cuda_fast_paths_stay_off_on_the_cpu():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    assert not use_tf32(CPU)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    assert adamw_options(mlp().parameters()) == {} and adamw_options([]) == {}

    class FakeCudaParam:
        is_cuda = True

        def is_floating_point(self):
            return True
    assert adamw_options([FakeCudaParam(), FakeCudaParam()]) == {"fused": True}
    applied = apply_fast_paths(mlp(), CPU, channels_last=True)
    assert applied == {"tf32": False, "channels_last": True, "compile": False}


def dreambooth_model(**params):
    config = OmegaConf.merge(*[OmegaConf.load(REPO / b) for b in BASES])
    config.model.params.update(params)
    return instantiate_from_config(config.model)


@pytest.mark.slow
def test_dreambooth_compile_option_compiles_the_unet_in_place():
    model = dreambooth_model(compile=True)
    keys = list(model.state_dict())
    model.on_fit_start()
    assert is_compiled(model.unet) == (fastpaths.compile_unavailable(CPU) is None)
    assert list(model.state_dict()) == keys
    optimizer = model.configure_optimizers()["optimizer"]
    assert not optimizer.defaults.get("fused")  # CPU: torch's default AdamW path, numerics unchanged
    plain = dreambooth_model()
    plain.on_fit_start()
    assert not is_compiled(plain.unet)


@pytest.fixture
def compile_calls(monkeypatch):
    """Record what would be compiled (compiling the tiny UNet takes minutes here) and leave it eager."""
    calls = []
    monkeypatch.setattr(fastpaths, "compile_module", lambda module, device, **kw: calls.append(module) or False)
    return calls


@pytest.mark.slow
def test_training_config_key_reaches_the_compiler(world, compile_calls):  # noqa: F811 (the fixture)
    main_dream_booth.main(argv(world, "--max_steps", "1", "model.params.compile=true"))
    assert [type(m).__name__ for m in compile_calls] == ["UNetModel"]


@pytest.mark.slow
def test_sample_compile_flag_reaches_the_compiler(tmp_path, compile_calls):
    base = ["--config", str(TINY_CONFIG), "--random_init", "--H", "32", "--W", "32", "--ddim_steps", "2",
            "--n_samples", "1", "--n_iter", "1", "--skip_grid", "--outdir", str(tmp_path)]
    sample.main(base)
    assert compile_calls == []
    sample.main(base + ["--compile"])
    assert [type(m).__name__ for m in compile_calls] == ["UNetModel"]
