"""Tests for stego_core.data.io: NIfTI round trips, input validation naming the file, case discovery, manifests."""

from __future__ import annotations

import re

import nibabel as nib
import numpy as np
import pytest
from conftest import TINY_AFFINE, TINY_SHAPE, tube_volume

from stego_core.data.io import (
    Case,
    discover_cases,
    file_digest,
    load_case,
    load_volume,
    make_case,
    read_manifest,
    save_volume,
    write_manifest,
)


def _raw_nifti(path, data, affine=TINY_AFFINE):
    """Write with nibabel directly, bypassing save_volume (for shapes/values save_volume never produces)."""
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


# ------------------------------------------------------------------------------------------ load / save volumes


def test_save_load_round_trip_keeps_data_affine_and_zooms(tmp_path):
    data = np.random.default_rng(1).random(TINY_SHAPE, dtype=np.float32)
    path = save_volume(tmp_path / "sub" / "vol.nii.gz", data, TINY_AFFINE)  # parent folder is created
    assert path == tmp_path / "sub" / "vol.nii.gz"
    vol = load_volume(path)
    assert vol.data.dtype == np.float32
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, TINY_AFFINE)
    np.testing.assert_allclose(vol.header.get_zooms()[:3], (0.8, 0.8, 1.5), rtol=1e-6)
    assert vol.spacing_mm == pytest.approx((0.8, 0.8, 1.5))
    assert vol.path == path


def test_spacing_without_header_comes_from_affine():
    from stego_core.data.io import Volume

    affine = np.diag([2.0, 0.5, 3.0, 1.0])
    affine[:3, :3] = affine[:3, :3] @ np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]])  # permuted axes keep lengths
    vol = Volume(np.zeros((2, 2, 2)), affine)
    assert vol.spacing_mm == pytest.approx((0.5, 2.0, 3.0))


def test_save_with_source_header_keeps_geometry_and_updates_dtype(tmp_path):
    src = load_volume(save_volume(tmp_path / "img.nii.gz", np.ones(TINY_SHAPE, np.float32), TINY_AFFINE))
    mask = np.zeros(TINY_SHAPE, dtype=bool)
    mask[3:5, 6:9, 2] = True
    out = load_volume(save_volume(tmp_path / "mask.nii.gz", mask, src.affine, src.header))
    assert out.data.dtype == np.uint8  # bool is stored as uint8, not as the float32 of the source header
    np.testing.assert_array_equal(out.data, mask.astype(np.uint8))
    np.testing.assert_allclose(out.affine, TINY_AFFINE)
    assert out.spacing_mm == pytest.approx((0.8, 0.8, 1.5))
    assert int(out.header["sform_code"]) >= 1 and int(out.header["qform_code"]) >= 1


def test_save_refuses_overwrite_and_leaves_original(tmp_path):
    path = save_volume(tmp_path / "v.nii.gz", np.full((4, 4, 4), 7, np.int16), np.eye(4))
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match=re.escape(str(path))):
        save_volume(path, np.zeros((4, 4, 4), np.int16), np.eye(4))
    assert path.read_bytes() == before
    assert np.all(load_volume(path).data == 7)
    save_volume(path, np.zeros((4, 4, 4), np.int16), np.eye(4), overwrite=True)
    assert np.all(load_volume(path).data == 0)


def test_load_4d_volume_error_names_file(tmp_path):
    path = _raw_nifti(tmp_path / "four_d.nii.gz", np.zeros((4, 5, 6, 2), np.float32))
    with pytest.raises(ValueError, match=r"four_d\.nii\.gz.*\(4, 5, 6, 2\).*3D"):
        load_volume(path)


def test_load_2d_volume_error(tmp_path):
    path = _raw_nifti(tmp_path / "flat.nii.gz", np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match=r"flat\.nii\.gz.*expected a 3D volume"):
        load_volume(path)


def test_singleton_fourth_dim_is_squeezed(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6, 1)
    vol = load_volume(_raw_nifti(tmp_path / "s.nii.gz", data))
    assert vol.data.shape == (4, 5, 6)
    np.testing.assert_array_equal(vol.data, data[..., 0])


