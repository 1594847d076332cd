"""Sweep files: the factors of a design-space study (Xiang et al. 2023, arXiv 2303.18181) and their full grid.

A sweep file is YAML:

    name: position-pairs                     # optional
    base: [configs/sd-inject-dreambooth/attn2o-ffni.yaml]   # merged in order, as main_dream_booth.py --base
    overrides:                               # KEY=VALUE as main_dream_booth.py takes them (or a mapping), and its
      - lightning.trainer.max_steps=800      # flags by name (`ldm.train.request.SWEEP_OPTIONS`): data_root,
      - data_root=data/dog                   # reg_data_root, class_word, actual_resume, max_steps (written into the
      - class_word=dog                       # config), seed, scale_lr, gpus, ... precision (the run's options)
    factors:
      din: {key: din, levels: [attn1i, attn2o, resi]}
      lr: {key: model.base_learning_rate, levels: [1.0e-4, 3.0e-4]}
      subject:                               # a factor whose levels set several keys at once
        levels:
          dog: {data_root: data/dog, class_word: dog}
          cat: {data_root: data/cat, class_word: cat}
    rules:                                   # optional: settings for some combinations of levels
      - when: {din: resi}
        set: {mid_dim: 7}
    budget: 30000                            # optional: every run's sizes (mid_dim, rank) set for ~30,000 adapter
                                             # parameters (ldm/sweep/budget.py)

A factor key is a dotted config key that exists in the merged config (list items by index), a flag above, or an
alias of the config language (`ldm.config`): every adapter form's fields (`din`, `dout`, `method`, `mid_dim`, `rank`,
`alpha`, `scale`, ...) set that field of every adapter entry whose form has it (entries move between
transformer_adp_config and resblock_adp_config with their din); `lr` is model.base_learning_rate, `steps`
lightning.trainer.max_steps. Combinations the adapter schema rejects (`parse_adapter_config`) are dropped with a note.
"""
import copy
import hashlib
import itertools
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import yaml
from omegaconf import DictConfig, OmegaConf

from ldm.config import ADAPTER_CONFIGS, KEY_ALIASES, load_configs, set_key
from ldm.sweep.budget import apply_budget
from ldm.modules.adapters import AdapterConfigError, parse_adapter_config
from ldm.checks import ConfigError, parse_yaml_value, safe_load_unique, yaml_number
from ldm.train.request import CONFIG_KEYS, CONFIG_OPTIONS, PATH_OPTIONS, RUN_OPTIONS, SWEEP_OPTIONS, write_option

log = logging.getLogger(__name__)


class SweepError(ValueError):
    """A sweep file or sweep folder that cannot be used as it is."""


SPEC_FIELDS = ("name", "base", "overrides", "factors", "rules", "budget")


@dataclass
class Run:
    """One point of the grid: its name, factor levels, merged config and run options (RunRequest fields)."""
    name: str
    levels: Dict[str, Any]
    config: DictConfig
    flags: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Grid:
    """The valid runs of a sweep, and the combinations dropped with the reason."""
    runs: List[Run]
    dropped: List[Tuple[Dict[str, Any], str]]


