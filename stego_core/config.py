"""The schema machinery of every config: frozen dataclasses loaded from YAML with ``section.key=value``
overrides, validated, printed as the plan.

The dataclasses themselves live beside the code they configure (``DataConfig`` in ``data/cases.py``,
``EngineConfig`` in ``engine/reconstruction.py``, a method's settings beside the method, each entry point's config
in its ``steps/`` module); defaults are stated there once and the YAML files in ``experiments/configs/`` state only
what differs. Here: :func:`load_config` (a file, then overrides), :func:`from_dict` (unknown keys fail listing the
valid ones, values are converted to the field's type, ``__post_init__`` checks ranges), :func:`plan_yaml` (what
``--print-config`` prints and every run logs as ``plan.yaml``), :func:`flatten` (MLflow params) and
:func:`derive` (a step's config from a pipeline's).

>>> from stego_core.data.slicing import SlicingConfig
>>> cfg = load_config(SlicingConfig, None, ["patch_size=16", "axis=1"])
>>> cfg.patch_size, cfg.axis
(16, 1)
>>> print(plan_yaml(cfg), end="")
axis: 1
patch_size: 16
stride: 16
min_brain_fraction: 0.05
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

#: The folder holding ``stego_core/`` and ``experiments/`` (a checkout, or site-packages for an installed copy).
PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: The presets shipped with the package (``experiments/configs``: package data beside ``stego_core``).
SHIPPED_PRESETS = PROJECT_ROOT / "experiments" / "configs"
#: The folder of the config file being loaded (:func:`load_config`): a path a config names (a teacher preset) is
#: found relative to it when it is not relative to the working directory (:func:`config_path`).
_LOADING_FROM: contextvars.ContextVar[Path | None] = contextvars.ContextVar("loading_from", default=None)


def config_path(path: str | Path) -> Path:
    """``path`` as given when it exists (relative to the working directory), else relative to the folder of the
    config file being loaded, else as given (for the caller's error message)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    base = _LOADING_FROM.get()
    if base is not None and (base / p).exists():
        return base / p
    return p


# ------------------------------------------------------------------------------------------- shared sections


# ------------------------------------------------------------------------------------------------- data


# ------------------------------------------------------------------------------------ crop sampling


# ----------------------------------------------------------------------------------- model and training


# ------------------------------------------------------------------------ reconstruction and evaluation


# ------------------------------------------------------------------------------------- self-training


# ------------------------------------------------------------------------------- DINO pretraining


# ----------------------------------------------------------------------------------- the whole pipeline


# --------------------------------------------------------------------------------------------------- loading


def derive(cls: type[T], source: Any, **changes: Any) -> T:
    """A step's config ``cls`` built from the sections ``source`` shares with it (same field names), with
    ``changes`` on top: how the pipeline hands its plan to each step without copying fields by hand.

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Step:
    ...     seed: int = 0
    ...     output: str = "x"
    >>> @dataclass(frozen=True)
    ... class Pipeline:
    ...     seed: int = 0
    ...     other: str = ""
    >>> derive(Step, Pipeline(seed=3), output="o")
    Step(seed=3, output='o')
    """
    shared = {f.name for f in dataclasses.fields(cls)} & {f.name for f in dataclasses.fields(source)}
    return cls(**{name: getattr(source, name) for name in shared if name not in changes}, **changes)


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
        if value is None:  # `key: null` / `key=null`: str(None) would name a folder or an experiment "None"
            raise ValueError(f"{name} must be {'a string' if tp is str else tp.__name__}, got null")
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
    """The config as plain nested dicts and lists (YAML-safe). A section that defines ``plan_fields()`` shows only
    the fields it names (e.g. the phantom generator's settings only when phantoms are generated)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            names = v.plan_fields() if hasattr(v, "plan_fields") else [f.name for f in dataclasses.fields(v)]
            return {name: plain(getattr(v, name)) for name in names}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(config)


def flatten(config: Any) -> dict[str, Any]:
    """Flatten a config to ``{"section.key": value}`` for MLflow params."""
    out: dict[str, Any] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                out[f"{prefix}{k}"] = len(v)  # a list of sections (post-processing steps): one key per field
                for i, item in enumerate(v):
                    walk({key: x for key, x in item.items() if x is not None}, f"{prefix}{k}.{i}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(to_dict(config), "")
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if isinstance(child, list) and all(isinstance(x, str) for x in child):
            child = {name: {} for name in child}  # a list of names: a mapping of empty sections
            node[p] = child
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

    Overrides are ``["section.key=value", ...]`` or a dict ``{"section.key": value}``. A list of names where a
    mapping of sections is expected (``methods: [gmm, stego]``) counts as that mapping with empty sections, so
    ``methods.stego.settings.train.max_steps=50`` can override one of them.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        ``path`` is a folder, is not valid YAML, holds no mapping; an override or a value is invalid (the key is
        named).
    """
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"config file {path} is a folder; give a YAML file")
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
            raise ValueError(f"config file {path} is not valid YAML{at}: "
                             f"{getattr(exc, 'problem', None) or str(exc).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping at the top level")
        tree = loaded
    items = list(overrides.items()) if isinstance(overrides, dict) else parse_overrides(overrides)
    for key, value in items:
        _set_dotted(tree, key, value)
    token = _LOADING_FROM.set(path.resolve().parent if path is not None else None)
    try:
        return from_dict(cls, tree)
    finally:
        _LOADING_FROM.reset(token)


def plan_yaml(config: Any) -> str:
    """The resolved plan as YAML: what ``--print-config`` prints and every run logs as ``plan.yaml``.
    ``--config`` of that text resolves to the same config (:func:`load_config`)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def save_config(config: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (:func:`plan_yaml`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(plan_yaml(config))
    return path
