"""Caption datasets: a folder of images, each with its own caption, for fine-tuning without the DreamBooth prior (the
diffengine / pokemon-blip-captions case).

Two layouts, as the Hugging Face `imagefolder` and kohya's trainers write them:
  metadata.jsonl   one JSON object per line, {"file_name": "0001.png", "text": "a drawing of a green pokemon"}, the
                   images beside it (file_name relative to the folder); every image of the folder needs a line
  <stem>.txt       the caption of <stem>.png (.jpg, ...) beside each image
Items are DreamBoothDataset's (same decoding, crops, flips, seeding, caching): {"image", "caption", "index", "flipped"}.
"""
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

from ldm.checks import read_text
from ldm.data.dreambooth import IMAGE_EXTENSIONS, DataError, DreamBoothDataset, PathLike

log = logging.getLogger(__name__)

METADATA_FILE = "metadata.jsonl"


def read_metadata(path: Path, caption_key: str = "text") -> Dict[str, str]:
    """file_name -> caption of a metadata.jsonl; errors name the line and what is wrong with it."""
    captions: Dict[str, str] = {}
    for number, line in enumerate(read_text(path, "captions file", DataError).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"'{path}' line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where} is not JSON ({e.msg}): write one object per line, e.g. "
                            f'{{"file_name": "0001.png", "{caption_key}": "a photo of ..."}}') from None
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) \
                or not isinstance(entry.get(caption_key), str):
            raise DataError(f"{where} needs the string fields file_name and {caption_key}, got {line.strip()[:100]}")
        name = entry["file_name"]
        if name in captions:
            raise DataError(f"{where} names '{name}' a second time: give each image one line")
        captions[name] = entry[caption_key].strip()
    return captions


class CaptionDataset(DreamBoothDataset):
    """The images of `data_root` with their captions from metadata.jsonl or <stem>.txt files (see the module
    docstring). No prompt templates: every image must have a non-empty caption, and the first caption is the image
    logger's prompt. `caption_key` names the caption field of metadata.jsonl."""

    def __init__(self, data_root: PathLike, size: int = 512, repeats: int = 1, flip_p: float = 0.5,
                 center_crop: bool = True, seed: Optional[int] = None, cache_images: bool = True,
                 caption_key: str = "text", **unused: Any):
        if unused:
            raise DataError(f"a caption dataset takes each image's caption from its folder, so "
                            f"{', '.join(sorted(unused))} do(es) not apply: drop --class_word, and merge "
                            "configs/stable-diffusion/v1-finetune-captions.yaml after a model config, not after a "
                            "DreamBooth one (v1-finetune-dreambooth.yaml, configs/sd-inject-dreambooth/*)")
        super().__init__(data_root, size=size, repeats=repeats, flip_p=flip_p, center_crop=center_crop, seed=seed,
                         cache_images=cache_images)
        metadata = self.data_root / METADATA_FILE
        if metadata.is_file():
            self.captions = self._metadata_captions(metadata, caption_key)
        self._check_captions(metadata.is_file())
        self.prompts = self.captions[:1]

    def _metadata_captions(self, metadata: Path, caption_key: str) -> List[Optional[str]]:
        """The caption of each image in self.paths from metadata.jsonl, whose lines must all name images here."""
        captions = read_metadata(metadata, caption_key)
        for name in captions:
            path = self.data_root / name
            if not path.is_file():
                raise DataError(f"'{metadata}' names '{name}', which is not a file in '{self.data_root}': fix the "
                                f"file_name or remove the line")
            if path.parent.resolve() != self.data_root.resolve():
                raise DataError(f"'{metadata}' names '{name}' in a subfolder: put the images beside {METADATA_FILE}")
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise DataError(f"'{metadata}' names '{name}', which is not an image file this loader reads "
                                f"({', '.join(IMAGE_EXTENSIONS)})")
        if any(p.with_suffix(".txt").is_file() for p in self.paths):
            log.info("'%s' has %s: its captions are used, not the .txt files", self.data_root, METADATA_FILE)
        return [captions.get(p.name) or None for p in self.paths]

    def _check_captions(self, from_metadata: bool) -> None:
        """Every image needs a caption: an error names the first few without one and how to give them one."""
        missing = [p.name for p, c in zip(self.paths, self.captions) if not c]
        if not missing:
            return
        fix = (f"add a line {{\"file_name\": \"{missing[0]}\", \"text\": \"...\"}} to {METADATA_FILE}" if from_metadata
               else f"write its caption into {Path(missing[0]).stem}.txt beside it, or list every image in "
                    f"{METADATA_FILE}")
        raise DataError(f"{len(missing)} image(s) in '{self.data_root}' have no caption, e.g. "
                        f"{', '.join(missing[:3])}: {fix}, or remove the image")
