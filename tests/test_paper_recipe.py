"""The adapter paper's recipe as an option (configs/stable-diffusion/v1-finetune-dreambooth-paper.yaml): its doubled
AdamW registration of the transformer-block adapters reproduces the paper's optimizer (torch 1.10's per-parameter AdamW
over a list holding those parameters twice) on the first steps: twice the move for transformer adapters, once for
ResBlock adapters; the default recipe moves both once. The fragment states the paper's crop, lr and steps and trains."""
import math

import pytest
import torch
from omegaconf import OmegaConf

import main_dream_booth
from conftest import REPO
from ldm.checks import ConfigError
from ldm.util.instantiate import instantiate_from_config
from test_train import BASES, write_images

PAPER = REPO / "configs" / "stable-diffusion" / "v1-finetune-dreambooth-paper.yaml"
ADAPTERS = {"transformer_adp_config": [{"type": "inout", "din": "attn2o", "dout": "ffni", "mid_dim": 8,
                                        "init": "default"}],
            "resblock_adp_config": {"type": "inout", "din": "resi", "dout": "reso", "mid_dim": 2, "init": "default"}}


def build(paper: bool, **params):
    config = OmegaConf.merge(*[OmegaConf.load(REPO / b) for b in BASES], OmegaConf.load(PAPER) if paper else {})
    config.model.params.unet_config.params.adapter_config = ADAPTERS
    config.model.params.update(params)
    torch.manual_seed(0)
    return instantiate_from_config(config.model)


def adamw_torch_1_10(entries, grads, state, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
    """torch 1.10's AdamW step (torch.optim._functional.adamw): a loop over the parameter list, each entry updated
    from its own state in turn; a parameter listed twice is updated twice."""
    for p in entries:
        g = grads[id(p)]
        s = state.setdefault(id(p), {"step": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p)})
        s["step"] += 1
        p.mul_(1 - lr * weight_decay)
        s["m"].mul_(betas[0]).add_(g, alpha=1 - betas[0])
        s["v"].mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
        denom = (s["v"].sqrt() / math.sqrt(1 - betas[1] ** s["step"])).add_(eps)
        p.addcdiv_(s["m"], denom, value=-lr / (1 - betas[0] ** s["step"]))


def kinds(model):
    """(transformer-block adapter parameters, ResBlock adapter parameters)."""
    from ldm.modules.adapters import adapter_blocks
    found = {"transformer": [], "resblock": []}
    for _, block, kind, _ in adapter_blocks(model.unet):
        found[kind] += list(block.adapters.parameters()) if hasattr(block, "adapters") else []
    return found["transformer"], found["resblock"]


@pytest.mark.parametrize("paper", [True, False])
def test_the_doubled_step_matches_the_paper_optimizer(paper):
    model = build(paper)
    model.learning_rate = 1e-4
    transformer, resblock = kinds(model)
    assert transformer and resblock and {id(p) for p in model.paper_duplicates()} == {id(p) for p in transformer}
    optimizer = model.configure_optimizers()["optimizer"]
    # the paper's list: its walk meets each transformer adapter twice (AdapterForward and its Sequential)
    paper_list = transformer + transformer + resblock if paper else transformer + resblock
    reference = {id(p): p.detach().clone() for p in transformer + resblock}
    start = {k: v.clone() for k, v in reference.items()}
    state, g = {}, torch.Generator().manual_seed(1)
    for step in range(2):  # the second step checks the per-parameter order of the two updates too
        grads = {id(p): torch.randn(p.shape, generator=g) for p in transformer + resblock}
        for p in transformer + resblock:
            p.grad = grads[id(p)].clone()
        optimizer.step()
        copies = {id(p): reference[id(p)] for p in transformer + resblock}
        adamw_torch_1_10([copies[id(p)] for p in paper_list], {id(copies[k]): grads[k] for k in copies}, state,
                         lr=1e-4)
        for p in transformer + resblock:
            torch.testing.assert_close(p.detach(), reference[id(p)], rtol=1e-6, atol=1e-8)  # float32 round-off
        if step == 0:  # the first step: Adam moves each weight by lr (times the sign of its gradient) per update
            move = {name: torch.cat([(p.detach() - start[id(p)]).abs().flatten() for p in ps]).median().item()
                    for name, ps in (("transformer", transformer), ("resblock", resblock))}
            assert move["transformer"] == pytest.approx((2.0 if paper else 1.0) * 1e-4, rel=0.01)
            assert move["resblock"] == pytest.approx(1e-4, rel=0.01)


@pytest.mark.slow
def test_the_fragment_states_the_paper_recipe_and_trains(tmp_path):
    config = OmegaConf.merge(*[OmegaConf.load(REPO / b) for b in BASES], OmegaConf.load(PAPER))
    assert config.model.base_learning_rate == 1e-4 and config.model.params.paper_optimizer is True
    assert config.data.params.train.params.center_crop is False and config.data.params.reg.params.center_crop is False
    assert config.lightning.trainer.max_steps == 3000 and config.data.params.batch_size == 1
    default = OmegaConf.merge(*[OmegaConf.load(REPO / b) for b in BASES])
    assert default.model.params.get("paper_optimizer", False) is False  # off by default
    ckpt = tmp_path / "base.safetensors"
    from conftest import build_tiny
    from ldm.checkpoint import save_state_dict
    save_state_dict(build_tiny().state_dict(), str(ckpt))
    logdir = main_dream_booth.main(["--base", *[str(REPO / b) for b in BASES], str(PAPER), "init=default",
                                    "--actual_resume", str(ckpt), "-n", "paper", "--data_root",
                                    str(write_images(tmp_path / "subject")), "--logdir", str(tmp_path / "logs"),
                                    "--max_steps", "2", "lightning.callbacks.image_logger.params.disabled=true",
                                    "-t"])
    saved = OmegaConf.load(logdir / "config.yaml")
    assert saved.model.params.paper_optimizer is True
    assert saved.model.params.unet_config.params.adapter_config.transformer_adp_config[0].init == "default"
    assert (logdir / "checkpoints" / "1-adapters" / "adapters.safetensors").is_file()


def test_paper_optimizer_refuses_8bit_adam():
    with pytest.raises(ConfigError, match="paper_optimizer reproduces torch's AdamW"):
        build(True, use_8bit_adam=True)


def test_under_a_grad_scaler_the_duplicates_are_unscaled_twice():
    """What the doubled registration also does under fp16 mixed precision (the paper trained with precision 16): the
    grad scaler unscales each entry of the optimizer's list, so a transformer adapter's gradient is divided by the
    loss scale twice; a ResBlock adapter's once. (torch's GradScaler on the CPU: the same unscale code as CUDA's.)"""
    model = build(True)
    transformer, resblock = kinds(model)
    optimizer = model.configure_optimizers()["optimizer"]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.zeros(()))  # the scaler's scale is set by its first use
    for p in transformer + resblock:
        p.grad = torch.full_like(p, 1024.0 * 3.0)  # a scaled gradient of 3
    scaler.unscale_(optimizer)
    assert all(torch.allclose(p.grad, torch.full_like(p, 3.0 / 1024)) for p in transformer)
    assert all(torch.allclose(p.grad, torch.full_like(p, 3.0)) for p in resblock)
