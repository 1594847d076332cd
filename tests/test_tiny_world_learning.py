"""The shipped tiny base model, and DreamBooth on it: its file has the SD v1 layout, a zero-init adapter changes
nothing before training, and a short run fits the subject (its denoising error on the instance images drops) while
the base weights stay untouched. The sample-level metrics (scripts/tiny_world_report.py) are in the README.
"""
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from conftest import KEYS_TSV, REPO
from ldm.data.synthetic import SUBJECT_CLASS
from ldm.tinyworld.demo import latest_adapters, train_argv
from ldm.tinyworld.evaluate import load_references, load_tiny_model, sample
from ldm.util import instantiate_from_config

STEPS = 150
TINY_SD = REPO / "configs" / "tiny-world" / "tiny-sd-v1.yaml"
SHIPPED = REPO / "models" / "ldm" / "tiny-sd-v1" / "model.safetensors"


# ---- the shipped weights -------------------------------------------------------------------------------------------
def sd_v1_keys():
    if not KEYS_TSV.exists():
        return set()
    lines = KEYS_TSV.read_text().splitlines()
    return {line.split("\t")[0] for line in lines if line and not line.startswith("#")}


def test_shipped_base_model_is_sd_v1_layout():
    model = instantiate_from_config(OmegaConf.load(TINY_SD).model)
    with safe_open(str(SHIPPED), "pt") as f:
        keys = set(f.keys())
    assert keys == set(model.state_dict())
    sd_keys = sd_v1_keys()
    if sd_keys:  # UNet, text encoder and buffers: SD v1 with fewer layers, so every such key is an SD v1 key
        same = {k for k in keys if not k.startswith("first_stage_model.")}
        assert same <= sd_keys, sorted(same - sd_keys)[:5]
        # the VAE's widths differ (ch_mult 1,2,2,4), so its 1x1 shortcuts sit elsewhere; the rest is SD v1's
        vae = {k for k in keys - same if ".nin_shortcut." not in k}
        assert vae <= sd_keys, sorted(vae - sd_keys)[:5]
    assert SHIPPED.stat().st_size < 40e6


def run_training(tmp_path, prior: bool):
    import main_dream_booth
    argv = train_argv(tmp_path, STEPS, seed=23, prior=prior) + [
        "data.params.num_class_images=8", "data.params.class_image_sampler.steps=10",
        "lightning.callbacks.image_logger.params.batch_frequency=1000", "model.base_learning_rate=3e-3"]
    return latest_adapters(main_dream_booth.main(argv))


@torch.no_grad()
def denoising_error(model, images: torch.Tensor, prompt: str, seed: int = 0, draws: int = 8) -> float:
    """Eps-prediction MSE on the images' latents at fixed noise and timesteps (lower: the model draws them better)."""
    g = torch.Generator().manual_seed(seed)
    z = model.get_first_stage_encoding(model.encode_first_stage(images * 2 - 1), sample=False)
    z = z.repeat(draws, 1, 1, 1)
    t = torch.randint(50, 950, (len(z),), generator=g)
    noise = torch.randn(z.shape, generator=g)
    c = model.get_learned_conditioning(len(z) * [prompt])
    return float(model.p_losses(z, c, t, noise)[1])


def test_zero_init_adapter_changes_nothing_before_training():
    from ldm.modules.adapters import inject_adapters
    demo = OmegaConf.load(REPO / "configs" / "tiny-world" / "dreambooth-demo.yaml")
    base, adapted = load_tiny_model(), load_tiny_model()
    assert inject_adapters(adapted.unet, demo.model.params.unet_config.params.adapter_config) > 0
    prompts = [f"photo of a sks {SUBJECT_CLASS}", f"photo of a {SUBJECT_CLASS}"]
    assert torch.equal(sample(base, prompts, [0, 1], steps=5), sample(adapted, prompts, [0, 1], steps=5))


def test_dreambooth_fits_the_subject_and_only_the_adapter_changes(tmp_path):
    adapters = run_training(tmp_path, prior=True)
    base, tuned = load_tiny_model(), load_tiny_model(adapters)
    references = load_references()
    before = denoising_error(base, references, f"photo of a sks {SUBJECT_CLASS}")
    after = denoising_error(tuned, references, f"photo of a sks {SUBJECT_CLASS}")
    assert after < 0.95 * before, (before, after)  # measured 0.0600 -> 0.0533 (0.89x) after 150 steps
    # the base weights are untouched: removing the adapter gives the base model back exactly
    tuned_sd, base_sd = tuned.state_dict(), base.state_dict()
    assert all(torch.equal(tuned_sd[k], v) for k, v in base_sd.items())
    images = sample(tuned, [f"photo of a sks {SUBJECT_CLASS}"], [0], steps=5)
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
