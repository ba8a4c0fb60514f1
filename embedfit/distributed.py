"""Scale-out: extraction on Ray (`embedfit extract --engine ray`) and out-of-core fitting (`fit_out_of_core`).

Ray Data reads the file list, decodes on CPU tasks (the same `ImageDataset` code as the local engine), and embeds
with an actor pool (one model per actor, a GPU each when asked). Results stream back to the driver, which writes
them through the same crash-safe `StoreWriter` as a local run (atomic part files, then one atomic commit), so the
store has the same schema, provenance, resume behaviour and row order. Ray restarts an actor that dies and retries
its batch; a batch retried twice cannot duplicate rows because the commit keeps one row per image key.

`fit_out_of_core` fits SGD linear models on stores larger than memory by streaming feature chunks through
`partial_fit`, and writes the same run directory as `embedfit.fit.fit`; it needs no Ray.

Ray is optional: `pip install 'embedfit[ray]'`. Ray is imported only inside `extract_ray`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline

from embedfit.backbones import check_backbone_name, create_backbone
from embedfit.errors import UsageError
from embedfit.extract import ExtractConfig, ExtractSummary, ImageDataset
from embedfit.fit import FitResult
from embedfit.images import ImageRecord, scan_images
from embedfit.store import FAILED, OK, FeatureStore, StoreSettings, StoreWriter

_TEST_KILL_ONCE = "EMBEDFIT_TEST_KILL_ACTOR_ONCE"  # tests: path of a marker; the first actor call exits hard


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError("--engine ray needs Ray: pip install 'embedfit[ray]'") from None
    return ray


def _records(batch: dict[str, np.ndarray]) -> list[ImageRecord]:
    return [ImageRecord(Path(p), k, int(lb), int(s), int(m)) for p, k, lb, s, m in
            zip(batch["path"], batch["key"], batch["label"], batch["size"], batch["mtime"], strict=True)]


def _decode(batch: dict[str, np.ndarray], spec: Any, jpeg_draft: bool, max_pixels: int | None
            ) -> dict[str, np.ndarray]:
    """Ray Data CPU task: file records -> uint8 image arrays (zeros for failures) and error strings.

    A function, not a class: Ray runs it as tasks that free their CPU between batches, so the embedding actors are
    never starved by idle decoders.
    """
    dataset = ImageDataset(_records(batch), spec, jpeg_draft=jpeg_draft, max_pixels=max_pixels)
    h, w = spec.input_size
    images = np.zeros((len(dataset), 3, h, w), dtype=np.uint8)
    errors = []
    for i in range(len(dataset)):
        _, tensor, error = dataset[i]
        if tensor is not None:
            images[i] = tensor.numpy()
        errors.append(error)
    return {**batch, "image": images, "error": np.array(errors, dtype=object)}


class _Embed:
    """Ray Data actor: one model per actor, loaded once; uint8 images -> float32 features (NaN for failures)."""

    def __init__(self, config: ExtractConfig, device: str) -> None:
        from embedfit.extract import Encoder, resolve_device

        backbone = create_backbone(config.backbone, weights=config.weights, layer=config.layer, pool=config.pool)
        self.encoder = Encoder(backbone, resolve_device(device), precision=config.precision, tta=config.tta,
                               channels_last=config.channels_last, runtime=config.runtime)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        marker = os.environ.get(_TEST_KILL_ONCE)
        if marker and not Path(marker).exists():  # test hook: die mid-run once, as a preempted worker would
            Path(marker).write_text("killed")
            os._exit(1)
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        feats = np.full((len(ok), self.encoder.spec.embedding_dim), np.nan, dtype=np.float32)
        if ok.any():
            feats[ok] = self.encoder(torch.from_numpy(np.ascontiguousarray(batch["image"][ok])))
        out = {k: v for k, v in batch.items() if k != "image"}
        out["features"] = feats
        out["runtime"] = np.array([self.encoder.runtime] * len(ok), dtype=object)  # "auto" may fall back
        return out


def extract_ray(source: str | os.PathLike, output: str | os.PathLike, config: ExtractConfig | None = None, *,
                address: str | None = None, num_workers: int = 2, num_gpus_per_worker: float = 0.0,
                shard_size: int = 256, class_names: list[str] | None = None, **options: Any) -> ExtractSummary:
    """`embedfit.extract` on a Ray cluster: same store, same resume, same results.

    Args:
        source: Image folder or CSV.
        output: The HDF5 store to create or complete.
        config: Extraction settings (keyword `options` override fields).
        address: Ray cluster address (None: connect to a running local cluster or start one).
        num_workers: Embedding actors (one model each).
        num_gpus_per_worker: GPUs per actor (0 for CPU actors).
        shard_size: Images per Ray batch, and per part file written by the driver.
        class_names: Class list to use instead of the folder names.
    """
    ray = _ray()
    config = dataclasses.replace(config or ExtractConfig(), **options)
    if num_workers < 1 or shard_size < 1:
        raise UsageError("--ray-workers and --shard-size must be at least 1")
    start = time.perf_counter()
    check_backbone_name(config.backbone)
    images = scan_images(source, class_names=class_names)
    spec = create_backbone(config.backbone, weights=config.weights, layer=config.layer, pool=config.pool).spec
    settings = StoreSettings(spec, config.dtype, config.tta, config.precision)
    device = "cuda" if num_gpus_per_worker > 0 else "cpu"
    summary = ExtractSummary(Path(output), total=len(images.records), skipped=len(images.skipped),
                             skips=images.skipped[:10],
                             device=f"ray ({num_workers} x {device})")
    with StoreWriter(output, settings, overwrite=config.overwrite) as writer:
        plan = writer.plan(images.records, retry_failed=config.retry_failed)
        summary.reused = plan.reused
        runtimes: set[str] = set()
        if plan.todo:
            if not ray.is_initialized():
                ray.init(address=address, include_dashboard=False, ignore_reinit_error=True,
                         log_to_driver=False, runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                                                        if k.startswith("EMBEDFIT_")}})
            items = [{"path": str(r.path), "key": r.key, "label": r.label, "size": r.size, "mtime": r.mtime_ns}
                     for r in plan.todo]
            ds = ray.data.from_items(items, override_num_blocks=max(1, len(items) // shard_size))
            ds = ds.map_batches(_decode, fn_kwargs={"spec": spec, "jpeg_draft": config.jpeg_draft,
                                                    "max_pixels": config.max_pixels},
                                batch_size=shard_size, num_cpus=0.25)
            ds = ds.map_batches(_Embed, fn_constructor_args=(config, device), batch_size=shard_size,
                                compute=ray.data.ActorPoolStrategy(size=num_workers),
                                # CPU actors reserve half a CPU each so that n actors on n CPUs still leave
                                # room for the decoding tasks (Ray's CPU accounting is advisory; torch uses the
                                # cores it has). GPU actors reserve their GPU and one CPU.
                                num_cpus=1 if num_gpus_per_worker else 0.5,
                                num_gpus=num_gpus_per_worker or None, max_restarts=-1, max_task_retries=-1)
            names = images.class_names
            for batch in ds.iter_batches(batch_size=shard_size, batch_format="numpy"):
                runtimes.update(str(r) for r in batch["runtime"])
                errors = [str(e) for e in batch["error"]]
                writer.write_part(list(batch["key"]), [names[int(lb)] if lb >= 0 else "" for lb in batch["label"]],
                                  batch["size"].tolist(), batch["mtime"].tolist(),
                                  [FAILED if e else OK for e in errors], errors, batch["features"])
                summary.failed += sum(1 for e in errors if e)
                summary.embedded += sum(1 for e in errors if not e)
                summary.failures += [(k, e) for k, e in zip(batch["key"], errors, strict=True) if e][:20]
        summary.seconds = time.perf_counter() - start
        prior = writer._previous.attrs.get("extract_seconds", 0.0) if writer._previous else 0.0
        store = writer.commit(images.records, images.class_names, complete=True, attrs={
            "device": summary.device, "root": str(images.root), "source_kind": images.kind,
            "extract_seconds": float(prior) + summary.seconds, "engine": "ray", "decode": "pil",
            "runtime": "+".join(sorted(runtimes)) if plan.todo else None})
    summary.complete = store.complete
    summary.missing = int((store.status == 2).sum())
    return summary


# ---------------------------------------------------------------------------------------------------
# Out-of-core fitting: stores larger than memory

OOC_MODELS = ("sgd-logreg", "sgd-svm")


def _blocks(rows: np.ndarray, block_rows: int) -> list[np.ndarray]:
    return [rows[i:i + block_rows] for i in range(0, len(rows), block_rows)]


def _stream(store: FeatureStore, blocks: list[np.ndarray], mix: int, rng: np.random.Generator | None
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (rows, features) batches of `mix` blocks each; shuffled block order and rows when `rng` is given.

    Blocks are contiguous runs of rows, so each read is one HDF5 span; mixing several random blocks per batch
    keeps a store sorted by class (the usual folder order) from feeding SGD one class at a time.
    """
    order = rng.permutation(len(blocks)) if rng is not None else np.arange(len(blocks))
    for i in range(0, len(order), mix):
        rows = np.concatenate([blocks[b] for b in order[i:i + mix]])
        X = np.concatenate([store.features(blocks[b]) for b in order[i:i + mix]])
        if rng is not None:
            perm = rng.permutation(len(rows))
            rows, X = rows[perm], X[perm]
        yield rows, X


