"""Small helpers shared across the package: config instantiation, image grids, numbered files that never replace
one, and a few one-liners."""
import contextvars
import difflib
import importlib
import inspect
import logging
import math
import os
import re
from contextlib import contextmanager
from inspect import isfunction
from pathlib import Path
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Set

import torch
import yaml
from PIL import Image, ImageDraw, ImageFont

from ldm.checkpoint import atomic_write
from ldm.checks import ConfigError, check_number, yaml_number


def parse_yaml_value(text: str) -> Any:
    """A command-line VALUE as YAML (1e-4 included as a float; empty text is None)."""
    return yaml_number(yaml.safe_load(text)) if text.strip() else None


def setup_logging(timestamps: bool = True) -> None:
    """The scripts' log format: `12:03:04 INFO ldm.sweep.runs: ...` (INFO and above, on stderr)."""
    fmt = "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s " + fmt if timestamps else fmt, datefmt="%H:%M:%S")


def check_ranges(cls: type, params: Mapping, where: str = "") -> None:
    """Check the numbers among `params` against the `PARAM_RANGES` ({key: check_number options}) of `cls` and its base
    classes; the error names `where` + key."""
    for klass in getattr(cls, "__mro__", ()):
        for key, limits in vars(klass).get("PARAM_RANGES", {}).items():
            if key in params:
                check_number(params[key], f"{where}{key}", **limits)


def optional_import(name: str, needed_for: str, fix: str, error: type = ImportError) -> Any:
    """Module `name` of an optional package, or `error` saying what needs it and how to get it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise error(f"{needed_for} needs {name.split('.')[0]} ({e}): {fix}") from None


def exists(x: Any) -> bool:
    return x is not None


def default(val: Any, d: Any) -> Any:
    """`val` if it is set, else `d` (called first when it is a function)."""
    if exists(val):
        return val
    return d() if isfunction(d) else d


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


# ---- targets: a config is code --------------------------------------------------------------------------------
# A run's config.yaml names what gets built, so a downloaded run dir could name any callable (subprocess.call).
# Without --allow_any_target only classes from these modules are built. Not all of torch or Lightning: a class such
# as torch.distributed.elastic's SubprocessHandler starts a program from its constructor's arguments.
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


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def load_model_from_config(config: Mapping, ckpt: Optional[str] = None) -> torch.nn.Module:
    """Build `config.model` and, when given, load base weights from `ckpt`; returns the model in eval mode."""
    model = instantiate_from_config(config["model"])
    if ckpt:
        model.init_from_ckpt(ckpt)
    return model.eval()


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def use_idle_cores() -> int:
    """Set torch's threads (and OMP/MKL's for child processes) to the cores other work leaves idle now: the cores less
    the 1-minute load average, at least 1 (on 2 cores with another job on one, torch's default of 2 threads waits on
    the busy core at every parallel op: several times slower than 1). A thread count the user set is kept. Returns
    the thread count."""
    if any(v in os.environ for v in THREAD_VARS):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores - round(os.getloadavg()[0]))
    torch.set_num_threads(threads)
    os.environ.update({v: str(threads) for v in THREAD_VARS})
    return threads


def pick_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_pil(images: torch.Tensor) -> List[Image.Image]:
    """Images in [-1, 1] (b, 3, h, w) -> PIL images."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).cpu().numpy()]


def word_gap(font: ImageFont.FreeTypeFont) -> float:
    """The space drawn between words: at least 0.4 em (PIL's default font draws a 1-2 px space at small sizes, and
    "photo of a sks star" read as "photoofasksstar")."""
    return max(font.getlength(" "), 0.4 * font.size)


def text_length(text: str, font: ImageFont.FreeTypeFont) -> float:
    """The width of one line as `draw_words` draws it."""
    words = text.split(" ")
    return sum(font.getlength(w) for w in words) + (len(words) - 1) * word_gap(font)


def draw_words(draw: ImageDraw.ImageDraw, xy: Sequence[float], text: str, font: ImageFont.FreeTypeFont,
               fill: str = "white") -> None:
    """One line of text, word by word with `word_gap` between them."""
    x, y = xy
    for word in text.split(" "):
        draw.text((x, y), word, fill=fill, font=font)
        x += font.getlength(word) + word_gap(font)


