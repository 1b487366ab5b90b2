"""Embedding maps: the TensorBoard Projector files (format checked by parsing them back) and the t-SNE PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detreg_keras.embedding_map import (
    MAX_SPRITE_SIDE,
    plot_embedding_map,
    sprite_grid,
    tsne_2d,
    write_projector,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_projector_folder(folder: Path, embeddings: np.ndarray | None, labels: np.ndarray) -> dict:
    """Parses the projector files back and checks them against each other and the data.

    Returns:
        ``{"dim": d, "side": thumbnail side, "sprite": (width, height)}``.
    """
    from google.protobuf import text_format
    from tensorboard.plugins.projector import ProjectorConfig

    config = text_format.Parse((folder / "projector_config.pbtxt").read_text(), ProjectorConfig())
    (info,) = config.embeddings
    assert (info.tensor_path, info.metadata_path, info.sprite.image_path) == ("tensors.tsv", "metadata.tsv", "sprite.png")
    tensors = np.loadtxt(folder / "tensors.tsv", delimiter="\t", ndmin=2)
    assert tensors.shape[0] == len(labels)
    if embeddings is not None:
        np.testing.assert_allclose(tensors, embeddings, rtol=1e-5, atol=1e-6)
    rows = (folder / "metadata.tsv").read_text().splitlines()
    assert rows[0] == "label\tclass" and len(rows) - 1 == len(tensors)  # header + one row per vector
    assert [int(row.split("\t")[0]) for row in rows[1:]] == [int(v) for v in labels]
    side = list(info.sprite.single_image_dim)
    assert len(side) == 2 and side[0] == side[1]
    sprite = Image.open(folder / "sprite.png")
    columns = math.ceil(math.sqrt(len(labels)))
    assert sprite.size == (columns * side[0], columns * side[0])  # a square grid of thumbnails
    return {"dim": tensors.shape[1], "side": side[0], "sprite": sprite.size}


def test_projector_files_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(10, 4)).astype(np.float32)
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    images = rng.integers(0, 256, (10, 8, 8, 1)).astype(np.float32)
    write_projector(tmp_path, emb, labels, images, class_names=[f"c{i}\tx" for i in range(5)], thumb_size=8)
    found = check_projector_folder(tmp_path, emb, labels)
    assert found == {"dim": 4, "side": 8, "sprite": (32, 32)}  # 10 thumbnails: a 4x4 grid of 8 px
    rows = (tmp_path / "metadata.tsv").read_text().splitlines()
    assert rows[3] == "1\tc1 x"  # a tab in a class name would split the row
    # the sprite's tile i (row-major) is image i in gray-as-RGB; the unused cells stay black
    sprite = np.asarray(Image.open(tmp_path / "sprite.png"))
    for i in (0, 5, 9):
        row, col = divmod(i, 4)
        tile = sprite[row * 8 : row * 8 + 8, col * 8 : col * 8 + 8]
        np.testing.assert_array_equal(tile, np.repeat(images[i].astype(np.uint8), 3, axis=-1))
    assert not sprite[16:24, 16:32].any() and not sprite[24:32].any()


def test_sprite_thumbnails_shrink_to_fit_tensorboards_limit():
    assert sprite_grid(2120, 32) == (47, 32)  # Omniglot's test split: 47 x 32 = 1504 px
    columns, side = sprite_grid(100_000, 32)
    assert columns == 317 and side == MAX_SPRITE_SIDE // 317 and columns * side <= MAX_SPRITE_SIDE
    with pytest.raises(ValueError, match="at least one"):
        sprite_grid(0, 32)


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(ValueError, match="10 vectors for 9 labels"):
        write_projector(tmp_path, np.zeros((10, 3)), np.zeros(9))
    with pytest.raises(ValueError, match="3 images for 10 embeddings"):
        write_projector(tmp_path, np.zeros((10, 3)), np.zeros(10), np.zeros((3, 8, 8, 1)))
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        plot_embedding_map(np.zeros((5, 3)), np.zeros(5), tmp_path / "m.png")


def test_tsne_map_png_separates_clusters(tmp_path):
    """Three well-separated clusters stay separated in the 2-D map, and the PNG is written."""
    rng = np.random.default_rng(0)
    centres = np.eye(3, 16) * 10
    labels = np.repeat(np.arange(3), 20)
    emb = centres[labels] + rng.normal(scale=0.3, size=(60, 16))
    points = tsne_2d(emb, seed=0)
    assert points.shape == (60, 2)
    # nearest neighbour in the map has the same label for every point (brute force)
    dist = np.linalg.norm(points[:, None] - points[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    assert (labels[dist.argmin(axis=1)] == labels).all()
    images = rng.integers(0, 256, (60, 12, 12, 1)).astype(np.float32)
    out = plot_embedding_map(points, labels, tmp_path / "map" / "embedding_map.png", images, thumbnails=3)
    assert out.read_bytes()[:8] == PNG_MAGIC and Image.open(out).size[0] > 300
