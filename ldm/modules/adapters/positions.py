"""Where adapters go: the named points of the blocks (Xiang et al. 2023, arXiv 2303.18181) and the config sections.

Block adapters read the tensor at an input position `din` of a block and add to the tensor at an output position
`dout`. The blocks name these points themselves (they call `taps(name, t)` there and report each point's width in
`adapter_widths()`); this module is what the adapter package knows about them: their data-flow order, which pairs are
valid, and which config section holds each kind of adapter.
"""
from typing import Dict, List, Sequence, Tuple, Union

# The residual stream of a BasicTransformerBlock in data-flow order; attn2c (the context) is a side input of attn2.
STREAM = ("attn1i", "attn1o", "attn2i", "attn2o", "ffni", "ffno", "transo")
POSITIONS = {
    "transformer": {"din": STREAM + ("attn2c",), "dout": ("attn1i", "attn2i", "ffni", "transo", "attn2c")},
    "resblock": {"din": ("resi", "reso"), "dout": ("resi", "reso")},
}
BLOCK_KINDS = tuple(POSITIONS)
PROJECTION = "projection"  # the kind of the forms that sit on Linear / 1x1 Conv2d modules
# adapter_config's sections: the paper's keys for block adapters, ours for the projection forms
SECTIONS = {"transformer_adp_config": "transformer", "resblock_adp_config": "resblock",
            "projection_adp_config": PROJECTION}
SECTION_OF = {kind: section for section, kind in SECTIONS.items()}
# The paper's configs write a ResBlock section holding one adapter as a mapping, not a one-item list.
SINGLE_MAPPING_SECTIONS = ("resblock_adp_config",)


def is_valid_pair(kind: str, din: str, dout: str) -> bool:
    """Whether `dout` lies at or downstream of `din` in a `kind` block (attn2c pairs only with attn2c)."""
    if din not in POSITIONS[kind]["din"] or dout not in POSITIONS[kind]["dout"]:
        return False
    if "attn2c" in (din, dout):
        return din == dout
    order = STREAM if kind == "transformer" else POSITIONS["resblock"]["din"]
    return order.index(dout) >= order.index(din)


def valid_pairs() -> List[Tuple[str, str, str]]:
    """Every valid (kind, din, dout), in data-flow order."""
    return [(kind, i, o) for kind, pos in POSITIONS.items() for i in pos["din"] for o in pos["dout"]
            if is_valid_pair(kind, i, o)]


def block_kind(din: str) -> str:
    """The kind of block whose input position is `din` ("transformer" for unknown names, which fail validation)."""
    return next((kind for kind, pos in POSITIONS.items() if din in pos["din"]), "transformer")


def section_value(section: str, entries: Sequence[Dict]) -> Union[Dict, List[Dict]]:
    """How `entries` are written under `section` in the paper's schema: one ResBlock adapter as a mapping."""
    return dict(entries[0]) if section in SINGLE_MAPPING_SECTIONS and len(entries) == 1 else [dict(e) for e in entries]
