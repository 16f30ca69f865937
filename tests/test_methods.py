"""One registry of methods: classical and learned methods are built by name and evaluated the same way; a new
method plugs in with one builder and one ``register_method`` line."""

from __future__ import annotations

import numpy as np
import pytest

from stego_core.methods import registry as methods
from stego_core.config import BaselineConfig, DataConfig, EngineConfig, PhantomConfig
from stego_core.data.cases import ensure_cases, preprocess_case
from stego_core.methods.registry import EngineMethod, MethodEntry, available_methods, build_method, register_method
from stego_core.evaluation.scoring import evaluate_case

TINY = DataConfig(phantom=PhantomConfig(n_volumes=2, shape=(32, 32, 24)))


class BrightestVoxels:
    """A toy learned method: ``fit`` learns one intensity cut from the training volumes (their 99th
    percentile inside the brain), ``predict`` applies it. Labels never enter."""

    name = "brightest"
    threshold = 0.5

    def __init__(self, q: float = 99.0) -> None:
        self.q = q
        self.cut: float | None = None

    def fit(self, cases) -> None:
        self.cut = float(np.mean([np.percentile(c.image[c.brain_mask], self.q) for c in cases]))

    def predict(self, case, *, progress: bool = False) -> np.ndarray:
        if self.cut is None:
            raise ValueError("brightest: fit it first")
        return ((case.image > self.cut) & case.brain_mask).astype(np.float32)

    def settings(self) -> dict:
        return {"q": self.q}


@pytest.fixture
def brightest():
    register_method(MethodEntry("brightest", "learned", lambda settings, engine: BrightestVoxels(**settings)))
    yield
    del methods._REGISTRY["brightest"]


def test_registry_lists_classical_and_learned():
    assert {"percentile", "gmm", "frangi3d"} <= set(available_methods("classical"))
    assert "stego" in available_methods("learned")
    with pytest.raises(ValueError, match="did you mean 'otsu'"):
        build_method("otsh")
    with pytest.raises(ValueError, match="registered already"):
        register_method(MethodEntry("gmm", "classical", lambda s, e: None))
    with pytest.raises(ValueError, match="unknown setting"):
        build_method("gmm", {"n_component": 4})


def test_classical_method_is_the_engine_on_a_volume(tmp_path):
    data = DataConfig(root=str(tmp_path / "ph"), phantom=TINY.phantom)
    case = preprocess_case(ensure_cases(data)[0], data)
    method = build_method("percentile", {"q": 99.0}, EngineConfig())
    assert isinstance(method, EngineMethod) and method.settings()["q"] == 99.0
    method.fit([case])  # nothing to learn across volumes
    prob = method.predict(case)
    assert prob.shape == case.image.shape and prob.dtype == np.float32 and 0 <= prob.min() <= prob.max() <= 1
    post, row = evaluate_case(prob, case)
    assert row["case_id"] == case.case_id and 0 < row["dice"] <= 1 and post.mask.dtype == bool
    # slice filters follow the engine's axis, and a contradicting setting is refused
    assert build_method("frangi", {}, EngineConfig(axis=1)).segmenter.slice_axis == 1
    with pytest.raises(ValueError, match="slice_axis"):
        build_method("frangi", {"slice_axis": 0}, EngineConfig(axis=2))


def test_a_new_method_plugs_into_fit_predict_and_the_evaluation_run(tmp_path, brightest, mlflow_store):
    from stego_core.steps.evaluation import run_baseline

    data = DataConfig(root=str(tmp_path / "ph"), phantom=TINY.phantom)
    cases = [preprocess_case(c, data) for c in ensure_cases(data)]
    method = build_method("brightest", {"q": 50.0})
    method.fit(cases[:1])
    assert method.predict(cases[1]).any()
    # the evaluation entry point runs any registered method by name; this one is unfitted there
    with pytest.raises(ValueError, match="fit it first"):
        run_baseline(BaselineConfig(data=data, method="brightest", split="all", progress=False,
                                    output=str(tmp_path / "out"), experiment="methods-tests"))


def test_analysis_metrics_in_the_evaluation_row(tmp_path):
    data = DataConfig(root=str(tmp_path / "ph"), phantom=TINY.phantom)
    case = preprocess_case(ensure_cases(data)[0], data)
    prob = build_method("percentile").predict(case)
    _, row = evaluate_case(prob, case, analysis=True)
    assert {"betti0_error", "betti1_error", "recall_thin"} <= set(row)  # an empty radius bin is left out
    # phantom headers say mm: surface distances in mm; a header with an unknown unit gives none
    assert ("hd95_mm" in row) == (case.spacing_mm is not None)
    _, plain = evaluate_case(prob, case)
    assert "betti0_error" not in plain
