"""The transfer-learning comparison on a user's own images, on identical splits, ending in a recommendation.

Arms: the pretrained model as-is (choosing only among the user's classes, when they map onto ImageNet classes),
a linear probe on frozen embeddings, fine-tuning (one arm per freeze policy and augmentation setting), and
training from scratch; plus a learning curve (validation accuracy against training images per class) for the
probe and fine-tuning, with as-is and scratch as reference lines.

Every arm runs on the same `repeats` seeded stratified splits and is scored on the same validation images, so
arms are compared image by image: each accuracy comes with a 95% bootstrap interval over the validation images,
and each arm's difference from the best arm with a paired one (the same images resampled for both arms). With a
test folder, every arm is also scored on the same held-out test images (the trained arms refit on all training
images at the epoch count that scored best on validation), and the recommendation rests on the test images.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedfit.backbones import DEFAULT_BACKBONE
from embedfit.errors import UsageError, check_output_dir, check_output_not_input
from embedfit.extraction.encoder import Encoder, iter_embeddings
from embedfit.extraction.settings import resolve_device
from embedfit.fitting.models import make_pipeline
from embedfit.progress import OnProgress, Progress, duration, note, within
from embedfit.runs import check_replace, identity_of, staged_dir
from embedfit.stats import N_BOOT, cheapest_within_noise, paired_bootstrap, ratio
from embedfit.training.classify import class_mapping, has_imagenet_head
from embedfit.training.finetune import (
    LabeledImages,
    TrainConfig,
    TrainResult,
    check_labeled,
    decode_labeled,
    make_split,
    run_identity,
    save_trained,
    scored_proba,
    split_indices,
    subsample,
    train,
)
from embedfit.training.imagenet_classes import restricted_predict, top1_mapped

AS_IS, PROBE, FINETUNE, SCRATCH = "as-is", "linear probe", "fine-tune", "scratch"
ARM_CHOICES = ("as-is", "probe", "finetune", "scratch")  # what `arms` takes
_ARM_ALIASES = {"as-is": AS_IS, "asis": AS_IS, "probe": PROBE, "linear-probe": PROBE, "linear probe": PROBE,
                "finetune": FINETUNE, "fine-tune": FINETUNE, "scratch": SCRATCH}
ARMS = (AS_IS, PROBE, FINETUNE, SCRATCH)

MAX_REPEATS = 100  # seeded splits; more says nothing new about the spread and only costs hours


def parse_arms(arms: Sequence[str] | str) -> list[str]:
    """`arms` values -> arm names in the standard order; raises UsageError naming an unknown one."""
    items = [a.strip().lower() for a in (arms.split(",") if isinstance(arms, str) else arms) if a.strip()]
    unknown = [a for a in items if a not in _ARM_ALIASES]
    if unknown or not items:
        raise UsageError(f"`arms` takes a comma list of {', '.join(ARM_CHOICES)}, got '{','.join(items)}'")
    chosen = {_ARM_ALIASES[a] for a in items}
    return [a for a in ARMS if a in chosen]


def _probe_arm(backbone: str) -> str:
    return f"{PROBE} ({backbone})"


# ---------------------------------------------------------------------------------------------------
# Frozen embeddings: extraction's loop, and the stores that already hold them


def _file_id(rec: Any) -> tuple[str, int, int]:
    """What makes a store row this very file: its absolute path (or URL), size and modification time."""
    path = str(rec.path)
    return (path if "://" in path else os.path.abspath(path)), int(rec.size), int(rec.mtime_ns)


def _stored_rows(stores: Sequence[Any]) -> dict[tuple[str, int, int], tuple[int, int]]:
    """(path, size, mtime) -> (store, row) for every embedded row of the stores (the first store wins)."""
    found: dict[tuple[str, int, int], tuple[int, int]] = {}
    for s, store in enumerate(stores):
        for row in store.ok_rows():
            path = str(store.image_path(int(row)))
            key = (path if "://" in path else os.path.abspath(path), int(store.file_size[row]),
                   int(store.file_mtime_ns[row]))
            found.setdefault(key, (s, int(row)))
    return found


def embed_labeled(sets: Sequence[LabeledImages], encoder: Encoder, *, stores: Sequence[Any] = (),
                  on_rate: Callable[[float, int], bool] | None = None, on_progress: OnProgress | None = None
                  ) -> tuple[list[np.ndarray], list[dict[int, str]], int]:
    """Frozen embeddings of labeled image sets, read from `stores` where they hold the very file (same path,
    size and modification time, embedded with the same backbone) and embedded otherwise through extraction's
    loop (`iter_embeddings`: decoding workers, batching, ONNX Runtime where the encoder uses it).

    Args:
        sets: The image sets (training, test), with their scanned records.
        encoder: The encoder of the backbone the stores were checked against.
        stores: Open `FeatureStore`s.
        on_rate: Called once, after the first measured batch, with the seconds per image and the number of images
            still to embed; returning False stops the embedding there (the caller's budget leaves no arm that
            needs it).
        on_progress: Hears of each embedded batch (`embedfit.progress`): images, rate and time left.

    Returns:
        Per set the features (N, D) (NaN rows where a file does not decode, or where embedding stopped), the
        reasons per failed image index, and how many images came from the stores.
    """
    dim = encoder.spec.embedding_dim
    feats = [np.full((len(s.keys), dim), np.nan, dtype=np.float32) for s in sets]
    errors: list[dict[int, str]] = [{} for _ in sets]
    known = _stored_rows(stores) if stores else {}
    todo: list[tuple[int, int]] = []
    from_store: dict[int, list[tuple[int, int, int]]] = {}  # store -> (set, image, row)
    for k, s in enumerate(sets):
        for i, rec in enumerate(s.records):
            hit = known.get(_file_id(rec))
            if hit is None:
                todo.append((k, i))
            else:
                from_store.setdefault(hit[0], []).append((k, i, hit[1]))
    for s, hits in from_store.items():
        rows = np.array([row for _, _, row in hits])
        order = np.argsort(rows)
        block = stores[s].features(rows[order])
        for j, o in enumerate(order):
            k, i, _ = hits[o]
            feats[k][i] = block[j]
    records = [sets[k].records[i] for k, i in todo]
    done, started, first = 0, time.perf_counter(), None
    with Progress("embedding", len(records), unit="images", on_progress=on_progress) as progress:
        for batch in iter_embeddings(records, encoder):
            for j, reason in enumerate(batch.errors):
                k, i = todo[done + j]
                feats[k][i] = batch.features[j]
                if reason:
                    errors[k][i] = reason
            done += len(batch.errors)
            now = time.perf_counter()
            progress.advance(len(batch.errors), f"{done / max(now - started, 1e-9):.1f} img/s")
            if on_rate is not None and first is not None:  # the second batch: decoding workers are up to speed
                rate = (now - first[0]) / (done - first[1])
                if not on_rate(rate, len(records) - done):
                    break
                on_rate = None
            first = first or (now, done)
    if on_rate is not None:  # one batch or none: what was measured
        on_rate((time.perf_counter() - started) / max(done, 1) if done else 0.0, 0)
    return feats, errors, sum(len(h) for h in from_store.values())


def _open_stores(paths: Sequence[str | Path], spec: Any) -> list[Any]:
    """Open the stores and refuse one whose features another backbone, preprocessing or TTA made."""
    from embedfit.storage import FeatureStore, StoreSettings, check_mixable

    opened = []
    for path in paths:
        store = FeatureStore.open(path)
        check_mixable(store.settings, StoreSettings(spec), f"store {path}", "the comparison's backbone")
        opened.append(store)
    return opened


def _drop_failed(data: LabeledImages, failed: dict[int, str]) -> LabeledImages:
    """`data` without the images that did not decode, each listed in `failed` as extraction words it."""
    if not failed:
        return data
    keep = [i for i in range(len(data.keys)) if i not in failed]
    return dataclasses.replace(
        data, images=[data.images[i] for i in keep] if data.images else [], labels=data.labels[keep],
        keys=[data.keys[i] for i in keep], paths=[data.paths[i] for i in keep],
        records=[data.records[i] for i in keep],
        failed=[*data.failed, *(f"{data.keys[i]}: {reason}" for i, reason in sorted(failed.items()))])


def _imagenet_proba(model: Any, X: np.ndarray) -> np.ndarray:
    """The pretrained head on pre-logits embeddings -> ImageNet softmax (the model as-is, without a second pass)."""
    with torch.inference_mode():
        head = model.head.to("cpu").eval()
        return torch.softmax(head(torch.from_numpy(X)).double(), dim=1).numpy()


def _top1(proba: np.ndarray, mapping: Any, to_label: np.ndarray) -> np.ndarray:
    """`top1_mapped` in the data's labels (-1: none of the classes the mapping scores)."""
    top = top1_mapped(proba, mapping)
    return np.where(top >= 0, to_label[np.maximum(top, 0)], -1)


