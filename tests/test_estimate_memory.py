"""bench/estimate_memory.py at tiny size on the CPU: the emulated CUDA autocast casts as torch's does (and the check
that compares them fails when it does not), the fake-tensor count equals the count on real tensors and the CPU
allocator's peak, and the script writes its rows."""
import importlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import REPO

with pytest.MonkeyPatch.context() as path:  # imported as `python bench/estimate_memory.py` runs: bench/ on the path
    path.syspath_prepend(str(REPO / "bench"))
    em, fake_cuda = (importlib.import_module(m) for m in ("estimate_memory", "fake_cuda"))


def spec(**kw):
    base = dict(variant="adapter", dtype="bf16", checkpointing=False, size="tiny", latent=4, pack=2)
    return SimpleNamespace(**{**base, **kw})


def test_cuda_autocast_policy_casts_like_torch():
    with FakeTensorMode():  # fake tensors: CUDA's flash attention kernel has a shape function, no CPU code
        x = torch.randn(2, 8)
        lin, norm = torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)
        with fake_cuda.CudaAutocast(torch.float16):
            y = lin(x)
            assert y.dtype == torch.float16                       # linear: the autocast dtype
            assert norm(y).dtype == torch.float32                 # layer_norm: fp32 on CUDA (CPU autocast: fp16)
            assert torch.cat([y, x]).dtype == torch.float32       # cat: the widest input
            assert y.softmax(-1).dtype == torch.float32           # softmax: fp32 output
            assert F.gelu(y).dtype == torch.float16               # not on a list: as it comes
            q = torch.randn(1, 2, 16, 8, requires_grad=True)
            out = F.scaled_dot_product_attention(q, q, q)         # flash attention, in fp16
        assert out.dtype == torch.float16
        out.float().sum().backward()
        assert q.grad.shape == q.shape


@pytest.mark.slow
def test_the_emulation_check_passes_and_fails_when_the_policy_is_wrong(monkeypatch):
    s = spec(dtype="fp16")
    em.check_emulation(s, torch.float16)
    assert s.checked_ops > 1000  # the whole forward, VAE encoding of the first step included
    monkeypatch.setattr(fake_cuda, "FP32", fake_cuda.FP32 - {"layer_norm"})
    with pytest.raises(RuntimeError, match="differs from torch's CUDA autocast"):
        em.check_emulation(spec(dtype="fp16"), torch.float16)


@pytest.mark.slow
@pytest.mark.parametrize("s", [spec(dtype="fp32"), spec(variant="lora", dtype="fp32"), spec(dtype="bf16")],
                         ids=["adapter-fp32", "lora-fp32", "adapter-bf16"])
def test_fake_estimate_counts_what_a_real_step_allocates(s):
    est = em.estimate(s, "cpu")
    real = em.real_run(s)
    adds = est["peak"] - est["resident"]
    assert adds == pytest.approx(real["counted"], rel=0.01)  # fake tensors allocate what real ones do
    assert 0.9 < adds / real["allocator"] < 1.1  # the CPU allocator's own peak (profiler memory events)
    # autocast's copies of the (frozen, fp32) weights: none without autocast; with it, part of what the step adds
    assert (est["casts"] > 0) == (s.dtype != "fp32") and est["casts"] < adds


@pytest.mark.slow
def test_rows_and_pack(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# earlier results\n")
    lines = em.main(["--size", "tiny", "--variants", "adapter,pack", "--dtypes", "bf16", "--checkpointing", "off",
                     "--pack", "2", "--append", str(results)])
    text = results.read_text()
    assert text.startswith("# earlier results\n") and "## Estimated CUDA peak memory" in text
    assert len(lines) == 2 and all(line in text for line in lines)
    peaks = [float(line.split("**")[1]) for line in lines]
    trained = [int(line.split(" trained params")[0].rsplit(" ", 1)[1].replace(",", "")) for line in lines]
    assert peaks[1] >= peaks[0] > 0 and trained[1] == 2 * trained[0]  # a pack of 2: two adapter sets, batch 2+2
    assert "yes (12 GB" in lines[0] and "pack of 2" in lines[1] and "| bf16 autocast |" in lines[0]
    assert all("cast copies of weights alive at the peak" in line for line in lines)


def test_bad_options_are_refused():
    for argv, message in ((["--variants", "adapter,ful"], "unknown value"), (["--pack", "0"], "--pack must be"),
                          (["--append", "/no/such/dir/R.md"], "does not exist")):
        with pytest.raises(SystemExit, match=message):
            em.check_args(em.parse_args(argv))
