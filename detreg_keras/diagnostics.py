"""Local Lipschitz diagnostics: does DML raise it between same-class samples, does DReg lower it?

The paper's thesis (Sec. 2-4) is that shrinking each class cluster raises the
*local* Lipschitz constant of the learned map in the "blank region" between
samples of the same class, and that the determinant regulariser on the flow
head lowers it. This module measures that directly.

Lipschitz constant (paper Eq. 2)::

    Lip(f) = max_{x1 != x2} ||f(x1) - f(x2)|| / ||x1 - x2||

Its local version at ``x`` is the operator (spectral) norm of the Jacobian,
``sigma_max(J_f(x))``; Lemma 2 / Eq. 5 bound the constant through the
Jacobian's singular values (it uses the Frobenius norm, ``sum_i lambda_i^2``,
an upper bound of ``sigma_max^2``). We estimate ``sigma_max`` itself, per
sample, by power iteration on ``J^T J`` with forward-mode (jvp) and
reverse-mode (vjp) autodiff, never forming ``J`` (:func:`spectral_norm_jvp`).

By the mean value inequality, the secant ratio of a pair (Eq. 2 for one pair,
:func:`secant_ratio`) is at most the largest local constant on the segment
between the two points, which gives a cheap finite-difference sanity check.

Two targets (:func:`lipschitz_profile`):

* ``"head"``: the L2-normalised embedding ``l2_normalize(flow_min(z))`` as a
  function of the backbone feature ``z`` (for ``flow="none"`` models,
  ``l2_normalize(z)``, whose constant is exactly ``1 / ||z||``);
* ``"network"``: the whole model, images (raw pixels in ``[0, 255]``) to
  embedding, so the constants are per raw-pixel unit.

and three locations: the data points themselves, points on segments towards
the nearest same-class neighbour (the paper's blank region inside a class, the
points the between-sample augmentation regularises) and points on segments
towards the nearest different-class neighbour (between classes).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import tensorflow as tf

from detreg_keras.augment import nearest_same_class_neighbor
from detreg_keras.model import l2_normalize

Fn = Callable[[tf.Tensor], tf.Tensor]

TARGETS = ("head", "network")
LOCATIONS = ("data", "same", "different", "same_secant", "different_secant")
#: summary statistics of :func:`summarize`, in column order
STATS = ("n", "mean", "median", "p90", "max")


# --------------------------------------------------------------------------- helpers
def _as_float(x) -> tf.Tensor:
    x = tf.convert_to_tensor(x)
    return x if x.dtype.is_floating else tf.cast(x, tf.float32)


def _row_norm(x: tf.Tensor) -> tf.Tensor:
    """Euclidean norm of each row, over every non-batch axis: ``[B, ...] -> [B]``."""
    flat = tf.reshape(x, [tf.shape(x)[0], -1])
    return tf.sqrt(tf.reduce_sum(tf.square(flat), axis=1))


def _row_scale(x: tf.Tensor, s: tf.Tensor) -> tf.Tensor:
    """``x[i] * s[i]`` for a ``[B]`` vector ``s`` and ``x`` of any rank."""
    shape = tf.concat([tf.shape(s), tf.ones([tf.rank(x) - 1], tf.int32)], axis=0)
    return x * tf.reshape(tf.cast(s, x.dtype), shape)


def _chunks(n: int, batch_size: int | None):
    step = n if not batch_size or batch_size <= 0 else int(batch_size)
    for start in range(0, n, max(step, 1)):
        yield slice(start, min(start + step, n))


# --------------------------------------------------------------------------- spectral norm
def spectral_norm_jvp(
    fn: Fn,
    x,
    num_iters: int = 20,
    seed: int = 0,
    *,
    batch_size: int | None = None,
    compile: bool = True,
) -> tf.Tensor:
    """Per-sample largest singular value of the Jacobian of ``fn``, by power iteration.

    For each row ``x_i`` it estimates ``sigma_max(J_i)``, ``J_i = d fn(x)_i / d x_i``,
    the local Lipschitz constant of ``fn`` at ``x_i`` (paper Eq. 2 in the limit
    ``x2 -> x1``; Lemma 2 / Eq. 5 relate it to the singular values of ``J``).
    Each iteration is ``v <- J^T (J v) / ||J^T (J v)||`` with ``J v`` from
    ``tf.autodiff.ForwardAccumulator`` (jvp) and ``J^T u`` from
    ``tf.GradientTape`` (vjp), both over the whole batch in one forward pass.

    Row-wise assumption: sample ``i``'s output must depend on sample ``i``'s
    input only, so that the batch Jacobian is block diagonal. Then the jvp of a
    batched tangent gives every ``J_i v_i`` and the vjp of the batch output
    with cotangent ``u`` (the gradient of ``sum_i <u_i, fn(x)_i>``) gives every
    ``J_i^T u_i``. Models must therefore run in inference mode: BatchNorm with
    ``training=False`` uses its moving statistics and keeps this true, while
    batch statistics (``training=True``) would couple the samples.

    Args:
        fn: row-wise function ``[B, ...] -> [B, ...]`` (any input/output rank,
            e.g. images ``[B, H, W, C]`` or features ``[B, d]``).
        x: ``[B, ...]`` points; integer inputs are cast to float32.
        num_iters: power iterations. The error decays like
            ``(sigma_2 / sigma_1)^(2 k)``; 20 is plenty for diagnostics, use
            more when the top two singular values are close.
        seed: seed of the random (stateless normal) start vectors.
        batch_size: rows per power-iteration batch (``None``: all at once);
            exact for a row-wise ``fn``, up to the start vectors.
        compile: run each iteration as a ``tf.function`` (traced once per call,
            for every batch size; seconds for a small CNN); ``False`` runs eagerly.

    Returns:
        float ``[B]`` estimates of ``sigma_max`` (``sqrt(||J^T J v||)`` for the
        final unit ``v``), which approach ``sigma_max`` from below; 0 where the
        Jacobian is 0.
    """
    x = _as_float(x)
    _check_x(x)
    step = _compile_step(fn, x) if compile else _power_step(fn)
    return _power_iteration(step, x, num_iters, seed, batch_size)


def _check_x(x: tf.Tensor) -> None:
    if x.shape.rank is None or x.shape.rank < 1:
        raise ValueError(f"x must have a batch axis, got shape {x.shape}.")


def _power_step(fn: Fn) -> Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    """One power-iteration step ``(x, v) -> (J^T J v / ||J^T J v||, sqrt(||J^T J v||))``, per row."""

    def step(x: tf.Tensor, v: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            tape.watch(x)
            with tf.autodiff.ForwardAccumulator(primals=x, tangents=v) as acc:
                y = fn(x)
            jv = acc.jvp(y, unconnected_gradients=tf.UnconnectedGradients.ZERO)  # J v, per row
        # vjp of the batch output = per-row J_i^T u_i (block-diagonal Jacobian)
        jtjv = tape.gradient(
            y, x, output_gradients=tf.stop_gradient(jv), unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        norm = _row_norm(jtjv)  # ||J^T J v|| <= sigma_max^2 for a unit v
        return _row_scale(jtjv, tf.math.divide_no_nan(tf.ones_like(norm), norm)), tf.sqrt(norm)

    return step


def _compile_step(fn: Fn, x: tf.Tensor):
    """``tf.function`` of the step with a batch-polymorphic signature: one trace for every chunk."""
    spec = tf.TensorSpec([None] + x.shape.as_list()[1:], x.dtype)
    return tf.function(_power_step(fn), input_signature=[spec, spec])


#: compiled steps of the model-level diagnostics, cached per model so that
#: repeated calls (several splits, chunks, profiles) trace once per target
_MODEL_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _model_step(model, target: str, x: tf.Tensor):
    key = (target, tuple(x.shape.as_list()[1:]), x.dtype.name)
    try:
        cache = _MODEL_STEPS.setdefault(model, {})
    except TypeError:  # not weak-referenceable: no caching
        return _compile_step(_model_fn(model, target), x)
    if key not in cache:
        # the cached function must not hold the model (the cache's key) strongly
        ref = weakref.ref(model)
        cache[key] = _compile_step(lambda inputs: _model_fn(ref(), target)(inputs), x)
    return cache[key]


def _model_fn(model, target: str) -> Fn:
    return _head_fn(model) if target == "head" else _network_fn(model)


def _power_iteration(step, x: tf.Tensor, num_iters: int, seed: int, batch_size: int | None) -> tf.Tensor:
    if int(num_iters) < 1:
        raise ValueError(f"num_iters must be >= 1, got {num_iters}.")
    n = int(x.shape[0]) if x.shape[0] is not None else int(tf.shape(x)[0])
    sigmas = []
    for rows in _chunks(n, batch_size):
        xb = x[rows]
        v = tf.random.stateless_normal(tf.shape(xb), seed=[int(seed), rows.start], dtype=x.dtype)
        v = _row_scale(v, 1.0 / _row_norm(v))
        for _ in range(int(num_iters)):
            v, sigma = step(xb, v)
        sigmas.append(sigma)
    if not sigmas:
        return tf.zeros([0], x.dtype)
    return sigmas[0] if len(sigmas) == 1 else tf.concat(sigmas, axis=0)


def local_lipschitz_head(
    model,
    features,
    num_iters: int = 20,
    seed: int = 0,
    batch_size: int | None = 256,
) -> np.ndarray:
    """Local Lipschitz constant of the embedding w.r.t. the backbone feature ``z``.

    The function is ``z -> l2_normalize(flow_min(z))`` (``l2_normalize(z)`` for
    a ``flow="none"`` model), the metric head of the paper whose Jacobian the
    determinant regulariser acts on (Eq. 6/7 through Eq. 9).

    Args:
        model: a :class:`~detreg_keras.model.DRegModel` (built).
        features: ``[N, d]`` backbone features, e.g. ``model.embed_features(x)``.
        num_iters: power iterations of :func:`spectral_norm_jvp`.
        seed: start-vector seed.
        batch_size: rows per power-iteration batch (``None``: all at once).

    Returns:
        float ``[N]`` spectral norms ``sigma_max(d e / d z)``.

    The compiled power step is cached per model (weakly), so repeated calls
    trace once.
    """
    return _model_spectral_norm(model, "head", features, num_iters, seed, batch_size)


def local_lipschitz_network(
    model,
    images,
    num_iters: int = 20,
    seed: int = 0,
    batch_size: int | None = 128,
) -> np.ndarray:
    """Local Lipschitz constant of the whole network, images -> embedding.

    The input is raw pixels (``[0, 255]``, the model's own preprocessing
    included), so the constants are per raw-pixel unit. BatchNorm runs in
    inference mode (``training=False``), which keeps the map row-wise.

    Args:
        model: a :class:`~detreg_keras.model.DRegModel` (or any row-wise Keras model).
        images: ``[N, H, W, C]`` images.
        num_iters: power iterations of :func:`spectral_norm_jvp`.
        seed: start-vector seed.
        batch_size: rows per power-iteration batch (``None``: all at once).

    Returns:
        float ``[N]`` spectral norms ``sigma_max(d e / d x)``; the compiled
        power step is cached per model, as in :func:`local_lipschitz_head`.
    """
    return _model_spectral_norm(model, "network", images, num_iters, seed, batch_size)


def _head_fn(model) -> Fn:
    if hasattr(model, "head_embedding"):  # DRegModel: includes its head-input normalisation
        return lambda z: model.head_embedding(z, training=False)
    flow = getattr(model, "flow_min", None)
    if flow is None:
        return l2_normalize
    return lambda z: l2_normalize(flow(z, training=False))


def _network_fn(model) -> Fn:
    return lambda x: model(x, training=False)


def _model_spectral_norm(model, target: str, x, num_iters: int, seed: int, batch_size: int | None) -> np.ndarray:
    x = tf.constant(np.asarray(x, dtype=np.float32))
    _check_x(x)
    sigma = _power_iteration(_model_step(model, target, x), x, num_iters, seed, batch_size)
    return sigma.numpy().astype(np.float64)


# --------------------------------------------------------------------------- secant ratio
def secant_ratio(fn: Fn, a, b, batch_size: int | None = 256) -> np.ndarray:
    """Finite-difference Lipschitz ratio of pairs, ``||f(a) - f(b)|| / ||a - b||`` (paper Eq. 2).

    By the mean value inequality,
    ``||f(a) - f(b)|| <= max_{c in [a, b]} sigma_max(J_f(c)) * ||a - b||``, so
    the ratio lower-bounds the largest local constant on the segment: a
    sanity check for :func:`spectral_norm_jvp`. Norms run over every non-batch
    axis.

    Args:
        fn: row-wise function.
        a: ``[P, ...]`` first points.
        b: ``[P, ...]`` second points (same shape).
        batch_size: rows per call of ``fn`` (``None``: all at once).

    Returns:
        float ``[P]`` ratios; NaN where ``a == b``.
    """
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}.")
    out = []
    for s in _chunks(len(a), batch_size):
        fa, fb = fn(tf.constant(a[s])), fn(tf.constant(b[s]))
        num = _row_norm(tf.cast(fa, tf.float64) - tf.cast(fb, tf.float64)).numpy()
        den = _row_norm(tf.constant(a[s], tf.float64) - tf.constant(b[s], tf.float64)).numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            out.append(np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan))
    return np.concatenate(out) if out else np.zeros([0])


# --------------------------------------------------------------------------- interpolation
class Segments(NamedTuple):
    """Points on segments ``x[start] + t (x[end] - x[start])``.

    Attributes:
        points: ``[P, ...]`` interpolated points.
        start: ``[P]`` int index of each segment's first end (the anchor).
        end: ``[P]`` int index of the partner.
        t: ``[P]`` float fraction of the way from ``start`` to ``end``.
    """

    points: np.ndarray
    start: np.ndarray
    end: np.ndarray
    t: np.ndarray


def nearest_different_class_neighbor(features, labels) -> tuple[tf.Tensor, tf.Tensor]:
    """Index of each sample's most cosine-similar partner of another class.

    The counterpart of :func:`detreg_keras.augment.nearest_same_class_neighbor`.

    Args:
        features: ``[B, d]`` features.
        labels: ``[B]`` integer labels.

    Returns:
        ``(index [B] int32, has_partner [B] bool)``; without another class in
        the batch the index points at the sample itself and ``has_partner`` is False.
    """
    features = tf.convert_to_tensor(features)
    labels = tf.reshape(tf.convert_to_tensor(labels), [-1])
    unit = tf.math.l2_normalize(tf.cast(features, tf.float32), axis=-1, epsilon=1e-12)
    sim = tf.matmul(unit, unit, transpose_b=True)
    candidates = tf.not_equal(labels[:, None], labels[None, :])
    masked = tf.where(candidates, sim, tf.fill(tf.shape(sim), tf.constant(-3.0, sim.dtype)))
    has_partner = tf.reduce_any(candidates, axis=1)
    index = tf.where(
        has_partner, tf.argmax(masked, axis=1, output_type=tf.int32), tf.range(tf.shape(labels)[0], dtype=tf.int32)
    )
    return index, has_partner


def nearest_partners(
    features, labels, kind: Literal["same", "different"] = "same"
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(start, end)`` of each sample with its nearest (cosine) same- or different-class partner.

    Samples without a partner of the requested kind are left out.

    Args:
        features: ``[N, d]`` features in which "nearest" is measured.
        labels: ``[N]`` integer labels.
        kind: ``"same"`` or ``"different"``.

    Returns:
        ``(start [P], end [P])`` int arrays.
    """
    if kind == "same":
        index, valid = nearest_same_class_neighbor(features, labels)
    elif kind == "different":
        index, valid = nearest_different_class_neighbor(features, labels)
    else:
        raise ValueError(f"kind must be 'same' or 'different', got {kind!r}.")
    start = np.flatnonzero(valid.numpy())
    return start, index.numpy()[start].astype(np.int64)


