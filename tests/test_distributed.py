"""Several processes, one run: the trainer settings, sharding, and real ``torchrun`` jobs of 2 gloo ranks on CPU
compared with one process (training: the same weights and losses at the same global batch)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, free_port

from stego_core.config import load_config
from stego_core.runtime import distributed
from stego_core.runtime.distributed import TrainerSettings
from stego_core.steps.training import TrainConfig

#: STEGO on tiny phantoms with the weight-free featurizer. Dropout off and the nearest neighbour as the kNN
#: partner: the two draws that come from per-process random streams (the rest is the same global batch).
TINY_TRAIN = ["data.root=data/tiny", "data.phantom.shape=[32,32,24]", "data.phantom.n_volumes=3",
              "slicing.patch_size=16", "slicing.stride=8", "model.backbone=classical", "model.res=8",
              "model.code_dim=16", "model.dropout=0", "loss.knn_rank_max=1", "train.max_steps=4",
              "train.val_every_n_steps=4", "train.log_every_n_steps=1", "train.progress=false",
              "train.accelerator=cpu", "train.system_metrics=false", "log_model=false", "experiment=dist"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _torchrun_cmd(*args: str, nproc: int = 2) -> list[str]:
    """``torchrun --nproc_per_node <nproc> <args>`` on this machine (loopback rendezvous on a free port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), *args]


def torchrun(target: str, *args: str, nproc: int = 2, module: bool = True, timeout: float = 240.0
             ) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node <nproc> [-m] <target> <args>`` on this machine (gloo), checked."""
    cmd = _torchrun_cmd(*(["-m"] if module else []), target, *args, nproc=nproc)
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out


def python_m(module: str, *args: str, timeout: float = 240.0) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", module, *args], env=_env(), capture_output=True, text=True,
                         timeout=timeout, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out


def _runs(experiment: str) -> list:
    from stego_core.platform import tracking
    c = tracking.client()
    exp = c.get_experiment_by_name(experiment)
    return [] if exp is None else c.search_runs([exp.experiment_id])


def _artifacts(run_id: str, path: str | None = None) -> list[str]:
    from stego_core.platform import tracking
    out: list[str] = []
    for info in tracking.client().list_artifacts(run_id, path):
        out += _artifacts(run_id, info.path) if info.is_dir else [info.path]
    return out


# ----------------------------------------------------------------------------------------------- settings


def test_trainer_settings_defaults_and_errors() -> None:
    t = TrainerSettings()
    assert (t.devices, t.num_nodes, t.strategy, t.precision, t.world_size) == (1, 1, "auto", "auto", 1)
    assert t.lightning_strategy() == "auto"
    assert TrainerSettings(devices=2).lightning_strategy() == "ddp"
    assert TrainerSettings(devices=4, num_nodes=2).world_size == 8
    with pytest.raises(ValueError, match=r"trainer\.devices=0"):
        load_config(TrainConfig, None, ["trainer.devices=0"])
    with pytest.raises(ValueError, match=r"trainer\.strategy='dpp'.*did you mean 'ddp'"):
        load_config(TrainConfig, None, ["trainer.strategy=dpp"])
    with pytest.raises(ValueError, match=r"trainer\.precision"):
        load_config(TrainConfig, None, ["trainer.precision=64"])


def test_more_devices_without_a_launcher_names_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.init_from_env(devices=1) == 1
    with pytest.raises(ValueError, match=r"trainer\.devices=2 .* `torchrun --nproc_per_node 2"):
        distributed.init_from_env(devices=2)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="launcher started 3"):
        distributed.init_from_env(devices=2)


def test_shard_and_sharded_batches_cover_the_single_process_batches() -> None:
    items = list(range(11))
    parts = [distributed.shard(items, rank=r, world_size=3) for r in range(3)]
    assert sorted(i for part in parts for i in part) == items and parts[1] == [1, 4, 7, 10]
    stream = torch.randperm(50, generator=torch.Generator().manual_seed(0)).tolist()
    one = list(distributed.ShardedBatchSampler(stream, 8))
    ranks = [list(distributed.ShardedBatchSampler(stream, 4, rank=r, world_size=2)) for r in range(2)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 6
    assert all(a + b == c for a, b, c in zip(ranks[0], ranks[1], one))


# ----------------------------------------------------------------------------------------------- training


def _ckpt(output: Path) -> dict[str, torch.Tensor]:
    (path,) = output.glob("*/checkpoints/last.ckpt")
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_ddp_training_equals_one_process_with_the_global_batch(mlflow_store: str, tmp_path: Path) -> None:
    """2 gloo ranks x batch 4 (torchrun, DDP) against 1 process x batch 8: the same weights after 4 steps and
    the same loss curve, one MLflow run each, rank 0's artifacts only."""
    python_m("experiments.train", *TINY_TRAIN, "train.batch_size=8", "output=out1", "train.cache_dir=cache1")
    torchrun("experiments.train", *TINY_TRAIN, "train.batch_size=4", "trainer.devices=2", "output=out2",
             "train.cache_dir=cache2")
    runs = _runs("dist")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    one, two = _ckpt(tmp_path / "out1"), _ckpt(tmp_path / "out2")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    by_dir = {r.info.run_id: r for r in runs}
    (id2,) = [p.name for p in (tmp_path / "out2").iterdir()]
    (id1,) = [p.name for p in (tmp_path / "out1").iterdir()]
    from stego_core.platform import tracking
    c = tracking.client()
    loss1 = [m.value for m in sorted(c.get_metric_history(id1, "train/loss"), key=lambda m: m.step)]
    loss2 = [m.value for m in sorted(c.get_metric_history(id2, "train/loss"), key=lambda m: m.step)]
    assert len(loss1) == 4 and np.allclose(loss2, loss1, rtol=1e-5, atol=1e-6), (loss1, loss2)
    assert by_dir[id2].data.params["trainer.devices"] == "2"
    arts = _artifacts(id2)
    assert len(arts) == len(set(arts)) and "checkpoints/last.ckpt" in arts


