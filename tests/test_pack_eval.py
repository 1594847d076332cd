"""Packed evaluation (issue 24 item 4): several runs sampled in shared batches, each run's adapters on its own rows,
draw the images each run draws alone, and give the same results-table rows; runs that cannot share are drawn alone."""
import csv

import pytest
import torch

from conftest import REPO, build_tiny
from ldm.checkpoint import save_state_dict
from ldm.evaluation.evaluate import EvalSettings, Metrics, draw_alone, evaluate_runs, evaluate_run
from ldm.evaluation.evaluate import adapter_dir, run_config
from ldm.evaluation.packed import PackedDraws, draw_pack, packs_of
from ldm.train import RunRequest, train_runs
from test_evaluate import Pixels
from test_train import BASES, TE_LORA, write_images

RUNS = [  # name, seed, extra bases, overrides
    ("attn2o-ffni", 0, (), ()),
    ("resblock", 1, (), ("din=resi", "dout=reso", "mid_dim=3")),
    ("lora-te", 2, (TE_LORA,), ("model.params.unet_config.params.adapter_config.transformer_adp_config=[]",)),
    ("whole-unet", 3, (), ("model.params.train_level=[unet]",)),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack-eval")
    ckpt = root / "tiny.safetensors"
    save_state_dict(build_tiny().state_dict(), str(ckpt))
    data = write_images(root / "subject")
    requests = [RunRequest(base=tuple(str(REPO / b) for b in (*BASES, *bases)), train=True, seed=seed, name=name,
                           overrides=("lightning.callbacks.image_logger.params.disabled=true", "lr=3e-3", *extra),
                           actual_resume=str(ckpt), data_root=str(data), class_word="cat", max_steps=3,
                           logdir=str(root / "logs")) for name, seed, bases, extra in RUNS]
    results = train_runs(requests)
    assert [e for _, e in results] == [None] * len(RUNS)
    return [logdir for logdir, _ in results]


SETTINGS = EvalSettings(prompts=("photo of a {token} {class_word}", "a {token} {class_word} in the snow"),
                        seeds=(0, 1, 2), steps=3, scale=5.0, batch_size=2, save_grid=False)


@pytest.mark.slow
def test_packed_samples_are_the_unpacked_ones(runs):
    assert packs_of(runs, 8) == [runs[:3], [runs[3]]]  # the whole-UNet run is drawn alone
    assert packs_of(runs, 2) == [runs[:2], [runs[2]], [runs[3]]]
    packed = draw_pack(runs[:3], SETTINGS, torch.device("cpu"))
    for run_dir in runs[:3]:
        alone = draw_alone(run_config(run_dir), adapter_dir(run_dir), SETTINGS, torch.device("cpu"))
        ours = packed[run_dir]
        for a, b in ((alone.images, ours.images), (alone.prior_tuned, ours.prior_tuned),
                     (alone.prior_base, ours.prior_base)):
            assert a.shape == b.shape and (a - b).abs().max() <= 1e-5, run_dir.name
        assert alone.adapter == ours.adapter
    # the runs' adapters act: their images differ from each other's
    assert (packed[runs[0]].images - packed[runs[1]].images).abs().max() > 1e-3


@pytest.mark.slow
def test_evaluate_runs_with_packed_draws_writes_the_unpacked_rows(runs, tmp_path):
    metrics = Metrics({"pixels": Pixels()})
    tables = {}
    for name, draw in (("alone", None), ("packed", PackedDraws(runs, 8, SETTINGS, torch.device("cpu")))):
        tables[name] = tmp_path / f"{name}.csv"
        assert evaluate_runs(runs, tables[name], metrics, SETTINGS, torch.device("cpu"), draw=draw) == {}
    read = {k: {r["run"]: r for r in csv.DictReader(open(v))} for k, v in tables.items()}
    assert read["alone"].keys() == read["packed"].keys() == {r.name for r in runs}
    for name, row in read["alone"].items():
        other = read["packed"][name]
        assert row.keys() == other.keys()
        for key, value in row.items():
            if key.startswith("pixels_"):  # every registry metric of the backend: images equal to 1e-5
                assert float(other[key]) == pytest.approx(float(value), abs=1e-5), (name, key)
            else:
                assert other[key] == value, (name, key)
    row = evaluate_run(runs[3], metrics, SETTINGS, torch.device("cpu"))  # alone, as before
    assert row["run"] == runs[3].name
