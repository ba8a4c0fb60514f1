"""Fitting cost vs extraction cost: 5-fold CV of every model the CLI offers on stored features.

Features are synthetic (n × d, a class structure like CNN embeddings: class means plus anisotropic noise) so the
benchmark needs no images; the extraction time it compares against is n / (end-to-end img/s) from
benchmarks/results/extract_*.json (run bench_extract.py first), or --extract-rate.

Usage:
    python benchmarks/bench_fit.py --n 10000 --dim 1280 --classes 10
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import RESULTS, save
from sklearn.model_selection import cross_validate

from embedfit.fit import MODELS, make_pipeline, make_splits


def features(n: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    means = rng.normal(0, 1, (classes, dim)).astype(np.float32)
    scale = rng.gamma(1.0, 1.0, dim).astype(np.float32)  # a few dominant directions, like real embeddings
    X = np.maximum(means[y] * 0.08 + rng.normal(0, 1, (n, dim)).astype(np.float32) * scale, 0)  # post-ReLU
    return X.astype(np.float32), y


def store_read_seconds(X: np.ndarray, dtype: str) -> float:
    import h5py

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("features", data=X.astype(dtype), chunks=(256, X.shape[1]))
        start = time.perf_counter()
        with h5py.File(path, "r") as f:
            f["features"][:].astype(np.float32)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--extract-rate", type=float, default=None, help="img/s; default from bench_extract")
    args = parser.parse_args()
    rate = args.extract_rate
    if rate is None:
        found = sorted(RESULTS.glob("extract_efficientnet_lite0_cpu_*.json"))
        rate = json.loads(found[0].read_text())["rows"][0]["embedfit"] if found else 46.0
    extract_seconds = args.n / rate
    X, y = features(args.n, args.dim, args.classes)
    splits = make_splits(y, cv=5, repeats=1, groups=None, seed=0)
    print(f"{args.n} x {args.dim} features, {args.classes} classes; extraction of {args.n} images at {rate:.1f} img/s "
          f"= {extract_seconds:.0f} s")
    rows = []
    for model in args.models.split(","):
        pipe = make_pipeline(model, n_samples=len(y), n_features=args.dim)
        start = time.perf_counter()
        scores = cross_validate(pipe, X, y, cv=splits, scoring="accuracy")
        seconds = time.perf_counter() - start
        rows.append({"model": model, "cv5_seconds": seconds, "accuracy": float(scores["test_score"].mean()),
                     "share_of_extraction": seconds / extract_seconds})
        print(f"{model:>10}: 5-fold CV {seconds:6.1f} s  accuracy {scores['test_score'].mean():.3f}  "
              f"= {seconds / extract_seconds:.1%} of extraction")
    reads = {dtype: store_read_seconds(X, dtype) for dtype in ("float32", "float16")}
    print(f"store read of {args.n} x {args.dim}: float32 {reads['float32']:.2f} s, float16 {reads['float16']:.2f} s")
    path = save("fit", {"n": args.n, "dim": args.dim, "classes": args.classes, "extract_rate": rate,
                        "extract_seconds": extract_seconds, "rows": rows, "store_read_seconds": reads})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