# --------------------------------------------------------------------------------------------- pretraining

#: DINO of a tiny ViT (4 blocks, patch 4) on 16-pixel crops of one tiny phantom.
TINY_PRETRAIN = ["data.root=data/tiny", "data.phantom.shape=[32,32,24]", "data.phantom.n_volumes=1",
                 "backbone=mra_vit_t4_p4", "slicing.patch_size=16", "slicing.stride=8", "augment.global_size=16",
                 "augment.local_size=8", "augment.n_local=2", "batch_size=4", "out_dim=32", "hidden_dim=32",
                 "bottleneck_dim=16", "warmup_steps=1", "freeze_last_layer_steps=1", "teacher_temp_warmup_steps=2",
                 "log_every=1", "figure_every=0", "checkpoint_every=2", "accelerator=cpu", "progress=false",
                 "max_steps=3", "experiment=dist-pretrain"]


@pytest.mark.slow
def test_ddp_pretraining_keeps_centre_and_teacher_equal_on_every_rank(mlflow_store: str, tmp_path: Path) -> None:
    """2 gloo ranks draw different crops; after 3 steps their centres (all-reduced), teachers (EMA of students
    updated with averaged gradients) and students are the same; one run, rank 0's checkpoint holds both
    ranks' data streams."""
    out = tmp_path / "ranks.json"
    torchrun(str(REPO_ROOT / "tests" / "torchrun_pretrain.py"), str(out), *TINY_PRETRAIN, "trainer.devices=2",
             module=False)
    import json

    report = json.loads(out.read_text())
    assert report["ranks"] == 2 and report["center_abs_max"] > 0
    assert report["max_diff"] == {"center": 0.0, "teacher": 0.0, "student": 0.0}, report
    (run,) = _runs("dist-pretrain")
    assert run.info.status == "FINISHED" and run.info.run_id == report["run_id"]
    assert run.data.params["trainer.devices"] == "2"
    arts = _artifacts(run.info.run_id)
    assert len(arts) == len(set(arts)) and "backbone/teacher_backbone.safetensors" in arts
    (ckpt,) = (tmp_path / "outputs" / "pretrain").glob("*/checkpoints/last.pt")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["step"] == 3 and len(state["generators"]) == 2
    assert not torch.equal(state["generators"][0], state["generators"][1])


# ------------------------------------------------------------------------------------------ reconstruction

TINY_BASELINE = ["data.root=data/tiny4", "data.phantom.shape=[32,32,24]", "data.phantom.n_volumes=4",
                 "split=all", "method=otsu", "progress=false", "analysis=false"]


