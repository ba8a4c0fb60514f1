"""The HDF5 feature store: schema, a crash-safe writer with resume, and a reader.

Schema (one HDF5 file, readable with plain h5py; row i of every dataset is one image, sorted by path):

    features     (N, D) float32 | float16   embeddings; NaN rows for images that failed
    paths        (N,)   utf-8 str           path relative to the input root (POSIX separators)
    labels       (N,)   int64               index into class_names, -1 when unlabeled
    class_names  (C,)   utf-8 str
    status       (N,)   uint8               0 ok, 1 failed (could not be decoded), 2 missing (file gone)
    errors       (N,)   utf-8 str           why an image failed, "" when ok
    file_size    (N,)   int64               resume key, with paths and file_mtime_ns
    file_mtime_ns(N,)   int64
    content_hash (N,)   utf-8 str           SHA-256 of the file's bytes, read once for hashing and decoding; ""
                                            when unknown (a failed read; rows of stores written before it)
    attrs: schema_version, embedfit_version, spec (BackboneSpec JSON), dtype, tta, precision, device,
           runtime ("torch" or "onnx"), decode ("pil" or "device"), engine ("local" or "ray") (these four
           join the values of every run that made rows, e.g. "onnx+torch"), versions (JSON), created, updated, root,
           source_kind, complete, n_ok, n_failed, n_missing, extract_seconds, fingerprint, merged_parts (JSON),
           metadata_sha256

Integrity: the numeric datasets (features included) carry HDF5's Fletcher-32 checksum per chunk, so a flipped byte
makes the read fail (a StoreError that says to re-extract with `--overwrite`) instead of returning wrong numbers.
HDF5 cannot checksum variable-length strings, so `metadata_sha256` (SHA-256 of every per-row dataset but the
features) covers paths, errors and class names; it is checked when a store opens. Stores written before either
existed open and read as before, unchecked.

Crash safety: HDF5 has no journal, so a writer killed mid-write can leave a file that no longer opens.
The store file itself is therefore only ever replaced whole (`os.replace` of a finished temporary file, which
keeps the old file's permission bits). While extraction runs, results go to small part files in `<store>.parts/`
(same checksums), each also written to a temporary name and renamed. `commit()` merges the previous store and the
parts into a new store. A run killed at any moment leaves the old store intact plus finished parts, which the next
run reuses after checking them in full: a damaged part is deleted, with a warning, and its images embedded again.

Concurrency: a lock file (`<store>.lock`, never deleted) keeps a second writer out; it is an OS lock that dies with
its holder and that forked children (DataLoader workers) do not keep. Readers never need it: a `FeatureStore` holds
its file open, so a store replaced by a concurrent `extract` keeps serving the rows its metadata describes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from embedfit._version import __version__
from embedfit.backbones.spec import BackboneSpec
from embedfit.errors import StoreError, StoreLockedError, StoreMismatchError

SCHEMA_VERSION = 1
OK, FAILED, MISSING = 0, 1, 2
STATUS_NAMES = {OK: "ok", FAILED: "failed", MISSING: "missing"}
DTYPES = ("float32", "float16")
_STR = h5py.string_dtype("utf-8")
# Tests: seconds to pause a commit with the new store half-written, so that a kill lands there every time.
_TEST_COMMIT_PAUSE = "EMBEDFIT_TEST_COMMIT_PAUSE"
_CHUNK_ROWS = 256  # ~1.3 MB chunks at D=1280 float32: fast sequential reads, small partial reads
log = logging.getLogger("embedfit")


_VERSION_ORDER = ("embedfit", "torch", "torchvision", "timm", "numpy", "h5py", "scikit-learn", "python", "onnxruntime")


def library_versions() -> dict[str, str]:
    """Versions that influence features, recorded in every store and model file."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"embedfit": __version__, "numpy": np.__version__, "h5py": h5py.__version__,
                "python": platform.python_version()}
    # From the installed packages' metadata: importing torch for its version string costs seconds.
    for name in ("torch", "torchvision", "timm", "scikit-learn", "onnxruntime"):  # onnxruntime: when installed
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(name)
    return dict(sorted(versions.items(), key=lambda kv: list(_VERSION_ORDER).index(kv[0])))