def wrap_label(text: str, font: ImageFont.FreeTypeFont, width: float, max_lines: int = 6) -> List[str]:
    """`text` broken into lines of at most `width` pixels, at spaces where it can (inside a word where one is
    wider); lines beyond `max_lines` are dropped and the last kept line ends with an ellipsis."""
    lines: List[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if text_length(candidate, font) <= width or not line and len(word) <= 1:
                line = candidate
                continue
            if line:
                lines.append(line)
            while len(word) > 1 and font.getlength(word) > width:  # a word wider than the room: break it
                cut = max(1, next(i for i in range(len(word), 0, -1) if font.getlength(word[:i]) <= width
                                  or i == 1))
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and text_length(last + "...", font) > width:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last + "..."]
    return lines


MIN_LABELLED_TILE = 128  # px: labelled tiles narrower than this are enlarged (nearest neighbour) to stay readable


def image_grid(images: Sequence[Image.Image], n_rows: int, labels: Optional[Sequence[str]] = None,
               row_labels: Optional[Sequence[str]] = None) -> Image.Image:
    """Tile equally sized images row by row, `n_rows` images per row (as CompVis' --n_rows), 2 px apart.

    `labels` (one per image, lines split on newlines) are written under the images, wrapped to the image width, and
    `row_labels` (one per row) in a margin on the left, with PIL's default font and visible spaces. Labelled images
    narrower than MIN_LABELLED_TILE are enlarged by a whole factor (each pixel a block: nothing is smoothed) so that
    their labels have room to be read.
    """
    if (labels or row_labels) and images[0].width < MIN_LABELLED_TILE:
        k = math.ceil(MIN_LABELLED_TILE / images[0].width)
        images = [im.resize((im.width * k, im.height * k), Image.Resampling.NEAREST) for im in images]
    n_cols = max(1, min(n_rows, len(images)))
    rows = (len(images) + n_cols - 1) // n_cols
    w, h = images[0].size
    font = ImageFont.load_default(size=max(12, w // 24))
    line_h = font.getbbox("Ag")[3] + 2
    wrapped = [wrap_label(t, font, w) for t in labels] if labels else []
    label_h = max(len(t) for t in wrapped) * line_h + 2 if labels else 0
    margin = int(max(text_length(t, font) for t in row_labels)) + 8 if row_labels else 0
    grid = Image.new("RGB", (margin + n_cols * (w + 2) + 2, rows * (h + 2 + label_h) + 2))
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        x, y = margin + 2 + (i % n_cols) * (w + 2), 2 + (i // n_cols) * (h + 2 + label_h)
        grid.paste(im, (x, y))
        for j, line in enumerate(wrapped[i] if labels else []):
            draw_words(draw, (x, y + h + 1 + j * line_h), line, font)
    for r, text in enumerate(row_labels or []):
        draw_words(draw, (4, 2 + r * (h + 2 + label_h) + (h - line_h) // 2), text, font)
    return grid


# ---- numbered files, never replaced -------------------------------------------------------------------------
def next_number(directory: Path, names: Sequence[str]) -> int:
    """1 + the largest number in the files of `directory` named like one of `names` ("grid-{:04}.png"), else 0."""
    used = [-1]
    for name in names:
        head, rest = name.split("{", 1)
        pattern = re.compile(re.escape(head) + r"(\d+)" + re.escape(rest.split("}", 1)[1]))
        used += [int(m.group(1)) for f in directory.iterdir() if (m := pattern.fullmatch(f.name))]
    return max(used) + 1


def save_numbered(directory: Path, names: Sequence[str], writers: Sequence[Callable[[str], None]]) -> List[Path]:
    """Write one file per name (`names[i].format(n)` by `writers[i](tmp_path)`) under the next number n that none
    of them uses in `directory`; files are created exclusively, so writers running at once never overwrite each
    other (a number taken meanwhile moves all of them on to the next)."""
    directory.mkdir(parents=True, exist_ok=True)
    n = next_number(directory, names)
    while True:
        done: List[Path] = []
        try:
            for name, write in zip(names, writers):
                atomic_write(directory / name.format(n), write, replace=False)
                done.append(directory / name.format(n))
            return done
        except FileExistsError:
            for path in done:  # ours, written a moment ago: the set moves on together
                path.unlink()
            n += 1
