"""CLIP byte-level BPE tokenizer with OpenAI's vocabulary, padded the SD v1 way (BOS, tokens, EOS, EOS ... to 77).

Reads the merges file that ships inside the `open_clip` package, so nothing is downloaded.
Text cleaning and the split pattern follow OpenAI CLIP (Radford et al. 2021).
"""
import functools
import gzip
import html
import importlib.util
import logging
import os
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

import regex
import torch

log = logging.getLogger(__name__)

BOS_ID = 49406
EOS_ID = 49407
CONTEXT_LENGTH = 77
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# OpenAI CLIP uses only the first 49152 - 256 byte tokens - 2 special tokens merges of the file
NUM_MERGES = 49152 - 256 - 2
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
_SPLIT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)

try:
    import ftfy
except ImportError:  # ftfy only repairs mojibake; clean prompts tokenize the same without it
    ftfy = None


def default_bpe_path() -> str:
    """Path of the CLIP merges file inside the installed `open_clip` package (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the CLIP tokenizer reads {BPE_FILE} from open_clip: `pip install open_clip_torch`")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, BPE_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{BPE_FILE} not found in open_clip at {list(spec.submodule_search_locations)}; "
                            "reinstall it with `pip install --force-reinstall open_clip_torch`")


def bytes_to_unicode() -> Dict[int, str]:
    """Map every byte to a printable character so BPE never sees whitespace or control characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    # the remaining bytes take the code points just above 255; the dict order (printable first) is the vocab order
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


@functools.lru_cache(maxsize=None)
def load_vocab(bpe_path: Optional[str] = None) -> Tuple[Dict[str, int], Dict[Tuple[str, str], int]]:
    """Token-to-id table and merge ranks from the gzipped merges file; cached, so many models share one load."""
    with gzip.open(bpe_path or default_bpe_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]  # line 0 is a version header
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + list(SPECIAL_TOKENS)
    encoder = {token: i for i, token in enumerate(vocab)}
    ranks = {pair: i for i, pair in enumerate(merges)}
    return encoder, ranks


def clean_text(text: str) -> str:
    """OpenAI CLIP cleaning: fix mojibake, unescape HTML, collapse whitespace, lower-case."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))  # twice, as OpenAI does, for doubly escaped captions
    return " ".join(text.split()).lower()


def merge_pair(parts: List[str], pair: Tuple[str, str]) -> List[str]:
    """Replace every left-to-right, non-overlapping occurrence of `pair` in `parts` by its concatenation."""
    merged, i = [], 0
    while i < len(parts):
        if i + 1 < len(parts) and parts[i] == pair[0] and parts[i + 1] == pair[1]:
            merged.append(parts[i] + parts[i + 1])
            i += 2
        else:
            merged.append(parts[i])
            i += 1
    return merged


class CLIPTokenizer:
    """OpenAI CLIP BPE tokenizer: `tok(["a photo"])` gives LongTensor [B, 77] of BOS, ids, EOS, EOS padding."""

    def __init__(self, context_length: int = CONTEXT_LENGTH, bpe_path: Optional[str] = None):
        self.context_length = context_length
        self.encoder, self.ranks = load_vocab(bpe_path)
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.bos_id, self.eos_id = self.encoder[SPECIAL_TOKENS[0]], self.encoder[SPECIAL_TOKENS[1]]
        # words recur a lot across prompts, and BPE on a word is the slow part
        self.cache: Dict[str, List[int]] = {t: [self.encoder[t]] for t in SPECIAL_TOKENS}
        self.warned: Set[str] = set()  # prompts already warned about being cut

    def __deepcopy__(self, memo: dict) -> "CLIPTokenizer":
        # read-only apart from the memo cache: copies of a model (EMA, checkpoint wrappers) can share it
        return self

    def bpe(self, word: str) -> List[int]:
        """Ids of one pre-split word (already byte-encoded), merging the lowest-ranked pair until none is left."""
        if word in self.cache:
            return self.cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]  # </w> marks the end of a word
        while len(parts) > 1:
            pair = min(zip(parts, parts[1:]), key=lambda p: self.ranks.get(p, NUM_MERGES))
            if pair not in self.ranks:
                break
            parts = merge_pair(parts, pair)
        ids = [self.encoder[p] for p in parts]
        self.cache[word] = ids
        return ids

    def encode(self, text: str) -> List[int]:
        """Content token ids of `text`, without BOS/EOS and without truncation."""
        ids = []
        for word in _SPLIT.findall(clean_text(text)):
            ids.extend(self.bpe("".join(self.byte_encoder[b] for b in word.encode("utf-8"))))
        return ids

    def decode(self, ids: Union[Sequence[int], torch.Tensor], skip_special: bool = True) -> str:
        """Text of `ids`; BOS/EOS (and so the EOS padding) are dropped unless `skip_special` is False."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if skip_special:
            ids = [i for i in ids if i not in (self.bos_id, self.eos_id)]
        chars = "".join(self.decoder[i] for i in ids)
        text = bytearray(self.byte_decoder[c] for c in chars).decode("utf-8", errors="replace")
        return text.replace("</w>", " ").strip()

    def pad(self, ids: List[int]) -> List[int]:
        """BOS + ids + EOS, truncated to the context length with EOS last, padded with EOS as SD v1 does."""
        ids = [self.bos_id] + ids[: self.context_length - 2] + [self.eos_id]
        return ids + [self.eos_id] * (self.context_length - len(ids))

    def __call__(self, texts: Union[str, Sequence[str]]) -> torch.LongTensor:
        """Token ids [B, context_length] for a prompt or a list of prompts; a prompt longer than the context is cut,
        with a warning (once per prompt) that says where."""
        if isinstance(texts, str):
            texts = [texts]
        ids = [self.encode(t) for t in texts]
        for text, tokens in zip(texts, ids):
            self.warn_if_cut(text, tokens)
        return torch.tensor([self.pad(t) for t in ids], dtype=torch.long)

    def warn_if_cut(self, text: str, tokens: List[int]) -> None:
        """Warn, once per prompt, when `tokens` do not fit the context (SD v1 reads 75 tokens plus BOS and EOS)."""
        room = self.context_length - 2
        if len(tokens) <= room or text in self.warned:
            return
        self.warned.add(text)
        log.warning("prompt is %d tokens, more than the %d the text encoder reads: everything after '%s' is ignored "
                    "(prompt: '%s')", len(tokens), room, self.decode(tokens[max(0, room - 4):room]),
                    text if len(text) <= 120 else text[:117] + "...")