def test_nan_volume_error_names_file_and_count(tmp_path):
    data = np.zeros((4, 4, 4), np.float32)
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    path = save_volume(tmp_path / "bad_values.nii.gz", data, np.eye(4))
    with pytest.raises(ValueError, match=r"bad_values\.nii\.gz contains 2 NaN/Inf"):
        load_volume(path)


def test_corrupt_file_error_names_file(tmp_path):
    path = tmp_path / "corrupt.nii.gz"
    path.write_bytes(b"this is not a nifti file at all" * 20)
    with pytest.raises(ValueError, match=r"cannot read NIfTI volume .*corrupt\.nii\.gz"):
        load_volume(path)


def test_truncated_file_error_names_file(tmp_path):
    good = save_volume(tmp_path / "good.nii", np.ones((16, 16, 16), np.float32), np.eye(4))
    bad = tmp_path / "truncated.nii"
    bad.write_bytes(good.read_bytes()[:1000])  # header intact, data cut short
    with pytest.raises(ValueError, match=r"truncated\.nii"):
        load_volume(bad)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.nii\.gz does not exist"):
        load_volume(tmp_path / "nope.nii.gz")


# ------------------------------------------------------------------------------------------------------ cases


def test_discover_single_case_folder(tiny_case):
    folder = tiny_case("single", brain_mask=True)
    cases = discover_cases(folder)
    assert len(cases) == 1
    case = cases[0]
    assert case.case_id == "single"
    assert case.image == str(folder / "image.nii.gz")
    assert case.label == str(folder / "label.nii.gz")
    assert case.mask == str(folder / "brain_mask.nii.gz")
    # digest = image digest + label digest (12 hex digits each)
    image_digest = file_digest(folder / "image.nii.gz", length=12)
    assert case.digest == f"{image_digest}-{file_digest(folder / 'label.nii.gz', length=12)}"
    assert re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]{12}", case.digest)


def test_discover_folder_of_cases_sorted(tmp_path, tiny_case):
    root = tmp_path / "data"
    for name in ("case_b", "case_c", "case_a"):
        tiny_case(name, root=root, label=name != "case_c")
    (root / "notes").mkdir()  # folders without an image are not cases
    (root / "README.txt").write_text("hello")
    cases = discover_cases(root)
    assert [c.case_id for c in cases] == ["case_a", "case_b", "case_c"]
    assert cases[2].label is None and cases[2].mask is None
    assert len(cases[2].digest) == 12  # image only


def test_discover_uncompressed_nii(tmp_path):
    save_volume(tmp_path / "c" / "image.nii", np.ones((4, 4, 4), np.float32), np.eye(4))
    (case,) = discover_cases(tmp_path / "c")
    assert case.image.endswith("image.nii") and case.label is None


