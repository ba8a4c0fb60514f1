"""Fit, cross-validate and save scikit-learn classifiers on stored embeddings.

The fitted unit is always a scikit-learn `Pipeline` (scaling and optional PCA inside it), so preprocessing is
learned inside each cross-validation fold. `fit()` evaluates a model honestly (stratified, optionally grouped
and repeated k-fold, or a hold-out store), refits it on all data and writes a run directory:

    RUN/model.skops      the Pipeline (skops format, loaded only with a fixed allow-list of types)
    RUN/model.json       sidecar: BackboneSpec, store settings, class names, store fingerprint, versions
    RUN/metrics.json     scores (mean, std, per fold), per-class metrics, confusion matrix, timings
    RUN/predictions.csv  out-of-fold (or hold-out) predictions, one row per image
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import difflib
import json
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, clone
from sklearn.pipeline import Pipeline

from embedfit import __version__
from embedfit.backbones import BackboneSpec
from embedfit.errors import InputError, ModelFileError, StoreMismatchError, UsageError, check_output_dir
from embedfit.store import FeatureStore, library_versions

log = logging.getLogger(__name__)

MODELS = ("logreg", "svm", "linear-svm", "knn", "ridge", "lda", "rf", "mlp")
SCALES = ("standard", "l2", "none")
DEFAULT_MODEL = "logreg"
AUTO_PCA_DIM = 256  # kernel/neighbour models: RBF-SVC and kNN on 1-4k-d features are slow and gain little
# Models whose pipelines (scaler, PCA, model, grid search) run on torch tensors through scikit-learn's array API,
# and so on a GPU. Checked with scikit-learn 1.9: LogisticRegressionCV, LDA(lsqr), SVC, LinearSVC, RF and MLP
# fail on tensors, and kNN converts them back to NumPy.
ARRAY_API_MODELS = ("logreg", "ridge")
LOGREG_CS = np.logspace(-4, 1, 6)
_LOGREG_SOLVER = {"max_iter": 1000, "tol": 1e-3}  # shared by the NumPy and the array-API logreg

# Types outside skops' default trusted set that embedfit's own pipelines contain. Loading refuses anything else.
TRUSTED_TYPES = (
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.metrics._dist_metrics.EuclideanDistance64",
    "sklearn.metrics._scorer._PassthroughScorer",
    "sklearn.model_selection._split.StratifiedKFold",
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.neighbors._ball_tree.BallTree",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.tree._tree.Tree",
)

# Search grids: the hyper-parameters that matter for each model (keys relative to the "clf" step).
GRIDS: dict[str, dict[str, list[Any]]] = {
    "logreg": {"C": [0.001, 0.01, 0.1, 1.0, 10.0]},
    "svm": {"estimator__C": [0.3, 1.0, 3.0, 10.0, 30.0], "estimator__gamma": ["scale", 0.3, 3.0]},
    "linear-svm": {"C": [0.0001, 0.001, 0.01, 0.1, 1.0]},
    "knn": {"n_neighbors": [3, 5, 10, 20], "weights": ["uniform", "distance"]},
    "ridge": {"alpha": [0.1, 1.0, 10.0, 100.0, 1000.0]},
    "lda": {"shrinkage": ["auto", 0.01, 0.1, 0.5]},
    "rf": {"max_features": ["sqrt", 0.1], "min_samples_leaf": [1, 3]},
    "mlp": {"alpha": [1e-4, 1e-3, 1e-2], "hidden_layer_sizes": [(256,), (512,)]},
}


def check_model_name(model: str) -> None:
    """Raise a UsageError with suggestions for an unknown model name."""
    if model not in MODELS:
        close = difflib.get_close_matches(model, MODELS, n=2, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UsageError(f"unknown model '{model}'{hint} (choose from {', '.join(MODELS)})")


def check_class_weight(class_weight: str | None) -> str | None:
    """"balanced" or None; "none" (the command line's spelling) is None."""
    if class_weight is None or class_weight == "none":
        return None
    if class_weight != "balanced":
        raise UsageError(f"--class-weight must be balanced or none, got '{class_weight}'")
    return class_weight


def _classifier(model: str, class_weight: str | None, seed: int, n_samples: int, n_train: int,
                inner_folds: int) -> BaseEstimator:
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV, RidgeClassifierCV
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.svm import SVC, LinearSVC

    if model == "logreg":  # the linear probe: C chosen by an inner (3-fold) CV on log loss
        if inner_folds < 2:  # a class with one training image: no inner CV can hold it out
            return LogisticRegression(C=1.0, class_weight=class_weight, **_LOGREG_SOLVER)
        return LogisticRegressionCV(Cs=LOGREG_CS, cv=inner_folds, scoring="neg_log_loss",
                                    class_weight=class_weight, l1_ratios=(0.0,), use_legacy_attributes=False,
                                    **_LOGREG_SOLVER)
    if model == "svm":
        # Calibrated on held-out folds instead of the deprecated SVC(probability=True). Two folds, fitted in
        # parallel: an ensemble of two SVCs on halves costs half of one SVC on everything (kernel SVMs scale
        # ~n^2), 3x less than three folds on 10k x 1280 for -1.3 points of accuracy (benchmarks/bench_fit.py).
        svc = SVC(C=3.0, gamma="scale", class_weight=class_weight, cache_size=1000, tol=1e-3, random_state=seed)
        return svc if inner_folds < 2 else CalibratedClassifierCV(svc, cv=2, method="sigmoid", n_jobs=-1)
    if model == "linear-svm":
        # The dual solver is ~4x faster than the primal at small C. C shrinks as 1/n beyond 1000 images, which
        # keeps the per-image regularisation fixed (as SGD's alpha does): 10k x 1280 fits in ~3 s, not ~8.
        return LinearSVC(C=0.01 * min(1.0, 1000 / max(n_samples, 1)), dual=True, tol=1e-2, max_iter=2000,
                         class_weight=class_weight, random_state=seed)
    if model == "knn":
        return KNeighborsClassifier(n_neighbors=max(1, min(10, n_samples // 10, n_train)), weights="distance")
    if model == "ridge":
        return RidgeClassifierCV(alphas=np.logspace(-1, 4, 6), class_weight=class_weight)
    if model == "lda":
        return LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")
    if model == "rf":
        # Quarter-size bootstrap samples on large sets: ~6x faster than full-size ones on 10k x 1280, -2 points
        # of accuracy; small sets keep full-size ones (speed is no issue there, every image counts).
        return RandomForestClassifier(n_estimators=200, max_samples=0.25 if n_samples >= 4000 else None, n_jobs=-1,
                                      class_weight=class_weight, random_state=seed)
    # Stop after 5 epochs without validation gain (not 10): 30% less time on 10k x 1280, same accuracy.
    return MLPClassifier(hidden_layer_sizes=(256,), alpha=1e-3, early_stopping=n_samples >= 100, max_iter=300,
                         n_iter_no_change=5, random_state=seed)


def make_pipeline(model: str = DEFAULT_MODEL, *, scale: str = "standard", pca: int | str | None = "auto",
                  class_weight: str | None = "balanced", seed: int = 0, n_samples: int = 1000,
                  n_features: int = 1280, search: bool = False, array_api: bool = False,
                  n_train: int | None = None, min_class: int | None = None,
                  notes: list[str] | None = None) -> Pipeline:
    """A classifier Pipeline: scaler -> optional PCA -> model (-> grid search when `search`).

    Args:
        model: One of `MODELS`.
        scale: "standard" (z-score), "l2" (unit-norm rows) or "none".
        pca: Number of components, None or "none" for no PCA, or "auto" (PCA to 256 dims for svm and knn only).
        class_weight: "balanced" or None ("none" is None too; models without class weights ignore it).
        seed: Random state of every randomised step.
        n_samples: Training-set size, to keep PCA and kNN sizes valid on small data.
        n_features: Embedding dimension.
        search: Wrap the model in a GridSearchCV over `GRIDS[model]` (nested CV when cross-validated).
        array_api: Build the variant that runs on torch tensors (`ARRAY_API_MODELS` only): logreg's inner CV
            becomes a GridSearchCV over the same Cs, folds and log loss as LogisticRegressionCV's.
        n_train: Size of the smallest training set the pipeline will be fitted on (e.g. a CV fold's; default
            `n_samples`): PCA and kNN sizes must fit it.
        min_class: Images of the smallest class in that training set (None: plenty). Inner CVs (logreg's C,
            svm's calibration, `search`) use fewer folds to fit it; with one image logreg keeps C=1.0 and svm
            gives no probabilities.
        notes: Receives a line for each setting changed to fit small data.

    Raises:
        UsageError: Unknown options, a `pca` larger than the data allows, or `search` with a one-image class.
    """
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import Normalizer, StandardScaler

    check_model_name(model)
    if scale not in SCALES:
        raise UsageError(f"unknown scaling '{scale}'; choose one of {', '.join(SCALES)}")
    class_weight = check_class_weight(class_weight)
    n_train = n_samples if n_train is None else n_train
    if pca == "none":  # as on the command line
        pca = None
    if pca == "auto":  # 0.6 n as before, and never more than the smallest training fold (e.g. --cv 2) holds
        pca = (min(AUTO_PCA_DIM, max(1, int(n_samples * 0.6)), n_train)
               if model in ("svm", "knn") and n_features > AUTO_PCA_DIM else None)
    elif pca is not None:
        if isinstance(pca, str) or int(pca) < 1:
            raise UsageError(f"--pca must be a positive number of components, 'auto' or 'none', got {pca}")
        if int(pca) > min(n_features, n_train):
            raise UsageError(f"--pca {pca} is too many components: at most {min(n_features, n_train)} here "
                             f"({n_features} features, {n_train} images in the smallest training set)")
    scaler = {"standard": StandardScaler(), "l2": Normalizer(), "none": "passthrough"}[scale]
    steps: list[tuple[str, Any]] = [("scale", scaler)]
    if pca:
        steps.append(("pca", PCA(n_components=int(pca), random_state=seed)))
    # Inner CVs need every class in each of their folds: at most as many folds as the smallest class has images.
    folds = 3 if min_class is None else min(3, min_class)
    inner = folds  # what the model's own inner CV (logreg's C, svm's calibration) can use
    if search:
        if folds < 2:
            raise UsageError("--search needs at least 2 training images of every class; the smallest class has 1 "
                             "(add images, or leave out --search)")
        if min_class is not None:  # the search's training folds hold fewer images of that class
            inner = min(3, min_class - math.ceil(min_class / folds))
    clf = _classifier(model, class_weight, seed, n_samples, n_train, inner)
    if notes is not None and inner < 2 and (model == "svm" or (model == "logreg" and not search)):
        notes.append(f"{model}: the smallest class has 1 image in a training set, too few for an inner CV; "
                     + ("C is fixed at 1.0" if model == "logreg" else "fitted without probabilities (needs 2 "
                        "to calibrate them)"))
    if array_api and model not in ARRAY_API_MODELS:
        raise UsageError(f"{model} cannot be fitted on torch tensors; array-API models: {', '.join(ARRAY_API_MODELS)}")
    if array_api and model == "logreg" and not search and inner >= 2:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import GridSearchCV

        clf = GridSearchCV(LogisticRegression(class_weight=class_weight, **_LOGREG_SOLVER),
                           {"C": list(LOGREG_CS)}, cv=inner, scoring="neg_log_loss")
    if search:
        from sklearn.model_selection import GridSearchCV, StratifiedKFold

        grid = GRIDS[model]
        # The *CV variants tune themselves; under an explicit search use their plain counterparts.
        if model == "logreg":
            from sklearn.linear_model import LogisticRegression

            clf = LogisticRegression(max_iter=1000, tol=1e-3, class_weight=class_weight)
        elif model == "ridge":
            from sklearn.linear_model import RidgeClassifier

            clf = RidgeClassifier(class_weight=class_weight)
        elif model == "svm" and inner < 2:  # the uncalibrated SVC: its own parameter names
            grid = {k.removeprefix("estimator__"): v for k, v in grid.items()}
        clf = GridSearchCV(clf, grid, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                           scoring="balanced_accuracy")
    steps.append(("clf", clf))
    return Pipeline(steps)


# ---------------------------------------------------------------------------------------------------
# Data and checks


@dataclass
class Dataset:
    """Embeddings of the usable images of a store."""

    X: np.ndarray
    y: np.ndarray
    paths: np.ndarray
    rows: np.ndarray  # row indices in the store
    class_names: list[str]
    store: FeatureStore
    excluded: int  # failed, missing or unlabeled images left out
    notes: list[str] = field(default_factory=list)  # what a user should know about the data (printed by the CLI)


def load_dataset(store: FeatureStore | str | Path) -> Dataset:
    """Load the labeled, embedded images of a store and check they can be fitted."""
    store = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
    if not store.class_names or (store.labels < 0).all():
        raise InputError(f"store {store.path} has no labels: extract from a class-per-subfolder tree or a CSV "
                         "with a label column to fit a classifier")
    rows = np.flatnonzero((store.status == 0) & (store.labels >= 0))
    X = store.features(rows)
    if not np.isfinite(X).all():
        bad = rows[~np.isfinite(X).all(axis=1)]
        raise InputError(f"store {store.path} has non-finite features for {len(bad)} image(s), e.g. "
                         f"{store.paths[bad[0]]}; re-extract with --precision fp32 or --overwrite")
    y = store.labels[rows]
    class_names, notes = list(store.class_names), []
    if not store.complete:
        notes.append(f"store {store.path} is incomplete (an interrupted extract): only {store.n_ok} images are "
                     "embedded so far; re-run embedfit extract to finish it")
    counts = np.bincount(y, minlength=len(class_names))
    if len(y) and not counts.all():  # e.g. a deleted class folder or a renamed CSV label: nothing to learn from
        empty = [c for c, n in zip(class_names, counts, strict=True) if n == 0]
        notes.append(f"{len(empty)} class(es) without usable images in the store left out: {', '.join(empty)}")
        keep = np.flatnonzero(counts)
        y = np.searchsorted(keep, y)  # labels renumbered over the classes kept
        class_names = [class_names[c] for c in keep]
    return Dataset(X, y, store.paths[rows], rows, class_names, store, len(store) - len(rows), notes)


def check_trainable(y: np.ndarray, class_names: Sequence[str], n_splits: int | None) -> None:
    """Refuse data that cannot be cross-validated, naming the class that is short."""
    present = np.unique(y)
    if len(present) < 2:
        found = f"one ({class_names[present[0]]})" if len(present) else "none with usable images"
        raise InputError(f"need at least two classes to fit a classifier, found {found}")
    if n_splits is not None:
        counts = np.bincount(y, minlength=len(class_names))
        short = [(class_names[c], int(counts[c])) for c in present if counts[c] < n_splits]
        if short:
            name, count = min(short, key=lambda s: s[1])
            if count < 2:  # no number of folds helps
                raise InputError(f"class '{name}' has 1 image; evaluating needs at least 2 per class (one to train "
                                 "on, one to test): add images, remove the class, or evaluate on a --test-store")
            raise InputError(f"class '{name}' has {count} image(s), fewer than the {n_splits} CV folds; use "
                             f"--cv {count} or add images")


def groups_from(spec: str | None, paths: np.ndarray) -> np.ndarray | None:
    """Group labels for grouped CV: a CSV (path,group) file, or a regex whose first group is the group key."""
    if spec is None:
        return None
    if spec.lower().endswith(".csv"):  # a file name, never a regex on image paths
        if not Path(spec).is_file():
            raise InputError(f"groups file {spec} does not exist")
        with open(spec, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"path", "group"} <= set(reader.fieldnames):
                raise InputError(f"groups file {spec} needs 'path' and 'group' columns")
            table = {row["path"]: row["group"] for row in reader}
        missing = [p for p in paths if p not in table]
        if missing:
            raise InputError(f"groups file {spec} has no group for {len(missing)} image(s), e.g. {missing[0]}")
        return np.array([table[p] for p in paths])
    try:
        pattern = re.compile(spec)
    except re.error as exc:
        raise UsageError(f"--groups is neither a CSV file nor a valid regex: {exc}") from None
    keys = []
    for p in paths:
        m = pattern.search(str(p))
        if m is None:
            raise InputError(f"--groups regex {spec!r} does not match {p}")
        keys.append(m.group(1) if m.groups() else m.group(0))
    return np.array(keys)


# ---------------------------------------------------------------------------------------------------
# Evaluation


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
    with _fitting(X):
        est = clone(pipe).fit(X[train], y[train])
        pred, proba = est.predict(X[test]), _proba(est, X[test])
        classes = est[-1].classes_ if hasattr(est[-1], "classes_") else np.unique(_numpy(y[train]))
    return _numpy(pred), _numpy(proba), _numpy(classes)


def _refit(pipe: Pipeline, X: Any, y: Any) -> Pipeline:
    """Fit a clone on everything; a pipeline fitted on tensors comes back with NumPy attributes, so that it
    predicts, saves and loads like any other."""
    with _fitting(X):
        return _numpy(clone(pipe).fit(X, y))


# ---------------------------------------------------------------------------------------------------
# Fitting on a GPU: scikit-learn's array API with torch tensors


def array_api_ready() -> bool:
    """Whether SciPy was imported in array-API mode, which scikit-learn's dispatch to torch needs.

    SciPy reads SCIPY_ARRAY_API=1 once, at import, so it must be in the environment before anything imports
    scipy (set it in the shell for the CLI, or in a notebook's first cell).
    """
    try:
        from scipy._lib import _array_api

        return bool(_array_api.SCIPY_ARRAY_API)
    except (ImportError, AttributeError):  # a SciPy that keeps it elsewhere: trust the environment
        return os.environ.get("SCIPY_ARRAY_API") == "1"


def resolve_fit_device(device: str, model: str) -> tuple[str, str | None]:
    """Where to fit `model`: ("cpu", note) or a CUDA device ("cuda", "cuda:1", None).

    "auto" picks the GPU when there is one, the model runs on tensors (`ARRAY_API_MODELS`) and SciPy is in
    array-API mode, else the CPU (with a note saying why, when a GPU was there). An explicit "cuda" that cannot
    be honoured is an error.
    """
    if device == "cpu":
        return "cpu", None
    if device != "auto" and not re.fullmatch(r"cuda(:\d+)?", device):
        raise UsageError(f"unknown fit device '{device}'; use auto, cpu, cuda or cuda:N")
    import torch

    if device == "auto":
        if not torch.cuda.is_available() or model not in ARRAY_API_MODELS:
            return "cpu", None
        if not array_api_ready():
            return "cpu", "fitted on the CPU: fitting on the GPU needs SCIPY_ARRAY_API=1 in the environment"
        return "cuda", None
    if model not in ARRAY_API_MODELS:
        raise UsageError(f"{model} cannot be fitted on a GPU (models that can: {', '.join(ARRAY_API_MODELS)}); "
                         "use --device cpu")
    from embedfit.extract import resolve_device

    resolve_device(device)  # the same checks as extraction's: CUDA is there, and so is device N
    if not array_api_ready():
        raise UsageError(f"--device {device} needs SciPy's array API: run with SCIPY_ARRAY_API=1 in the "
                         "environment (a notebook: set os.environ['SCIPY_ARRAY_API'] = '1' before any import)")
    return device, None


@contextlib.contextmanager
def _fitting(X: Any) -> Iterator[None]:
    """Around a fit on X: scikit-learn's array-API dispatch when X is a torch tensor, and its UserWarnings
    (e.g. convergence on small folds) silenced.

    Ctrl-C stops every model: scikit-learn's MLP instead catches it, warns and returns the half-trained network,
    which would then be scored and saved as if it were finished.
    """
    with contextlib.ExitStack() as stack:
        if not isinstance(X, np.ndarray):
            from sklearn import config_context

            stack.enter_context(config_context(array_api_dispatch=True))
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.filterwarnings("error", message="Training interrupted by user", category=UserWarning)
        try:
            yield
        except UserWarning as exc:
            if "Training interrupted by user" in str(exc):
                raise KeyboardInterrupt from exc
            raise


def _numpy(obj: Any) -> Any:
    """Tensors inside `obj` (an array, a fitted estimator, or containers of them) as NumPy arrays, in place."""
    if hasattr(obj, "__dlpack__") and not isinstance(obj, np.ndarray):  # a tensor, possibly on a GPU
        return obj.detach().cpu().numpy() if hasattr(obj, "detach") else np.asarray(obj)
    if isinstance(obj, BaseEstimator):
        for name, value in vars(obj).items():
            setattr(obj, name, _numpy(value))
        return obj
    if type(obj) in (list, tuple):
        return type(obj)(_numpy(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _numpy(v) for k, v in obj.items()}
    return obj


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
        raise UsageError(f"--cv must be at least 2, got {cv}")
    if repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {repeats}")
    dummy = np.zeros(len(y))
    if groups is not None:
        if len(np.unique(groups)) < cv:
            raise InputError(f"only {len(np.unique(groups))} groups for {cv} folds; use fewer folds")
        return [s for r in range(repeats) for s in
                StratifiedGroupKFold(cv, shuffle=True, random_state=seed + r).split(dummy, y, groups)]
    return list(RepeatedStratifiedKFold(n_splits=cv, n_repeats=repeats, random_state=seed).split(dummy, y))


def fit(
    store: str | Path | FeatureStore,
    model: str = DEFAULT_MODEL,
    *,
    output: str | Path | None = None,
    scale: str = "standard",
    pca: int | str | None = "auto",
    cv: int = 5,
    repeats: int = 1,
    groups: str | np.ndarray | None = None,
    test_store: str | Path | FeatureStore | None = None,
    test_size: float | None = None,
    search: bool = False,
    class_weight: str | None = "balanced",
    jobs: int | None = None,
    backend: str = "loky",
    device: str = "auto",
    seed: int = 0,
) -> FitResult:
    """Evaluate a classifier on a store's embeddings, refit it on all of them, and write a run directory.

    Args:
        store: The training feature store.
        model: One of `MODELS` (default: a logistic-regression linear probe with C chosen by inner CV).
        output: Run directory (default: runs/<store stem>-<model>).
        scale: "standard", "l2" or "none".
        pca: Components, None or "none", or "auto" (256 for svm/knn).
        cv: Folds of stratified k-fold cross-validation.
        repeats: Repetitions of the k-fold (or of the `test_size` split) with different shuffles.
        groups: Group key per image (array), a CSV of path,group, or a regex on paths; keeps groups within folds.
        test_store: Evaluate on this store instead of CV (same backbone required).
        test_size: Evaluate on a stratified hold-out share instead of CV.
        search: Grid-search the model's hyper-parameters (nested inside the outer CV).
        class_weight: "balanced" or None ("none").
        jobs: Parallel folds (joblib); None: one per core, up to the number of folds, when the features fit in
            memory that many times over (most models use one core per fit, so folds in parallel is what
            uses the others), else 1.
        backend: joblib backend: "loky", "threading", "ray" or "dask".
        device: "cpu", "cuda[:N]", or "auto": the GPU for `ARRAY_API_MODELS` when there is one and SciPy is in
            array-API mode (SCIPY_ARRAY_API=1), else the CPU. On a GPU, folds run one after the other.
        seed: Random state for splits and models.

    Returns:
        A `FitResult` with metrics and the fitted pipeline.
    """
    from joblib import Parallel, delayed, parallel_config

    check_model_name(model)
    class_weight = check_class_weight(class_weight)
    pca = None if pca == "none" else pca
    if test_store is not None and test_size is not None:
        raise UsageError("give either --test-store or --test-size, not both")
    if test_size is not None and not 0 < test_size < 1:
        raise UsageError(f"--test-size must be a fraction between 0 and 1, got {test_size}")
    holdout = test_store is not None or test_size is not None
    if holdout and groups is not None:
        raise UsageError("--groups keeps groups within CV folds; it does not combine with --test-size or --test-store")
    if test_store is not None and repeats != 1:
        raise UsageError("--repeats needs CV or --test-size; a --test-store is one fixed split")
    if repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {repeats}")
    if jobs == 0:
        raise UsageError("--jobs must be a positive number or -1 (all cores)")
    data = load_dataset(store)
    spec = data.store.spec
    run_dir = Path(output) if output else Path("runs") / f"{data.store.path.stem}-{model}"
    check_output_dir(run_dir)  # before the CV, not after it
    if test_store is not None:
        test_path = Path(test_store.path if isinstance(test_store, FeatureStore) else test_store)
        if test_path.exists() and test_path.samefile(data.store.path):
            raise UsageError(f"--test-store {test_path} is the training store itself: its score would be training "
                             "accuracy, not a hold-out one")
    # A hold-out share needs 2 images per class (one each side), CV one per fold, a hold-out store none.
    check_trainable(data.y, data.class_names, None if test_store is not None else 2 if test_size is not None else cv)
    fit_device, device_note = resolve_fit_device(device, model)
    on_gpu = fit_device != "cpu"
    _register_backend(backend)
    n_classes = len(data.class_names)
    notes = list(data.notes)
    if (run_dir / "model.json").is_file():
        notes.append(f"replacing the earlier run in {run_dir}")

    t0 = time.perf_counter()
    if test_store is not None:
        test = _aligned_test_set(test_store, data)
        notes += test.notes
        X_all, y_all = np.concatenate([data.X, test.X]), np.concatenate([data.y, test.y])
        splits = [(np.arange(len(data.y)), np.arange(len(data.y), len(y_all)))]
        pred_paths, pred_rows = test.paths, test.rows
        evaluation = {"strategy": "holdout", "n_splits": 1, "repeats": 1, "groups": False, "search": search,
                      "test_store": str(test.store.path.resolve())}
    else:
        X_all, y_all, pred_paths, pred_rows = data.X, data.y, data.paths, data.rows
        group_keys = groups if isinstance(groups, np.ndarray) else groups_from(groups, data.paths)
        if test_size is not None:
            from sklearn.model_selection import StratifiedShuffleSplit

            _check_test_size(test_size, data.y)
            # Repeated like the k-fold; the first split is train_test_split's with the same seed.
            splits = list(StratifiedShuffleSplit(repeats, test_size=test_size, random_state=seed)
                          .split(np.zeros(len(data.y)), data.y))
            evaluation = {"strategy": "holdout", "n_splits": 1, "repeats": repeats, "groups": False,
                          "search": search}
        else:
            splits = make_splits(data.y, cv=cv, repeats=repeats, groups=group_keys, seed=seed)
            evaluation = {"strategy": "cv", "n_splits": cv, "repeats": repeats,
                          "groups": group_keys is not None, "search": search}
    # Sizes that must fit every training set: PCA and kNN sizes, inner CV folds, lda's images per class.
    n_train = min(len(tr) for tr, _ in splits)
    train_counts = [np.bincount(y_all[tr]) for tr, _ in splits]
    for (tr, _), c in zip(splits, train_counts, strict=True) if model == "lda" else ():
        if len(tr) <= np.count_nonzero(c):
            raise UsageError(f"lda needs more training images than classes; a training set has {len(tr)} images "
                             f"of {np.count_nonzero(c)} classes: add images, or use another model")
    pipe = make_pipeline(model, scale=scale, pca=pca, class_weight=class_weight, seed=seed,
                         n_samples=len(data.y), n_features=data.X.shape[1], search=search, array_api=on_gpu,
                         n_train=n_train, min_class=min(int(c[c > 0].min()) for c in train_counts), notes=notes)
    for note in notes:
        log.warning("note: %s", note)
    if on_gpu:  # copied once; the GPU runs the folds one after the other
        import torch

        X_dev, y_dev = torch.as_tensor(X_all, device=fit_device), torch.as_tensor(y_all, device=fit_device)
        folds = [_fold(pipe, X_dev, y_dev, tr, te) for tr, te in splits]
        X_fit, y_fit = X_dev[: len(data.y)], y_dev[: len(data.y)]  # the training rows come first
    else:
        X_fit, y_fit = data.X, data.y
        if jobs is None:
            jobs = default_jobs(X_all, len(splits)) if backend in ("loky", "threading") else -1
        with parallel_config(backend=backend, n_jobs=jobs):
            folds = Parallel()(delayed(_fold)(pipe, X_all, y_all, tr, te) for tr, te in splits)
    cv_seconds = time.perf_counter() - t0

    per_fold = [fold_metrics(y_all[te], pred, proba, classes, n_classes)
                for (_, te), (pred, proba, classes) in zip(splits, folds, strict=True)]
    t0 = time.perf_counter()
    final = _refit(pipe, X_fit, y_fit)
    fit_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    final.predict(data.X[: min(len(data.X), 256)])
    predict_per_image = (time.perf_counter() - t0) / min(len(data.X), 256)

    # Out-of-fold predictions of the first repetition (every image exactly once).
    n_first = len(splits) // max(1, evaluation["repeats"])
    predictions, y_true, y_pred = [], [], []
    for f, ((_, te), (pred, proba, classes)) in enumerate(zip(splits[:n_first], folds[:n_first], strict=True)):
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
    if hasattr(final[-1], "best_estimator_"):  # --search, or logreg's inner CV on a GPU
        best = final[-1].best_params_
        metrics["best_params"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in best.items()}
        final.steps[-1] = ("clf", final[-1].best_estimator_)  # ship the model, not the search machinery
    params = {"scale": scale, "pca": pca, "class_weight": class_weight, "search": search, "seed": seed,
              "device": fit_device}
    save_run(run_dir, final, model=model, params=params, store=data.store, metrics=metrics,
             predictions=predictions)
    return FitResult(run_dir, model, final, metrics, predictions)


def _check_test_size(test_size: float, y: np.ndarray) -> None:
    """A stratified hold-out needs an image of every class on both sides (scikit-learn's rounding)."""
    n, k = len(y), len(np.unique(y))
    n_test = math.ceil(test_size * n)
    if n_test < k:
        raise UsageError(f"--test-size {test_size} gives {n_test} test images for {k} classes; a stratified "
                         f"hold-out needs one per class: use --test-size {math.ceil(100 * k / n) / 100} or more")
    if n - n_test < k:
        raise UsageError(f"--test-size {test_size} leaves {n - n_test} training images for {k} classes; use "
                         f"--test-size {math.floor(100 * (n - k) / n) / 100} or less")


def default_jobs(X: np.ndarray, n_splits: int) -> int:
    """Parallel folds on this machine: one per core, while the folds' copies of X take at most half the RAM."""
    from embedfit.extract import available_cores

    cores = available_cores()
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on Linux: be conservative
        return 1
    jobs = min(cores, n_splits)
    while jobs > 1 and 2 * jobs * X.nbytes > available / 2:
        jobs -= 1
    return max(jobs, 1)


def _register_backend(backend: str) -> None:
    if backend == "ray":
        try:
            from ray.util.joblib import register_ray
        except ImportError:
            raise UsageError("--backend ray needs Ray: pip install 'embedfit[ray]'") from None
        register_ray()
    elif backend == "dask":
        try:
            import distributed  # noqa: F401  (registers joblib's dask backend)
        except ImportError:
            raise UsageError("--backend dask needs dask.distributed: pip install distributed") from None
    elif backend not in ("loky", "threading", "multiprocessing"):
        raise UsageError(f"unknown backend '{backend}'; choose loky, threading, ray or dask")


def _aligned_test_set(test_store: str | Path | FeatureStore, train: Dataset) -> Dataset:
    """Load a hold-out store and map its labels onto the training classes by name."""
    test = load_dataset(test_store)
    diffs = test.store.spec.differences(train.store.spec)
    if diffs:
        raise StoreMismatchError(f"test store {test.store.path} has {test.store.spec.short()} features but the "
                                 f"training store has {train.store.spec.short()} ({'; '.join(diffs[:3])})")
    unknown = sorted(set(test.class_names[i] for i in np.unique(test.y)) - set(train.class_names))
    if unknown:
        raise StoreMismatchError(f"test store {test.store.path} has classes the training store lacks: "
                                 f"{', '.join(unknown)}")
    mapping = np.array([train.class_names.index(c) if c in train.class_names else -1 for c in test.class_names])
    test.y = mapping[test.y]
    return test


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
        "model": model, "backbone": spec.short(), "store": str(data.store.path.resolve()), "n_samples": len(data.y),
        "n_excluded": int(data.excluded), "n_classes": n_classes, "class_names": data.class_names,
        "evaluation": evaluation, "scores": scores,
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f1[i]),
                          "support": int(support[i])} for i, c in enumerate(data.class_names)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=np.arange(n_classes)).tolist(),
        "timing": timing, "device": device,
    }


# ---------------------------------------------------------------------------------------------------
# Run directories and model files


def save_run(run_dir: str | Path, pipeline: Pipeline, *, model: str, params: dict[str, Any], store: FeatureStore,
             metrics: dict[str, Any], predictions: list[dict[str, Any]]) -> Path:
    """Write model.skops, model.json, metrics.json and predictions.csv (the run-directory contract)."""
    import skops.io as sio

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model_path = run_dir / "model.skops"
    tmp = run_dir / ".model.skops.tmp"
    sio.dump(pipeline, tmp)
    untrusted = set(sio.get_untrusted_types(file=tmp)) - set(TRUSTED_TYPES)
    if untrusted:  # our own pipelines must only contain allow-listed types
        tmp.unlink()
        raise ModelFileError(f"refusing to save a model containing unvetted types: {sorted(untrusted)}")
    tmp.replace(model_path)
    sidecar = {
        "kind": "sklearn", "model": model, "params": params, "spec": store.spec.to_dict(),
        "settings": {"dtype": store.settings.dtype, "tta": store.settings.tta,
                     "precision": store.settings.precision},
        "class_names": list(metrics["class_names"]), "store": str(store.path.resolve()),  # usable from any cwd
        "store_fingerprint": store.fingerprint,
        "versions": library_versions(), "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "embedfit_version": __version__, "trusted_types": list(TRUSTED_TYPES),
    }
    (run_dir / "model.json").write_text(json.dumps(sidecar, indent=2, default=_json_default))
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default))
    write_predictions_csv(run_dir / "predictions.csv", predictions)
    return run_dir


