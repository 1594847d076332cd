"""`RunRequest`: one training run as data (configs, KEY=VALUE overrides, flags), declared once.

Every flag of `main_dream_booth.py` / `python -m ldm.train` is a field here, with its help, its argparse type and what
it does: a run option (seed, devices, ...), or a value written into the config (`--data_root` is
data.params.train.params.data_root, ...). The command line is generated from the fields (`request_parser`), a request
turns back into a command line (`to_argv`, for a child process or a job list), and a sweep file names the fields a
sweep may set (`SWEEP_OPTIONS`: `config_keys` are written into each run's config, the others stay run options).
"""
import argparse
import textwrap
from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

from omegaconf import DictConfig, OmegaConf

from ldm.checks import ArgumentParser, ConfigError, seed_int
from ldm.config import KEY_ALIASES, adapter_aliases
from ldm.modules.adapters import KIND_FIELDS, forms
from ldm.modules.adapters.positions import SECTIONS

NEXT = "--next"  # separates the runs of one command line that train as a pack


class ConfigKey(NamedTuple):
    """Where a flag writes into the config: `key`; when `section` is given and the config lacks it, the key is
    skipped (`optional`) or the flag is refused."""
    key: str
    section: Optional[str] = None
    optional: bool = False


def str2bool(value: str) -> bool:
    """argparse type: True/False (also t/f, yes/no, y/n, 1/0)."""
    if value.lower() in ("true", "t", "yes", "y", "1"):
        return True
    if value.lower() in ("false", "f", "no", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got '{value}'")


def option(*names: str, default: Any = None, config: Sequence[ConfigKey] = (), path: bool = False,
           sweep: bool = False, **argparse_kwargs: Any) -> Any:
    """A RunRequest field that is a command-line flag: its names and argparse settings, the config keys it writes
    (`config`), whether its value is a path (taken relative to a sweep file's folder) and whether a sweep may set it."""
    meta = dict(names=names, config=tuple(config), path=path, sweep=sweep, argparse=argparse_kwargs)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunRequest:
    """One training run: what `main_dream_booth.py` and `python -m ldm.train` take, and what the sweep launcher,
    the tiny-world demo and packed runs hand to `ldm.train.run`."""
    base: Tuple[str, ...] = option("-b", "--base", default=(), nargs="*", metavar="YAML",
                                   help="configs, merged left to right")
    overrides: Tuple[str, ...] = ()  # KEY=VALUE items of the config language (`ldm.config`), applied after --base
    resume: Optional[str] = option("-r", "--resume", help="continue a run: its log dir or a checkpoint in it")
    train: bool = option("-t", "--train", default=False, action="store_true",
                         help="train (without it: set up, check and stop)")
    actual_resume: Optional[str] = option(
        "--actual_resume", config=[ConfigKey("model.params.ckpt_path")], path=True, sweep=True,
        help="base weights: an SD v1 .ckpt or .safetensors, or a diffusers model folder")
    name: str = option("-n", "--name", default="", help="run name, the log dir's suffix")
    seed: int = option("-s", "--seed", default=23, type=seed_int, sweep=True, help="global seed (the paper's default)")
    logdir: str = option("-l", "--logdir", default="logs", help="parent folder of run log dirs")
    data_root: Optional[str] = option(
        "--data_root", config=[ConfigKey("data.params.train.params.data_root", "data.params.train")], path=True,
        sweep=True, help="folder of subject images (or of captioned images)")
    reg_data_root: Optional[str] = option(
        "--reg_data_root", config=[ConfigKey("data.params.reg.params.data_root", "data.params.reg")], path=True,
        sweep=True, help="folder of class images for prior preservation; missing ones are generated into it")
    class_word: Optional[str] = option(
        "--class_word", config=[ConfigKey("data.params.train.params.class_word", "data.params.train", True),
                                ConfigKey("data.params.reg.params.class_word", "data.params.reg", True)],
        sweep=True, help="the subject's class, e.g. dog")
    scale_lr: bool = option("--scale_lr", default=False, type=str2bool, nargs="?", const=True, sweep=True,
                            help="lr = base_learning_rate x batch size x devices x nodes x accumulation")
    max_steps: Optional[int] = option("--max_steps", type=int, config=[ConfigKey("lightning.trainer.max_steps")],
                                      sweep=True, help="training steps (overrides lightning.trainer.max_steps)")
    allow_any_target: bool = option(
        "--allow_any_target", default=False, action="store_true",
        help="let the configs build classes and functions outside ldm, torch.nn, torch.optim and Lightning's "
             "callbacks (your own code); without it a config cannot run arbitrary code")
    gpus: Optional[str] = option("--gpus", sweep=True,
                                 help="GPU indices as in the paper: '0,' or '0,1' (DDP when several)")
    accelerator: Optional[str] = option("--accelerator", sweep=True, help="Lightning accelerator: cpu, gpu, auto")
    devices: Optional[Union[int, str]] = option("--devices", sweep=True,
                                                help="Lightning devices: a count, a list like 0,1, or auto")
    num_nodes: Optional[int] = option("--num_nodes", type=int, sweep=True, help="Lightning: number of nodes")
    strategy: Optional[str] = option("--strategy", sweep=True, help="Lightning strategy, e.g. ddp")
    precision: Optional[str] = option("--precision", sweep=True,
                                      help="Lightning precision: 32-true, bf16-mixed, 16-mixed, auto")

    def __post_init__(self) -> None:
        for name in ("base", "overrides"):  # tuples, so a request is hashable and cannot be changed
            object.__setattr__(self, name, tuple(getattr(self, name)))

    def to_argv(self) -> List[str]:
        """The command line that parses back into this request (flags that differ from their default)."""
        argv: List[str] = []
        for f in flags():
            value = getattr(self, f.name)
            if value == f.default:
                continue
            flag = f.metadata["names"][0]
            if f.name == "base":
                argv += [flag, *value]
            elif f.metadata["argparse"].get("action") == "store_true":
                argv.append(flag)
            else:
                argv += [flag, str(value)]
        return argv + list(self.overrides)

    def apply_to(self, config: DictConfig) -> None:
        """Write the flags that set config values (--data_root, --reg_data_root, --class_word, --actual_resume,
        --max_steps) into `config`."""
        for f in flags():
            value = getattr(self, f.name)
            if f.metadata["config"] and value is not None and value != "":
                write_option(config, f.name, value)


def flags() -> List[Any]:
    """The RunRequest fields that are command-line flags, in declaration order."""
    return [f for f in fields(RunRequest) if "names" in f.metadata]


def _flag(name: str) -> Any:
    return next(f for f in flags() if f.name == name)


# What a sweep file may set by flag name: written into each run's config, or kept as the run's options.
SWEEP_OPTIONS = tuple(f.name for f in flags() if f.metadata["sweep"])
CONFIG_OPTIONS = tuple(f.name for f in flags() if f.metadata["config"])
CONFIG_KEYS: Dict[str, Tuple[str, ...]] = {f.name: tuple(target.key for target in f.metadata["config"])
                                           for f in flags() if f.metadata["config"]}  # the keys each one writes
RUN_OPTIONS = tuple(n for n in SWEEP_OPTIONS if n not in CONFIG_OPTIONS)
PATH_OPTIONS = tuple(f.name for f in flags() if f.metadata["path"])


def write_option(config: DictConfig, name: str, value: Any) -> None:
    """Write the config-setting flag `name` (e.g. data_root) with `value` into `config`."""
    flag = _flag(name)
    for target in flag.metadata["config"]:
        if target.section and OmegaConf.select(config, target.section, default=None) is None:
            if target.optional:
                continue
            raise ConfigError(f"{flag.metadata['names'][-1]} given but the config has no {target.section} section")
        OmegaConf.update(config, target.key, value, force_add=True)


# ---- the command line -------------------------------------------------------------------------------------------
def alias_help() -> str:
    """The aliases of the config language, from where they are defined (`ldm.config`, the adapter form registry)."""
    keys = ", ".join(f"{alias} ({key})" for alias, key in KEY_ALIASES.items())
    every = {form.NAME for kind in SECTIONS.values() for form in forms(kind).values()}
    by_field = []
    for name, sections in adapter_aliases().items():
        owners = {form.NAME for s in sections for form in forms(SECTIONS[s]).values()
                  if name in form.Options.names() or name in KIND_FIELDS[SECTIONS[s]]}
        by_field.append(f"{name} ({'every form' if owners == every else ', '.join(sorted(owners))})")
    text = (f"Any KEY=VALUE argument overrides the merged config, e.g. model.params.reg_weight=0.5 "
            f"data.params.batch_size=2. Aliases: {keys}; and the adapter fields, each setting that field of every "
            f"adapter entry whose form has it: {', '.join(by_field)}. Several runs separated by {NEXT} train as one "
            "pack (one process, one base model, one batch).")
    return textwrap.fill(text, 118)


def request_parser(prog: Optional[str] = None, description: str = "") -> argparse.ArgumentParser:
    """The training command line, generated from the RunRequest fields."""
    p = ArgumentParser(prog=prog, description=description, epilog=alias_help())
    for f in flags():
        kwargs = dict(f.metadata["argparse"], default=f.default)
        p.add_argument(*f.metadata["names"], dest=f.name, **kwargs)
    p.add_argument("--no-test", action="store_true", help="accepted for CompVis compatibility; there is no test stage")
    return p


def parse_request(argv: Sequence[str], parser: argparse.ArgumentParser) -> RunRequest:
    """One run's command line -> RunRequest; KEY=VALUE items anywhere are the overrides."""
    opt, unknown = parser.parse_known_args(list(argv))
    bad = [a for a in unknown if a.startswith("-") or "=" not in a]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (config overrides are written KEY=VALUE)")
    # --base takes every following word, so KEY=VALUE overrides written after it are picked out here.
    values = {f.name: getattr(opt, f.name) for f in flags()}
    values["overrides"] = [b for b in opt.base if "=" in b] + unknown
    values["base"] = [b for b in opt.base if "=" not in b]
    if isinstance(opt.devices, str) and opt.devices.isdigit():
        values["devices"] = int(opt.devices)
    return RunRequest(**values)


def parse_requests(argv: Sequence[str], parser: argparse.ArgumentParser) -> List[RunRequest]:
    """A command line of one run, or of several separated by --next (a pack)."""
    parts: List[List[str]] = [[]]
    for arg in argv:
        if arg == NEXT:
            parts.append([])
        else:
            parts[-1].append(arg)
    if len(parts) > 1 and not all(parts):
        parser.error(f"{NEXT} separates the command lines of runs: none of them may be empty")
    return [parse_request(part, parser) for part in parts]


def with_options(request: RunRequest, options: Dict[str, Any]) -> RunRequest:
    """`request` with sweep run options set (seed, devices, ...): an unknown name is refused."""
    unknown = sorted(set(options) - set(RUN_OPTIONS))
    if unknown:
        raise ConfigError(f"'{unknown[0]}' is not a run option; run options are {', '.join(RUN_OPTIONS)}")
    return replace(request, **options)
