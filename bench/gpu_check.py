"""The GPU check: SD v1 speed, memory and numerics, ours vs diffusers, appended to bench/RESULTS.md, in one command.

    python bench/gpu_check.py                   # CUDA, SD v1 at 512 px; fits in 8 minutes on one H100 / H200
    make gpu-check                              # the same
    bash bench/gpu_run.sh                       # on this machine: the wheels and the device-run command line
    python bench/gpu_check.py --device cpu --size tiny --results /tmp/rows.md    # every code path in seconds

Items, in this order, each under its own time budget (a share of --budget); an item that fails or runs out of time
leaves a row that says so, and the run goes on (see bench/gpu_items.py for what each measures):
  numerics    fp16 / bf16 autocast vs fp32: max relative error of the UNet output, ours and diffusers' twin; the
              trained adapter weights and their gradients stay fp32 through an autocast step
  unet        UNet forward (weights cast to fp16 / bf16) and train step (autocast), ours vs diffusers, same weights
  dreambooth  DreamBooth step, batch 1+1, cached latents, bf16 autocast: our attn2o-ffni adapter, full fine-tuning
              and diffusers + PEFT LoRA rank 4; ms / step and peak memory, gradient checkpointing off and on
  packed      a pack of 8 attn2o-ffni runs (batch 1+1 each, one UNet call, one backward, an AdamW each, as
              ldm/train/pack.py trains them) vs one run: ms per run-step (goal: >= 3x the run-steps per second)
  txt2img     512x512, 50 DDIM steps, guidance 7.5, batch 1 and 4: seconds per image, ours (autocast, as sample.py
              runs; and fp16 weights) vs diffusers' StableDiffusionPipeline in fp16
  fastpaths   TF32 for fp32 matmuls, fused AdamW, channels-last: each on vs off
  adam8bit    the adapter step with bitsandbytes' AdamW8bit vs torch's AdamW (a skip row without bitsandbytes)
  compiled    torch.compile: txt2img batch 1 and the adapter step and the LoRA step, each vs eager
Rows: date, device, commit, torch, item, dtype, shape, ours, reference, ratio (ours / reference: below 1 is ours
faster or smaller), notes. Each row is written to --results as soon as it is measured (atomically).
"""
import argparse
import datetime
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

import gpu_items
from bench_unet import device_name, git_commit
from ldm.checkpoint import atomic_write

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "RESULTS.md"
COLUMNS = ("date", "device", "commit", "torch", "item", "dtype", "shape", "ours", "reference", "ratio", "notes")
# Share of the budget per item, in run order: what a GPU session needs most comes first, compile (slow to build) last.
SHARES = {"numerics": 0.07, "unet": 0.10, "dreambooth": 0.24, "packed": 0.06, "txt2img": 0.14, "fastpaths": 0.09,
          "adam8bit": 0.05, "compiled": 0.31}


class OutOfTime(BaseException):
    """An item ran past its budget (a BaseException, so no `except Exception` in the measured code swallows it)."""


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", choices=sorted(gpu_items.SIZES), default="sd",
                   help="sd: SD v1 at 512 px (the GPU check); tiny: the test model at 32 px (checks the code on a CPU)")
    p.add_argument("--items", default=",".join(SHARES), help=f"comma-separated, from {', '.join(SHARES)}")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for all items (the process start and imports "
                                                                "come on top: about 30 s)")
    p.add_argument("--results", default=str(RESULTS), help="Markdown file the rows are appended to")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default); 1 keeps a "
                                                            "small CPU run fast on a busy machine")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled item "
                                                                 "('eager' checks the wiring without code generation)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad options before any work, with the fix."""
    unknown = sorted(set(args.items.split(",")) - set(SHARES) - {""})
    if unknown:
        sys.exit(f"error: unknown item(s) {unknown}: choose from {', '.join(SHARES)}")
    if not (args.budget == args.budget and 1 <= args.budget <= 3600):
        sys.exit(f"error: --budget must be seconds in [1, 3600], got {args.budget}")
    if args.threads < 0:
        sys.exit(f"error: --threads must be >= 0 (0: torch's default), got {args.threads}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no CUDA device: run on a GPU machine, or pass "
                 "--device cpu --size tiny to check the code")
    if os.environ.get("PYTEST_CURRENT_TEST") and Path(args.results).resolve() == RESULTS.resolve():
        sys.exit("error: a test must not write bench/RESULTS.md: pass --results with a temporary file")
    if not Path(args.results).parent.is_dir():
        sys.exit(f"error: the folder of --results '{args.results}' does not exist")


