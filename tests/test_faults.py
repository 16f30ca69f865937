"""Fault suite: real processes, real signals, real SQLite (and PostgreSQL when ``STEGO_TEST_POSTGRES_URL`` is
set). Each test reproduces one fault and shows it handled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from stego_core.data.cases import DataConfig
from stego_core.platform import doctor, tracking
from stego_core.runtime import faults

REPO_ROOT = Path(__file__).resolve().parents[1]
PLANTED = "Pl4ntedS3cret"
#: STEGO on tiny phantoms with the weight-free featurizer; max_steps is set per test.
TINY_TRAIN = ["data.root=data/tiny", "data.phantom.shape=[32, 32, 24]", "data.phantom.n_volumes=2",
              "slicing.patch_size=16", "slicing.stride=8", "model.backbone=classical", "model.res=8",
              "model.code_dim=16", "train.val_every_n_steps=5", "train.batch_size=8", "train.progress=false",
              "train.accelerator=cpu", "log_model=false", "experiment=faults"]

#: real processes, signals and stores: the whole module is the slow tier
pytestmark = pytest.mark.slow


#: DINO of a tiny ViT (4 blocks, patch 4) on 16-pixel crops of one tiny phantom; max_steps is set per test.
TINY_PRETRAIN = ["data.root=data/tiny", "data.phantom.shape=[32, 32, 24]", "data.phantom.n_volumes=1",
                 "backbone=mra_vit_t4_p4", "slicing.patch_size=16", "slicing.stride=8", "augment.global_size=16",
                 "augment.local_size=8", "augment.n_local=2", "batch_size=4", "out_dim=32", "hidden_dim=32",
                 "bottleneck_dim=16", "warmup_steps=1", "freeze_last_layer_steps=1", "teacher_temp_warmup_steps=2",
                 "log_every=1", "figure_every=0", "checkpoint_every=100000", "accelerator=cpu", "progress=false",
                 "experiment=faults"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def spawn(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], env=kw.pop("env", env()), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def wait_for(pattern: str, proc: subprocess.Popen, timeout: float = 60.0) -> Path:
    """The first file matching ``pattern`` (glob under the cwd) once it exists."""
    return wait_until(lambda: next(iter(sorted(Path().glob(pattern))), None), proc, f"{pattern} appeared",
                      timeout)


def wait_until(condition, proc: subprocess.Popen, what: str, timeout: float = 120.0):
    """The first true value of ``condition()``, polled while ``proc`` runs."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process ended {proc.returncode} before {what}:\n{out}\n{err[-3000:]}")
        time.sleep(0.3)
    proc.kill()
    pytest.fail(f"{what} did not happen within {timeout} s")


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """``proc.communicate`` within ``timeout`` s; past it, the process is killed and the test fails with the end
    of its stderr (what it was doing when it hung)."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"process still running {timeout} s after the signal:\n{err[-4000:]}")


def error_line(err: str) -> str:
    """The one ``error:`` line of an entry point's stderr (it must be the last line, without a traceback)."""
    assert "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


def runs(experiment: str) -> list:
    client = tracking.client()
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=100) if exp else []


# --------------------------------------------------------------------------------------------- secrets


