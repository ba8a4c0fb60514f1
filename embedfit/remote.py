"""Object storage: image sources and feature stores given as fsspec URLs (``s3://``, ``gs://``, ``az://``, ``file://``).

Everything that touches a URL goes through here, so the rest of embedfit keeps working on local paths:

* `check_url` / `local_or_url` decide what a ``scheme://`` string is: ``file://`` becomes a local path; a supported
  object store stays a URL; an unknown scheme or a missing backend package (s3fs, gcsfs, adlfs) is a one-line
  `UsageError` naming what to install. A URL that `pathlib.Path` has collapsed (``s3:/bucket``) is refused too, so
  a URL never turns into a local file by accident.
* `scan_remote` lists a folder (prefix) of images with one listing; the resume key of each object is its size and
  last-modified time from that listing. `read_bytes` fetches one object for decoding; each process (each DataLoader
  worker) uses its own filesystem object, as fsspec's instance cache is per process.
* `open_store` reads a store from object storage through a local copy, kept in a cache keyed by the URL and the
  object's ETag, size and modification time. HDF5 does many small reads (metadata, then chunks); through a network
  file object each would be a ranged GET, and `fit` reads every row anyway, so one download is both simpler and
  faster, and a second command on an unchanged store downloads nothing.
* `staged_store` writes a store to object storage: the existing store is downloaded to a local staging folder, the
  ordinary crash-safe `StoreWriter` runs there (parts, resume, lock), and the committed file is uploaded whole. One
  PUT (or a completed multipart upload) replaces the object atomically, so readers see the previous complete store
  or the new complete one, never a partial file. The lock is local: writers on different machines are not kept
  apart, although a store that changed on the remote while a run worked is not overwritten, and a new store is
  created with a conditional put (``If-None-Match``) on S3.
* A sharded store (`embedfit.shards`) travels as its manifest plus ``<store>.shards/``: reading downloads the shards
  the manifest names (once each: a shard never changes after it is written); writing uploads the new shards first
  and the manifest last, then deletes the shards it no longer names, so a reader never meets a manifest whose
  shards are not there. On Ray, each worker uploads the shards it writes (`put_file`), so no filesystem needs to
  be shared; the driver downloads each one (`get_file`) into its staging folder to build the manifest.

Credentials come from the backend's usual configuration (environment, ``~/.aws``, instance roles); embedfit never
records them: URLs are written into stores and run directories through `redact`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import importlib.util
import json
import os
import posixpath
import re
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePath
from typing import Any, TypeVar

from embedfit.errors import DecodeError, InputError, StoreError, StoreLockedError, UsageError

__all__ = ["BACKENDS", "check_url", "is_url", "local_or_url", "open_store", "read_bytes", "redact", "scan_remote",
           "staged_store"]

BACKENDS: dict[str, str] = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
                            "abfs": "adlfs", "abfss": "adlfs"}
"""Supported object-storage schemes and the package fsspec needs for each (``file://`` needs none)."""

_INSTALL = {"s3fs": "pip install 'embedfit[s3]'", "gcsfs": "pip install gcsfs", "adlfs": "pip install adlfs"}
# Two letters at least, so a Windows drive ("C:\\") is never taken for a scheme.
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
_COLLAPSED = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/(?!/)")
_MAX_OBJECT_BYTES = 1 << 30  # an "image" larger than this is not read whole into a worker's memory

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# what a path is


def is_url(path: object) -> bool:
    """True for a ``scheme://...`` string (any scheme, supported or not)."""
    return isinstance(path, str) and _URL.match(path) is not None


def check_url(url: str) -> str:
    """Check that `url` can be used: its scheme is supported and its backend package is installed.

    Returns:
        The scheme, lower-cased.

    Raises:
        UsageError: Unsupported scheme, or the backend (s3fs, gcsfs, adlfs) is not installed; one line that says
            what to install.
    """
    match = _URL.match(url)
    if match is None:
        raise UsageError(f"{redact(url)} is not a URL")
    scheme = match.group(1).lower()
    if scheme == "file":
        return scheme
    package = BACKENDS.get(scheme)
    if package is None:
        raise UsageError(f"unsupported URL scheme {scheme}:// in {redact(url)}; embedfit reads local paths, file:// "
                         f"and object storage ({', '.join(s + '://' for s in ('s3', 'gs', 'az'))})")
    missing = [p for p in ("fsspec", package) if importlib.util.find_spec(p) is None]
    if missing:
        raise UsageError(f"{scheme}:// URLs need the {' and '.join(missing)} package{'s' * (len(missing) > 1)}, "
                         f"which {'are' if len(missing) > 1 else 'is'} not installed: {_INSTALL[package]}")
    return scheme


def local_or_url(path: str | os.PathLike[str]) -> str:
    """A checked URL for object storage, or a local path (``file://`` URLs become local paths).

    Raises:
        UsageError: An unusable URL (see `check_url`), or a `pathlib.Path` holding a URL whose ``//`` it collapsed.
    """
    if isinstance(path, PurePath):
        text = str(path)
        if _COLLAPSED.match(text):
            raise UsageError(f"{text} looks like a URL that pathlib.Path collapsed ('//' became '/'); pass the URL "
                             "as a string")
        return text
    text = os.fsdecode(path)
    if not is_url(text):
        return text
    if check_url(text) == "file":
        parsed = urllib.parse.urlsplit(text)
        if parsed.netloc not in ("", "localhost"):
            raise UsageError(f"{text}: file:// URLs name this machine (file:///path), not host {parsed.netloc!r}")
        return urllib.parse.unquote(parsed.path)
    return text


def redact(url: str) -> str:
    """`url` without credentials: no ``user:password@`` and no query string (where signed URLs keep their keys)."""
    if not is_url(url):
        return url
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def join(base: str, relative: str) -> str:
    """`relative` (a POSIX path) resolved against the folder URL `base`."""
    parts = urllib.parse.urlsplit(base)
    path = posixpath.normpath(posixpath.join(parts.path or "/", relative))
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _fs(url: str) -> tuple[Any, str]:
    """(filesystem, path inside it). fsspec caches filesystem objects per process: one per DataLoader worker."""
    check_url(url)
    import fsspec

    return fsspec.core.url_to_fs(url)


def _url(fs: Any, path: str) -> str:
    return fs.unstrip_protocol(path)


def _mtime_ns(info: dict[str, Any]) -> int:
    """Last-modified time from a listing entry (S3 ``LastModified``, GCS ``updated``, Azure ``last_modified``)."""
    for key in ("LastModified", "last_modified", "mtime", "updated", "modified", "created"):
        value = info.get(key)
        if value is None:
            continue
        with contextlib.suppress(ValueError, TypeError, OverflowError):
            if isinstance(value, str):
                value = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            if isinstance(value, _dt.datetime):
                if value.tzinfo is None:
                    value = value.replace(tzinfo=_dt.timezone.utc)
                delta = value - _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
                return (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000
            return int(float(value) * 1e9)
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")  # no time: the content tag still changes
    return int.from_bytes(hashlib.sha256(str(etag).encode()).digest()[:7], "big") if etag else 0


def _identity(info: dict[str, Any]) -> dict[str, Any]:
    """What says an object is unchanged: ETag (or generation/md5), size and modification time."""
    tag = info.get("ETag") or info.get("etag") or info.get("generation") or info.get("md5Hash") or ""
    return {"etag": str(tag).strip('"'), "size": int(info.get("size") or 0), "mtime_ns": _mtime_ns(info)}


def _errors(what: str) -> Callable[[BaseException], str]:
    def reason(exc: BaseException) -> str:
        if isinstance(exc, FileNotFoundError):
            return f"{what} not found"
        if isinstance(exc, PermissionError):
            return f"no permission to read {what}"
        return f"cannot read {what}: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
    return reason


# --------------------------------------------------------------------------------------------------
# images


def read_bytes(url: str, size: int | None = None) -> bytes:
    """The bytes of one object, for `decode_image`; any failure is a `DecodeError` (a per-file failure).

    Args:
        url: The object.
        size: Its size from the listing, when known, to refuse absurdly large objects before reading them.
    """
    if size is not None and size > _MAX_OBJECT_BYTES:
        raise DecodeError(f"object is {size} bytes, more than the {_MAX_OBJECT_BYTES >> 20} MiB read for one image")
    try:
        fs, path = _fs(url)
        data = fs.cat_file(path)
    except UsageError:
        raise
    except Exception as exc:  # network, permissions, a vanished object: this image fails, the run goes on
        raise DecodeError(_errors("object")(exc)) from None
    if not data:
        raise DecodeError("empty object (0 bytes)")
    return bytes(data)


def stat_many(urls: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) per URL, (-1, 0) when missing; one listing per folder rather than one request per object."""
    listings: dict[str, dict[str, dict[str, Any]]] = {}
    out: dict[str, tuple[int, int]] = {}
    for url in urls:
        fs, path = _fs(url)
        parent = posixpath.dirname(path)
        folder = f"{fs.protocol}:{parent}"
        if folder not in listings:
            try:
                fs.invalidate_cache()
                listings[folder] = {fs._strip_protocol(e["name"]): e for e in fs.ls(parent, detail=True)}
            except Exception:
                listings[folder] = {}
        info = listings[folder].get(fs._strip_protocol(path))
        out[url] = (int(info.get("size") or 0), _mtime_ns(info)) if info and info.get("type") != "directory" \
            else (-1, 0)
    return out


def read_text(url: str) -> str:
    """A text object (a CSV list), decoded as UTF-8 (a byte-order mark is dropped).

    Raises:
        InputError: It does not exist or cannot be read.
    """
    try:
        fs, path = _fs(url)
        data = fs.cat_file(path)
    except UsageError:
        raise
    except Exception as exc:
        raise InputError(f"cannot read {redact(url)}: {_errors('it')(exc)}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"cannot read {redact(url)}: not UTF-8 text (byte {exc.start})") from exc


def scan_remote(url: str) -> tuple[str, str, list[tuple[str, int, int]], list[str], list[tuple[str, str]]]:
    """List a folder URL (prefix) or a CSV object, with one recursive listing.

    Returns:
        ``(kind, root, found, first_level, skipped)``: kind ``"folder"`` or ``"csv"``; root, the folder URL
        (or the CSV's URL); for folders ``(key, size, mtime_ns)`` of every image object, key relative to the root;
        the names of first-level sub-folders; ``(key, reason)`` of what was deliberately left out. The same rules as
        for local folders: hidden names and ``__MACOSX`` are skipped, extensions match case-insensitively.

    Raises:
        InputError: Nothing exists at `url`.
    """
    from embedfit.images import _has_image_extension

    fs, path = _fs(url)
    stripped = fs._strip_protocol(path).rstrip("/")
    root = _url(fs, stripped)
    try:
        fs.invalidate_cache()  # listings cached earlier in this process (of any sub-folder) may predate new objects
        entries = fs.find(stripped, detail=True, withdirs=False)
        # find() on an object's own name lists that object: the URL names a file, not a folder.
        is_file = stripped in {fs._strip_protocol(n) for n in entries} or (not entries and fs.isfile(stripped))
    except Exception as exc:
        raise InputError(f"cannot list {redact(url)}: {_errors('it')(exc)}") from None
    if is_file:
        if stripped.lower().endswith(".csv"):
            return "csv", root, [], [], []
        raise InputError(f"{redact(url)} is not a folder or a .csv file; expected a folder of images or a CSV list")
    if not entries:
        raise InputError(f"{redact(url)} does not exist (no objects under this prefix)")
    base = fs._strip_protocol(path).rstrip("/") + "/"
    found: list[tuple[str, int, int]] = []
    first_level: set[str] = set()
    skipped: list[tuple[str, str]] = []
    for name, info in sorted(entries.items()):
        name = fs._strip_protocol(name)
        if not name.startswith(base) or info.get("type") == "directory" or name.endswith("/"):
            continue  # folder markers some tools write
        key = name[len(base):]
        parts = key.split("/")
        if "/" in key and not parts[0].startswith(".") and parts[0] != "__MACOSX":
            first_level.add(parts[0])
        if any(p.startswith(".") for p in parts):
            if _has_image_extension(parts[-1]) and parts[-1].startswith("."):
                skipped.append((key, "AppleDouble metadata file (._*)" if parts[-1].startswith("._") else
                                "hidden file"))
            continue
        if "__MACOSX" in parts[:-1]:
            folder = "/".join(parts[:parts.index("__MACOSX") + 1]) + "/"
            if (folder, "macOS archive metadata folder") not in skipped:
                skipped.append((folder, "macOS archive metadata folder"))
            continue
        if _has_image_extension(parts[-1]):
            found.append((key, int(info.get("size") or 0), _mtime_ns(info)))
    return "folder", root, found, sorted(first_level), skipped


# --------------------------------------------------------------------------------------------------
# stores


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
        raise error(f"cannot reach {redact(url)}: {_errors('it')(exc)}") from None


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
    """The shard files a manifest names ([] for a single-file store): they travel with it (`embedfit.shards`)."""
    import h5py

    from embedfit.shards import LAYOUT
    from embedfit.store import _attr

    try:
        with h5py.File(local, "r") as f:
            return list(json.loads(_attr(f.attrs, "shards", "[]"))) if _attr(f.attrs, "layout") == LAYOUT else []
    except (OSError, ValueError):
        return []


def put_file(local: str | os.PathLike, url: str) -> None:
    """Upload one finished file whole (one PUT: the object is absent or complete); a failure is a `StoreError`."""
    fs, path = _fs(url)
    try:
        fs.put_file(str(local), path)
    except Exception as exc:
        raise StoreError(f"cannot upload {Path(local).name} to {redact(url)}: {_errors('it')(exc)}") from None


def get_file(url: str, local: str | os.PathLike) -> None:
    """Download one object to `local` (a temporary name, then renamed: absent or complete)."""
    fs, path = _fs(url)
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{os.getpid()}.download")
    try:
        fs.get_file(path, str(tmp))
        os.replace(tmp, local)
    except Exception as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StoreError(f"cannot download {redact(url)} to {local.parent}: {_errors('it')(exc)}") from None


def _get_shards(url: str, local: Path) -> None:
    """Download the shards the manifest at `local` names and the folder beside it lacks. A shard never changes
    once written (its name is fixed by run and sequence), so one present by name is current."""
    from embedfit.shards import shards_dir

    folder = shards_dir(local)
    for name in _shard_names(local):
        if not (folder / name).is_file():
            get_file(f"{url}.shards/{name}", folder / name)


def _put_shards(fs: Any, path: str, local: Path) -> list[str]:
    """Upload the shards the committed manifest at `local` names that the remote folder lacks (before the
    manifest, so a reader never finds a manifest without its shards); returns the remote shards it no longer
    names, for deletion after the manifest is in place."""
    from embedfit.shards import shards_dir

    names = _shard_names(local)
    remote = f"{path}.shards"
    try:
        there = {posixpath.basename(p) for p in fs.ls(remote, detail=False)} if fs.exists(remote) else set()
    except FileNotFoundError:
        there = set()
    for name in names:
        if name not in there:
            fs.put_file(str(shards_dir(local) / name), f"{remote}/{name}")
    return sorted(n for n in there if n.startswith("shard-") and n not in set(names))


def open_store(url: str) -> Any:
    """Open a store on object storage through a local copy (downloaded unless the cached copy is current).

    Returns:
        A `FeatureStore` whose `path` is the local copy and whose `url` (and `summary()["path"]`) is the URL
        (without credentials); runs fitted on it record the URL.

    Raises:
        StoreError: Nothing at the URL, a folder, or it cannot be downloaded or read.
    """
    from embedfit.store import FeatureStore

    fs, path = _fs(url)
    info = _remote_info(fs, path, url)
    if info is None or info.get("type") == "directory":
        if info is None and fs.exists(path.rstrip("/") + ".parts"):
            raise StoreError(f"{redact(url)} is not finished: an extraction was interrupted before its first save; "
                             "re-run the same `embedfit extract` command to resume")
        raise StoreError(f"feature store {redact(url)} " + ("does not exist" if info is None else
                                                           "is a folder, not a feature store"))
    identity = _identity(info)
    local = _slot("stores", url) / posixpath.basename(path.rstrip("/"))
    if not local.is_file() or _read_source(local) != identity:
        _download(url, local, identity)
    _get_shards(url, local)  # a sharded store: the shards its manifest names, once each
    store = _remote_store_class(FeatureStore).open(local)
    store.url = redact(url)
    return store


@functools.cache
def _remote_store_class(base: type) -> type:
    """`FeatureStore` read from a local copy, shown (summary, repr) by its URL; defined lazily (h5py)."""

    class RemoteFeatureStore(base):  # type: ignore[misc,valid-type]
        url: str = ""

        def summary(self) -> dict[str, Any]:
            return {**super().summary(), "path": self.url, "local_copy": str(self.path)}

        def __repr__(self) -> str:
            return super().__repr__().replace(f"'{self.path}'", f"'{self.url}'", 1)

    return RemoteFeatureStore


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

    fs, path = _fs(url)
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
        before = _identity(info) if info is not None else None
        if before is None:
            if _read_source(local) is not None:  # a copy of a store that was deleted remotely since: start afresh
                with contextlib.suppress(OSError):
                    local.unlink()
                _source_file(local).unlink()
        elif not overwrite and (not local.is_file() or _read_source(local) != before):
            _download(url, local, before)
        if before is not None and not overwrite:
            _get_shards(url, local)
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
    now = _identity(info) if info is not None else None
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
        _write_source(local, url, _identity(fs.info(path)))
        for name in stale:  # superseded shards, as a local commit deletes them
            with contextlib.suppress(Exception):
                fs.rm_file(f"{path}.shards/{name}")
    except FileExistsError:
        raise StoreError(f"{shown} was created by another writer while this run worked, so it was not "
                         f"overwritten; {keep}") from None
    except Exception as exc:
        raise StoreError(f"cannot upload the store to {shown}: {_errors('it')(exc)}; {keep}; re-run to "
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


# --------------------------------------------------------------------------------------------------
# the command line


def check_cli_urls(argv: Sequence[str], command: Any) -> None:
    """Refuse, as a usage error, URLs given where embedfit has no use for them, before any work starts.

    Every ``scheme://`` token is checked (`check_url`), and a URL reaching a parameter typed `pathlib.Path` (which
    would collapse it into a local path such as ``./s3:/bucket/x``) is refused naming the option. Parameters that
    take URLs are typed ``str``.

    Args:
        argv: The command-line arguments.
        command: The click command of the app (``typer.main.get_command(app)``).
    """
    urls = []
    for token in argv:
        value = token.split("=", 1)[1] if token.startswith("--") and "=" in token else token
        if is_url(value):
            check_url(value)
            urls.append(value)
    if not urls:
        return
    collapsed = {os.path.normpath(u): u for u in urls}
    argv = list(argv)
    at = next((i for i, a in enumerate(argv) if a in getattr(command, "commands", {})), None)
    if at is None:
        return
    name = argv[at]
    try:
        ctx = command.make_context("embedfit", argv[:at], resilient_parsing=True)
        sub = command.get_command(ctx, name)
        sub_ctx = sub.make_context(name, argv[at + 1:], parent=ctx, resilient_parsing=True)
    except Exception:
        return  # the real run reports the parsing problem
    for param in sub.params:
        values = sub_ctx.params.get(param.name)
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if isinstance(value, PurePath) and str(value) in collapsed:
                flag = max(param.opts, key=len) if param.opts and param.opts[0].startswith("-") else \
                    param.name.upper()
                raise UsageError(f"{name} {flag}: {redact(collapsed[str(value)])} is a URL, but {flag} takes a "
                                 "local path (URLs work for extract's source and --output, info, fit's store and "
                                 "--test-store, and predict's inputs)")
