"""Statistics across cases: bootstrap CIs, the Wilcoxon sample-size floor, paired comparisons, method tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from stego_core.evaluation.stats import (
    bootstrap_ci,
    compare_methods,
    comparison_markdown,
    paired_comparison,
    wilcoxon_min_p,
)

# ------------------------------------------------------------------------------------------- bootstrap CI


def test_bootstrap_ci_is_the_percentile_interval_of_resampled_means():
    values = np.array([0.61, 0.70, 0.64, 0.75, 0.68])
    rng = np.random.default_rng(3)
    means = values[rng.integers(0, 5, size=(2000, 5))].mean(axis=1)
    expected = tuple(np.percentile(means, [2.5, 97.5]))
    assert bootstrap_ci(values, n_boot=2000, seed=3) == pytest.approx(expected, abs=0, rel=1e-12)


def test_bootstrap_ci_known_two_point_case():
    # resampled means of [0, 1] are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the 95 % interval is [0, 1]
    assert bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    # and the 40 % interval is the middle atom
    assert bootstrap_ci([0.0, 1.0], ci=0.4) == (0.5, 0.5)


def test_bootstrap_ci_matches_the_normal_interval_for_many_values():
    values = np.random.default_rng(0).normal(10.0, 2.0, size=400)
    low, high = bootstrap_ci(values, n_boot=4000)
    half_width = 1.96 * values.std() / math.sqrt(values.size)
    assert low == pytest.approx(values.mean() - half_width, abs=0.1 * half_width)
    assert high == pytest.approx(values.mean() + half_width, abs=0.1 * half_width)


def test_bootstrap_ci_seeds_levels_and_chunks():
    values = [0.2, 0.5, 0.4, 0.9, 0.3, 0.6]
    assert bootstrap_ci(values, seed=5) == bootstrap_ci(values, seed=5)
    # with few resamples the quantiles fall between the resampled means, which depend on the seed
    assert bootstrap_ci(values, n_boot=50, seed=5) != bootstrap_ci(values, n_boot=50, seed=6)
    narrow, wide = bootstrap_ci(values, ci=0.5), bootstrap_ci(values, ci=0.99)
    assert wide[0] < narrow[0] < np.mean(values) < narrow[1] < wide[1]
    # many values: resampled in several chunks, still reproducible and around the mean
    many = np.random.default_rng(1).random(300_000)
    low, high = bootstrap_ci(many, n_boot=8, seed=2)
    assert (low, high) == bootstrap_ci(many, n_boot=8, seed=2)
    assert low < high and abs(low - 0.5) < 0.01 and abs(high - 0.5) < 0.01


def test_bootstrap_ci_degenerate_inputs():
    assert bootstrap_ci([0.7]) == (0.7, 0.7)
    assert bootstrap_ci([0.3, 0.3, 0.3]) == (0.3, 0.3)
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    assert all(math.isnan(v) for v in bootstrap_ci([math.nan, math.nan]))
    assert bootstrap_ci([0.2, math.nan, 0.8, 0.5]) == bootstrap_ci([0.2, 0.8, 0.5])  # NaN dropped


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"values": [1.0, math.inf]}, "infinite"),
        ({"values": [[1.0, 2.0]]}, "1D"),
        ({"values": [1.0, 2.0], "n_boot": 0}, "n_boot"),
        ({"values": [1.0, 2.0], "n_boot": 2.5}, "n_boot"),
        ({"values": [1.0, 2.0], "ci": 1.0}, "ci"),
        ({"values": [1.0, 2.0], "ci": 0.0}, "ci"),
    ],
)
def test_bootstrap_ci_refuses_bad_input(kwargs, match):
    values = kwargs.pop("values")
    with pytest.raises(ValueError, match=match):
        bootstrap_ci(values, **kwargs)


# ------------------------------------------------------------------------------------- Wilcoxon p floor


def test_wilcoxon_min_p_is_scipys_most_extreme_outcome():
    assert wilcoxon_min_p(5) == 0.0625  # with 5 cases no two-sided p is below 0.06
    assert wilcoxon_min_p(6) == 0.03125
    assert wilcoxon_min_p(0) == wilcoxon_min_p(1) == 1.0
    for n in range(1, 10):
        all_positive = np.arange(1, n + 1) / 10  # distinct, all one sign: the most extreme outcome
        assert scipy_stats.wilcoxon(all_positive).pvalue == pytest.approx(wilcoxon_min_p(n))
    with pytest.raises(ValueError, match="non-negative"):
        wilcoxon_min_p(-1)


# ------------------------------------------------------------------------------------ paired comparison


def test_paired_comparison_n5_cannot_be_significant():
    a = [0.80, 0.75, 0.90, 0.70, 0.85]
    b = [0.70, 0.70, 0.80, 0.65, 0.80]
    result = paired_comparison(a, b)
    assert result["n"] == result["n_nonzero"] == 5
    assert result["mean_diff"] == pytest.approx(0.07)
    assert result["p_value"] == 0.0625 and result["min_p"] == 0.0625
    assert "0.0625" in result["note"] and "cannot show a difference" in result["note"]
    assert result["ci_low"] <= result["mean_diff"] <= result["ci_high"]
    assert result["ci_low"] >= 0.05 - 1e-12 and result["ci_high"] <= 0.10 + 1e-12  # within the differences
    swapped = paired_comparison(b, a)  # a - b: the sign follows the order
    assert swapped["mean_diff"] == pytest.approx(-0.07) and swapped["p_value"] == 0.0625


def test_paired_comparison_enough_cases_has_no_note():
    b = np.linspace(0.5, 0.8, 10)
    a = b + np.arange(1, 11) / 100
    result = paired_comparison(a, b, seed=4)
    assert result["p_value"] == pytest.approx(2 / 2**10)
    assert result["note"] == ""
    assert result == paired_comparison(a, b, seed=4)  # seeded
    assert result["mean_diff"] == pytest.approx(0.055)


def test_paired_comparison_all_equal_differences_and_ties():
    b = [0.5, 0.25, 0.75, 0.125, 0.625]
    same = paired_comparison(b, b)
    assert same["p_value"] == 1.0 and same["mean_diff"] == 0.0
    assert (same["ci_low"], same["ci_high"]) == (0.0, 0.0)
    assert same["n_nonzero"] == 0 and "all 5 paired differences are zero" in same["note"]

    shifted = paired_comparison([v + 0.25 for v in b] * 2, b * 2)  # 10 identical differences: all tied
    assert shifted["mean_diff"] == 0.25 and (shifted["ci_low"], shifted["ci_high"]) == (0.25, 0.25)
    assert 0 < shifted["p_value"] < 0.05

    some_zero = paired_comparison([0.5, 0.6, 0.7, 0.8, 0.9, 1.0], [0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    assert some_zero["n"] == 6 and some_zero["n_nonzero"] == 5
    assert some_zero["min_p"] == 0.0625
    assert "1 of 6 differences are zero" in some_zero["note"]


def test_paired_comparison_nan_pairs_and_empty():
    result = paired_comparison([0.9, math.nan, 0.8, 0.7], [0.5, 0.5, math.nan, 0.6])
    assert result["n"] == 2 and result["mean_diff"] == pytest.approx(0.25)
    assert result["min_p"] == 0.5
    empty = paired_comparison([], [])
    assert empty["n"] == 0 and math.isnan(empty["p_value"]) and math.isnan(empty["mean_diff"])
    assert "no paired cases" in empty["note"]
    with pytest.raises(ValueError, match="equal length"):
        paired_comparison([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="alpha"):
        paired_comparison([1.0], [2.0], alpha=0.0)


# ---------------------------------------------------------------------------------- comparison tables

TABLE = {
    "otsu": {"c1": 0.60, "c2": 0.55, "c3": 0.70, "c4": 0.50, "c5": 0.65},
    "stego": {"c1": 0.70, "c2": 0.65, "c3": 0.72, "c4": 0.60, "c5": 0.75},
    "frangi": {"c1": 0.40, "c3": math.nan, "c5": 0.45},
}


def test_compare_methods_summaries_and_best():
    rows = compare_methods(TABLE)
    assert [row["method"] for row in rows] == ["otsu", "stego", "frangi"]  # table order
    otsu, stego, frangi = rows
    assert stego["is_best"] and not otsu["is_best"] and not frangi["is_best"]
    values = np.array(list(TABLE["otsu"].values()))
    assert otsu["n"] == 5
    assert otsu["mean"] == pytest.approx(values.mean())
    assert otsu["std"] == pytest.approx(values.std(ddof=0))
    assert otsu["median"] == pytest.approx(0.60)
    assert (otsu["ci_low"], otsu["ci_high"]) == bootstrap_ci(values)
    assert otsu["ci"] == 0.95
    # the paired comparison is against the best, over common cases, method minus best
    direct = paired_comparison(values, list(TABLE["stego"].values()))
    assert otsu["diff_mean"] == pytest.approx(direct["mean_diff"]) == pytest.approx(-0.084)
    assert otsu["p_value"] == direct["p_value"] == 0.0625
    assert otsu["n_paired"] == 5 and "0.0625" in otsu["note"]
    # frangi: NaN dropped, two cases in common with stego
    assert frangi["n"] == 2 and frangi["n_paired"] == 2
    assert frangi["diff_mean"] == pytest.approx(((0.40 - 0.70) + (0.45 - 0.75)) / 2)
    # the best row compares with nothing
    assert stego["note"] == "best" and stego["n_paired"] == 5
    assert math.isnan(stego["diff_mean"]) and math.isnan(stego["p_value"])


def test_compare_methods_lower_is_better_ties_and_empty_methods():
    hd95 = {"a": {"x": 3.0, "y": 5.0}, "b": {"x": 2.0, "y": 4.0}, "c": {"x": math.nan}}
    rows = compare_methods(hd95, higher_is_better=False)
    assert [row["is_best"] for row in rows] == [False, True, False]
    assert rows[0]["diff_mean"] == 1.0  # a - b: positive is worse when lower is better
    assert rows[2]["n"] == 0 and math.isnan(rows[2]["mean"]) and math.isnan(rows[2]["ci_low"])
    assert rows[2]["n_paired"] == 0 and "no paired cases" in rows[2]["note"]
    tie = compare_methods({"first": {"x": 0.5, "y": 0.7}, "second": {"x": 0.7, "y": 0.5}})
    assert [row["is_best"] for row in tie] == [True, False]
    none = compare_methods({"a": {"x": math.nan}})
    assert not none[0]["is_best"] and none[0]["note"] == "no method has values"
    with pytest.raises(ValueError, match="empty"):
        compare_methods({})


def test_compare_methods_is_seeded():
    assert compare_methods(TABLE, seed=1) == compare_methods(TABLE, seed=1)
    one, two = compare_methods(TABLE, seed=1, n_boot=50), compare_methods(TABLE, seed=2, n_boot=50)
    assert (one[0]["ci_low"], one[0]["ci_high"]) != (two[0]["ci_low"], two[0]["ci_high"])


def test_comparison_markdown():
    text = comparison_markdown(compare_methods(TABLE), "dice")
    lines = text.splitlines()
    assert lines[0].startswith("**dice** across cases")
    header = next(i for i, line in enumerate(lines) if line.startswith("| method"))
    table = lines[header : header + 5]
    assert len(table) == 5 and all(line.startswith("|") and line.endswith("|") for line in table)
    assert all(line.count("|") == 9 for line in table)  # 8 columns: no Wilcoxon p with 5 pairs
    assert "95 % CI" in table[0] and "Wilcoxon" not in table[0]
    assert table[2].startswith("| otsu | 5 | 0.6000 | 0.0707 | 0.6000 | [")
    assert table[2].endswith("| -0.0840 | [" + table[2].split("| -0.0840 | [")[1])
    assert table[3].startswith("| **stego** (best) | 5 |") and table[3].endswith("| — | — |")
    assert table[4].startswith("| frangi | 2 |") and table[4].endswith("| — |")  # no CI of 2 values
    said = lines[header + 6]
    assert said.startswith("No Wilcoxon test: with n = 5 cases no two-sided p can be below 0.0625")
    assert "No 95 % CI where n < 3" in said
    assert not [line for line in lines if line.startswith("- ")]  # no per-method note repeating it
    assert text.endswith("\n")
    with pytest.raises(ValueError, match="empty"):
        comparison_markdown([], "dice")


def test_comparison_markdown_tests_from_six_pairs_and_says_one_value_in_one_sentence():
    six = {"otsu": {f"c{i}": 0.5 + 0.01 * i for i in range(6)}, "stego": {f"c{i}": 0.7 + 0.01 * i for i in range(6)}}
    lines = comparison_markdown(compare_methods(six), "dice").splitlines()
    assert lines[2].endswith("| Wilcoxon p |") and lines[4].endswith("| 0.0312 |")
    one = comparison_markdown(compare_methods({"otsu": {"a": 0.5}, "stego": {"a": 0.7}}), "dice")
    assert one == "**dice** across cases: n = 1 case: no spread, interval or test across cases (they need at least 2 " \
                  "cases, a CI 3).\n"
