"""Building blocks of the first-stage autoencoder (CompVis `Encoder`/`Decoder`), with checkpoint-compatible names."""
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    """SiLU (swish), the activation used throughout the autoencoder."""
    return F.silu(x)


def Normalize(in_channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the CompVis settings (32 groups, eps 1e-6, affine)."""
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


class _Resample(nn.Module):
    """x2 resampling with an optional 3x3 conv (`conv`, the checkpoint name)."""
    STRIDE, PADDING = 1, 1

    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=self.STRIDE, padding=self.PADDING)


class Upsample(_Resample):
    """Nearest-neighbour x2 upsampling, optionally followed by a 3x3 conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (b, c, 2h, 2w)
        return self.conv(x) if self.with_conv else x


class Downsample(_Resample):
    """x2 downsampling by a stride-2 3x3 conv (or average pooling without conv)."""
    STRIDE, PADDING = 2, 0  # no padding in the conv: the original pads asymmetrically in forward; checkpoints rely on it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.with_conv:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)  # (b, c, h+1, w+1): right/bottom only
        return self.conv(x)  # (b, c, h/2, w/2)


class ResnetBlock(nn.Module):
    """Pre-norm residual block: (norm, SiLU, conv) twice, with an optional timestep projection."""

    def __init__(self, *, in_channels: int, out_channels: Optional[int] = None, conv_shortcut: bool = False,
                 dropout: float, temb_channels: int = 512):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut

        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.conv1(nonlinearity(self.norm1(x)))  # (b, out, h, w)
        if temb is not None:
            h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual; q/k/v/proj_out stay 1x1 convs to match checkpoints."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_ = self.norm(x)
        b, c, h, w = h_.shape

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, 1, c, h * w).transpose(2, 3)  # (b, 1 head, h*w, c)

        q, k, v = tokens(self.q(h_)), tokens(self.k(h_)), tokens(self.v(h_))
        h_ = F.scaled_dot_product_attention(q, k, v, scale=c ** -0.5)  # (b, 1, h*w, c)
        h_ = h_.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(h_)


ATTN_TYPES = ("vanilla", "none")


def make_attn(in_channels: int, attn_type: str = "vanilla") -> nn.Module:
    """The middle's attention: `AttnBlock` ("vanilla", SD v1), or none (an identity without weights, as SD 2.x's
    `attn_type: none`; the tiny f = 4 autoencoder uses it so that it is fully convolutional and trains on crops)."""
    if attn_type not in ATTN_TYPES:
        raise ValueError(f"attn_type must be one of {', '.join(ATTN_TYPES)}, got {attn_type!r}")
    return AttnBlock(in_channels) if attn_type == "vanilla" else nn.Identity()


def _mid_block(block_in: int, temb_ch: int, dropout: float, attn_type: str) -> nn.Module:
    """The resnet-attention-resnet middle of both Encoder and Decoder."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=temb_ch, dropout=dropout)
    mid.attn_1 = make_attn(block_in, attn_type)
    mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=temb_ch, dropout=dropout)
    return mid


def _level(block_in: int, block_out: int, n_blocks: int, temb_ch: int, dropout: float, with_attn: bool) -> nn.Module:
    """One resolution level (`block`, `attn`: the checkpoint names): n ResnetBlocks, each followed by an AttnBlock
    when `with_attn`."""
    block, attn = nn.ModuleList(), nn.ModuleList()
    for _ in range(n_blocks):
        block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, temb_channels=temb_ch, dropout=dropout))
        block_in = block_out
        if with_attn:
            attn.append(AttnBlock(block_in))
    level = nn.Module()
    level.block, level.attn = block, attn
    return level


class Encoder(nn.Module):
    """Image -> latent moments: conv_in, resolution levels of resnets (+ attn) with downsampling, mid, conv_out."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = True,
                 attn_type: str = "vanilla", **ignore_kwargs):
        super().__init__()
        self.ch = ch
        self.temb_ch = 0  # the autoencoder has no timestep
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        curr_res = resolution
        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            down = _level(block_in, block_out, num_res_blocks, self.temb_ch, dropout, curr_res in attn_resolutions)
            block_in = block_out
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res = curr_res // 2
            self.down.append(down)

        self.mid = _mid_block(block_in, self.temb_ch, dropout, attn_type)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels,
                                  kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        temb = None
        h = self.conv_in(x)  # (b, ch, H, W)
        for i_level in range(self.num_resolutions):
            level = self.down[i_level]
            for i_block in range(self.num_res_blocks):
                h = level.block[i_block](h, temb)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)
        # (b, ch*ch_mult[-1], H/2^(L-1), W/2^(L-1))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, temb)), temb)
        return self.conv_out(nonlinearity(self.norm_out(h)))  # (b, 2*z or z, h, w)


class Decoder(nn.Module):
    """Latent -> image: conv_in, mid, resolution levels of resnets (+ attn) with upsampling, conv_out."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int, resolution: int, z_channels: int, give_pre_end: bool = False,
                 tanh_out: bool = False, attn_type: str = "vanilla", **ignore_kwargs):
        super().__init__()
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out

        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _mid_block(block_in, self.temb_ch, dropout, attn_type)

        # built from the lowest resolution up, but indexed like the encoder (up[0] is full resolution)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[i_level]
            up = _level(block_in, block_out, num_res_blocks + 1, self.temb_ch, dropout, curr_res in attn_resolutions)
            block_in = block_out
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res = curr_res * 2
            self.up.insert(0, up)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        temb = None
        self.last_z_shape = z.shape
        h = self.conv_in(z)  # (b, ch*ch_mult[-1], h, w)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, temb)), temb)
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = level.block[i_block](h, temb)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)
        if self.give_pre_end:
            return h  # (b, ch*ch_mult[0], H, W)
        h = self.conv_out(nonlinearity(self.norm_out(h)))  # (b, out_ch, H, W)
        return torch.tanh(h) if self.tanh_out else h
