"""The house rules of docs/architecture.md, checked on the source: imports run one way (no cycle, none hidden inside a
function, no room importing a room above it), no `print` in the library, no `sys.path` edits, no work at import time.
"""
import ast
import functools
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import pytest

REPO = Path(__file__).resolve().parents[1]
# The rooms, bottom-up; a module may import its own room and those below it.
LAYERS = [
    ("checkpoint, util and checks", ("ldm.util", "ldm.checkpoint", "ldm.checks")),
    ("networks and the adapter package", ("ldm.modules",)),
    ("models, samplers and the config language", ("ldm.models", "ldm.config")),
    ("data", ("ldm.data",)),
    ("training, evaluation, sweeps, the tiny world", ("ldm.train", "ldm.rundir", "ldm.callbacks", "ldm.evaluation",
                                                      "ldm.sweep", "ldm.tinyworld")),
    ("scripts", ("sample", "main_dream_booth", "scripts")),
]


def sources() -> Dict[str, Path]:
    """Module name -> file, for ldm/, the two entry points and scripts/."""
    files = list((REPO / "ldm").rglob("*.py")) + [REPO / "sample.py", REPO / "main_dream_booth.py"]
    files += list((REPO / "scripts").glob("*.py"))
    mods = {}
    for f in files:
        parts = list(f.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


@functools.lru_cache(maxsize=None)
def parsed(path: Path) -> ast.Module:
    """A file's syntax tree, parsed once for all the tests here (they only read it)."""
    return ast.parse(path.read_text())


def project_imports(tree: ast.AST, mods: Dict[str, Path]) -> Set[str]:
    """The project modules a syntax tree imports (`from a.b import c` counts a.b, and a.b.c when that is a module)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n in mods)
    return found


def layer(module: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} belongs to no layer of LAYERS: add it where it belongs")


@pytest.fixture(scope="module")
def graph():
    mods = sources()
    return mods, {m: project_imports(parsed(f), mods) - {m} for m, f in mods.items()}


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle(graph):
    _, edges = graph
    assert cycles(edges) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_run_bottom_up(graph):
    _, edges = graph
    upward = [f"{m} ({LAYERS[layer(m)][0]}) imports {d} ({LAYERS[layer(d)][0]})"
              for m, deps in edges.items() for d in deps if layer(d) > layer(m)]
    assert upward == []


def test_no_project_import_inside_a_function(graph):
    mods, _ = graph
    hidden = []
    for m, f in mods.items():
        for fn in ast.walk(parsed(f)):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                hidden += [f"{m}.{fn.name}" for d in project_imports(fn, mods)]
    assert hidden == []


def test_no_print_in_the_library_and_no_sys_path_edits():
    prints = [f"{f.relative_to(REPO)}:{n.lineno}" for f in (REPO / "ldm").rglob("*.py")
              for n in ast.walk(parsed(f))
              if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"]
    assert prints == []
    edits = [str(f.relative_to(REPO)) for d in ("scripts", "bench") for f in (REPO / d).glob("*.py")
             if "sys.path" in f.read_text()]
    assert edits == []


def test_nothing_runs_at_import_time():
    """Top-level statements of the library define things; a bare call (e.g. matplotlib.use) would act on import."""
    calls = [f"{f.relative_to(REPO)}:{n.lineno}" for f in (REPO / "ldm").rglob("*.py")
             for n in parsed(f).body if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)]
    assert calls == []


def test_ldm_util_re_exports_its_modules_and_defines_nothing():
    """`ldm.util` is split by idea (ldm/util/*.py); the package keeps `from ldm.util import X` working for users and
    CompVis code, and holds no definition of its own (one definition of each helper)."""
    import ldm.util
    tree = ast.parse((REPO / "ldm" / "util" / "__init__.py").read_text())
    assert [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))] == []
    missing = [n for n in ldm.util.__all__ if not hasattr(ldm.util, n)]
    assert missing == []
    homes = {n: getattr(getattr(ldm.util, n), "__module__", None) for n in ldm.util.__all__}
    assert not [n for n, m in homes.items() if m == "ldm.util"]
    assert homes["instantiate_from_config"] == "ldm.util.instantiate" and homes["image_grid"] == "ldm.util.images"


# ---- docs/architecture.md names what exists -----------------------------------------------------------------------
DOC = REPO / "docs" / "architecture.md"
PATH_LIKE = re.compile(r"`((?:ldm|tests|scripts|configs|docs|bench)/[\w./-]*|[\w-]+\.py)`")


def doc_paths(text: str) -> List[str]:
    """The files and folders a text names in backticks (templates such as `<form>.py` left out)."""
    return sorted({m.group(1) for m in PATH_LIKE.finditer(text)})


def defined_names(path: Path) -> Set[str]:
    """Classes, functions and assigned names anywhere in a Python file (module level and class bodies)."""
    names = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, (ast.ClassDef, ast.FunctionDef)):
            names.add(n.name)
        elif isinstance(n, (ast.Assign, ast.AnnAssign)):
            targets = n.targets if isinstance(n, ast.Assign) else [n.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def exists(named: str) -> bool:
    """A path from the repository root, or a bare file name (`positions.py`) that some project file has."""
    if "/" in named:
        return (REPO / named).exists()
    return (REPO / named).is_file() or any(any((REPO / d).rglob(named)) for d in ("ldm", "scripts", "tests", "bench"))


def test_the_architecture_doc_names_files_that_exist():
    named = doc_paths(DOC.read_text())
    assert len(named) > 30
    assert [p for p in named if not exists(p)] == []
    assert not exists("ldm/util.py") and not exists("no_such_module.py")  # the check can fail


def test_each_change_recipe_names_registries_and_classes_its_files_define():
    """In "Where a change goes", every CamelCase or UPPER_CASE name in backticks is defined in a file that the
    recipe (its paragraph) names, so a renamed registry or base class fails here."""
    recipes = DOC.read_text().split("## Where a change goes", 1)[1].split("\n\n**")[1:]
    assert len(recipes) >= 7
    missing = []
    for recipe in recipes:
        files = [REPO / p for p in doc_paths(recipe) if p.endswith(".py") and (REPO / p).is_file()]
        defined = set().union(*(defined_names(f) for f in files)) if files else set()
        names = set(re.findall(r"`([A-Z][A-Za-z0-9_]*)`", recipe))
        missing += [f"{recipe.split('**')[0]}: {n}" for n in sorted(names - defined)]
    assert missing == []


def make_recipe(target: str) -> str:
    """The commands of a Makefile target."""
    text = (REPO / "Makefile").read_text()
    match = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", text, re.M)
    assert match, f"no target {target} in the Makefile"
    return match.group(1)


def test_make_test_runs_every_test_and_test_fast_all_but_the_slow_ones():
    """CI runs `make test`: nothing may be left out there; `make test-fast` leaves out only the tests marked slow."""
    full, fast = (make_recipe(t).split(" -m pytest", 1)[1] for t in ("test", "test-fast"))
    selects = re.compile(r"\s(-m|-k|--deselect|--ignore)\b")
    assert selects.findall(full) == []
    assert selects.findall(fast) == ["-m"] and '-m "not slow"' in fast
    markers = re.search(r"^markers = \[(.*)\]$", (REPO / "pyproject.toml").read_text(), re.M)
    assert markers and '"slow:' in markers.group(1)  # registered (Python 3.9 has no tomllib)


@pytest.mark.slow
def test_every_bench_and_script_module_imports():
    """bench/ and scripts/ are run by hand, not by the suite: each must at least import (a renamed library name
    breaks them silently otherwise). One child process imports them all, the bench folder on its path as when run."""
    code = ("import importlib.util, sys, pathlib\n"
            "bad = []\n"
            "for folder in ('bench', 'scripts'):\n"
            "    sys.path.insert(0, folder)\n"
            "    for f in sorted(pathlib.Path(folder).glob('*.py')):\n"
            "        spec = importlib.util.spec_from_file_location(f'_smoke_{folder}_{f.stem}', f)\n"
            "        try:\n"
            "            spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
            "        except Exception as e:\n"
            "            bad.append(f'{f}: {type(e).__name__}: {e}')\n"
            "print('\\n'.join(bad))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr[-2000:]


def test_a_conftest_helper_is_defined_once():
    """A helper shared through tests/conftest.py (snapshot, build_tiny, ...) has no near-copy in a test module."""
    def top_level(path: Path) -> Set[str]:  # the functions and classes at column 0
        return set(re.findall(r"^(?:def|class) (\w+)", path.read_text(), re.M))
    shared = top_level(REPO / "tests" / "conftest.py")
    copies = [f"{f.name}: {name}" for f in sorted((REPO / "tests").glob("test_*.py")) for name in top_level(f) & shared]
    assert copies == []
