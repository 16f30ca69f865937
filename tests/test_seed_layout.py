"""Tests for stego_core.data.seed_layout: the original project's dataset/<name>/ layout, written and read back."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy.io import loadmat, savemat

from stego_core.data.seed_layout import (
    SPLIT_FILES,
    read_seed_dataset,
    write_seed_dataset,
)

IDS = ["vol0_s003_r000_c016", "vol0_s004_r000_c016", "vol1_s010_r008_c000", "vol1_s011_r008_c000", "x5"]


def _data(n: int = 5, size: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random crops in [0, 1] and sparse vessel labels (a 2-pixel-wide vertical line, 25 % of each crop)."""
    rng = np.random.default_rng(seed)
    images = rng.random((n, size, size)).astype(np.float32)
    labels = np.zeros((n, size, size), bool)
    for i in range(n):
        labels[i, :, i % (size - 1):i % (size - 1) + 2] = True
    return images, labels


SPLITS = {"labelled_train": IDS[:2], "labelled_test": IDS[2:3], "unlabelled_train": IDS[3:]}


@pytest.mark.parametrize("label_format", ["png", "mat"])
def test_round_trip(tmp_path, label_format):
    images, labels = _data()
    out = write_seed_dataset(tmp_path / "dataset", "mra", IDS, images, labels, splits=SPLITS,
                             label_format=label_format)
    assert out == tmp_path / "dataset" / "mra"
    assert sorted(p.name for p in (out / "gt").iterdir()) == sorted(f"{i}.{label_format}" for i in IDS)
    ds = read_seed_dataset(tmp_path / "dataset", "mra")
    assert ds.ids == IDS
    assert ds.images.shape == (5, 8, 8) and ds.images.dtype == np.float32
    assert np.abs(ds.images - images).max() <= 0.5 / 255 + 1e-7  # 8-bit quantisation, rounded
    assert ds.images.min() >= 0 and ds.images.max() <= 1
    assert set(ds.labels) == set(IDS)
    for i, crop_id in enumerate(IDS):
        assert ds.labels[crop_id].dtype == bool
        np.testing.assert_array_equal(ds.labels[crop_id], labels[i])
    assert ds.splits == {"all": IDS, **SPLITS}


def test_split_files_hold_ids_without_extension(tmp_path):
    images, _ = _data()
    out = write_seed_dataset(tmp_path, "d", IDS, images, splits={"labelled_test": IDS[:1]})
    assert (out / "all.txt").read_text() == "".join(f"{i}\n" for i in IDS)
    assert (out / "labelled_test.txt").read_text() == f"{IDS[0]}\n"
    for split in SPLIT_FILES:
        assert (out / f"{split}.txt").is_file()  # every split file exists, empty ones included
    assert (out / "unlabelled_train.txt").read_text() == ""
    assert not (out / "gt").exists()  # no labels given, no gt folder
    ds = read_seed_dataset(tmp_path, "d")
    assert ds.labels == {}
    assert ds.splits["labelled_train"] == []


def test_pngs_are_8bit_grey(tmp_path):
    images = np.array([[[0.0, 0.5], [1.0, 0.25]]], np.float32)
    labels = np.array([[[0, 1], [0, 0]]], np.uint8)
    out = write_seed_dataset(tmp_path, "d", ["a"], images, labels)
    img = Image.open(out / "imgs" / "a.png")
    assert img.mode == "L"
    np.testing.assert_array_equal(np.asarray(img), [[0, 128], [255, 64]])  # rint(0.5 * 255) = 128
    np.testing.assert_array_equal(np.asarray(Image.open(out / "gt" / "a.png")), [[0, 255], [0, 0]])


def test_images_outside_unit_range_are_clipped(tmp_path):
    out = write_seed_dataset(tmp_path, "d", ["a"], np.array([[[-0.5, 2.0]]], np.float32))
    np.testing.assert_array_equal(np.asarray(Image.open(out / "imgs" / "a.png")), [[0, 255]])


