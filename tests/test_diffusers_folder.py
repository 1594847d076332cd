"""Diffusers model folders in and out, on the shipped tiny SD v1 model: a folder that diffusers itself writes loads as
our base bit for bit (safetensors and .bin), our export loads in diffusers' StableDiffusionPipeline offline with the
same UNet output, text embeddings and tokens, ours -> export -> ours is bit-identical, merged adapters carry over,
and SD 2.x / SDXL / incomplete / mis-shaped folders are refused by name. The naming module against diffusers' own
single-file conversion at SD v1 size."""
import json
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import sample
from conftest import REPO, TINY_CONFIG, build_tiny
from ldm.config import config_from_diffusers_folder
from ldm.checkpoint import CheckpointError, load_state_dict, save_state_dict
from ldm.modules.adapters import adapter_parameters, adapters_enable, inject_adapters, save_adapter_to_dir
from ldm.modules import diffusers_folder
from ldm.modules.diffusers_folder import DiffusersFolderError, read_base_weights, write_tokenizer
from ldm.modules.diffusers_layout import (UNET_PREFIX, LayoutError, UNetStructure, from_diffusers, to_diffusers,
                                          text_path_from_diffusers, text_path_to_diffusers, unet_block_map,
                                          unet_path_from_diffusers, unet_path_to_diffusers)
from ldm.util.instantiate import instantiate_from_config, load_model_from_config
from scripts import export_diffusers

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

CONFIG = REPO / "configs" / "tiny-world" / "tiny-sd-v1.yaml"
CKPT = REPO / "models" / "ldm" / "tiny-sd-v1" / "model.safetensors"
SD_CONFIG = REPO / "configs" / "stable-diffusion" / "v1-inference.yaml"
PROMPTS = ["a photo of a red circle", "A Blue  SQUARE on green!!", "émigré café, naïve 東京 3.14 don't",
           "a dog, a cat & a bird; (masterpiece:1.2)", "zebra " * 80]


@pytest.fixture(scope="module")
def ours():
    """The shipped tiny model, loaded from its file (float32 weights of an fp16 file)."""
    return load_model_from_config(OmegaConf.load(CONFIG), str(CKPT))


def diffusers_pipeline(sd, config, folder):
    """A StableDiffusionPipeline made by diffusers from our state dict `sd` with its own single-file conversion
    functions, saved with save_pretrained into `folder`; the networks keep the file's fp16."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    original = OmegaConf.to_container(config)
    unet_config = create_unet_diffusers_config_from_ldm(original, sd)
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(sd, unet_config))
    vae_config = create_vae_diffusers_config_from_ldm(original, sd, scaling_factor=float(sd["scale_factor"]))
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(sd, vae_config))
    te = config.model.params.cond_stage_config.params
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=te.width, intermediate_size=4 * te.width,
                                                num_hidden_layers=te.layers, num_attention_heads=te.heads,
                                                hidden_act="quick_gelu"))
    clip = convert_ldm_clip_checkpoint(sd)
    if not hasattr(text_encoder, "text_model"):  # transformers >= 5.6 has no text_model level
        clip = {k.removeprefix("text_model."): v for k, v in clip.items()}
    text_encoder.load_state_dict(clip)
    write_tokenizer(folder.parent / "tokenizer-files", 77)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, unet=unet, safety_checker=None,
                                   tokenizer=CLIPTokenizer.from_pretrained(folder.parent / "tokenizer-files"),
                                   scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012,
                                                           beta_schedule="scaled_linear", skip_prk_steps=True,
                                                           steps_offset=1, set_alpha_to_one=False),
                                   feature_extractor=None, requires_safety_checker=False).to(torch.float16)
    return pipe


@pytest.fixture(scope="module")
def theirs(tmp_path_factory):
    """A diffusers folder of the tiny model written by diffusers (safetensors)."""
    folder = tmp_path_factory.mktemp("theirs") / "tiny-sd-v1"
    diffusers_pipeline(load_state_dict(str(CKPT)), OmegaConf.load(CONFIG), folder).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny model exported by scripts/export_diffusers.py (float32)."""
    out = tmp_path_factory.mktemp("export") / "tiny-sd-v1"
    return export_diffusers.main(["--config", str(CONFIG), "--ckpt", str(CKPT), "--outdir", str(out)])


