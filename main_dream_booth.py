"""DreamBooth with prior preservation that trains only adapters (Xiang et al. 2023), with PyTorch Lightning.

    python main_dream_booth.py --base configs/sd-inject-dreambooth/attn2o-ffni.yaml -t --actual_resume SD.ckpt \
        -n NAME --gpus 0, --data_root DIR --reg_data_root DIR --class_word dog --scale_lr False --logdir logs

Configs are merged in order, then key=value overrides (OmegaConf dot-list), then the flags. Outputs go to a new
<logdir>/<timestamp>_<name>/; `-r` on that folder continues the run to the same final step.
"""
import argparse
import sys
from pathlib import Path
from typing import List, Optional

from ldm.callbacks import TrainingInterrupted
from ldm.checkpoint import CheckpointError, DiskFullError
from ldm.data.dreambooth import DataError
from ldm.models.diffusion.dreambooth import NonFiniteLossError
from ldm.modules.adapters import AdapterConfigError
from ldm.modules.diffusers_layout import LayoutError
from ldm.train import run
from ldm.checks import ConfigError
from ldm.util import setup_logging

USER_ERRORS = (ConfigError, DataError, CheckpointError, AdapterConfigError, LayoutError, NonFiniteLossError,
               DiskFullError)


def str2bool(value: str) -> bool:
    if value.lower() in ("true", "t", "yes", "y", "1"):
        return True
    if value.lower() in ("false", "f", "no", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got '{value}'")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Any KEY=VALUE argument overrides the "
                                "merged config, e.g. model.params.reg_weight=0.5 data.params.batch_size=2; the "
                                "aliases din, dout, method, mid_dim, scale set that field of every UNet block "
                                "adapter, lr and steps the learning rate and training steps")
    p.add_argument("-b", "--base", nargs="*", default=[], metavar="YAML", help="configs, merged left to right")
    p.add_argument("-t", "--train", action="store_true", help="train (without it: set up, check and stop)")
    p.add_argument("--no-test", action="store_true", help="accepted for CompVis compatibility; there is no test stage")
    p.add_argument("-r", "--resume", type=str, help="continue a run: its log dir or a checkpoint in it")
    p.add_argument("--actual_resume", type=str, help="base weights: an SD v1 .ckpt or .safetensors, or a diffusers model folder")
    p.add_argument("-n", "--name", type=str, default="", help="run name, the log dir's suffix")
    p.add_argument("-s", "--seed", type=int, default=23, help="global seed (the paper's default)")
    p.add_argument("-l", "--logdir", type=str, default="logs", help="parent folder of run log dirs")
    p.add_argument("--data_root", type=str, help="folder of subject images")
    p.add_argument("--reg_data_root", type=str,
                   help="folder of class images for prior preservation; missing ones are generated into it")
    p.add_argument("--class_word", type=str, help="the subject's class, e.g. dog")
    p.add_argument("--scale_lr", type=str2bool, nargs="?", const=True, default=False,
                   help="lr = base_learning_rate x batch size x devices x nodes x accumulation (default False)")
    p.add_argument("--max_steps", type=int, help="training steps (overrides lightning.trainer.max_steps)")
    p.add_argument("--allow_any_target", action="store_true",
                   help="let the configs build classes and functions outside ldm, torch.nn, torch.optim and "
                        "Lightning's callbacks (your own code); without it a config cannot run arbitrary code")
    p.add_argument("--gpus", type=str, help="GPU indices as in the paper: '0,' or '0,1' (DDP when several)")
    p.add_argument("--accelerator", type=str, help="Lightning accelerator: cpu, gpu, auto")
    p.add_argument("--devices", type=str, help="Lightning devices: a count, a list like 0,1, or auto")
    p.add_argument("--num_nodes", type=int, help="Lightning: number of nodes")
    p.add_argument("--strategy", type=str, help="Lightning strategy, e.g. ddp")
    p.add_argument("--precision", type=str, help="Lightning precision: 32-true, bf16-mixed, 16-mixed, auto")
    opt, unknown = p.parse_known_args(argv)
    flags = [a for a in unknown if a.startswith("-") or "=" not in a]
    if flags:
        p.error(f"unrecognized arguments: {' '.join(flags)} (config overrides are written KEY=VALUE)")
    # --base takes every following word, so KEY=VALUE overrides written after it are picked out here.
    opt.overrides = [b for b in opt.base if "=" in b] + unknown
    opt.base = [b for b in opt.base if "=" not in b]
    if opt.devices is not None and opt.devices.isdigit():
        opt.devices = int(opt.devices)
    return opt


def main(argv: Optional[List[str]] = None) -> Optional[Path]:
    opt = parse_args(argv)
    try:
        logdir = run(opt)
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")
    except TrainingInterrupted as e:  # Ctrl-C / SIGTERM during training: its step is written
        print(e, file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C outside the training steps (setup, class images)
        print("interrupted by Ctrl-C outside the training steps: run the command again (-r LOGDIR continues a run "
              "that has a checkpoint)", file=sys.stderr)
        sys.exit(130)
    print(f"outputs in {logdir}")
    return logdir


if __name__ == "__main__":
    setup_logging()
    main()
