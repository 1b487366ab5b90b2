"""Roth et al. 2020 batch samplers: SPC-R, greedy coreset, DDM, FRD (and their pipeline plumbing).

References are independent of the code under test: loops / ``itertools``
brute force, ``scipy.spatial.distance`` for distances, ``scipy.stats.wasserstein_distance``
for the histogram distance and ``scipy.linalg.sqrtm`` for the Frechet distance.
"""

from __future__ import annotations

import itertools
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import linalg
from scipy.spatial.distance import cdist, pdist
from scipy.stats import wasserstein_distance

from detreg_keras.data.embedded_sampling import (
    DDMSampler,
    EmbeddingStore,
    FRDSampler,
    GreedyCoresetSampler,
    PoolEmbeddingRefresh,
    ddm_costs,
    ddm_select,
    distance_histogram,
    frd_costs,
    frd_select,
    gaussian_stats,
    greedy_coreset,
    histogram_wasserstein,
)
from detreg_keras.data.sampling import SPCRSampler, index_dataset, spc_r_batch

# ----------------------------------------------------------------------------- references


def _coreset_loop(x: np.ndarray, k: int, first: int) -> list[int]:
    """k-center greedy with explicit loops over candidates and chosen points."""
    chosen = [first]
    while len(chosen) < k:
        best, best_d = None, -1.0
        for i in range(len(x)):
            if i in chosen:
                continue
            d = min(float(np.linalg.norm(x[i] - x[j])) for j in chosen)
            if d > best_d:
                best, best_d = i, d
        chosen.append(best)
    return chosen


def _coreset_cdist(x: np.ndarray, k: int, first: int) -> list[int]:
    """k-center greedy over the full scipy distance matrix (for sizes the loop cannot do)."""
    full = cdist(x, x)
    chosen = [first]
    while len(chosen) < k:
        nearest = full[:, chosen].min(axis=1)
        nearest[chosen] = -1.0
        chosen.append(int(np.argmax(nearest)))
    return chosen


def _ddm_reference(candidates, reference, bins=50):
    """Histograms of scipy's pdist; W1 by scipy.stats on the bin centres."""
    ref_d = pdist(reference)
    edges = np.linspace(ref_d.min(), ref_d.max(), bins + 1)
    centres = 0.5 * (edges[1:] + edges[:-1])
    ref_h = np.histogram(ref_d, bins=edges)[0]
    costs = []
    for c in candidates:
        h = np.histogram(np.clip(pdist(c), edges[0], edges[-1]), bins=edges)[0]
        costs.append(wasserstein_distance(centres, centres, h, ref_h))
    return np.array(costs)


def _frd_reference(candidates, reference):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), with scipy.linalg.sqrtm."""
    mu1, s1 = reference.mean(0), np.cov(reference.T)
    out = []
    for c in candidates:
        mu2, s2 = c.mean(0), np.cov(c.T)
        root = linalg.sqrtm(s1 @ s2)
        out.append(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root.real))
    return np.array(out)


def _clustered(rng, n, d, classes):
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, d)) * 3
    return centres[labels] + rng.normal(size=(n, d)), labels


# ----------------------------------------------------------------------------- SPC-R


@pytest.mark.parametrize("n,classes,b", [(40, 10, 8), (40, 39, 39), (12, 11, 12), (500, 100, 64)])
def test_spc_r_batch_properties(n, classes, b):
    """Distinct indices, the right size, a same-class pair, over many seeds (incl. corner cases)."""
    labels = np.concatenate([np.arange(classes), np.random.default_rng(0).integers(0, classes, n - classes)])
    for seed in range(200):
        batch = spc_r_batch(labels, b, np.random.default_rng(seed))
        assert batch.shape == (b,) and batch.dtype == np.int64
        assert len(set(batch.tolist())) == b
        pairs = [(i, j) for i, j in itertools.combinations(batch, 2) if labels[i] == labels[j]]
        assert pairs, f"seed {seed}: no same-class pair in {labels[batch]}"


def test_spc_r_last_example_partners_a_random_one():
    """In the ordinary case the last example shares its label with an earlier one."""
    labels = np.repeat(np.arange(50), 6)
    for seed in range(50):
        batch = spc_r_batch(labels, 16, np.random.default_rng(seed))
        assert labels[batch[-1]] in labels[batch[:-1]]


def test_spc_r_errors():
    with pytest.raises(ValueError, match="single example"):
        spc_r_batch(np.arange(10), 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="batch_size"):
        spc_r_batch(np.repeat(np.arange(3), 2), 7, np.random.default_rng(0))
    with pytest.raises(ValueError, match="batch_size"):
        SPCRSampler(np.repeat(np.arange(3), 2), 1)


def test_spc_r_sampler_epoch_plan_and_dataset():
    labels = np.repeat(np.arange(20), 5)
    sampler = SPCRSampler(labels, 16, seed=3)
    plan = sampler.epoch_indices(0)
    assert plan.shape == (100 // 16, 16)
    np.testing.assert_array_equal(plan, sampler.epoch_indices(0))  # a function of (seed, epoch)
    assert not np.array_equal(plan, sampler.epoch_indices(1))
    rows = np.stack([r.numpy() for r, _ in index_dataset(sampler)])
    np.testing.assert_array_equal(rows, plan)


# ----------------------------------------------------------------------------- greedy coreset


@pytest.mark.parametrize("seed", range(5))
def test_greedy_coreset_matches_loop_reference(seed):
    x = np.random.default_rng(seed).normal(size=(60, 5))
    np.testing.assert_array_equal(greedy_coreset(x, 12, first=seed), _coreset_loop(x, 12, seed))


def test_greedy_coreset_matches_reference_at_realistic_size():
    """Pool 2,000 x 128, 64 points."""
    x = np.random.default_rng(7).normal(size=(2000, 128)).astype(np.float32)
    np.testing.assert_array_equal(greedy_coreset(x, 64, first=5), _coreset_cdist(x.astype(np.float64), 64, 5))


def test_greedy_coreset_is_within_twice_the_optimal_radius():
    """k-center greedy's guarantee, against every 3-subset of 14 points."""
    rng = np.random.default_rng(1)
    for _ in range(5):
        x = rng.normal(size=(14, 2))
        full = cdist(x, x)
        optimal = min(full[:, list(s)].min(1).max() for s in itertools.combinations(range(14), 3))
        chosen = greedy_coreset(x, 3, rng=rng)
        assert full[:, chosen].min(1).max() <= 2 * optimal + 1e-12


