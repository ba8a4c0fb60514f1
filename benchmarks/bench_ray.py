"""Scale-out measurements: Ray extraction with 1 and 2 actors against the local engine, and out-of-core SGD.

Usage:
    python benchmarks/bench_ray.py --images 120              # Ray extraction (local 2-CPU cluster)
    python benchmarks/bench_ray.py --part ooc --rows 200000  # out-of-core fit on a synthetic store
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from _common import jpeg_folder, save
from bench_fit import features

from embedfit.extraction.local import extract


def bench_ray(images: int, shard_size: int) -> dict:
    import ray

    from embedfit.extraction.ray import extract_ray

    folder = jpeg_folder(images, 500, 375)
    ray.init(include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        extract(folder, Path(tmp) / "local.h5")
        rows.append({"engine": "local", "workers": 1, "img_s": images / (time.perf_counter() - start)})
        for workers in (1, 2):
            start = time.perf_counter()
            extract_ray(folder, Path(tmp) / f"ray{workers}.h5", num_workers=workers, shard_size=shard_size)
            rows.append({"engine": "ray", "workers": workers, "img_s": images / (time.perf_counter() - start)})
    for r in rows:
        print(f"{r['engine']:>6} x{r['workers']}: {r['img_s']:.1f} img/s (wall time incl. model load)")
    return {"images": images, "rows": rows}


def synthetic_store(path: Path, n: int, classes: int) -> None:
    """A real store of synthetic class-structured features, rows sorted by class like a folder tree."""
    from embedfit.backbones.registry import create_backbone
    from embedfit.images import ImageRecord
    from embedfit.store import OK, StoreSettings, StoreWriter

    spec = create_backbone("efficientnet_lite0").spec  # provenance only; the features are synthetic (1280-d)
    names = [f"c{c:02d}" for c in range(classes)]
    records = []
    with StoreWriter(path, StoreSettings(spec, "float16", False, "fp32")) as writer:
        X_all, y_all = features(n, spec.embedding_dim, classes)  # one draw: the same class means throughout
        for start in range(0, n, 50000):
            X, y = X_all[start:start + 50000], y_all[start:start + 50000]
            keys = [f"{names[c]}/img{start + i:09d}.jpg" for i, c in enumerate(y)]
            writer.write_part(keys, [names[c] for c in y], [0] * len(y), [0] * len(y), [OK] * len(y),
                              [""] * len(y), X)
            records += [ImageRecord(Path(k), k, int(c), 0, 0) for k, c in zip(keys, y, strict=True)]
        writer.commit(records, names, complete=True)


def bench_ooc(n: int, classes: int, epochs: int, batch_rows: int) -> dict:
    from sklearn.linear_model import SGDClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from embedfit.fitting.out_of_core import fit_out_of_core
    from embedfit.store import FeatureStore

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.h5"
        synthetic_store(path, n, classes)
        tracemalloc.start()  # numpy and h5py report their buffers to tracemalloc
        start = time.perf_counter()
        result = fit_out_of_core(path, "sgd-logreg", output=Path(tmp) / "run", epochs=epochs, batch_rows=batch_rows)
        ooc_seconds = time.perf_counter() - start
        peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        store = FeatureStore.open(path)
        test_a = np.sort([p["row"] for p in result.predictions])  # the same hold-out split
        train = np.setdiff1d(store.ok_rows(), test_a)
        calibration = _calibration(result, store, test_a)
        start = time.perf_counter()
        pipe = make_pipeline(StandardScaler(), SGDClassifier(loss="log_loss", learning_rate="constant",
                                                             eta0=2.0 / store.dim, average=len(train),
                                                             max_iter=epochs, tol=None, class_weight="balanced",
                                                             random_state=0))
        pipe.fit(store.features(train), store.labels[train])
        mem_seconds = time.perf_counter() - start
        mem_acc = float((pipe.predict(store.features(test_a)) == store.labels[test_a]).mean())
    out = {"rows": n, "dim": store.dim, "classes": classes, "epochs": epochs, "batch_rows": batch_rows,
           "ooc_seconds": ooc_seconds, "ooc_accuracy": result.score("accuracy"),
           "ooc_peak_traced_mb": peak_mb, "in_memory_seconds": mem_seconds, "in_memory_accuracy": mem_acc,
           "features_mb_float32": n * store.dim * 4 / 2**20, **calibration}
    print(f"out-of-core sgd-logreg on {n} x {store.dim} ({out['features_mb_float32']:.0f} MB float32), {epochs} epochs:"
          f" {ooc_seconds:.1f} s (hold-out eval + refit), accuracy {out['ooc_accuracy']:.3f}, peak allocations "
          f"{peak_mb:.0f} MB; in-memory SGD on the same split: {mem_seconds:.1f} s (one fit), "
          f"accuracy {mem_acc:.3f}")
    print("hold-out probabilities: log loss {log_loss:.3f}, ROC AUC {roc_auc:.4f}, argmax(proba) == predict on "
          "{agreement:.1%} of rows, {uniform_rows:.1%} uniform rows; max |decision value| of the saved model "
          "{max_abs_margin:.1f}".format(**calibration))
    return out


def _calibration(result, store, test: np.ndarray) -> dict:
    """Hold-out log loss / AUC / argmax agreement / uniform rows, and the saved model's largest |margin|."""
    names = list(store.class_names)
    proba = np.array([[p[f"p_{c}"] for c in names] for p in result.predictions])
    predicted = np.array([names.index(p["predicted"]) for p in result.predictions])
    clf = result.pipeline[-1]
    sgd = getattr(clf, "estimator", clf)  # the SGD model under its calibration (or bare, before it had one)
    margins = np.concatenate([sgd.decision_function(result.pipeline[:-1].transform(store.features(rows)))
                              for rows in np.array_split(test, max(1, len(test) // 4096))])
    return {"log_loss": result.score("log_loss"), "roc_auc": result.score("roc_auc"),
            "agreement": float((proba.argmax(axis=1) == predicted).mean()),
            "uniform_rows": float((np.ptp(proba, axis=1) < 1e-3).mean()),
            "max_abs_margin": float(np.abs(margins).max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("ray", "ooc", "all"), default="ray")
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--rows", type=int, default=200000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-rows", type=int, default=8192)
    args = parser.parse_args()
    if args.part in ("ray", "all"):
        print(f"wrote {save('ray', bench_ray(args.images, args.shard_size))}")
    if args.part in ("ooc", "all"):
        print(f"wrote {save('ooc', bench_ooc(args.rows, args.classes, args.epochs, args.batch_rows))}")


if __name__ == "__main__":
    main()
