"""Tests for stego_core.data.cases: phantom generation and reuse, splits, preprocessing, crop sets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_AFFINE, tube_volume

from stego_core.data.cases import (
    DataConfig,
    ensure_cases,
    make_crop_set,
    preprocess_case,
    split_cases,
)
from stego_core.data.io import Case, load_volume, make_case, save_volume
from stego_core.data.phantom import PhantomConfig
from stego_core.data.slicing import SlicingConfig


def _phantom_config(root: Path, *, n_volumes: int = 2, seed: int = 0,
                    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> DataConfig:
    return DataConfig(source="phantom", root=str(root), phantom=PhantomConfig(
        n_volumes=n_volumes, shape=(32, 32, 24), spacing_mm=spacing_mm, seed=seed))


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``root``: (mtime_ns, sha256)."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------- ensure_cases


def test_ensure_cases_generates_once_then_reuses(tmp_path, monkeypatch):
    root = tmp_path / "phantoms"
    data = _phantom_config(root, n_volumes=2)
    cases = ensure_cases(data)
    assert [c.case_id for c in cases] == ["phantom_000", "phantom_001"]
    assert all(c.label and c.mask for c in cases)
    assert json.loads((root / "phantom_settings.json").read_text())["n_volumes"] == 2
    assert load_volume(cases[0].image).data.shape == (32, 32, 24)
    before = _snapshot(root)

    # The second call must not generate anything: make generation impossible and call again.
    import stego_core.data.phantom

    def forbidden(*args, **kwargs):
        raise AssertionError("phantoms generated twice")

    monkeypatch.setattr(stego_core.data.phantom, "write_phantom_cases", forbidden)
    again = ensure_cases(data)
    assert again == cases  # same ids, paths and content digests
    assert _snapshot(root) == before


def test_ensure_cases_refuses_other_phantom_settings(tmp_path):
    root = tmp_path / "phantoms"
    ensure_cases(_phantom_config(root, n_volumes=2, seed=0))
    before = _snapshot(root)
    for other in (_phantom_config(root, n_volumes=2, seed=1), _phantom_config(root, n_volumes=3, seed=0),
                  _phantom_config(root, n_volumes=2, spacing_mm=(1.0, 1.0, 1.5))):
        with pytest.raises(FileExistsError, match=str(root)):
            ensure_cases(other)
    assert _snapshot(root) == before  # nothing overwritten, nothing added
    assert not (root / "phantom_002").exists()


def test_ensure_cases_refuses_a_non_phantom_folder(tmp_path, tiny_case):
    root = tmp_path / "mine"
    tiny_case("case_a", root=root)
    before = _snapshot(root)
    with pytest.raises(FileExistsError, match="not a phantom folder") as info:
        ensure_cases(_phantom_config(root))
    assert str(root) in str(info.value)
    assert _snapshot(root) == before
    # An empty existing folder is fine: phantoms are generated into it.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(ensure_cases(_phantom_config(empty, n_volumes=1))) == 1


def test_ensure_cases_folder_source(tmp_path, tiny_case):
    root = tmp_path / "cases"
    tiny_case("b", root=root)
    tiny_case("a", root=root, label=False)
    cases = ensure_cases(DataConfig(source="folder", root=str(root)))
    assert [c.case_id for c in cases] == ["a", "b"]
    assert cases[0].label is None and cases[1].label is not None
    with pytest.raises(ValueError, match="a"):
        ensure_cases(DataConfig(source="folder", root=str(root)), require_labels=True)
    with pytest.raises(FileNotFoundError):
        ensure_cases(DataConfig(source="folder", root=str(tmp_path / "missing")))


# --------------------------------------------------------------------------------------------- split_cases


def _cases(n: int) -> list[Case]:
    return [Case(case_id=f"c{i:02d}", image=f"/x/c{i:02d}/image.nii.gz") for i in range(n)]


@pytest.mark.parametrize("n, fraction, n_test", [(2, 0.34, 1), (3, 0.34, 1), (5, 0.4, 2), (5, 0.9, 4),
                                                 (4, 0.01, 1), (10, 0.25, 2)])
def test_split_cases_sizes_disjoint_sorted(n, fraction, n_test):
    cases = _cases(n)
    train, test = split_cases(cases, fraction, seed=3)
    assert len(test) == n_test and len(train) == n - n_test
    ids_train, ids_test = [c.case_id for c in train], [c.case_id for c in test]
    assert not set(ids_train) & set(ids_test)
    assert sorted(ids_train + ids_test) == [c.case_id for c in cases]
    assert ids_train == sorted(ids_train) and ids_test == sorted(ids_test)


def test_split_cases_deterministic_by_seed():
    cases = _cases(10)
    assert split_cases(cases, 0.3, seed=7) == split_cases(cases, 0.3, seed=7)
    tests = {tuple(c.case_id for c in split_cases(cases, 0.3, seed=s)[1]) for s in range(8)}
    assert len(tests) > 1  # the seed matters


def test_split_cases_named_test_cases_rotate():
    """test_cases names the held-out cases: each of five is held out once, the other four train."""
    cases = _cases(5)
    for held in cases:
        train, test = split_cases(cases, 0.34, seed=0, test_ids=(held.case_id,))
        assert test == [held] and held not in train and len(train) == 4
    with pytest.raises(ValueError, match=r"test_cases=\['c99'\].*no case \['c99'\]"):
        split_cases(cases, 0.34, test_ids=("c99",))


def test_split_cases_single_case_is_both():
    (only,) = _cases(1)
    assert split_cases([only], 0.34, seed=0) == ([only], [only])


# --------------------------------------------------------------------------------------------- preprocess_case


def _case_with_label_outside_mask(folder: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    image, label, mask = tube_volume((24, 24, 12), seed=1)
    label[0:2, 0:2, 0:3] = 1  # 12 labelled voxels outside the centred brain box
    image[0:2, 0:2, 0:3] = 0.9
    save_volume(folder / "image.nii.gz", image * 100.0 + 20.0, TINY_AFFINE)
    save_volume(folder / "label.nii.gz", label, TINY_AFFINE)
    save_volume(folder / "brain_mask.nii.gz", mask, TINY_AFFINE)
    return folder, label.astype(bool), mask.astype(bool)


def test_preprocess_case_given_mask(tmp_path):
    folder, label, mask = _case_with_label_outside_mask(tmp_path / "case_x")
    prepared = preprocess_case(make_case(folder), DataConfig(source="folder", root=str(folder),
                                                             skull_strip="given"))
    assert prepared.image.dtype == np.float32 and prepared.image.shape == (24, 24, 12)
    assert prepared.image.min() >= 0.0 and prepared.image.max() <= 1.0
    assert prepared.image[mask].min() == 0.0 and prepared.image[mask].max() == pytest.approx(1.0)
    assert np.all(prepared.image[~mask] == 0.0)
    np.testing.assert_array_equal(prepared.brain_mask, mask)
    # The label is the file's, not masked: voxels lost by skull stripping count as misses later.
    np.testing.assert_array_equal(prepared.label, label)
    assert prepared.label[~mask].sum() == 12
    inside = int((label & mask).sum())
    assert prepared.label_retention == pytest.approx(inside / (inside + 12))
    np.testing.assert_allclose(prepared.affine, TINY_AFFINE)
    assert prepared.header is not None


def test_preprocess_case_none_mode_and_no_label(tmp_path, tiny_case):
    folder = tiny_case("nolabel", label=False)
    prepared = preprocess_case(make_case(folder), DataConfig(source="folder", root=str(folder),
                                                             skull_strip="none"))
    assert prepared.brain_mask.all()
    assert prepared.label is None and prepared.label_retention is None
    assert prepared.image.min() == 0.0 and prepared.image.max() == pytest.approx(1.0)


def test_preprocess_case_given_without_mask_names_the_case(tmp_path, tiny_case):
    folder = tiny_case("case_without_mask", brain_mask=False)
    with pytest.raises(ValueError, match="case_without_mask"):
        preprocess_case(make_case(folder), DataConfig(source="folder", root=str(folder), skull_strip="given"))


# --------------------------------------------------------------------------------------------- make_crop_set


def _region(volume: np.ndarray, axis: int, s: int, r: int, c: int, p: int) -> np.ndarray:
    plane = np.moveaxis(volume, axis, 0)[s]
    return plane[r:r + p, c:c + p]


@pytest.mark.parametrize("axis", [0, 2])
def test_make_crop_set_crops_match_their_index(tmp_path, tiny_case, axis):
    data = DataConfig(source="folder", root=str(tmp_path), skull_strip="given")
    with_label = preprocess_case(make_case(tiny_case("a", brain_mask=True, seed=0)), data)
    without = preprocess_case(make_case(tiny_case("b", brain_mask=True, label=False, seed=1)), data)
    slicing = SlicingConfig(axis=axis, patch_size=8, stride=4, min_brain_fraction=0.05)
    crop_set = make_crop_set([with_label, without], slicing)

    n = len(crop_set)
    assert crop_set.crops.shape == (n, 8, 8) and crop_set.crops.dtype == np.float32
    assert crop_set.labels.shape == (n, 8, 8) and crop_set.labels.dtype == bool
    assert crop_set.index.shape == (n, 3) and crop_set.case_ids.shape == (n,)
    assert set(crop_set.case_ids) == {"a", "b"}
    n_a = int((crop_set.case_ids == "a").sum())
    assert n_a == n - n_a  # same mask geometry -> same number of crops per case
    volumes = {"a": with_label, "b": without}
    for crop, lab, (s, r, c), cid in zip(crop_set.crops, crop_set.labels, crop_set.index, crop_set.case_ids):
        prepared = volumes[cid]
        np.testing.assert_array_equal(crop, _region(prepared.image, axis, s, r, c, 8))
        expected = (_region(prepared.label & prepared.brain_mask, axis, s, r, c, 8) if prepared.label is not None
                    else np.zeros((8, 8), bool))
        np.testing.assert_array_equal(lab, expected)
        assert _region(prepared.brain_mask, axis, s, r, c, 8).mean() > 0.05  # brainless crops are skipped
    assert crop_set.labels[crop_set.case_ids == "a"].any()
    assert not crop_set.labels[crop_set.case_ids == "b"].any()


def test_make_crop_set_without_labels_and_all_skipped(tmp_path, tiny_case):
    data = DataConfig(source="folder", root=str(tmp_path), skull_strip="given")
    prepared = preprocess_case(make_case(tiny_case("u", brain_mask=True, label=False)), data)
    crop_set = make_crop_set([prepared], SlicingConfig(axis=2, patch_size=8, stride=8))
    assert crop_set.labels is None and len(crop_set) > 0
    prepared.brain_mask[:] = False
    with pytest.raises(ValueError, match="no crops"):
        make_crop_set([prepared], SlicingConfig(axis=2, patch_size=8, stride=8))
