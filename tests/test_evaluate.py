"""Evaluation: metric backends on tiny random models built from configs (nothing downloaded), metric functions on
known inputs, fixed-seed sampling, the atomic results table, evaluating a trained run and a sweep, the subject-fidelity
callback during training, the registration hook, and missing weight files."""
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import main_dream_booth
from conftest import REPO, build_tiny
from ldm.checkpoint import save_state_dict
from ldm.evaluation import backends
from ldm.evaluation.backends import (EvaluationError, MetricBackend, WeightsNotFoundError, backend_names,
                                     get_backend)
from ldm.evaluation.fid import fid_metric
from ldm.evaluation.metrics import (METRICS, Metric, Samples, cosine_matrix, measure, metric_of_column,
                                    prior_preservation, prompt_fidelity, subject_fidelity, subject_leakage)
from ldm.evaluation.sampling import prompt_seed_pairs, sample_images
from ldm.evaluation.table import read_rows, upsert_row
from scripts import evaluate as evaluate_script
from test_train import BASES, write_images

transformers = pytest.importorskip("transformers")


# ---- tiny metric models, saved as a user would have them ----------------------------------------------------------
class MeanColour(MetricBackend):
    """Features you can compute by hand: the mean of each channel."""
    has_text = True

    def __init__(self, weights=None, device=None):
        pass

    def image_features(self, images):
        return images.mean(dim=(2, 3))

    def text_image_score(self, images, prompts):
        colours = {"red": torch.tensor([1.0, 0, 0]), "green": torch.tensor([0, 1.0, 0])}
        return cosine_matrix(self.image_features(images), torch.stack([colours[p] for p in prompts])).diagonal()


class Pixels(MeanColour):
    """Centred pixels as features: any change of the image shows."""
    has_text = False

    def image_features(self, images):
        return images.flatten(1) - 0.5


def solid(rgb, n=1, size=16):
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(n, 3, size, size).clone()


# ---- metric functions on known inputs -----------------------------------------------------------------------------
def test_metrics_on_known_inputs():
    b = MeanColour()
    red, green = solid([1, 0, 0], 3), solid([0, 1, 0], 2)
    assert subject_fidelity(b, red, red[:1]) == pytest.approx(1.0)  # identical images
    assert subject_fidelity(b, red, green) == pytest.approx(0.0)  # orthogonal features
    half = torch.cat([red[:1], green[:1]])
    assert subject_fidelity(b, half, red[:1]) == pytest.approx(0.5)  # the mean over samples
    assert prompt_fidelity(b, half, ["red", "red"]) == pytest.approx(0.5)
    assert prompt_fidelity(b, half, ["red", "green"]) == pytest.approx(1.0)
    with pytest.raises(EvaluationError, match="one prompt per image"):
        prompt_fidelity(b, half, ["red"])
    torch.testing.assert_close(cosine_matrix(torch.eye(2), torch.tensor([[1.0, 1.0]])), torch.full((2, 1), 0.5 ** 0.5))
    assert prior_preservation(b, half, half) == pytest.approx(1.0)  # the base model's own samples
    assert prior_preservation(b, half, half.flip(0)) == pytest.approx(0.0)  # pairwise, not set against set
    with pytest.raises(EvaluationError, match="pairs samples"):
        prior_preservation(b, half, red)


class Rate(MeanColour):
    """A classifier backend: an image shows the subject when it is mostly red."""
    has_rate = True

    def subject_rate(self, images):
        return float((images[:, 0].mean(dim=(1, 2)) > 0.5).float().mean())


class NamedRate(Rate):
    """A classifier that knows subjects' looks by their folder names: the colour channel that must be bright."""
    LOOKS = {"red-star": {"channel": 0}, "green-thing": {"channel": 1}}
    has_text = False

    def subject_look(self, subject):
        return self.LOOKS.get(subject)

    def subject_rate(self, images, look=None):
        channel = (look or {"channel": 0})["channel"]  # the default subject: red
        return float((images[:, channel].mean(dim=(1, 2)) > 0.5).float().mean())


