"""The transfer-learning comparison on a user's own images, on identical splits.

Arms: the pretrained model as-is (when the classes map to ImageNet classes), a linear probe on frozen
embeddings, fine-tuning, and training from scratch; plus a learning curve (validation accuracy against training
images per class) for the probe and fine-tuning. Accuracy comes with its spread, and every arm with its wall
time, so "needs less data" and "trains faster" are measured rather than claimed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedfit.backbones import DEFAULT_BACKBONE, create_backbone
from embedfit.extract import Encoder, resolve_device
from embedfit.finetune import Split, TrainConfig, imagenet_mapping, load_split, save_trained, train
from embedfit.fit import make_pipeline


def _embed(encoder: Encoder, images: list[Any], batch_size: int = 16) -> np.ndarray:
    pre = encoder.spec.preprocess()
    out = [encoder(torch.stack([pre(im) for im in images[i:i + batch_size]]))
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, encoder.spec.embedding_dim), np.float32)


def _probe(Xtr: np.ndarray, ytr: np.ndarray, Xval: np.ndarray, yval: np.ndarray, seed: int) -> float:
    pipe = make_pipeline("logreg", n_samples=len(ytr), n_features=Xtr.shape[1], seed=seed)
    if np.bincount(ytr).min(initial=0) < 3:  # LogisticRegressionCV needs 3 per class for its inner folds
        pipe = make_pipeline("ridge", n_samples=len(ytr), n_features=Xtr.shape[1], seed=seed)
    return float((pipe.fit(Xtr, ytr).predict(Xval) == yval).mean())


def _subsample(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)])


def compare(data: str | Path, output: str | Path, *, backbone: str = DEFAULT_BACKBONE, epochs: int = 3,
            sizes: Sequence[int | None] = (5, 10, 25, 50, None), repeats: int = 3, val_size: float = 0.25,
            device: str = "auto", seed: int = 0, finetune: TrainConfig | None = None) -> dict[str, Any]:
    """Run every arm on one seeded stratified split and write compare.json, compare.md and run directories.

    Args:
        data: Labeled image folder (class per sub-folder) or CSV.
        output: Folder for the results.
        backbone: Backbone for the probe, fine-tuning and as-is; the same architecture is trained from scratch.
        epochs: Training epochs for fine-tuning and scratch.
        sizes: Training images per class for the learning curve (None = all).
        repeats: Subsample draws per learning-curve size for the probe (fine-tuning runs once per size).
        val_size: Validation share (the same images score every arm).
        device: Where to run.
        seed: Seed of the split and every arm.
        finetune: Fine-tuning settings (default: TrainConfig with `epochs`).
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    model = create_backbone(backbone)
    split = load_split(data, model.spec, val_size=val_size, seed=seed)
    ft_config = dataclasses.replace(finetune or TrainConfig(), backbone=backbone, epochs=epochs, device=device,
                                    seed=seed, val_size=val_size)
    arms: dict[str, dict[str, Any]] = {}

    # 1. The pretrained model as-is: only meaningful when class names are ImageNet classes.
    mapping = imagenet_mapping(split.class_names, model.class_names or [])
    if mapping is None:
        arms["as-is"] = {"applicable": False, "reason": "class names do not map one-to-one onto ImageNet classes"}
    else:
        t0 = time.perf_counter()
        m = model.to(dev).eval()
        pre = m.spec.preprocess()
        with torch.inference_mode():
            logits = torch.cat([m.logits(torch.stack([pre(im) for im in split.val_images[i:i + 16]]).to(dev))
                                for i in range(0, len(split.val_images), 16)])
        proba = torch.softmax(logits.float(), 1).cpu().numpy()
        grouped = np.stack([proba[:, mapping[c]].sum(1) for c in range(len(split.class_names))], 1)
        arms["as-is"] = {"applicable": True, "accuracy": float((grouped.argmax(1) == split.val_labels).mean()),
                         "accuracy_std": 0.0, "seconds": time.perf_counter() - t0, "train_images": 0}

    # 2. Linear probe on frozen embeddings (embedding once is most of its cost).
    t0 = time.perf_counter()
    encoder = Encoder(model, dev)
    Xtr, Xval = _embed(encoder, split.train_images), _embed(encoder, split.val_images)
    embed_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    probe_acc = _probe(Xtr, split.train_labels, Xval, split.val_labels, seed)
    arms["linear probe"] = {"applicable": True, "accuracy": probe_acc, "accuracy_std": 0.0,
                            "seconds": embed_seconds + time.perf_counter() - t1, "embed_seconds": embed_seconds,
                            "train_images": len(split.train_labels)}

    # 3. Fine-tuning and 4. training from scratch, same split, same epochs.
    for name, cfg in (("fine-tune", ft_config),
                      ("scratch", dataclasses.replace(ft_config, pretrained=False, freeze="all"))):
        result = train(split, cfg)
        save_trained(output / name.replace(" ", "-"), result, split, data_path=str(split.root))
        arms[name] = {"applicable": True, "accuracy": result.val_accuracy, "accuracy_std": 0.0,
                      "seconds": result.train_seconds, "epochs": len(result.epochs) - 1,
                      "train_images": len(split.train_labels)}

    # Learning curve: accuracy against training images per class.
    available = int(np.bincount(split.train_labels).min())
    curve = []
    for size in sizes:
        k = available if size is None else int(size)
        if k > available or (size is not None and k == available and None in sizes):
            continue
        probe_scores = [_probe(Xtr[idx], split.train_labels[idx], Xval, split.val_labels, seed + r)
                        for r in range(repeats) for idx in [_subsample(split.train_labels, k, seed + r)]]
        sub = Split([split.train_images[i] for i in _subsample(split.train_labels, k, seed)],
                    split.train_labels[_subsample(split.train_labels, k, seed)], split.val_images, split.val_labels,
                    split.val_keys, split.class_names, split.root)
        ft = train(sub, ft_config)
        curve.append({"per_class": k, "probe_mean": float(np.mean(probe_scores)),
                      "probe_std": float(np.std(probe_scores)), "finetune": ft.val_accuracy,
                      "finetune_seconds": ft.train_seconds})

    result = {"data": str(data), "backbone": model.spec.short(), "classes": split.class_names,
              "train_images": len(split.train_labels), "val_images": len(split.val_labels), "epochs": epochs,
              "device": str(dev), "seed": seed, "arms": arms, "learning_curve": curve}
    (output / "compare.json").write_text(json.dumps(result, indent=2))
    (output / "compare.md").write_text(to_markdown(result))
    _plot_curve(curve, output / "learning_curve.png")
    return result


