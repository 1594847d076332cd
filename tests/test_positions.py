"""The claim of docs/architecture.md that a new adapter position is a tap in the block's forward plus its name in
`ldm/modules/adapters/positions.py` (then `make configs`): a toy point added in this file alone validates, is tapped
and reported by the block, reads and writes the tensor at that point, and gets its configs with the paper's size.

The toy point `attn1n` is the normalised input of self-attention: `attn1(taps("attn1n", norm1(x)))`.
"""
import pytest
import torch
from omegaconf import OmegaConf

import ldm.modules.attention as attention
import test_forms
from ldm.modules.adapters import (AdapterConfigError, adapter_blocks, adapters_enable, inject_adapters,
                                  parse_adapter_config, valid_pairs)
from ldm.modules.adapters import positions
from scripts import make_adapter_configs
from test_forms import inputs

TOY = "attn1n"


def _forward(self, x, context=None):
    """BasicTransformerBlock._forward with the toy point tapped (recipe step 1: the block's forward)."""
    taps = (self.adapters.taps() if self.adapters is not None else None) or attention._no_taps
    x = taps("attn1i", x)
    h = taps("attn1o", self.attn1(taps(TOY, self.norm1(x))))
    x = taps("attn2i", h + x)
    context = taps("attn2c", context)
    h = taps("attn2o", self.attn2(self.norm2(x), context=context))
    x = taps("ffni", h + x)
    h = taps("ffno", self.ff(self.norm3(x)))
    return taps("transo", h + x)


@pytest.fixture
def toy_position(monkeypatch):
    """Recipe step 2: the name in STREAM (data-flow order, after attn1i) and in POSITIONS (a din and a dout). The
    block module holds its own binding of the STREAM tuple (read by adapter_widths), so the test sets both."""
    stream = positions.STREAM[:1] + (TOY,) + positions.STREAM[1:]
    monkeypatch.setattr(positions, "STREAM", stream)
    monkeypatch.setattr(attention, "STREAM", stream)
    transformer = positions.POSITIONS["transformer"]
    monkeypatch.setitem(positions.POSITIONS, "transformer", {"din": stream + ("attn2c",),
                                                             "dout": (TOY,) + transformer["dout"]})
    monkeypatch.setattr(attention.BasicTransformerBlock, "_forward", _forward)


def config(din, dout, init="zero"):
    return {"transformer_adp_config": [{"din": din, "dout": dout, "mid_dim": 4, "init": init}]}


def test_the_toy_point_is_refused_before_it_is_added():
    with pytest.raises(AdapterConfigError, match=TOY):
        parse_adapter_config(config(TOY, "ffni"))


def test_the_toy_point_pairs_by_data_flow(toy_position):
    pairs = {(din, dout) for kind, din, dout in valid_pairs() if kind == "transformer"}
    assert {(TOY, TOY), (TOY, "attn2i"), (TOY, "ffni"), (TOY, "transo"), ("attn1i", TOY)} <= pairs
    assert ("attn1o", TOY) not in pairs and (TOY, "attn2c") not in pairs  # upstream; the context pairs only itself
    assert [s.din for s in parse_adapter_config(config(TOY, "ffni"))] == [TOY]


def test_the_block_taps_and_reports_exactly_the_positions_with_the_toy_point(toy_position, tiny_model):
    test_forms.test_blocks_name_exactly_the_positions_of_their_kind(tiny_model)  # the schema's check, rerun
    _, block, _, widths = next(b for b in adapter_blocks(tiny_model.unet) if b[2] == "transformer")
    assert widths[TOY] == block.norm1.normalized_shape[0]


def test_an_adapter_reads_and_writes_the_tensor_at_the_toy_point(toy_position, tiny_model):
    """Zero-initialised it is the identity; with weights it changes the output; an adapter writing at the toy point
    changes attn1's input (what the block then computes) and one reading it sees norm1's output."""
    unet = tiny_model.unet
    with torch.no_grad():
        base = unet(*inputs())
        inject_adapters(unet, config(TOY, TOY), "zero")
        assert torch.equal(unet(*inputs()), base)
    block = next(b for _, b, kind, _ in adapter_blocks(unet) if kind == "transformer")
    seen, read = [], []
    block.norm1.register_forward_hook(lambda m, i, o: seen.append(o))
    for dout in (TOY, "ffni"):
        torch.manual_seed(0)
        inject_adapters(unet, config(TOY, dout, init="default"), f"to_{dout}")
        adapter = block.adapters[f"to_{dout}"][0]
        hook = adapter.register_forward_pre_hook(lambda m, args: read.append(args[0]))
        seen.clear()
        read.clear()
        with torch.no_grad():
            out = unet(*inputs())
        hook.remove()
        assert not torch.allclose(out, base, atol=1e-5), dout
        assert len(read) == 1 and torch.equal(read[0], seen[0]), "the adapter reads norm1's output"
        adapters_enable(unet, False, f"to_{dout}")  # each case alone


@pytest.mark.slow
def test_make_configs_writes_the_toy_pairs_with_the_papers_size(toy_position, tmp_path):
    """Recipe step 3: `make configs` (scripts/make_adapter_configs.py) writes a config for each new pair, with the
    paper's 60 in transformer blocks."""
    written = make_adapter_configs.main(["--outdir", str(tmp_path), "--docs", str(tmp_path / "forms.md")])
    toy = {p.stem: p for p in written if TOY in p.stem}
    assert set(toy) == {f"{din}-{dout}" for _, din, dout in valid_pairs() if TOY in (din, dout)}
    entry = OmegaConf.load(toy[f"{TOY}-ffni"]).model.params.unet_config.params.adapter_config.transformer_adp_config
    assert [(e.din, e.dout, e.mid_dim) for e in entry] == [(TOY, "ffni", 60)]
