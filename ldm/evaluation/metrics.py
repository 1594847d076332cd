"""The metrics of the DreamBooth literature (Ruiz et al. 2023) on any backend: subject fidelity (DINO, CLIP-I), prompt
fidelity (CLIP-T) and prior preservation; FID is in `ldm.evaluation.fid`."""
from typing import Sequence

import torch
import torch.nn.functional as F

from ldm.data.dreambooth import load_image
from ldm.evaluation.backends import EvaluationError, MetricBackend


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(A, D), (B, D) -> (A, B) cosine similarities."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def subject_fidelity(backend: MetricBackend, images: torch.Tensor, references: torch.Tensor) -> float:
    """Mean cosine similarity of every sample's features to every instance image's (1.0 for identical images)."""
    if len(images) == 0 or len(references) == 0:
        raise EvaluationError("subject fidelity needs at least one sample and one instance image")
    return cosine_matrix(backend.image_features(images), backend.image_features(references)).mean().item()


def prompt_fidelity(backend: MetricBackend, images: torch.Tensor, prompts: Sequence[str]) -> float:
    """Mean cosine similarity of each sample to its prompt in the backend's joint space (CLIP-T)."""
    if len(images) != len(prompts):
        raise EvaluationError(f"prompt fidelity needs one prompt per image, got {len(prompts)} for {len(images)}")
    return backend.text_image_score(images, prompts).float().mean().item()


def prior_preservation(backend: MetricBackend, images: torch.Tensor, base_images: torch.Tensor) -> float:
    """Mean cosine similarity of sample i to the base model's sample i from the same noise and prompt (1.0: the
    fine-tuned model draws the class exactly as the base did; lower: language drift)."""
    if len(images) != len(base_images) or len(images) == 0:
        raise EvaluationError(f"prior preservation pairs samples: got {len(images)} and {len(base_images)}")
    a, b = backend.image_features(images), backend.image_features(base_images)
    return F.cosine_similarity(a.float(), b.float(), dim=-1).mean().item()


def load_images(paths: Sequence, size: int) -> torch.Tensor:
    """Image files as (N, 3, size, size) in [0, 1], centre-cropped and resized by the training data's own loader."""
    if not paths:
        raise EvaluationError("no images to load")
    return torch.stack([(load_image(p, size) + 1) / 2 for p in paths])
