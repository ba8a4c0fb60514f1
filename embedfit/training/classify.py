"""The pretrained model as-is: its own ImageNet classifier, over all 1000 classes or restricted to the user's.

Images go through extraction's batched loop (`iter_embeddings`: decoding in worker processes, a status per
file) and the backbone's pretrained head runs on the embeddings it yields. Given class names (`classes`,
e.g. ants,bees) or an explicit `imagenet_map` CSV, the model chooses only among those classes
(`embedfit.training.imagenet_classes.restricted_predict`), which is how compare scores its as-is arm.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedfit.backbones import DEFAULT_BACKBONE
from embedfit.backbones.factory import Backbone, create_backbone
from embedfit.errors import UsageError
from embedfit.extraction.settings import resolve_device
from embedfit.images import collect_images
from embedfit.training.imagenet_classes import (
    NUM_CLASSES,
    ClassMapping,
    load_imagenet_map_csv,
    map_classes,
    restricted_predict,
)


def class_mapping(classes: Sequence[str] | None = None,
                  imagenet_map: str | os.PathLike | None = None) -> ClassMapping | None:
    """The mapping of the user's classes onto ImageNet: from an explicit CSV, else from the names, else None.

    Args:
        classes: The user's class names (e.g. folder names); with `imagenet_map`, the classes its rows must cover
            (None: the classes the CSV names, in its order).
        imagenet_map: A ``class,imagenet_class`` CSV (see `load_imagenet_map_csv`).
    """
    if imagenet_map is not None:
        if classes is None:
            classes = _csv_classes(imagenet_map)
        return load_imagenet_map_csv(imagenet_map, list(classes))
    if classes is None:
        return None
    return map_classes(list(classes))


def _csv_classes(path: str | os.PathLike) -> list[str]:
    """The class column of an `imagenet_map` CSV, in first-seen order (the full read checks the rest)."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            cells = [row[0].strip() for row in csv.reader(f) if row and row[0].strip()]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []  # load_imagenet_map_csv words the error
    cells = [c for c in cells if not c.startswith("#")]
    if cells and cells[0].lower() == "class":
        cells = cells[1:]
    return list(dict.fromkeys(cells))


def imagenet_probabilities(model: Backbone, paths: Sequence[str | Path], device: torch.device, *,
                           batch_size: int | None = None,
                           workers: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Softmax over the pretrained head's classes for image files: (N, K) with NaN rows, and errors per file."""
    from embedfit.training.finetune import head_outputs

    check_classifier(model)
    logits, errors = head_outputs(model, model.head, paths, device, batch_size=batch_size, workers=workers)
    return torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy(), errors


def check_classifier(model: Backbone) -> None:
    """Raise a UsageError unless the backbone carries a pretrained ImageNet-1k classifier."""
    if model.head is None or model.class_names is None:
        raise UsageError(f"{model.spec.short()} has no pretrained classifier to use as-is")


def has_imagenet_head(model: Backbone) -> bool:
    """True when the backbone carries a pretrained classifier over the 1000 ImageNet classes."""
    return model.head is not None and model.class_names is not None and len(model.class_names) == NUM_CLASSES


def classify(images: Sequence[str | Path], backbone: str = DEFAULT_BACKBONE, *, top: int = 5,
             weights: str | None = None, device: str = "auto", classes: Sequence[str] | None = None,
             imagenet_map: str | os.PathLike | None = None, mapping: ClassMapping | None = None,
             batch_size: int | None = None, workers: int | None = None) -> list[dict[str, Any]]:
    """Classes of images with the pretrained classifier unchanged: rows path, rank, class, probability, error.

    Args:
        images: Image files, folders (every image at any depth) or CSV lists.
        backbone: A backbone with a pretrained ImageNet head.
        top: Classes per image.
        weights: State-dict file instead of the default weights.
        device: Where to run.
        classes: Restrict the prediction to these classes (mapped onto ImageNet by name, see `map_classes`):
            each class's probability is the sum over its ImageNet classes, renormalised over the classes.
        imagenet_map: A ``class,imagenet_class`` CSV giving that mapping explicitly.
        mapping: A mapping already built (`class_mapping`), instead of `classes` / `imagenet_map`.
        batch_size: Images per batch; workers: decoding processes (extraction's defaults when None).

    Returns:
        One row per image and rank; a file that does not decode gets one row with its reason in ``error``.
        Restricted rows also carry ``imagenet_top1``, the model's own answer over all 1000 classes.

    Raises:
        UsageError: `top` < 1, the backbone has no classifier, or the classes do not map onto ImageNet.
    """
    if top < 1:
        raise UsageError(f"`top` must be at least 1, got {top}")
    if mapping is None:
        mapping = class_mapping(classes, imagenet_map)
    if mapping is not None and not mapping.applicable:
        raise UsageError(mapping.reason)
    paths = [r.key for r in collect_images(images)]  # files, folders and CSV lists, as predict takes them
    model = create_backbone(backbone, weights=weights)
    check_classifier(model)
    if mapping is not None and len(model.class_names or []) != NUM_CLASSES:
        raise UsageError(f"{model.spec.short()} classifies {len(model.class_names or [])} classes, not the "
                         f"{NUM_CLASSES} ImageNet classes that `classes` maps onto")
    proba, errors = imagenet_probabilities(model, paths, resolve_device(device), batch_size=batch_size,
                                           workers=workers)
    names: Sequence[str] = model.class_names or []
    scores = proba
    if mapping is not None:
        names = mapping.class_names
        scores = np.full((len(paths), len(names)), np.nan)
        ok = np.array([not e for e in errors], dtype=bool)
        if ok.any():
            scores[ok] = restricted_predict(proba[ok], mapping)[1]
    k = min(top, len(names))
    order = np.argsort(-np.nan_to_num(scores, nan=-1.0), axis=1, kind="stable")[:, :k]
    rows: list[dict[str, Any]] = []
    for i, path in enumerate(paths):
        extra = {"imagenet_top1": ""} if mapping is not None else {}
        if errors[i]:
            rows.append({"path": str(path), "rank": "", "class": "", "probability": "", **extra, "error": errors[i]})
            continue
        if mapping is not None:
            extra = {"imagenet_top1": model.class_names[int(np.argmax(proba[i]))]}
        rows += [{"path": str(path), "rank": r + 1, "class": names[int(c)], "probability": float(scores[i, c]),
                  **extra, "error": ""} for r, c in enumerate(order[i])]
    return rows
