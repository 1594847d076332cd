"""LoRA files as today's diffusers, peft and transformers write them load as they are, at the strength they were
trained with: each file is written by the installed library from a diffusers twin of the tiny model, loaded by us,
and compared with the library's own load of the same file (UNet and text-encoder outputs, max abs diff <= 1e-5).

  diffusers  save_lora_weights with lora_alpha != r, alpha_pattern and rank_pattern, UNet + text encoder (metadata
             `lora_adapter_metadata`; text-encoder names without `text_model` under transformers 5); the same as .bin
  kohya      diffusers' convert_state_dict_to_kohya (`lora_te1_encoder_layers_N_...`)
  peft       get_peft_model_state_dict + safetensors (bare module names, no alpha: alpha = rank, logged), and
             PeftModel.save_pretrained folders (adapter_config.json with lora_alpha != r, rsLoRA) for the UNet and the
             text encoder
Then the errors: files of other shapes name what failed to match per network and do not call an SD v1 file another
architecture; .pt / .bin / .ckpt files that hold no LoRA say what is expected.
"""
import copy
import json
import logging
import warnings

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from conftest import TINY_CONFIG
from ldm.modules.adapters import (AdapterDirError, adapter_groups, load_adapter_from_dir, lora_state_dict,
                                  read_lora_state_dict, save_lora_file)
from ldm.modules.adapters.sources import METADATA_KEY, pattern_value
from test_lora import PROMPTS, hf_text_encoder, lora, outputs, proj, with_group

peft = pytest.importorskip("peft")
pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, StableDiffusionPipeline  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

ATTENTION = ["to_k", "to_q", "to_v", "to_out.0"]  # diffusers' train_dreambooth_lora.py default
UNET_TARGETS = ATTENTION + ["proj_in", "ff.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
TOL = 1e-5


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 4, 4, generator=g), torch.tensor([3, 700]), torch.randn(2, 5, 32, generator=g)


@pytest.fixture(scope="module")
def twin(tiny_model_session):
    """Builds a diffusers StableDiffusionPipeline holding the tiny model's base weights (no hub, no VAE)."""
    from test_unet import load_bench
    config = OmegaConf.load(TINY_CONFIG).model

    def build():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return StableDiffusionPipeline(
                vae=None, text_encoder=hf_text_encoder(tiny_model_session.cond_stage_model), tokenizer=None,
                unet=load_bench().diffusers_twin(tiny_model_session.unet, config),
                scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)
    return build


def theirs(pipe, inputs, tokens):
    """(UNet output, text-encoder output) of a diffusers pipeline on our inputs."""
    with torch.no_grad():
        return (pipe.unet(*inputs[:2], encoder_hidden_states=inputs[2]).sample,
                pipe.text_encoder(input_ids=tokens).last_hidden_state)


def ours(model, path, inputs):
    """Our outputs with the file at `path` loaded into a copy of `model`."""
    model = copy.deepcopy(model)
    load_adapter_from_dir(model, str(path), name="file")
    return outputs(model, inputs)


def max_diffs(a, b):
    return [(x - y).abs().max().item() for x, y in zip(a, b)]


def check(name, mine, reference, base):
    """Ours equals the reference to TOL on both networks, and the LoRA changed the outputs (else nothing is shown)."""
    diffs, effect = max_diffs(mine, reference), max_diffs(reference, base)
    print(f"{name}: max abs diff UNet {diffs[0]:.3g}, text encoder {diffs[1]:.3g} (LoRA effect {effect[0]:.3g}, "
          f"{effect[1]:.3g})")
    assert max(diffs) <= TOL
    return effect


def peft_lora(pipe, unet_config=None, te_config=None):
    """Random LoRA weights on the pipeline's UNet and text encoder by peft, as diffusers' training scripts add them."""
    torch.manual_seed(0)
    if unet_config:
        pipe.unet.add_adapter(unet_config)
    if te_config:  # transformers' add_adapter wants a newer peft than some installs have: peft's own injection
        inject_adapter_in_model(te_config, pipe.text_encoder)
    with torch.no_grad():  # lora_B starts at 0 only with the default init; make every factor show
        for n, p in list(pipe.unet.named_parameters()) + list(pipe.text_encoder.named_parameters()):
            if "lora_" in n:
                p.mul_(0.3)
    return pipe


def unet_config(**kw):
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": UNET_TARGETS, "init_lora_weights": False, **kw})


def te_config(**kw):
    return LoraConfig(**{"r": 2, "lora_alpha": 5, "target_modules": TE_TARGETS, "init_lora_weights": False, **kw})


