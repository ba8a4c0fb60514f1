"""URLs: which ``scheme://`` strings embedfit accepts, and the object-storage access that images and stores share.

Everything that turns a URL into bytes goes through here (fsspec: ``s3://``, ``gs://``, ``az://``, ``file://``), so
the rest of embedfit keeps working on local paths:

* `check_url` / `local_or_url` decide what a ``scheme://`` string is: ``file://`` becomes a local path; a supported
  object store stays a URL; an unknown scheme or a missing backend package (s3fs, gcsfs, adlfs) is a one-line
  `UsageError` naming what to install. A URL that `pathlib.Path` has collapsed (``s3:/bucket``) is refused too, so
  a URL never turns into a local file by accident.
* `list_prefix` lists a folder (prefix) with one listing (`embedfit.images` applies its file rules to it); the
  resume key of each object is its size and last-modified time from that listing. `read_bytes` fetches one object
  for decoding; each process (each DataLoader worker) uses its own filesystem object, as fsspec's instance cache is
  per process.
* `object_identity` says whether an object changed (ETag, size, modification time); `get_file` / `put_file` copy
  whole files (`embedfit.storage.objects` builds the store cache and staging on them).

Credentials come from the backend's usual configuration (environment, ``~/.aws``, instance roles); embedfit never
records them: URLs are written into stores and run directories through `redact`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib.util
import os
import posixpath
import re
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path, PurePath
from typing import Any

from embedfit.errors import DecodeError, InputError, StoreError, UsageError

__all__ = ["BACKENDS", "check_url", "filesystem", "get_file", "is_url", "list_prefix", "local_or_url",
           "object_identity", "put_file", "read_bytes", "read_text", "redact", "stat_many"]

BACKENDS: dict[str, str] = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
                            "abfs": "adlfs", "abfss": "adlfs"}
"""Supported object-storage schemes and the package fsspec needs for each (``file://`` needs none)."""

_INSTALL = {"s3fs": "pip install 'embedfit[s3]'", "gcsfs": "pip install gcsfs", "adlfs": "pip install adlfs"}
# Two letters at least, so a Windows drive ("C:\\") is never taken for a scheme.
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
_COLLAPSED = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/(?!/)")
_MAX_OBJECT_BYTES = 1 << 30  # an "image" larger than this is not read whole into a worker's memory

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


def filesystem(url: str) -> tuple[Any, str]:
    """(filesystem, path inside it). fsspec caches filesystem objects per process: one per DataLoader worker."""
    check_url(url)
    import fsspec

    return fsspec.core.url_to_fs(url)


def mtime_ns(info: dict[str, Any]) -> int:
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


def object_identity(info: dict[str, Any]) -> dict[str, Any]:
    """What says an object is unchanged: ETag (or generation/md5), size and modification time."""
    tag = info.get("ETag") or info.get("etag") or info.get("generation") or info.get("md5Hash") or ""
    return {"etag": str(tag).strip('"'), "size": int(info.get("size") or 0), "mtime_ns": mtime_ns(info)}


def read_reason(what: str) -> Callable[[BaseException], str]:
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
        fs, path = filesystem(url)
        data = fs.cat_file(path)
    except UsageError:
        raise
    except Exception as exc:  # network, permissions, a vanished object: this image fails, the run goes on
        raise DecodeError(read_reason("object")(exc)) from None
    if not data:
        raise DecodeError("empty object (0 bytes)")
    return bytes(data)


def stat_many(urls: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) per URL, (-1, 0) when missing; one listing per folder rather than one request per object."""
    listings: dict[str, dict[str, dict[str, Any]]] = {}
    out: dict[str, tuple[int, int]] = {}
    for url in urls:
        fs, path = filesystem(url)
        parent = posixpath.dirname(path)
        folder = f"{fs.protocol}:{parent}"
        if folder not in listings:
            try:
                fs.invalidate_cache()
                listings[folder] = {fs._strip_protocol(e["name"]): e for e in fs.ls(parent, detail=True)}
            except Exception:
                listings[folder] = {}
        info = listings[folder].get(fs._strip_protocol(path))
        out[url] = (int(info.get("size") or 0), mtime_ns(info)) if info and info.get("type") != "directory" \
            else (-1, 0)
    return out


def read_text(url: str) -> str:
    """A text object (a CSV list), decoded as UTF-8 (a byte-order mark is dropped).

    Raises:
        InputError: It does not exist or cannot be read.
    """
    try:
        fs, path = filesystem(url)
        data = fs.cat_file(path)
    except UsageError:
        raise
    except Exception as exc:
        raise InputError(f"cannot read {redact(url)}: {read_reason('it')(exc)}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"cannot read {redact(url)}: not UTF-8 text (byte {exc.start})") from exc




def list_prefix(url: str) -> tuple[bool, str, list[tuple[str, dict[str, Any]]]]:
    """One recursive listing of a folder URL (prefix).

    Returns:
        ``(is_file, root, entries)``: whether `url` names one object rather than a prefix; the folder's URL
        (without a trailing slash); ``(key, info)`` for every object under it, key relative to the root, in name
        order (folder markers some tools write left out).

    Raises:
        InputError: The listing failed.
    """
    fs, path = filesystem(url)
    stripped = fs._strip_protocol(path).rstrip("/")
    try:
        fs.invalidate_cache()  # listings cached earlier in this process (of any sub-folder) may predate new objects
        found = fs.find(stripped, detail=True, withdirs=False)
        # find() on an object's own name lists that object: the URL names a file, not a folder.
        is_file = stripped in {fs._strip_protocol(n) for n in found} or (not found and fs.isfile(stripped))
    except Exception as exc:
        raise InputError(f"cannot list {redact(url)}: {read_reason('it')(exc)}") from None
    base = stripped + "/"
    entries = []
    for name, info in sorted(found.items()):
        name = fs._strip_protocol(name)
        if name.startswith(base) and info.get("type") != "directory" and not name.endswith("/"):
            entries.append((name[len(base):], info))
    return is_file, fs.unstrip_protocol(stripped), entries


def put_file(local: str | os.PathLike, url: str) -> None:
    """Upload one finished file whole (one PUT: the object is absent or complete); a failure is a `StoreError`."""
    fs, path = filesystem(url)
    try:
        fs.put_file(str(local), path)
    except Exception as exc:
        raise StoreError(f"cannot upload {Path(local).name} to {redact(url)}: {read_reason('it')(exc)}") from None


def get_file(url: str, local: str | os.PathLike) -> None:
    """Download one object to `local` (a temporary name, then renamed: absent or complete)."""
    fs, path = filesystem(url)
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{os.getpid()}.download")
    try:
        fs.get_file(path, str(tmp))
        os.replace(tmp, local)
    except Exception as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StoreError(f"cannot download {redact(url)} to {local.parent}: {read_reason('it')(exc)}") from None




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