def test_greedy_coreset_duplicates_and_errors():
    x = np.zeros((5, 3))
    assert sorted(greedy_coreset(x, 5, first=2).tolist()) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="k="):
        greedy_coreset(x, 6)
    with pytest.raises(ValueError, match="first="):
        greedy_coreset(x, 2, first=5)
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite.*row 3"):
        greedy_coreset(x, 2)


# ----------------------------------------------------------------------------- DDM


def test_histogram_wasserstein_matches_scipy():
    rng = np.random.default_rng(0)
    edges = np.linspace(0.3, 2.0, 51)
    centres = 0.5 * (edges[1:] + edges[:-1])
    for _ in range(20):
        p, q = rng.random(50), rng.random(50)
        assert histogram_wasserstein(p, q, edges) == pytest.approx(
            wasserstein_distance(centres, centres, p, q), rel=1e-10, abs=1e-14
        )


def test_distance_histogram_counts_scipy_pdist():
    x = np.random.default_rng(0).normal(size=(30, 4))
    weights, edges = distance_histogram(x, bins=7)
    d = pdist(x)
    np.testing.assert_allclose(edges[[0, -1]], [d.min(), d.max()])
    np.testing.assert_allclose(weights, np.histogram(d, bins=7)[0] / d.size)


@pytest.mark.parametrize("n,d,b,m", [(40, 3, 8, 6), (2000, 128, 32, 30)])
def test_ddm_matches_reference(n, d, b, m):
    rng = np.random.default_rng(n)
    pool, _ = _clustered(rng, n, d, 10)
    candidates = [pool[rng.choice(n, b, replace=False)] for _ in range(m)]
    expected = _ddm_reference(candidates, pool)
    costs = ddm_costs(candidates, distance_histogram(pool))
    np.testing.assert_allclose(costs, expected, rtol=1e-8, atol=1e-12)
    assert ddm_select(candidates, pool) == int(np.argmin(expected))


def test_ddm_prefers_a_batch_spread_like_the_pool():
    """A batch covering all clusters beats a batch from one cluster."""
    rng = np.random.default_rng(2)
    pool, labels = _clustered(rng, 400, 8, 8)
    spread = pool[[rng.choice(np.flatnonzero(labels == c)) for c in range(8) for _ in range(2)]]
    one_cluster = pool[rng.choice(np.flatnonzero(labels == 0), 16, replace=False)]
    assert ddm_select([one_cluster, spread], pool) == 1
    assert frd_select([one_cluster, spread], pool) == 1


# ----------------------------------------------------------------------------- FRD


@pytest.mark.parametrize("n,d,b,m", [(300, 6, 40, 5), (2000, 128, 32, 4)])
def test_frd_matches_scipy_sqrtm(n, d, b, m):
    """Also with b <= d, where the batch covariance is singular."""
    rng = np.random.default_rng(d)
    pool, _ = _clustered(rng, n, d, 10)
    candidates = [pool[rng.choice(n, b, replace=False)] for _ in range(m)]
    expected = _frd_reference(candidates, pool)
    np.testing.assert_allclose(frd_costs(candidates, gaussian_stats(pool)), expected, rtol=1e-5)
    assert frd_select(candidates, pool) == int(np.argmin(expected))


