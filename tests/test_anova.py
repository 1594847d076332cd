"""The analysis of design-space results: Type II ANOVA equal to statsmodels, blocks, effect sizes with intervals that
cover, adjusted comparisons, the rank-deficient 20-pair design, findings generated from the numbers (a planted
effect is named and nothing else; a null study is called significant at the stated rate; "best" only when
separated), the report's files, and bad input."""
import json
import re

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from scipy import stats
from statsmodels.stats.anova import anova_lm

from ldm.evaluation.anova import (AnalysisError, Model, anova_table, check_alpha, noncentrality_interval,
                                  partial_eta_sq, prepare, type2)
from ldm.evaluation.comparisons import correlations, holm, ranking
from ldm.evaluation.findings import correlation_sentences, metric_findings
from ldm.evaluation.study import analyse, analyse_metric, default_metrics
from ldm.modules.adapters import valid_pairs
from scripts import anova as anova_script


def crossed(seed: int = 0, reps: int = 3, effect=None, sd: float = 0.05) -> pd.DataFrame:
    """A balanced 4 din x 3 method x reps design; din has `effect` (default: attn2o +0.3), method none."""
    rng = np.random.default_rng(seed)
    effect = effect or {"attn1i": 0.0, "attn2i": 0.05, "attn2o": 0.3, "ffni": 0.1}
    rows = [{"run": f"{d}-{m}-{r}", "din": d, "method": m, "seed": r, "trainable_parameters": 1000 * (i + 1),
             "dino_i": 0.5 + effect[d] + rng.normal(0, sd)}
            for i, d in enumerate(effect) for m in ("relu", "silu", "sig") for r in range(reps)]
    return pd.DataFrame(rows)


def pairs_design(seed: int, din_effect=None, pair_effect=None, seed_shift: float = 0.004, sd: float = 0.005,
                 metrics=("tinyworld_i",)) -> pd.DataFrame:
    """The paper's 20 position pairs x 2 seeds (rank-deficient: attn2c only with attn2c, ResBlock positions only with
    each other), each metric 0.54 + planted effects + a seed shift + noise."""
    rng = np.random.default_rng(seed)
    din_effect, pair_effect = din_effect or {}, pair_effect or {}
    rows = []
    for _, i, o in valid_pairs():
        for s in (0, 1):
            row = {"run": f"{i}-{o}-{s}", "din": i, "dout": o, "seed": s, "trainable_parameters": 28768}
            for m in metrics:
                row[m] = (0.54 + din_effect.get(i, 0.0) + pair_effect.get((i, o), 0.0) + seed_shift * s
                          + rng.normal(0, sd))
            rows.append(row)
    return pd.DataFrame(rows)


def row(table, term):
    return table[table.term == term].iloc[0]


def driven_by(findings):
    """The terms a report's sentences say drive a metric."""
    return {m.group(1) for line in findings for m in [re.search(r"\*\*(\S+) drives ", line)] if m}


