"""Safe, atomic checkpoint I/O in the original SD v1 layout, with errors that name the problem."""
import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

# Keys real SD v1 files carry beyond the model's own: tolerated and dropped.
TOLERATED_PREFIXES = ("model_ema.",)
TOLERATED_SUFFIXES = ("embeddings.position_ids",)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


class _Stub:
    """Stands in for any non-tensor object pickled into a Lightning checkpoint (callbacks, hparams)."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Stub()

    def __setstate__(self, state):
        pass


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds tensors and plain containers, and never runs anything else."""

    _ALLOWED = {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
                ("torch._utils", "_rebuild_parameter"), ("numpy.core.multiarray", "scalar"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED or (module == "torch" and name.endswith("Storage")):
            return super().find_class(module, name)
        return _Stub


class _restricted_pickle:
    """A pickle-module stand-in for torch.load that uses the restricted unpickler."""

    Unpickler = _RestrictedUnpickler
    load = staticmethod(lambda f, **kw: _RestrictedUnpickler(f, **kw).load())


def _torch_load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):
            raise
        # Original Lightning checkpoints pickle callback objects; rebuild tensors only, stub the rest.
        log.info("%s holds non-tensor objects; loading its tensors with a restricted unpickler", path)
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)


def _read(path: str, what: str = "checkpoint") -> object:
    """The object in a `.ckpt`/`.pt` or `.safetensors` file, read safely on the CPU; unreadable files are named."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{what} not found: '{path}' (pass the path of an SD v1 .ckpt or .safetensors)")
    try:
        return load_file(str(p)) if p.suffix == ".safetensors" else _torch_load(p)
    except Exception as e:  # noqa: BLE001 - any failure to parse means the file is not a usable checkpoint
        raise CheckpointError(f"cannot read {what} '{path}': the file is truncated, corrupt or not a checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def load_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read a `.ckpt`/`.pt` (a `state_dict` inside or at top level) or `.safetensors` file safely, on the CPU."""
    sd = _read(path)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"'{path}' holds no tensors: it is not a model checkpoint")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _is_tolerated(key: str) -> bool:
    return key.startswith(TOLERATED_PREFIXES) or key.endswith(TOLERATED_SUFFIXES)


def _architecture_hint(sd: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> str:
    if any(k.startswith("cond_stage_model.model.") for k in sd):
        return (" It looks like a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder); this project implements "
                "SD v1 (CLIP ViT-L/14, context_dim 768).")
    k = next((k for k in expected if k.endswith("attn2.to_k.weight")), None)
    if k in sd and sd[k].shape != expected[k].shape:
        return (f" Its cross-attention context width is {sd[k].shape[1]}, the config's is {expected[k].shape[1]}: "
                "the checkpoint was made for another architecture or config.")
    return ""


def load_into(model: torch.nn.Module, sd: Dict[str, torch.Tensor], source: str = "checkpoint",
              optional: Callable[[str], bool] = lambda k: False, strict: bool = True) -> None:
    """Copy `sd` into `model`, failing with the names of missing, unexpected or mis-shaped keys.

    `optional(key)` marks model keys a base checkpoint may lack (e.g. freshly injected adapters).
    """
    expected = model.state_dict()
    sd = {k: v for k, v in sd.items() if k in expected or not _is_tolerated(k)}
    missing = [k for k in expected if k not in sd and not optional(k)]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in sd if k in expected and sd[k].shape != expected[k].shape]
    problems = []
    for label, keys in (("missing", missing), ("mis-shaped", wrong), ("unexpected", unexpected if strict else [])):
        if keys:
            problems.append(f"{len(keys)} {label} key(s), e.g. {', '.join(keys[:3])}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems) + "."
                              + _architecture_hint(sd, expected))
    model.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=False, assign=_on_meta(model))


def _on_meta(model: torch.nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Write a file via `write(tmp_path)` then rename it into place, so a crash never leaves half a file."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the final file ordinary permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_state_dict(sd: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """Save tensors atomically: safetensors for `.safetensors`, else a `{"state_dict": ...}` torch file."""
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}
    if str(path).endswith(".safetensors"):
        atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=metadata))
    else:
        atomic_write(path, lambda tmp: torch.save({"state_dict": sd}, tmp))


def select(sd: Dict[str, torch.Tensor], prefixes: Iterable[str]) -> Dict[str, torch.Tensor]:
    """The entries of `sd` whose key starts with one of `prefixes`."""
    prefixes = tuple(prefixes)
    return {k: v for k, v in sd.items() if k.startswith(prefixes)}


def load_trained_parameters(model: torch.nn.Module, path: str, skip: Optional[Callable[[str], bool]] = None
                            ) -> Optional[int]:
    """Copy the trained parameters of a main_dream_booth.py training checkpoint (`last.ckpt`: the state_dict of what
    trained) into `model`, leaving out the keys `skip` selects (e.g. the adapters', when they come from their
    directory). Returns the checkpoint's step."""
    checkpoint = _read(path, "training checkpoint")
    trained = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(trained, dict):
        raise CheckpointError(f"'{path}' is not a main_dream_booth.py training checkpoint (it has no state_dict)")
    if skip is not None:
        trained = {k: v for k, v in trained.items() if not skip(k)}
        if not trained:
            raise CheckpointError(f"'{path}' holds adapters only (the base was frozen): load its <step>-adapters "
                                  "directory instead")
    load_into(model, trained, f"training checkpoint '{path}'", optional=lambda k: True)  # a part of the model
    return checkpoint.get("global_step")
