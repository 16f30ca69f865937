"""Tests for stego_core.steps.prepare: volumes -> crops -> seed layout, tracked in MLflow."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from stego_core.data.cases import (
    CropSet,
    DataConfig,
    ensure_cases,
    make_crop_set,
    preprocess_case,
    split_cases,
)
from stego_core.data.phantom import PhantomConfig
from stego_core.data.seed_layout import read_seed_dataset
from stego_core.data.slicing import SlicingConfig
from stego_core.platform import tracking
from stego_core.steps.prepare import (
    PrepareConfig,
    crop_names,
    load_crop_set,
    run_prepare,
    save_crop_set,
)

pytestmark = pytest.mark.usefixtures("mlflow_store")

SLICING = SlicingConfig(axis=2, patch_size=16, stride=8, min_brain_fraction=0.05)


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for info in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, info.path) if info.is_dir else {info.path}
    return out


@pytest.fixture(scope="module")
def data3(tmp_path_factory) -> DataConfig:
    data = DataConfig(source="phantom", root=str(tmp_path_factory.mktemp("prep") / "phantoms"),
                      phantom=PhantomConfig(n_volumes=3, shape=(32, 32, 24), seed=2))
    ensure_cases(data)
    return data


def _assert_same_crop_set(a: CropSet, b: CropSet) -> None:
    np.testing.assert_array_equal(a.crops, b.crops)
    np.testing.assert_array_equal(a.index, b.index)
    np.testing.assert_array_equal(a.case_ids, b.case_ids)
    if a.labels is None or b.labels is None:
        assert a.labels is None and b.labels is None
    else:
        np.testing.assert_array_equal(a.labels, b.labels)


def test_run_prepare_tracks_crops_and_seed_layout(data3, tmp_path):
    cfg = PrepareConfig(data=data3, slicing=SLICING, output=str(tmp_path / "out"), experiment="prep-tests")
    result = run_prepare(cfg)
    out = tmp_path / "out" / result.run_id

    cases = ensure_cases(data3)
    train, test = split_cases(cases, 0.34, seed=0)
    assert result.train_ids == [c.case_id for c in train] and result.test_ids == [c.case_id for c in test]
    assert len(result.train_ids) == 2 and len(result.test_ids) == 1

    # the saved crop sets are exactly the crops of the preprocessed volumes
    prepared = {c.case_id: preprocess_case(c, data3) for c in cases}
    expected_train = make_crop_set([prepared[c.case_id] for c in train], SLICING)
    expected_test = make_crop_set([prepared[c.case_id] for c in test], SLICING)
    train_set, test_set = load_crop_set(out / "train_crops.npz"), load_crop_set(out / "test_crops.npz")
    _assert_same_crop_set(train_set, expected_train)
    _assert_same_crop_set(test_set, expected_test)
    assert result.n_train_crops == len(train_set) and result.n_test_crops == len(test_set)
    assert train_set.labels.any()

    # seed layout: every crop once, splits as named, images within PNG quantisation, labels exact
    assert result.dataset_dir == out / "dataset" / "mra"
    for name in ("all.txt", "labelled_train.txt", "labelled_test.txt", "unlabelled_train.txt"):
        assert (result.dataset_dir / name).is_file()
    seed = read_seed_dataset(out / "dataset", "mra")
    train_names, test_names = crop_names(train_set), crop_names(test_set)
    assert seed.ids == train_names + test_names
    assert seed.splits["unlabelled_train"] == train_names == seed.splits["labelled_train"]
    assert seed.splits["labelled_test"] == test_names
    np.testing.assert_allclose(seed.images, np.concatenate([train_set.crops, test_set.crops]), atol=0.5 / 255 + 1e-6)
    all_labels = np.concatenate([train_set.labels, test_set.labels])
    assert set(seed.labels) == set(seed.ids)
    for i, crop_id in enumerate(seed.ids):
        np.testing.assert_array_equal(seed.labels[crop_id], all_labels[i])
    with zipfile.ZipFile(out / "dataset.zip") as z:
        assert {"mra/all.txt", f"mra/imgs/{train_names[0]}.png", f"mra/gt/{test_names[-1]}.png"} <= set(z.namelist())

    client = tracking.client()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["step"] == "prepare" and run.data.tags["method"] == "data"
    assert run.data.tags["train_cases"] == ",".join(result.train_ids)
    assert run.data.tags["test_cases"] == ",".join(result.test_ids)
    assert run.data.params["slicing.patch_size"] == "16" and run.data.params["data.phantom.seed"] == "2"
    metrics = run.data.metrics
    assert metrics["n_volumes"] == 3 and metrics["n_train_crops"] == len(train_set)
    for cid, p in prepared.items():
        assert metrics[f"brain_fraction/{cid}"] == pytest.approx(p.brain_mask.mean())
        assert metrics[f"label_retention/{cid}"] == pytest.approx(p.label_retention)
    artifacts = _artifacts(client, result.run_id)
    assert {"train_crops.npz", "test_crops.npz", "manifest.json", "plan.yaml", "dataset.zip",
            "preview/train_crops.png", "datasets/prepare_phantoms.json"} <= artifacts
    assert {f"preview/{cid}_brain_mask.png" for cid in prepared} <= artifacts
    (dataset_input,) = run.inputs.dataset_inputs
    assert {t.key: t.value for t in dataset_input.tags}["case_ids"] == ",".join(c.case_id for c in cases)


def test_run_prepare_single_case_writes_each_crop_once(tmp_path, tiny_case):
    root = tmp_path / "cases"
    tiny_case("only", root=root, brain_mask=True)
    data = DataConfig(source="folder", root=str(root), skull_strip="given")
    slicing = SlicingConfig(axis=2, patch_size=8, stride=4)
    result = run_prepare(PrepareConfig(data=data, slicing=slicing, output=str(tmp_path / "out"),
                                       dataset_name="tube", experiment="prep-tests"))
    assert result.train_ids == result.test_ids == ["only"]
    assert result.n_train_crops == result.n_test_crops > 0
    seed = read_seed_dataset(tmp_path / "out" / result.run_id / "dataset", "tube")
    assert len(seed.ids) == len(set(seed.ids)) == result.n_train_crops
    assert seed.splits["labelled_test"] == seed.splits["unlabelled_train"] == seed.ids


def test_failed_prepare_is_recorded(tmp_path, tiny_case):
    root = tmp_path / "cases"
    tiny_case("no_mask_case", root=root)
    data = DataConfig(source="folder", root=str(root), skull_strip="given")
    with pytest.raises(ValueError, match="no_mask_case"):
        run_prepare(PrepareConfig(data=data, slicing=SLICING, output=str(tmp_path / "out"),
                                  experiment="prep-tests"))
    client = tracking.client()
    (run,) = client.search_runs([client.get_experiment_by_name("prep-tests").experiment_id])
    assert run.info.status == "FAILED" and "no_mask_case" in run.data.tags["error"]


def test_crop_set_round_trip_and_names(tmp_path):
    rng = np.random.default_rng(0)
    crops = rng.random((3, 4, 4), dtype=np.float32)
    index = np.array([[0, 0, 0], [1, 4, 12], [23, 100, 7]], dtype=np.int64)
    unlabelled = CropSet(crops=crops, labels=None, index=index, case_ids=np.array(["a", "a", "b"]))
    _assert_same_crop_set(load_crop_set(save_crop_set(unlabelled, tmp_path / "u.npz")), unlabelled)
    labelled = CropSet(crops=crops, labels=crops > 0.5, index=index, case_ids=np.array(["a", "a", "b"]))
    _assert_same_crop_set(load_crop_set(save_crop_set(labelled, tmp_path / "l.npz")), labelled)
    assert crop_names(labelled) == ["a_s000_r000_c000", "a_s001_r004_c012", "b_s023_r100_c007"]
