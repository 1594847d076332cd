"""A training run's log dir: created exclusively under --logdir, locked while a process trains it, cleared of what a
killed write leaves behind (and of CSV session folders without rows), and removed again when the run's setup fails
before anything was written into it. A config cannot make the run write outside it (`check_confined`).

Only our own temporary names are ever removed: `atomic_write`'s `.tmp-<8 random characters><file name>` for the files
a run writes (last.ckpt, config.yaml, train_stats.json, images/step-NNNNNN.png, the sweep markers) and the adapter
package's `.tmp-<step>-adapters...-<8 random characters>` directories. An `.old-<step>-adapters...-<8 hex>` directory
(an adapter directory being replaced when the process died) is removed once its replacement exists, and renamed back
otherwise.
"""
import logging
import os
import re
import shlex
import shutil
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, List, Mapping, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from ldm.checks import ConfigError, file_lock

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=,@-]{0,99}")
_RANDOM = r"[a-z0-9_]{8}"  # tempfile's names
TEMP_FILE = re.compile(rf"\.tmp-{_RANDOM}(last\.ckpt|config\.yaml|train_stats\.json|step-\d+\.png|"
                       r"(running|done|failed|levels)\.json)")
TEMP_ADAPTER_DIR = re.compile(rf"\.tmp-\d+-adapters(-.+)?-{_RANDOM}")
OLD_ADAPTER_DIR = re.compile(r"\.old-(\d+-adapters(?:-.+)?)-[0-9a-f]{8}")


def timestamp() -> str:
    return datetime.now().strftime("%Y-%m-%dT%H-%M-%S")


def resume_command(logdir: Path) -> str:
    """The command that continues the run in `logdir`."""
    return f"python main_dream_booth.py -r {shlex.quote(str(logdir))} -t"


def describe_kept(logdir: Path) -> str:
    """What a stopped run keeps: its last.ckpt and adapter directories (the newest named)."""
    ckpts = Path(logdir) / "checkpoints"
    adapters = sorted((p.name for p in ckpts.glob("[0-9]*-adapters*") if p.is_dir()),
                      key=lambda n: int(n.split("-")[0]))
    parts = ["checkpoints/last.ckpt"] if (ckpts / "last.ckpt").is_file() else []
    if adapters:
        parts.append(f"{len(adapters)} adapter director{'y' if len(adapters) == 1 else 'ies'} (newest "
                     f"checkpoints/{adapters[-1]})")
    return "the run keeps " + (" and ".join(parts) if parts else "no checkpoint yet (none was written)")


def check_run_name(name: str) -> str:
    """`name` when it can be a folder name under --logdir, else a ConfigError (no '/', '..', spaces, hidden names)."""
    if not RUN_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(f"run name {name!r} cannot be the name of a folder under --logdir: use up to 100 letters, "
                          "digits and . _ - + = , @ starting with a letter or digit (no '/', '..' or spaces), "
                          "e.g. -n my_dog")
    return name


def slug(text: str) -> str:
    """A run name made from any text (a config file's name): other characters become '_'."""
    return re.sub(r"[^A-Za-z0-9._+=,@-]", "_", text).lstrip("._-")[:100].replace("..", "_") or "run"


def create_run_dir(parent: Path, name: str) -> Tuple[Path, List[Path]]:
    """<parent>/<timestamp>_<name>, created exclusively: another run started in the same second with the same name
    gets <timestamp>-2_<name>. Returns the dir and the folders created for it (to remove them if setup fails)."""
    check_run_name(name)
    missing = [p for p in [parent, *parent.parents] if not p.exists()]
    stamp = timestamp()
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for n in range(1, 1000):
            path = parent / (f"{stamp}_{name}" if n == 1 else f"{stamp}-{n}_{name}")
            try:
                path.mkdir()
                return path, [path, *missing]
            except FileExistsError:
                continue
    except OSError as e:
        why = "it is a file" if parent.is_file() else e.strerror or str(e)
        raise ConfigError(f"cannot write to the log dir '{parent}' ({why}): pass --logdir with a folder you can "
                          "write to") from None
    raise ConfigError(f"'{parent}' already holds 999 runs named {stamp}_{name}: choose another -n")


def discard(created: List[Path]) -> None:
    """Remove the run dir `create_run_dir` made, when it holds no file but the lock (its setup failed), and then the
    parent folders made for it, as far as they are empty."""
    run_dir, parents = created[0], created[1:]
    if not run_dir.is_dir() or any(p.is_file() and p != run_dir / LOCK_FILE for p in run_dir.rglob("*")):
        return
    shutil.rmtree(run_dir)
    for folder in parents:
        try:
            folder.rmdir()
        except OSError:  # not empty (another run), or gone
            return


