"""Metric backends: feature extractors behind one small interface, registered by name; nothing is downloaded.

A backend is built as `factory(weights: Optional[str], device: torch.device)` and has

    image_features(images) -> (B, D)               images (B, 3, H, W) in [0, 1]; any size (the backend resizes)
    text_image_score(images, prompts) -> (B,)     cosine similarity of each image to its prompt; only when
                                                   `has_text` is True
    subject_rate(images, look=None) -> float       share of images that show the subject (`look`: what the
                                                   classifier must see; None: its default subject); only when
                                                   `has_rate`, with subject_look(folder name) -> look or None

The metrics on them (subject fidelity: DINO, CLIP-I; prompt fidelity: CLIP-T; prior preservation, subject leakage,
subject rate, FID) are the registry of `ldm.evaluation.metrics`.

Preprocessing is the metric model's own: the `preprocessor_config.json` in its weights folder, applied as transformers
5's image processors (torchvision backend) apply it (`ldm.evaluation.preprocess`), so scores are comparable with
numbers computed that way; samples in [0, 1] are first rounded to uint8, as a PNG of them would be. A folder without
that file is preprocessed as the published weights are, with a warning:
- dino (DreamBooth's DINO score, Ruiz et al. 2023: the CLS token of DINO ViT-S/16): facebook/dino-vits16's file
  (ViTImageProcessor): resize to 224x224 (bilinear, antialiased; no crop, the aspect ratio is not kept), ImageNet
  mean/std. The DreamBooth paper does not publish its preprocessing; the DINO repository's own evaluation is another
  protocol (shorter side to 256, bicubic, centre crop 224).
- clip (CLIP-I, CLIP-T): CLIPImageProcessor's defaults: resize the shorter side to 224 (bicubic, antialiased), centre
  crop 224x224, CLIP's mean/std. 224 is the model's `image_size` (336 for the -336 CLIPs) in both.

A new backend is one line in BACKENDS: its name and the dotted path of its class or factory, imported only when the
backend is asked for (so the tiny world's probe, `ldm.tinyworld.metrics`, and transformers load on demand); its
`weights` may be None when it ships its own.
"""
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ldm.checks import ConfigError
from ldm.evaluation.preprocess import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, Preprocess,  # noqa: F401
                                       clip_default, dino_default, folder_preprocess, to_uint8)
from ldm.modules.encoders.clip_tokenizer import CLIPTokenizer
from ldm.util.targets import get_obj_from_str

log = logging.getLogger(__name__)


class EvaluationError(ValueError):
    """Evaluation input that cannot be used: a run, a metric name, images, options."""


class WeightsNotFoundError(EvaluationError):
    """A metric model's local weight file or folder is missing."""


# The backends by name: the dotted path of each factory, imported when the backend is asked for.
BACKENDS: Dict[str, str] = {
    "dino": "ldm.evaluation.backends.DinoBackend",
    "clip": "ldm.evaluation.backends.ClipBackend",
    "tinyworld": "ldm.tinyworld.metrics.tinyworld_backend",
}
# facebook/dino-vits16 (Caron et al. 2021): the architecture of a bare weights file without its config.json
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # transformers' names
DINO_VITS16 = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                   patch_size=16, image_size=224, qkv_bias=True, layer_norm_eps=1e-6)


def backend_names() -> List[str]:
    return sorted(BACKENDS)


def get_backend(name: str, weights: Optional[str] = None, device: Optional[torch.device] = None) -> "MetricBackend":
    """Build the backend `name` of BACKENDS from local `weights`."""
    if name not in BACKENDS:
        raise EvaluationError(f"unknown metric backend '{name}'; known: {', '.join(backend_names())}")
    try:
        factory = get_obj_from_str(BACKENDS[name])
    except ConfigError as e:
        raise EvaluationError(f"metric backend '{name}' cannot be loaded from {BACKENDS[name]}: {e}") from None
    return factory(weights=weights, device=torch.device(device or "cpu"))


