"""(IA)^3 as a projection form: the rescaling itself (outputs, inputs, learned biases, strength), peft's IA3 on
diffusers' UNet gives our output, merging, kohya/A1111 (IA)^3 files, and the SD v1 parameter count and file size.
Identity at init, switches and bad configs run with the other forms in tests/test_lora.py."""
import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import REPO, TINY_CONFIG
from ldm.checkpoint import save_state_dict
from ldm.modules.adapters import (AdapterConfigError, adapter_parameters, external_names, kohya_name,
                                  load_adapter_from_dir, lora_state_dict, merge_adapters, read_lora_state_dict,
                                  save_lora_file, set_adapter_scale)
from test_lora import close, ia3, inputs, outputs, proj, sd_meta, with_group  # noqa: F401  (fixtures)

KV = ["attn1.to_k", "attn1.to_v", "attn2.to_k", "attn2.to_v"]


@pytest.mark.slow
def test_sd_size_parameter_count_and_file_size(tmp_path):
    model = sd_meta(proj(ia3(KV)))
    assert sum(p.numel() for p in adapter_parameters(model)) == 49_920  # sd-ia3: K and V of 32 attentions
    sd = {k: torch.zeros(v.shape, dtype=v.dtype) if v.is_meta else v for k, v in lora_state_dict(model).items()}
    save_state_dict(sd, str(tmp_path / "ia3.safetensors"))
    size = (tmp_path / "ia3.safetensors").stat().st_size
    print(f"(IA)^3 K,V at SD v1 size: 49,920 parameters, kohya file {size:,} bytes")
    assert 199_680 < size < 230_000  # 4 bytes a parameter plus the header: sd-ia3's "~222 KB"
    fragment = OmegaConf.load(REPO / "configs" / "lora" / "ia3.yaml").model.params.unet_config.params.adapter_config
    assert sum(p.numel() for p in adapter_parameters(sd_meta(fragment))) == 2 * 49_920  # + the FFN's hidden width


def test_rescaling_of_outputs_inputs_and_biases(tiny_model):
    unet = with_group(tiny_model, proj(ia3(["attn2.to_k", "proj_in"], scale=0.5),
                                       ia3(["ff.net.2"], on_input=True, learn_biases=True))).unet
    set_adapter_scale(unet, 3.0)
    s = 1.5  # config scale x group scale
    st = unet.input_blocks[1][1]
    to_k, proj_in, ff2 = st.transformer_blocks[0].attn2.to_k, st.proj_in, st.transformer_blocks[0].ff.net[2]
    x, img, hidden = torch.randn(2, 5, 32), torch.randn(2, 32, 3, 3), torch.randn(2, 5, 128)
    a, b, c = (m.adapters["default"][0] for m in (to_k, proj_in, ff2))
    with torch.no_grad():
        assert (to_k(x) - F.linear(x, to_k.weight) * (1 + s * a.weight)).abs().max() < 1e-6   # keys: rows of W
        w = proj_in.weight * (1 + s * b.weight).view(-1, 1, 1, 1)                            # conv: bias untouched
        assert (proj_in(img) - F.conv2d(img, w, proj_in.bias)).abs().max() < 1e-6
        h = hidden * (1 + 3.0 * c.weight) + 3.0 * c.bias                                     # FFN hidden activation
        assert (ff2(hidden) - F.linear(h, ff2.weight, ff2.bias)).abs().max() < 1e-5


@pytest.mark.slow
def test_matches_peft_ia3_on_diffusers_unet(tiny_model_session, inputs):
    peft = pytest.importorskip("peft")
    from test_unet import load_bench
    model = with_group(copy.deepcopy(tiny_model_session), proj(ia3(KV), ia3(["ff.net.2"], on_input=True)))
    theirs = load_bench().diffusers_twin(tiny_model_session.unet, OmegaConf.load(TINY_CONFIG).model)
    theirs = peft.inject_adapter_in_model(peft.IA3Config(target_modules=KV + ["ff.net.2"],
                                                         feedforward_modules=["ff.net.2"]), theirs)
    names = {p.removeprefix("model.diffusion_model."): n.removeprefix("unet.")
             for p, n in external_names(model).items()}
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for path, host in model.unet.named_modules():
            if getattr(host, "adapters", None) is not None and path in names:
                params[f"{names[path]}.ia3_l.default"].copy_((1 + host.adapters["default"][0].weight).view_as(
                    params[f"{names[path]}.ia3_l.default"]))  # peft's ones-initialised l is our 1 + w
        ours, ref = model.unet(*inputs), theirs(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
    base = outputs(tiny_model_session, inputs)[0]
    print(f"max abs diff vs peft IA3: {(ours - ref).abs().max().item():.3g}")
    assert (ours - ref).abs().max() <= 1e-4 and (ours - base).abs().max() > 1e-2


def a1111_merge(weight, file, key):
    """AUTOMATIC1111's (IA)^3 rule (extensions-builtin/Lora/network_ia3.py): W + W * w, by rows unless on_input."""
    w = file[f"{key}.weight"]
    return weight + weight * (w if file[f"{key}.on_input"].item() else w.reshape(-1, 1))


def test_kohya_file_merges_as_a1111_and_round_trips(tiny_model, inputs, tmp_path, tiny_model_session):
    model = with_group(tiny_model, proj(ia3(KV), ia3(["ff.net.2"], on_input=True)))
    save_lora_file(model, tmp_path / "ia3.safetensors")
    file = load_file(tmp_path / "ia3.safetensors")
    assert file["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.on_input"].item() is False
    assert file["lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2.on_input"].item() is True
    fresh = copy.deepcopy(tiny_model_session)
    load_adapter_from_dir(fresh, tmp_path / "ia3.safetensors")
    assert close(outputs(fresh, inputs), outputs(model, inputs), 0)
    names = external_names(model)
    expected = {p: a1111_merge(model.get_submodule(p).weight.detach().clone(), file, kohya_name(names[p]))
                for p in read_lora_state_dict(model, file, "file")}
    assert len(expected) == 7 * 5  # K, V of attn1 and attn2, and ff.net.2, in each of the 7 spatial transformers
    merge_adapters(model)
    assert all((model.get_submodule(p).weight - w).abs().max() < 1e-6 for p, w in expected.items())


def test_learned_biases_have_no_merged_or_file_form(tiny_model):
    model = with_group(tiny_model, proj(ia3(KV, learn_biases=True)))
    for action in (lambda: merge_adapters(model), lambda: lora_state_dict(model)):
        with pytest.raises(AdapterConfigError, match="learn_biases: true adds a bias the module does not have"):
            action()
