"""ANOVA of design-space results: a planted effect is found, a planted null is not; rank-deficient designs, Tukey HSD,
the report with its tables and plots, and bad input."""
import numpy as np
import pandas as pd
import pytest

from ldm.evaluation.anova import AnalysisError, analyse, analyse_metric, anova_table, default_metrics, prepare
from ldm.modules.adapters import valid_pairs
from scripts import anova as anova_script


def planted(seed: int = 0, reps: int = 3) -> pd.DataFrame:
    """din has a large effect (attn2o +0.3), method none, noise sd 0.05; a balanced 4 x 3 x reps design."""
    rng = np.random.default_rng(seed)
    effect = {"attn1i": 0.0, "attn2i": 0.05, "attn2o": 0.3, "ffni": 0.1}
    rows = [{"run": f"{d}-{m}-{r}", "din": d, "method": m, "seed": r, "trainable_parameters": 1000 * (i + 1),
             "dino_i": 0.5 + effect[d] + rng.normal(0, 0.05)}
            for i, d in enumerate(effect) for m in ("relu", "silu", "sig") for r in range(reps)]
    return pd.DataFrame(rows)


def row(table, term):
    return table[table.term == term].iloc[0]


def test_planted_effect_is_found_and_null_is_not():
    result = analyse_metric(planted(), "dino_i", ["din", "method"])
    din, method = row(result.anova, "din"), row(result.anova, "method")
    assert din.p < 1e-10 and din.eta_sq > 0.8 and din.partial_eta_sq > 0.9
    assert method.p > 0.05 and method.eta_sq < 0.05
    assert din.df == 3 and method.df == 2 and row(result.anova, "Residual").df == 36 - 1 - 3 - 2
    # eta² shares of the total sum of squares add up with the residual's (balanced design: Type II = Type I)
    total = result.anova.sum_sq.sum()
    assert result.anova.eta_sq.sum() + row(result.anova, "Residual").sum_sq / total == pytest.approx(1.0)
    # Tukey HSD only for the significant factor; attn2o differs from every other level
    assert list(result.tukey) == ["din"]
    pairs = result.tukey["din"]
    against = pairs[(pairs.group1 == "attn2o") | (pairs.group2 == "attn2o")]
    assert len(against) == 3 and against.reject.all()


def test_null_factor_is_not_significant_over_many_seeds():
    """The null factor's p is uniform: at alpha 0.05 it should rarely be significant (here: at most 2 of 12)."""
    p_values = [row(anova_table(prepare(planted(seed), "dino_i", ["din", "method"])[0], "dino_i",
                                ["din", "method"])[0], "method").p for seed in range(12)]
    assert sum(p < 0.05 for p in p_values) <= 2 and np.median(p_values) > 0.2


def test_interactions_and_agreement_with_model_comparison():
    table = planted()
    result = analyse_metric(table, "dino_i", ["din", "method"], [("din", "method")])
    inter = row(result.anova, "din:method")
    assert inter.df == 6 and inter.p > 0.01
    assert not result.notes  # full rank: statsmodels' anova_lm
    from ldm.evaluation.anova import fit, type2_by_comparison
    data, _ = prepare(table, "dino_i", ["din", "method"])
    terms = [("din",), ("method",), ("din", "method")]
    by_comparison = type2_by_comparison(data, "dino_i", terms, fit(data, "dino_i", terms))
    np.testing.assert_allclose(by_comparison.sum_sq, result.anova.sum_sq, rtol=1e-8)
    np.testing.assert_allclose(by_comparison.df, result.anova.df)


def test_position_pairs_design_is_rank_deficient_but_analysed():
    """The paper's 20 pairs: attn2c only meets attn2c, ResBlock positions only each other; din still stands out."""
    rng = np.random.default_rng(1)
    rows = [{"din": i, "dout": o, "seed": s, "dino_i": (0.3 if i == "attn2o" else 0.0) + rng.normal(0, 0.05)}
            for _, i, o in valid_pairs() for s in (0, 1)]
    data, _ = prepare(pd.DataFrame(rows), "dino_i", ["din", "dout"])
    table, notes = anova_table(data, "dino_i", ["din", "dout"])
    assert notes and "rank-deficient" in notes[0]
    # degrees of freedom from the ranks: 14 estimable columns, dout explains 7 (with the intercept), din 10
    assert row(table, "din").df == 7 and row(table, "dout").df == 4 and row(table, "Residual").df == 26
    assert row(table, "din").p < 1e-6 and row(table, "dout").p > 0.05


def test_report_has_tables_plots_and_links(tmp_path):
    path = tmp_path / "results.csv"
    planted().to_csv(path, index=False)
    report = anova_script.main([str(path), "--factors", "din", "method", "--interactions", "din:method",
                                "--out", str(tmp_path / "analysis")])
    text = report.read_text()
    out = tmp_path / "analysis"
    for name in ("anova-dino_i.csv", "anova-dino_i.md", "tukey-dino_i-din.csv", "plots/dino_i-by-din.png",
                 "plots/dino_i-by-method.png", "plots/dino_i-din-x-method.png", "plots/dino_i-vs-parameters.png"):
        assert (out / name).is_file(), name
    assert "(plots/dino_i-by-din.png)" in text and "| din |" in text and "Tukey HSD for din" in text
    assert not (out / "tukey-dino_i-method.csv").exists()
    assert (out / "plots" / "dino_i-by-din.png").read_bytes()[:4] == b"\x89PNG"
    assert text.index("din (eta²") < text.index("method (eta²")  # the summary ranks din first


def test_factors_default_to_the_sweep_without_seed(tmp_path):
    import json
    planted().to_csv(tmp_path / "results.csv", index=False)
    (tmp_path / "sweep.json").write_text(json.dumps({"spec": {"factors": {"din": {}, "method": {}, "seed": {}}}}))
    report = anova_script.main([str(tmp_path / "results.csv")])
    assert "Factors: din, method." in report.read_text()


@pytest.mark.parametrize("kwargs,message", [
    ({"factors": ["nope"]}, "no column"),
    ({"factors": ["din", "method"], "metrics": ["missing_i"]}, "no column"),
    ({"factors": []}, "no factors"),
    ({"factors": ["din"], "interactions": ["din:zzz"]}, "interaction"),
])
def test_bad_input(kwargs, message):
    with pytest.raises(AnalysisError, match=message):
        analyse(planted(), kwargs.get("metrics"), kwargs["factors"], kwargs.get("interactions", ()))


def test_bad_tables(tmp_path):
    one_level = planted()
    one_level["method"] = "relu"
    with pytest.raises(AnalysisError, match="fewer than 2 levels"):
        analyse(one_level, ["dino_i"], ["din", "method"])
    with pytest.raises(AnalysisError, match="too few"):
        analyse(planted().groupby("din").head(1), ["dino_i"], ["din"])
    with pytest.raises(SystemExit, match="results table not found"):
        anova_script.main([str(tmp_path / "none.csv"), "--factors", "din"])
    planted().to_csv(tmp_path / "r.csv", index=False)
    with pytest.raises(SystemExit, match="pass --factors"):
        anova_script.main([str(tmp_path / "r.csv")])


def test_default_metrics_are_the_columns_evaluate_writes():
    table = pd.DataFrame(columns=["run", "din", "dino_i", "clip_t", "tinyworld_prior", "fid", "train_seconds",
                                  "trainable_parameters"])
    assert default_metrics(table) == ["dino_i", "clip_t", "tinyworld_prior", "fid"]