def test_mat_labels_use_key_imagedata(tmp_path):
    images, labels = _data(n=2)
    out = write_seed_dataset(tmp_path, "d", IDS[:2], images, labels, label_format="mat")
    content = loadmat(out / "gt" / f"{IDS[1]}.mat")
    assert "imageData" in content
    np.testing.assert_array_equal(content["imageData"], labels[1].astype(np.uint8))
    assert set(np.unique(content["imageData"]).tolist()) == {0, 1}


# ---------------------------------------------------------------------------- reading hand-made seed folders


def _seed_folder(root, name, label_arrays, *, ext="png", all_txt=True):
    """Write a seed-layout folder by hand: grey images and the given raw label arrays."""
    folder = root / name
    (folder / "imgs").mkdir(parents=True)
    (folder / "gt").mkdir()
    ids = [f"img{i}" for i in range(len(label_arrays))]
    for crop_id, lab in zip(ids, label_arrays):
        Image.fromarray(np.full(lab.shape, 100, np.uint8)).save(folder / "imgs" / f"{crop_id}.png")
        if ext == "png":
            Image.fromarray(lab.astype(np.uint8)).save(folder / "gt" / f"{crop_id}.png")
        else:
            savemat(folder / "gt" / f"{crop_id}.mat", {"imageData": lab.astype(np.uint8)})
    if all_txt:
        (folder / "all.txt").write_text("\n".join(ids) + "\n")
    return ids


def _vessel() -> np.ndarray:
    v = np.zeros((6, 6), bool)
    v[2, 1:5] = True  # 4 of 36 pixels
    return v


@pytest.mark.parametrize("encode", [
    pytest.param(lambda v: v.astype(np.uint8), id="0-1"),
    pytest.param(lambda v: v.astype(np.uint8) * 255, id="0-255"),
    pytest.param(lambda v: (~v).astype(np.uint8) * 255, id="inverted-vessel-0-on-255"),
    pytest.param(lambda v: (~v).astype(np.uint8), id="inverted-vessel-0-on-1"),
])
@pytest.mark.parametrize("ext", ["png", "mat"])
def test_label_conventions_give_vessel_true(tmp_path, encode, ext):
    vessel = _vessel()
    ids = _seed_folder(tmp_path, "d", [encode(vessel), encode(np.roll(vessel, 2, axis=0))], ext=ext)
    ds = read_seed_dataset(tmp_path, "d")  # polarity auto
    np.testing.assert_array_equal(ds.labels[ids[0]], vessel)
    np.testing.assert_array_equal(ds.labels[ids[1]], np.roll(vessel, 2, axis=0))
    assert int(ds.labels[ids[0]].sum()) == 4


def test_explicit_polarity(tmp_path):
    vessel = _vessel()
    ids = _seed_folder(tmp_path, "inv", [(~vessel).astype(np.uint8) * 255])
    np.testing.assert_array_equal(read_seed_dataset(tmp_path, "inv", polarity="vessel_low").labels[ids[0]], vessel)
    np.testing.assert_array_equal(read_seed_dataset(tmp_path, "inv", polarity="vessel_high").labels[ids[0]], ~vessel)
    ids = _seed_folder(tmp_path, "std", [vessel.astype(np.uint8) * 255])
    np.testing.assert_array_equal(read_seed_dataset(tmp_path, "std", polarity="vessel_high").labels[ids[0]], vessel)
    np.testing.assert_array_equal(read_seed_dataset(tmp_path, "std", polarity="vessel_low").labels[ids[0]], ~vessel)


def test_auto_polarity_decides_on_all_labels_together(tmp_path):
    # One crop is mostly foreground, but over the dataset the non-zero pixels are the minority: no inversion.
    big = np.zeros((6, 6), np.uint8)
    big[:4] = 255  # 24 / 36
    small = np.zeros((6, 6), np.uint8)
    small[0, 0] = 255
    ids = _seed_folder(tmp_path, "d", [big, small, small])
    ds = read_seed_dataset(tmp_path, "d")
    np.testing.assert_array_equal(ds.labels[ids[0]], big > 0)
    np.testing.assert_array_equal(ds.labels[ids[1]], small > 0)


