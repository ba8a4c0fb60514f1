"""Predict with a saved run on new images, folders or a feature store.

Images are re-embedded with exactly the backbone and preprocessing recorded in the run's model.json; a store
made with anything else is refused. Broken images are listed with their reason, never fatal.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedfit.backbones.spec import BackboneSpec
from embedfit.errors import StoreMismatchError, UsageError
from embedfit.images import ImageRecord, collect_images
from embedfit.runs import class_positions, load_model, read_sidecar
from embedfit.store import FeatureStore, StoreSettings, check_mixable


@dataclass
class Predictions:
    """One row per input image; `proba` is NaN for failed images (and absent for models without probabilities)."""

    paths: list[str]
    predicted: list[str]  # "" for failed images
    proba: np.ndarray | None
    class_names: list[str]
    errors: list[str] = field(default_factory=list)

    @property
    def n_failed(self) -> int:
        return sum(1 for e in self.errors if e)

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
            # surrogateescape: a file name that is not valid UTF-8 is written as its own bytes, not refused
            with open(output, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["path", "predicted", "error"])
                writer.writeheader()
                writer.writerows(rows)
        return output


def predict(run: str | os.PathLike, inputs: Sequence[str | os.PathLike], *, weights: str | None = None,
            device: str = "auto", batch_size: int | None = None, workers: int | None = None) -> Predictions:
    """Predict classes for images, folders, or one feature store (.h5).

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
    if len(inputs) == 1 and str(inputs[0]).endswith((".h5", ".hdf5")):
        store = FeatureStore.open(inputs[0])
        model_settings = StoreSettings(spec, **meta["settings"])
        check_mixable(store.settings, model_settings, f"store {store.path}", f"the model in {run}")
        X = store.features()
        errors = [str(e) if s != 0 else "" for e, s in zip(store.errors, store.status, strict=True)]
        paths = [str(p) for p in store.paths]
    else:
        X, errors, paths = _embed(spec, meta, collect_images(inputs), weights, device, batch_size, workers)
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
    return Predictions(paths, predicted, proba, class_names, errors)


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
    if any(str(i).endswith((".h5", ".hdf5")) for i in inputs):
        raise UsageError(f"{run} is a fine-tuned network, which predicts from images: give image files or "
                         "folders, not a feature store")
    model = load_finetuned(run)
    records = collect_images(inputs)
    proba, errors = model.predict_proba_paths([r.path for r in records])
    predicted = ["" if e else model.class_names[int(np.argmax(p))] for p, e in zip(proba, errors, strict=True)]
    return Predictions([r.key for r in records], predicted, proba, list(model.class_names), list(errors))