def test_storage_password_on_the_command_line_is_refused_and_never_recorded(mlflow_store: str) -> None:
    url = f"postgresql://user:{PLANTED}@127.0.0.1:9/optuna"
    proc = spawn("-m", "sweeps.run", "--config", str(REPO_ROOT / "sweeps/configs/sweep_baseline.yaml"),
                 f"storage={url}", "n_trials=1")
    out, err = finish(proc, timeout=120)
    assert proc.returncode == 2
    assert err.strip().startswith("error:") and "STEGO_OPTUNA_STORAGE" in err and "PGPASSWORD" in err
    # from the environment the password is accepted, and every recorded / printed form is masked
    proc = spawn("-m", "sweeps.run", "--config", str(REPO_ROOT / "sweeps/configs/sweep_baseline.yaml"),
                 "n_trials=1", env={**env(), faults.STORAGE_ENV: url})
    out2, err2 = finish(proc, timeout=120)
    assert proc.returncode == 2 and "cannot open Optuna storage" in err2 and "user:***@127.0.0.1:9" in err2
    for text in (out, err, out2, err2):
        assert PLANTED not in text
    for path in Path().rglob("*"):
        if path.is_file():
            assert PLANTED.encode() not in path.read_bytes(), path
    assert "storage:" not in (REPO_ROOT / "MLproject").read_text().split("sweep:")[1].split("command")[0]
    assert tracking.mask_secrets(f"postgresql://db/x?user=u&password={PLANTED}") == \
        "postgresql://db/x?user=u&password=***"
    with pytest.raises(ValueError, match="STEGO_OPTUNA_STORAGE"):
        faults.resolve_storage(url, default="sqlite:///optuna.db", environ={})
    assert faults.resolve_storage("sqlite:///optuna.db", default="sqlite:///optuna.db",
                                  environ={faults.STORAGE_ENV: url}) == url
    assert faults.resolve_storage("postgresql://user@h/db", default="x", environ={}) == "postgresql://user@h/db"


