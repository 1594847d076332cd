"""The evaluation protocol: the metrics of the DreamBooth literature (Ruiz et al. 2023) on any backend, in one registry.

Every caller (scripts/evaluate.py, the training callback, the tiny world's report) draws its samples, puts them in a
`Samples`, and asks `measure` for the registry's metrics; the results table and the ANOVA read the columns, their
direction and their names from `METRICS`. Each entry says what it needs:

| key | column | better | samples | backend must offer |
| --- | --- | --- | --- | --- |
| subject_fidelity | `<backend>_i` | higher | subject prompts, instance images | image features (DINO, CLIP-I) |
| subject_rate | `<backend>_rate` | higher | subject prompts, the subject's name | `subject_rate` (a classifier: the tiny world's probe) |
| prompt_fidelity | `<backend>_t` | higher | subject prompts and their text | `text_image_score` (CLIP-T) |
| prior_preservation | `<backend>_prior` | higher | class prompt, tuned and base model | image features |
| subject_leakage | `<backend>_leak` | lower | class prompt, tuned and base model, instance images | image features |
| class_subject_rate | `<backend>_leak_rate` | lower | class prompt, tuned model, the subject's name | `subject_rate` |
| fid | `fid` | lower | subject prompts, a reference folder | (FID's own Inception) |

"Subject prompts" are the evaluation's prompt templates x seeds; "class prompt" is the prior prompt ("photo of a
{class_word}") x the same seeds, sampled by the fine-tuned model and by the base model from the same noise. Prior
preservation is the pairs' mean feature similarity (1: the class word draws what the base model drew; lower: prior
drift); subject leakage is how much closer to the instance images the class samples moved (the tuned class samples'
subject fidelity minus the base model's: 0 for the base model, positive when the subject leaks into the class word,
DreamBooth's concern). The subject rates ask the backend's classifier for the look of the run's subject by its name
(the instance-image folder's); a subject it does not know gets no subject rate, with a warning, never another
subject's. A new metric is one entry here and its test.
"""
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ldm.data.dreambooth import load_image
from ldm.evaluation.backends import EvaluationError, MetricBackend

log = logging.getLogger(__name__)

SUBJECT, CLASS = "subject", "class"  # the two sample sets of the protocol


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


def subject_leakage(backend: MetricBackend, images: torch.Tensor, base_images: torch.Tensor,
                    references: torch.Tensor) -> float:
    """How much closer to the instance images the class samples came: their subject fidelity minus that of the base
    model's class samples from the same noise (0: no leakage)."""
    if len(images) != len(base_images):
        raise EvaluationError(f"subject leakage pairs samples: got {len(images)} and {len(base_images)}")
    return subject_fidelity(backend, images, references) - subject_fidelity(backend, base_images, references)


def subject_rate(backend: MetricBackend, images: torch.Tensor, subject: Optional[str] = None) -> Optional[float]:
    """Share of `images` in which the backend's classifier sees the subject whose instance images are in the folder
    named `subject` (None: the backend's default subject); None when the backend does not know that subject's look."""
    if subject is None:
        return backend.subject_rate(images)
    look = backend.subject_look(subject)
    return None if look is None else backend.subject_rate(images, look)


def load_images(paths: Sequence, size: int) -> torch.Tensor:
    """Image files as (N, 3, size, size) in [0, 1], centre-cropped and resized by the training data's own loader."""
    if not paths:
        raise EvaluationError("no images to load")
    return torch.stack([(load_image(p, size) + 1) / 2 for p in paths])


# ---- the protocol -----------------------------------------------------------------------------------------------
@dataclass
class Samples:
    """What one evaluation drew: the subject prompts' samples with their text, the instance images, the class
    prompt's samples from the tuned and the base model, and the FID reference folder. Absent parts are None."""
    subject: Optional[torch.Tensor] = None      # (N, 3, H, W) in [0, 1]
    texts: Optional[Sequence[str]] = None       # one per subject sample, without the placeholder token
    references: Optional[torch.Tensor] = None   # the instance images
    class_tuned: Optional[torch.Tensor] = None
    class_base: Optional[torch.Tensor] = None
    fid_reference: Optional[str] = None
    subject_name: Optional[str] = None         # the instance-image folder's name (the subject rates' look); None:
                                               # the backend's default subject