def test_subject_rates_use_the_named_subjects_look(caplog):
    """The subject rates ask the classifier for the run's subject by its folder name; an unknown subject gets no rate
    (and a warning), never the default subject's."""
    red, green = solid([1, 0, 0], 2), solid([0, 1, 0], 2)
    samples = Samples(subject=green, class_tuned=torch.cat([red[:1], green[:1]]), class_base=red,
                      subject_name="green-thing")
    rates = {"rate_rate", "rate_leak_rate"}
    values = measure({"rate": NamedRate()}, samples)
    assert {k: values[k] for k in rates} == {"rate_rate": 1.0, "rate_leak_rate": 0.5}  # green's look
    samples.subject_name = None  # no name: the backend's default subject (red)
    values = measure({"rate": NamedRate()}, samples)
    assert {k: values[k] for k in rates} == {"rate_rate": 0.0, "rate_leak_rate": 0.5}
    samples.subject_name = "blue-circle"
    with caplog.at_level("WARNING"):
        values = measure({"rate": NamedRate()}, samples)
    assert not rates & set(values) and "rate_i" not in values and "rate_prior" in values
    assert "rate_rate not measured: the 'rate' backend knows no look for subject 'blue-circle'" in caplog.text


def test_tiny_world_subject_rate_takes_a_subjects_look():
    """The probe's subject rate counts the images that show the given look: the demo subject's by default and for its
    folder name, another subject's when given; every committed subject folder has its look; a misspelt look is
    refused."""
    from dataclasses import replace
    from ldm.data.synthetic import SUBJECT, SyntheticScenes, render
    from ldm.tinyworld.metrics import DEMO_LOOK, SUBJECT_LOOKS, check_look, tinyworld_backend
    probe = tinyworld_backend()
    demo = torch.stack([SyntheticScenes(8, 64, 5, world="subject")[i]["image"] for i in range(8)]) / 2 + 0.5
    striped = replace(SUBJECT, texture="striped", colour="green", second_colour=None)
    scenes = [replace(striped, background=b) for b in ("white", "gray", "blue", "red", "black", "purple", "yellow")]
    other = torch.stack([torch.from_numpy(np.array(render(s, 64))).permute(2, 0, 1).float() / 255 for s in scenes])
    look = {"texture": "striped", "colour": "green", "outline": "yes"}
    assert probe.subject_look("sks-star") == DEMO_LOOK and probe.subject_look("a-subject-it-never-saw") is None
    assert probe.subject_rate(demo) == probe.subject_rate(demo, DEMO_LOOK) >= 0.75
    assert probe.subject_rate(other, look) >= 0.7 and probe.subject_rate(demo, look) <= 0.25
    assert probe.subject_rate(other) <= 0.3
    folders = [p.name for p in (REPO / "assets" / "tiny-world").iterdir() if p.is_dir()]
    assert "sks-star" in folders and not [f for f in folders if f not in SUBJECT_LOOKS], \
        "a tiny-world subject folder without its look in ldm/tinyworld/metrics.py SUBJECT_LOOKS gets no subject rate"
    for bad in ({"texture": "chequered"}, {"fill": "checkered"}, {}):
        with pytest.raises(ValueError, match="look must name probe attributes"):
            check_look(bad)


def test_every_registry_metric_on_known_inputs():
    """Each metric of the protocol from samples whose answer is known, under its registry column."""
    red, green = solid([1, 0, 0], 2), solid([0, 1, 0], 2)
    half = torch.cat([red[:1], green[:1]])
    samples = Samples(subject=half, texts=["red", "red"], references=red[:1], class_tuned=half, class_base=green)
    values = measure({"mc": MeanColour(), "rate": Rate()}, samples)
    assert values == pytest.approx({
        "mc_i": 0.5, "rate_i": 0.5,             # one of two samples is the subject
        "rate_rate": 0.5,                       # ... and the classifier sees it in one
        "mc_t": 0.5, "rate_t": 0.5,             # one of two matches its prompt
        "mc_prior": 0.5, "rate_prior": 0.5,     # one class sample kept the base model's look
        "mc_leak": 0.5, "rate_leak": 0.5,       # class samples moved from 0 to 0.5 similarity to the subject
        "rate_leak_rate": 0.5})                 # the subject is seen in half of the class samples
    assert subject_leakage(MeanColour(), green, green, red) == 0.0  # the base model leaks nothing into itself
    assert set(measure({"mc": MeanColour()}, Samples(subject=half, texts=["red", "red"], references=red))) == \
        {"mc_i", "mc_t"}  # no class samples drawn: no class-sample metric
    assert set(measure({"mc": MeanColour()}, Samples(subject=half, references=red))) == {"mc_i"}  # no texts
    for column, key in [("dino_i", "subject_fidelity"), ("clip_t", "prompt_fidelity"), ("x_leak", "subject_leakage"),
                        ("tinyworld_leak_rate", "class_subject_rate"), ("tinyworld_rate", "subject_rate"),
                        ("fid", "fid"), ("a_b_prior", "prior_preservation")]:
        assert metric_of_column(column).key == key
    assert metric_of_column("train_seconds") is None and metric_of_column("_i") is None
    assert [m.key for m in METRICS.values() if not m.higher_is_better] == ["subject_leakage", "class_subject_rate",
                                                                          "fid"]
    with pytest.raises(EvaluationError, match="unknown metric"):
        measure({}, samples, keys=["subject_fidelty"])


