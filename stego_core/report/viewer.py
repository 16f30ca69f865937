"""A self-contained HTML viewer of a volume, its predictions and its label, for MLflow's artifact pane.

:func:`viewer_html` returns one HTML document that needs no network: the volume is reduced by a block maximum
(an integer factor so that its largest side is at most ``max_size`` voxels; thin bright vessels survive, as in
a maximum-intensity projection), every slice along each of the three axes is tiled into one mosaic per axis
and encoded as a lossy WebP image, the error classes as lossless palette PNG mosaics (one per method and axis),
all embedded as base64 ``data:`` URLs in a JSON block; about a hundred lines of vanilla JavaScript draw the
chosen slice and the maximum-intensity projection (MIP) along the same axis on two canvases, with the overlay
on top. MLflow shows ``.html`` artifacts in a sandboxed frame (``sandbox="allow-scripts"``, a blob URL): no
storage, cookies or same-origin access are used, and ``data:`` images leave canvases readable there.

Controls: a method selector and a second one, *beside it*, that shows another method's slice and MIP next to
the first (when there are several predictions), the axis, a slice slider, an overlay switch and one switch per
error class; pointing at a view reads out the voxel (``i, j, k``; a range of voxels where the volume was reduced)
and its intensity (in the image's own units, from the displayed 8-bit slice: approximate) and, on an overlay,
its class. The view can be set from the URL hash, which the controls keep up to date:
``#axis=0&slice=10&overlay=1&tp=1&fp=0&fn=1&method=otsu&compare=stego``; ``slice`` is a voxel index of the
full-size volume along ``axis`` (the viewer shows the reduced slice that holds it).

Colours and precedence are those of :func:`stego_core.report.visualize.error_overlay`: true positives gold,
false positives red, false negatives cyan; where a reduced voxel (or a projection ray) holds several kinds,
false positives win over false negatives, and both over true positives. Without a label every predicted
voxel is drawn in the false-positive colour and the switch reads "prediction". Display orientation follows
:mod:`stego_core.report.visualize`: of the two in-plane axes the lower-numbered runs left to right and the other
bottom to top; voxel spacing sets the aspect ratio. The steps show the image as stored (with the skull, not
the preprocessed one), the same in every viewer of a case.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from stego_core._checks import (
    as_binary,
    check_finite,
    check_ndim,
    check_range,
    check_same_shape,
)
from stego_core.report.visualize import ERROR_COLOURS

__all__ = [
    "ERROR_CODES",
    "block_max",
    "error_codes",
    "mosaic",
    "viewer_html",
]

#: Code of each error class in :func:`error_codes` and in the overlay images' palette; a larger code wins
#: when voxels are merged (block maximum, projection).
ERROR_CODES: Mapping[str, int] = {"tp": 1, "fn": 2, "fp": 3}

#: Largest side of a WebP image (libwebp's limit).
_WEBP_MAX_PX = 16383


def error_codes(pred: np.ndarray, target: np.ndarray | None) -> np.ndarray:
    """Error class of every voxel: 0 background, then :data:`ERROR_CODES` (TP 1, FN 2, FP 3).

    Parameters
    ----------
    pred : (I, J, K) bool or {0, 1} ndarray
        Predicted mask.
    target : (I, J, K) bool or {0, 1} ndarray or None
        Reference mask; None codes every predicted voxel as a false positive (no label to compare with).

    Returns
    -------
    (I, J, K) uint8 ndarray
        Values in {0, 1, 2, 3}.

    Examples
    --------
    >>> error_codes(np.array([[[1, 1, 0, 0]]]), np.array([[[1, 0, 1, 0]]])).tolist()
    [[[1, 3, 2, 0]]]
    """
    pred = _binary(pred, "pred")
    codes = np.zeros(pred.shape, np.uint8)
    if target is None:
        codes[pred] = ERROR_CODES["fp"]
        return codes
    target = _binary(target, "target")
    check_same_shape(pred, target, "pred", "target")
    codes[pred & target] = ERROR_CODES["tp"]
    codes[~pred & target] = ERROR_CODES["fn"]
    codes[pred & ~target] = ERROR_CODES["fp"]
    return codes


def block_max(volume: np.ndarray, factor: int) -> np.ndarray:
    """Reduce a volume by an integer factor along every axis, keeping each block's maximum.

    Parameters
    ----------
    volume : (I, J, K) ndarray
        Any real dtype; the last block along an axis may be partial (padded with the volume's minimum).
    factor : int >= 1
        Block side in voxels.

    Returns
    -------
    (ceil(I / factor), ceil(J / factor), ceil(K / factor)) ndarray
        Same dtype as ``volume``.

    Examples
    --------
    >>> block_max(np.arange(27).reshape(3, 3, 3), 2)[..., 0].tolist()
    [[13, 16], [22, 25]]
    """
    volume = np.asarray(volume)
    check_ndim(volume, 3, "volume")
    check_range(factor, "factor", 1)
    if factor == 1:
        return volume
    padded_shape = tuple(-(-n // factor) * factor for n in volume.shape)
    if padded_shape != volume.shape:
        padded = np.full(padded_shape, volume.min(), dtype=volume.dtype)
        padded[tuple(slice(0, n) for n in volume.shape)] = volume
        volume = padded
    a, b, c = (n // factor for n in padded_shape)
    return volume.reshape(a, factor, b, factor, c, factor).max(axis=(1, 3, 5))


def _plane(array: np.ndarray) -> np.ndarray:
    """(B, C) slice -> (C, B) image rows: B left to right, C bottom to top."""
    return np.ascontiguousarray(np.swapaxes(array, 0, 1)[::-1])


def mosaic(volume: np.ndarray, axis: int) -> tuple[np.ndarray, int]:
    """Tile every slice of ``volume`` along ``axis`` into one image, row by row.

    Parameters
    ----------
    volume : (I, J, K) ndarray
    axis : {0, 1, 2}
        Slicing axis; each slice is drawn with the lower-numbered remaining axis horizontal and the other
        vertical, origin at the bottom (tile ``k`` holds slice ``k``).

    Returns
    -------
    image : (rows * h, cols * w) ndarray
        The tiles, ``h`` and ``w`` the slice's height and width; unused tiles are zero.
    cols : int
        Tiles per row (``ceil(sqrt(n))`` for ``n`` slices).
    """
    volume = np.asarray(volume)
    check_ndim(volume, 3, "volume")
    check_range(axis, "axis", 0, 2)
    slices = np.moveaxis(volume, axis, 0)
    n, b, c = slices.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.zeros((rows * c, cols * b), dtype=volume.dtype)
    for k in range(n):
        r, q = divmod(k, cols)
        out[r * c:(r + 1) * c, q * b:(q + 1) * b] = _plane(slices[k])
    return out, cols


def _binary(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    return array if array.dtype == bool else as_binary(array, name)


def _data_url(image: Image.Image, fmt: str, **options) -> str:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    mime = {"WEBP": "image/webp", "PNG": "image/png"}[fmt]
    return f"data:{mime};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _check_size(image: np.ndarray, what: str) -> None:
    if max(image.shape) > _WEBP_MAX_PX:
        raise ValueError(f"the {what} mosaic is {image.shape[1]}x{image.shape[0]} px, above the WebP limit of "
                         f"{_WEBP_MAX_PX}; lower max_size")


def _gray_url(image: np.ndarray, quality: int) -> str:
    _check_size(image, "image")
    return _data_url(Image.fromarray(image, mode="L"), "WEBP", quality=quality, method=4)


def _palette() -> list[int]:
    rgb = [0, 0, 0] * 4
    for kind, code in ERROR_CODES.items():
        rgb[3 * code:3 * code + 3] = [round(255 * v) for v in ERROR_COLOURS[kind]]
    return rgb


def _codes_url(codes: np.ndarray) -> str:
    _check_size(codes, "overlay")
    image = Image.fromarray(codes, mode="P")
    image.putpalette(_palette())
    return _data_url(image, "PNG", transparency=0, optimize=True)


def _hex(rgb: Sequence[float]) -> str:
    return "#" + "".join(f"{round(255 * v):02x}" for v in rgb)


def viewer_html(
    image: np.ndarray,
    predictions: Mapping[str, np.ndarray],
    target: np.ndarray | None = None,
    *,
    spacing_mm: Sequence[float] | None = None,
    max_size: int = 160,
    quality: int = 75,
    title: str = "",
    notes: Mapping[str, str] | None = None,
) -> str:
    """One self-contained HTML page to scroll through a volume with predictions and label as overlays.

    Parameters
    ----------
    image : (I, J, K) float ndarray
        Intensities (any range; shown between the 0.5 and 99.9 percentiles of the reduced volume).
    predictions : mapping name -> (I, J, K) bool or {0, 1} ndarray
        Predicted masks by method, in selector order; may be empty (image only).
    target : (I, J, K) bool or {0, 1} ndarray or None, optional
        Reference mask; None draws predicted voxels in one colour.
    spacing_mm : sequence of 3 floats or None, keyword-only
        Voxel size, for the displayed aspect ratio; None: cubic voxels.
    max_size : int >= 8, keyword-only
        Largest side of the reduced volume in voxels: the volume is reduced by the block maximum with factor
        ``ceil(max(I, J, K) / max_size)``.
    quality : int in [1, 100], keyword-only
        WebP quality of the image slices (overlays are lossless).
    title : str, keyword-only
        Shown above the views and as the page title.
    notes : mapping name -> str, optional, keyword-only
        A warning per method (the domain guard's): the method is marked in the selector and the text shown in a
        red line while it is selected.

    Returns
    -------
    str
        The HTML document (UTF-8 text, no external reference). About 2.2-2.4 MB for one 320 x 320 x 247
        volume with one method at the defaults, plus 0.15-0.2 MB per further method (``benchmarks/RESULTS.md``,
        HTML slice viewer).
    """
    image = np.asarray(image)
    check_ndim(image, 3, "image")
    check_finite(image, "image")
    check_range(max_size, "max_size", 8)
    check_range(quality, "quality", 1, 100)
    if spacing_mm is not None:
        spacing = tuple(float(s) for s in spacing_mm)
        if len(spacing) != 3 or not all(s > 0 and math.isfinite(s) for s in spacing):
            raise ValueError(f"spacing_mm must be 3 positive numbers, got {spacing_mm!r}")
    else:
        spacing = (1.0, 1.0, 1.0)
    if target is not None:
        target = _binary(target, "target")
        check_same_shape(image, target, "image", "target")
    for name, pred in predictions.items():
        check_same_shape(image, np.asarray(pred), "image", f"predictions[{name!r}]")

    factor = max(1, math.ceil(max(image.shape) / max_size))
    small = block_max(image.astype(np.float32, copy=False), factor)
    lo, hi = (float(v) for v in np.percentile(small, [0.5, 99.9]))
    hi = hi if hi > lo else lo + 1.0
    gray = np.round(np.clip((small - lo) / (hi - lo), 0.0, 1.0) * 255).astype(np.uint8)

    axes = []
    for axis in range(3):
        b, c = (a for a in range(3) if a != axis)
        tiles, cols = mosaic(gray, axis)
        axes.append({"n": gray.shape[axis], "w": gray.shape[b], "h": gray.shape[c], "cols": cols,
                     "sx": spacing[b], "sy": spacing[c], "image": _gray_url(tiles, quality),
                     "mip": _gray_url(_plane(gray.max(axis=axis)), quality)})
    methods = {}
    for name, pred in predictions.items():
        codes = block_max(error_codes(pred, target), factor)
        methods[str(name)] = [{"slices": _codes_url(mosaic(codes, axis)[0]),
                               "mip": _codes_url(_plane(codes.max(axis=axis)))} for axis in range(3)]
    data = {"title": title, "shape": list(image.shape), "factor": factor, "labelled": target is not None,
            "lo": lo, "hi": hi, "axes": axes, "methods": methods,
            "notes": {str(k): str(v) for k, v in (notes or {}).items() if v}}
    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    colours = {kind: _hex(rgb) for kind, rgb in ERROR_COLOURS.items()}
    return (_TEMPLATE.replace("%TITLE%", html.escape(title or "volume viewer"))
            .replace("%TP%", colours["tp"]).replace("%FP%", colours["fp"]).replace("%FN%", colours["fn"])
            .replace("%RGB%", json.dumps({kind: [round(255 * v) for v in rgb] for kind, rgb in ERROR_COLOURS.items()}))
            .replace("%DATA%", payload))


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>%TITLE%</title>
<style>
body{margin:0;font:13px system-ui,sans-serif;background:#fff;color:#222}
#bar{display:flex;flex-wrap:wrap;gap:4px 14px;align-items:center;padding:6px 8px;border-bottom:1px solid #ddd}
#views{display:grid;grid-template-columns:repeat(2,max-content);gap:10px 12px;padding:8px;align-items:start}
figure{margin:0}figcaption{color:#555;font-size:12px}
canvas{image-rendering:pixelated;background:#000;display:block;cursor:crosshair}
.sw{display:inline-block;width:10px;height:10px;border:1px solid #888;margin-right:2px}
#warn{display:none;padding:4px 8px;background:#fdecea;color:#a50e0e;border-bottom:1px solid #f5c2c0}
#readout{font:12px ui-monospace,monospace;color:#333;min-width:28em}
.b{display:none}body.cmp .b{display:block}
</style></head><body>
<div id="bar"><b>%TITLE%</b>
<label id="mwrap">method <select id="method"></select></label>
<label id="cwrap">beside it <select id="compare"><option value="">(none)</option></select></label>
<span>axis <select id="axis"><option value="0">0 (i)</option><option value="1">1 (j)</option>
<option value="2">2 (k)</option></select></span>
<span><input type="range" id="slice" min="0" step="1"> <span id="pos"></span></span>
<span id="toggles"><label><input type="checkbox" id="overlay"> overlay</label>
<label id="l-tp"><input type="checkbox" id="tp"><i class="sw" style="background:%TP%"></i>TP</label>
<label id="l-fp"><input type="checkbox" id="fp"><i class="sw" style="background:%FP%"></i><span id="fpname">FP</span></label>
<label id="l-fn"><input type="checkbox" id="fn"><i class="sw" style="background:%FN%"></i>FN</label></span>
<span id="readout">point at a view: voxel and intensity</span>
</div>
<div id="warn" role="alert"></div>
<div id="views">
<figure><canvas id="cs"></canvas><figcaption id="cap">slice</figcaption></figure>
<figure class="a1"><canvas id="cm"></canvas><figcaption id="capm">maximum-intensity projection</figcaption></figure>
<figure class="b"><canvas id="cs2"></canvas><figcaption id="cap2">slice</figcaption></figure>
<figure class="b"><canvas id="cm2"></canvas><figcaption id="capm2">maximum-intensity projection</figcaption></figure>
</div>
<script type="application/json" id="viewer-data">%DATA%</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("viewer-data").textContent);
const RGB = %RGB%, $ = id => document.getElementById(id), names = Object.keys(D.methods);
const S = {axis: 2, slice: null, method: names[0], compare: "", overlay: true, tp: true, fp: true, fn: true};
const images = new Map();
function load(src) {  // decoded images by data URL; a redraw when one arrives
  if (!images.has(src)) { const im = new Image(); im.onload = draw; im.src = src; images.set(src, im); }
  const im = images.get(src); return im.complete && im.naturalWidth ? im : null;
}
function kindOf(r, g, b) {  // the error class of an overlay pixel: the nearest of the palette's colours
  let best = null, dist = 1e9;
  for (const [k, c] of Object.entries(RGB)) {
    const d = (r - c[0]) ** 2 + (g - c[1]) ** 2 + (b - c[2]) ** 2; if (d < dist) { dist = d; best = k; }
  }
  return best;
}
function readHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  if (["0", "1", "2"].includes(p.get("axis"))) S.axis = +p.get("axis");
  if (p.has("slice") && isFinite(+p.get("slice"))) S.slice = +p.get("slice");
  if (names.includes(p.get("method"))) S.method = p.get("method");
  if (p.has("compare")) S.compare = names.includes(p.get("compare")) ? p.get("compare") : "";
  for (const k of ["overlay", "tp", "fp", "fn"]) if (p.has(k)) S[k] = p.get(k) !== "0";
}
function writeHash() {
  const p = new URLSearchParams({axis: S.axis, slice: S.slice, overlay: +S.overlay, tp: +S.tp, fp: +S.fp, fn: +S.fn});
  if (S.method !== undefined) p.set("method", S.method);
  if (S.compare) p.set("compare", S.compare);
  try { history.replaceState(null, "", "#" + p); } catch (e) { /* sandboxed frame: no history */ }
}
function cut(im, k, cols, w, h) {  // tile k of a mosaic on its own canvas (readable: data: images)
  const off = document.createElement("canvas"); off.width = w; off.height = h;
  off.getContext("2d").drawImage(im, (k % cols) * w, Math.floor(k / cols) * h, w, h, 0, 0, w, h); return off;
}
function tile(ctx, im, k, cols, w, h, filter) {  // tile k of a mosaic, overlay classes filtered
  const off = cut(im, k, cols, w, h);
  if (filter) {
    const o = off.getContext("2d"), px = o.getImageData(0, 0, w, h), d = px.data;
    for (let i = 0; i < d.length; i += 4) if (d[i + 3] && !S[kindOf(d[i], d[i + 1], d[i + 2])]) d[i + 3] = 0;
    o.putImageData(px, 0, 0);
  }
  ctx.drawImage(off, 0, 0);
}
function panes() {  // [slice canvas, MIP canvas, method] of each column shown
  const out = [[$("cs"), $("cm"), S.method]];
  if (S.compare) out.push([$("cs2"), $("cm2"), S.compare]);
  return out;
}
function draw() {
  const a = D.axes[S.axis], f = D.factor, n = D.shape[S.axis];
  if (S.slice === null) S.slice = Math.floor(n / 2);
  S.slice = Math.max(0, Math.min(n - 1, Math.round(S.slice)));
  const k = Math.min(a.n - 1, Math.floor(S.slice / f)), two = Boolean(S.compare);
  document.body.classList.toggle("cmp", two);
  const px = Math.max(200, Math.min(440, (window.innerWidth - 36) / 2));  // two views a row, up to 440 px
  const z = px / Math.max(a.w * a.sx, a.h * a.sy);
  for (const [cs, cm, name] of panes()) {
    const m = D.methods[name];
    for (const [cv, src, ov, kk, cols] of [[cs, a.image, m && m[S.axis].slices, k, a.cols],
                                           [cm, a.mip, m && m[S.axis].mip, 0, 1]]) {
      cv.width = a.w; cv.height = a.h;
      cv.style.width = a.w * a.sx * z + "px"; cv.style.height = a.h * a.sy * z + "px";
      const ctx = cv.getContext("2d"), im = load(src), oi = ov && S.overlay ? load(ov) : null;
      if (im) tile(ctx, im, kk, cols, a.w, a.h, false);
      if (oi) tile(ctx, oi, kk, cols, a.w, a.h, true);
    }
  }
  $("views").style.gridTemplateColumns = "repeat(2, max-content)";
  for (const c of ["cs", "cm", "cs2", "cm2"]) $(c).parentNode.style.order = "";
  if (two) { $("cs2").parentNode.style.order = 1; $("cm").parentNode.style.order = 2; $("cm2").parentNode.style.order = 3; }
  $("axis").value = S.axis; $("slice").max = n - 1; $("slice").step = f; $("slice").value = S.slice;
  $("pos").textContent = `slice ${S.slice} / ${n - 1}` + (f > 1 ? ` (voxels ${k * f}-${Math.min(n, k * f + f) - 1}, block max)` : "");
  const who = two ? `${S.method}: ` : "", who2 = `${S.compare}: `;
  $("cap").textContent = `${who}slice ${S.slice} along axis ${S.axis}`; $("cap2").textContent = `${who2}slice ${S.slice} along axis ${S.axis}`;
  $("capm").textContent = `${who}maximum-intensity projection`; $("capm2").textContent = `${who2}maximum-intensity projection`;
  for (const key of ["overlay", "tp", "fp", "fn"]) $(key).checked = S[key];
  if (S.method !== undefined) $("method").value = S.method;
  $("compare").value = S.compare;
  const note = (D.notes || {})[S.method];
  $("warn").textContent = note ? "\\u26a0 domain warning: " + note : ""; $("warn").style.display = note ? "block" : "none";
  const b = document.body.dataset;  // where the views are, for tests that look at screenshots
  b.slice = JSON.stringify($("cs").getBoundingClientRect()); b.mip = JSON.stringify($("cm").getBoundingClientRect());
  b.slice2 = JSON.stringify($("cs2").getBoundingClientRect()); b.mip2 = JSON.stringify($("cm2").getBoundingClientRect());
  b.ready = [...images.values()].every(im => im.complete) ? "1" : "0";
}
const AXES = "ijk";
function readout(e, cv, isMip, name) {  // the voxel under the pointer, its intensity and its class
  const a = D.axes[S.axis], f = D.factor, r = cv.getBoundingClientRect();
  const x = Math.floor((e.clientX - r.left) / r.width * a.w), y = Math.floor((e.clientY - r.top) / r.height * a.h);
  if (x < 0 || y < 0 || x >= a.w || y >= a.h) return;
  const [ab, ac] = [0, 1, 2].filter(v => v !== S.axis), k = Math.min(a.n - 1, Math.floor(S.slice / f));
  const span = (v, axis) => f > 1 ? `${v * f}-${Math.min(D.shape[axis], v * f + f) - 1}` : `${v}`;
  const pos = {}; pos[ab] = span(x, ab); pos[ac] = span(a.h - 1 - y, ac);
  pos[S.axis] = isMip ? "MIP" : `${S.slice}`;
  const im = load(isMip ? a.mip : a.image); if (!im) return;
  const g = cut(im, isMip ? 0 : k, isMip ? 1 : a.cols, a.w, a.h).getContext("2d").getImageData(x, y, 1, 1).data[0];
  const value = D.lo + g / 255 * (D.hi - D.lo);
  let kind = "";
  const m = D.methods[name], ov = m && load(isMip ? m[S.axis].mip : m[S.axis].slices);
  if (ov) {
    const o = cut(ov, isMip ? 0 : k, isMip ? 1 : a.cols, a.w, a.h).getContext("2d").getImageData(x, y, 1, 1).data;
    if (o[3]) kind = " " + (D.labelled ? kindOf(o[0], o[1], o[2]).toUpperCase() : "predicted") + ` (${name})`;
  }
  const where = [0, 1, 2].map(v => `${AXES[v]} ${pos[v]}`).join(", ");
  $("readout").textContent = `(${where}) intensity \\u2248 ${value.toPrecision(4)}` + (f > 1 ? " (block max)" : "") + kind;
}
for (const [id, isMip, which] of [["cs", false, 0], ["cm", true, 0], ["cs2", false, 1], ["cm2", true, 1]])
  $(id).addEventListener("mousemove", e => readout(e, $(id), isMip, which ? S.compare : S.method));
for (const name of names) {
  $("method").add(new Option((D.notes || {})[name] ? name + " \\u26a0" : name, name));
  $("compare").add(new Option(name, name));
}
if (names.length < 2) { $("mwrap").style.display = "none"; $("cwrap").style.display = "none"; }
if (!names.length) $("toggles").style.display = "none";
if (!D.labelled) { $("l-tp").style.display = $("l-fn").style.display = "none"; $("fpname").textContent = "prediction"; }
$("method").onchange = e => { S.method = e.target.value; writeHash(); draw(); };
$("compare").onchange = e => { S.compare = e.target.value; writeHash(); draw(); };
$("axis").onchange = e => { S.axis = +e.target.value; S.slice = null; draw(); writeHash(); };
$("slice").oninput = e => { S.slice = +e.target.value; writeHash(); draw(); };
for (const key of ["overlay", "tp", "fp", "fn"]) $(key).onchange = e => { S[key] = e.target.checked; writeHash(); draw(); };
window.addEventListener("hashchange", () => { readHash(); draw(); });
window.addEventListener("resize", draw);
readHash(); draw();
</script></body></html>
"""
