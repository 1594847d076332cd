"""The SD v1 denoising UNet (the CompVis `UNetModel`, spatial-transformer variant only)."""
from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.adapters import adapters_enable, inject_adapters, load_adapter_from_dir, save_adapter_to_dir
from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import checkpoint, normalization, timestep_embedding, zero_module


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that hands `emb` to timestep blocks and `context` to spatial transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 conv."""

    def __init__(self, channels: int, out_channels: Optional[int] = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample(nn.Module):
    """Stride-2 3x3 conv (`op`, the checkpoint name)."""

    def __init__(self, channels: int, out_channels: Optional[int] = None):
        super().__init__()
        self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """GroupNorm-SiLU-conv twice with the timestep embedding added in between; `resi`/`reso` are adapter points."""
    ADAPTER_KIND = "resblock"

    def __init__(self, channels: int, emb_channels: int, dropout: float = 0.0, out_channels: Optional[int] = None,
                 use_checkpoint: bool = False):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       nn.Conv2d(channels, self.out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, self.out_channels))
        self.out_layers = nn.Sequential(normalization(self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)))
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)
        self.adapters = None  # an ldm.modules.adapters AdapterSet when adapters are attached

    def adapter_widths(self) -> Dict[str, int]:
        """The channels at the block's input (resi) and output (reso)."""
        return {"resi": self.channels, "reso": self.out_channels}

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, x, emb, flag=self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        taps = self.adapters.taps() if self.adapters is not None else None
        if taps is not None:
            x = taps("resi", x)
        h = self.in_layers(x)                                  # (b, c_out, h, w)
        h = h + self.emb_layers(emb).type(h.dtype)[..., None, None]
        h = self.out_layers(h)
        out = self.skip_connection(x) + h
        return taps("reso", out) if taps is not None else out


class UNetModel(nn.Module):
    """The SD v1 UNet: ResBlocks and SpatialTransformers over 4 levels, with skip concatenation.

    Parameter names follow the CompVis checkpoints exactly (`input_blocks.N.M...`, `middle_block`, `output_blocks`).
    `adapter_config` (the adapter paper's schema) attaches adapters after the base is built.
    """
    ADAPTER_ROLE = "unet"

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions: Iterable[int], dropout: float = 0.0,
                 channel_mult: Iterable[int] = (1, 2, 4, 8), num_heads: int = -1, num_head_channels: int = -1,
                 use_spatial_transformer: bool = True, transformer_depth: int = 1, context_dim: Optional[int] = None,
                 use_checkpoint: bool = False, legacy: bool = False, adapter_config: Optional[dict] = None):
        super().__init__()
        if not use_spatial_transformer or context_dim is None:
            raise ValueError("UNetModel here is the SD v1 text-conditioned UNet: set use_spatial_transformer: true "
                             "and context_dim (768 for SD v1)")
        if (num_heads == -1) == (num_head_channels == -1):
            raise ValueError("set exactly one of num_heads (SD v1: 8) or num_head_channels")
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.context_dim = context_dim
        channel_mult = list(channel_mult)
        attention_resolutions = set(attention_resolutions)
        # the block structure, by numbers (file formats name blocks by level and index, as diffusers does)
        self.channel_mult, self.num_res_blocks = tuple(channel_mult), num_res_blocks
        self.attention_levels = tuple(level for level in range(len(channel_mult)) if 2 ** level in attention_resolutions)
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_embed_dim), nn.SiLU(),
                                        nn.Linear(time_embed_dim, time_embed_dim))

        def res(ch_in, ch_out):
            return ResBlock(ch_in, time_embed_dim, dropout, ch_out, use_checkpoint)

        def attn(ch):
            heads = num_heads if num_heads != -1 else ch // num_head_channels
            return SpatialTransformer(ch, heads, ch // heads, depth=transformer_depth, dropout=dropout,
                                      context_dim=context_dim, use_checkpoint=use_checkpoint)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        chans, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch), res(ch, ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attn(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(model_channels, out_channels, 3,
                                                                                     padding=1)))
        if adapter_config:
            inject_adapters(self, adapter_config)

    def save_adapter_to_dir(self, path: str, name: str = "default") -> None:
        """Write adapter group `name` (weights + the config that built them) to directory `path`, atomically."""
        save_adapter_to_dir(self, path, name)

    def load_adapter_from_dir(self, path: str, name: str = "default", adapter_config: Optional[dict] = None) -> None:
        """Load an adapter directory (ours or the paper code's) into group `name`, injecting the group if absent."""
        load_adapter_from_dir(self, path, name, adapter_config)

    def adapters_enable(self, enabled: bool = True, name: Optional[str] = None) -> None:
        """Switch adapters (all groups, or group `name`) on or off; off gives the base model's output exactly."""
        adapters_enable(self, enabled, name)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Turn activation checkpointing of every ResBlock and transformer block on or off."""
        for m in self.modules():
            if isinstance(m, ResBlock):
                m.use_checkpoint = enabled
            elif hasattr(m, "checkpoint") and isinstance(getattr(m, "checkpoint"), bool):
                m.checkpoint = enabled

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """Predict the noise: x (b, 4, h, w), timesteps (b,), context (b, 77, 768) -> (b, 4, h, w)."""
        t_emb = timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype)
        emb = self.time_embed(t_emb)
        hs, h = [], x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)
