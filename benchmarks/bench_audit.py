"""`embedfit audit` at scale: a synthetic store with planted near-duplicates; time, recall and peak memory.

The store holds n x d float16 embeddings with a cluster structure like a CNN's (cluster means in a low-dimensional
subspace plus noise, post-ReLU), written through `StoreWriter` in blocks (memory stays low while writing). `--pairs`
rows are near-duplicates of other rows (the original plus noise, cosine similarity ~0.98, like a re-encoded copy).
The store is unlabelled, so the audit is the duplicate search, the outliers and the output files; the label-issue
probe's cost is that of `embedfit fit` (benchmarks/bench_fit.py).

Recall is the share of planted pairs reported as near- or exact duplicates; peak memory is this process's maximum
resident set size (it includes writing the store, which stays below the audit's).

Usage:
    python benchmarks/bench_audit.py --n 1000000            # the target: <= 10 min, >= 95% recall, <= 8 GB
    python benchmarks/bench_audit.py --n 100000 --exact     # brute force, to compare
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import save

BLOCK = 65_536


def write_store(path: Path, n: int, dim: int, pairs: int, seed: int = 0) -> np.ndarray:
    """Write the synthetic store; return the planted (original, copy) row pairs (rows sorted like the keys)."""
    from embedfit.backbones.spec import BackboneSpec
    from embedfit.images import ImageRecord
    from embedfit.storage import StoreSettings, StoreWriter

    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(64, dim)).astype(np.float32) / 8
    centres = rng.normal(size=(1000, 64)).astype(np.float32)
    copies = np.sort(rng.choice(np.arange(n // 2, n), pairs, replace=False))
    originals = rng.integers(0, n // 2, pairs)
    source = dict(zip(copies.tolist(), originals.tolist(), strict=True))
    spec = BackboneSpec(name="synthetic", architecture="bench/synthetic", weights="random", weights_sha256="",
                        input_size=(8, 8), resize_size=8, interpolation="bilinear", mean=(0.5,) * 3,
                        std=(0.5,) * 3, embedding_dim=dim)
    keys = [f"img_{i:07d}.jpg" for i in range(n)]
    saved: dict[int, np.ndarray] = {}
    wanted = set(originals.tolist())
    with StoreWriter(path, StoreSettings(spec, dtype="float16")) as w:
        for start in range(0, n, BLOCK):
            stop = min(n, start + BLOCK)
            c = rng.integers(0, len(centres), stop - start)
            X = np.maximum(centres[c] @ latent + rng.normal(scale=0.35, size=(stop - start, dim)), 0)
            for i in range(start, stop):
                if i in wanted:
                    saved[i] = X[i - start].copy()
                if i in source:  # originals all lie in the first half, written before any copy
                    X[i - start] = saved[source[i]] + np.maximum(rng.normal(scale=0.05, size=dim), 0)
            w.write_part(keys[start:stop], [""] * (stop - start), [100] * (stop - start), [1] * (stop - start),
                         np.zeros(stop - start, dtype=int), [""] * (stop - start), X.astype(np.float16))
        records = [ImageRecord(path.parent / k, k, -1, 100, 1) for k in keys]
        w.commit(records, [], complete=True)
    return np.stack([originals, copies], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--exact", action="store_true", help="Brute-force search instead of the index.")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()

    from embedfit.auditing import audit

    with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as tmp:
        store = Path(tmp) / "synthetic.h5"
        t0 = time.perf_counter()
        planted = write_store(store, args.n, args.dim, args.pairs)
        write_seconds = time.perf_counter() - t0
        print(f"store of {args.n:,} x {args.dim} float16 written in {write_seconds:.0f} s", flush=True)
        t0 = time.perf_counter()
        result = audit(store, Path(tmp) / "audit", exact=True if args.exact else None)
        seconds = time.perf_counter() - t0
    found = {frozenset((f["path"], f["other"])) for f in result.findings
             if f["kind"] in ("near_duplicate", "exact_duplicate")}
    hits = sum(frozenset((f"img_{a:07d}.jpg", f"img_{b:07d}.jpg")) in found for a, b in planted)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux
    row = {"n": args.n, "dim": args.dim, "planted_pairs": args.pairs, "search": result.settings["search"],
           "audit_seconds": round(seconds, 1), "recall": hits / len(planted),
           "near_duplicates_reported": len(found), "peak_rss_gb": round(peak_gb, 2),
           "write_seconds": round(write_seconds, 1)}
    print(row)
    path = save(f"audit_{args.n}{'_exact' if args.exact else ''}{args.tag}", row)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
