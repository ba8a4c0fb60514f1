"""Sharded feature stores: a small HDF5 manifest plus one HDF5 file per shard, read exactly like a single file.

Layout (``feats.h5`` is what users name; everything else sits beside it):

    feats.h5             the manifest: the store schema (`embedfit.storage.schema`) with every attribute and every
                         per-row dataset as real datasets, and `features` as an HDF5 *virtual dataset* (VDS) whose
                         rows point into the shards; attrs add layout="sharded", shard_size, shards (JSON list of
                         file names) and shard_index (per shard: rows, first and last key, metadata_sha256), which
                         the manifest's own metadata_sha256 covers
    feats.h5.shards/     shard-<run>-<seq>.h5: the part-file schema (every per-row dataset, features, the metadata
                         digest) plus provenance attributes

The pair is one unit: embedfit finds the shards beside the manifest under its *current* name (``renamed.h5`` reads
``renamed.h5.shards/``), checks each one against the manifest's shard_index when the store opens (per shard, not per
row), and reads features through its own map of the VDS (`embedfit.storage.reader.ShardedFeatures`), so a missing
shard is an error, never rows of NaN. A plain `h5py` reader goes through the VDS, whose source names are
``feats.h5.shards/<shard>`` relative to the manifest's folder: it reads the pair moved or copied together to any
folder, but after a rename only through embedfit (HDF5 would fill a missing source with NaN).

Writing: a shard is written to a local temporary file (``$EMBEDFIT_SHARD_TMP`` or the system temp dir), then copied
next to its final name and renamed, so a shard is either absent or complete, also on NFS/Lustre. Names are fixed
before the work starts (run id + sequence), so a shard written twice (a retried Ray task) replaces itself. The
driver (or the local writer thread) never touches features: `commit` reads the shards' per-row metadata only,
keeps the newest row per image key (shards in name order = time order), and writes the manifest atomically. So a
Ray driver writing to object storage commits over *metadata copies* its actors return (`metadata_copy`: the shard
without features, marked `features_elided`, which a reader refuses), not over downloaded shards.
Shards no longer referenced by the committed manifest are deleted afterwards. A resume checks the shards the
manifest names like a reader does; a missing or damaged one is left out (a damaged one deleted) and its images
are embedded again.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from h5py import h5d, h5p, h5s, h5t

from embedfit._version import __version__
from embedfit.errors import StoreError
from embedfit.storage.manifest import (
    Listing,
    ManifestResult,
    PlanCounts,
    ShardInfo,
    plan_blocks,
    shard_info,
    write_manifest,
)
from embedfit.storage.reader import FeatureStore, shard_problem
from embedfit.storage.schema import (
    CHUNK_ROWS,
    FEATURES_ELIDED,
    LAYOUT,
    SCHEMA_VERSION,
    StoreSettings,
    attr,
    ensure_space,
    library_versions,
    quiet_hdf5,
    shards_dir,
    write_row_datasets,
)
from embedfit.storage.writer import ResumePlan, StoreWriter, part_arrays, run_provenance

SHARD_TMP_ENV = "EMBEDFIT_SHARD_TMP"  # local scratch for shards being written (default: the system temp dir)
log = logging.getLogger("embedfit")

def shard_size_of(path: str | os.PathLike) -> int | None:
    """The shard size of the sharded store at `path`, also one killed before its first manifest; None for a
    single-file store, or when there is none."""
    try:
        with h5py.File(path, "r") as f:
            return int(f.attrs["shard_size"]) if attr(f.attrs, "layout") == LAYOUT else None
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError):
        return None
    folder = shards_dir(path)
    for shard in sorted(folder.glob("shard-*.h5"), reverse=True) if folder.is_dir() else []:
        with contextlib.suppress(OSError, ValueError, KeyError), h5py.File(shard, "r") as f:
            return int(f.attrs["shard_size"])
    return None


@functools.lru_cache(maxsize=1)
def _versions() -> str:
    return json.dumps(library_versions())


def write_shard(directory: str | os.PathLike, name: str, settings: StoreSettings, keys: Sequence[str],
                labels: Sequence[str], sizes: Sequence[int], mtimes: Sequence[int], status: Sequence[int],
                errors: Sequence[str], features: np.ndarray, provenance: dict[str, Any] | None = None,
                extra: dict[str, Sequence[Any]] | None = None) -> Path:
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
        extra: Values of per-row datasets beyond the original six (`schema.ROW_DATASETS`), by name.

    Returns:
        The shard's final path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / name
    dim = settings.spec.embedding_dim
    ensure_space(directory, len(keys), dim, np.dtype(settings.dtype).itemsize, sum(len(k) for k in keys) * 2)
    scratch = os.environ.get(SHARD_TMP_ENV) or tempfile.gettempdir()
    fd, local = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=scratch)
    os.close(fd)
    tmp = directory / f".{name}.{os.getpid()}.tmp"
    arrays = part_arrays(keys, labels, sizes, mtimes, status, errors, extra)
    try:
        with h5py.File(local, "w") as f:
            f.attrs.update(settings.attrs())
            f.attrs.update({"schema_version": SCHEMA_VERSION, "embedfit_version": __version__,
                            "versions": _versions(), "created": _now(), "host": os.uname().nodename})
            f.attrs.update({k: str(v) for k, v in (provenance or {}).items() if v is not None})
            write_row_datasets(f, arrays)  # checksummed like a single-file store, with the metadata digest
            feats = np.asarray(features, dtype=settings.dtype).reshape(len(keys), dim)
            f.create_dataset("features", data=feats, chunks=(max(1, min(CHUNK_ROWS, len(keys))), dim) if len(keys)
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


def metadata_copy(shard: str | os.PathLike) -> bytes:
    """The bytes of a copy of the shard at `shard` without its features: what a driver needs to commit it.

    Every attribute and every per-row dataset is copied as it is (so the metadata digest, and the manifest's record
    of the shard, are the same), and `features` is created with the same shape, type, chunking and filters but no
    chunk written: HDF5 allocates nothing for it, so the copy is the size of the metadata (~250 kB for 1024 rows
    with content hashes, where their features are 5.2 MB at 1280 float32 dimensions).
    The copy is marked (`FEATURES_ELIDED`): a reader refuses its features (`reader.shard_problem`) and the upload
    of a staged store refuses to put it in the shard's place (`objects._put_shards`).
    """
    buffer = io.BytesIO()
    with h5py.File(shard, "r") as f, h5py.File(buffer, "w") as out:
        for key in f.attrs:  # in their stored types (`attrs[k] = v` would pick its own)
            out.attrs.create(key, f.attrs[key], dtype=f.attrs.get_id(key).dtype)
        out.attrs[FEATURES_ELIDED] = 1
        for name in f:
            if name != "features":
                f.copy(f[name], out, name=name)
        feats = f["features"].id
        # Its creation property list carries the chunking, filters and fill value; nothing is written to it.
        h5d.create(out.id, b"features", feats.get_type(), feats.get_space(), dcpl=feats.get_create_plist())
    return buffer.getvalue()


def place_metadata_copy(directory: str | os.PathLike, name: str, data: bytes) -> Path:
    """Write a shard's metadata copy (`metadata_copy`, from the worker that wrote and uploaded the shard) into a
    driver's local shards folder as shard `name`, whole or not at all, for the commit to read.

    Raises:
        StoreError: `data` is not a marked metadata copy (a complete shard must come from the remote store).
    """
    with h5py.File(io.BytesIO(data), "r") as f:
        if not attr(f.attrs, FEATURES_ELIDED, 0):
            raise StoreError(f"the report of shard {name} holds a file that is not a metadata copy")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{name}.{os.getpid()}.tmp"  # a killed driver's is removed by the next writer
    tmp.write_bytes(data)
    os.replace(tmp, directory / name)
    return directory / name


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
        self.path = Path(path)
        self.settings = settings
        self.parts = shards_dir(self.path)
        self.shard_size = shard_size
        self.provenance: dict[str, Any] = {}  # written into each shard this writer writes
        self._lock: Any = None
        self._previous: FeatureStore | None = None
        self._committed: dict[str, Any] = {}  # the attributes of this writer's last manifest
        self._planned: dict[str, ShardInfo] = {}  # key ranges of this run's shards (`written`)
        self._seq = 0
        self._run_id = f"{time.time_ns():020d}-{os.getpid()}"
        self._overwrite = overwrite
        self._part_paths, self._stale_parts = [], []
        self._acquire_lock()
        try:
            if self.path.is_dir():
                raise StoreError(f"output {self.path} is a directory; give a file name such as feats.h5")
            self._remove_stale_temp_files()
            # The manifest alone: its shards are checked below, where a bad one is repaired rather than fatal.
            self._previous = (None if overwrite or not self.path.exists()
                              else FeatureStore.open(self.path, check_shards=False))
            if self._previous is not None and self._previous.attrs.get("layout") != LAYOUT:
                raise StoreError(f"{self.path} is a single-file store; resume it without `shard_size` (or with "
                                 "the local engine), or pass `overwrite` to rebuild it as a sharded store")
            if self._previous is not None:
                self._check(self._previous.settings, str(self.path))
                self._drop_bad_shards(json.loads(self._previous.attrs.get("shard_index") or "{}"))
            for shard in self._sources():
                with h5py.File(shard, "r") as f:
                    self._check(StoreSettings.from_attrs(f.attrs), f"shard {shard.name}")
        except BaseException:
            self.close()
            raise

    def _drop_bad_shards(self, index: dict[str, dict[str, Any]]) -> None:
        """Leave out the shards that are missing, unreadable or not the ones the manifest recorded (deleting the
        files), so that their images are embedded again, as a killed run's damaged part would be. Shards written
        after the manifest (a killed run's) only need to open."""
        for shard in self._sources():
            problem = shard_problem(shard, index.get(shard.name))
            if problem:
                log.warning("shard %s %s; it is deleted and its images will be embedded again", shard, problem)
                with contextlib.suppress(OSError):
                    shard.unlink()
        lost = [n for n in index if not (self.parts / n).is_file()]
        if lost:
            log.warning("%d shard(s) of %s are missing (first: %s); their images will be embedded again",
                        len(lost), self.path, lost[0])

    @property
    def run_id(self) -> str:
        """Prefix of this run's shard names (`shard_name`)."""
        return self._run_id

    def shard_name(self, seq: int) -> str:
        """The fixed name of this run's shard number `seq`."""
        return f"shard-{self._run_id}-{seq:06d}.h5"

    def _remove_stale_temp_files(self) -> None:
        super()._remove_stale_temp_files()
        # Half-copied shards of killed runs (we hold the lock: no writer lives). Half-written listings are the Ray
        # engine's to remove (`parts.remove_listings`): a run's workers may be writing its own before this lock.
        if self.parts.is_dir():
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
                   features: np.ndarray, extra: dict[str, Sequence[Any]] | None = None) -> Path:
        """Write one batch of results as the run's next shard."""
        name = self.shard_name(self._seq)
        self._seq += 1
        return write_shard(self.parts, name, self.settings, keys, labels, sizes, mtimes, status, errors, features,
                           {**self.provenance, "shard_size": self.shard_size}, extra)

    def plan(self, records: Sequence[Any] | Listing, *, retry_failed: bool = False) -> ResumePlan:
        """Split the scanned records into those to embed and those the store already answers, streamed over the
        shards (`embedfit.storage.manifest.plan_blocks`): no table of every stored row."""
        listing = records if isinstance(records, Listing) else Listing.of(records)
        counts = PlanCounts()
        todo = [r for block in plan_blocks(listing, self._sources(), self._index_infos(), counts,
                                           retry_failed=retry_failed) for r in block.items]
        return ResumePlan(todo, counts.reused, counts.retried, counts.changed)

    def source_infos(self) -> list[tuple[Path, ShardInfo]]:
        """Every shard that may hold rows, oldest first, with its `ShardInfo` (from the manifest's index, else read
        from the shard: a killed run's): what a worker needs to plan a part of the input against the store."""
        infos = self._index_infos()
        return [(s, infos.get(s.name) or shard_info(s)) for s in self._sources()]

    def written(self, name: str, rows: int, first: str, last: str) -> None:
        """Record the key range of a shard a worker wrote (its report), so that the commit orders the shards
        without opening each first; the commit checks it against the shard when it reads it."""
        self._planned[name] = ShardInfo(rows, first, last, "")

    def check_settings(self, settings: StoreSettings, where: str) -> None:
        """Refuse `settings` (e.g. the model the workers loaded) unless they are this store's.

        Raises:
            StoreMismatchError: Naming `where` and the differences.
        """
        self._check(settings, where)

    def _index_infos(self) -> dict[str, ShardInfo]:
        """First and last keys (and more) of the shards the previous manifest recorded."""
        index = json.loads(self._previous.attrs.get("shard_index") or "{}") if self._previous is not None else {}
        return {**self._planned, **{name: ShardInfo(**entry) for name, entry in index.items()}}

    def commit(self, records: Sequence[Any], class_names: Sequence[str], *, complete: bool,
               attrs: dict[str, Any] | None = None) -> FeatureStore:
        """Write the manifest over every shard (newest row per key), replacing the old one atomically.

        The same rules as `StoreWriter.commit`: rows of scanned records come from the newest shard with a matching
        size and mtime; rows of files no longer scanned stay with status "missing"; `complete` is only honoured
        when every scanned record has a row. Shards no row points to any more are deleted afterwards.
        """
        self.commit_listing(Listing.of(records, class_names), complete=complete, attrs=attrs)
        self._previous = FeatureStore.open(self.path)
        return self._previous

    def commit_listing(self, listing: Listing, *, complete: bool, attrs: dict[str, Any] | None = None
                       ) -> ManifestResult:
        """`commit` for a driver: the listing streamed (`Listing`), the manifest written as a streamed merge of
        the shards' rows (`embedfit.storage.manifest`), and only counts returned (the store is not read back)."""
        quiet_hdf5()
        sources = self._sources()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        ensure_space(self.path.parent, sum(i.rows for i in self._index_infos().values()) + 1, 0, 0, 1 << 20)
        produced = any(s.name.startswith(f"shard-{self._run_id}-") for s in sources)
        try:
            result = self._write_manifest(tmp, listing, complete, attrs or {}, sources, produced)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except (OSError, RuntimeError) as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StoreError(f"cannot write {self.path}: {getattr(exc, 'strerror', None) or exc}; nothing "
                             "already stored was changed") from None
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        keep = {sources[i].name for i in result.used}
        for shard in (sorted(self.parts.glob("shard-*.h5")) if self.parts.is_dir() else []):
            if shard.name not in keep:  # superseded, or from before --overwrite: the manifest no longer needs it
                with contextlib.suppress(OSError):
                    shard.unlink()
        self._overwrite = False  # the committed manifest is now the store every later commit builds on
        if self._previous is not None:
            self._previous.close()
        self._previous = None
        self._committed = result.attrs
        return result

    def _write_manifest(self, tmp: Path, listing: Listing, complete: bool, extra: dict[str, Any],
                        sources: list[Path], produced: bool) -> ManifestResult:
        """Write the manifest file, streamed; the result says which `sources` it references."""
        dim = self.settings.spec.embedding_dim
        prev = self._previous.attrs if self._previous is not None else self._committed
        now = _now()
        infos = self._index_infos()
        # No chunk cache: every dataset is written once, block by block, and read back once for the digest, so a
        # cache (1 MiB per dataset by default) only held ~9 MB more at 2M rows.
        with h5py.File(tmp, "w", rdcc_nbytes=0) as f:
            result, hashes, runs = write_manifest(f, listing, sources, infos, self.settings.spec.to_json(), complete)
            shard_index = json.dumps({sources[s].name: infos[sources[s].name].entry() for s in result.used})
            digest = hashes["digest"]
            digest.update(shard_index.encode())
            f.attrs.update(self.settings.attrs())
            result.attrs = {
                "schema_version": SCHEMA_VERSION, "embedfit_version": __version__,
                "versions": _versions(), "created": prev.get("created", now), "updated": now,
                "complete": result.complete, "n_ok": result.n_ok, "n_failed": result.n_failed,
                "n_missing": result.n_missing, "fingerprint": hashes["fingerprint"],
                "merged_parts": "[]", "extract_seconds": float(prev.get("extract_seconds", 0.0)),
                "layout": LAYOUT, "shard_size": int(self.shard_size),
                "shards": json.dumps([sources[i].name for i in result.used]), "shard_index": shard_index,
                "metadata_sha256": digest.hexdigest(),
                **{k: v for k, v in run_provenance(prev, extra, produced).items() if v is not None},
            }
            f.attrs.update(result.attrs)
            if not result.rows:  # HDF5 has no empty virtual dataset
                f.create_dataset("features", shape=(0, dim), dtype=self.settings.dtype, maxshape=(None, dim))
                return result
            # Rows are sorted by key; consecutive rows of one shard become one mapping (a fresh run's shards hold
            # consecutive key ranges, so that is one mapping per shard). What `create_virtual_dataset` makes, built
            # with h5py's low-level calls: its `VirtualSource` slices deep-copy themselves, per mapping.
            dcpl = h5p.create(h5p.DATASET_CREATE)
            dcpl.set_layout(h5d.VIRTUAL)
            dcpl.set_fill_value(np.array([np.nan]))
            vspace = h5s.create_simple((result.rows, dim))
            # HDF5 holds each mapping's two selections (~3 KB per hyperslab, sized for 32 dimensions) in this
            # property list and in three more copies while it creates the dataset: no source dataspace is kept per
            # shard besides (1,954 more hyperslabs at 2M rows in shards of 1024), and a mapping over a whole shard
            # (every mapping of a fresh run) selects "all" of it, which holds no hyperslab (~24 MB less at 2M rows).
            # HDF5 stores "all" without the source's extent; readers take its rows from the virtual selection
            # (`ShardedFeatures`).
            for s, first, out, length in runs:
                vspace.select_hyperslab((out, 0), (length, dim))
                src = h5s.create_simple(result.shapes[s])
                if first == 0 and length == result.shapes[s][0]:
                    src.select_all()
                else:  # part of a shard: a resumed run's newer shard replaced some of its rows
                    src.select_hyperslab((first, 0), (length, dim))
                # Relative to the manifest's folder, for plain h5py readers of the pair moved together
                # (embedfit itself resolves shards beside the manifest under its current name).
                dcpl.set_virtual(vspace, os.fsencode(f"{self.parts.name}/{sources[s].name}"), b"features", src)
            h5d.create(f.id, b"features", h5t.py_create(np.dtype(self.settings.dtype), logical=1),
                       h5s.create_simple((result.rows, dim)), dcpl=dcpl)
        return result