def interpolation_points(
    x,
    labels,
    kind: Literal["same", "different"] = "same",
    t: float | Sequence[float] = 0.5,
    pair_features=None,
) -> Segments:
    """Points between each sample and its nearest same- or different-class partner.

    ``kind="same"`` samples the blank region inside a class, where the paper
    argues DML raises the local Lipschitz constant (Sec. 2) and where the
    between-sample augmentation ``z_i + eps (z_j - z_i)`` puts the points the
    regulariser acts on; ``kind="different"`` samples the region between
    classes. Works on backbone features ``z`` ``[N, d]`` (head diagnostic) and
    on images ``[N, H, W, C]`` (pixel-space interpolation, whole-network
    diagnostic).

    Args:
        x: ``[N, ...]`` points to interpolate.
        labels: ``[N]`` integer labels.
        kind: ``"same"`` (nearest same-class partner) or ``"different"``
            (nearest different-class partner).
        t: one fraction or a list of fractions in ``[0, 1]``.
        pair_features: ``[N, d]`` features in which partners are chosen by
            cosine similarity (default: ``x`` flattened). Pass the backbone
            features to interpolate images along the same pairs as ``z``.

    Returns:
        :class:`Segments`, ordered by ``t`` then by anchor; samples without a
        partner of the requested kind are left out.

    Raises:
        ValueError: a ``t`` outside ``[0, 1]`` or mismatched lengths.
    """
    x = np.asarray(x)
    labels = np.asarray(labels).reshape(-1)
    ts = np.atleast_1d(np.asarray(t, dtype=np.float64)).reshape(-1)
    if np.any((ts < 0) | (ts > 1)):
        raise ValueError(f"interpolation fractions must lie in [0, 1], got {ts.tolist()}.")
    if len(x) != len(labels):
        raise ValueError(f"x and labels must have the same length, got {len(x)} and {len(labels)}.")
    feats = np.reshape(x, (len(x), -1)) if pair_features is None else np.asarray(pair_features)
    if len(feats) != len(x):
        raise ValueError(f"pair_features must have one row per point, got {len(feats)} for {len(x)}.")
    start, end = nearest_partners(feats.astype(np.float32), labels, kind)
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
    xa, xb = x[start].astype(dtype), x[end].astype(dtype)
    points, tt = [], []
    for value in ts:
        points.append(xa + np.asarray(value, dtype) * (xb - xa))
        tt.append(np.full(len(start), value))
    return Segments(
        points=np.concatenate(points).astype(dtype) if points else np.zeros((0,) + x.shape[1:], dtype),
        start=np.tile(start, len(ts)),
        end=np.tile(end, len(ts)),
        t=np.concatenate(tt) if tt else np.zeros([0]),
    )


