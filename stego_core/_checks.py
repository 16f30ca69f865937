"""Validation helpers shared by the library: check first, name the culprit, then compute."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import numpy as np


def check_ndim(array: np.ndarray, ndim: int | Sequence[int], name: str) -> None:
    """Raise ``ValueError`` unless ``array.ndim`` is ``ndim`` (or one of them)."""
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if np.ndim(array) not in allowed:
        want = " or ".join(f"{n}D" for n in allowed)
        raise ValueError(f"{name} must be {want}; got shape {np.shape(array)} ({np.ndim(array)}D)")


def check_finite(array: np.ndarray, name: str) -> None:
    """Raise ``ValueError`` if ``array`` holds NaN or Inf, saying how many."""
    if np.issubdtype(np.asarray(array).dtype, np.floating):
        bad = ~np.isfinite(array)
        if bad.any():
            raise ValueError(f"{name} contains {int(bad.sum())} NaN/Inf values")


def check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` have the same shape."""
    if np.shape(a) != np.shape(b):
        raise ValueError(f"{name_b} has shape {np.shape(b)} but {name_a} has shape {np.shape(a)}")


def as_binary(array: np.ndarray, name: str, *, require_foreground: bool = False) -> np.ndarray:
    """Return ``array`` as a bool mask, accepting values {0, 1} or {0, 255}.

    Raises ``ValueError`` naming ``name`` and the values found for anything else
    (and for an all-zero mask when ``require_foreground``).
    """
    array = np.asarray(array)
    check_finite(array, name)
    values = np.unique(array)
    if values.size > 2 or not (set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}):
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if values.size > 6 else "")
        raise ValueError(f"{name} has values {{{shown}}}; expected {{0,1}} or {{0,255}}")
    mask = array > 0
    if require_foreground and not mask.any():
        raise ValueError(f"{name} is empty (no foreground voxels) but labels are required here")
    return mask


def check_range(value: float, name: str, low: float | None = None, high: float | None = None,
                *, low_inclusive: bool = True, high_inclusive: bool = True) -> None:
    """Raise ``ValueError`` naming the parameter unless ``low <= value <= high``."""
    ok = True
    if low is not None:
        ok &= value >= low if low_inclusive else value > low
    if high is not None:
        ok &= value <= high if high_inclusive else value < high
    if not ok:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        lb = "[" if low_inclusive else "("
        hb = "]" if high_inclusive else ")"
        raise ValueError(f"{name}={value!r} is out of range; expected a value in {lb}{lo}, {hi}{hb}")


def check_choice(value: Any, name: str, choices: tuple) -> None:
    """Raise ``ValueError`` naming ``name``, listing ``choices`` (and the closest one) unless ``value`` is one."""
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{name}={value!r} is not valid{hint}; choose one of {', '.join(map(repr, choices))}")
