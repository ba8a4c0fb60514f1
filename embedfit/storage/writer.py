"""The writer contract every engine uses, and the crash-safe single-file writer.

The contract (modelled on Ray Data's `Datasink`): **plan** (`StoreWriter(...)` takes the lock and reads what the
store holds; `plan(records)` says which images still need embedding), **write a part** (`write_part`, wherever the
rows are: the local writer thread, or a Ray worker writing a shard), then **commit** (`commit`: merge the previous
store and the parts, from their small per-row metadata, into a store replaced atomically) or **abort** (`abort`:
nothing is committed; finished parts stay for the next run, which resumes from them). `ShardedStoreWriter`
(`embedfit.storage.shards`) keeps the same contract with shards as parts and a manifest as the commit.

Crash safety: HDF5 has no journal, so a writer killed mid-write can leave a file that no longer opens.
The store file itself is therefore only ever replaced whole (`os.replace` of a finished temporary file, which
keeps the old file's permission bits). While extraction runs, results go to small part files in `<store>.parts/`
(same schema and checksums), each also written to a temporary name and renamed. A run killed at any moment leaves
the old store intact plus finished parts, which the next run reuses after checking them in full: a damaged part is
deleted, with a warning, and its images embedded again.

Concurrency: a lock file (`lock_file`: the hidden `.<store>.embedfit-lock`, never deleted) keeps a second writer
out; it is an OS lock that dies with its holder and that forked children (DataLoader workers) do not keep.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from embedfit._version import __version__
from embedfit.errors import StoreError, StoreLockedError, StoreMismatchError
from embedfit.storage.reader import FeatureStore
from embedfit.storage.schema import (
    CHUNK_ROWS,
    FAILED,
    MISSING,
    OK,
    ROW_DATASETS,
    ROW_DEFAULTS,
    SCHEMA_VERSION,
    StoreSettings,
    damaged,
    ensure_space,
    fingerprint,
    library_versions,
    new_file,
    quiet_hdf5,
    read_row_arrays,
    row_arrays,
    shards_dir,
    verify_metadata,
    why,
    write_row_datasets,
)

# Tests: seconds to pause a commit with the new store half-written, so that a kill lands there every time.
TEST_COMMIT_PAUSE = "EMBEDFIT_TEST_COMMIT_PAUSE"
_CORE = ("paths", "labels", "status", "errors", "file_size", "file_mtime_ns")
log = logging.getLogger("embedfit")


def parts_dir(path: Path) -> Path:
    """Where a single-file store's work in progress lives: ``feats.h5`` -> ``feats.h5.parts``."""
    return path.with_name(path.name + ".parts")


@dataclass
class Row:
    """One image's row as a merge sees it: where its features are, and its per-row values."""

    source: int  # index into the merge's source list
    row: int
    label: str  # class name ("" unlabeled): class lists can change between runs, names do not
    size: int
    mtime_ns: int
    status: int
    error: str
    extra: dict[str, Any] = field(default_factory=dict)  # per-row datasets beyond the original six


def rows_from(arrays: dict[str, Any], source: int) -> Iterator[tuple[str, Row]]:
    """(key, `Row`) for every row of one source's per-row arrays (`read_row_arrays`)."""
    names, keys, labels = list(arrays["class_names"]), arrays["paths"], arrays["labels"]
    sizes, mtimes, status, errors = arrays["file_size"], arrays["file_mtime_ns"], arrays["status"], arrays["errors"]
    extra = [n for n in ROW_DATASETS if n not in _CORE]
    for i, key in enumerate(keys):
        label = names[labels[i]] if labels[i] >= 0 else ""
        yield key, Row(source, i, label, int(sizes[i]), int(mtimes[i]), int(status[i]), errors[i],
                       {n: arrays[n][i] for n in extra})


def arrays_of(keys: list[str], ordered: list[Row], names: list[str]) -> dict[str, Any]:
    """The per-row arrays of merged rows (sorted by key), labels indexed into `names`."""
    index = {c: i for i, c in enumerate(names)}
    return row_arrays(keys, [index[r.label] if r.label else -1 for r in ordered], names,
                      status=[r.status for r in ordered], errors=[r.error for r in ordered],
                      file_size=[r.size for r in ordered], file_mtime_ns=[r.mtime_ns for r in ordered],
                      **{n: [r.extra.get(n, ROW_DEFAULTS.get(n)) for r in ordered] for n in ROW_DATASETS
                         if n not in _CORE})


