"""The run-directory contract: what a fitted run is on disk, written and read in one place.

    RUN/model.skops      a scikit-learn Pipeline (skops format, loaded only with a fixed allow-list of types), or
    RUN/model.pt         a fine-tuned network's state dict (kind "torch"; never a pickled module)
    RUN/model.json       sidecar: kind, BackboneSpec, store settings, class names, data fingerprint, the run's
                         identity (what it answered: data, model, settings, evaluation), versions, the kind's
                         own entries (`Sidecar.add_flavor`), and what binds it to the model file: the file's
                         SHA-256, the class count, and a SHA-256 over both hashes and the class names (editing or
                         swapping either file is refused on load)
    RUN/metrics.json     scores (mean, std, per fold), per-class metrics, confusion matrix, timings, and the
                         `Evaluation` record: what the scores were measured on
    RUN/predictions.csv  out-of-fold (or hold-out) predictions, one row per image

A run directory is written whole by `write_run` (a staged folder renamed into place) and read by `read_run`;
`embedfit fit`, fine-tuning, `compare`, `sweep`, `report`, `predict` and the notebook go through these two.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedfit._version import __version__
from embedfit.backbones.spec import BackboneSpec
from embedfit.errors import ModelFileError, OutputError
from embedfit.runs.files import json_default, staged_dir
from embedfit.runs.trusted import check_fitted, skops_io, trusted_types, untrusted_types
from embedfit.storage import library_versions

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

    from embedfit.storage import FeatureStore

SIDECAR, METRICS, PREDICTIONS = "model.json", "metrics.json", "predictions.csv"
SAVED_MODEL = "the saved model"


@dataclass(frozen=True)
class Evaluation:
    """What a run's scores were measured on: written once (metrics.json `evaluation`), read by every command.

    Attributes:
        scheme: "cv" (out of fold), "holdout-split" (a share of the training data held out), "held-out"
            (separate images: a test store or a test folder) or "validation-split" (fine-tuning's own share).
        source: The store or image folder the scored images come from.
        image_root: The folder their paths in predictions.csv are relative to (thumbnails are read from there).
        n_images: Images scored (each once).
        n_train: Images the scoring model was trained on (CV and splits: the largest training set of a fold).
        scored_by: `SAVED_MODEL`, or which models made the recorded predictions when the saved one did not.
        details: The scheme's settings as earlier versions wrote them (strategy, n_splits, repeats, seed, groups,
            search, test_store, test_size, fingerprints, ...).
    """

    scheme: str
    source: str
    image_root: str
    n_images: int
    n_train: int
    scored_by: str = SAVED_MODEL
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**self.details, "scheme": self.scheme, "source": self.source, "image_root": self.image_root,
                "n_images": self.n_images, "n_train": self.n_train, "scored_by": self.scored_by}

    @classmethod
    def from_record(cls, metrics: dict[str, Any], meta: dict[str, Any]) -> Evaluation:
        """The record of a run, also of one written before it existed (derived from its older fields)."""
        ev = dict(metrics.get("evaluation") or {})
        own = {f.name: ev.pop(f.name) for f in dataclasses.fields(cls) if f.name != "details" and f.name in ev}
        if "scheme" in own:
            return cls(**own, details=ev)
        torch_run = meta.get("kind") == "torch"
        scheme = ("validation-split" if torch_run else "cv" if ev.get("strategy") == "cv"
                  else "held-out" if ev.get("test_store") else "holdout-split")
        source = str(ev.get("test_store") or meta.get("store", ""))
        return cls(scheme, source, source if torch_run else "", int(ev.get("n_test", ev.get("n_val", 0)) or 0),
                   int(metrics.get("n_train", metrics.get("n_samples", 0)) or 0), SAVED_MODEL, ev)


@dataclass
class Sidecar:
    """model.json before it is written: what every run has; a kind adds its own entries with `add_flavor`
    (as MLflow's `Model.add_flavor`): its name, its model file and anything only it needs."""

    model: str
    params: dict[str, Any]
    spec: BackboneSpec
    settings: dict[str, Any]
    class_names: list[str]
    data: str
    data_fingerprint: str
    identity: dict[str, Any]
    kind: str = ""
    model_file: str = ""
    flavor: dict[str, Any] = field(default_factory=dict)

    def add_flavor(self, kind: str, model_file: str, **entries: Any) -> Sidecar:
        """Record the kind of model ("sklearn", "torch"), its file name in the run, and the kind's own entries."""
        self.kind, self.model_file, self.flavor = kind, model_file, entries
        return self

    def to_dict(self, binding: dict[str, Any]) -> dict[str, Any]:
        return {
            "kind": self.kind, "model": self.model, "params": self.params, "spec": self.spec.to_dict(),
            "settings": self.settings, "class_names": list(self.class_names), **binding,
            "store": self.data, "store_fingerprint": self.data_fingerprint, "identity": self.identity,
            "flavors": {self.kind: {"file": self.model_file, **self.flavor}},
            "versions": library_versions(), "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "embedfit_version": __version__,
        }


def write_run(run_dir: str | Path, sidecar: Sidecar, save_model: Callable[[Path], None], *,
              metrics: dict[str, Any], evaluation: Evaluation, predictions: list[dict[str, Any]]) -> Path:
    """Write a whole run directory: the model file (`save_model(path)`), model.json, metrics.json with the
    `evaluation` record, and predictions.csv; committed whole (`staged_dir`), replacing an earlier run there.

    Returns:
        The run directory.
    """
    if not sidecar.kind:
        raise ValueError("a run needs its kind: call `Sidecar.add_flavor` first")
    run_dir = Path(run_dir)
    with staged_dir(run_dir) as stage:
        save_model(stage / sidecar.model_file)
        meta = sidecar.to_dict(model_binding(stage / sidecar.model_file, sidecar.class_names))
        (stage / SIDECAR).write_text(json.dumps(meta, indent=2, default=json_default))
        metrics = {**metrics, "evaluation": evaluation.to_dict()}
        (stage / METRICS).write_text(json.dumps(metrics, indent=2, default=json_default))
        write_predictions_csv(stage / PREDICTIONS, predictions)
    return run_dir


def identity_of(*, data: str, model: str, settings: dict[str, Any], evaluation: dict[str, Any]) -> dict[str, Any]:
    """What a run answers, as a structure a new option joins by one entry: the data (a fingerprint), the model
    and its settings, and how it is evaluated (every setting that changes a score). Two runs with equal
    identities are interchangeable: a re-run may replace its own run, and a sweep may reuse it."""
    doc = {"data": data, "model": model, "settings": settings, "evaluation": evaluation}
    return json.loads(json.dumps(doc, default=json_default))  # as it reads back from model.json


def recorded_identity(run_dir: str | Path) -> dict[str, Any] | None:
    """The identity a run directory was written with (None for runs written before identities were recorded,
    or a damaged model.json)."""
    try:
        identity = json.loads((Path(run_dir) / SIDECAR).read_text()).get("identity")
    except (OSError, ValueError, AttributeError):
        return None
    return identity if isinstance(identity, dict) else None


def check_replace(folder: str | Path, identity: dict[str, Any], *, marker: str = SIDECAR,
                  what: str = "run", param: str = "output") -> None:
    """Refuse to replace a folder holding a different answer; the identical command may replace its own.

    `folder` may be absent, empty, or hold a `marker` file (model.json, compare.json) whose "identity" equals
    `identity`. Anything else is refused in one line naming what differs.

    Raises:
        OutputError: The folder holds another run, a run of an earlier version, or files that are not a run.
    """
    folder = Path(folder)
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return
    hint = f"give another `{param}`, or delete {folder} to replace it"
    if not (folder / marker).is_file():
        raise OutputError(f"`{param}` {folder} is not empty and holds no embedfit {what} ({marker}); {hint}")
    try:
        recorded = json.loads((folder / marker).read_text()).get("identity")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded == identity:
        return
    if not isinstance(recorded, dict):
        raise OutputError(f"`{param}` {folder} holds a {what} whose settings are not recorded (an earlier "
                          f"version); {hint}")
    differs = [k for k in sorted(set(recorded) | set(identity)) if recorded.get(k) != identity.get(k)]
    detail = ", ".join(_difference(k, recorded.get(k), identity.get(k)) for k in differs[:2])
    raise OutputError(f"`{param}` {folder} holds another {what} ({detail}); {hint}")


def _difference(key: str, old: Any, new: Any) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        inner = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        return "; ".join(f"{key} {k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in inner[:2])
    return f"{key}: {old!r} there, {new!r} now"


@dataclass
class Run:
    """A run directory's contents, as commands read them."""

    path: Path
    meta: dict[str, Any]
    metrics: dict[str, Any]
    predictions: list[dict[str, str]]
    evaluation: Evaluation

    @property
    def label(self) -> str:
        return f"{self.meta['spec']['name']} + {self.metrics['model']} ({self.path.name})"


def read_run(path: str | Path) -> Run:
    """Read model.json (checked as `read_sidecar` does), metrics.json, predictions.csv and the evaluation record.

    Raises:
        ModelFileError: Not a run, or a file is missing or damaged.
    """
    path = Path(path)
    meta = read_sidecar(path)
    try:
        metrics = json.loads((path / METRICS).read_text())
    except FileNotFoundError:
        raise ModelFileError(f"{path} has no {METRICS}; was the run interrupted?") from None
    except ValueError as exc:
        raise ModelFileError(f"{path / METRICS} is damaged ({exc})") from None
    predictions: list[dict[str, str]] = []
    if (path / PREDICTIONS).is_file():
        predictions = read_csv(path / PREDICTIONS)
    return Run(path, meta, metrics, predictions, Evaluation.from_record(metrics, meta))


def is_run(path: str | Path) -> bool:
    """Whether `path` is a finished run directory (model.json and metrics.json there; no check of their content)."""
    return (Path(path) / SIDECAR).is_file() and (Path(path) / METRICS).is_file()


def class_positions(labels: Any, class_names: list[str]) -> np.ndarray:
    """Positions in the run's `class_names` of the class names a loaded model gives (`predict`'s output or
    `classes_`)."""
    where = {name: i for i, name in enumerate(class_names)}
    return np.array([where[str(label)] for label in np.asarray(labels)], dtype=int)


def save_run(run_dir: str | Path, pipeline: Pipeline, *, model: str, params: dict[str, Any], store: FeatureStore,
             metrics: dict[str, Any], evaluation: Evaluation, predictions: list[dict[str, Any]],
             identity: dict[str, Any]) -> Path:
    """Write a scikit-learn run (model.skops and the rest of the contract, `write_run`).

    Raises:
        ModelFileError: The pipeline contains a type outside the allow-list (nothing is written).
    """
    sio = skops_io()

    def save(path: Path) -> None:
        sio.dump(pipeline, path)
        untrusted = untrusted_types(sio.get_untrusted_types(file=path))
        if untrusted:  # our own pipelines must only contain allow-listed types
            raise ModelFileError(f"refusing to save a model containing unvetted types: {sorted(untrusted)}")

    sidecar = Sidecar(model, params, store.spec, {"dtype": store.settings.dtype, "tta": store.settings.tta,
                                                  "precision": store.settings.precision},
                      list(metrics["class_names"]),
                      getattr(store, "url", "") or str(store.path.resolve()),  # a URL, or absolute: from any cwd
                      store.fingerprint, identity)
    sidecar.add_flavor("sklearn", MODEL_FILES["sklearn"][0], trusted_types=list(trusted_types()))
    return write_run(run_dir, sidecar, save, metrics=metrics, evaluation=evaluation, predictions=predictions)


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

    Raises:
        ModelFileError: model.json records no binding (a pre-release run), or the file's SHA-256 differs from the
            recorded one.
    """
    recorded = meta.get("model_sha256")
    if not isinstance(recorded, str):
        raise ModelFileError(f"{Path(run_dir) / 'model.json'} records no model_sha256 (a run written by a "
                             "pre-release embedfit, or an edited file): refit the run")
    if file_sha256(model_path) != recorded:
        raise ModelFileError(f"{model_path} is not the model file {Path(run_dir) / 'model.json'} was written with "
                             "(its SHA-256 differs): it was replaced or modified; restore it or refit the run")


def _check_binding(run_dir: Path, meta: dict[str, Any]) -> None:
    """The class names and count in model.json are the ones saved with the model (cheap: no file is read)."""
    names = meta.get("class_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise ModelFileError(f"{run_dir / 'model.json'} is damaged: class_names must be a list of distinct names")
    if not all(key in meta for key in ("model_sha256", "n_classes", "class_names_sha256")):
        raise ModelFileError(f"{run_dir / 'model.json'} does not bind the model file (no model_sha256, n_classes or "
                             "class_names_sha256: a run written by a pre-release embedfit, or an edited file); "
                             "refit the run")
    if meta["n_classes"] != len(names):
        raise ModelFileError(f"{run_dir / 'model.json'} lists {len(names)} class names but the model has "
                             f"{meta['n_classes']} classes; restore model.json or refit the run")
    if meta["class_names_sha256"] != _names_digest(meta["model_sha256"], names):
        raise ModelFileError(f"the class names in {run_dir / 'model.json'} were changed after the model was saved "
                             "(predictions would carry the wrong labels); restore them or refit the run")


def write_predictions_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = list(rows[0]) if rows else ["path", "row", "label", "predicted", "correct", "fold"]
    write_csv(path, fields, ([r.get(k, "") for k in fields] for r in rows))


# OWASP's rule against CSV injection: a spreadsheet runs a cell that starts with one of these as a formula.
# What a spreadsheet may run as a formula at the start of a cell; `csv_cell` escapes these and "'" (the audit page's
# JavaScript CSV writer escapes the same, from this tuple).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A value as a CSV cell that a spreadsheet shows as text rather than running: text starting with a formula
    character (`=`, `+`, `-`, `@`, tab, CR) gets a leading `'`, and so does text already starting with `'`, so
    that `csv_value` gives the text back exactly. Numbers stay numbers (-0.5 is no formula)."""
    if isinstance(value, str) and value.startswith((*FORMULA_START, "'")):
        return "'" + value
    return value


def csv_value(cell: str) -> str:
    """The text a `csv_cell` came from."""
    return cell[1:] if cell.startswith("'") else cell


def write_csv(path: str | Path, fields: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a CSV file the way every embedfit CSV is written: UTF-8 (a file name that is not valid UTF-8 as its
    own bytes, not refused), and every cell, header included, through `csv_cell`."""
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f)
        writer.writerow([csv_cell(name) for name in fields])
        writer.writerows([csv_cell(v) for v in row] for row in rows)


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """The rows of a CSV file that `write_csv` wrote, as the text that was written (`csv_value`)."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return [{csv_value(k): csv_value(v) for k, v in row.items()} for row in csv.DictReader(f)]


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

    The pipeline predicts class names.

    Raises:
        ModelFileError: Missing files, a file that is not a skops archive (e.g. a pickle), or a skops file
            containing types outside `fitting.registry.trusted_types()`.
    """
    sio = skops_io()

    meta, path = model_file(run_dir, "sklearn")
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
    check_fitted(pipeline, class_names=list(meta["class_names"]),
                 n_features=BackboneSpec.from_dict(meta["spec"]).embedding_dim, path=path)
    return pipeline, meta


