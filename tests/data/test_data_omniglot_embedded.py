"""The Omniglot benchmark embedded in the package (no ../shared needed, except where noted)."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from detreg_keras.data import OMNIGLOT_TEST_ALPHABETS, decode_image, load_omniglot, load_omniglot_split
from detreg_keras.data.omniglot_embedded import OMNIGLOT_LICENSE, OMNIGLOT_PACKAGE_DATA
from tests.conftest import OMNIGLOT_DIR, load_script

TRAIN_ALPHABETS = {"Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"}
REBUILD = "build_omniglot_package_data.py"


@pytest.fixture(scope="module")
def embedded():
    return {split: load_omniglot_split(split) for split in ("train", "test")}


@pytest.fixture(scope="module")
def zips():
    if not (OMNIGLOT_DIR / "images_background_small1.zip").is_file():
        pytest.skip(f"Omniglot archives not found in {OMNIGLOT_DIR}")
    return {split: load_omniglot(OMNIGLOT_DIR, split) for split in ("train", "test")}


def test_package_data_is_small_and_ships_with_its_licence():
    assert OMNIGLOT_PACKAGE_DATA.stat().st_size < 2_000_000
    text = OMNIGLOT_LICENSE.read_text()
    assert "MIT License" in text and "Brenden Lake" in text and "Permission is hereby granted" in text


@pytest.mark.parametrize(
    ("split", "classes", "alphabets"), [("train", 136, TRAIN_ALPHABETS), ("test", 106, set(OMNIGLOT_TEST_ALPHABETS))]
)
def test_splits_hold_twenty_binary_images_per_character(embedded, split, classes, alphabets):
    data = embedded[split]
    assert data.images.shape == (classes * 20, 105, 105, 1) and data.images.dtype == np.uint8
    assert set(np.unique(data.images)) == {0, 255}
    np.testing.assert_array_equal(np.bincount(data.labels, minlength=classes), np.full(classes, 20))
    assert list(data.class_names) == sorted(data.class_names) and len(set(data.class_names)) == classes
    assert {name.split("/")[0] for name in data.class_names} == alphabets
    archive = "images_background_small1.zip/" if split == "train" else "images_background_small2.zip/"
    for path, label in zip(data.paths, data.labels, strict=True):
        assert path.startswith(archive) and f"/{data.class_names[label]}/" in path
    # ink is the minority: a blank or inverted image would break this
    ink = (data.images == 0).mean(axis=(1, 2, 3))
    assert 0.005 < ink.min() and ink.max() < 0.5


def test_train_and_test_alphabets_are_disjoint(embedded):
    train = {n.split("/")[0] for n in embedded["train"].class_names}
    test = {n.split("/")[0] for n in embedded["test"].class_names}
    assert not train & test


def test_records_decode_to_the_arrays(embedded):
    data = embedded["test"]
    records = data.to_records()
    assert records.num_classes == 106 and len(records) == 2120 and records.in_memory
    np.testing.assert_array_equal(records.labels, data.labels)
    assert records.class_names == list(data.class_names) and records.paths == list(data.paths)
    for i in (0, 777, 2119):
        rgb = decode_image(records.data[i]).numpy()
        np.testing.assert_array_equal(rgb, np.repeat(data.images[i], 3, axis=-1))


def test_arrays_equal_a_fresh_decode_of_the_zips(embedded, zips):
    """Every embedded image is the PNG of the same path in the zips, decoded by PIL (not by the build's decoder)."""
    from PIL import Image

    for split in ("train", "test"):
        data, records = embedded[split], zips[split]
        assert list(data.class_names) == records.class_names
        np.testing.assert_array_equal(data.labels, records.labels)
        assert [p.split(".zip/")[1] for p in data.paths] == [p.split(".zip/")[1] for p in records.paths]
        decoded = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("L")) for b in records.data])
        np.testing.assert_array_equal(data.images[..., 0], decoded)


def test_build_script_reproduces_the_committed_file(tmp_path, zips):
    out = tmp_path / "rebuilt.npz"
    assert load_script("build_omniglot_package_data").main(["--data-root", str(OMNIGLOT_DIR), "--output", str(out)]) == 0
    with np.load(out) as rebuilt, np.load(OMNIGLOT_PACKAGE_DATA) as committed:
        assert sorted(rebuilt.files) == sorted(committed.files)
        for name in committed.files:
            np.testing.assert_array_equal(rebuilt[name], committed[name], err_msg=name)
        assert all(re.fullmatch(r"images_background_small[12]\.zip sha256=[0-9a-f]{64}", s) for s in committed["sources"])


def test_missing_file_names_it_and_the_rebuild_command(tmp_path):
    missing = tmp_path / "omniglot_small.npz"
    with pytest.raises(FileNotFoundError, match=REBUILD) as err:
        load_omniglot_split("train", path=missing)
    assert str(missing) in str(err.value)


@pytest.mark.parametrize("damage", ["truncated", "flipped bytes", "not a zip", "other arrays"])
def test_damaged_file_names_it_and_the_rebuild_command(tmp_path, damage):
    path = tmp_path / "omniglot_small.npz"
    shutil.copy(OMNIGLOT_PACKAGE_DATA, path)
    raw = bytearray(path.read_bytes())
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flipped bytes":
        raw[len(raw) // 3 : len(raw) // 3 + 64] = bytes(b ^ 0xFF for b in raw[len(raw) // 3 : len(raw) // 3 + 64])
        path.write_bytes(bytes(raw))
    elif damage == "not a zip":
        path.write_text("version https://git-lfs.github.com/spec/v1\n")  # e.g. an LFS pointer
    else:
        np.savez(path, train_bits=np.zeros((3, 4), np.uint8))
    with pytest.raises(ValueError, match=REBUILD) as err:
        for split in ("train", "test"):
            load_omniglot_split(split, path=path)
    assert str(path) in str(err.value)


def test_unknown_split():
    with pytest.raises(ValueError, match="split"):
        load_omniglot_split("val")


def test_full_omniglot_archives_are_named_when_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="images_background.zip"):
        load_omniglot(tmp_path, "train", full=True)
    with pytest.raises(FileNotFoundError, match="images_evaluation.zip"):
        load_omniglot(tmp_path, "test", full=True)


def test_full_omniglot_reads_background_and_evaluation(tmp_path):
    """A miniature full copy (two archives of alphabet/character folders) is read split by archive."""
    import zipfile

    from PIL import Image

    for archive, alphabets in (("images_background", ("Alpha", "Beta")), ("images_evaluation", ("Gamma",))):
        with zipfile.ZipFile(tmp_path / f"{archive}.zip", "w") as z:
            for alphabet in alphabets:
                for c in (1, 2):
                    buffer = io.BytesIO()
                    Image.fromarray(np.full((105, 105), 255, np.uint8)).save(buffer, format="PNG")
                    z.writestr(f"{archive}/{alphabet}/character0{c}/0001_01.png", buffer.getvalue())
    train, test = (load_omniglot(tmp_path, split, full=True) for split in ("train", "test"))
    assert train.class_names == ["Alpha/character01", "Alpha/character02", "Beta/character01", "Beta/character02"]
    assert test.class_names == ["Gamma/character01", "Gamma/character02"]
    assert Path(train.paths[0]).name == "0001_01.png"
