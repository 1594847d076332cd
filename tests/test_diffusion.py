"""LatentDiffusion and the samplers: schedule, forward process, loss, guidance, DDIM/PLMS against references."""
import warnings

import pytest
import torch

from conftest import covering, diffusers_sample
from ldm.models.diffusion.ddim import DDIMSampler, make_ddim_timesteps
from ldm.models.diffusion.guidance import guided_eps
from ldm.models.diffusion.plms import PLMSSampler


def test_schedule_matches_diffusers_scaled_linear(tiny_model_readonly):
    from diffusers import DDIMScheduler
    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    torch.testing.assert_close(tiny_model_readonly.alphas_cumprod, ref.float(), atol=1e-6, rtol=0)
    assert tiny_model_readonly.alphas_cumprod[0].item() == pytest.approx(0.99915)
    assert tiny_model_readonly.alphas_cumprod[-1].item() == pytest.approx(0.0047, abs=1e-4)


def test_q_sample_and_p_losses(tiny_model):
    x0, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = torch.tensor([0, 500, 999])
    a = tiny_model.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(tiny_model.q_sample(x0, t, noise), a.sqrt() * x0 + (1 - a).sqrt() * noise)
    # x_0 recovered from x_t and the true noise
    x_t = tiny_model.q_sample(x0, t, noise)
    torch.testing.assert_close(tiny_model.predict_start_from_noise(x_t, t, noise), x0, atol=1e-3, rtol=1e-3)
    cond = tiny_model.get_learned_conditioning(["a", "b", "c"])
    per_sample, loss = tiny_model.p_losses(x0, cond, t, noise)
    assert per_sample.shape == (3,) and loss.ndim == 0
    tiny_model.apply_model = lambda x, t, c: noise  # a perfect noise predictor has zero loss
    assert tiny_model.p_losses(x0, cond, t, noise)[1].item() == 0.0


def test_first_stage_round_trip_shapes(tiny_model_readonly):
    model, x = tiny_model_readonly, torch.rand(2, 3, 32, 32) * 2 - 1
    z = model.get_first_stage_encoding(model.encode_first_stage(x), sample=False)
    assert z.shape == (2, 4, 4, 4)
    torch.testing.assert_close(z, model.scale_factor * model.first_stage_model.encode(x).mode())
    assert model.decode_first_stage(z).shape == (2, 3, 32, 32)


class _Affine:
    """A stand-in model whose eps is a known function of the context, to check the guidance arithmetic."""

    def apply_model(self, x, t, c):
        return x * 0 + c.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def test_guidance_arithmetic():
    x, t = torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long)
    c, uc = torch.full((2, 3, 4), 2.0), torch.full((2, 3, 4), 0.5)
    assert torch.equal(guided_eps(_Affine(), x, t, c, uc, 1.0), torch.full_like(x, 2.0))
    assert torch.equal(guided_eps(_Affine(), x, t, c, None, 7.5), torch.full_like(x, 2.0))
    torch.testing.assert_close(guided_eps(_Affine(), x, t, c, uc, 7.5), torch.full_like(x, 0.5 + 7.5 * 1.5))


def test_ddim_timesteps():
    assert list(make_ddim_timesteps(4, 1000)) == [1, 251, 501, 751]
    # Step counts that do not divide 1000 give exactly that many steps, all inside the schedule.
    for steps in (3, 7, 30, 999):
        ts = make_ddim_timesteps(steps, 1000)
        assert len(ts) == steps and ts[0] == 1 and ts[-1] <= 999
    assert list(make_ddim_timesteps(3, 1000)) == [1, 334, 667]
    assert list(make_ddim_timesteps(1000, 1000)) == list(range(1000))
    with pytest.raises(ValueError, match="sampling steps"):
        make_ddim_timesteps(0, 1000)


def _sample(model, sampler_cls, steps, seed=0, eta=0.0, scale=5.0):
    c = model.get_learned_conditioning(["a red star", "a blue circle"])
    uc = model.get_learned_conditioning(["", ""])
    g = torch.Generator().manual_seed(seed)
    out, _ = sampler_cls(model).sample(steps, 2, (4, 4, 4), c, scale, uc, eta=eta, generator=g, verbose=False)
    return out