@dataclass(frozen=True)
class StoreSettings:
    """Everything that must match for rows to be mixed in one store."""

    spec: BackboneSpec
    dtype: str = "float32"
    tta: str = "none"
    precision: str = "fp32"

    def differences(self, other: StoreSettings, *, same_store: bool = True) -> list[str]:
        """What stops features made with `self` and with `other` from being mixed: the one rule for it.

        Rows of one store (resume) must match in everything. Features used together otherwise (a model and the
        store it predicts on, a training and a test store) must match in backbone spec and test-time
        augmentation, which change what a feature means; dtype and precision only move features by ~1e-3.
        """
        diffs = self.spec.differences(other.spec)
        keys = ("dtype", "tta", "precision") if same_store else ("tta",)
        diffs += [f"{k}: {getattr(self, k)} != {getattr(other, k)}" for k in keys
                  if getattr(self, k) != getattr(other, k)]
        return diffs

    def describe(self) -> str:
        """'efficientnet_lite0 (1280-d, 224x224), --tta flip' (TTA, dtype and precision only when not default)."""
        extra = [f"--{k} {getattr(self, k)}" for k, default in (("tta", "none"), ("dtype", "float32"),
                                                                 ("precision", "fp32")) if getattr(self, k) != default]
        return ", ".join([self.spec.short(), *extra])

    def attrs(self) -> dict[str, str]:
        return {"spec": self.spec.to_json(), "dtype": self.dtype, "tta": self.tta, "precision": self.precision}

    @classmethod
    def from_attrs(cls, attrs: Any) -> StoreSettings:
        return cls(BackboneSpec.from_json(_attr(attrs, "spec")), _attr(attrs, "dtype"), _attr(attrs, "tta"),
                   _attr(attrs, "precision"))


def check_mixable(a: StoreSettings, b: StoreSettings, a_name: str, b_name: str, *, same_store: bool = False) -> None:
    """Raise a StoreMismatchError naming both sides unless their features may be mixed (`StoreSettings.differences`).

    Args:
        a: Settings of the first side, e.g. the test store's.
        b: Settings of the second side, e.g. the training store's or the model's.
        a_name: How to name the first side in the message, e.g. "test store b.h5".
        b_name: The same for the second side.
        same_store: The rows are to go into one store (resume): everything must match.
    """
    diffs = a.differences(b, same_store=same_store)
    if diffs:
        raise StoreMismatchError(f"{a_name} has {a.describe()} features but {b_name} has {b.describe()} "
                                 f"({'; '.join(diffs[:3])})")


def _attr(attrs: Any, key: str, default: Any = None) -> Any:
    value = attrs.get(key, default)
    return value.decode() if isinstance(value, bytes) else value


def _read_str(ds: h5py.Dataset) -> np.ndarray:
    return ds.asstr()[:] if len(ds) else np.array([], dtype=object)


def _read_keys(f: h5py.File) -> dict[str, Any]:
    """The per-row metadata of a store or part file (everything but the features)."""
    paths = _read_str(f["paths"])
    return {"paths": paths, "labels": f["labels"][:],
            "class_names": _read_str(f["class_names"]) if "class_names" in f else np.array([], dtype=object),
            "status": f["status"][:], "errors": _read_str(f["errors"]), "file_size": f["file_size"][:],
            "file_mtime_ns": f["file_mtime_ns"][:],
            "content_hash": _read_str(f["content_hash"]) if "content_hash" in f else np.full(len(paths), "", object)}


def content_hashes(values: Sequence[str] | None, n: int) -> np.ndarray:
    """The `content_hash` dataset of `n` rows ("" for each when not known)."""
    return np.array(list(values) if values is not None else [""] * n, dtype=_STR)


def _keys_digest(arrays: dict[str, Any]) -> str:
    """SHA-256 of the per-row metadata. HDF5 cannot checksum variable-length strings (paths, errors, class names
    live in its global heap, which has no checksum), so this attribute covers them, and the numbers too."""
    h = hashlib.sha256()
    for name in ("paths", "class_names", "errors"):
        h.update(json.dumps([str(s) for s in arrays[name]]).encode())
    if any(arrays.get("content_hash", ())):  # a store without hashes keeps the digest it was written with
        h.update(json.dumps([str(s) for s in arrays["content_hash"]]).encode())
    for name, dtype in (("labels", "<i8"), ("status", "u1"), ("file_size", "<i8"), ("file_mtime_ns", "<i8")):
        h.update(np.ascontiguousarray(arrays[name], dtype=dtype).tobytes())
    return h.hexdigest()