class MetricBackend:
    """Base class of the backends: `prepare` gives the wrapped model's pixel_values by its `preprocess`."""
    has_text = False  # text_image_score: prompt fidelity
    has_rate = False  # subject_rate (a classifier that sees the subject): subject rate, and in class samples
    preprocess: Optional[Preprocess] = None

    def prepare(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> preprocessed for the model, on `device`."""
        if self.preprocess is None:
            raise EvaluationError(f"the {type(self).__name__} backend sets no `preprocess` (a Preprocess)")
        return self.preprocess(images).to(device)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def text_image_score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        raise EvaluationError(f"the {type(self).__name__} backend has no text model: it gives no prompt fidelity")

    def subject_look(self, subject: str) -> Optional[dict]:
        """What the classifier must see for the subject whose instance images are in a folder named `subject`; None
        when it does not know that subject (its subject rate is then not measured)."""
        return None

    def subject_rate(self, images: torch.Tensor, look: Optional[dict] = None) -> float:
        raise EvaluationError(f"the {type(self).__name__} backend has no subject classifier: it gives no subject rate")


def require_path(weights: Optional[str], backend: str, what: str) -> Path:
    """The weights path, or an error naming the missing file and how to pass it."""
    if not weights:
        raise WeightsNotFoundError(f"the '{backend}' metric needs local weights ({what}); nothing is downloaded: "
                                   f"pass --metric {backend}=PATH")
    path = Path(weights)
    if not path.exists():
        raise WeightsNotFoundError(f"weights of the '{backend}' metric not found: '{path}' does not exist; put "
                                   f"{what} there, or pass --metric {backend}=PATH with the right place")
    return path


def read_preprocess(path: Path, default: dict, backend: str) -> Preprocess:
    """The preprocessing in the preprocessor_config.json beside the weights (or `default`, with a warning)."""
    try:
        return folder_preprocess(path if path.is_dir() else path.parent, default, backend)
    except ValueError as e:
        raise EvaluationError(f"the '{backend}' metric's preprocessing: {e}") from None


def _pooled(output) -> torch.Tensor:
    """transformers 4 returns the features; 5 an output whose pooler_output holds them."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _check_weights(path: Path, backend: str, default_config: Optional[dict]) -> Optional[dict]:
    """The config beside the weights (None: a folder that from_pretrained reads as it is), or a clear error."""
    folder = path if path.is_dir() else path.parent
    if not (folder / "config.json").is_file() and (path.is_dir() or default_config is None):
        raise WeightsNotFoundError(f"'{folder / 'config.json'}' is missing: the '{backend}' metric needs the model "
                                   "folder with its config.json next to the weights")
    if path.is_dir() and not any((path / f).is_file() for f in WEIGHT_FILES):
        raise WeightsNotFoundError(f"'{path}' holds no {' or '.join(WEIGHT_FILES)} for the '{backend}' metric: put "
                                   "the weights file there")
    if path.is_dir():
        return None
    return json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else default_config


def _load_transformers(cls_name: str, path: Path, backend: str, default_config: Optional[dict] = None, **kw):
    """A transformers model from a local folder (config.json + weights) or a weights file (with config.json beside
    it, or `default_config`); every weight must be in the file."""
    try:
        import transformers
    except ImportError:
        raise EvaluationError(f"the '{backend}' metric needs transformers: pip install transformers") from None
    model_cls, config = getattr(transformers, cls_name), _check_weights(path, backend, default_config)
    with tempfile.TemporaryDirectory() as tmp:
        if config is not None:  # a lone weights file: a folder holding it and its config, for from_pretrained
            os.symlink(path.resolve(), Path(tmp) / WEIGHT_FILES[path.suffix != ".safetensors"])
            (Path(tmp) / "config.json").write_text(json.dumps({**config,
                                                               "model_type": model_cls.config_class.model_type}))
        try:
            model, info = model_cls.from_pretrained(str(path) if config is None else tmp, local_files_only=True,
                                                    output_loading_info=True, **kw)
        except (OSError, RuntimeError, ValueError) as e:  # transformers' errors for files that do not fit
            raise EvaluationError(f"cannot load the '{backend}' weights from '{path}' as {cls_name}: {e}") from None
    missing = [k for k in info.get("missing_keys", []) if "position_ids" not in k and "pooler" not in k]
    if missing:
        raise EvaluationError(f"the '{backend}' weights in '{path}' do not fit {cls_name}: {len(missing)} missing "
                              f"weight(s), e.g. {', '.join(sorted(missing)[:3])}")
    return model.eval()


class DinoBackend(MetricBackend):
    """DINO ViT-S/16 (Caron et al. 2021) CLS features, as DreamBooth's DINO score, via transformers' ViTModel."""

    def __init__(self, weights: Optional[str] = None, device: Optional[torch.device] = None):
        path = require_path(weights, "dino", "a folder holding config.json and model.safetensors (or "
                                             "pytorch_model.bin) of facebook/dino-vits16, or that weights file")
        self.device = torch.device(device or "cpu")
        self.model = _load_transformers("ViTModel", path, "dino", DINO_VITS16, add_pooling_layer=False)
        self.model.to(self.device)
        self.preprocess = read_preprocess(path, dino_default(self.model.config.image_size), "dino")

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.prepare(images, self.device)
        return self.model(pixel_values=x).last_hidden_state[:, 0].float()  # (B, D): the CLS token


class ClipBackend(MetricBackend):
    """CLIP (Radford et al. 2021) image and text embeddings via transformers' CLIPModel: CLIP-I and CLIP-T."""
    has_text = True

    def __init__(self, weights: Optional[str] = None, device: Optional[torch.device] = None):
        path = require_path(weights, "clip", "a folder holding config.json and model.safetensors (or "
                                             "pytorch_model.bin) of a CLIP model, e.g. openai/clip-vit-large-patch14")
        self.device = torch.device(device or "cpu")
        self.model = _load_transformers("CLIPModel", path, "clip").to(self.device)
        self.preprocess = read_preprocess(path, clip_default(self.model.config.vision_config.image_size), "clip")
        context = self.model.config.text_config.max_position_embeddings
        self.tokenizer = CLIPTokenizer(context_length=context)  # the offline BPE vocabulary of SD's text encoder

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.prepare(images, self.device)
        return _pooled(self.model.get_image_features(pixel_values=x)).float()

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(prompts)).to(self.device)
        return _pooled(self.model.get_text_features(input_ids=ids)).float()

    def text_image_score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return F.cosine_similarity(self.image_features(images), self.text_features(prompts), dim=-1)