@contextmanager
def run_lock(logdir: Path) -> Iterator[None]:
    """Hold the log dir's lock while training it: a second process that resumes the same dir is refused. The lock
    file stays (empty); the lock itself goes with the process, however it ends."""
    with file_lock(logdir / LOCK_FILE, blocking=False) as mine:
        if not mine:
            raise ConfigError(f"'{logdir}' is being trained by another process right now: wait for it to end (or stop "
                              "it) before resuming this run")
        yield


def clean_temporaries(logdir: Path) -> List[str]:
    """Remove the temporary files and adapter directories that killed writes left in a run's log dir (our own names
    only, see the module docstring); an adapter directory caught mid-replacement is restored. Returns what was done."""
    done = []
    for folder in (logdir, logdir / "checkpoints", logdir / "images"):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.is_symlink():
                continue
            if path.is_file() and TEMP_FILE.fullmatch(path.name):
                path.unlink()
                done.append(f"removed {path.relative_to(logdir)}")
            elif path.is_dir() and folder.name == "checkpoints" and TEMP_ADAPTER_DIR.fullmatch(path.name):
                shutil.rmtree(path)
                done.append(f"removed {path.relative_to(logdir)}/")
            elif path.is_dir() and folder.name == "checkpoints" and OLD_ADAPTER_DIR.fullmatch(path.name):
                replacement = folder / OLD_ADAPTER_DIR.fullmatch(path.name).group(1)
                if replacement.exists():
                    shutil.rmtree(path)
                    done.append(f"removed {path.relative_to(logdir)}/")
                else:
                    os.replace(path, replacement)
                    done.append(f"restored {replacement.relative_to(logdir)}/")
    for session in sorted((logdir / "csv").glob("*")):  # sessions killed before their first CSV row
        if prune_empty(session):
            done.append(f"removed the empty {session.relative_to(logdir)}/")
    if done:
        log.warning("cleaned up after an interrupted session in %s: %s", logdir, "; ".join(done))
    return done


def prune_empty(folder: Path) -> bool:
    """Remove `folder` when it holds no file (e.g. a CSV session folder of a session that logged nothing)."""
    if folder.is_dir() and not folder.is_symlink() and not any(p.is_file() for p in folder.rglob("*")):
        shutil.rmtree(folder)
        return True
    return False


# ---- confinement ------------------------------------------------------------------------------------------------
# The config sections whose parameters can name where something is written, and the parameter names that do
# (ModelCheckpoint's dirpath and filename, a callback's save_dir / output_dir / root, the Trainer's default_root_dir).
WRITER_SECTIONS = ("lightning.modelcheckpoint.params", "lightning.trainer")
PATH_PARAM = re.compile(r"dir|path|file|root|folder|out")


def path_settings(config: DictConfig, logdir: Path) -> Iterator[Tuple[str, str, Path]]:
    """(key, value, where it points) for every string setting of a writer section or a lightning.callbacks entry's
    params whose name says it is a place to write. A file name is taken within its section's folder setting (else
    within the run dir `logdir`, which refuses any '..' out of it); other paths are taken from the current folder, as
    Lightning takes them."""
    callbacks = OmegaConf.select(config, "lightning.callbacks", default=None) or {}
    sections = [*WRITER_SECTIONS, *(f"lightning.callbacks.{name}.params" for name in callbacks)]
    for section in sections:
        params = OmegaConf.select(config, section, default=None)
        if not isinstance(params, Mapping):
            continue
        values = {str(k): v for k, v in params.items() if PATH_PARAM.search(str(k)) and isinstance(v, str)}
        folder = next((v for k, v in values.items() if "file" not in k), None)
        for key, value in values.items():
            base = (Path(folder) if folder else Path(logdir)) if "file" in key else Path.cwd()
            yield f"{section}.{key}", value, Path(os.path.abspath(base / value))


def check_confined(config: DictConfig, logdir: Path, given: Sequence[str] = ()) -> None:
    """Refuse a config that would make the run write outside its log dir `logdir`: every path setting of a callback,
    of lightning.modelcheckpoint.params and of lightning.trainer (`path_settings`) must resolve inside it (symbolic
    links followed), unless that key or a section above it was given on the command line (`given`: the keys of the
    KEY=VALUE overrides), which writes there on purpose."""
    root = Path(logdir).resolve()
    for key, value, where in path_settings(config, logdir):
        if any(key == g or key.startswith(g + ".") for g in given):
            continue
        where = where.resolve()
        if where != root and root not in where.parents:
            raise ConfigError(f"{key} is '{value}', outside the run dir '{logdir}': a config (a run's config.yaml, a "
                              "--base file) may only make a run write inside its own folder; remove the setting, or "
                              f"give it on the command line ({key}=...) to write there on purpose")


def override_keys(overrides: Sequence[Any]) -> List[str]:
    """The keys of KEY=VALUE command-line overrides."""
    return [str(item).partition("=")[0].strip() for item in overrides]
