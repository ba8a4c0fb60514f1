"""Stores on object storage: read through a local cache that heals itself, written through a staging copy.

* `cached_copy` gives a local copy of the store at a URL, kept in a cache keyed by the URL; what was copied (the
  object's ETag, size and modification time) is recorded beside the copy. HDF5 does many small reads (metadata,
  then chunks); through a network file object each would be a ranged GET, and `fit` reads every row anyway, so one
  download is both simpler and faster, and a second command on an unchanged store downloads nothing. A cached file
  whose size is not the one recorded (truncated, or replaced by hand) is downloaded again; a copy that still fails
  to open is downloaded again once (`FeatureStore.open`) before the store is called damaged.
* `staged_store` writes a store to object storage: the existing store is downloaded to a local staging folder, the
  ordinary crash-safe writer runs there (parts, resume, lock), and the committed file is uploaded whole. One
  PUT (or a completed multipart upload) replaces the object atomically, so readers see the previous complete store
  or the new complete one, never a partial file. The lock is local: writers on different machines are not kept
  apart, although a store that changed on the remote while a run worked is not overwritten, and a new store is
  created with a conditional put (``If-None-Match``) on S3.
* A sharded store (`embedfit.storage.shards`) travels as its manifest plus ``<store>.shards/``, both named after the
  URL the store is read from (a copied key reads its own copied shards): reading downloads the shards the manifest
  names (once each: a shard never changes after it is written); writing uploads the new shards first and the
  manifest last, then deletes the shards it no longer names, so a reader never meets a manifest whose shards are
  not there. On Ray, each worker uploads the shards it writes (`embedfit.url.put_file`) and returns a metadata copy
  of each (`embedfit.storage.shards.metadata_copy`: no features), which the driver puts in its staging folder under
  the shard's name to build the manifest; it downloads no shard. Such a copy never stands for its shard elsewhere:
  the upload refuses it (`_put_shards`), and the next staged run replaces it by the shard (`_replace_copies`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import h5py

from embedfit.errors import StoreError, StoreLockedError
from embedfit.storage.schema import features_elided, shard_names, shards_dir
from embedfit.url import filesystem, get_file, object_identity, read_reason, redact

T = TypeVar("T")


def cache_dir() -> Path:
    """Where remote stores are copied and staged: ``$XDG_CACHE_HOME/embedfit/remote`` (``~/.cache`` by default)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "embedfit" / "remote"


def _slot(kind: str, url: str) -> Path:
    """A folder per URL (credentials never part of the name); the store keeps its own file name inside."""
    clean = redact(url)
    return cache_dir() / kind / hashlib.sha256(clean.encode()).hexdigest()[:20]


def _remote_info(fs: Any, path: str, url: str, error: type[Exception] = StoreError) -> dict[str, Any] | None:
    try:
        fs.invalidate_cache(path)  # the object as it is now, not as a cached listing saw it
        return fs.info(path)
    except FileNotFoundError:
        return None
    except Exception as exc:
        raise error(f"cannot reach {redact(url)}: {read_reason('it')(exc)}") from None


def _download(url: str, local: Path, identity: dict[str, Any]) -> None:
    """Copy the object to `local` (`get_file`) and record what was copied beside it."""
    get_file(url, local)
    _write_source(local, url, identity)


def _source_file(local: Path) -> Path:
    return local.with_name(local.name + ".source.json")


