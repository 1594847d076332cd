"""Checkpoint I/O: original layouts load safely, our files round-trip, bad files get clear errors."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY_CONFIG, build_tiny, covering
from ldm.checkpoint import CheckpointError, load_into, load_state_dict, save_state_dict
from ldm.util.instantiate import load_model_from_config


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_round_trip(tiny_model_readonly, tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    save_state_dict(tiny_model_readonly.state_dict(), path)
    fresh = load_model_from_config(OmegaConf.load(TINY_CONFIG), str(path))
    assert _same_weights(tiny_model_readonly, fresh)
    assert not list(tmp_path.glob(".tmp-*")), "atomic write left a temporary file behind"


def test_original_lightning_checkpoint_loads_without_running_code(tiny_model_readonly, tmp_path):
    """Real sd-v1-*.ckpt files pickle Lightning objects (a ModelCheckpoint and its file system): we rebuild tensors
    and build nothing else."""
    import pytorch_lightning as pl
    sd = dict(tiny_model_readonly.state_dict())
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["model_ema.decay"] = torch.tensor(0.9999)
    path = tmp_path / "sd-v1-tiny.ckpt"
    torch.save({"state_dict": sd, "global_step": 470000, "callbacks": {"x": pl.callbacks.ModelCheckpoint()}}, path)
    fresh = build_tiny(seed=1)
    load_into(fresh, load_state_dict(str(path)))
    assert _same_weights(tiny_model_readonly, fresh)


class Touch:
    """Pickles as a call of pathlib's Path.touch on `marker` (through getattr): code that writes a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


class System:
    def __reduce__(self):
        import os
        return (os.system, ("true",))


@pytest.mark.parametrize("payload,called,legacy", covering(
    [(p, c, legacy) for legacy in (False, True) for p, c in (("touch", "getattr"), ("system", r"(posix|nt)\.system"))],
    lambda payload, called, legacy: payload, lambda payload, called, legacy: legacy))
def test_a_checkpoint_with_pickled_code_is_refused_by_name_and_nothing_runs(tiny_model_readonly, tmp_path, payload,
                                                                             called, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "sd-v1-tiny.ckpt"
    evil = Touch(marker) if payload == "touch" else System()
    torch.save({"state_dict": dict(tiny_model_readonly.state_dict()), "callbacks": {"x": evil}}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match=rf"holds pickled code: loading it with plain pickle would call "
                                              rf".*{called}.*Nothing in it was run") as e:
        load_state_dict(str(path))
    assert "corrupt" not in str(e.value) and not marker.exists()


def test_missing_and_misshaped_keys_are_named(tiny_model_readonly, tmp_path):
    sd = dict(tiny_model_readonly.state_dict())
    del sd["model.diffusion_model.out.2.bias"]
    sd["first_stage_model.quant_conv.weight"] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(CheckpointError, match=r"missing key\(s\), e.g. model.diffusion_model.out.2.bias") as e:
        load_into(build_tiny(), sd)
    assert "first_stage_model.quant_conv.weight: file (1, 1, 1, 1) vs model (8, 8, 1, 1)" in str(e.value)


def test_sd2_checkpoint_is_recognised(tiny_model_readonly):
    sd = {k: v for k, v in tiny_model_readonly.state_dict().items() if not k.startswith("cond_stage_model.")}
    sd["cond_stage_model.model.token_embedding.weight"] = torch.zeros(49408, 1024)
    with pytest.raises(CheckpointError, match="Stable Diffusion 2.x"):
        load_into(build_tiny(), sd)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_truncated_file(tiny_model_readonly, tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    save_state_dict(tiny_model_readonly.state_dict(), path)
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


# ---- finite numbers only (issue 26) -----------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_file_holding_nan_or_inf_is_refused_naming_the_tensor(tmp_path, suffix, bad):
    from safetensors.torch import save_file
    sd = {"a.weight": torch.ones(3, 4), "b.weight": torch.ones(5)}
    sd["b.weight"][2] = bad
    path = tmp_path / f"w{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": sd}, path)
    kind = "1 NaN and 0 inf" if bad != bad else "0 NaN and 1 inf"
    with pytest.raises(CheckpointError, match=rf"holds non-finite weights: tensor 'b.weight' has {kind} of its 5 "
                                              "values.*use an earlier checkpoint"):
        load_state_dict(str(path))


def test_writing_nan_or_inf_is_refused_and_writes_nothing(tmp_path):
    sd = {"a": torch.ones(4), "b": torch.tensor([1.0, float("inf")]), "c": torch.full((2,), float("nan"))}
    for name in ("w.safetensors", "w.ckpt"):
        with pytest.raises(CheckpointError, match=r"refusing to write .*tensor 'b' holds 0 NaN and 1 inf of its 2 "
                                                  r"values \(and 1 more tensor\(s\)\); nothing was written"):
            save_state_dict(sd, tmp_path / name)
    assert list(tmp_path.iterdir()) == []
    save_state_dict({"a": torch.ones(2, dtype=torch.float16), "i": torch.arange(3)}, tmp_path / "ok.safetensors")


def test_the_finiteness_check_covers_every_floating_dtype():
    from ldm.checkpoint import non_finite
    sd = {f"{dtype}": torch.tensor([1.0, float("nan")]).to(dtype) for dtype in (torch.float16, torch.bfloat16,
                                                                             torch.float32, torch.float64)}
    sd["int"] = torch.tensor([1, 2])
    sd["complex"] = torch.tensor([1 + 1j, complex(float("inf"), 0)])
    assert sorted(non_finite(sd)) == sorted(k for k in sd if k != "int")


def test_a_full_disk_leaves_no_partial_file_and_keeps_the_previous_one(tmp_path):
    import errno
    from ldm.checkpoint import DiskFullError, atomic_write

    def fills_the_disk(tmp):
        Path(tmp).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    def torch_full_disk(tmp):  # what torch.save says on a full disk (measured on a 1 MiB tmpfs)
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    with pytest.raises(DiskFullError, match=r"no space left on the device writing '.*new.bin' \(no file was written"):
        atomic_write(tmp_path / "new.bin", fills_the_disk)
    (tmp_path / "old.bin").write_text("previous")
    with pytest.raises(DiskFullError, match=r"writing '.*old.bin' \(the previous file is kept; nothing partial"):
        atomic_write(tmp_path / "old.bin", fills_the_disk)
    with pytest.raises(RuntimeError, match="unexpected pos"):  # with free space, not a full disk: passed on as it is
        atomic_write(tmp_path / "old.bin", torch_full_disk)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.bin"]
    assert (tmp_path / "old.bin").read_text() == "previous"
