"""Safe, atomic checkpoint I/O in the original SD v1 layout, with errors that name the problem.

Every tensor file read or written here is checked to hold finite numbers (a NaN or inf weight gives black or noisy
images without a word otherwise), a file with pickled code in it is refused by name (nothing in it is run), and a write
that fills the disk leaves no partial file and says so (`DiskFullError`).
"""
import errno
import io
import logging
import os
import pickle
import pickletools
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Set

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

# Keys real SD v1 files carry beyond the model's own: tolerated and dropped.
TOLERATED_PREFIXES = ("model_ema.",)
TOLERATED_SUFFIXES = ("embeddings.position_ids",)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


class NonFiniteWeightsError(CheckpointError):
    """A tensor file that holds NaN or inf values, or a write that would create one."""


class DiskFullError(OSError):
    """A write that ran out of disk space (or quota); the half-written temporary file is removed."""

    def __str__(self) -> str:
        return str(self.strerror)


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


# Globals whose call in a pickle runs code (a program, a file or network operation, any Python): a file naming one is
# refused by name. Others (Lightning callbacks, argparse namespaces) are stubbed by _RestrictedUnpickler; nothing in a
# pickle is ever called either way.
CODE_MODULES = ("os", "posix", "nt", "sys", "subprocess", "shutil", "socket", "runpy", "importlib", "ctypes", "pty",
                "code", "codeop", "webbrowser", "multiprocessing", "pickle", "_pickle", "marshal", "types",
                "operator", "functools", "inspect", "io", "_io", "tempfile", "platform", "asyncio", "signal",
                "threading", "commands", "urllib", "http", "requests", "dill", "cloudpickle", "torch.hub",
                "torch.distributed", "torch.serialization", "torch.ops", "torch.jit", "numpy.load", "pandas")
HARMLESS_BUILTINS = {"set", "frozenset", "slice", "complex", "bytearray", "range", "bytes", "dict", "list", "tuple",
                     "int", "float", "bool", "str", "object"}
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def _pickle_streams(path: Path) -> Iterator[io.BufferedIOBase]:
    """The pickles of a torch file: data.pkl of the zip format, else the legacy / plain pickle stream."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if name.endswith("data.pkl"):
                    with z.open(name) as f:
                        yield io.BytesIO(f.read())
    else:
        with open(path, "rb") as f:
            yield f


def pickled_globals(path: Path) -> Set[str]:
    """The `module.name` globals the pickles in `path` would look up when loaded, read from the opcodes without
    running anything (GLOBAL, and STACK_GLOBAL with its strings pushed directly or fetched from the memo)."""
    found: Set[str] = set()
    for stream in _pickle_streams(path):
        for _ in range(5):  # the legacy format: magic number, protocol, system info, object, storage keys
            stack, memo = [], {}
            try:
                for op, arg, _pos in pickletools.genops(stream):
                    name = op.name
                    if name == "GLOBAL":
                        found.add(arg.replace(" ", "."))
                    elif name == "STACK_GLOBAL" and len(stack) >= 2:
                        found.add(f"{stack[-2]}.{stack[-1]}")
                    elif name == "MEMOIZE":
                        memo[len(memo)] = stack[-1] if stack else None
                    elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                        memo[arg] = stack[-1] if stack else None
                    if name in _STRING_OPS or name in ("GET", "BINGET", "LONG_BINGET"):
                        stack.append(arg if name in _STRING_OPS else memo.get(arg))
                    elif name not in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "FRAME", "PROTO"):
                        stack.append(None)
            except (ValueError, EOFError):  # not (or no more) pickle data: what was found stays found
                break
    return found


def pickled_code(path: Path) -> Optional[str]:
    """A global in the pickles of `path` that would run code when loaded with plain pickle (None when there is
    none, or the file cannot be parsed as pickles)."""
    for name in sorted(pickled_globals(path)):
        module, _, attr = name.rpartition(".")
        if module in ("builtins", "__builtin__") and attr not in HARMLESS_BUILTINS:
            return name
        if any(name == m or name.startswith(m + ".") for m in CODE_MODULES):
            return name
    return None


def _torch_load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        code = pickled_code(path)
        if code:
            raise CheckpointError(f"'{path}' holds pickled code: loading it with plain pickle would call {code}. "
                                  "Nothing in it was run, and it is refused; use weights saved as .safetensors (or a "
                                  "checkpoint of tensors only) from a source you trust") from None
        if "Unsupported global" not in str(e):
            raise
        # Original Lightning checkpoints pickle callback objects; rebuild tensors only, stub the rest.
        log.info("%s holds non-tensor objects; loading its tensors with a restricted unpickler", path)
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)


def check_file(path: str, what: str = "checkpoint") -> None:
    """A CheckpointError unless `path` is a file with something in it (checked before any work starts)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{what} not found: '{path}' (pass the path of an SD v1 .ckpt or .safetensors)")
    if p.stat().st_size == 0:
        raise CheckpointError(f"cannot read {what} '{path}': the file is empty (0 bytes), e.g. from an interrupted "
                              "copy or a full disk")


