"""Evaluate trained runs: sample fixed prompts with fixed seeds, compute the metrics, one results-table row per run.

    python scripts/evaluate.py sweeps/pairs --metric dino=models/dino-vits16 --metric clip=models/clip-vit-large-patch14
    python scripts/evaluate.py sweeps/pairs --metric tinyworld --prompts prompts.txt --seeds 0,1,2,3 --steps 50
    python scripts/evaluate.py logs/<run> --metric clip=models/clip --fid data/reference --fid_weights \
        models/pt_inception-2015-12-05-6726825d.pth --table results.csv

Metric weights are local files or folders (nothing is downloaded): dino is a folder (config.json +
model.safetensors) of facebook/dino-vits16 or that weights file; clip a transformers CLIPModel folder. Rows are
added to the table (default: <sweep folder>/results.csv) as each run finishes, atomically; a --table that is not a
results table is refused before any sampling. Each run's sample grid goes to <run>/eval/samples-<step>-adapters.png
(an evaluation again, with --force, replaces its row and that grid). Two evaluations of one sweep at once share the
work: each run is evaluated and written once.
"""
import argparse
import sys
from pathlib import Path
from typing import List, Optional

import torch

from ldm.checkpoint import CheckpointError
from ldm.checks import ArgumentParser, ConfigError, SEED_MAX, device_arg, finite_float, int_list, non_negative_int, positive_int
from ldm.data.dreambooth import DataError, list_images
from ldm.evaluation.backends import EvaluationError, backend_names, get_backend
from ldm.evaluation.evaluate import DEFAULT_PROMPTS, EvalSettings, Metrics, check_steps, evaluate_runs, find_runs
from ldm.evaluation.packed import PackedDraws
from ldm.evaluation.fid import FID_WEIGHTS, fid_metric
from ldm.evaluation.table import check_table, done_runs
from ldm.models.diffusion.sampling import DEFAULT_SAMPLER, SAMPLER_NAMES
from ldm.sweep.spec import SweepError
from ldm.util.devices import pick_device
from ldm.util.logs import setup_logging

USER_ERRORS = (EvaluationError, SweepError, CheckpointError, ConfigError)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", help="sweep folders (their finished runs) or run folders")
    p.add_argument("--metric", action="append", default=[], metavar="NAME[=WEIGHTS]",
                   help=f"a metric backend and its local weights, repeatable; known: {', '.join(backend_names())}")
    p.add_argument("--table", help="the results CSV (default: results.csv in the first path)")
    p.add_argument("--prompts", help="a file of prompt templates, one per line, with {token} and {class_word} "
                                     f"(default: {'; '.join(DEFAULT_PROMPTS)})")
    p.add_argument("--seeds", type=int_list(0, SEED_MAX), default="0,1,2,3",
                   help="seeds, one sample per prompt and seed (default 0,1,2,3)")
    p.add_argument("--steps", type=positive_int, default=50, help="sampling steps (default 50)")
    p.add_argument("--scale", type=finite_float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default=DEFAULT_SAMPLER)
    p.add_argument("--batch_size", type=positive_int, default=8)
    p.add_argument("--pack", type=positive_int, default=1,
                   help="sample up to N runs of one base model together, in batches of N x batch_size rows (each "
                        "run's adapters on its own rows; the same images as one run at a time)")
    p.add_argument("--step", type=non_negative_int, help="evaluate checkpoints/<step>-adapters (default: the last)")
    p.add_argument("--prior_prompt", default="photo of a {class_word}",
                   help="class-sample metrics: this prompt sampled with and without the adapters from the same seeds "
                        "(prior preservation <metric>_prior, subject leakage <metric>_leak, ...); 'none' to skip "
                        "(default: %(default)s)")
    p.add_argument("--fid", metavar="DIR", help="also FID against the images in DIR (torch-fidelity's Inception-v3 "
                                                "path, as published FIDs; references resized to the samples' size)")
    p.add_argument("--fid_weights", metavar="FILE", help=f"Inception weights for --fid ({FID_WEIGHTS}; needs "
                                                         "torch-fidelity)")
    p.add_argument("--fid_features", metavar="NAME", help="compute --fid in this metric backend's feature space "
                                                          "instead of Inception's (one of the --metric names; not "
                                                          "comparable with published FID)")
    p.add_argument("--force", action="store_true", help="evaluate runs that already have a row again (their row and "
                                                        "sample grid are replaced)")
    p.add_argument("--device", type=device_arg, help="torch device (default: the first GPU, else the CPU)")
    opt = p.parse_args(argv)
    if not opt.metric and not opt.fid:
        p.error("choose at least one --metric (or --fid)")
    if (opt.fid_weights or opt.fid_features) and not opt.fid:
        p.error("--fid_weights and --fid_features need --fid DIR (the reference images)")
    return opt


def read_settings(opt: argparse.Namespace) -> EvalSettings:
    prompts = DEFAULT_PROMPTS
    if opt.prompts:
        path = Path(opt.prompts)
        if not path.is_file():
            raise EvaluationError(f"prompt file not found: '{path}'")
        try:
            prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise EvaluationError(f"prompt file '{path}' is not text (UTF-8): put one prompt template per line") from None
        if not prompts:
            raise EvaluationError(f"prompt file '{path}' is empty: put one prompt template per line")
    prior = None if opt.prior_prompt.strip().lower() in ("", "none") else opt.prior_prompt
    return EvalSettings(prompts, opt.seeds, opt.steps, opt.scale, opt.sampler, opt.batch_size, opt.step,
                        prior_prompt=prior)


def build_metrics(opt: argparse.Namespace, device) -> Metrics:
    """The backends of --metric, built (and their weights checked) before any run is sampled."""
    backends = {}
    for item in opt.metric:
        name, _, weights = item.partition("=")
        backends[name] = get_backend(name, weights or None, device)
    metrics = Metrics(backends)
    if opt.fid:
        if opt.fid_features and opt.fid_features not in backends:
            raise EvaluationError(f"--fid_features {opt.fid_features} must be one of the --metric names")
        reference_images(opt.fid)
        features = backends.get(opt.fid_features) if opt.fid_features else None
        metrics.fid, metrics.fid_reference = fid_metric(opt.fid_weights, features, device), opt.fid
    return metrics


def reference_images(folder: str) -> None:
    """The --fid folder must hold images (checked before any run is sampled)."""
    try:
        list_images(folder)
    except DataError as e:
        raise EvaluationError(f"--fid: {e}") from None


def main(argv: Optional[List[str]] = None) -> Path:
    opt = parse_args(argv)
    setup_logging()
    table = Path(opt.table or Path(opt.paths[0]) / "results.csv")
    try:
        check_table(table, "--table")  # the output first: nothing is sampled for a table that cannot be written
        settings = read_settings(opt)
        device = torch.device(opt.device) if opt.device else pick_device()
        metrics = build_metrics(opt, device)  # weights are checked before any run is looked at
        runs = find_runs(opt.paths)
        check_steps(runs, settings.steps)
        skip = [] if opt.force else done_runs(table)
        todo = [r for r in runs if r.name not in skip]
        draw = PackedDraws(todo, opt.pack, settings, device) if opt.pack > 1 else None
        failed = evaluate_runs(runs, table, metrics, settings, device, skip, opt.force, draw)
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")
    print(f"results in {table}")
    if failed:
        sys.exit(f"error: {len(failed)} run(s) could not be evaluated: "
                 + "; ".join(f"{name} ({reason})" for name, reason in failed.items()))
    return table


if __name__ == "__main__":
    main()
