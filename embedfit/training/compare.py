"""The transfer-learning comparison on a user's own images, on identical splits.

Arms: the pretrained model as-is (when the classes map to ImageNet classes), a linear probe on frozen
embeddings, fine-tuning, and training from scratch; plus a learning curve (validation accuracy against training
images per class) for the probe and fine-tuning. Every arm runs on the same `repeats` seeded stratified splits, so
accuracy comes with its spread over splits, and every arm with its wall time: "needs less data" and "trains
faster" are measured rather than claimed.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedfit.backbones import DEFAULT_BACKBONE
from embedfit.backbones.registry import Backbone, create_backbone
from embedfit.errors import UsageError, check_output_dir, check_output_not_input
from embedfit.extraction.encoder import Encoder
from embedfit.extraction.settings import resolve_device
from embedfit.fitting.models import make_pipeline
from embedfit.training.classify import imagenet_mapping
from embedfit.training.finetune import (
    TrainConfig,
    decode_labeled,
    make_split,
    save_trained,
    split_indices,
    subsample,
    train,
)

ARMS = ("as-is", "linear probe", "fine-tune", "scratch")


MAX_REPEATS = 100  # seeded splits; more says nothing new about the spread and only costs hours


def _batches(images: list[Any], pre: Any, batch_size: int = 16) -> Any:
    for i in range(0, len(images), batch_size):
        yield torch.stack([pre(im) for im in images[i:i + batch_size]])


def _embed(encoder: Encoder, images: list[Any]) -> np.ndarray:
    out = [encoder(x) for x in _batches(images, encoder.spec.preprocess())]
    return np.concatenate(out) if out else np.zeros((0, encoder.spec.embedding_dim), np.float32)


def _as_is(model: Backbone, images: list[Any], mapping: dict[int, list[int]], device: torch.device) -> np.ndarray:
    """Predicted class per image: the ImageNet probabilities summed over each class's ImageNet classes."""
    with torch.inference_mode():
        pre = model.spec.preprocess()
        logits = torch.cat([model.logits(x.to(device)).float().cpu() for x in _batches(images, pre)])
    proba = torch.softmax(logits, 1).numpy()
    return np.stack([proba[:, mapping[c]].sum(1) for c in sorted(mapping)], 1).argmax(1)


def _probe(X: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray, seed: int) -> float:
    model = "logreg" if np.bincount(y[train]).min(initial=0) >= 3 else "ridge"  # logreg's inner CV needs 3/class
    pipe = make_pipeline(model, n_samples=len(train), n_features=X.shape[1], seed=seed)
    return float((pipe.fit(X[train], y[train]).predict(X[val]) == y[val]).mean())


def _summary(accuracy: list[float], seconds: list[float], **extra: Any) -> dict[str, Any]:
    return {"applicable": True, "accuracy": float(np.mean(accuracy)), "accuracy_std": float(np.std(accuracy)),
            "accuracy_runs": accuracy, "seconds": float(np.mean(seconds)), **extra}


