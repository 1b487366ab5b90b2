#!/usr/bin/env python
"""faiss index build / query throughput, exact vs approximate, and recall@k of approximate vs exact.

Data: ``--n`` random-but-clustered unit vectors of dimension ``--dim``
(``--clusters`` Gaussian clusters around unit centres, noise of norm ``--noise``:
class-structured embeddings whose top-10 neighbours are mostly, but not
always, in the query's cluster), and ``--queries`` held-out queries drawn from
the same clusters.

Indexes (:class:`detreg_keras.retrieval.EmbeddingIndex`): ``flat`` (exact inner
product), ``ivf`` (IVF-Flat, several ``nprobe``) and ``hnsw`` (several ``ef_search``).
Recall@k is the fraction of the exact top-k found by the approximate search.

    python bench/bench_index.py                       # 100k x 512, 1000 queries, k=10
    python bench/bench_index.py --n 20000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np


def clustered(n: int, dim: int, clusters: int, seed: int, noise: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(12345).normal(size=(clusters, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = centers[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, dim)).astype(np.float32) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=2000)
    p.add_argument("--noise", type=float, default=1.5, help="noise norm relative to the (unit) cluster centre")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default: EmbeddingIndex's ~4*sqrt(n))")
    p.add_argument("--nprobes", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=None, help="HNSW build breadth (default: EmbeddingIndex's)")
    p.add_argument("--ef-searches", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--kinds", nargs="+", default=["flat", "ivf", "hnsw"], choices=["flat", "ivf", "hnsw"],
                   help="approximate indexes to run (flat, the reference, always runs)")
    p.add_argument("--threads", type=int, default=None, help="faiss OpenMP threads (default: all cores)")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import faiss

    from detreg_keras.cpu import cpu_info
    from detreg_keras.retrieval import EmbeddingIndex, recall_against_exact

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    t_start = time.perf_counter()
    x = clustered(args.n, args.dim, args.clusters, seed=0, noise=args.noise)
    q = clustered(args.queries, args.dim, args.clusters, seed=1, noise=args.noise)
    print(f"data: {args.n} x {args.dim} ({args.clusters} clusters), {args.queries} queries, k={args.k}, "
          f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads", flush=True)

    rows = []

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t

    flat, build_s = timed(lambda: EmbeddingIndex().build(x, kind="flat"))
    (exact_ids, _, exact_scores), search_s = timed(lambda: flat.search(q, args.k))
    rows.append({"kind": "flat", "params": {}, "build_s": build_s, "search_s": search_s, "recall": 1.0})
    mean_top1 = float(np.mean(exact_scores[:, 0]))
    mean_topk = float(np.mean(exact_scores[:, -1]))
    print(f"flat  build {build_s:6.2f} s | {args.queries / search_s:8.0f} q/s | recall 1.000 "
          f"(mean top-1 cos {mean_top1:.3f}, top-{args.k} {mean_topk:.3f})", flush=True)

    ivf_params = {} if args.nlist is None else {"nlist": args.nlist}
    if "ivf" in args.kinds:
        ivf, build_s = timed(lambda: EmbeddingIndex().build(x, kind="ivf", **ivf_params))
    for nprobe in args.nprobes if "ivf" in args.kinds else []:
        (ids, _, _), search_s = timed(lambda nprobe=nprobe: ivf.search(q, args.k, nprobe=nprobe))
        recall = recall_against_exact(ids, exact_ids)
        rows.append({"kind": "ivf", "params": {"nlist": ivf.params["nlist"], "nprobe": nprobe},
                     "build_s": build_s, "search_s": search_s, "recall": recall})
        print(f"ivf   build {build_s:6.2f} s | {args.queries / search_s:8.0f} q/s | recall {recall:.3f} "
              f"(nlist {ivf.params['nlist']}, nprobe {nprobe})", flush=True)

    if "hnsw" in args.kinds:
        hnsw, build_s = timed(lambda: EmbeddingIndex().build(
            x, kind="hnsw", M=args.hnsw_m, ef_construction=args.ef_construction))
    for ef in args.ef_searches if "hnsw" in args.kinds else []:
        (ids, _, _), search_s = timed(lambda ef=ef: hnsw.search(q, args.k, ef_search=ef))
        recall = recall_against_exact(ids, exact_ids)
        rows.append({"kind": "hnsw", "params": {"M": args.hnsw_m, "ef_search": ef,
                                                  "ef_construction": hnsw.params["ef_construction"]},
                     "build_s": build_s, "search_s": search_s, "recall": recall})
        print(f"hnsw  build {build_s:6.2f} s | {args.queries / search_s:8.0f} q/s | recall {recall:.3f} "
              f"(M {args.hnsw_m}, ef_search {ef})", flush=True)

    print(f"\n| index | params | build (s) | build (vectors/s) | queries/s | recall@{args.k} vs exact |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
        print(f"| {r['kind']} | {params} | {r['build_s']:.2f} | {args.n / r['build_s']:,.0f} | "
              f"{args.queries / r['search_s']:,.0f} | {r['recall']:.3f} |")
    env = {"python": platform.python_version(), "faiss": faiss.__version__, "cpu_count": os.cpu_count(), "cpu": cpu_info(),
           "threads": faiss.omp_get_max_threads(), "load_avg_end": os.getloadavg(),
           "total_s": time.perf_counter() - t_start}
    print(f"\nenv: {json.dumps(env)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "env": env}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
