"""LoRA as a projection form of the adapter design space (with (IA)^3 and the paper's bottlenecks in one model), on the
tiny SD v1 model: identity at init, the low-rank update itself, only adapters train, switches, directories over UNet and
text encoder, merging (function, checkpoint writer, scripts/merge.py upl/lpl/exact), kohya and diffusers files (names
at SD v1 size, round trips, and diffusers' own loader), clear errors; SD-size parameter counts on the meta device."""
import copy
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file

import sample
from conftest import REPO, TINY_CONFIG, covering
from ldm.checkpoint import load_state_dict, save_state_dict
from ldm.modules.adapters import (CONFIG_FILE, AdapterConfigError, AdapterDirError, adapter_groups, adapter_parameters,
                                  adapters_enable, combine_updates, freeze_except_adapters, inject_adapters,
                                  is_added_key, load_adapter_from_dir, load_lora_file, lora_state_dict, merge_adapters,
                                  projection_updates, read_lora_state_dict, remove_adapters, save_adapter_to_dir,
                                  save_base_checkpoint, save_lora_file, set_adapter_scale)
from ldm.util.instantiate import count_params, instantiate_from_config
from scripts import convert_lora, merge

SD_CONFIG = REPO / "configs" / "stable-diffusion" / "v1-inference.yaml"
KEYS_TSV = next((p for p in (REPO / "shared" / "sd-v1-keys.tsv", REPO.parent / "shared" / "sd-v1-keys.tsv")
                 if p.exists()), None)
UNET_ALL = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]  # kohya's set
TE_ALL = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
PROMPTS = ["a photo of sks dog", "a painting"]


def lora(target=tuple(UNET_ALL), rank=4, alpha=3.0, **kw):
    return {"type": "lora", "target": list(target) if isinstance(target, tuple) else target, "rank": rank,
            "alpha": alpha, **kw}


def ia3(target=("attn1.to_k", "attn1.to_v", "attn2.to_k", "attn2.to_v"), **kw):
    return {"type": "ia3", "target": list(target), **kw}


def proj(*entries):
    return {"projection_adp_config": list(entries)}


