"""Fine-tuning, training from scratch, and the pretrained model as-is: the other arms of the comparison.

One training loop serves fine-tuning (pretrained backbone, new linear head, a freeze policy, gradual unfreezing,
discriminative learning rates) and training from scratch (random initialisation, everything trainable). Images
go through the same decoder and preprocessing as extraction (`embedfit.images`, `BackboneSpec.preprocess`),
with torchvision.transforms.v2 augmentation for training. Runs are saved in the run-directory format of
`embedfit fit` (kind "torch": a state dict, never a pickled module), so `embedfit predict` and `embedfit
report` use them unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import time
import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from embedfit.backbones import DEFAULT_BACKBONE
from embedfit.backbones.factory import Backbone, create_backbone
from embedfit.backbones.foundation import TokenPool
from embedfit.backbones.timm_models import TimmPreLogits
from embedfit.errors import InputError, ModelFileError, UsageError, check_output_dir, check_output_not_input
from embedfit.extraction.settings import resolve_device
from embedfit.images import ImageRecord, decode_image, scan_images
from embedfit.progress import OnProgress, Progress, note, progress_sink, within

AUGMENTATIONS = ("flip", "rotate", "scale", "crop", "color")

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of a fine-tuning or from-scratch run.

    Attributes:
        backbone: Backbone name (the architecture, for scratch).
        pretrained: False trains from random initialisation.
        weights: Optional state-dict file for the backbone.
        freeze: "head" (backbone frozen), "last:N" (last N blocks trainable) or "none" (nothing frozen, every
            layer trainable).
        unfreeze_every: Gradual unfreezing: every this many epochs one more block (from the top) becomes trainable.
        epochs: Maximum epochs.
        batch_size: Images per step.
        lr_head: Learning rate of the new head.
        lr_backbone: Learning rate of the backbone (discriminative: usually 10x lower).
        weight_decay: AdamW weight decay.
        dropout: Dropout before the head.
        label_smoothing: Cross-entropy label smoothing.
        augment: Training augmentations among flip, rotate, scale, crop, color.
        val_size: Stratified validation share (early stopping and the reported score).
        patience: Epochs without validation improvement before stopping.
        early_stopping: Keep the best-validation epoch and stop after `patience`; False trains all epochs and keeps
            the last (for comparisons where the validation images also give the reported score).
        device: "auto", "cpu", "cuda", ...
        seed: Seed for the split, initialisation, shuffling and augmentation.
        progress: Show the epochs' progress on stderr (`embedfit.progress.StderrSink`) when `train` is given no
            `on_progress`.
        validate_epochs: Score the validation images after every epoch (and the untrained head as epoch 0);
            False scores only the final model (needs early_stopping=False; saves time in learning curves).
    """

    backbone: str = DEFAULT_BACKBONE
    pretrained: bool = True
    weights: str | None = None
    freeze: str = "last:2"
    unfreeze_every: int = 0
    epochs: int = 5
    batch_size: int = 16
    lr_head: float = 1e-3
    lr_backbone: float = 1e-4
    weight_decay: float = 1e-4
    dropout: float = 0.2
    label_smoothing: float = 0.0
    augment: tuple[str, ...] = ("flip", "crop")
    val_size: float = 0.2
    patience: int = 3
    early_stopping: bool = True
    device: str = "auto"
    seed: int = 0
    progress: bool = False
    validate_epochs: bool = True

    def __post_init__(self) -> None:
        if self.freeze not in ("head", "none") and not (self.freeze.startswith("last:") and
                                                         self.freeze[5:].isdigit()):
            raise UsageError(f"`freeze` must be head, last:N or none, got '{self.freeze}'")
        if not self.validate_epochs and self.early_stopping:
            raise UsageError("`validate_epochs=False` needs `early_stopping=False` (early stopping scores every epoch)")
        unknown = set(self.augment) - set(AUGMENTATIONS)
        if unknown:
            raise UsageError(f"unknown augmentation {sorted(unknown)}; choose from {', '.join(AUGMENTATIONS)}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"`{name}` must be at least 1, got {getattr(self, name)}")
        if not 0 < self.val_size < 1:
            raise UsageError(f"`val_size` must be between 0 and 1, got {self.val_size}")
        if self.lr_head <= 0 or self.lr_backbone < 0:
            raise UsageError("learning rates must be positive")


class Classifier(nn.Module):
    """Backbone (normalisation inside) -> dropout -> new linear head; uint8 images in, logits out."""

    def __init__(self, backbone: Backbone, n_classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.spec.embedding_dim, n_classes)
        # Zero init: the untrained model scores every class equally, a deterministic baseline to improve on.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.backbone(x)))


def backbone_blocks(backbone: Backbone) -> list[nn.Module]:
    """The backbone's trainable blocks in input-to-output order (stem, stages/blocks, final conv...).

    Stage containers (timm's `blocks`, torchvision's `features`, `layers`, `stages`) are expanded one level so
    that "last:N" counts blocks, not whole networks.
    """
    root = backbone.trunk.model if isinstance(backbone.trunk, TimmPreLogits | TokenPool) else backbone.trunk
    classifier = root.get_classifier() if hasattr(root, "get_classifier") else None
    blocks: list[nn.Module] = []
    # A transformer's class token and position embeddings sit on the model itself: they go with its first block
    # (the patch embedding), so that "last:N" and "head" freeze them with the stem.
    direct = list(root.parameters(recurse=False))
    for name, child in root.named_children():
        if child is classifier or not any(True for _ in child.parameters()):
            continue
        if name in ("blocks", "features", "layers", "stages") and len(list(child.children())) > 1:
            blocks += [c for c in child.children() if any(True for _ in c.parameters())]
        else:
            blocks.append(child)
    if direct and blocks:
        blocks[0] = _Stem(blocks[0], direct)
    return blocks


class _Stem(nn.Module):
    """The first block together with the model's own parameters (class token, position embeddings)."""

    def __init__(self, block: nn.Module, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.block = block
        self.extra = nn.ParameterList(params)


def apply_freeze(model: Classifier, trainable_blocks: int | None) -> list[nn.Module]:
    """Make the last `trainable_blocks` blocks (all when None) trainable; return the frozen blocks."""
    blocks = backbone_blocks(model.backbone)
    n = len(blocks) if trainable_blocks is None else min(trainable_blocks, len(blocks))
    frozen = blocks[: len(blocks) - n]
    for p in model.backbone.parameters():
        p.requires_grad_(True)
    for block in frozen:
        for p in block.parameters():
            p.requires_grad_(False)
    return frozen


def _initial_trainable(freeze: str) -> int | None:
    return 0 if freeze == "head" else None if freeze == "none" else int(freeze[5:])


# ---------------------------------------------------------------------------------------------------
# Data


class _Images(torch.utils.data.Dataset):
    """Decoded images (cached, resized once) -> uint8 tensors through a train or eval transform."""

    def __init__(self, images: list[Any], labels: np.ndarray, transform: Any) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.labels[i])


def train_transform(spec: Any, augment: Sequence[str]) -> Any:
    """torchvision.transforms.v2 augmentation ending in the backbone's input size, as uint8."""
    from torchvision.transforms import v2

    mode = v2.InterpolationMode(spec.interpolation)
    steps: list[Any] = []
    if "crop" in augment or "scale" in augment:
        low = 0.5 if "scale" in augment else 0.7
        steps.append(v2.RandomResizedCrop(spec.input_size, scale=(low, 1.0), interpolation=mode, antialias=True))
    else:
        steps += [v2.Resize(spec.resize_size, interpolation=mode, antialias=True), v2.CenterCrop(spec.input_size)]
    if "flip" in augment:
        steps.append(v2.RandomHorizontalFlip())
    if "rotate" in augment:
        steps.append(v2.RandomRotation(15))
    if "color" in augment:
        steps.append(v2.ColorJitter(0.3, 0.3, 0.3, 0.05))
    steps.append(v2.PILToTensor())
    return v2.Compose(steps)


def _decode_resized(records: Sequence[ImageRecord], resize: int) -> tuple[list[Any], list[int], list[str]]:
    """Decode once, shrunk so the shorter side is `resize` (augmentation works from there)."""
    from PIL import Image

    images, ok, errors = [], [], []
    for i, rec in enumerate(records):
        try:
            img = decode_image(rec.path, draft_size=(resize, resize))
        except Exception as exc:  # a broken file is skipped and counted, as in extraction
            errors.append(f"{rec.key}: {exc}")
            continue
        scale = resize / min(img.size)
        if scale < 1:
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.Resampling.BICUBIC)
        images.append(img)
        ok.append(i)
    return images, ok, errors


