"""Build and query a faiss retrieval index with an exported ONNX model (``detreg-index``; no TensorFlow).

``scripts/detreg_index.py`` runs the same :func:`main`.

Build (one sub-folder per class; the sub-folder name is the label, the path
relative to --images is the id):

    detreg-index build --model model.onnx --images data/gallery --output gallery_index
    detreg-index build --model model.onnx --images data/gallery --output gallery_index \\
        --kind hnsw --M 32 --ef-search 128

Search:

    detreg-index search --index gallery_index --model model.onnx query1.jpg query2.png --k 5
    detreg-index search --index gallery_index --model model.onnx query.jpg --k 5 --json

The index remembers the model hash and the sha256 of its files: searching it
with another model, or after one of its files changed, is refused.
Exit status: 0 ok; 1 bad input (missing folder, no images, a --model that is
not ONNX, existing output...); 2 the index does not belong to this model (hash
or dimension mismatch) or is damaged (checksum mismatch). Errors are one
``error: ...`` line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from detreg_runtime.embedder import Embedder
from detreg_runtime.imaging import list_image_folder, load_image
from detreg_runtime.index import EmbeddingIndex


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="detreg-index", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="embed an image folder and write an index")
    b.add_argument("--model", required=True, help="ONNX model (scripts/export_onnx.py)")
    b.add_argument("--images", required=True, help="folder with one sub-folder per class")
    b.add_argument("--output", required=True, help="index folder to write")
    b.add_argument("--kind", choices=("flat", "ivf", "hnsw"), default="flat", help="flat = exact (default)")
    b.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~4*sqrt(N))")
    b.add_argument("--nprobe", type=int, default=None, help="IVF lists probed per query (default nlist/16)")
    b.add_argument("--M", dest="m", type=int, default=None, help="HNSW neighbours per node (default 32)")
    b.add_argument("--ef-search", type=int, default=None, help="HNSW search breadth (default 128)")
    b.add_argument("--ef-construction", type=int, default=None, help="HNSW build breadth (default 40)")
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    b.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images instead of failing")
    b.add_argument("--overwrite", action="store_true", help="replace an existing index folder")

    s = sub.add_parser("search", help="query an index with image files")
    s.add_argument("--index", required=True, help="index folder (build's --output)")
    s.add_argument("--model", required=True, help="the ONNX model the index was built with")
    s.add_argument("images", nargs="+", help="query image files")
    s.add_argument("--k", type=int, default=5)
    s.add_argument("--nprobe", type=int, default=None, help="IVF: lists probed (overrides the index default)")
    s.add_argument("--ef-search", type=int, default=None, help="HNSW: search breadth (overrides the default)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p.parse_args(argv)


def _build(args) -> int:
    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        print(f"error: {output} exists and is not empty; pass --overwrite to replace it.", file=sys.stderr)
        return 1
    paths, labels = list_image_folder(args.images)
    embedder = Embedder(args.model, batch_size=args.batch_size, intra_op_num_threads=args.threads)
    root = Path(args.images)
    start = time.perf_counter()
    kept_paths, kept_labels, chunks, batch = [], [], [], []
    skipped = 0
    for path, label in zip(paths, labels):
        try:
            batch.append(load_image(path, embedder.image_size, embedder.channels))
        except ValueError as err:
            if not args.skip_bad_images:
                print(f"error: {err} (use --skip-bad-images to skip it)", file=sys.stderr)
                return 1
            print(f"warning: skipped {err}", file=sys.stderr)
            skipped += 1
            continue
        kept_paths.append(path.relative_to(root).as_posix())
        kept_labels.append(label)
        if len(batch) == args.batch_size:
            chunks.append(embedder.embed(np.stack(batch)))
            batch = []
    if batch:
        chunks.append(embedder.embed(np.stack(batch)))
    if not chunks:
        print("error: no readable image.", file=sys.stderr)
        return 1
    embeddings = np.concatenate(chunks)
    embed_s = time.perf_counter() - start
    params = {"nlist": args.nlist, "nprobe": args.nprobe, "m": args.m, "ef_search": args.ef_search,
              "ef_construction": args.ef_construction}
    params = {k: v for k, v in params.items() if v is not None}
    index = EmbeddingIndex(model_hash=embedder.model_hash)
    index.build(embeddings, ids=kept_paths, labels=kept_labels, kind=args.kind, **params)
    index.extra = {"images": str(root.resolve()), "model_file": str(Path(args.model).resolve()), "skipped": skipped}
    index.save(output, overwrite=args.overwrite)
    print(
        f"indexed {index.count} images of {len(set(kept_labels))} classes from {root} "
        f"({embed_s:.1f} s embedding, {skipped} skipped) -> {output} [kind={index.kind} {index.params}]"
    )
    return 0


def _search(args) -> int:
    embedder = Embedder(args.model)
    try:
        index = EmbeddingIndex.load(args.index, expected_model_hash=embedder.model_hash,
                                    expected_dimension=embedder.embedding_dim)
    except ValueError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    queries = embedder.embed([Path(p) for p in args.images])
    kwargs = {}
    if args.nprobe is not None:
        kwargs["nprobe"] = args.nprobe
    if args.ef_search is not None:
        kwargs["ef_search"] = args.ef_search
    ids, labels, scores = index.search(queries, args.k, **kwargs)
    results = []
    for q, image in enumerate(args.images):
        hits = [
            {"rank": r + 1, "id": ids[q, r].item(), "label": None if labels is None else labels[q, r].item(),
             "score": float(scores[q, r])}
            for r in range(ids.shape[1]) if scores[q, r] > float("-inf")
        ]
        results.append({"query": image, "results": hits})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for item in results:
            print(item["query"])
            for hit in item["results"]:
                print(f"  {hit['rank']:>3}  {hit['score']:.4f}  {hit['label']!s:<20}  {hit['id']}")
    return 0


def main(argv=None) -> int:
    """Run ``build`` or ``search``; exit status as in the module docstring."""
    args = parse_args(argv)
    try:
        return _build(args) if args.command == "build" else _search(args)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