def test_postgres_sweep_stores_no_password(mlflow_store: str, tmp_path: Path) -> None:
    url = os.environ.get("STEGO_TEST_POSTGRES_URL")
    if not url or not faults.has_password(url):
        pytest.skip("STEGO_TEST_POSTGRES_URL (with a password) is not set")
    password = url.split("://", 1)[1].split("@")[0].split(":", 1)[1]
    proc = spawn("-m", "sweeps.run", "--config", str(REPO_ROOT / "sweeps/configs/sweep_baseline.yaml"),
                 "n_trials=1", f"study_name=faults-{os.getpid()}", "experiment=faults", "heartbeat_interval_s=0",
                 "data.root=data/tiny", "data.phantom.shape=[32, 32, 24]", "data.phantom.n_volumes=2",
                 env={**env(), faults.STORAGE_ENV: url})
    out, err = finish(proc, timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert password not in out + err
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert password.encode() not in path.read_bytes(), path


# --------------------------------------------------------------------------------------------- signals


def test_sigterm_during_training_ends_killed_exits_143_and_resumes(mlflow_store: str) -> None:
    import torch

    proc = spawn("-m", "experiments.train", *TINY_TRAIN, "train.max_steps=100000")
    wait_for("outputs/**/checkpoints/last.ckpt", proc, timeout=120)
    proc.send_signal(signal.SIGTERM)
    out, err = finish(proc, timeout=60)
    assert proc.returncode == 143, err[-3000:]
    assert "error: interrupted by SIGTERM" in err
    (run,) = runs("faults")
    assert run.info.status == "KILLED" and run.data.tags["end_reason"].startswith("Interrupted")
    assert run.data.tags["owner_pid"] == str(proc.pid)
    logged = {a.path for a in tracking.client().list_artifacts(run.info.run_id, "checkpoints")}
    assert "checkpoints/interrupted.ckpt" in logged
    step = torch.load(Path("outputs", "train", run.info.run_id, "checkpoints", "interrupted.ckpt"), map_location="cpu",
                      weights_only=False)["global_step"]
    # train.resume_from=<run id> continues from the interrupted step
    proc = spawn("-m", "experiments.train", *TINY_TRAIN, f"train.max_steps={step + 3}",
                 f"train.resume_from={run.info.run_id}")
    out, err = finish(proc, timeout=120)
    assert proc.returncode == 0, err[-3000:]
    resumed = [r for r in runs("faults") if r.info.run_id != run.info.run_id][0]
    assert resumed.info.status == "FINISHED" and resumed.data.tags["resumed_from"] == run.info.run_id
    ckpt = torch.load(Path("outputs", "train", resumed.info.run_id, "checkpoints", "last.ckpt"), map_location="cpu",
                      weights_only=False)
    assert ckpt["global_step"] == step + 3


def test_sigterm_during_pretraining_keeps_its_steps_and_resume_continues_them(mlflow_store: str) -> None:
    import torch

    proc = spawn("-m", "experiments.pretrain", *TINY_PRETRAIN, "max_steps=100000")

    def three_steps_logged() -> bool:
        found = runs("faults")
        return bool(found) and len(tracking.client().get_metric_history(found[0].info.run_id, "pretrain/loss")) >= 3

    wait_until(three_steps_logged, proc, "three pretraining steps", timeout=180)
    proc.send_signal(signal.SIGTERM)
    out, err = finish(proc, timeout=60)
    assert proc.returncode == 143, err[-3000:]
    (run,) = runs("faults")
    run_id, tags = run.info.run_id, run.data.tags
    assert run.info.status == "KILLED" and tags["end_reason"].startswith("Interrupted")
    assert tags["resume_with"] == f"resume={run_id}"
    # no periodic checkpoint was due (checkpoint_every=100000): the interrupted one keeps every step done
    folder = Path("outputs", "pretrain", run_id, "checkpoints")
    assert not (folder / "last.pt").exists()
    step = torch.load(folder / "interrupted.pt", map_location="cpu", weights_only=False)["step"]
    assert step >= 3 and tags["interrupted_at_step"] == str(step)
    assert "checkpoints/interrupted.pt" in {a.path for a in tracking.client().list_artifacts(run_id, "checkpoints")}
    # resume=<run id> continues the same run from that step; its record is then the resumed attempt's
    proc = spawn("-m", "experiments.pretrain", *TINY_PRETRAIN, f"max_steps={step + 2}", f"resume={run_id}")
    out, err = finish(proc, timeout=180)
    assert proc.returncode == 0, err[-3000:]
    (resumed,) = runs("faults")
    tags = resumed.data.tags
    assert resumed.info.status == "FINISHED" and resumed.info.run_name == run.info.run_name
    assert tags["resumed_at_step"] == str(step) and tags["max_steps"] == str(step + 2)
    assert tags["end_reason"] == f"max_steps={step + 2} reached"
    assert not {"resume_with", "interrupted_at_step", "error"} & set(tags)
    history = tracking.client().get_metric_history(run_id, "pretrain/loss")
    assert sorted(m.step for m in history) == list(range(1, step + 3))
    assert torch.load(folder / "last.pt", map_location="cpu", weights_only=False)["step"] == step + 2


def test_pretrain_resume_checks_the_run_first_and_changes_nothing_on_refusal(mlflow_store: str) -> None:
    with tracking.start_run("faults", run_name="baseline-otsu", tags={"step": "baseline", "method": "otsu"}) as run:
        tracking.log_metrics({"test/dice": 0.5})
    baseline = run.run_id
    with pytest.raises(tracking.RunKilled), tracking.start_run(
            "faults", run_name="pretrain-mra_vit_t4_p4", tags={"step": "pretrain", "method": "dino-pretrain"}) as run:
        raise tracking.RunKilled("stopped before its first checkpoint")
    killed = run.run_id
    client = tracking.client()

    def record(run_id: str) -> tuple:
        r = client.get_run(run_id)
        return r.info.run_name, r.info.status, r.info.end_time, r.data.tags, r.data.params

    before = {run_id: record(run_id) for run_id in (baseline, killed)}
    missing = "0123456789abcdef0123456789abcdef"
    for run_id, expected in ((baseline, f"resume='{baseline}' is a 'baseline' run ('baseline-otsu'), not a "
                                        "pretraining run"),
                             (killed, f"resume='{killed}': the run has no checkpoint"),
                             (missing, f"resume='{missing}': there is no run with this id in the tracking store")):
        proc = spawn("-m", "experiments.pretrain", *TINY_PRETRAIN, "max_steps=2", f"resume={run_id}")
        out, err = finish(proc, timeout=120)
        assert proc.returncode == 2, err[-3000:]
        assert error_line(err).startswith(f"error: {expected}")
    assert {run_id: record(run_id) for run_id in (baseline, killed)} == before
    assert not Path("outputs", "pretrain").exists() and not Path("data").exists()


def test_weights_of_a_run_are_downloaded_once_into_a_cache(mlflow_store: str, tmp_path: Path) -> None:
    from stego_core.features.backbones import get_spec
    from stego_core.features.pretraining import save_backbone
    from stego_core.features.vit import WEIGHTS_ARTIFACT, create_vit

    with tracking.start_run("faults", run_name="pretrain", tags={"step": "pretrain"}) as run:
        path = save_backbone(create_vit(get_spec("mra_vit_t4_p4")), "mra_vit_t4_p4", 32,
                             run.output_dir / WEIGHTS_ARTIFACT, {})
        tracking.log_artifact(path, "backbone")
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    code = ("import sys; from stego_core.features.backbones import build_backbone; from stego_core.platform.weights import fetch_weights; "
            "build_backbone('mra_vit_t4_p4', weights=fetch_weights(sys.argv[1], 'mra_vit_t4_p4'), res=16); "
            "print(fetch_weights(sys.argv[1], 'mra_vit_t4_p4'))")
    files = []
    for _ in range(2):
        proc = spawn("-c", code, f"runs:/{run.run_id}", env={**env(), "TMPDIR": str(scratch)})
        out, err = finish(proc, timeout=120)
        assert proc.returncode == 0, err[-3000:]
        files.append(Path(out.strip().splitlines()[-1]))
    cache = Path("outputs", "weights_cache", run.run_id)
    assert files[0] == files[1] and files[0].is_relative_to(cache) and files[0].name == path.name
    assert sorted(cache.rglob("*.safetensors")) == [files[0]]
    assert not list(scratch.rglob("*.safetensors"))  # nothing left in a temporary folder


def test_a_weights_file_that_is_not_one_is_named_in_one_line(mlflow_store: str, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("these are not weights\n")
    proc = spawn("-m", "experiments.train", *TINY_TRAIN, "model.backbone=mra_vit_t4_p4", "model.res=16",
                 f"model.weights={notes}", "train.max_steps=2")
    out, err = finish(proc, timeout=120)
    assert proc.returncode == 2, err[-3000:]
    line = error_line(err)
    assert line.startswith(f"error: {notes} is not a weights file: expected a .safetensors file"), line
    assert not Path("data", "tiny").exists()  # refused before any data was made


def test_sigint_during_a_sweep_fails_the_trial_kills_the_runs_and_exits_130(mlflow_store: str,
                                                                           tmp_path: Path) -> None:
    cfg = {"study_name": "faults-sigint", "target": "stego", "base_config": "experiments/configs/train.yaml",
           "base_overrides": [*TINY_TRAIN, "train.max_steps=100000"], "experiment": "faults",
           "space": {"train.lr_head": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True}},
           "n_trials": 2, "pruner": "none", "heartbeat_interval_s": 0, "log_plots": False}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(cfg))
    proc = spawn("-m", "sweeps.run", "--config", str(tmp_path / "sweep.yaml"), cwd=tmp_path)
    wait_for("outputs/**/checkpoints/last.ckpt", proc, timeout=120)
    proc.send_signal(signal.SIGINT)
    out, err = finish(proc, timeout=60)
    assert proc.returncode == 130, err[-3000:]
    study = optuna.load_study(study_name="faults-sigint", storage="sqlite:///optuna.db")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL]
    statuses = {r.data.tags.get("sweep_role"): r.info.status for r in runs("faults")}
    assert statuses == {"parent": "KILLED", "trial": "KILLED", "seed": "KILLED"}


