"""The classifier registry: each classifier of the model zoo is one record. Imports neither scikit-learn nor the zoo.

A `Classifier` record holds the name, a builder, the search grid, whether the model runs on torch tensors through
scikit-learn's array API, whether PCA goes first, and the types its saved model may hold beyond skops' defaults.
`make_pipeline` wraps what the builder returns (scaler, PCA, grid search); `trusted_types()` is the union of the
records' types, the allow-list the run directory loads models with. A record with `stream` instead of `build` is
fitted out of core: `fit_out_of_core` streams the store through the `partial_fit` of what `stream.build` returns.

`SHIPPED` names the module of embedfit's own records, imported on the first lookup, in the manner of timm's
`_registry.py`: the names are checked without scikit-learn (the builders import it when called). Adding a
classifier: one record (`register_classifier(Classifier(...))`) in `embedfit/fitting/zoo.py`, or anywhere that
is imported before use.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from embedfit.errors import UsageError

if TYPE_CHECKING:
    from sklearn.base import BaseEstimator

SHIPPED = "embedfit.fitting.zoo"


# What `make_pipeline` itself adds around every classifier (an explicit grid search's folds and scorer).
PIPELINE_TYPES = (
    "sklearn.metrics._scorer._PassthroughScorer",
    "sklearn.model_selection._split.StratifiedKFold",
)


# What a CalibratedClassifierCV holds once fitted: svm's, and the one `fit_out_of_core` puts around a `Streaming`
# model with `calibrate`.
CALIBRATION_TYPES = (
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.calibration._TemperatureScaling",
)


@dataclass
class BuildContext:
    """What a builder may adapt the classifier to.

    Attributes:
        class_weight: "balanced" or None.
        seed: Random state of every randomised step.
        n_samples: Training-set size.
        n_train: Size of the smallest training set the pipeline will be fitted on (a CV fold's).
        inner_folds: Folds an inner CV of the model (its own C, a calibration) can use; < 2: none.
        search: The pipeline wraps the model in a grid search over `Classifier.grid` (a self-tuning *CV model
            should then return its plain counterpart).
        array_api: Build the variant that runs on torch tensors (only asked of records with `array_api`).
        notes: Receives a line for each setting changed to fit small data.
    """

    class_weight: str | None
    seed: int
    n_samples: int
    n_train: int
    inner_folds: int
    search: bool = False
    array_api: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass
class StreamContext:
    """What a streaming builder may adapt the classifier to (`Streaming.build`).

    Attributes:
        n_features: Embedding dimension.
        n_samples: Rows it will be trained on.
        epochs: Passes over those rows it will get.
        class_weight: Weight per class index (`partial_fit` takes no "balanced": it is computed from the labels),
            or None.
        alpha: Regularisation strength.
        seed: Random state.
    """

    n_features: int
    n_samples: int
    epochs: int
    class_weight: dict[int, float] | None
    alpha: float
    seed: int


@dataclass(frozen=True)
class Streaming:
    """How a classifier streams a store larger than memory (`fit_out_of_core`).

    A first pass fits a `StandardScaler` with `partial_fit`; then the estimator `build` returns gets
    `partial_fit(X, y, classes=...)` on standardised, shuffled chunks for `epochs` passes.

    Attributes:
        build: `StreamContext -> estimator` with `partial_fit` (imports scikit-learn when called).
        calibrate: Its probabilities are a temperature-scaled softmax over its `decision_function`, fitted on a
            block of rows it never trains on (`CALIBRATION_TYPES` join `trusted_types`). Otherwise it has the
            probabilities of its own `predict_proba`, or none.
    """

    build: Callable[[StreamContext], BaseEstimator]
    calibrate: bool = False


@dataclass(frozen=True)
class Classifier:
    """One classifier of the model zoo: fitted in memory (`build`) or streamed out of core (`stream`).

    Attributes:
        name: The name `fit` (or `fit_out_of_core`) and the command line take.
        build: `BuildContext -> estimator` (imports scikit-learn when called); None for a streaming record.
        grid: Search grid, keys relative to the estimator `build` returns under `search`.
        array_api: Its pipeline runs on torch tensors through scikit-learn's array API (and so on a GPU).
        labels_on_host: With `array_api`, its labels stay a NumPy array while the features go to the GPU (the
            estimator moves what it needs itself). Ridge's class weights come from `compute_sample_weight`, which
            converts the labels with NumPy and so fails on a CUDA tensor (scikit-learn 1.9.1).
        pca_first: `pca="auto"` puts PCA to `AUTO_PCA_DIM` dimensions in front (kernel and neighbour models).
        types: Types its saved model holds beyond skops' defaults (the load allow-list, `trusted_types`).
        stream: How it streams a store larger than memory; such a record has no `build` (`embedfit fit` sends
            its name to `fit_out_of_core`).

    Raises:
        UsageError: Neither or both of `build` and `stream`.
    """

    name: str
    build: Callable[[BuildContext], BaseEstimator] | None = None
    grid: dict[str, list[Any]] = field(default_factory=dict)
    array_api: bool = False
    labels_on_host: bool = False
    pca_first: bool = False
    types: tuple[str, ...] = ()
    stream: Streaming | None = None

    def __post_init__(self) -> None:
        if (self.build is None) == (self.stream is None):
            raise UsageError(f"classifier '{self.name}' needs either `build` (fitted in memory) or `stream` "
                             "(fitted out of core), not both or neither")


_CLASSIFIERS: dict[str, Classifier] = {}


def register_classifier(record: Classifier) -> Classifier:
    """Add `record` under its name (a later record of the same name replaces it)."""
    _CLASSIFIERS[record.name] = record
    return record


def _load() -> None:
    importlib.import_module(SHIPPED)  # registers embedfit's own records (once: later imports are cached)


def classifier_names(*, streaming: bool | None = None) -> tuple[str, ...]:
    """The registered names, embedfit's own first in their order.

    Args:
        streaming: True: only those fitted out of core (`Classifier.stream`); False: only those fitted in memory;
            None: all.
    """
    _load()
    return tuple(n for n, c in _CLASSIFIERS.items() if streaming is None or (c.stream is not None) == streaming)


def get_classifier(name: str) -> Classifier:
    """The record of `name`.

    Raises:
        UsageError: An unknown name (with close names).
    """
    _load()
    if name not in _CLASSIFIERS:
        close = difflib.get_close_matches(name, list(_CLASSIFIERS), n=2, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UsageError(f"unknown model '{name}'{hint} (choose from {', '.join(_CLASSIFIERS)})")
    return _CLASSIFIERS[name]


def array_api_names() -> tuple[str, ...]:
    """Names of the classifiers whose pipelines run on torch tensors (a GPU)."""
    return tuple(n for n in classifier_names() if _CLASSIFIERS[n].array_api)


def trusted_types() -> tuple[str, ...]:
    """Every type a model file of a registered classifier may hold beyond skops' defaults: the union of the
    records' `types`, `PIPELINE_TYPES` and (for streaming records that calibrate) `CALIBRATION_TYPES`, sorted.
    Loading a run trusts these (and scikit-learn's own classes)."""
    _load()
    calibrated = any(c.stream is not None and c.stream.calibrate for c in _CLASSIFIERS.values())
    return tuple(sorted({*PIPELINE_TYPES, *(CALIBRATION_TYPES if calibrated else ()),
                         *(t for c in _CLASSIFIERS.values() for t in c.types)}))
