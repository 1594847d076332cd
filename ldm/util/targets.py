"""What a config's `target` may name. A run's config.yaml names what gets built, so a downloaded run dir could name
any callable (subprocess.call): without --allow_any_target only classes from `SAFE_TARGET_PREFIXES` are built. Not
all of torch or Lightning: a class such as torch.distributed.elastic's SubprocessHandler starts a program from its
constructor's arguments."""

import contextvars
import importlib
from contextlib import contextmanager
from typing import Any, Iterator

from ldm.checks import ConfigError


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Import `package.module.Name` and return `Name`, with an error that says which part is wrong."""
    module_name, _, cls = string.rpartition(".")
    if not module_name:
        raise ConfigError(f"target '{string}' is not a dotted path like 'ldm.models.diffusion.ddpm.LatentDiffusion'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"target '{string}': cannot import module '{module_name}' ({e})") from None
    if reload:
        module = importlib.reload(module)
    if not hasattr(module, cls):
        raise ConfigError(f"target '{string}': module '{module_name}' has no attribute '{cls}'")
    return getattr(module, cls)


SAFE_TARGET_PREFIXES = ("ldm.", "torch.nn.", "torch.optim.", "pytorch_lightning.callbacks.",
                        "lightning.pytorch.callbacks.")

ALLOW_FLAG = "--allow_any_target"

_allow_any_target = contextvars.ContextVar("allow_any_target", default=False)


@contextmanager
def any_target_allowed(allowed: bool = True) -> Iterator[None]:
    """Within the block, configs may name any importable callable as `target` (the user's own code)."""
    token = _allow_any_target.set(allowed)
    try:
        yield
    finally:
        _allow_any_target.reset(token)


def _is_safe_module(name: str) -> bool:
    return any(name.startswith(p) or name == p[:-1] for p in SAFE_TARGET_PREFIXES)


def _refusal(target: str, what: str = "") -> str:
    return (f"refused to build target '{target}'{what} named by a config: only classes from "
            f"{', '.join(p + '*' for p in SAFE_TARGET_PREFIXES)} are built by default, as a config (a downloaded "
            f"run's config.yaml) can run any program through its targets. If it is your own code, pass {ALLOW_FLAG}")


def resolve_target(target: Any) -> Any:
    """The callable a config's `target` names; outside the allow-list (`SAFE_TARGET_PREFIXES`, classes only) it is
    refused before its module is imported, unless `any_target_allowed()`."""
    if not isinstance(target, str):
        raise ConfigError(f"target must be a dotted path string, got {target!r}")
    if "." not in target.strip("."):
        return get_obj_from_str(target)  # the "not a dotted path" error
    allow_any = _allow_any_target.get()
    if not allow_any and not _is_safe_module(target):
        raise ConfigError(_refusal(target))
    obj = get_obj_from_str(target)
    if allow_any or (isinstance(obj, type) and _is_safe_module(f"{obj.__module__}.")):
        return obj
    what = f"{obj.__module__}.{obj.__qualname__}" if isinstance(obj, type) else f"a {type(obj).__name__}, not a class"
    raise ConfigError(_refusal(target, f" ({what})"))
