"""Out-of-core fitting: the streaming classifiers (`Classifier.stream`: sgd-logreg, sgd-svm, or any registered
one) on stores larger than memory (`fit_out_of_core`; no Ray needed).

Feature chunks stream through `partial_fit`; the result is the same run directory as `embedfit.fit`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from sklearn.pipeline import Pipeline

from embedfit.errors import UsageError
from embedfit.fitting.evaluate import FitResult
from embedfit.fitting.registry import StreamContext, Streaming, classifier_names, get_classifier
from embedfit.storage import OK, FeatureStore


def _blocks(rows: np.ndarray, block_rows: int) -> list[np.ndarray]:
    return [rows[i:i + block_rows] for i in range(0, len(rows), block_rows)]


def _stream(store: FeatureStore, blocks: list[np.ndarray], mix: int, rng: np.random.Generator | None
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (rows, features) batches of `mix` blocks each; shuffled block order and rows when `rng` is given.

    Blocks are contiguous runs of rows, so each read is one HDF5 span; mixing several random blocks per batch
    keeps a store sorted by class (the usual folder order) from feeding the model one class at a time.
    """
    order = rng.permutation(len(blocks)) if rng is not None else np.arange(len(blocks))
    for i in range(0, len(order), mix):
        rows = np.concatenate([blocks[b] for b in order[i:i + mix]])
        X = np.concatenate([store.features(blocks[b]) for b in order[i:i + mix]])
        if rng is not None:
            perm = rng.permutation(len(rows))
            rows, X = rows[perm], X[perm]
        yield rows, X


