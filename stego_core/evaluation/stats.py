"""Statistics across cases: bootstrap confidence intervals and paired comparisons of methods.

A comparison of segmentation methods scores each method on the same cases (volumes), so the unit of
replication is the case and the comparisons are paired:

- :func:`bootstrap_ci`: percentile bootstrap CI of a mean over cases (Efron & Tibshirani 1993, ch. 13).
- :func:`paired_comparison`: the mean of the per-case differences a - b, its bootstrap CI, and the two-sided
  Wilcoxon signed-rank p-value (``scipy.stats.wilcoxon``), with a note when there are too few cases for the
  test to reach significance at all (:func:`wilcoxon_min_p`: with 5 cases no two-sided p is below 0.0625).
- :func:`compare_methods`: one row per method (n, mean, std, median, CI) and its paired comparison against
  the best method by mean; :func:`comparison_markdown` renders the rows as a Markdown table.
- :func:`comparison_tables`: a per-case table of several metrics (method -> case -> metric -> value) as the
  ``comparison.csv`` text and the ``comparison.md`` text (one :func:`comparison_markdown` section per metric),
  shared by the pipeline, the ablation and the sweep parent runs.

Missing values
--------------
NaN marks a score that does not exist for a case (for example a radius bin the label does not have): every
function here drops NaN values (and, for pairs, a pair with a NaN on either side) and reports the ``n`` it
actually used. Infinite values are refused (a mean with an ``inf`` has no bootstrap).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats as _scipy_stats

from stego_core._checks import check_range
from stego_core._markdown import cell
from stego_core._markdown import row as md_row

__all__ = [
    "bootstrap_ci",
    "compare_methods",
    "comparison_markdown",
    "comparison_tables",
    "no_test_sentence",
    "paired_comparison",
    "too_few",
    "wilcoxon_min_p",
]

#: Resampled values drawn per chunk by :func:`bootstrap_ci` (bounds its memory for long value lists).
_CHUNK_VALUES = 1_000_000


def _values(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    """1D float64 array of the non-NaN values; refuses other shapes and infinities."""
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1D sequence of numbers; got shape {array.shape}")
    if np.isinf(array).any():
        raise ValueError(f"{name} contains {int(np.isinf(array).sum())} infinite values; expected finite or NaN")
    return array[~np.isnan(array)]


def _check_bootstrap(n_boot: int, ci: float) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer; got {n_boot!r}")
    check_range(ci, "ci", 0.0, 1.0, low_inclusive=False, high_inclusive=False)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, *, n_boot: int = 10000, ci: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean.

    ``n_boot`` resamples of the n values are drawn with replacement (``numpy.random.default_rng(seed)``); the
    interval is the (1 - ci) / 2 and (1 + ci) / 2 quantiles (``np.percentile``, linear interpolation) of their
    means.

    Parameters
    ----------
    values : 1D sequence of float
        One value per case; NaN values are dropped.
    n_boot : int, keyword-only
        Number of bootstrap resamples.
    ci : float in (0, 1), keyword-only
        Confidence level.
    seed : int, keyword-only
        Seed of the resampling: the same values and seed give the same interval.

    Returns
    -------
    low, high : float
        ``(nan, nan)`` when no value is left; ``(v, v)`` for a single value or identical values. The percentile
        bootstrap is too narrow for a handful of cases (it cannot see beyond the observed spread); read it with
        the ``n`` beside it.

    References
    ----------
    .. [1] Efron B., Tibshirani R. J., "An Introduction to the Bootstrap", Chapman & Hall, 1993, ch. 13.

    Examples
    --------
    >>> bootstrap_ci([0.5, 0.5, 0.5])
    (0.5, 0.5)
    >>> low, high = bootstrap_ci([0.61, 0.70, 0.64, 0.75, 0.68], seed=1)
    >>> bool(0.61 < low < 0.676 < high < 0.75)  # around the mean 0.676, inside the data's range
    True
    """
    _check_bootstrap(n_boot, ci)
    data = _values(values, "values")
    n = data.size
    if n == 0:
        return math.nan, math.nan
    if np.all(data == data[0]):
        return float(data[0]), float(data[0])
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    rows = max(1, _CHUNK_VALUES // n)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        means[start:stop] = data[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    low, high = np.percentile(means, [50.0 * (1.0 - ci), 50.0 * (1.0 + ci)])
    return float(low), float(high)


def wilcoxon_min_p(n: int) -> float:
    """Smallest two-sided p-value the exact Wilcoxon signed-rank test can give with ``n`` non-zero differences.

    The most extreme outcome (all n differences of one sign) has probability 2^-n under the null hypothesis,
    so the two-sided p is at least 2 * 2^-n = 2^(1 - n): 1.0 for n = 1, 0.0625 for n = 5, below 0.05 only
    from n = 6 on.

    Parameters
    ----------
    n : int >= 0
        Number of non-zero paired differences.

    Returns
    -------
    float
        ``min(1, 2 ** (1 - n))``; 1.0 for n = 0 (no evidence at all).

    Examples
    --------
    >>> wilcoxon_min_p(5), wilcoxon_min_p(6)
    (0.0625, 0.03125)
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer; got {n!r}")
    return min(1.0, 2.0 ** (1 - int(n)))


def paired_comparison(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    n_boot: int = 10000,
    ci: float = 0.95,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, float | int | str]:
    """Paired comparison of two methods scored on the same cases: a - b.

    The differences d_i = a_i - b_i (pairs with a NaN on either side dropped) give the mean difference, its
    percentile bootstrap CI (:func:`bootstrap_ci`), and the two-sided Wilcoxon signed-rank test of "d is
    symmetric about 0" (``scipy.stats.wilcoxon``, ``zero_method="wilcox"``: zero differences are dropped;
    scipy picks the exact distribution for small samples without ties, else the normal approximation).

    Parameters
    ----------
    a, b : 1D sequences of float, equal length
        Scores of the two methods, paired by position (case i of ``a`` is case i of ``b``).
    n_boot, ci, seed : keyword-only
        As in :func:`bootstrap_ci`, for the CI of the mean difference.
    alpha : float in (0, 1), keyword-only
        Significance level the ``note`` measures the sample size against.

    Returns
    -------
    dict
        ``n`` (pairs used), ``n_nonzero`` (non-zero differences, the test's sample size), ``mean_diff``,
        ``ci_low``, ``ci_high``, ``p_value``, ``min_p`` (:func:`wilcoxon_min_p` of ``n_nonzero``) and
        ``note`` (str, empty when there is nothing to say). No pairs: NaN statistics. All differences zero:
        ``p_value`` = 1.0 and a note (the test is not run). When ``min_p`` > ``alpha`` the note says that no
        outcome could be significant: the p-value cannot separate the methods, the mean difference and its CI
        are what there is to read.

    Examples
    --------
    >>> r = paired_comparison([0.80, 0.75, 0.90, 0.70, 0.85], [0.70, 0.70, 0.80, 0.65, 0.80])
    >>> round(r["mean_diff"], 4), r["p_value"], r["min_p"]
    (0.07, 0.0625, 0.0625)
    >>> print(r["note"][:101])
    n = 5 non-zero paired differences: the smallest two-sided Wilcoxon p attainable is 0.0625 > alpha = 0
    """
    _check_bootstrap(n_boot, ci)
    check_range(alpha, "alpha", 0.0, 1.0, low_inclusive=False, high_inclusive=False)
    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a_arr.ndim != 1 or a_arr.shape != b_arr.shape:
        raise ValueError(f"a and b must be 1D of equal length; got shapes {a_arr.shape} and {b_arr.shape}")
    keep = ~(np.isnan(a_arr) | np.isnan(b_arr))
    diff = _values(a_arr[keep] - b_arr[keep], "a - b")
    n = int(diff.size)
    n_nonzero = int(np.count_nonzero(diff))
    out: dict[str, float | int | str] = {
        "n": n,
        "n_nonzero": n_nonzero,
        "mean_diff": math.nan,
        "ci_low": math.nan,
        "ci_high": math.nan,
        "p_value": math.nan,
        "min_p": wilcoxon_min_p(n_nonzero),
        "note": "",
    }
    if n == 0:
        out["note"] = "no paired cases: nothing to compare"
        return out
    out["mean_diff"] = float(diff.mean())
    out["ci_low"], out["ci_high"] = bootstrap_ci(diff, n_boot=n_boot, ci=ci, seed=seed)
    if n_nonzero == 0:
        out["p_value"] = 1.0
        out["note"] = f"all {n} paired differences are zero: no difference to test (p = 1)"
        return out
    with warnings.catch_warnings():  # small-sample and tie warnings: the note says what matters
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        result = _scipy_stats.wilcoxon(diff, zero_method="wilcox", alternative="two-sided")
    out["p_value"] = float(result.pvalue)
    notes = []
    if out["min_p"] > alpha:
        notes.append(
            f"n = {n_nonzero} non-zero paired differences: the smallest two-sided Wilcoxon p attainable is "
            f"{out['min_p']:.4g} > alpha = {alpha:g}, so the test cannot show a difference at this level; read "
            "the mean difference and its CI."
        )
    if n_nonzero < n:
        notes.append(f"{n - n_nonzero} of {n} differences are zero and were dropped by the test.")
    out["note"] = " ".join(notes)
    return out


def compare_methods(
    table: Mapping[str, Mapping[str, float]],
    *,
    higher_is_better: bool = True,
    n_boot: int = 10000,
    ci: float = 0.95,
    seed: int = 0,
    alpha: float = 0.05,
) -> list[dict[str, float | int | str | bool]]:
    """Per-method summary of one metric across cases, each method compared with the best one.

    Parameters
    ----------
    table : mapping method -> (mapping case id -> value)
        One metric's per-case values for every method. Methods may miss cases; NaN values are dropped.
    higher_is_better : bool, keyword-only
        Whether the best method has the highest mean (Dice, clDice, recall) or the lowest (HD95, ASSD,
        Betti errors).
    n_boot, ci, seed, alpha : keyword-only
        As in :func:`paired_comparison` (the same seed for every method's resampling).

    Returns
    -------
    list of dict
        One row per method, in ``table`` order, with ``method``, ``n``, ``mean``, ``std`` (population,
        ``ddof=0``, as in :func:`stego_core.evaluation.metrics.summarize`), ``median``, ``ci_low``, ``ci_high``
        (:func:`bootstrap_ci` of the mean), ``ci`` (the level), ``is_best``; and the paired comparison against
        the best method over the cases both have: ``n_paired``, ``diff_mean`` (this method minus the best:
        negative is worse when higher is better), ``diff_ci_low``, ``diff_ci_high``, ``p_value``, ``min_p`` and
        ``note``. The best method is the one with the best mean among those with values (the first in
        ``table`` order on a tie); its own comparison fields are NaN, with the note ``"best"``. A method
        without values has NaN statistics.

    Raises
    ------
    ValueError
        If ``table`` is empty.

    Examples
    --------
    >>> table = {"otsu": {"a": 0.60, "b": 0.55, "c": 0.70},
    ...          "stego": {"a": 0.70, "b": 0.65, "c": 0.72}}
    >>> rows = compare_methods(table, n_boot=1000)
    >>> [(r["method"], r["n"], round(r["mean"], 4), r["is_best"]) for r in rows]
    [('otsu', 3, 0.6167, False), ('stego', 3, 0.69, True)]
    >>> round(rows[0]["diff_mean"], 4), rows[0]["p_value"]
    (-0.0733, 0.25)
    """
    if not table:
        raise ValueError("table is empty; expected at least one method with per-case values")
    summaries: dict[str, dict[str, float]] = {}
    for method, cases in table.items():
        values = {str(case): float(v) for case, v in cases.items() if not math.isnan(float(v))}
        summaries[method] = values
    rows: list[dict[str, float | int | str | bool]] = []
    for method, values in summaries.items():
        data = _values(list(values.values()), f"table[{method!r}]")
        low, high = bootstrap_ci(data, n_boot=n_boot, ci=ci, seed=seed)
        rows.append({
            "method": method,
            "n": int(data.size),
            "mean": float(data.mean()) if data.size else math.nan,
            "std": float(data.std()) if data.size else math.nan,
            "median": float(np.median(data)) if data.size else math.nan,
            "ci_low": low,
            "ci_high": high,
            "ci": float(ci),
            "is_best": False,
        })
    scored = [row for row in rows if row["n"]]
    best = None
    if scored:
        pick = max if higher_is_better else min
        best = pick(scored, key=lambda row: row["mean"])  # first one on a tie
        best["is_best"] = True
    best_values = summaries[best["method"]] if best is not None else {}
    for row in rows:
        comparison = {"n_paired": 0, "diff_mean": math.nan, "diff_ci_low": math.nan, "diff_ci_high": math.nan,
                      "p_value": math.nan, "min_p": math.nan, "note": ""}
        if best is None:
            comparison["note"] = "no method has values"
        elif row is best:
            comparison["n_paired"] = int(row["n"])
            comparison["note"] = "best"
        else:
            values = summaries[row["method"]]
            common = [case for case in best_values if case in values]  # the best method's case order
            result = paired_comparison([values[c] for c in common], [best_values[c] for c in common],
                                       n_boot=n_boot, ci=ci, seed=seed, alpha=alpha)
            comparison.update(n_paired=result["n"], diff_mean=result["mean_diff"], diff_ci_low=result["ci_low"],
                              diff_ci_high=result["ci_high"], p_value=result["p_value"],
                              min_p=result["min_p"], note=result["note"])
        row.update(comparison)
    return rows


def _number(value: float, digits: int) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return f"{value:.{digits}f}"


def _p(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.3g}"


#: Fewest values a bootstrap CI of the mean is shown for (with fewer it is the sample's own range, or a point).
MIN_CI_N = 3


def too_few(n: int, unit: str = "case") -> str:
    """The one sentence a table of statistics across ``n`` ``unit``s is replaced by when ``n`` < 2 ("" otherwise).

    >>> too_few(1)
    'n = 1 case: no spread, interval or test across cases (they need at least 2 cases, a CI 3).'
    """
    if n >= 2:
        return ""
    return (f"n = {n} {unit}{'' if n == 1 else 's'}: no spread, interval or test across {unit}s (they need at "
            f"least 2 {unit}s, a CI {MIN_CI_N}).")


def no_test_sentence(n: int, unit: str = "case", alpha: float = 0.05) -> str:
    """The one sentence that replaces the Wilcoxon column when ``n`` pairs cannot reach ``alpha`` ("" when they
    can).

    >>> print(no_test_sentence(3))  # doctest: +NORMALIZE_WHITESPACE
    No Wilcoxon test: with n = 3 cases no two-sided p can be below 0.25 (alpha = 0.05 needs 6); read the paired
    differences and their CIs.
    """
    floor = wilcoxon_min_p(n)
    if floor <= alpha:
        return ""
    need = next(k for k in range(1, 64) if wilcoxon_min_p(k) <= alpha)
    return (f"No Wilcoxon test: with n = {n} {unit}s no two-sided p can be below {floor:.3g} (alpha = {alpha:g} "
            f"needs {need}); read the paired differences and their CIs.")


def omitted(rows: Sequence[Mapping[str, object]], *, unit: str = "case", alpha: float = 0.05) -> list[str]:
    """The sentences that say which statistics of :func:`compare_methods` rows ``n`` cannot support: the Wilcoxon
    test (:func:`no_test_sentence`) and CIs of fewer than :data:`MIN_CI_N` values."""
    ns = [int(row["n"]) for row in rows]
    paired = [int(row.get("n_paired") or 0) for row in rows if not row["is_best"]]
    if max(ns, default=0) < 2:
        return [too_few(max(ns, default=0), unit)]
    out = []
    if not any(wilcoxon_min_p(n) <= alpha for n in paired):
        out.append(no_test_sentence(max(paired, default=max(ns)), unit, alpha))
    if min(ns) < MIN_CI_N:
        level = f"{100 * float(rows[0].get('ci', 0.95)):g} %"
        out.append(f"No {level} CI where n < {MIN_CI_N} ({unit}s).")
    return [s for s in out if s]


def comparison_markdown(rows: Sequence[Mapping[str, object]], metric: str, *, digits: int = 4,
                        unit: str = "case", alpha: float = 0.05, explain: bool = True) -> str:
    """Markdown table of :func:`compare_methods` rows for one metric, notes below it; statistics that ``n`` cannot
    support are left out with one sentence, never printed degenerate.

    Parameters
    ----------
    rows : sequence of dict
        Rows as returned by :func:`compare_methods`.
    metric : str
        Metric name for the heading (``dice``, ``cldice``, ...).
    digits : int, keyword-only
        Decimals of the scores (p-values get 3 significant digits).
    unit : str, keyword-only
        What the values are paired over, singular (``case``; ``seed`` when a sweep compares trials over seeds):
        the heading says "across <unit>s".
    alpha : float, keyword-only
        The level the Wilcoxon column is measured against: when no method's pairs can reach it
        (:func:`wilcoxon_min_p`), the column is left out and one sentence says so.
    explain : bool, keyword-only
        Write the sentences about what was left out below the table (:func:`comparison_tables` says them once
        for all its metrics instead, :func:`omitted`).

    Returns
    -------
    str
        A heading line, the table (method, n, mean, std, median, CI of the mean, paired difference to the best
        method, its CI, and the two-sided Wilcoxon signed-rank p when it can reach ``alpha``; the best method in
        bold, "—" in its comparison cells and for a CI of fewer than :data:`MIN_CI_N` values, "n/a" for a NaN),
        then the sentences and one bullet per method with a note. With at most one value per method: the heading
        and one sentence (:func:`too_few`).

    Examples
    --------
    >>> rows = compare_methods({"otsu": {"a": 0.6, "b": 0.5, "c": 0.4}, "stego": {"a": 0.7, "b": 0.6, "c": 0.6}},
    ...                        n_boot=200)
    >>> print(comparison_markdown(rows, "dice").splitlines()[5])
    | **stego** (best) | 3 | 0.6333 | 0.0471 | 0.6000 | [0.6000, 0.7000] | — | — |
    """
    if not rows:
        raise ValueError("rows is empty; expected the rows of compare_methods")
    level = rows[0].get("ci", 0.95)
    pct = f"{100 * float(level):g} %"
    n_max = max(int(row["n"]) for row in rows)
    heading = (f"**{metric}** across {unit}s: mean, std (ddof=0), median, {pct} bootstrap CI of the mean; "
               f"Δ = method − best, paired over the {unit}s both have, with its bootstrap CI")
    if n_max < 2:
        return f"**{metric}** across {unit}s: {too_few(n_max, unit)}\n"
    paired = [int(row.get("n_paired") or 0) for row in rows if not row["is_best"]]
    tested = any(wilcoxon_min_p(n) <= alpha for n in paired)
    lines = [heading + (", and the two-sided Wilcoxon signed-rank p." if tested else "."), "",
             f"| method | n | mean | std | median | {pct} CI | Δ vs best | {pct} CI of Δ |"
             + (" Wilcoxon p |" if tested else ""),
             "|---|---:|---:|---:|---:|---|---:|---|" + ("---:|" if tested else "")]
    notes = []

    def interval(low: float, high: float, n: int) -> str:
        return f"[{_number(low, digits)}, {_number(high, digits)}]" if n >= MIN_CI_N else "—"

    for row in rows:
        name = f"**{cell(row['method'])}** (best)" if row["is_best"] else cell(row["method"])
        cells = [name, str(row["n"]), _number(row["mean"], digits), _number(row["std"], digits),
                 _number(row["median"], digits), interval(row["ci_low"], row["ci_high"], int(row["n"]))]
        if row["is_best"]:
            cells += ["—", "—"] + (["—"] if tested else [])
        else:
            n_paired = int(row.get("n_paired") or 0)
            cells += [_number(row["diff_mean"], digits),
                      interval(row["diff_ci_low"], row["diff_ci_high"], n_paired)]
            if tested:
                cells.append(_p(row["p_value"]))
                if row.get("note"):
                    notes.append(f"- {cell(row['method'])}: {row['note']}")
        lines.append(md_row(cells))
    text = "\n".join(lines)
    sentences = omitted(rows, unit=unit, alpha=alpha)
    if sentences and explain:
        text += "\n\n" + " ".join(sentences)
    if notes:
        text += "\n\n" + "\n".join(notes)
    return text + "\n"


def comparison_tables(per_case: Mapping[str, Mapping[str, Mapping[str, float]]],
                      keys: Sequence[str] = ("dice", "cldice"), *, lower_is_better: Sequence[str] = (),
                      unit: str = "case", n_boot: int = 10000, seed: int = 0, alpha: float = 0.05
                      ) -> tuple[str, str]:
    """The per-case table as CSV and the statistics across cases as Markdown, for several metrics.

    Parameters
    ----------
    per_case : mapping method -> (mapping case id -> (mapping metric -> value))
        Every method's scores per case (a sweep passes trials as methods, and seeds as cases when its trials
        have no per-case scores). A missing case or metric is NaN in the CSV and left out of the statistics.
    keys : sequence of str
        Metrics to compare, in order (metrics no method has are left out of both tables).
    lower_is_better : sequence of str, keyword-only
        Metrics whose best method has the lowest mean (HD95, ASSD, Betti errors).
    unit : str, keyword-only
        What the rows are (``case`` or ``seed``), as in :func:`comparison_markdown`.
    n_boot, seed, alpha : keyword-only
        As in :func:`compare_methods`.

    Returns
    -------
    csv_text : str
        Header ``<unit>_id,<method>/<metric>,...`` and one row per case (first-seen order), values with 4
        decimals, ``nan`` where missing.
    markdown : str
        The sentences saying which statistics ``n`` cannot support, once (:func:`omitted`), then one
        :func:`comparison_markdown` section per metric with at least 2 values, separated by blank lines; ``""``
        when no method has any of ``keys``.

    Examples
    --------
    >>> csv_text, md = comparison_tables({"otsu": {"a": {"dice": 0.6}, "b": {"dice": 0.5}},
    ...                                   "stego": {"a": {"dice": 0.7}, "b": {"dice": 0.6}}}, n_boot=200)
    >>> print(csv_text.splitlines()[0])
    case_id,otsu/dice,stego/dice
    >>> md.startswith("No Wilcoxon test: with n = 2 cases")
    True
    """
    import csv
    import io

    lower = set(lower_is_better)
    keys = [k for k in keys if any(k in row for rows in per_case.values() for row in rows.values())]
    cases = list(dict.fromkeys(str(c) for rows in per_case.values() for c in rows))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([f"{unit}_id", *(f"{m}/{k}" for m in per_case for k in keys)])
    for case in cases:
        cells = []
        for method in per_case:
            row = per_case[method].get(case, {})
            cells += [f"{float(row[k]):.4f}" if k in row else "nan" for k in keys]
        writer.writerow([case, *cells])
    sections, sentences = [], []
    for key in keys:
        table = {m: {str(c): float(r[key]) for c, r in rows.items() if key in r} for m, rows in per_case.items()}
        if not any(table.values()):
            continue
        rows = compare_methods(table, higher_is_better=key not in lower, n_boot=n_boot, seed=seed, alpha=alpha)
        if max(int(r["n"]) for r in rows) < 2:  # nothing but the sentence: said once below
            sentences += omitted(rows, unit=unit, alpha=alpha)
            continue
        sections.append(comparison_markdown(rows, key, unit=unit, alpha=alpha, explain=False))
        sentences += omitted(rows, unit=unit, alpha=alpha)
    said = " ".join(dict.fromkeys(sentences))
    if not sections and not said:
        return buffer.getvalue(), ""
    return buffer.getvalue(), (said + "\n\n" if said else "") + "\n".join(sections)
