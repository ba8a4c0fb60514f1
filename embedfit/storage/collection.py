"""Collections: a store of stores, read as one store.

At a billion images one store is a collection of stores (one per top-level folder, or per CSV part), each extracted
on its own and resumable on its own. A collection is a small JSON file, ``feats.collection.json``:

    {"format": "embedfit-collection", "version": 1, "created": "...",
     "members": [{"path": "part1/feats.h5", "rows": 1200, "fingerprint": "...", "metadata_sha256": "...",
                  "root": "/data/photos/part1"}, ...]}

Why JSON and not HDF5: a collection holds no per-row data (copying a billion keys into one more file is what a
collection exists to avoid), only the list of its members and what each was when it was collected; JSON keeps that
readable and diffable by anything (`json.load`, `jq`, a code review). Plain `h5py` readability stays a property of
each member, found by its `path`.

Rules (`open_collection`, `collect`):

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
import hashlib
import json
import os
import posixpath
import tempfile
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedfit.errors import EmbedfitError, StoreError, UsageError
from embedfit.storage.reader import FeatureStore
from embedfit.storage.schema import FAILED, MISSING, OK, SCHEMA_VERSION, check_mixable

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


# --------------------------------------------------------------------------------------------------
# reading


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
    from embedfit.storage.objects import cache_dir

    resolved = {**doc, "members": [{**m, "path": _resolve(m["path"], base)} for m in doc["members"]]}
    local = cache_dir() / "collections" / hashlib.sha256(url.encode()).hexdigest()[:20] / posixpath.basename(url)
    local.parent.mkdir(parents=True, exist_ok=True)
    _write_local(local, json.dumps(resolved, indent=1) + "\n")
    return local


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


def _entry(name: str, store: FeatureStore) -> dict[str, Any]:
    return {"path": name, "rows": len(store), "fingerprint": store.fingerprint,
            "metadata_sha256": store.attrs.get("metadata_sha256"), "root": str(store.attrs.get("root", "."))}


# --------------------------------------------------------------------------------------------------
# merging


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
    """Write `text` to `path` atomically (a temporary file beside it, then renamed)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise StoreError(f"cannot write collection {path}: {exc.strerror or exc}") from None


def _write_remote(url: str, text: str) -> None:
    """Upload `text` as one object (one PUT: readers see the old collection or the new one)."""
    from embedfit.url import put_file

    with tempfile.TemporaryDirectory(prefix="embedfit-collection-") as tmp:
        local = Path(tmp) / posixpath.basename(url)
        local.write_text(text, encoding="utf-8")
        put_file(local, url)
