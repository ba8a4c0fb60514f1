"""The reader: one `FeatureStore.open()` for every store, local or on object storage, one file, sharded, or a
collection of stores (`StoreCollection`; the format and its rules: `embedfit.storage.collection`).

`FeatureStore.open(path)` dispatches: a URL is read through a local copy (`embedfit.storage.objects`, downloaded
again once if the cached copy does not match what was recorded); a sharded store's manifest is checked against its
shards, at a cost per shard, not per row (each shard present under the manifest's *current* name, with the
metadata digest, row count and first and last key recorded at commit). `FeatureStore.verify()` is the full check
(every key, every checksum). Features of a sharded store are read through embedfit's own map of the manifest's
virtual dataset, from the shards beside the manifest as it is named now: reading NaN for a missing shard is
impossible here, and a renamed or copied pair reads the same features.

Readers never need the writer's lock: a `FeatureStore` holds its file open, so a store replaced by a concurrent
`extract` keeps serving the rows its metadata describes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from embedfit.backbones.spec import BackboneSpec
from embedfit.errors import EmbedfitError, StoreError, StoreMismatchError
from embedfit.storage.schema import (
    FAILED,
    FEATURES_ELIDED,
    LAYOUT,
    MISSING,
    OK,
    SCHEMA_VERSION,
    STATUS_NAMES,
    StoreSettings,
    attr,
    check_mixable,
    damaged,
    metadata_digest,
    quiet_hdf5,
    read_row_arrays,
    read_str,
    shard_names,
    shards_dir,
    verify_metadata,
    why,
)


def _read_rows(ds: h5py.Dataset, rows: Sequence[int] | np.ndarray | slice | None, dtype: Any,
               chunk_rows: int) -> np.ndarray:
    if rows is None or isinstance(rows, slice):
        sel = range(len(ds))[rows or slice(None)]
        out = np.empty((len(sel), ds.shape[1]), dtype=dtype)
        for i in range(0, len(sel), chunk_rows):
            part = sel[i:i + chunk_rows]
            out[i:i + len(part)] = ds[part.start:part.stop:part.step] if len(part) else 0
        return out
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), ds.shape[1]), dtype=dtype)
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    for i in range(0, len(rows), chunk_rows):
        idx = sorted_rows[i:i + chunk_rows]
        block = ds[idx[0]:idx[-1] + 1]
        out[order[i:i + chunk_rows]] = block[idx - idx[0]]
    return out


class FeatureStore:
    """Read access to a finished store: metadata in memory, features read in chunks on demand.

    The store file stays open from `open()` to `close()`, so every read comes from the file the metadata was read
    from, even if an `extract` replaces the store meanwhile (the replaced file stays readable while open). Use it as
    a context manager, or call `close()`; a store that is simply dropped is closed when it is garbage-collected.

    Example:
        >>> with FeatureStore.open("feats.h5") as store:            # doctest: +SKIP
        ...     X, y = store.features(store.ok_rows()), store.labels[store.ok_rows()]
    """

    def __init__(self, path: Path, attrs: dict[str, Any], arrays: dict[str, np.ndarray],
                 file: h5py.File | None = None) -> None:
        self.path = path
        self.attrs = attrs
        self.settings = StoreSettings.from_attrs(attrs)
        self.spec: BackboneSpec = self.settings.spec
        self.paths: np.ndarray = arrays["paths"]
        self.labels: np.ndarray = arrays["labels"]
        self.class_names: list[str] = list(arrays["class_names"])
        self.status: np.ndarray = arrays["status"]
        self.errors: np.ndarray = arrays["errors"]
        self.file_size: np.ndarray = arrays["file_size"]
        self.file_mtime_ns: np.ndarray = arrays["file_mtime_ns"]
        self.dim = int(arrays["dim"])
        self.row_arrays: dict[str, np.ndarray] = {k: v for k, v in arrays.items() if k != "dim"}  # every dataset
        self.url = ""  # the URL a store on object storage was opened from (`path` is then the local copy)
        self._file = file
        self._shards: ShardedFeatures | None = None

    @classmethod
    def open(cls, path: str | os.PathLike, *, check_shards: bool = True) -> FeatureStore:
        """Open a store for reading, wherever it is and however it is laid out; it stays open until `close()`.

        Args:
            path: A local path or a URL on object storage; a ``.json`` file is a collection of stores, read as
                one (`embedfit.storage.collection.StoreCollection`).
            check_shards: Check a sharded store's shards (per shard: present, digest, rows, key range). False opens
                the manifest alone, for a resume that repairs them; reading features still refuses a bad shard.

        Raises:
            StoreError: The file is missing, not an embedfit store, damaged, an interrupted extraction that never
                committed (with how to resume), or a sharded store whose shards are missing or do not belong; a
                collection with a member missing, changed or swapped since it was collected.
        """
        if is_collection(path):  # a store of stores (`embedfit.storage.collection`)
            return open_collection(path, check_shards=check_shards)
        if isinstance(path, str) and "://" in path:  # object storage: a cached local copy
            from embedfit.url import local_or_url, redact

            path = local_or_url(path)
            if "://" in path:
                from embedfit.storage.objects import cached_copy

                try:
                    store = cls._open_local(cached_copy(path), check_shards)
                except StoreError:  # the cached copy, not the object, may be what is damaged: fetch it once more
                    store = cls._open_local(cached_copy(path, refresh=True), check_shards)
                store.url = redact(path)
                return store
        return cls._open_local(Path(path), check_shards)

    @classmethod
    def _open_local(cls, path: Path, check_shards: bool = True) -> FeatureStore:
        if not path.exists():
            parts, shards = path.with_name(path.name + ".parts"), shards_dir(path)
            if (parts.is_dir() and any(parts.glob("part-*.h5"))) or (shards.is_dir() and any(shards.glob("*.h5"))):
                raise StoreError(f"{path} is not finished: an extraction was interrupted before its first save; "
                                 "re-run the same `embedfit extract` command to resume")
            raise StoreError(f"feature store {path} does not exist")
        if path.is_dir():
            raise StoreError(f"{path} is a directory, not a feature store")
        quiet_hdf5()
        f = None
        try:
            f = h5py.File(path, "r")
            if "schema_version" not in f.attrs or "features" not in f:
                raise StoreError(f"{path} is an HDF5 file but not an embedfit feature store")
            attrs = {k: attr(f.attrs, k) for k in f.attrs}
            arrays = read_row_arrays(f)
            arrays["dim"] = f["features"].shape[1]
            verify_metadata(f, arrays)
            if int(attrs["schema_version"]) > SCHEMA_VERSION:
                raise StoreError(f"{path} uses store schema {attrs['schema_version']}; this embedfit reads up to "
                                 f"{SCHEMA_VERSION}: upgrade embedfit")
            store = cls(path, attrs, arrays, f)
            if attrs.get("layout") == LAYOUT and f["features"].is_virtual:
                store._shards = ShardedFeatures(path, f["features"], attrs)
                if check_shards:
                    store._shards.check(arrays["paths"])
        except BaseException as exc:
            if f is not None:
                f.close()
            if isinstance(exc, StoreError):
                raise
            if isinstance(exc, Exception):  # h5py raises OSError, KeyError, ValueError... on foreign or damaged files
                raise StoreError(f"cannot read feature store {path}: {why(exc)}; if it is a damaged store, "
                                 "re-extract it with `embedfit extract ... --overwrite`") from None
            raise
        return store

    def close(self) -> None:
        """Release the file. Metadata stays usable; `features()` then reopens the path, and refuses if the store
        there no longer holds the same rows."""
        if self._shards is not None:
            self._shards.close()
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # Open HDF5 files cannot be pickled; the copy reopens the path (and checks it is still this store).
        return {**self.__dict__, "_file": None, "_shards": None}

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return (f"FeatureStore('{self.url or self.path}', {self.spec.short()}, {self.n_ok} ok / {len(self)} images, "
                f"{len(self.class_names)} classes{'' if self.complete else ', INCOMPLETE'})")

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete", False))

    @property
    def n_ok(self) -> int:
        return int((self.status == OK).sum())

    @property
    def root(self) -> Path:
        return Path(self.attrs.get("root", "."))

    @property
    def fingerprint(self) -> str:
        return str(self.attrs.get("fingerprint", ""))

    def ok_rows(self) -> np.ndarray:
        """Indices of rows whose image was embedded."""
        return np.flatnonzero(self.status == OK)

    def image_path(self, row: int) -> Path:
        """Absolute path of the image behind a row (as it was at extraction time)."""
        key = Path(str(self.paths[row]))
        return key if key.is_absolute() else self.root / key

    def features(self, rows: Sequence[int] | np.ndarray | slice | None = None, *,
                 dtype: Any = np.float32, chunk_rows: int = 16384) -> np.ndarray:
        """Read features (all rows, a slice or an index array) as one array, in chunks.

        Index arrays are read as contiguous spans, which is much faster in HDF5 than point selection.

        Raises:
            StoreError: The features are damaged (a checksum does not match), or the store was closed and the path
                now holds a different store.
        """
        quiet_hdf5()
        try:
            try:
                with self._features_dataset() as ds:
                    return _read_rows(ds, rows, dtype, chunk_rows)
            except ShardGone:
                # A later commit of the same rows (a resume with nothing new, a retried shard) removed a shard this
                # store had not opened yet: read through the manifest now at the path, if it holds the same rows.
                if not self._reopen():
                    raise
                with self._features_dataset() as ds:
                    return _read_rows(ds, rows, dtype, chunk_rows)
        except OSError as exc:  # a Fletcher-32 mismatch reads as "filter returned failure during read"
            raise StoreError(damaged(self.path, "features", exc)) from None

    def _reopen(self) -> bool:
        """Hold the file now at the path instead, if it is this store (same fingerprint); False otherwise."""
        try:
            fresh = type(self)._open_local(self.path)
        except StoreError:
            return False
        if fresh.fingerprint != self.fingerprint or not fresh.fingerprint:
            fresh.close()
            return False
        self.close()
        self._file, self._shards = fresh._file, fresh._shards
        return True

    @contextlib.contextmanager
    def _features_dataset(self) -> Iterator[Any]:
        # A held handle keeps a replaced store readable (the old inode; a sharded store's shards are read through
        # `ShardedFeatures`, which refuses a shard that is gone rather than reading NaN).
        if self._file is not None:
            yield self._shards if self._shards is not None else self._file["features"]
            return
        # Closed: read what the path holds now, but only if it is still this store, so that rows never silently
        # come from other images.
        try:
            f = h5py.File(self.path, "r")
        except Exception as exc:
            raise StoreError(f"cannot read feature store {self.path}: {why(exc)}") from None
        with f:
            same = str(attr(f.attrs, "fingerprint", "")) == self.fingerprint and len(f["paths"]) == len(self)
            if same and not self.fingerprint:  # stores without a fingerprint: compare the keys themselves
                same = np.array_equal(read_str(f["paths"]), self.paths)
            if not same:
                raise StoreError(f"feature store {self.path} was replaced after it was opened; open it again")
            if attr(f.attrs, "layout") == LAYOUT and f["features"].is_virtual:
                shards = ShardedFeatures(self.path, f["features"], self.attrs)
                try:
                    yield shards
                finally:
                    shards.close()
            else:
                yield f["features"]

    def verify(self) -> int:
        """The full check: every feature chunk's checksum, and for a sharded store every shard's own metadata
        digest and every row's key against the shard row it is read from. Costs a read of the whole store.

        Returns:
            The number of rows checked.

        Raises:
            StoreError: Naming what does not match and what to do.
        """
        quiet_hdf5()
        if self._shards is not None:
            self._shards.verify(self.paths)
        with self._features_dataset() as ds:
            for start in range(0, len(self), 16384):
                try:
                    ds[start:min(len(self), start + 16384)]
                except OSError as exc:
                    raise StoreError(damaged(self.path, "features", exc)) from None
        return len(self)

    def iter_batches(self, batch_rows: int = 8192, rows: np.ndarray | None = None
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (row indices, features) batches, for out-of-core fitting (`partial_fit`)."""
        rows = self.ok_rows() if rows is None else np.asarray(rows)
        for i in range(0, len(rows), batch_rows):
            idx = rows[i:i + batch_rows]
            yield idx, self.features(idx)

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(X, y, paths) of the embedded images: the usual entry point for scikit-learn.

        `y` holds class names ("" for unlabelled images), the labels a saved model predicts, so that
        `pipeline.score(X, y)` and `accuracy_score(y, pipeline.predict(X))` compare like with like; the class
        indices are `labels[ok_rows()]`.
        """
        rows = self.ok_rows()
        names = np.array([*self.class_names, ""], dtype=object)  # label -1 (unlabelled) picks the trailing ""
        return self.features(rows), names[self.labels[rows]].astype(str), self.paths[rows]

    def summary(self) -> dict[str, Any]:
        """Counts and provenance, for `embedfit info` and reports."""
        counts = {name: int((self.status == code).sum()) for code, name in STATUS_NAMES.items()}
        by_status = {c: {name: int(((self.labels == i) & (self.status == code)).sum())
                         for code, name in STATUS_NAMES.items()} for i, c in enumerate(self.class_names)}
        per_class = {c: n["ok"] for c, n in by_status.items()}
        spec = self.spec
        return {
            "path": self.url or str(self.path), **({"local_copy": str(self.path)} if self.url else {}),
            "backbone": spec.short(), "images": len(self), **counts,
            "classes": per_class, "class_status": by_status, "architecture": spec.architecture,
            "weights": spec.weights + (f" (sha256 {spec.weights_sha256[:12]})" if spec.weights_sha256 else ""),
            "preprocessing": (f"resize {spec.resize_size} {spec.interpolation}, crop {spec.input_size[0]}x"
                              f"{spec.input_size[1]}, mean {_fmt(spec.mean)}, std {_fmt(spec.std)}"),
            "dtype": self.settings.dtype, "tta": self.settings.tta,
            "precision": self.settings.precision, "device": self.attrs.get("device"),
            "runtime": self.attrs.get("runtime", "torch"), "decode": self.attrs.get("decode", "pil"),
            "engine": self.attrs.get("engine", "local"), "source_kind": self.attrs.get("source_kind"),
            "fingerprint": self.attrs.get("fingerprint"),
            "complete": self.complete, "created": self.attrs.get("created"), "updated": self.attrs.get("updated"),
            "root": self.attrs.get("root"), "extract_seconds": float(self.attrs.get("extract_seconds", 0.0)),
            "versions": json.loads(self.attrs.get("versions", "{}")),
        }

    def check_compatible(self, spec: BackboneSpec, what: str = "the model") -> None:
        """Refuse to combine this store with a model/store made by a different backbone or preprocessing."""
        diffs = self.spec.differences(spec)
        if diffs:
            raise StoreMismatchError(
                f"store {self.path} has {self.spec.short()} features but {what} expects {spec.short()} "
                f"({'; '.join(diffs[:3])})"
            )




def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


class ShardGone(StoreError):
    """A shard of an open sharded store is no longer there (or no longer the file recorded)."""


def _repair_hint(folder: Path) -> str:
    return (f"re-run the same `embedfit extract` command to re-embed its rows, or copy the whole {folder.name} "
            "folder with the store")


def shard_problem(shard: Path, entry: dict[str, Any] | None) -> str:
    """Why the shard file at `shard` is not the one a manifest recorded as `entry` ("" when it is): absent,
    unreadable, a metadata copy without features, or another metadata digest, row count or key range. Reads two
    keys and two attributes, whatever its size; `entry` None (a manifest written before shard digests) checks only
    that it opens and holds features."""
    if not shard.is_file():
        return "is missing"
    try:
        with h5py.File(shard, "r") as f:
            if attr(f.attrs, FEATURES_ELIDED, 0):  # its features read as fill values: refused, like a missing shard
                return ("is a metadata copy without features (a Ray driver's staging copy of a shard on object "
                        "storage), not the shard")
            if entry is None:
                return ""
            paths = f["paths"]
            digest = attr(f.attrs, "metadata_sha256")
            if digest is None:
                return "has no metadata checksum (written by a pre-release embedfit, or the attribute was removed)"
            if len(paths) != entry["rows"]:
                return f"has {len(paths)} rows, the manifest recorded {entry['rows']}"
            if digest != entry["sha256"]:
                return "has another metadata digest than the manifest recorded (another shard's file?)"
            if len(paths) and (paths.asstr()[0], paths.asstr()[-1]) != (entry["first"], entry["last"]):
                return f"holds keys {paths.asstr()[0]}..{paths.asstr()[-1]}, not {entry['first']}..{entry['last']}"
    except Exception as exc:  # truncated, or not HDF5 at all
        return f"cannot be read ({why(exc)})"
    return ""


class ShardedFeatures:
    """The `features` of a sharded store, read from its shards by embedfit rather than through HDF5's virtual
    dataset: the shards are looked up beside the manifest under its current name (`shards_dir`), so a renamed or
    copied pair reads the same rows, and a shard that is gone is an error, never rows of NaN (HDF5's fill value).

    It behaves like the dataset for the reads `FeatureStore` makes (`len`, `shape`, `dtype`, `[a:b]`, `[a:b:s]`).
    At most `max_open` shard files are held open at once.

    Args:
        manifest: The manifest's path as opened.
        vds: The manifest's virtual `features` dataset (only its mapping is read).
        attrs: The manifest's attributes (`shards`, `shard_index`).
    """

    def __init__(self, manifest: Path, vds: h5py.Dataset, attrs: dict[str, Any], max_open: int = 64) -> None:
        self.manifest = manifest
        self.folder = shards_dir(manifest)
        self.shape, self.dtype = vds.shape, vds.dtype
        self.names = shard_names(attrs)
        index = json.loads(attrs.get("shard_index") or "{}")
        self.index: dict[str, dict[str, Any]] = index
        maps = []  # (first output row, rows, shard name, first shard row)
        for m in vds.virtual_sources():
            (out0, _), (out1, _) = m.vspace.get_select_bounds()
            # A whole shard is mapped with an "all" selection, which HDF5 stores without the shard's extent (read
            # back, a scalar space until the shard is opened): its rows are 0.. as many as the virtual side maps.
            # Other mappings, and every mapping of a manifest written before that, are hyperslabs.
            if m.src_space.get_select_type() == h5py.h5s.SEL_ALL:
                src0 = 0
            else:
                (src0, _), _ = m.src_space.get_select_bounds()
            maps.append((out0, out1 - out0 + 1, os.path.basename(m.file_name), src0))
        maps.sort()
        self.maps = maps
        self._starts = np.array([m[0] for m in maps], dtype=np.int64)
        self._open: OrderedDict[str, h5py.File] = OrderedDict()
        self._max_open = max_open

    def __len__(self) -> int:
        return self.shape[0]

    def _fail(self, name: str, problem: str) -> StoreError:
        return StoreError(f"sharded store {self.manifest}: shard {name} {problem}; {_repair_hint(self.folder)}")

    def check(self, paths: np.ndarray) -> None:
        """The open-time check, per shard: present, and the digest, rows and key range recorded at commit."""
        named = set(self.names)
        for _, _, name, _ in self.maps:
            if name not in named:
                raise self._fail(name, "is read by the manifest's features but not listed in its `shards`")
        for name in self.names:
            problem = shard_problem(self.folder / name, self.index.get(name) if self.index else None)
            if problem:
                raise self._fail(name, problem)
        covered = sum(m[1] for m in self.maps)
        if covered != len(paths):
            raise StoreError(f"sharded store {self.manifest}: its features map {covered} rows for {len(paths)} "
                             "keys; re-extract it with `embedfit extract ... --overwrite`")

    def verify(self, paths: np.ndarray) -> None:
        """The full check: each shard's metadata against its own digest, every row's key against the manifest's."""
        keys: dict[str, np.ndarray] = {}
        for name in self.names:
            try:
                with h5py.File(self.folder / name, "r") as f:
                    arrays = read_row_arrays(f)
                    expected, present = attr(f.attrs, "metadata_sha256"), set(f)
            except Exception as exc:
                raise self._fail(name, f"cannot be read ({why(exc)})") from None
            if expected is None or metadata_digest(arrays, present=present) != expected:
                raise self._fail(name, "has metadata that no longer matches its digest (changed on disk)")
            keys[name] = arrays["paths"]
        for out0, n, name, src0 in self.maps:
            if not np.array_equal(keys[name][src0:src0 + n], paths[out0:out0 + n]):
                bad = next(i for i in range(n) if keys[name][src0 + i] != paths[out0 + i])
                raise self._fail(name, f"holds {keys[name][src0 + bad]} where the manifest has {paths[out0 + bad]} "
                                 f"(row {out0 + bad})")

    def _shard(self, name: str) -> h5py.File:
        f = self._open.get(name)
        if f is not None:
            self._open.move_to_end(name)
            return f
        problem = shard_problem(self.folder / name, self.index.get(name) if self.index else None)
        if problem:  # e.g. deleted since the store was opened, by a commit that no longer needs it
            raise ShardGone(str(self._fail(name, problem)))
        if len(self._open) >= self._max_open:
            self._open.popitem(last=False)[1].close()
        f = self._open[name] = h5py.File(self.folder / name, "r")
        return f

    def __getitem__(self, sel: slice) -> np.ndarray:
        start, stop, step = sel.indices(len(self))
        lo, hi = start, max(start, stop)
        out = np.empty((hi - lo, self.shape[1]), dtype=self.dtype)
        first = max(0, int(np.searchsorted(self._starts, lo, side="right")) - 1)
        for out0, n, name, src0 in self.maps[first:]:
            if out0 >= hi:
                break
            a, b = max(lo, out0), min(hi, out0 + n)
            if a >= b:
                continue
            try:
                out[a - lo:b - lo] = self._shard(name)["features"][src0 + a - out0:src0 + b - out0]
            except OSError as exc:  # a checksum mismatch in the shard's features
                raise self._fail(name, f"is damaged ({why(exc)})") from None
        return out[::step] if step != 1 else out

    def close(self) -> None:
        """Close the shard files held open."""
        while self._open:
            self._open.popitem()[1].close()


# --------------------------------------------------------------------------------------------------
# collections: a store of stores (`embedfit.storage.collection` makes them; this reads them)

FORMAT, VERSION = "embedfit-collection", 1
SUFFIX = ".json"
MAX_HELD = 8
"""Members that keep their file open (each a sharded store may hold up to 64 shard files more); the others open
their file per read and check that it is still the store collected (`FeatureStore.features` on a closed store)."""



def is_collection(path: str | os.PathLike) -> bool:
    """True when `path` names a collection: a ``.json`` file (stores are HDF5 files, any other name)."""
    return os.fspath(path).lower().endswith(SUFFIX)


class StoreCollection(FeatureStore):
    """Several stores read as one: a `FeatureStore` whose rows are its members' rows, member after member.

    Everything a store offers works the same (`paths`, `labels`, `class_names`, `status`, `features(rows)`,
    `iter_batches`, `load`, `summary`, `verify`, `fingerprint`), so `fit` (in memory and out of core), `predict`,
    `audit`, `report`, `info` and the notebook take a collection where they take a store. Open one with
    `FeatureStore.open("feats.collection.json")`; make one with `collect`.

    Attributes:
        members: The member stores, open, in the collection's order.
        member_paths: Each member's path as the collection records it (relative to its folder, or absolute).
        offsets: First row of each member, plus the total: member `i` holds rows `offsets[i]:offsets[i + 1]`.
    """

    def __init__(self, path: Path, members: Sequence[FeatureStore], member_paths: Sequence[str], *,
                 url: str = "") -> None:
        self.members = list(members)
        self.member_paths = list(member_paths)
        self.offsets = np.cumsum([0, *(len(m) for m in self.members)])
        arrays, root = _merged_rows(self.members, self.member_paths)
        attrs = _merged_attrs(self.members, self.member_paths, root, arrays)
        super().__init__(path, attrs, arrays)
        self.url = url

    def __repr__(self) -> str:
        return (f"StoreCollection('{self.url or self.path}', {len(self.members)} members, {self.spec.short()}, "
                f"{self.n_ok} ok / {len(self)} images, {len(self.class_names)} classes"
                f"{'' if self.complete else ', INCOMPLETE'})")

    def close(self) -> None:
        """Release every member's file (metadata stays usable; reads then reopen each member, checked)."""
        for member in self.members:
            member.close()

    def features(self, rows: Sequence[int] | np.ndarray | slice | None = None, *,
                 dtype: Any = np.float32, chunk_rows: int = 16384) -> np.ndarray:
        """Read features of global rows (all, a slice or an index array), each from the member that holds it.

        Raises:
            StoreError: A member's features are damaged or gone (naming the member's file).
        """
        if rows is None or isinstance(rows, slice):
            start, stop, step = (rows or slice(None)).indices(len(self))
            if step != 1:
                return self.features(np.arange(start, stop, step), dtype=dtype, chunk_rows=chunk_rows)
            out = np.empty((max(0, stop - start), self.dim), dtype=dtype)
            for i, member in enumerate(self.members):
                a, b = max(start, self.offsets[i]), min(stop, self.offsets[i + 1])
                if a < b:
                    out[a - start:b - start] = member.features(slice(a - self.offsets[i], b - self.offsets[i]),
                                                               dtype=dtype, chunk_rows=chunk_rows)
            return out
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows out of range for {len(self)} rows")
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        out = np.empty((len(rows), self.dim), dtype=dtype)
        for i in np.unique(which):
            at = which == i
            out[at] = self.members[i].features(rows[at] - self.offsets[i], dtype=dtype, chunk_rows=chunk_rows)
        return out

    def verify(self) -> int:
        """The full check of every member (`FeatureStore.verify`): every checksum, every shard's keys."""
        return sum(member.verify() for member in self.members)

    def summary(self) -> dict[str, Any]:
        """A store's summary (`FeatureStore.summary`) plus `members`: path, images, ok and completeness of each."""
        return {**super().summary(), "layout": "collection",
                "members": [{"path": p, "images": len(m), "ok": m.n_ok, "complete": m.complete}
                            for p, m in zip(self.member_paths, self.members, strict=True)]}



def open_collection(path: str | os.PathLike, *, check_shards: bool = True) -> StoreCollection:
    """Open the collection at `path` (a local file or a URL): every member opened and checked against the record.

    Args:
        path: The collection file (``.json``).
        check_shards: Passed to each member's `FeatureStore.open`.

    Raises:
        StoreError: The file is missing or not a collection; a member is missing, cannot be opened, or is not the
            store recorded (changed or swapped since `collect`).
        StoreMismatchError: Members with different settings (an edited collection file).
    """
    from embedfit.url import is_url, local_or_url, redact

    where = local_or_url(path)
    if is_url(where):
        doc = _parse(_read_remote(where), redact(where))
        base = where.rsplit("/", 1)[0] + "/"
        local = _resolved_copy(where, doc, base)  # reopening `.path` (report, notebook) finds the same members
        return _open(local, doc, redact(where), base, check_shards, url=redact(where))
    local = Path(where)
    try:
        text = local.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StoreError(f"collection {local} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreError(f"cannot read collection {local}: {exc}") from None
    return _open(local, _parse(text, str(local)), str(local), local.parent, check_shards)



def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise StoreError(f"{where} is not a store collection (not JSON: {exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise StoreError(f"{where} is not a store collection (no \"format\": \"{FORMAT}\"); make one with "
                         "`embedfit collect OUT.json STORE...`")
    if int(doc.get("version", 0)) > VERSION:
        raise StoreError(f"{where} is a collection of version {doc['version']}; this embedfit reads up to "
                         f"{VERSION}: upgrade embedfit")
    members = doc.get("members")
    keys = ("path", "rows", "fingerprint", "metadata_sha256", "root")
    if not isinstance(members, list) or not all(isinstance(m, dict) and all(k in m for k in keys) for m in members):
        raise StoreError(f"collection {where} is damaged: each member needs {', '.join(keys)}; make it again with "
                         "`embedfit collect`")
    if not members:
        raise StoreError(f"collection {where} has no members")
    return doc


def _read_remote(url: str) -> str:
    from embedfit.url import read_text

    try:
        return read_text(url)
    except EmbedfitError as exc:  # InputError: missing or unreadable; a store is what is missing here
        raise StoreError(str(exc)) from None


def _resolved_copy(url: str, doc: dict[str, Any], base: str) -> Path:
    """A local copy of the remote collection at `url` whose members are absolute URLs (in the read cache)."""
    from embedfit.runs.files import atomic_write
    from embedfit.storage.objects import cache_dir

    resolved = {**doc, "members": [{**m, "path": _resolve(m["path"], base)} for m in doc["members"]]}
    local = cache_dir() / "collections" / hashlib.sha256(url.encode()).hexdigest()[:20] / posixpath.basename(url)
    local.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(local, json.dumps(resolved, indent=1) + "\n")  # whole: another process may read the old copy


def _resolve(member: str, base: str | Path) -> str:
    """A member's recorded path as a path or URL to open: relative ones are relative to the collection's folder."""
    from embedfit.url import is_url, join

    if is_url(member) or os.path.isabs(member):
        return member
    if isinstance(base, str):  # a folder URL
        return join(base, member)
    return str(base / member)


def _open(local: Path, doc: dict[str, Any], where: str, base: str | Path, check_shards: bool, *,
          url: str = "") -> StoreCollection:
    opened: list[FeatureStore] = []
    try:
        for i, entry in enumerate(doc["members"]):
            target = _resolve(entry["path"], base)
            try:
                store = FeatureStore.open(target, check_shards=check_shards)
            except StoreError as exc:
                if "does not exist" in str(exc):
                    raise StoreError(f"collection {where}: member {entry['path']} is missing (looked for {target}); "
                                     "members are found relative to the collection file, so move or copy them "
                                     "with it, or make the collection again with `embedfit collect`") from None
                raise StoreError(f"collection {where}: member {entry['path']}: {exc}") from None
            opened.append(store)
            problem = _changed(store, entry)
            if problem:
                raise StoreError(f"collection {where}: member {entry['path']} {problem} than when it was collected "
                                 "(re-extracted, resumed or replaced since); run `embedfit collect` again to take "
                                 "the members as they are now")
            if i >= MAX_HELD:  # bounded open files: read per call, checked (see MAX_HELD)
                store.close()
        try:
            return StoreCollection(local, opened, [e["path"] for e in doc["members"]], url=url)
        except StoreError as exc:
            raise type(exc)(f"collection {where}: {exc}") from None
    except BaseException:
        for store in opened:
            store.close()
        raise


def _changed(store: FeatureStore, entry: dict[str, Any]) -> str:
    """How `store` differs from the record `entry` ("" when it is the store collected)."""
    if len(store) != entry["rows"]:
        return f"has {len(store)} rows, {entry['rows']} recorded; it has other rows"
    if store.fingerprint != entry["fingerprint"]:
        return "has another fingerprint (other images, labels or backbone)"
    if store.attrs.get("metadata_sha256") != entry["metadata_sha256"]:
        return "has another metadata digest"
    if str(store.attrs.get("root", ".")) != entry["root"]:
        return f"has another image root ({store.attrs.get('root', '.')}, recorded {entry['root']})"
    return ""


def _merged_rows(members: Sequence[FeatureStore], names: Sequence[str]) -> tuple[dict[str, Any], str]:
    """The collection's per-row arrays (keys under the common root, labels re-indexed by class name) and that root.

    Raises:
        StoreMismatchError: Members with different settings.
        StoreError: Members whose images have no folder in common.
    """
    first = members[0]
    for name, m in zip(names[1:], members[1:], strict=True):
        check_mixable(m.settings, first.settings, f"member {name}", f"member {names[0]}", same_store=True)
    roots = [str(m.attrs.get("root", ".")) for m in members]
    root = _common_root(roots)
    if root is None:
        raise StoreError(f"members {names[0]} and {names[roots.index(next(r for r in roots if r != roots[0]))]} "
                         f"have images in places with no folder in common ({roots[0]} ...); collect them apart")
    class_names = sorted(set().union(*(m.class_names for m in members)))
    index = {c: i for i, c in enumerate(class_names)}
    paths, labels = [], []
    for m, member_root in zip(members, roots, strict=True):
        prefix = _prefix(member_root, root)
        # Absolute keys (a CSV's absolute paths, URLs) already name one file each; the test is inlined: per row.
        paths.append(m.paths if not prefix else np.array(
            [k if k[:1] == "/" or "://" in k else prefix + k for k in m.paths.tolist()], dtype=object))
        mapping = np.array([index[c] for c in m.class_names] + [-1], dtype=np.int64)  # label -1 stays -1
        labels.append(mapping[m.labels])
    arrays: dict[str, Any] = {"paths": _concat(paths, object), "labels": _concat(labels, np.int64),
                              "class_names": np.array(class_names, dtype=object), "dim": first.dim}
    for name in first.row_arrays:
        if name not in arrays:
            arrays[name] = _concat([m.row_arrays[name] for m in members], first.row_arrays[name].dtype)
    return arrays, root


def _concat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(parts) if parts else np.array([], dtype=dtype)


def _common_root(roots: Sequence[str]) -> str | None:
    """The deepest folder (or folder URL) holding every root; None when there is none (local and remote, other
    buckets, relative and absolute)."""
    from embedfit.url import is_url

    if all(is_url(r) for r in roots):
        parts = [urllib.parse.urlsplit(r) for r in roots]
        if len({(p.scheme, p.netloc) for p in parts}) > 1:
            return None
        common = posixpath.commonpath([p.path or "/" for p in parts])
        return urllib.parse.urlunsplit((parts[0].scheme, parts[0].netloc, common, "", ""))
    if any(is_url(r) for r in roots):
        return None
    try:
        return os.path.commonpath(roots) or "."
    except ValueError:
        return None


def _prefix(member_root: str, root: str) -> str:
    """What a member's keys get in front of them: its root relative to the common root, with a slash ("" if same)."""
    from embedfit.url import is_url

    if is_url(root):
        rel = posixpath.relpath(urllib.parse.urlsplit(member_root).path or "/", urllib.parse.urlsplit(root).path or "/")
    else:
        rel = Path(os.path.relpath(member_root, root)).as_posix()
    return "" if rel == "." else rel + "/"


def _merged_attrs(members: Sequence[FeatureStore], names: Sequence[str], root: str,
                  arrays: dict[str, Any]) -> dict[str, Any]:
    """A store's attributes for the collection: settings of its members, provenance joined, counts summed."""
    first = members[0]

    def joined(key: str, default: str) -> str:
        values = {v for m in members for v in str(m.attrs.get(key, default)).split("+")}
        return "+".join(sorted(values))

    versions: dict[str, list[str]] = {}
    for m in members:
        for lib, v in json.loads(m.attrs.get("versions", "{}")).items():
            versions.setdefault(lib, [])
            if v not in versions[lib]:
                versions[lib].append(v)
    digest = hashlib.sha256(FORMAT.encode())
    for name, m in zip(names, members, strict=True):
        digest.update(json.dumps([name, m.fingerprint, m.attrs.get("metadata_sha256"),
                                  _prefix(str(m.attrs.get("root", ".")), root)]).encode())
    status = arrays["status"]
    return {
        **first.settings.attrs(), "layout": "collection", "root": root,
        "schema_version": max(int(m.attrs.get("schema_version", SCHEMA_VERSION)) for m in members),
        "complete": all(m.complete for m in members), "fingerprint": digest.hexdigest(),
        "n_ok": int((status == OK).sum()), "n_failed": int((status == FAILED).sum()),
        "n_missing": int((status == MISSING).sum()),
        **{key: joined(key, default) for key, default in (("device", "cpu"), ("runtime", "torch"),
                                                           ("decode", "pil"), ("engine", "local"),
                                                           ("source_kind", "folder"))},
        "created": min(str(m.attrs.get("created", "")) for m in members),
        "updated": max(str(m.attrs.get("updated", "")) for m in members),
        "extract_seconds": sum(float(m.attrs.get("extract_seconds", 0.0)) for m in members),
        "versions": json.dumps({lib: ", ".join(v) for lib, v in versions.items()}),
    }
