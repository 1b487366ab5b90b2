#!/usr/bin/env python
"""Exact all-vs-all Recall@k at Stanford Online Products scale, against the machine's sgemm peak.

Data: ``--n`` unit vectors of dimension ``--dim`` (default 60,502 x 512, the size
of SOP's test split) with SOP-like labels: ``n / 5.35`` classes (11,316 at full
scale) of 2 to 12 items each. An item is its class centre plus Gaussian noise of
norm ``--noise`` (as in ``bench_index.py``), normalised, so that Recall@1..1000
are all informative; ``--random`` uses plain random unit vectors instead.

Measured in one process, one after the other, on the same data:

1. ``peak``: the float32 GEMM peak of this machine: ``numpy.matmul`` of two
   ``--peak-size`` squared matrices (4096), best of ``--peak-reps`` after
   ``--warmup-s`` seconds of the same GEMM; measured again at the end
   (``peak_end``), and the higher of the two is the reference of the summary;
2. ``exact``: :func:`detreg_keras.metrics.first_positive_ranks` (what
   :func:`~detreg_keras.metrics.recall_at_k_exact` runs: normalisation, one
   blocked GEMM, one counting pass), then Recall@k for all ``--ks`` from the
   ranks, best of ``--reps``;
3. ``gemm_only`` (``--gemm-only``): just the block GEMMs of ``exact`` into the
   same buffer, to split its time into GEMM and the rest;
4. ``faiss`` (``--faiss``): the existing path, :func:`~detreg_keras.metrics.knn_search`
   (faiss ``IndexFlatIP``, k = max(ks) + 1, chunks of 4096 queries) and
   :func:`~detreg_keras.metrics.calculate_recall_at_k`; its Recall@k is compared
   with the exact one, query by query. A query whose hit/miss differs must be a
   near-tie (its best positive within ``--tie-tol`` of another class's
   similarity, in float64: faiss computes the similarities with its own BLAS
   and orders exact ties its own way); exit status 1 otherwise.

For each: seconds, GFLOP/s = 2 * N^2 * d / seconds, % of the measured peak,
% of ``--nominal-gflops`` when given (cores x clock x float32 FLOP/cycle of
the FMA units: it depends on the CPU, so there is no default), CPU time /
wall time, and the peak resident memory of the phase (``VmHWM``, reset before
each phase) above the memory held when it started. A markdown summary ends the
output; ``--json`` writes everything.

    python bench/bench_eval.py --n 5000                     # smoke run: ~15 s plus imports
    python bench/bench_eval.py --faiss --json eval.json     # full scale, with faiss k=1000
    python bench/bench_eval.py --gemm-only --json eval.json # full scale, exact path split into GEMM / rest
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

SOP_ITEMS_PER_CLASS = 60_502 / 11_316


def sop_like_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    """``round(n / 5.35)`` classes of 2..12 items (sizes ~ 2 + multinomial), shuffled."""
    classes = max(1, min(n // 2, round(n / SOP_ITEMS_PER_CLASS)))
    extra = rng.multinomial(n - 2 * classes, np.full(classes, 1.0 / classes))
    while (over := np.maximum(extra - 10, 0)).any():  # cap at 12 items, move the overflow
        extra -= over
        room = np.flatnonzero(extra < 10)
        np.add.at(extra, rng.choice(room, int(over.sum())), 1)
    return rng.permutation(np.repeat(np.arange(classes), 2 + extra))


def embeddings(labels: np.ndarray, dim: int, noise: float, random: bool, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors, built in chunks (float32 throughout, low peak memory)."""
    n = len(labels)
    centers = rng.standard_normal((int(labels.max()) + 1, dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 8192):
        e = min(s + 8192, n)
        chunk = rng.standard_normal((e - s, dim), dtype=np.float32)
        if not random:
            chunk *= np.float32(noise / np.sqrt(dim))
            chunk += centers[labels[s:e]]
        chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
        x[s:e] = chunk
    return x


def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:  # pragma: no cover - not Linux
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:  # pragma: no cover
        return False


def phase(name: str, fn, reps: int, flop: float, peak_gflops: float | None,
          nominal: float | None) -> tuple[dict, object]:
    """Runs ``fn`` ``reps`` times; best wall time, CPU use, and the phase's peak RSS."""
    rss_before = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    best, cpu_ratio, out = float("inf"), 0.0, None
    for _ in range(reps):
        t0, c0 = time.perf_counter(), os.times()
        out = fn()
        wall, c1 = time.perf_counter() - t0, os.times()
        if wall < best:
            best, cpu_ratio = wall, (c1.user + c1.system - c0.user - c0.system) / wall
    hwm = _status_kib("VmHWM")
    gflops = flop / best / 1e9
    row = {
        "phase": name,
        "seconds": best,
        "gflops": gflops,
        "pct_measured_peak": None if peak_gflops is None else 100 * gflops / peak_gflops,
        "pct_nominal_peak": None if nominal is None else 100 * gflops / nominal,
        "cpu_per_wall": cpu_ratio,
        "rss_before_mib": None if rss_before is None else rss_before / 1024,
        "peak_rss_mib": None if hwm is None or not reset else hwm / 1024,
        "peak_rss_above_before_mib": None if hwm is None or not reset or rss_before is None
        else (hwm - rss_before) / 1024,
    }
    return row, out


def gemm_peak(name: str, size: int, reps: int, nominal: float | None, warmup_s: float) -> dict:
    """float32 ``numpy.matmul`` of two ``size`` x ``size`` matrices, best of ``reps``.

    Runs it for ``warmup_s`` seconds first (BLAS threads, pages, and CPUs that
    only reach their steady clock after a while).
    """
    a = np.random.default_rng(1).standard_normal((size, size), dtype=np.float32)
    b = np.random.default_rng(2).standard_normal((size, size), dtype=np.float32)
    c = np.empty_like(a)
    t0 = time.perf_counter()
    while True:
        np.matmul(a, b, out=c)
        if time.perf_counter() - t0 >= warmup_s:
            break
    row, _ = phase(name, lambda: np.matmul(a, b, out=c), reps, 2.0 * size**3, None, nominal)
    return row


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=60_502, help="number of embeddings (SOP test split: 60,502)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 10, 100, 1000])
    p.add_argument("--noise", type=float, default=2.2, help="noise norm relative to the (unit) class centre")
    p.add_argument("--random", action="store_true", help="plain random unit vectors (no class structure)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps", type=int, default=1, help="repetitions of the exact evaluation (best is kept)")
    p.add_argument("--max-block-mib", type=float, default=256.0, help="bound on the similarity block (MiB)")
    p.add_argument("--block-size", type=int, default=None, help="query rows per block (default: from the bound)")
    p.add_argument("--threads", type=int, default=None, help="counting threads (default: half the usable CPUs)")
    p.add_argument("--peak-size", type=int, default=4096)
    p.add_argument("--peak-reps", type=int, default=5)
    p.add_argument("--warmup-s", type=float, default=2.0, help="GEMM warm-up before the first peak measurement")
    p.add_argument("--nominal-gflops", type=float, default=None,
                   help="nominal fp32 peak of this CPU (optional; the measured GEMM peak is always the reference)")
    p.add_argument("--gemm-only", action="store_true", help="also time the exact path's block GEMMs alone")
    p.add_argument("--faiss", action="store_true", help="also run the faiss kNN path (k = max(ks)) and compare")
    p.add_argument("--tie-tol", type=float, default=1e-5,
                   help="float64 similarity gap below which an exact-vs-faiss difference counts as a near-tie")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from detreg_keras import metrics as M
    from detreg_keras.cpu import cpu_info, describe

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    rng = np.random.default_rng(args.seed)
    y = sop_like_labels(args.n, rng)
    x = embeddings(y, args.dim, args.noise, args.random, rng)
    ks = tuple(args.ks)
    n, d = x.shape
    flop = 2.0 * n * n * d
    max_block_bytes = int(args.max_block_mib * 2**20)
    rows = M.exact._resolve_block_rows(n, n, args.block_size, max_block_bytes)
    sizes = np.bincount(y)
    print(f"data: {n} x {d}, {len(sizes)} classes of {sizes.min()}-{sizes.max()} (mean {sizes.mean():.2f}), "
          f"ks={ks}, 2*N^2*d = {flop:.3e} FLOP", flush=True)
    print(f"cpu: {describe()}, load avg {load_start}", flush=True)
    print(f"exact path: {rows} query rows per block = {rows * n * 4 / 2**20:.1f} MiB "
          f"(bound {args.max_block_mib:g} MiB), {-(-n // rows)} blocks", flush=True)

    results = []

    def report(row):
        results.append(row)
        pct = "" if row["pct_measured_peak"] is None else f"{row['pct_measured_peak']:5.1f}% of measured peak, "
        nominal = ("" if row["pct_nominal_peak"] is None
                   else f"{row['pct_nominal_peak']:5.1f}% of {args.nominal_gflops:g} nominal | ")
        print(f"{row['phase']:10s} {row['seconds']:8.3f} s | {row['gflops']:6.1f} GFLOP/s | {pct}{nominal}"
              f"cpu/wall {row['cpu_per_wall']:.2f} | peak RSS +{row['peak_rss_above_before_mib'] or 0:.0f} MiB",
              flush=True)

    # 1. GEMM peak (measured again at the end; the summary uses the higher one).
    peak_row = gemm_peak("peak", args.peak_size, args.peak_reps, args.nominal_gflops, args.warmup_s)
    peak = peak_row["gflops"]
    report(peak_row)

    # 2. Exact Recall@k.
    def exact():
        ranks = M.first_positive_ranks(x, y, block_size=args.block_size, max_block_bytes=max_block_bytes,
                                       num_threads=args.threads)
        return ranks, {f"recall@{k}": float(np.mean(ranks < k)) for k in ks}

    row, (ranks, recall) = phase("exact", exact, args.reps, flop, peak, args.nominal_gflops)
    row["recall"] = recall
    row["block_rows"] = rows
    row["block_mib"] = rows * n * 4 / 2**20
    report(row)
    print(f"           {json.dumps(recall)}", flush=True)

    # 3. The exact path's GEMMs alone.
    if args.gemm_only:
        xn = M.l2_normalize(x)
        buf = np.empty((rows, n), dtype=np.float32)

        def gemms():
            for s in range(0, n, rows):
                e = min(s + rows, n)
                np.matmul(xn[s:e], xn.T, out=buf[: e - s])

        row, _ = phase("gemm_only", gemms, args.reps, flop, peak, args.nominal_gflops)
        report(row)
        del buf, xn

    # 4. faiss kNN path, k = max(ks).
    if args.faiss:
        import faiss

        depth = max(ks)

        def knn():
            idx, _ = M.knn_search(M.l2_normalize(x), k=depth)
            knn_labels = y[idx]
            match = knn_labels == y[:, None]
            first_hit = np.where(match.any(axis=1), match.argmax(axis=1), np.iinfo(np.int64).max)
            return first_hit, M.calculate_recall_at_k(knn_labels, y, ks)

        row, (first_hit, knn_recall) = phase("faiss", knn, 1, flop, peak, args.nominal_gflops)
        row["recall"] = knn_recall
        row["faiss"] = f"{faiss.__version__}, {faiss.omp_get_max_threads()} threads"
        report(row)
        print(f"           {json.dumps(knn_recall)}", flush=True)
        kk = np.asarray(ks)
        differ = np.flatnonzero(((first_hit[:, None] < kk) != (ranks[:, None] < kk)).any(axis=1))
        identical = knn_recall == recall and differ.size == 0
        print(f"exact vs faiss: Recall@k identical: {knn_recall == recall}; queries whose hit/miss differs "
              f"at some k: {differ.size}", flush=True)
        # A difference is legitimate only at a (near-)tie: faiss computes the
        # similarities with its own BLAS, and breaks exact ties its own way.
        xn64 = M.l2_normalize(x).astype(np.float64)
        unexplained = 0
        for i in differ:
            s64 = xn64 @ xn64[i]
            others = np.arange(n) != i
            pos = others & (y == y[i])
            gap = float(np.min(np.abs(s64[others & ~pos] - s64[pos].max())))
            unexplained += gap > args.tie_tol
            if i in differ[:10]:
                print(f"  query {i}: exact rank {ranks[i]}, faiss first hit {first_hit[i]}, float64 gap between "
                      f"its best positive and the closest other-class similarity {gap:.2e}", flush=True)
        if differ.size:
            print(f"  {differ.size - unexplained} of {differ.size} differing queries are near-ties "
                  f"(gap <= --tie-tol {args.tie_tol:g})", flush=True)
        row["queries_differing"] = int(differ.size)
        row["queries_differing_unexplained"] = int(unexplained)
        row["identical"] = bool(identical)
        del xn64
        exact_s = next(r["seconds"] for r in results if r["phase"] == "exact")
        print(f"speed-up exact vs faiss: {row['seconds'] / exact_s:.2f}x", flush=True)

    end_row = gemm_peak("peak_end", args.peak_size, args.peak_reps, args.nominal_gflops, 0.0)
    report(end_row)
    peak = max(peak, end_row["gflops"])
    for row in results:
        row["pct_measured_peak"] = 100 * row["gflops"] / peak
    if args.nominal_gflops is not None and peak > args.nominal_gflops:
        print(f"note: the measured peak exceeds --nominal-gflops {args.nominal_gflops:g}; "
              "that figure is too low for this CPU", flush=True)
    nominal_col = "" if args.nominal_gflops is None else f" % of nominal ({args.nominal_gflops:g}) |"
    print(f"\n| phase | seconds | GFLOP/s | % of measured peak ({peak:.1f}) |{nominal_col}"
          " CPU/wall | peak RSS above start of phase (MiB) |")
    print("|---|---:|---:|---:|" + ("" if args.nominal_gflops is None else "---:|") + "---:|---:|")
    for row in results:
        nominal = "" if row["pct_nominal_peak"] is None else f" {row['pct_nominal_peak']:.1f} |"
        print(f"| {row['phase']} | {row['seconds']:.2f} | {row['gflops']:.1f} | {row['pct_measured_peak']:.1f} |"
              f"{nominal} {row['cpu_per_wall']:.2f} | "
              f"{row['peak_rss_above_before_mib'] or 0:.0f} |")

    env = {
        "peak_gflops": peak,
        "python": platform.python_version(), "numpy": np.__version__, "cpu": cpu_info(),
        "cpu_count": os.cpu_count(), "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
        "total_s": time.perf_counter() - t_start,
    }
    try:
        from threadpoolctl import threadpool_info

        env["blas"] = [{k: i.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
                       for i in threadpool_info()]
    except ImportError:  # pragma: no cover
        pass
    print(f"\nenv: {json.dumps(env)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": results, "env": env}, indent=2))
    unexplained = next((r["queries_differing_unexplained"] for r in results if r["phase"] == "faiss"), 0)
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
