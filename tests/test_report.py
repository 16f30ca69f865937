"""The comparison report (``report.html`` of parent runs): one self-contained page whose table and figures render in
a real browser (headless chromium: the table's cells, each figure decoded at MLflow's card width, the colours of
the plots where the page puts them)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from browser import Browser
from conftest import needs_chromium
from PIL import Image

from stego_core.evaluation.stats import compare_methods, omitted
from stego_core.report.page import png_bytes, report_html, run_href
from stego_core.report.visualize import per_case_figure, radius_recall_figure
from stego_core.steps.comparison import comparison_figure

CASES = ("phantom_002", "phantom_003", "phantom_004")
PER_CASE = {m: {c: {"dice": d + 0.03 * i, "cldice": d + 0.05 - 0.02 * i, "recall_thin": 0.2 + 0.1 * i,
                    "recall_medium": 0.5 + d / 2}
                for i, c in enumerate(CASES)}
            for m, d in (("otsu", 0.45), ("frangi", 0.55), ("stego", 0.70))}
#: tab:blue at the CI bars' alpha 0.35 on white, and the plots' black dots
CI_BLUE = tuple(round(255 * (0.35 * c + 0.65)) for c in (0.1216, 0.4667, 0.7059))


def _page() -> str:
    stats = {k: compare_methods({m: {c: r[k] for c, r in rows.items()} for m, rows in PER_CASE.items()})
             for k in ("dice", "cldice")}
    figures = [("CIs", png_bytes(comparison_figure(PER_CASE))), ("cases", png_bytes(per_case_figure(PER_CASE))),
               ("radius", png_bytes(radius_recall_figure(PER_CASE)))]
    return report_html(title="Pipeline report", intro="3 methods on n = 3 cases", stats=stats, per_case=PER_CASE,
                       figures=figures, sentences=omitted(stats["dice"]),
                       links={m: [("run", run_href("1", f"{i:032x}"))] for i, m in enumerate(PER_CASE)},
                       case_links={c: run_href("1", "f" * 32, f"viewer/{c}.html") for c in CASES})


def test_report_is_one_self_contained_page_with_the_table_and_links():
    page = _page()
    assert "<script" not in page and not re.search(r"(src|href)=\"(https?:)?//", page)  # nothing to fetch or run
    assert page.count('src="data:image/png;base64,') == 3
    table = page[page.index("<table id=comparison>"):page.index("</table>")]
    assert table.count("<tr") == 2 + 3  # two header rows, one per method
    assert "<td class=m>stego (best)</td><td>3</td><td>0.730 ± 0.024</td><td>[0.700, 0.760]</td><td>best</td>" in table
    assert f'href="./#/experiments/1/runs/{2:032x}" target="_top"' in table  # stego's run, in the whole window
    assert "No Wilcoxon test: with n = 3 cases" in page and "Wilcoxon p" not in table
    assert f'href="./#/experiments/1/runs/{"f" * 32}/artifacts/viewer/phantom_003.html"' in page


@needs_chromium
def test_report_renders_its_table_and_plots_in_a_browser(tmp_path):
    path = tmp_path / "report.html"
    path.write_text(_page(), encoding="utf-8")
    with Browser(tmp_path / "profile", window=(1280, 2400)) as browser:
        tab = browser.open(path.as_uri())
        tab.wait("document.readyState === 'complete' && [...document.images].every(i => i.complete)", what="images")
        layout = json.loads(tab.eval("""JSON.stringify({
            table: document.getElementById('comparison').getBoundingClientRect(),
            cells: [...document.querySelectorAll('#comparison tr')].map(r => r.cells.length),
            images: [...document.images].map(i => ({rect: i.getBoundingClientRect(), w: i.naturalWidth,
                                                    shown: i.clientWidth}))})"""))
        shot = np.asarray(Image.open(tab.screenshot(tmp_path / "report.png")).convert("RGB")).astype(int)
    assert shot.shape[:2] == (2400, 1280)
    assert layout["cells"] == [5, 6, 9, 9, 9]  # headers (metrics span 3 columns), then method, n, 3 per metric, links
    assert all(img["w"] == img["shown"] == 600 for img in layout["images"])  # drawn and shown at the card width
    table = layout["table"]
    rows = shot[int(table["top"]):int(table["bottom"]), int(table["left"]):int(table["right"])]
    assert (rows.sum(axis=-1) < 200).mean() > 0.02  # the table's text is drawn
    assert (np.abs(rows - (255, 248, 197)).max(axis=-1) <= 2).sum() > 500  # the best row's highlight
    ci = layout["images"][0]["rect"]
    plot = shot[int(ci["top"]) + 1:int(ci["bottom"]) - 1, int(ci["left"]) + 1:int(ci["right"]) - 1]  # no border
    assert plot.shape[1] == 600
    assert (np.abs(plot - CI_BLUE).max(axis=-1) <= 6).sum() > 100  # the CI bars
    assert (plot.max(axis=-1) < 40).sum() > 100  # dots, ticks and labels in black
    assert (plot.min(axis=-1) > 245).mean() > 0.5  # on a white figure, not a broken image
    cases = layout["images"][1]["rect"]
    dots = shot[int(cases["top"]):int(cases["bottom"]), int(cases["left"]):int(cases["right"])]
    for colour in ((31, 119, 180), (255, 127, 14), (44, 160, 44)):  # one colour per case (tab10)
        assert (np.abs(dots - colour).max(axis=-1) <= 8).sum() > 20, colour


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