def test_discover_empty_and_missing_root(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no cases under .*empty"):
        discover_cases(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"missing.*does not exist"):
        discover_cases(tmp_path / "missing")


def test_discover_require_labels_names_the_case(tmp_path, tiny_case):
    root = tmp_path / "data"
    tiny_case("with_label", root=root)
    tiny_case("no_label_here", root=root, label=False)
    with pytest.raises(ValueError, match=r"no_label_here") as info:
        discover_cases(root, require_labels=True)
    assert "with_label" not in str(info.value)
    assert len(discover_cases(root)) == 2  # fine when labels are not required


def test_make_case_without_image(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError, match="image.nii.gz"):
        make_case(tmp_path / "x")


def test_load_case_reads_binary_label_and_mask(tiny_case):
    folder = tiny_case(brain_mask=True)
    loaded = load_case(make_case(folder))
    _, label, mask = tube_volume()
    assert loaded.image.data.shape == TINY_SHAPE
    np.testing.assert_allclose(loaded.image.affine, TINY_AFFINE)
    assert loaded.label.dtype == bool and loaded.mask.dtype == bool
    np.testing.assert_array_equal(loaded.label, label > 0)
    np.testing.assert_array_equal(loaded.mask, mask > 0)
    assert int(loaded.label.sum()) == int(label.sum()) > 0


def test_load_case_shape_mismatch_names_label(tiny_case):
    folder = tiny_case(label=False)
    save_volume(folder / "label.nii.gz", np.zeros((24, 24, 11), np.uint8), TINY_AFFINE)
    with pytest.raises(ValueError, match=r"label .*label\.nii\.gz has shape \(24, 24, 11\).*\(24, 24, 12\)"):
        load_case(make_case(folder))


def test_load_case_affine_mismatch_names_label(tiny_case):
    folder = tiny_case(label=False)
    shifted = TINY_AFFINE.copy()
    shifted[0, 3] += 1.0
    save_volume(folder / "label.nii.gz", np.zeros(TINY_SHAPE, np.uint8), shifted)
    with pytest.raises(ValueError, match=r"label .*label\.nii\.gz has a different affine"):
        load_case(make_case(folder))


def test_load_case_mask_mismatch_names_mask(tiny_case):
    folder = tiny_case()
    save_volume(folder / "brain_mask.nii.gz", np.ones((24, 24, 11), np.uint8), TINY_AFFINE)
    with pytest.raises(ValueError, match=r"mask .*brain_mask\.nii\.gz has shape"):
        load_case(make_case(folder))


def test_load_case_non_binary_label_lists_values(tiny_case):
    folder = tiny_case(label=False)
    label = np.zeros(TINY_SHAPE, np.uint8)
    label[5, 5, 5] = 2
    save_volume(folder / "label.nii.gz", label, TINY_AFFINE)
    with pytest.raises(ValueError, match=r"label\.nii\.gz has values \{0, 2\}"):
        load_case(make_case(folder))


def test_load_case_accepts_0_255_label(tiny_case):
    folder = tiny_case(label=False)
    _, label, _ = tube_volume()
    save_volume(folder / "label.nii.gz", label * 255, TINY_AFFINE)
    loaded = load_case(make_case(folder))
    np.testing.assert_array_equal(loaded.label, label > 0)


def test_digest_changes_with_content(tmp_path):
    a = save_volume(tmp_path / "a.nii.gz", np.zeros((4, 4, 4), np.float32), np.eye(4))
    b = save_volume(tmp_path / "b.nii.gz", np.zeros((4, 4, 4), np.float32), np.eye(4))
    c_data = np.zeros((4, 4, 4), np.float32)
    c_data[0, 0, 0] = 1
    c = save_volume(tmp_path / "c.nii", c_data, np.eye(4))
    d = save_volume(tmp_path / "d.nii", np.zeros((4, 4, 4), np.float32), np.eye(4))
    assert file_digest(c) != file_digest(d)
    assert len(file_digest(a)) == 16 and len(file_digest(a, length=8)) == 8
    assert file_digest(a, length=8) == file_digest(a)[:8]
    # Identical uncompressed content gives identical digests regardless of file name.
    e = save_volume(tmp_path / "e.nii", np.zeros((4, 4, 4), np.float32), np.eye(4))
    assert file_digest(d) == file_digest(e)
    assert b.exists()


def test_case_digest_changes_when_label_changes(tiny_case):
    folder = tiny_case()
    before = make_case(folder).digest
    label = np.zeros(TINY_SHAPE, np.uint8)
    label[0, 0, 0] = 1
    save_volume(folder / "label.nii.gz", label, TINY_AFFINE, overwrite=True)
    after = make_case(folder).digest
    assert before.split("-")[0] == after.split("-")[0]  # same image
    assert before.split("-")[1] != after.split("-")[1]


def test_manifest_round_trip(tmp_path, tiny_case):
    root = tmp_path / "data"
    tiny_case("a", root=root, brain_mask=True)
    tiny_case("b", root=root, label=False)
    cases = discover_cases(root)
    path = write_manifest(cases, tmp_path / "out" / "manifest.json")
    assert path.is_file()
    back = read_manifest(path)
    assert back == cases
    assert all(isinstance(c, Case) for c in back)
    assert back[1].label is None
