"""One registry of methods: classical and learned methods are built by name and evaluated the same way; a new
learned method (``toy_method.py``: one file, one registration line) runs through ``main``, ``baseline``,
``reconstruct``, the ablation and a sweep, fitted on the training volumes only."""

from __future__ import annotations

import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO_ROOT, table_rows

from stego_core.config import load_config
from stego_core.data.cases import DataConfig, ensure_cases, preprocess_case, split_cases
from stego_core.data.phantom import PhantomConfig
from stego_core.engine.reconstruction import EngineConfig
from stego_core.evaluation.scoring import evaluate_case
from stego_core.methods import available_methods, build_method, register_method
from stego_core.methods.registry import MethodEntry, SegmenterMethod
from stego_core.platform import tracking
from stego_core.steps.evaluation import BaselineConfig

TINY = DataConfig(phantom=PhantomConfig(n_volumes=3, shape=(32, 32, 24)))


@pytest.fixture
def toy():
    import toy_method  # registers "brightest" (its one registration line)

    toy_method.FITTED.clear()
    toy_method.PREDICTED.clear()
    return toy_method


def test_registry_lists_classical_and_learned():
    assert {"percentile", "gmm", "frangi3d"} <= set(available_methods("classical"))
    assert {"stego", "selftrain"} <= set(available_methods("learned"))
    with pytest.raises(ValueError, match="did you mean 'otsu'"):
        build_method("otsh")
    with pytest.raises(ValueError, match="registered already"):
        register_method(MethodEntry("gmm", "classical", lambda s, e: None))
    with pytest.raises(ValueError, match="unknown setting"):
        build_method("gmm", {"n_component": 4})
    with pytest.raises(ValueError, match="unknown config key settings.model.n_cluster"):
        build_method("stego", {"model": {"n_cluster": 4}})


def test_classical_method_is_the_engine_on_a_volume(tmp_path):
    data = DataConfig(root=str(tmp_path / "ph"), phantom=TINY.phantom)
    case = preprocess_case(ensure_cases(data)[0], data)
    method = build_method("percentile", {"q": 99.0}, EngineConfig())
    assert isinstance(method, SegmenterMethod) and method.settings()["q"] == 99.0 and method.state() is None
    method.fit([case])  # nothing to learn across volumes
    prob = method.predict(case).prob
    assert prob.shape == case.image.shape and prob.dtype == np.float32 and 0 <= prob.min() <= prob.max() <= 1
    post, row = evaluate_case(prob, case)
    assert row["case_id"] == case.case_id and 0 < row["dice"] <= 1 and post.mask.dtype == bool
    # slice filters follow the engine's axis, and a contradicting setting is refused
    assert build_method("frangi", {}, EngineConfig(axis=1)).segmenter.slice_axis == 1
    with pytest.raises(ValueError, match="slice_axis"):
        build_method("frangi", {"slice_axis": 0}, EngineConfig(axis=2))


def test_a_baseline_config_resolves_and_checks_its_settings_at_load():
    cfg = load_config(BaselineConfig, None, ["method=gmm", "settings={n_components: 4}"])
    assert cfg.settings["n_components"] == 4 and cfg.settings["max_iter"] == 500  # defaults shown in the plan
    with pytest.raises(ValueError, match="unknown setting"):
        load_config(BaselineConfig, None, ["method=gmm", "settings={n_component: 4}"])
    with pytest.raises(ValueError, match="must be a mapping"):
        load_config(BaselineConfig, None, ["method=gmm", "settings=4"])


