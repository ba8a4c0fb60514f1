"""Sharded feature stores: a small HDF5 manifest plus one HDF5 file per shard, read exactly like a single file.

Layout (``feats.h5`` is what users name; everything else sits beside it):

    feats.h5             the manifest: the store schema of `embedfit.store` with every attribute and every per-row
                         dataset (paths, labels, status, ...) as real datasets, and `features` as an HDF5 *virtual
                         dataset* (VDS) whose rows point into the shards; attrs add layout="sharded", shards (JSON
                         list of file names), shard_size
    feats.h5.shards/     shard-<run>-<seq>.h5: the part-file schema of `embedfit.store` (paths, class_names, labels,
                         file_size, file_mtime_ns, status, errors, features) plus provenance attributes

Why virtual datasets rather than a reader over shards: every reader in embedfit (`FeatureStore`, so `info`, `fit`
in memory and out of core, `predict`, `report`, the notebook, `EmbeddingTransformer`) and any plain `h5py` user
reads ``f["features"][a:b]`` from the manifest and gets rows from the shards, sorted by path like a single file,
with no code of ours in the read path. HDF5 resolves the shard names relative to the manifest's folder, so the
store moves as one folder pair. The costs: HDF5 fills rows of a missing shard silently with the fill value (so
`FeatureStore.open` checks every shard exists, `check_shards`), and a read spanning many shards opens each file
(cheap: HDF5 keeps them open for the life of the manifest handle).

Writing: a shard is written to a local temporary file (``$EMBEDFIT_SHARD_TMP`` or the system temp dir), then copied
next to its final name and renamed, so a shard is either absent or complete, also on NFS/Lustre. Names are fixed
before the work starts (run id + sequence), so a shard written twice (a retried Ray task) replaces itself. The
driver (or the local writer thread) never touches features: `commit` reads the shards' per-row metadata only,
keeps the newest row per image key (shards in name order = time order), and writes the manifest atomically.
Shards no longer referenced by the committed manifest are deleted afterwards.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from embedfit._version import __version__
from embedfit.errors import StoreError
from embedfit.store import (
    _CHUNK_ROWS,
    _STR,
    FAILED,
    MISSING,
    OK,
    SCHEMA_VERSION,
    FeatureStore,
    StoreSettings,
    StoreWriter,
    _attr,
    _create,
    _ensure_space,
    _Row,
    _run_provenance,
    content_hashes,
    library_versions,
)

LAYOUT = "sharded"
SHARD_TMP_ENV = "EMBEDFIT_SHARD_TMP"  # local scratch for shards being written (default: the system temp dir)


def shards_dir(path: str | os.PathLike) -> Path:
    """The folder beside a store that holds its shards: ``feats.h5`` -> ``feats.h5.shards``."""
    path = Path(path)
    return path.with_name(path.name + ".shards")


def shard_size_of(path: str | os.PathLike) -> int | None:
    """The shard size of the sharded store at `path`, also one killed before its first manifest; None for a
    single-file store, or when there is none."""
    try:
        with h5py.File(path, "r") as f:
            return int(f.attrs["shard_size"]) if _attr(f.attrs, "layout") == LAYOUT else None
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError):
        return None
    folder = shards_dir(path)
    for shard in sorted(folder.glob("shard-*.h5"), reverse=True) if folder.is_dir() else []:
        with contextlib.suppress(OSError, ValueError, KeyError), h5py.File(shard, "r") as f:
            return int(f.attrs["shard_size"])
    return None


def check_shards(path: Path, attrs: dict[str, Any]) -> None:
    """Refuse a manifest whose shards are not all there: HDF5 would read a missing shard's rows as NaN."""
    folder = shards_dir(path)
    missing = [n for n in json.loads(attrs.get("shards", "[]")) if not (folder / n).is_file()]
    if missing:
        raise StoreError(f"sharded store {path} is missing {len(missing)} shard file(s) in {folder} (first: "
                         f"{missing[0]}); copy the whole {folder.name} folder with the store, or rebuild it with "
                         "`embedfit extract ... --overwrite`")


@functools.lru_cache(maxsize=1)
def _versions() -> str:
    return json.dumps(library_versions())


