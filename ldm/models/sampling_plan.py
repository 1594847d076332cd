"""A sampling run resolved once: where its model comes from (`ModelSource`), the model built once from it, and the
`SamplingPlan` (prompts, sampler, steps, image size, precision, outputs) that every later step reads and none writes.

The model is built a single time. With base weights it is built on the meta device (no memory, no initialisation),
the image size and steps are checked against it there, before any work, and the checkpoint's tensors then become its
weights; with none (`--random_init`) it is built initialised from the seed.
"""
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Tuple

import torch

from ldm.checkpoint import load_into, load_trained_parameters
from ldm.checks import ConfigError
from ldm.config import adapter_config_from_file, build_base_model, find_config, load_configs, pop_adapter_configs
from ldm.models.diffusion.sampling import DEFAULT_SAMPLER, sampler_class
from ldm.modules.adapters import is_added_key, load_adapter_from_dir, set_adapter_scale
from ldm.modules.diffusers_folder import read_base_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterFile:
    """One trained adapter to sample with: its group name in the model, its directory or file, its strength."""
    name: str
    path: str
    scale: float = 1.0


@dataclass(frozen=True)
class ModelSource:
    """What the model is built from: config files merged left to right (none: the checkpoint's own, see
    ldm.config.find_config), base weights (None: initialised from `seed`), adapters, the adapter config of
    original-format adapter directories (default: the config's), a fine-tuned checkpoint of the whole UNet."""
    configs: Tuple[str, ...] = ()
    ckpt: Optional[str] = None
    seed: int = 42
    adapters: Tuple[AdapterFile, ...] = ()
    adapter_config: Optional[str] = None
    trained_ckpt: Optional[str] = None


@dataclass(frozen=True)
class SamplingPlan:
    """Everything a sampling run does, resolved from the command line and the model before any work."""
    prompts: Tuple[str, ...]
    height: int
    width: int
    sampler: str = DEFAULT_SAMPLER  # a key of ldm.models.diffusion.sampling.SAMPLERS
    steps: int = 50
    eta: float = 0.0
    scale: float = 7.5  # classifier-free guidance
    n_samples: int = 3  # images per batch
    n_iter: int = 2  # batches per prompt
    seed: int = 42
    fixed_code: bool = False  # one x_T for every batch
    init_img: Optional[str] = None  # img2img
    strength: float = 0.75
    autocast: bool = False
    adapters: Tuple[AdapterFile, ...] = ()
    sweep: Tuple[Optional[float], ...] = (None,)  # adapter scale factors, one grid row each; (None,): no sweep
    outdir: Path = Path("outputs/txt2img-samples")
    save_samples: bool = True
    save_grid: bool = True
    n_rows: int = 0  # images per grid row (0: n_samples)
    label: bool = False
    gif: bool = False
    watermark: bool = True
    safety_checker: Optional[str] = None


def sampling_size(model: Any, C: Optional[int], f: Optional[int], H: Optional[int], W: Optional[int], steps: int,
                  sampler: str) -> Tuple[int, int]:
    """(H, W) for sampling `model` (a LatentDiffusion, on the meta device will do): C and f are the model's (another
    value is refused), H and W default to its image size and must be multiples of f times the UNet's own
    downsampling (64 for SD v1); `steps` must be within what `sampler` can take on its training timesteps. A
    ConfigError names the flag."""
    for flag, given, own, what in (("--C", C, model.channels, "latent channels"),
                                   ("--f", f, model.downsampling_factor, "autoencoder downsampling factor")):
        if given is not None and given != own:
            raise ConfigError(f"{flag} {given} differs from the model's {what} {own}: drop {flag} (it defaults to "
                              f"the model's)")
    f, unet = model.downsampling_factor, 2 ** (len(model.unet.channel_mult) - 1)  # each UNet level halves
    H, W = H or model.pixel_size, W or model.pixel_size
    if H % (f * unet) or W % (f * unet):
        raise ConfigError(f"--H and --W must be multiples of {f * unet} (--f {f} x the UNet's downsampling {unet}), "
                          f"got {H}x{W}")
    most = sampler_class(sampler).max_steps(model.num_timesteps)
    if steps > most:
        raise ConfigError(f"--ddim_steps {steps} is more than the {most} steps {sampler} can take on the model's "
                          f"{model.num_timesteps} training timesteps: 20-50 is usual")
    return H, W


def build_model(source: ModelSource) -> Tuple[torch.nn.Module, Optional[dict]]:
    """The base model of `source` (built once: see the module docstring) and the UNet adapter config that builds
    original-format adapter directories. The config's own adapters are not built: adapters come from
    `source.adapters`, trained."""
    config, where = (load_configs(source.configs), "--config") if source.configs else find_config(source.ckpt)
    log.info("model config: %s", where)
    popped = pop_adapter_configs(config)
    if any(popped.values()) and not source.adapters:
        log.warning("the config's adapter_config is left out: without --adapter_path there are no trained adapters "
                    "to sample with (fresh ones would be the identity or noise)")
    config_adapters = adapter_config_from_file(source.adapter_config) if source.adapter_config else popped["unet"]
    torch.manual_seed(source.seed)  # like CompVis' seed_everything; also makes random weights repeatable
    return build_base_model(config, meta=source.ckpt is not None).eval(), config_adapters


def load_weights(model: torch.nn.Module, source: ModelSource, config_adapters: Optional[dict],
                 device: torch.device) -> torch.nn.Module:
    """`model` from `build_model` with its base weights (in the model's dtypes, whatever the file's), on `device`,
    with every adapter of `source` attached at its scale and the fine-tuned UNet of `source.trained_ckpt`."""
    if source.ckpt is not None:
        expected = model.state_dict()  # (meta tensors: names, shapes and dtypes)
        weights = {k: v.to(expected[k].dtype) if k in expected else v
                   for k, v in read_base_weights(source.ckpt).items()}
        load_into(model, weights, source=f"checkpoint '{source.ckpt}'", optional=is_added_key)
        log.info("loaded base weights from %s", source.ckpt)
    model = model.to(device)
    for adapter in source.adapters:
        load_adapter_from_dir(model, adapter.path, name=adapter.name, adapter_config=config_adapters)
        set_adapter_scale(model, adapter.scale, name=adapter.name)
    if source.trained_ckpt:
        step = load_trained_parameters(model, source.trained_ckpt, skip=is_added_key)
        log.info("fine-tuned weights of step %s from %s", step, source.trained_ckpt)
    return model


def load_model(source: ModelSource, device: torch.device) -> torch.nn.Module:
    """`build_model` then `load_weights`, for callers that need no plan in between."""
    model, config_adapters = build_model(source)
    return load_weights(model, source, config_adapters, device)
