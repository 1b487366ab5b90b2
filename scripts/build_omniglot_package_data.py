#!/usr/bin/env python
"""Build the embedded Omniglot benchmark (detreg_keras/data/omniglot_small.npz).

Reads ``images_background_small1.zip`` (the five training alphabets) and the
three alphabets that only ``images_background_small2.zip`` has (the test
alphabets) with ``detreg_keras.data.load_omniglot``, decodes them with the
pipeline's decoder and writes their pixels bit-packed, with labels, class
names, source paths and the archives' SHA-256, into the package data file:

    python scripts/build_omniglot_package_data.py --data-root ../shared/data/omniglot

Omniglot is MIT licensed (Lake et al. 2015); the notice ships next to the file
(detreg_keras/data/OMNIGLOT_LICENSE).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detreg_keras.data.folders import OMNIGLOT_TEST_ARCHIVE, OMNIGLOT_TRAIN_ARCHIVE, load_omniglot
from detreg_keras.data.omniglot_embedded import OMNIGLOT_PACKAGE_DATA, pack_omniglot


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="../shared/data/omniglot", help="folder of the two Omniglot zips")
    p.add_argument("--output", default=str(OMNIGLOT_PACKAGE_DATA), help="the .npz to write")
    args = p.parse_args(argv)
    root = Path(args.data_root)
    splits = {split: load_omniglot(root, split) for split in ("train", "test")}
    out = pack_omniglot(
        splits, args.output, sources={"train": root / OMNIGLOT_TRAIN_ARCHIVE, "test": root / OMNIGLOT_TEST_ARCHIVE}
    )
    for split, records in splits.items():
        print(f"{split}: {records.summary()}")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
