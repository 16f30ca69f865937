"""The config you name is the plan: MLproject parameters default to "keep the config's value", every entry point
prints its resolved plan (``--print-config``), a logged ``plan.yaml`` reruns the same plan, and the shipped YAML
files state only what differs from the defaults in ``stego_core.config``."""

from __future__ import annotations

import dataclasses
import importlib
import re
import shlex
import typing
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT

from stego_core import config as C
from stego_core.steps.pipeline import MainConfig
from stego_core.steps.training import TrainConfig

CONFIG_DIRS = (REPO_ROOT / "experiments" / "configs", REPO_ROOT / "sweeps" / "configs")

#: Which entry point each shipped YAML file is written for (a new file must be listed here).
SHIPPED = {
    "main.yaml": "main", "mra_offline.yaml": "main", "mra_offline_tree.yaml": "main", "selftrain_mra.yaml": "main",
    "selftrain_mra_tree.yaml": "main", "selftrain_2pm.yaml": "main", "selftrain_stego.yaml": "main",
    "selftrain_synth.yaml": "main",
    "prepare.yaml": "prepare",
    "baseline.yaml": "baseline", "best_mra.yaml": "baseline", "best_mra_tree.yaml": "baseline", "best_2pm.yaml": "baseline",
    "train.yaml": "train", "train_cpu.yaml": "train",
    "reconstruct.yaml": "reconstruct",
    "selftrain.yaml": "selftrain",
    "ablation.yaml": "ablation", "ablation_phantom.yaml": "ablation", "ablation_selftrain.yaml": "ablation",
    "pretrain.yaml": "pretrain", "pretrain_synth.yaml": "pretrain_synth",
    "sweep.yaml": "sweep", "sweep_baseline.yaml": "sweep",
}
#: Keys an entry point cannot run without, given the same way on both paths.
REQUIRED = {"reconstruct": ["model_uri=runs:/0123456789abcdef0123456789abcdef/model"]}


def shipped_files() -> list[Path]:
    return sorted(p for d in CONFIG_DIRS for p in d.glob("*.yaml"))


def module_of(entry: str) -> str:
    return "sweeps.run" if entry == "sweep" else f"experiments.{entry}"


