"""The KL-regularised first-stage autoencoder of Latent Diffusion (Rombach et al. 2022), inference only."""
from typing import Any, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution


class AutoencoderKL(nn.Module):
    """Encoder -> quant_conv -> Gaussian posterior; post_quant_conv -> Decoder. SD v1 uses f=8, 4 latent channels."""

    def __init__(self, ddconfig: Mapping[str, Any], lossconfig: Optional[Mapping[str, Any]], embed_dim: int,
                 ckpt_path: Optional[str] = None, ignore_keys: Sequence[str] = (), image_key: str = "image",
                 colorize_nlabels: Optional[int] = None, monitor: Optional[str] = None):
        super().__init__()
        if not ddconfig["double_z"]:
            raise ValueError("AutoencoderKL needs ddconfig.double_z=True: the encoder must output mean and logvar")
        # lossconfig is training-only (SD's inference config gives torch.nn.Identity); checkpoint loading lives
        # elsewhere, so ckpt_path / ignore_keys are only recorded for it
        self.lossconfig = lossconfig
        self.ckpt_path = ckpt_path
        self.ignore_keys = tuple(ignore_keys)
        self.image_key = image_key
        self.colorize_nlabels = colorize_nlabels
        if monitor is not None:
            self.monitor = monitor
        self.embed_dim = embed_dim

        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        # The encoder halves the size between each two of its len(ch_mult) levels: f = 8 for SD v1's [1, 2, 4, 4].
        self.downsampling_factor = 2 ** (self.encoder.num_resolutions - 1)
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Image (b, 3, H, W) in [-1, 1] -> posterior over latents (b, embed_dim, H/f, W/f)."""
        moments = self.quant_conv(self.encoder(x))  # (b, 2*embed_dim, H/f, W/f)
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (b, embed_dim, h, w) -> image (b, 3, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, input: torch.Tensor,
                sample_posterior: bool = True) -> Tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruct `input`; returns (reconstruction, posterior)."""
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior
