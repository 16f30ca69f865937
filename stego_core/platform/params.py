"""Which settings of a plan a run logs as MLflow parameters: what a researcher filters and compares runs on.

A run used to log its whole resolved plan flattened (about 60 parameters for a baseline, 120 for STEGO, 300 for
the pipeline): the image cards of MLflow's *Model metrics* tab list a run's parameters under every picture, the
runs table offers them all as columns, and the few that matter drown. The whole plan stays the artifact
``plan.yaml`` (``--config plan.yaml`` reruns it); the parameters are (:func:`key_params`):

- every setting whose value differs from its default: what the config file and the overrides chose (the YAML
  files state only what differs), and what a step decided (a pipeline's pretrained weights);
- whatever names the method and the data (``method``, :data:`KEY_LEAVES`: ``split``, ``test_cases``,
  ``backbone``; ``data.source``, ``data.root``), every seed (a leaf ending in ``seed``), and the settings that
  name a learned model or its source (:data:`KEY_SETTINGS`: backbone, weights, clusters, code size, mapping rule,
  steps, features cached or online, crop size, how the crops were sampled, the preset, a teacher's method and
  preset), even at their defaults, so that a filter such as ``params.model.n_clusters = '64'`` finds every run;
- a method's settings when they are few (:data:`SMALL_SETTINGS` leaves or less: a classical method's
  percentile, its number of classes), all of them.

Sweeps log their swept values under their plain names on top of this (``sweeps/objective.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from stego_core.config import flatten

#: Leaves (last part of a key) logged whenever a plan has them.
KEY_LEAVES: frozenset[str] = frozenset({"split", "test_cases", "backbone"})
#: Whole keys (or key endings after a ``.``) logged whenever a plan has them.
KEY_SETTINGS: tuple[str, ...] = (
    "data.source", "data.root", "model.backbone", "model.weights", "model.n_clusters", "model.code_dim",
    "model.cluster_rule", "model.cluster_fit", "train.max_steps", "train.features", "patch_size", "max_steps",
    "sampling.method", "preset", "teacher.method", "teacher.preset",
)
#: A method's settings with at most this many leaves are logged whole.
SMALL_SETTINGS = 8

_NONE = object()  # "this leaf has no default" (a field without one, a row the defaults do not have)


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return _NONE


def _defaults(value: Any, default: Any = _NONE) -> Any:
    """``value``'s tree (as :func:`stego_core.config.to_dict` shows it) with every leaf replaced by its default:
    the field's default, or the value that the enclosing default section holds there."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = value.plan_fields() if hasattr(value, "plan_fields") else [f.name for f in dataclasses.fields(value)]
        fields = {f.name: f for f in dataclasses.fields(value)}
        same = dataclasses.is_dataclass(default) and type(default) is type(value)
        out = {name: _defaults(getattr(value, name), getattr(default, name) if same else _field_default(fields[name]))
               for name in names}
        if isinstance(getattr(value, "settings", None), Mapping) and isinstance(getattr(value, "method", None), str):
            out["settings"] = _defaults(value.settings, method_defaults(value.method))  # a row of methods
        return out
    if isinstance(value, Mapping):
        known = default if isinstance(default, Mapping) else {}
        return {k: _defaults(v, known.get(k, _NONE)) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and value and all(dataclasses.is_dataclass(x) for x in value):
        # sections (post-processing steps): against the default's own sections when it has as many, else all of
        # them are chosen (a chain added to a default of none: every step is a parameter)
        if isinstance(default, (list, tuple)) and len(default) == len(value):
            return [_defaults(x, d) for x, d in zip(value, default)]
        return _NONE
    if isinstance(default, (list, tuple)):
        return list(default)
    return default


def _text(value: Any) -> str:
    return str(list(value) if isinstance(value, tuple) else value)


def always_logged(key: str) -> bool:
    """Whether ``key`` is a parameter whatever its value (the method, the data, seeds, :data:`KEY_SETTINGS`)."""
    leaf = key.rsplit(".", 1)[-1]
    return (key == "method" or leaf in KEY_LEAVES or leaf.endswith("seed")
            or any(key == k or key.endswith("." + k) for k in KEY_SETTINGS))


def key_params(config: Any, *, prefix: str = "", exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The parameters of a plan (a config dataclass, or a mapping of settings): see the module's docstring.

    Parameters
    ----------
    config : dataclass instance or mapping
        A resolved plan or a method's settings.
    prefix : str, keyword-only
        Put before every key (``resolved.`` for a method's settings).
    exclude : iterable of str, keyword-only
        Keys (without ``prefix``) never logged (values that change while a run is continued).

    Returns
    -------
    dict
        ``{key: value}`` in the plan's order.

    Examples
    --------
    >>> from stego_core.data.slicing import SlicingConfig
    >>> key_params(SlicingConfig(stride=8))  # the crop size is a key setting, the stride differs from its default
    {'patch_size': 32, 'stride': 8}
    """
    full = flatten(config) if not isinstance(config, Mapping) else flatten(dict(config))
    if isinstance(config, Mapping):
        return {f"{prefix}{k}": v for k, v in full.items() if k not in set(exclude)}
    defaults = flatten(_defaults(config))
    skip = set(exclude)
    out = {}
    for key, value in full.items():
        if key in skip:
            continue
        default = defaults.get(key, _NONE)
        if always_logged(key) or default is _NONE or _text(default) != _text(value):
            out[f"{prefix}{key}"] = value
    return out


def method_defaults(method: str) -> Any:
    """The default settings of a registered method (a mapping for methods whose settings are one), or nothing."""
    from stego_core.methods.registry import resolve_settings

    try:
        return resolve_settings(method, {})
    except (ValueError, KeyError, TypeError):
        return _NONE


def settings_params(settings: Any, *, method: str = "", prefix: str = "resolved.") -> dict[str, Any]:
    """A method's resolved settings as parameters: all of them when they are few (:data:`SMALL_SETTINGS`), else
    the key settings and what differs from the defaults (``method``'s, for settings held as a mapping)."""
    if settings is None:
        return {}
    plain = settings if dataclasses.is_dataclass(settings) else dict(settings)
    full = flatten(plain)
    if len(full) <= SMALL_SETTINGS:
        return {f"{prefix}{k}": v for k, v in full.items()}
    if dataclasses.is_dataclass(settings):
        return key_params(settings, prefix=prefix)
    defaults = flatten(_defaults(plain, method_defaults(method) if method else _NONE))
    return {f"{prefix}{k}": v for k, v in full.items()
            if always_logged(k) or defaults.get(k, _NONE) is _NONE or _text(defaults[k]) != _text(v)}
