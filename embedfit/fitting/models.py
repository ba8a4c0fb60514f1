"""The model zoo: each name -> a scikit-learn `Pipeline` (scaler -> optional PCA -> classifier, optionally a
grid search), so preprocessing is learned inside each cross-validation fold."""

from __future__ import annotations

import difflib
import importlib
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from embedfit.errors import UsageError

if TYPE_CHECKING:  # scikit-learn is imported where a model is built: checking a name needs none of it
    from sklearn.base import BaseEstimator
    from sklearn.pipeline import Pipeline

MODELS = ("logreg", "svm", "linear-svm", "knn", "ridge", "lda", "rf", "mlp")


OOC_MODELS = ("sgd-logreg", "sgd-svm")  # streamed with partial_fit (`embedfit.fitting.out_of_core`)


SCALES = ("standard", "l2", "none")


DEFAULT_MODEL = "logreg"


AUTO_PCA_DIM = 256  # kernel/neighbour models: RBF-SVC and kNN on 1-4k-d features are slow and gain little


# Models whose pipelines (scaler, PCA, model, grid search) run on torch tensors through scikit-learn's array API,
# and so on a GPU. Checked with scikit-learn 1.9: LogisticRegressionCV, LDA(lsqr), SVC, LinearSVC, RF and MLP
# fail on tensors, and kNN converts them back to NumPy.
ARRAY_API_MODELS = ("logreg", "ridge")


LOGREG_CS = np.logspace(-4, 1, 6)


_LOGREG_SOLVER = {"max_iter": 1000, "tol": 1e-3}  # shared by the NumPy and the array-API logreg


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
        raise UsageError(f"`class_weight` must be balanced or none, got '{class_weight}'")
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
    from sklearn.pipeline import Pipeline

    check_model_name(model)
    class_weight = check_class_weight(class_weight)
    n_train = n_samples if n_train is None else n_train
    if pca == "none":  # as on the command line
        pca = None
    if pca == "auto":  # 0.6 n as before, and never more than the smallest training fold (e.g. --cv 2) holds
        pca = (min(AUTO_PCA_DIM, max(1, int(n_samples * 0.6)), n_train)
               if model in ("svm", "knn") and n_features > AUTO_PCA_DIM else None)
    elif pca is not None:
        if isinstance(pca, str) or int(pca) < 1:
            raise UsageError(f"`pca` must be a positive number of components, 'auto' or 'none', got {pca}")
        if int(pca) > min(n_features, n_train):
            raise UsageError(f"`pca` {pca} is too many components: at most {min(n_features, n_train)} here "
                             f"({n_features} features, {n_train} images in the smallest training set)")
    steps: list[tuple[str, Any]] = [("scale", _scaler(scale))]
    if pca:
        steps.append(("pca", PCA(n_components=int(pca), random_state=seed)))
    # Inner CVs need every class in each of their folds: at most as many folds as the smallest class has images.
    folds = 3 if min_class is None else min(3, min_class)
    inner = folds  # what the model's own inner CV (logreg's C, svm's calibration) can use
    if search:
        if folds < 2:
            raise UsageError("`search` needs at least 2 training images of every class; the smallest class has 1 "
                             "(add images, or leave out `search`)")
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


def _scaler(scale: str) -> Any:
    from sklearn.preprocessing import Normalizer, StandardScaler

    if scale not in SCALES:
        raise UsageError(f"unknown scaling '{scale}'; choose one of {', '.join(SCALES)}")
    return {"standard": StandardScaler(), "l2": Normalizer(), "none": "passthrough"}[scale]


