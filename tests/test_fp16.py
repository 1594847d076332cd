"""precision=16-mixed is fp16 autocast + torch.amp.GradScaler on the CPU too (the path of GPUs without bf16), so CI
runs it: the loss is scaled, a step with inf gradients is skipped and the scale backs off, trained weights stay fp32,
and the loss curve follows fp32's. bf16-mixed and 32-true are left as Lightning builds them."""
import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision

import main_dream_booth
from ldm.callbacks import precision_plugins
from test_train import argv, base_ckpt, metrics, write_images  # noqa: F401 (base_ckpt: a fixture)

RECORDS = []  # one dict per step of the last run, written by Probe


class Probe(pl.Callback):
    """Records each step: the autocast dtype of a base UNet linear, the loss scale before and after, the gradients as
    backward left them (scaled) and as the optimiser gets them (unscaled), whether the weights moved. With
    `inf_at_step`, that step's first gradient gets an inf after backward (as an fp16 overflow would leave it)."""

    def __init__(self, inf_at_step: int = -1):
        self.inf_at_step = inf_at_step

    def _trained(self, pl_module):
        return [p for p in pl_module.parameters() if p.requires_grad]

    def _scale(self, trainer):
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return None if scaler is None else scaler.get_scale()

    def on_train_start(self, trainer, pl_module):
        RECORDS.clear()
        linear = pl_module.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.to_q
        self.hook = linear.register_forward_hook(lambda m, i, out: self.dtypes.append(out.dtype))

    def on_train_end(self, trainer, pl_module):
        self.hook.remove()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.dtypes, self.scale_before = [], self._scale(trainer)
        self.before = [p.detach().clone() for p in self._trained(pl_module)]
        state = trainer.optimizers[0].state
        self.adam_steps = [float(state[p]["step"]) if p in state else 0.0 for p in self._trained(pl_module)]

    def on_after_backward(self, trainer, pl_module):
        grads = [p.grad for p in self._trained(pl_module)]
        if trainer.global_step == self.inf_at_step:
            grads[0].view(-1)[0] = math.inf
        self.scaled = [g.clone() for g in grads]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.unscaled = [p.grad.clone() for p in self._trained(pl_module)]

    def on_train_batch_end(self, trainer, pl_module, *args):
        trained = self._trained(pl_module)
        state = trainer.optimizers[0].state
        RECORDS.append(dict(
            autocast=self.dtypes[0], scale_before=self.scale_before, scale_after=self._scale(trainer),
            scaled=self.scaled, unscaled=self.unscaled,
            moved=any(not torch.equal(b, p) for b, p in zip(self.before, trained)),
            adam_steps=[float(state[p]["step"]) if p in state else 0.0 for p in trained], adam_before=self.adam_steps,
            dtypes={p.dtype for p in trained} | {g.dtype for g in self.unscaled}))


@pytest.fixture
def world(tmp_path, base_ckpt):  # noqa: F811
    return {"ckpt": base_ckpt, "data": write_images(tmp_path / "subject"), "reg": tmp_path / "reg",
            "logs": tmp_path / "logs"}


def train(world, precision, steps, *extra):
    """A tiny DreamBooth run with the Probe; its log dir and the losses it logged."""
    logdir = main_dream_booth.main(argv(world, "--max_steps", str(steps), "--precision", precision,
                                        "--allow_any_target", "lightning.callbacks.image_logger.params.disabled=true",
                                        *extra))
    return logdir, [float(r["train/loss"]) for r in metrics(logdir) if r.get("train/loss")]


def probe(inf_at_step=-1):
    return f"lightning.callbacks.probe={{target: test_fp16.Probe, params: {{inf_at_step: {inf_at_step}}}}}"