def _calibration_rows(y: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into `y`) of a stratified calibration block of about `size` rows, and of the rest (to train on).

    Every class gives the same share of its rows, at least one, so the block holds every class. A class with a
    single row lends it to both sides: the calibration needs every class, and the model cannot learn a class it
    never sees.
    """
    share = size / len(y)
    cal, fit = [], []
    for c in np.unique(y):
        at = rng.permutation(np.flatnonzero(y == c))
        k = max(1, int(share * len(at)))
        cal.append(at[:k])
        fit.append(at[k:] if len(at) > k else at)
    return np.sort(np.concatenate(cal)), np.sort(np.concatenate(fit))


def _stream_fit(store: FeatureStore, rows: np.ndarray, model: str, stream: Streaming, *, epochs: int,
                batch_rows: int, alpha: float, class_weight: str | None, seed: int) -> Pipeline:
    """StandardScaler (partial_fit, one pass) then the record's estimator (partial_fit, `epochs` shuffled passes).

    With `stream.calibrate`, the probabilities are a temperature-scaled softmax over the decision values
    (`CalibratedClassifierCV(method="temperature")` on the frozen model), fitted on a stratified calibration
    block of about 10% of `rows` (at most `batch_rows` minus one per class) that the model never trains on; it is
    collected during the scaler pass, so it costs no extra read. The OvR sigmoids SGDClassifier would normalise
    instead are under-confident for an SGD model stopped after a few passes, and uniform when all of them
    saturate; the softmax keeps the decision function's argmax, so `predict` is the argmax of `predict_proba`.
    """
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.frozen import FrozenEstimator
    from sklearn.preprocessing import StandardScaler
    from sklearn.utils.class_weight import compute_class_weight

    mix = 16
    y_all = store.labels[rows]
    present = np.unique(y_all)
    rng = np.random.default_rng(seed)
    cal = np.empty(0, dtype=rows.dtype)
    fit_rows = rows
    if stream.calibrate:
        if len(present) > batch_rows:  # the calibration block holds one row per class or more
            raise UsageError(f"`batch_rows` must be at least the number of classes ({len(present)}) for "
                             f"{model}, got {batch_rows}")
        at_cal, at_fit = _calibration_rows(y_all, min(batch_rows - len(present), len(rows) // 10), rng)
        cal, fit_rows = rows[at_cal], rows[at_fit]
    scaler = StandardScaler()
    cal_rows, cal_X = [], []
    for batch_rows_idx, X in _stream(store, _blocks(rows, max(1, batch_rows // mix)), mix, None):
        scaler.partial_fit(X)
        keep = np.isin(batch_rows_idx, cal)
        cal_rows.append(batch_rows_idx[keep])
        cal_X.append(X[keep])
    y_fit = store.labels[fit_rows]
    weights = None
    if class_weight == "balanced":  # partial_fit refuses "balanced": compute it once from the in-memory labels
        weights = dict(zip(present.tolist(), compute_class_weight("balanced", classes=present, y=y_fit), strict=True))
    clf = stream.build(StreamContext(store.dim, len(fit_rows), epochs, weights, alpha, seed))
    blocks = _blocks(fit_rows, max(1, batch_rows // mix))
    for _ in range(epochs):
        for batch_rows_idx, X in _stream(store, blocks, mix, rng):
            clf.partial_fit(scaler.transform(X), store.labels[batch_rows_idx], classes=present)
    if not stream.calibrate:
        return Pipeline([("scale", scaler), ("clf", clf)])
    every = np.arange(len(cal))  # one "split": the frozen model scores every calibration row
    calibrated = CalibratedClassifierCV(FrozenEstimator(clf), method="temperature", cv=[(every, every)])
    calibrated.fit(scaler.transform(np.concatenate(cal_X)), store.labels[np.concatenate(cal_rows)])
    return Pipeline([("scale", scaler), ("clf", calibrated)])


def fit_out_of_core(store: str | os.PathLike | FeatureStore, model: str = "sgd-logreg", *,
                    output: str | os.PathLike | None = None, epochs: int = 5, batch_rows: int = 8192,
                    test_size: float = 0.2, alpha: float = 1e-4, class_weight: str | None = "balanced",
                    seed: int = 0) -> FitResult:
    """Fit a streaming classifier on a store larger than memory, feeding feature chunks to its `partial_fit`.

    Only the store's metadata (labels, paths) is held in memory; features are read `batch_rows` at a time. A
    stratified hold-out share is evaluated (one streamed fit), then the model is refit on every image and saved as
    the usual run directory (model.skops, model.json, metrics.json, predictions.csv), so `embedfit predict` and
    `embedfit report` use it like any other run.

    Args:
        store: The training feature store.
        model: A registered classifier with `stream` (`classifier_names(streaming=True)`): "sgd-logreg"
            (logistic loss, calibrated probabilities) or "sgd-svm" (hinge loss, no probabilities).
        output: Run directory (default: runs/<store stem>-<model>).
        epochs: Passes over the data (shuffled chunk order each pass).
        batch_rows: Rows per `partial_fit` call (the memory bound: batch_rows x dim float32).
        test_size: Hold-out share for the evaluation.
        alpha: Regularisation strength.
        class_weight: "balanced" or None.
        seed: Random state for the split and the shuffles.

    Returns:
        A `FitResult` with the hold-out metrics and the pipeline refit on every image.
    """
    from sklearn.model_selection import train_test_split

    from embedfit.fitting.data import Dataset, check_trainable
    from embedfit.fitting.evaluate import _metrics, fold_metrics
    from embedfit.fitting.models import name_classes
    from embedfit.runs import Evaluation, check_replace, identity_of, save_run

    stream = get_classifier(model).stream
    if stream is None:
        raise UsageError(f"{model} is fitted in memory (`embedfit.fit`); out-of-core models: "
                         f"{', '.join(classifier_names(streaming=True))}")
    if epochs < 1 or batch_rows < 1:
        raise UsageError(f"`epochs` and `batch_rows` must be at least 1, got {epochs} and {batch_rows}")
    if not 0 < test_size < 1:
        raise UsageError(f"`test_size` must be a fraction between 0 and 1, got {test_size}")
    store = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
    rows = np.flatnonzero((store.status == OK) & (store.labels >= 0))
    y = store.labels[rows]
    names = list(store.class_names)
    check_trainable(y, names, 2)  # the stratified hold-out needs two images per class
    opts = dict(epochs=epochs, batch_rows=batch_rows, alpha=alpha, class_weight=class_weight,
                seed=seed)
    run_dir = Path(output) if output else Path("runs") / f"{store.path.stem}-{model}"
    params = {"epochs": epochs, "batch_rows": batch_rows, "test_size": test_size, "alpha": alpha,
              "class_weight": class_weight, "seed": seed, "scale": "standard"}
    identity = identity_of(data=store.fingerprint, model=model, settings=params,
                           evaluation={"strategy": "holdout", "test_size": test_size, "seed": seed})
    check_replace(run_dir, identity)  # before the streamed fits, not after them

    t0 = time.perf_counter()
    train, test = train_test_split(rows, test_size=test_size, stratify=y, random_state=seed)
    pipe = _stream_fit(store, np.sort(train), model, stream, **opts)
    test = np.sort(test)
    pred, proba = [], []
    for _, X in _stream(store, _blocks(test, batch_rows), 1, None):
        pred.append(pipe.predict(X))
        if hasattr(pipe, "predict_proba"):  # a column for every class name, 0 for those without images
            proba.append(np.zeros((len(X), len(names))))
            proba[-1][:, pipe.classes_] = pipe.predict_proba(X)
    pred_a = np.concatenate(pred)
    proba_a = np.concatenate(proba) if proba else None
    y_test = store.labels[test]
    cv_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    final = _stream_fit(store, rows, model, stream, **opts)
    name_classes(final[-1], names)  # fitted on indices (partial_fit needs every class up front); ships names
    fit_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    timed = rows[:min(256, batch_rows)]
    final.predict(store.features(timed))
    predict_per_image = (time.perf_counter() - t0) / len(timed)

    predictions = []
    for j, r in enumerate(test):
        row = {"path": str(store.paths[r]), "row": int(r), "label": names[y_test[j]], "predicted": names[pred_a[j]],
               "correct": bool(y_test[j] == pred_a[j]), "fold": 0}
        if proba_a is not None:
            row.update({f"p_{c}": round(float(p), 6) for c, p in zip(names, proba_a[j], strict=True)})
        predictions.append(row)
    # _metrics reads labels, class names and the store from the Dataset, never X (which stays on disk here).
    data = Dataset(np.empty((0, store.dim), np.float32), y, store.paths[rows], rows, names, store,
                   len(store) - len(rows))
    evaluation = {"strategy": "holdout", "n_splits": 1, "repeats": 1, "groups": False, "search": False,
                  "out_of_core": True}
    metrics = _metrics(model, store.spec, data, evaluation,
                       [fold_metrics(y_test, pred_a, proba_a, np.arange(len(names)), len(names))], y_test, pred_a, {
                           "extract_seconds": float(store.attrs.get("extract_seconds", 0.0)),
                           "cv_seconds": cv_seconds, "fit_seconds": fit_seconds,
                           "predict_seconds_per_image": predict_per_image})
    record = Evaluation("holdout-split", getattr(store, "url", "") or str(store.path.resolve()), str(store.root),
                        len(predictions), len(train), details=evaluation)
    metrics["evaluation"] = record.to_dict()  # as metrics.json holds it
    metrics["best_params"] = None  # a streaming model searches nothing: the same keys as an in-memory run
    save_run(run_dir, final, model=model, params=params, store=store, metrics=metrics, evaluation=record,
             predictions=predictions, identity=identity)
    return FitResult(run_dir, model, final, metrics, predictions)