def test_the_toy_fits_predicts_and_reloads_through_the_registry(tmp_path, toy):
    from stego_core.methods.registry import BuildContext, LearnedState

    data = DataConfig(root=str(tmp_path / "ph"), phantom=TINY.phantom)
    cases = [preprocess_case(c, data) for c in ensure_cases(data)]
    method = build_method("brightest", {"q": 50.0})
    with pytest.raises(ValueError, match="fit it first"):
        method.predict(cases[1])
    method.fit(cases[:1])
    assert toy.FITTED == [[cases[0].case_id]] and method.predict(cases[1]).prob.any()
    saved = LearnedState("brightest", method.settings(), method.state())
    again = build_method("brightest", {"model_uri": "saved"}, BuildContext(load=lambda uri: saved))
    np.testing.assert_array_equal(again.predict(cases[1]).prob, method.predict(cases[1]).prob)
    with pytest.raises(ValueError, match="holds a 'brightest' model; method 'stego' expects"):
        build_method("stego", {"model_uri": "saved"}, BuildContext(load=lambda uri: saved))


@pytest.mark.slow
def test_the_toy_runs_through_every_entry_point(tmp_path, toy, mlflow_store, monkeypatch):
    """main, baseline, reconstruct, the ablation and a sweep, with ``fit`` on the training volumes only."""
    import mlflow.models

    from stego_core.config import from_dict
    from stego_core.steps.ablation import AblationConfig, ablation_rows
    from stego_core.steps.evaluation import (
        ReconstructConfig,
        run_baseline,
        run_reconstruct,
    )
    from stego_core.steps.pipeline import MainConfig, run_main

    monkeypatch.setattr(mlflow.models, "infer_pip_requirements",
                        lambda model_uri, flavor, fallback=None, **kwargs: fallback)
    data = DataConfig(root=str(tmp_path / "ph"), phantom=TINY.phantom)
    train, test = split_cases(ensure_cases(data), 0.34, seed=0)
    train_ids, test_ids = [c.case_id for c in train], {c.case_id for c in test}
    common = {"data": data, "progress": False, "viewer": False, "experiment": "toy", "output": str(tmp_path / "o")}

    # baseline: fitted on the split's training volumes, scored on the others, its state logged as the model
    result = run_baseline(BaselineConfig(method="brightest", settings={"q": 95.0}, **common))
    assert toy.FITTED[-1] == train_ids and {r["case_id"] for r in result.rows} == test_ids
    assert result.model_uri and tracking.client().get_run(result.run_id).data.tags["kind"] == "learned"

    # reconstruct: any learned run is reused with the settings it was trained with, no fit
    fits = len(toy.FITTED)
    again = run_reconstruct(ReconstructConfig(model_uri=result.run_id, **common))
    assert len(toy.FITTED) == fits and [r["dice"] for r in again.rows] == [r["dice"] for r in result.rows]
    assert tracking.client().get_run(again.run_id).data.tags["training_run_id"] == result.run_id

    # main: a row like any other
    cfg = load_config(MainConfig, None, {"data.root": data.root, "data.phantom.n_volumes": 3,
                                         "data.phantom.shape": [32, 32, 24], "prepare": False,
                                         "methods": {"percentile": {}, "brightest": {"settings": {"q": 95.0}}},
                                         "experiment": "toy", "output": str(tmp_path / "main")})
    text = run_main(cfg)
    assert set(table_rows(text)) == {"percentile", "brightest"}
    assert toy.FITTED[-1] == train_ids

    # the ablation: fitted per data set on its training part (split: test)
    abl = from_dict(AblationConfig, {"datasets": [{"root": data.root, "phantom": {"n_volumes": 3,
                                                                                  "shape": [32, 32, 24]}}],
                                     "split": "test", "progress": False, "variants": [{"name": "none"}],
                                     "methods": [{"name": "brightest", "settings": {"q": 95.0}}]})
    rows = ablation_rows(abl)
    assert toy.FITTED[-1] == train_ids and {r["case_id"] for r in rows} == test_ids

    # a sweep over its setting, through the baseline target
    from sweeps.driver import load_sweep_config, run_sweep

    base = str(REPO_ROOT / "experiments/configs/baseline.yaml")
    sweep = load_sweep_config(None, {"target": "baseline", "base_config": base,
                                     "base_overrides": ["method=brightest", "progress=false", "viewer=false",
                                                        f"data.root={data.root}", "data.phantom.n_volumes=3",
                                                        "data.phantom.shape=[32,32,24]"],
                                     "space": {"settings.q": {"type": "float", "low": 90.0, "high": 99.0}},
                                     "seeds": [0], "n_trials": 2, "pruner": "none", "log_plots": False,
                                     "study_name": "toy-sweep", "storage": f"sqlite:///{tmp_path / 'optuna.db'}",
                                     "experiment": "toy"})
    done = run_sweep(sweep)
    assert done.states.get("COMPLETE") == 2 and all(ids == train_ids for ids in toy.FITTED[-2:])


