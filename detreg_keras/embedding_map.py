"""Embedding maps people can look at: TensorBoard Projector files and a 2-D t-SNE picture.

:func:`write_projector` writes what the TensorBoard Embedding Projector reads
(``tensorboard --logdir DIR``, then the "Projector" tab)::

    DIR/projector_config.pbtxt   the ProjectorConfig (tensor, metadata and sprite paths)
    DIR/tensors.tsv              one row per image: its embedding, tab-separated
    DIR/metadata.tsv             a header row "label<TAB>class", then one row per image
    DIR/sprite.png               the thumbnails in row-major order on a square grid

:func:`plot_embedding_map` draws a 2-D map (:func:`tsne_2d`) coloured by class
with a few thumbnails placed at their points. Both take plain arrays;
:func:`detreg_keras.training.write_embedding_map` makes them for a run's test
split.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

#: TensorBoard's projector refuses sprites wider or taller than this (pixels).
MAX_SPRITE_SIDE = 8192
PROJECTOR_FILES = ("projector_config.pbtxt", "tensors.tsv", "metadata.tsv", "sprite.png")


def sprite_grid(count: int, thumb_size: int) -> tuple[int, int]:
    """``(columns, thumbnail side)`` of the square sprite of ``count`` thumbnails.

    The grid is ``ceil(sqrt(count))`` thumbnails on a side; thumbnails shrink so
    that the sprite stays within :data:`MAX_SPRITE_SIDE` pixels.
    """
    if count < 1:
        raise ValueError(f"A sprite needs at least one thumbnail, got {count}.")
    columns = math.ceil(math.sqrt(count))
    return columns, max(1, min(int(thumb_size), MAX_SPRITE_SIDE // columns))


def to_thumbnails(images: np.ndarray, size: int) -> np.ndarray:
    """``uint8 [N, size, size, 3]`` thumbnails of images ``[N, H, W, C]`` with values in [0, 255].

    Grayscale (``C = 1``) becomes RGB; each image is resized with PIL (bilinear).
    """
    from PIL import Image  # noqa: PLC0415

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W, 1 or 3], got shape {images.shape}.")
    pixels = np.clip(images, 0, 255).astype(np.uint8)
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    if pixels.shape[1:3] == (size, size):
        return pixels
    return np.stack([np.asarray(Image.fromarray(p).resize((size, size), Image.BILINEAR)) for p in pixels])


def sprite_image(thumbnails: np.ndarray) -> np.ndarray:
    """The thumbnails ``uint8 [N, s, s, 3]`` in row-major order on a ``ceil(sqrt(N))`` square grid (black fill)."""
    n, side = len(thumbnails), thumbnails.shape[1]
    columns, _ = sprite_grid(n, side)
    sprite = np.zeros((columns * side, columns * side, 3), np.uint8)
    for i, thumb in enumerate(thumbnails):
        row, col = divmod(i, columns)
        sprite[row * side : (row + 1) * side, col * side : (col + 1) * side] = thumb
    return sprite


def write_projector(
    out_dir: str | os.PathLike,
    embeddings: np.ndarray,
    labels: np.ndarray,
    images: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    *,
    tensor_name: str = "test",
    thumb_size: int = 32,
) -> Path:
    """Writes the TensorBoard Projector files of ``embeddings`` into ``out_dir`` (see the module docstring).

    Args:
        out_dir: the folder (created); ``tensorboard --logdir out_dir`` shows it.
        embeddings: ``[N, d]`` vectors.
        labels: ``[N]`` class ids.
        images: optional ``[N, H, W, C]`` images in [0, 255] for the sprite.
        class_names: optional name per class id (``class_names[label]``); default the id.
        tensor_name: the tensor's name in the projector's menu.
        thumb_size: thumbnail side in pixels (smaller when the sprite would
            exceed :data:`MAX_SPRITE_SIDE`).

    Returns:
        The path of ``projector_config.pbtxt``.

    Raises:
        ValueError: mismatched lengths, a non-2-D embedding or an empty set.
    """
    from tensorboard.plugins import projector  # noqa: PLC0415

    embeddings, labels = _check_points(embeddings, labels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.savetxt(out / "tensors.tsv", embeddings, delimiter="\t", fmt="%.6g")
    names = [str(label) if class_names is None else str(class_names[int(label)]) for label in labels]
    rows = ["label\tclass", *(f"{int(label)}\t{_tsv_cell(name)}" for label, name in zip(labels, names, strict=True))]
    (out / "metadata.tsv").write_text("\n".join(rows) + "\n")
    config = projector.ProjectorConfig()
    info = config.embeddings.add()
    info.tensor_name, info.tensor_path, info.metadata_path = tensor_name, "tensors.tsv", "metadata.tsv"
    if images is not None:
        if len(images) != len(labels):
            raise ValueError(f"Got {len(images)} images for {len(labels)} embeddings.")
        from PIL import Image  # noqa: PLC0415

        _, side = sprite_grid(len(images), thumb_size)
        Image.fromarray(sprite_image(to_thumbnails(images, side))).save(out / "sprite.png")
        info.sprite.image_path = "sprite.png"
        info.sprite.single_image_dim.extend([side, side])
    path = out / "projector_config.pbtxt"
    from google.protobuf import text_format  # noqa: PLC0415

    path.write_text(text_format.MessageToString(config))
    return path


def tsne_2d(embeddings: np.ndarray, seed: int = 0) -> np.ndarray:
    """``[N, 2]`` t-SNE coordinates of ``embeddings`` (scikit-learn, PCA init, cosine distances, one thread).

    The perplexity is 30, or ``(N - 1) / 3`` for small sets (t-SNE needs it below N).
    """
    from sklearn.manifold import TSNE  # noqa: PLC0415
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    embeddings = np.asarray(embeddings, np.float32)
    if len(embeddings) < 3:
        raise ValueError(f"t-SNE needs at least 3 points, got {len(embeddings)}.")
    perplexity = min(30.0, (len(embeddings) - 1) / 3)
    tsne = TSNE(2, perplexity=perplexity, init="pca", metric="cosine", random_state=seed)
    # One OpenMP thread: on 2 busy cores scikit-learn's threads spun against each other
    # (60 points: 22 s with the default threads, 0.3 s with one).
    with threadpool_limits(limits=1):
        return tsne.fit_transform(embeddings)


def plot_embedding_map(
    points: np.ndarray,
    labels: np.ndarray,
    path: str | os.PathLike,
    images: np.ndarray | None = None,
    *,
    thumbnails: int = 24,
    title: str = "t-SNE of the test embeddings",
    seed: int = 0,
) -> Path:
    """A PNG of 2-D ``points`` coloured by class, with ``thumbnails`` images drawn at their points.

    Args:
        points: ``[N, 2]`` coordinates (e.g. :func:`tsne_2d`).
        labels: ``[N]`` class ids (the colours cycle over 20 hues).
        path: the PNG to write (parent folders are created).
        images: optional ``[N, H, W, C]`` images in [0, 255]; one per class
            first (classes drawn at random with ``seed``), ``thumbnails`` at most.
        thumbnails: the number of images drawn.
        title: the plot's title.
        seed: the draw of the images shown.

    Returns:
        The written path.
    """
    from matplotlib import colormaps  # noqa: PLC0415
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage  # noqa: PLC0415

    points, labels = _check_points(points, labels)
    if points.shape[1] != 2:
        raise ValueError(f"points must be [N, 2], got shape {points.shape}.")
    fig = Figure(figsize=(7.0, 7.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    classes = np.unique(labels)
    colour = {c: i % 20 for i, c in enumerate(classes)}
    ax.scatter(points[:, 0], points[:, 1], c=[colour[c] for c in labels], cmap=colormaps["tab20"], vmin=0,
               vmax=19, s=6, alpha=0.8, linewidths=0)  # fmt: skip
    if images is not None and thumbnails > 0:
        shown = _thumbnail_indices(labels, thumbnails, seed)
        for i, thumb in zip(shown, to_thumbnails(np.asarray(images)[shown], 32), strict=True):
            ax.add_artist(AnnotationBbox(OffsetImage(thumb, zoom=0.6), tuple(points[i]), frameon=True, pad=0.1))
    ax.set_title(f"{title} ({len(points)} images, {len(classes)} classes)")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _thumbnail_indices(labels: np.ndarray, count: int, seed: int) -> list[int]:
    """Up to ``count`` indices, one image of each of ``count`` classes drawn at random."""
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.unique(labels))[:count]
    return [int(rng.choice(np.flatnonzero(labels == c))) for c in classes]


def _check_points(values: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values, labels = np.asarray(values, np.float32), np.asarray(labels).reshape(-1)
    if values.ndim != 2 or len(values) == 0:
        raise ValueError(f"Expected a non-empty [N, d] array, got shape {values.shape}.")
    if len(values) != len(labels):
        raise ValueError(f"Got {len(values)} vectors for {len(labels)} labels.")
    return values, labels


def _tsv_cell(text: str) -> str:
    """A metadata cell: tabs and line breaks would split the row, so they become spaces."""
    return " ".join(text.replace("\t", " ").splitlines())