PATTERNED = dict(alpha_pattern={"attn2.to_k": 3, "mid_block.attentions.0.transformer_blocks.0.attn1.to_q": 1.5},
                 rank_pattern={"attn2.to_k": 2})


def trained_pipe(twin, **unet_kw):
    """A pipeline with LoRA on both networks (alpha != r), and peft's state dicts of each."""
    pipe = peft_lora(twin(), unet_config(**unet_kw), te_config())
    return pipe, get_peft_model_state_dict(pipe.unet), get_peft_model_state_dict(pipe.text_encoder)


@pytest.fixture(scope="module")
def trained(twin):
    """LoRA on the attention projections, as diffusers' DreamBooth LoRA script trains it:
    convert_state_dict_to_diffusers renames exactly these, and diffusers' loader reads a file of one naming only."""
    return trained_pipe(twin, target_modules=ATTENTION, **PATTERNED)


@pytest.fixture(scope="module")
def trained_wide(twin):
    """LoRA on every Linear / 1x1 conv kohya adapts in a transformer block, one rank (diffusers' loader misreads a
    kohya file of mixed ranks: its alpha_pattern from `.alpha` tensors does not reach those modules, so a rank-2
    module with alpha 2 loads at scale 4 / 2)."""
    return trained_pipe(twin, target_modules=UNET_TARGETS)


@pytest.mark.slow
def test_diffusers_save_lora_weights_with_alpha_metadata(tiny_model_session, twin, trained, inputs, tmp_path, caplog):
    from diffusers.utils import convert_state_dict_to_diffusers
    pipe, unet_sd, te_sd = trained
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(unet_sd),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(te_sd),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=te_config().to_dict())
    file = tmp_path / "pytorch_lora_weights.safetensors"
    keys = list(load_file(file))
    assert any(k.startswith("text_encoder.encoder.layers.0.") for k in keys)  # transformers 5: no text_model level
    tokens = tiny_model_session.cond_stage_model.tokenize(PROMPTS)
    base = theirs(twin(), inputs, tokens)
    reference = twin()
    reference.load_lora_weights(str(file))
    caplog.set_level(logging.INFO)
    mine = ours(tiny_model_session, file, inputs)
    assert "gives no alpha" not in caplog.text
    check("diffusers save_lora_weights", mine, theirs(reference, inputs, tokens), base)
    assert max(max_diffs(mine, theirs(pipe, inputs, tokens))) <= TOL  # the pipeline that wrote it, too
    assert max(max_diffs(ours(tiny_model_session, tmp_path, inputs), mine)) == 0  # the folder, as diffusers names it
    stripped = tmp_path / "no-metadata.safetensors"
    save_file(load_file(file), stripped)  # the same tensors, alpha lost: what we did before reading the metadata
    assert min(max_diffs(ours(tiny_model_session, stripped, inputs), mine)) > 1e-2


@pytest.mark.slow
def test_diffusers_bin_file(tiny_model_session, twin, trained, inputs, tmp_path, caplog):
    from diffusers.utils import convert_state_dict_to_diffusers
    _, unet_sd, te_sd = trained
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(unet_sd),
                                              text_encoder_lora_layers=convert_state_dict_to_diffusers(te_sd),
                                              safe_serialization=False)  # torch pickles carry no metadata
    tokens = tiny_model_session.cond_stage_model.tokenize(PROMPTS)
    reference = twin()
    reference.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.bin")
    caplog.set_level(logging.INFO)
    check("diffusers .bin", ours(tiny_model_session, tmp_path / "pytorch_lora_weights.bin", inputs),
          theirs(reference, inputs, tokens), theirs(twin(), inputs, tokens))
    assert "gives no alpha for" in caplog.text and "assuming alpha = rank" in caplog.text


@pytest.mark.slow
def test_kohya_file_from_convert_state_dict_to_kohya(tiny_model_session, twin, trained_wide, inputs, tmp_path):
    from diffusers.utils import convert_state_dict_to_kohya
    _, unet_sd, te_sd = trained_wide
    sd = convert_state_dict_to_kohya({**{f"unet.{k}": v for k, v in unet_sd.items()},
                                      **{f"text_encoder.{k}": v for k, v in te_sd.items()}})
    assert any(k.startswith("lora_te1_encoder_layers_0_") for k in sd)  # neither lora_te_ nor text_model
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "kohya.safetensors")
    tokens = tiny_model_session.cond_stage_model.tokenize(PROMPTS)
    reference = twin()
    reference.load_lora_weights(str(tmp_path / "kohya.safetensors"))
    check("kohya (convert_state_dict_to_kohya)", ours(tiny_model_session, tmp_path / "kohya.safetensors", inputs),
          theirs(reference, inputs, tokens), theirs(twin(), inputs, tokens))


