"""Frozen dataclass configs loaded from YAML, with ``section.key=value`` overrides.

One dataclass per stage; a run's config nests them. Unknown keys fail listing the valid ones, values are
converted to the field's type, and ``__post_init__`` checks ranges. The resolved config is saved with the run
and flattened into MLflow params (:func:`flatten`).

>>> cfg = load_config(PrepareConfig, None, ["slicing.patch_size=32", "slicing.axis=1"])
>>> cfg.slicing.patch_size, cfg.slicing.axis
(32, 1)
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from stego_core._checks import check_range

T = TypeVar("T")

SKULL_STRIP_MODES = ("auto", "given", "head", "none")
STANDARDIZE_METHODS = ("zscore_minmax", "percentile")
BLEND_MODES = ("constant", "gaussian")


@dataclass(frozen=True)
class PhantomSettings:
    """How ``source: phantom`` data is generated (see :mod:`stego_core.phantom`)."""

    n_volumes: int = 3
    shape: tuple[int, int, int] = (96, 96, 64)
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    seed: int = 0

    def __post_init__(self) -> None:
        check_range(self.n_volumes, "phantom.n_volumes", 1)
        if len(self.shape) != 3 or min(self.shape) < 24:
            raise ValueError(f"phantom.shape={self.shape} must be three sizes >= 24")


@dataclass(frozen=True)
class DataConfig:
    """Where volumes come from and how they are preprocessed.

    ``source`` is ``phantom`` (generated into ``root``) or ``folder`` (existing case folders under ``root``).
    """

    source: str = "phantom"
    root: str = "data/phantoms"
    skull_strip: str = "auto"
    standardize: str = "zscore_minmax"
    phantom: PhantomSettings = field(default_factory=PhantomSettings)

    def __post_init__(self) -> None:
        _check_choice(self.source, "data.source", ("phantom", "folder"))
        _check_choice(self.skull_strip, "data.skull_strip", SKULL_STRIP_MODES)
        _check_choice(self.standardize, "data.standardize", STANDARDIZE_METHODS)


@dataclass(frozen=True)
class SlicingConfig:
    """2D crops cut from slices along ``axis`` (0, 1 or 2; 2 = axial for RAS-like volumes)."""

    axis: int = 2
    patch_size: int = 32
    stride: int = 16
    min_brain_fraction: float = 0.05

    def __post_init__(self) -> None:
        _check_choice(self.axis, "slicing.axis", (0, 1, 2))
        check_range(self.patch_size, "slicing.patch_size", 4)
        check_range(self.stride, "slicing.stride", 1, self.patch_size)
        check_range(self.min_brain_fraction, "slicing.min_brain_fraction", 0.0, 1.0)


@dataclass(frozen=True)
class PrepareConfig:
    """The ``prepare`` entry point: volumes -> preprocessed 2D crops in the seed's dataset layout."""

    data: DataConfig = field(default_factory=DataConfig)
    slicing: SlicingConfig = field(default_factory=SlicingConfig)
    output: str = "outputs/prepared"
    dataset_name: str = "mra"
    test_fraction: float = 0.34
    split_seed: int = 0
    experiment: str = "stego-vessels"

    def __post_init__(self) -> None:
        check_range(self.test_fraction, "test_fraction", 0.0, 1.0, high_inclusive=False)


# --------------------------------------------------------------------------------------------------- loading


def _check_choice(value: Any, name: str, choices: tuple) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{name}={value!r} is not valid{hint}; choose one of {', '.join(map(repr, choices))}")


def check_choice(value: Any, name: str, choices: tuple) -> None:
    """Raise ``ValueError`` naming ``name`` and listing ``choices`` unless ``value`` is one of them."""
    _check_choice(value, name, choices)


def _convert(value: Any, tp: Any, name: str) -> Any:
    """Convert a YAML/CLI value to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{name}.")
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _convert(value, args[0], name)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value if value.startswith("[") else f"[{value}]")
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], name) for v in value)
        if len(value) != len(args):
            raise ValueError(f"{name} needs {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_convert(v, a, name) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return bool(value)
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be {tp.__name__}, got {value!r}") from None
    return value


def from_dict(cls: type[T], values: dict, *, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys raise listing the valid ones."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
        raise ValueError(f"unknown config key {prefix}{key}{hint}; valid keys: {', '.join(prefix + n for n in names)}")
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> dict:
    """The config as plain nested dicts and lists (YAML-safe)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))


def flatten(config: Any) -> dict[str, Any]:
    """Flatten a config to ``{"section.key": value}`` for MLflow params."""
    out: dict[str, Any] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(to_dict(config), "")
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {}
            node[p] = child
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """Parse ``key=value`` strings; values are read as YAML scalars (``3``, ``0.1``, ``true``, ``[1,2]``)."""
    parsed = []
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    return parsed


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | dict | None = None) -> T:
    """Load ``cls`` from a YAML file (or defaults when ``path`` is None) and apply overrides.

    Overrides are ``["section.key=value", ...]`` or a dict ``{"section.key": value}``.
    """
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping at the top level")
        tree = loaded
    items = list(overrides.items()) if isinstance(overrides, dict) else parse_overrides(overrides)
    for key, value in items:
        _set_dotted(tree, key, value)
    return from_dict(cls, tree)


def save_config(config: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    return path
