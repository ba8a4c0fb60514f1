"""Evaluate a classifier honestly (stratified, optionally grouped and repeated k-fold, a hold-out share or a
hold-out store), refit it on all data, and write a run directory (`embedfit.runs`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedfit.backbones.spec import BackboneSpec
from embedfit.errors import InputError, UsageError, check_output_dir
from embedfit.fitting.data import (
    Dataset,
    _aligned_test_set,
    _check_test_size,
    check_trainable,
    groups_from,
    load_dataset,
)
from embedfit.fitting.device import _fitting, _numpy, on_device, resolve_fit_device
from embedfit.fitting.models import (
    DEFAULT_MODEL,
    check_class_weight,
    check_savable,
    make_pipeline,
    model_label,
    name_classes,
    resolve_model,
    shipped,
    wrap_estimator,
)
from embedfit.progress import OnProgress, Progress, progress_sink
from embedfit.runs import Evaluation, check_replace, identity_of, save_run
from embedfit.storage import FeatureStore

if TYPE_CHECKING:  # scikit-learn is imported once the arguments are checked: a refusal comes at once
    from sklearn.base import BaseEstimator
    from sklearn.pipeline import Pipeline

MAX_REPEATS = 100  # repetitions of the k-fold: beyond this the spread estimate no longer changes, the cost does

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """What `fit()` produced; `run_dir` holds the artifacts."""

    run_dir: Path
    model: str
    pipeline: Pipeline
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]] = field(repr=False, default_factory=list)

    def score(self, metric: str = "accuracy") -> float:
        return float(self.metrics["scores"][metric]["mean"])


def _proba(est: Any, X: np.ndarray) -> np.ndarray | None:
    return est.predict_proba(X) if hasattr(est, "predict_proba") else None


def _fold(pipe: Pipeline, X: Any, y: Any, train: np.ndarray, test: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Fit a clone on `train`, predict `test`. X and y are NumPy arrays, or torch tensors (array API)."""
    return _fold_model(pipe, X, y, train, test)[:3]


def _fold_model(pipe: Pipeline, X: Any, y: Any, train: np.ndarray, test: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, Pipeline]:
    """`_fold`, and the fitted pipeline (with NumPy attributes): the final model when `train` is every
    training row (a hold-out store)."""
    from sklearn.base import clone

    with _fitting(X):
        est = clone(pipe).fit(X[train], y[train])
        pred, proba = est.predict(X[test]), _proba(est, X[test])
        classes = est[-1].classes_ if hasattr(est[-1], "classes_") else np.unique(_numpy(y[train]))
    return _numpy(pred), _numpy(proba), _numpy(classes), _numpy(est)


def _refit(pipe: Pipeline, X: Any, y: Any) -> Pipeline:
    """Fit a clone on everything; a pipeline fitted on tensors comes back with NumPy attributes, so that it
    predicts, saves and loads like any other."""
    from sklearn.base import clone

    with _fitting(X):
        return _numpy(clone(pipe).fit(X, y))


def fold_metrics(y: np.ndarray, pred: np.ndarray, proba: np.ndarray | None, classes: np.ndarray,
                 n_classes: int) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro F1, and log loss / ROC AUC when probabilities exist."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, log_loss, roc_auc_score

    out = {"accuracy": accuracy_score(y, pred), "balanced_accuracy": balanced_accuracy_score(y, pred),
           "f1_macro": f1_score(y, pred, average="macro", zero_division=0)}
    if proba is not None:
        full = np.zeros((len(y), n_classes))
        full[:, classes] = proba
        full /= np.maximum(full.sum(axis=1, keepdims=True), 1e-12)  # float32 models drift off 1 slightly
        out["log_loss"] = log_loss(y, full, labels=np.arange(n_classes))
        present = np.unique(y)
        if len(present) == n_classes:  # AUC needs every class among the test images
            out["roc_auc"] = (roc_auc_score(y, full[:, 1]) if n_classes == 2 else
                              roc_auc_score(y, full, multi_class="ovr", average="macro"))
    return {k: float(v) for k, v in out.items()}