def test_pipeline_rows_that_differ_in_post_processing_predict_each_volume_once(tmp_path, toy, mlflow_store):
    """``brightest`` and ``brightest+largest`` (same settings): one fit, one prediction per volume, read back by
    the second row, which still applies its own step (its mask differs; its file is its own)."""
    from stego_core.steps.pipeline import MainConfig, run_main

    data_root = str(tmp_path / "ph")
    same = {"settings": {"q": 90.0}}
    cfg = load_config(MainConfig, None, {"data.root": data_root, "data.phantom.n_volumes": 3,
                                         "data.phantom.shape": [32, 32, 24], "prepare": False, "split": "all",
                                         "methods": {"brightest": same, "brightest+largest": same,
                                                     "other": {"method": "brightest", "settings": {"q": 95.0}}},
                                         "experiment": "toy", "output": str(tmp_path / "main")})
    text = run_main(cfg)
    cases = sorted(c.case_id for c in ensure_cases(DataConfig(root=data_root, phantom=TINY.phantom)))
    assert set(table_rows(text)) == {"brightest", "brightest+largest", "other"}
    assert len(toy.FITTED) == 2  # brightest (shared with brightest+largest) and other (other settings)
    assert sorted(toy.PREDICTED) == sorted(cases * 2)  # brightest's and other's predictions; none for +largest
    masks = {}
    for row in ("brightest", "brightest+largest"):
        path = next((tmp_path / "main" / "brightest").rglob(f"{cases[0]}_{row}_pred.nii.gz"))
        masks[row] = np.asarray(nib.load(path).dataobj) > 0
    assert masks["brightest+largest"].sum() < masks["brightest"].sum()  # its own step ran on the shared result
    assert not (masks["brightest+largest"] & ~masks["brightest"]).any()


@pytest.mark.slow
def test_a_plugin_module_registers_its_method_for_the_entry_points(tmp_path, mlflow_store):
    """``STEGO_METHOD_PLUGINS=toy_method``: a real ``python -m experiments.baseline`` process runs the toy."""
    env = {**os.environ, "STEGO_METHOD_PLUGINS": "toy_method",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "tests"), str(REPO_ROOT)])}
    out = subprocess.run([sys.executable, "-m", "experiments.baseline", "method=brightest", "settings={q: 95}",
                          f"data.root={tmp_path / 'ph'}", "data.phantom.n_volumes=3", "data.phantom.shape=[32,32,24]",
                          "progress=false", "viewer=false", f"output={tmp_path / 'o'}", "experiment=toy"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "dice_mean=" in out.stdout


def test_analysis_metrics_in_the_evaluation_row(tmp_path):
    data = DataConfig(root=str(tmp_path / "ph"), phantom=TINY.phantom)
    case = preprocess_case(ensure_cases(data)[0], data)
    prob = build_method("percentile").predict(case).prob
    _, row = evaluate_case(prob, case, analysis=True)
    assert {"betti0_error", "betti1_error", "recall_thin"} <= set(row)  # an empty radius bin is left out
    # phantom headers say mm: surface distances in mm; a header with an unknown unit gives none
    assert ("hd95_mm" in row) == (case.spacing_mm is not None)
    _, plain = evaluate_case(prob, case)
    assert "betti0_error" not in plain