@pytest.mark.slow
def test_peft_state_dict_of_the_unet(tiny_model_session, twin, trained_wide, inputs, tmp_path, caplog):
    """get_peft_model_state_dict + safetensors: bare module names and no alpha; diffusers' own load of such a state
    dict (load_lora_adapter, prefix=None) takes alpha = rank, and so do we, saying so."""
    _, unet_sd, _ = trained_wide
    assert next(iter(unet_sd)).startswith("down_blocks.")
    save_file(unet_sd, tmp_path / "peft.safetensors")
    tokens = tiny_model_session.cond_stage_model.tokenize(PROMPTS)
    reference = twin()
    reference.unet.load_lora_adapter(str(tmp_path / "peft.safetensors"), prefix=None)
    caplog.set_level(logging.INFO)
    effect = check("peft state dict (UNet)", ours(tiny_model_session, tmp_path / "peft.safetensors", inputs),
                   theirs(reference, inputs, tokens), theirs(twin(), inputs, tokens))
    assert effect[0] > 1e-2 and effect[1] == 0
    assert "assuming alpha = rank (scale 1)" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("network,config", [
    ("unet", unet_config(lora_alpha=16, use_rslora=True, **PATTERNED)),
    ("text_encoder", te_config(lora_alpha=7, target_modules=["q_proj", "v_proj", "fc1"])),
])
def test_peft_save_pretrained_folder(tiny_model_session, twin, inputs, tmp_path, network, config):
    """PeftModel.save_pretrained of one network (lora_alpha != r in adapter_config.json, keys under
    base_model.model.), compared with peft's own PeftModel.from_pretrained of the folder."""
    torch.manual_seed(0)
    saved = get_peft_model(getattr(twin(), network), config)
    saved.save_pretrained(str(tmp_path / "peft"))
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["lora_alpha"] != config.r
    reference = twin()
    setattr(reference, network, PeftModel.from_pretrained(getattr(reference, network), str(tmp_path / "peft")))
    tokens = tiny_model_session.cond_stage_model.tokenize(PROMPTS)
    effect = check(f"peft save_pretrained ({network})", ours(tiny_model_session, tmp_path / "peft", inputs),
                   theirs(reference, inputs, tokens), theirs(twin(), inputs, tokens))
    assert effect[0 if network == "unet" else 1] > 1e-3


@pytest.mark.parametrize("name", ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
                                  "mid_block.attentions.0.proj_in", "up_blocks.1.attentions.0.proj_in",
                                  "text_model.encoder.layers.1.mlp.fc1", "encoder.layers.1.mlp.fc1", "to_k"])
def test_pattern_keys_match_as_peft_matches_them(name):
    from peft.utils.other import get_pattern_key
    patterns = {"attn2.to_k": 1, "mid_block.attentions.0.proj_in": 2, "layers.1.mlp.fc1": 3, "proj_in": 4,
                "to_.": 5}
    key = get_pattern_key(list(patterns), name)
    assert pattern_value(patterns, name) == patterns.get(key)


# ---- errors -------------------------------------------------------------------------------------------------------
def save_ours(model, path, **kw):
    """A kohya file of a LoRA group on `model` (ours, so its names are right for that model)."""
    save_lora_file(with_group(copy.deepcopy(model), proj(lora(rank=2)), proj(lora(["q_proj", "fc1"], rank=2))),
                   path, **kw)
    return load_file(path)


def load_error(model, path, *messages):
    model = copy.deepcopy(model)
    with pytest.raises(AdapterDirError) as e:
        load_adapter_from_dir(model, str(path))
    assert not adapter_groups(model)
    for m in messages:
        assert m in str(e.value), str(e.value)
    return str(e.value)


@pytest.mark.slow
def test_a_bigger_sd_v1_file_is_named_by_network_not_another_architecture(tiny_model_session, tmp_path):
    sd = save_ours(tiny_model_session, tmp_path / "k.safetensors")
    more = {k.replace("layers_1_", "layers_5_").replace("down_blocks_1_", "down_blocks_2_"): v for k, v in sd.items()}
    save_file({**sd, **{k: v.clone() for k, v in more.items()}}, tmp_path / "bigger.safetensors")
    text = load_error(tiny_model_session, tmp_path / "bigger.safetensors", "have no counterpart here (UNet: ",
                      "; text encoder: ", "e.g. lora_te_text_model_encoder_layers_5_",
                      "nearest name here: lora_te_text_model_encoder_layers_1_",
                      "made for a model of another size or layout")
    assert "architecture" not in text and "SDXL" not in text