def make_splits(y: np.ndarray, *, cv: int, repeats: int, groups: np.ndarray | None, seed: int
                ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified (grouped when groups are given, repeated when repeats > 1) k-fold splits."""
    from sklearn.model_selection import RepeatedStratifiedKFold, StratifiedGroupKFold

    if cv < 2:
        raise UsageError(f"`cv` must be at least 2, got {cv}")
    if not 1 <= repeats <= MAX_REPEATS:
        raise UsageError(f"`repeats` must be between 1 and {MAX_REPEATS}, got {repeats}")
    dummy = np.zeros(len(y))
    if groups is not None:
        if len(np.unique(groups)) < cv:
            raise InputError(f"only {len(np.unique(groups))} groups for {cv} folds; use fewer folds")
        return [s for r in range(repeats) for s in
                StratifiedGroupKFold(cv, shuffle=True, random_state=seed + r).split(dummy, y, groups)]
    return list(RepeatedStratifiedKFold(n_splits=cv, n_repeats=repeats, random_state=seed).split(dummy, y))


def selection_identity(paths: np.ndarray, group_keys: np.ndarray | None, *, excluded: bool) -> dict[str, str]:
    """What a run's identity records about which images were scored and which stay together (`identity_of`'s
    evaluation): "groups", a digest of the group keys (they change the folds), and with an exclusions file "rows",
    a digest of the paths kept. `sweep` asks the same of a run it would reuse."""
    out = {}
    if group_keys is not None:
        out["groups"] = hashlib.sha256(json.dumps([str(g) for g in group_keys]).encode()).hexdigest()[:16]
    if excluded:
        out["rows"] = hashlib.sha256("\n".join(map(str, paths)).encode()).hexdigest()[:16]
    return out


@dataclass(frozen=True)
class FitConfig:
    """How to fit and evaluate a model (the `embedfit fit` options, one field each).

    Attributes:
        scale: "standard", "l2" or "none".
        pca: Components, None or "none", or "auto" (256 for svm/knn).
        cv: Folds of stratified k-fold cross-validation.
        repeats: Repetitions of the k-fold (or of the `test_size` split) with different shuffles.
        groups: Group key per image (array), a CSV of path,group, or a regex on paths; keeps groups within folds.
        group_duplicates: Keep each cluster of exact and near-duplicates (`embedfit.auditing.duplicate_groups`)
            within one CV fold (combined with `groups` when both are given).
        exclude: A CSV with `path,action` columns (an audit.csv or the fixes CSV of an audit's report): the images
            marked "exclude" are left out.
        test_store: Evaluate on this store instead of CV (same backbone required).
        test_size: Evaluate on a stratified hold-out share instead of CV.
        search: Grid-search the model's hyper-parameters (nested inside the outer CV).
        class_weight: "balanced" or None ("none").
        jobs: Parallel folds (joblib); None: folds in parallel only when the work is large enough to pay for
            starting the workers (`default_jobs`).
        backend: joblib backend: "loky", "threading", "ray" or "dask".
        ray_address: With backend "ray": the cluster to connect to (`ray.init(address=...)`, e.g.
            "ray://head:10001" or "auto"); None: Ray's default (a local cluster, or the one already connected).
        device: "cpu", "cuda[:N]", or "auto": the GPU for the array-API classifiers when there is one and SciPy is in
            array-API mode (SCIPY_ARRAY_API=1), else the CPU. On a GPU, folds run one after the other.
        seed: Random state for splits and models.
        progress: Show folds as they finish on stderr (`embedfit.progress.StderrSink`) when no `on_progress` is given.
    """

    scale: str = "standard"
    pca: int | str | None = "auto"
    cv: int = 5
    repeats: int = 1
    groups: str | np.ndarray | None = None
    group_duplicates: bool = False
    exclude: str | Path | None = None
    test_store: str | Path | FeatureStore | None = None
    test_size: float | None = None
    search: bool = False
    class_weight: str | None = "balanced"
    jobs: int | None = None
    backend: str = "loky"
    ray_address: str | None = None
    device: str = "auto"
    seed: int = 0
    progress: bool = False


def fit(store: str | Path | FeatureStore, model: str | BaseEstimator = DEFAULT_MODEL,
        config: FitConfig | None = None, *, output: str | Path | None = None, on_progress: OnProgress | None = None,
        **options: Any) -> FitResult:
    """Evaluate a classifier on a store's embeddings, refit it on all of them, and write a run directory.

    Args:
        store: The training feature store.
        model: A registered classifier fitted in memory (`classifier_names(streaming=False)`; default: a
            logistic-regression linear probe with C chosen by inner CV); or any scikit-learn classifier (it gets
            `config.scale` in front of it) or `Pipeline` (used as given), or "pkg.module:Class" (constructed with
            default arguments). Its run is named after the class, in lower case. It must save with skops'
            defaults plus `embedfit.fitting.registry.trusted_types()` (scikit-learn's own classes do); anything else
            is refused before the CV.
        config: How to fit and evaluate (`FitConfig`); keyword `options` override its fields (e.g. `cv=3`).
        output: Run directory (default: runs/<store stem>-<model>).
        on_progress: Called with the folds' progress (`embedfit.progress`); else `config.progress` shows it on
            stderr.

    Returns:
        A `FitResult` with metrics and the fitted pipeline, which predicts class names.
    """
    import dataclasses

    try:
        config = dataclasses.replace(config or FitConfig(), **options)
    except TypeError as exc:
        raise UsageError(f"unknown fit option: {exc}") from None
    scale, pca, cv, repeats, groups = config.scale, config.pca, config.cv, config.repeats, config.groups
    test_store, test_size, search = config.test_store, config.test_size, config.search
    class_weight = config.class_weight
    jobs, backend, device, seed = config.jobs, config.backend, config.device, config.seed
    estimator = resolve_model(model)
    custom = not isinstance(estimator, str)
    model = model_label(estimator) if custom else estimator
    if custom and search:
        raise UsageError("search grids exist for the built-in models only; give your estimator wrapped in "
                         "GridSearchCV instead")
    class_weight = check_class_weight(class_weight)
    pca = None if pca == "none" else pca
    if test_store is not None and test_size is not None:
        raise UsageError("give either `test_store` or `test_size`, not both")
    if test_size is not None and not 0 < test_size < 1:
        raise UsageError(f"`test_size` must be a fraction between 0 and 1, got {test_size}")
    holdout = test_store is not None or test_size is not None
    if holdout and groups is not None:
        raise UsageError("`groups` keeps groups within CV folds; it does not combine with `test_size` or `test_store`")
    if holdout and config.group_duplicates:
        raise UsageError("`group_duplicates` keeps duplicates within CV folds; it does not combine with `test_size` "
                         "or `test_store`")
    if test_store is not None and repeats != 1:
        raise UsageError("`repeats` needs CV or `test_size`; a `test_store` is one fixed split")
    if not 1 <= repeats <= MAX_REPEATS:
        raise UsageError(f"`repeats` must be between 1 and {MAX_REPEATS}, got {repeats}")
    if jobs == 0:
        raise UsageError("`jobs` must be a positive number or -1 (all cores)")
    data = load_dataset(store, config.exclude)
    spec = data.store.spec
    run_dir = Path(output) if output else Path("runs") / f"{data.store.path.stem}-{model}"
    check_output_dir(run_dir)  # before the CV, not after it
    if test_store is not None:
        test_path = Path(test_store.path if isinstance(test_store, FeatureStore) else test_store)
        if test_path.exists() and test_path.samefile(data.store.path):
            raise UsageError(f"`test_store` {test_path} is the training store itself: its score would be training "
                             "accuracy, not a hold-out one")
    # A hold-out share needs 2 images per class (one each side), CV one per fold, a hold-out store none.
    check_trainable(data.y, data.class_names, None if test_store is not None else 2 if test_size is not None else cv)
    fit_device, device_note = resolve_fit_device(device, model)
    on_gpu = fit_device != "cpu"
    _register_backend(backend, config.ray_address)
    n_classes = len(data.class_names)
    notes = list(data.notes)

    t0 = time.perf_counter()
    group_keys = None
    if test_store is not None:
        test = _aligned_test_set(test_store, data)
        notes += test.notes
        X_all, y_all = np.concatenate([data.X, test.X]), np.concatenate([data.y, test.y])
        splits = [(np.arange(len(data.y)), np.arange(len(data.y), len(y_all)))]
        pred_paths, pred_rows = test.paths, test.rows
        evaluation = {"strategy": "holdout", "n_splits": 1, "repeats": 1, "groups": False, "search": search,
                      "test_store": getattr(test.store, "url", "") or str(test.store.path.resolve()),
                      "test_store_fingerprint": test.store.fingerprint, "n_test": len(test.y), "seed": seed}
    else:
        X_all, y_all, pred_paths, pred_rows = data.X, data.y, data.paths, data.rows
        group_keys = groups if isinstance(groups, np.ndarray) else groups_from(groups, data.paths)
        if config.group_duplicates:
            group_keys = _with_duplicates(data, group_keys)
        if test_size is not None:
            from sklearn.model_selection import StratifiedShuffleSplit

            _check_test_size(test_size, data.y)
            # Repeated like the k-fold; the first split is train_test_split's with the same seed.
            splits = list(StratifiedShuffleSplit(repeats, test_size=test_size, random_state=seed)
                          .split(np.zeros(len(data.y)), data.y))
            evaluation = {"strategy": "holdout", "n_splits": 1, "repeats": repeats, "groups": False,
                          "search": search, "test_size": test_size, "n_test": len(splits[0][1]), "seed": seed}
        else:
            splits = make_splits(data.y, cv=cv, repeats=repeats, groups=group_keys, seed=seed)
            evaluation = {"strategy": "cv", "n_splits": cv, "repeats": repeats,
                          "groups": group_keys is not None, "search": search, "seed": seed}
    if not config.group_duplicates and config.exclude is None:  # an audited store has either
        notes += _duplicate_warning(data, splits, evaluation, test if test_store is not None else None)
    # Sizes that must fit every training set: PCA and kNN sizes, inner CV folds, lda's images per class.
    n_train = min(len(tr) for tr, _ in splits)
    train_counts = [np.bincount(y_all[tr]) for tr, _ in splits]
    for (tr, _), c in zip(splits, train_counts, strict=True) if model == "lda" and not custom else ():
        if len(tr) <= np.count_nonzero(c):
            raise UsageError(f"lda needs more training images than classes; a training set has {len(tr)} images "
                             f"of {np.count_nonzero(c)} classes: add images, or use another model")
    if custom:
        pipe = wrap_estimator(estimator, scale=scale, pca=pca, seed=seed, n_features=data.X.shape[1],
                              n_train=n_train)
        check_savable(pipe)  # a type skops would have to trust: refused now, not after the CV
    else:
        pipe = make_pipeline(model, scale=scale, pca=pca, class_weight=class_weight, seed=seed,
                             n_samples=len(data.y), n_features=data.X.shape[1], search=search, array_api=on_gpu,
                             n_train=n_train, min_class=min(int(c[c > 0].min()) for c in train_counts),
                             notes=notes)
    params = {"scale": scale, "pca": pca, "class_weight": class_weight, "search": search, "seed": seed,
              "device": fit_device}
    if custom:  # what was fitted, as scikit-learn prints it; class_weight is the estimator's own business
        params.update(class_weight=None, estimator=repr(pipe))
    # What this run answers: refused before the CV when the folder holds a run that answered something else.
    asked = {k: v for k, v in evaluation.items() if k not in ("test_store", "n_test")}
    asked.update(selection_identity(data.paths, group_keys, excluded=config.exclude is not None))
    identity = identity_of(data=data.store.fingerprint, model=model,
                           settings={k: v for k, v in params.items() if k != "device"}, evaluation=asked)
    check_replace(run_dir, identity)
    if (run_dir / "model.json").is_file():  # the identical command: it replaces its own run
        notes.append(f"replacing the earlier run in {run_dir}")
    for note in notes:
        log.warning("note: %s", note)
    reuse = test_store is not None  # a hold-out store: the evaluation trains on every training image
    with progress_sink(on_progress, config.progress) as sink:
        progress = Progress(f"fitting {model}", len(splits), on_progress=sink,
                            unit="folds" if evaluation["strategy"] == "cv" else "splits")
        if on_gpu:  # copied once; the GPU runs the folds one after the other
            X_dev, y_dev = on_device(X_all, y_all, model, fit_device)
            folds = []
            for tr, te in splits:
                folds.append((_fold_model if reuse else _fold)(pipe, X_dev, y_dev, tr, te))
                progress.advance()
            X_fit, y_fit = X_dev[: len(data.y)], y_dev[: len(data.y)]  # the training rows come first
        else:
            from joblib import Parallel, delayed, parallel_config

            X_fit, y_fit = data.X, data.y
            if jobs is None:
                jobs = default_jobs(X_all, len(splits)) if backend in ("loky", "threading") else -1
            with parallel_config(backend=backend, n_jobs=jobs):
                folds = []
                # Folds as they finish, for the progress line (Ray's and Dask's joblib backends return lists only).
                streamed = "generator" if backend in ("loky", "threading", "multiprocessing") else "list"
                for result in Parallel(return_as=streamed)(delayed(_fold_model if reuse else _fold)(
                        pipe, X_all, y_all, tr, te) for tr, te in splits):
                    folds.append(result)
                    progress.advance()
        cv_seconds = time.perf_counter() - t0

        per_fold = [fold_metrics(y_all[te], pred, proba, classes, n_classes)
                    for (_, te), (pred, proba, classes, *_) in zip(splits, folds, strict=True)]
        t0 = time.perf_counter()
        shipped_model = _evaluated_model(folds[0], X_all[splits[0][1]], data.class_names) if reuse else None
        if shipped_model is None:
            progress.status = "refitting on all images"
            progress.advance(0)
            # The shipped model predicts class names. Tensors need numeric labels: on a GPU it is relabelled.
            final = _refit(pipe, X_fit, y_fit if on_gpu else np.asarray(data.class_names)[y_fit])
            shipped_model = _ship(final, data.class_names if on_gpu else None)
        final, best = shipped_model
        evaluation["refit"] = not reuse or final is not folds[0][3]  # False: the evaluated model, saved as it is
        progress.close()
    fit_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    final.predict(data.X[: min(len(data.X), 256)])
    predict_per_image = (time.perf_counter() - t0) / min(len(data.X), 256)

    # Out-of-fold predictions of the first repetition (every image exactly once).
    n_first = len(splits) // max(1, evaluation["repeats"])
    predictions, y_true, y_pred = [], [], []
    for f, ((_, te), (pred, proba, classes, *_)) in enumerate(zip(splits[:n_first], folds[:n_first],
                                                                   strict=True)):
        for j, i in enumerate(te):
            local = i if test_store is None else i - len(data.y)
            row = {"path": str(pred_paths[local]), "row": int(pred_rows[local]),
                   "label": data.class_names[y_all[i]], "predicted": data.class_names[pred[j]],
                   "correct": bool(y_all[i] == pred[j]), "fold": f}
            if proba is not None:
                full = np.zeros(n_classes)
                full[classes] = proba[j]
                row.update({f"p_{c}": round(float(p), 6) for c, p in zip(data.class_names, full, strict=True)})
            predictions.append(row)
            y_true.append(y_all[i])
            y_pred.append(pred[j])
    metrics = _metrics(model, spec, data, evaluation, per_fold, np.array(y_true), np.array(y_pred), {
        "extract_seconds": float(data.store.attrs.get("extract_seconds", 0.0)), "cv_seconds": cv_seconds,
        "fit_seconds": fit_seconds, "predict_seconds_per_image": predict_per_image}, fit_device)
    if device_note:
        metrics["device_note"] = device_note
    if notes:
        metrics["notes"] = notes
    metrics["best_params"] = best  # what an inner search chose (logreg's C, --search); None when nothing was chosen
    scored = test.store if test_store is not None else data.store
    record = Evaluation(
        "held-out" if test_store is not None else "cv" if evaluation["strategy"] == "cv" else "holdout-split",
        getattr(scored, "url", "") or str(scored.path.resolve()), str(scored.root), len(predictions),
        max(len(tr) for tr, _ in splits), details=evaluation)
    metrics["evaluation"] = record.to_dict()  # as metrics.json holds it
    save_run(run_dir, final, model=model, params=params, store=data.store, metrics=metrics, evaluation=record,
             predictions=predictions, identity=identity)
    return FitResult(run_dir, model, final, metrics, predictions)


def _with_duplicates(data: Dataset, group_keys: np.ndarray | None) -> np.ndarray:
    """Group keys that also keep every duplicate cluster together (merged with the user's groups)."""
    from embedfit.auditing import duplicate_groups

    clusters = duplicate_groups(data.store, data.rows)
    if group_keys is None:
        return clusters
    from embedfit.auditing import components

    pairs = []  # a user group and a duplicate cluster that share an image become one group
    for keys in (clusters, group_keys):
        first: dict[Any, int] = {}
        pairs += [(first.setdefault(k, i), i) for i, k in enumerate(keys)]
    return components(len(clusters), pairs)


def _duplicate_warning(data: Dataset, splits: list[tuple[np.ndarray, np.ndarray]], evaluation: dict[str, Any],
                       test: Dataset | None) -> list[str]:
    """A one-line note when identical images sit on both sides of a split (they inflate the score)."""
    from embedfit.auditing import content_keys, exact_duplicates_across

    keys, _ = content_keys(data.store, data.rows, data.X)
    if test is not None:
        pairs = exact_duplicates_across(keys, other_keys=content_keys(test.store, test.rows, test.X)[0])
        where = "in the training store and the test store"
        example = (data.paths[pairs[0][0]], test.paths[pairs[0][1]]) if pairs else None
    else:
        folds = np.full(len(data.y), -1)
        for f, (_, te) in enumerate(splits[: len(splits) // max(1, evaluation["repeats"])]):
            folds[te] = f
        pairs = exact_duplicates_across(keys, folds)
        where = "on both sides of a split"
        example = (data.paths[pairs[0][0]], data.paths[pairs[0][1]]) if pairs else None
    if not pairs:
        return []
    return [f"{len(pairs)} exact duplicate image(s) sit {where} (e.g. {example[0]} = {example[1]}), which inflates "
            f"the score: run `embedfit audit {data.store.path}`, then fit with `group_duplicates` or `exclude`"]


def _ship(pipeline: Pipeline, class_names: list[str] | None) -> tuple[Pipeline, dict[str, Any] | None]:
    """The fitted pipeline as it is saved: its classifier without the selection machinery (`shipped`, whose
    chosen parameters come back too), relabelled to predict `class_names` when it was fitted on indices."""
    clf, best = shipped(pipeline[-1])  # its `score` is accuracy
    pipeline.steps[-1] = (pipeline.steps[-1][0], clf)
    if class_names is not None:
        name_classes(clf, class_names)
    return pipeline, best


def _evaluated_model(fold: tuple[Any, ...], X_test: np.ndarray, class_names: list[str]
                     ) -> tuple[Pipeline, dict[str, Any] | None] | None:
    """The model a hold-out store was scored with, fitted on indices, relabelled to predict class names: the final
    model, as it was trained on every training image. None when the relabelled model does not predict the
    hold-out images as it did (a custom estimator that keeps its labels elsewhere): then the caller refits."""
    pred, _, _, pipeline = fold
    pipeline, best = _ship(pipeline, class_names)
    if not np.array_equal(pipeline.predict(X_test), np.asarray(class_names)[pred]):
        return None
    return pipeline, best


# Features (rows x dims) below which folds run one after the other: starting joblib's worker processes (each
# importing NumPy, SciPy and scikit-learn) costs more than parallel folds save on small data
# (benchmarks/bench_startup.py times `embedfit fit` on a 245 x 1280 store).
PARALLEL_MIN_VALUES = 2_000_000


def default_jobs(X: np.ndarray, n_splits: int) -> int:
    """Parallel folds on this machine: none on small data (`PARALLEL_MIN_VALUES`), else one per core, while the
    folds' copies of X take at most half the RAM."""
    from embedfit.extraction.settings import available_cores

    if X.size < PARALLEL_MIN_VALUES:
        return 1
    cores = available_cores()
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on Linux: be conservative
        return 1
    jobs = min(cores, n_splits)
    while jobs > 1 and 2 * jobs * X.nbytes > available / 2:
        jobs -= 1
    return max(jobs, 1)


def _register_backend(backend: str, ray_address: str | None = None) -> None:
    if ray_address is not None and backend != "ray":
        raise UsageError(f"`ray_address` needs `backend` ray, got `backend` {backend}")
    if backend == "ray":
        try:
            import ray
            from ray.util.joblib import register_ray
        except ImportError:
            raise UsageError("`backend` ray needs Ray: pip install 'embedfit[ray]'") from None
        if ray_address is not None and not ray.is_initialized():  # before joblib's backend starts its own
            try:
                ray.init(address=ray_address, log_to_driver=False)
            except Exception as exc:  # ConnectionError, ValueError for a malformed address, ...
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise InputError(f"`ray_address` {ray_address}: cannot connect to a Ray cluster ({first})") from None
        register_ray()
    elif backend == "dask":
        try:
            import distributed  # noqa: F401  (registers joblib's dask backend)
        except ImportError:
            raise UsageError("`backend` dask needs dask.distributed: pip install distributed") from None
    elif backend not in ("loky", "threading", "multiprocessing"):
        raise UsageError(f"unknown backend '{backend}'; choose loky, threading, ray or dask")


def _metrics(model: str, spec: BackboneSpec, data: Dataset, evaluation: dict[str, Any],
             per_fold: list[dict[str, float]], y_true: np.ndarray, y_pred: np.ndarray,
             timing: dict[str, float], device: str = "cpu") -> dict[str, Any]:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    n_classes = len(data.class_names)
    names = [k for k in per_fold[0] if all(k in f for f in per_fold)]
    scores = {k: {"mean": float(np.mean([f[k] for f in per_fold])), "std": float(np.std([f[k] for f in per_fold])),
                  "folds": [f[k] for f in per_fold]} for k in names}
    p, r, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=np.arange(n_classes),
                                                        zero_division=0)
    return {
        "model": model, "backbone": spec.short(), "n_samples": len(data.y),
        "store": getattr(data.store, "url", "") or str(data.store.path.resolve()),  # a URL on object storage
        "n_excluded": int(data.excluded), "n_classes": n_classes, "class_names": data.class_names,
        "evaluation": evaluation, "scores": scores,
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f1[i]),
                          "support": int(support[i])} for i, c in enumerate(data.class_names)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=np.arange(n_classes)).tolist(),
        "timing": timing, "device": device,
    }