@dataclass
class LabeledImages:
    """A labeled image folder, decoded once (shrunk to the backbone's resize size)."""

    images: list[Any]
    labels: np.ndarray
    keys: list[str]
    class_names: list[str]
    root: Path
    failed: list[str] = field(default_factory=list)
    paths: list[Any] = field(default_factory=list)  # the files, in order: scored again through `predict`'s path
    fingerprint: str = ""  # of the files (key, label, size, mtime) the images came from
    records: list[ImageRecord] = field(default_factory=list)  # the scanned records behind `keys`, in order
    excluded: list[str] = field(default_factory=list)  # keys left out as marked in an exclusions file


@dataclass
class Split:
    """Train/validation split of an image folder, decoded once."""

    train_images: list[Any]
    train_labels: np.ndarray
    val_images: list[Any]
    val_labels: np.ndarray
    val_keys: list[str]
    class_names: list[str]
    root: Path
    failed: list[str] = field(default_factory=list)
    val_paths: list[Any] = field(default_factory=list)
    fingerprint: str = ""
    n_images: int = 0  # readable images the split was drawn from


def decode_labeled(data: str | Path, spec: Any, *, class_names: Sequence[str] | None = None,
                   decode: bool = True, exclude: Collection[str] = (),
                   on_progress: OnProgress | None = None) -> LabeledImages:
    """Scan and decode a labeled image folder (or CSV); broken files are skipped and listed in `failed`.

    Args:
        data: Class-per-sub-folder tree or CSV with labels.
        spec: The backbone's spec (decoding shrinks images to its resize size).
        class_names: The label space to use (a test set's, given the training set's classes); the training
            checks (two classes with two images each) apply only when this is None.
        decode: False scans only (no `images`, nothing in `failed`): for callers that read the files through
            extraction's loop (`iter_embeddings`), which reports broken files itself.
        exclude: Keys (as a store of the folder keys them) to leave out before anything is read: the images an
            exclusions file marks (`embedfit.auditing.read_exclusions`); listed in `excluded`.
        on_progress: Hears "decoding DATA" once the folder was found to hold labeled images (a refusal is the
            only line a bad folder gives).
    """
    source = scan_images(data, class_names=class_names)
    if not source.class_names:
        raise InputError(f"{data} has no class sub-folders (or label column): training needs labels")
    excluded = [r.key for r in source.records if r.key in exclude]
    if excluded:
        source = dataclasses.replace(source, records=[r for r in source.records if r.key not in exclude])
    if decode:
        note(on_progress, f"decoding {data}")
        images, ok, failed = _decode_resized(source.records, spec.resize_size)
    else:
        images, ok, failed = [], list(range(len(source.records))), []
    if class_names is not None:  # a test set: unlabeled CSV rows cannot be scored
        keep = [j for j, i in enumerate(ok) if source.records[i].label >= 0]
        images, ok = [images[j] for j in keep] if decode else [], [ok[j] for j in keep]
    labels = np.array([source.records[i].label for i in ok], dtype=int)
    kept = [source.records[i] for i in ok]
    files = [(r.key, int(r.label), r.size, r.mtime_ns) for r in kept]
    found = LabeledImages(images, labels, [r.key for r in kept], source.class_names, source.root, failed,
                          [r.path for r in kept], hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16],
                          kept, excluded)
    return check_labeled(found, data, training=class_names is None)


