"""Sampling and the DreamBooth measurements on the tiny world: base-model quality, subject fidelity, prior preservation.

Every comparison uses the same starting noise for each seed, so "before" and "after" images differ only by the model.
"""
import random
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from omegaconf import OmegaConf

from ldm.data.dreambooth import list_images
from ldm.data.synthetic import (COLOURS, SHAPES, SIZES, POSITIONS, SUBJECT_CLASS, TEXTURES, Scene, SyntheticScenes,
                                caption, random_scene, render_uint8, scene_rng)
from ldm.evaluation.metrics import METRICS, Samples, load_images, prompt_fidelity, subject_fidelity
from ldm.evaluation.sampling import sample_images
from ldm.modules.adapters import load_adapter_from_dir
from ldm.tinyworld.metrics import TinyWorldMetric, prompt_attributes
from ldm.util.instantiate import load_model_from_config

REPO = Path(__file__).resolve().parents[2]
# the project's tiny SD v1 models: config and weights (v2: f = 8, the base world; v3: f = 4, the close-up world)
TINY_MODELS = {
    "v2": (REPO / "configs" / "tiny-world" / "tiny-sd-v1.yaml", REPO / "models" / "ldm" / "tiny-sd-v1" / "model.safetensors"),
    "v3": (REPO / "configs" / "tiny-world" / "tiny-sd-v1-f4.yaml",
           REPO / "models" / "ldm" / "tiny-sd-v1-f4" / "model.safetensors"),
}
DEFAULT_MODEL = "v2"  # v3 becomes the default once it meets its goals (README, "The tiny world")
BASE_CONFIG, BASE_CKPT = TINY_MODELS[DEFAULT_MODEL]
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


def model_world(ckpt: Union[str, Path]) -> str:
    """The world a tiny base model was trained on, from its file's metadata ("base" for files that do not say)."""
    from safetensors import safe_open
    if not str(ckpt).endswith(".safetensors"):
        return "base"
    with safe_open(str(ckpt), "pt") as f:
        return (f.metadata() or {}).get("world", "base")


def sample(model: torch.nn.Module, prompts: Sequence[str], seeds: Sequence[int], steps: int = 25,
           scale: float = 5.0) -> torch.Tensor:
    """DDIM + classifier-free guidance, prompt i from seed i's noise; (n, 3, H, W) images in [0, 1]."""
    return sample_images(model, list(zip(prompts, seeds)), model.pixel_size, steps, scale, batch_size=32)


def load_references(folder: Union[str, Path] = SUBJECT_IMAGES, size: int = 64) -> torch.Tensor:
    """The instance images as (n, 3, size, size) in [0, 1]."""
    return load_images(list_images(folder), size)


# What a model that ignores the prompt scores: 1 / the number of values the world draws.
CHANCE = {"shape": 1 / len(SHAPES), "colour": 1 / len(COLOURS), "texture": 1 / len(TEXTURES),
          "background": 1 / len(COLOURS), "size": 1 / len(SIZES), "position": 1 / len(POSITIONS)}


def quality_prompts(n: int, seed: int = 777, world: str = "base") -> List[str]:
    """n fully described random prompts of `world` (prompt i from scene i of `seed`)."""
    rng = random.Random(seed)
    return [caption(random_scene(scene_rng(seed, i), world), rng, full=True, world=world) for i in range(n)]


