"""Sweeps: search-space parsing, the nested MLflow run tree, pruning, failures, resume, baselines, and several
workers on PostgreSQL (``STEGO_TEST_POSTGRES_URL``; skipped when unset or unreachable)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from stego_core.platform import tracking
from sweeps.driver import load_sweep_config, run_sweep, trials_used
from sweeps.run import apply_space_overrides, split_overrides
from sweeps.space import (
    SweepConfig,
    grid_search_space,
    parse_param,
    parse_space,
    suggest,
)
from sweeps.storage import make_storage

REPO_ROOT = Path(__file__).resolve().parents[1]
#: STEGO on tiny phantoms: ~2 s per seed run on one core.
TINY_STEGO = ["data.root=data/tiny", "data.phantom.shape=[32, 32, 24]", "data.phantom.n_volumes=2",
              "slicing.patch_size=16", "train.max_steps=20", "train.val_every_n_steps=10", "train.batch_size=8",
              "train.progress=false", "log_model=false"]
TINY_BASELINE = ["data.root=data/tiny", "data.phantom.shape=[32, 32, 24]", "data.phantom.n_volumes=2",
                 "progress=false"]


@pytest.fixture(autouse=True)
def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def sweep_config(**values) -> SweepConfig:
    base = {"study_name": "test", "storage": "sqlite:///optuna.db", "experiment": "sweep-tests",
            "heartbeat_interval_s": 0, "log_plots": True}
    return SweepConfig(**{**base, **values})


def client():
    return tracking.client()


def runs_of(experiment: str) -> list:
    exp = client().get_experiment_by_name(experiment)
    return client().search_runs([exp.experiment_id], max_results=1000, order_by=["attributes.start_time ASC"])


def children(runs: list, parent_id: str) -> list:
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]


# --------------------------------------------------------------------------------------------- space


def test_parse_param_rejects_bad_specs_naming_the_key() -> None:
    with pytest.raises(ValueError, match="space.model.n_clusters.type"):
        parse_param("model.n_clusters", {"type": "integer", "low": 2, "high": 4})
    with pytest.raises(ValueError, match="low=5 is above high=4"):
        parse_param("model.n_clusters", {"type": "int", "low": 5, "high": 4})
    with pytest.raises(ValueError, match="log=true needs low > 0"):
        parse_param("train.lr_head", {"type": "float", "low": 0.0, "high": 1e-3, "log": True})
    with pytest.raises(ValueError, match="did you mean 'choices'"):
        parse_param("slicing.patch_size", {"type": "categorical", "choice": [16, 32]})
    with pytest.raises(ValueError, match="non-empty list"):
        parse_param("slicing.patch_size", {"type": "categorical", "choices": []})
    with pytest.raises(ValueError, match="integer low/high/step"):
        parse_param("model.n_clusters", {"type": "int", "low": 2.5, "high": 4})


def test_suggest_maps_categorical_labels_back_to_values() -> None:
    specs = parse_space({"settings.sigmas_vox": {"type": "categorical", "choices": [[1, 2], [1, 2, 3]]},
                         "model.n_clusters": {"type": "int", "low": 2, "high": 4},
                         "train.lr_head": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True}})
    trial = optuna.trial.FixedTrial({"settings.sigmas_vox": "[1, 2, 3]", "model.n_clusters": 3,
                                     "train.lr_head": 5e-4})
    assert suggest(trial, specs) == {"settings.sigmas_vox": [1, 2, 3], "model.n_clusters": 3, "train.lr_head": 5e-4}
    assert grid_search_space({k: v for k, v in specs.items() if k != "train.lr_head"}) == {
        "settings.sigmas_vox": ["[1, 2]", "[1, 2, 3]"], "model.n_clusters": [2, 3, 4]}
    with pytest.raises(ValueError, match="grid"):
        grid_search_space(specs)  # a float cannot be a grid axis


def test_sweep_config_checks() -> None:
    space = {"model.n_clusters": {"type": "int", "low": 2, "high": 4}}
    with pytest.raises(ValueError, match="train.seed is set by seeds"):
        sweep_config(space={**space, "train.seed": {"type": "int", "low": 0, "high": 3}})
    with pytest.raises(ValueError, match="space is empty"):
        sweep_config(space={})
    with pytest.raises(ValueError, match="n_startup_trial"):
        sweep_config(space=space, sampler_settings={"n_startup_trial": 3})
    assert sweep_config(space=space, pruner="none", pruner_settings={"percentile": 75.0}).pruner == "none"
    with pytest.raises(ValueError, match="'hyperbands'"):
        sweep_config(space=space, pruner="hyperbands")
    cfg = sweep_config(space=space, target="baseline")
    assert cfg.repeat_seeds == (None,)  # baselines run once per trial unless seed_key is given
    assert sweep_config(space=space, seeds=(3, 4)).repeat_seeds == (3, 4)
    for name in ("sweep.yaml", "sweep_baseline.yaml"):  # the shipped configs load
        assert load_sweep_config(REPO_ROOT / "sweeps" / "configs" / name).specs


def test_split_overrides_routes_sweep_space_and_entry_point_keys() -> None:
    sweep, space, base = split_overrides(["n_trials=9", "storage=postgresql://u:p#w@h/db", "train.max_steps=60",
                                          "space.model.n_clusters.high=6", "space.train.lr_head=null",
                                          "space.model.code_dim={type: int, low: 16, high: 64}"])
    assert sweep == {"n_trials": 9, "storage": "postgresql://u:p#w@h/db"}
    assert base == ["train.max_steps=60"]
    new = apply_space_overrides({"model.n_clusters": {"type": "int", "low": 2, "high": 4},
                                 "train.lr_head": {"type": "float", "low": 1e-4, "high": 1e-3}}, space)
    assert new == {"model.n_clusters": {"type": "int", "low": 2, "high": 6},
                   "model.code_dim": {"type": "int", "low": 16, "high": 64}}


def test_trials_used_counts_a_retried_stale_trial_once() -> None:
    study = optuna.create_study()
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    study.add_trial(optuna.create_trial(state=TrialState.COMPLETE, value=0.5, params={"x": 0.5}, distributions=dist))
    study.add_trial(optuna.create_trial(state=TrialState.FAIL, params={"x": 0.2}, distributions=dist))
    study.add_trial(optuna.create_trial(state=TrialState.PRUNED, params={"x": 0.1}, distributions=dist))
    assert trials_used(study) == 3
    study.add_trial(optuna.create_trial(state=TrialState.WAITING, params={"x": 0.2}, distributions=dist,
                                        system_attrs={"failed_trial": 1, "retry_history": [1]}))
    assert trials_used(study) == 2  # the stale FAIL no longer counts; its WAITING retry does once it runs


def test_storage_errors_mask_the_password() -> None:
    with pytest.raises(RuntimeError) as info:
        make_storage("postgresql://optuna:s3cret-pw@127.0.0.1:9/optuna", heartbeat_interval_s=0)
    assert "s3cret-pw" not in str(info.value) and "optuna:***@" in str(info.value)


# --------------------------------------------------------------------------------------------- in-process sweeps


@pytest.mark.slow
def test_stego_sweep_nested_runs_best_trial_and_resume() -> None:
    space = {"model.n_clusters": {"type": "int", "low": 2, "high": 3},
             "train.lr_head": {"type": "float", "low": 1e-4, "high": 2e-3, "log": True}}
    cfg = sweep_config(study_name="stego", space=space, seeds=(0, 1), n_trials=3, sampler="random",
                       pruner="none", base_overrides=tuple(TINY_STEGO))
    result = run_sweep(cfg)
    assert result.n_trials == 3 and result.states["COMPLETE"] == 3

    runs = runs_of("sweep-tests")
    parents = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    assert [p.info.run_id for p in parents] == [result.parent_run_id]
    parent = client().get_run(result.parent_run_id)
    trial_runs = children(runs, result.parent_run_id)
    assert sorted(int(r.data.tags["optuna_trial_number"]) for r in trial_runs) == [0, 1, 2]
    objectives = {}
    for run in trial_runs:
        seeds = children(runs, run.info.run_id)
        assert sorted(r.data.tags["sweep_seed"] for r in seeds) == ["0", "1"]
        assert all(r.info.status == "FINISHED" and r.data.params["train.seed"] == r.data.tags["sweep_seed"]
                   for r in seeds)
        values = [r.data.metrics["val_final/cldice"] for r in seeds]  # run_train's final validation clDice
        mean, std = sum(values) / 2, abs(values[0] - values[1]) / 2
        assert run.data.metrics["objective"] == pytest.approx(mean)
        assert run.data.metrics["objective_std"] == pytest.approx(std)
        assert run.data.tags["trial_state"] == "COMPLETE" and run.info.status == "FINISHED"
        assert run.data.params["model.n_clusters"] in ("2", "3")
        assert set(run.data.params) == set(space)  # only the swept parameters, under their plain names
        assert run.data.tags["mlflow.note.content"].startswith(f"Optuna trial {run.data.tags['optuna_trial_number']}")
        objectives[int(run.data.tags["optuna_trial_number"])] = mean
    best = max(objectives, key=objectives.get)
    assert parent.data.tags["best_trial_number"] == str(best) == str(result.best_trial_number)
    assert parent.data.metrics["best_value"] == pytest.approx(objectives[best])
    note = parent.data.tags["mlflow.note.content"]
    assert f"Best: trial {best}, cldice = **{objectives[best]:.4f}**" in note and "| trial | objective |" in note
    assert "best_trial/cldice" in parent.data.metrics and "best_trial/dice" in parent.data.metrics
    assert parent.data.params["sweep.study_name"] == "stego"
    assert parent.data.params["sweep.storage"] == "sqlite:///optuna.db"
    artifacts = {a.path for a in client().list_artifacts(parent.info.run_id)}
    assert {"best_trial.json", "trials.csv", "plan.yaml", "plots"} <= artifacts
    plots = {a.path for a in client().list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/parallel_coordinate.png", "plots/param_importances.png",
            "plots/intermediate_values.png"} <= plots
    best_json = json.loads((Path(tracking.download_artifacts(
        f"runs:/{parent.info.run_id}/best_trial.json"))).read_text())
    assert best_json["number"] == best and best_json["params"] == result.best_params

    study = optuna.load_study(study_name="stego", storage="sqlite:///optuna.db")
    before = {t.number: (t.params, t.value) for t in study.trials}
    resumed = run_sweep(sweep_config(**{**cfg.__dict__, "n_trials": 4}))
    study = optuna.load_study(study_name="stego", storage="sqlite:///optuna.db")
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert {t.number: (t.params, t.value) for t in study.trials if t.number < 3} == before
    assert resumed.parent_run_id == result.parent_run_id and resumed.n_trials == 4
    runs = runs_of("sweep-tests")
    assert sorted(int(r.data.tags["optuna_trial_number"]) for r in children(runs, result.parent_run_id)) == \
        [0, 1, 2, 3]
    assert client().get_run(result.parent_run_id).data.tags["resumed_with.n_trials"] == "4"
    again = run_sweep(sweep_config(**{**cfg.__dict__, "n_trials": 4}))  # budget reached: nothing runs
    assert again.n_trials == 4 and len(children(runs_of("sweep-tests"), result.parent_run_id)) == 4


def fake_train(values: dict[int, float], *, fail_on: int):
    """A stand-in for run_train: a nested MLflow run reporting ``values[n_clusters] + 0.01 * seed`` twice."""

    def train(cfg, *, report=None, nested=False, run_name=None, tags=None):
        with tracking.start_run(cfg.experiment, run_name=run_name, nested=nested, tags=tags) as run:
            if cfg.model.n_clusters == fail_on:
                raise RuntimeError("boom: this configuration crashes")
            value = values[cfg.model.n_clusters] + 0.01 * cfg.train.seed
            for step in (10, 20):
                metrics = {"val/cldice": value, "val/dice": value / 2}
                tracking.log_metrics(metrics, step=step)
                if report is not None:
                    report(step, metrics)
            return SimpleNamespace(run_id=run.run_id, metrics=metrics)

    return train


@pytest.mark.slow
def test_failed_and_pruned_trials_are_recorded_and_the_sweep_goes_on() -> None:
    cfg = sweep_config(study_name="fake", space={"model.n_clusters": {"type": "categorical", "choices": [2, 3, 4]}},
                       seeds=(0, 1), n_trials=3, sampler="grid", pruner="threshold",
                       pruner_settings={"lower": 0.5}, base_overrides=tuple(TINY_STEGO))
    result = run_sweep(cfg, train_fn=fake_train({2: 0.8, 4: 0.2}, fail_on=3))
    assert result.states["COMPLETE"] == 1 and result.states["FAIL"] == 1 and result.states["PRUNED"] == 1
    assert result.best_params == {"model.n_clusters": 2}
    assert result.best_value == pytest.approx(0.805)

    runs = runs_of("sweep-tests")
    by_k = {r.data.params["model.n_clusters"]: r for r in children(runs, result.parent_run_id)}
    ok, failed, pruned = by_k["2"], by_k["3"], by_k["4"]
    assert (ok.info.status, ok.data.tags["trial_state"]) == ("FINISHED", "COMPLETE")
    assert ok.data.metrics["objective_std"] == pytest.approx(0.005)
    assert ok.data.metrics["seed_1/objective"] == pytest.approx(0.81)
    assert (failed.info.status, failed.data.tags["trial_state"]) == ("FAILED", "FAIL")
    assert "boom" in failed.data.tags["error"]
    assert (pruned.info.status, pruned.data.tags["trial_state"]) == ("KILLED", "PRUNED")
    pruned_seeds = children(runs, pruned.info.run_id)
    assert [r.info.status for r in pruned_seeds] == ["KILLED"]  # the second seed never started
    history = client().get_metric_history(pruned.info.run_id, "intermediate/val/cldice")
    assert [(m.step, m.value) for m in history] == [(10, pytest.approx(0.2))]
    study = optuna.load_study(study_name="fake", storage="sqlite:///optuna.db")
    assert {t.state for t in study.trials} == {TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED}


@pytest.mark.slow
def test_baseline_sweep_through_the_cli_as_mlproject_calls_it(capsys: pytest.CaptureFixture) -> None:
    from sweeps.run import main

    extra = " ".join(f"'{o}'" for o in TINY_BASELINE)
    argv = ["--config", str(REPO_ROOT / "sweeps/configs/sweep_baseline.yaml"), "--extra", extra,
            "study_name=", "storage=", "n_trials=2", "timeout_s=", "objective=",  # "" = keep the config's
            "experiment=sweep-tests", "heartbeat_interval_s=0"]
    assert main(argv) == 0
    assert "frangi-phantom-sweep" in capsys.readouterr().out
    study = optuna.load_study(study_name="frangi-phantom-sweep", storage="sqlite:///optuna.db")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    runs = runs_of("sweep-tests")
    (parent,) = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    assert parent.data.params["sweep.target"] == "baseline" and parent.data.params["sweep.objective"] == "cldice"
    for trial_run in children(runs, parent.info.run_id):
        (seed_run,) = children(runs, trial_run.info.run_id)  # a baseline runs once per trial
        assert seed_run.data.tags["method"] == "frangi" and trial_run.data.tags["method"] == "frangi"
        for key in ("settings.k_std", "settings.rule", "settings.sigmas_vox"):  # trial values reached the run
            assert seed_run.data.params[key] == trial_run.data.params[key]
        assert trial_run.data.params["settings.sigmas_vox"] in ("[1.0]", "[1.0, 2.0]", "[1.0, 2.0, 3.0]",
                                                                "[0.5, 1.0, 2.0]")
        assert trial_run.data.metrics["objective"] == pytest.approx(seed_run.data.metrics["cldice_mean"])
    assert main(argv[:4] + ["n_trials=0"]) == 2  # bad input: one-line error, exit 2


# --------------------------------------------------------------------------------------------- PostgreSQL workers


@pytest.fixture
def postgres_url() -> str:
    url = os.environ.get("STEGO_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("STEGO_TEST_POSTGRES_URL is not set (CI's .ci/run starts PostgreSQL and sets it)")
    try:
        import psycopg2

        psycopg2.connect(url, connect_timeout=3).close()
    except Exception as exc:
        pytest.skip(f"PostgreSQL at {tracking.mask_secrets(url)} unreachable: {type(exc).__name__}")
    return url


def worker_setup(tmp: Path, name: str, **values) -> list[str]:
    """A baseline sweep YAML for workers, MLflow's store and the phantoms created up front (no start-up races)."""
    from stego_core.data.cases import ensure_cases
    from sweeps.objective import trial_config

    cfg = {"study_name": name, "target": "baseline", "base_config": "experiments/configs/baseline.yaml",
           "base_overrides": ["method=frangi", "settings.rule=mean_std", *TINY_BASELINE],
           "space": {"settings.k_std": {"type": "float", "low": 1.0, "high": 3.0}},
           "n_trials": 4, "sampler": "random", "sampler_seed": 0, "pruner": "none", "experiment": "sweep-tests",
           "heartbeat_interval_s": 1, "grace_period_s": 2, "log_plots": False, **values}
    (tmp / "sweep.yaml").write_text(yaml.safe_dump(cfg))
    tracking.client().search_experiments()  # create MLflow's tables once
    ensure_cases(trial_config(load_sweep_config(tmp / "sweep.yaml"), {}, None).data)
    return [sys.executable, "-m", "sweeps.worker", "--study-name", name, "--config", str(tmp / "sweep.yaml")]