def write_predictions_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = list(rows[0]) if rows else ["path", "row", "label", "predicted", "correct", "fold"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def read_sidecar(run_dir: str | Path) -> dict[str, Any]:
    """model.json of a run, with checks that it is one embedfit can use."""
    run_dir = Path(run_dir)
    path = run_dir / "model.json"
    if not run_dir.is_dir():
        raise ModelFileError(f"run directory {run_dir} does not exist")
    if not path.is_file():
        raise ModelFileError(f"{run_dir} is not an embedfit run directory (no model.json)")
    try:
        meta = json.loads(path.read_text())
        BackboneSpec.from_dict(meta["spec"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(f"{path} is damaged or not an embedfit model sidecar ({exc})") from None
    major = str(meta.get("embedfit_version", "0")).split(".")[0]
    if major != __version__.split(".")[0]:
        raise ModelFileError(f"{run_dir} was made by embedfit {meta.get('embedfit_version')}; this is "
                             f"{__version__} (different major version): refit the model")
    return meta


def load_model(run_dir: str | Path) -> tuple[Pipeline, dict[str, Any]]:
    """Load a run's pipeline without running untrusted code: only skops, only allow-listed types.

    Raises:
        ModelFileError: Missing files, a file that is not a skops archive (e.g. a pickle), or a skops file
            containing types outside `TRUSTED_TYPES`.
    """
    import skops.io as sio

    meta = read_sidecar(run_dir)
    if meta.get("kind") != "sklearn":
        raise ModelFileError(f"{run_dir} holds a {meta.get('kind')} model, not a scikit-learn pipeline")
    path = Path(run_dir) / "model.skops"
    if not path.is_file():
        raise ModelFileError(f"{path} is missing")
    try:
        untrusted = set(sio.get_untrusted_types(file=path))
    except Exception as exc:  # a pickle, a joblib file or garbage: never unpickle it
        raise ModelFileError(f"{path} is not a skops model file ({type(exc).__name__}); refusing to load it") \
            from None
    unexpected = untrusted - set(TRUSTED_TYPES)
    if unexpected:
        raise ModelFileError(f"{path} contains types outside embedfit's allow-list: {sorted(unexpected)[:3]}; "
                             "refusing to load it")
    try:
        pipeline = sio.load(path, trusted=sorted(untrusted))
    except Exception as exc:
        raise ModelFileError(f"cannot load {path}: {exc}") from None
    return pipeline, meta
