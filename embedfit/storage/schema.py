"""The store schema: datasets, attributes and digests, for single files, part files, shards and manifests alike.

One HDF5 file, readable with plain h5py; row i of every per-row dataset is one image, rows sorted by path:

    features     (N, D) float32 | float16   embeddings; NaN rows for images that failed
    paths        (N,)   utf-8 str           path relative to the input root (POSIX separators)
    labels       (N,)   int64               index into class_names, -1 when unlabeled
    class_names  (C,)   utf-8 str
    status       (N,)   uint8               0 ok, 1 failed (could not be decoded), 2 missing (file gone)
    errors       (N,)   utf-8 str           why an image failed, "" when ok
    file_size    (N,)   int64               resume key, with paths and file_mtime_ns
    file_mtime_ns(N,)   int64
    content_hash (N,)   utf-8 str           SHA-256 of the file's bytes (read once, for hashing and decoding;
                                            `embedfit audit` finds exact copies by it); "" when unknown (a file
                                            that could not be read, rows of stores written before it)
    attrs: schema_version, embedfit_version, spec (BackboneSpec JSON), dtype, tta, precision, device,
           runtime ("torch" or "onnx"), decode ("pil" or "device"), engine ("local" or "ray") (these four
           join the values of every run that made rows, e.g. "onnx+torch"), versions (JSON), created, updated, root,
           source_kind, complete, n_ok, n_failed, n_missing, extract_seconds, fingerprint, merged_parts (JSON),
           metadata_sha256

A sharded store's manifest (`embedfit.storage.shards`) adds the attributes layout="sharded", shard_size, shards
(JSON list of shard file names) and shard_index (JSON: per shard its rows, first and last key and the
metadata_sha256 it had when the manifest was committed); its `features` is a virtual dataset over the shards.

Per-row datasets are listed once, in `ROW_DATASETS`: part files, shards and manifests all carry every one of them,
the metadata digest covers them, and the writers merge them. A new per-row dataset is one entry there (its
missing value, for files written before it existed, is its `ROW_DEFAULTS` entry).

Integrity: the numeric datasets (features included) carry HDF5's Fletcher-32 checksum per chunk, so a flipped byte
makes the read fail instead of returning wrong numbers. HDF5 cannot checksum variable-length strings, so
`metadata_sha256` (SHA-256 of every per-row dataset but the features, and of a manifest's shard_index) covers
paths, errors and class names; it is checked when a store opens. Stores written before either existed open and
read as before, unchecked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from embedfit._version import __version__
from embedfit.backbones.spec import BackboneSpec
from embedfit.errors import StoreError, StoreMismatchError

SCHEMA_VERSION = 1
OK, FAILED, MISSING = 0, 1, 2
STATUS_NAMES = {OK: "ok", FAILED: "failed", MISSING: "missing"}
DTYPES = ("float32", "float16")
STR = h5py.string_dtype("utf-8")
CHUNK_ROWS = 256  # ~1.3 MB chunks at D=1280 float32: fast sequential reads, small partial reads
LAYOUT = "sharded"  # the `layout` attribute of a sharded store's manifest
# Attribute of a shard's metadata copy (`embedfit.storage.shards.metadata_copy`): its features were never written.
FEATURES_ELIDED = "features_elided"

CONTENT_HASH = "content_hash"
ROW_DATASETS: dict[str, Any] = {"paths": STR, "labels": np.int64, "status": np.uint8, "errors": STR,
                                "file_size": np.int64, "file_mtime_ns": np.int64, CONTENT_HASH: STR}
"""Every per-row dataset but `features`, with its dtype; the first six are in every store ever written."""
ROW_DEFAULTS: dict[str, Any] = {CONTENT_HASH: ""}
"""The value of a per-row dataset added after stores existed, for the rows of files that lack it."""
# The digest's order for the original datasets, fixed so that stores written before stay verifiable.
DIGEST_STR, DIGEST_NUM = ("paths", "class_names", "errors"), ("labels", "status", "file_size", "file_mtime_ns")

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
        """The settings as store attributes."""
        return {"spec": self.spec.to_json(), "dtype": self.dtype, "tta": self.tta, "precision": self.precision}

    @classmethod
    def from_attrs(cls, attrs: Any) -> StoreSettings:
        """The settings recorded in a store's (or part's, or shard's) attributes."""
        return cls(BackboneSpec.from_json(attr(attrs, "spec")), attr(attrs, "dtype"), attr(attrs, "tta"),
                   attr(attrs, "precision"))


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