def check_labeled(found: LabeledImages, data: str | Path, *, training: bool) -> LabeledImages:
    """`found` when it can be trained on (two classes with two readable images each) or, for a test set
    (`training` False), scored (one image); an InputError otherwise."""
    labels = found.labels
    if not training:
        if not len(labels):
            raise InputError(f"{data}: no readable labeled images")
        return found
    counts = np.bincount(labels, minlength=len(found.class_names))
    if (counts[counts > 0] < 2).any() or (counts > 0).sum() < 2:
        raise InputError(f"{data}: need at least two classes with two or more readable images each, "
                         f"found {dict(zip(found.class_names, counts.tolist(), strict=True))}")
    return found


def split_indices(labels: np.ndarray, n_classes: int, *, val_size: float = 0.2, seed: int = 0,
                  per_class: int | None = None, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified train/validation indices; `per_class` caps training images per class.

    With `groups` (a key per image, e.g. `embedfit.auditing.cluster_duplicates`), the images of a group stay on
    one side: the validation images are one fold of a shuffled `StratifiedGroupKFold` of round(1 / val_size)
    folds, so the validation share is about `val_size`.
    """
    from sklearn.model_selection import StratifiedGroupKFold, train_test_split

    idx = np.arange(len(labels))
    if groups is not None:
        n_folds = max(2, round(1 / val_size))
        if len(np.unique(groups)) < n_folds:
            raise InputError(f"only {len(np.unique(groups))} groups of duplicates for a validation share of "
                             f"{val_size}: add images or use a larger `val_size`")
        with warnings.catch_warnings():  # a class with fewer groups than folds: still split, as stratified as it can
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            train, val = next(StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed)
                              .split(idx, labels, groups))
        return (subsample(labels, train, per_class, seed) if per_class is not None else train), val
    n_val = max(n_classes, round(val_size * len(idx)))
    train, val = train_test_split(idx, test_size=n_val, stratify=labels, random_state=seed)
    if per_class is not None:
        train = subsample(labels, train, per_class, seed)
    return train, val


def subsample(labels: np.ndarray, index: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """At most `per_class` of `index` per class, drawn with `seed`."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(index[labels[index] == c])[:per_class] for c in np.unique(labels[index])])


def make_split(data: LabeledImages, train: np.ndarray, val: np.ndarray) -> Split:
    """The `Split` of decoded images for given train and validation indices."""
    return Split([data.images[i] for i in train], data.labels[train], [data.images[i] for i in val],
                 data.labels[val], [data.keys[i] for i in val], data.class_names, data.root, data.failed,
                 [data.paths[i] for i in val], data.fingerprint, len(data.labels))


def load_split(data: str | Path, spec: Any, *, val_size: float = 0.2, seed: int = 0,
               per_class: int | None = None, on_progress: OnProgress | None = None) -> Split:
    """Scan, stratify and decode a labeled image folder; `per_class` caps training images per class;
    `on_progress` hears when decoding starts."""
    decoded = decode_labeled(data, spec, on_progress=on_progress)
    train, val = split_indices(decoded.labels, len(decoded.class_names), val_size=val_size, seed=seed,
                               per_class=per_class)
    return make_split(decoded, train, val)


# ---------------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainResult:
    """What a training run produced."""

    model: Classifier
    config: TrainConfig
    class_names: list[str]
    epochs: list[dict[str, float]]
    val_accuracy: float
    train_seconds: float
    run_dir: Path | None = None
    precision: str = "fp32"
    optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)
    val_proba: np.ndarray | None = field(default=None, repr=False)  # the kept model's, on the validation images