def assert_identical(got, want):
    assert set(got) == set(want)
    bad = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


# ---- in -------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_folder_diffusers_wrote_loads_bit_identical(theirs, ours):
    assert {p.name for p in theirs.iterdir()} >= {"model_index.json", "unet", "vae", "text_encoder", "scheduler"}
    assert_identical(read_base_weights(str(theirs)), load_state_dict(str(CKPT)))  # networks, buffers, scale_factor
    model = load_model_from_config(OmegaConf.load(CONFIG), str(theirs))  # what sample.py --ckpt runs
    assert_identical(model.state_dict(), ours.state_dict())


@pytest.mark.slow
def test_bin_shards_and_legacy_names(theirs, tmp_path):
    """A sharded UNet, .bin weights (torch.load weights_only), the VAE attention names of older diffusers
    (query/key/value/proj_attn) and transformers 4's `text_model.` level read the same."""
    folder = tmp_path / "other"
    shutil.copytree(theirs, folder)
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet = load_state_dict(str(unet_file))
    keys = sorted(unet)
    shards = {"part-1.safetensors": keys[:len(keys) // 2], "part-2.safetensors": keys[len(keys) // 2:]}
    for name, part in shards.items():
        save_state_dict({k: unet[k] for k in part}, str(folder / "unet" / name))
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, part in shards.items() for k in part}}))
    unet_file.unlink()
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    legacy = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    vae = {next((k.replace(a, b) for a, b in legacy.items() if "attentions" in k and a in k), k): v
           for k, v in load_state_dict(str(vae_file)).items()}
    assert sum(".query." in k for k in vae) == 4  # two weights, two biases: encoder and decoder
    torch.save(vae, folder / "vae" / "diffusion_pytorch_model.bin")
    vae_file.unlink()
    text_file = folder / "text_encoder" / "model.safetensors"
    torch.save({"text_model." + k: v for k, v in load_state_dict(str(text_file)).items()},
               folder / "text_encoder" / "pytorch_model.bin")
    text_file.unlink()
    assert_identical(read_base_weights(str(folder)), load_state_dict(str(CKPT)))


# ---- out ------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_export_round_trip_is_bit_identical(exported, ours, tmp_path):
    assert_identical(read_base_weights(str(exported)), ours.state_dict())
    half = export_diffusers.main(["--config", str(CONFIG), "--ckpt", str(exported), "--outdir",
                                  str(tmp_path / "half"), "--half"])  # a folder in, too
    assert_identical(read_base_weights(str(half)), load_state_dict(str(CKPT)))  # the fp16 file itself
    index = json.loads((exported / "model_index.json").read_text())
    assert index["requires_safety_checker"] is False and index["safety_checker"] == [None, None]


@pytest.mark.slow
def test_diffusers_pipeline_on_the_export_matches_ours(exported, ours):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(str(exported), local_files_only=True)
    tokens = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids
    assert torch.equal(tokens, ours.cond_stage_model.tokenize(PROMPTS))
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 64, generator=g)
    with torch.no_grad():
        unet = (ours.apply_model(x, t, c) - pipe.unet(x, t, encoder_hidden_states=c).sample).abs().max().item()
        text = (ours.get_learned_conditioning(PROMPTS) - pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0])
        image = ours.decode_first_stage(x) - pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
        pipe(PROMPTS[0], height=64, width=64, num_inference_steps=2, output_type="np")  # runs end to end
    print(f"max abs diff vs diffusers on our export: UNet {unet:.3g}, text {text.abs().max():.3g}, "
          f"VAE decode {image.abs().max():.3g}")
    assert unet <= 1e-5 and text.abs().max() <= 1e-5 and image.abs().max() <= 1e-4
    assert torch.allclose(pipe.scheduler.betas, ours.betas, rtol=1e-5, atol=0)  # diffusers computes in float32


