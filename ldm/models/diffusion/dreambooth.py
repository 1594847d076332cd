"""DreamBooth with prior preservation (Ruiz et al. 2023) that trains only adapters (Xiang et al. 2023), in Lightning.

A batch is {"instance": subject items, "reg": class items} from `ldm.data.datamodule.DataModuleFromConfig`; the loss
is the eps-prediction MSE on the instance items plus `reg_weight` times the MSE on the class items. Without "reg"
(caption-dataset fine-tuning, `ldm.data.captions`) it is the instance MSE alone. The adapters may sit on the UNet and
on the text encoder (LoRA, (IA)^3); everything but the trained parameters is frozen and stays in eval mode; the
trained ones stay fp32 under mixed precision.
"""
import logging
import math
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.modules.adapters import (SECTION, AdapterConfigError, adapter_blocks, adapter_carriers, adapter_groups,
                                  adapter_networks, adapter_parameters, config_from_specs, is_added_key)
from ldm.checks import ConfigError, check_number
from ldm.modules.fastpaths import adamw_options, apply_fast_paths
from ldm.util.instantiate import check_ranges

log = logging.getLogger(__name__)

TRAIN_LEVELS = ("adapter", "unet")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the weights are left as they were before that step."""


class DreamBoothLatentDiffusion(LatentDiffusion):
    """LatentDiffusion with a DreamBooth training step over adapters (train_level ["adapter"]: those of the UNet and
    of the text encoder) or the UNet."""

    PARAM_RANGES = {"reg_weight": dict(low=0), "text_encoder_lr": dict(low=0, low_open=True, optional=True),
                    "lr_warmup_steps": dict(low=0, integer=True), "adam_weight_decay": dict(low=0),
                    "adam_epsilon": dict(low=0, low_open=True)}

    def __init__(self, *args: Any, reg_weight: float = 1.0, train_level: Sequence[str] = ("adapter",),
                 cache_latents: bool = True, gradient_checkpointing: bool = False, use_8bit_adam: bool = False,
                 adam_betas: Sequence[float] = (0.9, 0.999), adam_weight_decay: float = 1e-2,
                 adam_epsilon: float = 1e-8, lr_warmup_steps: int = 0, text_encoder_lr: Optional[float] = None,
                 compile: bool = False, channels_last: bool = False, allow_tf32: bool = True,
                 paper_optimizer: bool = False, **kwargs: Any):
        # checked before LatentDiffusion builds the networks and loads the base weights
        check_ranges(DreamBoothLatentDiffusion, locals())
        if isinstance(train_level, str) or not train_level or sorted(set(train_level) - set(TRAIN_LEVELS)):
            raise ConfigError(f"train_level {train_level!r} is not valid: a list of {list(TRAIN_LEVELS)}")
        if isinstance(adam_betas, str) or len(adam_betas) != 2:
            raise ConfigError(f"adam_betas must be two numbers in [0, 1), got {adam_betas!r}")
        for beta in adam_betas:
            check_number(beta, "each of adam_betas", 0, 1, high_open=True)
        if paper_optimizer and use_8bit_adam:
            raise ConfigError("paper_optimizer reproduces torch's AdamW as the adapter paper's code ran it: set "
                              "model.params.use_8bit_adam=false")
        super().__init__(*args, **kwargs)
        self.reg_weight, self.train_level, self.cache_latents = float(reg_weight), tuple(train_level), cache_latents
        self.use_8bit_adam, self.lr_warmup_steps = use_8bit_adam, int(lr_warmup_steps)
        self.text_encoder_lr = text_encoder_lr  # its own rate for the text encoder's adapters (as kohya's scripts)
        self.adam = dict(betas=tuple(adam_betas), weight_decay=adam_weight_decay, eps=adam_epsilon)
        self.paper_optimizer = bool(paper_optimizer)  # the paper's doubled AdamW registration (`paper_duplicates`)
        # speed options (ldm.modules.fastpaths), applied in on_fit_start, once the device is known
        self.fast_paths = dict(compile=bool(compile), channels_last=bool(channels_last), tf32=bool(allow_tf32))
        self.learning_rate = 1e-4  # set by main_dream_booth.py from model.base_learning_rate (and --scale_lr)
        self.strict_loading = False  # a training checkpoint holds the trained parameters only
        self.unet.set_gradient_checkpointing(gradient_checkpointing)
        self._freeze_all_but_trained()
        self._moments: Dict[Tuple[str, int, bool], torch.Tensor] = {}
        self._contexts: Dict[str, torch.Tensor] = {}
        # When the run trains in a pack (ldm.train.pack): the UNet call and the backward pass of each training step
        # go through it, batched with the other runs' (each run's adapters act on its own rows).
        self.pack_slot: Optional[Any] = None

    # ---- what trains --------------------------------------------------------------------------------------------
    def trained_parameters(self) -> List[torch.nn.Parameter]:
        """The parameters of the train levels: the adapters' (UNet and text encoder) and/or the whole UNet's, each
        once."""
        params = {}
        if "unet" in self.train_level:
            params.update({id(p): p for p in self.unet.parameters()})
        if "adapter" in self.train_level:
            found = adapter_parameters(self)
            if not found:
                raise AdapterConfigError("train_level 'adapter' but the model has no adapters: set "
                                         "model.params.unet_config.params.adapter_config (see configs/lora and "
                                         "configs/sd-inject-dreambooth) or cond_stage_config.params.adapter_config")
            params.update({id(p): p for p in found})
        return list(params.values())

    @property
    def text_encoder_trains(self) -> bool:
        """Whether the text encoder has trained parameters (adapters): captions are then encoded inside the step."""
        return any(p.requires_grad for p in self.cond_stage_model.parameters())

    def _freeze_all_but_trained(self) -> None:
        trained = self.trained_parameters()
        for p in self.parameters():
            p.requires_grad_(False)
        for p in trained:
            p.requires_grad_(True)

    def trained_state_keys(self) -> List[str]:
        """state_dict keys of the trained parameters: what a training checkpoint holds."""
        return [k for k, p in self.named_parameters() if p.requires_grad]

    def describe_trained(self) -> str:
        """'1,511,040 trained parameters (0.176% of the UNet's 859,520,964)' and the like, with the text encoder's
        share when it trains."""
        trained = sum(p.numel() for p in self.trained_parameters())
        base = sum(p.numel() for n, p in self.unet.named_parameters() if not is_added_key(n))
        text = sum(p.numel() for p in self.cond_stage_model.parameters() if p.requires_grad)
        return (f"{trained:,} trained parameters ({100 * trained / base:.3f}% of the UNet's {base:,})"
                + (f", {text:,} of them in the text encoder" if text else ""))

    def train(self, mode: bool = True) -> "DreamBoothLatentDiffusion":
        """Only trained modules follow `mode`; the frozen base stays in eval mode (dropout off, as in inference)."""
        super().train(mode)  # the VAE and text encoder stay in eval mode (LatentDiffusion.train)
        if "unet" not in self.train_level:
            self.model.eval()
        for _, module in adapter_carriers(self):  # the adapters of the UNet and the text encoder
            module.adapters.train(mode)
        return self

    # ---- inputs -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the VAE posterior's (mean, logvar) as one (b, 2c, h, w) tensor."""
        return self.encode_first_stage(images).parameters

    def _moments_of(self, items: Dict[str, Any], part: str) -> torch.Tensor:
        """Posterior moments of a batch, through the per-view cache when caching is on (VAE runs once per view)."""
        if not self.cache_latents:
            return self._encode_moments(items["image"])
        keys = [(part, int(i), bool(f)) for i, f in zip(items["index"], items["flipped"])]
        missing = [j for j, k in enumerate(keys) if k not in self._moments]
        if missing:
            fresh = self._encode_moments(items["image"][missing])
            for j, m in zip(missing, fresh):
                self._moments[keys[j]] = m
        return torch.stack([self._moments[k] for k in keys])

    def _contexts_of(self, captions: Sequence[str]) -> torch.Tensor:
        """Text contexts (b, 77, d), each distinct caption encoded once when caching is on. When the text encoder
        trains, every step encodes its captions afresh, with grad (a cached context would be stale and detached)."""
        if self.text_encoder_trains:
            return self.cond_stage_model.encode(list(captions))
        if not self.cache_latents:
            return self.get_learned_conditioning(list(captions))
        missing = sorted({c for c in captions if c not in self._contexts})
        if missing:
            for c, e in zip(missing, self.get_learned_conditioning(missing)):
                self._contexts[c] = e
        return torch.stack([self._contexts[c] for c in captions])

    def get_input(self, items: Dict[str, Any], part: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """Scaled latents z (sampled from the posterior, as the original) and text contexts of one batch part."""
        moments = self._moments_of(items, part).float()
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        z = self.scale_factor * (mean + std * torch.randn_like(mean))
        return z, self._contexts_of(items["caption"])

    # ---- the step -----------------------------------------------------------------------------------------------
    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The UNet's noise prediction; in a pack, a training step's call is batched with the other runs'."""
        if self.pack_slot is not None and torch.is_grad_enabled():
            return self.pack_slot.apply_model(x_noisy, t, cond)
        return super().apply_model(x_noisy, t, cond)

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Lightning's backward hook; in a pack, one backward pass serves every run's loss of the step."""
        if self.pack_slot is not None:
            self.pack_slot.backward(loss)
        else:
            super().backward(loss, *args, **kwargs)

    def shared_step(self, batch: Dict[str, Dict[str, Any]]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Loss of one step: instance and class items go through the UNet together, as one batch."""
        z, c = self.get_input(batch["instance"], "instance")
        n = z.shape[0]
        if "reg" in batch and self.reg_weight > 0:
            z_reg, c_reg = self.get_input(batch["reg"], "reg")
            z, c = torch.cat([z, z_reg]), torch.cat([c, c_reg])
        per_sample, _ = self(z, c)
        logs = {"loss_instance": per_sample[:n].mean()}
        loss = logs["loss_instance"]
        if per_sample.shape[0] > n:
            logs["loss_prior"] = per_sample[n:].mean()
            loss = loss + self.reg_weight * logs["loss_prior"]
        logs["loss"] = loss
        return loss, logs

    def training_step(self, batch: Dict[str, Dict[str, Any]], batch_idx: int) -> torch.Tensor:
        loss, logs = self.shared_step(batch)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the loss is {loss.item()} at step {self.global_step} ({', '.join(f'{k} {v.item():.4g}' for k, v in logs.items())}); "
                "training stopped before updating the weights, so the last checkpoint is good. Lower the learning "
                "rate, or use bf16 instead of fp16 mixed precision")
        self.log_dict({f"train/{k}": v.detach() for k, v in logs.items()}, prog_bar=True, on_step=True,
                      batch_size=len(batch["instance"]["caption"]))
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, prog_bar=False,
                 batch_size=1)
        return loss

    # ---- optimisation -------------------------------------------------------------------------------------------
    def param_groups(self) -> List[Dict[str, Any]]:
        """The optimiser's parameter groups: one at the learning rate, or, with `text_encoder_lr` set, the UNet's
        parameters at the learning rate and the text encoder's at theirs (no empty group)."""
        params = self.trained_parameters()
        if self.text_encoder_lr is None:
            return [{"params": params}]
        in_text_encoder = {id(p) for p in self.cond_stage_model.parameters()}
        unet = [p for p in params if id(p) not in in_text_encoder]
        text = [p for p in params if id(p) in in_text_encoder]
        return [g for g in ({"params": unet}, {"params": text, "lr": self.text_encoder_lr}) if g["params"]]

    def paper_duplicates(self) -> List[torch.nn.Parameter]:
        """What the adapter paper's code (github.com/Xiang-cd/unet-finetune, ddpm_dream.py) registers twice in AdamW:
        its optimizer collects every module whose name contains "adapter" and is an AdapterForward or a Sequential,
        and a transformer block's AdapterForward and its inner Sequential both match, so each transformer-block
        adapter parameter is listed twice and every step moves it twice; a ResBlock adapter matches once."""
        return [p for _, block, kind, _ in adapter_blocks(self.unet) if kind == "transformer"
                for p in getattr(block, "adapters", torch.nn.ModuleList()).parameters() if p.requires_grad]

    def configure_optimizers(self) -> Dict[str, Any]:
        groups = self.param_groups()
        if self.paper_optimizer:
            # Reproduced exactly: the duplicates are listed again (so AdamW's per-parameter loop, and under fp16 the
            # grad scaler's unscale, meet them twice, as in the paper's torch 1.10), on the per-parameter loop that
            # torch 1.10's AdamW was (foreach and fused kernels would apply both updates from one state read).
            groups[0]["params"] = groups[0]["params"] + self.paper_duplicates()
            options = {"foreach": False, "fused": False}
        else:
            options = {} if self.use_8bit_adam else adamw_options(p for g in groups for p in g["params"])
        with warnings.catch_warnings():  # torch warns about the duplicates the paper recipe lists on purpose
            warnings.filterwarnings("ignore", message="optimizer contains a parameter group with duplicate")
            optimizer = self._optimizer_class()(groups, lr=self.learning_rate, **self.adam, **options)
        warmup = self.lr_warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _optimizer_class(self) -> type:
        if not self.use_8bit_adam:
            return torch.optim.AdamW
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("use_8bit_adam needs bitsandbytes: `pip install bitsandbytes` (CUDA only), or set "
                              "model.params.use_8bit_adam=false") from None
        return bnb.optim.AdamW8bit

    def on_train_start(self) -> None:
        self.train()  # Lightning leaves module modes as they are; ours keeps the frozen base in eval mode

    def on_fit_start(self) -> None:
        apply_fast_paths(self.unet, self.device, **self.fast_paths)
        log.info("training %s with lr %.3g; reg_weight %.3g", self.describe_trained(), self.learning_rate,
                 self.reg_weight)
        if self.paper_optimizer:
            log.info("paper_optimizer: %d transformer-adapter parameters are registered twice in AdamW (each step "
                     "moves them twice), as the adapter paper's code does", sum(p.numel() for p in
                                                                                 self.paper_duplicates()))
        bad = [n for n, p in self.named_parameters() if p.requires_grad and p.dtype != torch.float32]
        if bad:  # half-precision trained weights break the AMP grad scaler ("Attempting to unscale FP16 gradients")
            raise TypeError(f"trained parameters must be fp32 under mixed precision; {bad[0]} is not")

    # ---- checkpoints hold the trained state only ----------------------------------------------------------------
    def _adapter_layout(self) -> Dict[str, Dict[str, Any]]:
        """Each adapter group's config per network, under the keys of adapter directories ("adapter_config" for the
        UNet, "cond_stage_adapter_config" for the text encoder): equal shapes at another position must not load
        silently."""
        nets = adapter_networks(self)
        return {key: {name: config_from_specs(specs) for name, specs in adapter_groups(nets[role][1]).items()}
                for role, key in SECTION.items() if role in nets}

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        keep = set(self.trained_state_keys())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint.update(self._adapter_layout())

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        own = {k: v.shape for k, v in self.state_dict().items() if k in set(self.trained_state_keys())}
        saved = {k: v.shape for k, v in checkpoint["state_dict"].items()}
        same_layout = all(checkpoint.get(key, {}) == groups for key, groups in self._adapter_layout().items())
        if saved != own or not same_layout:
            differ = sorted(set(saved) ^ set(own)) or sorted(k for k in own if saved[k] != own[k])
            raise ConfigError(
                "the training checkpoint was made for other trained parameters "
                f"({'e.g. ' + differ[0] if differ else 'adapters at other positions'}): resume with the run's own "
                "config.yaml (main_dream_booth.py -r LOGDIR) without changing the adapters or train_level")


def scaled_learning_rate(base_lr: float, batch_size: int, devices: int, num_nodes: int, accumulate: int) -> float:
    """The CompVis --scale_lr rule: lr = base_lr x batch size x devices x nodes x gradient accumulation."""
    factor = batch_size * devices * num_nodes * accumulate
    if factor < 1 or not math.isfinite(base_lr):
        raise ValueError(f"cannot scale lr {base_lr} by {factor}")
    return base_lr * factor