def adapter_weights(logdir):
    return torch.load(logdir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


# ---- the trainer's precision ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, plugin", [
    ({"precision": "16-mixed", "accelerator": "cpu"}, True),
    ({"precision": "16", "accelerator": "cpu"}, True),
    ({"precision": 16, "accelerator": "cpu"}, True),      # a YAML `precision: 16`
    ({"precision": "16-mixed", "accelerator": "auto"}, not torch.cuda.is_available()),
    ({"precision": "16-mixed", "accelerator": "gpu"}, False),  # Lightning's own fp16 plugin on a GPU
    ({"precision": "bf16-mixed", "accelerator": "cpu"}, False),
    ({"precision": "32-true", "accelerator": "cpu"}, False),
])
def test_only_fp16_on_the_cpu_gets_its_own_plugin(kw, plugin):
    out, plugins = precision_plugins(dict(kw, devices=1))
    if not plugin:
        assert out == dict(kw, devices=1) and plugins == []
        return
    assert out == {"accelerator": kw["accelerator"], "devices": 1}  # Lightning refuses precision and a plugin both
    (p,) = plugins
    assert isinstance(p, MixedPrecision) and p.precision == "16-mixed" and p.device == "cpu"
    assert isinstance(p.scaler, torch.amp.GradScaler) and p.scaler.is_enabled()


@pytest.mark.slow
@pytest.mark.parametrize("precision, autocast, scaled", [("16-mixed", torch.float16, True),
                                                         ("bf16-mixed", torch.bfloat16, False),
                                                         ("32-true", torch.float32, False)])
def test_each_precision_runs_as_named(world, precision, autocast, scaled):
    logdir, losses = train(world, precision, 3, probe())
    assert len(RECORDS) == 3 and all(math.isfinite(v) for v in losses)
    for r in RECORDS:
        assert r["autocast"] == autocast  # a base linear of the UNet, inside the training step
        assert r["dtypes"] == {torch.float32}  # trained weights and their gradients
        assert (r["scale_before"] is not None) == scaled and r["moved"]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in adapter_weights(logdir).values())
    saved = torch.load(logdir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ("scale" in saved.get("MixedPrecision", {})) == scaled  # the scaler's state resumes with the run


# ---- fp16: scaling and skipped steps --------------------------------------------------------------------------
@pytest.mark.slow
def test_fp16_scales_the_loss_and_skips_a_step_with_inf_gradients(world):
    train(world, "16-mixed", 5, probe(inf_at_step=2))
    assert len(RECORDS) == 5  # a skipped step still counts as a step
    assert [r["scale_before"] for r in RECORDS] == [2.0 ** 16] * 3 + [2.0 ** 15] * 2  # GradScaler's initial scale
    skipped = RECORDS.pop(2)
    assert not torch.isfinite(skipped["unscaled"][0]).all()
    assert not skipped["moved"] and skipped["adam_steps"] == skipped["adam_before"]  # weights and AdamW untouched
    assert skipped["scale_after"] == skipped["scale_before"] / 2  # the backoff; training goes on at that scale
    for r in RECORDS:
        # backward saw the scaled loss: every gradient is exactly the scale (a power of 2) times the unscaled one
        assert all(torch.equal(s, u * r["scale_before"]) for s, u in zip(r["scaled"], r["unscaled"]))
        assert r["moved"] and r["adam_steps"] == [s + 1 for s in r["adam_before"]]
        assert r["scale_after"] == r["scale_before"]


# ---- fp16 follows fp32 ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fp16_loss_curve_follows_fp32(world):
    """30 steps at lr 1e-2 (so that training moves the loss): fp16's losses stay within 5e-3 (relative, measured
    max 1.3e-3) of fp32's at every step, and their distance from fp32 is under a tenth of how far training moved
    fp32 from an untrained run (lr 1e-9) with the same noise and data order; likewise the adapter weights."""
    runs = {name: train(world, precision, 30, f"model.base_learning_rate={lr}")
            for name, precision, lr in (("fp16", "16-mixed", 1e-2), ("fp32", "32-true", 1e-2),
                                        ("untrained", "32-true", 1e-9))}
    loss = {k: torch.tensor(v[1]) for k, v in runs.items()}
    assert all(len(v) == 30 for v in loss.values())
    assert ((loss["fp16"] - loss["fp32"]).abs() / loss["fp32"]).max() < 5e-3
    assert (loss["fp16"] - loss["fp32"]).abs().mean() < 0.1 * (loss["fp32"] - loss["untrained"]).abs().mean()
    w = {k: adapter_weights(v[0]) for k, v in runs.items()}

    def distance(a, b):
        return math.sqrt(sum(((w[a][k] - w[b][k]) ** 2).sum().item() for k in w[b]))
    assert distance("fp16", "fp32") < 0.1 * distance("fp32", "untrained")