def attr(attrs: Any, key: str, default: Any = None) -> Any:
    """An HDF5 attribute as a Python value (bytes decoded), `default` when absent."""
    value = attrs.get(key, default)
    return value.decode() if isinstance(value, bytes) else value


def read_str(ds: h5py.Dataset) -> np.ndarray:
    """A variable-length string dataset as an object array of str."""
    return ds.asstr()[:] if len(ds) else np.array([], dtype=object)


def read_row_arrays(f: h5py.File) -> dict[str, Any]:
    """The per-row metadata of a store, part, shard or manifest (every `ROW_DATASETS` entry and class_names)."""
    n = len(f["paths"])
    out: dict[str, Any] = {"class_names": read_str(f["class_names"]) if "class_names" in f
                           else np.array([], dtype=object)}
    for name, dtype in ROW_DATASETS.items():
        if name in f:
            out[name] = read_str(f[name]) if dtype is STR else f[name][:]
        else:  # a dataset added after this file was written
            out[name] = np.full(n, ROW_DEFAULTS[name], dtype=object if dtype is STR else dtype)
    return out


def metadata_digest(arrays: dict[str, Any], shard_index: str = "", present: Container[str] | None = None) -> str:
    """SHA-256 of the per-row metadata (and of a manifest's shard index). HDF5 cannot checksum variable-length
    strings (paths, errors, class names live in its global heap, which has no checksum), so this attribute covers
    them, and the numbers too.

    Args:
        arrays: The per-row arrays (`read_row_arrays`, `row_arrays`).
        shard_index: A manifest's shard index (JSON).
        present: The datasets the file holds (an open `h5py.File` will do), when checking a file that may predate
            some `ROW_DATASETS` entries: those it lacks were not in the digest it was written with. None: all.
    """
    h = hashlib.sha256()
    for name in DIGEST_STR:
        h.update(json.dumps([str(s) for s in arrays[name]]).encode())
    for name in DIGEST_NUM:
        h.update(np.ascontiguousarray(arrays[name], dtype=ROW_DATASETS[name]).tobytes())
    for name, dtype in ROW_DATASETS.items():  # datasets added later, after the original ones
        if name not in DIGEST_STR + DIGEST_NUM and (present is None or name in present):
            h.update(json.dumps([str(s) for s in arrays[name]]).encode() if dtype is STR
                     else np.ascontiguousarray(arrays[name], dtype=dtype).tobytes())
    if shard_index:
        h.update(shard_index.encode())
    return h.hexdigest()


def verify_metadata(f: h5py.File, arrays: dict[str, Any]) -> None:
    """Raise OSError when the metadata has no digest (a pre-release file, or the attribute deleted) or does not
    match it."""
    expected = attr(f.attrs, "metadata_sha256")
    if expected is None:
        raise OSError("no metadata checksum (metadata_sha256): written by a pre-release embedfit, or the attribute "
                      "was removed")
    if metadata_digest(arrays, attr(f.attrs, "shard_index", ""), f) != expected:
        raise OSError("metadata checksum mismatch (paths, labels, status or shard list changed on disk)")
    if f["features"].shape[0] != len(arrays["paths"]):
        raise OSError(f"{f['features'].shape[0]} feature rows for {len(arrays['paths'])} paths")


def create_dataset(f: h5py.File, name: str, data: np.ndarray) -> None:
    """A dataset with a Fletcher-32 checksum per chunk where HDF5 allows one (not on variable-length strings)."""
    if data.dtype.kind == "O" or not len(data):  # strings; or no rows, which HDF5 cannot chunk
        f.create_dataset(name, data=data)
    else:  # the filter needs chunks; 64k rows of int64 is 512 KiB, a few chunks even for large stores
        f.create_dataset(name, data=data, chunks=(max(1, min(len(data), 1 << 16)),), fletcher32=True)


