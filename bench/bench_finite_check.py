"""The cost of the finiteness check (issue 26) on an SD v1-size checkpoint: a read with and without it.

Every tensor file read or written through ldm/checkpoint.py is checked for NaN and inf (`non_finite`: one
torch.isfinite pass per floating tensor). For the SD v1 keys and shapes (shared/sd-v1-keys.tsv, or a --prefix of them)
as float16 random values in a .safetensors file, this times safetensors' load_file (the read without the check; the
file is in the page cache after the first read, so this is the fastest a read gets) and the check of what it read,
alternating, and prints the medians and their ratio.

    python bench/bench_finite_check.py                                   # every key: a 2.1 GB file in --dir
    python bench/bench_finite_check.py --prefix model.diffusion_model.   # the UNet only (1.7 GB)
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors.torch import load_file, save_file

from bench_unet import device_name, git_commit
from ldm.checkpoint import non_finite

KEYS = Path(__file__).resolve().parents[1] / "shared" / "sd-v1-keys.tsv"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", default=str(KEYS if KEYS.is_file() else KEYS.parents[2] / "shared" / KEYS.name),
                   help="the key list (shared/sd-v1-keys.tsv)")
    p.add_argument("--prefix", default="", help="only the keys starting with this")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where the temporary file goes (default: the system's temp folder)")
    return p.parse_args(argv)


def state_dict(keys: Path, prefix: str) -> Dict[str, torch.Tensor]:
    """Random float16 tensors of the listed shapes (scalars included)."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for line in keys.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, _, shape = line.partition("\t")
        if key.startswith(prefix):
            size = [int(s) for s in shape.split(",") if s.strip()]
            sd[key] = torch.randn(size, generator=g, dtype=torch.float32).half()
    return sd


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: Optional[List[str]] = None) -> None:
    opt = parse_args(argv)
    sd = state_dict(Path(opt.keys), opt.prefix)
    params = sum(v.numel() for v in sd.values())
    with tempfile.TemporaryDirectory(dir=opt.dir) as tmp:
        path = Path(tmp) / "sd.safetensors"
        save_file(sd, str(path))
        del sd
        loaded = load_file(str(path))  # warm the page cache
        reads, checks = [], []
        for _ in range(opt.repeats):
            reads.append(timed(lambda: load_file(str(path))))
            checks.append(timed(lambda: list(non_finite(loaded))))
        size = path.stat().st_size
    read, check = statistics.median(reads), statistics.median(checks)
    print(f"{len(loaded)} tensors, {params:,} float16 params, {size / 2**30:.2f} GiB; {device_name(torch.device('cpu'))}, "
          f"{torch.get_num_threads()} threads, commit {git_commit()}, torch {torch.__version__}")
    print(f"read (load_file, page cache) {read:.2f} s; check (non_finite) {check:.2f} s; check / read = "
          f"{check / read:.2f} (medians of {opt.repeats})")


if __name__ == "__main__":
    main()