def _verify_keys(f: h5py.File, arrays: dict[str, Any]) -> None:
    """Raise OSError when the metadata does not match its digest (files written before digests are trusted)."""
    expected = _attr(f.attrs, "metadata_sha256")
    if expected is not None and _keys_digest(arrays) != expected:
        raise OSError("metadata checksum mismatch (paths, labels or status changed on disk)")
    if f["features"].shape[0] != len(arrays["paths"]):
        raise OSError(f"{f['features'].shape[0]} feature rows for {len(arrays['paths'])} paths")


def _create(f: h5py.File, name: str, data: np.ndarray) -> None:
    """A dataset with a Fletcher-32 checksum per chunk where HDF5 allows one (not on variable-length strings)."""
    if data.dtype.kind == "O" or not len(data):  # strings; or no rows, which HDF5 cannot chunk
        f.create_dataset(name, data=data)
    else:  # the filter needs chunks; 64k rows of int64 is 512 KiB, a few chunks even for large stores
        f.create_dataset(name, data=data, chunks=(max(1, min(len(data), 1 << 16)),), fletcher32=True)


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


@contextlib.contextmanager
def _new_file(path: Path) -> Iterator[h5py.File]:
    """`h5py.File(path, "w")` that, if writing fails (disk full...), is closed without crashing the process.

    HDF5 retries its pending writes when a file is closed; if they fail again its state is left half torn down and
    h5py can crash (SIGSEGV) when the objects are freed later. So the body's writes are flushed inside the body,
    where a failure can still be handled, and a failed file has its descriptor pointed at /dev/null first, where
    the pending writes succeed (the caller deletes that file anyway).
    """
    f = h5py.File(path, "w")
    try:
        yield f
        f.flush()
    except BaseException:
        with contextlib.suppress(Exception):
            if os.name == "posix":
                null = os.open(os.devnull, os.O_RDWR)
                os.dup2(null, f.id.get_vfd_handle())
                os.close(null)
        with contextlib.suppress(Exception):
            f.close()
        raise
    f.close()


def _why(exc: BaseException) -> str:
    """The reason of an OS or HDF5 error on one line (the OS's words when HDF5 wraps them in its own)."""
    text = " ".join(str(getattr(exc, "strerror", None) or exc).split())
    os_error = re.search(r"error message = '([^']+)'", text)
    return os_error.group(1) if os_error else text


def _damaged(path: Path, what: str, exc: BaseException) -> str:
    return (f"feature store {path} is damaged: cannot read its {what} ({_why(exc)}); re-extract it with "
            "`embedfit extract ... --overwrite`")


def _quiet_hdf5() -> None:
    """Stop HDF5 printing its error stack to stderr: h5py turns errors into exceptions, but only silences the
    printing in the thread that imported it (parts are written from a background thread)."""
    with contextlib.suppress(Exception):
        h5py._errors.silence_errors()


