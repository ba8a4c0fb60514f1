"""The run-directory contract: what a fitted run is on disk, written and read in one place.

    RUN/model.skops      a scikit-learn Pipeline (skops format, loaded only with a fixed allow-list of types), or
    RUN/model.pt         a fine-tuned network's state dict (kind "torch"; never a pickled module)
    RUN/model.json       sidecar: kind, BackboneSpec, store settings, class names, store fingerprint, versions
    RUN/metrics.json     scores (mean, std, per fold), per-class metrics, confusion matrix, timings
    RUN/predictions.csv  out-of-fold (or hold-out) predictions, one row per image
"""

from __future__ import annotations

import csv
import datetime as _dt
import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedfit._version import __version__
from embedfit.backbones.spec import BackboneSpec
from embedfit.errors import ModelFileError
from embedfit.store import FeatureStore, library_versions

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline


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


def untrusted_types(types: list[str]) -> list[str]:
    """The names among skops' untrusted `types` that embedfit refuses: all but `TRUSTED_TYPES` and scikit-learn's
    own classes (a class defined in a module under `sklearn.`). Functions and third-party types stay refused."""
    def sklearn_class(name: str) -> bool:
        module, _, attr = name.rpartition(".")
        if not module.startswith("sklearn."):
            return False
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            return False
        return isinstance(obj, type) and obj.__module__.startswith("sklearn.")

    return sorted(t for t in set(types) if t not in TRUSTED_TYPES and not sklearn_class(t))


def class_positions(labels: Any, class_names: list[str]) -> np.ndarray:
    """Positions in the run's `class_names` of labels a loaded model gives (`predict`'s output or `classes_`).

    Models fitted by this version predict class names; runs saved before predict class indices, which are
    their own positions (so old runs keep working with `embedfit predict` and this helper).
    """
    labels = np.asarray(labels)
    if labels.dtype.kind in "iu":
        return labels.astype(int)
    where = {name: i for i, name in enumerate(class_names)}
    return np.array([where[str(label)] for label in labels], dtype=int)


def save_run(run_dir: str | Path, pipeline: Pipeline, *, model: str, params: dict[str, Any], store: FeatureStore,
             metrics: dict[str, Any], predictions: list[dict[str, Any]]) -> Path:
    """Write model.skops, model.json, metrics.json and predictions.csv (the run-directory contract)."""
    import skops.io as sio

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model_path = run_dir / "model.skops"
    tmp = run_dir / ".model.skops.tmp"
    sio.dump(pipeline, tmp)
    untrusted = untrusted_types(sio.get_untrusted_types(file=tmp))
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

    The pipeline predicts class names (runs saved by earlier versions: class indices; `class_positions` maps both).

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
    unexpected = untrusted_types(untrusted)
    if unexpected:
        raise ModelFileError(f"{path} contains types outside embedfit's allow-list: {sorted(unexpected)[:3]}; "
                             "refusing to load it")
    try:
        pipeline = sio.load(path, trusted=sorted(untrusted))
    except Exception as exc:
        raise ModelFileError(f"cannot load {path}: {exc}") from None
    return pipeline, meta