EXPORTED_FORMS = {  # the UNet's targets: LoRA on projections, the other linear forms on 3x3 convolutions too
    "lora": ["to_q", "to_v", "proj_in"], "locon": ["to_q", "in_layers.2", "op"], "loha": ["to_v", "out_layers.3"],
    "lokr": ["to_q", "in_layers.2"], "dora": ["to_out.0", "in_layers.2"]}


@pytest.mark.slow
@pytest.mark.parametrize("form", EXPORTED_FORMS)
def test_export_merges_adapters(tmp_path, form):
    """Base + adapters of each linear form on UNet and text encoder, merged: diffusers' pipeline gives the unmerged
    model's outputs."""
    model = build_tiny()
    save_state_dict(model.state_dict(), str(tmp_path / "base.safetensors"))
    inject_adapters(model.unet, {"projection_adp_config": [{"type": form, "target": EXPORTED_FORMS[form],
                                                            "rank": 2, "alpha": 3.0}]})
    inject_adapters(model.cond_stage_model, {"projection_adp_config": [{"type": form, "target": ["q_proj", "fc1"],
                                                                        "rank": 2}]})
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    save_adapter_to_dir(model, tmp_path / "lora")
    out = export_diffusers.main(["--config", str(TINY_CONFIG), "--ckpt", str(tmp_path / "base.safetensors"),
                                 "--adapter_path", str(tmp_path / "lora"), "--outdir", str(tmp_path / "out")])
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    x, t, c = torch.randn(2, 4, 4, 4), torch.tensor([3, 500]), torch.randn(2, 77, 32)
    with torch.no_grad():
        unet = (model.apply_model(x, t, c) - pipe.unet(x, t, encoder_hidden_states=c).sample).abs().max()
        text = (model.get_learned_conditioning(PROMPTS) - pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0]).abs().max()
        adapters_enable(model, False)
        changed = (model.apply_model(x, t, c) - pipe.unet(x, t, encoder_hidden_states=c).sample).abs().max()
    print(f"merged export vs ours with adapters: UNet {unet:.3g}, text {text:.3g} (adapters change {changed:.3g})")
    assert unet <= 1e-5 and text <= 1e-5 and changed > 1e-3