# --------------------------------------------------------------------------------------------- stores


THREE = """
import sys
import time
from pathlib import Path
from stego_core.platform import tracking
from stego_core.data.io import Case
from sweeps.storage import make_storage
make_storage("sqlite:///optuna.db", heartbeat_interval_s=0)
cases = [Case(f"case{i}", f"/data/case{i}/image.nii.gz", digest=f"sha{i}") for i in range(3)]
with tracking.start_run("concurrent", run_name=sys.argv[1]):
    tracking.log_metrics({"x": 1.0})
    # all three log the same datasets at the same instants (four races: any of them used to fail one process)
    Path(f"ready.{sys.argv[1]}").touch()
    deadline = time.time() + 60
    while len(list(Path().glob("ready.*"))) < 3 and time.time() < deadline:
        time.sleep(0.01)
    go = max(p.stat().st_mtime for p in Path().glob("ready.*")) + 0.5
    for j, name in enumerate(DATASETS):
        time.sleep(max(0.0, go + 0.3 * j - time.time() - 0.02))
        while time.time() < go + 0.3 * j:
            pass
        tracking.log_dataset(cases, name=name, context="training", source="/data")
""".replace("DATASETS", repr(("train", "val", "test", "all")))


def test_three_processes_on_a_fresh_sqlite_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    procs = [spawn("-c", THREE, str(i), env={**env(), "MLFLOW_TRACKING_URI": uri}) for i in range(3)]
    results = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in results]
    assert sorted(r.info.run_name for r in runs("concurrent")) == ["0", "1", "2"]
    assert all(r.info.status == "FINISHED" for r in runs("concurrent"))
    assert (tmp_path / "fresh.db.lock").exists() and (tmp_path / "optuna.db.lock").exists()
    # each dataset stored once, an input of all three runs
    with sqlite3.connect(tmp_path / "fresh.db") as con:
        rows = con.execute("SELECT name, COUNT(*) FROM datasets GROUP BY name ORDER BY name").fetchall()
    assert rows == [("all", 1), ("test", 1), ("train", 1), ("val", 1)]
    for run in runs("concurrent"):
        assert sorted(d.dataset.name for d in run.inputs.dataset_inputs) == ["all", "test", "train", "val"]
    # a store that cannot be opened: one error line naming it
    bad = tmp_path / "not_a_db.db"
    bad.write_text("this is not sqlite")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{bad}")
    with pytest.raises(RuntimeError, match=f"cannot open the MLflow tracking store sqlite:///{bad}"):
        tracking.client()


