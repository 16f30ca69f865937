"""The HTML viewer: error codes, block reduction, mosaics, a self-contained page, and the page in a real browser.

The browser tests run Debian's ``chromium`` headless (installed by ``.ci/run``) and skip when it is absent.
They read where the slice canvas lies from the page itself (``--dump-dom``: the script writes the canvases'
rectangles into ``<body data-slice=...>``), take a screenshot at the same window size, and check the colours of
the voxels they placed: true positive grey, false positive red, false negative cyan.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from browser import Browser
from conftest import headless_chromium, needs_chromium
from PIL import Image

from stego_core.report.viewer import (
    ERROR_CODES,
    block_max,
    error_codes,
    mosaic,
    viewer_html,
)
from stego_core.report.visualize import ERROR_COLOURS

SHAPE = (24, 36, 30)  # (I, J, K), below max_size: no reduction, one canvas pixel per voxel
TP_BOX = (slice(0, 16), slice(4, 12), slice(4, 12))
FP_BOX = (slice(0, 16), slice(20, 30), slice(4, 12))  # predicted only
FN_BOX = (slice(0, 16), slice(4, 12), slice(18, 26))  # label only
RGB = {kind: tuple(round(255 * v) for v in rgb) for kind, rgb in ERROR_COLOURS.items()}


@pytest.fixture(scope="module")
def case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A dark noisy image (a bright bar for slices i >= 16), a TP, an FP and an FN box in slices i < 16."""
    rng = np.random.default_rng(0)
    image = rng.uniform(0.0, 0.2, SHAPE).astype(np.float32)
    image[16:, 14:20, 10:20] = 1.0  # also sets the display range's top
    target = np.zeros(SHAPE, bool)
    pred = np.zeros(SHAPE, bool)
    target[TP_BOX] = pred[TP_BOX] = True
    pred[FP_BOX] = True
    target[FN_BOX] = True
    return image, target, pred