def worker_env(url: str) -> dict[str, str]:
    return {**os.environ, "STEGO_OPTUNA_STORAGE": url, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}


def test_two_workers_share_one_study_on_postgres(postgres_url: str, tmp_path: Path) -> None:
    name = f"two-workers-{uuid.uuid4().hex[:8]}"
    command = worker_setup(tmp_path, name, heartbeat_interval_s=5, grace_period_s=60)  # no false stale trials
    workers = [subprocess.Popen(command, env=worker_env(postgres_url), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [w.communicate(timeout=240)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(log[-2000:] for log in logs)
    password = postgres_url.split("@")[0].rsplit(":", 1)[1]
    assert len(password) < 6 or all(password not in log for log in logs)  # never printed

    study = optuna.load_study(study_name=name, storage=make_storage(postgres_url, heartbeat_interval_s=0))
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers)) and 4 <= len(numbers) <= 5  # >4 only if both started the last one
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    runs = runs_of("sweep-tests")
    (parent,) = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    trial_runs = children(runs, parent.info.run_id)
    assert sorted(int(r.data.tags["optuna_trial_number"]) for r in trial_runs) == sorted(numbers)
    assert parent.data.params["sweep.storage"].count("***") == 1


def test_killed_worker_trial_fails_after_grace_and_another_worker_finishes(postgres_url: str,
                                                                           tmp_path: Path) -> None:
    name = f"killed-worker-{uuid.uuid4().hex[:8]}"
    command = worker_setup(tmp_path, name, n_trials=3)
    storage = make_storage(postgres_url, heartbeat_interval_s=0)
    victim = None
    for _attempt in range(3):  # a trial lasts ~2 s; catch worker A inside one (its MLflow run open), SIGKILL it
        a = subprocess.Popen(command, env=worker_env(postgres_url), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while victim is None and a.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            try:
                study = optuna.load_study(study_name=name, storage=storage)
            except KeyError:
                continue
            running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                       if "mlflow_run_id" in t.user_attrs]
            if running:
                a.send_signal(signal.SIGKILL)
                a.wait()
                study = optuna.load_study(study_name=name, storage=storage)
                still = study.trials[running[0].number]
                victim = still if still.state == TrialState.RUNNING else None
        if a.poll() is None:
            a.kill()
            a.wait()
        if victim is not None:
            break
    assert victim is not None, "could not kill worker A inside a trial"

    b = subprocess.run(command, env=worker_env(postgres_url), capture_output=True, text=True, timeout=240)
    assert b.returncode == 0, b.stdout[-2000:] + b.stderr[-2000:]
    study = optuna.load_study(study_name=name, storage=storage)
    assert study.trials[victim.number].state == TrialState.FAIL
    assert trials_used(study) == 3 and len(study.trials) == 3
    assert all(t.state == TrialState.COMPLETE for t in study.trials if t.number != victim.number)
    run = client().get_run(victim.user_attrs["mlflow_run_id"])
    assert (run.info.status, run.data.tags["trial_state"]) == ("FAILED", "FAIL")
    assert "heartbeat" in run.data.tags["end_reason"]