def _sgd_fit(store: FeatureStore, rows: np.ndarray, model: str, *, classes: np.ndarray, epochs: int, batch_rows: int,
             alpha: float, class_weight: str | None, seed: int) -> Pipeline:
    """StandardScaler (partial_fit, one pass) then SGDClassifier (partial_fit, `epochs` shuffled passes)."""
    from sklearn.linear_model import SGDClassifier
    from sklearn.preprocessing import StandardScaler
    from sklearn.utils.class_weight import compute_class_weight

    mix = 16
    blocks = _blocks(rows, max(1, batch_rows // mix))
    scaler = StandardScaler()
    for _, X in _stream(store, blocks, mix, None):
        scaler.partial_fit(X)
    y_all = store.labels[rows]
    present = np.unique(y_all)
    weights = None
    if class_weight == "balanced":  # partial_fit refuses "balanced": compute it once from the in-memory labels
        weights = dict(zip(present.tolist(), compute_class_weight("balanced", classes=present, y=y_all), strict=True))
    clf = SGDClassifier(loss="log_loss" if model == "sgd-logreg" else "hinge", alpha=alpha, class_weight=weights,
                        learning_rate="optimal", average=True, random_state=seed)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for batch_rows_idx, X in _stream(store, blocks, mix, rng):
            clf.partial_fit(scaler.transform(X), store.labels[batch_rows_idx], classes=classes)
    return Pipeline([("scale", scaler), ("clf", clf)])


def fit_out_of_core(store: str | os.PathLike | FeatureStore, model: str = "sgd-logreg", *,
                    output: str | os.PathLike | None = None, epochs: int = 5, batch_rows: int = 8192,
                    test_size: float = 0.2, alpha: float = 1e-4, class_weight: str | None = "balanced",
                    seed: int = 0) -> FitResult:
    """Fit a linear classifier on a store larger than memory, streaming feature chunks through `partial_fit`.

    Only the store's metadata (labels, paths) is held in memory; features are read `batch_rows` at a time. A
    stratified hold-out share is evaluated (one streamed fit), then the model is refit on every image and saved as
    the usual run directory (model.skops, model.json, metrics.json, predictions.csv), so `embedfit predict` and
    `embedfit report` use it like any other run.

    Args:
        store: The training feature store.
        model: "sgd-logreg" (logistic loss, has probabilities) or "sgd-svm" (hinge loss).
        output: Run directory (default: runs/<store stem>-<model>).
        epochs: Passes over the data (shuffled chunk order each pass).
        batch_rows: Rows per `partial_fit` call (the memory bound: batch_rows x dim float32).
        test_size: Hold-out share for the evaluation.
        alpha: SGD regularisation strength.
        class_weight: "balanced" or None.
        seed: Random state for the split and the shuffles.

    Returns:
        A `FitResult` with the hold-out metrics and the pipeline refit on every image.
    """
    from sklearn.model_selection import train_test_split

    from embedfit.fit import Dataset, _metrics, check_trainable, fold_metrics, save_run

    if model not in OOC_MODELS:
        raise UsageError(f"unknown out-of-core model '{model}'; choose {' or '.join(OOC_MODELS)}")
    if epochs < 1 or batch_rows < 1:
        raise UsageError(f"--epochs and --batch-rows must be at least 1, got {epochs} and {batch_rows}")
    if not 0 < test_size < 1:
        raise UsageError(f"--test-size must be a fraction between 0 and 1, got {test_size}")
    store = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
    rows = np.flatnonzero((store.status == OK) & (store.labels >= 0))
    y = store.labels[rows]
    names = list(store.class_names)
    check_trainable(y, names, 2)  # the stratified hold-out needs two images per class
    classes = np.arange(len(names))
    opts = dict(classes=classes, epochs=epochs, batch_rows=batch_rows, alpha=alpha, class_weight=class_weight,
                seed=seed)

    t0 = time.perf_counter()
    train, test = train_test_split(rows, test_size=test_size, stratify=y, random_state=seed)
    pipe = _sgd_fit(store, np.sort(train), model, **opts)
    test = np.sort(test)
    pred, proba = [], []
    for _, X in _stream(store, _blocks(test, batch_rows), 1, None):
        pred.append(pipe.predict(X))
        if model == "sgd-logreg":
            proba.append(pipe.predict_proba(X))
    pred_a = np.concatenate(pred)
    proba_a = np.concatenate(proba) if proba else None
    y_test = store.labels[test]
    cv_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    final = _sgd_fit(store, rows, model, **opts)
    fit_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    timed = rows[:min(256, batch_rows)]
    final.predict(store.features(timed))
    predict_per_image = (time.perf_counter() - t0) / len(timed)

    predictions = []
    for j, r in enumerate(test):
        row = {"path": str(store.paths[r]), "row": int(r), "label": names[y_test[j]], "predicted": names[pred_a[j]],
               "correct": bool(y_test[j] == pred_a[j]), "fold": 0}
        if proba_a is not None:
            row.update({f"p_{c}": round(float(p), 6) for c, p in zip(names, proba_a[j], strict=True)})
        predictions.append(row)
    # _metrics reads labels, class names and the store from the Dataset, never X (which stays on disk here).
    data = Dataset(np.empty((0, store.dim), np.float32), y, store.paths[rows], rows, names, store,
                   len(store) - len(rows))
    evaluation = {"strategy": "holdout", "n_splits": 1, "repeats": 1, "groups": False, "search": False,
                  "out_of_core": True}
    metrics = _metrics(model, store.spec, data, evaluation,
                       [fold_metrics(y_test, pred_a, proba_a, classes, len(names))], y_test, pred_a, {
                           "extract_seconds": float(store.attrs.get("extract_seconds", 0.0)),
                           "cv_seconds": cv_seconds, "fit_seconds": fit_seconds,
                           "predict_seconds_per_image": predict_per_image})
    run_dir = Path(output) if output else Path("runs") / f"{store.path.stem}-{model}"
    params = {"epochs": epochs, "batch_rows": batch_rows, "test_size": test_size, "alpha": alpha,
              "class_weight": class_weight, "seed": seed, "scale": "standard"}
    save_run(run_dir, final, model=model, params=params, store=store, metrics=metrics, predictions=predictions)
    return FitResult(run_dir, model, final, metrics, predictions)