def evaluate(model: Classifier, images: list[Any], labels: np.ndarray, spec: Any, device: torch.device,
             batch_size: int = 32, on_progress: OnProgress | None = None) -> np.ndarray:
    """Class probabilities for decoded images, with the eval-time preprocessing.

    The images go through extraction's forward path (`Encoder.embed` on `model.backbone`, fp32, PyTorch), the
    trained head on the embeddings, as `FinetunedModel.predict_proba_paths` does for image files. The model is
    left in eval mode, on its device, with the same parameter tensors (`train` sets train mode each epoch).
    `labels` is not read (the caller scores the probabilities against it); `on_progress` hears of the images.
    """
    from embedfit.extraction.encoder import Encoder, embed_decoded

    model.eval()
    # channels_last=False: converting would swap the memory format of the parameters being trained.
    encoder = Encoder(model.backbone, device, channels_last=False, runtime="torch")
    proba = embed_decoded(images, encoder, batch_size=batch_size, preprocess=spec.preprocess(),
                          head=lambda z: torch.softmax(model.head(model.dropout(z)).float(), dim=1),
                          on_progress=on_progress)
    return proba if len(proba) else np.zeros((0, 0))


def train(data: str | Path | Split, config: TrainConfig | None = None, *, output: str | Path | None = None,
          on_progress: OnProgress | None = None, **options: Any) -> TrainResult:
    """Fine-tune (or, with pretrained=False, train from scratch) a classifier on a labeled image folder.

    Args:
        data: A labeled image folder (class per sub-folder or CSV), or a prepared `Split` (its validation part
            may be empty: then nothing is scored and the last epoch is kept).
        config: Training settings; keyword `options` override its fields.
        output: Run directory to write (none when omitted).
        on_progress: Called with the batches of each epoch, the validation images, and a note as each epoch ends
            (`embedfit.progress`); else `config.progress` shows them on stderr.

    Returns:
        A `TrainResult` with the best-validation model and the per-epoch history.
    """
    config = dataclasses.replace(config or TrainConfig(), **options)
    with progress_sink(on_progress, config.progress) as sink:
        return _train(data, config, output, sink)


