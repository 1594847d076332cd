"""diffusers twins of our models, built with diffusers' own single-file converters (no hub, nothing downloaded).

The UNet goes through `bench_unet.diffusers_twin` (tested in tests/test_unet.py); the VAE through diffusers'
`convert_ldm_vae_checkpoint`, the text encoder through `convert_ldm_clip_checkpoint` into transformers'
`CLIPTextModel`, and the tokenizer is transformers' `CLIPTokenizer` on the vocabulary our tokenizer reads (the files
`scripts/export_diffusers.py` writes, `ldm.modules.diffusers_folder.write_tokenizer`). `diffusers_pipeline` puts them
into a `StableDiffusionPipeline` with a `DDIMScheduler` set up as our DDIM sampler (SD v1's "leading" spacing,
steps_offset 1, alpha_prev of the first step from the schedule). tests/test_gpu_check.py checks the twin's images against ours.
"""
import functools
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bench_unet import diffusers_twin
from ldm.modules.diffusers_folder import write_tokenizer

MAX_LENGTH = 77  # SD v1's text length


def _load_meta(cls, config, state_dict) -> torch.nn.Module:
    """`cls(config)` on the meta device, then a strict load of `state_dict` (copied) into it."""
    with torch.device("meta"):
        model = cls(**config) if isinstance(config, dict) else cls(config)
    model.load_state_dict({k: v.detach().clone() for k, v in state_dict.items()}, strict=True, assign=True)
    return model.eval()


def diffusers_vae(model: torch.nn.Module, config) -> torch.nn.Module:
    """diffusers' AutoencoderKL holding our first stage's weights (diffusers' converter, strict load)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm
    checkpoint = {"first_stage_model." + k: v for k, v in model.first_stage_model.state_dict().items()}
    original = {"model": OmegaConf.to_container(config, resolve=True)}
    vae_config = create_vae_diffusers_config_from_ldm(original, checkpoint, scaling_factor=float(model.scale_factor))
    return _load_meta(AutoencoderKL, vae_config, convert_ldm_vae_checkpoint(checkpoint, vae_config))


def diffusers_text_encoder(model: torch.nn.Module) -> torch.nn.Module:
    """transformers' CLIPTextModel of our text encoder's size and base weights (diffusers' CLIP key converter)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel
    encoder = model.cond_stage_model
    tm = encoder.transformer.text_model
    layer = tm.encoder.layers[0]
    width = tm.final_layer_norm.normalized_shape[0]
    config = CLIPTextConfig(vocab_size=tm.embeddings.token_embedding.num_embeddings, hidden_size=width,
                            intermediate_size=layer.mlp.fc1.out_features, num_hidden_layers=encoder.n_layers,
                            num_attention_heads=layer.self_attn.heads, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                            max_position_embeddings=tm.embeddings.position_embedding.num_embeddings,
                            projection_dim=width)
    checkpoint = {"cond_stage_model." + k: v for k, v in encoder.state_dict().items() if ".adapters." not in k}
    converted = convert_ldm_clip_checkpoint(checkpoint)  # -> text_model.*
    with torch.device("meta"):
        twin = CLIPTextModel(config)
    if not hasattr(twin, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    converted = {k: v for k, v in converted.items() if k in twin.state_dict()}  # layers past clip skip
    twin.load_state_dict({k: v.detach().clone() for k, v in converted.items()}, strict=True, assign=True)
    for name, buf in list(twin.named_buffers()):  # non-persistent position_ids: not in any state dict
        if buf.is_meta:
            owner, _, attr = name.rpartition(".")
            twin.get_submodule(owner).register_buffer(attr, torch.arange(buf.shape[-1]).expand(buf.shape).clone(),
                                                      persistent=False)
    return twin.eval()


@functools.lru_cache(maxsize=None)
def clip_tokenizer():
    """transformers' CLIPTokenizer on our vocabulary (SD v1's: pad with <|endoftext|>, 77 tokens); one per process."""
    from transformers import CLIPTokenizer
    folder = Path(tempfile.mkdtemp(prefix="clip-tokenizer-")) / "tokenizer"
    write_tokenizer(folder, MAX_LENGTH)
    return CLIPTokenizer.from_pretrained(str(folder))


def ddim_scheduler(model: torch.nn.Module):
    """diffusers' DDIMScheduler with our schedule and our DDIM sampler's timesteps."""
    from diffusers import DDIMScheduler
    betas = model.betas.detach().cpu().double()
    return DDIMScheduler(num_train_timesteps=len(betas), trained_betas=betas.numpy(), clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


def diffusers_pipeline(model: torch.nn.Module, config):
    """A StableDiffusionPipeline holding `model`'s base weights (adapters left out), on `model`'s device."""
    from diffusers import StableDiffusionPipeline
    device = model.betas.device
    pipe = StableDiffusionPipeline(vae=diffusers_vae(model, config), text_encoder=diffusers_text_encoder(model),
                                   tokenizer=clip_tokenizer(), unet=diffusers_twin(model.unet, config),
                                   scheduler=ddim_scheduler(model), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
