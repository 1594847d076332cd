"""Frozen text encoders for conditioning: the CLIP ViT-L/14 text transformer of SD v1, built offline."""
from typing import List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ldm.modules.adapters import inject_adapters
from ldm.modules.encoders.clip_tokenizer import CLIPTokenizer


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU; the weights were trained with it, so it is not swappable."""
    return x * torch.sigmoid(1.702 * x)


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding."""

    def __init__(self, vocab_size: int, width: int, max_length: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(max_length, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # no position_ids buffer: it would add a checkpoint key; positions are simply 0..T-1
        return self.token_embedding(tokens) + self.position_embedding.weight[: tokens.shape[1]]  # (b, t, d)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v projections (the checkpoint layout)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        assert width % heads == 0, f"width {width} is not divisible by heads {heads}"
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (rearrange(proj(x), "b t (h d) -> b h t d", h=self.heads)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        # causal, with no padding mask: SD v1 conditions on all 77 positions, padding included
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, h, t, d)
        return self.out_proj(rearrange(x, "b h t d -> b t (h d)"))


class CLIPMLP(nn.Module):
    """Two-layer MLP with quick_gelu."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width)
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm2 = nn.LayerNorm(width)
        self.mlp = CLIPMLP(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """Stack of encoder layers; `n_layers` runs only the first n (clip skip)."""

    def __init__(self, width: int, layers: int, heads: int, hidden: int):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(width, heads, hidden) for _ in range(layers)])

    def forward(self, x: torch.Tensor, n_layers: int) -> torch.Tensor:
        for layer in self.layers[:n_layers]:
            x = layer(x)
        return x


class CLIPTextTransformer(nn.Module):
    """Embeddings, encoder and final layer norm: what the checkpoints call `text_model`."""

    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, max_length: int, hidden: int):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(vocab_size, width, max_length)
        self.encoder = CLIPEncoder(width, layers, heads, hidden)
        self.final_layer_norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor, n_layers: int) -> torch.Tensor:
        x = self.embeddings(tokens)  # (b, t, d)
        x = self.encoder(x, n_layers)  # (b, t, d)
        return self.final_layer_norm(x)


class CLIPTextModel(nn.Module):
    """Holder that gives the `transformer.text_model.*` key prefix of SD v1 checkpoints."""

    def __init__(self, **kwargs: int):
        super().__init__()
        self.text_model = CLIPTextTransformer(**kwargs)

    def forward(self, tokens: torch.Tensor, n_layers: int) -> torch.Tensor:
        return self.text_model(tokens, n_layers)


class FrozenCLIPEmbedder(nn.Module):
    """CLIP ViT-L/14 text encoder of SD v1 (Radford et al. 2021): prompts -> last hidden state [B, 77, 768].

    `layer` picks the output: "last", "penultimate", or a hidden-state index (0 = embeddings, -1 = last,
    -2 = penultimate, as A1111's clip skip); every choice goes through final_layer_norm. `adapter_config` (the schema
    of `ldm.modules.adapters.schema`, projection forms such as LoRA on q_proj/k_proj/v_proj/out_proj/fc1/fc2) attaches
    adapters after the base is built and frozen (`freeze_except_adapters` makes them trainable).
    """

    ADAPTER_ROLE = "cond_stage_model"

    def __init__(self, vocab_size: int = 49408, width: int = 768, layers: int = 12, heads: int = 12,
                 max_length: int = 77, mlp_ratio: float = 4.0, freeze: bool = True,
                 layer: Union[str, int] = "last", adapter_config: Optional[dict] = None):
        super().__init__()
        self.max_length = max_length
        self.n_layers = self.layer_to_depth(layer, layers)
        self.tokenizer = CLIPTokenizer(context_length=max_length)
        self.transformer = CLIPTextModel(vocab_size=vocab_size, width=width, layers=layers, heads=heads,
                                         max_length=max_length, hidden=int(width * mlp_ratio))
        if freeze:
            self.freeze()
        if adapter_config:
            inject_adapters(self, adapter_config)

    @staticmethod
    def layer_to_depth(layer: Union[str, int], layers: int) -> int:
        """Number of encoder layers to run for a `layer` choice."""
        if layer == "last":
            return layers
        if layer == "penultimate":
            return layers - 1
        if isinstance(layer, int) and -layers - 1 <= layer <= layers:
            return layer % (layers + 1)  # hidden states are indexed 0..layers, embeddings first
        raise ValueError(f"layer must be 'last', 'penultimate' or an int in [{-layers - 1}, {layers}], got {layer!r}")

    def freeze(self) -> None:
        """Eval mode for good, no gradients: the text encoder is not trained in SD v1 fine-tuning."""
        self.frozen = True
        self.eval()
        for param in self.parameters():
            param.requires_grad = False

    def train(self, mode: bool = True) -> "FrozenCLIPEmbedder":
        """A frozen encoder stays in eval mode whatever its parent asks."""
        return super().train(mode and not getattr(self, "frozen", False))

    @property
    def device(self) -> torch.device:
        """Device of the weights; tokens are moved there."""
        return self.transformer.text_model.embeddings.token_embedding.weight.device

    def tokenize(self, text: Union[str, List[str]]) -> torch.LongTensor:
        """Token ids [B, max_length] on the module's device."""
        return self.tokenizer(text).to(self.device)

    def forward(self, text: Union[str, List[str]]) -> torch.Tensor:
        tokens = self.tokenize(text)  # (b, t)
        return self.transformer(tokens, self.n_layers)  # (b, t, d)

    def encode(self, text: Union[str, List[str]]) -> torch.Tensor:
        """Conditioning [B, max_length, width] for a prompt or list of prompts (the CompVis name)."""
        return self(text)