@pytest.mark.slow
def test_sdxl_files_say_so_and_conv_lora_files_load(tiny_model_session, tmp_path):
    sd = save_ours(tiny_model_session, tmp_path / "k.safetensors")
    te2 = {k.replace("lora_te_", "lora_te2_"): v for k, v in sd.items() if k.startswith("lora_te_")}
    save_file({**sd, **{k: v.clone() for k, v in te2.items()}}, tmp_path / "sdxl.safetensors")
    load_error(tiny_model_session, tmp_path / "sdxl.safetensors", "second text encoder: ", "it is an SDXL file")
    conv = {"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.zeros(2, 32, 3, 3),
            "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.zeros(32, 2, 1, 1)}
    save_file({**sd, **conv}, tmp_path / "locon.safetensors")
    model = copy.deepcopy(tiny_model_session)
    load_adapter_from_dir(model, str(tmp_path / "locon.safetensors"))  # LoCon: a 3x3 conv's LoRA loads
    assert "locon" in {s.type for s in adapter_groups(model)["default"]}
    norm = {"lora_unet_down_blocks_0_resnets_0_norm1.w_norm": torch.zeros(32)}
    save_file({**sd, **norm}, tmp_path / "norm.safetensors")
    load_error(tiny_model_session, tmp_path / "norm.safetensors",
               "e.g. lora_unet_down_blocks_0_resnets_0_norm1 (a GroupNorm32): updates of Linear and Conv2d modules load")


@pytest.mark.slow
def test_torch_files_are_read_safely_or_refused_with_what_is_expected(tiny_model_session, inputs, tmp_path):
    sd = save_ours(tiny_model_session, tmp_path / "k.safetensors")
    expected = ours(tiny_model_session, tmp_path / "k.safetensors", inputs)
    for suffix in (".pt", ".ckpt", ".bin"):
        torch.save(sd, tmp_path / f"k{suffix}")
        assert max(max_diffs(ours(tiny_model_session, tmp_path / f"k{suffix}", inputs), expected)) == 0
    torch.save([v for v in sd.values()], tmp_path / "list.pt")  # cloneofsimo's lora_diffusion: tensors, no names
    load_error(tiny_model_session, tmp_path / "list.pt", "holds no tensors", "a dict of named tensors",
               "cannot be mapped to modules")
    torch.save({"state_dict": {"model.diffusion_model.out.2.weight": torch.ones(1)}}, tmp_path / "model.ckpt")
    load_error(tiny_model_session, tmp_path / "model.ckpt", "it is a model checkpoint: pass it as --ckpt")
    (tmp_path / "notes.txt").write_text("x")
    load_error(tiny_model_session, tmp_path / "notes.txt", "is not a LoRA file: a LoRA file is .safetensors or a torch "
               "file (.pt, .pth, .bin, .ckpt)")


@pytest.mark.slow
def test_peft_configs_read_wrong_are_refused(tiny_model_session, tmp_path):
    model = with_group(copy.deepcopy(tiny_model_session), proj(lora(["attn1.to_q"], rank=2)))
    sd = lora_state_dict(model, fmt="diffusers")
    (tmp_path / "p").mkdir()
    save_file(sd, tmp_path / "p" / "adapter_model.safetensors")
    for config, message in (({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": True},
                             "says use_dora but its tensors have no DoRA magnitude"),
                            ({"peft_type": "LOHA", "r": 2}, "holds LoRAFactors tensors but its peft config is of type "
                                                            "LOHA"),
                            ({"peft_type": "IA3"}, "is a peft IA3 adapter; peft adapters read here are LoRA"),
                            ({"peft_type": "LORA", "r": 2, "lora_alpha": float("nan")}, "lora_alpha must be a "
                                                                                        "positive number"),
                            ({"peft_type": "LORA", "r": 4, "lora_alpha": 4}, "its tensors have rank 2, its LoRA "
                                                                             "config (r, rank_pattern) says 4")):
        (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(config))
        load_error(tiny_model_session, tmp_path / "p", message)
    metadata = {METADATA_KEY: json.dumps({"unet.r": 2, "unet.lora_alpha": 4})}
    save_file({**sd, **{k.replace(".lora_A.weight", ".alpha"): torch.tensor(1.0) for k in sd if "lora_A" in k}},
              tmp_path / "both.safetensors", metadata=metadata)
    load_error(tiny_model_session, tmp_path / "both.safetensors", "has alpha 1 as a tensor and 4 from its LoRA "
                                                                   "config: the file contradicts itself")
    updates = read_lora_state_dict(copy.deepcopy(tiny_model_session), sd, "x", {"unet": {"r": 2, "lora_alpha": 4}})
    assert {u.alpha for u in updates.values()} == {4.0}