def _read(path: str, what: str = "checkpoint") -> object:
    """The object in a `.ckpt`/`.pt` or `.safetensors` file, read safely on the CPU; unreadable files are named."""
    check_file(path, what)
    p = Path(path)
    try:
        return load_file(str(p)) if p.suffix == ".safetensors" else _torch_load(p)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to parse means the file is not a usable checkpoint
        detail = (str(e).strip().splitlines() or ["no message"])[0][:200]
        raise CheckpointError(f"cannot read {what} '{path}': the file is truncated, corrupt or not a checkpoint "
                              f"({type(e).__name__}: {detail})") from None


def load_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read a `.ckpt`/`.pt` (a `state_dict` inside or at top level) or `.safetensors` file safely, on the CPU."""
    sd = _read(path)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"'{path}' holds no tensors: it is not a model checkpoint")
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    check_finite(sd, f"'{path}'")
    return sd


# ---- finite numbers only ----------------------------------------------------------------------------------------
def _finite(t: torch.Tensor) -> bool:
    if t.is_meta or not (t.is_floating_point() or t.is_complex()):
        return True
    try:
        return bool(torch.isfinite(t).all())
    except (RuntimeError, TypeError):  # a dtype isfinite does not implement (e.g. float8): check it as float32
        return bool(torch.isfinite(t.float()).all())


def non_finite(sd: Dict[str, torch.Tensor]) -> Iterator[str]:
    """The names of the tensors of `sd` that hold a NaN or an infinity (one pass over each floating tensor)."""
    return (k for k, v in sd.items() if isinstance(v, torch.Tensor) and not _finite(v))


def check_finite(sd: Dict[str, torch.Tensor], source: str, writing: bool = False) -> None:
    """A NonFiniteWeightsError naming the first tensor of `sd` that holds NaN or inf (and how many others do); when
    `writing`, the error says that nothing was written."""
    bad = list(non_finite(sd))
    if not bad:
        return
    t = sd[bad[0]].detach().float()
    counts = f"{int(torch.isnan(t).sum())} NaN and {int(torch.isinf(t).sum())} inf of its {t.numel()} values"
    more = f" (and {len(bad) - 1} more tensor(s))" if len(bad) > 1 else ""
    if writing:
        raise NonFiniteWeightsError(
            f"refusing to write {source}: tensor '{bad[0]}' holds {counts}{more}; nothing was written. The "
            "computation overflowed or diverged (e.g. a scale or alpha too large, or --half beyond float16's 65504)")
    raise NonFiniteWeightsError(
        f"{source} holds non-finite weights: tensor '{bad[0]}' has {counts}{more}. They would give black or noisy "
        "images: the file comes from a training run that diverged or is damaged; use an earlier checkpoint")


def training_tensors(checkpoint: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The weights and optimizer states of a Lightning checkpoint by dotted name (not the callbacks' states: a
    ModelCheckpoint keeps an infinite 'kth_value' by design)."""
    found: Dict[str, torch.Tensor] = {}

    def walk(obj: Any, name: str) -> None:
        if isinstance(obj, torch.Tensor):
            found[name] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{name}.{i}")
    walk({k: checkpoint[k] for k in ("state_dict", "optimizer_states") if k in checkpoint}, "")
    return found


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