def _unmapped_reason(mapping: Any) -> str:
    """Why no class could be scored as-is, without the list of names (compare.md lists them once)."""
    if mapping.source != "class names":
        return mapping.reason
    return (f"none of the {len(mapping.class_names)} classes maps onto ImageNet classes on its own (listed below); "
            "rename the folders or give an `imagenet_map` CSV")


# ---------------------------------------------------------------------------------------------------
# The cost, estimated before the long part


def _step_seconds(config: TrainConfig, data: LabeledImages, on_progress: OnProgress | None) -> float:
    """Seconds per training image of one measured batch with `config` (its freeze policy, augmentation)."""
    n = min(config.batch_size, len(data.labels))
    what = f"timing one training batch ({n} images, {'scratch' if not config.pretrained else config.freeze})"
    note(on_progress, what)
    batch = make_split(data, np.arange(n), np.zeros(0, int))
    result = train(batch, dataclasses.replace(config, epochs=1, validate_epochs=False),
                   on_progress=within(on_progress, what))
    return result.epochs[1]["seconds"] / n


@dataclasses.dataclass
class _Cost:
    """The arms' estimated seconds from the measured batches, split as the results are (each frozen backbone's
    one embedding pass apart from each arm's fitting), and the budget's choice of arms."""

    order: list[str]
    frozen: dict[str, str]  # arm -> the backbone whose one embedding pass it scores on (as-is, probes)
    n: int
    n_test: int
    n_val: int
    repeats: int
    curve_sizes: int
    curve_arm: str | None
    epochs: dict[str, int]
    step_seconds: dict[str, float]
    test: bool
    device: Any
    budget: float | None
    embedding: dict[str, float] = dataclasses.field(default_factory=dict)  # per backbone
    fitting: dict[str, float] = dataclasses.field(default_factory=dict)  # per arm
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # per arm: what running it adds
    chosen: list[str] = dataclasses.field(default_factory=list)
    skipped: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    spent: float = 0.0
    reused: int = 0

    def plan(self, per_image: float, left: int, spent: float) -> None:
        """Estimate each arm from `per_image` (embedding) and the training steps; keep the arms that fit."""
        self.spent = spent
        # a forward pass costs about a third of a training step (forward + backward) where none was measured
        infer = per_image or min(self.step_seconds.values(), default=0.0) / 3
        n_train = self.n - self.n_val
        first = next(iter(self.frozen.values()), None)
        for backbone in dict.fromkeys(self.frozen.values()):
            # the first backbone's images still to embed were counted; another one's, at about its speed
            self.embedding[backbone] = left * per_image if backbone == first else (self.n + self.n_test) * infer
        for arm in self.order:
            if arm in self.step_seconds:
                step, e = self.step_seconds[arm], self.epochs[arm]
                per_split = e * (n_train * step + self.n_val * infer)
                curve = self.curve_sizes * e * n_train * step if arm == self.curve_arm else 0.0
                refit = e * self.n * step + self.n_test * infer if (self.test or arm != SCRATCH) else 0.0
                self.fitting[arm] = self.repeats * (per_split + curve) + refit
            else:  # as-is maps probabilities, a probe fits a linear model: seconds next to the embedding pass
                self.fitting[arm] = 0.0
        total, paid = spent, set()
        for arm in self.order:
            backbone = self.frozen.get(arm)
            self.seconds[arm] = self.fitting[arm] + (self.embedding[backbone] if backbone and backbone not in paid
                                                     else 0.0)
            if self.budget is None or total + self.seconds[arm] <= self.budget:
                self.chosen.append(arm)
                total += self.seconds[arm]
                paid.add(backbone)
            else:
                self.skipped.append({"arm": arm, "estimated_seconds": round(self.seconds[arm], 1),
                                     "reason": f"estimated {duration(self.seconds[arm])}, over the "
                                               f"{duration(self.budget)} budget (`max_minutes`)"})

    def total(self) -> float:
        return self.spent + sum(self.seconds[a] for a in self.chosen)

    def lines(self) -> list[str]:
        """The estimate as printed before the long part: the total, embedding and fitting apart, what the budget
        skips, and on a CPU the fast answer."""
        parts = [f"embedding {b} {duration(s)}" for b, s in self.embedding.items()]
        fits = [f"{a} {duration(self.fitting[a])}" for a in self.order if a in self.step_seconds]
        if fits:
            parts.append("fitting " + ", ".join(fits))
        out = [f"estimate: about {duration(self.total())} in all" + (f" ({'; '.join(parts)})" if parts else "")]
        fast = [a for a in (AS_IS, PROBE) if a in self.order]
        if self.device.type == "cpu" and self.step_seconds:
            quick = f" (about {duration(self.spent + sum(self.seconds[a] for a in fast))})" if fast else ""
            out.append(f"on a CPU the trained arms take most of it: --arms as-is,probe gives the fast answer "
                       f"first{quick}; --max-minutes caps the run")
        if self.skipped:
            out.append("skipped (over the budget): " + ", ".join(s["arm"] for s in self.skipped))
        return out

    def to_dict(self, took: float) -> dict[str, Any]:
        return {"seconds": {a: round(s, 1) for a, s in self.seconds.items()},
                "embedding_seconds": {b: round(s, 1) for b, s in self.embedding.items()},
                "fitting_seconds": {a: round(s, 1) for a, s in self.fitting.items()},
                "total_seconds": round(self.total(), 1), "took_seconds": round(took, 1),
                "budget_seconds": self.budget,
                "method": "one measured embedding batch and one measured training batch per trained arm; an arm's "
                          "seconds are its fitting plus the embedding pass it is the first to need"}


