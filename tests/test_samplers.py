"""The samplers on the neutral `Sampler` base: outputs bit-identical to the samplers before it, capabilities declared
once on the class and read everywhere else, and a new sampler added exactly as docs/architecture.md says (one module,
one registry line, its test): the toy ancestral sampler below is registered in the test alone and runs through
sample.py and the one text-to-image function."""
import ast
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import sample
from conftest import REPO, TINY_CONFIG
from ldm.checkpoint import save_state_dict
from ldm.models.diffusion.ddim import DDIMSampler, make_ddim_timesteps
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.sampler import Sampler
from ldm.models.diffusion.sampling import (SAMPLERS, make_sampler, sampler_class, sampler_names,
                                           seeds_noise, text_to_image, text_to_image_batches)
from ldm.util.images import to_pil
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


# ---- what each sampler says it can do ------------------------------------------------------------------------------
def test_capabilities_are_class_attributes():
    assert [(c.ETA, c.STOCHASTIC, c.IMG2IMG) for c in (DDIMSampler, PLMSSampler, DPMSolverSampler)] == [
        (True, False, True), (False, False, False), (False, False, False)]
    assert [c.max_steps(1000) for c in SAMPLERS.values()] == [1000, 1000, 999]
    assert sampler_class("dpm_solver") is DPMSolverSampler and sampler_names() == ("ddim", "plms", "dpm++2m",
                                                                                   "dpm_solver")
    assert all(issubclass(c, Sampler) for c in SAMPLERS.values())


@pytest.mark.parametrize("cls,steps", [(DDIMSampler, 1001), (PLMSSampler, 1001), (DPMSolverSampler, 1000)])
def test_the_step_range_is_the_classes(tiny_model_readonly, cls, steps):
    cls(tiny_model_readonly).make_schedule(steps - 1)  # the most it can take
    with pytest.raises(ValueError, match=f"number of sampling steps must be in 1..{steps - 1} "):
        cls(tiny_model_readonly).make_schedule(steps)


# ---- a new sampler: one module, one registry line, its test ---------------------------------------------------------
class EulerAncestral(Sampler):
    """Euler ancestral (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models";
    k-diffusion's sample_euler_ancestral) on SD's variance-preserving latents: the toy sampler of the recipe."""

    TITLE = "Euler ancestral"
    STOCHASTIC = True
    ALIASES = ("euler_ancestral",)
    SHORTHAND = "--euler_a"

    def timesteps(self, num_steps):
        return make_ddim_timesteps(num_steps, self.model.num_timesteps)

    def _step(self, x, e_t, index, generator):
        a, a_next = float(self.ddim_alphas[index]), float(self.ddim_alphas_prev[index])
        sigma, sigma_next = ((1 - a) / a) ** 0.5, ((1 - a_next) / a_next) ** 0.5  # x / sqrt(a) = x_0 + sigma * eps
        up = min(sigma_next, (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
        down = (sigma_next ** 2 - up ** 2) ** 0.5
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_next = (x / a ** 0.5 + (down - sigma) * e_t + up * z) * a_next ** 0.5
        return x_next, (x - (1 - a) ** 0.5 * e_t) / a ** 0.5


@pytest.fixture
def euler_a(monkeypatch):
    """The toy sampler registered as the recipe says: one line in SAMPLERS (here for this test only)."""
    monkeypatch.setitem(SAMPLERS, "euler_a", EulerAncestral)
    return "euler_a"


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_model_session, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_state_dict(tiny_model_session.state_dict(), str(path))  # output layers non-zero: eps is not 0
    return path


def test_the_toy_sampler_samples_the_data_distribution(euler_a):
    """On Gaussian data (exact eps): 4096 samples at 1000 steps have the data's mean and standard deviation at t=0;
    and in SD's variance-preserving coordinates Euler ancestral is DDPM's ancestral step, i.e. DDIM with eta 1, on
    the same step noise."""
    data = _GaussianData(torch.linspace(0.9991, 0.0047, 1000))
    x_T = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def run(sampler, steps, eta=0.0):
        return sampler.sample(steps, 1, (1, 64, 64), torch.zeros(1, 1, 1), x_T=x_T, eta=eta, verbose=False,
                              generator=torch.Generator().manual_seed(1))[0]

    out, a0 = run(make_sampler(euler_a, data), 1000), float(data.alphas_cumprod[0])
    assert float(out.mean()) == pytest.approx(a0 ** 0.5 * data.mu, abs=0.02)  # measured: 0.507 vs 0.500
    assert float(out.std()) == pytest.approx((a0 * data.sigma ** 2 + 1 - a0) ** 0.5, abs=0.02)  # 0.293 vs 0.301
    torch.testing.assert_close(run(make_sampler(euler_a, data), 50), run(DDIMSampler(data), 50, eta=1.0))


@pytest.mark.slow
def test_a_new_sampler_runs_through_sample_py_and_text_to_image(euler_a, tiny_model, tiny_ckpt, tmp_path):
    args = ["--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt), "--H", "32", "--W", "32", "--ddim_steps", "4",
            "--n_samples", "2", "--n_iter", "1", "--scale", "3.0", "--no-watermark", "--skip_grid", "--seed", "5",
            "--prompt", "a red star"]

    def run(name, *extra):
        return [np.asarray(Image.open(p)) for p in sample.main(args + ["--outdir", str(tmp_path / name), *extra])]

    generator = torch.Generator().manual_seed(5)
    direct = text_to_image(tiny_model, ["a red star"] * 2, None, sampler=euler_a, steps=4, scale=3.0,
                           generator=generator, height=32, width=32)
    by_name, by_flag, plms = run("a", "--sampler", euler_a), run("b", "--euler_a"), run("c", "--plms")
    assert all(np.array_equal(x, np.asarray(y)) for x, y in zip(by_name + by_flag, to_pil(direct) * 2))
    assert not np.array_equal(by_name[0], run("d")[0])  # not the default sampler
    noise = seeds_noise([1, 2], (4, 4, 4))  # stochastic: the same x_T, other step noise, other images
    draw = [text_to_image(tiny_model, ["a red star"] * 2, noise, sampler="euler_ancestral", steps=4,
                          generator=torch.Generator().manual_seed(seed)) for seed in (0, 0, 1)]
    assert torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2])
    assert not np.array_equal(by_name[0], plms[0])


