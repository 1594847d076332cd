"""First-stage autoencoder: SD v1 checkpoint layout, equivalence with diffusers, the Gaussian posterior, bf16."""
from pathlib import Path

import pytest
import torch

from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util.instantiate import count_params

REPO = Path(__file__).resolve().parents[1]
# shared/ sits inside the checkout on some machines and beside it on others
KEYS_TSV = next((p for p in (REPO / "shared" / "sd-v1-keys.tsv", REPO.parent / "shared" / "sd-v1-keys.tsv")
                 if p.exists()), REPO / "shared" / "sd-v1-keys.tsv")
PREFIX = "first_stage_model."
SD_DDCONFIG = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                   ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)
TINY_DDCONFIG = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32,
                     ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)
IDENTITY_LOSS = {"target": "torch.nn.Identity"}


def sd_vae_rows() -> dict:
    """{key without prefix: shape} for the first-stage rows of the SD v1 key list."""
    rows = {}
    for line in KEYS_TSV.read_text().splitlines():
        if line.startswith(PREFIX):
            key, shape = line.split("\t")
            rows[key[len(PREFIX):]] = tuple(int(s) for s in shape.split(",") if s)
    return rows


def tiny_autoencoder(seed: int = 0) -> AutoencoderKL:
    """A small AutoencoderKL with random (not default-initialised) weights, in eval mode."""
    torch.manual_seed(seed)
    model = AutoencoderKL(TINY_DDCONFIG, IDENTITY_LOSS, embed_dim=4).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # GroupNorm starts at (1, 0): perturb it so the affine part is tested too
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.skipif(not KEYS_TSV.exists(), reason="shared/sd-v1-keys.tsv not present")
def test_sd_size_keys_shapes_and_count():
    with torch.device("meta"):
        model = AutoencoderKL(SD_DDCONFIG, IDENTITY_LOSS, embed_dim=4)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = sd_vae_rows()
    assert sorted(set(ours) ^ set(expected)) == []
    assert {k: s for k, s in ours.items() if expected[k] != s} == {}
    assert count_params(model) == 83_653_863


def diffusers_twin(model: AutoencoderKL):
    """diffusers.AutoencoderKL with the tiny config, loaded strictly from our weights via diffusers' converter."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    n = len(TINY_DDCONFIG["ch_mult"])
    config = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                  up_block_types=["UpDecoderBlock2D"] * n,
                  block_out_channels=[TINY_DDCONFIG["ch"] * m for m in TINY_DDCONFIG["ch_mult"]],
                  layers_per_block=TINY_DDCONFIG["num_res_blocks"], latent_channels=4, norm_num_groups=32,
                  sample_size=TINY_DDCONFIG["resolution"])
    checkpoint = {PREFIX + k: v for k, v in model.state_dict().items()}
    converted = convert_ldm_vae_checkpoint(checkpoint, config)
    ref = diffusers.AutoencoderKL(**config).eval()
    ref.load_state_dict(converted, strict=True)
    return ref


def test_matches_diffusers_encode_and_decode():
    model = tiny_autoencoder()
    ref = diffusers_twin(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = model.encode(x), ref.encode(x).latent_dist
        ours_dec, theirs_dec = model.decode(z), ref.decode(z).sample
    assert ours.mean.shape == (2, 4, 8, 8) and ours_dec.shape == (2, 3, 32, 32)
    diffs = {
        "moments": (ours.parameters - theirs.parameters).abs().max().item(),
        "mean": (ours.mean - theirs.mean).abs().max().item(),
        "logvar": (ours.logvar - theirs.logvar).abs().max().item(),
        "decode": (ours_dec - theirs_dec).abs().max().item(),
    }
    print("max abs diff vs diffusers:", diffs)
    assert ours_dec.abs().max() > 1e-2  # the comparison is not between two near-zero outputs
    assert all(d <= 1e-4 for d in diffs.values()), diffs


def test_posterior_mode_sample_kl():
    params = torch.randn(2, 8, 4, 4)
    dist = DiagonalGaussianDistribution(params)
    assert torch.equal(dist.mode(), dist.mean)
    a = dist.sample(generator=torch.Generator().manual_seed(3))
    b = dist.sample(generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, dist.mean)
    standard = DiagonalGaussianDistribution(torch.zeros(2, 8, 4, 4))
    assert torch.allclose(standard.kl(), torch.zeros(2), atol=1e-6)
    assert torch.all(dist.kl() > 0)
    assert torch.allclose(dist.kl(dist), torch.zeros(2), atol=1e-5)
    assert dist.nll(dist.mean).shape == (2,)


def test_posterior_logvar_clamped_and_deterministic():
    params = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 100.0)], dim=1)
    assert DiagonalGaussianDistribution(params).logvar.max().item() == 20.0
    dist = DiagonalGaussianDistribution(params, deterministic=True)
    assert torch.equal(dist.sample(), dist.mean) and torch.equal(dist.kl(), torch.zeros(1))


def test_forward_shapes():
    model = tiny_autoencoder()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        rec, posterior = model(x, sample_posterior=False)
    assert rec.shape == x.shape and posterior.mean.shape == (2, 4, 8, 8)


def test_bf16_autocast_decode_is_finite():
    model = tiny_autoencoder()
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.decode(z)
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out.float()).all()