def randomize(model, name=None, std=0.1, seed=0):
    """Non-zero adapter weights, so every adapter shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model, name):
            p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def with_group(model, unet_cfg=None, te_cfg=None, name="default", seed=0):
    """`model` (a tiny LatentDiffusion) with group `name` on its UNet and/or text encoder, weights random."""
    if unet_cfg:
        inject_adapters(model.unet, unet_cfg, name)
    if te_cfg:
        inject_adapters(model.cond_stage_model, te_cfg, name)
    return randomize(model, name, seed=seed)



@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 4, 4, generator=g), torch.tensor([3, 700]), torch.randn(2, 5, 32, generator=g)


def outputs(model, inputs):
    """(UNet output, text-encoder output) of a tiny LatentDiffusion."""
    with torch.no_grad():
        return model.unet(*inputs), model.cond_stage_model(PROMPTS)


def close(a, b, tol=1e-5):
    return all((x - y).abs().max() <= tol for x, y in zip(a, b))


# ---- the form ----------------------------------------------------------------------------------------------------
FORMS = {"lora-names": proj(lora()), "lora-regex": proj(lora(target=r".*\.attn2\.to_(k|v)", rank=2)),
         "lora-dropout": proj(lora(dropout=0.3)), "ia3-kv": proj(ia3()),
         "ia3-ffn": proj(ia3(target=["ff.net.2"], on_input=True)), "ia3-biases": proj(ia3(learn_biases=True)),
         "all-forms": {**proj(lora(), ia3(), ia3(target=["ff.net.2"], on_input=True)),
                       "transformer_adp_config": [{"din": "attn2o", "dout": "ffni", "mid_dim": 4}],
                       "resblock_adp_config": {"din": "resi", "dout": "reso", "mid_dim": 2}}}


@pytest.mark.parametrize("form", covering(list(FORMS), lambda form: form == "all-forms"))
def test_identity_at_init_disable_remove(tiny_model, inputs, form):
    base, base_keys = outputs(tiny_model, inputs), {k: v.clone() for k, v in tiny_model.state_dict().items()}
    inject_adapters(tiny_model.unet, FORMS[form])
    assert torch.equal(outputs(tiny_model, inputs)[0], base[0])  # zero init: bit-identical
    sd = tiny_model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in base_keys.items())  # base keys and weights untouched
    assert set(sd) - set(base_keys) and all(is_added_key(k) for k in set(sd) - set(base_keys))
    changed = outputs(randomize(tiny_model), inputs)[0]
    assert (changed - base[0]).abs().max() > 1e-3
    adapters_enable(tiny_model, False)
    assert torch.equal(outputs(tiny_model, inputs)[0], base[0])
    adapters_enable(tiny_model, True)
    remove_adapters(tiny_model.unet)
    assert torch.equal(outputs(tiny_model, inputs)[0], base[0]) and set(tiny_model.state_dict()) == set(base_keys)
    assert not any(m._forward_hooks for m in tiny_model.modules())


def test_lora_is_the_low_rank_weight_update(tiny_model):
    unet = with_group(tiny_model, proj(lora(rank=3, alpha=5.0, scale=0.5))).unet
    set_adapter_scale(unet, 2.0)
    block = unet.input_blocks[1][1]
    for host, x in ((block.transformer_blocks[0].attn2.to_k, torch.randn(2, 5, 32)),  # Linear
                    (block.proj_in, torch.randn(2, 32, 3, 3))):                       # 1x1 Conv2d
        a = host.adapters["default"][0]
        delta = 0.5 * 2.0 * 5.0 / 3 * a.up.weight.flatten(1) @ a.down.weight.flatten(1)
        w = host.weight + delta.view_as(host.weight)
        expected = F.linear(x, w, host.bias) if x.dim() == 3 else F.conv2d(x, w, host.bias)
        with torch.no_grad():
            assert (host(x) - expected).abs().max() < 1e-5


def test_one_step_trains_only_adapters_of_unet_and_text_encoder(tiny_model, inputs):
    model = tiny_model
    inject_adapters(model.unet, {**proj(lora(), ia3()), "transformer_adp_config": {"din": "ffni", "dout": "transo",
                                                                                  "mid_dim": 4}})
    inject_adapters(model.cond_stage_model, proj(lora(target=TE_ALL)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = freeze_except_adapters(model)
    assert sum(p.numel() for p in params) == count_params(model, trainable_only=True)
    opt = torch.optim.SGD(params, lr=0.1)
    x, t, _ = inputs
    model.unet(x, t, model.cond_stage_model(PROMPTS)).square().mean().backward()  # with grad through the encoder
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".adapters." in k for k in changed)
    assert any(k.startswith("cond_stage_model.") for k in changed) and any(".up." in k for k in changed)
    assert any(".to_k.adapters.default.1.weight" in k for k in changed)  # (IA)^3 got its gradient too


def test_gradient_checkpointing_with_frozen_base(tiny_model, inputs):
    unet = with_group(tiny_model, proj(lora(), ia3())).unet
    unet.set_gradient_checkpointing(True)
    params = freeze_except_adapters(unet)
    unet.train()
    unet(*inputs).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in params)


def test_dropout_only_in_training(tiny_model):
    host = with_group(tiny_model, proj(lora(target=["attn1.to_q"], dropout=0.5))).unet.middle_block[1] \
        .transformer_blocks[0].attn1.to_q
    x = torch.randn(2, 5, 64)
    host.train()
    assert not torch.equal(host(x), host(x))
    host.eval()
    assert torch.equal(host(x), host(x))


def test_one_dir_for_unet_and_text_encoder(tiny_model, inputs, tmp_path):
    src = with_group(copy.deepcopy(tiny_model), FORMS["all-forms"], proj(lora(target=TE_ALL, rank=2)))
    set_adapter_scale(src, 0.7)
    save_adapter_to_dir(src, tmp_path / "a")
    config = yaml.safe_load((tmp_path / "a" / CONFIG_FILE).read_text())
    assert set(config) == {"adapter_config", "cond_stage_adapter_config"}
    dst = copy.deepcopy(tiny_model)
    load_adapter_from_dir(dst, tmp_path / "a", name="mine")
    set_adapter_scale(dst, 0.7, "mine")
    assert close(outputs(dst, inputs), outputs(src, inputs), 0) and not close(outputs(dst, inputs),
                                                                             outputs(tiny_model, inputs))
    with pytest.raises(AdapterDirError, match="adapts the text encoder, which this UNetModel does not contain: load "
                                              "it into the whole model"):
        load_adapter_from_dir(copy.deepcopy(tiny_model.unet), tmp_path / "a")


@pytest.mark.parametrize("config,message", covering([
    (proj(lora(target=["to_z"])), r"projection_adp_config\[0\]\.target: no module of this UNetModel is named 'to_z'"),
    (proj(lora(target=["attn1"])), r"attn1 is a CrossAttention, not a Linear or 1x1 Conv2d"),
    (proj(lora(target=["in_layers.2"])), r"in_layers.2 is a 3x3 Conv2d, not a Linear or 1x1 Conv2d; LoRA goes on "
                                         r"those, .* \(type locon, loha, lokr, dora, ia3 take it\)"),
    (proj(ia3(), lora(target=r"nowhere\..*")), r"\[1\]\.target: the regex 'nowhere\\\\\.\.\*' matches no Linear"),
    (proj(lora(target="(")), r"is not a valid regular expression"),
    (proj(lora(target=[])), r"target must be a list of module names"),
    (proj(lora(rank=0)), r"rank must be a positive integer, got 0"),
    (proj(lora(rank=2.5)), r"rank must be a positive integer"),
    (proj(lora(alpha=-1)), r"alpha must be a finite number > 0"),
    (proj(lora(dropout=1.0)), r"dropout must be a finite number in \[0, 1\)"),
    (proj(ia3(init="default")), r"init: unknown init 'default'; allowed: zero"),
    (proj(ia3(on_input="yes")), r"on_input must be true or false"),
    (proj({"target": ["to_q"], "rank": 4}), r"missing field type; allowed: lora, locon, loha, lokr, dora, ia3"),
    (proj({"type": "lora", "rank": 4}), r"missing field\(s\) target"),
    (proj(lora(din="attn1i")), r"unknown field\(s\) din"),
    ({"transformer_adp_config": [lora()]}, r"unknown adapter type 'lora' for transformer blocks; allowed: inout "
                                           r"\('lora' entries go under projection_adp_config\)"),
]))
def test_bad_projection_config_is_a_clear_error(tiny_model, config, message):
    with pytest.raises(AdapterConfigError, match=message):
        inject_adapters(tiny_model.unet, config)
    assert not adapter_groups(tiny_model) and not any(m._forward_hooks for m in tiny_model.modules())


# ---- SD v1 size (meta device) -------------------------------------------------------------------------------------
def sd_meta(unet_cfg=None, te_cfg=None):
    config = OmegaConf.load(SD_CONFIG).model
    for part, cfg in (("unet_config", unet_cfg), ("cond_stage_config", te_cfg)):
        if cfg:
            OmegaConf.update(config, f"params.{part}.params.adapter_config", cfg, merge=False)
    with torch.device("meta"):
        return instantiate_from_config(config)


@pytest.mark.parametrize("unet_targets,te,rank,expected", covering([
    (["to_q", "to_k", "to_v", "to_out.0"], False, 4, 797_184),   # diffusers' default: 199,296 per rank
    (UNET_ALL, False, 4, 1_695_744),                             # kohya UNet (192 modules): 423,936 per rank
    (UNET_ALL, True, 8, 4_718_592),                              # kohya UNet + text encoder: 589,824 per rank
]))
def test_sd_size_parameter_counts(caplog, unet_targets, te, rank, expected):
    caplog.set_level(logging.INFO)
    model = sd_meta(proj(lora(unet_targets, rank=rank)), proj(lora(TE_ALL, rank=rank)) if te else None)
    assert sum(p.numel() for p in adapter_parameters(model)) == expected
    assert count_params(model.unet) + count_params(model.cond_stage_model) - expected == 859_520_964 + 123_060_480
    assert "on 192 modules" in caplog.text if unet_targets == UNET_ALL else "on 128 modules" in caplog.text


def test_sd_size_of_the_unet_and_text_encoder_config():
    config = OmegaConf.merge(OmegaConf.load(SD_CONFIG), OmegaConf.load(REPO / "configs/lora/lora-unet-te-r4.yaml"))
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    assert sum(p.numel() for p in adapter_parameters(model.unet)) == 797_184
    assert sum(p.numel() for p in adapter_parameters(model.cond_stage_model)) == 294_912  # 48 modules x 4 x 1536


@pytest.mark.slow
@pytest.mark.skipif(KEYS_TSV is None, reason="shared/sd-v1-keys.tsv not found")
def test_sd_state_dict_keeps_the_checkpoint_layout():
    model = sd_meta({**proj(lora(), ia3(learn_biases=True)), "transformer_adp_config": {"din": "attn2o",
                                                                                       "dout": "ffni", "mid_dim": 60}},
                    proj(lora(TE_ALL)))
    expected = {line.split("\t")[0] for line in KEYS_TSV.read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    keys = set(model.state_dict())
    assert keys - expected and all(is_added_key(k) for k in keys - expected)
    assert {k for k in keys if not is_added_key(k)} == expected


def kohya_names_from_diffusers(ours):
    """kohya's SD v1 rule, applied to diffusers' own UNet2DConditionModel (configured by diffusers from our SD config
    and UNet, built on the meta device): every Linear and 1x1 conv inside a Transformer2DModel; plus the 72
    text-encoder modules of the issue's scheme."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    checkpoint = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items() if not is_added_key(k)}
    config = {"model": OmegaConf.to_container(OmegaConf.load(SD_CONFIG).model, resolve=True)}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**create_unet_diffusers_config_from_ldm(config, checkpoint))
    names = set()
    for path, m in unet.named_modules():
        if isinstance(m, Transformer2DModel):
            names |= {f"lora_unet_{path}.{p}".replace(".", "_") for p, c in m.named_modules()
                      if isinstance(c, torch.nn.Linear) or (isinstance(c, torch.nn.Conv2d) and c.kernel_size == (1, 1))}
    te = {f"lora_te_text_model_encoder_layers_{i}_{m}" for i in range(12)
          for m in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1",
                    "mlp_fc2")}
    return names, te