def test_ids_from_imgs_when_all_txt_missing(tmp_path):
    ids = _seed_folder(tmp_path, "d", [_vessel().astype(np.uint8)] * 3, all_txt=False)
    ds = read_seed_dataset(tmp_path, "d")
    assert ds.ids == sorted(ids)
    assert ds.images.shape == (3, 6, 6)
    np.testing.assert_allclose(ds.images, 100 / 255)
    assert ds.splits["all"] == []


def test_labels_for_some_crops_only(tmp_path):
    ids = _seed_folder(tmp_path, "d", [_vessel().astype(np.uint8)] * 2)
    (tmp_path / "d" / "gt" / f"{ids[1]}.png").unlink()
    ds = read_seed_dataset(tmp_path, "d")
    assert list(ds.labels) == [ids[0]]


def test_refuses_to_overwrite_existing_dataset(tmp_path):
    images, labels = _data()
    out = write_seed_dataset(tmp_path, "d", IDS, images, labels)
    before = (out / "imgs" / f"{IDS[0]}.png").read_bytes()
    with pytest.raises(FileExistsError, match=r"dataset folder .*d already exists"):
        write_seed_dataset(tmp_path, "d", IDS, images * 0, labels)
    assert (out / "imgs" / f"{IDS[0]}.png").read_bytes() == before
    (tmp_path / "other").mkdir()  # even an empty folder is not written into
    with pytest.raises(FileExistsError):
        write_seed_dataset(tmp_path, "other", IDS, images)


def test_missing_image_listed_in_all_txt(tmp_path):
    ids = _seed_folder(tmp_path, "d", [_vessel().astype(np.uint8)] * 2)
    with (tmp_path / "d" / "all.txt").open("a") as f:
        f.write("ghost\n")
    with pytest.raises(FileNotFoundError, match=r"all\.txt lists ghost but .*imgs/ghost\.png does not exist"):
        read_seed_dataset(tmp_path, "d")
    assert ids == ["img0", "img1"]


@pytest.mark.parametrize("ext", ["png", "mat"])
def test_non_binary_label_names_the_file(tmp_path, ext):
    lab = _vessel().astype(np.uint8) * 255
    lab[0, 0] = 128
    _seed_folder(tmp_path, "d", [_vessel().astype(np.uint8), lab], ext=ext)
    with pytest.raises(ValueError, match=rf"label file .*img1\.{ext} has values \[0, 128, 255\]"):
        read_seed_dataset(tmp_path, "d")


def test_mat_without_imagedata_key(tmp_path):
    _seed_folder(tmp_path, "d", [_vessel().astype(np.uint8)], ext="mat")
    savemat(tmp_path / "d" / "gt" / "img0.mat", {"gt": np.zeros((6, 6), np.uint8)})
    with pytest.raises(ValueError, match=r"img0\.mat has no key 'imageData' \(keys: \['gt'\]\)"):
        read_seed_dataset(tmp_path, "d")


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no imgs/ folder"):
        read_seed_dataset(tmp_path, "nothing")
    _seed_folder(tmp_path, "d", [_vessel().astype(np.uint8)])
    with pytest.raises(ValueError, match=r"polarity='inverted' is not valid; choose one of auto, vessel_high"):
        read_seed_dataset(tmp_path, "d", polarity="inverted")


def test_writer_errors(tmp_path):
    images, labels = _data()
    with pytest.raises(ValueError, match=r"N = len\(ids\) = 4; got shape \(5, 8, 8\)"):
        write_seed_dataset(tmp_path, "a", IDS[:4], images)
    with pytest.raises(ValueError, match=r"images must be \(N, H, W\)"):
        write_seed_dataset(tmp_path, "b", IDS, images[..., None])
    with pytest.raises(ValueError, match=r"labels have shape \(5, 8, 7\)"):
        write_seed_dataset(tmp_path, "c", IDS, images, labels[..., :7])
    with pytest.raises(ValueError, match=r"label_format='tif' must be 'png' or 'mat'"):
        write_seed_dataset(tmp_path, "d", IDS, images, labels, label_format="tif")
    with pytest.raises(ValueError, match=r"unknown split names \['val'\]"):
        write_seed_dataset(tmp_path, "e", IDS, images, splits={"val": IDS})
    assert list(tmp_path.iterdir()) == []  # validation happens before anything is written
