"""The classifier registry: each classifier of the model zoo is one record. Imports neither scikit-learn nor the zoo.

A `Classifier` record holds the name, a builder, the search grid, whether the model runs on torch tensors through
scikit-learn's array API, whether PCA goes first, and the types its saved model may hold beyond skops' defaults.
`make_pipeline` wraps what the builder returns (scaler, PCA, grid search); `trusted_types()` is the union of the
records' types, the allow-list the run directory loads models with.

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


@dataclass(frozen=True)
class Classifier:
    """One classifier of the model zoo.

    Attributes:
        name: The name `fit` and the command line take.
        build: `BuildContext -> estimator` (imports scikit-learn when called).
        grid: Search grid, keys relative to the estimator `build` returns under `search`.
        array_api: Its pipeline runs on torch tensors through scikit-learn's array API (and so on a GPU).
        pca_first: `pca="auto"` puts PCA to `AUTO_PCA_DIM` dimensions in front (kernel and neighbour models).
        types: Types its saved model holds beyond skops' defaults (the load allow-list, `trusted_types`).
    """

    name: str
    build: Callable[[BuildContext], BaseEstimator]
    grid: dict[str, list[Any]] = field(default_factory=dict)
    array_api: bool = False
    pca_first: bool = False
    types: tuple[str, ...] = ()


_CLASSIFIERS: dict[str, Classifier] = {}


def register_classifier(record: Classifier) -> Classifier:
    """Add `record` under its name (a later record of the same name replaces it)."""
    _CLASSIFIERS[record.name] = record
    return record


def _load() -> None:
    importlib.import_module(SHIPPED)  # registers embedfit's own records (once: later imports are cached)


def classifier_names() -> tuple[str, ...]:
    """The registered names, embedfit's own first in their order."""
    _load()
    return tuple(_CLASSIFIERS)


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
    records' `types` and `PIPELINE_TYPES`, sorted. Loading a run trusts these (and scikit-learn's own classes)."""
    _load()
    return tuple(sorted({*PIPELINE_TYPES, *(t for c in _CLASSIFIERS.values() for t in c.types)}))