class Check:
    """The run's state: where rows go, the device and size, and the time left."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.device = args, torch.device(args.device)
        self.size = gpu_items.SIZES[args.size]
        self.results = Path(args.results)
        self.rows: List[Dict[str, str]] = []
        self.stamp = dict(date=datetime.date.today().isoformat(), device=device_name(self.device),
                          commit=git_commit(), torch=torch.__version__)
        self.deadline = time.monotonic() + args.budget
        self.item_deadline = self.deadline
        self.before = self.results.read_text() if self.results.exists() else ""
        if self.before and not self.before.endswith("\n"):
            self.before += "\n"

    def left(self) -> float:
        """Seconds left for the current item."""
        return min(self.item_deadline, self.deadline) - time.monotonic()

    def fits(self, seconds: float) -> bool:
        """Whether a sub-measurement expected to take `seconds` fits in the item's time left."""
        return self.left() > seconds

    def row(self, item: str, dtype: str, shape: str, ours: str, reference: str = "", ratio: Optional[float] = None,
            notes: str = "") -> None:
        """Record, print and append one row."""
        r = dict(self.stamp, item=item, dtype=dtype, shape=shape, ours=ours, reference=reference,
                 ratio="" if ratio is None else f"{ratio:.3f}", notes=notes)
        r = {k: str(v).replace("|", "/") for k, v in r.items()}  # a "|" would split the Markdown table's cell
        self.rows.append(r)
        line = "| " + " | ".join(r[c] for c in COLUMNS) + " |"
        print(line, flush=True)
        self._write()

    def _write(self) -> None:
        """The file as it was before the run, then this run's section with every row so far (atomic rewrite)."""
        lines = "".join("| " + " | ".join(r[c] for c in COLUMNS) + " |\n" for r in self.rows)
        atomic_write(str(self.results), lambda tmp: Path(tmp).write_text(self.before + self._header() + lines))

    def _header(self) -> str:
        a = self.args
        return (f"\n## GPU check {self.stamp['date']}: {self.stamp['device']}, commit {self.stamp['commit']}\n\n"
                f"`python bench/gpu_check.py --device {a.device} --size {a.size} --budget {a.budget:g}` "
                f"({', '.join(gpu_items.versions())})\n\n"
                "| " + " | ".join(COLUMNS) + " |\n" + "| " + " | ".join("---" for _ in COLUMNS) + " |\n")


def _alarm(signum, frame):
    raise OutOfTime()


def run_item(check: Check, name: str, fn: Callable[[Check], None], seconds: float) -> None:
    """Run one item under a hard limit of `seconds`; a failure or overrun becomes a row and the run goes on."""
    check.item_deadline = time.monotonic() + seconds
    start = time.monotonic()
    use_alarm = hasattr(signal, "setitimer")
    if use_alarm:
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        fn(check)
    except OutOfTime:
        check.row(name, "", "", "stopped", notes=f"ran out of its {seconds:.0f} s budget; rows above are complete")
    except Exception as e:  # noqa: BLE001: any failure is recorded and the run goes on
        traceback.print_exc()
        check.row(name, "", "", "error", notes=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        gpu_items.release(check.device)
    print(f"[{name}: {time.monotonic() - start:.1f} s]", file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None) -> List[Dict[str, str]]:
    args = parse_args(argv)
    check_args(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        return run_items(Check(args), [i for i in SHARES if i in args.items.split(",")])
    finally:
        torch.set_num_threads(threads)  # main() may run inside another process (a test)


def run_items(check: Check, items: List[str]) -> List[Dict[str, str]]:
    """Every item in turn, each with its share of the time left (time an item does not use passes on)."""
    print("| " + " | ".join(COLUMNS) + " |", flush=True)
    for n, name in enumerate(items):
        left = check.deadline - time.monotonic()
        if left < 1:
            check.row(name, "", "", "skipped", notes="no time left in --budget")
            continue
        share = SHARES[name] / sum(SHARES[i] for i in items[n:])
        run_item(check, name, getattr(gpu_items, name), left * share)
    print(f"rows appended to {check.results}", file=sys.stderr)
    return check.rows


if __name__ == "__main__":
    main()