# --------------------------------------------------------------------------- profile
def embed_features(model, images, batch_size: int = 256) -> np.ndarray:
    """Backbone features ``z = model.embed_features(images)`` in inference mode, batched."""
    images = np.asarray(images, dtype=np.float32)
    out = [
        model.embed_features(tf.constant(images[rows]), training=False).numpy()
        for rows in _chunks(len(images), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros([0, model.embedding_dim], np.float32)


def lipschitz_profile(
    model,
    images,
    labels,
    *,
    t: float | Sequence[float] = 0.5,
    num_iters: int = 20,
    seed: int = 0,
    targets: Sequence[str] = TARGETS,
    batch_size: int | None = 128,
) -> dict[str, np.ndarray]:
    """Distributions of the local Lipschitz constant at data points and between them.

    Partners are chosen once, by cosine similarity of the backbone features
    ``z`` (as the between-sample augmentation does), and used for both
    targets: the head interpolates ``z``, the network interpolates the images
    of the same pairs in pixel space.

    Args:
        model: a built :class:`~detreg_keras.model.DRegModel`.
        images: ``[N, H, W, C]`` raw-pixel images.
        labels: ``[N]`` integer labels.
        t: interpolation fraction(s) for the segment points.
        num_iters: power iterations of :func:`spectral_norm_jvp`.
        seed: start-vector seed.
        targets: subset of ``("head", "network")``.
        batch_size: rows per power-iteration batch.

    Returns:
        ``{f"{target}/{location}": float array}`` with locations ``data``
        ``[N]``, ``same`` and ``different`` (spectral norms at the
        interpolated points, ``[P * len(t)]``), and ``same_secant`` /
        ``different_secant`` (:func:`secant_ratio` of the pairs' end points,
        ``[P]``), where ``P`` counts the samples that have a partner.
    """
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ValueError(f"Unknown targets {unknown}; expected a subset of {TARGETS}.")
    images = np.asarray(images, dtype=np.float32)
    labels = np.asarray(labels).reshape(-1)
    if len(images) != len(labels):
        raise ValueError(f"images and labels must have the same length, got {len(images)} and {len(labels)}.")
    z = embed_features(model, images)
    segments = {kind: interpolation_points(z, labels, kind, t) for kind in ("same", "different")}
    profile: dict[str, np.ndarray] = {}
    for target in targets:
        if target == "head":
            x, fn, norms = z, _head_fn(model), local_lipschitz_head
        else:
            x, fn, norms = images, _network_fn(model), local_lipschitz_network
        # one call over data + same + different points: fewer traces, same
        # numbers (row-wise maps), then split back
        parts = [x]
        for kind in ("same", "different"):
            seg = segments[kind]
            xa, xb = x[seg.start], x[seg.end]
            parts.append(xa + _broadcast_rows(seg.t, x) * (xb - xa))
        sizes = [len(p) for p in parts]
        sigma = norms(model, np.concatenate(parts).astype(np.float32), num_iters, seed, batch_size)
        pieces = np.split(sigma, np.cumsum(sizes)[:-1])
        profile[f"{target}/data"] = pieces[0]
        profile[f"{target}/same"], profile[f"{target}/different"] = pieces[1], pieces[2]
        for kind in ("same", "different"):
            seg = segments[kind]
            first = seg.t == seg.t[0] if len(seg.t) else np.zeros([0], bool)  # each pair once
            profile[f"{target}/{kind}_secant"] = secant_ratio(fn, x[seg.start[first]], x[seg.end[first]], batch_size)
    return profile


def _broadcast_rows(t: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.asarray(t, dtype=np.float32).reshape((-1,) + (1,) * (x.ndim - 1))


# --------------------------------------------------------------------------- summary / plot
def summarize(profiles: Mapping[str, Mapping[str, np.ndarray]]) -> list[dict]:
    """Summary statistics of every distribution of every profile.

    Args:
        profiles: ``{name: profile}`` with profiles from :func:`lipschitz_profile`
            (keys ``"target/location"``; other keys are kept whole as ``location``).

    Returns:
        One row per (profile, key): ``{"profile", "target", "location", "n",
        "mean", "median", "p90", "max"}``; statistics over the finite values
        (NaN when there are none).
    """
    rows = []
    for name, profile in profiles.items():
        for key, values in profile.items():
            target, _, location = key.rpartition("/")
            v = np.asarray(values, dtype=np.float64).reshape(-1)
            v = v[np.isfinite(v)]
            stats = (
                (float(np.mean(v)), float(np.median(v)), float(np.percentile(v, 90)), float(np.max(v)))
                if len(v)
                else (float("nan"),) * 4
            )
            rows.append(
                {"profile": name, "target": target, "location": location, "n": int(len(v)),
                 **dict(zip(STATS[1:], stats))}
            )
    return rows


def plot_histograms(profiles: Mapping[str, Mapping[str, np.ndarray]], path: str | Path) -> Path:
    """Overlaid histograms of the profiles, one panel per ``target/location``.

    Rows of panels are targets, columns locations; every profile is one
    colour (densities, so profiles of different sizes compare). Bins are
    log-spaced when a panel's positive values span more than a factor 20.

    Args:
        profiles: ``{name: profile}`` from :func:`lipschitz_profile`.
        path: PNG file to write.

    Returns:
        The written path.
    """
    import matplotlib  # noqa: PLC0415  (keep the package import light)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    keys: list[str] = []
    for profile in profiles.values():
        keys.extend(k for k in profile if k not in keys)
    targets = list(dict.fromkeys(k.rpartition("/")[0] for k in keys))
    locations = list(dict.fromkeys(k.rpartition("/")[2] for k in keys))
    fig, axes = plt.subplots(
        len(targets) or 1, len(locations) or 1, figsize=(3.6 * max(len(locations), 1), 2.8 * max(len(targets), 1)),
        squeeze=False,
    )
    for r, target in enumerate(targets):
        for c, location in enumerate(locations):
            ax = axes[r][c]
            key = f"{target}/{location}" if target else location
            series = {
                name: np.asarray(p[key], dtype=np.float64)[np.isfinite(np.asarray(p[key], dtype=np.float64))]
                for name, p in profiles.items()
                if key in p
            }
            values = np.concatenate([v for v in series.values()]) if series else np.zeros([0])
            ax.set_title(key, fontsize=9)
            if not len(values):
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
                continue
            lo, hi = float(values.min()), float(values.max())
            log = lo > 0 and hi > 20.0 * lo  # log bins only for a wide range
            if log:
                bins = np.geomspace(lo, hi, 31)
                ax.set_xscale("log")
            else:
                bins = np.linspace(lo, hi if hi > lo else lo + abs(lo) * 1e-3 + 1e-12, 31)
                ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
            for name, v in series.items():
                if len(v):
                    ax.hist(
                        v, bins=bins, alpha=0.4, histtype="stepfilled", density=True,
                        label=f"{name} (med {np.median(v):.3g})",
                    )
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6, loc="upper right")
    fig.suptitle("Local Lipschitz constant sigma_max(J) (secant: ||f(a)-f(b)||/||a-b||, Eq. 2)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