@dataclass(frozen=True)
class ResumePlan:
    """What an extraction run has to do, given what the store already holds."""

    todo: list[Any]  # ImageRecords to embed
    reused: int  # images already embedded (or already failed) with the same size and mtime
    retried: int  # failed images queued again (--retry-failed)
    changed: int  # images whose size or mtime changed since they were embedded


# How rows were made. A resumed store can hold rows of several runs: each attribute lists every value once.
RUN_ATTRS = ("device", "decode", "runtime", "engine")


def run_provenance(previous: Any, current: dict[str, Any], produced: bool) -> dict[str, Any]:
    """`current` run attributes, joined with the previous store's ("onnx+torch") where both runs made rows."""
    out = dict(current)
    for key in RUN_ATTRS:
        before = str(previous.get(key, "") or "")
        if not before:
            continue
        if not produced:  # this run embedded nothing: every row is the earlier runs'
            out[key] = before
        elif current.get(key) and str(current[key]) != before:
            out[key] = "+".join(dict.fromkeys(before.split("+") + str(current[key]).split("+")))
    return out


def lock_file(path: Path) -> Path:
    """The file whose OS lock keeps a second writer of the store `path` out: `.feats.h5.embedfit-lock` beside
    `feats.h5`, hidden and named for what it is. It stays after the writer closes: deleting a lock file that
    another writer has just opened lets two writers lock two different files of one name, and a lock kept
    elsewhere (a per-machine folder) would no longer keep out a writer on another host of a shared filesystem."""
    return path.with_name(f".{path.name}.embedfit-lock")


