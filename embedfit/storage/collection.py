"""Collections: a store of stores, read as one store. `collect` makes one here; `FeatureStore.open` reads it
(`embedfit.storage.reader.StoreCollection`, beside the other layouts it reads).

At a billion images one store is a collection of stores (one per top-level folder, or per CSV part), each extracted
on its own and resumable on its own. A collection is a small JSON file, ``feats.collection.json``:

    {"format": "embedfit-collection", "version": 1, "created": "...",
     "members": [{"path": "part1/feats.h5", "rows": 1200, "fingerprint": "...", "metadata_sha256": "...",
                  "root": "/data/photos/part1"}, ...]}

Why JSON and not HDF5: a collection holds no per-row data (copying a billion keys into one more file is what a
collection exists to avoid), only the list of its members and what each was when it was collected; JSON keeps that
readable and diffable by anything (`json.load`, `jq`, a code review). Plain `h5py` readability stays a property of
each member, found by its `path`.

Rules (`embedfit.storage.reader.open_collection`, `collect`):

* **Where members are.** Each member's `path` is relative to the collection file's folder (POSIX separators), so the
  collection and its members moved or copied together still read, like a sharded store's shards beside its manifest;
  a member elsewhere (another bucket, another drive) is recorded by its absolute path or URL.
* **Checked per member, not per row.** Opening checks each member as any store opens (its own metadata digest,
  its shards), then compares its row count, `fingerprint`, `metadata_sha256` and image root with what the collection
  recorded: a missing, swapped or changed member (re-extracted or resumed since) is a one-line `StoreError` saying
  to run `embedfit collect` again.
* **One rule for mixing.** Every member must have the same `StoreSettings` (`check_mixable(..., same_store=True)`,
  the rule rows of one store obey), because a collection presents one store: one backbone spec, TTA, dtype and
  precision, recorded as such in every model fitted on it.
* **Rows.** The members' rows, member after member in the order listed. Keys become relative to the folder the
  members' image roots have in common (``part1/cats/x.jpg`` for a member extracted from ``/data/photos/part1``
  when the other is ``/data/photos/part2``), so each key still names one image file; absolute keys and URLs stay as
  they are. Class names are the sorted union of the members' (the order `extract` gives one store), labels
  re-indexed by name.
* **No image twice.** An image key in two members (overlapping folders or CSV parts, a folder collected twice) is
  refused in one line by `collect`, naming the key and both members. Neither member "wins": members have no order
  in time (shards do: the newest row of a key wins there), so any choice would be silent, and a collection's rows
  would no longer be the sum of its members'. The check costs a sort of the keys once, at `collect`; opening relies
  on the recorded digests and roots, which fix every member's keys.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import posixpath
import tempfile
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedfit.errors import StoreError, UsageError
from embedfit.storage.reader import FORMAT, VERSION, FeatureStore, StoreCollection, is_collection, open_collection


def collect(output: str | os.PathLike, members: Sequence[str | os.PathLike], *,
            check_shards: bool = True) -> StoreCollection:
    """Write a collection of `members` to `output` and return it open.

    Each member is opened and checked (as `embedfit info` does), all must have the same settings, and no image key
    may be in two members. Re-running with the same output replaces the collection (e.g. after a member was
    re-extracted).

    Args:
        output: The collection file, a ``.json`` path or URL; members are recorded relative to its folder.
        members: Stores (local paths or URLs), in the order their rows are to come.
        check_shards: Check sharded members' shards when opening them (per shard).

    Returns:
        The collection, opened from what was written.

    Raises:
        UsageError: `output` is not a ``.json`` name or is another kind of file, no member, a member given twice or
            that is itself a collection, a local member for a collection on object storage.
        StoreError: A member cannot be opened, or two members hold the same image.
        StoreMismatchError: Members made with different settings.
    """
    from embedfit.url import is_url, local_or_url, redact

    out = local_or_url(output)
    if not is_collection(out):
        raise UsageError(f"`output` {output} must be a .json file name, e.g. feats.collection.json")
    if not members:
        raise UsageError("a collection needs at least one member store")
    if not is_url(out):
        _check_output(Path(out))
    given = [local_or_url(m) for m in members]
    for m in given:
        if is_collection(m):
            raise UsageError(f"member {m} is a collection; list its member stores instead")
        if is_url(out) and not is_url(m):
            raise UsageError(f"member {m} is a local file, which a collection on object storage cannot name; "
                             "upload it first")
    seen: dict[str, str] = {}
    for m in given:
        key = m if is_url(m) else os.path.realpath(m)
        if key in seen:
            raise UsageError(f"member {m} is given twice (also as {seen[key]})")
        seen[key] = m
    names = [_relative(m, out) for m in given]
    opened: list[FeatureStore] = []
    try:
        for m in given:
            opened.append(FeatureStore.open(m, check_shards=check_shards))
        collection = StoreCollection(Path(out), opened, names)  # checks the settings, finds the common root
        _refuse_duplicates(collection)
    finally:
        for store in opened:
            store.close()
    doc = {"format": FORMAT, "version": VERSION,
           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "members": [_entry(name, store) for name, store in zip(names, opened, strict=True)]}
    text = json.dumps(doc, indent=1) + "\n"
    if is_url(out):
        _write_remote(out, text)
    else:
        _write_local(Path(out), text)
    return open_collection(redact(out) if is_url(out) else out, check_shards=check_shards)



def _entry(name: str, store: FeatureStore) -> dict[str, Any]:
    return {"path": name, "rows": len(store), "fingerprint": store.fingerprint,
            "metadata_sha256": store.attrs.get("metadata_sha256"), "root": str(store.attrs.get("root", "."))}



def _refuse_duplicates(collection: StoreCollection) -> None:
    """One line naming the first image key held by two members."""
    paths = collection.paths
    if len(paths) < 2:
        return
    order = np.argsort(paths, kind="stable")
    ordered = paths[order]
    same = np.flatnonzero(ordered[1:] == ordered[:-1])
    if not len(same):
        return
    a, b = sorted(order[same[0]:same[0] + 2])
    owner = np.searchsorted(collection.offsets, [a, b], side="right") - 1
    names = collection.member_paths
    raise StoreError(f"members {names[owner[0]]} and {names[owner[1]]} both hold image {paths[a]}"
                     + (f" ({len(same) - 1} more image(s) held twice)" if len(same) > 1 else "")
                     + "; a collection's members must not overlap: collect stores of separate folders or CSV parts")



# --------------------------------------------------------------------------------------------------
# writing


def _relative(member: str, output: str) -> str:
    """How the collection at `output` records `member`: relative to the collection's folder where it can be."""
    from embedfit.url import is_url, redact

    if is_url(output):
        m, o = urllib.parse.urlsplit(redact(member)), urllib.parse.urlsplit(redact(output))
        if (m.scheme, m.netloc) != (o.scheme, o.netloc):
            return redact(member)
        return posixpath.relpath(m.path, posixpath.dirname(o.path) or "/")
    if is_url(member):
        return redact(member)
    return Path(os.path.relpath(os.path.abspath(member), os.path.dirname(os.path.abspath(output)))).as_posix()


def _check_output(path: Path) -> None:
    """Refuse an output that cannot be written or that holds anything but a collection (which is replaced)."""
    from embedfit.errors import artifact_kind, check_output_file

    if artifact_kind(path) == "store collection" and not path.is_symlink():
        return
    check_output_file(path)
    if path.exists():
        raise UsageError(f"`output` {path} is an existing file that is not a store collection; write to another "
                         "file so it is not overwritten")


def _write_local(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (`runs.files.atomic_write`: a temporary file beside it, then renamed)."""
    from embedfit.runs.files import atomic_write

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text)
    except OSError as exc:
        raise StoreError(f"cannot write collection {path}: {exc.strerror or exc}") from None


def _write_remote(url: str, text: str) -> None:
    """Upload `text` as one object (one PUT: readers see the old collection or the new one)."""
    from embedfit.url import put_file

    with tempfile.TemporaryDirectory(prefix="embedfit-collection-") as tmp:
        local = Path(tmp) / posixpath.basename(url)
        local.write_text(text, encoding="utf-8")
        put_file(local, url)