@pytest.mark.slow
def test_export_refuses_an_existing_folder(exported, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="already exists \\(a folder that is not empty\\)"):
        export_diffusers.main(["--config", str(CONFIG), "--ckpt", str(CKPT), "--outdir", str(tmp_path / "full")])
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine" and not list(tmp_path.glob(".tmp-*"))
    with pytest.raises(SystemExit, match=r"error: checkpoint not found: .*nothing' \(pass an SD v1 .ckpt / "
                                         r"\.safetensors file or a diffusers model folder\)"):
        export_diffusers.main(["--config", str(CONFIG), "--ckpt", str(tmp_path / "nothing"), "--outdir",
                               str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_a_failed_export_leaves_nothing(ours, tmp_path, monkeypatch):
    def fail(*args):
        raise OSError("disk full")
    monkeypatch.setattr(diffusers_folder, "write_tokenizer", fail)
    with pytest.raises(OSError, match="disk full"):
        diffusers_folder.write_diffusers_folder(ours.state_dict(), OmegaConf.load(CONFIG).model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ---- refusals -------------------------------------------------------------------------------------------------------
def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.slow
@pytest.mark.parametrize("case, message", [
    ("sd2", r"is a Stable Diffusion 2.x folder \(OpenCLIP ViT-H text encoder: text_encoder hidden_size 1024, unet "
            r"cross_attention_dim 1024\); this project implements Stable Diffusion v1"),
    ("sdxl", r"is a Stable Diffusion XL folder \(text_encoder_2, unet addition_embed_type 'text_time'\); this "
             r"project implements Stable Diffusion v1"),
    ("v", r"predicts 'v_prediction' \(Stable Diffusion 2.x-v"),
    ("no_vae", r"has no vae/: a diffusers SD v1 folder has model_index.json, unet/, vae/"),
    ("no_index", r"is a folder but not a diffusers model folder \(no model_index.json\)"),
    ("no_weights", r"unet' holds no weights: expected diffusion_pytorch_model.safetensors"),
    ("extra_key", r"not an SD v1 model: 1 UNet key\(s\) have no counterpart, e.g. add_embedding.linear_1.weight"),
])
def test_other_folders_are_refused_by_name(theirs, tmp_path, case, message):
    folder = tmp_path / "f"
    shutil.copytree(theirs, folder)
    if case == "sd2":
        edit_json(folder / "text_encoder" / "config.json", hidden_size=1024)
        edit_json(folder / "unet" / "config.json", cross_attention_dim=1024)
    elif case == "sdxl":
        edit_json(folder / "model_index.json", text_encoder_2=["transformers", "CLIPTextModelWithProjection"])
        edit_json(folder / "unet" / "config.json", addition_embed_type="text_time")
    elif case == "v":
        edit_json(folder / "scheduler" / "scheduler_config.json", prediction_type="v_prediction")
    elif case == "no_vae":
        shutil.rmtree(folder / "vae")
    elif case == "no_index":
        (folder / "model_index.json").unlink()
    elif case == "no_weights":
        (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    else:
        unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
        save_state_dict({**load_state_dict(str(unet)), "add_embedding.linear_1.weight": torch.zeros(2, 2)}, str(unet))
    with pytest.raises(DiffusersFolderError, match=message):
        read_base_weights(str(folder))


@pytest.mark.slow
def test_a_folder_of_another_size_names_the_keys(theirs):
    with pytest.raises(CheckpointError, match=r"checkpoint '.*tiny-sd-v1' does not match the model: "
                                              r".*mis-shaped key\(s\), e.g. model.diffusion_model"):
        load_model_from_config(OmegaConf.load(TINY_CONFIG), str(theirs))


@pytest.mark.slow
def test_sample_and_training_accept_a_folder(theirs, ours, tmp_path):
    args = ["--config", str(CONFIG), "--H", "64", "--W", "64", "--ddim_steps", "2", "--n_samples", "1",
            "--n_iter", "1", "--skip_grid", "--seed", "3"]
    images = [np.asarray(Image.open(sample.main(args + ["--ckpt", path, "--outdir", str(tmp_path / name)])[0]))
              for name, path in (("folder", str(theirs)), ("file", str(CKPT)))]
    assert np.array_equal(*images)
    config = OmegaConf.load(CONFIG)  # main_dream_booth.py --actual_resume sets model.params.ckpt_path
    config.model.params.ckpt_path = str(theirs)
    assert_identical(instantiate_from_config(config.model).state_dict(), ours.state_dict())


# ---- names ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("config", [SD_CONFIG, CONFIG, TINY_CONFIG], ids=["sd-v1", "tiny-sd-v1", "tiny-inference"])
def test_layout_equals_diffusers_single_file_conversion(config):
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)
    cfg = OmegaConf.load(config)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in instantiate_from_config(cfg.model).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    small = config != SD_CONFIG  # SD v1 size: names and shapes only
    sd = {k: torch.randn(s, generator=g) if small else torch.empty(s, device="meta") for k, s in shapes.items()}
    original = OmegaConf.to_container(cfg)
    unet = convert_ldm_unet_checkpoint(sd, create_unet_diffusers_config_from_ldm(original, sd))
    vae = convert_ldm_vae_checkpoint(sd, create_vae_diffusers_config_from_ldm(original, sd))
    mine = to_diffusers(sd)
    for ref, got in ((unet, mine["unet"]), (vae, mine["vae"])):
        assert set(ref) == set(got) and all(ref[k].shape == got[k].shape for k in ref)
        assert not small or all(torch.equal(ref[k], got[k]) for k in ref)
    back = from_diffusers(mine)
    assert set(back) == {k for k in sd if k.startswith(("model.", "first_stage_model.", "cond_stage_model."))}
    assert all(back[k].shape == sd[k].shape for k in back)
    p = cfg.model.params.unet_config.params
    structure = UNetStructure.from_ldm_keys(k[len(UNET_PREFIX):] for k in sd if k.startswith(UNET_PREFIX))
    assert structure == UNetStructure.from_config(p.channel_mult, p.num_res_blocks, p.attention_resolutions) \
        == UNetStructure.from_diffusers_keys(mine["unet"])


@pytest.mark.slow
def test_module_paths_for_adapter_names():
    """Module paths (what LoRA files name) map both ways; adapters and parameterless layers have no counterpart."""
    model = build_tiny()
    unet = model.unet
    blocks = unet_block_map(UNetStructure.from_ldm_keys(n for n, _ in unet.named_modules()))
    assert unet_path_to_diffusers("input_blocks.1.1.transformer_blocks.0.attn1.to_q", blocks) == \
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert unet_path_to_diffusers("output_blocks.1.0.skip_connection", blocks) == "up_blocks.0.resnets.1.conv_shortcut"
    assert unet_path_to_diffusers("input_blocks.2.0.op", blocks) == "down_blocks.0.downsamplers.0.conv"
    assert unet_path_to_diffusers("input_blocks.1.0.in_layers.1", blocks) is None  # SiLU
    inject_adapters(unet, {"projection_adp_config": [{"type": "lora", "target": ["to_q"], "rank": 1}]})
    named = [n for n, _ in unet.named_modules() if n]
    mapped = {n: unet_path_to_diffusers(n, blocks) for n in named}
    assert all(v is None for n, v in mapped.items() if "adapters" in n.split("."))
    assert all(unet_path_from_diffusers(v, blocks) == n for n, v in mapped.items() if v)
    with pytest.raises(LayoutError, match="not an SD v1 UNet layout"):
        UNetStructure.from_ldm_keys(["input_blocks.1.0.x", "input_blocks.2.0.op.weight", "input_blocks.3.0.x",
                                     "input_blocks.4.0.x"])
    assert blocks == unet_block_map(UNetStructure(2, 1, frozenset({0, 1})))
    text = "transformer.text_model.encoder.layers.1.self_attn.q_proj"
    assert text_path_to_diffusers(text) == "text_model.encoder.layers.1.self_attn.q_proj"
    assert text_path_from_diffusers("encoder.layers.1.self_attn.q_proj") == text  # transformers >= 5.6
    assert text_path_from_diffusers("text_model.encoder.layers.1.self_attn.q_proj") == text


@pytest.mark.slow
def test_an_autoencoder_without_mid_attention_exports_and_reads_back(tmp_path):
    """The v3 tiny model's f = 4 autoencoder has no mid-block attention (attn_type none): the export says so
    (mid_block_add_attention false), diffusers loads it with no weight left freshly initialised, decodes as ours, and
    the config made from the folder builds the same model again."""
    from diffusers import AutoencoderKL
    config, ckpt = REPO / "configs/tiny-world/tiny-sd-v1-f4.yaml", REPO / "models/ldm/tiny-sd-v1-f4/model.safetensors"
    out = export_diffusers.main(["--config", str(config), "--ckpt", str(ckpt), "--outdir", str(tmp_path / "v3")])
    assert json.loads((out / "vae" / "config.json").read_text())["mid_block_add_attention"] is False
    vae, info = AutoencoderKL.from_pretrained(str(out / "vae"), output_loading_info=True, local_files_only=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours = load_model_from_config(OmegaConf.load(config), str(ckpt))
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours.decode_first_stage(z) - vae.decode(z / vae.config.scaling_factor).sample).abs().max().item()
    assert diff <= 1e-4
    assert_identical(read_base_weights(str(out)), ours.state_dict())
    assert config_from_diffusers_folder(out).model.params.first_stage_config.params.ddconfig.attn_type == "none"