class StoreWriter:
    """Crash-safe, resumable writer for one store; use as a context manager.

    Args:
        path: The store file.
        settings: Backbone spec, dtype, TTA and precision; rows made differently are refused.
        overwrite: Ignore (and at commit replace) whatever the store held.

    Raises:
        StoreLockedError: Another process (or another writer in this process) is writing this store.
        StoreMismatchError: The existing store or its pending parts were made with other settings.
        StoreError: The existing store is damaged (re-extract with `--overwrite`), or the folder is not writable.
    """

    def __init__(self, path: str | os.PathLike, settings: StoreSettings, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.settings = settings
        self.parts = parts_dir(self.path)
        self._lock: Any = None
        self._previous: FeatureStore | None = None
        self._seq = 0
        self._run_id = f"{time.time_ns():020d}-{os.getpid()}"
        self._acquire_lock()
        try:
            if self.path.is_dir():
                raise StoreError(f"output {self.path} is a directory; give a file name such as feats.h5")
            self._remove_stale_temp_files()
            if overwrite:
                self._remove_parts()
            # Held open until the next commit: the rows reused from it are read from the file planned from.
            self._previous = None if overwrite or not self.path.exists() else FeatureStore.open(self.path)
            if self._previous is not None:
                self._check(self._previous.settings, str(self.path))
            merged = set(json.loads(self._previous.attrs.get("merged_parts", "[]"))) if self._previous else set()
            self._stale_parts = [p for p in self._part_files() if p.name in merged]
            self._part_paths = [p for p in self._part_files() if p.name not in merged and self._part_ok(p)]
        except BaseException:
            self.close()
            raise

    # -- locking ------------------------------------------------------------------------------------
    def _acquire_lock(self) -> None:
        from filelock import FileLock, Timeout

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot write to {self.path.parent}: {why(exc)}") from None
        # filelock takes an OS lock (flock on POSIX) that dies with its holder, SIGKILL included, and closes its
        # descriptor in forked children (DataLoader workers), which would otherwise keep the lock alive after
        # the main process is killed. No soft-lock fallback: a marker file would outlive a killed writer.
        lock = FileLock(lock_file(self.path), timeout=0, thread_local=False,
                        fallback_to_soft=False, preserve_lock_file=True)
        try:
            lock.acquire()
        except Timeout:
            raise StoreLockedError(f"{self.path} is being written by another embedfit process; wait for it "
                                   "to finish (readers may open the finished store at any time)") from None
        except OSError as exc:
            raise StoreError(f"cannot write to {self.path.parent}: {why(exc)}") from None
        self._lock = lock

    def _remove_stale_temp_files(self) -> None:
        """Delete half-written files of killed runs; safe because we hold the lock, so no writer is alive."""
        stale = list(self.path.parent.glob(f".{glob.escape(self.path.name)}.*.tmp"))
        if self.parts.is_dir():
            stale += self.parts.glob(".part-*.tmp")
        for tmp in stale:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def close(self) -> None:
        """Close the previous store and release the lock. The lock file stays: deleting it could let two writers
        lock two different files of the same name (one that opened it just before the unlink, one after)."""
        if self._previous is not None:
            self._previous.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def abort(self) -> None:
        """End the run without a commit: finished parts stay, and the next run resumes from them."""
        self.close()

    def __enter__(self) -> StoreWriter:
        return self

    @property
    def previous(self) -> FeatureStore | None:
        """The store as it was before this run (None when new or overwritten)."""
        return self._previous

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- planning -----------------------------------------------------------------------------------
    def _check(self, other: StoreSettings, where: str) -> None:
        diffs = other.differences(self.settings)
        if diffs:
            raise StoreMismatchError(
                f"{where} was made with {other.spec.short()} ({'; '.join(diffs[:3])}), not "
                f"{self.settings.spec.short()}; write to another file or pass `overwrite` to start afresh"
            )

    def _part_files(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.h5")) if self.parts.is_dir() else []

    def _remove_parts(self) -> None:
        for p in self._part_files():
            p.unlink()

    def _part_ok(self, part: Path) -> bool:
        """Check a finished part in full (settings, metadata digest, every checksum); delete it if it is damaged,
        so that its images are embedded again rather than a whole resume failing."""
        quiet_hdf5()
        try:
            with h5py.File(part, "r") as f:
                settings = StoreSettings.from_attrs(f.attrs)
                verify_metadata(f, read_row_arrays(f))
                ds = f["features"]
                for i in range(0, len(ds), 4096):  # reading verifies each chunk's Fletcher-32 checksum
                    ds[i:i + 4096]
        except Exception as exc:  # truncated, bit-flipped or not HDF5 at all: h5py raises OSError, KeyError...
            log.warning("part file %s is damaged (%s); it is deleted and its images will be embedded again",
                        part, why(exc))
            with contextlib.suppress(OSError):
                part.unlink()
            return False
        self._check(settings, f"unfinished run's part {part.name}")
        return True

    def _sources(self) -> list[Path]:
        return ([self.path] if self._previous is not None else []) + self._part_paths

    def _known_rows(self) -> dict[str, Row]:
        """Latest row per key over the previous store and the parts (later sources win)."""
        gone = [p for p in self._part_paths if not p.exists()]
        for part in gone:  # deleted by hand since this run started: redo its images rather than fail
            log.warning("part file %s disappeared before it was merged; its images will be embedded again", part)
        self._part_paths = [p for p in self._part_paths if p not in gone]
        rows: dict[str, Row] = {}
        for s, source in enumerate(self._sources()):
            rows.update(rows_from(self._source_arrays(s, source), s))
        return rows

    def _source_arrays(self, s: int, source: Path) -> dict[str, Any]:
        """The per-row arrays of source `s`: the previous store's (held open since planning), or a part's."""
        if s == 0 and self._previous is not None:
            return self._previous.row_arrays
        try:
            with h5py.File(source, "r") as f:
                return read_row_arrays(f)
        except Exception as exc:
            raise StoreError(part_damaged(source, exc)) from None

    def plan(self, records: Sequence[Any], *, retry_failed: bool = False) -> ResumePlan:
        """Split the scanned records into those to embed and those the store already answers."""
        known = self._known_rows()
        todo, reused, retried, changed = [], 0, 0, 0
        for rec in records:
            row = known.get(rec.key)
            if row is None:
                todo.append(rec)
            elif (row.size, row.mtime_ns) != (rec.size, rec.mtime_ns):
                changed += 1
                todo.append(rec)
            elif row.status == FAILED and retry_failed:
                retried += 1
                todo.append(rec)
            else:
                reused += 1
        return ResumePlan(todo, reused, retried, changed)

    # -- writing ------------------------------------------------------------------------------------
    def write_part(self, keys: Sequence[str], labels: Sequence[str], sizes: Sequence[int],
                   mtimes: Sequence[int], status: Sequence[int], errors: Sequence[str],
                   features: np.ndarray, extra: dict[str, Sequence[Any]] | None = None) -> Path:
        """Write one batch of results as an atomic part file (a few hundred images each).

        `extra` holds the values of per-row datasets beyond the original six (`schema.ROW_DATASETS`), by name.
        """
        quiet_hdf5()  # usually called from a background thread
        self.parts.mkdir(parents=True, exist_ok=True)
        name = f"part-{self._run_id}-{self._seq:06d}.h5"
        self._seq += 1
        final, tmp = self.parts / name, self.parts / f".{name}.tmp"
        ensure_space(self.parts, len(keys), self.settings.spec.embedding_dim, np.dtype(self.settings.dtype).itemsize,
                     sum(len(k) for k in keys) * 2)
        arrays = part_arrays(keys, labels, sizes, mtimes, status, errors, extra)
        feats = np.asarray(features, dtype=self.settings.dtype)
        try:
            with new_file(tmp) as f:
                f.attrs.update(self.settings.attrs())
                write_row_datasets(f, arrays)
                f.create_dataset("features", data=feats, chunks=(max(1, min(CHUNK_ROWS, len(feats))), feats.shape[1]),
                                 fletcher32=True)
            os.replace(tmp, final)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if isinstance(exc, (OSError, RuntimeError)):  # h5py reports some write failures as RuntimeError
                raise StoreError(f"cannot write to {self.parts}: {why(exc)}") from None
            raise
        self._part_paths.append(final)
        return final

    def _rows_to_commit(self, records: Sequence[Any], class_names: Sequence[str], complete: bool
                        ) -> tuple[dict[str, Row], list[str], list[str], bool]:
        """The rows a commit writes: per scanned record the latest row with its size and mtime, labelled by the
        current scan (a renamed class folder or an edited CSV needs no re-embedding); rows of files no longer
        scanned kept as "missing". Returns (rows by key, sorted keys, class names, whether complete)."""
        known = self._known_rows()
        current = {rec.key: rec for rec in records}
        rows: dict[str, Row] = {}
        for key, row in known.items():
            rec = current.get(key)
            if rec is None:
                if row.status != MISSING:
                    row.status, row.error = MISSING, "file no longer present in the input"
                rows[key] = row
            elif (row.size, row.mtime_ns) == (rec.size, rec.mtime_ns):
                row.label = class_names[rec.label] if rec.label >= 0 else ""
                rows[key] = row
        complete = complete and all(key in rows for key in current)
        names = list(class_names) + sorted({r.label for r in rows.values() if r.label} - set(class_names))
        return rows, sorted(rows), names, complete

    def commit(self, records: Sequence[Any], class_names: Sequence[str], *, complete: bool,
               attrs: dict[str, Any] | None = None) -> FeatureStore:
        """Merge the previous store and all parts into a new store file, replacing the old one atomically.

        Rows for scanned records come from the latest source with a matching size and mtime; rows of
        files no longer scanned are kept with status "missing". `complete` is only honoured when every
        scanned record has a row. The new store keeps the old file's permission bits.

        Raises:
            StoreError: The new store cannot be written (nothing stored is changed), or a row to copy is damaged
                (nothing stored is changed either; a damaged store says to re-extract with `--overwrite`).
        """
        quiet_hdf5()
        rows, keys, names, complete = self._rows_to_commit(records, class_names, complete)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        ensure_space(self.path.parent, len(keys), self.settings.spec.embedding_dim,
                      np.dtype(self.settings.dtype).itemsize, sum(len(k) + len(rows[k].error) for k in keys) * 2)
        try:
            mode = stat.S_IMODE(self.path.stat().st_mode) if self.path.exists() else None
            self._write_store(tmp, keys, rows, names, complete, attrs or {})
            if mode is not None:  # os.replace puts a new inode in place: carry over e.g. a read-only 0444
                os.chmod(tmp, mode)
            os.replace(tmp, self.path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if isinstance(exc, (OSError, RuntimeError)):  # h5py reports some write failures as RuntimeError
                raise StoreError(f"cannot write {self.path}: {why(exc)}; nothing already stored was "
                                 "changed") from None
            raise
        for part in self._part_paths + self._stale_parts:  # merged: a crash before this is harmless
            with contextlib.suppress(OSError):
                part.unlink()
        with contextlib.suppress(OSError):
            self.parts.rmdir()
        shards = shards_dir(self.path)  # of a sharded store this file replaced (overwrite)
        if shards.is_dir():
            shutil.rmtree(shards, ignore_errors=True)
        self._part_paths, self._stale_parts = [], []
        if self._previous is not None:
            self._previous.close()
        self._previous = FeatureStore.open(self.path)
        return self._previous

    def _write_store(self, tmp: Path, keys: list[str], rows: dict[str, Row], names: list[str],
                     complete: bool, extra: dict[str, Any]) -> None:
        n, dim = len(keys), self.settings.spec.embedding_dim
        ordered = [rows[k] for k in keys]
        arrays = arrays_of(keys, ordered, names)
        status = arrays["status"]
        prev = self._previous.attrs if self._previous is not None else {}
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        with new_file(tmp) as f:
            f.attrs.update(self.settings.attrs())
            f.attrs.update({
                "schema_version": SCHEMA_VERSION, "embedfit_version": __version__,
                "versions": json.dumps(library_versions()), "created": prev.get("created", now), "updated": now,
                "complete": complete, "n_ok": int((status == OK).sum()), "n_failed": int((status == FAILED).sum()),
                "n_missing": int((status == MISSING).sum()), "fingerprint": fingerprint(self.settings, arrays),
                "merged_parts": json.dumps([p.name for p in self._part_paths]),
                "extract_seconds": float(prev.get("extract_seconds", 0.0)),
            })
            f.attrs.update({k: v for k, v in run_provenance(prev, extra, bool(self._part_paths)).items()
                            if v is not None})
            write_row_datasets(f, arrays)
            feats = f.create_dataset("features", shape=(n, dim), dtype=self.settings.dtype,
                                     chunks=(max(1, min(CHUNK_ROWS, n)), dim), maxshape=(None, dim),
                                     fletcher32=True)
            if os.environ.get(TEST_COMMIT_PAUSE):  # tests: hold the new store half-written, to kill the run here
                time.sleep(float(os.environ[TEST_COMMIT_PAUSE]))
            self._copy_features(feats, ordered)
            f.flush()
            os.fsync(f.id.get_vfd_handle())

    def _copy_features(self, out: h5py.Dataset, ordered: list[Row], block: int = 8192) -> None:
        """Copy each row's features from its source, one output block at a time (memory stays bounded)."""
        sources = self._sources()
        open_files: dict[int, h5py.File] = {}

        def source_file(s: int) -> h5py.File:
            if s == 0 and self._previous is not None:
                assert self._previous._file is not None
                return self._previous._file  # the file planned from, even if the path was replaced meanwhile
            if s not in open_files:
                if len(open_files) >= 64:  # parts are key-ordered, so few are needed at once
                    for f in open_files.values():
                        f.close()
                    open_files.clear()
                try:
                    open_files[s] = h5py.File(sources[s], "r")
                except Exception as exc:
                    raise StoreError(part_damaged(sources[s], exc)) from None
            return open_files[s]

        try:
            for start in range(0, len(ordered), block):
                chunk = ordered[start:start + block]
                buf = np.full((len(chunk), out.shape[1]), np.nan, dtype=out.dtype)
                by_source: dict[int, list[tuple[int, int]]] = {}
                for pos, r in enumerate(chunk):
                    by_source.setdefault(r.source, []).append((pos, r.row))
                for s, pairs in by_source.items():
                    pos = np.array([p for p, _ in pairs])
                    src = np.array([r for _, r in pairs])
                    lo, hi = src.min(), src.max()
                    f = source_file(s)
                    try:
                        buf[pos] = f["features"][lo:hi + 1][src - lo]
                    except Exception as exc:  # a checksum mismatch must not be copied into a "complete" store
                        previous = s == 0 and self._previous is not None
                        raise StoreError(damaged(self.path, "features", exc) if previous
                                         else part_damaged(sources[s], exc)) from None
                out[start:start + len(chunk)] = buf
        finally:
            for f in open_files.values():
                f.close()


def part_arrays(keys: Sequence[str], labels: Sequence[str], sizes: Sequence[int], mtimes: Sequence[int],
                status: Sequence[int], errors: Sequence[str], extra: dict[str, Sequence[Any]] | None = None
                ) -> dict[str, Any]:
    """The per-row arrays of a part or shard: its class names are the labels present, sorted."""
    classes = sorted({lb for lb in labels if lb})
    index = {c: i for i, c in enumerate(classes)}
    return row_arrays(keys, [index.get(lb, -1) for lb in labels], classes, status=status, errors=errors,
                      file_size=sizes, file_mtime_ns=mtimes, **(extra or {}))


def part_damaged(part: Path, exc: BaseException) -> str:
    """The message for a part (or shard) that cannot be read at commit."""
    return (f"cannot read part file {part} ({why(exc)}); re-run the same command: a damaged or missing part is "
            "left out and its images are embedded again")

