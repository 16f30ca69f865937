"""One self-contained HTML page of a comparison (``report.html`` of the pipeline, ablation and sweep parent runs).

:func:`report_html` takes what the comparison computed (the rows of
:func:`stego_core.evaluation.stats.compare_methods` per metric, the per-case scores, PNG figures) and returns one
page that needs nothing else: the figures are embedded as ``data:`` PNGs, the style is inline, there is no script
(MLflow shows artifacts in a sandboxed frame; ``make ui`` serves the page in one without scripts) and no network
reference. Links are relative to the MLflow UI's root (``./#/experiments/<id>/runs/<id>``): they open each
method's run and the case viewers in the UI that serves the page, in the whole window (``target="_top"``).

The page, top down: the title and what was compared (n and the cases), the comparison table (per method and
metric mean ± std, its bootstrap CI, the paired difference to the best method and its CI, links to the method's
run and viewers; what n cannot support left out with one sentence, as in ``comparison.md``), the figures (CIs,
per-case values, recall by vessel radius, Betti-number errors), and the per-case scores.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence

__all__ = ["png_bytes", "report_html", "run_href"]


def run_href(experiment_id: str, run_id: str, artifact: str = "") -> str:
    """A link into the MLflow UI that serves the page: a run, or one of its artifacts.

    >>> run_href("1", "abc", "viewer/case.html")
    './#/experiments/1/runs/abc/artifacts/viewer/case.html'
    """
    tail = f"/artifacts/{artifact}" if artifact else ""
    return f"./#/experiments/{experiment_id}/runs/{run_id}{tail}"


def png_bytes(figure: object) -> bytes:
    """A matplotlib figure as PNG bytes at its own size and dpi (the figure stays open)."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")  # type: ignore[attr-defined]
    return buffer.getvalue()


