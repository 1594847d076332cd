"""Sampling and the DreamBooth measurements on the tiny world: base-model quality, subject fidelity, prior preservation.

Every comparison uses the same starting noise for each seed, so "before" and "after" images differ only by the model.
"""
import random
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from ldm.data.dreambooth import list_images, load_image
from ldm.data.synthetic import SUBJECT_CLASS, caption, random_scene, scene_rng
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.modules.adapter_io import load_adapter_from_dir
from ldm.tinyworld.metrics import TinyWorldMetric, paired_similarity, prompt_attributes, subject_fidelity
from ldm.util import load_model_from_config

REPO = Path(__file__).resolve().parents[2]
BASE_CONFIG = REPO / "configs" / "tiny-world" / "tiny-sd-v1.yaml"
BASE_CKPT = REPO / "models" / "ldm" / "tiny-sd-v1" / "model.safetensors"
SUBJECT_IMAGES = REPO / "assets" / "tiny-world" / "sks-star"
SUBJECT_PROMPT = f"photo of a sks {SUBJECT_CLASS}"
CLASS_PROMPT = f"photo of a {SUBJECT_CLASS}"
CONTEXT_PROMPTS = tuple(f"photo of a sks {SUBJECT_CLASS} on a {c} background" for c in ("green", "purple", "gray"))


def load_tiny_model(adapter: Optional[Union[str, Path]] = None, ckpt: Union[str, Path] = BASE_CKPT,
                    config: Union[str, Path] = BASE_CONFIG) -> torch.nn.Module:
    """The shipped tiny base model (eval mode, CPU), with an adapter directory loaded when given."""
    model = load_model_from_config(OmegaConf.load(config), str(ckpt))
    if adapter is not None:
        load_adapter_from_dir(model, str(adapter))
    return model


def seed_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """x_T for each seed, drawn on the CPU independently of batching."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(s)) for s in seeds])


@torch.no_grad()
def sample(model: torch.nn.Module, prompts: Sequence[str], seeds: Sequence[int], steps: int = 25,
           scale: float = 5.0, batch_size: int = 32) -> torch.Tensor:
    """DDIM + classifier-free guidance; prompt i from seed i; returns (n, 3, H, W) images in [0, 1]."""
    shape = (model.channels, model.image_size, model.image_size)
    sampler, out = DDIMSampler(model), []
    for start in range(0, len(prompts), batch_size):
        p, s = list(prompts[start:start + batch_size]), seeds[start:start + batch_size]
        c, uc = model.get_learned_conditioning(p), model.get_learned_conditioning(len(p) * [""])
        z, _ = sampler.sample(S=steps, batch_size=len(p), shape=shape, conditioning=c, unconditional_conditioning=uc,
                              unconditional_guidance_scale=scale, x_T=seed_noise(s, shape).to(model.betas.device),
                              verbose=False)
        out.append(((model.decode_first_stage(z).clamp(-1, 1) + 1) / 2).cpu())
    return torch.cat(out)


def load_references(folder: Union[str, Path] = SUBJECT_IMAGES, size: int = 64) -> torch.Tensor:
    """The instance images as (n, 3, size, size) in [0, 1]."""
    return torch.stack([(load_image(p, size) + 1) / 2 for p in list_images(folder)])


def base_quality(model: torch.nn.Module, metric: TinyWorldMetric, n: int = 200, seed: int = 777,
                 steps: int = 25, scale: float = 5.0) -> Dict[str, float]:
    """How often the base model draws what a fully descriptive random prompt asks, per attribute and overall."""
    rng = random.Random(seed)
    prompts = [caption(random_scene(scene_rng(seed, i)), rng, full=True) for i in range(n)]
    images = torch.cat([sample(model, prompts[i:i + 50], range(i, min(i + 50, n)), steps, scale)
                        for i in tqdm(range(0, n, 50), desc="base quality")])
    hits: Dict[str, List[bool]] = {}
    for pred, prompt in zip(metric.predict(images), prompts):
        for k, v in prompt_attributes(prompt).items():
            hits.setdefault(k, []).append(pred[k] == v)
    result = {f"{k}_accuracy": sum(v) / len(v) for k, v in hits.items()}
    result["shape_and_colour"] = sum(a and b for a, b in zip(hits["shape"], hits["colour"])) / n
    result["prompt_fidelity"] = float(metric.text_image_score(images, prompts).mean())
    return result


def model_samples(model: torch.nn.Module, n: int = 16, steps: int = 25, scale: float = 5.0) -> Dict[str, torch.Tensor]:
    """Seeds 0..n-1 of the subject prompt, the class prompt and subject prompts with a context (background)."""
    seeds = list(range(n))
    context_prompts = [CONTEXT_PROMPTS[i % len(CONTEXT_PROMPTS)] for i in seeds]
    return {"subject": sample(model, n * [SUBJECT_PROMPT], seeds, steps, scale),
            "class": sample(model, n * [CLASS_PROMPT], seeds, steps, scale),
            "context": sample(model, context_prompts, seeds, steps, scale)}


def dreambooth_metrics(metric: TinyWorldMetric, before: Dict[str, torch.Tensor], after: Dict[str, torch.Tensor],
                       references: torch.Tensor) -> Dict[str, float]:
    """Subject fidelity, subject rate, prompt fidelity and prior preservation from `model_samples` of two models."""
    n = len(after["context"])
    context_prompts = [CONTEXT_PROMPTS[i % len(CONTEXT_PROMPTS)] for i in range(n)]
    return {
        "subject_fidelity_base": subject_fidelity(metric, before["subject"], references),
        "subject_fidelity": subject_fidelity(metric, after["subject"], references),
        "subject_rate_base": metric.subject_rate(before["subject"]),
        "subject_rate": metric.subject_rate(after["subject"]),
        "prompt_fidelity_base": float(metric.text_image_score(before["context"], context_prompts).mean()),
        "prompt_fidelity": float(metric.text_image_score(after["context"], context_prompts).mean()),
        "class_similarity_to_base": paired_similarity(metric, after["class"], before["class"]),
        "class_subject_rate_base": metric.subject_rate(before["class"]),
        "class_subject_rate": metric.subject_rate(after["class"]),
    }
