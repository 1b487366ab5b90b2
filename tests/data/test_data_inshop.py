"""In-shop Clothes Retrieval loader on a tiny fake official layout."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detreg_keras.data import CorruptImageWarning, load_inshop

ROWS = [
    ("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train"),
    ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "train"),
    ("img/MEN/Shirts/id_00000010/01_1_front.jpg", "id_00000010", "train"),
    ("img/WOMEN/Skirts/id_00000001/01_1_front.jpg", "id_00000001", "query"),
    ("img/WOMEN/Skirts/id_00000001/01_2_side.jpg", "id_00000001", "gallery"),
    ("img/WOMEN/Skirts/id_00000007/01_1_front.jpg", "id_00000007", "gallery"),
    ("img/MEN/Pants/id_00000005/01_1_front.jpg", "id_00000005", "query"),
    ("img/MEN/Pants/id_00000005/01_3_back.jpg", "id_00000005", "gallery"),
    ("img/MEN/Pants/id_00000005/01_4_full.jpg", "id_00000005", "query"),
]


def _jpeg(seed: int) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (20, 12, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG")
    return buffer.getvalue()


def _write_layout(root: Path, official_archive: bool, rows=ROWS) -> None:
    eval_dir = root / "Eval" if official_archive else root
    image_root = root / "Img" if official_archive else root
    eval_dir.mkdir(parents=True, exist_ok=True)
    lines = [str(len(rows)), "image_name item_id evaluation_status"]
    lines += [f"{name}   {item}   {status}" for name, item, status in rows]
    (eval_dir / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    for i, (name, _, _) in enumerate(rows):
        path = image_root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_jpeg(i))


@pytest.mark.parametrize("official_archive", [False, True])
def test_inshop_splits_and_labels(tmp_path, official_archive):
    _write_layout(tmp_path, official_archive)
    data = load_inshop(tmp_path)
    assert (len(data.train), len(data.query), len(data.gallery)) == (3, 3, 3)
    assert data.train.class_names == ["id_00000002", "id_00000010"]
    assert data.train.labels.tolist() == [0, 0, 1]
    # Query and gallery share one label space over their items.
    assert data.query.class_names == data.gallery.class_names == [
        "id_00000001", "id_00000005", "id_00000007",
    ]  # fmt: skip
    assert data.query.labels.tolist() == [0, 1, 1]
    assert data.gallery.labels.tolist() == [0, 2, 1]
    assert all(Path(p).is_file() for p in data.query.paths)
    assert data.train.skipped == 0 and not data.train.in_memory
    in_memory = load_inshop(tmp_path, in_memory=True)
    assert in_memory.gallery.data[0] == Path(in_memory.gallery.paths[0]).read_bytes()


def test_inshop_missing_and_corrupt_images_are_skipped(tmp_path):
    _write_layout(tmp_path, official_archive=False)
    (tmp_path / ROWS[1][0]).unlink()
    (tmp_path / ROWS[7][0]).write_bytes(b"")
    with pytest.warns(CorruptImageWarning, match="Skipped 2"):
        data = load_inshop(tmp_path)
    assert (len(data.train), data.train.skipped) == (2, 1)
    assert (len(data.gallery), data.gallery.skipped) == (2, 1)
    assert data.query.skipped == 0
    assert data.gallery.skipped_files[0][1] == "empty file"


def test_inshop_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="list_eval_partition.txt"):
        load_inshop(tmp_path)
    _write_layout(tmp_path, official_archive=False)
    bad = tmp_path / "list_eval_partition.txt"
    bad.write_text(bad.read_text() + "img/x.jpg id_1 validation\n")
    with pytest.raises(ValueError, match="status"):
        load_inshop(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "list_eval_partition.txt").write_text(
        "1\nimage_name item_id evaluation_status\nimg/a.jpg id_1 train\n"
    )
    with pytest.raises(FileNotFoundError, match="images not found"):
        load_inshop(other)