def write_row_datasets(f: h5py.File, arrays: dict[str, Any], shard_index: str = "") -> None:
    """Write class_names and every per-row dataset of `arrays`, and the digest that covers them."""
    f.attrs["metadata_sha256"] = metadata_digest(arrays, shard_index)
    create_dataset(f, "class_names", np.asarray(arrays["class_names"], dtype=STR))
    for name, dtype in ROW_DATASETS.items():
        create_dataset(f, name, np.asarray(arrays[name], dtype=dtype))


def row_arrays(keys: Any, labels: Any, class_names: Any, **columns: Any) -> dict[str, Any]:
    """Per-row arrays in the schema's dtypes from Python sequences (`columns`: every other `ROW_DATASETS` entry)."""
    out = {"paths": np.array(list(keys), dtype=STR), "labels": np.asarray(labels, dtype=np.int64),
           "class_names": np.array(list(class_names), dtype=STR)}
    for name, dtype in ROW_DATASETS.items():
        if name not in out:
            values = columns.get(name)
            if values is None:
                values = [ROW_DEFAULTS[name]] * len(out["paths"])
            out[name] = np.array(list(values), dtype=STR) if dtype is STR else np.asarray(values, dtype=dtype)
    return out


def fingerprint(settings: StoreSettings, arrays: dict[str, Any]) -> str:
    """What a store's rows are (spec, keys, labels, status, resume keys), independent of how it was written:
    a reader holding a closed store reopens the path only if this still matches."""
    h = hashlib.sha256()
    for part in (settings.spec.to_json(), "\n".join(str(k) for k in arrays["paths"])):
        h.update(part.encode())
    for name in ("labels", "status", "file_size", "file_mtime_ns"):
        h.update(np.ascontiguousarray(arrays[name], dtype=ROW_DATASETS[name]).tobytes())
    return h.hexdigest()


def shards_dir(path: str | os.PathLike) -> Path:
    """The folder beside a sharded store's manifest that holds its shards: ``feats.h5`` -> ``feats.h5.shards``.

    Always derived from the manifest's current name, so a renamed or copied pair reads its own shards.
    """
    path = Path(path)
    return path.with_name(path.name + ".shards")


def features_elided(path: str | os.PathLike) -> bool:
    """Whether the shard file at `path` is a metadata copy, whose features were never written
    (`embedfit.storage.shards.metadata_copy`); False when it does not open."""
    try:
        with h5py.File(path, "r") as f:
            return bool(attr(f.attrs, FEATURES_ELIDED, 0))
    except (OSError, ValueError):
        return False


def shard_names(attrs: Any) -> list[str]:
    """The shard files a manifest names ([] for a single-file store)."""
    if attr(attrs, "layout") != LAYOUT:
        return []
    return list(json.loads(attr(attrs, "shards", "[]")))


@contextlib.contextmanager
def new_file(path: Path) -> Iterator[h5py.File]:
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


def why(exc: BaseException) -> str:
    """The reason of an OS or HDF5 error on one line (the OS's words when HDF5 wraps them in its own)."""
    text = " ".join(str(getattr(exc, "strerror", None) or exc).split())
    os_error = re.search(r"error message = '([^']+)'", text)
    return os_error.group(1) if os_error else text


def damaged(path: Path | str, what: str, exc: BaseException) -> str:
    """The message for a store whose `what` cannot be read."""
    return (f"feature store {path} is damaged: cannot read its {what} ({why(exc)}); re-extract it with "
            "`embedfit extract ... --overwrite`")


def quiet_hdf5() -> None:
    """Stop HDF5 printing its error stack to stderr: h5py turns errors into exceptions, but only silences the
    printing in the thread that imported it (parts are written from a background thread)."""
    with contextlib.suppress(Exception):
        h5py._errors.silence_errors()


def ensure_space(directory: Path, n_rows: int, dim: int, itemsize: int, key_bytes: int) -> None:
    """Refuse a write that cannot fit: HDF5 can crash the process when the disk fills mid-write."""
    need = n_rows * (dim * itemsize + 64) + key_bytes + (1 << 20)  # features, per-row metadata, HDF5 overhead
    free = shutil.disk_usage(directory).free
    if free < need:
        raise StoreError(f"cannot write to {directory}: No space left on device (need ~{need / 1e6:.1f} MB, "
                         f"{free / 1e6:.1f} MB free); nothing already stored was changed")