@dataclass(frozen=True)
class Metric:
    """One metric of the protocol: its column (`<backend><suffix>`, or a fixed `column_name`), direction, the backend
    capability it needs ("features", "text", "rate" or "fid"), the `Samples` fields it reads, and how it is
    computed from a backend and the samples."""
    key: str
    title: str
    suffix: str
    higher_is_better: bool
    needs: str
    reads: Tuple[str, ...]
    compute: Callable[[Any, Samples], Optional[float]]  # None: this backend cannot measure it on these samples
    column_name: Optional[str] = None

    @property
    def samples(self) -> str:
        """The sample set it needs drawn: CLASS (the class prompt, tuned and base model) or SUBJECT."""
        return CLASS if "class_tuned" in self.reads else SUBJECT

    def column(self, backend: str = "") -> str:
        return self.column_name or f"{backend}{self.suffix}"

    def applies(self, backend: Any) -> bool:
        """Whether `backend` offers what this metric needs."""
        return {"features": hasattr(backend, "image_features"), "text": bool(getattr(backend, "has_text", False)),
                "rate": bool(getattr(backend, "has_rate", False)), "fid": False}[self.needs]

    def ready(self, samples: Samples) -> bool:
        """Whether `samples` holds everything this metric reads."""
        return all(getattr(samples, f) is not None for f in self.reads)


FEATURES_OF_SUBJECT, CLASS_PAIRS = ("subject", "references"), ("class_tuned", "class_base")
METRICS: Dict[str, Metric] = {m.key: m for m in [
    Metric("subject_fidelity", "subject fidelity", "_i", True, "features", FEATURES_OF_SUBJECT,
           lambda b, s: subject_fidelity(b, s.subject, s.references)),
    Metric("subject_rate", "subject rate", "_rate", True, "rate", ("subject",),
           lambda b, s: subject_rate(b, s.subject, s.subject_name)),
    Metric("prompt_fidelity", "prompt fidelity", "_t", True, "text", ("subject", "texts"),
           lambda b, s: prompt_fidelity(b, s.subject, s.texts)),
    Metric("prior_preservation", "prior preservation", "_prior", True, "features", CLASS_PAIRS,
           lambda b, s: prior_preservation(b, s.class_tuned, s.class_base)),
    Metric("subject_leakage", "subject leakage into class samples", "_leak", False, "features",
           CLASS_PAIRS + ("references",), lambda b, s: subject_leakage(b, s.class_tuned, s.class_base, s.references)),
    Metric("class_subject_rate", "subject rate in class samples", "_leak_rate", False, "rate", ("class_tuned",),
           lambda b, s: subject_rate(b, s.class_tuned, s.subject_name)),
    Metric("fid", "FID", "", False, "fid", ("subject", "fid_reference"), lambda fid, s: fid(s.subject, s.fid_reference),
           column_name="fid"),
]}


def metric_of_column(name: str) -> Optional[Metric]:
    """The metric a results-table column holds (the longest matching suffix after a backend name), or None."""
    fixed = [m for m in METRICS.values() if m.column_name == name]
    if fixed:
        return fixed[0]
    found = [m for m in METRICS.values() if m.suffix and name.endswith(m.suffix) and len(name) > len(m.suffix)]
    return max(found, key=lambda m: len(m.suffix)) if found else None


def check_keys(keys: Sequence[str]) -> List[Metric]:
    """The registry entries of `keys`; an unknown key is an error that lists the known ones."""
    unknown = [k for k in keys if k not in METRICS]
    if unknown:
        raise EvaluationError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
    return [METRICS[k] for k in keys]


def measure(backends: Dict[str, Any], samples: Samples, fid: Optional[Callable] = None,
            keys: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """{column: value} of every registry metric (or those of `keys`) that a backend offers and `samples` allows;
    FID when `fid` (a `FrechetDistance`) is given."""
    out: Dict[str, float] = {}
    for metric in check_keys(list(keys) if keys is not None else list(METRICS)):
        if not metric.ready(samples):
            continue
        if metric.needs == "fid":
            if fid is not None:
                out[metric.column()] = metric.compute(fid, samples)
            continue
        for name, backend in backends.items():
            if metric.applies(backend):
                value = metric.compute(backend, samples)
                if value is None:
                    log.warning("%s not measured: the '%s' backend knows no look for subject '%s' (the name of its "
                                "instance-image folder)",
                                metric.column(name), name, samples.subject_name)
                    continue
                out[metric.column(name)] = value
    return out