# ---- the ANOVA --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("design", ["main", "interaction", "unbalanced"])
def test_type2_equals_statsmodels(design):
    table = crossed(reps=3)
    if design == "unbalanced":
        table = table.drop(index=[0, 5, 17, 30]).reset_index(drop=True)
    inter = [("din", "method")] if design == "interaction" else []
    data, _ = prepare(table, "dino_i", ["din", "method"], ["seed"])
    model = Model(data, "dino_i", ("din", "method"), ("seed",), tuple(inter))
    ours, _ = type2(model)
    formula = 'Q("dino_i") ~ C(Q("seed")) + C(Q("din")) + C(Q("method"))' + \
        (' + C(Q("din")):C(Q("method"))' if inter else "")
    theirs = anova_lm(smf.ols(formula, data).fit(), typ=2)
    np.testing.assert_allclose(ours.sum_sq, theirs.sum_sq, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(ours.df, theirs.df)
    np.testing.assert_allclose(ours.F[:-1], theirs.F[:-1], rtol=1e-8)
    np.testing.assert_allclose(ours.p[:-1], theirs["PR(>F)"][:-1], rtol=1e-7)
    assert model.full_rank()


def test_planted_effect_balanced_design_by_hand():
    result = analyse_metric(crossed(), "dino_i", ["din", "method"])
    din, method = row(result.anova, "din"), row(result.anova, "method")
    assert din.p < 1e-10 and din.eta_sq > 0.8 and din.partial_eta_sq > 0.9
    assert method.p > 0.05 and method.eta_sq < 0.05
    assert din.df == 3 and method.df == 2 and row(result.anova, "Residual").df == 36 - 1 - 3 - 2
    # balanced: SS of din by hand (between-level means), and shares that add up with the residual's
    data = crossed()
    means = data.groupby("din").dino_i.mean()
    assert din.sum_sq == pytest.approx(9 * ((means - data.dino_i.mean()) ** 2).sum(), rel=1e-10)
    total = ((data.dino_i - data.dino_i.mean()) ** 2).sum()
    assert result.anova.eta_sq.sum() + row(result.anova, "Residual").sum_sq / total == pytest.approx(1.0)
    assert not result.notes


def test_seed_is_a_block_when_present():
    table = crossed(reps=2, sd=0.01)
    table["dino_i"] += 0.03 * table["seed"]  # every seed-1 run higher: a block effect
    (with_block,) = analyse(table, ["dino_i"], ["din", "method"], interactions=[])  # default: seed as a block
    (without,) = analyse(table, ["dino_i"], ["din", "method"], interactions=[], blocks=[])
    assert list(with_block.anova.term) == ["seed", "din", "method", "Residual"]
    assert row(with_block.anova, "seed").kind == "block" and row(with_block.anova, "seed").p < 1e-6
    assert "seed" not in list(without.anova.term)
    # the block takes the seed shift out of the residual: tests get sharper
    assert row(with_block.anova, "Residual").sum_sq < 0.2 * row(without.anova, "Residual").sum_sq
    assert row(with_block.anova, "din").F > 3 * row(without.anova, "din").F
    assert "drives" not in " ".join(line for line in metric_findings(with_block) if "Block seed" in line)


def test_position_pairs_design_is_rank_deficient_but_analysed():
    table = pairs_design(1, din_effect={"attn2o": 0.03})
    result = analyse_metric(table, "tinyworld_i", ["din", "dout"], blocks=["seed"])
    assert result.notes and "rank-deficient" in result.notes[0]
    # degrees of freedom from the ranks: 14 estimable columns with the intercept and the seed; dout 4, din 7
    anova = result.anova
    assert (row(anova, "din").df, row(anova, "dout").df, row(anova, "seed").df, row(anova, "Residual").df) == \
        (7, 4, 1, 25)
    assert row(anova, "din").p < 1e-6 and row(anova, "dout").p > 0.05
    pairs = result.pairs["din"].set_index(["level_a", "level_b"])
    # attn2c only meets dout attn2c: its difference from attn2o cannot be told from a dout effect
    assert not pairs.loc[("attn2o", "attn2c"), "estimable"] if ("attn2o", "attn2c") in pairs.index else \
        not pairs.loc[("attn2c", "attn2o"), "estimable"]
    key = ("attn1o", "attn2o") if ("attn1o", "attn2o") in pairs.index else ("attn2o", "attn1o")
    assert pairs.loc[key, "estimable"] and pairs.loc[key, "separated"]


def test_adjusted_comparisons_equal_contrasts_of_the_fit():
    """EMM differences on an additive model equal the coefficient contrasts statsmodels gives, with the same SE."""
    table = crossed(reps=2).drop(index=[1, 8, 20]).reset_index(drop=True)  # unbalanced: EMMs are not raw means
    result = analyse_metric(table, "dino_i", ["din", "method"], blocks=["seed"])
    data, _ = prepare(table, "dino_i", ["din", "method"], ["seed"])
    fit = smf.ols('dino_i ~ C(seed) + C(din, Treatment("attn1i")) + C(method)', data).fit()
    pair = result.pairs["din"].set_index(["level_a", "level_b"]).loc[("attn1i", "attn2o")]
    test = fit.t_test('C(din, Treatment("attn1i"))[T.attn2o] = 0')
    assert -pair["diff"] == pytest.approx(float(test.effect[0]), rel=1e-9)
    assert pair.se == pytest.approx(float(test.sd[0, 0]), rel=1e-9)
    assert pair.p == pytest.approx(float(test.pvalue), rel=1e-6)
    p = result.pairs["din"].p
    np.testing.assert_allclose(result.pairs["din"].p_holm, holm(p))
    levels = result.levels["din"].set_index("level")
    assert levels.emm.notna().all() and not np.allclose(levels.emm, levels["mean"])


@pytest.mark.slow
def test_holm_by_hand_and_equal_to_statsmodels():
    from statsmodels.stats.multitest import multipletests
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.5]), [0.04, 0.09, 0.09, 0.5])
    np.testing.assert_allclose(holm([0.3, 0.6]), [0.6, 0.6])
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 40):
        p = rng.uniform(0, 0.2, n) ** 2
        p[: n // 3] = p[0]  # ties
        np.testing.assert_array_equal(holm(p), multipletests(p, method="holm")[1])
    with_nan = holm([0.01, np.nan, 0.02])  # an untested comparison: not adjusted, not counted
    assert np.isnan(with_nan[1]) and list(with_nan[[0, 2]]) == [0.02, 0.02]


@pytest.mark.slow
def test_partial_eta_sq_interval_covers_the_truth():
    """Over seeded simulated 20-pair studies with a known din effect, the 95 % interval of partial eta² holds the true
    value (its noncentrality mapped the same way) about 95 % of the time."""
    base = pairs_design(0)
    data, _ = prepare(base, "tinyworld_i", ["din", "dout"], ["seed"])
    model = Model(data, "tinyworld_i", ("din", "dout"), ("seed",))
    effect = data.din.map({"attn2o": 0.01, "ffni": -0.005, "attn1o": 0.004}).fillna(0.0).to_numpy()
    sd, rng = 0.005, np.random.default_rng(7)
    # the true noncentrality of din's Type II test: its SS on the noise-free means, over sigma²
    truth_table, _ = type2(model, 0.54 + effect)
    true_nc = row(truth_table, "din").sum_sq / sd ** 2
    df2 = row(truth_table, "Residual").df
    truth = partial_eta_sq(true_nc, 7, df2)
    covered = 0
    for _ in range(200):
        din = row(type2(model, 0.54 + effect + rng.normal(0, sd, len(data)))[0], "din")
        low, high = noncentrality_interval(din.F, 7, df2, 0.95)
        covered += partial_eta_sq(low, 7, df2) <= truth <= partial_eta_sq(high, 7, df2)
    assert 0.9 <= covered / 200 <= 0.99
    # the report's columns are those ends at 1 - 2 alpha: above 0 exactly when the F test is significant at alpha
    model.data["tinyworld_i"] = 0.54 + effect + rng.normal(0, sd, len(data))
    din = row(anova_table(model, alpha=0.05)[0], "din")
    ends = noncentrality_interval(din.F, 7, df2, 0.90)
    assert (din.partial_eta_sq_low, din.partial_eta_sq_high) == tuple(partial_eta_sq(e, 7, df2) for e in ends)


@pytest.mark.slow
def test_partial_eta_sq_interval_excludes_zero_exactly_when_significant():
    for seed in range(12):
        table = pairs_design(seed, din_effect={"attn2o": 0.004}, seed_shift=0.0)
        anova = analyse_metric(table, "tinyworld_i", ["din", "dout"], blocks=["seed"]).anova
        for term in ("din", "dout", "seed"):
            t = row(anova, term)
            assert (t.partial_eta_sq_low > 1e-9) == (t.p < 0.05), (seed, term, t.p, t.partial_eta_sq_low)
            assert t.partial_eta_sq_low <= t.partial_eta_sq_high


@pytest.mark.slow
def test_detectable_effect_has_the_stated_power():
    """An effect of the 'detectable' partial eta² is found about 80 % of the time."""
    data, _ = prepare(crossed(reps=2), "dino_i", ["din", "method"], ["seed"])
    model = Model(data, "dino_i", ("din", "method"), ("seed",))
    anova, _, _ = anova_table(model, alpha=0.05)
    target = row(anova, "din").detectable_partial_eta_sq
    df2 = row(anova, "Residual").df
    nc = target * (3 + df2 + 1) / (1 - target)  # invert lambda / (lambda + df1 + df2 + 1)
    shift = {"attn1i": 1.0, "attn2i": -1.0, "attn2o": 0.0, "ffni": 0.0}
    x = data.din.map(shift).to_numpy(float, copy=True)
    x *= np.sqrt(nc / (x @ x))  # SS of the din effect = nc * sigma² with sigma 1
    rng, hits = np.random.default_rng(3), 0
    for _ in range(300):
        p = row(type2(model, x + rng.normal(0, 1, len(x)))[0], "din").p
        hits += p < 0.05
    assert 0.72 <= hits / 300 <= 0.88


# ---- findings generated from the numbers -------------------------------------------------------------------------
def test_planted_study_names_that_factor_and_no_other():
    """The 20-pair design with 2 seeds; din has an effect (attn2o +0.02, attn2i +0.01), dout none, the seed a shift."""
    table = pairs_design(11, din_effect={"attn2o": 0.02, "attn2i": 0.01})
    (result,) = analyse(table, None, ["din", "dout"])
    findings = metric_findings(result)
    assert driven_by(findings) == {"din"}
    assert any(line.startswith("- dout: not significant") for line in findings)
    assert any(line.startswith("- Top din: attn2o") and "not comparable with 3" in line for line in findings)


@pytest.mark.slow
def test_null_studies_call_significance_at_the_stated_rate():
    """Simulated null studies (no effect anywhere, seeded; three metrics, din and dout, auto interactions): the
    unadjusted tests come out significant in about alpha of the tests, but after the Holm correction over the study's
    tests the report says some factor drives some metric in at most about alpha of the studies (family-wise); it
    calls a design point or level best, or two independent metrics correlated, in at most about alpha of them."""
    alpha, n, unadjusted, tests, studies_with_claims, best, correlated = 0.05, 40, 0, 0, 0, 0, 0
    metrics = ["a_i", "b_t", "c_prior"]
    for seed in range(n):
        table = pairs_design(100 + seed, seed_shift=0.0, metrics=metrics)
        results = analyse(table, metrics, ["din", "dout"], alpha=alpha, blocks=["seed"])
        findings = [line for r in results for line in metric_findings(r)]
        tested = pd.concat([r.anova[r.anova.kind.isin(["factor", "interaction"])] for r in results])
        unadjusted, tests = unadjusted + int((tested.p < alpha).sum()), tests + len(tested)
        assert results[0].family == 3 * 4  # din, dout, din:dout and the design points, for 3 metrics
        studies_with_claims += any(" drives " in line or "is significant for" in line for line in findings)
        best += any("**Best" in line for line in findings)
        correlated += bool(correlations(table, metrics, alpha).significant.any())
    assert 0.02 <= unadjusted / tests <= 0.09, unadjusted / tests  # 360 tests: 18 expected, binomial sd 4.1
    assert studies_with_claims / n <= 0.1 and best / n <= 0.1 and correlated / n <= 0.12


def test_best_only_when_separated():
    far = analyse_metric(crossed(effect={"a": 0.0, "b": 0.01, "c": 0.3, "d": 0.02}), "dino_i", ["din", "method"])
    close = analyse_metric(crossed(effect={"a": 0.0, "b": 0.01, "c": 0.3, "d": 0.3}, sd=0.02), "dino_i",
                           ["din", "method"])
    far_lines, close_lines = metric_findings(far), metric_findings(close)
    assert any(line.startswith("- **Best din: c (EMM") for line in far_lines)
    assert not any("Best din" in line for line in close_lines)
    (top,) = [line for line in close_lines if line.startswith("- Top din:")]
    rank = ranking(close.levels["din"], close.pairs["din"])
    assert rank["top"] in "cd" and rank["not_separated"] == [rank["runner_up"]] and not rank["best"]
    assert top.startswith(f"- Top din: {rank['top']} (EMM") and "not separated from 1 of the other 3" in top
    assert "separated from 2 (a, b)" in top and f"Its lead over the runner-up {rank['runner_up']} is " in top
    # a lower-is-better metric: the lowest level is the top one
    fid = crossed(effect={"a": 0.0, "b": 0.01, "c": -0.3, "d": 0.02}).rename(columns={"dino_i": "fid"})
    assert any(line.startswith("- **Best din: c") for line in metric_findings(analyse_metric(fid, "fid", ["din"])))


@pytest.mark.slow
def test_best_design_point_of_the_pairs_design():
    table = pairs_design(5, pair_effect={("attn2o", "ffni"): 0.05})
    (result,) = analyse(table, None, ["din", "dout"])
    assert any(line.startswith("- **Best design point (din / dout): attn2o / ffni") for line in metric_findings(result))
    close = pairs_design(5, pair_effect={("attn2o", "ffni"): 0.05, ("attn2o", "transo"): 0.048})
    lines = metric_findings(analyse(close, None, ["din", "dout"])[0])
    assert not any("Best design point" in line for line in lines)
    assert any(line.startswith("- Top design point") and "not separated from 1 of the other 19" in line
               for line in lines)


def test_correlations_with_interval_and_p():
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    table = pd.DataFrame({"a_i": x, "b_prior": -0.8 * x + rng.normal(0, 0.5, 40), "c_t": rng.normal(size=40)})
    corr = correlations(table, ["a_i", "b_prior", "c_t"], 0.05)
    first = corr.iloc[0]
    reference = stats.pearsonr(table.a_i, table.b_prior)
    assert first.r == pytest.approx(reference.statistic) and first.p == pytest.approx(reference.pvalue)
    assert (first.low, first.high) == pytest.approx(tuple(reference.confidence_interval(0.95)))
    np.testing.assert_allclose(corr.p_holm, holm(corr.p))
    lines = correlation_sentences(corr, 0.05)
    assert lines[0].startswith("- **a_i and b_prior are negatively correlated**: r = -0.")
    assert lines[1].startswith("- a_i and c_t: no significant correlation (r = ")


# ---- the report and the command line ----------------------------------------------------------------------------
@pytest.mark.slow
def test_report_has_tables_plots_findings_and_links(tmp_path):
    path = tmp_path / "results.csv"
    crossed().assign(clip_t=lambda t: np.random.default_rng(1).normal(0.3, 0.01, len(t))).to_csv(path, index=False)
    report = anova_script.main([str(path), "--factors", "din", "method", "--interactions", "din:method",
                                "--out", str(tmp_path / "analysis")])
    text = report.read_text()
    out = tmp_path / "analysis"
    for name in ("anova-dino_i.csv", "anova-dino_i.md", "levels-dino_i-din.csv", "pairs-dino_i-din.csv",
                 "levels-dino_i-design-point.csv", "pairs-dino_i-design-point.csv", "correlations.csv",
                 "plots/dino_i-by-din.png", "plots/dino_i-by-method.png", "plots/dino_i-din-x-method.png",
                 "plots/dino_i-vs-parameters.png"):
        assert (out / name).is_file(), name
    assert "(plots/dino_i-by-din.png)" in text and "| din | factor |" in text
    assert "- **din drives dino_i**" in text and "Blocks: seed." in text
    assert (out / "plots" / "dino_i-by-din.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob(".tmp-*"))  # atomic writes leave nothing behind


@pytest.mark.slow
def test_factors_default_to_the_sweep_without_seed(tmp_path):
    crossed().to_csv(tmp_path / "results.csv", index=False)
    (tmp_path / "sweep.json").write_text(json.dumps({"spec": {"factors": {"din": {}, "method": {}, "seed": {}}}}))
    report = anova_script.main([str(tmp_path / "results.csv")])
    assert "Factors: din, method. Blocks: seed." in report.read_text()
    report = anova_script.main([str(tmp_path / "results.csv"), "--blocks", "--out", str(tmp_path / "b")])
    assert "Blocks: none." in report.read_text()


@pytest.mark.parametrize("alpha", ["0", "1", "1.5", "-0.1", "nan"])
def test_alpha_must_be_a_probability(alpha, tmp_path, capsys):
    crossed().to_csv(tmp_path / "r.csv", index=False)
    with pytest.raises(SystemExit, match="--alpha must be between 0 and 1"):
        anova_script.main([str(tmp_path / "r.csv"), "--factors", "din", "--alpha", alpha])
    with pytest.raises(AnalysisError, match="between 0 and 1"):
        check_alpha(float(alpha))


@pytest.mark.parametrize("kwargs,message", [
    ({"factors": ["nope"]}, "no column"),
    ({"factors": ["din", "method"], "metrics": ["missing_i"]}, "no column"),
    ({"factors": []}, "no factors"),
    ({"factors": ["din"], "interactions": ["din:zzz"]}, "interaction"),
    ({"factors": ["din"], "blocks": ["din"]}, "named twice"),
    ({"factors": ["din"], "alpha": 0.0}, "between 0 and 1"),
])
def test_bad_input(kwargs, message):
    with pytest.raises(AnalysisError, match=message):
        analyse(crossed(), kwargs.get("metrics"), kwargs["factors"], kwargs.get("interactions", ()),
                kwargs.get("alpha", 0.05), kwargs.get("blocks"))


def test_bad_tables(tmp_path):
    one_level = crossed()
    one_level["method"] = "relu"
    with pytest.raises(AnalysisError, match="fewer than 2 levels"):
        analyse(one_level, ["dino_i"], ["din", "method"])
    with pytest.raises(AnalysisError, match="too few"):
        analyse(crossed().groupby("din").head(1), ["dino_i"], ["din"], blocks=[])
    with pytest.raises(SystemExit, match="results table not found"):
        anova_script.main([str(tmp_path / "none.csv"), "--factors", "din"])
    crossed().to_csv(tmp_path / "r.csv", index=False)
    with pytest.raises(SystemExit, match="pass --factors"):
        anova_script.main([str(tmp_path / "r.csv")])


def test_default_metrics_are_the_columns_evaluate_writes():
    table = pd.DataFrame(columns=["run", "din", "dino_i", "clip_t", "tinyworld_prior", "fid", "train_seconds",
                                  "trainable_parameters"])
    assert default_metrics(table) == ["dino_i", "clip_t", "tinyworld_prior", "fid"]


# ---- interactions, subjects, the study's correction, covariates, the planner -----------------------------------------
def interacting_design(seed: int = 0, reps: int = 3, sd: float = 0.02) -> pd.DataFrame:
    """4 din x 3 method x reps where din matters only under method silu (attn2o +0.1 there): an interaction."""
    rng = np.random.default_rng(seed)
    rows = [{"run": f"{d}-{m}-{r}", "din": d, "method": m, "seed": r,
             "dino_i": 0.5 + (0.1 if (d, m) == ("attn2o", "silu") else 0.0) + rng.normal(0, sd)}
            for d in ("attn1i", "attn2i", "attn2o", "ffni") for m in ("relu", "silu", "sig") for r in range(reps)]
    return pd.DataFrame(rows)


def test_planted_interaction_is_found_and_the_main_effect_claims_say_so():
    table = interacting_design()
    (result,) = analyse(table, ["dino_i"], ["din", "method"])  # interactions: automatic
    assert ("din", "method") in result.model.interactions and row(result.anova, "din:method").p_holm < 0.05
    lines = metric_findings(result)
    text = "\n".join(lines)
    assert ("**the din:method interaction is significant for dino_i: the effect of din depends on method**: F(6, 22)"
            in text)
    assert "Its effect depends on method (significant interaction)" in text
    assert not any(line.startswith("- Top din") or line.startswith("- **Best din:") for line in lines)
    (simple,) = [line for line in lines if line.startswith("- Simple effects of din within each level of method")]
    assert "method = silu: F(3, 22)" in simple and "(significant)" in simple.split("method = silu")[1].split(";")[0]
    assert "(significant)" not in simple.split("method = relu")[1].split(";")[0]
    assert any("Best din within method = silu: attn2o" in line for line in lines)
    # the simple effect of din under silu by hand (balanced): SS of the cell means there over the full model's MSE
    silu = table[table.method == "silu"]
    cells = silu.groupby("din").dino_i.mean()
    ss = 3 * ((cells - cells.mean()) ** 2).sum()
    mse = row(result.anova, "Residual").sum_sq / row(result.anova, "Residual").df
    (test,) = [s.test for s in result.simple[("din", "method")] if s.at == {"method": "silu"}]
    assert test["F"] == pytest.approx(ss / 3 / mse, rel=1e-9) and test["df"] == 3
    # an additive analysis (--interactions alone) would have named din a driver and ranked it on the average
    (additive,) = analyse(table, ["dino_i"], ["din", "method"], interactions=[])
    assert any(line.startswith("- Top din") or "Best din:" in line for line in metric_findings(additive))


def test_pairs_design_interaction_has_the_df_it_has():
    """The 20 pairs x 2 seeds: din:dout is tested with F(6, 19), and a planted pair effect is found as one."""
    table = pairs_design(3, pair_effect={("attn2o", "ffni"): 0.04, ("attn1i", "transo"): -0.03})
    (result,) = analyse(table, None, ["din", "dout"])
    inter = row(result.anova, "din:dout")
    assert (inter.df, row(result.anova, "Residual").df) == (6, 19) and inter.p_holm < 0.05
    assert ("din", "dout") in result.simple and ("dout", "din") in result.simple


def subjects_design(seed: int, subject_shift=(0.0, 0.02, -0.015, 0.03), din_effect=None, by_subject=None,
                    sd: float = 0.005) -> pd.DataFrame:
    """The 20 pairs x 4 subjects x 2 seeds; each subject shifts every metric, din may have an effect (optionally only
    for some subjects)."""
    rng = np.random.default_rng(seed)
    din_effect, rows = din_effect or {}, []
    for k, shift in enumerate(subject_shift):
        for _, i, o in valid_pairs():
            for s in (0, 1):
                effect = din_effect.get(i, 0.0) * (by_subject[k] if by_subject else 1.0)
                rows.append({"run": f"{i}-{o}-{k}-{s}", "din": i, "dout": o, "seed": s, "subject": f"s{k}",
                             "tinyworld_i": 0.54 + shift + effect + rng.normal(0, sd)})
    return pd.DataFrame(rows)


@pytest.mark.slow
def test_planted_subject_effect_is_found_and_taken_out():
    table = subjects_design(0, din_effect={"attn2o": 0.01})
    (result,) = analyse(table, None, ["din", "dout"])  # subject and seed are blocks by default
    assert result.model.blocks == ("seed", "subject") and row(result.anova, "subject").kind == "block"
    subject = row(result.anova, "subject")
    assert subject.p < 1e-10 and subject.df == 3
    lines = metric_findings(result)
    assert any(line.startswith("- Block subject: significant") for line in lines)
    assert driven_by(lines) == {"din"}
    (without,) = analyse(table, None, ["din", "dout"], blocks=["seed"])
    assert row(result.anova, "din").F > 5 * row(without.anova, "din").F  # the block takes the subjects' spread out
    assert "the subject: a fixed block" in anova_script_report(table)


@pytest.mark.slow
def test_an_effect_that_differs_between_subjects_is_found():
    table = subjects_design(1, din_effect={"attn2o": 0.03}, by_subject=(1.0, 1.0, 0.0, 0.0))
    (result,) = analyse(table, None, ["din", "dout"])
    assert ("din", "subject") in result.model.interactions and row(result.anova, "din:subject").p_holm < 1e-6
    lines = metric_findings(result)
    assert any("**the din:subject interaction is significant for tinyworld_i: the effect of din depends on subject**"
               in line for line in lines)
    (simple,) = [line for line in lines if line.startswith("- Simple effects of din within each level of subject")]
    for k, significant in ((0, True), (1, True), (2, False), (3, False)):
        assert ("(significant)" in simple.split(f"subject = s{k}:")[1].split(";")[0]) == significant


def anova_script_report(table, *args):
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as tmp:
        table.to_csv(Path(tmp) / "results.csv", index=False)
        return anova_script.main([str(Path(tmp) / "results.csv"), "--factors", "din", "dout", *args]).read_text()


def test_the_correction_is_applied_over_the_whole_study():
    """On the committed tiny-world study: every factor, interaction and design-point test of the three metrics is one
    Holm family; dout on prior preservation (p = 0.030 in the additive model) is significant only before it."""
    from conftest import REPO
    table = pd.read_csv(REPO / "docs" / "tiny-world-study" / "results.csv")
    results = analyse(table, None, ["din", "dout"], interactions=[])
    tested = [(r.metric, t.term, t.p, t.p_holm) for r in results for t in r.anova.itertuples()
              if t.kind == "factor"] + [(r.metric, "points", r.point_test.p, r.point_test.p_holm) for r in results]
    assert results[0].family == len(tested) == 9
    np.testing.assert_allclose([t[3] for t in tested], holm([t[2] for t in tested]))
    prior = next(r for r in results if r.metric == "tinyworld_prior")
    assert row(prior.anova, "dout").p == pytest.approx(0.0295, abs=5e-4) and row(prior.anova, "dout").p_holm > 0.05
    assert any(line.startswith("- dout: significant only before the correction for the study's 9 tests")
               for line in metric_findings(prior))


def test_the_committed_study_recomputes_with_this_code():
    """Where the method did not change (the additive model with the seed block), the numbers published in
    docs/tiny-world-study before this analysis grew the study-wide correction and interactions recompute."""
    from conftest import REPO
    table = pd.read_csv(REPO / "docs" / "tiny-world-study" / "results.csv")
    published = {("tinyworld_i", "din"): (5.366, 7.62e-04, 0.4581), ("tinyworld_i", "dout"): (4.586, 0.006479, 0.2237),
                 ("tinyworld_prior", "din"): (26.7, 4.3e-10, 0.63), ("tinyworld_t", "dout"): (2.91, 0.042, 0.26)}
    results = {r.metric: r for r in analyse(table, None, ["din", "dout"], interactions=[])}
    for (metric, term), (f_value, p, eta) in published.items():
        t = row(results[metric].anova, term)
        assert (t.F, t.p, t.eta_sq) == (pytest.approx(f_value, rel=2e-3), pytest.approx(p, rel=2e-2),
                                        pytest.approx(eta, rel=1e-2)), (metric, term)


def test_a_covariate_is_tested_as_statsmodels_does():
    rng = np.random.default_rng(4)
    table = crossed(reps=3)
    table["trainable_parameters"] = rng.integers(20000, 80000, len(table))
    table["dino_i"] += 2e-6 * table["trainable_parameters"]
    (result,) = analyse(table, ["dino_i"], ["din", "method"], interactions=[], covariates=["trainable_parameters"])
    theirs = anova_lm(smf.ols("dino_i ~ C(seed) + trainable_parameters + C(din) + C(method)", table).fit(), typ=2)
    ours = result.anova.set_index("term")
    for term, name in (("trainable_parameters", "trainable_parameters"), ("din", "C(din)"), ("method", "C(method)")):
        assert ours.loc[term, "sum_sq"] == pytest.approx(theirs.loc[name, "sum_sq"], rel=1e-9)
        assert ours.loc[term, "p"] == pytest.approx(theirs.loc[name, "PR(>F)"], rel=1e-6)
    assert ours.loc["trainable_parameters", "kind"] == "covariate" and ours.loc["trainable_parameters", "p_holm"] < 0.05
    assert any(line.startswith("- **trainable_parameters drives dino_i**") for line in metric_findings(result))
    # confounded with position, as in the 20 pairs (ResBlock adapters have more parameters): no df of its own
    confounded = crossed(reps=2)  # trainable_parameters is 1000 x the din level's index
    (r,) = analyse(confounded, ["dino_i"], ["din", "method"], interactions=[], covariates=["trainable_parameters"])
    assert row(r.anova, "trainable_parameters").df == 0 or row(r.anova, "din").df < 3
    with pytest.raises(AnalysisError, match="covariate trainable_parameters is not a finite number"):
        analyse(table.assign(trainable_parameters="n/a"), ["dino_i"], ["din"], covariates=["trainable_parameters"])


@pytest.mark.slow
def test_planner_detects_what_it_promises():
    """A pilot with a known seed-to-seed sd; the plan's seeds per design point detect the asked difference between two
    design points about 80% of the time in simulated studies analysed as the report analyses them, and half the
    seeds clearly less often."""
    from ldm.evaluation.planning import pilot, plan_row, smallest_plans
    sd, diff, levels = 0.01, 0.02, ("a", "b", "c", "d")

    def study(seeds, seed, effect=0.0):
        rng = np.random.default_rng(seed)
        return pd.DataFrame([{"run": f"{lv}-{s}", "din": lv, "seed": s,
                              "x_i": 0.5 + (effect if lv == "b" else 0.0) + rng.normal(0, sd)}
                             for lv in levels for s in range(seeds)])
    p = pilot(analyse_metric(study(8, 0), "x_i", ["din"], blocks=["seed"]))
    assert p.points == 4 and p.tau2 is None and 0.3 * sd ** 2 < p.sigma2 < 2 * sd ** 2
    p.sigma2 = sd ** 2  # plan on the true variance, so the check below is about the formula, not the pilot's luck
    seeds = int(smallest_plans(p, diff, 0.05, subjects=[1]).seeds.iloc[0])
    assert plan_row(p, 1, seeds, 0.05)["se"] == pytest.approx(np.sqrt(2 * sd ** 2 / seeds))

    def power(n):
        hits = 0
        for k in range(150):
            r = analyse_metric(study(n, 1000 + k, diff), "x_i", ["din"], blocks=["seed"])
            pairs = r.pairs["din"].set_index(["level_a", "level_b"])
            hits += bool(pairs.loc[("a", "b"), "separated"])
        return hits / 150
    assert 0.7 <= power(seeds) <= 0.97 and power(max(2, seeds // 2)) < 0.6


@pytest.mark.slow
def test_planner_subject_variance_sets_a_floor_and_the_command_line(tmp_path, capsys):
    from ldm.evaluation.planning import pilot, plan_row
    tau, sd = 0.01, 0.004
    rng = np.random.default_rng(5)
    rows = []
    for k in range(6):
        shifts = rng.normal(0, tau, 6)  # each subject moves each design point differently
        rows += [{"run": f"{d}-{k}-{s}", "din": f"p{d}", "subject": f"s{k}", "seed": s,
                  "x_i": 0.5 + shifts[d] + rng.normal(0, sd)} for d in range(6) for s in range(4)]
    table = pd.DataFrame(rows)
    p = pilot(analyse_metric(table, "x_i", ["din"], blocks=["seed", "subject"]))
    assert p.subjects == 6 and p.seeds == 4 and 0.5 < np.sqrt(p.tau2) / tau < 1.6
    # more seeds cannot replace subjects: one subject never gets below the subject-to-subject floor
    assert plan_row(p, 1, 1000, 0.05)["se"] > np.sqrt(2 * p.tau2)
    assert plan_row(p, 4, 3, 0.05)["mdd"] < plan_row(p, 1, 12, 0.05)["mdd"]  # same runs, more subjects: better
    table.to_csv(tmp_path / "results.csv", index=False)
    anova_script.main([str(tmp_path / "results.csv"), "--factors", "din", "--plan", "0.02", "--out",
                       str(tmp_path / "a")])
    out = capsys.readouterr().out
    assert out.startswith("- To detect 0.02 on x_i between two design points: ") and "subject(s) x" in out
    assert "## Planning the next study" in (tmp_path / "a" / "report.md").read_text()
    assert (tmp_path / "a" / "plan-x_i.csv").is_file() and (tmp_path / "a" / "findings.md").is_file()
    for bad in ("0", "-1", "nan"):
        with pytest.raises(SystemExit):
            anova_script.main([str(tmp_path / "results.csv"), "--factors", "din", "--plan", bad])


@pytest.mark.slow
def test_the_committed_study_findings_are_generated(tmp_path):
    """docs/tiny-world-study/findings.md and the findings of report.md are exactly what the report machinery writes
    from the committed results.csv with the study's settings (scripts/tiny_world_study.sh): no hand-edited claim."""
    from conftest import REPO
    docs = REPO / "docs" / "tiny-world-study"
    anova_script.main([str(docs / "results.csv"), "--factors", "din", "dout", "--plan", "0.015", "--out",
                       str(tmp_path / "a")])
    assert (tmp_path / "a" / "findings.md").read_text() == (docs / "findings.md").read_text()
    ours, committed = ((d / "report.md").read_text().split("\n## tinyworld_i")[0] for d in (tmp_path / "a", docs))
    assert ours == committed
    script = (REPO / "scripts" / "tiny_world_study.sh").read_text()
    assert '--factors $FACTORS --plan "$PLAN"' in script and "PLAN=${PLAN:-0.015}" in script
    assert "FACTORS=${FACTORS:-din dout}" in script


def test_difference_sentence_claims_only_what_the_interval_shows():
    from scipy import stats
    from ldm.evaluation.findings import difference_sentence
    unet, adapter = [0.640, 0.636, 0.641], [0.568, 0.571, 0.566]
    line = difference_sentence("subject fidelity", "whole UNet", unet, "adapter", adapter)
    reference = stats.ttest_ind(unet, adapter, equal_var=False)
    low, high = reference.confidence_interval(0.95)
    assert line.startswith("- **whole UNet is higher than adapter on subject fidelity**: difference 0.0707 (95% CI ")
    assert f"CI {low:.3g} to {high:.3g}" in line and f"Welch t({reference.df:.3g})" in line
    # the README's class-similarity case: 0.750 vs 0.765 from two seeds each is no "better on every count"
    close = difference_sentence("class similarity", "whole UNet", [0.74, 0.76], "adapter", [0.77, 0.76])
    assert close.startswith("- whole UNet and adapter are not separated on class similarity: difference -0.015")
    assert "too few for an interval" in difference_sentence("x", "a", [0.1], "b", [0.2, 0.3])


def test_tiny_world_report_compares_the_variants_with_adjusted_intervals():
    """The tiny-world report's claims about its DreamBooth table (the whole UNet against the adapter, the prior on
    against off) come from the seeds' values with Welch intervals, Bonferroni over all its comparisons: a planted
    difference is claimed, a small one over few seeds is not."""
    from ldm.tinyworld.report import ADAPTER, COLUMNS, NO_PRIOR, UNET, comparison_lines
    rng = np.random.default_rng(3)

    def rows(shift):
        return [{k: 0.5 + (shift if k == "subject_fidelity" else 0.0) + rng.normal(0, 0.003) for k in COLUMNS}
                for _ in range(4)]
    lines = comparison_lines({"base model": rows(0.0)[:1], ADAPTER: rows(0.0), NO_PRIOR: rows(0.002), UNET: rows(0.07)})
    assert len(lines) == 2 * len(COLUMNS) and all("(99.5% CI " in line for line in lines)
    claims = [line for line in lines if line.startswith("- **")]
    assert claims == [next(line for line in lines if f"is higher than {ADAPTER} on subject fidelity" in line)]
    assert comparison_lines({ADAPTER: rows(0.0)}) == []  # nothing to compare
