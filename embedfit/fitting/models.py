"""The model zoo: each name -> a scikit-learn `Pipeline` (scaler -> optional PCA -> classifier, optionally a
grid search), so preprocessing is learned inside each cross-validation fold."""

from __future__ import annotations

import importlib
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from embedfit.errors import UsageError
from embedfit.fitting.registry import BuildContext, Classifier, array_api_names, get_classifier

if TYPE_CHECKING:  # scikit-learn is imported where a model is built: checking a name needs none of it
    from sklearn.base import BaseEstimator
    from sklearn.pipeline import Pipeline




SCALES = ("standard", "l2", "none")


DEFAULT_MODEL = "logreg"


AUTO_PCA_DIM = 256  # kernel/neighbour models (`Classifier.pca_first`): RBF-SVC and kNN on 1-4k-d features are slow


def check_model_name(model: str) -> None:
    """Raise a UsageError with suggestions for an unknown model name, or for a model fitted out of core only (no
    scikit-learn imported)."""
    _in_memory(model)


def _in_memory(model: str) -> Classifier:
    record = get_classifier(model)
    if record.build is None:
        raise UsageError(f"{model} streams the store instead of loading it: fit it with "
                         "embedfit.fit_out_of_core (`embedfit fit -m` does so)")
    return record


def check_class_weight(class_weight: str | None) -> str | None:
    """"balanced" or None; "none" (the command line's spelling) is None."""
    if class_weight is None or class_weight == "none":
        return None
    if class_weight != "balanced":
        raise UsageError(f"`class_weight` must be balanced or none, got '{class_weight}'")
    return class_weight


def make_pipeline(model: str = DEFAULT_MODEL, *, scale: str = "standard", pca: int | str | None = "auto",
                  class_weight: str | None = "balanced", seed: int = 0, n_samples: int = 1000,
                  n_features: int = 1280, search: bool = False, array_api: bool = False,
                  n_train: int | None = None, min_class: int | None = None,
                  notes: list[str] | None = None) -> Pipeline:
    """A classifier Pipeline: scaler -> optional PCA -> model (-> grid search when `search`).

    Args:
        model: A registered classifier fitted in memory (`registry.classifier_names(streaming=False)`).
        scale: "standard" (z-score), "l2" (unit-norm rows) or "none".
        pca: Number of components, None or "none" for no PCA, or "auto" (PCA to 256 dims for the classifiers with
            `pca_first`: svm and knn).
        class_weight: "balanced" or None ("none" is None too; models without class weights ignore it).
        seed: Random state of every randomised step.
        n_samples: Training-set size, to keep PCA and kNN sizes valid on small data.
        n_features: Embedding dimension.
        search: Wrap the model in a GridSearchCV over its record's `grid` (nested CV when cross-validated).
        array_api: Build the variant that runs on torch tensors (records with `array_api` only): logreg's inner CV
            becomes a GridSearchCV over the same Cs, folds and log loss as LogisticRegressionCV's.
        n_train: Size of the smallest training set the pipeline will be fitted on (e.g. a CV fold's; default
            `n_samples`): PCA and kNN sizes must fit it.
        min_class: Images of the smallest class in that training set (None: plenty). Inner CVs (logreg's C,
            svm's calibration, `search`) use fewer folds to fit it; with one image logreg keeps C=1.0 and svm
            gives no probabilities.
        notes: Receives a line for each setting changed to fit small data.

    Raises:
        UsageError: Unknown options, a streaming model, a `pca` larger than the data allows, or `search` with a
            one-image class.
    """
    from sklearn.decomposition import PCA
    from sklearn.pipeline import Pipeline

    record = _in_memory(model)
    class_weight = check_class_weight(class_weight)
    n_train = n_samples if n_train is None else n_train
    if pca == "none":  # as on the command line
        pca = None
    if pca == "auto":  # 0.6 n as before, and never more than the smallest training fold (e.g. --cv 2) holds
        pca = (min(AUTO_PCA_DIM, max(1, int(n_samples * 0.6)), n_train)
               if record.pca_first and n_features > AUTO_PCA_DIM else None)
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
    if array_api and not record.array_api:
        raise UsageError(f"{model} cannot be fitted on torch tensors; array-API models: "
                         f"{', '.join(array_api_names())}")
    context = BuildContext(class_weight, seed, n_samples, n_train, inner, search=search, array_api=array_api)
    clf = record.build(context)
    if notes is not None:
        notes.extend(context.notes)
    if search:
        from sklearn.model_selection import GridSearchCV, StratifiedKFold

        clf = GridSearchCV(clf, _grid_for(clf, record.grid), scoring="balanced_accuracy",
                           cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    steps.append(("clf", clf))
    return Pipeline(steps)


def _grid_for(estimator: BaseEstimator, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """The grid in `estimator`'s parameter names: a wrapper's grid ("estimator__C") for the bare estimator a
    builder returns when the wrapper cannot be fitted (svm's uncalibrated SVC) loses the prefix."""
    params = estimator.get_params()
    return {k if k in params else k.removeprefix("estimator__"): v for k, v in grid.items()}


def _scaler(scale: str) -> Any:
    from sklearn.preprocessing import Normalizer, StandardScaler

    if scale not in SCALES:
        raise UsageError(f"unknown scaling '{scale}'; choose one of {', '.join(SCALES)}")
    return {"standard": StandardScaler(), "l2": Normalizer(), "none": "passthrough"}[scale]


def resolve_model(model: str | BaseEstimator) -> str | BaseEstimator:
    """A model zoo name as it is; an estimator checked to be a classifier; "pkg.module:Class" imported and
    constructed with its default arguments (e.g. "sklearn.ensemble:HistGradientBoostingClassifier").

    Raises:
        UsageError: An unknown name or one fitted out of core only, a class that cannot be imported or
            constructed, or no classifier.
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

    from embedfit.runs.trusted import untrusted_types

    try:
        found = sio.get_untrusted_types(data=sio.dumps(estimator))
    except Exception:  # skops cannot describe it unfitted: saving checks the fitted model all the same
        return
    refused = untrusted_types(found)
    if refused:
        raise UsageError(f"cannot save {model_label(estimator)} safely: its model file would need "
                         f"{', '.join(refused[:3])}, outside embedfit's allow-list (scikit-learn's classes and "
                         "fitting.registry.trusted_types()); use scikit-learn estimators")