def _payload(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="viewer-data">(.*?)</script>', page, re.DOTALL)
    assert match, "no data block"
    return json.loads(match.group(1))


def _decode(url: str) -> Image.Image:
    head, data = url.split(",", 1)
    assert head in ("data:image/webp;base64", "data:image/png;base64")
    return Image.open(io.BytesIO(base64.b64decode(data)))


# ------------------------------------------------------------------------------------------------ arrays


def test_error_codes_and_their_precedence():
    pred = np.array([1, 1, 0, 0], bool).reshape(1, 1, 4)
    target = np.array([1, 0, 1, 0], bool).reshape(1, 1, 4)
    assert error_codes(pred, target).ravel().tolist() == [ERROR_CODES["tp"], ERROR_CODES["fp"], ERROR_CODES["fn"], 0]
    assert error_codes(pred, None).ravel().tolist() == [ERROR_CODES["fp"], ERROR_CODES["fp"], 0, 0]
    assert error_codes(pred.astype(np.uint8) * 255, target.astype(np.uint8)).ravel().tolist()[0] == ERROR_CODES["tp"]
    # merged voxels: FP over FN over TP, as visualize.error_overlay draws them
    assert ERROR_CODES["fp"] > ERROR_CODES["fn"] > ERROR_CODES["tp"] > 0
    with pytest.raises(ValueError, match="target has shape"):
        error_codes(pred, target[..., :2])
    with pytest.raises(ValueError, match="pred has values"):
        error_codes(np.full((1, 1, 2), 3), None)


def test_block_max_shape_partial_blocks_and_values():
    volume = np.zeros((5, 4, 3), np.uint8)
    volume[4, 3, 2] = 7  # alone in the last, partial block
    volume[0, 0, 0] = 2
    volume[1, 1, 1] = 3
    out = block_max(volume, 2)
    assert out.shape == (3, 2, 2) and out.dtype == np.uint8
    assert out[0, 0, 0] == 3 and out[2, 1, 1] == 7 and out.sum() == 10
    assert block_max(volume, 1) is volume
    with pytest.raises(ValueError, match="factor"):
        block_max(volume, 0)


def test_mosaic_tiles_slices_in_display_orientation():
    volume = np.zeros((5, 4, 3), np.uint8)
    volume[3, 1, 0] = 9  # slice 3 along axis 0: j = 1 (column 1), k = 0 (bottom row)
    tiles, cols = mosaic(volume, 0)
    assert cols == 3 and tiles.shape == (2 * 3, 3 * 4)  # 5 tiles of 3 rows x 4 columns, 3 per row
    r, q = divmod(3, cols)
    tile = tiles[r * 3:(r + 1) * 3, q * 4:(q + 1) * 4]
    assert tile[2, 1] == 9 and tiles.sum() == 9
    tiles2, cols2 = mosaic(volume, 2)
    assert cols2 == 2 and tiles2.shape == (2 * 4, 2 * 5)  # axis 2: i across, j up


# ------------------------------------------------------------------------------------------------- page


def test_page_is_self_contained(case):
    image, target, pred = case
    page = viewer_html(image, {"otsu": pred, "frangi": target}, target, spacing_mm=(1, 1, 1.5),
                       title="case_000 <otsu>")
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"https?://", page), "the page must not reach the network"
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", page)
    assert "<title>case_000 &lt;otsu&gt;</title>" in page
    data = _payload(page)
    assert data["shape"] == list(SHAPE) and data["factor"] == 1 and data["labelled"] is True
    assert list(data["methods"]) == ["otsu", "frangi"]
    assert [a["n"] for a in data["axes"]] == list(SHAPE)
    assert (data["axes"][0]["sx"], data["axes"][0]["sy"]) == (1.0, 1.5)
    gray = _decode(data["axes"][0]["image"])
    assert gray.format == "WEBP" and gray.size == (SHAPE[1] * 5, SHAPE[2] * 5)  # 24 slices: 5 x 5 tiles

    # the overlay of slice 0 along axis 0 holds the boxes' codes, lossless, k upwards
    overlay = _decode(data["methods"]["otsu"][0]["slices"])
    assert overlay.format == "PNG" and overlay.mode == "P"
    codes = np.asarray(overlay)[:SHAPE[2], :SHAPE[1]][::-1].T  # (J, K) of slice i = 0
    np.testing.assert_array_equal(codes, error_codes(pred, target)[0])
    palette = overlay.getpalette()
    for kind, code in ERROR_CODES.items():
        assert tuple(palette[3 * code:3 * code + 3]) == RGB[kind]
    mip = np.asarray(_decode(data["methods"]["otsu"][0]["mip"]))[::-1].T
    np.testing.assert_array_equal(mip, error_codes(pred, target).max(axis=0))


def test_page_reduces_large_volumes_and_checks_its_inputs(case):
    image, target, pred = case
    data = _payload(viewer_html(image, {"m": pred}, target, max_size=10))
    assert data["factor"] == 4 and [a["n"] for a in data["axes"]] == [6, 9, 8]
    codes = np.asarray(_decode(data["methods"]["m"][0]["slices"]))
    assert set(np.unique(codes)) == {0, *ERROR_CODES.values()}  # every class survives the block maximum
    unlabelled = _payload(viewer_html(image, {"m": pred}))
    assert unlabelled["labelled"] is False
    assert _payload(viewer_html(image, {}))["methods"] == {}
    with pytest.raises(ValueError, match=r"predictions\['m'\] has shape"):
        viewer_html(image, {"m": pred[1:]}, target)
    with pytest.raises(ValueError, match="max_size"):
        viewer_html(image, {}, max_size=2)
    with pytest.raises(ValueError, match="spacing_mm"):
        viewer_html(image, {}, spacing_mm=(1, 0, 1))


# ---------------------------------------------------------------------------------------------- browser

WINDOW = (1100, 620)