def _write_source(local: Path, url: str, identity: dict[str, Any]) -> None:
    tmp = local.with_name(f".{local.name}.source.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"url": redact(url), **identity}))
    os.replace(tmp, _source_file(local))


def _read_source(local: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(_source_file(local).read_text())
    except (OSError, ValueError):
        return None
    data.pop("url", None)
    return data


def _shard_names(local: Path) -> list[str]:
    """The shard files a manifest names ([] for a single-file store): they travel with it."""
    try:
        with h5py.File(local, "r") as f:
            return shard_names(f.attrs)
    except (OSError, ValueError):
        return []


def _current(local: Path) -> dict[str, Any] | None:
    """What was recorded when `local` was downloaded, if the file is still that copy (its size), else None."""
    recorded = _read_source(local)
    try:
        size = local.stat().st_size
    except OSError:
        return None
    return recorded if recorded is not None and recorded.get("size") == size else None


def _get_shards(url: str, local: Path, refresh: bool = False, *, missing_ok: bool = False) -> None:
    """Download the shards the manifest at `local` names that the folder beside it lacks (or, with `refresh`, all
    of them). A shard never changes once written (its name is fixed by run and sequence), so a copy present by
    name and of the size recorded at its download is current. `missing_ok`: a shard that cannot be downloaded is
    left out (a writer's resume embeds its images again) instead of failing."""
    folder = shards_dir(local)
    for name in _shard_names(local):
        shard = folder / name
        if refresh or _current(shard) is None:
            shard_url = f"{url}.shards/{name}"
            try:
                get_file(shard_url, shard)
            except StoreError:
                if not missing_ok:
                    raise
                with contextlib.suppress(OSError):
                    shard.unlink()  # a stale or partial copy must not stand in for it
                continue
            _write_source(shard, shard_url, {"size": shard.stat().st_size})


def _replace_copies(url: str, local: Path) -> None:
    """Replace the metadata copies in the staging folder of `local` (what a Ray driver keeps of the shards its
    actors uploaded: `embedfit.storage.shards.metadata_copy`) by the shards themselves, or delete those the remote
    lacks (their images are embedded again), so that the writer resumes from shards with features only.

    A copy never has a download record (`_get_shards` writes one only for a shard it downloaded), so after
    `_get_shards` the only files to open are the copies of a run killed before it uploaded its manifest."""
    folder = shards_dir(local)
    for shard in sorted(folder.glob("shard-*.h5")) if folder.is_dir() else []:
        if _current(shard) is not None or not features_elided(shard):
            continue
        shard_url = f"{url}.shards/{shard.name}"
        try:
            get_file(shard_url, shard)
        except StoreError:
            with contextlib.suppress(OSError):
                shard.unlink()
            continue
        _write_source(shard, shard_url, {"size": shard.stat().st_size})


def cached_copy(url: str, *, refresh: bool = False) -> Path:
    """A local copy of the store at `url` (and of its shards), downloaded unless the cached copy is current.

    Args:
        url: The store on object storage.
        refresh: Download everything again, whatever the cache holds (a copy that failed to open).

    Returns:
        The local manifest or store file.

    Raises:
        StoreError: Nothing at the URL, a folder, or it cannot be downloaded.
    """
    fs, path = filesystem(url)
    info = _remote_info(fs, path, url)
    if info is None or info.get("type") == "directory":
        if info is None and fs.exists(path.rstrip("/") + ".parts"):
            raise StoreError(f"{redact(url)} is not finished: an extraction was interrupted before its first save; "
                             "re-run the same `embedfit extract` command to resume")
        raise StoreError(f"feature store {redact(url)} " + ("does not exist" if info is None else
                                                           "is a folder, not a feature store"))
    identity = object_identity(info)
    local = _slot("stores", url) / posixpath.basename(path.rstrip("/"))
    if refresh or _current(local) != identity:  # new, changed remotely, or a damaged cached copy
        _download(url, local, identity)
    _get_shards(url, local, refresh)  # a sharded store: the shards its manifest names, once each
    return local


def _put_shards(fs: Any, path: str, local: Path) -> list[str]:
    """Upload the shards the committed manifest at `local` names that the remote folder lacks (before the
    manifest, so a reader never finds a manifest without its shards); returns the remote shards it no longer
    names, for deletion after the manifest is in place."""
    names = _shard_names(local)
    remote = f"{path}.shards"
    fs.invalidate_cache(remote)  # the folder as it is now: the actors of a Ray run uploaded to it meanwhile
    try:
        there = {posixpath.basename(p) for p in fs.ls(remote, detail=False)} if fs.exists(remote) else set()
    except FileNotFoundError:
        there = set()
    missing = [n for n in names if n not in there]
    copies = [n for n in missing if features_elided(shards_dir(local) / n)]
    if copies:  # only its metadata is here: uploading it would put a shard without features in its place
        raise StoreError(f"shard {copies[0]} is missing from the remote store (its worker uploaded it: deleted "
                         "since?) and this machine holds only its metadata copy; re-run to embed its images again")
    for name in missing:
        fs.put_file(str(shards_dir(local) / name), f"{remote}/{name}")
    return sorted(n for n in there if n.startswith("shard-") and n not in set(names))




@contextlib.contextmanager
def staged_store(url: str, *, overwrite: bool = False) -> Iterator[Path]:
    """A local file standing for the store at `url` for one writing run; uploaded whole when it was committed.

    The existing store is downloaded first (unless the staged copy is that very version, or `overwrite`), so the
    run resumes from it; a killed run's parts stay in the staging folder for the next run on this machine. After
    the run, a store file that changed is uploaded, also when the run ended with an error after saving its work.

    Raises:
        StoreLockedError: Another process on this machine is writing the same URL.
        StoreError: The remote store changed while this run worked (another machine wrote it), or the upload failed;
            the run's store stays in the staging folder, which the message names.
    """
    import fcntl

    fs, path = filesystem(url)
    shown = redact(url)
    slot = _slot("staging", url)
    slot.mkdir(parents=True, exist_ok=True)
    local = slot / posixpath.basename(path.rstrip("/"))
    with open(slot / "stage.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreLockedError(f"{shown} is being written by another embedfit process on this machine; wait "
                                   "for it to finish") from None
        info = _remote_info(fs, path, url)
        if info is not None and info.get("type") == "directory":
            raise StoreError(f"output {shown} is a folder; give a file name such as {shown.rstrip('/')}/feats.h5")
        before = object_identity(info) if info is not None else None
        if before is None:
            if _read_source(local) is not None:  # a copy of a store that was deleted remotely since: start afresh
                with contextlib.suppress(OSError):
                    local.unlink()
                _source_file(local).unlink()
        elif not overwrite and _current(local) != before:
            _download(url, local, before)
        if before is not None and not overwrite:
            _get_shards(url, local, missing_ok=True)  # the writer repairs what is missing
        if not overwrite:  # a killed Ray run's staging copies, also of a store it never committed
            _replace_copies(url, local)
        state = _state(local)
        try:
            yield local
        finally:
            if _state(local) != state:
                _upload(fs, path, url, local, before)


def _state(local: Path) -> tuple[int, int] | None:
    try:
        st = local.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _upload(fs: Any, path: str, url: str, local: Path, before: dict[str, Any] | None) -> None:
    shown = redact(url)
    info = _remote_info(fs, path, url)
    now = object_identity(info) if info is not None else None
    keep = f"this run's store is kept in {local}"
    if now != before:
        raise StoreError(f"{shown} was changed by another writer while this run worked, so it was not overwritten; "
                         f"{keep}; re-run to resume from the other writer's store")
    try:
        stale = _put_shards(fs, path, local)
        if before is None and fs.protocol and "s3" in fs.protocol:
            fs.put_file(str(local), path, mode="create")  # If-None-Match: two first writers cannot both win
        else:
            fs.put_file(str(local), path)
        _write_source(local, url, object_identity(fs.info(path)))
        for name in stale:  # superseded shards, as a local commit deletes them
            with contextlib.suppress(Exception):
                fs.rm_file(f"{path}.shards/{name}")
    except FileExistsError:
        raise StoreError(f"{shown} was created by another writer while this run worked, so it was not "
                         f"overwritten; {keep}") from None
    except StoreError as exc:  # refused before anything was uploaded (`_put_shards`)
        raise StoreError(f"{shown} was not uploaded: {exc}; {keep}") from None
    except Exception as exc:
        raise StoreError(f"cannot upload the store to {shown}: {read_reason('it')(exc)}; {keep}; re-run to "
                         "upload it") from None


def with_staged_store(url: str, overwrite: bool, run: Callable[[Path], T]) -> T:
    """`run(local)` inside `staged_store(url)`; messages and the result name `url` rather than the staging file."""
    shown = redact(url)
    with staged_store(url, overwrite=overwrite) as local:
        try:
            result = run(local)
        except Exception as exc:
            exc.args = tuple(a.replace(str(local), shown) if isinstance(a, str) else a for a in exc.args)
            raise
    if hasattr(result, "store"):
        result.store = shown
    return result