def test_a_new_metric_is_one_registry_entry(monkeypatch):
    """The recipe of docs/architecture.md: one METRICS entry, and the metric reaches the row, the table's metric
    columns and the ANOVA with its direction and name."""
    import pandas as pd
    from ldm.evaluation.findings import describe_metric
    from ldm.evaluation.study import analyse, default_metrics
    brightness = Metric("brightness", "brightness", "_bright", False, "features", ("subject",),
                        lambda b, s: float(s.subject.mean()))
    monkeypatch.setitem(METRICS, "brightness", brightness)
    row = measure({"mc": MeanColour()}, Samples(subject=solid([0.5, 0.5, 0.5], 2), references=solid([1, 0, 0])))
    assert row["mc_bright"] == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"run": range(12), "din": ["a", "b", "c"] * 4, "mc_bright": rng.normal(size=12)})
    assert default_metrics(table) == ["mc_bright"] and describe_metric("mc_bright") == "brightness, lower is better"
    (result,) = analyse(table, None, ["din"])
    assert result.metric == "mc_bright" and not result.higher_is_better


@pytest.mark.slow
def test_dino_and_clip_backends_from_local_folders(tiny_dino, tiny_clip):
    images = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    for name, path in (("dino", tiny_dino), ("clip", tiny_clip)):
        b = get_backend(name, str(path))
        features = b.image_features(images)
        assert features.shape[0] == 3 and torch.isfinite(features).all()
        assert subject_fidelity(b, images[:1].repeat(2, 1, 1, 1), images[:1]) == pytest.approx(1.0, abs=1e-5)
        assert subject_fidelity(b, images[:1], images[1:]) < 0.9999
    dino_file = get_backend("dino", str(tiny_dino / "model.safetensors"))  # the weights file, config beside it
    dino = get_backend("dino", str(tiny_dino))
    torch.testing.assert_close(dino_file.image_features(images), dino.image_features(images))
    clip = get_backend("clip", str(tiny_clip))
    prompts = ["a photo of a dog", "a red cube", "a photo of a dog"]
    score = clip.text_image_score(images, prompts)
    assert score.shape == (3,) and ((score >= -1) & (score <= 1)).all()
    # CLIP-T is the cosine of the image and text embeddings of the same model
    torch.testing.assert_close(score, torch.nn.functional.cosine_similarity(
        clip.image_features(images), clip.text_features(prompts), dim=-1))
    assert not get_backend("dino", str(tiny_dino)).has_text