def printed_plan(entry: str, argv: list[str], capsys) -> str:
    main = importlib.import_module(module_of(entry)).main
    capsys.readouterr()
    code = main([*argv, "--print-config"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def project():
    from mlflow.projects import _project_spec

    return _project_spec.load_project(str(REPO_ROOT))


def test_every_shipped_config_is_known():
    names = {p.name for p in shipped_files()}
    assert names <= set(SHIPPED), f"add {sorted(names - set(SHIPPED))} to SHIPPED"


def test_mlproject_parameters_default_to_keep_the_config(project):
    for name, entry in project._entry_points.items():
        for key, param in entry.parameters.items():
            if key == "config" or name == "doctor":
                continue
            assert param.default == "", f"{name}: -P {key} defaults to {param.default!r}, not '' (keep the config)"
            assert param.type == "string", f"{name}: -P {key} must be a string ('' = keep the config)"


@pytest.mark.parametrize("path", shipped_files(), ids=lambda p: p.name)
def test_mlproject_with_only_config_resolves_to_the_files_plan(path, project, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # `mlflow run` runs the command in the project's folder
    entry = SHIPPED[path.name]
    rel = str(path.relative_to(REPO_ROOT))
    extra = " ".join(REQUIRED.get(entry, []))
    argv = shlex.split(project.get_entry_point(entry).compute_command({"config": rel, "extra": extra}, None))
    assert argv[:3] == ["python", "-m", module_of(entry)]
    via_mlproject = printed_plan(entry, argv[3:], capsys)
    direct = printed_plan(entry, ["--config", rel, *REQUIRED.get(entry, [])], capsys)
    assert via_mlproject == direct
    # the plan is the file: the file's own values are in it
    assert yaml.safe_load(direct)
    # and a run's logged plan.yaml reruns the same plan
    plan = tmp_path / "plan.yaml"
    plan.write_text(direct)
    assert printed_plan(entry, ["--config", str(plan)], capsys) == direct


def test_print_config_runs_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    text = printed_plan("train", ["--config", str(REPO_ROOT / "experiments/configs/train_cpu.yaml")], capsys)
    plan = yaml.safe_load(text)
    # the file's classical featurizer, K = 12 and 300 steps: not the MLproject's old typed defaults
    assert plan["model"]["backbone"] == "classical" and plan["model"]["n_clusters"] == 12
    assert plan["train"]["max_steps"] == 300
    assert not (tmp_path / "m.db").exists()


def test_a_parameter_overrides_the_file(project, capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    argv = shlex.split(project.get_entry_point("train").compute_command(
        {"config": "experiments/configs/train_cpu.yaml", "max_steps": "7", "extra": "train.lr_head=1e-4"}, None))
    plan = yaml.safe_load(printed_plan("train", argv[3:], capsys))
    assert plan["train"]["max_steps"] == 7 and plan["train"]["lr_head"] == pytest.approx(1e-4)
    assert plan["model"]["n_clusters"] == 12  # the rest is the file's


# ------------------------------------------------------------------------------------ defaults stated once


def _deliberate(text: str) -> set[str]:
    """Keys a file marks as deliberately equal to their default: ``# deliberate: a.b, c (why)``."""
    out: set[str] = set()
    for m in re.finditer(r"#\s*deliberate:\s*([^(\n]+)", text):
        out |= {k.strip() for k in m.group(1).split(",") if k.strip()}
    return out


def _redundant(tree: dict, cls: type, prefix: str = "") -> list[str]:
    """Dotted keys of ``tree`` whose value equals the default of ``cls``'s field."""
    hints = typing.get_type_hints(cls)
    defaults = cls()
    out = []
    for key, value in tree.items():
        if key not in hints:
            continue
        tp = hints[key]
        section = tp if dataclasses.is_dataclass(tp) else next(
            (a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), None)
        if section is not None and isinstance(value, dict):
            out += _redundant(value, section, f"{prefix}{key}.")
            continue
        try:
            converted = C._convert(value, tp, key)
        except ValueError:
            continue
        if converted == getattr(defaults, key):
            out.append(prefix + key)
    return out


@pytest.mark.parametrize("path", [p for p in shipped_files() if SHIPPED.get(p.name) != "sweep"],
                         ids=lambda p: p.name)
def test_shipped_configs_state_only_what_differs(path):
    entry = SHIPPED[path.name]
    cls = importlib.import_module(module_of(entry)).CONFIG
    text = path.read_text()
    tree = yaml.safe_load(text) or {}
    redundant = sorted(set(_redundant(tree, cls)) - _deliberate(text))
    assert not redundant, (f"{path.name} repeats defaults {redundant}: drop them, or mark them "
                           "'# deliberate: <key>' when the file must pin them")


def test_redundancy_check_can_fail():
    assert _redundant({"slicing": {"patch_size": 32, "stride": 8}}, TrainConfig) == ["slicing.patch_size"]
    assert _deliberate("a: 1  # deliberate: a, b.c (why)\n") == {"a", "b.c"}


def test_stego_teacher_preset_trains_stego_as_mra_offline_does():
    """``selftrain_stego.yaml`` says its STEGO is trained exactly as ``mra_offline.yaml``'s (YAML files have no
    inheritance, and the copy drifted once: ViT/2 and K = 64 after mra_offline moved to ViT/1 and K = 256)."""
    configs = REPO_ROOT / "experiments" / "configs"
    offline, teacher = (C.load_config(MainConfig, configs / name, [])
                        for name in ("mra_offline.yaml", "selftrain_stego.yaml"))
    for section in ("slicing", "engine"):
        assert getattr(teacher, section) == getattr(offline, section), section
    stego = offline.methods["stego"].settings
    assert teacher.methods["stego"].settings == stego
    assert teacher.methods["selftrain"].settings.teacher.settings == stego  # the stego row's model teaches


def test_clusters_mapped_with_labels_are_refused_on_the_volumes_they_segment():
    """``split: all`` evaluates the volumes STEGO is fitted on: a label rule would read the labels it is scored
    with, so the plan is refused at load (directly, and through a self-training teacher); label-free rules and a
    trained model (``model_uri``) pass."""
    configs = REPO_ROOT / "experiments" / "configs"
    tree = C.load_config(MainConfig, configs / "mra_offline_tree.yaml", [])
    assert tree.split == "test" and tree.methods["stego"].settings.model.cluster_rule == "dice"
    with pytest.raises(ValueError, match=r"methods.stego: model.cluster_rule='dice'.*split: all"):
        C.load_config(MainConfig, configs / "mra_offline_tree.yaml", ["split=all"])
    dice = {"model": {"cluster_rule": "dice"}}
    with pytest.raises(ValueError, match=r"methods.selftrain: teacher: model.cluster_rule='dice'"):
        C.load_config(MainConfig, None, {"split": "all", "methods": {"selftrain": {"settings": {
            "teacher": {"method": "stego", "settings": dice}}}}})
    C.load_config(MainConfig, configs / "mra_offline.yaml", ["split=all"])  # bright_cut: label-free
    C.load_config(MainConfig, None, {"split": "all", "methods": {"stego": {"settings": {**dice, "model_uri": "m"}}}})