def _train(data: str | Path | Split, config: TrainConfig, output: str | Path | None,
           on_progress: OnProgress | None) -> TrainResult:
    if output is not None:  # before minutes of training, not after
        check_output_dir(output)
        check_output_not_input(output, [] if isinstance(data, Split) else [data])
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    device = resolve_device(config.device)
    backbone = create_backbone(config.backbone, weights=config.weights, pretrained=config.pretrained)
    spec = backbone.spec
    split = data if isinstance(data, Split) else load_split(data, spec, val_size=config.val_size, seed=config.seed,
                                                            on_progress=on_progress)
    if output is not None:  # what this run answers; a folder holding another answer is refused before training
        from embedfit.runs import check_replace

        identity = run_identity(config, split.fingerprint,
                                evaluation={"scheme": "validation-split", "val_size": config.val_size,
                                            "seed": config.seed, "images": split.n_images})
        check_replace(output, identity)
    model = Classifier(backbone, len(split.class_names), config.dropout).to(device)
    trainable = _initial_trainable(config.freeze) if config.pretrained else None
    frozen = apply_freeze(model, trainable)
    head_params = list(model.head.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": head_params, "lr": config.lr_head, "name": "head"},
         {"params": list(model.backbone.parameters()), "lr": config.lr_backbone if config.pretrained
          else config.lr_head, "name": "backbone"}],
        weight_decay=config.weight_decay)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    generator = torch.Generator().manual_seed(config.seed)
    loader = torch.utils.data.DataLoader(_Images(split.train_images, split.train_labels,
                                                 train_transform(spec, config.augment)),
                                         batch_size=config.batch_size, shuffle=True, generator=generator)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else None
    last_proba: list[np.ndarray | None] = [None]

    def val_accuracy(epoch: int, score: bool = True) -> float:
        if not score or not len(split.val_images):
            return float("nan")
        proba = evaluate(model, split.val_images, split.val_labels, spec, device,
                         on_progress=within(on_progress, f"epoch {epoch}/{config.epochs}: validating"))
        last_proba[0] = proba
        return float((proba.argmax(1) == split.val_labels).mean())

    def n_trainable() -> int:
        return sum(all(p.requires_grad for p in b.parameters()) for b in backbone_blocks(model.backbone))

    history: list[dict[str, float]] = [{"epoch": 0, "train_loss": float("nan"),
                                        "val_accuracy": val_accuracy(0, config.validate_epochs),
                                        "seconds": 0.0, "trainable_blocks": n_trainable()}]
    # Epoch 0 (the untrained head) is the baseline in the history, never the model kept: on a small or
    # imbalanced validation split it can out-score the first trained epochs by chance.
    best, best_state, best_proba, stale = -1.0, None, None, 0
    start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        gradual = config.unfreeze_every and trainable is not None
        if gradual and epoch > 1 and (epoch - 1) % config.unfreeze_every == 0:
            trainable += 1
            frozen = apply_freeze(model, trainable)
        t0 = time.perf_counter()
        model.train()
        for block in frozen:  # frozen BatchNorm keeps its running statistics
            block.eval()
        losses = []
        batches = Progress(f"epoch {epoch}/{config.epochs}", len(loader), unit="batches", on_progress=on_progress)
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            if amp is not None:
                with amp:
                    loss = loss_fn(model(x).float(), y)
            else:
                loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach().item())
            batches.advance(status=f"loss {np.mean(losses):.3f}")
        batches.close()
        acc = val_accuracy(epoch, config.validate_epochs or epoch == config.epochs)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_accuracy": acc,
                        "seconds": time.perf_counter() - t0, "trainable_blocks": n_trainable(),
                        "steps": len(loader)})
        score = "" if np.isnan(acc) else f", validation accuracy {acc:.3f}"
        note(on_progress, f"epoch {epoch}/{config.epochs} done in {history[-1]['seconds']:.0f} s, train loss "
                          f"{history[-1]['train_loss']:.4f}{score}")
        if not config.early_stopping or np.isnan(acc):
            best, best_proba = acc, last_proba[0]
        elif acc > best:
            best, best_state, best_proba, stale = acc, copy.deepcopy(model.state_dict()), last_proba[0], 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    train_seconds = time.perf_counter() - start
    if config.early_stopping and best_state is not None:
        model.load_state_dict(best_state)
    result = TrainResult(model, config, split.class_names, history, best, train_seconds, optimizer=optimizer,
                         precision="bf16" if amp is not None else "fp32", val_proba=best_proba)
    if output is not None:
        from embedfit.runs import Evaluation

        proba = scored_proba(model, split.val_paths, device)
        ok = ~np.isnan(proba).any(1) if len(proba) else np.zeros(0, bool)
        evaluation = Evaluation("validation-split", str(split.root), str(split.root), int(ok.sum()),
                                len(split.train_labels), details={"val_size": config.val_size, "seed": config.seed})
        result.run_dir = save_trained(output, result, evaluation=evaluation,
                                      keys=[k for k, good in zip(split.val_keys, ok, strict=True) if good],
                                      labels=split.val_labels[ok], proba=proba[ok], data=str(split.root),
                                      data_fingerprint=split.fingerprint, identity=identity,
                                      n_excluded=len(split.failed))
    return result


