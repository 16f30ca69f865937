"""Tests for stego_core.config: YAML + dotted overrides into frozen dataclasses, with clear errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from stego_core._checks import check_choice
from stego_core.config import (
    flatten,
    from_dict,
    load_config,
    parse_overrides,
    save_config,
    to_dict,
)
from stego_core.data.cases import DataConfig
from stego_core.data.phantom import PhantomConfig
from stego_core.data.slicing import SlicingConfig
from stego_core.steps.prepare import PrepareConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


# Small configs exercising every kind of field the loader converts.
@dataclass(frozen=True)
class Inner:
    size: int = 3
    ratio: float = 0.5


@dataclass(frozen=True)
class Kinds:
    flag: bool = False
    count: int = 1
    rate: float = 0.1
    name: str = "x"
    maybe: int | None = None
    sizes: tuple[int, int, int] = (1, 2, 3)
    many: tuple[float, ...] = ()
    extra: dict = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)


def test_defaults():
    cfg = load_config(PrepareConfig)
    assert cfg == PrepareConfig()
    assert cfg.slicing == SlicingConfig(axis=2, patch_size=32, stride=16, min_brain_fraction=0.05)
    assert cfg.data.source == "phantom" and cfg.data.phantom.shape == (96, 96, 64)
    assert cfg.test_fraction == 0.34


def test_configs_are_frozen():
    cfg = PrepareConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.output = "elsewhere"  # type: ignore[misc]


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("data:\n  source: folder\n  root: /some/cases\n"
                    "slicing: {patch_size: 64, stride: 32}\ndataset_name: real\n")
    cfg = load_config(PrepareConfig, path, ["slicing.stride=16", "data.phantom.seed=7", "split_seed=3"])
    assert cfg.data.source == "folder" and cfg.data.root == "/some/cases"
    assert cfg.slicing.patch_size == 64 and cfg.slicing.stride == 16  # override wins over the file
    assert cfg.slicing.axis == 2  # untouched keys keep their defaults
    assert cfg.data.phantom.seed == 7 and cfg.data.phantom.n_volumes == 3
    assert cfg.dataset_name == "real" and cfg.split_seed == 3


def test_dict_overrides():
    cfg = load_config(PrepareConfig, None, {"slicing.axis": 0, "data.phantom.shape": [32, 32, 24]})
    assert cfg.slicing.axis == 0
    assert cfg.data.phantom.shape == (32, 32, 24)


def test_empty_yaml_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_config(PrepareConfig, path) == PrepareConfig()


def test_type_conversion_from_strings():
    cfg = load_config(Kinds, None, {"flag": "yes", "count": "12", "rate": "1e-3", "name": 5, "maybe": "7",
                                    "sizes": "4, 5, 6", "many": "[0.5, 2]", "inner.size": "9"})
    assert cfg.flag is True
    assert cfg.count == 12 and type(cfg.count) is int
    assert cfg.rate == pytest.approx(1e-3) and type(cfg.rate) is float
    assert cfg.name == "5"
    assert cfg.maybe == 7
    assert cfg.sizes == (4, 5, 6)
    assert cfg.many == (0.5, 2.0) and all(type(v) is float for v in cfg.many)
    assert cfg.inner == Inner(size=9, ratio=0.5)


def test_type_conversion_from_cli_overrides():
    cfg = load_config(Kinds, None, ["flag=false", "count=4", "rate=2", "maybe=null", "sizes=[7,8,9]",
                                    "extra={a: 1, b: [2, 3]}", "inner.ratio=0.25"])
    assert cfg.flag is False
    assert cfg.count == 4
    assert cfg.rate == 2.0 and type(cfg.rate) is float
    assert cfg.maybe is None
    assert cfg.sizes == (7, 8, 9)
    assert cfg.extra == {"a": 1, "b": [2, 3]}
    assert cfg.inner.ratio == 0.25


@pytest.mark.parametrize("text", ["none", "None", "null", ""])
def test_none_spellings(text):
    assert load_config(Kinds, None, {"maybe": text}).maybe is None


def test_nested_dataclass_from_dict_and_yaml(tmp_path):
    path = tmp_path / "k.yaml"
    path.write_text("inner: {size: 5}\nextra: {nested: {deep: true}}\n")
    cfg = load_config(Kinds, path)
    assert cfg.inner == Inner(size=5, ratio=0.5)
    assert cfg.extra == {"nested": {"deep": True}}


@pytest.mark.parametrize("overrides, message", [
    ({"count": 2.5}, "count must be int, got 2.5"),
    ({"count": "ten"}, "count must be int, got 'ten'"),
    ({"flag": "maybe"}, "flag must be true or false, got 'maybe'"),
    ({"sizes": [1, 2]}, "sizes needs 3 values, got 2"),
    ({"sizes": 5}, "sizes must be a list"),
    ({"inner": 3}, "inner must be a mapping"),
    ({"inner.size": "big"}, "inner.size must be int"),
])
def test_conversion_errors_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_config(Kinds, None, overrides)


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ValueError) as info:
        load_config(PrepareConfig, None, ["slicing.patch_sise=48"])
    msg = str(info.value)
    assert "unknown config key slicing.patch_sise" in msg
    assert "did you mean slicing.patch_size?" in msg
    assert "slicing.stride" in msg and "slicing.min_brain_fraction" in msg  # valid keys are listed


def test_unknown_top_level_key_in_yaml(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("dataset_nam: mra\n")
    with pytest.raises(ValueError, match=r"unknown config key dataset_nam \(did you mean dataset_name\?\)"):
        load_config(PrepareConfig, path)


def test_unknown_key_without_close_match():
    with pytest.raises(ValueError) as info:
        load_config(PrepareConfig, None, ["data.zzzzzz=1"])
    assert "did you mean" not in str(info.value)
    assert "valid keys: data.source, data.root" in str(info.value)


def test_invalid_choice_lists_choices():
    with pytest.raises(ValueError) as info:
        load_config(PrepareConfig, None, ["data.source=phantm"])
    msg = str(info.value)
    assert "data.source='phantm' is not valid" in msg
    assert "did you mean 'phantom'?" in msg
    assert "choose one of 'phantom', 'folder'" in msg
    with pytest.raises(ValueError, match=r"data\.skull_strip='brain'.*'auto', 'given', 'head', 'none'"):
        load_config(PrepareConfig, None, ["data.skull_strip=brain"])
    with pytest.raises(ValueError, match=r"slicing\.axis=3 is not valid.*0, 1, 2"):
        load_config(PrepareConfig, None, ["slicing.axis=3"])


def test_check_choice_public():
    check_choice("b", "opt", ("a", "b"))
    with pytest.raises(ValueError, match=r"opt='c' is not valid; choose one of 'a', 'b'"):
        check_choice("c", "opt", ("a", "b"))


@pytest.mark.parametrize("overrides, key", [
    (["slicing.stride=64"], r"slicing\.stride=64 is out of range; expected a value in \[1, 32\]"),
    (["slicing.stride=0"], r"slicing\.stride=0 is out of range"),
    (["slicing.patch_size=2", "slicing.stride=1"], r"slicing\.patch_size=2 is out of range"),
    (["slicing.min_brain_fraction=1.5"], r"slicing\.min_brain_fraction=1\.5 is out of range"),
    (["test_fraction=1.0"], r"test_fraction=1\.0 is out of range; expected a value in \[0, 1\)"),
    (["data.phantom.n_volumes=0"], r"phantom\.n_volumes=0 is out of range"),
    (["data.phantom.shape=[8,32,32]"], r"phantom\.shape=\(8, 32, 32\) must be three sizes >= 24"),
])
def test_range_errors_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        load_config(PrepareConfig, None, overrides)


def test_stride_equal_to_patch_is_allowed():
    assert load_config(PrepareConfig, None, ["slicing.patch_size=48", "slicing.stride=48"]).slicing.stride == 48


def test_flatten_keys_and_values():
    flat = flatten(PrepareConfig())
    phantom = {f"data.phantom.{f.name}" for f in dataclasses.fields(PhantomConfig)}  # every generation setting
    assert {"data.phantom.n_volumes", "data.phantom.seed", "data.phantom.n_trees"} <= phantom
    assert set(flat) == phantom | {
        "data.source", "data.root", "data.skull_strip", "data.standardize",
        "slicing.axis", "slicing.patch_size", "slicing.stride", "slicing.min_brain_fraction",
        "output", "dataset_name", "test_fraction", "split_seed", "test_cases", "experiment",
    }
    assert flat["data.phantom.shape"] == [96, 96, 64]
    assert flat["slicing.stride"] == 16
    assert flat["data.source"] == "phantom"


def test_to_dict_is_yaml_safe():
    tree = to_dict(PrepareConfig())
    assert tree["data"]["phantom"]["spacing_mm"] == [1.0, 1.0, 1.0]
    assert yaml.safe_load(yaml.safe_dump(tree)) == tree


def test_save_config_round_trip(tmp_path):
    cfg = load_config(PrepareConfig, None, ["data.source=phantom", "data.root=/x/y", "slicing.axis=0",
                                            "slicing.patch_size=48", "data.phantom.spacing_mm=[0.5,0.5,1.2]"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert path.is_file()
    again = load_config(PrepareConfig, path)
    assert again == cfg
    assert again.data.phantom.spacing_mm == (0.5, 0.5, 1.2)
    # the plan of folders of cases leaves the phantom generator out: it does not run
    folder = load_config(PrepareConfig, None, ["data.source=folder", "data.root=/x/y"])
    assert "phantom" not in to_dict(folder)["data"]
    assert load_config(PrepareConfig, save_config(folder, tmp_path / "f.yaml")) == folder


def test_save_config_round_trip_with_none_and_dict(tmp_path):
    cfg = Kinds(flag=True, maybe=None, many=(1.5,), extra={"k": [1, 2]}, inner=Inner(4, 0.75))
    assert load_config(Kinds, save_config(cfg, tmp_path / "k.yaml")) == cfg


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config file .*absent\.yaml does not exist"):
        load_config(PrepareConfig, tmp_path / "absent.yaml")


def test_non_mapping_yaml(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping at the top level"):
        load_config(PrepareConfig, path)


def test_parse_overrides():
    assert parse_overrides(["a.b=3", "c=0.5", "d=true", "e=[1, 2]", "f=text", "g=", "h=x=y"]) == [
        ("a.b", 3), ("c", 0.5), ("d", True), ("e", [1, 2]), ("f", "text"), ("g", ""), ("h", "x=y")]
    assert parse_overrides(None) == []
    with pytest.raises(ValueError, match="'slicing.axis' must look like section.key=value"):
        parse_overrides(["slicing.axis"])


def test_from_dict_builds_sections():
    data = from_dict(DataConfig, {"phantom": {"n_volumes": 2, "shape": [32, 32, 24]}})
    assert data.phantom == PhantomConfig(n_volumes=2, shape=(32, 32, 24))


def test_shipped_prepare_config_loads():
    path = REPO_ROOT / "experiments" / "configs" / "prepare.yaml"
    if not path.is_file():
        pytest.skip("experiments/configs/prepare.yaml not present")
    cfg = load_config(PrepareConfig, path)
    assert cfg.slicing.patch_size == 32 and cfg.slicing.stride == 16
    assert cfg.data.phantom.shape == (96, 96, 64)


def test_implausible_cluster_count_fails_before_any_work():
    # a raw allocator error after feature caching and training once; now one line naming the parameter
    from stego_core.steps.training import TrainConfig

    with pytest.raises(ValueError, match=r"model.n_clusters=100000 .*\[2, 4096\]"):
        load_config(TrainConfig, None, ["model.n_clusters=100000"])