def test_frd_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(50, 5))
    assert frd_costs([x], gaussian_stats(x))[0] == pytest.approx(0.0, abs=1e-9)


def test_matching_bad_input():
    pool = np.random.default_rng(0).normal(size=(20, 3))
    with pytest.raises(ValueError, match="no candidate"):
        ddm_select([], pool)
    with pytest.raises(ValueError, match=">= 2 rows"):
        frd_select([pool[:1]], pool)
    with pytest.raises(ValueError, match="one batch size"):
        frd_select([pool[:4], pool[:5]], pool)
    bad = pool.copy()
    bad[4, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite.*row 4"):
        ddm_select([bad[:5]], pool)
    with pytest.raises(ValueError, match="reference embeddings hold non-finite"):
        frd_select([pool[:5]], bad)


# ----------------------------------------------------------------------------- store and samplers


def test_store_rejects_bad_pools_and_keeps_the_last_good_one():
    store = EmbeddingStore(4)
    with pytest.raises(RuntimeError, match="EmbeddingStore is empty"):
        store.snapshot()
    good = np.ones((4, 2))
    assert store.update(good) == 1
    with pytest.raises(ValueError, match=r"\[4, d\]"):
        store.update(np.ones((3, 2)))
    bad = good.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="pool embeddings hold non-finite.*1 of 4 rows, first at row 2"):
        store.update(bad)
    version, snap = store.snapshot()
    assert version == 1 and np.isfinite(snap).all() and not snap.flags.writeable


def test_store_readers_see_whole_snapshots_during_updates():
    store = EmbeddingStore(500)
    store.update(np.zeros((500, 8)))
    seen, stop = [], threading.Event()

    def read():
        while not stop.is_set():
            version, x = store.snapshot()
            seen.append(bool((x == x[0, 0]).all()) and x[0, 0] == version - 1)

    reader = threading.Thread(target=read)
    reader.start()
    for v in range(1, 40):
        store.update(np.full((500, 8), float(v)))
    stop.set()
    reader.join()
    assert seen and all(seen)


def _sampler(kind, labels, store, **kw):
    return {"gc": GreedyCoresetSampler, "ddm": DDMSampler, "frd": FRDSampler}[kind](
        labels, 16, store, seed=1, **kw
    )


