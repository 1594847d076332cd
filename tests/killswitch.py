"""A callback that kills its own training process with SIGKILL at a chosen step and write, for tests/test_run_faults.py
(a small module: the killed processes import it)."""
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
