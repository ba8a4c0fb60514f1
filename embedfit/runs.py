"""The run-directory contract: what a fitted run is on disk, written and read in one place.

    RUN/model.skops      a scikit-learn Pipeline (skops format, loaded only with a fixed allow-list of types), or
    RUN/model.pt         a fine-tuned network's state dict (kind "torch"; never a pickled module)
    RUN/model.json       sidecar: kind, BackboneSpec, store settings, class names, store fingerprint, versions,
                         and what binds it to the model file: the file's SHA-256, the class count, and a SHA-256
                         over both hashes and the class names (editing or swapping either file is refused on load)
    RUN/metrics.json     scores (mean, std, per fold), per-class metrics, confusion matrix, timings
    RUN/predictions.csv  out-of-fold (or hold-out) predictions, one row per image
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import datetime as _dt
import hashlib
import importlib
import json
import sys
from collections.abc import Iterator, Sequence
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
    "sklearn.calibration._TemperatureScaling",
    "sklearn.metrics._dist_metrics.EuclideanDistance64",
    "sklearn.metrics._scorer._PassthroughScorer",
    "sklearn.model_selection._split.StratifiedKFold",
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.neighbors._ball_tree.BallTree",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.tree._tree.Tree",
)


def skops_io() -> Any:
    """`skops.io`, imported in a fraction of its usual time: without torch, and without scikit-learn's estimator list.

    At import, skops lists scikit-learn's estimators (`all_estimators`, which walks and imports every scikit-learn
    package, pytest included, ~0.6 s) for its default trust list, and walking `sklearn.externals.array_api_compat.
    torch` imports torch (seconds). While torch is not loaded, that one package is hidden for the import and restored
    at once. And the estimator list becomes `_SklearnTypeNames`, built on first use by any other caller of skops in
    this process (so its behaviour is unchanged), while embedfit's own checks (`_own_audit`) go without it: they
    trust every class defined in scikit-learn themselves (`untrusted_types`), a superset of that list.
    """
    if "skops.io" in sys.modules:
        return sys.modules["skops.io"]
    import sklearn.utils

    blocked = "sklearn.externals.array_api_compat.torch"
    hide = "torch" not in sys.modules and blocked not in sys.modules
    if hide:
        sys.modules[blocked] = None  # type: ignore[assignment]
    listing = sklearn.utils.all_estimators
    sklearn.utils.all_estimators = lambda *args, **kwargs: []  # type: ignore[assignment]
    try:
        import skops.io
        import skops.io._general
        import skops.io._trusted_types
    finally:
        sklearn.utils.all_estimators = listing
        if hide and sys.modules.get(blocked, 0) is None:
            del sys.modules[blocked]
    names = _SklearnTypeNames()
    for module in (skops.io._general, skops.io._trusted_types):
        if getattr(module, "SKLEARN_ESTIMATOR_TYPE_NAMES", None) == []:
            module.SKLEARN_ESTIMATOR_TYPE_NAMES = names
    return skops.io


_OWN_AUDIT = contextvars.ContextVar("embedfit_own_skops_audit", default=False)


@contextlib.contextmanager
def _own_audit() -> Iterator[None]:
    """embedfit's own skops calls: skops' default list of scikit-learn estimators is not needed (see `skops_io`)."""
    token = _OWN_AUDIT.set(True)
    try:
        yield
    finally:
        _OWN_AUDIT.reset(token)


class _SklearnTypeNames(Sequence[str]):
    """skops' `SKLEARN_ESTIMATOR_TYPE_NAMES`, computed as skops does on first use; empty inside `_own_audit`."""

    def __init__(self) -> None:
        self._names: list[str] | None = None

    def _get(self) -> list[str]:
        if self._names is None:
            from sklearn.utils import all_estimators
            from skops.io._utils import get_type_name

            self._names = [n for _, cls in all_estimators() if (n := get_type_name(cls)).startswith("sklearn.")]
        return self._names

    def __add__(self, other: Sequence[str]) -> list[str]:  # skops: `SKLEARN_ESTIMATOR_TYPE_NAMES + [...]`
        return list(other) if _OWN_AUDIT.get() else self._get() + list(other)

    def __getitem__(self, index: Any) -> Any:
        return self._get()[index]

    def __len__(self) -> int:
        return len(self._get())


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
    sio = skops_io()

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model_path = run_dir / "model.skops"
    tmp = run_dir / ".model.skops.tmp"
    sio.dump(pipeline, tmp)
    with _own_audit():
        untrusted = untrusted_types(sio.get_untrusted_types(file=tmp))
    if untrusted:  # our own pipelines must only contain allow-listed types
        tmp.unlink()
        raise ModelFileError(f"refusing to save a model containing unvetted types: {sorted(untrusted)}")
    tmp.replace(model_path)
    class_names = list(metrics["class_names"])
    sidecar = {
        "kind": "sklearn", "model": model, "params": params, "spec": store.spec.to_dict(),
        "settings": {"dtype": store.settings.dtype, "tta": store.settings.tta,
                     "precision": store.settings.precision},
        "class_names": class_names, **model_binding(model_path, class_names),
        "store": getattr(store, "url", "") or str(store.path.resolve()),  # a URL, or absolute: usable from any cwd
        "store_fingerprint": store.fingerprint,
        "versions": library_versions(), "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "embedfit_version": __version__, "trusted_types": list(TRUSTED_TYPES),
    }
    (run_dir / "model.json").write_text(json.dumps(sidecar, indent=2, default=_json_default))
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default))
    write_predictions_csv(run_dir / "predictions.csv", predictions)
    return run_dir


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _names_digest(model_sha256: str, class_names: list[str]) -> str:
    return hashlib.sha256(json.dumps([model_sha256, class_names]).encode()).hexdigest()


