"""The local engine: `extract()` runs reader -> encoder -> `FeatureWriter` on this machine, resumably."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from embedfit.errors import EmbedfitError
from embedfit.extraction.settings import ExtractConfig, ExtractSummary, resolve_device
from embedfit.extraction.writer import FeatureWriter, raise_for_stop
from embedfit.images import scan_images
from embedfit.progress import Progress
from embedfit.store import FeatureStore, StoreSettings


class _StopOnSigint:
    """First Ctrl-C asks the loop to stop after the current batch; a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _StopOnSigint:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, *_: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def extract(source: str | os.PathLike, output: str | os.PathLike, config: ExtractConfig | None = None,
            *, class_names: Sequence[str] | None = None, **options: Any) -> ExtractSummary:
    """Embed every image under `source` into the store `output`, resuming whatever is already there.

    Args:
        source: A class-per-subfolder tree, a flat folder, or a CSV with `path` (and `label`) columns.
        output: The HDF5 store to create or complete: a local path or a URL on object storage (``s3://...``;
            see `embedfit.remote`).
        config: Extraction settings; keyword `options` override its fields (e.g. `batch_size=64`).
        class_names: Use this class list (e.g. the training store's) instead of the folder names.

    Returns:
        An `ExtractSummary`; the store is readable with `FeatureStore.open(output)`.

    Raises:
        InputError, UsageError, WeightsUnavailableError, StoreError: with a message for the user.
        ExtractionInterrupted: Ctrl-C or `max_failures`; finished work is saved and the run can resume.
    """
    from embedfit.remote import is_url, local_or_url, with_staged_store

    config = dataclasses.replace(config or ExtractConfig(), **options)
    output = local_or_url(output)
    if is_url(output):  # object storage: run on a local staging copy, uploaded whole when committed
        return with_staged_store(output, config.overwrite,
                                 lambda local: extract(source, local, config, class_names=class_names))
    stored = _settings_if_same_request(output, config)
    if stored is None:
        from embedfit.backbones.registry import check_backbone_name

        check_backbone_name(config.backbone)  # cheap checks first: a typo should not wait for a big folder scan
    images = scan_images(source, class_names=class_names)
    if stored is not None:  # a re-run: when every image is stored already, no model is needed (nor torch)
        with FeatureWriter(output, stored, images, retry_failed=config.retry_failed,
                           flush_every=config.flush_every, shard_size=config.shard_size) as writer:
            if not writer.todo:
                writer.commit()  # labels follow the current folders/CSV; vanished files become "missing"
                writer.summary.device = "no device: nothing to embed"
                return writer.summary
    # Only now the model's libraries (torch, timm: seconds to import).
    from embedfit.backbones.registry import create_backbone
    from embedfit.extraction.encoder import Encoder, iter_embeddings

    device = resolve_device(config.device)
    backbone = create_backbone(config.backbone, weights=config.weights, layer=config.layer, pool=config.pool,
                               resolution=config.resolution)
    settings = StoreSettings(backbone.spec, config.dtype, config.tta, config.precision)
    with FeatureWriter(output, settings, images, overwrite=config.overwrite, retry_failed=config.retry_failed,
                       flush_every=config.flush_every, shard_size=config.shard_size) as writer:
        # After the store checks: a run refused for a mismatching store should not first compile or export a model.
        encoder = Encoder(backbone, device, precision=config.precision, tta=config.tta,
                          channels_last=config.channels_last, compile=config.compile, runtime=config.runtime)
        summary = writer.summary
        summary.device, summary.runtime = str(device), encoder.runtime
        summary.notes = [encoder.note] if encoder.note else []
        provenance = {"device": str(device), "decode": config.decode, "runtime": encoder.runtime, "engine": "local"}
        writer.set_provenance(**provenance)

        start = time.perf_counter()
        progress = Progress("embedding", len(writer.todo), enabled=config.progress, unit="images")
        stop_reason = ""
        try:
            with _StopOnSigint() as sigint:
                for batch in iter_embeddings(writer.todo, encoder, batch_size=config.batch_size,
                                             workers=config.workers, jpeg_draft=config.jpeg_draft,
                                             max_pixels=config.max_pixels, decode=config.decode):
                    writer.add(batch.records, batch.features, batch.errors)
                    rate = writer.done / max(time.perf_counter() - start, 1e-9)
                    progress.advance(len(batch.records), f"{rate:.1f} img/s")
                    stop_reason = writer.stop_reason(config.max_failures, source, sigint)
                    if stop_reason:
                        break
        except KeyboardInterrupt:
            stop_reason = "interrupted"
        except EmbedfitError:
            writer.commit(complete=False, **provenance)  # keep what was done, then report the error
            raise
        finally:
            progress.close()
        # The store decides: complete when every image has a row, so a Ctrl-C that lands after the last batch
        # still leaves a complete store, and no error.
        raise_for_stop(stop_reason, writer.commit(**provenance), output)
    return summary


def _settings_if_same_request(output: str | os.PathLike, config: ExtractConfig) -> StoreSettings | None:
    """The existing store's settings when `config` asks for exactly what made it, else None.

    Same backbone name, layer, pooling, weights (a `weights` file by its SHA-256; else the default pretrained
    weights), dtype, TTA and precision. Lets a re-run on a finished folder plan its work from the store alone.
    """
    from embedfit.backbones.foundation import default_pool
    from embedfit.backbones.spec import PRE_LOGITS

    path = Path(output)
    if config.overwrite or not path.is_file():
        return None
    try:
        with FeatureStore.open(path) as store:
            spec, settings = store.spec, store.settings
    except EmbedfitError:
        return None  # the writer reports what is wrong with it
    if (spec.name, spec.layer, spec.pool) != (config.backbone, config.layer or PRE_LOGITS,
                                              config.pool or default_pool(config.backbone)):
        return None
    if config.resolution is not None and tuple(spec.input_size) != (config.resolution, config.resolution):
        return None
    if (settings.dtype, settings.tta, settings.precision) != (config.dtype, config.tta, config.precision):
        return None
    if config.weights is not None:
        from embedfit.backbones.weights import _sha256

        weights = Path(config.weights)
        if not weights.is_file() or not spec.weights.startswith("file:") or spec.weights_sha256 != _sha256(weights):
            return None
    elif spec.weights.startswith("file:") or spec.weights == "random":
        return None
    return settings
