"""Predict with a saved run on new images, folders or a feature store.

Images are re-embedded with exactly the backbone and preprocessing recorded in the run's model.json; a store
made with anything else is refused. Broken images are listed with their reason, never fatal.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedfit.backbones.spec import BackboneSpec
from embedfit.errors import StoreMismatchError, UsageError
from embedfit.images import ImageRecord, collect_images, scan_images
from embedfit.runs import class_positions, load_model, read_sidecar, write_csv
from embedfit.storage import FeatureStore, StoreSettings, check_mixable, is_collection


@dataclass
class Predictions:
    """One row per input image; `proba` is NaN for failed images (and absent for models without probabilities)."""

    paths: list[str]
    predicted: list[str]  # "" for failed images
    proba: np.ndarray | None
    class_names: list[str]
    errors: list[str] = field(default_factory=list)
    labels: list[str] | None = None  # the inputs' own classes ("" unlabelled): a store's, a class tree's, a CSV's

    @property
    def n_failed(self) -> int:
        return sum(1 for e in self.errors if e)

    def check(self) -> LabelCheck | None:
        """How the predictions compare with the inputs' own labels; None when the inputs carry none."""
        if self.labels is None:
            return None
        ok = [i for i, (label, e) in enumerate(zip(self.labels, self.errors, strict=True)) if label and not e]
        return check_labels([self.labels[i] for i in ok], [self.predicted[i] for i in ok], self.class_names)

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for i, path in enumerate(self.paths):
            row: dict[str, Any] = {"path": path, "predicted": self.predicted[i]}
            if self.proba is not None:
                row["probability"] = "" if self.errors[i] else round(float(np.nanmax(self.proba[i])), 6)
                row.update({f"p_{c}": ("" if self.errors[i] else round(float(p), 6))
                            for c, p in zip(self.class_names, self.proba[i], strict=True)})
            row["error"] = self.errors[i]
            out.append(row)
        return out

    def write(self, output: str | os.PathLike) -> Path:
        """Write CSV, or JSON when the file name ends in .json."""
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        rows = self.rows()
        if output.suffix.lower() == ".json":
            output.write_text(json.dumps(rows, indent=2))
        else:
            fields = list(rows[0]) if rows else ["path", "predicted", "error"]
            write_csv(output, fields, ([r[k] for k in fields] for r in rows))
        return output