def resolve_model(model: str | BaseEstimator) -> str | BaseEstimator:
    """A model zoo name as it is; an estimator checked to be a classifier; "pkg.module:Class" imported and
    constructed with its default arguments (e.g. "sklearn.ensemble:HistGradientBoostingClassifier").

    Raises:
        UsageError: An unknown name, a class that cannot be imported or constructed, or no classifier.
    """
    if not isinstance(model, str):
        _check_classifier(model, type(model).__name__)
        return model
    if ":" not in model:
        check_model_name(model)
        return model
    module_name, _, attr = model.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise UsageError(f"model '{model}': cannot import {module_name} ({str(exc).splitlines()[0]})") from None
    except (AttributeError, ValueError, TypeError):
        raise UsageError(f"model '{model}': {module_name} has no '{attr}'") from None
    try:
        estimator = cls()
    except Exception as exc:  # a function, or a class whose arguments have no defaults
        raise UsageError(f"model '{model}': cannot construct {attr}() with default arguments "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    _check_classifier(estimator, model)
    return estimator


def _check_classifier(estimator: Any, what: str) -> None:
    from sklearn.base import is_classifier

    try:
        ok = hasattr(estimator, "fit") and hasattr(estimator, "predict") and is_classifier(estimator)
    except Exception:  # not a scikit-learn estimator at all (no tags)
        ok = False
    if not ok:
        raise UsageError(f"model '{what}' is not a scikit-learn classifier (got a {type(estimator).__name__}); "
                         "give a classifier or a Pipeline ending in one")


def model_label(estimator: BaseEstimator) -> str:
    """The run's model name for an estimator: its class name in lower case (a Pipeline's: its last step's)."""
    from sklearn.pipeline import Pipeline

    last = estimator[-1] if isinstance(estimator, Pipeline) else estimator
    return type(last).__name__.lower()


def wrap_estimator(estimator: BaseEstimator, *, scale: str = "standard", pca: int | str | None = None,
                   seed: int = 0, n_features: int = 1280, n_train: int = 1000) -> Pipeline:
    """The fitted unit for a user's estimator: a Pipeline is used as given; a bare estimator gets `scale` (and
    an explicit `pca`; "auto" means none here) in front of it, so scaling is learned inside each fold."""
    from sklearn.base import clone
    from sklearn.decomposition import PCA
    from sklearn.pipeline import Pipeline

    if isinstance(estimator, Pipeline):
        return clone(estimator)
    steps: list[tuple[str, Any]] = [("scale", _scaler(scale))]
    if pca not in (None, "none", "auto"):
        if isinstance(pca, str) or int(pca) < 1 or int(pca) > min(n_features, n_train):
            raise UsageError(f"`pca` must be a number of components from 1 to {min(n_features, n_train)}, 'auto' "
                             f"or 'none', got {pca}")
        steps.append(("pca", PCA(n_components=int(pca), random_state=seed)))
    steps.append(("clf", clone(estimator)))
    return Pipeline(steps)


def name_classes(classifier: Any, class_names: list[str]) -> None:
    """Relabel a classifier fitted on class indices 0..k-1 so that it predicts class names, in place.

    For the linear models fitted on indices (on a GPU through the array API, which needs numeric labels, and
    SGD streamed with `partial_fit`): they predict `classes_[argmax]`; ridge keeps a copy in its label binarizer.
    """
    for target in (classifier, getattr(classifier, "_label_binarizer", None)):
        if hasattr(target, "classes_"):
            target.classes_ = np.asarray(class_names)[np.asarray(target.classes_, dtype=int)]


def shipped(classifier: Any) -> tuple[Any, dict[str, Any] | None]:
    """The fitted classifier to save, without its selection machinery, and the parameters the selection chose.

    A search (`GridSearchCV`) ships its best estimator. Logreg's `LogisticRegressionCV` ships as the plain
    `LogisticRegression` it chose (same C, coefficients and predictions): its `score` would otherwise be the
    log loss it selected C by, where a scikit-learn classifier's `score` is accuracy.
    """
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

    best = None
    if hasattr(classifier, "best_estimator_"):
        best = {k: (list(v) if isinstance(v, tuple) else v) for k, v in classifier.best_params_.items()}
        classifier = classifier.best_estimator_
    if isinstance(classifier, LogisticRegressionCV):
        c = float(np.ravel(classifier.C_)[0])
        plain = LogisticRegression(C=c, class_weight=classifier.class_weight, solver=classifier.solver,
                                   max_iter=classifier.max_iter, tol=classifier.tol,
                                   fit_intercept=classifier.fit_intercept, random_state=classifier.random_state)
        for name in ("classes_", "coef_", "intercept_", "n_features_in_", "n_iter_", "feature_names_in_"):
            if hasattr(classifier, name):
                setattr(plain, name, getattr(classifier, name))
        classifier, best = plain, {"C": c}
    return classifier, best


def check_savable(estimator: BaseEstimator) -> None:
    """Refuse, before any fitting, an estimator holding types that saving would refuse (`runs.untrusted_types`):
    a model file must load without trusting third-party code."""
    from embedfit.runs import skops_io

    sio = skops_io()

    from embedfit.runs import _own_audit, untrusted_types

    try:
        with _own_audit():
            found = sio.get_untrusted_types(data=sio.dumps(estimator))
    except Exception:  # skops cannot describe it unfitted: saving checks the fitted model all the same
        return
    refused = untrusted_types(found)
    if refused:
        raise UsageError(f"cannot save {model_label(estimator)} safely: its model file would need "
                         f"{', '.join(refused[:3])}, outside embedfit's allow-list (scikit-learn's classes and "
                         "runs.TRUSTED_TYPES); use scikit-learn estimators")
