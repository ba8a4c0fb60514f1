"""Fitting cost vs extraction cost: 5-fold CV of every model the CLI offers on stored features.

Features are synthetic (n × d, a class structure like CNN embeddings: class means plus anisotropic noise, post-ReLU,
separated so that a linear probe scores ~0.85 rather than a trivial 1.0) and written to a real store, so the
benchmark needs no images; each model goes through `embedfit.fit` exactly as `embedfit fit` runs it. The
extraction time it compares against is n / (end-to-end img/s) from
benchmarks/results/extract_efficientnet_lite0_DEVICE_*.json (run bench_extract.py first), or --extract-rate.

With --device cuda, the models that fit on a GPU (scikit-learn's array API on torch tensors) are fitted on the
CPU and on the GPU side by side; SCIPY_ARRAY_API=1 is set for this process before SciPy is imported.

With --holdout, each model is evaluated on a hold-out store (`--test-store`, n/2 more images) instead: the
evaluated model is saved as the final one (it was trained on every training image), and the second fit that
`fit` used to make on the very same rows is timed next to it, to show what that saves.

Usage:
    python benchmarks/bench_fit.py --n 10000 --dim 1280 --classes 10
    python benchmarks/bench_fit.py --device cuda
    python benchmarks/bench_fit.py --holdout --n 4000 --dim 1280 --models logreg,svm,ridge --extract-rate 50
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if "cuda" in " ".join(sys.argv):  # SciPy reads it once, at import: before anything imports scipy
    os.environ["SCIPY_ARRAY_API"] = "1"

import numpy as np
from _common import RESULTS, hardware, save

from embedfit.fitting.evaluate import fit
from embedfit.fitting.registry import array_api_names, classifier_names

SEPARATION = 0.007  # class-mean scale: a logistic probe scores ~0.85, like a real 10-class embedding, not 1.0


def features(n: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    means = rng.normal(0, 1, (classes, dim)).astype(np.float32)
    scale = rng.gamma(1.0, 1.0, dim).astype(np.float32)  # a few dominant directions, like real embeddings
    X = np.maximum(means[y] * SEPARATION + rng.normal(0, 1, (n, dim)).astype(np.float32) * scale, 0)  # post-ReLU
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


def write_store(path: Path, X: np.ndarray, y: np.ndarray) -> Path:
    """A real feature store holding the synthetic features, as `embedfit extract` would write it."""
    from embedfit.backbones.spec import BackboneSpec
    from embedfit.images import ImageRecord
    from embedfit.storage import StoreSettings, StoreWriter

    names = [f"class_{c}" for c in range(int(y.max()) + 1)]
    spec = BackboneSpec(name="synthetic", architecture="bench/synthetic", weights="random", weights_sha256="",
                        input_size=(8, 8), resize_size=8, interpolation="bilinear", mean=(0.5,) * 3,
                        std=(0.5,) * 3, embedding_dim=X.shape[1])
    keys = [f"{names[c]}/img_{i:06d}.jpg" for i, c in enumerate(y)]
    records = [ImageRecord(path.parent / k, k, int(c), 100, 1) for k, c in zip(keys, y, strict=True)]
    with StoreWriter(path, StoreSettings(spec)) as w:
        w.write_part(keys, [names[c] for c in y], [100] * len(y), [1] * len(y), np.zeros(len(y), dtype=int),
                     [""] * len(y), X)
        w.commit(records, names, complete=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--models", default=None, help="comma-separated (default: all; with cuda, those it fits)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--jobs", type=int, default=None, help="parallel folds (default: embedfit's)")
    parser.add_argument("--extract-rate", type=float, default=None, help="img/s; default from bench_extract")
    parser.add_argument("--holdout", action="store_true", help="evaluate on a hold-out store; time the refit saved")
    args = parser.parse_args()
    rate = args.extract_rate
    if rate is None:
        found = sorted(RESULTS.glob(f"extract_efficientnet_lite0_{args.device}_*.json"))
        if not found:
            parser.error(f"no bench_extract.py results for {args.device} in {RESULTS}: run it or pass --extract-rate")
        rate = json.loads(found[0].read_text())["rows"][0]["embedfit"]
    default = classifier_names(streaming=False) if args.device == "cpu" else array_api_names()
    models = args.models.split(",") if args.models else list(default)
    devices = ["cpu"] if args.device == "cpu" else ["cpu", args.device]
    extract_seconds = args.n / rate
    X, y = features(args.n, args.dim, args.classes)
    tmp = Path(tempfile.mkdtemp())
    store = write_store(tmp / "features.h5", X, y)
    print(f"{args.n} x {args.dim} features, {args.classes} classes, {hardware()['cores']} cores; extraction of "
          f"{args.n} images at {rate:.1f} img/s = {extract_seconds:.0f} s")
    if args.holdout:
        X_test, y_test = features(args.n // 2, args.dim, args.classes, seed=1)
        holdout(store, write_store(tmp / "test.h5", X_test, y_test), X, y, models, tmp, args)
        return
    rows = []
    for model in models:
        for device in devices:
            start = time.perf_counter()
            result = fit(store, model, cv=5, jobs=args.jobs, device=device, output=tmp / f"{model}-{device}")
            seconds = time.perf_counter() - start  # `embedfit fit`: load, 5-fold CV, final refit, run directory
            t = result.metrics["timing"]
            rows.append({"model": model, "device": result.metrics["device"], "total_seconds": seconds,
                         "cv5_seconds": t["cv_seconds"], "refit_seconds": t["fit_seconds"],
                         "accuracy": result.score("accuracy"), "share_of_extraction": seconds / extract_seconds})
            print(f"{model:>10} {result.metrics['device']:>4}: 5-fold CV {t['cv_seconds']:6.1f} s + refit "
                  f"{t['fit_seconds']:5.1f} s, whole command {seconds:6.1f} s = {seconds / extract_seconds:6.1%} "
                  f"of extraction; accuracy {result.score('accuracy'):.3f}", flush=True)
    reads = {dtype: store_read_seconds(X, dtype) for dtype in ("float32", "float16")}
    print(f"store read of {args.n} x {args.dim}: float32 {reads['float32']:.2f} s, float16 {reads['float16']:.2f} s")
    name = "fit" if args.device == "cpu" else f"fit_{args.device}"
    path = save(name, {"n": args.n, "dim": args.dim, "classes": args.classes, "extract_rate": rate,
                       "extract_seconds": extract_seconds, "separation": SEPARATION, "rows": rows,
                       "store_read_seconds": reads})
    print(f"wrote {path}")


def holdout(store: Path, test_store: Path, X: np.ndarray, y: np.ndarray, models: list[str], tmp: Path,
            args: argparse.Namespace) -> None:
    """`embedfit fit --test-store` per model, and the second fit on the same rows that it no longer makes."""
    from embedfit.fitting.models import make_pipeline

    names = np.array([f"class_{c}" for c in range(args.classes)])  # as write_store names them
    rows = []
    for model in models:
        start = time.perf_counter()
        result = fit(store, model, test_store=test_store, jobs=args.jobs, output=tmp / f"{model}-holdout")
        seconds = time.perf_counter() - start
        assert result.metrics["evaluation"]["refit"] is False, "the evaluated model was not reused"
        # What the old final fit did: the same pipeline on the same training rows, once more.
        pipe = make_pipeline(model, n_samples=len(y), n_features=X.shape[1])
        start = time.perf_counter()
        pipe.fit(X, names[y])
        refit = time.perf_counter() - start
        rows.append({"model": model, "evaluate_seconds": result.metrics["timing"]["cv_seconds"],
                     "whole_command_seconds": seconds, "second_fit_saved_seconds": refit,
                     "saved_share": refit / (seconds + refit), "accuracy": result.score("accuracy")})
        print(f"{model:>10}: hold-out evaluation {result.metrics['timing']['cv_seconds']:6.1f} s, whole command "
              f"{seconds:6.1f} s; the second fit it no longer makes: {refit:6.1f} s "
              f"({refit / (seconds + refit):.0%} of the old command)", flush=True)
    path = save("fit_holdout", {"n": args.n, "n_test": args.n // 2, "dim": args.dim, "classes": args.classes,
                                "separation": SEPARATION, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