@pytest.mark.slow
def test_kohya_names_of_every_sd_v1_target():
    pytest.importorskip("diffusers")
    model = sd_meta(proj(lora()), proj(lora(TE_ALL)))
    keys = lora_state_dict(model, fmt="kohya")
    names = {k.split(".")[0] for k in keys}
    unet, te = kohya_names_from_diffusers(model.unet)
    assert len(unet) == 192 and len(te) == 72
    assert names == unet | te
    assert len(keys) == 3 * (192 + 72)  # lora_down.weight, lora_up.weight, alpha
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert {"lora_unet_up_blocks_3_attentions_2_proj_out", "lora_unet_mid_block_attentions_0_proj_in"} <= names
    assert tuple(keys["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape) == (4, 320, 1, 1)
    assert tuple(keys["lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_up.weight"]
                 .shape) == (10240, 4)


# ---- files -------------------------------------------------------------------------------------------------------
@pytest.fixture
def lora_model(tiny_model):
    """The tiny model with a LoRA group on its UNet (kohya's set, config scale 0.7) and text encoder."""
    return with_group(tiny_model, proj(lora(scale=0.7)), proj(lora(TE_ALL, rank=2, alpha=5.0)))


@pytest.mark.parametrize("fmt", covering(["kohya", "diffusers"]))
def test_file_round_trip(lora_model, inputs, tmp_path, tiny_model_session, fmt):
    save_lora_file(lora_model, tmp_path / "x.safetensors", fmt=fmt)
    keys = load_file(tmp_path / "x.safetensors")
    assert all(k.startswith(("lora_unet_", "lora_te_") if fmt == "kohya" else ("unet.", "text_encoder."))
               for k in keys)
    fresh = copy.deepcopy(tiny_model_session)
    load_adapter_from_dir(fresh, tmp_path / "x.safetensors", name="imported")  # the one loader, for files too
    assert close(outputs(fresh, inputs), outputs(lora_model, inputs))
    set_adapter_scale(lora_model, 0.5)  # a run-time strength is not written, as in adapter directories
    assert lora_state_dict(lora_model, fmt=fmt).keys() == keys.keys()
    assert all(torch.equal(v, keys[k]) for k, v in lora_state_dict(lora_model, fmt=fmt).items())


@pytest.mark.slow
def test_ldm_named_kohya_keys_also_load(lora_model, inputs, tiny_model_session):
    sd = lora_state_dict(lora_model, fmt="kohya")
    renamed = {k.replace("lora_unet_down_blocks_0_attentions_0_", "lora_unet_input_blocks_1_1_")
               .replace("lora_te_", "lora_te1_"): v for k, v in sd.items()}
    assert renamed != sd
    fresh = copy.deepcopy(tiny_model_session)
    assert read_lora_state_dict(fresh, renamed, "x").keys() == read_lora_state_dict(fresh, sd, "x").keys()


def hf_text_encoder(te):
    """transformers' CLIPTextModel with the sizes and base weights of our FrozenCLIPEmbedder (adapters left out)."""
    from transformers import CLIPTextConfig, CLIPTextModel
    tm = te.transformer.text_model
    width, layer = tm.final_layer_norm.normalized_shape[0], tm.encoder.layers[0]
    model = CLIPTextModel(CLIPTextConfig(
        vocab_size=tm.embeddings.token_embedding.num_embeddings, hidden_size=width,
        intermediate_size=layer.mlp.fc1.out_features, num_hidden_layers=len(tm.encoder.layers),
        num_attention_heads=layer.self_attn.heads,
        max_position_embeddings=tm.embeddings.position_embedding.num_embeddings,
        hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=width)).eval()
    prefix = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""  # transformers 4
    sd = {prefix + k.removeprefix("transformer.text_model."): v.clone() for k, v in te.state_dict().items()
          if not is_added_key(k)}
    assert not model.load_state_dict(sd, strict=False).unexpected_keys
    return model


@pytest.fixture(scope="module")
def diffusers_pipeline(tiny_model_session):
    """A diffusers StableDiffusionPipeline holding our tiny base: diffusers' converter for the UNet, transformers'
    CLIPTextModel for the text encoder; built offline, no hub."""
    pytest.importorskip("peft")
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from test_unet import load_bench

    def build():
        unet = load_bench().diffusers_twin(tiny_model_session.unet, OmegaConf.load(TINY_CONFIG).model)
        scheduler = DDIMScheduler(clip_sample=False, steps_offset=1)
        return StableDiffusionPipeline(vae=None, text_encoder=hf_text_encoder(tiny_model_session.cond_stage_model),
                                       tokenizer=None, unet=unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    return build


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_diffusers_load_lora_weights_matches_ours(lora_model, inputs, diffusers_pipeline, fmt):
    pipe = diffusers_pipeline()
    pipe.load_lora_weights({k: v.clone() for k, v in lora_state_dict(lora_model, fmt=fmt).items()})
    tokens = lora_model.cond_stage_model.tokenize(PROMPTS)
    with torch.no_grad():
        theirs = pipe.unet(*inputs[:2], encoder_hidden_states=inputs[2]).sample, \
            pipe.text_encoder(input_ids=tokens).last_hidden_state
    ours = outputs(lora_model, inputs)
    adapters_enable(lora_model, False)
    base = outputs(lora_model, inputs)
    diffs = [(a - b).abs().max().item() for a, b in zip(ours, theirs)]
    print(f"max abs diff vs diffusers ({fmt}): UNet {diffs[0]:.3g}, text encoder {diffs[1]:.3g}")
    assert max(diffs) <= 1e-4 and not close(ours, base, 1e-2)


@pytest.mark.slow
def test_file_errors(lora_model, tiny_model_session, tmp_path):
    save_lora_file(lora_model, tmp_path / "k.safetensors")
    with pytest.raises(AdapterDirError, match=r"\(12 text-encoder modules, e.g. lora_te_text_model_encoder_layers_0_"
                                              r"\w+\) adapts the text encoder.*whole model"):
        load_lora_file(copy.deepcopy(tiny_model_session.unet), tmp_path / "k.safetensors")
    sd = load_file(tmp_path / "k.safetensors")
    n = len({k.split(".")[0] for k in sd}) + 1
    cases = {"sdxl": ({**sd, "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.alpha": torch.tensor(1.0)},
                      rf"1 of its {n} modules have no counterpart here \(UNet: 1, e.g. "
                      r"lora_unet_input_blocks_4_1_transformer_"),
             "wide": ({k: torch.cat([v, v], dim=-1) if k.endswith("lora_down.weight") and v.dim() == 2 else v
                       for k, v in sd.items()},
                      r"lora_down \(\d, 64\), lora_up \(\d+, \d\) do not fit a Linear with 32 inputs and \d+ "
                      r"outputs: the file was made for another model"),
             "loha": ({"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.ones(1)},
                      r"tensors hada_w1_a are none of the updates read here"),
             "glora": ({"lora_unet_mid_block_attentions_0_proj_in.a1.weight": torch.ones(1)},
                       r"tensors a1.weight are a GLoRA module, which is not supported here"),
             "junk": ({"model.diffusion_model.out.2.weight": torch.ones(1)}, r"is neither kohya")}
    for name, (bad, message) in cases.items():
        save_file(bad, tmp_path / f"{name}.safetensors")
        fresh = copy.deepcopy(tiny_model_session)
        with pytest.raises(AdapterDirError, match=message):
            load_adapter_from_dir(fresh, tmp_path / f"{name}.safetensors")
        assert not adapter_groups(fresh)
    inject_adapters(lora_model.unet, {"transformer_adp_config": {"din": "attn2o", "dout": "ffni", "mid_dim": 4}},
                    "bottleneck")
    with pytest.raises(AdapterConfigError, match="nonlinear bottlenecks have no LoRA equivalent"):
        lora_state_dict(lora_model, "bottleneck")
    inject_adapters(lora_model.unet, proj(ia3()), "ia3")
    with pytest.raises(AdapterConfigError, match="diffusers' loaders take LoRA only"):
        lora_state_dict(lora_model, "ia3", fmt="diffusers")


# ---- merging -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_merge_equals_unmerged_and_writes_an_sd_checkpoint(tiny_model, inputs, tmp_path, tiny_model_session):
    model = with_group(tiny_model, proj(lora(), ia3(), ia3(target=["ff.net.2"], on_input=True)),
                       proj(lora(TE_ALL, rank=2)))
    set_adapter_scale(model, 0.8)
    with_group(model, proj(lora(["attn2.to_q"], rank=2)), name="kept", seed=1)
    unmerged = outputs(model, inputs)
    assert merge_adapters(model) == 7 * 12 + 2 * 6  # 7 spatial transformers x 12 projections + 2 CLIP layers x 6
    assert list(adapter_groups(model)) == ["kept"] and close(outputs(model, inputs), unmerged)
    save_base_checkpoint(model, tmp_path / "merged.ckpt")
    sd = load_state_dict(str(tmp_path / "merged.ckpt"))
    assert set(sd) == set(tiny_model_session.state_dict())  # the original layout, no adapter keys
    fresh = copy.deepcopy(tiny_model_session)
    fresh.init_from_ckpt(str(tmp_path / "merged.ckpt"))
    adapters_enable(model, False, "kept")
    assert close(outputs(fresh, inputs), outputs(model, inputs), 0)


def test_merge_errors(tiny_model):
    model = with_group(tiny_model, {"transformer_adp_config": {"din": "attn2o", "dout": "ffni", "mid_dim": 4}})
    with pytest.raises(AdapterConfigError, match="nonlinear bottlenecks cannot be folded"):
        merge_adapters(model)
    with_group(model, proj(ia3(learn_biases=True)), name="biased")
    with pytest.raises(AdapterConfigError, match="learn_biases: true adds a bias"):
        merge_adapters(model, "biased")
    with_group(model, proj(lora(["attn1.to_k"])), name="low")
    with pytest.raises(AdapterConfigError, match="group 'biased' has \\(IA\\)\\^3 on .*attn1.to_k, which rescales"):
        merge_adapters(model, "low")
    assert set(adapter_groups(model)) == {"default", "biased", "low"}  # nothing merged or removed


@pytest.fixture
def base_ckpt(tiny_model_session, tmp_path):
    path = tmp_path / "base.safetensors"
    save_state_dict(tiny_model_session.state_dict(), str(path))
    return str(path)


def lora_dir(model, path, cfg, seed):
    """Save a fresh LoRA group `cfg` (random weights) of the tiny model to `path`."""
    m = with_group(copy.deepcopy(model), proj(cfg), seed=seed)
    save_adapter_to_dir(m, path)
    return str(path)


@pytest.mark.slow
def test_merge_script_upl(tiny_model, inputs, base_ckpt, tmp_path, tiny_model_session):
    adapters = lora_dir(tiny_model, tmp_path / "a", lora(), 0)
    out = merge.main(["--mode", "upl", "--path_1", base_ckpt, "--path_2", adapters, "--alpha", "0.5",
                      "--output_path", str(tmp_path / "m.ckpt"), "--config", str(TINY_CONFIG)])
    merged = copy.deepcopy(tiny_model_session)
    merged.init_from_ckpt(str(out))
    load_adapter_from_dir(tiny_model, adapters)
    set_adapter_scale(tiny_model, 0.5)
    assert close(outputs(merged, inputs), outputs(tiny_model, inputs))
    bottleneck = with_group(copy.deepcopy(tiny_model_session), {"resblock_adp_config": {"din": "resi", "dout": "reso",
                                                                                      "mid_dim": 2}})
    save_adapter_to_dir(bottleneck, tmp_path / "b")
    with pytest.raises(SystemExit, match="nonlinear bottlenecks"):
        merge.main(["--mode", "upl", "--path_1", base_ckpt, "--path_2", str(tmp_path / "b"), "--output_path",
                    str(tmp_path / "m2.ckpt"), "--config", str(TINY_CONFIG)])


def deltas(model, path):
    """ΔW per module path of the adapter directory or file at `path`, loaded into a copy of `model`."""
    m = copy.deepcopy(model)
    load_adapter_from_dir(m, path, "x")
    return projection_updates(m, "x")


@pytest.mark.slow
def test_merge_script_lpl_and_exact(tiny_model, tmp_path):
    targets = ["attn1.to_q", "attn2.to_v", "proj_in"]
    a = lora_dir(tiny_model, tmp_path / "a", lora(targets, rank=2, alpha=1.0), 0)
    b = lora_dir(tiny_model, tmp_path / "b", lora(targets, rank=2, alpha=4.0), 1)
    c = lora_dir(tiny_model, tmp_path / "c", lora(targets[:2] + ["ff.net.2"], rank=3), 2)
    args = ["--config", str(TINY_CONFIG), "--alpha", "0.3"]
    fa, fb, fc = deltas(tiny_model, a), deltas(tiny_model, b), deltas(tiny_model, c)
    lpl = deltas(tiny_model, merge.main(args + ["--mode", "lpl", "--path_1", a, "--path_2", b, "--output_path",
                                                str(tmp_path / "lpl")]))
    for p, f in lpl.items():  # cloneofsimo: mix the factors (each alpha/rank folded into up)
        up = 0.3 * fa[p].up * 0.5 + 0.7 * fb[p].up * 2.0
        down = 0.3 * fa[p].down + 0.7 * fb[p].down
        assert f.rank == 2 and (f.delta() - (up.flatten(1) @ down.flatten(1)).view_as(f.delta())).abs().max() < 1e-6
    exact = deltas(tiny_model, merge.main(args + ["--mode", "exact", "--path_1", a, "--path_2", c, "--output_path",
                                                  str(tmp_path / "exact.safetensors")]))
    assert set(exact) == set(fa) | set(fc) and len(exact) == 7 * 4  # 7 transformers; ff.net.2 only in c
    for p, f in exact.items():
        want = sum(w * d[p].delta() for w, d in ((0.3, fa), (0.7, fc)) if p in d)
        assert f.rank == (2 if p in fa else 0) + (3 if p in fc else 0) and (f.delta() - want).abs().max() < 1e-6
    with pytest.raises(SystemExit, match="use --mode exact"):
        merge.main(args + ["--mode", "lpl", "--path_1", a, "--path_2", c, "--output_path", str(tmp_path / "x")])
    with pytest.raises(AdapterConfigError, match="lpl mixes factors of equal shapes"):
        combine_updates({"p": fa[next(iter(fa))]}, {"p": fc[next(iter(fc))]}, "lpl", 0.5)


@pytest.mark.slow
def test_convert_script_round_trip(lora_model, inputs, tmp_path, tiny_model_session):
    save_adapter_to_dir(lora_model, tmp_path / "ours")
    run = ["--config", str(TINY_CONFIG)]
    kohya = convert_lora.main(run + ["--input", str(tmp_path / "ours"), "--output", str(tmp_path / "k.safetensors"),
                                     "--to", "kohya"])
    diffusers = convert_lora.main(run + ["--input", str(kohya), "--output", str(tmp_path / "d"), "--to", "diffusers"])
    assert diffusers == tmp_path / "d" / "pytorch_lora_weights.safetensors"
    back = convert_lora.main(run + ["--input", str(diffusers), "--output", str(tmp_path / "back"), "--to", "dir"])
    fresh = copy.deepcopy(tiny_model_session)
    load_adapter_from_dir(fresh, back)
    assert close(outputs(fresh, inputs), outputs(lora_model, inputs))


@pytest.mark.slow
def test_sample_with_a_kohya_file(tiny_model, base_ckpt, tmp_path):
    save_lora_file(with_group(tiny_model, proj(lora(["to_k", "to_v"]))), tmp_path / "k.safetensors")  # UNet only
    args = ["--config", str(TINY_CONFIG), "--ckpt", base_ckpt, "--H", "32", "--W", "32", "--ddim_steps", "2",
            "--n_samples", "1", "--n_iter", "1", "--skip_grid"]
    runs = {name: sample.main(args + extra + ["--outdir", str(tmp_path / name)]) for name, extra in {
        "plain": [], "lora": ["--adapter_path", str(tmp_path / "k.safetensors")],
        "zero": ["--adapter_path", str(tmp_path / "k.safetensors"), "--adapter_scale", "0"]}.items()}
    pixels = {name: np.asarray(Image.open(paths[0])) for name, paths in runs.items()}
    assert not np.array_equal(pixels["plain"], pixels["lora"])
    assert np.array_equal(pixels["plain"], pixels["zero"])
