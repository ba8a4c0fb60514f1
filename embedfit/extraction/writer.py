"""Writer: the one object every engine hands its results to.

`FeatureWriter` owns the store for a run: it takes the lock, plans the resume (which images still need
embedding), buffers results into crash-safe part files on a background thread, keeps the run's tally, and
commits the store at the end, returning the `ExtractSummary`. The local engine and the Ray engine both use it,
so a store means the same thing whichever engine made it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from embedfit.errors import EmbedfitError, ExtractionInterrupted
from embedfit.extraction.settings import ExtractConfig, ExtractSummary, MaxFailures
from embedfit.images import ImageRecord, ImageSource
from embedfit.progress import OnProgress, Progress, progress_sink
from embedfit.storage import CONTENT_HASH, FAILED, MISSING, OK, FeatureStore, StoreSettings, StoreWriter

if TYPE_CHECKING:
    from embedfit.storage.manifest import Listing, ManifestResult

_MAX_FAILURES_LISTED = 20
T = TypeVar("T")


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


@dataclass
class PlannedInput:
    """An input listed and planned elsewhere, part by part (`embedfit.extraction.parts`), for `FeatureWriter`.

    Attributes:
        root, kind, class_names: As `ImageSource`'s.
        total: Images in the input.
        todo: Of those, images to embed.
        reused: Of those, images the store already answers.
        skipped: What the listing left out (the first ones), and how many (`n_skipped`).
        listing: The input, streamed in key order (for the commit).
    """

    root: Path | str
    kind: str
    class_names: list[str]
    total: int
    todo: int
    reused: int
    skipped: list[tuple[str, str]]
    n_skipped: int
    listing: Listing


class FeatureWriter:
    """Results in, a committed feature store and a summary out; use as a context manager.

    Args:
        output: The store file.
        settings: What the features are (spec, dtype, TTA, precision); a store made otherwise is refused.
        images: The scanned input; None when it is listed and planned elsewhere (`use_plan`).
        overwrite: Start the store afresh instead of resuming.
        retry_failed: Embed again the images an earlier run recorded as failed.
        flush_every: Images per part file (the most work a killed run loses).
        shard_size: Write a sharded store (`embedfit.storage.shards`) of this many images per shard; None keeps the
            store's layout (a new store is one file, an existing sharded store stays sharded).
        started: `time.perf_counter()` when the run began, if before the writer (the run's `seconds` count from it).

    Attributes:
        todo: The records this run must embed (the rest are already in the store); empty with `use_plan`.
        summary: The run's tally so far.
    """

    def __init__(self, output: str | os.PathLike, settings: StoreSettings, images: ImageSource | None, *,
                 overwrite: bool = False, retry_failed: bool = False, flush_every: int = 512,
                 shard_size: int | None = None, started: float | None = None) -> None:
        from embedfit.storage.shards import ShardedStoreWriter, shard_size_of

        self._start = time.perf_counter() if started is None else started
        self.images = images
        if shard_size is None and not overwrite:
            shard_size = shard_size_of(output)
        self.sharded = shard_size is not None
        self.flush_every = shard_size or flush_every
        self._store: StoreWriter = (ShardedStoreWriter(output, settings, overwrite=overwrite, shard_size=shard_size)
                                    if shard_size is not None else StoreWriter(output, settings, overwrite=overwrite))
        self.planned: PlannedInput | None = None
        self.todo: list[ImageRecord] = []
        self.summary = ExtractSummary(Path(output))
        if images is not None:
            try:
                plan = self._store.plan(images.records, retry_failed=retry_failed)
            except BaseException:
                self._store.close()
                raise
            self.todo = plan.todo
            self.summary = ExtractSummary(Path(output), total=len(images.records), skipped=len(images.skipped),
                                          skips=images.skipped[:10], reused=plan.reused)
        self._pending: list[tuple[Sequence[ImageRecord], np.ndarray, Sequence[str], Sequence[str]]] = []
        self._buffered = 0
        self._futures: list[Future] = []
        self._pool: ThreadPoolExecutor | None = None

    def use_plan(self, planned: PlannedInput) -> None:
        """Take the plan of an input listed and planned elsewhere (the writer was made with `images` None)."""
        self.planned = planned
        s = self.summary
        s.total, s.skipped, s.skips, s.reused = planned.total, planned.n_skipped, planned.skipped[:10], planned.reused

    @property
    def todo_count(self) -> int:
        """How many images this run must embed."""
        return self.planned.todo if self.planned is not None else len(self.todo)

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the background writes (finished parts stay for the next run) and release the lock."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._store.close()

    @property
    def store(self) -> StoreWriter:
        """The store writer (a `ShardedStoreWriter` when `sharded`), for engines whose workers write shards."""
        return self._store

    def set_provenance(self, **attrs: Any) -> None:
        """How this run makes rows (device, runtime, decode, engine); recorded in every shard it writes."""
        if self.sharded:
            self._store.provenance.update({k: v for k, v in attrs.items() if v is not None})

    def add_written(self, rows: int, failures: Sequence[tuple[str, str]]) -> None:
        """Count a shard of `rows` images that a worker wrote itself; `failures` are its (key, reason) pairs."""
        self.summary.failed += len(failures)
        self.summary.embedded += rows - len(failures)
        self.summary.failures += list(failures)[: max(0, _MAX_FAILURES_LISTED - len(self.summary.failures))]

    def add(self, records: Sequence[ImageRecord], features: np.ndarray, errors: Sequence[str],
            hashes: Sequence[str] | None = None) -> None:
        """Take one batch of results: row i of `features` (NaN when failed), `errors[i]` and `hashes[i]` (the
        file's SHA-256, the store's `content_hash`; None: unknown) belong to `records[i]`."""
        failed = [(r.key, e) for r, e in zip(records, errors, strict=True) if e]
        self.summary.failed += len(failed)
        self.summary.embedded += len(records) - len(failed)
        self.summary.failures += failed[: max(0, _MAX_FAILURES_LISTED - len(self.summary.failures))]
        self._pending.append((records, features, errors, list(hashes) if hashes else [""] * len(records)))
        self._buffered += len(records)
        if self._buffered >= self.flush_every:
            self.flush(final=False)

    def over_failure_limit(self, limit: MaxFailures | None, source: object) -> str:
        """Why the run must stop when more images failed than `limit` allows among those to embed, else ""."""
        if limit is None or not limit.exceeded(self.summary.failed, self.todo_count):
            return ""
        return (f"aborted: {self.summary.failed} of {self.done} images failed (limit "
                f"{limit.describe(self.todo_count)}); is {source} an image folder?")

    def stop_reason(self, limit: MaxFailures | None, source: object, sigint: Any) -> str:
        """Why an engine's loop must stop after this batch: the failure limit, or a Ctrl-C (`sigint.requested`);
        else ""."""
        return self.over_failure_limit(limit, source) or ("interrupted" if sigint.requested else "")

    def run(self, results: Iterable[T], add: Callable[[T], tuple[int, str]], *, config: ExtractConfig,
            source: object, output: object, provenance: dict[str, Any],
            stop: Callable[[], None] = lambda: None, on_progress: OnProgress | None = None) -> None:
        """An engine's loop and its ending, the same for every engine: hand each result to `add` (which records it
        and returns the images it covered and a progress note), stop at the failure limit or a Ctrl-C, then
        commit and raise what stopped the run (`raise_for_stop`).

        Args:
            results: The engine's results as they come (batches of embeddings, or shards its workers wrote).
            add: Records one result; returns (images, progress note).
            config: For `max_failures` and `progress`.
            source: The input, named in the failure-limit message.
            output: The store, named in the messages.
            provenance: How this run makes rows, recorded by the commit.
            stop: Stops the engine's workers; runs before any commit, so nothing is written after it.
            on_progress: Where the images' progress goes (`embedfit.progress`); else stderr when
                `config.progress`.

        Raises:
            ExtractionInterrupted: Ctrl-C or the failure limit; what was done is committed.
        """
        stop_reason = ""
        try:
            try:
                with _StopOnSigint() as sigint, progress_sink(on_progress, config.progress) as sink:
                    progress = Progress("embedding", self.todo_count, unit="images", on_progress=sink)
                    for result in results:
                        progress.advance(*add(result))
                        stop_reason = self.stop_reason(config.max_failures, source, sigint)
                        if stop_reason:
                            break
                    progress.close()
            finally:
                stop()
        except KeyboardInterrupt:
            stop_reason = "interrupted"
        except EmbedfitError:
            self.commit(complete=False, **provenance)  # keep what was done, then report the error
            raise
        raise_for_stop(stop_reason, self.commit(**provenance), output)

    @property
    def done(self) -> int:
        """Images embedded or failed in this run."""
        return self.summary.embedded + self.summary.failed

    def flush(self, *, final: bool = True) -> None:
        """Write the buffered results as part files (shards), on the background thread (at most two in flight).

        Args:
            final: Write everything buffered. False (a sharded store, while adding) writes whole shards of exactly
                `shard_size` images and keeps the rest for the next one.
        """
        if not self._pending:
            return
        records = [r for batch in self._pending for r in batch[0]]
        errors = [e for batch in self._pending for e in batch[2]]
        hashes = [h for batch in self._pending for h in batch[3]]
        features = np.concatenate([batch[1] for batch in self._pending])
        self._pending.clear()
        self._buffered = 0
        step = self.flush_every if self.sharded else len(records)
        cut = len(records) if final else len(records) // step * step
        if cut < len(records):
            self._pending.append((records[cut:], features[cut:], errors[cut:], hashes[cut:]))
            self._buffered = len(records) - cut
        for start in range(0, cut, step):
            self._write(records[start:start + step], features[start:start + step], errors[start:start + step],
                        hashes[start:start + step])

    def _write(self, records: Sequence[ImageRecord], features: np.ndarray, errors: Sequence[str],
               hashes: Sequence[str]) -> None:
        names = self.images.class_names
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedfit-writer")
        while len(self._futures) >= 2:  # bound memory: at most two parts in flight
            self._futures.pop(0).result()
        self._futures.append(self._pool.submit(
            self._store.write_part, [r.key for r in records], [names[r.label] if r.label >= 0 else "" for r in records],
            [r.size for r in records], [r.mtime_ns for r in records], [FAILED if e else OK for e in errors], errors,
            features, {CONTENT_HASH: hashes}))

    def commit(self, *, complete: bool = True, **attrs: Any) -> FeatureStore | ManifestResult:
        """Flush, wait for every part, and merge them into the store (atomically replaced).

        Args:
            complete: False marks the store incomplete even when every image has a row (an error stopped the run).
            attrs: Provenance of this run (device, decode, runtime, engine); `None` values are left out.

        Returns:
            The committed store (a sharded store's counts, `ManifestResult`, which is not read back); `summary`
            is final.
        """
        self.flush()
        for future in self._futures:
            future.result()
        self._futures.clear()
        self.summary.seconds = time.perf_counter() - self._start
        previous = self._store.previous
        prior = float(previous.attrs.get("extract_seconds", 0.0)) if previous is not None else 0.0
        source = self.planned or self.images
        attrs = {**attrs, "root": str(source.root), "source_kind": source.kind,
                 "extract_seconds": prior + self.summary.seconds}
        if self.sharded:  # streamed over the shards; the manifest is not read back (`ManifestResult`)
            from embedfit.storage.manifest import Listing

            listing = self.planned.listing if self.planned is not None else \
                Listing.of(self.images.records, self.images.class_names)
            result = self._store.commit_listing(listing, complete=complete, attrs=attrs)
            self.summary.complete, self.summary.missing = result.complete, result.n_missing
            return result
        store = self._store.commit(self.images.records, self.images.class_names, complete=complete, attrs=attrs)
        self.summary.complete = store.complete
        self.summary.missing = int((store.status == MISSING).sum())
        return store


def raise_for_stop(stop_reason: str, store: FeatureStore | ManifestResult, output: object) -> None:
    """After the commit: the error a stopped run ends with, if any (both engines end the same way).

    Interrupted (exit 130) unless the store came out complete anyway (a Ctrl-C after the last batch); stopped by the
    failure limit: exit 1.
    """
    if stop_reason == "interrupted" and not store.complete:
        raise ExtractionInterrupted(f"interrupted; {store.n_ok} images are saved in {output} (incomplete); re-run "
                                    "the same command to resume")
    if stop_reason and stop_reason != "interrupted":
        aborted = ExtractionInterrupted(
            f"{stop_reason}; {store.n_ok} images are saved in {output}"
            + (" (incomplete); fix the input or raise `max_failures`, then re-run to resume" if not store.complete
               else " (every image was tried)"))
        aborted.exit_code = 1
        raise aborted


def settings_if_same_request(output: str | os.PathLike, config: ExtractConfig) -> StoreSettings | None:
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
