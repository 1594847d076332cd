"""CLIP tokenizer and FrozenCLIPEmbedder: OpenAI token ids, SD v1 padding, transformers equivalence, SD keys."""
import copy
import importlib.util
import os

import pytest
import torch

from ldm.modules.encoders.clip_tokenizer import BOS_ID, EOS_ID, CLIPTokenizer, default_bpe_path
from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from ldm.util.instantiate import count_params

KEYS_TSV = "/work/shared/sd-v1-keys.tsv"
TINY = dict(vocab_size=49408, width=64, layers=2, heads=2, max_length=77)
PROMPTS = ["a photo of sks dog", "A Painting of a CAT, by Van Gogh!!! (masterpiece:1.2) 4k 1990s"]


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return FrozenCLIPEmbedder(**TINY)


@pytest.fixture(scope="module")
def reference_tok():
    """open_clip's SimpleTokenizer, loaded from its file alone: importing the package pulls timm/torchvision (slow)."""
    path = os.path.join(os.path.dirname(default_bpe_path()), "tokenizer.py")
    spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError:  # a future open_clip whose tokenizer.py has relative imports
        import open_clip.tokenizer as module
    return module.SimpleTokenizer()


def test_sks_dog_ids(tok):
    ids = tok(["a photo of sks dog"])
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert tok.encode("a photo of sks dog") == [320, 1125, 539, 48136, 1929]


def test_pads_with_eos(tok):
    ids = tok(["a photo of sks dog", ""])
    assert (ids[0, 6:] == EOS_ID).all()
    assert ids[1].tolist() == [BOS_ID] + [EOS_ID] * 76
    assert (ids != 0).all()  # open_clip pads with 0; SD v1 does not


def test_long_prompt_truncates_with_eos_last(tok):
    prompt = " ".join(["dog"] * 100)
    ids = tok([prompt])[0]
    assert ids.shape == (77,)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert ids[1:76].tolist() == [1929] * 75


def test_string_and_list(tok):
    assert torch.equal(tok("a photo of sks dog"), tok(["a photo of sks dog"]))


def test_cleaning(tok):
    assert tok.encode("A PHOTO of  SKS\tDog ") == tok.encode("a photo of sks dog")
    assert tok.encode("cats &amp; dogs") == tok.encode("cats & dogs")


def test_missing_open_clip_says_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install open_clip_torch"):
        default_bpe_path()


def test_decode_round_trip(tok):
    assert tok.decode(tok(["a photo of sks dog"])[0]) == "a photo of sks dog"
    assert tok.decode(tok(["a photo"])[0], skip_special=False).startswith("<|startoftext|>a photo <|endoftext|>")


@pytest.mark.parametrize("prompt", [
    "a photo of sks dog",
    "Hello, World! It's 2023... don't you think?",
    "portrait, 8k, f/1.8, 35mm -- trending on artstation (detailed:1.3) [blurry]",
    "café naïve façade Ünïcödé 日本語のテキスト 😀🐶 emoji",
    "numbers 1234567890 and 3.14159, 1e-5; x^2 + y_1 = 42%",
    "   multiple    spaces\nand\ttabs   &lt;b&gt; html &amp;amp; ",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
])
def test_matches_open_clip(tok, reference_tok, prompt):
    assert tok.encode(prompt) == reference_tok.encode(prompt)
    ours, theirs = tok([prompt])[0], reference_tok([prompt])[0]
    n = int((theirs != 0).sum())  # open_clip pads with 0: compare the content (BOS .. EOS) only
    assert ours[:n].tolist() == theirs[:n].tolist()


def hf_reference(ours: FrozenCLIPEmbedder):
    """transformers' CLIPTextModel with the same sizes, built locally and loaded with our weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=TINY["vocab_size"], hidden_size=TINY["width"], intermediate_size=4 * TINY["width"],
        num_hidden_layers=TINY["layers"], num_attention_heads=TINY["heads"],
        max_position_embeddings=TINY["max_length"], hidden_act="quick_gelu", layer_norm_eps=1e-5,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID, projection_dim=TINY["width"],
        attn_implementation="eager",  # an independent attention path from our SDPA
    )
    model = CLIPTextModel(config).eval()
    # transformers 4 keys start with `text_model.`, transformers 5 drops that level
    has_level = any(k.startswith("text_model.") for k in model.state_dict())
    prefix = "text_model." if has_level else ""
    state = {prefix + k.removeprefix("transformer.text_model."): v for k, v in ours.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    return model


def test_matches_transformers(tiny):
    reference = hf_reference(tiny)
    tokens = tiny.tokenize(PROMPTS)
    with torch.no_grad():
        out = reference(input_ids=tokens, output_hidden_states=True)
        ours = tiny.encode(PROMPTS)
        penultimate = FrozenCLIPEmbedder(**TINY, layer="penultimate")
        penultimate.load_state_dict(tiny.state_dict())
        clip_skip = penultimate.encode(PROMPTS)
        final_layer_norm = getattr(reference, "text_model", reference).final_layer_norm  # transformers 4 / 5
        expected_skip = final_layer_norm(out.hidden_states[-2])
    assert ours.shape == (2, 77, TINY["width"])
    assert (ours - out.last_hidden_state).abs().max() <= 1e-4
    assert (clip_skip - expected_skip).abs().max() <= 1e-4


@pytest.mark.parametrize("layer,depth", [("last", 12), ("penultimate", 11), (-1, 12), (-2, 11), (0, 0), (5, 5)])
def test_layer_choice(layer, depth):
    assert FrozenCLIPEmbedder.layer_to_depth(layer, 12) == depth


@pytest.mark.parametrize("layer", ["pooled", 13, -14])
def test_bad_layer(layer):
    with pytest.raises(ValueError):
        FrozenCLIPEmbedder.layer_to_depth(layer, 12)


def sd_text_encoder_rows():
    """(key, shape) of the cond_stage_model rows of the SD v1 key table, prefix stripped."""
    rows = {}
    with open(KEYS_TSV) as f:
        for line in f:
            if line.startswith("cond_stage_model."):
                key, shape = line.rstrip("\n").split("\t")
                rows[key.removeprefix("cond_stage_model.")] = tuple(int(s) for s in shape.split(","))
    return rows


def test_sd_state_dict_keys_and_count():
    with torch.device("meta"):
        model = FrozenCLIPEmbedder()
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert state == sd_text_encoder_rows()
    assert len(state) == 196
    assert count_params(model) == 123_060_480


def test_frozen(tiny):
    assert not any(p.requires_grad for p in tiny.parameters())
    assert tiny.train() is tiny and not tiny.training
    assert not any(m.training for m in tiny.modules())
    copied = copy.deepcopy(tiny)  # EMA and checkpoint wrappers deep-copy models
    assert copied.train() is copied and not copied.training


def test_not_frozen():
    model = FrozenCLIPEmbedder(**TINY, freeze=False)
    assert all(p.requires_grad for p in model.parameters())
    assert model.train().training


def test_bf16_autocast(tiny):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z = tiny.encode(PROMPTS)
    assert z.shape == (2, 77, TINY["width"])
    assert torch.isfinite(z.float()).all()


def test_bf16_weights(tiny):
    model = copy.deepcopy(tiny).to(torch.bfloat16)
    with torch.no_grad():
        z = model.encode("a photo of sks dog")
    assert z.dtype == torch.bfloat16 and torch.isfinite(z.float()).all()