@pytest.mark.parametrize("extra,message", [
    (["--ddim_eta", "0.5"], "error: euler_a draws fresh noise at every step and takes no eta; drop --ddim_eta"),
    (["--init-img", "{tmp}/init.png"], "error: img2img uses DDIM; drop --sampler euler_a"),
    (["--ddim_steps", "1001"], "error: --ddim_steps 1001 is more than the 1000 steps euler_a can take"),
    (["--plms"], "error: pick one sampler: --sampler euler_a or --plms"),
])
def test_a_new_sampler_is_refused_what_its_class_cannot_do(euler_a, tmp_path, extra, message):
    Image.new("RGB", (32, 32)).save(tmp_path / "init.png")
    args = ["--config", str(TINY_CONFIG), "--random_init", "--H", "32", "--W", "32", "--sampler", euler_a]
    with pytest.raises(SystemExit, match=re.escape(message)):
        sample.main(args + [a.format(tmp=tmp_path) for a in extra] + ["--outdir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="the euler_a sampler draws fresh noise at every step and takes no eta"):
        text_to_image_batches(None, ["a"], sampler=euler_a, eta=0.5)
    assert not (tmp_path / "out").exists()


def test_nothing_but_its_module_and_the_registry_names_a_sampler():
    """The library, the entry points and scripts spell a sampler's name, alias or flag only in the sampler's own
    module and the registry: a caller's default is DEFAULT_SAMPLER, never the default sampler's name as a literal."""
    homes = {name: {Path(cls.__module__.replace(".", "/") + ".py"), Path("ldm/models/diffusion/sampling.py")}
             for name, cls in SAMPLERS.items()}
    spelled = {word: name for name, cls in SAMPLERS.items() for word in (name, *cls.ALIASES, cls.SHORTHAND) if word}
    files = [*(REPO / "ldm").rglob("*.py"), REPO / "sample.py", REPO / "main_dream_booth.py",
             *(REPO / "scripts").glob("*.py")]
    found = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.Constant) or not isinstance(node.value, str):
                continue
            for word, name in spelled.items():
                hit = re.search(rf"(?<![\w+-]){re.escape(word)}(?![\w+-])", node.value)
                if hit and f.relative_to(REPO) not in homes[name]:
                    found.append(f"{f.relative_to(REPO)}:{node.lineno} names {word!r}")
    assert found == []
