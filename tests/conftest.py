"""Shared fixtures and helpers: the tiny SD v1 config and model (built once, random weights made non-trivial), a
folder tree's snapshot, the covering cases of a grid that `make test-fast` runs."""
import copy
import hashlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util.instantiate import instantiate_from_config

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tests" / "tiny-inference.yaml"
# The reference list of SD v1 checkpoint keys and shapes: shared/ beside or inside the repository
KEYS_TSV = next((p for p in (REPO / "shared" / "sd-v1-keys.tsv", REPO.parent / "shared" / "sd-v1-keys.tsv")
                 if p.exists()), REPO / "shared" / "sd-v1-keys.tsv")


def randomize_zero_layers(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give zero-initialised output layers random values so tests of the full network are not blind to them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def build_tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = instantiate_from_config(OmegaConf.load(TINY_CONFIG).model)
    return randomize_zero_layers(model, seed).eval()


ParameterSet = type(pytest.param(None))  # what pytest.param makes (its class is not public)

# Content hashes of files unchanged since (path, inode, size, mtime, ctime): the bad-input tables snapshot the same
# tens of MB of module-scoped files (checkpoints, a trained run) before and after each of hundreds of rows.
_HASHES: Dict[Tuple[str, int, int, int, int], str] = {}
SETTLED_NS = 1_000_000_000  # a file changed longer ago than this is hashed once (a write after that changes ctime)


def file_hash(path: str) -> str:
    """sha256 of a file's bytes; remembered by its stat for a file settled for SETTLED_NS (the kernel's coarse clock
    could give a write within one tick of the previous one the same ctime, so a fresh file is always read)."""
    st = os.stat(path)
    key = (path, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _HASHES:
        return _HASHES[key]
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > SETTLED_NS:
        _HASHES[key] = digest
    return digest


def snapshot(*folders: Path) -> Dict[str, str]:
    """Path -> content hash of every file (and a marker for every folder and every other entry) under `folders`, empty
    lock files aside (an evaluation claims a run with its dedicated `.eval.lock`, whose content is never written): equal
    snapshots before and after a refused call show it changed, added and left nothing."""
    found = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for d in dirs:
                found[os.path.join(root, d)] = "dir"
            for f in files:
                p = os.path.join(root, f)
                if f.endswith(".lock") and os.path.isfile(p) and os.path.getsize(p) == 0:
                    continue
                found[p] = file_hash(p) if os.path.isfile(p) else "special"
    return found


def covering(cases: Sequence[Any], *facets: Callable[..., Any]) -> List[Any]:
    """`cases` of a parametrize with all but a covering few marked slow: greedily, the case that shows the most values
    not yet shown of the facets (functions of a case's values, e.g. its position or form), until every value is shown;
    at least the first case. `make test` runs every case; `make test-fast` the few, so each value still runs there."""
    values = [case.values if isinstance(case, ParameterSet) else case if isinstance(case, tuple) else (case,)
              for case in cases]
    shows = [{(i, facet(*v)) for i, facet in enumerate(facets)} for v in values]
    unseen, fast = set().union(*shows), {0}
    unseen -= shows[0]
    while unseen:
        best = max(range(len(cases)), key=lambda k: len(shows[k] & unseen))
        fast.add(best)
        unseen -= shows[best]
    given = [(case.marks, case.id) if isinstance(case, ParameterSet) else ((), None) for case in cases]
    return [case if k in fast else pytest.param(*values[k], marks=[*given[k][0], pytest.mark.slow], id=given[k][1])
            for k, case in enumerate(cases)]


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and lose ~10x when the two cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def diffusers_sample(model, sched, c, uc, scale=5.0, seed=3):
    """(x_T, x_0) of a diffusers scheduler's loop over our model with our guidance, for sampler equivalence tests."""
    from ldm.models.diffusion.guidance import guided_eps
    x_T = torch.randn(c.shape[0], 4, 4, 4, generator=torch.Generator().manual_seed(seed))
    x = x_T
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(guided_eps(model, x, t.repeat(c.shape[0]), c, uc, scale), t, x).prev_sample
    return x_T, x


@pytest.fixture(scope="session")
def tiny_model_session():
    return build_tiny()


@pytest.fixture
def tiny_model(tiny_model_session):
    """A fresh copy of the tiny LatentDiffusion (random weights, eval mode) for each test."""
    return copy.deepcopy(tiny_model_session)


def plain_attributes(model: torch.nn.Module) -> Dict[Tuple[str, str], Any]:
    """Every module's settings (numbers, strings, flags) and functions set on it: a changed setting or a patched method
    shows (what a forward caches, like the decoder's last_z_shape, does not)."""
    return {(name, k): v if not callable(v) else "function" for name, m in model.named_modules()
            for k, v in vars(m).items() if isinstance(v, (bool, int, float, str, type(None))) or callable(v)}


def model_state(model: torch.nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, bool], Dict[Tuple[str, str], Any]]:
    """What a test that only reads `model` must leave as it was: tensors, which parameters train, plain attributes."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()}, plain_attributes(model))


def check_unchanged(model: torch.nn.Module, state) -> None:
    """AssertionError naming what a read-only test changed in `model` (against `model_state` before it)."""
    tensors, trains, attributes = state
    now = model.state_dict()
    assert now.keys() == tensors.keys(), "a read-only test added or removed model keys: give it tiny_model"
    assert all(torch.equal(now[k], v) for k, v in tensors.items()), "a read-only test changed the weights"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == trains, "a read-only test (un)froze weights"
    assert plain_attributes(model) == attributes, "a read-only test set or patched an attribute (or train mode)"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "a read-only test left hooks"


@pytest.fixture(scope="session")
def tiny_reference(tiny_model_session):
    return model_state(tiny_model_session)


@pytest.fixture
def tiny_model_readonly(tiny_model_session, tiny_reference):
    """The session's tiny LatentDiffusion itself, for a test that only reads it (no ~0.1 s copy): the test fails if it
    left the model's weights, keys, trainable parameters, attributes, train mode or hooks changed."""
    yield tiny_model_session
    check_unchanged(tiny_model_session, tiny_reference)


@pytest.fixture(scope="session")
def tiny_dino(tmp_path_factory):
    """A random-weight DINO-style ViT (transformers' format, DINO's layer-norm eps), saved once per session."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("dino")
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                                    image_size=32, patch_size=8, layer_norm_eps=1e-6)
    transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A random-weight CLIP (transformers' format), saved once per session."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    config = transformers.CLIPConfig(text_config=small, vision_config={**small, "image_size": 32, "patch_size": 8},
                                     projection_dim=16)
    transformers.CLIPModel(config).save_pretrained(path)
    return path
