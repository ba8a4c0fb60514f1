"""The pretrained model as-is: its own ImageNet classifier, unchanged, on the user's images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from embedfit.backbones import DEFAULT_BACKBONE
from embedfit.backbones.registry import create_backbone
from embedfit.errors import UsageError
from embedfit.extraction.settings import resolve_device
from embedfit.images import collect_images, decode_image


def classify(images: Sequence[str | Path], backbone: str = DEFAULT_BACKBONE, *, top: int = 5,
             weights: str | None = None, device: str = "auto") -> list[dict[str, Any]]:
    """ImageNet classes of images with the pretrained classifier unchanged: rows path, rank, class, probability."""
    if top < 1:
        raise UsageError(f"--top must be at least 1, got {top}")
    paths = [r.key for r in collect_images(images)]  # files, folders and CSV lists, as predict takes them
    model = create_backbone(backbone, weights=weights)
    if model.head is None or model.class_names is None:
        raise UsageError(f"{model.spec.short()} has no pretrained classifier to use as-is")
    dev = resolve_device(device)
    model = model.to(dev).eval()
    pre = model.spec.preprocess()
    rows = []
    for path in paths:
        try:
            x = pre(decode_image(path))[None].to(dev)
        except Exception as exc:
            rows.append({"path": str(path), "rank": "", "class": "", "probability": "", "error": str(exc)})
            continue
        with torch.inference_mode():
            proba = torch.softmax(model.logits(x).float(), dim=1)[0]
        values, index = proba.topk(min(top, len(proba)))
        rows += [{"path": str(path), "rank": r + 1, "class": model.class_names[int(i)], "probability": float(v),
                  "error": ""} for r, (v, i) in enumerate(zip(values, index, strict=True))]
    return rows


def imagenet_mapping(class_names: Sequence[str], imagenet: Sequence[str]) -> dict[int, list[int]] | None:
    """Map each class to the ImageNet classes whose description names it (e.g. 'cat' -> tabby cat, ...).

    Returns None unless every class maps to at least one ImageNet class and no two classes share one.
    """
    mapping: dict[int, list[int]] = {}
    for c, name in enumerate(class_names):
        word = name.lower().replace("_", " ").strip()
        # a synonym that is the word or ends in it: "cat" is a tabby cat, not a catamaran; "espresso" is not
        # an espresso maker
        hits = [i for i, desc in enumerate(imagenet)
                if any(syn == word or syn.endswith(f" {word}") for syn in desc.lower().split(", "))]
        if not hits:
            return None
        mapping[c] = hits
    used = [i for hits in mapping.values() for i in hits]
    return mapping if len(used) == len(set(used)) else None
