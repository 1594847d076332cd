"""Cross-attention, the pre-norm transformer block and the SpatialTransformer of SD v1."""
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ldm.modules.adapters.positions import STREAM
from ldm.modules.diffusionmodules.util import checkpoint, zero_module
from ldm.util.defaults import default


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020): one Linear producing value and gate."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP; `net.0.proj`, `net.2` are the checkpoint names."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention of x over context (self-attention when context is None), via SDPA."""

    def __init__(self, query_dim: int, context_dim: Optional[int] = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = default(context_dim, query_dim)
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        context = default(context, x)                                     # (b, m, d_ctx)
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)    # (b, n|m, h*d)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        # scale 1/sqrt(d), as in SD v1; SDPA never materialises the (n, m) attention matrix where a fused kernel exists
        out = F.scaled_dot_product_attention(q, k, v)                     # (b, h, n, d)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


def _no_taps(name: str, t: torch.Tensor) -> torch.Tensor:
    return t


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention, GEGLU FFN, each with a residual.

    The named points of the adapter design space (`attn1i` ... `transo`, and `attn2c`, the context) are the
    intermediate tensors of `_forward`, where it calls `taps(name, t)`; attached adapters read from and add to them
    (`ldm.modules.adapters`). Without adapters every tap is the identity.
    """
    ADAPTER_KIND = "transformer"

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0, context_dim: Optional[int] = None,
                 gated_ff: bool = True, checkpoint: bool = True):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint
        self.adapters = None  # an ldm.modules.adapters AdapterSet when adapters are attached

    def adapter_widths(self) -> Dict[str, int]:
        """The width of the tensor at each named point: the residual stream's, and the context's at attn2c."""
        dim = self.norm1.normalized_shape[0]
        return {**{p: dim for p in STREAM}, "attn2c": self.attn2.to_k.in_features}

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        return checkpoint(self._forward, x, context, flag=self.checkpoint)

    def _forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        taps = (self.adapters.taps() if self.adapters is not None else None) or _no_taps
        x = taps("attn1i", x)                                              # (b, n, c) throughout
        h = taps("attn1o", self.attn1(self.norm1(x)))
        x = taps("attn2i", h + x)
        context = taps("attn2c", context)
        h = taps("attn2o", self.attn2(self.norm2(x), context=context))
        x = taps("ffni", h + x)
        h = taps("ffno", self.ff(self.norm3(x)))
        return taps("transo", h + x)


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, with 1x1-conv projections in and out (SD v1)."""

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: Optional[int] = None, use_checkpoint: bool = True):
        super().__init__()
        inner_dim = n_heads * d_head
        self.in_channels = in_channels
        self.norm = nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim,
                                   checkpoint=use_checkpoint) for _ in range(depth)])
        self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.proj_in(self.norm(x))
        x = rearrange(x, "b c h w -> b (h w) c")
        for block in self.transformer_blocks:
            x = block(x, context=context)
        # contiguous: a channels-last view here would spread to every later conv (weights re-laid out each call)
        x = rearrange(x, "b (h w) c -> b c h w", h=h, w=w).contiguous()
        return self.proj_out(x) + x_in
