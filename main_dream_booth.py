"""DreamBooth with prior preservation that trains only adapters (Xiang et al. 2023), with PyTorch Lightning.

    python main_dream_booth.py --base configs/sd-inject-dreambooth/attn2o-ffni.yaml -t --actual_resume SD.ckpt \
        -n NAME --gpus 0, --data_root DIR --reg_data_root DIR --class_word dog --scale_lr False --logdir logs

Configs are merged in order, then key=value overrides (OmegaConf dot-list), then the flags. Outputs go to a new
<logdir>/<timestamp>_<name>/; `-r` on that folder continues the run to the same final step. The command line is
`ldm.train`'s (`python -m ldm.train` is the same); its flags are the fields of `ldm.train.RunRequest`.
"""
from pathlib import Path
from typing import List, Optional, Sequence, Union

from ldm.train import RunRequest, main as train_main, parse_args as parse_runs
from ldm.util.logs import setup_logging

PROG = "main_dream_booth.py"


def parse_args(argv: Optional[Sequence[str]] = None) -> RunRequest:
    """One run's command line as a RunRequest (several runs: `ldm.train.parse_args`)."""
    requests = parse_runs(argv, PROG)
    if len(requests) != 1:
        raise SystemExit(f"{PROG}: error: parse_args takes one run's command line, got {len(requests)}")
    return requests[0]


def main(argv: Optional[Sequence[str]] = None) -> Union[Path, List[Path]]:
    """Train; returns the run's log dir (a list of them for several runs separated by --next)."""
    logdirs = train_main(argv, PROG)
    for logdir in logdirs:
        print(f"outputs in {logdir}")
    return logdirs[0] if len(logdirs) == 1 else logdirs


if __name__ == "__main__":
    setup_logging()
    main()