# --------------------------------------------------------------------------------------------- cleanup


HANG = """
import time
from pathlib import Path
from stego_core.platform import tracking
with tracking.start_run("faults", run_name="doomed") as run:
    Path("started").write_text(run.run_id)
    time.sleep(600)
"""


def test_sigkill_then_cleanup(mlflow_store: str, tmp_path: Path) -> None:
    proc = spawn("-c", HANG)
    wait_for("started", proc)
    proc.kill()
    proc.wait()
    # debris: a partial cache file of the dead process, a half-made phantom folder
    cache = tmp_path / "outputs" / "feature_cache"
    cache.mkdir(parents=True)
    partial = cache / f"feats.npy.{proc.pid}.partial.npy"
    partial.write_bytes(b"x")
    mine = cache / f"feats.npy.{os.getpid()}.partial.npy"
    mine.write_bytes(b"x")
    (tmp_path / "data" / ".tiny.tmp-999999").mkdir(parents=True)
    (tmp_path / "data" / "tiny").mkdir()
    report = doctor.doctor(cache_roots=[tmp_path / "outputs"], data_roots=[tmp_path / "data" / "tiny"],
                           dry_run=True)
    run_id = Path("started").read_text()
    assert report.killed_runs == [run_id] and report.removed_partials == [partial]
    assert tracking.client().get_run(run_id).info.status == "RUNNING"  # dry run
    # the automatic check at the start of the next run
    with tracking.start_run("faults", run_name="next"):
        pass
    dead = tracking.client().get_run(run_id)
    assert dead.info.status == "KILLED" and "is gone" in dead.data.tags["end_reason"]
    proc = spawn("-m", "stego_core.platform.doctor", "--cache", "outputs", "--data", "data/tiny")
    out, err = finish(proc, timeout=60)
    assert proc.returncode == 0, err
    assert not partial.exists() and mine.exists()
    assert "half-made data folders" in out and ".tiny.tmp-999999" in out


