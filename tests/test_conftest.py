"""The shared test helpers of tests/conftest.py do what the fast tier relies on: `covering` keeps every value of every
facet in `make test-fast` and marks the rest slow (nothing is dropped), and the read-only tiny model fails the test
that changed it in any way."""
import copy
import types

import pytest
import torch

from conftest import ParameterSet, check_unchanged, covering, model_state
from ldm.modules.adapters import inject_adapters


def fast_cases(cases):
    return [c for c in cases if not (isinstance(c, ParameterSet) and any(m.name == "slow" for m in c.marks))]


def values(case):
    return case.values if isinstance(case, ParameterSet) else case


def test_covering_keeps_each_value_of_each_facet_once_and_marks_the_rest_slow():
    grid = [(din, dout, method) for din in "abcd" for dout in "xyz" for method in ("relu", "silu")]
    cases = covering(grid, lambda d, o, m: d, lambda d, o, m: o, lambda d, o, m: m)
    assert len(cases) == len(grid) and [values(c) for c in cases] == grid  # every case still runs in `make test`
    fast = [values(c) for c in fast_cases(cases)]
    assert fast[0] == grid[0] and len(fast) == 4  # the fewest that show the four dins
    for facet in range(3):
        assert {case[facet] for case in fast} == {case[facet] for case in grid}


def test_covering_keeps_ids_and_marks_and_takes_single_values():
    cases = covering([pytest.param(1, id="one"), pytest.param(2, id="two", marks=pytest.mark.gpu), 3])
    assert cases[0].id == "one" and [m.name for m in cases[1].marks] == ["gpu", "slow"] and cases[1].id == "two"
    assert fast_cases(cases) == cases[:1] and cases[2].values == (3,)
    rows = covering([types.SimpleNamespace(id="a"), types.SimpleNamespace(id="b")])  # a row's own `id` is no test id
    assert rows[1].id is None  # so the parametrize's ids= list names it


@pytest.mark.parametrize("change", [
    lambda m: m.out[2].weight.data.add_(1e-3),
    lambda m: inject_adapters(m, {"transformer_adp_config": [{"din": "attn2o", "dout": "ffni", "mid_dim": 2}]}),
    lambda m: m.out[2].weight.requires_grad_(False),
    lambda m: m.out.train(),
    lambda m: setattr(m, "forward", lambda *args: None),
    lambda m: m.out.register_forward_hook(lambda *args: None),
], ids=["weight", "adapters", "frozen", "train-mode", "patched-method", "hook"])
def test_a_read_only_model_that_was_changed_fails_its_test(tiny_model_session, change):
    model = copy.deepcopy(tiny_model_session.unet)  # the checks are the same on any module
    state = model_state(model)
    check_unchanged(model, state)
    with torch.no_grad():
        change(model)
    with pytest.raises(AssertionError, match="read-only test"):
        check_unchanged(model, state)