# ---------------------------------------------------------------------------------------------------
# Reader


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
        self.content_hash: np.ndarray = arrays["content_hash"]  # "" where unknown (see the schema)
        self.dim = int(arrays["dim"])
        self._file = file

    @classmethod
    def open(cls, path: str | os.PathLike) -> FeatureStore:
        """Open a store for reading; it stays open until `close()`.

        Raises:
            StoreError: The file is missing, not an embedfit store, damaged, or an interrupted extraction that
                never committed (with how to resume).
        """
        if isinstance(path, str) and "://" in path:  # object storage: a cached local copy (embedfit.remote)
            from embedfit.remote import local_or_url, open_store

            path = local_or_url(path)
            if "://" in path:
                return open_store(path)
        path = Path(path)
        if not path.exists():
            parts, shards = _parts_dir(path), path.with_name(path.name + ".shards")
            if (parts.is_dir() and any(parts.glob("part-*.h5"))) or (shards.is_dir() and any(shards.glob("*.h5"))):
                raise StoreError(f"{path} is not finished: an extraction was interrupted before its first save; "
                                 "re-run the same `embedfit extract` command to resume")
            raise StoreError(f"feature store {path} does not exist")
        if path.is_dir():
            raise StoreError(f"{path} is a directory, not a feature store")
        f = None
        try:
            f = h5py.File(path, "r")
            if "schema_version" not in f.attrs or "features" not in f:
                raise StoreError(f"{path} is an HDF5 file but not an embedfit feature store")
            attrs = {k: _attr(f.attrs, k) for k in f.attrs}
            arrays = _read_keys(f)
            arrays["dim"] = f["features"].shape[1]
            _verify_keys(f, arrays)
        except BaseException as exc:
            if f is not None:
                f.close()
            if isinstance(exc, StoreError):
                raise
            if isinstance(exc, Exception):  # h5py raises OSError, KeyError, ValueError... on foreign or damaged files
                raise StoreError(f"cannot read feature store {path}: {_why(exc)}; if it is a damaged store, "
                                 "re-extract it with `embedfit extract ... --overwrite`") from None
            raise
        if int(attrs["schema_version"]) > SCHEMA_VERSION:
            f.close()
            raise StoreError(f"{path} uses store schema {attrs['schema_version']}; this embedfit reads up to "
                             f"{SCHEMA_VERSION}: upgrade embedfit")
        if attrs.get("layout") == "sharded":  # a manifest: its features are a virtual dataset over shard files
            from embedfit.shards import check_shards

            check_shards(path, attrs)
        return cls(path, attrs, arrays, f)

    def close(self) -> None:
        """Release the file. Metadata stays usable; `features()` then reopens the path, and refuses if the store
        there no longer holds the same rows."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None}  # an open HDF5 file cannot be pickled; the copy reopens the path

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return (f"FeatureStore('{self.path}', {self.spec.short()}, {self.n_ok} ok / {len(self)} images, "
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
        _quiet_hdf5()
        try:
            with self._features_dataset() as ds:
                return _read_rows(ds, rows, dtype, chunk_rows)
        except OSError as exc:  # a Fletcher-32 mismatch reads as "filter returned failure during read"
            raise StoreError(_damaged(self.path, "features", exc)) from None

    @contextlib.contextmanager
    def _features_dataset(self) -> Iterator[h5py.Dataset]:
        # A held handle keeps a replaced single-file store readable (the old inode). A sharded store's features
        # live in its shard files, which a later commit may remove: an old manifest would read NaN for them, so
        # a sharded store is always read through the path, checked to be the same store.
        if self._file is not None and _attr(self.attrs, "layout") != "sharded":
            yield self._file["features"]
            return
        # Closed: read what the path holds now, but only if it is still this store, so that rows never silently
        # come from other images.
        try:
            f = h5py.File(self.path, "r")
        except Exception as exc:
            raise StoreError(f"cannot read feature store {self.path}: {_why(exc)}") from None
        with f:
            same = str(_attr(f.attrs, "fingerprint", "")) == self.fingerprint and len(f["paths"]) == len(self)
            if same and not self.fingerprint:  # stores without a fingerprint: compare the keys themselves
                same = np.array_equal(_read_str(f["paths"]), self.paths)
            if not same:
                raise StoreError(f"feature store {self.path} was replaced after it was opened; open it again")
            yield f["features"]

    def iter_batches(self, batch_rows: int = 8192, rows: np.ndarray | None = None
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (row indices, features) batches, for out-of-core fitting (`partial_fit`)."""
        rows = self.ok_rows() if rows is None else np.asarray(rows)
        for i in range(0, len(rows), batch_rows):
            idx = rows[i:i + batch_rows]
            yield idx, self.features(idx)

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(X, y, paths) of the embedded images: the usual entry point for scikit-learn."""
        rows = self.ok_rows()
        return self.features(rows), self.labels[rows], self.paths[rows]

    def summary(self) -> dict[str, Any]:
        """Counts and provenance, for `embedfit info` and reports."""
        counts = {name: int((self.status == code).sum()) for code, name in STATUS_NAMES.items()}
        by_status = {c: {name: int(((self.labels == i) & (self.status == code)).sum())
                         for code, name in STATUS_NAMES.items()} for i, c in enumerate(self.class_names)}
        per_class = {c: n["ok"] for c, n in by_status.items()}
        spec = self.spec
        return {
            "path": str(self.path), "backbone": spec.short(), "images": len(self), **counts,
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


# ---------------------------------------------------------------------------------------------------
# Writer


def _parts_dir(path: Path) -> Path:
    return path.with_name(path.name + ".parts")


def _ensure_space(directory: Path, n_rows: int, dim: int, itemsize: int, key_bytes: int) -> None:
    """Refuse a write that cannot fit: HDF5 can crash the process when the disk fills mid-write."""
    import shutil

    need = n_rows * (dim * itemsize + 64) + key_bytes + (1 << 20)  # features, per-row metadata, HDF5 overhead
    free = shutil.disk_usage(directory).free
    if free < need:
        raise StoreError(f"cannot write to {directory}: No space left on device (need ~{need / 1e6:.1f} MB, "
                         f"{free / 1e6:.1f} MB free); nothing already stored was changed")


@dataclass
class _Row:
    source: int  # index into the merge's source list
    row: int
    label: str  # class name ("" unlabeled): class lists can change between runs, names do not
    size: int
    mtime_ns: int
    status: int
    error: str
    content_hash: str = ""


@dataclass(frozen=True)
class ResumePlan:
    """What an extraction run has to do, given what the store already holds."""

    todo: list[Any]  # ImageRecords to embed
    reused: int  # images already embedded (or already failed) with the same size and mtime
    retried: int  # failed images queued again (--retry-failed)
    changed: int  # images whose size or mtime changed since they were embedded


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


# How rows were made. A resumed store can hold rows of several runs: each attribute lists every value once.
_RUN_ATTRS = ("device", "decode", "runtime", "engine")


def _run_provenance(previous: Any, current: dict[str, Any], produced: bool) -> dict[str, Any]:
    """`current` run attributes, joined with the previous store's ("onnx+torch") where both runs made rows."""
    out = dict(current)
    for key in _RUN_ATTRS:
        before = str(previous.get(key, "") or "")
        if not before:
            continue
        if not produced:  # this run embedded nothing: every row is the earlier runs'
            out[key] = before
        elif current.get(key) and str(current[key]) != before:
            out[key] = "+".join(dict.fromkeys(before.split("+") + str(current[key]).split("+")))
    return out


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
        self.parts = _parts_dir(self.path)
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
            raise StoreError(f"cannot write to {self.path.parent}: {_why(exc)}") from None
        # filelock takes an OS lock (flock on POSIX) that dies with its holder, SIGKILL included, and closes its
        # descriptor in forked children (DataLoader workers), which would otherwise keep the lock alive after
        # the main process is killed. No soft-lock fallback: a marker file would outlive a killed writer.
        lock = FileLock(self.path.with_name(self.path.name + ".lock"), timeout=0, thread_local=False,
                        fallback_to_soft=False, preserve_lock_file=True)
        try:
            lock.acquire()
        except Timeout:
            raise StoreLockedError(f"{self.path} is being written by another embedfit process; wait for it "
                                   "to finish (readers may open the finished store at any time)") from None
        except OSError as exc:
            raise StoreError(f"cannot write to {self.path.parent}: {_why(exc)}") from None
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
        _quiet_hdf5()
        try:
            with h5py.File(part, "r") as f:
                settings = StoreSettings.from_attrs(f.attrs)
                _verify_keys(f, _read_keys(f))
                ds = f["features"]
                for i in range(0, len(ds), 4096):  # reading verifies each chunk's Fletcher-32 checksum
                    ds[i:i + 4096]
        except Exception as exc:  # truncated, bit-flipped or not HDF5 at all: h5py raises OSError, KeyError...
            log.warning("part file %s is damaged (%s); it is deleted and its images will be embedded again",
                        part, _why(exc))
            with contextlib.suppress(OSError):
                part.unlink()
            return False
        self._check(settings, f"unfinished run's part {part.name}")
        return True

    def _sources(self) -> list[Path]:
        return ([self.path] if self._previous is not None else []) + self._part_paths

    def _known_rows(self) -> dict[str, _Row]:
        """Latest row per key over the previous store and the parts (later sources win)."""
        gone = [p for p in self._part_paths if not p.exists()]
        for part in gone:  # deleted by hand since this run started: redo its images rather than fail
            log.warning("part file %s disappeared before it was merged; its images will be embedded again", part)
        self._part_paths = [p for p in self._part_paths if p not in gone]
        rows: dict[str, _Row] = {}
        for s, source in enumerate(self._sources()):
            if s == 0 and self._previous is not None:
                arrays: dict[str, Any] = vars(self._previous)
            else:
                try:
                    with h5py.File(source, "r") as f:
                        arrays = _read_keys(f)
                except Exception as exc:
                    raise StoreError(_part_damaged(source, exc)) from None
            names, keys, labels = list(arrays["class_names"]), arrays["paths"], arrays["labels"]
            sizes, mtimes, status, errors = (arrays["file_size"], arrays["file_mtime_ns"], arrays["status"],
                                             arrays["errors"])
            hashes = arrays["content_hash"]
            for i, key in enumerate(keys):
                label = names[labels[i]] if labels[i] >= 0 else ""
                rows[key] = _Row(s, i, label, int(sizes[i]), int(mtimes[i]), int(status[i]), errors[i], hashes[i])
        return rows

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
                   features: np.ndarray, content_hash: Sequence[str] | None = None) -> Path:
        """Write one batch of results as an atomic part file (a few hundred images each)."""
        _quiet_hdf5()  # usually called from a background thread
        self.parts.mkdir(parents=True, exist_ok=True)
        name = f"part-{self._run_id}-{self._seq:06d}.h5"
        self._seq += 1
        final, tmp = self.parts / name, self.parts / f".{name}.tmp"
        _ensure_space(self.parts, len(keys), self.settings.spec.embedding_dim, np.dtype(self.settings.dtype).itemsize,
                      sum(len(k) for k in keys) * 2)
        classes = sorted({lb for lb in labels if lb})
        index = {c: i for i, c in enumerate(classes)}
        arrays = {"paths": np.array(list(keys), dtype=_STR), "class_names": np.array(classes, dtype=_STR),
                  "labels": np.array([index.get(lb, -1) for lb in labels], dtype=np.int64),
                  "file_size": np.asarray(sizes, dtype=np.int64), "file_mtime_ns": np.asarray(mtimes, dtype=np.int64),
                  "status": np.asarray(status, dtype=np.uint8), "errors": np.array(list(errors), dtype=_STR),
                  "content_hash": content_hashes(content_hash, len(keys))}
        feats = np.asarray(features, dtype=self.settings.dtype)
        try:
            with _new_file(tmp) as f:
                f.attrs.update(self.settings.attrs())
                f.attrs["metadata_sha256"] = _keys_digest(arrays)
                for key, data in arrays.items():
                    _create(f, key, data)
                f.create_dataset("features", data=feats, chunks=(max(1, min(_CHUNK_ROWS, len(feats))), feats.shape[1]),
                                 fletcher32=True)
            os.replace(tmp, final)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if isinstance(exc, (OSError, RuntimeError)):  # h5py reports some write failures as RuntimeError
                raise StoreError(f"cannot write to {self.parts}: {_why(exc)}") from None
            raise
        self._part_paths.append(final)
        return final

    def _rows_to_commit(self, records: Sequence[Any], class_names: Sequence[str], complete: bool
                        ) -> tuple[dict[str, _Row], list[str], list[str], bool]:
        """The rows a commit writes: per scanned record the latest row with its size and mtime, labelled by the
        current scan (a renamed class folder or an edited CSV needs no re-embedding); rows of files no longer
        scanned kept as "missing". Returns (rows by key, sorted keys, class names, whether complete)."""
        known = self._known_rows()
        current = {rec.key: rec for rec in records}
        rows: dict[str, _Row] = {}
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
        _quiet_hdf5()
        rows, keys, names, complete = self._rows_to_commit(records, class_names, complete)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        _ensure_space(self.path.parent, len(keys), self.settings.spec.embedding_dim,
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
                raise StoreError(f"cannot write {self.path}: {_why(exc)}; nothing already stored was "
                                 "changed") from None
            raise
        for part in self._part_paths + self._stale_parts:  # merged: a crash before this is harmless
            with contextlib.suppress(OSError):
                part.unlink()
        with contextlib.suppress(OSError):
            self.parts.rmdir()
        shards = self.path.with_name(self.path.name + ".shards")  # of a sharded store this file replaced (overwrite)
        if shards.is_dir():
            shutil.rmtree(shards, ignore_errors=True)
        self._part_paths, self._stale_parts = [], []
        if self._previous is not None:
            self._previous.close()
        self._previous = FeatureStore.open(self.path)
        return self._previous

    def _write_store(self, tmp: Path, keys: list[str], rows: dict[str, _Row], names: list[str],
                     complete: bool, extra: dict[str, Any]) -> None:
        n, dim = len(keys), self.settings.spec.embedding_dim
        index = {c: i for i, c in enumerate(names)}
        ordered = [rows[k] for k in keys]
        arrays = {
            "paths": np.array(keys, dtype=_STR), "class_names": np.array(names, dtype=_STR),
            "labels": np.array([index[r.label] if r.label else -1 for r in ordered], dtype=np.int64),
            "status": np.array([r.status for r in ordered], dtype=np.uint8),
            "errors": np.array([r.error for r in ordered], dtype=_STR),
            "file_size": np.array([r.size for r in ordered], dtype=np.int64),
            "file_mtime_ns": np.array([r.mtime_ns for r in ordered], dtype=np.int64),
            "content_hash": content_hashes([r.content_hash for r in ordered], n),
        }
        status = arrays["status"]
        prev = self._previous.attrs if self._previous is not None else {}
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        fingerprint = hashlib.sha256()
        for part in (self.settings.spec.to_json(), "\n".join(keys), arrays["labels"].tobytes(), status.tobytes(),
                     arrays["file_size"].tobytes(), arrays["file_mtime_ns"].tobytes()):
            fingerprint.update(part.encode() if isinstance(part, str) else part)
        with _new_file(tmp) as f:
            f.attrs.update(self.settings.attrs())
            f.attrs.update({
                "schema_version": SCHEMA_VERSION, "embedfit_version": __version__,
                "versions": json.dumps(library_versions()), "created": prev.get("created", now), "updated": now,
                "complete": complete, "n_ok": int((status == OK).sum()), "n_failed": int((status == FAILED).sum()),
                "n_missing": int((status == MISSING).sum()), "fingerprint": fingerprint.hexdigest(),
                "metadata_sha256": _keys_digest(arrays),
                "merged_parts": json.dumps([p.name for p in self._part_paths]),
                "extract_seconds": float(prev.get("extract_seconds", 0.0)),
            })
            f.attrs.update({k: v for k, v in _run_provenance(prev, extra, bool(self._part_paths)).items()
                            if v is not None})
            for key in ("paths", "labels", "class_names", "status", "errors", "file_size", "file_mtime_ns",
                        "content_hash"):
                _create(f, key, arrays[key])
            feats = f.create_dataset("features", shape=(n, dim), dtype=self.settings.dtype,
                                     chunks=(max(1, min(_CHUNK_ROWS, n)), dim), maxshape=(None, dim),
                                     fletcher32=True)
            if os.environ.get(_TEST_COMMIT_PAUSE):  # tests: hold the new store half-written, to kill the run here
                time.sleep(float(os.environ[_TEST_COMMIT_PAUSE]))
            self._copy_features(feats, ordered)
            f.flush()
            os.fsync(f.id.get_vfd_handle())

    def _copy_features(self, out: h5py.Dataset, ordered: list[_Row], block: int = 8192) -> None:
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
                    raise StoreError(_part_damaged(sources[s], exc)) from None
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
                        raise StoreError(_damaged(self.path, "features", exc) if previous
                                         else _part_damaged(sources[s], exc)) from None
                out[start:start + len(chunk)] = buf
        finally:
            for f in open_files.values():
                f.close()


def _part_damaged(part: Path, exc: BaseException) -> str:
    return (f"cannot read part file {part} ({_why(exc)}); re-run the same command: a damaged or missing part is "
            "left out and its images are embedded again")