@pytest.mark.parametrize("kind", ["gc", "ddm", "frd"])
@pytest.mark.parametrize("m", [1, 4])
def test_embedded_sampler_batches(kind, m):
    rng = np.random.default_rng(0)
    pool, labels = _clustered(rng, 600, 16, 30)
    store = EmbeddingStore(600)
    store.update(pool)
    sampler = _sampler(kind, labels, store, samples_per_class=m)
    assert len(sampler) == 600 // 16
    batch = sampler.batch_indices(0, 3)
    np.testing.assert_array_equal(batch, sampler.batch_indices(0, 3))  # same snapshot, same batch
    assert batch.shape == (16,) and batch.dtype == np.int64
    if m == 1:
        assert len(set(batch.tolist())) == 16
    groups = labels[batch].reshape(16 // m, m)
    assert (groups == groups[:, :1]).all(), "m consecutive examples share a class"
    if kind != "gc" and m > 1:
        assert len(set(groups[:, 0].tolist())) == 16 // m, "distinct classes per candidate"
    store.update(pool[::-1].copy())
    assert not np.array_equal(batch, sampler.batch_indices(0, 3)), "a refresh changes the batches"
    assert sampler.batches_selected == 3 and sampler.selection_seconds > 0


def test_greedy_coreset_sampler_picks_the_coreset_of_its_pool():
    rng = np.random.default_rng(3)
    pool, labels = _clustered(rng, 300, 4, 10)
    store = EmbeddingStore(300)
    store.update(pool)
    sampler = GreedyCoresetSampler(labels, 8, store, pool_size=300, seed=0)
    batch = sampler.batch_indices(2, 5)
    assert batch.tolist() == _coreset_cdist(store.snapshot()[1].astype(np.float64), 8, int(batch[0]))


def test_ddm_sampler_picks_the_best_candidate():
    """Rebuild the sampler's candidates from its seed and check argmin against the reference."""
    rng = np.random.default_rng(4)
    pool, labels = _clustered(rng, 200, 6, 10)
    store = EmbeddingStore(200)
    store.update(pool)
    sampler = DDMSampler(labels, 10, store, num_candidates=7, seed=9)
    draw = np.random.default_rng([9, 0, 0])
    candidates = [draw.choice(200, 10, replace=False) for _ in range(7)]
    snap = store.snapshot()[1].astype(np.float64)
    best = int(np.argmin(_ddm_reference([snap[c] for c in candidates], snap)))
    np.testing.assert_array_equal(sampler.batch_indices(0, 0), candidates[best])


def test_embedded_sampler_errors():
    labels = np.repeat(np.arange(5), 10)
    store = EmbeddingStore(50)
    with pytest.raises(ValueError, match="only 5 classes"):
        DDMSampler(labels, 24, store, samples_per_class=4)
    with pytest.raises(ValueError, match="larger than the 50 examples"):
        FRDSampler(labels, 64, store)
    with pytest.raises(ValueError, match="multiple of samples_per_class"):
        GreedyCoresetSampler(labels, 10, store, samples_per_class=4)
    with pytest.raises(ValueError, match="pool_size=4"):
        GreedyCoresetSampler(labels, 8, store, pool_size=4)
    with pytest.raises(ValueError, match="store holds 50 rows but there are 40"):
        DDMSampler(labels[:40], 8, store)
    with pytest.raises(RuntimeError, match="EmbeddingStore is empty"):
        GreedyCoresetSampler(labels, 8, store).batch_indices(0, 0)


def test_embedded_sampler_feeds_index_dataset_one_batch_at_a_time():
    """Per-batch plans: epoch length, and a store update reaches the batches planned after it.

    tf.data may plan a few batches ahead (its injected prefetch), so each batch
    after the update is from the old or the new snapshot, and the later ones from the new.
    """
    rng = np.random.default_rng(5)
    pool, labels = _clustered(rng, 320, 4, 12)
    store, old_store = EmbeddingStore(320), EmbeddingStore(320)
    store.update(pool)
    old_store.update(pool)
    sampler = FRDSampler(labels, 16, store, num_candidates=5, seed=2)
    old = FRDSampler(labels, 16, old_store, num_candidates=5, seed=2)
    ds = index_dataset(sampler)
    assert int(ds.cardinality()) == len(sampler) == 20
    np.testing.assert_array_equal(np.stack([r.numpy() for r, _ in ds]), old.epoch_indices(0))
    it = iter(index_dataset(sampler, repeat=True, with_seeds=False))
    np.testing.assert_array_equal(next(it).numpy(), old.batch_indices(0, 0))
    store.update(pool[::-1].copy())
    from_new = []
    for step in range(1, 20):
        batch = next(it).numpy()
        is_new = np.array_equal(batch, sampler.batch_indices(0, step))
        assert is_new or np.array_equal(batch, old.batch_indices(0, step))
        from_new.append(is_new)
    assert from_new[-1] and from_new == sorted(from_new), "old batches first, then only new ones"


# ----------------------------------------------------------------------------- refresh callback


def _tiny_model():
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


@pytest.mark.parametrize("background", [False, True])
def test_refresh_callback_embeds_the_pool_with_the_model(background):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 6)).astype("float32"), rng.normal(size=(64, 4)).astype("float32")
    store = EmbeddingStore(64)
    refresh = PoolEmbeddingRefresh(store, x, every_n_steps=3, batch_size=20, background=background)
    model = _tiny_model()
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[refresh])
    # train begin + steps 3, 6, 9, 12, 15 + 2 epoch ends, less any skipped while busy
    assert store.version == len(refresh.durations) == 8 - refresh.skipped
    assert len(history.history["pool_refresh_s"]) == 2
    if not background:
        np.testing.assert_allclose(store.snapshot()[1], model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_refresh_callback_takes_a_dataset_pool():
    """A tf.data pool of (x, y) batches gives the same embeddings as the array pool."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 6)).astype("float32")
    model = _tiny_model()
    store = EmbeddingStore(50)
    pool = tf.data.Dataset.from_tensor_slices((x, np.zeros(50))).batch(16)
    refresh = PoolEmbeddingRefresh(store, pool)
    refresh.set_model(model)
    refresh.refresh()
    np.testing.assert_allclose(store.snapshot()[1], model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    short = PoolEmbeddingRefresh(store, pool.take(2))
    short.set_model(model)
    with pytest.raises(ValueError, match=r"must be \[50, d\].*got shape \(32, 4\)"):
        short.refresh()


def test_refresh_callback_errors():
    store = EmbeddingStore(10)
    with pytest.raises(ValueError, match="pool has 9 inputs"):
        PoolEmbeddingRefresh(store, np.zeros((9, 2)))
    with pytest.raises(ValueError, match="every_n_steps"):
        PoolEmbeddingRefresh(store, np.zeros((10, 2)), every_n_steps=0)
    refresh = PoolEmbeddingRefresh(store, np.zeros((10, 2)), embed_fn=lambda b: np.full((len(b), 3), np.nan))
    with pytest.raises(ValueError, match="non-finite"):
        refresh.refresh()