def compare(data: str | Path, output: str | Path, *, backbone: str = DEFAULT_BACKBONE, weights: str | None = None,
            epochs: int = 3, sizes: Sequence[int | None] = (5, 10, 25, 50, None), repeats: int = 3,
            val_size: float = 0.25, device: str = "auto", seed: int = 0,
            finetune: TrainConfig | None = None) -> dict[str, Any]:
    """Run every arm on the same seeded stratified splits; write compare.json, compare.md and run directories.

    Args:
        data: Labeled image folder (class per sub-folder) or CSV.
        output: Folder for the results (the first split's fine-tune and scratch runs go in sub-folders).
        backbone: Backbone for the probe, fine-tuning and as-is; the same architecture is trained from scratch.
        weights: State-dict file instead of the backbone's default pretrained weights (not used by scratch).
        epochs: Training epochs for fine-tuning and scratch (all of them run: no early stopping on the scored images).
        sizes: Training images per class for the learning curve (None = the whole training split); sizes the
            data does not have are skipped.
        repeats: Seeded splits (seed, seed+1, ...); every arm runs on each, and the spread is over them.
        val_size: Validation share of each split (the same images score every arm).
        device: Where to run.
        seed: Seed of the first split and of every arm on it.
        finetune: Fine-tuning settings (default: TrainConfig's); backbone, epochs, device and seed are set here.

    Returns:
        The comparison as written to compare.json.
    """
    if not 1 <= repeats <= MAX_REPEATS:
        raise UsageError(f"repeats must be between 1 and {MAX_REPEATS}, got {repeats}")
    bad = [s for s in sizes if s is not None and (isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1)]
    if bad:
        raise UsageError(f"sizes must be positive numbers of images per class (or None for all), got {bad[0]!r}")
    check_output_dir(output, "results folder")  # before minutes of training, not after
    check_output_not_input(output, [data, *([weights] if weights else [])])
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    model = create_backbone(backbone, weights=weights)
    data_set = decode_labeled(data, model.spec)
    labels, n_classes = data_set.labels, len(data_set.class_names)
    # The scored validation images must not pick the epoch: train every epoch and keep the last.
    ft_config = dataclasses.replace(finetune or TrainConfig(), backbone=backbone, weights=weights, epochs=epochs,
                                    device=device, val_size=val_size, early_stopping=False, progress=False)
    scratch_config = dataclasses.replace(ft_config, pretrained=False, weights=None, freeze="all", unfreeze_every=0)

    # Frozen embeddings do not depend on the split: embed every image once.
    t0 = time.perf_counter()
    X = _embed(Encoder(model, dev), data_set.images)
    embed_seconds = time.perf_counter() - t0
    mapping = imagenet_mapping(data_set.class_names, model.class_names or [])
    model = model.to(dev).eval()

    splits = [split_indices(labels, n_classes, val_size=val_size, seed=seed + r) for r in range(repeats)]
    per_class = int(min(np.bincount(labels[train], minlength=n_classes).min() for train, _ in splits))
    steps = sorted({int(s) for s in sizes if s is not None and 0 < int(s) < per_class})
    steps += [None] if None in sizes or any(s is not None and int(s) == per_class for s in sizes) else []
    runs: dict[str, dict[str, list[float]]] = {arm: {"accuracy": [], "seconds": []} for arm in ARMS}
    curve_runs: dict[Any, dict[str, list[float]]] = {k: {"probe": [], "finetune": [], "finetune_seconds": []}
                                                     for k in steps}
    for r, (train_idx, val_idx) in enumerate(splits):
        split_seed = seed + r
        if mapping is not None:
            t0 = time.perf_counter()
            pred = _as_is(model, [data_set.images[i] for i in val_idx], mapping, dev)
            runs["as-is"]["accuracy"].append(float((pred == labels[val_idx]).mean()))
            runs["as-is"]["seconds"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        runs["linear probe"]["accuracy"].append(_probe(X, labels, train_idx, val_idx, split_seed))
        runs["linear probe"]["seconds"].append(embed_seconds + time.perf_counter() - t0)
        split = make_split(data_set, train_idx, val_idx)
        for arm, config in (("fine-tune", ft_config), ("scratch", scratch_config)):
            result = train(split, dataclasses.replace(config, seed=split_seed))
            runs[arm]["accuracy"].append(result.val_accuracy)
            runs[arm]["seconds"].append(result.train_seconds)
            if r == 0:
                save_trained(output / arm, result, split, data_path=str(data_set.root))
        for k in steps:
            if k is None:  # the whole training split: the probe and fine-tune arms above
                curve_runs[k]["probe"].append(runs["linear probe"]["accuracy"][-1])
                curve_runs[k]["finetune"].append(runs["fine-tune"]["accuracy"][-1])
                curve_runs[k]["finetune_seconds"].append(runs["fine-tune"]["seconds"][-1])
                continue
            sub = subsample(labels, train_idx, k, split_seed)
            curve_runs[k]["probe"].append(_probe(X, labels, sub, val_idx, split_seed))
            ft = train(make_split(data_set, sub, val_idx), dataclasses.replace(ft_config, seed=split_seed))
            curve_runs[k]["finetune"].append(ft.val_accuracy)
            curve_runs[k]["finetune_seconds"].append(ft.train_seconds)

    arms: dict[str, dict[str, Any]] = {}
    if mapping is None:
        arms["as-is"] = {"applicable": False, "reason": "class names do not map one-to-one onto ImageNet classes"}
    else:
        arms["as-is"] = _summary(**runs["as-is"], train_images=0,
                                 imagenet_classes={data_set.class_names[c]: [model.class_names[i] for i in hits]
                                                   for c, hits in mapping.items()})
    arms["linear probe"] = _summary(**runs["linear probe"], embed_seconds=embed_seconds)
    for arm in ("fine-tune", "scratch"):
        arms[arm] = _summary(**runs[arm], epochs=epochs, run_dir=str(output / arm))
    train_images = len(splits[0][0])
    curve = [{"per_class": per_class if k is None else k, "all": k is None,
              "train_images": train_images if k is None else k * n_classes,
              "probe_mean": float(np.mean(c["probe"])), "probe_std": float(np.std(c["probe"])),
              "finetune_mean": float(np.mean(c["finetune"])), "finetune_std": float(np.std(c["finetune"])),
              "finetune_seconds": float(np.mean(c["finetune_seconds"])), "probe_runs": c["probe"],
              "finetune_runs": c["finetune"]} for k, c in curve_runs.items()]
    result = {"data": str(data), "backbone": model.spec.short(), "classes": data_set.class_names,
              "images": len(labels), "excluded": data_set.failed, "train_images": train_images,
              "val_images": len(splits[0][1]), "repeats": repeats, "seeds": [seed + r for r in range(repeats)],
              "epochs": epochs, "device": str(dev), "arms": arms, "learning_curve": curve}
    (output / "compare.json").write_text(json.dumps(result, indent=2))
    (output / "compare.md").write_text(to_markdown(result))
    _plot_curve(curve, output / "learning_curve.png")
    return result


def to_markdown(result: dict[str, Any]) -> str:
    """The comparison as markdown tables (also printed by the CLI)."""
    spread = f"mean ± std over {result['repeats']} split{'s' if result['repeats'] > 1 else ''}"
    lines = [f"Comparison on {result['data']}: {result['backbone']}, {len(result['classes'])} classes, "
             f"{result['train_images']} training / {result['val_images']} validation images per split, "
             f"{result['epochs']} epochs, {result['device']}", "",
             f"| arm | validation accuracy ({spread}) | wall time per split (s) |", "| --- | --- | --- |"]
    for name, arm in result["arms"].items():
        if arm["applicable"]:
            lines.append(f"| {name} | {arm['accuracy']:.3f} ± {arm['accuracy_std']:.3f} | {arm['seconds']:.1f} |")
        else:
            lines.append(f"| {name} | not applicable: {arm['reason']} | |")
    if result["learning_curve"]:
        lines += ["", f"| images per class | linear probe ({spread}) | fine-tune | fine-tune time (s) |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {p['per_class']}{' (all)' if p['all'] else ''} | {p['probe_mean']:.3f} ± {p['probe_std']:.3f} "
                  f"| {p['finetune_mean']:.3f} ± {p['finetune_std']:.3f} | {p['finetune_seconds']:.1f} |"
                  for p in result["learning_curve"]]
    return "\n".join(lines) + "\n"


def _plot_curve(curve: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curve:
        return
    k = [p["per_class"] for p in curve]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar(k, [p["probe_mean"] for p in curve], yerr=[p["probe_std"] for p in curve], marker="o", capsize=3,
                label="linear probe")
    ax.errorbar(k, [p["finetune_mean"] for p in curve], yerr=[p["finetune_std"] for p in curve], marker="s",
                capsize=3, label="fine-tune")
    ax.set_xscale("log")
    ax.set_xlabel("training images per class")
    ax.set_ylabel("validation accuracy")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