def _number(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _interval(low: float, high: float, n: int, minimum: int) -> str:
    return f"[{_number(low)}, {_number(high)}]" if n >= minimum else "—"


_STYLE = """
body{margin:0;padding:16px 22px;font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;color:#1f2328;
background:#fff;max-width:1180px}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:22px 0 8px;border-bottom:1px solid #d8dee4;padding-bottom:3px}
.sub{color:#59636e;margin:0 0 10px}.say{background:#f6f8fa;border-left:3px solid #8c959f;padding:6px 10px;margin:8px 0}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;margin:6px 0}
th,td{border:1px solid #d8dee4;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f6f8fa}td.m,th.m{text-align:left}tr.best td{background:#fff8c5;font-weight:600}
a{color:#0969da;text-decoration:none}a:hover{text-decoration:underline}
figure{margin:10px 0 18px;display:inline-block;vertical-align:top}
figure img{display:block;width:600px;max-width:100%;border:1px solid #eaeef2}
figcaption{color:#59636e;font-size:12px;max-width:600px}
.grid{display:flex;flex-wrap:wrap;gap:0 24px}
"""


def report_html(
    *,
    title: str,
    intro: str,
    stats: Mapping[str, Sequence[Mapping[str, object]]],
    per_case: Mapping[str, Mapping[str, Mapping[str, float]]],
    figures: Sequence[tuple[str, bytes]] = (),
    sentences: Sequence[str] = (),
    links: Mapping[str, Sequence[tuple[str, str]]] | None = None,
    case_links: Mapping[str, str] | None = None,
    unit: str = "case",
    min_ci: int = 3,
    footer: str = "",
) -> str:
    """The comparison as one self-contained HTML page.

    Parameters
    ----------
    title : str
        The page's heading (and ``<title>``).
    intro : str
        One line under it: what was compared, on which cases.
    stats : mapping metric -> rows of :func:`stego_core.evaluation.stats.compare_methods`
        The metrics of the comparison table, in column order (each row: ``method``, ``n``, ``mean``, ``std``,
        ``ci_low``, ``ci_high``, ``is_best``, ``n_paired``, ``diff_mean``, ``diff_ci_low``, ``diff_ci_high``).
    per_case : mapping method -> (mapping case -> (mapping metric -> value))
        Scores for the per-case table (the metrics of ``stats``).
    figures : sequence of (caption, PNG bytes)
        Embedded in order, 600 px wide.
    sentences : sequence of str
        What ``n`` could not support (:func:`stego_core.evaluation.stats.omitted`), shown once above the table.
    links : mapping method -> sequence of (label, href), optional
        Links in the method's row (its run, its viewers).
    case_links : mapping case -> href, optional
        A link per case in the per-case table (its viewer).
    unit : str
        What the rows of ``per_case`` are (``case`` or ``seed``).
    min_ci : int
        Fewest values a CI is shown for ("—" below).
    footer : str
        A last line (where the artifacts are).

    Returns
    -------
    str
        The HTML document (no script, no external reference).
    """
    esc = html.escape
    metrics = list(stats)
    methods = list(per_case)
    cases = list(dict.fromkeys(c for rows in per_case.values() for c in rows))
    head = ["<tr><th class=m rowspan=2>method</th><th rowspan=2>n</th>"
            + "".join(f"<th colspan=3>{esc(m)}</th>" for m in metrics) + "<th class=m rowspan=2>open</th></tr>",
            "<tr>" + "<th>mean ± std</th><th>95 % CI</th><th>Δ vs best [CI]</th>" * len(metrics) + "</tr>"]
    by_metric = {m: {str(r["method"]): r for r in rows} for m, rows in stats.items()}
    best_first = metrics[0] if metrics else None
    body = []
    for method in methods:
        rows = {m: by_metric[m].get(method) for m in metrics}
        n = max((int(r["n"]) for r in rows.values() if r), default=0)
        best = bool(best_first and rows[best_first] and rows[best_first]["is_best"])
        cells = [f"<td class=m>{esc(method)}{' (best)' if best else ''}</td><td>{n}</td>"]
        for m in metrics:
            r = rows[m]
            if not r or not int(r["n"]):
                cells.append("<td>—</td><td>—</td><td>—</td>")
                continue
            k = int(r["n"])
            spread = f" ± {_number(float(r['std']))}" if k >= 2 else ""
            ci = _interval(float(r["ci_low"]), float(r["ci_high"]), k, min_ci)
            if r["is_best"]:
                diff = "best"
            else:
                paired = int(r.get("n_paired") or 0)
                diff = (f"{_number(float(r['diff_mean']))} "
                        f"{_interval(float(r['diff_ci_low']), float(r['diff_ci_high']), paired, min_ci)}")
            cells.append(f"<td>{_number(float(r['mean']))}{spread}</td><td>{ci}</td><td>{esc(diff)}</td>")
        opened = " · ".join(f'<a href="{esc(href, quote=True)}" target="_top" data-link="{esc(label, quote=True)}">'
                            f"{esc(label)}</a>" for label, href in (links or {}).get(method, ()))
        cells.append(f"<td class=m>{opened}</td>")
        body.append(f"<tr{' class=best' if best else ''}>" + "".join(cells) + "</tr>")
    said = "".join(f"<p class=say>{esc(s)}</p>" for s in sentences)
    shown = "".join(f'<figure><img alt="{esc(c, quote=True)}" src="data:image/png;base64,'
                    f'{base64.b64encode(png).decode("ascii")}"><figcaption>{esc(c)}</figcaption></figure>'
                    for c, png in figures)
    case_head = "<tr><th class=m>" + esc(unit) + "</th>" + "".join(
        f"<th>{esc(m)}<br>{' / '.join(esc(k) for k in metrics[:2])}</th>" for m in methods) + "</tr>"
    case_rows = []
    for case in cases:
        name = esc(case)
        if case_links and case in case_links:
            name = f'<a href="{esc(case_links[case], quote=True)}" target="_top">{name}</a>'
        values = []
        for method in methods:
            row = per_case[method].get(case, {})
            values.append("<td>" + " / ".join(_number(float(row[k])) if k in row else "—" for k in metrics[:2])
                          + "</td>")
        case_rows.append(f"<tr><td class=m>{name}</td>" + "".join(values) + "</tr>")
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{esc(title)}</title>"
            f"<style>{_STYLE}</style></head><body>"
            f"<h1>{esc(title)}</h1><p class=sub>{esc(intro)}</p>"
            f"<h2>Comparison</h2>{said}<table id=comparison>{''.join(head)}{''.join(body)}</table>"
            f"<h2>Figures</h2><div class=grid>{shown}</div>"
            f"<h2>Per {esc(unit)}</h2><table id=cases>{case_head}{''.join(case_rows)}</table>"
            + (f"<p class=sub>{esc(footer)}</p>" if footer else "") + "</body></html>\n")
