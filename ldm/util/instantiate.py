"""The CompVis config convention: `{target, params}` built as `target(**params)`, checked first (the target allowed,
every key a parameter it takes, its numbers within the target's `PARAM_RANGES`); the model of a config, and its size."""

import difflib
import inspect
from typing import Any, List, Mapping, Optional, Sequence, Set

import torch

from ldm.checks import ConfigError, check_number
from ldm.util.targets import resolve_target


def check_ranges(cls: type, params: Mapping, where: str = "") -> None:
    """Check the numbers among `params` against the `PARAM_RANGES` ({key: check_number options}) of `cls` and its base
    classes; the error names `where` + key."""
    for klass in getattr(cls, "__mro__", ()):
        for key, limits in vars(klass).get("PARAM_RANGES", {}).items():
            if key in params:
                check_number(params[key], f"{where}{key}", **limits)


def _init_chain(obj: Any) -> List[Any]:
    """The constructors a class's keyword arguments may reach (its MRO's own __init__s), or [function]."""
    if not isinstance(obj, type):
        return [obj]
    return [c for c in obj.__mro__ if "__init__" in vars(c)]


def accepted_keys(obj: Any) -> Optional[Set[str]]:
    """The keyword arguments `obj(**params)` accepts, or None when it takes any.

    A class's __init__ that takes **kwargs is taken to pass them on to the next __init__ of its MRO, unless it names
    the extra keys it accepts in `_IGNORED` (LatentDiffusion: keys of the original configs that it does not use).
    """
    names: Set[str] = set()
    for step in _init_chain(obj):
        fn = step.__init__ if isinstance(step, type) else step
        try:
            params = list(inspect.signature(fn).parameters.values())[1 if isinstance(step, type) else 0:]
        except (TypeError, ValueError):  # a builtin without a signature: no check
            return None
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names
        if isinstance(step, type) and "_IGNORED" in vars(step):
            return names | set(step._IGNORED)
        if not isinstance(step, type):
            return None
    return names


def nearest(key: str, choices: Sequence[str]) -> str:
    """A hint for a misspelt `key`: ' (did you mean ...?)' with the closest of `choices`, else the choices."""
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f"; valid keys: {', '.join(sorted(choices))}" if choices else ""


def check_keys(obj: Any, keys: Sequence[str], where: str) -> None:
    """Refuse keyword arguments `obj` does not take, naming the nearest valid key (a misspelt key would be ignored or
    fail deep inside); `where` names the config section."""
    accepted = accepted_keys(obj)
    if accepted is None:
        return
    unknown = [k for k in keys if k not in accepted]
    if unknown:
        name = getattr(obj, "__qualname__", str(obj))
        raise ConfigError(f"{where}.{unknown[0]}: {getattr(obj, '__module__', '')}.{name} has no parameter "
                          f"'{unknown[0]}'{nearest(str(unknown[0]), sorted(accepted))}")


def _where(config: Mapping) -> str:
    """The dotted key of a config node (model.params) when it knows it, else 'params'."""
    try:  # OmegaConf nodes know their place in the tree; plain dicts do not
        return config._get_full_key("params") or "params"
    except AttributeError:
        return "params"


def check_target_config(config: Mapping) -> Any:
    """Check a `{target, params}` config without building it: the target is allowed and importable, every key of
    `params` is a parameter it takes, and its numbers are within the target's `PARAM_RANGES`. Returns the target."""
    if not isinstance(config, Mapping) or "target" not in config:
        got = f"keys {list(config.keys())}" if isinstance(config, Mapping) else repr(config)
        raise ConfigError(f"expected a config with a 'target' key, got {got}")
    obj = resolve_target(config["target"])
    params = config.get("params") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{_where(config)} of target '{config['target']}' must be a mapping of keyword arguments, "
                          f"got {params!r}")
    check_keys(obj, list(params.keys()), _where(config))
    check_ranges(obj, params, _where(config) + ".")
    return obj


def instantiate_from_config(config: Mapping) -> Any:
    """Build `config.target(**config.params)`; the CompVis config convention, checked by `check_target_config`."""
    if isinstance(config, str) and config in ("__is_first_stage__", "__is_unconditional__"):
        return None
    obj = check_target_config(config)
    try:
        return obj(**(config.get("params") or dict()))
    except ValueError as e:
        if type(e) is not ValueError:  # the project's own errors (ConfigError, DataError...) already name the problem
            raise
        raise ConfigError(f"{config['target']} ({_where(config)}): {e}") from None


def load_model_from_config(config: Mapping, ckpt: Optional[str] = None) -> torch.nn.Module:
    """Build `config.model` and, when given, load base weights from `ckpt`; returns the model in eval mode."""
    model = instantiate_from_config(config["model"])
    if ckpt:
        model.init_from_ckpt(ckpt)
    return model.eval()


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