def base_quality(model: torch.nn.Module, metric: TinyWorldMetric, n: int = 200, seed: int = 777,
                 steps: int = 25, scale: float = 5.0, world: str = "base") -> Dict[str, Dict[str, float]]:
    """How often the base model draws what a fully descriptive random prompt of its world asks: per attribute, the
    share of the prompts naming it whose samples show it ("value", over "n" prompts) and its "chance" level; both of
    shape and colour; prompt fidelity (the share of named attributes shown, averaged over prompts)."""
    prompts = quality_prompts(n, seed, world)
    images = sample(model, prompts, range(n), steps, scale)
    hits: Dict[str, List[bool]] = {}
    for pred, prompt in zip(metric.predict(images), prompts):
        for k, v in prompt_attributes(prompt).items():
            hits.setdefault(k, []).append(pred[k] == v)
    result = {k: {"value": sum(v) / len(v), "n": len(v), "chance": CHANCE[k]} for k, v in hits.items()}
    result["shape_and_colour"] = {"value": sum(a and b for a, b in zip(hits["shape"], hits["colour"])) / n, "n": n,
                                  "chance": CHANCE["shape"] * CHANCE["colour"]}
    named = [prompt_attributes(p) for p in prompts]
    result["prompt_fidelity"] = {"value": prompt_fidelity(metric, images, prompts), "n": n,
                                 "chance": sum(sum(CHANCE[k] for k in a) / len(a) for a in named) / n}
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
    """Subject fidelity, subject rate, prompt fidelity and prior preservation from `model_samples` of two models, by
    the evaluation protocol's registry (`ldm.evaluation.metrics.METRICS`)."""
    n = len(after["context"])
    context_prompts = [CONTEXT_PROMPTS[i % len(CONTEXT_PROMPTS)] for i in range(n)]

    def value(key: str, **samples: torch.Tensor) -> float:
        return METRICS[key].compute(metric, Samples(references=references, texts=context_prompts, **samples))
    return {
        "subject_fidelity_base": value("subject_fidelity", subject=before["subject"]),
        "subject_fidelity": value("subject_fidelity", subject=after["subject"]),
        "subject_rate_base": value("subject_rate", subject=before["subject"]),
        "subject_rate": value("subject_rate", subject=after["subject"]),
        "prompt_fidelity_base": value("prompt_fidelity", subject=before["context"]),
        "prompt_fidelity": value("prompt_fidelity", subject=after["context"]),
        "class_similarity_to_base": value("prior_preservation", class_tuned=after["class"], class_base=before["class"]),
        "class_subject_rate_base": value("class_subject_rate", class_tuned=before["class"]),
        "class_subject_rate": value("class_subject_rate", class_tuned=after["class"]),
    }


# What the autoencoder keeps: attributes of held-out base-world scenes, and the subject's look in unseen subject images
# (SyntheticScenes' "subject" world; the instance images are its seed 2024, these another seed).
SCENE_ATTRIBUTES = ("shape", "colour", "texture", "size", "position", "background")


@torch.no_grad()
def reconstruct(vae: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """(n, 3, h, w) images in [0, 1] through the autoencoder (posterior mode), clamped to [0, 1]."""
    device = next(vae.parameters()).device
    out = [vae.decode(vae.encode(b.to(device) * 2 - 1).mode()).clamp(-1, 1).cpu() for b in images.split(batch_size)]
    return (torch.cat(out) + 1) / 2


def attribute_accuracy(metric: TinyWorldMetric, images: torch.Tensor, scenes: Sequence[Scene]) -> Dict[str, float]:
    """Share of `images` (in [0, 1]) in which the probe reads each attribute of its scene."""
    preds = metric.predict(images)
    return {k: sum(p[k] == getattr(s, k) for p, s in zip(preds, scenes)) / len(scenes) for k in SCENE_ATTRIBUTES}


def autoencoder_quality(vae: torch.nn.Module, metric: TinyWorldMetric, n: int = 300, seed: int = 31337,
                        subject_n: int = 48, subject_seed: int = 7, world: str = "base") -> Dict[str, Dict[str, float]]:
    """The probe on `n` held-out scenes of `world` and `subject_n` unseen subject images, as drawn ("images") and
    through the autoencoder ("reconstructions"): per-attribute accuracy, subject rate (and the rate at which it sees
    the subject's look in the world's scenes: its false alarms) and subject fidelity to the instance images (the
    reconstructions' values bound what a generator with this autoencoder can reach), and the reconstructions' mean
    absolute error in [0, 1] pixels."""
    scenes = [random_scene(scene_rng(seed, i), world) for i in range(n)]
    images = torch.stack([render_uint8(s) for s in scenes]).float() / 255
    subject = torch.stack([SyntheticScenes(subject_n, 64, subject_seed, world="subject")[i]["image"]
                           for i in range(subject_n)]) / 2 + 0.5
    references = load_references()
    result = {}
    versions = {"images": (images, subject), "reconstructions": (reconstruct(vae, images), reconstruct(vae, subject))}
    for name, (scene_images, subject_images) in versions.items():
        result[name] = {**attribute_accuracy(metric, scene_images, scenes),
                        "subject_rate": metric.subject_rate(subject_images),
                        "scene_subject_rate": metric.subject_rate(scene_images),
                        "subject_fidelity": subject_fidelity(metric, subject_images, references),
                        "mean_abs_error": float((scene_images - images).abs().mean())}
    return result