def test_missing_weights_are_named(tmp_path, tiny_dino):
    with pytest.raises(WeightsNotFoundError, match="needs local weights .*pass --metric dino=PATH"):
        get_backend("dino", None)
    with pytest.raises(WeightsNotFoundError, match=r"'.*nowhere' does not exist; put .*facebook/dino-vits16"):
        get_backend("dino", str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsNotFoundError, match="config.json' is missing"):
        get_backend("clip", str(tmp_path / "empty"))
    (tmp_path / "empty" / "config.json").write_text((tiny_dino / "config.json").read_text())
    with pytest.raises(WeightsNotFoundError, match="holds no model.safetensors or pytorch_model.bin"):
        get_backend("dino", str(tmp_path / "empty"))
    with pytest.raises(WeightsNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        fid_metric(str(tmp_path / "inception.pth"))
    with pytest.raises(EvaluationError, match="unknown metric backend 'dinov9'; known: .*clip, dino"):
        get_backend("dinov9")
    with pytest.raises(SystemExit, match="error: weights of the 'dino' metric not found"):
        evaluate_script.main([str(tmp_path), "--metric", f"dino={tmp_path / 'nowhere'}"])


def test_backends_are_listed_by_path_and_imported_when_asked_for(tmp_path, monkeypatch):
    """A backend is one line of BACKENDS (name -> dotted path); its module is imported only when it is asked for."""
    assert {"dino", "clip", "tinyworld"} <= set(backend_names())
    (tmp_path / "fakeworld_metrics.py").write_text(
        "from ldm.evaluation.backends import MetricBackend\n"
        "class Fake(MetricBackend):\n"
        "    def __init__(self, weights=None, device=None):\n"
        "        self.weights = weights\n"
        "    def image_features(self, images):\n"
        "        return images.flatten(1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(backends.BACKENDS, "fakeworld", "fakeworld_metrics.Fake")
    monkeypatch.setitem(backends.BACKENDS, "elsewhere", "no_such_module_anywhere.Backend")
    assert "fakeworld_metrics" not in sys.modules
    assert get_backend("fakeworld", "w").weights == "w"
    with pytest.raises(EvaluationError, match="cannot be loaded from no_such_module_anywhere.Backend"):
        get_backend("elsewhere")
    sys.modules.pop("fakeworld_metrics", None)


# ---- sampling and the table ---------------------------------------------------------------------------------------
def test_samples_depend_on_seed_not_on_batching(tiny_model_readonly):
    pairs = prompt_seed_pairs(["a red cube", "a blue ball"], [3, 4])
    assert pairs == [("a red cube", 3), ("a red cube", 4), ("a blue ball", 3), ("a blue ball", 4)]
    one = sample_images(tiny_model_readonly, pairs, 32, steps=2, scale=3.0, batch_size=1)
    four = sample_images(tiny_model_readonly, pairs, 32, steps=2, scale=3.0, batch_size=4)
    assert one.shape == (4, 3, 32, 32) and one.min() >= 0 and one.max() <= 1
    torch.testing.assert_close(one, four, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(one[0], one[1])
    with pytest.raises(ValueError, match="unknown sampler"):
        sample_images(tiny_model_readonly, pairs, 32, sampler="euler")


def test_results_table_is_replaced_atomically(tmp_path, monkeypatch):
    table = tmp_path / "results.csv"
    upsert_row(table, {"run": "a", "din": "attn2o", "dino_i": 0.5})
    upsert_row(table, {"run": "b", "din": "ffni", "dino_i": 0.25, "clip_t": 0.1})
    upsert_row(table, {"run": "a", "din": "attn2o", "dino_i": 0.75})  # re-evaluated: replaces its row
    rows = read_rows(table)
    assert [(r["run"], r["dino_i"], r["clip_t"]) for r in rows] == [("b", "0.25", "0.1"), ("a", "0.75", "")]
    before = table.read_bytes()

    def crash(self, text, *args, **kwargs):  # the process dies half-way through writing the new table
        with open(self, "w") as f:
            f.write(text[: len(text) // 2])
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr(Path, "write_text", crash)
    with pytest.raises(KeyboardInterrupt):
        upsert_row(table, {"run": "c", "dino_i": 0.1})
    monkeypatch.undo()
    assert table.read_bytes() == before  # the old table is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.csv.lock"]  # no half file left


# ---- whole runs -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "tiny.safetensors"
    save_state_dict(build_tiny().state_dict(), str(path))
    return path


def train_args(tmp_path, ckpt, *extra):
    return ["--base", *[str(REPO / b) for b in BASES], "--actual_resume", str(ckpt), "-n", "eval",
            "--data_root", str(write_images(tmp_path / "subject")), "--logdir", str(tmp_path / "logs"),
            "--max_steps", "2", "lightning.callbacks.image_logger.params.disabled=true", "-t", *extra]


@pytest.mark.slow
def test_evaluate_a_trained_run(tmp_path, base_ckpt, tiny_dino, tiny_clip):
    logdir = main_dream_booth.main(train_args(tmp_path, base_ckpt))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("photo of a {token} {class_word}\na {token} {class_word} on a blue background\n")
    table = tmp_path / "results.csv"
    args = [str(logdir), "--metric", f"dino={tiny_dino}", "--metric", f"clip={tiny_clip}", "--prompts", str(prompts),
            "--seeds", "0,1", "--steps", "2", "--table", str(table)]
    evaluate_script.main(args)
    (row,) = read_rows(table)
    assert row["run"] == logdir.name and int(row["n_samples"]) == 4 and int(row["adapter_step"]) == 1
    stats = json.loads((logdir / "train_stats.json").read_text())
    assert int(row["trainable_parameters"]) == stats["trained_parameters"]
    assert int(row["adapter_bytes"]) == (logdir / "checkpoints/1-adapters/adapters.safetensors").stat().st_size
    assert float(row["train_seconds"]) > 0 and int(row["train_steps"]) == 2 and "peak_host_memory_bytes" in row
    assert row["adapter"].startswith("attn2o->ffni")
    for key in ("dino_i", "clip_i", "clip_t", "dino_prior", "clip_prior"):
        assert -1.0 <= float(row[key]) <= 1.0 + 1e-6
    assert -2.0 <= float(row["dino_leak"]) <= 2.0 and "dino_rate" not in row  # DINO has no subject classifier
    assert row["subject"] == "subject"  # the instance-image folder's name, for a run outside a sweep
    assert (logdir / "eval" / "samples-1-adapters.png").is_file()
    # prior preservation compares the adapters on and off: off (scale 0) is the base itself, a strong one drifts
    from ldm.evaluation.evaluate import EvalSettings, Metrics, adapter_dir, load_run_model, prior_metrics, run_config
    from ldm.modules.adapters import set_adapter_scale
    model = load_run_model(run_config(logdir), adapter_dir(logdir), torch.device("cpu"))
    settings, metrics = EvalSettings(seeds=(0, 1), steps=2), Metrics({"pixels": Pixels()})
    set_adapter_scale(model, 0.0)
    assert prior_metrics(model, metrics, "photo of a cat", 32, settings)["pixels_prior"] == pytest.approx(1.0, abs=1e-6)
    set_adapter_scale(model, 1e4)
    assert prior_metrics(model, metrics, "photo of a cat", 32, settings)["pixels_prior"] < 0.99
    evaluate_script.main(args)  # already in the table: skipped
    assert len(read_rows(table)) == 1
    evaluate_script.main(args + ["--force"])  # fixed seeds: the same numbers again
    (again,) = read_rows(table)
    for key in ("dino_i", "clip_i", "clip_t"):
        assert float(again[key]) == pytest.approx(float(row[key]), abs=1e-5)


@pytest.mark.slow
def test_a_whole_unet_run_is_evaluated_with_its_trained_unet(tmp_path, base_ckpt):
    from ldm.evaluation.evaluate import adapter_dir, load_run_model, run_config
    logdir = main_dream_booth.main(train_args(tmp_path, base_ckpt, "model.params.train_level=[unet]",
                                              "lightning.modelcheckpoint.params.every_n_train_steps=1"))
    trained = torch.load(logdir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    model = load_run_model(run_config(logdir), adapter_dir(logdir), torch.device("cpu"))
    own = model.state_dict()
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert key in trained and torch.equal(own[key], trained[key])  # the fine-tuned UNet, not the base's
    from safetensors.torch import load_file
    assert not torch.equal(load_file(str(base_ckpt))[key], own[key])
    with pytest.raises(EvaluationError, match="only be evaluated at its last step"):
        load_run_model(run_config(logdir), adapter_dir(logdir, 0), torch.device("cpu"))
    # its prior preservation compares it with the base weights (the adapters off would still be the tuned UNet)
    from ldm.evaluation.evaluate import EvalSettings, Metrics, evaluate_run, prior_metrics
    from ldm.util.instantiate import load_model_from_config
    settings = EvalSettings(prompts=("photo of a {token} {class_word}",), seeds=(0, 1), steps=2, save_grid=False)
    metrics = Metrics({"pixels": Pixels()})
    row = evaluate_run(logdir, metrics, settings, torch.device("cpu"))
    base = load_model_from_config(run_config(logdir)).eval()
    from ldm.data.dreambooth import format_prompt
    from ldm.evaluation.evaluate import subject_fields
    prompt = format_prompt(settings.prior_prompt, subject_fields(run_config(logdir)))
    expected = prior_metrics(model, metrics, prompt, 32, settings, base)["pixels_prior"]
    assert row["pixels_prior"] == pytest.approx(expected, abs=1e-6)
    assert expected != pytest.approx(prior_metrics(model, metrics, prompt, 32, settings)["pixels_prior"], abs=1e-6)
    # sample.py draws such a run: base --ckpt, the run's adapters, then its fine-tuned UNet from last.ckpt
    import sample
    args = ["--config", str(REPO / "configs/tests/tiny-inference.yaml"), "--ckpt", str(base_ckpt), "--H", "32",
            "--W", "32", "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", "--skip_grid", "--seed", "3",
            "--adapter_path", str(adapter_dir(logdir)), "--prompt", "photo of a sks cat"]
    (plain,) = sample.main(args + ["--outdir", str(tmp_path / "plain")])
    (tuned,) = sample.main(args + ["--trained_ckpt", str(logdir / "checkpoints" / "last.ckpt"),
                                   "--outdir", str(tmp_path / "tuned")])
    from PIL import Image
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(tuned)))
    with pytest.raises(SystemExit, match="holds adapters only"):
        adapter_run = main_dream_booth.main(train_args(tmp_path / "a", base_ckpt))
        sample.main(args + ["--trained_ckpt", str(adapter_run / "checkpoints" / "last.ckpt"), "--outdir",
                            str(tmp_path / "x")])


@pytest.mark.slow
def test_evaluate_a_sweep_and_bad_runs(tmp_path, base_ckpt, tiny_dino):
    import yaml
    from ldm.sweep.runs import load_runs, prepare
    spec = {"base": [str(REPO / b) for b in BASES],
            "overrides": [f"actual_resume={base_ckpt}", f"data_root={write_images(tmp_path / 'subject')}",
                          "max_steps=2", "lightning.callbacks.image_logger.params.disabled=true"],
            "factors": {"method": {"key": "method", "levels": ["relu", "silu"]}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    runs = prepare(str(tmp_path / "s.yaml"), str(tmp_path / "sw"))
    main_dream_booth.main(["-r", str(runs[0].dir), "-t"])  # one run trained in this process; the other pending
    assert [r.state for r in load_runs(str(tmp_path / "sw"))] == ["done", "pending"]
    evaluate_script.main([str(tmp_path / "sw"), "--metric", f"dino={tiny_dino}", "--seeds", "0", "--steps", "1",
                          "--prompts", str(write_prompts(tmp_path))])
    with open(tmp_path / "sw" / "results.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["run"] == "method-relu" and row["method"] == "relu" and float(row["dino_i"]) <= 1.0
    # a folder that is not a run, and a run without adapters
    with pytest.raises(SystemExit, match="neither a sweep folder"):
        evaluate_script.main([str(tmp_path), "--metric", f"dino={tiny_dino}"])
    with pytest.raises(SystemExit, match="1 run\\(s\\) could not be evaluated: method-silu"):
        evaluate_script.main([str(runs[1].dir), "--metric", f"dino={tiny_dino}", "--table", str(tmp_path / "t.csv")])


def write_prompts(tmp_path):
    path = tmp_path / "one-prompt.txt"
    path.write_text("photo of a {token} {class_word}\n")
    return path


@pytest.mark.slow
def test_subject_fidelity_callback_logs_during_training(tmp_path, base_ckpt, tiny_dino):
    """The callback logs the registry's metrics: subject fidelity by default, class-sample metrics when asked (the
    class prompt from the class data; the adapters off as the base, so step 0, with zero-initialised adapters, has
    prior preservation 1 and no leakage)."""
    callback = ("lightning.callbacks.fidelity={target: ldm.evaluation.callback.SubjectFidelity, params: "
                f"{{every_n_train_steps: 1, backend: dino, weights: {tiny_dino}, ddim_steps: 2, seeds: [0, 1], "
                "metrics: [subject_fidelity, prior_preservation, subject_leakage]}}")
    classes = write_images(tmp_path / "class", n=4)
    logdir = main_dream_booth.main(train_args(tmp_path, base_ckpt, callback, "--reg_data_root", str(classes),
                                              "--class_word", "cat"))
    files = sorted((logdir / "csv").glob("*/metrics.csv"))
    with open(files[-1]) as f:
        rows = [r for r in csv.DictReader(f) if r.get("eval/dino_i")]
    assert [int(r["step"]) for r in rows] == [0, 1, 2]  # before training, then every step
    assert all(-1.0 <= float(r["eval/dino_i"]) <= 1.0 for r in rows)
    assert float(rows[0]["eval/dino_prior"]) == pytest.approx(1.0, abs=1e-5)
    assert float(rows[0]["eval/dino_leak"]) == pytest.approx(0.0, abs=1e-5)
    assert all(r["eval/dino_leak"] != "" for r in rows)


# ---- the analysis of a results table: regressions found running the tiny-world study on a stand-in model -------------
def study_table(metric_of):
    """Two position pairs x 2 seeds, as a small tiny-world sweep gives: din and dout always change together."""
    import pandas as pd
    runs = [("attn2o", "ffni", 0), ("attn2o", "ffni", 1), ("resi", "reso", 0), ("resi", "reso", 1)]
    return pd.DataFrame([{"run": f"{i}-{o}-{s}", "din": i, "dout": o, "seed": s, "trainable_parameters": 100,
                          "tinyworld_i": metric_of(i, s)} for i, o, s in runs])


@pytest.mark.slow
def test_anova_of_a_constant_metric_reports_no_variance(tmp_path):
    """A metric equal in every run (e.g. adapters that could not learn) gave round-off as sums of squares and a
    partial eta² of -2.2 with an empty summary line; now every statistic is empty and the report says why."""
    from ldm.evaluation.anova import CONSTANT_NOTE
    from ldm.evaluation.study import analyse_metric
    from scripts import anova as anova_script
    table = study_table(lambda din, seed: 0.47455400228500366)
    result = analyse_metric(table, "tinyworld_i", ["din", "dout"])
    assert CONSTANT_NOTE in result.notes and not result.levels and not result.pairs
    assert (result.anova.sum_sq == 0).all()
    assert result.anova[["F", "p", "eta_sq", "partial_eta_sq", "partial_eta_sq_low"]].isna().all().all()
    table.to_csv(tmp_path / "results.csv", index=False)
    report = anova_script.main([str(tmp_path / "results.csv"), "--factors", "din", "dout"]).read_text()
    findings = report.split("## Findings")[1].split("## tinyworld_i")[0]
    assert f"- {CONSTANT_NOTE}." in findings and "drives" not in findings and "Top" not in findings


def test_anova_credits_nothing_to_a_term_confounded_with_the_others():
    """din and dout that always change together: neither has a degree of freedom of its own, so each explains 0
    (not the round-off of two equal fits, which came out negative)."""
    from ldm.evaluation.findings import metric_findings
    from ldm.evaluation.study import analyse_metric
    result = analyse_metric(study_table(lambda din, seed: 0.4 + 0.1 * (din == "resi") + 0.01 * seed),
                            "tinyworld_i", ["din", "dout"])
    anova = result.anova.set_index("term")
    assert list(anova.loc[["din", "dout"], "df"]) == [0, 0] and (anova.loc[["din", "dout"], "sum_sq"] == 0).all()
    assert (anova.loc[["din", "dout"], ["eta_sq", "partial_eta_sq"]] == 0).all().all()
    assert anova.loc[["din", "dout"], "p"].isna().all() and "rank-deficient" in result.notes[0]
    assert "- din: no degree of freedom of its own (confounded with the other terms), so not tested." in \
        metric_findings(result)


@pytest.mark.slow
def test_tiny_world_report_measures_through_the_registry():
    """The tiny-world report's DreamBooth numbers are the protocol's: the same values as `measure` gives under the
    tinyworld backend's columns (subject rate and subject rate in class samples included)."""
    from ldm.data.synthetic import SyntheticScenes
    from ldm.tinyworld.evaluate import dreambooth_metrics
    from ldm.tinyworld.metrics import tinyworld_backend
    probe = tinyworld_backend()
    subject = torch.stack([SyntheticScenes(6, 64, 5, world="subject")[i]["image"] for i in range(6)]) / 2 + 0.5
    scenes = torch.stack([SyntheticScenes(6, 64, 9)[i]["image"] for i in range(6)]) / 2 + 0.5
    before = {"subject": scenes, "class": scenes, "context": scenes}
    after = {"subject": subject, "class": torch.cat([subject[:3], scenes[3:]]), "context": subject}
    references = subject[:2]
    report = dreambooth_metrics(probe, before, after, references)
    samples = Samples(subject=subject, references=references, class_tuned=after["class"], class_base=scenes)
    row = measure({"tinyworld": probe}, samples)
    assert report["subject_fidelity"] == row["tinyworld_i"] and report["subject_rate"] == row["tinyworld_rate"]
    assert report["class_similarity_to_base"] == row["tinyworld_prior"]
    assert report["class_subject_rate"] == row["tinyworld_leak_rate"] > report["class_subject_rate_base"]
    assert row["tinyworld_leak"] > 0.05  # half the class samples are the subject now


def draw_subject(folder, shape, colour, n=3):
    """A subject folder drawn by the tiny world: one shape and colour in n settings."""
    from dataclasses import replace
    from ldm.data.synthetic import SUBJECT, render
    folder.mkdir(parents=True)
    for i, (background, position) in enumerate([("white", "center"), ("gray", "left"), ("green", "right")][:n]):
        scene = replace(SUBJECT, shape=shape, colour=colour, texture="plain", second_colour=None, outline=False,
                        background=background, position=position)
        render(scene, 32).save(folder / f"{shape}-{i}.png")
    return folder


@pytest.mark.slow
def test_a_study_over_several_subjects(tmp_path, base_ckpt, monkeypatch):
    """Subjects as a sweep factor (a data folder and class word each, drawn here): each run is evaluated against its
    own subject's images, the results table has a subject column, and the analysis takes subject as a block."""
    import yaml
    from ldm.evaluation.evaluate import EvalSettings, adapter_dir, draw, instance_images, load_run_model, run_config
    from ldm.evaluation.sampling import prompt_seed_pairs
    from ldm.sweep.runs import prepare
    from scripts import anova as anova_script
    subjects = {"red-star": draw_subject(tmp_path / "red-star", "star", "red"),
                "blue-circle": draw_subject(tmp_path / "blue-circle", "circle", "blue")}
    spec = {"base": [str(REPO / b) for b in BASES],
            "overrides": [f"actual_resume={base_ckpt}", "max_steps=2",
                          "lightning.callbacks.image_logger.params.disabled=true"],
            "factors": {"subject": {"levels": {name: {"data_root": str(path), "class_word": name.split("-")[1]}
                                               for name, path in subjects.items()}},
                        "method": {"key": "method", "levels": ["relu", "silu"]}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    for run in prepare(str(tmp_path / "s.yaml"), str(tmp_path / "sw")):
        main_dream_booth.main(["-r", str(run.dir), "-t"])
    monkeypatch.setitem(backends.BACKENDS, "mc", "test_evaluate.Pixels")
    monkeypatch.setitem(backends.BACKENDS, "rate", "test_evaluate.NamedRate")  # knows red-star's look, not the other
    evaluate_script.main([str(tmp_path / "sw"), "--metric", "mc", "--metric", "rate", "--seeds", "0,1", "--steps",
                          "1", "--prompts", str(write_prompts(tmp_path)), "--prior_prompt", "none"])
    rows = read_rows(tmp_path / "sw" / "results.csv")
    assert sorted((r["subject"], r["method"]) for r in rows) == sorted(
        (s, m) for s in subjects for m in ("relu", "silu"))
    assert {r["subject"] for r in rows if r["rate_rate"] != ""} == {"red-star"}  # looked up by the folder's name
    settings = EvalSettings(prompts=("photo of a {token} {class_word}",), seeds=(0, 1), steps=1)
    for r in rows:  # each run against its own subject's images, with its own class word in the prompt
        run_dir = tmp_path / "sw" / "runs" / r["run"]
        config = run_config(run_dir)
        assert config.data.params.train.params.data_root == str(subjects[r["subject"]])
        model = load_run_model(config, adapter_dir(run_dir), torch.device("cpu"))
        word = r["subject"].split("-")[1]
        images = draw(model, prompt_seed_pairs([f"photo of a sks {word}"], (0, 1)), 32, settings)
        assert float(r["mc_i"]) == pytest.approx(subject_fidelity(Pixels(), images, instance_images(config, 32)),
                                                 abs=1e-6)
    report = anova_script.main([str(tmp_path / "sw" / "results.csv"), "--metrics", "mc_i"]).read_text()
    assert "Factors: method. Blocks: subject." in report  # the sweep's factors without the subject: a block
