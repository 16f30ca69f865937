"""Statistics across cases on a parent run: one helper for the pipeline, the ablation and a sweep's best trials.

:func:`log_comparison` takes a per-case table (method -> case -> metric -> value) and logs, on the active run,

- ``comparison.csv``: the per-case table (one row per case, one column per method and metric);
- ``comparison.md``: per metric and method n, mean, std, median, bootstrap 95 % CI, and the paired comparison
  with the best method (mean difference, its CI, Wilcoxon signed-rank p), with a note where n is too small for
  the test to reach p < 0.05 (:func:`stego_core.evaluation.stats.wilcoxon_min_p`);
- ``comparison_ci.png`` and the stepped image ``comparison/ci`` (step 0): each method's mean and CI per metric
  with the per-case values, so the run's *Model metrics* tab opens on a chart that compares the methods;

and returns the Markdown section for the run's note (``mlflow.note.content``), which says where these are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from stego_core.evaluation.scoring import ANALYSIS_KEYS
from stego_core.evaluation.stats import MIN_CI_N, bootstrap_ci, comparison_tables, too_few
from stego_core.platform import tracking

#: Metrics compared (when present): the headline scores, then the topology / vessel-size / distance metrics.
COMPARISON_KEYS: tuple[str, ...] = ("dice", "cldice", *ANALYSIS_KEYS)
#: Metrics where lower is better.
LOWER_IS_BETTER: tuple[str, ...] = ("betti0_error", "betti1_error", "hd95_mm", "assd_mm")
#: Metrics whose statistics go into the note (the rest are in ``comparison.md``).
NOTE_KEYS: tuple[str, ...] = ("dice", "cldice")
#: The stepped image key of the comparison figure (one card in the run's *Model metrics* tab).
IMAGE_KEY = "comparison/ci"
#: The self-contained page of a parent run's comparison (:mod:`stego_core.report.html`).
REPORT = "report.html"

PerCase = Mapping[str, Mapping[str, Mapping[str, float]]]


#: Metrics in [0, 1]: their axes run from 0 to 1, so that bars of different methods and runs compare by length.
UNIT_INTERVAL = ("dice", "cldice", "tprec", "tsens", "precision", "recall")
#: Width of the figures people look at in MLflow's image cards and the report, in inches at 100 dpi (600 px).
CARD_WIDTH_IN = 6.0


def unit_interval(key: str) -> bool:
    """Whether a metric lies in [0, 1] (Dice, clDice, precision, recall, recall by radius)."""
    return key in UNIT_INTERVAL or key.startswith("recall_")


def comparison_figure(per_case: PerCase, keys: Sequence[str] = NOTE_KEYS, *, unit: str = "case",
                      lower_is_better: Sequence[str] = LOWER_IS_BETTER) -> Any:
    """Per metric, each method's mean (tick), its bootstrap 95 % CI (bar, from :data:`MIN_CI_N` values on) and its
    per-case values (dots): one panel per metric, stacked, 600 px wide (MLflow's image card, the report).

    Parameters
    ----------
    per_case : mapping method -> (mapping case -> (mapping metric -> value))
        The scores (NaN and missing values left out).
    keys : sequence of str
        Metrics, one panel each (those no method has are skipped).
    unit : str, keyword-only
        What the dots are (``case`` or ``seed``), for the title.
    lower_is_better : sequence of str, keyword-only
        Metrics whose axis says "lower is better".

    Returns
    -------
    matplotlib.figure.Figure
        Axes from 0 (to 1 for metrics in [0, 1], :func:`unit_interval`).
    """
    import matplotlib.figure

    methods = list(per_case)
    present = [k for k in keys if any(k in row for rows in per_case.values() for row in rows.values())]
    present = present or list(keys[:1])
    panel = 0.3 * len(methods) + 0.75
    fig = matplotlib.figure.Figure(figsize=(CARD_WIDTH_IN, panel * len(present) + 0.35), dpi=100,
                                   layout="constrained")
    axes = fig.subplots(len(present), 1, squeeze=False)[:, 0]
    n_max = 0
    for ax, key in zip(axes, present):
        top = 0.0
        for y, method in enumerate(methods):
            values = [float(r[key]) for r in per_case[method].values() if key in r and not math.isnan(float(r[key]))]
            if not values:
                continue
            n_max, top = max(n_max, len(values)), max(top, *values)
            mean = sum(values) / len(values)
            if len(values) >= MIN_CI_N:
                low, high = bootstrap_ci(values)
                ax.plot([low, high], [y, y], color="tab:blue", linewidth=6, alpha=0.35, solid_capstyle="butt")
            ax.plot([mean], [y], marker="|", color="tab:blue", markersize=14, markeredgewidth=2.5)
            ax.scatter(values, [y] * len(values), s=14, color="black", zorder=3)
        ax.set_yticks(range(len(methods)), methods, fontsize=9)
        ax.set_ylim(len(methods) - 0.5, -0.5)
        ax.set_xlim(0.0, 1.0 if unit_interval(key) else max(top * 1.08, 1e-6))
        better = "lower" if key in lower_is_better else "higher"
        ax.set_xlabel(f"{key} ({better} is better)", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    ci = f"bootstrap 95 % CI (bar), " if n_max >= MIN_CI_N else ""
    fig.suptitle(f"mean (tick), {ci}{unit}s (dots); n = {n_max} {unit}{'' if n_max == 1 else 's'}", fontsize=10,
                 x=0.01, ha="left")
    return fig


def comparison_note(stats_md: str, *, n_units: int, unit: str = "case", title: str = "Statistics across cases"
                    ) -> str:
    """The note's section: a heading, where the artifacts are, ``stats_md`` (which says, once, what ``n_units``
    cannot support: :func:`stego_core.evaluation.stats.omitted`)."""
    where = (f"Per-{unit} table: artifact `comparison.csv`; all metrics: `comparison.md`; chart: *Model metrics* "
             f"image `{IMAGE_KEY}` (also `comparison_ci.png`); everything in one page: `{REPORT}`.")
    if n_units < 2:
        where = f"Per-{unit} table: artifact `comparison.csv`. {too_few(n_units, unit)}"
        stats_md = ""
    return "\n".join([f"### {title} (n = {n_units} {unit}{'' if n_units == 1 else 's'})", "", where, "",
                      stats_md.rstrip(), ""])


def log_comparison(per_case: PerCase, *, keys: Sequence[str] = COMPARISON_KEYS,
                   note_keys: Sequence[str] = NOTE_KEYS, lower_is_better: Sequence[str] = LOWER_IS_BETTER,
                   unit: str = "case", title: str = "Statistics across cases", prefix: str = "") -> str:
    """Log the comparison of ``per_case`` on the active run; return the Markdown section for its note.

    Parameters
    ----------
    per_case : mapping method -> (mapping case -> (mapping metric -> value))
        Scores per method and case; methods without any case are dropped.
    keys : sequence of str, keyword-only
        Metrics of ``comparison.csv`` / ``comparison.md`` (those no method has are skipped).
    note_keys : sequence of str, keyword-only
        Metrics whose tables go into the returned note and the figure.
    lower_is_better : sequence of str, keyword-only
        Metrics where the lowest mean is best.
    unit : str, keyword-only
        What the rows are: ``case``, or ``seed`` when a sweep's trials have no per-case scores.
    title : str, keyword-only
        Heading of the note's section.
    prefix : str, keyword-only
        Artifact folder (``""``: the run's root).

    Returns
    -------
    str
        The note's section (``""`` when no method has scores; nothing is logged then).
    """
    table = {m: rows for m, rows in per_case.items() if rows}
    if not table:
        return ""
    folder = f"{prefix.rstrip('/')}/" if prefix else ""
    csv_text, md = comparison_tables(table, keys, lower_is_better=lower_is_better, unit=unit)
    if not md:
        return ""
    n_units = max(len(rows) for rows in table.values())
    tracking.log_text(csv_text, f"{folder}comparison.csv")
    if n_units < 2:  # one value per method: no statistics to log, one sentence says so
        return comparison_note("", n_units=n_units, unit=unit, title=title)
    tracking.log_text(md, f"{folder}comparison.md")
    _, note_md = comparison_tables(table, note_keys, lower_is_better=lower_is_better, unit=unit)
    figure = comparison_figure(table, note_keys, unit=unit, lower_is_better=lower_is_better)
    tracking.log_image(tracking.figure_array(figure), IMAGE_KEY, step=0)  # drawn once: the card and the PNG
    tracking.log_figure(figure, f"{folder}comparison_ci.png")
    return comparison_note(note_md or md, n_units=n_units, unit=unit, title=title)
