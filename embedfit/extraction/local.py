"""`extract()`, the one entry point of every engine (staging, name check, scan, resume plan), and the local engine:
reader -> encoder -> `FeatureWriter` on this machine, resumably."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

from embedfit.backbones.catalogue import check_request
from embedfit.errors import UsageError
from embedfit.extraction.engines import Engine, ExtractJob
from embedfit.extraction.settings import ExtractConfig, ExtractSummary, resolve_device
from embedfit.extraction.writer import FeatureWriter, settings_if_same_request
from embedfit.images import scan_images
from embedfit.progress import OnProgress
from embedfit.storage import StoreSettings


def extract(source: str | os.PathLike, output: str | os.PathLike, config: ExtractConfig | None = None,
            *, class_names: Sequence[str] | None = None, engine: str | Engine = "local",
            on_progress: OnProgress | None = None, **options: Any) -> ExtractSummary:
    """Embed every image under `source` into the store `output`, resuming whatever is already there.

    Args:
        source: A class-per-subfolder tree, a flat folder, or a CSV with `path` (and `label`) columns.
        output: The HDF5 store to create or complete: a local path or a URL on object storage (``s3://...``;
            see `embedfit.url`).
        config: Extraction settings; keyword `options` override its fields (e.g. `batch_size=64`).
        class_names: Use this class list (e.g. the training store's) instead of the folder names.
        engine: Where to embed: a registered engine name (`engines.engine_names()`: "local", "ray") or an engine
            object (e.g. `RayEngine(num_workers=4)`).
        on_progress: Called with the images' progress (`embedfit.progress`); else `config.progress` shows it on
            stderr.

    Returns:
        An `ExtractSummary`; the store is readable with `FeatureStore.open(output)`.

    Raises:
        InputError, UsageError, WeightsUnavailableError, StoreError: with a message for the user.
        ExtractionInterrupted: Ctrl-C or `max_failures`; finished work is saved and the run can resume.
    """
    from embedfit.extraction.engines import create_engine
    from embedfit.storage import is_collection
    from embedfit.storage.objects import with_staged_store
    from embedfit.url import is_url, local_or_url

    started = time.perf_counter()
    engine = create_engine(engine) if isinstance(engine, str) else engine
    config = dataclasses.replace(config or ExtractConfig(), **options)
    if config.shard_size is None and engine.shard_size:
        config = dataclasses.replace(config, shard_size=engine.shard_size)
    output = local_or_url(output)
    if is_collection(output):
        raise UsageError(f"`output` {output} is a .json name, which is a collection of stores: extract into a store "
                         "(.h5), then combine stores with `embedfit collect`")
    if is_url(output):  # object storage: run on a local staging copy, uploaded whole when committed
        return with_staged_store(output, config.overwrite, lambda local: _plan_and_run(
            source, local, output, config, class_names, engine, started, on_progress))
    return _plan_and_run(source, output, None, config, class_names, engine, started, on_progress)


def _plan_and_run(source: str | os.PathLike, output: str | os.PathLike, url: str | None, config: ExtractConfig,
                  class_names: Sequence[str] | None, engine: Engine, started: float,
                  on_progress: OnProgress | None) -> ExtractSummary:
    """What every engine shares before it runs: the name check, the scan, and the resume plan."""

    stored = settings_if_same_request(output, config)
    if stored is None:  # cheap checks first, without torch: a typo should not wait for a big folder scan
        check_request(config.backbone, weights=config.weights, pool=config.pool, resolution=config.resolution)
    if getattr(engine, "lists_input", False):  # listed and planned part by part, by the engine's workers
        return engine.run(ExtractJob(source, output, url, config, None, started, on_progress, class_names, stored))
    images = scan_images(source, class_names=class_names)
    if stored is not None:  # a re-run: when every image is stored already, no model is needed (nor torch)
        with FeatureWriter(output, stored, images, retry_failed=config.retry_failed,
                           flush_every=config.flush_every, shard_size=config.shard_size, started=started) as writer:
            if not writer.todo:
                writer.commit()  # labels follow the current folders/CSV; vanished files become "missing"
                writer.summary.device = "no device: nothing to embed"
                return writer.summary
    return engine.run(ExtractJob(source, output, url, config, images, started, on_progress))


class LocalEngine:
    """This machine: reader workers -> encoder -> `FeatureWriter`, one batch in flight."""

    name = "local"
    shard_size: int | None = None  # one file unless `shard_size` is asked for

    def run(self, job: ExtractJob) -> ExtractSummary:
        """Load the model (only now: torch and timm take seconds to import) and embed `job`'s images."""
        scanned = time.perf_counter() - job.started  # the store checks, the scan and the resume plan
        from embedfit.backbones.factory import create_backbone
        from embedfit.extraction.encoder import BatchResult, Encoder, iter_embeddings

        config, output, started = job.config, job.output, job.started
        device = resolve_device(config.device)
        backbone = create_backbone(config.backbone, weights=config.weights, layer=config.layer, pool=config.pool,
                                   resolution=config.resolution)
        settings = StoreSettings(backbone.spec, config.dtype, config.tta, config.precision)
        with FeatureWriter(output, settings, job.images, overwrite=config.overwrite,
                           retry_failed=config.retry_failed, flush_every=config.flush_every,
                           shard_size=config.shard_size, started=started) as writer:
            # After the store checks: a run refused for a mismatching store should not first compile or export.
            encoder = Encoder(backbone, device, precision=config.precision, tta=config.tta,
                              channels_last=config.channels_last, compile=config.compile, runtime=config.runtime)
            summary = writer.summary
            summary.device, summary.runtime = str(device), encoder.runtime
            summary.startup_seconds = time.perf_counter() - started
            summary.startup_phases = {"scan": scanned, "model load": summary.startup_seconds - scanned}
            summary.notes = [encoder.note] if encoder.note else []
            provenance = {"device": str(device), "decode": config.decode, "runtime": encoder.runtime,
                          "engine": self.name}
            writer.set_provenance(**provenance)

            start = time.perf_counter()

            def add(batch: BatchResult) -> tuple[int, str]:
                writer.add(batch.records, batch.features, batch.errors, batch.hashes)
                return len(batch.records), f"{writer.done / max(time.perf_counter() - start, 1e-9):.1f} img/s"

            # The store decides: complete when every image has a row, so a Ctrl-C that lands after the last batch
            # still leaves a complete store, and no error.
            writer.run(iter_embeddings(writer.todo, encoder, batch_size=config.batch_size, workers=config.workers,
                                       jpeg_draft=config.jpeg_draft, max_pixels=config.max_pixels,
                                       decode=config.decode), add, config=config, source=job.source,
                       output=output, provenance=provenance, on_progress=job.on_progress)
        return summary