def _chromium(url: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return headless_chromium(url, *args, window=WINDOW, profile=tmp / "profile")


def _screenshot(url: str, tmp: Path, name: str) -> np.ndarray:
    path = tmp / f"{name}.png"
    _chromium(url, tmp, f"--screenshot={path}")
    shot = np.asarray(Image.open(path).convert("RGB"))
    assert shot.shape[:2] == (WINDOW[1], WINDOW[0])
    return shot


def _layout(url: str, tmp: Path) -> dict[str, dict[str, float]]:
    dom = _chromium(url, tmp, "--dump-dom").stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    attrs = {k: html.unescape(v) for k, v in re.findall(r'data-(\w+)="([^"]*)"', body)}
    assert attrs.get("ready") == "1", "the page did not finish loading its images"
    return {k: json.loads(attrs[k]) for k in ("slice", "mip")}


def _pixel(shot: np.ndarray, rect: dict, u: float, v: float, size: tuple[int, int]) -> tuple[int, ...]:
    """Screen colour at voxel (u, v) of a canvas of ``size`` (width, height) voxels, v counted upwards."""
    x = rect["left"] + (u + 0.5) * rect["width"] / size[0]
    y = rect["top"] + (size[1] - v - 0.5) * rect["height"] / size[1]
    return tuple(int(c) for c in shot[int(y), int(x)])


def _crop(rect: dict) -> tuple[slice, slice]:
    return slice(int(rect["top"]), int(rect["bottom"])), slice(int(rect["left"]), int(rect["right"]))


def _count(shot: np.ndarray, kind: str) -> int:
    """Pixels of ``kind``'s colour (crop the shot to a canvas first: the legend's swatches have them too)."""
    return int(np.all(np.abs(shot.astype(int) - RGB[kind]) <= 2, axis=-1).sum())


@pytest.fixture(scope="module")
def page(case, tmp_path_factory) -> Path:
    image, target, pred = case
    path = tmp_path_factory.mktemp("viewer") / "case.html"
    path.write_text(viewer_html(image, {"otsu": pred, "none": np.zeros(SHAPE, bool)}, target, title="case"),
                    encoding="utf-8")
    return path


@needs_chromium
def test_browser_draws_the_overlay_at_its_voxels(page, tmp_path):
    """Slice 10 along axis 0 (J across, K up): the TP, FP and FN boxes show their colours where they lie."""
    url = page.as_uri() + "#axis=0&slice=10&overlay=1"
    rects = _layout(url, tmp_path)
    shot = _screenshot(url, tmp_path, "overlay")
    size = (SHAPE[1], SHAPE[2])
    at = {kind: _pixel(shot, rects["slice"], *uv, size) for kind, uv in
          (("tp", (8, 8)), ("fp", (25, 8)), ("fn", (8, 22)))}
    for kind, colour in at.items():
        assert np.abs(np.subtract(colour, RGB[kind])).max() <= 2, (kind, colour)
    background = _pixel(shot, rects["slice"], 30, 25, size)
    assert max(background) < 80  # dark noise, no overlay
    mip = {kind: _pixel(shot, rects["mip"], *uv, size) for kind, uv in (("fp", (25, 8)), ("fn", (8, 22)))}
    for kind, colour in mip.items():
        assert np.abs(np.subtract(colour, RGB[kind])).max() <= 2, ("mip", kind, colour)

    # overlay off: the same voxels show the dark image; the FP switch alone hides only the red box
    off = _screenshot(page.as_uri() + "#axis=0&slice=10&overlay=0", tmp_path, "off")
    assert max(_pixel(off, rects["slice"], 25, 8, size)) < 80
    assert _count(off[_crop(rects["slice"])], "fp") == _count(off[_crop(rects["mip"])], "fp") == 0
    no_fp = _screenshot(page.as_uri() + "#axis=0&slice=10&fp=0", tmp_path, "nofp")
    assert max(_pixel(no_fp, rects["slice"], 25, 8, size)) < 80
    assert np.abs(np.subtract(_pixel(no_fp, rects["slice"], 8, 22, size), RGB["fn"])).max() <= 2


@needs_chromium
def test_browser_slider_and_method_change_the_view(page, tmp_path):
    """Another slice (the hash the slider writes) shows another picture; another method another overlay."""
    url = page.as_uri() + "#axis=0&slice=10"
    rects = _layout(url, tmp_path)
    crop = _crop(rects["slice"])
    shot10 = _screenshot(url, tmp_path, "s10")
    shot20 = _screenshot(page.as_uri() + "#axis=0&slice=20", tmp_path, "s20")
    at10, at20 = shot10[crop], shot20[crop]
    assert _count(at10, "fp") > 100 and _count(at20, "fp") == 0  # the boxes end at i = 15
    assert np.abs(at10.astype(int) - at20).mean() > 5
    size = (SHAPE[1], SHAPE[2])
    assert min(_pixel(shot20, rects["slice"], 16, 15, size)) > 200  # the bright bar of slices i >= 16
    assert max(_pixel(shot10, rects["slice"], 16, 15, size)) < 80
    other = _screenshot(page.as_uri() + "#axis=0&slice=10&method=none", tmp_path, "none")[crop]
    assert _count(other, "fp") == 0 and _count(other, "tp") == 0


@needs_chromium
def test_browser_draws_inside_a_sandboxed_blob_frame(page, tmp_path):
    """MLflow's artifact pane: the page as a blob URL in ``<iframe sandbox="allow-scripts">`` (opaque origin)."""
    source = json.dumps(page.read_text(encoding="utf-8")).replace("</", "<\\/")
    wrapper = tmp_path / "mlflow_like.html"
    wrapper.write_text(
        '<!doctype html><html><body style="margin:0">'
        '<iframe id="f" sandbox="allow-scripts" style="border:0;width:1080px;height:600px"></iframe>'
        f"<script>const html = {source};\n"
        "document.getElementById('f').src = URL.createObjectURL(new Blob([html], {type: 'text/html'}))"
        " + '#axis=0&slice=10';</script></body></html>", encoding="utf-8")
    shot = _screenshot(wrapper.as_uri(), tmp_path, "frame")
    for kind in ("tp", "fp", "fn"):
        assert _count(shot, kind) > 50, kind


@needs_chromium
def test_browser_shows_two_methods_side_by_side_and_reads_out_the_voxel_under_the_pointer(page, tmp_path):
    """``compare=``: the second method's slice beside the first; pointing at a voxel names it, its intensity (in
    the image's units) and its class."""
    size = (SHAPE[1], SHAPE[2])
    with Browser(tmp_path / "profile", window=WINDOW) as browser:
        tab = browser.open(page.as_uri() + "#axis=0&slice=10&method=otsu&compare=none")
        tab.wait("document.body.dataset.ready === '1' && document.body.classList.contains('cmp')", what="page")
        rects = {k: json.loads(tab.eval(f"document.body.dataset.{k}")) for k in ("slice", "slice2", "mip")}
        assert rects["slice2"]["left"] >= rects["slice"]["right"] and rects["slice2"]["top"] == rects["slice"]["top"]
        assert rects["mip"]["top"] >= rects["slice"]["bottom"]  # the MIPs in the row below
        shot = np.asarray(Image.open(tab.screenshot(tmp_path / "two.png")).convert("RGB"))
        assert _count(shot[_crop(rects["slice"])], "fp") > 100 and _count(shot[_crop(rects["slice2"])], "fp") == 0
        for (u, v), kind, value in (((25, 8), "FP", None), ((8, 8), "TP", None), ((30, 25), "", None)):
            x = rects["slice"]["left"] + (u + 0.5) * rects["slice"]["width"] / size[0]
            y = rects["slice"]["top"] + (size[1] - v - 0.5) * rects["slice"]["height"] / size[1]
            tab.move(x, y)
            text = tab.wait(f"(t => t.includes('j {u},') && t)(document.getElementById('readout').textContent)",
                            what="readout")
            assert text.startswith(f"(i 10, j {u}, k {v}) intensity ≈ "), text
            assert (f" {kind} (otsu)" in text) if kind else ("(otsu)" not in text), text
        number = float(text.split("≈ ")[1].split()[0])  # the noise of the image there, 0-0.2
        assert 0.0 <= number <= 0.25, text