def model_binding(model_path: str | Path, class_names: list[str]) -> dict[str, Any]:
    """The sidecar fields that tie model.json to its model file: written by every run writer, checked on load."""
    sha = file_sha256(model_path)
    return {"model_sha256": sha, "n_classes": len(class_names), "class_names_sha256": _names_digest(sha, class_names)}


def check_model_file(run_dir: str | Path, meta: dict[str, Any], model_path: str | Path) -> None:
    """Refuse a model file that is not the one model.json was written with.

    Runs written before the binding was recorded have no `model_sha256`; they are checked after loading instead
    (the estimator's classes against the class names).

    Raises:
        ModelFileError: The file's SHA-256 differs from the recorded one.
    """
    recorded = meta.get("model_sha256")
    if recorded is not None and file_sha256(model_path) != recorded:
        raise ModelFileError(f"{model_path} is not the model file {Path(run_dir) / 'model.json'} was written with "
                             "(its SHA-256 differs): it was replaced or modified; restore it or refit the run")


def _check_binding(run_dir: Path, meta: dict[str, Any]) -> None:
    """The class names and count in model.json are the ones saved with the model (cheap: no file is read)."""
    names = meta.get("class_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise ModelFileError(f"{run_dir / 'model.json'} is damaged: class_names must be a list of distinct names")
    if "n_classes" in meta and meta["n_classes"] != len(names):
        raise ModelFileError(f"{run_dir / 'model.json'} lists {len(names)} class names but the model has "
                             f"{meta['n_classes']} classes; restore model.json or refit the run")
    if "model_sha256" in meta and meta.get("class_names_sha256") != _names_digest(meta["model_sha256"], names):
        raise ModelFileError(f"the class names in {run_dir / 'model.json'} were changed after the model was saved "
                             "(predictions would carry the wrong labels); restore them or refit the run")


def write_predictions_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = list(rows[0]) if rows else ["path", "row", "label", "predicted", "correct", "fold"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def read_predictions(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """A run's metrics.json and its predictions.csv rows (out-of-fold for CV, else hold-out; empty when absent).

    Raises:
        ModelFileError: metrics.json is missing (an interrupted run) or damaged.
    """
    run_dir = Path(run_dir)
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except FileNotFoundError:
        raise ModelFileError(f"{run_dir} has no metrics.json; was the run interrupted?") from None
    except ValueError as exc:
        raise ModelFileError(f"{run_dir / 'metrics.json'} is damaged ({exc})") from None
    predictions: list[dict[str, str]] = []
    if (run_dir / "predictions.csv").is_file():
        with open(run_dir / "predictions.csv", newline="", encoding="utf-8") as f:
            predictions = list(csv.DictReader(f))
    return metrics, predictions


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
    _check_binding(run_dir, meta)
    major = str(meta.get("embedfit_version", "0")).split(".")[0]
    if major != __version__.split(".")[0]:
        raise ModelFileError(f"{run_dir} was made by embedfit {meta.get('embedfit_version')}; this is "
                             f"{__version__} (different major version): refit the model")
    return meta


MODEL_FILES = {"sklearn": ("model.skops", "a scikit-learn pipeline"), "torch": ("model.pt", "a trained network")}


def model_file(run_dir: str | Path, kind: str) -> tuple[dict[str, Any], Path]:
    """A run's sidecar and model file, checked: the run holds a model of `kind` ("sklearn" or "torch"), its file
    is there, and it is the file the sidecar was written for (`check_model_file`).

    Raises:
        ModelFileError: Otherwise, in one line.
    """
    meta = read_sidecar(run_dir)
    name, what = MODEL_FILES[kind]
    if meta.get("kind") != kind:
        raise ModelFileError(f"{run_dir} holds a {meta.get('kind')} model, not {what}")
    path = Path(run_dir) / name
    if not path.is_file():
        raise ModelFileError(f"{path} is missing")
    check_model_file(run_dir, meta, path)
    return meta, path


def load_model(run_dir: str | Path) -> tuple[Pipeline, dict[str, Any]]:
    """Load a run's pipeline without running untrusted code: only skops, only allow-listed types.

    The pipeline predicts class names (runs saved by earlier versions: class indices; `class_positions` maps both).

    Raises:
        ModelFileError: Missing files, a file that is not a skops archive (e.g. a pickle), or a skops file
            containing types outside `TRUSTED_TYPES`.
    """
    sio = skops_io()

    meta, path = model_file(run_dir, "sklearn")
    try:
        with _own_audit():
            untrusted = set(sio.get_untrusted_types(file=path))
    except Exception as exc:  # a pickle, a joblib file or garbage: never unpickle it
        raise ModelFileError(f"{path} is not a skops model file ({type(exc).__name__}); refusing to load it") \
            from None
    unexpected = untrusted_types(untrusted)
    if unexpected:
        raise ModelFileError(f"{path} contains types outside embedfit's allow-list: {sorted(unexpected)[:3]}; "
                             "refusing to load it")
    try:
        with _own_audit():
            pipeline = sio.load(path, trusted=sorted(untrusted))
    except Exception as exc:
        raise ModelFileError(f"cannot load {path}: {exc}") from None
    check_fitted(pipeline, class_names=list(meta["class_names"]),
                 n_features=BackboneSpec.from_dict(meta["spec"]).embedding_dim, path=path)
    return pipeline, meta


def check_fitted(pipeline: Any, *, class_names: Sequence[str], n_features: int, path: str | Path) -> None:
    """Check the fitted state that prediction indexes, so a tampered file is refused rather than crashing.

    Compiled code in scikit-learn (tree traversal, libsvm, KD/ball trees) indexes arrays without bounds checks:
    a tree node whose child index is 10**12 is a segfault, not an exception. This walks every estimator inside
    the pipeline and checks the indices and shapes those routines trust.

    Raises:
        ModelFileError: The classes differ from the run's class names, or some fitted state is out of range.
    """
    classes = np.asarray(getattr(pipeline, "classes_", []))
    # Runs predict class names (older runs: indices into model.json's class names).
    same = (np.array_equal(classes, np.arange(len(class_names))) if classes.dtype.kind in "iu"
            else classes.dtype.kind in "UO" and sorted(map(str, classes)) == sorted(class_names))
    if not same:
        raise ModelFileError(f"{path} predicts {len(classes)} classes ({', '.join(map(str, classes[:3]))}, ...) "
                             f"but its model.json lists {len(class_names)} other class names: the files come from "
                             "different runs; refit the run")
    if getattr(pipeline, "n_features_in_", n_features) != n_features:
        raise ModelFileError(f"{path} expects {pipeline.n_features_in_}-d features but its model.json records a "
                             f"{n_features}-d backbone: the files come from different runs; refit the run")
    problem = _fitted_problem(pipeline, set())
    if problem:
        raise ModelFileError(f"{path} is damaged or was tampered with ({problem}); refusing to use it")


def _fitted_problem(obj: Any, seen: set[int]) -> str:
    """The first out-of-range fitted state found in `obj` and the estimators inside it ("" when none)."""
    from sklearn.base import BaseEstimator
    from sklearn.tree._tree import Tree

    if id(obj) in seen:
        return ""
    seen.add(id(obj))
    if isinstance(obj, Tree):
        return _tree_problem(obj)
    if isinstance(obj, (list, tuple)):
        children: Any = obj
    elif isinstance(obj, dict):
        children = obj.values()
    elif isinstance(obj, BaseEstimator) or type(obj).__module__.startswith("sklearn."):
        problem = _estimator_problem(obj)
        if problem:
            return problem
        children = vars(obj).values() if hasattr(obj, "__dict__") else ()
    else:
        return ""
    return next((p for child in children if (p := _fitted_problem(child, seen))), "")


def _tree_problem(tree: Any) -> str:
    n = int(tree.node_count)
    left, right, feature = tree.children_left, tree.children_right, tree.feature
    internal = left != -1
    idx = np.arange(n)
    if not (np.array_equal(internal, right != -1) and (left[internal] > idx[internal]).all()
            and (right[internal] > idx[internal]).all() and (left[internal] < n).all()
            and (right[internal] < n).all()):
        return "a decision tree has child indices outside its nodes"
    if ((feature[internal] < 0) | (feature[internal] >= tree.n_features)).any():
        return f"a decision tree splits on features outside 0..{tree.n_features - 1}"
    if tree.value.shape[0] != n:
        return "a decision tree has fewer leaf values than nodes"
    return ""


def _estimator_problem(est: Any) -> str:
    """Shape checks for the fitted attributes compiled prediction code relies on."""
    name = type(est).__name__
    n_in = getattr(est, "n_features_in_", None)
    tree = getattr(est, "tree_", None)
    if tree is not None and n_in is not None and getattr(tree, "n_features", n_in) != n_in:
        return f"{name} has a tree over {tree.n_features} features but takes {n_in}"
    coef = getattr(est, "coef_", None)
    if isinstance(coef, np.ndarray) and n_in is not None and coef.ndim in (1, 2) and coef.shape[-1] != n_in:
        return f"{name} has coefficients for {coef.shape[-1]} features but takes {n_in}"
    if isinstance(coef, np.ndarray) and coef.ndim == 2 and hasattr(est, "classes_"):
        k = len(est.classes_)
        if coef.shape[0] not in ({1} if k == 2 else {k}):
            return f"{name} has coefficients for {coef.shape[0]} classes but {k} classes"
    sv = getattr(est, "support_vectors_", None)
    if isinstance(sv, np.ndarray) and sv.size:
        n_support = np.asarray(getattr(est, "_n_support", []))
        dual = np.asarray(getattr(est, "_dual_coef_", getattr(est, "dual_coef_", np.zeros((0, 0)))))
        if ((n_in is not None and sv.shape[1] != n_in) or n_support.sum() != sv.shape[0]
                or dual.shape[-1] != sv.shape[0] or (n_support < 0).any()):
            return f"{name} has support vectors that do not match their counts or coefficients"
    if hasattr(est, "get_arrays"):  # KDTree / BallTree
        data, order, nodes, _ = est.get_arrays()
        n = len(data)
        if not np.array_equal(np.sort(np.asarray(order)), np.arange(n)) or (
                len(nodes) and ((nodes["idx_start"] < 0).any() or (nodes["idx_end"] > n).any()
                                or (nodes["idx_start"] > nodes["idx_end"]).any())):
            return f"{name} indexes points outside its {n} points"
    y = getattr(est, "_y", None)
    if isinstance(y, np.ndarray) and hasattr(est, "classes_") and y.size and y.dtype.kind in "iu" and (
            y.min() < 0 or y.max() >= len(est.classes_)):
        return f"{name} has neighbour labels outside its {len(est.classes_)} classes"
    return ""
