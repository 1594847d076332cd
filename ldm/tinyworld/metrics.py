"""Tiny-world metrics with the probe (ldm/tinyworld/probe.py), in the spirit of the DreamBooth metrics.

- subject fidelity (like DINO / CLIP-I): mean cosine similarity of probe features to the instance images
  (`ldm.evaluation.metrics.subject_fidelity` with this backend);
- subject rate: the fraction of images in which the probe sees the subject's look (for the demo subject a checkered
  fill and an outline; other subjects' looks by their folder's name in `SUBJECT_LOOKS`), a direct check a person can
  verify by eye;
- prompt fidelity (like CLIP-T): the fraction of the attributes a prompt names that the probe reads in the image;
- prior preservation: paired feature similarity of class-prompt samples to the base model's samples from the same
  noise, and the rate at which the subject leaks into class samples (language drift).

`TinyWorldMetric` has the metric-backend interface (`image_features`, `text_image_score`; images in [0, 1]).
"""
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ldm.data.synthetic import SUBJECTS
from ldm.tinyworld.probe import ATTRIBUTES, DEFAULT_PROBE, load_probe

# What the probe must read in an image for it to show a subject: probe attribute -> value.
DEMO_LOOK: Dict[str, str] = dict(SUBJECTS["sks-star"].look)  # the demo subject (assets/tiny-world/sks-star)
# The subjects whose looks the probe knows, by the name of their instance-image folder (assets/tiny-world/<name>): the
# evaluation looks a run's subject up here by its data_root's name. A subject not listed gets no subject rate (a
# warning says so) rather than another subject's.
SUBJECT_LOOKS: Dict[str, Dict[str, str]] = {name: dict(s.look) for name, s in SUBJECTS.items()}

_WORDS = {k: set(v) for k, v in ATTRIBUTES.items() if k in ("shape", "texture", "size")}
_POSITION = re.compile(r"\b(?:at the|on the|in the) (left|right|top|bottom|center)\b")
_BACKGROUND = re.compile(r"\bon an? (\w+) background\b")


def prompt_attributes(prompt: str) -> Dict[str, str]:
    """The attributes a tiny-world prompt names: "a small red star on a blue background" -> shape, colour, size, ..."""
    text = prompt.lower()
    found: Dict[str, str] = {}
    background = _BACKGROUND.search(text)
    if background and background.group(1) in ATTRIBUTES["background"]:
        found["background"] = background.group(1)
        text = text[:background.start()] + text[background.end():]
    position = _POSITION.search(text)
    if position:
        found["position"] = position.group(1)
    words = re.findall(r"[a-z]+", text)
    for word in words:
        for attribute, values in _WORDS.items():
            if word in values and attribute not in found:
                found[attribute] = word
        if word in ATTRIBUTES["colour"] and "colour" not in found:
            found["colour"] = word
    return found


class TinyWorldMetric:
    """The probe as a metric backend: `image_features` for subject fidelity, `text_image_score` for prompt fidelity."""

    name = "tinyworld"
    has_text = True
    has_rate = True  # subject_rate: the evaluation protocol's subject rate and subject rate in class samples

    def __init__(self, path: Union[str, Path, None] = DEFAULT_PROBE, device: Optional[torch.device] = None):
        self.probe = load_probe(Path(path or DEFAULT_PROBE))
        self.device = device or torch.device("cpu")
        self.probe.to(self.device)

    @torch.no_grad()
    def _run(self, images: torch.Tensor):
        return self.probe(images.to(self.device).float() * 2 - 1)  # the probe reads [-1, 1]

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(b, 3, h, w) in [0, 1] -> unit-norm (b, 256) features."""
        return F.normalize(self._run(images)[0], dim=-1)

    def predict(self, images: torch.Tensor) -> List[Dict[str, str]]:
        """Each image's attributes as the probe reads them."""
        _, logits = self._run(images)
        idx = {k: v.argmax(-1).tolist() for k, v in logits.items()}
        return [{k: ATTRIBUTES[k][idx[k][i]] for k in ATTRIBUTES} for i in range(len(images))]

    def text_image_score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """(b,) fraction of each prompt's named attributes that the probe reads in its image (1 if none named)."""
        scores = []
        for pred, prompt in zip(self.predict(images), prompts):
            named = prompt_attributes(prompt)
            scores.append(sum(pred[k] == v for k, v in named.items()) / len(named) if named else 1.0)
        return torch.tensor(scores)

    def subject_look(self, subject: str) -> Optional[Dict[str, str]]:
        """The look of the subject whose instance images are in a folder named `subject` (`SUBJECT_LOOKS`), or None
        when the probe does not know it."""
        look = SUBJECT_LOOKS.get(subject)
        return check_look(look) if look is not None else None

    def subject_rate(self, images: torch.Tensor, look: Optional[Dict[str, str]] = None) -> float:
        """Fraction of images showing a subject's `look` (probe attribute -> value; default the demo subject's: a
        checkered fill with an outline)."""
        look = check_look(look or DEMO_LOOK)
        preds = self.predict(images)
        return sum(all(p[k] == v for k, v in look.items()) for p in preds) / max(len(preds), 1)


def check_look(look: Dict[str, str]) -> Dict[str, str]:
    """A look names probe attributes and values the probe can read (a misspelt one would match no image)."""
    wrong = [f"{k}={v}" for k, v in look.items() if v not in ATTRIBUTES.get(k, ())]
    if wrong or not look:
        known = "; ".join(f"{k}: {'/'.join(v)}" for k, v in ATTRIBUTES.items())
        raise ValueError(f"a subject's look must name probe attributes and their values ({known}), got "
                         f"{', '.join(wrong) or 'nothing'}")
    return dict(look)


def tinyworld_backend(weights: Optional[str] = None, device: Optional[torch.device] = None) -> TinyWorldMetric:
    """`scripts/evaluate.py --metric tinyworld`: the shipped probe unless `weights` names another file."""
    return TinyWorldMetric(weights or DEFAULT_PROBE, device)