def to_markdown(result: dict[str, Any]) -> str:
    """The comparison as markdown tables (also printed by the CLI)."""
    lines = [f"Comparison on {result['data']}: {result['backbone']}, {result['train_images']} training / "
             f"{result['val_images']} validation images, {len(result['classes'])} classes, {result['epochs']} epochs, "
             f"{result['device']}", "", "| arm | validation accuracy | wall time (s) |", "| --- | --- | --- |"]
    for name, arm in result["arms"].items():
        if arm["applicable"]:
            lines.append(f"| {name} | {arm['accuracy']:.3f} | {arm['seconds']:.1f} |")
        else:
            lines.append(f"| {name} | not applicable: {arm['reason']} | |")
    if result["learning_curve"]:
        lines += ["", "| images per class | linear probe (mean ± std) | fine-tune | fine-tune time (s) |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {p['per_class']} | {p['probe_mean']:.3f} ± {p['probe_std']:.3f} | {p['finetune']:.3f} | "
                  f"{p['finetune_seconds']:.1f} |" for p in result["learning_curve"]]
    return "\n".join(lines) + "\n"


def _plot_curve(curve: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curve:
        return
    k = [p["per_class"] for p in curve]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar(k, [p["probe_mean"] for p in curve], yerr=[p["probe_std"] for p in curve], marker="o",
                label="linear probe")
    ax.plot(k, [p["finetune"] for p in curve], marker="s", label="fine-tune")
    ax.set_xscale("log")
    ax.set_xlabel("training images per class")
    ax.set_ylabel("validation accuracy")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
