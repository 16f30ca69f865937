"""Tests for the entry points: experiments/*.py, their argument handling, MLproject, and one real `mlflow run`."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT

from experiments import CONFIG_DIR
from experiments import baseline as baseline_entry
from experiments import prepare as prepare_entry
from stego_core.config import load_config
from stego_core.data.seed_layout import read_seed_dataset
from stego_core.platform import tracking
from stego_core.platform.cli import parse
from stego_core.steps.ablation import AblationConfig
from stego_core.steps.evaluation import BaselineConfig, ReconstructConfig
from stego_core.steps.pipeline import MainConfig
from stego_core.steps.prepare import PrepareConfig, load_crop_set
from stego_core.steps.pretrain_synth import PretrainSynthConfig
from stego_core.steps.training import TrainConfig

pytestmark = pytest.mark.usefixtures("mlflow_store")

TINY = ["data.phantom.n_volumes=2", "data.phantom.shape=[32,32,24]", "slicing.patch_size=16", "slicing.stride=8"]


# --------------------------------------------------------------------------------------------- argument handling


def test_parse_splits_extra_and_drops_empty_values():
    config, overrides = parse(["--extra", "a=1 b=2", "c=3"], "d", None)
    assert config is None and overrides == ["c=3", "a=1", "b=2"]
    _, overrides = parse(["--extra", "settings='{q: 99.0, r: 1}' model.weights= x.y=[1,2]", "model.backbone="],
                         "d", None)
    assert overrides == ["settings={q: 99.0, r: 1}", "x.y=[1,2]"]  # empty values mean "use the config"
    config, overrides = parse([], "d", CONFIG_DIR / "prepare.yaml")
    assert config == str(CONFIG_DIR / "prepare.yaml") and Path(config).is_file() and overrides == []
    assert parse(["--config", "other.yaml", "--extra", ""], "d", "prepare.yaml") == ("other.yaml", [])


def test_prepare_main_creates_run_and_seed_layout(tmp_path, capsys):
    out = tmp_path / "outputs"
    code = prepare_entry.main([f"data.root={tmp_path / 'ph'}", f"output={out}", *TINY[:2],
                               "--extra", f"{TINY[2]} {TINY[3]} experiment=entry-tests"])
    assert code == 0
    client = tracking.client()
    (run,) = client.search_runs([client.get_experiment_by_name("entry-tests").experiment_id])
    printed = capsys.readouterr().out
    assert f"run {run.info.run_id}" in printed and "dataset_dir=" in printed
    assert run.info.status == "FINISHED"
    assert run.data.params["data.phantom.n_volumes"] == "2" and run.data.params["slicing.stride"] == "8"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"dataset.zip", "train_crops.npz",
                                                                         "test_crops.npz", "manifest.json"}
    folder = out / run.info.run_id / "dataset" / "mra"
    for name in ("all.txt", "labelled_train.txt", "labelled_test.txt", "unlabelled_train.txt"):
        assert (folder / name).is_file()
    assert (folder / "imgs").is_dir() and (folder / "gt").is_dir()
    seed = read_seed_dataset(out / run.info.run_id / "dataset", "mra")
    train = load_crop_set(out / run.info.run_id / "train_crops.npz")
    assert len(seed.ids) == run.data.metrics["n_train_crops"] + run.data.metrics["n_test_crops"]
    assert seed.splits["unlabelled_train"] == seed.ids[:len(train)]
    np.testing.assert_allclose(seed.images[:len(train)], train.crops, atol=0.5 / 255 + 1e-6)
    assert seed.images.shape[1:] == (16, 16)


def test_bad_overrides_exit_2_naming_the_problem(tmp_path, capsys):
    assert prepare_entry.main([f"data.root={tmp_path / 'ph'}", "data.bogus_key=1"]) == 2
    err = capsys.readouterr().err
    assert "data.bogus_key" in err and err.startswith("error:")
    assert prepare_entry.main(["slicing.patch_size=abc"]) == 2
    assert "slicing.patch_size" in capsys.readouterr().err
    assert prepare_entry.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert tracking.client().get_experiment_by_name("stego-vessels") is None  # nothing ran


def test_baseline_main_unknown_method_exit_2(tmp_path, capsys):
    code = baseline_entry.main([f"data.root={tmp_path / 'ph'}", "method=otsh", *TINY[:2]])
    assert code == 2
    err = capsys.readouterr().err
    assert "otsh" in err and "frangi" in err and "percentile" in err


# --------------------------------------------------------------------------------------------- MLproject

ENTRY_POINTS = {"main": MainConfig, "prepare": PrepareConfig, "baseline": BaselineConfig, "train": TrainConfig,
                "reconstruct": ReconstructConfig, "ablation": AblationConfig, "pretrain_synth": PretrainSynthConfig}


@pytest.fixture(scope="module")
def project():
    from mlflow.projects import _project_spec

    return _project_spec.load_project(str(REPO_ROOT))


def test_mlproject_entry_points_and_parameters(project):
    assert set(project._entry_points) == {"main", "prepare", "pretrain", "train", "reconstruct", "baseline", "sweep",
                                          "doctor", "ablation", "selftrain", "pretrain_synth"}
    expected = {  # the -P keys the README shows, plus the shared ones
        "main": {"config", "extra"},
        "prepare": {"config", "source", "data_root", "output", "n_volumes", "seed", "patch_size", "stride",
                    "axis", "skull_strip", "extra"},
        "baseline": {"config", "preset", "convention", "method", "settings", "source", "data_root", "skull_strip", "split", "extra"},
        "train": {"config", "source", "data_root", "backbone", "weights", "sampling", "n_clusters", "patch_size",
                  "max_steps", "seed", "register", "extra"},
        "pretrain": {"config", "source", "data_root", "backbone", "max_steps", "max_minutes", "batch_size", "lr",
                     "sampling", "seed", "resume", "extra"},
        "reconstruct": {"config", "model_uri", "source", "data_root", "split", "extra"},
        "sweep": {"config", "study_name", "n_trials", "timeout_s", "objective", "extra"},
        "ablation": {"config", "extra"},
        "selftrain": {"config", "source", "data_root", "teacher", "mode", "split", "extra"},
        "pretrain_synth": {"config", "max_steps", "max_minutes", "seed", "extra"},
    }
    for name, params in expected.items():
        entry = project.get_entry_point(name)
        assert set(entry.parameters) == params, name
        config = entry.parameters["config"].default
        assert (REPO_ROOT / config).is_file(), config
        # relative defaults must not be resolved against the caller's folder (`mlflow run <repo>` from anywhere)
        assert entry.parameters["config"].type == "string"
        module = "sweeps.run" if name == "sweep" else f"experiments.{name}"
        assert entry.command.startswith(f"python -m {module} ")
        assert (REPO_ROOT / (module.replace(".", "/") + ".py")).is_file()
    assert project.get_entry_point("reconstruct").parameters["model_uri"].default == ""  # the plan's, or given


def _resolve(project, name: str, params: dict[str, str]):
    argv = shlex.split(project.get_entry_point(name).compute_command(params, None))
    assert argv[:3] == ["python", "-m", f"experiments.{name}"]
    config, overrides = parse(argv[3:], "d", None)
    return load_config(ENTRY_POINTS[name], REPO_ROOT / config, overrides)


def test_mlproject_commands_resolve_to_valid_configs(project):
    # every key the MLproject commands set must be a config key of the entry point's dataclass
    defaults = {name: _resolve(project, name, {"model_uri": "runs:/0123abcd/model"} if name == "reconstruct" else {})
                for name in ENTRY_POINTS}
    assert defaults["prepare"].data.phantom.n_volumes == 3 and defaults["prepare"].slicing.patch_size == 32
    assert defaults["train"].model.backbone == "vit_small_patch8_dino" and defaults["train"].train.max_steps == 5000
    assert defaults["baseline"].method == "frangi" and defaults["baseline"].settings["rule"] == "otsu"
    assert defaults["reconstruct"].model_uri == "runs:/0123abcd/model"
    assert list(defaults["main"].methods)[0] == "percentile"
    assert defaults["ablation"].variants[0].name == "none"
    assert defaults["pretrain_synth"].train.max_minutes == 6.0 and defaults["pretrain_synth"].train.max_steps == 0
    synth_run = _resolve(project, "pretrain_synth", {"max_steps": "5", "max_minutes": "0", "seed": "3"})
    assert (synth_run.train.max_steps, synth_run.train.max_minutes, synth_run.train.seed) == (5, 0.0, 3)
    preset = _resolve(project, "baseline", {"config": "experiments/configs/best_mra.yaml", "source": "folder",
                                            "data_root": "cases", "split": "all"})
    assert preset.method == "gmm" and preset.postprocess
    assert {k: preset.settings[k] for k in ("n_components", "min_std")} == {"n_components": 4, "min_std": 0.02}

    prepare = _resolve(project, "prepare", {"source": "phantom", "n_volumes": "2", "patch_size": "16",
                                            "extra": "data.phantom.shape=[32,32,24] slicing.stride=4"})
    assert prepare.data.phantom.n_volumes == 2 and prepare.data.phantom.shape == (32, 32, 24)
    assert (prepare.slicing.patch_size, prepare.slicing.stride) == (16, 4)
    baseline = _resolve(project, "baseline", {"method": "percentile", "settings": "{q: 99.0}"})
    assert baseline.method == "percentile" and baseline.settings == {"q": 99.0}
    train = _resolve(project, "train", {"backbone": "classical", "max_steps": "300",
                                        "extra": "train.lr_head=1e-4 model.n_clusters=3"})
    assert train.model.backbone == "classical" and train.train.max_steps == 300
    assert train.train.lr_head == pytest.approx(1e-4) and train.model.n_clusters == 3


# --------------------------------------------------------------------------------------------- `mlflow run`


def test_start_run_adopts_the_mlflow_run_project_run(monkeypatch):
    client = tracking.client()
    project_experiment = client.create_experiment("chosen-by-mlflow-run")
    project_run = client.create_run(project_experiment).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", project_run)
    with tracking.start_run("stego-vessels", run_name="prepare") as handle:
        assert handle.run_id == project_run and handle.experiment_id == project_experiment
        with tracking.start_run("stego-vessels", nested=True) as child:  # children stay with their parent
            assert child.experiment_id == project_experiment
    assert "MLFLOW_RUN_ID" not in os.environ  # consumed: the next run is a new one in the configured experiment
    with tracking.start_run("stego-vessels") as second:
        pass
    assert second.run_id != project_run
    assert client.get_experiment(second.experiment_id).name == "stego-vessels"
    assert client.get_run(project_run).info.status == "FINISHED"


@pytest.mark.slow
def test_mlflow_run_prepare_lands_in_stego_vessels_on_a_server(tmp_path, mlflow_store, server_store):
    """The README's `mlflow run . -e prepare --env-manager local` (no --experiment-name) against a real
    `mlflow server`: the step's run is in the configured experiment, the project's placeholder in Default
    points to it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") or k == "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` = this venv's
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO_ROOT), "-e", "prepare", "--env-manager", "local",
         "-P", "n_volumes=2", "-P", f"data_root={tmp_path / 'ph'}",
         "-P", f"output={tmp_path / 'out'}", "-P", "patch_size=16", "-P", "stride=8",
         "-P", "extra=data.phantom.shape=[32,32,24] experiment=entry-tests"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = tracking.client()
    (run,) = client.search_runs([client.get_experiment_by_name("entry-tests").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.project.entryPoint"] == "prepare"  # the project's tags are carried over
    assert run.data.tags["step"] == "prepare" and run.data.tags["mlflow.note.content"].startswith("Data prep")
    assert run.data.params["data.phantom.n_volumes"] == "2" and run.data.params["slicing.patch_size"] == "16"
    (placeholder,) = client.search_runs(["0"], f"tags.`stego.moved_to_run_id` = '{run.info.run_id}'")
    assert placeholder.info.status == "FINISHED" and placeholder.info.run_id == run.data.tags["stego.project_run_id"]
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.source.startswith('{"uri": "file:///') or "file:///" in dataset.dataset.source
    assert (tmp_path / "out" / run.info.run_id / "dataset" / "mra" / "all.txt").is_file()
    assert not (REPO_ROOT / "data" / "ph").exists()