def write_shard(directory: str | os.PathLike, name: str, settings: StoreSettings, keys: Sequence[str],
                labels: Sequence[str], sizes: Sequence[int], mtimes: Sequence[int], status: Sequence[int],
                errors: Sequence[str], features: np.ndarray, provenance: dict[str, Any] | None = None,
                content_hash: Sequence[str] | None = None) -> Path:
    """Write one finished shard: locally first, then moved whole into `directory` (absent or complete, never half).

    Runs wherever the rows were embedded (a Ray worker, or the local writer thread); needs no lock, because the
    name is this shard's alone and a second write of the same shard replaces it with the same rows.

    Args:
        directory: The store's shards folder (`shards_dir`).
        name: File name, ``shard-<run>-<seq>.h5``.
        settings: What the features are; written as attributes, checked when the store is resumed.
        keys: Image keys (paths relative to the input root), one per row.
        labels: Class name per row ("" when unlabeled).
        sizes: File size per row (resume key).
        mtimes: File mtime in ns per row (resume key).
        status: OK or FAILED per row.
        errors: Why each image failed ("" when ok).
        features: (rows, D) embeddings, NaN rows for failures.
        provenance: How the rows were made (device, runtime, decode, engine, host).
        content_hash: SHA-256 of each image file's bytes ("" when unknown).

    Returns:
        The shard's final path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / name
    dim = settings.spec.embedding_dim
    _ensure_space(directory, len(keys), dim, np.dtype(settings.dtype).itemsize, sum(len(k) for k in keys) * 2)
    scratch = os.environ.get(SHARD_TMP_ENV) or tempfile.gettempdir()
    fd, local = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=scratch)
    os.close(fd)
    tmp = directory / f".{name}.{os.getpid()}.tmp"
    classes = sorted({lb for lb in labels if lb})
    index = {c: i for i, c in enumerate(classes)}
    try:
        with h5py.File(local, "w") as f:
            f.attrs.update(settings.attrs())
            f.attrs.update({"schema_version": SCHEMA_VERSION, "embedfit_version": __version__,
                            "versions": _versions(), "created": _now(), "host": os.uname().nodename})
            f.attrs.update({k: str(v) for k, v in (provenance or {}).items() if v is not None})
            # Checksummed like a single-file store (Fletcher-32 on every numeric dataset, per chunk).
            _create(f, "paths", np.array(list(keys), dtype=_STR))
            _create(f, "class_names", np.array(classes, dtype=_STR))
            _create(f, "labels", np.array([index.get(lb, -1) for lb in labels], dtype=np.int64))
            _create(f, "file_size", np.asarray(sizes, dtype=np.int64))
            _create(f, "file_mtime_ns", np.asarray(mtimes, dtype=np.int64))
            _create(f, "status", np.asarray(status, dtype=np.uint8))
            _create(f, "errors", np.array(list(errors), dtype=_STR))
            _create(f, "content_hash", content_hashes(content_hash, len(keys)))
            feats = np.asarray(features, dtype=settings.dtype).reshape(len(keys), dim)
            f.create_dataset("features", data=feats, chunks=(max(1, min(_CHUNK_ROWS, len(keys))), dim) if len(keys)
                             else None, fletcher32=bool(len(keys)))
        # Copy under a temporary name beside the target, then rename: atomic on the shared filesystem too.
        shutil.copyfile(local, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except (OSError, RuntimeError) as exc:  # h5py reports some write failures as RuntimeError
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StoreError(f"cannot write shard {final}: {getattr(exc, 'strerror', None) or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(local)
    return final


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class ShardedStoreWriter(StoreWriter):
    """`StoreWriter` for a sharded store: same lock, resume plan and commit contract; parts are shards and stay.

    `write_part` writes a shard (`write_shard`); shards written elsewhere (Ray workers) need nothing more than to
    be in `shards_dir` under a name starting with `run_id` before `commit`. `commit` writes the manifest.

    Args:
        path: The manifest file (what users call the store).
        settings: Backbone spec, dtype, TTA and precision; shards made otherwise are refused.
        overwrite: Ignore every existing shard; they are deleted once the new manifest is committed.
        shard_size: Images per shard, recorded in the manifest (a resumed run keeps it).

    Raises:
        StoreLockedError: Another process is writing this store.
        StoreMismatchError: Existing shards were made with other settings.
        StoreError: `path` is a single-file store (resume it without shards, or start afresh with `overwrite`).
    """

    def __init__(self, path: str | os.PathLike, settings: StoreSettings, *, overwrite: bool = False,
                 shard_size: int = 4096) -> None:
        import time

        self.path = Path(path)
        self.settings = settings
        self.parts = shards_dir(self.path)
        self.shard_size = shard_size
        self.provenance: dict[str, Any] = {}  # written into each shard this writer writes
        self._lock_file: Any = None
        self._seq = 0
        self._run_id = f"{time.time_ns():020d}-{os.getpid()}"
        self._overwrite = overwrite
        self._acquire_lock()
        try:
            if self.path.is_dir():
                raise StoreError(f"output {self.path} is a directory; give a file name such as feats.h5")
            self._remove_stale_temp_files()
            self._previous = None if overwrite or not self.path.exists() else FeatureStore.open(self.path)
            if self._previous is not None and self._previous.attrs.get("layout") != LAYOUT:
                raise StoreError(f"{self.path} is a single-file store; resume it without `shard_size` (or with "
                                 "the local engine), or pass `overwrite` to rebuild it as a sharded store")
            if self._previous is not None:
                self._check(self._previous.settings, str(self.path))
            self._part_paths, self._stale_parts = [], []
            for shard in self._sources():
                with h5py.File(shard, "r") as f:
                    self._check(StoreSettings.from_attrs(f.attrs), f"shard {shard.name}")
        except BaseException:
            self.close()
            raise

    @property
    def run_id(self) -> str:
        """Prefix of this run's shard names (`shard_name`)."""
        return self._run_id

    def shard_name(self, seq: int) -> str:
        """The fixed name of this run's shard number `seq`."""
        return f"shard-{self._run_id}-{seq:06d}.h5"

    def _remove_stale_temp_files(self) -> None:
        super()._remove_stale_temp_files()
        if self.parts.is_dir():  # half-copied shards of killed runs (we hold the lock, so no writer is alive)
            for tmp in self.parts.glob(".shard-*.tmp"):
                with contextlib.suppress(OSError):
                    tmp.unlink()

    def _sources(self) -> list[Path]:
        """Every shard that may hold rows, oldest first (names sort by time); with overwrite, this run's only."""
        shards = sorted(self.parts.glob("shard-*.h5")) if self.parts.is_dir() else []
        if self._overwrite:
            shards = [s for s in shards if s.name.startswith(f"shard-{self._run_id}-")]
        return shards

    def write_part(self, keys: Sequence[str], labels: Sequence[str], sizes: Sequence[int],
                   mtimes: Sequence[int], status: Sequence[int], errors: Sequence[str],
                   features: np.ndarray, content_hash: Sequence[str] | None = None) -> Path:
        """Write one batch of results as the run's next shard."""
        name = self.shard_name(self._seq)
        self._seq += 1
        return write_shard(self.parts, name, self.settings, keys, labels, sizes, mtimes, status, errors, features,
                           {**self.provenance, "shard_size": self.shard_size}, content_hash)

    def commit(self, records: Sequence[Any], class_names: Sequence[str], *, complete: bool,
               attrs: dict[str, Any] | None = None) -> FeatureStore:
        """Write the manifest over every shard (newest row per key), replacing the old one atomically.

        The same rules as `StoreWriter.commit`: rows of scanned records come from the newest shard with a matching
        size and mtime; rows of files no longer scanned stay with status "missing"; `complete` is only honoured
        when every scanned record has a row. Shards no row points to any more are deleted afterwards.
        """
        sources = self._sources()
        rows, keys, names, complete = self._rows_to_commit(records, class_names, complete)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        _ensure_space(self.path.parent, len(keys), 0, 0, sum(len(k) + len(rows[k].error) for k in keys) * 2)
        produced = any(s.name.startswith(f"shard-{self._run_id}-") for s in sources)
        try:
            used = self._write_manifest(tmp, keys, rows, names, complete, attrs or {}, sources, produced)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except (OSError, RuntimeError) as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StoreError(f"cannot write {self.path}: {getattr(exc, 'strerror', None) or exc}; nothing "
                             "already stored was changed") from None
        keep = {sources[i].name for i in used}
        for shard in (sorted(self.parts.glob("shard-*.h5")) if self.parts.is_dir() else []):
            if shard.name not in keep:  # superseded, or from before --overwrite: the manifest no longer needs it
                with contextlib.suppress(OSError):
                    shard.unlink()
        self._overwrite = False  # the committed manifest is now the store every later commit builds on
        self._previous = FeatureStore.open(self.path)
        return self._previous

    def _write_manifest(self, tmp: Path, keys: list[str], rows: dict[str, _Row], names: list[str], complete: bool,
                        extra: dict[str, Any], sources: list[Path], produced: bool) -> list[int]:
        """Write the manifest file; return the indices (into `sources`) of the shards it references."""
        n, dim = len(keys), self.settings.spec.embedding_dim
        index = {c: i for i, c in enumerate(names)}
        ordered = [rows[k] for k in keys]
        status = np.array([r.status for r in ordered], dtype=np.uint8)
        labels = np.array([index[r.label] if r.label else -1 for r in ordered], dtype=np.int64)
        sizes = np.array([r.size for r in ordered], dtype=np.int64)
        mtimes = np.array([r.mtime_ns for r in ordered], dtype=np.int64)
        prev = self._previous.attrs if self._previous is not None else {}
        now = _now()
        fingerprint = hashlib.sha256()
        for part in (self.settings.spec.to_json(), "\n".join(keys), labels.tobytes(), status.tobytes(),
                     sizes.tobytes(), mtimes.tobytes()):
            fingerprint.update(part.encode() if isinstance(part, str) else part)
        used = sorted({r.source for r in ordered})
        # Rows are sorted by key; consecutive rows of one shard in shard order become one VDS mapping (a fresh
        # run's shards hold contiguous key ranges, so that is one mapping per shard).
        runs: list[tuple[int, int, int, int]] = []  # (source, first shard row, first output row, length)
        for i, r in enumerate(ordered):
            last = runs[-1] if runs else None
            if last and last[0] == r.source and last[1] + last[3] == r.row:  # rows are consecutive in the output
                runs[-1] = (*last[:3], last[3] + 1)
            else:
                runs.append((r.source, r.row, i, 1))
        with h5py.File(tmp, "w") as f:
            f.attrs.update(self.settings.attrs())
            f.attrs.update({
                "schema_version": SCHEMA_VERSION, "embedfit_version": __version__,
                "versions": _versions(), "created": prev.get("created", now), "updated": now,
                "complete": complete, "n_ok": int((status == OK).sum()), "n_failed": int((status == FAILED).sum()),
                "n_missing": int((status == MISSING).sum()), "fingerprint": fingerprint.hexdigest(),
                "merged_parts": "[]", "extract_seconds": float(prev.get("extract_seconds", 0.0)),
                "layout": LAYOUT, "shard_size": int(self.shard_size),
                "shards": json.dumps([sources[i].name for i in used]),
            })
            f.attrs.update({k: v for k, v in _run_provenance(prev, extra, produced).items() if v is not None})
            _create(f, "paths", np.array(keys, dtype=_STR))
            _create(f, "labels", labels)
            _create(f, "class_names", np.array(names, dtype=_STR))
            _create(f, "status", status)
            _create(f, "errors", np.array([r.error for r in ordered], dtype=_STR))
            _create(f, "file_size", sizes)
            _create(f, "file_mtime_ns", mtimes)
            _create(f, "content_hash", content_hashes([r.content_hash for r in ordered], n))
            if not n:  # HDF5 has no empty virtual dataset
                f.create_dataset("features", shape=(0, dim), dtype=self.settings.dtype, maxshape=(None, dim))
                return used
            layout = h5py.VirtualLayout(shape=(n, dim), dtype=self.settings.dtype)
            vsources: dict[int, h5py.VirtualSource] = {}
            for s, first, out, length in runs:
                if s not in vsources:
                    with h5py.File(sources[s], "r") as shard:
                        shape = shard["features"].shape
                    # Relative to the manifest's folder: HDF5 looks there first, so the pair can be moved.
                    vsources[s] = h5py.VirtualSource(f"{self.parts.name}/{sources[s].name}", "features", shape=shape)
                layout[out:out + length] = vsources[s][first:first + length]
            f.create_virtual_dataset("features", layout, fillvalue=np.nan)
        return used

