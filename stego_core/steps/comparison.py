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
from stego_core.evaluation.stats import bootstrap_ci, comparison_tables, wilcoxon_min_p
from stego_core.platform import tracking

#: Metrics compared (when present): the headline scores, then the topology / vessel-size / distance metrics.
COMPARISON_KEYS: tuple[str, ...] = ("dice", "cldice", *ANALYSIS_KEYS)
#: Metrics where lower is better.
LOWER_IS_BETTER: tuple[str, ...] = ("betti0_error", "betti1_error", "hd95_mm", "assd_mm")
#: Metrics whose statistics go into the note (the rest are in ``comparison.md``).
NOTE_KEYS: tuple[str, ...] = ("dice", "cldice")
#: The stepped image key of the comparison figure (one card in the run's *Model metrics* tab).
IMAGE_KEY = "comparison/ci"

PerCase = Mapping[str, Mapping[str, Mapping[str, float]]]


def comparison_figure(per_case: PerCase, keys: Sequence[str] = NOTE_KEYS, *, unit: str = "case") -> Any:
    """Per metric, each method's mean with its bootstrap 95 % CI (bar) and its per-case values (dots).

    Parameters
    ----------
    per_case : mapping method -> (mapping case -> (mapping metric -> value))
        The scores (NaN and missing values left out).
    keys : sequence of str
        Metrics, one panel each (those no method has are skipped).
    unit : str, keyword-only
        What the dots are (``case`` or ``seed``), for the axis label.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.figure

    methods = list(per_case)
    present = [k for k in keys if any(k in row for rows in per_case.values() for row in rows.values())]
    present = present or list(keys[:1])
    fig = matplotlib.figure.Figure(figsize=(4.2 * len(present), 0.45 * len(methods) + 1.6), layout="constrained")
    axes = fig.subplots(1, len(present), squeeze=False)[0]
    for ax, key in zip(axes, present):
        for y, method in enumerate(methods):
            values = [float(r[key]) for r in per_case[method].values() if key in r and not math.isnan(float(r[key]))]
            if not values:
                continue
            low, high = bootstrap_ci(values)
            mean = sum(values) / len(values)
            ax.plot([low, high], [y, y], color="tab:blue", linewidth=5, alpha=0.35, solid_capstyle="butt")
            ax.plot([mean], [y], marker="|", color="tab:blue", markersize=14, markeredgewidth=2)
            ax.scatter(values, [y] * len(values), s=12, color="black", zorder=3)
        ax.set_yticks(range(len(methods)), methods)
        ax.invert_yaxis()
        better = "lower" if key in LOWER_IS_BETTER else "higher"
        ax.set_xlabel(f"{key} ({better} is better)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_title(f"mean, bootstrap 95 % CI (bar), {unit}s (dots)", loc="left", fontsize=9)
    return fig


def comparison_note(stats_md: str, *, n_units: int, unit: str = "case", title: str = "Statistics across cases"
                    ) -> str:
    """The note's section: a heading, where the artifacts are, the sample-size caveat, ``stats_md``."""
    floor = wilcoxon_min_p(n_units)
    caveat = (f"With n = {n_units} {unit}s no two-sided Wilcoxon p can be below {floor:.3g}: read the mean "
              "differences and their CIs, not the p-values." if floor > 0.05 else
              f"n = {n_units} {unit}s (Wilcoxon p can reach {floor:.3g}).")
    return "\n".join([
        f"### {title}", "",
        (f"Per-{unit} table: artifact `comparison.csv`; all metrics: `comparison.md`; chart: *Model metrics* "
         f"image `{IMAGE_KEY}` (also `comparison_ci.png`). {caveat}"), "", stats_md.rstrip(), ""])


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
    tracking.log_text(csv_text, f"{folder}comparison.csv")
    tracking.log_text(md, f"{folder}comparison.md")
    _, note_md = comparison_tables(table, note_keys, lower_is_better=lower_is_better, unit=unit)
    figure = comparison_figure(table, note_keys, unit=unit)  # drawn once: the stepped image and the PNG
    tracking.log_image(tracking.figure_array(figure), IMAGE_KEY, step=0)
    tracking.log_figure(figure, f"{folder}comparison_ci.png")
    n_units = max(len(rows) for rows in table.values())
    return comparison_note(note_md or md, n_units=n_units, unit=unit, title=title)
