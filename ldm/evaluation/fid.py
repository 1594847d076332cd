"""FID (Heusel et al. 2017) as published numbers compute it: torch-fidelity's path.

Features: torch-fidelity's `FeatureExtractorInceptionV3` (the TF-1.x Inception-v3 of the original FID code, weights
`pt_inception-2015-12-05-6726825d.pth`), fed uint8 images (samples in [0, 1] are rounded to 8 bits as a PNG of them
would be) which it resizes to 299x299 with its own TF-1.x-exact bilinear interpolation; the 2048-d pool3 features.
Statistics and distance are torch-fidelity's own functions (`fid_features_to_statistics`, `fid_statistics_to_metric`):
the features' mean and covariance (unbiased, N - 1) in float64, and |mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2)
with the trace of the square root from the eigenvalues of S1 S2. What stays here is what torch-fidelity does not offer
as a function on tensors: featurising samples already in memory in fixed batches, and keeping each reference folder's
statistics. The result equals `torch_fidelity.calculate_metrics(fid=True)` on the same images (tested).
`--fid_features NAME` puts the same distance in a metric backend's feature space instead (not comparable with
published FID).

Repeatable: the reference statistics are computed once per reference folder and image size and kept (keyed by the
folder's file names, sizes and modification times), never accumulated again; each call computes the samples' own
statistics, in fixed-size batches. So the same samples give the same FID in any order of calls, through one shared
object or a new one.
"""
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

from ldm.checkpoint import CheckpointError, load_state_dict
from ldm.data.dreambooth import DataError, list_images, usable_images
from ldm.evaluation.backends import EvaluationError, MetricBackend, WeightsNotFoundError, require_path
from ldm.evaluation.preprocess import to_uint8
from ldm.evaluation.metrics import load_images

log = logging.getLogger(__name__)

FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception weights
FID_LAYER = "2048"  # the pool3 features of FID; torch-fidelity also offers "64", "192", "768" (not FID)
BATCH = 32  # images per feature batch: fixed, so features never depend on how many images there are
Statistics = Tuple[np.ndarray, np.ndarray]


class InceptionFeatures:
    """torch-fidelity's FID Inception-v3: 2048-d pool3 features of images in [0, 1] (rounded to uint8); `layer`
    picks one of torch-fidelity's other feature layers (its `feature_layer_fid`)."""

    def __init__(self, weights: Optional[str], device: Optional[torch.device] = None, layer: str = FID_LAYER):
        path = require_path(weights, "fid", f"torch-fidelity's Inception weights file {FID_WEIGHTS}")
        if not path.is_file():
            raise WeightsNotFoundError(f"'{path}' is not a file: the FID metric needs {FID_WEIGHTS} itself")
        try:  # the project's safe reader (tensors only): torch-fidelity itself would unpickle anything
            state = load_state_dict(str(path))
        except CheckpointError as e:
            raise EvaluationError(f"{e} (expected {FID_WEIGHTS})") from None
        with tempfile.TemporaryDirectory() as tmp:  # torch-fidelity loads from a path: give it the checked tensors
            checked = os.path.join(tmp, FID_WEIGHTS)
            torch.save(state, checked)
            try:
                self.model = FeatureExtractorInceptionV3("inception-v3-compat", [layer],
                                                         feature_extractor_weights_path=checked)
            except RuntimeError as e:  # load_state_dict: missing, unexpected or misshapen weights
                detail = " ".join(str(e).split())[:300]
                raise EvaluationError(f"'{path}' does not hold the FID Inception-v3 weights ({FID_WEIGHTS}): "
                                      f"{detail}") from None
        self.model.to(device or torch.device("cpu"))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = to_uint8(images).to(next(self.model.parameters()).device)
        return self.model(x)[0]  # (B, 2048) for FID


def statistics(features: torch.Tensor) -> Statistics:
    """Mean and covariance (N - 1) of (N, D) features, in float64: torch-fidelity's own function. It keeps the
    features' dtype, so they are made float64 first (as FID's reference code computes)."""
    stats = fid_features_to_statistics(features.detach().cpu().double())
    return stats["mu"], stats["sigma"]


def frechet_distance(a: Statistics, b: Statistics) -> float:
    """|mu_a - mu_b|² + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^1/2): torch-fidelity's own function (the trace of the root
    from the eigenvalues of the product), so the number is its number."""
    (mu_a, s_a), (mu_b, s_b) = a, b
    return fid_statistics_to_metric({"mu": mu_a, "sigma": s_a}, {"mu": mu_b, "sigma": s_b},
                                    verbose=False)[KEY_METRIC_FID]


class FrechetDistance:
    """FID of samples against a reference folder, with the folder's statistics computed once and kept."""

    def __init__(self, features: Callable[[torch.Tensor], torch.Tensor], name: str = "inception"):
        self.features, self.name = features, name
        self.references: Dict[tuple, Statistics] = {}

    def image_statistics(self, images: torch.Tensor) -> Statistics:
        """Statistics of (N, 3, H, W) images in [0, 1], featurised BATCH at a time."""
        return statistics(torch.cat([self.features(images[i:i + BATCH]) for i in range(0, len(images), BATCH)]))

    def reference_statistics(self, folder: str, size: int) -> Statistics:
        """Statistics of the folder's images (centre-cropped and resized to `size` by the training data's loader),
        computed on the first call for this folder, size and set of files."""
        try:
            listed = list_images(folder)
        except DataError as e:
            raise EvaluationError(f"FID reference: {e}") from None
        key = (str(Path(folder).resolve()), size, tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                                          for p in listed))
        if key not in self.references:
            paths = usable_images(folder)
            if len(paths) < 2:
                raise EvaluationError(f"FID needs at least 2 reference images; '{folder}' has {len(paths)}")
            features = [self.features(load_images(paths[i:i + BATCH], size)) for i in range(0, len(paths), BATCH)]
            self.references[key] = statistics(torch.cat(features))
            log.info("FID reference statistics of %d images in %s at %dx%d (%s features)", len(paths), folder, size,
                     size, self.name)
        return self.references[key]

    def __call__(self, images: torch.Tensor, folder: str) -> float:
        """FID of `images` ((N, 3, H, W) in [0, 1]) against the images in `folder`, at the samples' size."""
        if len(images) < 2:
            raise EvaluationError("FID needs at least 2 samples")
        return frechet_distance(self.image_statistics(images), self.reference_statistics(folder, images.shape[-1]))


def fid_metric(weights: Optional[str] = None, features: Optional[MetricBackend] = None,
               device: Optional[torch.device] = None) -> FrechetDistance:
    """FID on torch-fidelity's Inception-v3 from the local `weights` file, or in a backend's feature space."""
    if features is not None:
        return FrechetDistance(features.image_features, type(features).__name__)
    return FrechetDistance(InceptionFeatures(weights, device))
