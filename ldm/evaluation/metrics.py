"""The metrics of the DreamBooth literature (Ruiz et al. 2023) on any backend: subject fidelity (DINO, CLIP-I), prompt
fidelity (CLIP-T), and optionally FID (Heusel et al. 2017) with torchmetrics."""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ldm.data.dreambooth import load_image
from ldm.evaluation.backends import EvaluationError, MetricBackend, WeightsNotFoundError, require_path

FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception weights


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


class _Features(torch.nn.Module):
    """A backend's image_features as the feature module torchmetrics' FID takes."""

    def __init__(self, backend: MetricBackend):
        super().__init__()
        self.backend = backend

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backend.image_features(images)


def fid_metric(weights: Optional[str] = None, features: Optional[MetricBackend] = None):
    """torchmetrics' FrechetInceptionDistance: on Inception-v3 from the local `weights` file (needs torch-fidelity),
    or on a backend's image features (the Frechet distance in that feature space)."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        raise EvaluationError("FID needs torchmetrics: pip install torchmetrics") from None
    if features is not None:
        return FrechetInceptionDistance(feature=_Features(features), reset_real_features=False)
    path = require_path(weights, "fid", f"torch-fidelity's Inception weights file {FID_WEIGHTS}")
    if not path.is_file():
        raise WeightsNotFoundError(f"'{path}' is not a file: the FID metric needs {FID_WEIGHTS} itself")
    try:
        return FrechetInceptionDistance(feature=2048, normalize=True, reset_real_features=False,
                                        feature_extractor_weights_path=str(path))
    except ModuleNotFoundError as e:
        raise EvaluationError(f"FID on Inception-v3 needs torch-fidelity: pip install torch-fidelity ({e})") from None


def frechet_distance(metric, images: torch.Tensor, references: torch.Tensor) -> float:
    """FID of `images` against `references` (both (B, 3, H, W) in [0, 1]) with a metric from `fid_metric`."""
    if len(images) < 2 or len(references) < 2:
        raise EvaluationError("FID needs at least 2 samples and 2 reference images")
    metric.reset()
    metric.update(references.float(), real=True)
    metric.update(images.float(), real=False)
    return float(metric.compute())


def load_images(paths: Sequence, size: int) -> torch.Tensor:
    """Image files as (N, 3, size, size) in [0, 1], centre-cropped and resized by the training data's own loader."""
    if not paths:
        raise EvaluationError("no images to load")
    return torch.stack([(load_image(p, size) + 1) / 2 for p in paths])
