"""The samplers on the neutral `Sampler` base: outputs bit-identical to the samplers before it, capabilities declared
once on the class and read everywhere else, and a new sampler added exactly as docs/architecture.md says (one module,
one registry line, its test): the toy ancestral sampler below is registered in the test alone and runs through
sample.py and the one text-to-image function."""
import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file

import sample
from conftest import REPO, TINY_CONFIG
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.plms import PLMSSampler
from test_diffusion import _GaussianData

REFERENCE = Path(__file__).parent / "data" / "samplers-c33ed4f.safetensors"


class _Conditioned(_GaussianData):
    """Gaussian data whose eps also moves with the conditioning, so guidance shows: float64 elementwise arithmetic
    only, the same on every CPU."""

    def apply_model(self, x, t, c):
        return super().apply_model(x, t, c) + 0.1 * c.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def reference_runs():
    """Latents of every sampler and option, through the sampler API that both the code before the base class (commit
    c33ed4f) and after it have: `write_reference` stores them once from the old code, the test compares the new."""
    model = _Conditioned(torch.linspace(0.9991, 0.0047, 1000))
    g = torch.Generator().manual_seed(0)
    x_T, x0 = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64), torch.randn(1, 1, 4, 4, generator=g,
                                                                                       dtype=torch.float64)
    c, uc = (torch.randn(2, 3, 5, generator=g, dtype=torch.float64) for _ in range(2))
    noise = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    runs = {}
    for name, sampler, steps, eta in [("ddim", DDIMSampler(model), 7, 0.0), ("ddim_eta", DDIMSampler(model), 7, 1.0),
                                      ("plms", PLMSSampler(model), 7, 0.0), ("dpm7", DPMSolverSampler(model), 7, 0.0),
                                      ("dpm12", DPMSolverSampler(model), 12, 0.0),
                                      ("dpm1", DPMSolverSampler(model, order=1), 5, 0.0)]:
        out, inter = sampler.sample(steps, 2, (1, 4, 4), c, 3.0, uc, eta=eta, x_T=x_T,
                                    generator=torch.Generator().manual_seed(1), verbose=False)
        runs[name], runs[f"{name}_pred_x0"] = out, torch.stack(inter["pred_x0"])
    ddim = DDIMSampler(model)
    ddim.make_schedule(8, 0.5)
    z = ddim.stochastic_encode(x0.expand(2, -1, -1, -1), 3, noise=noise)
    runs["img2img"] = ddim.decode(z, c, 4, 3.0, uc, torch.Generator().manual_seed(2), verbose=False)
    return runs


def write_reference():
    """Run once with the old code on the path: PYTHONPATH=<old checkout>:tests python -c 'import test_samplers as t;
    t.write_reference()'."""
    save_file(reference_runs(), str(REFERENCE))


def test_outputs_equal_the_samplers_before_the_base_class():
    """Every sampler, eta, guidance, DPM-Solver++'s orders and lower-order final step, img2img: bit for bit."""
    expected, ours = load_file(str(REFERENCE)), reference_runs()
    assert sorted(ours) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(ours[key], value), key