def _duplicate_clusters(data: LabeledImages, X: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """A group id per image of `data` (exact copies by their files' SHA-256, near-duplicates by the cosine of the
    frozen embeddings `X`: `embedfit.auditing.cluster_duplicates`), and what compare.json records of them: the
    clusters of more than one image, by key."""
    from embedfit.auditing import cluster_duplicates
    from embedfit.auditing.search import normalize
    from embedfit.extraction.reader import file_hashes

    groups = cluster_duplicates(file_hashes(data.records), normalize(X))
    sizes = np.bincount(groups)
    clusters = [[data.keys[i] for i in np.flatnonzero(groups == g)] for g in np.flatnonzero(sizes > 1)]
    return groups, {"by": "content hash (SHA-256 of the file) and near-duplicate embeddings",
                    "clusters": len(clusters), "images": sum(map(len, clusters)), "members": clusters}


def _probe_fit(X: np.ndarray, y: np.ndarray, train: np.ndarray, seed: int) -> Any:
    model = "logreg" if np.bincount(y[train]).min(initial=0) >= 3 else "ridge"  # logreg's inner CV needs 3/class
    pipe = make_pipeline(model, n_samples=len(train), n_features=X.shape[1], seed=seed)
    return pipe.fit(X[train], y[train])


def _policy_name(freeze: str, augment: bool, freezes: Sequence[str], augments: Sequence[bool]) -> str:
    parts = ([freeze] if len(freezes) > 1 else []) + \
        (["augment" if augment else "no augment"] if len(augments) > 1 else [])
    return FINETUNE + (f" ({', '.join(parts)})" if parts else "")


def _slug(name: str) -> str:
    return "-".join(name.replace("(", " ").replace(")", " ").replace(",", " ").replace(":", "").split())


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# ---------------------------------------------------------------------------------------------------
# The recommendation (statistics: embedfit.stats)


def recommend(scores: dict[str, dict[str, Any]], comparisons: dict[str, dict[str, Any]], on: str) -> str:
    """One line drawn from the numbers: the cheapest arm within noise of the most accurate one.

    Args:
        scores: Per arm {"accuracy", "seconds"}.
        comparisons: Per arm (other than the best) {"difference", "ci"}: its accuracy minus the best arm's, with
            the paired 95% interval; "best" names the best arm.
        on: What the scores are measured on ("validation", "test").
    """
    best = comparisons["best"]
    high = {a: comparisons[a]["ci"][1] for a in scores if a != best}
    pick = cheapest_within_noise(best, {a: s["seconds"] for a, s in scores.items()},
                                 {a: s["accuracy"] for a, s in scores.items()}, high)
    close = [a for a in scores if a == best or high[a] >= 0]
    acc = scores[best]["accuracy"]
    others = sorted((a for a in scores if a != best), key=lambda a: -scores[a]["accuracy"])
    if pick != best:
        c = comparisons[pick]
        cost = ("with no training" if pick == AS_IS else
                f"at {ratio(scores[pick]['seconds'], scores[best]['seconds'])} of its time "
                f"({scores[pick]['seconds']:.0f} s vs {scores[best]['seconds']:.0f} s)")
        return (f"{pick}: within noise of {best} on {on} images ({c['difference']:+.3f}, 95% CI "
                f"{c['ci'][0]:+.3f} to {c['ci'][1]:+.3f}) {cost}")
    if not others:
        return f"{best}: the only arm run ({acc:.3f} on {on} images)"
    runner = others[0]
    c = comparisons[runner]
    vs = f"{runner} {c['difference']:+.3f}, 95% CI {c['ci'][0]:+.3f} to {c['ci'][1]:+.3f}"
    if runner in close:
        cheap = "with no training" if best == AS_IS else "and the cheapest of the arms within noise of it"
        return f"{best}: the most accurate on {on} images ({acc:.3f}) {cheap} ({vs})"
    return f"{best}: the most accurate on {on} images ({acc:.3f}), clearly ahead of the next arm ({vs})"


# ---------------------------------------------------------------------------------------------------
# The comparison


@dataclasses.dataclass
class _Arm:
    """One arm's per-split results on the validation images (and on the test images)."""

    name: str
    config: TrainConfig | None = None
    pred: list[np.ndarray] = dataclasses.field(default_factory=list)
    seconds: list[float] = dataclasses.field(default_factory=list)  # fitting (training) per split
    embedding_seconds: float | None = None  # the frozen-embedding pass it scores on (as-is, probes), timed apart
    histories: list[list[float]] = dataclasses.field(default_factory=list)
    top1: list[np.ndarray] = dataclasses.field(default_factory=list)  # as-is: plain top-1, mapped
    test_pred: np.ndarray | None = None
    test_top1: np.ndarray | None = None
    test_seconds: float = 0.0
    epochs_refit: int | None = None
    refit_seconds: float | None = None
    not_applicable: str = ""
    first: tuple[TrainResult, np.ndarray] | None = None  # the model trained on the first split, its val images
    covered: np.ndarray | None = None  # a partial as-is: per training image, whether its class maps
    test_covered: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """What to compare and how (the `embedfit compare` options, one field each).

    Attributes:
        backbone: Backbone for the probe, fine-tuning and as-is; the same architecture is trained from scratch.
        weights: State-dict file instead of the backbone's default pretrained weights (not used by scratch).
        epochs: Training epochs for fine-tuning (all of them run: no early stopping on the scored images).
        scratch_epochs: Epochs for scratch; None matches fine-tuning's optimizer steps (same images and batch
            size, so the same epochs).
        sizes: Training images per class for the learning curve (None = the whole training split); sizes the
            data does not have are skipped and named. Each size trains for about as many optimizer steps as the
            whole split does in `epochs` epochs.
        repeats: Seeded splits (seed, seed+1, ...); every arm runs on each.
        val_size: Validation share of each split (the same images score every arm).
        device: Where to run.
        seed: Seed of the first split and of every arm on it.
        finetune: Fine-tuning settings (default: TrainConfig's); backbone, epochs, device and seed are set here.
        arms: Which arms to run: any of "as-is", "probe", "finetune", "scratch".
        freeze: Freeze policies, one fine-tune arm each ("head", "last:N", "none"); default the `finetune`
            config's.
        augment: Augmentation settings, one fine-tune arm each with the freeze policies: True uses the `finetune`
            config's augmentations, False none.
        test: A labeled folder or CSV of held-out images with the same classes: every arm is scored on it.
        imagenet_map: A ``class,imagenet_class`` CSV for the as-is arm instead of reading the class names.
        probe_backbones: More backbones for the linear probe, one arm each ("linear probe (NAME)") on the same
            splits, so that the comparison also answers which backbone to probe (`embedfit sweep` does that at
            scale).
        stores: Feature stores (`embedfit extract`'s) that may hold the training and test images already: an image
            whose very file (path, size, modification time) a store holds, embedded with `backbone` (same spec
            and test-time augmentation), is read from it instead of being embedded again.
        max_minutes: A budget: the run time of every arm is estimated from a first measured batch before the long
            part starts; the arms that fit (in the order as-is, probe, fine-tune, scratch) run and the others are
            named as skipped. None runs every arm.
        group_duplicates: Keep each cluster of duplicates on one side of every split (training or validation), the
            same splits for every arm: exact copies by the SHA-256 of their files (a store's `content_hash`),
            near-duplicates by the cosine similarity of `backbone`'s frozen embeddings (the one embedding pass
            as-is and the probe use, run for this when neither does; `embedfit.auditing.cluster_duplicates`). The
            validation images are then one fold of a `StratifiedGroupKFold` of round(1 / `val_size`) folds.
        exclude: A CSV with `path,action` columns (an audit.csv, or the fixes CSV of an audit's report): the
            training images marked "exclude" (keys as a store of the folder keys them) are left out of every arm.
    """

    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    epochs: int = 3
    scratch_epochs: int | None = None
    sizes: Sequence[int | None] = (5, 10, 25, 50, None)
    repeats: int = 3
    val_size: float = 0.25
    device: str = "auto"
    seed: int = 0
    finetune: TrainConfig | None = None
    arms: Sequence[str] | str = ARM_CHOICES
    freeze: Sequence[str] | None = None
    augment: Sequence[bool] = (True,)
    test: str | Path | None = None
    imagenet_map: str | Path | None = None
    probe_backbones: Sequence[str] = ()
    stores: Sequence[str | Path] = ()
    max_minutes: float | None = None
    group_duplicates: bool = False
    exclude: str | Path | None = None


def compare(data: str | Path, output: str | Path, config: CompareConfig | None = None, *,
            on_progress: OnProgress | None = None, **options: Any) -> dict[str, Any]:
    """Run the chosen arms on the same seeded stratified splits; write compare.json, compare.md, the learning
    curve and run directories, and end with a recommendation.

    Args:
        data: Labeled image folder (class per sub-folder) or CSV: the training images.
        output: Folder for the results (each trained arm's final model goes in a sub-folder).
        config: What to compare and how (`CompareConfig`); keyword `options` override its fields (e.g.
            `epochs=1`).
        on_progress: Called with the comparison's progress (`embedfit.progress`): a note as each arm starts on
            each split, and the images of each embedding pass and the batches of each epoch as they go.

    Returns:
        The comparison as written to compare.json.
    """
    try:
        config = dataclasses.replace(config or CompareConfig(), **options)
    except TypeError as exc:
        raise UsageError(f"unknown compare option: {exc}") from None
    backbone, weights, epochs, scratch_epochs = config.backbone, config.weights, config.epochs, config.scratch_epochs
    sizes, repeats, val_size, device, seed = config.sizes, config.repeats, config.val_size, config.device, config.seed
    finetune, arms, freeze, augment, test = config.finetune, config.arms, config.freeze, config.augment, config.test
    imagenet_map, probe_backbones, stores = config.imagenet_map, config.probe_backbones, config.stores
    max_minutes, group_duplicates, exclude = config.max_minutes, config.group_duplicates, config.exclude

    def say(message: str) -> None:
        note(on_progress, message)

    chosen = parse_arms(arms)
    if not 1 <= repeats <= MAX_REPEATS:
        raise UsageError(f"`repeats` must be between 1 and {MAX_REPEATS}, got {repeats}")
    bad = [s for s in sizes if s is not None and (isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1)]
    if bad:
        raise UsageError(f"`sizes` must be positive numbers of images per class (or None for all), got {bad[0]!r}")
    if scratch_epochs is not None and scratch_epochs < 1:
        raise UsageError(f"`scratch_epochs` must be at least 1, got {scratch_epochs}")
    if max_minutes is not None and not max_minutes > 0:
        raise UsageError(f"`max_minutes` must be a positive number of minutes, got {max_minutes}")
    marked: set[str] = set()
    if exclude is not None:
        from embedfit.auditing import read_exclusions

        marked = read_exclusions(exclude)  # a missing or malformed file is refused before any work
    check_output_dir(output, "results folder")  # before minutes of training, not after
    check_output_not_input(output, [data, *([test] if test else []), *([weights] if weights else []),
                                    *(str(s) for s in stores), *([exclude] if exclude else [])])
    started = time.perf_counter()
    base = finetune or TrainConfig()
    freezes = list(dict.fromkeys(TrainConfig(freeze=f).freeze for f in (freeze or [base.freeze])))
    augments = list(dict.fromkeys(bool(a) for a in augment)) or [True]
    final = Path(output)
    dev = resolve_device(device)
    from embedfit.backbones.factory import create_backbone

    model = create_backbone(backbone, weights=weights)
    opened = _open_stores(stores, model.spec)
    # Only the trained arms need the images decoded in memory; frozen embeddings read the files through
    # extraction's loop, which reports broken files itself.
    decode = FINETUNE in chosen or SCRATCH in chosen
    data_set = decode_labeled(data, model.spec, decode=decode, exclude=marked, on_progress=on_progress)
    test_set = decode_labeled(test, model.spec, class_names=data_set.class_names, decode=decode,
                              on_progress=on_progress) if test is not None else None
    n_classes, names = len(data_set.class_names), data_set.class_names
    # What this comparison answers: a folder holding another one is refused (the same command replaces its own).
    identity = identity_of(
        data=data_set.fingerprint, model="compare",
        settings={"backbone": backbone, "weights": weights, "epochs": epochs, "scratch_epochs": scratch_epochs,
                  "sizes": list(sizes), "arms": chosen, "freeze": freeze, "augment": list(augment),
                  "finetune": dataclasses.asdict(base), "imagenet_map": str(imagenet_map) if imagenet_map else None,
                  "probe_backbones": list(probe_backbones), "max_minutes": max_minutes},
        evaluation={"repeats": repeats, "val_size": val_size, "seed": seed,
                    "test": test_set.fingerprint if test_set is not None else None,
                    # only when asked: a comparison made before the option keeps its identity (an exclusion
                    # changes the data's fingerprint)
                    **({"group_duplicates": True} if group_duplicates else {})})
    check_replace(final, identity, marker="compare.json", what="comparison")
    # Built in a staging folder renamed into place at the end: a kill leaves the previous comparison whole.
    with staged_dir(final) as output:
        # The scored validation images must not pick the epoch: train every epoch and keep the last.
        ft_config = dataclasses.replace(base, backbone=backbone, weights=weights, epochs=epochs, device=device,
                                        val_size=val_size, early_stopping=False, progress=False)
        policies: list[_Arm] = []
        if FINETUNE in chosen:
            for f in freezes:
                for a in augments:
                    config = dataclasses.replace(ft_config, freeze=f, augment=base.augment if a else ())
                    policies.append(_Arm(_policy_name(f, a, freezes, augments), config))
        s_epochs = scratch_epochs or epochs
        scratch = _Arm(SCRATCH, dataclasses.replace(ft_config, pretrained=False, weights=None, freeze="none",
                                                    unfreeze_every=0, epochs=s_epochs, lr_backbone=ft_config.lr_head))
        trained = policies + ([scratch] if SCRATCH in chosen else [])
        extra = [name for name in dict.fromkeys(probe_backbones) if name != backbone] if PROBE in chosen else []
        order = [a for a in (AS_IS, PROBE) if a in chosen] + [_probe_arm(n) for n in extra] + [a.name for a in trained]
        n_val = max(n_classes, round(val_size * len(data_set.keys)))
        steps_wanted = len([s for s in sizes if s is not None]) if policies else 0
        # The cost, before the long part: one measured training batch per distinct trained setting now, and the
        # first measured embedding batch below; the budget then picks the arms that fit.
        step_seconds = {a.name: _step_seconds(a.config, data_set, on_progress) for a in trained}
        frozen = {**{a: backbone for a in (AS_IS, PROBE) if a in chosen}, **{_probe_arm(n): n for n in extra}}
        cost = _Cost(order=order, frozen=frozen, n=len(data_set.keys), n_test=len(test_set.keys) if test_set else 0,
                     n_val=n_val,
                     repeats=repeats, curve_sizes=steps_wanted, curve_arm=policies[0].name if policies else None,
                     epochs={a.name: a.config.epochs for a in trained}, step_seconds=step_seconds,
                     test=test_set is not None, device=dev, budget=None if max_minutes is None else 60 * max_minutes)

        def on_rate(per_image: float, left: int) -> bool:
            cost.plan(per_image, left, time.perf_counter() - started)
            for line in cost.lines():
                say(line)
            # duplicate clusters need the whole pass, whichever arms the budget keeps
            return group_duplicates or any(a in cost.chosen for a in (AS_IS, PROBE))

        # Frozen embeddings do not depend on the split: embed every image once; the as-is arm is the pretrained
        # head on these same embeddings.
        X = X_test = proba = proba_test = None
        mapping = None
        embed_seconds = 0.0
        embedding_seconds: dict[str, float] = {}  # per backbone: its one frozen-embedding pass of the training images
        if AS_IS in chosen or PROBE in chosen or group_duplicates:  # the clusters' near-duplicates need them too
            n_todo = len(data_set.keys) + (len(test_set.keys) if test_set else 0)
            say(f"embedding {n_todo} images" + (" (the stores hold those they already have)" if opened else ""))
            t0 = time.perf_counter()
            encoder = Encoder(model, dev, runtime="auto")
            sets = [data_set, *([test_set] if test_set is not None else [])]
            feats, failed, reused = embed_labeled(sets, encoder, stores=opened, on_rate=on_rate,
                                                  on_progress=within(on_progress, backbone))
            embed_seconds = time.perf_counter() - t0
            embedding_seconds[backbone] = embed_seconds
            keep = [np.array([i not in f for i in range(len(s.keys))], dtype=bool) for s, f in zip(sets, failed,
                                                                                                  strict=True)]
            data_set = check_labeled(_drop_failed(data_set, failed[0]), data, training=True)
            X = feats[0][keep[0]]
            if test_set is not None:
                test_set = check_labeled(_drop_failed(test_set, failed[1]), test, training=False)
                X_test = feats[1][keep[1]]
            cost.reused = reused
        else:
            on_rate(0.0, 0)
        chosen = [a for a in chosen if a in cost.chosen]
        if AS_IS not in chosen and PROBE not in chosen:  # the budget stopped the pass: no arm scores on it
            embedding_seconds.pop(backbone, None)
        trained = [a for a in trained if a.name in cost.chosen]
        policies = [a for a in policies if a.name in cost.chosen]
        extra = [name for name in extra if _probe_arm(name) in cost.chosen] if PROBE in chosen else []
        results: dict[str, _Arm] = {}
        for name in (AS_IS, PROBE):
            if name in chosen:
                results[name] = _Arm(name, embedding_seconds=embed_seconds)
        for name in extra:
            results[_probe_arm(name)] = _Arm(_probe_arm(name))
        results.update({arm.name: arm for arm in trained})
        labels = data_set.labels
        probes: dict[str, tuple[np.ndarray, np.ndarray | None, float]] = {}  # arm -> train and test embeddings, seconds
        for name in extra:
            say(f"embedding {len(labels)} images with {name}")
            t0 = time.perf_counter()
            other = Encoder(create_backbone(name), dev, runtime="auto")
            got, _, _ = embed_labeled([data_set, *([test_set] if test_set is not None else [])], other,
                                      on_progress=within(on_progress, name))
            embedding_seconds[name] = results[_probe_arm(name)].embedding_seconds = time.perf_counter() - t0
            probes[_probe_arm(name)] = (got[0], got[1] if test_set is not None else None, embedding_seconds[name])
        covered = test_covered = None  # a partial as-is: the images of the classes that map
        if AS_IS in chosen:
            if not has_imagenet_head(model):
                results[AS_IS].not_applicable = f"{model.spec.short()} has no pretrained ImageNet-1k classifier"
            else:
                mapping = class_mapping(names, imagenet_map)
                if not mapping.mapped:
                    results[AS_IS].not_applicable = _unmapped_reason(mapping)
                else:
                    # the classes that map are scored when some do not: the arm answers for them, said so
                    scored = mapping if mapping.applicable else mapping.subset()
                    to_label = np.array([names.index(c) for c in scored.class_names])
                    covered = np.isin(labels, to_label)
                    proba = _imagenet_proba(model, X)
                    proba_test = _imagenet_proba(model, X_test) if X_test is not None else None
                    if test_set is not None:
                        test_covered = np.isin(test_set.labels, to_label)
                    if not mapping.applicable:
                        results[AS_IS].covered, results[AS_IS].test_covered = covered, test_covered

        groups = duplicates = None
        if group_duplicates:
            say(f"finding duplicate clusters among {len(labels)} images")
            groups, duplicates = _duplicate_clusters(data_set, X)
        splits = [split_indices(labels, n_classes, val_size=val_size, seed=seed + r, groups=groups)
                  for r in range(repeats)]
        per_class = int(min(np.bincount(labels[tr], minlength=n_classes).min() for tr, _ in splits))
        wanted = [None if s is None else int(s) for s in sizes]
        steps = sorted({k for k in wanted if k is not None and 0 < k < per_class})
        steps += [None] if None in wanted or per_class in wanted else []
        skipped = sorted({k for k in wanted if k is not None and (k <= 0 or k > per_class)})
        curve_arm = policies[0] if policies else None
        curve_runs: dict[Any, dict[str, list[Any]]] = {k: {"probe": [], "finetune": [], "finetune_seconds": [],
                                                           "epochs": []} for k in steps}
        if PROBE not in chosen and curve_arm is None:
            curve_runs = {}
        batch = ft_config.batch_size
        full_steps = epochs * math.ceil(len(splits[0][0]) / batch)  # optimizer steps of fine-tuning on the whole split

        for r, (train_idx, val_idx) in enumerate(splits):
            split_seed, where = seed + r, f"split {r + 1}/{repeats}"
            if AS_IS in results and proba is not None:
                t0 = time.perf_counter()
                results[AS_IS].pred.append(to_label[restricted_predict(proba[val_idx], scored)[0]])
                results[AS_IS].top1.append(_top1(proba[val_idx], scored, to_label))
                # no training: mapping the embedding pass's ImageNet probabilities onto the classes
                results[AS_IS].seconds.append(time.perf_counter() - t0)
            if PROBE in results:
                say(f"{where}: linear probe")
                t0 = time.perf_counter()
                results[PROBE].pred.append(_probe_fit(X, labels, train_idx, split_seed).predict(X[val_idx]))
                results[PROBE].seconds.append(time.perf_counter() - t0)  # fitting only: embedding is timed apart
            for arm_name, (X_other, _, _) in probes.items():
                say(f"{where}: {arm_name}")
                t0 = time.perf_counter()
                probe = _probe_fit(X_other, labels, train_idx, split_seed)
                results[arm_name].pred.append(probe.predict(X_other[val_idx]))
                results[arm_name].seconds.append(time.perf_counter() - t0)
            split = make_split(data_set, train_idx, val_idx) if trained else None  # decoded only for them
            for arm in trained:
                config = dataclasses.replace(arm.config, seed=split_seed)
                result = train(split, config, on_progress=within(on_progress, f"{where}: {arm.name}"))
                arm.pred.append(result.val_proba.argmax(1))
                arm.seconds.append(result.train_seconds)
                arm.histories.append([e["val_accuracy"] for e in result.epochs[1:]])
                if r == 0:  # the first split's model and images: what a run without a test set records
                    arm.first = (result, val_idx)
            for k in steps if curve_runs else []:
                if k is None:  # the whole training split: the probe and fine-tune arms above
                    if PROBE in results:
                        curve_runs[k]["probe"].append(_accuracy(results[PROBE].pred[-1], labels[val_idx]))
                    if curve_arm is not None:
                        curve_runs[k]["finetune"].append(_accuracy(curve_arm.pred[-1], labels[val_idx]))
                        curve_runs[k]["finetune_seconds"].append(curve_arm.seconds[-1])
                        curve_runs[k]["epochs"].append(epochs)
                    continue
                sub = subsample(labels, train_idx, k, split_seed)
                if PROBE in results:
                    say(f"{where}: learning curve, {k} per class: linear probe")
                    pred = _probe_fit(X, labels, sub, split_seed).predict(X[val_idx])
                    curve_runs[k]["probe"].append(_accuracy(pred, labels[val_idx]))
                if curve_arm is not None:
                    # about as many optimizer steps as the whole split gets: small sizes are not starved of training
                    k_epochs = max(1, round(full_steps / math.ceil(len(sub) / batch)))
                    config = dataclasses.replace(curve_arm.config, seed=split_seed, epochs=k_epochs,
                                                 validate_epochs=False)
                    ft = train(make_split(data_set, sub, val_idx), config,
                               on_progress=within(on_progress, f"{where}: learning curve, {k} per class"))
                    curve_runs[k]["finetune"].append(ft.val_accuracy)
                    curve_runs[k]["finetune_seconds"].append(ft.train_seconds)
                    curve_runs[k]["epochs"].append(k_epochs)

        # Refit the trained arms on every training image, at the epoch count that scored best on validation (the
        # mean over splits): the model kept is not the one that saw 1 - val_size of the images.
        all_train = np.arange(len(labels))
        for arm in trained:
            mean_curve = np.nanmean(np.array(arm.histories, dtype=float), axis=0)
            arm.epochs_refit = int(np.nanargmax(mean_curve)) + 1
            _save_arm(output, arm, data_set, test_set, splits[0], on_progress=on_progress, device=device, seed=seed)
        if test_set is not None:
            say(f"scoring every arm on {len(test_set.labels)} test images")
            if AS_IS in results and proba_test is not None:
                results[AS_IS].test_pred = to_label[restricted_predict(proba_test, scored)[0]]
                results[AS_IS].test_top1 = _top1(proba_test, scored, to_label)
            if PROBE in results:
                results[PROBE].test_pred = _probe_fit(X, labels, all_train, seed).predict(X_test)
            for arm_name, (X_other, X_other_test, _) in probes.items():
                results[arm_name].test_pred = _probe_fit(X_other, labels, all_train, seed).predict(X_other_test)

        result = _summarize(results, splits, labels, names, test_set, mapping, seed)
        if data_set.excluded or marked:
            from embedfit.auditing import exclusion_note

            result["notes"].insert(0, exclusion_note(exclude, len(data_set.excluded),
                                                     len(marked) - len(data_set.excluded), where=str(data)))
        if duplicates is not None:
            result["notes"].insert(0, f"{duplicates['clusters']} duplicate cluster(s) ({duplicates['images']} "
                                   "images) kept on one side of every split")
        result.update(duplicates=duplicates, exclude={"file": str(exclude), "excluded": data_set.excluded}
                      if exclude is not None else None)
        result.update(estimate=cost.to_dict(time.perf_counter() - started), max_minutes=max_minutes,
                      skipped=cost.skipped, stores={"paths": [str(s) for s in stores], "images_reused": cost.reused},
                      unmapped=list(mapping.unmapped) if mapping is not None else [])
        train_images = len(splits[0][0])
        curve = [{"per_class": per_class if k is None else k, "all": k is None,
                  "train_images": train_images if k is None else k * n_classes,
                  "epochs": c["epochs"][0] if c["epochs"] else None,
                  "probe_mean": _mean(c["probe"]), "probe_std": _std(c["probe"]),
                  "finetune_mean": _mean(c["finetune"]), "finetune_std": _std(c["finetune"]),
                  "finetune_seconds": _mean(c["finetune_seconds"]), "probe_runs": c["probe"],
                  "finetune_runs": c["finetune"]} for k, c in curve_runs.items()]
        files = ["compare.json", "compare.md"]
        result.update({
            "data": str(data), "backbone": model.spec.short(), "classes": names, "images": len(labels),
            "excluded": _failures(data_set), "train_images": train_images, "val_images": len(splits[0][1]),
            "repeats": repeats, "seeds": [seed + r for r in range(repeats)], "epochs": epochs,
            "scratch_epochs": s_epochs if SCRATCH in chosen else None,
            "scratch_budget": ("--scratch-epochs" if scratch_epochs else
                               "matched to fine-tuning's optimizer steps (same images and batch size: same epochs)"),
            "device": str(dev), "learning_curve": curve,
            "embedding_seconds": embedding_seconds,
            "learning_curve_arm": curve_arm.name if curve_arm is not None else None,
            "learning_curve_skipped": [{"per_class": k, "reason": f"the training split has {per_class} images per class"
                                        if k > per_class else "not a positive size"} for k in skipped],
        })
        if test_set is not None:
            result["test"] = {"data": str(test), "images": len(test_set.labels), "excluded": _failures(test_set)}
            _write_test_predictions(output / "test_predictions.csv", test_set, names, results)
            files.append("test_predictions.csv")
        if curve and _plot_curve(result, output / "learning_curve.png"):
            files.append("learning_curve.png")
        result["files"] = [str(final / f) for f in files]
        result["identity"] = identity
        (output / "compare.json").write_text(json.dumps(result, indent=2))
        (output / "compare.md").write_text(to_markdown(result))
    return result


def _save_arm(output: Path, arm: _Arm, data_set: LabeledImages, test_set: LabeledImages | None,
              first_split: tuple[np.ndarray, np.ndarray], *, on_progress: OnProgress | None, device: str,
              seed: int) -> None:
    """Write a trained arm's run directory once: the model refit on every training image, scored on the test
    images; without a test set, the first split's validation scores (by the model trained on that split) next
    to the refit model, and said so in its evaluation record. Scratch without a test set keeps the first
    split's model: a baseline to score, not a model to keep."""
    from embedfit.runs import SAVED_MODEL, Evaluation

    n = len(data_set.labels)
    data, root = str(data_set.root), str(data_set.root)
    first, val_idx = arm.first
    n_first = len(first_split[0])
    if arm.name == SCRATCH and test_set is None:
        evaluation = Evaluation("validation-split", data, root, len(val_idx), n_first, SAVED_MODEL,
                                {"val_size": arm.config.val_size, "seed": seed, "split": 1})
        save_trained(output / _slug(arm.name), first, evaluation=evaluation,
                     keys=[data_set.keys[i] for i in val_idx], labels=data_set.labels[val_idx],
                     proba=first.val_proba, data=data, data_fingerprint=data_set.fingerprint,
                     identity=run_identity(first.config, data_set.fingerprint, evaluation=evaluation.details),
                     n_excluded=len(data_set.failed))
        return
    note(on_progress, f"refit {arm.name} on all {n} training images, {_plural(arm.epochs_refit, 'epoch')}")
    full = make_split(data_set, np.arange(n), np.zeros(0, int))  # no validation images: nothing is chosen here
    config = dataclasses.replace(arm.config, seed=seed, epochs=arm.epochs_refit, validate_epochs=False)
    refit = train(full, config, on_progress=within(on_progress, f"refit {arm.name}"))
    arm.refit_seconds = refit.train_seconds
    refit_note = {"train_images": n, "epochs": arm.epochs_refit, "train_seconds": refit.train_seconds}
    if test_set is not None:
        t0 = time.perf_counter()
        # predict's own path (the files, decoded as `embedfit predict` does): the scores are what it reproduces
        proba = scored_proba(refit.model, test_set.paths, resolve_device(device))
        arm.test_seconds = time.perf_counter() - t0
        arm.test_pred = np.where(np.isnan(proba).any(1), -1, np.nan_to_num(proba).argmax(1)) if len(proba) \
            else np.zeros(0, int)
        ok = arm.test_pred >= 0
        evaluation = Evaluation("held-out", str(test_set.root), str(test_set.root), int(ok.sum()), n, SAVED_MODEL,
                                {"test": str(test_set.root), "test_fingerprint": test_set.fingerprint})
        keys, truth, proba = [k for k, good in zip(test_set.keys, ok, strict=True) if good], \
            test_set.labels[ok], proba[ok]
    else:
        evaluation = Evaluation("validation-split", data, root, len(val_idx), n_first,
                                f"the model trained on split 1 ({n_first} images); model.pt is refit on all {n} "
                                f"training images for {_plural(arm.epochs_refit, 'epoch')}",
                                {"val_size": arm.config.val_size, "seed": seed, "split": 1})
        keys, truth, proba = [data_set.keys[i] for i in val_idx], data_set.labels[val_idx], first.val_proba
    save_trained(output / _slug(arm.name), refit, evaluation=evaluation, keys=keys, labels=truth, proba=proba,
                 data=data, data_fingerprint=data_set.fingerprint,
                 identity=run_identity(refit.config, data_set.fingerprint, evaluation=evaluation.details),
                 n_excluded=len(data_set.failed), extra={"refit": refit_note})


def _accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    return float((np.asarray(pred) == truth).mean()) if len(truth) else float("nan")


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _std(values: list[float]) -> float | None:
    return float(np.std(values)) if values else None


def _failures(data: LabeledImages) -> list[dict[str, str]]:
    return [dict(zip(("path", "reason"), f.split(": ", 1), strict=False)) for f in data.failed]


def _single_class(pred: np.ndarray, truth: np.ndarray, names: list[str]) -> str | None:
    """The class name when a model predicted one class for every image of a set that has several, else None."""
    values = np.unique(pred)
    if len(values) == 1 and len(np.unique(truth)) > 1:
        return names[int(values[0])] if values[0] >= 0 else "none of the classes"
    return None


def _summarize(results: dict[str, _Arm], splits: list[tuple[np.ndarray, np.ndarray]], labels: np.ndarray,
               names: list[str], test_set: LabeledImages | None, mapping: Any, seed: int) -> dict[str, Any]:
    """Accuracies with spreads and bootstrap intervals, paired differences from the best arm, notes and the
    recommendation."""
    arms: dict[str, dict[str, Any]] = {}
    correct: dict[str, list[np.ndarray]] = {}  # per applicable arm, per split (then the test set) the 0/1 hits
    on = "test" if test_set is not None else "validation"
    notes: list[str] = []
    for name, arm in results.items():
        if arm.not_applicable:
            arms[name] = {"applicable": False, "reason": arm.not_applicable}
            continue
        # a partial as-is answers for the images of the classes that map, and only those are scored
        part = [np.ones(len(v), bool) if arm.covered is None else arm.covered[v] for _, v in splits]
        hits = [(p == labels[v])[m].astype(float) for p, (_, v), m in zip(arm.pred, splits, part, strict=True)]
        runs = [float(h.mean()) for h in hits]
        entry: dict[str, Any] = {
            "applicable": True, "accuracy": float(np.mean(runs)), "accuracy_std": float(np.std(runs)),
            "accuracy_ci": paired_bootstrap(hits, seed), "accuracy_runs": runs, "seconds": float(np.mean(arm.seconds)),
            "embedding_seconds": arm.embedding_seconds,
        }
        if arm.covered is not None:
            shown = sorted({names[c] for c in labels[arm.covered]})
            entry["coverage"] = {"classes": len(shown), "of_classes": len(names), "class_names": shown,
                                 "images": int(sum(m.sum() for m in part)), "of_images": int(sum(map(len, part)))}
            notes.append(f"{name} scores {len(shown)} of {len(names)} classes ({entry['coverage']['images']} of "
                         f"{entry['coverage']['of_images']} validation images): the others do not map onto "
                         "ImageNet classes, so it is left out of the paired comparison and the recommendation")
        if name == AS_IS:
            top1 = [float((t == labels[v])[m].mean()) for t, (_, v), m in zip(arm.top1, splits, part, strict=True)]
            entry.update(scoring="restricted to the data's classes", train_images=0,
                         top1_mapped=float(np.mean(top1)), top1_mapped_runs=top1, mapping=mapping.to_dict(),
                         imagenet_classes={c: list(n) for c, n in zip(mapping.class_names, mapping.imagenet_names,
                                                                       strict=True)})
        if arm.config is not None:
            entry.update(epochs=arm.config.epochs, freeze=arm.config.freeze if arm.config.pretrained else None,
                         augment=list(arm.config.augment), best_epochs=arm.epochs_refit,
                         validation_by_epoch=[float(v) for v in np.nanmean(np.array(arm.histories), axis=0)],
                         refit_seconds=arm.refit_seconds)
        singles = [s for p, (_, v) in zip(arm.pred, splits, strict=True)
                   if (s := _single_class(p, labels[v], names)) is not None]
        if singles:
            entry["single_class"] = singles
            notes.append(f"{name} predicted a single class ('{singles[0]}') for every validation image in "
                         f"{len(singles)} of {_plural(len(splits), 'split')}")
        if arm.covered is None:
            correct[name] = hits
        if test_set is not None:
            t_part = np.ones(len(test_set.labels), bool) if arm.test_covered is None else arm.test_covered
            t_hits = (arm.test_pred == test_set.labels)[t_part].astype(float)
            entry["test"] = {"accuracy": float(t_hits.mean()), "accuracy_ci": paired_bootstrap([t_hits], seed),
                             "images": len(t_hits)}
            if name == AS_IS:
                entry["test"]["top1_mapped"] = _accuracy(arm.test_top1[t_part], test_set.labels[t_part])
            single = _single_class(arm.test_pred, test_set.labels, names)
            if single is not None:
                entry["test"]["single_class"] = single
                notes.append(f"{name} predicted a single class ('{single}') for every test image")
            if arm.covered is None:
                correct[name] = [t_hits]
        arms[name] = entry
    out: dict[str, Any] = {"arms": arms, "notes": notes, "scored_on": on}
    # An arm's cost: its embedding pass (once, as-is and probes) plus its fitting on a split.
    scored = {n: {"accuracy": (a["test"]["accuracy"] if on == "test" else a["accuracy"]),
                  "seconds": a["seconds"] + (a["embedding_seconds"] or 0.0)}
              for n, a in arms.items() if n in correct}
    if not scored:
        out.update(comparisons={}, recommendation="no arm could be scored")
        return out
    best = max(scored, key=lambda n: (scored[n]["accuracy"], -scored[n]["seconds"]))
    comparisons: dict[str, Any] = {"best": best}
    for name in scored:
        if name == best:
            continue
        diffs = [a - b for a, b in zip(correct[name], correct[best], strict=True)]
        comparisons[name] = {"difference": float(np.mean([d.mean() for d in diffs])),
                             "ci": paired_bootstrap(diffs, seed + 1)}
    out["comparisons"] = {"on": on, "method": f"paired bootstrap, {N_BOOT} draws: the same images resampled for "
                          "both arms" + (", within each split" if on == "validation" else ""),
                          "vs": best, "arms": {n: c for n, c in comparisons.items() if n != "best"}}
    out["recommendation"] = recommend(scored, comparisons, on)
    return out


def _write_test_predictions(path: Path, test_set: LabeledImages, names: list[str], results: dict[str, _Arm]) -> None:
    scored = {n: a for n, a in results.items() if a.test_pred is not None}
    from embedfit.runs import write_csv  # every cell escaped against formula injection

    write_csv(path, ["path", "label", *scored], ([key, names[test_set.labels[i]],
                                                  *(names[int(a.test_pred[i])] if a.test_pred[i] >= 0 else ""
                                                    for a in scored.values())]
                                                 for i, key in enumerate(test_set.keys)))


# ---------------------------------------------------------------------------------------------------
# Output


def _ci(ci: list[float]) -> str:
    return f"{ci[0]:.3f}–{ci[1]:.3f}"


def to_markdown(result: dict[str, Any]) -> str:
    """The comparison as markdown (also printed by the CLI); it ends with the recommendation."""
    n = result["repeats"]
    spread = f"mean ± std over {_plural(n, 'split')}"
    test = result.get("test")
    budget = _plural(result["epochs"], "epoch")
    if result.get("scratch_epochs") and result["scratch_epochs"] != result["epochs"]:
        budget += f" (scratch {result['scratch_epochs']})"
    lines = [f"Comparison on {result['data']}: {result['backbone']}, {len(result['classes'])} classes, "
             f"{result['train_images']} training / {result['val_images']} validation images per split, "
             f"{budget}, {result['device']}"
             + (f"; test set {test['data']} ({test['images']} images)" if test else ""), ""]
    head = f"| arm | validation accuracy ({spread}) | 95% CI |"
    rule = "| --- | --- | --- |"
    if test:
        head += " test accuracy | test 95% CI |"
        rule += " --- | --- |"
    lines += [head + " fitting per split (s) |", rule + " --- |"]
    for name, arm in result["arms"].items():
        if not arm["applicable"]:
            lines.append(f"| {name} | not applicable: {arm['reason']} | |" + (" | |" if test else "") + " |")
            continue
        cover = arm.get("coverage")
        label = f"{name} ({cover['classes']} of {cover['of_classes']} classes)" if cover else name
        cells = f"| {label} | {arm['accuracy']:.3f} ± {arm['accuracy_std']:.3f} | {_ci(arm['accuracy_ci'])} |"
        if test:
            cells += f" {arm['test']['accuracy']:.3f} | {_ci(arm['test']['accuracy_ci'])} |"
        lines.append(cells + f" {arm['seconds']:.1f} |")
    embedded = result.get("embedding_seconds") or {}
    if embedded:
        lines += ["", f"Embedding the {result['images']} images once for as-is and the probe (frozen features, timed "
                  "apart from fitting): " + ", ".join(f"{n} {s:.1f} s" for n, s in embedded.items())
                  + ". Fine-tuning and scratch embed inside their training. The recommendation weighs each arm's "
                  "embedding plus its fitting."]
    if result.get("unmapped"):
        lines += ["", f"Classes with no ImageNet class of their own ({len(result['unmapped'])}; the as-is arm leaves "
                  "them out): " + ", ".join(result["unmapped"])]
    if result.get("skipped"):
        lines += ["", f"Skipped (over the {result['max_minutes']:g}-minute budget):"]
        lines += [f"- {s['arm']}: {s['reason']}" for s in result["skipped"]]
    estimate = result.get("estimate")
    if estimate:
        split = [f"embedding {b} {duration(s)}" for b, s in estimate.get("embedding_seconds", {}).items()]
        split += [f"fitting {a} {duration(s)}" for a, s in estimate.get("fitting_seconds", {}).items() if s]
        lines += ["", f"Estimated before the long part: {duration(estimate['total_seconds'])}"
                  + (f" ({', '.join(split)})" if split else "") + f"; took {duration(estimate['took_seconds'])}."]
    as_is = result["arms"].get(AS_IS)
    if as_is and as_is["applicable"]:
        mapping = as_is["mapping"]
        lines += ["", "The as-is arm chooses only among the data's classes (ImageNet probabilities summed per class); "
                  f"its plain top-1 over all 1000 ImageNet classes, mapped, scores {as_is['top1_mapped']:.3f} on "
                  "validation" + (f" and {as_is['test']['top1_mapped']:.3f} on test" if test else "") + ".",
                  f"ImageNet classes used ({mapping['source']}):"]
        for cls, m in ((c, m) for c, m in mapping["classes"].items() if c in as_is["imagenet_classes"]
                       and (not as_is.get("coverage") or c in as_is["coverage"]["class_names"])):
            shown = ", ".join(f"'{x.split(', ')[0]}'" for x in as_is["imagenet_classes"][cls][:4])
            more = len(m["imagenet"]) - 4
            lines.append(f"- {cls}: {shown}{f' (+{more} more)' if more > 0 else ''} ({m['matched']})")
        lines += [f"- note: {note}" for note in mapping["notes"]]
    trained = [(n, a) for n, a in result["arms"].items() if a.get("applicable") and a.get("best_epochs")]
    if trained:
        lines += ["", "Trained arms, validation accuracy by epoch (mean over splits); the final models are refit on "
                  "all training images at the best epoch count:"]
        lines += [f"- {n}: " + ", ".join(f"{v:.3f}" for v in a["validation_by_epoch"])
                  + f" -> {_plural(a['best_epochs'], 'epoch')}" for n, a in trained]
    if result["learning_curve"]:
        arm = result.get("learning_curve_arm") or FINETUNE
        lines += ["", f"| images per class | linear probe ({spread}) | {arm} | epochs | {arm} time (s) |",
                  "| --- | --- | --- | --- | --- |"]
        for p in result["learning_curve"]:
            probe = "—" if p["probe_mean"] is None else f"{p['probe_mean']:.3f} ± {p['probe_std']:.3f}"
            ft = "—" if p["finetune_mean"] is None else f"{p['finetune_mean']:.3f} ± {p['finetune_std']:.3f}"
            secs = "—" if p["finetune_seconds"] is None else f"{p['finetune_seconds']:.1f}"
            lines.append(f"| {p['per_class']}{' (all)' if p['all'] else ''} | {probe} | {ft} | "
                         f"{p['epochs'] or '—'} | {secs} |")
    for s in result.get("learning_curve_skipped", []):
        lines.append(f"- learning curve: {s['per_class']} per class skipped: {s['reason']}")
    comparisons = result.get("comparisons") or {}
    if comparisons.get("arms"):
        lines += ["", f"Difference from {comparisons['vs']} on {comparisons['on']} images, with 95% CI "
                  f"({comparisons['method']}):"]
        lines += [f"- {n}: {c['difference']:+.3f} ({c['ci'][0]:+.3f} to {c['ci'][1]:+.3f})"
                  for n, c in comparisons["arms"].items()]
    excluded = result["excluded"] + (test["excluded"] if test else [])
    if excluded:
        lines += ["", f"Left out ({_plural(len(excluded), 'image')} that could not be read):"]
        lines += [f"- {e['path']}: {e.get('reason', '')}" for e in excluded]
    if result.get("notes"):
        lines += [""] + [f"Note: {note}" for note in result["notes"]]
    lines += ["", f"Recommendation: {result['recommendation']}"]
    return "\n".join(lines) + "\n"


def _tick_labels(values: list[float], labels: list[str], width_in: float, min_gap_in: float = 0.35) -> list[str]:
    """Blank the labels that would overlap on a log axis `width_in` inches wide (the largest size is kept)."""
    logs = np.log10(values)
    span = (logs.max() - logs.min()) or 1.0
    pos = (logs - logs.min()) / span * width_in
    shown = [""] * len(values)
    last = None
    for i in range(len(values) - 1, -1, -1):
        if last is None or last - pos[i] >= min_gap_in:
            shown[i], last = labels[i], pos[i]
    return shown


def _plot_curve(result: dict[str, Any], path: Path) -> bool:
    """Draw the learning curve with as-is and scratch as reference lines; False when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    curve = result["learning_curve"]
    k = [p["per_class"] for p in curve]
    if not k:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    if any(p["probe_mean"] is not None for p in curve):
        ax.errorbar(k, [p["probe_mean"] for p in curve], yerr=[p["probe_std"] for p in curve], marker="o",
                    capsize=3, label="linear probe")
    if any(p["finetune_mean"] is not None for p in curve):
        ax.errorbar(k, [p["finetune_mean"] for p in curve], yerr=[p["finetune_std"] for p in curve], marker="s",
                    capsize=3, label=result.get("learning_curve_arm") or FINETUNE)
    for name, style in ((AS_IS, ":"), (SCRATCH, "--")):
        arm = result["arms"].get(name)
        if arm and arm.get("applicable"):
            what = "no training" if name == AS_IS else "all images"
            ax.axhline(arm["accuracy"], linestyle=style, color="grey" if name == SCRATCH else "green",
                       label=f"{name} ({what})")
    ax.set_xscale("log")
    if len(k) == 1:
        ax.set_xlim(k[0] / 2, k[0] * 2)
    else:
        ax.set_xlim(min(k) / 1.25, max(k) * 1.25)
    ax.xaxis.set_major_locator(FixedLocator(k))
    ax.xaxis.set_minor_locator(NullLocator())
    labels = [f"{v}\n(all)" if p["all"] else str(v) for v, p in zip(k, curve, strict=True)]
    ax.set_xticks(k, _tick_labels([float(v) for v in k], labels, width_in=4.5))
    ax.set_xlabel("training images per class")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"Learning curve: {result['backbone']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True
