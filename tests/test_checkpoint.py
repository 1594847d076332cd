"""Checkpoint I/O: original layouts load safely, our files round-trip, bad files get clear errors."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY_CONFIG, build_tiny
from ldm.checkpoint import CheckpointError, load_into, load_state_dict, save_state_dict
from ldm.util import load_model_from_config


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_round_trip(tiny_model, tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    save_state_dict(tiny_model.state_dict(), path)
    fresh = load_model_from_config(OmegaConf.load(TINY_CONFIG), str(path))
    assert _same_weights(tiny_model, fresh)
    assert not list(tmp_path.glob(".tmp-*")), "atomic write left a temporary file behind"


def test_original_lightning_checkpoint_loads_without_running_code(tiny_model, tmp_path):
    """Real sd-v1-*.ckpt files pickle Lightning objects; we rebuild tensors and execute nothing else."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    sd = dict(tiny_model.state_dict())
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["model_ema.decay"] = torch.tensor(0.9999)
    path = tmp_path / "sd-v1-tiny.ckpt"
    torch.save({"state_dict": sd, "global_step": 470000, "callbacks": {"x": Evil()}}, path)
    fresh = build_tiny(seed=1)
    load_into(fresh, load_state_dict(str(path)))
    assert not marker.exists()
    assert _same_weights(tiny_model, fresh)


def test_missing_and_misshaped_keys_are_named(tiny_model, tmp_path):
    sd = dict(tiny_model.state_dict())
    del sd["model.diffusion_model.out.2.bias"]
    sd["first_stage_model.quant_conv.weight"] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(CheckpointError, match=r"missing key\(s\), e.g. model.diffusion_model.out.2.bias") as e:
        load_into(build_tiny(), sd)
    assert "first_stage_model.quant_conv.weight: file (1, 1, 1, 1) vs model (8, 8, 1, 1)" in str(e.value)


def test_sd2_checkpoint_is_recognised(tiny_model):
    sd = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith("cond_stage_model.")}
    sd["cond_stage_model.model.token_embedding.weight"] = torch.zeros(49408, 1024)
    with pytest.raises(CheckpointError, match="Stable Diffusion 2.x"):
        load_into(build_tiny(), sd)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_truncated_file(tiny_model, tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    save_state_dict(tiny_model.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a checkpoint"):
        load_state_dict(str(path))


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_state_dict(str(text))
    obj = tmp_path / "list.pt"
    torch.save([1, 2, 3], obj)
    with pytest.raises(CheckpointError, match="holds no tensors"):
        load_state_dict(str(obj))
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_state_dict(str(tmp_path / "absent.ckpt"))
