"""The Ray engine (`embedfit extract --engine ray`): the same extraction fanned out over a Ray cluster.

Ray Data reads the file list, decodes on CPU tasks (the same `ImageDataset` code as the local engine), and embeds
with an actor pool (one model per actor, a GPU each when asked). Results stream back to the driver into the same
`FeatureWriter` as a local run (atomic part files, then one atomic commit), so the store has the same schema,
provenance, resume behaviour and row order. Ray restarts an actor that dies and retries its batch; a batch
retried twice cannot duplicate rows because the commit keeps one row per image key.

Ray is optional: `pip install 'embedfit[ray]'`; it is imported only inside `extract_ray`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from embedfit.backbones.registry import check_backbone_name, create_backbone
from embedfit.errors import UsageError
from embedfit.extraction.reader import ImageDataset
from embedfit.extraction.settings import ExtractConfig, ExtractSummary
from embedfit.extraction.writer import FeatureWriter
from embedfit.images import ImageRecord, scan_images
from embedfit.remote import is_url, local_or_url, with_staged_store
from embedfit.store import StoreSettings

_TEST_KILL_ONCE = "EMBEDFIT_TEST_KILL_ACTOR_ONCE"  # tests: path of a marker; the first actor call exits hard


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError("--engine ray needs Ray: pip install 'embedfit[ray]'") from None
    return ray


def _records(batch: dict[str, np.ndarray]) -> list[ImageRecord]:
    return [ImageRecord(p if is_url(p) else Path(p), k, int(lb), int(s), int(m)) for p, k, lb, s, m in
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
        from embedfit.extraction.encoder import Encoder
        from embedfit.extraction.settings import resolve_device

        backbone = create_backbone(config.backbone, weights=config.weights, layer=config.layer, pool=config.pool,
                                   resolution=config.resolution)
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
    output = local_or_url(output)
    if is_url(output):  # object storage: a local staging copy, uploaded whole when committed (embedfit.remote)
        return with_staged_store(output, config.overwrite, lambda local: extract_ray(
            source, local, config, address=address, num_workers=num_workers,
            num_gpus_per_worker=num_gpus_per_worker, shard_size=shard_size, class_names=class_names))
    if num_workers < 1 or shard_size < 1:
        raise UsageError("--ray-workers and --shard-size must be at least 1")
    check_backbone_name(config.backbone)
    images = scan_images(source, class_names=class_names)
    spec = create_backbone(config.backbone, weights=config.weights, layer=config.layer, pool=config.pool,
                               resolution=config.resolution).spec
    settings = StoreSettings(spec, config.dtype, config.tta, config.precision)
    device = "cuda" if num_gpus_per_worker > 0 else "cpu"
    with FeatureWriter(output, settings, images, overwrite=config.overwrite, retry_failed=config.retry_failed,
                       flush_every=shard_size) as writer:
        writer.summary.device = f"ray ({num_workers} x {device})"
        runtimes: set[str] = set()
        if writer.todo:
            if not ray.is_initialized():
                ray.init(address=address, include_dashboard=False, ignore_reinit_error=True,
                         log_to_driver=False, runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                                                        if k.startswith("EMBEDFIT_")}})
            items = [{"path": str(r.path), "key": r.key, "label": r.label, "size": r.size, "mtime": r.mtime_ns}
                     for r in writer.todo]
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
            for batch in ds.iter_batches(batch_size=shard_size, batch_format="numpy"):
                runtimes.update(str(r) for r in batch["runtime"])
                writer.add(_records(batch), batch["features"], [str(e) for e in batch["error"]])
        writer.commit(device=writer.summary.device, engine="ray", decode="pil",
                      runtime="+".join(sorted(runtimes)) if writer.todo else None)
    return writer.summary