# ---- reading and checking the file ------------------------------------------------------------------------------
def load_spec(path: str) -> Dict[str, Any]:
    """The sweep file as a checked mapping."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file not found: '{path}'")
    try:
        spec = safe_load_unique(path.read_text())  # a key given twice is refused, as the config loader does
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = " ".join(str(e).strip().splitlines()[:3])
        raise SweepError(f"sweep file '{path}' is not valid YAML: {first}") from None
    return check_spec(spec, str(path))


def check_spec(spec: Any, where: str = "sweep") -> Dict[str, Any]:
    """Check the top-level shape of a sweep mapping (keys, base list, factors with levels)."""
    if not isinstance(spec, Mapping):
        raise SweepError(f"{where}: expected a mapping with keys {', '.join(SPEC_FIELDS)}")
    unknown = sorted(set(spec) - set(SPEC_FIELDS))
    if unknown:
        raise SweepError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(SPEC_FIELDS)}")
    base = spec.get("base")
    if not isinstance(base, list) or not base or not all(isinstance(b, str) for b in base):
        raise SweepError(f"{where}: 'base' must be a list of config files (as main_dream_booth.py --base)")
    factors = spec.get("factors")
    if not isinstance(factors, Mapping) or not factors:
        raise SweepError(f"{where}: 'factors' must map factor names to {{key: ..., levels: [...]}}")
    setters: Dict[str, str] = {}
    for name, factor in factors.items():
        for key in sorted({target for _, setting in factor_levels(str(name), factor) for k in setting
                           for target in config_keys(k)}):
            if key in setters:
                raise SweepError(f"{where}: factors '{setters[key]}' and '{name}' both set {key}: in every run one "
                                 "would silently override the other; make them one factor, or drop one")
            setters[key] = str(name)
    budget = spec.get("budget")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0):
        raise SweepError(f"{where}: 'budget' must be a positive integer (adapter parameters per run), got {budget!r}")
    return dict(spec)


def config_keys(key: str) -> Tuple[str, ...]:
    """The config keys a sweep key sets, so two spellings of one setting are seen as one: an alias or a flag resolved
    (a flag's keys as its RunRequest field declares them; --class_word sets two); adapter field aliases stay as they
    are."""
    key = KEY_ALIASES.get(key, key)
    return CONFIG_KEYS.get(key, (key,))


def factor_levels(name: str, factor: Any) -> List[Tuple[Any, Dict[str, Any]]]:
    """(level, {key: value}) of a factor: `key` with a list of values, or `levels` naming mappings of settings."""
    if not isinstance(factor, Mapping) or set(factor) - {"key", "levels"} or "levels" not in factor:
        raise SweepError(f"factor '{name}': expected {{key: KEY, levels: [...]}} or {{levels: {{LEVEL: {{KEY: "
                         f"VALUE, ...}}, ...}}}}, got {factor!r}")
    levels = factor["levels"]
    if "key" in factor:
        if not isinstance(levels, list) or not levels:
            raise SweepError(f"factor '{name}': 'levels' must be a non-empty list of values for key {factor['key']}")
        pairs = [(v, {str(factor["key"]): v}) for v in levels]
    else:
        if not isinstance(levels, Mapping) or not levels or not all(isinstance(s, Mapping) for s in levels.values()):
            raise SweepError(f"factor '{name}' has no 'key': its 'levels' must map level names to settings, e.g. "
                             "{dog: {data_root: data/dog, class_word: dog}}")
        pairs = [(str(k), dict(v)) for k, v in levels.items()]
    labels = [json.dumps(level, sort_keys=True, default=str) for level, _ in pairs]
    if len(set(labels)) != len(labels):
        raise SweepError(f"factor '{name}' lists a level twice: {[level for level, _ in pairs]}")
    return pairs


def spec_hash(spec: Mapping) -> str:
    """A short hash of the sweep's content: a sweep folder belongs to exactly one spec."""
    text = json.dumps(spec, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---- the grid ---------------------------------------------------------------------------------------------------
def expand(spec: Mapping, root: Optional[Path] = None) -> Grid:
    """Every combination of the factor levels as a Run; invalid combinations are dropped with a logged note.

    Relative paths (base files, data and weight flags) are taken relative to `root` (default: the current folder).
    """
    root = Path(root or Path.cwd())
    base, fixed_flags = fixed_config(spec, root)
    factors = {str(n): factor_levels(str(n), f) for n, f in spec["factors"].items()}
    runs, dropped = [], []
    for combo in itertools.product(*factors.values()):
        levels = {n: level for n, (level, _) in zip(factors, combo)}
        settings = [s for _, s in combo] + rule_settings(spec.get("rules") or [], levels)
        config, flags = copy.deepcopy(base), dict(fixed_flags)
        for setting in settings:
            for key, value in setting.items():
                apply_setting(config, flags, key, value, root)
        reason = invalid_reason(config)
        if not reason and spec.get("budget"):
            size, count = _sweep_errors(apply_budget, config, spec["budget"])
            log.info("%s: size %s, %s adapter parameters (budget %s)", levels, size, f"{count:,}",
                     f"{spec['budget']:,}")
        if reason:
            log.info("dropped %s: %s", levels, reason)
            dropped.append((levels, reason))
        else:
            runs.append(Run(run_name(levels), levels, config, flags))
    if not runs:
        reasons = "; ".join(sorted({r for _, r in dropped})[:3])
        raise SweepError(f"no valid combination: all {len(dropped)} were dropped ({reasons}); change the levels")
    if dropped:
        log.info("%d of %d combinations dropped as invalid", len(dropped), len(dropped) + len(runs))
    unique_names(runs)
    return Grid(runs, dropped)


def fixed_config(spec: Mapping, root: Path) -> Tuple[DictConfig, Dict[str, Any]]:
    """The base files merged, then the fixed overrides: (config, command-line flags)."""
    files = [resolve(root, b) for b in spec["base"]]
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise SweepError(f"base config(s) not found: {', '.join(missing)} (relative paths are taken from {root})")
    config, flags = _sweep_errors(load_configs, files), {}
    for key, value in override_items(spec.get("overrides")):
        # as main_dream_booth.py's KEY=VALUE: a fixed override may add a key
        apply_setting(config, flags, key, value, root, new_ok=True)
    return config, flags


def _sweep_errors(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args)` with the config language's errors as SweepErrors (the sweep file is what the user fixes)."""
    try:
        return fn(*args, **kwargs)
    except ConfigError as e:
        raise SweepError(str(e)) from None


def override_items(overrides: Any) -> List[Tuple[str, Any]]:
    """The fixed overrides as (key, value): a list of KEY=VALUE strings (YAML values) or a mapping."""
    if not overrides:
        return []
    if isinstance(overrides, Mapping):
        return [(str(k), v) for k, v in overrides.items()]
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise SweepError(f"'overrides' must be a list of KEY=VALUE strings or a mapping, got {overrides!r}")
    items = []
    for item in overrides:
        key, _, text = item.partition("=")
        try:
            items.append((key.strip(), parse_yaml_value(text)))  # as main_dream_booth.py
        except yaml.YAMLError as e:
            raise SweepError(f"override '{item}': the value is not valid YAML ({e})") from None
    return items


def rule_settings(rules: Any, levels: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """The `set` mappings of the rules whose `when` matches these levels."""
    if not isinstance(rules, list):
        raise SweepError("'rules' must be a list of {when: {FACTOR: LEVEL, ...}, set: {KEY: VALUE, ...}}")
    matched = []
    for i, rule in enumerate(rules):
        if not isinstance(rule, Mapping) or set(rule) != {"when", "set"}:
            raise SweepError(f"rules[{i}]: expected {{when: {{FACTOR: LEVEL}}, set: {{KEY: VALUE}}}}, got {rule!r}")
        unknown = sorted(set(rule["when"]) - set(levels))
        if unknown:
            raise SweepError(f"rules[{i}].when names unknown factor(s) {', '.join(unknown)}; factors: "
                             f"{', '.join(levels)}")
        if all(levels[f] == v or str(levels[f]) == str(v) for f, v in rule["when"].items()):
            matched.append(dict(rule["set"]))
    return matched


def resolve(root: Path, path: str) -> str:
    return str(path if Path(path).is_absolute() else (root / path).resolve())


# ---- one setting ------------------------------------------------------------------------------------------------
def apply_setting(config: DictConfig, flags: Dict[str, Any], key: str, value: Any, root: Path,
                  new_ok: bool = False) -> None:
    """Set `key` (a main_dream_booth.py flag, an alias or a dotted config key) to `value` for one run; a dotted key
    must exist in the merged config unless `new_ok`."""
    value = yaml_number(value)  # a level written 1e-4 in the sweep file
    if isinstance(value, float) and not math.isfinite(value):
        raise SweepError(f"'{key}' is set to {value}: a number in a sweep file must be finite")
    if key in RUN_OPTIONS:
        flags[key] = value
    elif key in CONFIG_OPTIONS:
        value = resolve(root, str(value)) if key in PATH_OPTIONS else value
        _sweep_errors(write_option, config, key, value)
    else:
        try:
            set_key(config, key, value, new_ok=new_ok)
        except ConfigError as e:
            raise SweepError(f"{e}; or a main_dream_booth.py flag ({', '.join(SWEEP_OPTIONS)})") from None


def invalid_reason(config: DictConfig) -> Optional[str]:
    """Why the adapter schema rejects this config (None when it is valid)."""
    for key in ADAPTER_CONFIGS.values():
        adapters = OmegaConf.select(config, key)
        if adapters is None:
            continue
        try:
            parse_adapter_config(adapters)
        except AdapterConfigError as e:
            return str(e)
    return None


# ---- run names --------------------------------------------------------------------------------------------------
def slug(value: Any) -> str:
    """A level as a folder-name part: letters, digits, '.', '+' and '-' only."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(value)).strip("-") or "x"


def run_name(levels: Mapping[str, Any]) -> str:
    """'din-attn2o_dout-ffni_seed-0' from the factor levels, in factor order."""
    return "_".join(f"{slug(f)}-{slug(v)}" for f, v in levels.items())


def unique_names(runs: List[Run]) -> None:
    """Give runs whose names collide after slugging a numeric suffix (levels like 'a/b' and 'a-b')."""
    seen: Dict[str, int] = {}
    for run in runs:
        n = seen.get(run.name, 0)
        seen[run.name] = n + 1
        if n:
            run.name = f"{run.name}-{n + 1}"