def test_phantoms_are_renamed_into_place(tmp_path: Path) -> None:
    from stego_core.data.cases import ensure_cases
    from stego_core.data.phantom import PhantomConfig

    (tmp_path / ".ph.tmp-999999").mkdir()  # a killed generation's leftover
    data = DataConfig(source="phantom", root=str(tmp_path / "ph"),
                      phantom=PhantomConfig(n_volumes=1, shape=(32, 32, 24), seed=0))
    assert len(ensure_cases(data)) == 1
    assert not list(tmp_path.glob(".ph.tmp-*")) and (tmp_path / "ph" / "phantom_settings.json").is_file()


# --------------------------------------------------------------------------------------------- inputs


def test_empty_label_warns_and_tags_the_evaluation(mlflow_store: str, tiny_case, caplog) -> None:
    from stego_core.data.io import load_volume, save_volume
    from stego_core.engine.reconstruction import EngineConfig
    from stego_core.steps.evaluation import BaselineConfig, run_baseline

    folder = tiny_case("empty", brain_mask=True)
    label = load_volume(folder / "label.nii.gz")
    save_volume(folder / "label.nii.gz", np.zeros(label.data.shape, np.uint8), label.affine, overwrite=True)
    cfg = BaselineConfig(data=DataConfig(source="folder", root=str(folder.parent), skull_strip="given"),
                         engine=EngineConfig(patch_size=None, batch_size=8), method="otsu", split="all",
                         experiment="faults", progress=False)
    result = run_baseline(cfg)
    tags = tracking.client().get_run(result.run_id).data.tags
    assert tags["label_empty"] == "true" and tags["label_empty/empty"] == "true"
    assert "label" in caplog.text and "all zero" in caplog.text


def test_non_head_volume_warns_and_constant_image_names_the_case(mlflow_store: str, tmp_path: Path,
                                                                 caplog) -> None:
    from stego_core.data.io import save_volume
    from stego_core.engine.reconstruction import EngineConfig
    from stego_core.steps.evaluation import BaselineConfig, run_baseline

    rng = np.random.default_rng(0)
    stack = (0.3 + 0.05 * rng.standard_normal((32, 32, 24))).astype(np.float32)
    stack[::4] += 0.8  # vessels across the whole field of view, no head around them (a microscopy stack)
    affine = np.diag([1.0, 1.0, 1.5, 1.0])
    save_volume(tmp_path / "stack" / "s0" / "image.nii.gz", stack, affine)
    cfg = BaselineConfig(data=DataConfig(source="folder", root=str(tmp_path / "stack"), skull_strip="auto"),
                         engine=EngineConfig(patch_size=None, batch_size=8), method="otsu", split="all",
                         experiment="faults", progress=False)
    result = run_baseline(cfg)
    tags = tracking.client().get_run(result.run_id).data.tags
    assert tags["skull_strip_implausible"] == "true" and "implausible for a head" in tags["skull_strip_warning/s0"]
    assert "of the volume" in caplog.text
    save_volume(tmp_path / "const" / "c0" / "image.nii.gz", np.ones((32, 32, 24), np.float32), affine)
    cfg = BaselineConfig(data=DataConfig(source="folder", root=str(tmp_path / "const"), skull_strip="auto"),
                         engine=EngineConfig(patch_size=None, batch_size=8), method="otsu", split="all",
                         experiment="faults", progress=False)
    with pytest.raises(ValueError, match=r"case c0: the brain mask .* is empty for .*const/c0/image.nii.gz"):
        run_baseline(cfg)