@pytest.mark.slow
def test_ddim_matches_diffusers_scheduler(tiny_model):
    """Our DDIM equals diffusers' DDIMScheduler with SD v1's scheduler settings, step for step."""
    from diffusers import DDIMScheduler
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    sched.set_timesteps(10)
    c = tiny_model.get_learned_conditioning(["a red star", "a blue circle"])
    uc = tiny_model.get_learned_conditioning(["", ""])
    x_T, x = diffusers_sample(tiny_model, sched, c, uc)
    ours, _ = DDIMSampler(tiny_model).sample(10, 2, (4, 4, 4), c, 5.0, uc, x_T=x_T, verbose=False)
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sampler_cls,eta", covering([(DDIMSampler, 0.0), (DDIMSampler, 1.0), (PLMSSampler, 0.0)],
                                                     lambda sampler_cls, eta: eta))
def test_samplers_are_seeded_and_repeatable(tiny_model_readonly, sampler_cls, eta):
    a = _sample(tiny_model_readonly, sampler_cls, 6, seed=1, eta=eta)
    assert torch.equal(a, _sample(tiny_model_readonly, sampler_cls, 6, seed=1, eta=eta))
    assert not torch.equal(a, _sample(tiny_model_readonly, sampler_cls, 6, seed=2, eta=eta))


class _GaussianData:
    """Data ~ N(mu, sigma^2): the exact eps predictor and the exact probability-flow ODE solution are known."""

    def __init__(self, alphas_cumprod, mu=0.5, sigma=0.3):
        self.alphas_cumprod = self.betas = alphas_cumprod.double()
        self.num_timesteps, self.mu, self.sigma = len(alphas_cumprod), mu, sigma

    def apply_model(self, x, t, c):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * self.mu) * (1 - a).sqrt() / (a * self.sigma ** 2 + 1 - a)

    def exact(self, x_T, t_start):
        """The ODE maps the standardised value z of x_T at t_start to the same z at t = 0."""
        a_s, a_0 = self.alphas_cumprod[t_start], self.alphas_cumprod[0]
        z = (x_T - a_s.sqrt() * self.mu) / (a_s * self.sigma ** 2 + 1 - a_s).sqrt()
        return a_0.sqrt() * self.mu + (a_0 * self.sigma ** 2 + 1 - a_0).sqrt() * z


@pytest.mark.parametrize("sampler_cls", [DDIMSampler, PLMSSampler])
def test_samplers_solve_the_probability_flow_ode(tiny_model_readonly, sampler_cls):
    """Against the exact solution for Gaussian data: error shrinks with steps; PLMS beats DDIM at equal steps."""
    data = _GaussianData(tiny_model_readonly.alphas_cumprod)
    c = torch.zeros(1, 1, 1)

    def error(cls, steps):
        x_T = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        out, _ = cls(data).sample(steps, 1, (1, 8, 8), c, x_T=x_T, verbose=False)
        return (out - data.exact(x_T, int(make_ddim_timesteps(steps, 1000)[-1]))).abs().max().item()

    assert error(sampler_cls, 50) < error(sampler_cls, 10) / 2
    if sampler_cls is PLMSSampler:
        assert error(PLMSSampler, 10) < error(DDIMSampler, 10) / 2


def test_plms_rejects_eta(tiny_model_readonly):
    with pytest.raises(ValueError, match="eta must be 0"):
        _sample(tiny_model_readonly, PLMSSampler, 5, eta=0.5)


def test_sampler_rejects_unknown_and_warns_on_compvis_only_arguments():
    """A misspelt argument (e.g. the guidance scale under the wrong name) must not be dropped silently."""
    data = _GaussianData(torch.linspace(0.999, 0.01, 1000))
    run = DDIMSampler(data).sample
    args = (2, 1, (1, 2, 2), torch.zeros(1, 1, 1))
    with pytest.raises(TypeError, match="guidance_scale"):
        run(*args, guidance_scale=5.0, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(*args, log_every_t=100, quantize_x0=False, mask=None, verbose=False)  # defaults: silent
    with pytest.warns(UserWarning, match="temperature"):
        run(*args, temperature=0.5, verbose=False)