# ---------------------------------------------------------------------------------------------------
# Run directories


def run_identity(config: TrainConfig, data_fingerprint: str, *, evaluation: dict[str, Any]) -> dict[str, Any]:
    """What a fine-tuning or scratch run answers (`embedfit.runs.identity_of`): the images, the settings that
    change the model (not where it ran or how progress shows), and how it is scored."""
    from embedfit.runs import identity_of

    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("device", "progress")}
    return identity_of(data=data_fingerprint, model="finetune" if config.pretrained else "scratch",
                       settings=settings, evaluation=evaluation)


def scored_proba(model: Classifier, paths: Sequence[Any], device: torch.device) -> np.ndarray:
    """Class probabilities for image files through `predict`'s path (`head_outputs`), so that a run's recorded
    predictions are the ones `embedfit predict` gives on its model. Files that no longer decode: NaN rows."""
    # Few files: decoding in this process is faster than starting worker processes (the result is the same).
    logits, _ = head_outputs(model.backbone, model.head, paths, device, workers=0 if len(paths) < 256 else None)
    return torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()


def save_trained(run_dir: str | Path, result: TrainResult, *, evaluation: Any, keys: Sequence[str],
                 labels: np.ndarray, proba: np.ndarray, data: str, data_fingerprint: str, identity: dict[str, Any],
                 n_excluded: int = 0, extra: dict[str, Any] | None = None) -> Path:
    """Write a torch run (model.pt, a state dict, and the rest of the contract) through `embedfit.runs.write_run`.

    Args:
        run_dir: The run directory.
        result: The trained model and its history.
        evaluation: The `embedfit.runs.Evaluation` of the scores.
        keys: The scored images (paths relative to `evaluation.image_root`).
        labels: Their true classes.
        proba: Class probabilities per scored image (`scored_proba` for the saved model).
        data: The training images' folder or CSV.
        data_fingerprint: Of the training images.
        identity: What the run answers (`run_identity`).
        n_excluded: Training images that could not be read.
        extra: More metrics.json entries (compare's note on the refit).
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    from embedfit.fitting.evaluate import fold_metrics
    from embedfit.runs import Sidecar, write_run

    spec = result.model.backbone.spec
    n = len(result.class_names)
    pred = proba.argmax(1) if len(proba) else np.zeros(0, int)
    scores = fold_metrics(labels, pred, proba, np.arange(n), n)
    name = "finetune" if result.config.pretrained else "scratch"
    p, r, f1, support = precision_recall_fscore_support(labels, pred, labels=np.arange(n), zero_division=0)
    metrics = {
        "model": name, "backbone": spec.short(), "store": data, "n_samples": evaluation.n_train,
        "n_excluded": n_excluded, "n_classes": n, "class_names": result.class_names, "n_train": evaluation.n_train,
        "scores": {k: {"mean": v, "std": 0.0, "folds": [v]} for k, v in scores.items()},
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f1[i]),
                          "support": int(support[i])} for i, c in enumerate(result.class_names)},
        "confusion_matrix": confusion_matrix(labels, pred, labels=np.arange(n)).tolist(),
        "timing": {"extract_seconds": 0.0, "train_seconds": result.train_seconds},
        # epoch 0 (the untrained head) has no training loss: null keeps the file strict JSON
        "epochs": [{k: None if isinstance(v, float) and np.isnan(v) else v for k, v in e.items()}
                   for e in result.epochs],
        **(extra or {}),
    }
    rows = [{"path": key, "row": -1, "label": result.class_names[labels[i]],
             "predicted": result.class_names[pred[i]], "correct": bool(pred[i] == labels[i]), "fold": 0,
             **{f"p_{c}": round(float(v), 6) for c, v in zip(result.class_names, proba[i], strict=True)}}
            for i, key in enumerate(keys)]
    sidecar = Sidecar(name, {**dataclasses.asdict(result.config), "augment": list(result.config.augment)}, spec,
                      {"dtype": "float32", "tta": "none", "precision": result.precision}, result.class_names,
                      data, data_fingerprint, identity)
    sidecar.add_flavor("torch", "model.pt")
    return write_run(run_dir, sidecar, lambda path: torch.save(result.model.state_dict(), path),
                     metrics=metrics, evaluation=evaluation, predictions=rows)


def _first_sentence(exc: BaseException) -> str:
    """The first line of an exception's message, without torch's advice to load with weights_only=False."""
    import re

    text = str(exc)
    reason = re.search(r"WeightsUnpickler error: ([^.\n]*)", text)  # what torch refused, e.g. "Unsupported global"
    if reason:
        return reason.group(1).strip()
    first = (text.strip().splitlines() or [type(exc).__name__])[0].split(". ")[0].strip()
    return type(exc).__name__ if "weights_only" in first else first


@dataclass
class FinetunedModel:
    """A trained network loaded from a run directory, for `embedfit predict`."""

    model: Classifier
    class_names: list[str]
    device: torch.device

    def predict_proba_paths(self, paths: Sequence[str | Path], *, batch_size: int | None = None,
                            workers: int | None = None) -> tuple[np.ndarray, list[str]]:
        """Class probabilities per image file; NaN rows and a reason for files that do not decode.

        The images go through extraction's batched reader and encoder (`iter_embeddings`: decoding in worker
        processes, a status per file), and the trained head runs on the embeddings it yields.
        """
        logits, errors = head_outputs(self.model.backbone, self.model.head, paths, self.device,
                                      batch_size=batch_size, workers=workers)
        return torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy(), errors


def head_outputs(backbone: Backbone, head: nn.Module, paths: Sequence[str | Path], device: torch.device, *,
                 batch_size: int | None = None, workers: int | None = None) -> tuple[np.ndarray, list[str]]:
    """A head's outputs (logits) for image files, through the batched extraction loop: (N, K) with NaN rows
    for files that do not decode, and the reason per file ("" when it did).

    Args:
        backbone: The (pre-logits) backbone the head sits on.
        head: Embeddings (N, D) -> logits (N, K): a trained head, or the backbone's pretrained classifier.
        paths: Image files.
        device: Where to run.
        batch_size: Images per batch (extraction's default for the device when None).
        workers: Decoding processes (extraction's default when None).
    """
    from embedfit.extraction.encoder import Encoder, iter_embeddings

    records = [ImageRecord(Path(p), str(p), -1, 0, 0) for p in paths]
    encoder = Encoder(backbone, device)
    head = head.to(device).eval()
    outputs: list[np.ndarray] = []
    errors: list[str] = []
    with torch.inference_mode():
        for batch in iter_embeddings(records, encoder, batch_size=batch_size, workers=workers):
            ok = np.array([not e for e in batch.errors])
            if ok.any():
                found = head(torch.from_numpy(batch.features[ok]).to(device)).float().cpu().numpy()
                block = np.full((len(ok), found.shape[1]), np.nan, dtype=np.float32)
                block[ok] = found
                outputs.append(block)
            else:
                outputs.append(np.full((len(ok), 0), np.nan, dtype=np.float32))
            errors += batch.errors
    width = max((o.shape[1] for o in outputs), default=0)
    rows = [o if o.shape[1] == width else np.full((len(o), width), np.nan, dtype=np.float32) for o in outputs]
    return (np.concatenate(rows) if rows else np.zeros((0, width), np.float32)), errors


def load_finetuned(run_dir: str | Path, device: str = "auto") -> FinetunedModel:
    """Rebuild a fine-tuned/scratch network from model.json and load model.pt (weights only, no pickled code)."""
    from embedfit.runs import model_file

    meta, path = model_file(run_dir, "torch")
    params = meta["params"]
    spec = meta["spec"]
    backbone = create_backbone(spec["name"], pretrained=False,
                               layer=None if spec["layer"] == "pre_logits" else spec["layer"], pool=spec["pool"],
                               resolution=spec["input_size"][0])
    model = Classifier(backbone, len(meta["class_names"]), params.get("dropout", 0.0))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # never pass on torch's advice to retry with weights_only=False: that runs pickled code
        raise ModelFileError(f"cannot load {path}: it is not a plain state dict of tensors "
                             f"({_first_sentence(exc)}); refusing to unpickle it") from None
    head = state.get("head.weight") if isinstance(state, dict) else None
    if head is not None and head.shape[0] != len(meta["class_names"]):
        raise ModelFileError(f"{path} has a {head.shape[0]}-class head but its model.json lists "
                             f"{len(meta['class_names'])} class names: the files come from different runs")
    try:
        model.load_state_dict(state)
    except Exception as exc:
        raise ModelFileError(f"cannot load {path}: {_first_sentence(exc)}") from None
    # The rebuilt backbone carries the trained run's preprocessing, not a random-init spec.
    from embedfit.backbones.spec import BackboneSpec

    model.backbone.spec = BackboneSpec.from_dict(spec)
    dev = resolve_device(device)
    return FinetunedModel(model.to(dev).eval(), list(meta["class_names"]), dev)