@pytest.mark.slow
def test_distributed_evaluation_of_four_phantoms_equals_one_process(mlflow_store: str, tmp_path: Path) -> None:
    """4 phantoms split over 2 gloo ranks: the same per-volume scores as one process, in one run holding every
    case's metrics, prediction and figure once."""
    python_m("experiments.baseline", *TINY_BASELINE, "experiment=eval1", "output=out1")
    torchrun("experiments.baseline", *TINY_BASELINE, "experiment=eval2", "output=out2")
    (one,), (two,) = _runs("eval1"), _runs("eval2")
    assert one.info.status == two.info.status == "FINISHED"
    per_case = {k: v for k, v in one.data.metrics.items() if "/phantom_" in k}
    assert len([k for k in per_case if k.startswith("dice/")]) == 4
    assert {k: two.data.metrics.get(k) for k in per_case} == pytest.approx(per_case, rel=1e-12, abs=0)
    assert two.data.metrics["dice_mean"] == pytest.approx(one.data.metrics["dice_mean"], rel=1e-12)
    arts = _artifacts(two.info.run_id)
    assert len(arts) == len(set(arts))
    assert sorted(a for a in arts if a.startswith(("predictions/", "figures/"))) == sorted(
        a for a in _artifacts(one.info.run_id) if a.startswith(("predictions/", "figures/")))
    assert len([a for a in arts if a.startswith("predictions/")]) == 4
    assert len([a for a in arts if a.startswith("figures/")]) == 4
    assert (tmp_path / "out2" / two.info.run_id / "evaluation_results.txt").read_text().count("phantom_") == 4
    # rank 1 evaluated every second case and handed its figures to rank 0 as files
    assert sorted(p.name for p in (tmp_path / "out2" / two.info.run_id / "figures").iterdir()) == [
        "phantom_001_mip.png", "phantom_003_mip.png"]


# ------------------------------------------------------------------------------------------------ faults

FAULT_SCRIPT = str(REPO_ROOT / "tests" / "torchrun_train_fault.py")


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 0])
def test_a_failing_rank_ends_the_run_failed(mlflow_store: str, tmp_path: Path, rank: int) -> None:
    """One rank raises in its third training step: the job fails and the one run ends FAILED with that rank's
    error (not KILLED by torchrun tearing the other rank down, nor hanging in Lightning's exception checkpoint,
    nor RUNNING)."""
    cmd = _torchrun_cmd(FAULT_SCRIPT, "fail", str(rank), str(tmp_path / "fault"), *TINY_TRAIN, "train.max_steps=50",
                        "train.val_every_n_steps=50", "train.batch_size=4", "trainer.devices=2", "output=out",
                        "train.cache_dir=cache")
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=80, check=False)
    assert out.returncode != 0
    assert f"injected failure on rank {rank}" in out.stdout + out.stderr
    (run,) = _runs("dist")
    assert run.info.status == "FAILED", (run.info.status, run.data.tags, out.stderr[-4000:])
    assert f"injected failure on rank {rank}" in run.data.tags["error"]
    assert run.data.tags["ended_by_rank"] == str(rank)
    assert any(a.startswith("error") for a in _artifacts(run.info.run_id))


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 0])
def test_sigterm_to_a_rank_ends_the_run_killed(mlflow_store: str, tmp_path: Path, rank: int) -> None:
    """SIGTERM to one rank in the middle of training: the job stops and the one run ends KILLED (not FAILED by
    the other rank's broken collective, nor hanging in Lightning's SIGTERM handler, nor RUNNING)."""
    import signal
    import time

    folder = tmp_path / "fault"
    cmd = _torchrun_cmd(FAULT_SCRIPT, "signal", str(rank), str(folder), *TINY_TRAIN, "train.max_steps=5000",
                        "train.val_every_n_steps=5000", "train.batch_size=4", "trainer.devices=2", "output=out",
                        "train.cache_dir=cache")
    with open(tmp_path / "job.log", "w") as log:
        job = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            step = folder / f"rank{rank}.step"
            while not (step.is_file() and step.read_text().strip() and int(step.read_text()) >= 2):
                assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "job.log").read_text()[-4000:]
                time.sleep(0.2)
            os.kill(int((folder / f"rank{rank}.pid").read_text()), signal.SIGTERM)
            returncode = job.wait(timeout=60)
        finally:
            if job.poll() is None:
                job.kill()
    text = (tmp_path / "job.log").read_text()
    assert returncode != 0, text[-4000:]
    (run,) = _runs("dist")
    assert run.info.status == "KILLED", (run.info.status, run.data.tags, text[-4000:])
    assert "SIGTERM" in run.data.tags.get("end_reason", ""), run.data.tags
    assert run.data.tags["ended_by_rank"] == str(rank) and "error" not in run.data.tags