@dataclass
class LabelCheck:
    """The predictions of labelled inputs against their labels (`check_labels`).

    Attributes:
        warning: One line when no label of the inputs is a class of the model (the predictions cannot be right).
        n_scored: Images whose label is one of the model's classes; the scores are over them.
        accuracy: Share of them predicted right (None when none are scored).
        balanced_accuracy: Mean recall over their classes.
        confused: (true class, predicted class, images) for the most frequent mistakes, most first.
        unknown: Input classes the model does not know, and their image count (left out of the scores).
    """

    warning: str | None = None
    n_scored: int = 0
    accuracy: float | None = None
    balanced_accuracy: float | None = None
    confused: list[tuple[str, str, int]] = field(default_factory=list)
    unknown: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: the scores and the top mistakes, or the warning."""
        if self.warning:
            return f"warning: {self.warning}"
        line = (f"accuracy {self.accuracy:.3f}, balanced accuracy {self.balanced_accuracy:.3f} on {self.n_scored} "
                "labelled images")
        if self.confused:
            line += "; most confused: " + ", ".join(f"{t} -> {p} ({n})" for t, p, n in self.confused)
        if self.unknown:
            line += (f"; {sum(self.unknown.values())} images of {len(self.unknown)} classes the model does not "
                     f"know left out ({_few(self.unknown)})")
        return line


def _few(names: Sequence[str], n: int = 3) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def no_shared_class(labels: Sequence[str], class_names: Sequence[str]) -> str | None:
    """A one-line warning when none of `labels` (the inputs' classes) is among `class_names` (the model's)."""
    found = sorted(set(labels) - {""})
    if not found or set(found) & set(class_names):
        return None
    return (f"none of the inputs' {len(found)} classes ({_few(found)}) is among the model's {len(class_names)} "
            f"({_few(list(class_names))}): these predictions cannot be right; was the model trained on other data?")


def check_labels(labels: Sequence[str], predicted: Sequence[str], class_names: Sequence[str],
                 top: int = 3) -> LabelCheck:
    """Score predictions against the inputs' labels, or say why they cannot be right.

    Args:
        labels: The true class of each image (labelled images only).
        predicted: The model's class for each of them.
        class_names: The model's classes.
        top: How many of the most frequent mistakes to name.
    """
    known = set(class_names)
    if not labels:
        return LabelCheck()
    warning = no_shared_class(labels, class_names)
    if warning:
        return LabelCheck(warning=warning)
    from collections import Counter

    scored = [(t, p) for t, p in zip(labels, predicted, strict=True) if t in known]
    hits = [t == p for t, p in scored]
    recall = {c: np.mean([h for (t, _), h in zip(scored, hits, strict=True) if t == c]) for c in {t for t, _ in scored}}
    mistakes = Counter((t, p) for t, p in scored if t != p).most_common(top)
    return LabelCheck(n_scored=len(scored), accuracy=float(np.mean(hits)),
                      balanced_accuracy=float(np.mean(list(recall.values()))),
                      confused=[(t, p, n) for (t, p), n in mistakes],
                      unknown=dict(sorted(Counter(t for t in labels if t not in known).items())))


def mismatches(run: str | os.PathLike, store: FeatureStore) -> list[str]:
    """Why a store's images and a run's model do not belong together: different features (backbone spec,
    preprocessing, test-time augmentation) or no class in common; [] when they do."""
    meta = read_sidecar(run)
    found = StoreSettings(BackboneSpec.from_dict(meta["spec"]), **meta["settings"]).differences(
        store.settings, same_store=False)
    problems = [f"the store's features differ from the model's ({'; '.join(found[:3])})"] if found else []
    warning = no_shared_class(store.class_names, meta["class_names"])
    return problems + ([warning] if warning else [])


def predict(run: str | os.PathLike, inputs: Sequence[str | os.PathLike], *, weights: str | None = None,
            device: str = "auto", batch_size: int | None = None, workers: int | None = None) -> Predictions:
    """Predict classes for images, folders, or one feature store (.h5, or a collection of stores, .json).

    Args:
        run: A run directory written by `embedfit fit` (or `finetune`).
        inputs: Image files and folders, or a single store.
        weights: The weights file, when the model's backbone was built from a `weights` file.
        device: Where to embed the images.
        batch_size: Images per forward pass.
        workers: Decoding processes.

    Raises:
        StoreMismatchError: The store or the re-created backbone differs from the one the model was trained on.
    """
    meta = read_sidecar(run)
    if meta.get("kind") == "torch":
        return _predict_torch(run, inputs)
    pipeline, meta = load_model(run)
    spec = BackboneSpec.from_dict(meta["spec"])
    class_names = list(meta["class_names"])
    if len(inputs) == 1 and is_store_name(inputs[0]):
        store = FeatureStore.open(inputs[0])
        model_settings = StoreSettings(spec, **meta["settings"])
        check_mixable(store.settings, model_settings, f"store {store.path}", f"the model in {run}")
        X = store.features()
        errors = [str(e) if s != 0 else "" for e, s in zip(store.errors, store.status, strict=True)]
        paths = [str(p) for p in store.paths]
        truth = [store.class_names[i] if i >= 0 else "" for i in store.labels]
    else:
        records = collect_images(inputs)
        truth = input_labels(inputs, records)
        X, errors, paths = _embed(spec, meta, records, weights, device, batch_size, workers)
    ok = np.array([not e for e in errors], dtype=bool)
    predicted = [""] * len(paths)
    proba = None
    if ok.any():
        labels = class_positions(pipeline.predict(X[ok]), class_names)
        for i, label in zip(np.flatnonzero(ok), labels, strict=True):
            predicted[i] = class_names[label]
        if hasattr(pipeline, "predict_proba"):
            proba = np.full((len(paths), len(class_names)), np.nan)
            full = np.zeros((int(ok.sum()), len(class_names)))
            full[:, class_positions(pipeline.classes_, class_names)] = pipeline.predict_proba(X[ok])
            proba[ok] = full
    return Predictions(paths, predicted, proba, class_names, errors, truth)


def is_store_name(path: str | os.PathLike) -> bool:
    """True when a `predict` input names a feature store (.h5, .hdf5) or a collection of stores (.json)."""
    return str(path).lower().endswith((".h5", ".hdf5")) or is_collection(path)


def input_labels(inputs: Sequence[str | os.PathLike], records: Sequence[ImageRecord]) -> list[str] | None:
    """The class of each record when the one input is labelled: a CSV with a label column, or a class tree (a
    class per sub-folder, no images beside them, as `extract` reads it); None otherwise."""
    from embedfit import url
    from embedfit.errors import InputError

    if len(inputs) != 1:
        return None
    item = url.local_or_url(inputs[0])
    if not url.is_url(item) and not (Path(item).is_dir() or Path(item).suffix.lower() == ".csv"):
        return None
    try:
        source = scan_images(item)
    except InputError:  # one object on object storage, or nothing a labelled scan accepts
        return None
    if not source.class_names or any(why.startswith("loose file") for _, why in source.skipped):
        return None  # images beside the sub-folders: they are how the images are filed, not classes
    by_path = {str(r.path): source.class_names[r.label] for r in source.records if r.label >= 0}
    return [by_path.get(str(r.path), "") for r in records]


def _embed(spec: BackboneSpec, meta: dict[str, Any], records: list[ImageRecord], weights: str | None,
           device: str, batch_size: int | None, workers: int | None) -> tuple[np.ndarray, list[str], list[str]]:
    from embedfit.backbones.factory import create_backbone
    from embedfit.extraction.encoder import Encoder, iter_embeddings
    from embedfit.extraction.settings import resolve_device

    if spec.weights.startswith("file:") and weights is None:
        raise UsageError(f"the model's backbone used weights from {spec.weights[5:]}: pass `weights` FILE")
    backbone = create_backbone(spec.name, weights=weights, layer=None if spec.layer == "pre_logits" else spec.layer,
                               pool=spec.pool, resolution=spec.input_size[0])
    diffs = backbone.spec.differences(spec)
    if diffs:
        raise StoreMismatchError(f"the backbone available now, {backbone.spec.short()}, differs from the one the "
                                 f"model was trained on, {spec.short()} ({'; '.join(diffs[:3])})")
    settings = meta["settings"]
    encoder = Encoder(backbone, resolve_device(device), precision=settings["precision"], tta=settings["tta"],
                      runtime="auto")
    feats, errors = [], []
    for batch in iter_embeddings(records, encoder, batch_size=batch_size, workers=workers):
        feats.append(batch.features)
        errors += batch.errors
    X = np.concatenate(feats)
    if settings["dtype"] == "float16":  # the model saw float16-rounded features
        X = X.astype(np.float16).astype(np.float32)
    return X, errors, [r.key for r in records]


def _predict_torch(run: str | os.PathLike, inputs: Sequence[str | os.PathLike]) -> Predictions:
    try:
        from embedfit.training.finetune import load_finetuned
    except ImportError:
        raise UsageError(f"{run} holds a fine-tuned network, which this installation cannot load") from None
    if any(is_store_name(i) for i in inputs):
        raise UsageError(f"{run} is a fine-tuned network, which predicts from images: give image files or "
                         "folders, not a feature store")
    model = load_finetuned(run)
    records = collect_images(inputs)
    proba, errors = model.predict_proba_paths([r.path for r in records])
    predicted = ["" if e else model.class_names[int(np.argmax(p))] for p, e in zip(proba, errors, strict=True)]
    return Predictions([r.key for r in records], predicted, proba, list(model.class_names), list(errors),
                       input_labels(inputs, records))
