"""FID: equal to torch-fidelity's own result on the same image files (random Inception weights in the weights file's
format, loaded by both), repeatable and independent of the order of calls through one shared object and after a
restart, reference statistics computed once per folder, and clear errors for missing or wrong weights."""
import numpy as np
import pytest
import torch
from PIL import Image

from ldm.evaluation.backends import EvaluationError, MetricBackend, WeightsNotFoundError, to_uint8
from ldm.evaluation.fid import (FID_LAYER, FID_WEIGHTS, FrechetDistance, InceptionFeatures, fid_metric,
                                frechet_distance, statistics)
from ldm.evaluation.metrics import Samples, load_images, measure
from scripts import evaluate as evaluate_script

torch_fidelity = pytest.importorskip("torch_fidelity")


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """torch-fidelity's Inception-v3 with random weights (He-initialised convolutions, random batch-norm statistics,
    so features neither vanish nor explode), saved as the real weights file is: torch.save of the state dict."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    folder = tmp_path_factory.mktemp("inception")
    torch.save({}, folder / "empty.pth")
    load = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, *args, **kwargs: None  # keep the random init
    try:
        torch.manual_seed(0)
        model = FeatureExtractorInceptionV3("random", ["2048"], feature_extractor_weights_path=folder / "empty.pth")
    finally:
        FeatureExtractorInceptionV3.load_state_dict = load
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.1, 0.1)
    path = folder / FID_WEIGHTS
    torch.save(model.state_dict(), path)
    return path


def write_pngs(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(to_uint8(images)):
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    return folder


def pictures(n, seed, size=40, scale=1.0):
    """Random images with some structure: a colour gradient plus noise, different per seed and scale."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size).view(1, 1, 1, size)
    colour = torch.rand(n, 3, 1, 1, generator=g)
    return (colour * ramp * scale + 0.3 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)


@pytest.mark.slow
@pytest.mark.parametrize("layer", ["64", FID_LAYER])
def test_fid_equals_torch_fidelity_on_the_same_files(tmp_path, inception_weights, layer):
    """Our FID of samples against a folder equals torch_fidelity.calculate_metrics on the PNGs of those samples and
    that folder: the same extractor and resize (40x40 -> 299, TF-1.x bilinear), statistics and distance. The 64-d
    layer checks the whole path in seconds; FID's own 2048-d layer takes half a minute on 2 CPU cores (eigenvalues of
    a 2048x2048 product, in both libraries)."""
    reference = write_pngs(tmp_path / "reference", pictures(6, 1))
    samples = load_images(sorted(write_pngs(tmp_path / "samples", pictures(6, 2, scale=0.5)).iterdir()), 40)
    ours = FrechetDistance(InceptionFeatures(str(inception_weights), layer=layer))
    value = ours(samples, str(reference))
    theirs = torch_fidelity.calculate_metrics(input1=str(tmp_path / "samples"), input2=str(reference), fid=True,
                                              feature_layer_fid=layer, cuda=False, cache=False, verbose=False,
                                              batch_size=6, save_cpu_ram=True,
                                              feature_extractor_weights_path=str(inception_weights))
    expected = theirs["frechet_inception_distance"]
    assert expected > 1e-3  # the sets differ: a real distance, not round-off
    assert value == pytest.approx(expected, rel=1e-6)
    assert ours.features.model.features_list == [layer]
    assert fid_metric(str(inception_weights)).features.model.features_list == [FID_LAYER]  # what FID uses


class Counting:
    """Features by hand (channel means and a coarse pooling), counting the images they are asked for."""

    def __init__(self):
        self.images = 0

    def __call__(self, images):
        self.images += len(images)
        return torch.cat([images.mean(dim=(2, 3)), torch.nn.functional.avg_pool2d(images, 8).flatten(1)], dim=1)


def test_fid_is_repeatable_order_independent_and_caches_the_reference(tmp_path):
    reference = write_pngs(tmp_path / "reference", pictures(20, 1, size=16))
    a, b = pictures(12, 2, size=16, scale=0.5), pictures(12, 3, size=16)
    features = Counting()
    shared = FrechetDistance(features)
    first = [shared(a, str(reference)), shared(b, str(reference)), shared(a, str(reference))]
    assert first[0] == first[2] and first[0] != first[1]
    assert features.images == 20 + 3 * 12  # the reference was featurised once, not once per call
    restarted = FrechetDistance(Counting())  # a new process: the same numbers, in the other order
    assert [restarted(b, str(reference)), restarted(a, str(reference))] == [first[1], first[0]]
    assert shared(a[torch.randperm(12)], str(reference)) == pytest.approx(first[0], rel=1e-6)  # sample order
    # three identical runs through one shared metric object in evaluation give one number (they drifted before)
    samples = Samples(subject=a, references=a, fid_reference=str(reference))
    assert [measure({}, samples, shared)["fid"] for _ in range(3)] == [first[0]] * 3
    # a changed reference folder is read again
    Image.new("RGB", (16, 16), (255, 0, 0)).save(reference / "new.png")
    assert shared(a, str(reference)) != first[0] and features.images == 20 + 8 * 12 + 21  # 21: the new folder, once


