"""Image-folder loader on directories and zips (detreg_keras.data.folders)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detreg_keras.data import (
    CorruptImageWarning,
    check_image_bytes,
    decode_image,
    load_image_folder,
    make_eval_dataset,
)


def _encode(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _rand(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _write_tree(root: Path) -> dict[str, int]:
    """A small class-per-folder collection with every kind of awkward file.

    Returns the number of valid images per class.
    """
    files = {
        "cat/a_rgb.png": _encode(_rand((23, 37, 3), 1), "PNG"),
        "cat/b.jpg": _encode(_rand((40, 30, 3), 2), "JPEG"),
        "cat/c_gray.JPEG": _encode(_rand((17, 17), 3), "JPEG"),
        "cat/sub/deeper/d.png": _encode(_rand((9, 11, 3), 4), "PNG"),
        "dog/rgba.png": _encode(_rand((12, 20, 4), 5), "PNG"),
        "dog/gray.png": _encode(_rand((31, 8), 6), "PNG"),
        "dog/pal.gif": _encode(_rand((15, 15, 3), 7), "GIF"),
        "dog/x.bmp": _encode(_rand((10, 13, 3), 8), "BMP"),
        "dog/corrupt.png": b"\x89PNG\r\n\x1a\nthis is not really a png",
        "dog/empty.jpg": b"",
        "dog/notes.txt": b"not an image",
        "dog/.hidden.png": _encode(_rand((5, 5, 3), 9), "PNG"),
        "top_level.png": _encode(_rand((5, 5, 3), 10), "PNG"),
        "owl/readme.md": b"# only a non-image file: not a class",
    }
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return {"cat": 4, "dog": 4}


def _zip_dir(src: Path, dest: Path, top: str | None) -> Path:
    with zipfile.ZipFile(dest, "w") as archive:
        for path in sorted(src.rglob("*")):
            if path.is_file():
                rel = path.relative_to(src).as_posix()
                archive.write(path, f"{top}/{rel}" if top else rel)
    return dest


def test_directory_listing_skips_corrupt_and_ignores_non_images(tmp_path):
    expected = _write_tree(tmp_path / "data")
    with pytest.warns(CorruptImageWarning, match="Skipped 2 unreadable"):
        records = load_image_folder(tmp_path / "data")
    assert records.class_names == ["cat", "dog"]
    np.testing.assert_array_equal(records.class_counts(), [expected["cat"], expected["dog"]])
    assert records.skipped == 2
    assert sorted(Path(p).name for p, _ in records.skipped_files) == ["corrupt.png", "empty.jpg"]
    assert dict(records.skipped_files)[str(tmp_path / "data/dog/empty.jpg")] == "empty file"
    names = {Path(p).name for p in records.paths}
    assert names.isdisjoint({"notes.txt", ".hidden.png", "top_level.png", "readme.md"})
    assert "d.png" in names  # images below the class folder belong to it
    assert not records.in_memory and records.data is None
    assert "8 images" in records.summary() and "2 skipped" in records.summary()


def test_every_listed_image_decodes_to_rgb(tmp_path):
    _write_tree(tmp_path / "data")
    with pytest.warns(CorruptImageWarning):
        records = load_image_folder(tmp_path / "data", in_memory=True)
    assert records.in_memory and len(records.data) == len(records)
    shapes = {
        Path(p).name: decode_image(d).shape.as_list() for p, d in zip(records.paths, records.data)
    }
    assert shapes["a_rgb.png"] == [23, 37, 3]
    assert shapes["rgba.png"] == [12, 20, 3]
    assert shapes["gray.png"] == [31, 8, 3]
    assert shapes["c_gray.JPEG"] == [17, 17, 3]
    assert shapes["x.bmp"] == [10, 13, 3]
    assert shapes["pal.gif"] == [15, 15, 3]
    # The pipeline reads the on-disk variant and keeps images and labels aligned.
    with pytest.warns(CorruptImageWarning):
        on_disk = load_image_folder(tmp_path / "data")
    images, labels = next(iter(make_eval_dataset(on_disk, 16, 8, mode="resize")))
    assert images.shape == (8, 8, 8, 3)
    np.testing.assert_array_equal(labels.numpy(), on_disk.labels)


def test_class_depth_two_and_filter(tmp_path):
    for alphabet, chars in {"Greek": 3, "Latin": 2}.items():
        for c in range(chars):
            for i in range(2):
                path = tmp_path / "root" / alphabet / f"character{c + 1:02d}" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(_encode(_rand((6, 6), c * 10 + i), "PNG"))
    records = load_image_folder(tmp_path / "root", class_depth=2)
    assert records.class_names == [
        "Greek/character01", "Greek/character02", "Greek/character03",
        "Latin/character01", "Latin/character02",
    ]  # fmt: skip
    np.testing.assert_array_equal(records.class_counts(), [2] * 5)
    latin = load_image_folder(
        tmp_path / "root", class_depth=2, class_filter=lambda n: n.startswith("Latin/")
    )
    assert latin.class_names == ["Latin/character01", "Latin/character02"]
    np.testing.assert_array_equal(np.unique(latin.labels), [0, 1])


@pytest.mark.parametrize("top", ["collection", None])
def test_zip_matches_directory(tmp_path, top):
    _write_tree(tmp_path / "data")
    archive = _zip_dir(tmp_path / "data", tmp_path / "data.zip", top)
    with pytest.warns(CorruptImageWarning):
        from_dir = load_image_folder(tmp_path / "data")
    with pytest.warns(CorruptImageWarning, match="Skipped 2"):
        from_zip = load_image_folder(archive)
    assert from_zip.in_memory
    assert from_zip.class_names == from_dir.class_names
    np.testing.assert_array_equal(from_zip.labels, from_dir.labels)
    assert from_zip.skipped == 2
    assert [Path(p).name for p in from_zip.paths] == [Path(p).name for p in from_dir.paths]
    assert from_zip.paths[0].startswith(str(archive) + "/")
    for path, data in zip(from_dir.paths, from_zip.data):
        assert Path(path).read_bytes() == data


def test_zip_subdir_argument(tmp_path):
    _write_tree(tmp_path / "data")
    archive = _zip_dir(tmp_path / "data", tmp_path / "d.zip", "collection")
    with pytest.warns(CorruptImageWarning):
        records = load_image_folder(archive, subdir="collection")
    assert records.class_names == ["cat", "dog"]
    # Archive root as is: the top folder becomes the class, depth 2 needed.
    with pytest.warns(CorruptImageWarning):
        nested = load_image_folder(archive, subdir="", class_depth=2)
    assert nested.class_names == ["collection/cat", "collection/dog"]
    with pytest.raises(FileNotFoundError, match="nope"):
        load_image_folder(archive, subdir="nope")


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "empty_class" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="No readable image"):
        load_image_folder(tmp_path)
    with pytest.raises(ValueError, match="class_depth"):
        load_image_folder(tmp_path, class_depth=0)


def test_check_image_bytes_modes():
    good = _encode(_rand((8, 8, 3)), "PNG")
    assert check_image_bytes(good) is None
    assert check_image_bytes(good, "decode") is None
    assert check_image_bytes(b"") == "empty file"
    assert check_image_bytes(b"garbage").startswith("corrupt")
    assert check_image_bytes(b"garbage", "none") is None
    assert check_image_bytes(b"garbage", "decode").startswith("not decodable")
    assert "TensorFlow" in check_image_bytes(_encode(_rand((8, 8, 3)), "TIFF"))
    assert "1-bit BMP" in check_image_bytes(_encode(_rand((8, 8)), "BMP", mode="1"))
    truncated = _encode(_rand((64, 64, 3)), "JPEG")
    # PIL's verify() does not decode JPEG pixel data: a truncated JPEG passes
    # "verify" (the pipeline drops it later) but not a full decode.
    assert check_image_bytes(truncated[: len(truncated) // 2], "decode") is not None


def test_validate_none_lists_without_reading_and_pipeline_drops(tmp_path):
    _write_tree(tmp_path / "data")
    with pytest.warns(CorruptImageWarning, match="Skipped 1"):
        records = load_image_folder(tmp_path / "data", validate="none")
    assert records.skipped == 1  # only the empty file is noticed
    assert len(records) == 9  # the corrupt PNG is listed...
    batches = list(make_eval_dataset(records, 4, 8, mode="resize").as_numpy_iterator())
    assert sum(len(y) for _, y in batches) == 8  # ...and dropped by the pipeline


def test_select_classes_with_a_class_split(tmp_path):
    from detreg_keras.data import split_classes

    for c in range(5):
        for i in range(c + 1):
            path = tmp_path / f"class{c}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_encode(_rand((4, 4, 3), c), "PNG"))
    records = load_image_folder(tmp_path)
    split = split_classes(records.num_classes, train=[4, 1], test=[0, 2])
    train = records.select_classes(split.train)
    assert train.class_names == ["class1", "class4"]
    np.testing.assert_array_equal(train.class_counts(), [2, 5])
    assert all(Path(p).parent.name in {"class1", "class4"} for p in train.paths)
    test = records.select_classes(split.test, remap=False)
    assert test.class_names == records.class_names
    assert sorted(set(test.labels.tolist())) == [0, 2]
    with pytest.raises(ValueError, match="unknown"):
        records.select_classes([7])