def atomic_write(path: str, write: Callable[[str], None], replace: bool = True) -> None:
    """Write a file via `write(tmp_path)` then move it into place, so a crash never leaves half a file. With
    `replace=False` an existing file is never replaced (FileExistsError; the name is taken atomically, so two writers
    at once never overwrite each other)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        try:
            write(tmp)
        except Exception as e:  # noqa: BLE001 - writers report a full disk as OSError, RuntimeError, or their own
            if is_disk_full(e, directory):
                kept = "the previous file is kept" if os.path.exists(path) else "no file was written"
                raise DiskFullError(errno.ENOSPC, f"no space left on the device writing '{path}' ({kept}; nothing "
                                    "partial is left)") from None
            raise
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the final file ordinary permissions
        if replace:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXTS = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
ALMOST_FULL = 1 << 20  # bytes: a write that failed with less than this free on its file system ran out of space


def is_disk_full(e: BaseException, directory: Optional[str] = None) -> bool:
    """Whether `e` is a write failing for want of disk space: ENOSPC / EDQUOT, a library's message of them
    (safetensors: 'os error 28'), or any failure of a write into `directory` when its file system is full (torch.save
    reports a full disk as 'unexpected pos')."""
    if isinstance(e, DiskFullError) or (isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS):
        return True
    if any(text in str(e).lower() for text in DISK_FULL_TEXTS):
        return True
    if directory is None:
        return False
    try:
        return shutil.disk_usage(directory).free < ALMOST_FULL
    except OSError:
        return False


def _link_new(tmp: str, path: str) -> None:
    """Give `tmp`'s content the name `path` unless that name exists (FileExistsError)."""
    try:
        os.link(tmp, path)  # atomic, and fails when the name exists
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS):
            raise
        with open(tmp, "rb") as src, open(path, "xb") as dst:  # no hard links here: exclusive, not atomic
            dst.write(src.read())


def save_state_dict(sd: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """Save tensors atomically: safetensors for `.safetensors`, else a `{"state_dict": ...}` torch file."""
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}
    check_finite(sd, f"'{path}'", writing=True)
    if str(path).endswith(".safetensors"):
        atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=metadata))
    else:
        atomic_write(path, lambda tmp: torch.save({"state_dict": sd}, tmp))


def select(sd: Dict[str, torch.Tensor], prefixes: Iterable[str]) -> Dict[str, torch.Tensor]:
    """The entries of `sd` whose key starts with one of `prefixes`."""
    prefixes = tuple(prefixes)
    return {k: v for k, v in sd.items() if k.startswith(prefixes)}


def read_training_checkpoint(path: str) -> Dict:
    """A main_dream_booth.py training checkpoint (`last.ckpt`: the trained state_dict, optimizer, step), read safely;
    a file that is not one is named, with what to do about it."""
    fix = ("move it away to train the run again from step 0 (its adapter directories are kept), or put back a copy "
           "of the file")
    try:
        checkpoint = _read(path, "training checkpoint")
    except CheckpointError as e:
        raise CheckpointError(f"{e}: {fix}") from None
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict)
            and isinstance(checkpoint.get("global_step"), int)):
        raise CheckpointError(f"'{path}' is not a main_dream_booth.py training checkpoint (no state_dict and "
                              f"global_step): {fix}")
    check_finite(training_tensors(checkpoint), f"training checkpoint '{path}'")
    return checkpoint


def load_trained_parameters(model: torch.nn.Module, path: str, skip: Optional[Callable[[str], bool]] = None
                            ) -> Optional[int]:
    """Copy the trained parameters of a main_dream_booth.py training checkpoint (`last.ckpt`: the state_dict of what
    trained) into `model`, leaving out the keys `skip` selects (e.g. the adapters', when they come from their
    directory). Returns the checkpoint's step."""
    checkpoint = _read(path, "training checkpoint")
    trained = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(trained, dict):
        raise CheckpointError(f"'{path}' is not a main_dream_booth.py training checkpoint (it has no state_dict)")
    check_finite(trained, f"training checkpoint '{path}'")
    if skip is not None:
        trained = {k: v for k, v in trained.items() if not skip(k)}
        if not trained:
            raise CheckpointError(f"'{path}' holds adapters only (the base was frozen): load its <step>-adapters "
                                  "directory instead")
    load_into(model, trained, f"training checkpoint '{path}'", optional=lambda k: True)  # a part of the model
    return checkpoint.get("global_step")