def test_fid_in_a_backends_feature_space(tmp_path):
    """--fid_features NAME: the same distance on a metric backend's image features."""
    class Pooled(MetricBackend):
        def __init__(self):
            pass

        def image_features(self, images):
            return torch.nn.functional.avg_pool2d(images, 4).flatten(1)  # (B, 48)

    x = pictures(24, 4, size=16)
    reference = write_pngs(tmp_path / "reference", x)
    metric = fid_metric(features=Pooled())
    same = metric(load_images(sorted(reference.iterdir()), 16), str(reference))
    assert same == pytest.approx(0.0, abs=1e-6)
    assert metric(x * 0.3, str(reference)) > 1.0


def test_frechet_distance_by_hand():
    """Diagonal covariances: FID = |mu_a - mu_b|² + sum (sqrt(var_a) - sqrt(var_b))²."""
    a = (np.array([0.0, 1.0]), np.diag([4.0, 1.0]))
    b = (np.array([3.0, 1.0]), np.diag([1.0, 9.0]))
    assert frechet_distance(a, b) == pytest.approx(9 + (2 - 1) ** 2 + (1 - 3) ** 2)
    x = torch.randn(50, 5, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(statistics(x), statistics(x)) == pytest.approx(0.0, abs=1e-9)
    mu, sigma = statistics(x)
    np.testing.assert_allclose(sigma, np.cov(x.double().numpy(), rowvar=False))
    assert mu.dtype == sigma.dtype == np.float64


def previous_fid(x: torch.Tensor, y: torch.Tensor) -> float:
    """The statistics and distance fid.py computed by hand before it called torch-fidelity's functions."""
    a, b = (z.detach().cpu().double().numpy() for z in (x, y))
    (mu_a, s_a), (mu_b, s_b) = (a.mean(axis=0), np.cov(a, rowvar=False)), (b.mean(axis=0), np.cov(b, rowvar=False))
    diff = mu_a - mu_b
    root_trace = np.sqrt(np.linalg.eigvals(s_a @ s_b).astype(complex)).real.sum()
    return float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2 * root_trace)


@pytest.mark.parametrize("n,d,dtype", [(40, 8, torch.float32), (12, 30, torch.float32), (64, 64, torch.float64)])
def test_fid_through_torch_fidelity_equals_the_previous_numbers(n, d, dtype):
    """torch-fidelity's statistics and distance give exactly the numbers of the hand-written code they replace, on
    float32 and float64 features, more samples than dimensions and fewer (a singular covariance)."""
    g = torch.Generator().manual_seed(n + d)
    x, y = torch.randn(n, d, generator=g, dtype=dtype), 0.7 * torch.randn(n, d, generator=g, dtype=dtype) + 0.2
    assert frechet_distance(statistics(x), statistics(y)) == previous_fid(x, y)


@pytest.mark.slow
def test_fid_errors(tmp_path, inception_weights, capsys):
    with pytest.raises(WeightsNotFoundError, match=FID_WEIGHTS):
        fid_metric(str(tmp_path / "inception.pth"))
    with pytest.raises(WeightsNotFoundError, match="needs local weights"):
        fid_metric(None)
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(EvaluationError, match="does not hold the FID Inception-v3 weights"):
        fid_metric(str(tmp_path / "other.pth"))
    (tmp_path / "broken.pth").write_bytes(b"not a torch file")
    with pytest.raises(EvaluationError, match=f"cannot read .*broken.pth.* not a checkpoint .*expected {FID_WEIGHTS}"):
        fid_metric(str(tmp_path / "broken.pth"))
    shared = FrechetDistance(Counting())
    with pytest.raises(EvaluationError, match="at least 2 samples"):
        shared(pictures(1, 0, size=16), str(tmp_path))
    with pytest.raises(EvaluationError, match="FID reference: image folder .* holds no image files"):
        shared(pictures(2, 0, size=16), str(tmp_path))
    with pytest.raises(SystemExit, match="--fid_weights and --fid_features need --fid DIR"):
        evaluate_script.main([str(tmp_path), "--metric", "dino=x", "--fid_weights", str(inception_weights)])
    with pytest.raises(SystemExit, match="error: --fid: image folder .* does not exist"):
        evaluate_script.main([str(tmp_path), "--fid", str(tmp_path / "nowhere"), "--fid_weights",
                              str(inception_weights)])
