"""Statistics across cases on a parent run: one helper for the pipeline, the ablation and a sweep's best trials.

:func:`log_comparison` takes a per-case table (method -> case -> metric -> value) and logs, on the active run,

- ``comparison.csv``: the per-case table (one row per case, one column per method and metric);
- ``comparison.md``: per metric and method n, mean, std, median, bootstrap 95 % CI, and the paired comparison
  with the best method (mean difference, its CI, and the Wilcoxon signed-rank p when n lets it reach p < 0.05);
  what n cannot support is left out with one sentence (:func:`stego_core.evaluation.stats.omitted`);
- ``comparison_ci.png`` and the stepped image ``comparison/ci`` (step 0): each method's mean and CI per metric
  with the per-case values, so the run's *Model metrics* tab opens on a chart that compares the methods;
- ``comparison_cases.png``, ``comparison_radius.png``, ``comparison_betti.png``: the per-case values, the recall
  by vessel radius and the Betti-number errors;
- ``report.html``: all of it in one self-contained page (:mod:`stego_core.report.page`) with links to each
  method's run and each case's viewer; ``make ui`` prints the link that opens it;

and returns the Markdown section for the run's note (``mlflow.note.content``), which says where these are.
With n = 1 only the per-case table, the per-case figure and the report are logged, and one sentence says why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from stego_core.evaluation.metrics import RADIUS_BINS
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
#: The self-contained page of a parent run's comparison (:mod:`stego_core.report.page`), and the tag that says
#: a run has one (:func:`stego_core.platform.ui.latest_reports`).
REPORT, REPORT_TAG = "report.html", "report"

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
                   unit: str = "case", title: str = "Statistics across cases", prefix: str = "",
                   report_title: str = "", runs: Mapping[str, str] | None = None,
                   viewers: Mapping[str, str] | None = None) -> str:
    """Log the comparison of ``per_case`` on the active run; return the Markdown section for its note.

    Parameters
    ----------
    per_case : mapping method -> (mapping case -> (mapping metric -> value))
        Scores per method and case; methods without any case are dropped.
    keys : sequence of str, keyword-only
        Metrics of ``comparison.csv`` / ``comparison.md`` (those no method has are skipped).
    note_keys : sequence of str, keyword-only
        Metrics whose tables go into the returned note, the figures and the report's table.
    lower_is_better : sequence of str, keyword-only
        Metrics where the lowest mean is best.
    unit : str, keyword-only
        What the rows are: ``case``, or ``seed`` when a sweep's trials have no per-case scores.
    title : str, keyword-only
        Heading of the note's section.
    prefix : str, keyword-only
        Artifact folder (``""``: the run's root).
    report_title : str, keyword-only
        The heading of ``report.html`` (default ``title``).
    runs : mapping method -> run id, optional, keyword-only
        Each method's run (in the active run's experiment): linked from the report.
    viewers : mapping case -> artifact path of the active run, optional, keyword-only
        Each case's slice viewer: linked from the report.

    Returns
    -------
    str
        The note's section (``""`` when no method has scores; nothing is logged then).

    Besides ``comparison.csv`` / ``comparison.md`` and the chart, it draws the per-case values
    (``comparison_cases.png``), the recall by vessel radius (``comparison_radius.png``) and the Betti-number errors
    (``comparison_betti.png``) when the rows have them, and writes all of it into one page, ``report.html``
    (:func:`stego_core.report.page.report_html`).
    """
    from stego_core.evaluation.stats import compare_methods, omitted
    from stego_core.report.page import png_bytes, report_html, run_href
    from stego_core.report.visualize import per_case_figure, radius_recall_figure

    table = {m: rows for m, rows in per_case.items() if rows}
    if not table:
        return ""
    folder = f"{prefix.rstrip('/')}/" if prefix else ""
    csv_text, md = comparison_tables(table, keys, lower_is_better=lower_is_better, unit=unit)
    if not md:
        return ""
    n_units = max(len(rows) for rows in table.values())
    tracking.log_text(csv_text, f"{folder}comparison.csv")

    def has(key: str) -> bool:
        return any(key in row for rows in table.values() for row in rows.values())

    shown = [k for k in note_keys if has(k)] or [k for k in keys if has(k)][:2]
    figures: list[tuple[str, str, Any]] = []  # (artifact, caption, figure)
    if n_units >= 2:
        tracking.log_text(md, f"{folder}comparison.md")
        figure = comparison_figure(table, shown, unit=unit, lower_is_better=lower_is_better)
        tracking.log_image(tracking.figure_array(figure), IMAGE_KEY, step=0)  # the card opens on step 0
        figures.append(("comparison_ci.png", f"Mean, bootstrap 95 % CI and the {unit}s' values "
                        f"(also the run's image {IMAGE_KEY}).", figure))
    figures.append(("comparison_cases.png", f"Each {unit}'s score per method (a colour per {unit}).",
                    per_case_figure(table, shown)))
    if any(has(f"recall_{b}") for b in RADIUS_BINS):
        figures.append(("comparison_radius.png", "Recall by vessel radius (of the label's skeleton).",
                        radius_recall_figure(table)))
    betti = [k for k in ("betti0_error", "betti1_error") if has(k)]
    if betti:
        figures.append(("comparison_betti.png", "Betti-number errors (components, loops; lower is better).",
                        per_case_figure(table, betti)))
    images = []
    for name, caption, figure in figures:
        images.append((caption, png_bytes(figure)))
        tracking.log_figure(figure, f"{folder}{name}")
    rows = {k: compare_methods({m: {c: float(r[k]) for c, r in cases.items() if k in r} for m, cases in table.items()},
                               higher_is_better=k not in lower_is_better) for k in shown}
    run_id = tracking.active_run_id() or ""
    experiment_id = tracking.client().get_run(run_id).info.experiment_id if run_id else ""
    links = {m: [("run", run_href(experiment_id, r))] for m, r in (runs or {}).items() if r}
    case_links = {c: run_href(experiment_id, run_id, path) for c, path in (viewers or {}).items()}
    said = list(dict.fromkeys(s for r in rows.values() for s in omitted(r, unit=unit)))
    cases = list(dict.fromkeys(c for rows_ in table.values() for c in rows_))
    page = report_html(
        title=report_title or title, unit=unit, stats=rows, per_case=table, figures=images, sentences=said,
        links=links, case_links=case_links, min_ci=MIN_CI_N,
        intro=(f"{len(table)} methods on n = {n_units} {unit}{'' if n_units == 1 else 's'}: "
               + ", ".join(cases[:12]) + (" ..." if len(cases) > 12 else "") + f". Run {run_id}."),
        footer=("Artifacts of this run: comparison.csv (per " + unit + "), comparison.md (every metric), "
                + ", ".join(name for name, _, _ in figures) + "."))
    tracking.log_text(page, f"{folder}{REPORT}")
    if not folder:
        tracking.set_tags({REPORT_TAG: REPORT})  # `make ui` links the latest run with one
    note_md = comparison_tables(table, shown, lower_is_better=lower_is_better, unit=unit)[1] if n_units >= 2 else ""
    return comparison_note(note_md, n_units=n_units, unit=unit, title=title)
