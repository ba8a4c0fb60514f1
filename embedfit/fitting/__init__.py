"""Fitting: scikit-learn models on stored embeddings.

    registry     the classifier registry: one `Classifier` record per model (no scikit-learn imported)
    zoo          embedfit's own records (logreg, svm, ...)
    models       a record as a Pipeline: scaler -> optional PCA -> classifier; any user estimator
    data         the rows you can train on (`load_dataset`) and the checks that they can be fitted
    evaluate     `fit()` with `FitConfig`: cross-validation or hold-out, refit, run directory
    device       fitting on a GPU through scikit-learn's array API
    out_of_core  `fit_out_of_core()`: the streaming records (sgd-logreg, sgd-svm) on stores larger than memory

Loaded lazily: `import embedfit.fitting` imports no scikit-learn until a name is used.
"""

from __future__ import annotations

from embedfit._lazy import attach

_LAZY = {
    "Classifier": "registry", "Streaming": "registry", "register_classifier": "registry", "get_classifier": "registry",
    "classifier_names": "registry", "trusted_types": "registry",
    "DEFAULT_MODEL": "models",
    "make_pipeline": "models", "check_model_name": "models", "resolve_model": "models", "wrap_estimator": "models",
    "Dataset": "data", "load_dataset": "data",
    "FitConfig": "evaluate", "FitResult": "evaluate", "fit": "evaluate", "make_splits": "evaluate",
    "fold_metrics": "evaluate", "default_jobs": "evaluate",
    "array_api_ready": "device", "resolve_fit_device": "device",
    "fit_out_of_core": "out_of_core",
}

__getattr__, __dir__, __all__ = attach(__name__, _LAZY)
