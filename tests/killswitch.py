"""A callback that kills its own training process with SIGKILL at a chosen step and write, for tests/test_run_faults.py,
and one that sends its process a real signal (SIGINT, SIGTERM) while a step is in progress or fills the disk at a
chosen write, for tests/test_safety.py (a small module: the killed processes import it)."""
import errno
import os
import signal
from pathlib import Path

import pytorch_lightning as pl
import torch

from ldm.modules.adapters import io as adapter_io


class KillSwitch(pl.Callback):
    """Kills its own process with SIGKILL when step `step` is reached: `where` "step" right after the step, "adapters"
    inside that step's adapter-directory write (weights written, not yet renamed into place), "ckpt-empty" and
    "ckpt-half" inside that step's last.ckpt write (nothing, or half of it, written to the temporary file)."""

    def __init__(self, step: int, where: str):
        self.step, self.where, self.armed = step, where, False
        if where == "adapters":
            save = adapter_io.save_state_dict

            def save_then_die(sd, path, *args, **kwargs):
                save(sd, path, *args, **kwargs)
                self._die()
            adapter_io.save_state_dict = save_then_die
        elif where.startswith("ckpt"):
            save = torch.save

            def save_and_die(obj, f, *args, **kwargs):
                if not (self.armed and str(f).endswith("last.ckpt")):
                    return save(obj, f, *args, **kwargs)
                if where == "ckpt-half":
                    save(obj, f, *args, **kwargs)
                    Path(f).write_bytes(Path(f).read_bytes()[: Path(f).stat().st_size // 2])
                self._die()
            torch.save = save_and_die

    def _die(self):
        if self.armed:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_start(self, trainer, *args):
        self.armed = trainer.global_step + 1 == self.step  # the writes of step `step` happen at its batch end

    def on_train_batch_end(self, trainer, *args):
        if self.where == "step" and trainer.global_step == self.step:
            self._die()


class SendSignal(pl.Callback):
    """Sends its own process the signal `sig` ("SIGINT", "SIGTERM") `times` times at the start of step `step`
    (counted from 1), so the signal arrives while that step is in progress, as a Ctrl-C would."""

    def __init__(self, step: int, sig: str = "SIGINT", times: int = 1):
        self.step, self.signum, self.times = step, getattr(signal, sig), times

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step + 1 == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


class FillDisk(pl.Callback):
    """The disk fills up inside a write of step `step`: `where` "ckpt" (torch.save of last.ckpt: half written, then
    ENOSPC), "adapters" (safetensors' own error for an adapter file, as it reports ENOSPC), "image" (a sample grid PNG:
    PIL's OSError), "csv" (the CSV logger appending its rows: an OSError outside our writes)."""

    def __init__(self, step: int, where: str):
        self.step, self.where, self.armed = step, where, False
        full = OSError(errno.ENOSPC, "No space left on device")
        if where == "ckpt":
            save = torch.save

            def save_half(obj, f, *args, **kwargs):
                if not (self.armed and str(f).endswith("last.ckpt")):
                    return save(obj, f, *args, **kwargs)
                save(obj, f, *args, **kwargs)
                Path(f).write_bytes(Path(f).read_bytes()[: Path(f).stat().st_size // 2])
                raise full
            torch.save = save_half
        elif where == "adapters":
            from ldm import checkpoint
            save_file = checkpoint.save_file

            def save_fails(sd, path, *args, **kwargs):
                if not self.armed:
                    return save_file(sd, path, *args, **kwargs)
                Path(path).write_bytes(b"\0" * 100)
                raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
            checkpoint.save_file = save_fails
        elif where == "image":
            from PIL import Image
            save_image = Image.Image.save

            def save_image_fails(im, fp, *args, **kwargs):
                if not self.armed:
                    return save_image(im, fp, *args, **kwargs)
                Path(fp).write_bytes(b"\x89PNG")
                raise full
            Image.Image.save = save_image_fails
        elif where == "csv":
            from lightning_fabric.loggers.csv_logs import _ExperimentWriter
            save_rows = _ExperimentWriter.save

            def save_rows_fails(writer):
                if not self.armed:
                    return save_rows(writer)
                raise full
            _ExperimentWriter.save = save_rows_fails

    def on_train_batch_start(self, trainer, *args):
        self.armed = trainer.global_step + 1 == self.step  # the writes of step `step` happen at its batch end
