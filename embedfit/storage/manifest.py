"""A sharded store's plan and manifest, streamed: the driver's cost grows with shards, its memory with neither.

The shards (`embedfit.storage.shards`) are each sorted by key. `merged_rows` is a k-way merge of their per-row
metadata that holds only the shards whose key range overlaps the current position (one at a time for a fresh run,
whose shards hold consecutive key ranges), keeps the newest row per key (shards in name order = time order) and
yields sorted blocks of numpy arrays, never a Python object per row. The listing of the input (`Listing`: blocks
of keys, labels, sizes and mtimes in key order, however they are produced) is joined to it block by block:
`plan_blocks` says what each block still needs embedded, and `write_manifest` writes the manifest's per-row
datasets chunk by chunk, its metadata digest and fingerprint hashed on the way (a spill file keeps the datasets the
digest covers after the class names), and its virtual `features` from runs of consecutive shard rows.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from h5py import h5a, h5d, h5f, h5p, h5s

from embedfit.errors import StoreError
from embedfit.storage.schema import (
    DIGEST_NUM,
    DIGEST_STR,
    FAILED,
    MISSING,
    OK,
    ROW_DATASETS,
    ROW_DEFAULTS,
    STR,
    attr,
    why,
)

_BLOCK = 1 << 16  # rows per listing block and per write of the manifest's datasets
_VANISHED = "file no longer present in the input"


@dataclass
class ListingBlock:
    """Consecutive images of the input, in key order: keys (object array of str), labels (indices into the
    listing's class names, -1 unlabeled), sizes and mtimes."""

    keys: np.ndarray
    labels: np.ndarray
    sizes: np.ndarray
    mtimes: np.ndarray
    items: np.ndarray | None = None  # what each row stands for, e.g. its `ImageRecord` (carried along)

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, index: np.ndarray | slice) -> ListingBlock:
        return ListingBlock(self.keys[index], self.labels[index], self.sizes[index], self.mtimes[index],
                            None if self.items is None else self.items[index])


@dataclass
class Listing:
    """The input as a sequence of `ListingBlock`s in ascending key order (no key twice), and its class names.

    `blocks` is called once per pass (a plan, a commit) and may produce the blocks lazily: from a scan held in
    memory (`Listing.of`), or per shard of the input as it is listed, so that no pass needs all of it at once.
    """

    blocks: Callable[[], Iterable[ListingBlock]]
    class_names: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, records: Sequence[Any], class_names: Sequence[str] = ()) -> Listing:
        """The listing of scanned `ImageRecord`s (sorted by key, as `scan_images` returns them)."""
        def blocks() -> Iterator[ListingBlock]:
            for i in range(0, len(records), _BLOCK):
                part = records[i:i + _BLOCK]
                items = np.empty(len(part), dtype=object)
                items[:] = part
                yield ListingBlock(np.array([r.key for r in part], dtype=object),
                                   np.fromiter((r.label for r in part), np.int64, len(part)),
                                   np.fromiter((r.size for r in part), np.int64, len(part)),
                                   np.fromiter((r.mtime_ns for r in part), np.int64, len(part)), items)
        return cls(blocks, list(class_names))


@dataclass
class ShardInfo:
    """What a manifest records of a shard (`shard_index`): rows, first and last key, metadata digest."""

    rows: int
    first: str
    last: str
    sha256: str

    def entry(self) -> dict[str, Any]:
        return {"rows": self.rows, "first": self.first, "last": self.last, "sha256": self.sha256}


def shard_info(path: Path) -> ShardInfo:
    """Read a shard's `ShardInfo` (two keys and one attribute, whatever its size)."""
    with h5py.File(path, "r") as f:
        paths = f["paths"].asstr()
        n = len(paths)
        return ShardInfo(n, paths[0] if n else "", paths[-1] if n else "", attr(f.attrs, "metadata_sha256") or "")


def _read_shard(path: Path) -> dict[str, Any]:
    """A shard's per-row metadata as arrays (labels as class names), its features' shape and its `ShardInfo`.

    h5py's low-level calls (the high-level objects cost more per shard than a shard's reads): one HDF5 read per
    dataset, opened by name, no group listing. Paths and class names are decoded to str in one go; errors and
    content hashes stay UTF-8 bytes, as read: the merge only copies them (h5py writes bytes as they are,
    `_json_items` hashes them as their str would be). Errors are read only where a row failed: the other rows'
    are empty."""
    try:
        fid = h5f.open(os.fsencode(path), h5f.ACC_RDONLY, fapl=_fapl())
        try:
            def dataset(name: str) -> Any:
                try:
                    return h5d.open(fid, name.encode())
                except KeyError:
                    return None

            def read(d: Any) -> np.ndarray:
                out = np.empty(d.shape, dtype=d.dtype)
                if out.size:
                    d.read(h5s.ALL, h5s.ALL, out)
                return out

            paths = _decoded(read(dataset("paths")))
            n = len(paths)
            out: dict[str, Any] = {"paths": paths}
            names = dataset("class_names")
            names = np.array([*(_decoded(read(names)).tolist() if names is not None else []), ""], dtype=object)
            out["label_names"] = names[read(dataset("labels"))]  # -1 -> ""
            out["status"] = read(dataset("status"))
            out["errors"] = np.full(n, b"", dtype=object)
            bad = np.flatnonzero(out["status"] != OK)
            if len(bad):
                d = dataset("errors")
                if len(bad) == n:
                    out["errors"] = read(d)
                else:  # a point selection: HDF5 reads only these strings
                    space = d.get_space()
                    space.select_elements(bad.reshape(-1, 1).astype(np.uint64))
                    picked = np.empty(len(bad), dtype=d.dtype)
                    d.read(h5s.create_simple((len(bad),)), space, picked)
                    out["errors"][bad] = picked
            for name, dtype in ROW_DATASETS.items():
                if name in ("paths", "labels", "status", "errors"):
                    continue
                d = dataset(name)
                if d is None:
                    default = ROW_DEFAULTS[name]
                    out[name] = np.full(n, default.encode() if isinstance(default, str) else default,
                                        dtype=object if dtype is STR else dtype)
                else:
                    out[name] = read(d)
            out["shape"] = dataset("features").shape
            try:
                digest = h5a.open(fid, b"metadata_sha256")
                value = np.empty(digest.shape, dtype=digest.dtype)
                digest.read(value)
                sha = value[()]
            except KeyError:
                sha = ""
            out["info"] = ShardInfo(n, paths[0] if n else "", paths[-1] if n else "",
                                    sha.decode() if isinstance(sha, bytes) else str(sha))
            return out
        finally:
            fid.close()
    except Exception as exc:
        raise StoreError(f"cannot read shard {path} ({why(exc)}); re-run the same command: a damaged or missing "
                         "shard is left out and its images are embedded again") from None


@functools.lru_cache(maxsize=1)
def _fapl() -> Any:
    """File access properties for reading shards: close the file (and whatever is open in it) when it is closed."""
    fapl = h5p.create(h5p.FILE_ACCESS)
    fapl.set_fclose_degree(h5f.CLOSE_STRONG)
    return fapl


def _decoded(raw: np.ndarray) -> np.ndarray:
    """UTF-8 bytes (a variable-length string dataset read without `asstr`) as an object array of str: one decode
    of the joined bytes, not one per string (paths hold no newline; a value that does is decoded alone)."""
    items = raw.tolist()
    joined = b"\n".join(items)
    if joined.count(b"\n") == len(items) - 1:
        strs = joined.decode().split("\n") if items else []
    else:
        strs = [b.decode() for b in items]
    out = np.empty(len(strs), dtype=object)
    out[:] = strs
    return out


# Bytes that JSON writes as they are (`json.dumps` escapes '"', '\\', control and non-ASCII characters).
_PLAIN = bytes(c for c in range(0x20, 0x7F) if c not in b'"\\')


def _json_items(values: np.ndarray) -> bytes:
    """``json.dumps(list)[1:-1]`` of str or UTF-8 bytes values as UTF-8 (the metadata digest's pieces), joined in
    one go when every value is plain printable ASCII, the usual case; otherwise by `json.dumps` itself."""
    items = values.tolist()
    if not items:
        return b""
    try:
        whole = b"".join(items) if isinstance(items[0], bytes) else "".join(items).encode()
    except TypeError:  # str and bytes mixed
        whole = None
    if whole is not None and not whole.translate(None, _PLAIN):
        inner = b'", "'.join(items) if isinstance(items[0], bytes) else '", "'.join(items).encode()
        return b'"' + inner + b'"'
    return json.dumps([v.decode() if isinstance(v, bytes) else str(v) for v in items])[1:-1].encode()


def _columns() -> tuple[str, ...]:
    """The per-row arrays a merge carries (read at call time: `ROW_DATASETS` may grow)."""
    return ("paths", "label_names", "status", "errors",
            *[n for n in ROW_DATASETS if n not in ("paths", "labels", "status", "errors")])


def merged_rows(sources: Sequence[Path], infos: dict[str, ShardInfo],
                on_shard: Callable[[int, dict[str, Any]], None] = lambda s, a: None) -> Iterator[dict[str, Any]]:
    """The newest row per key over `sources` (shards, oldest first), as sorted blocks of arrays.

    Each block has the `_columns()` arrays plus `source` (index into `sources`) and `row` (row in that shard).
    Shards are read whole when the merge reaches their first key and dropped after their last, so memory holds
    the shards that overlap, not the store.

    Args:
        sources: The shards, in name order (a later shard's row replaces an earlier one's for the same key).
        infos: First and last keys of shards known without reading them (e.g. a manifest's shard_index); the
            others are read for them.
        on_shard: Called with (source index, arrays) when a shard is read (e.g. to record its `ShardInfo`).
    """
    firsts = []
    for s, path in enumerate(sources):
        info = infos.get(path.name) or shard_info(path)
        if info.rows:
            firsts.append((info.first, s))
    expected = {s: first for first, s in firsts}
    firsts.sort()
    columns = _columns()
    active: dict[int, tuple[dict[str, Any], int]] = {}  # source -> (arrays, next row)
    p = 0
    while p < len(firsts) or active:
        if not active:
            s = firsts[p][1]
            active[s] = (_load(sources, s, on_shard, expected[s]), 0)
            p += 1
        while True:  # the merge may emit every key <= bound: no shard still to come starts below it
            bound = min(a["paths"][-1] for a, _ in active.values())
            if p < len(firsts) and firsts[p][0] <= bound:
                s = firsts[p][1]
                active[s] = (_load(sources, s, on_shard, expected[s]), 0)
                p += 1
                continue
            break
        pieces, many = [], len(active) > 1
        for s in sorted(active):  # oldest first: a stable sort then keeps the newest duplicate last
            arrays, pos = active[s]
            end = int(np.searchsorted(arrays["paths"][pos:], bound, side="right")) + pos if many \
                else len(arrays["paths"])
            if end > pos:
                piece = {c: arrays[c][pos:end] for c in columns}
                piece["source"] = np.full(end - pos, s, dtype=np.int64)
                piece["row"] = np.arange(pos, end, dtype=np.int64)
                pieces.append(piece)
            if end >= len(arrays["paths"]):
                del active[s]
            else:
                active[s] = (arrays, end)
        if len(pieces) == 1:
            yield pieces[0]
            continue
        block = {c: np.concatenate([piece[c] for piece in pieces]) for c in pieces[0]}
        order = np.argsort(block["paths"], kind="stable")
        keys = block["paths"][order]
        keep = np.ones(len(keys), dtype=bool)
        keep[:-1] = keys[:-1] != keys[1:]  # the last of equal keys is the newest shard's
        order = order[keep]
        yield {c: v[order] for c, v in block.items()}


def _load(sources: Sequence[Path], s: int, on_shard: Callable[[int, dict[str, Any]], None],
          first: str) -> dict[str, Any]:
    arrays = _read_shard(sources[s])
    if arrays["info"].first != first:  # the merge's order rests on it: a shard that is not what was recorded
        raise StoreError(f"shard {sources[s]} starts at key {arrays['info'].first!r}, not {first!r} as recorded; "
                         "re-run the same command: a damaged shard is left out and its images are embedded again")
    on_shard(s, arrays)
    return arrays


class _ListingCursor:
    """Walks a `Listing` alongside the merge: `upto(bound)` returns the listing's rows with keys <= bound that
    were not returned before; `rest()` the others."""

    def __init__(self, listing: Listing) -> None:
        self._blocks = iter(listing.blocks())
        self._buffer: list[ListingBlock] = []
        self._done = False

    def upto(self, bound: str) -> ListingBlock:
        while not self._done and (not self._buffer or self._buffer[-1].keys[-1] <= bound):
            block = next(self._blocks, None)
            if block is None:
                self._done = True
            elif len(block):
                self._buffer.append(block)
        if not self._buffer:
            return ListingBlock(*(np.array([], dtype=d) for d in (object, np.int64, np.int64, np.int64)))
        whole = self._buffer[0] if len(self._buffer) == 1 else ListingBlock(
            *(np.concatenate([getattr(b, c) for b in self._buffer]) for c in ("keys", "labels", "sizes", "mtimes")),
            None if self._buffer[0].items is None else np.concatenate([b.items for b in self._buffer]))
        cut = int(np.searchsorted(whole.keys, bound, side="right"))
        self._buffer = [whole.take(slice(cut, None))] if cut < len(whole) else []
        return whole.take(slice(0, cut))

    def rest(self) -> Iterator[ListingBlock]:
        """The rows not returned yet, block by block (after the last stored key: never gathered into one)."""
        yield from self._buffer
        self._buffer = []
        while not self._done:
            block = next(self._blocks, None)
            if block is None:
                self._done = True
            elif len(block):
                yield block


def _joined(listing: Listing, rows: Iterator[dict[str, Any]]) -> Iterator[tuple[ListingBlock, dict[str, Any],
                                                                                  np.ndarray]]:
    """(listing rows, stored rows, for each listing row the index of its stored row or -1), in key order; every
    listing row and every stored row comes exactly once."""
    cursor = _ListingCursor(listing)
    empty = {"paths": np.array([], dtype=object)}
    for block in rows:
        listed = cursor.upto(block["paths"][-1])
        yield listed, block, _positions(listed.keys, block["paths"])
    for listed in cursor.rest():
        yield listed, empty, np.full(len(listed), -1, dtype=np.int64)


def _positions(keys: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """For each of the sorted `keys`, its index in the sorted `stored`, or -1."""
    if not len(keys) or not len(stored):
        return np.full(len(keys), -1, dtype=np.int64)
    if len(keys) == len(stored) and keys[0] == stored[0] and (keys == stored).all():  # a fresh run's shard
        return np.arange(len(keys), dtype=np.int64)
    pos = np.searchsorted(stored, keys)
    found = stored[np.minimum(pos, len(stored) - 1)] == keys
    return np.where(found, pos, -1)


@dataclass
class PlanCounts:
    """What a plan found, filled in as its blocks are consumed."""

    todo: int = 0
    reused: int = 0
    retried: int = 0
    changed: int = 0


def plan_blocks(listing: Listing, sources: Sequence[Path], infos: dict[str, ShardInfo], counts: PlanCounts, *,
                retry_failed: bool = False) -> Iterator[ListingBlock]:
    """The listing's rows still to embed, block by block: no stored row, another size or mtime than stored
    (changed), or failed when `retry_failed`. `counts` is complete once the blocks are exhausted."""
    for listed, stored, pos in _joined(listing, merged_rows(sources, infos)):
        have = pos >= 0
        idx = np.where(have, pos, 0)
        same = have & (stored["file_size"][idx] == listed.sizes) & (stored["file_mtime_ns"][idx] == listed.mtimes) \
            if len(stored["paths"]) else have
        changed = have & ~same
        retried = same & (stored["status"][idx] == FAILED) & retry_failed if len(stored["paths"]) else same
        todo = ~same | retried
        counts.changed += int(changed.sum())
        counts.retried += int(retried.sum())
        counts.reused += int((same & ~retried).sum())
        counts.todo += int(todo.sum())
        if todo.any():
            yield listed.take(todo)


@dataclass
class ManifestResult:
    """What `write_manifest` wrote: counts, and the sources (indices) the manifest references."""

    rows: int = 0
    n_ok: int = 0
    n_failed: int = 0
    n_missing: int = 0
    complete: bool = False
    used: list[int] = field(default_factory=list)
    shapes: dict[int, tuple[int, ...]] = field(default_factory=dict)  # features shape of each shard read
    attrs: dict[str, Any] = field(default_factory=dict)  # the manifest's attributes (set by its writer)


class _Spill:
    """JSON pieces of a string dataset for the metadata digest, written to a temporary file in key order, so that
    the digest can hash them after datasets that come before it in the digest's order."""

    def __init__(self, folder: Path) -> None:
        fd, self.path = tempfile.mkstemp(prefix=".manifest-", suffix=".spill", dir=folder)
        self.file = os.fdopen(fd, "w+b")
        self.first = True
        self.file.write(b"[")

    def add(self, values: np.ndarray) -> None:
        if len(values):
            self.file.write((b"" if self.first else b", ") + _json_items(values))
            self.first = False

    def hash_into(self, h: Any) -> None:
        self.file.write(b"]")
        self.file.flush()
        self.file.seek(0)
        while chunk := self.file.read(1 << 20):
            h.update(chunk)

    def close(self) -> None:
        self.file.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def write_manifest(f: h5py.File, listing: Listing, sources: Sequence[Path], infos: dict[str, ShardInfo],
                   spec_json: str, complete: bool) -> tuple[ManifestResult, dict[str, Any], list[tuple[int, int, int,
                                                                                                          int]]]:
    """Write the per-row datasets and class names of a manifest into `f`, streamed; return the result, the attrs
    that depend on the rows (metadata digest ingredients are finished by the caller with the shard index: see
    `finish_digest`), and the runs (source, first shard row, first output row, length) for its features.

    Rows: per listed image, the newest stored row with its size and mtime, labelled by the listing; stored rows
    of images no longer listed, with status "missing". `complete` holds only when every listed image has a row.
    """
    names = list(listing.class_names)
    index = {c: i for i, c in enumerate(names)}
    extras: dict[str, int] = {}  # labels of missing rows outside the listing's classes, in order met
    ds = {name: f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(_BLOCK,),
                                 **({} if dtype is STR else {"fletcher32": True}))
          for name, dtype in ROW_DATASETS.items()}
    result = ManifestResult()
    listed_total = covered = 0
    paths_hash = hashlib.sha256()
    paths_hash.update(b"[")
    fp = hashlib.sha256()
    fp.update(spec_json.encode())
    spills = {name: _Spill(Path(f.filename).parent) for name in ("errors", *[n for n, d in ROW_DATASETS.items()
                                                                             if d is STR and n not in DIGEST_STR
                                                                             and n != "paths"])}
    runs: list[tuple[int, int, int, int]] = []
    used: set[int] = set()

    pending: list[dict[str, Any]] = []
    pending_rows = 0

    def flush() -> None:
        nonlocal pending_rows
        if not pending_rows:
            return
        out0 = result.rows
        for name, d in ds.items():
            d.resize((out0 + pending_rows,))
            values = np.concatenate([p[name] for p in pending]) if len(pending) > 1 else pending[0][name]
            d[out0:] = values if ROW_DATASETS[name] is STR else np.asarray(values, ROW_DATASETS[name])
        result.rows += pending_rows
        pending.clear()
        pending_rows = 0

    def seen(s: int, arrays: dict[str, Any]) -> None:  # what the shard index records is what was read
        infos[sources[s].name] = arrays["info"]
        result.shapes[s] = arrays["shape"]

    try:
        for listed, stored, pos in _joined(listing, merged_rows(sources, infos, seen)):
            listed_total += len(listed)
            n = len(stored["paths"])
            if not n:
                continue
            where = np.full(n, -1, dtype=np.int64)  # for each stored row, its listing row
            where[pos[pos >= 0]] = np.flatnonzero(pos >= 0)
            have = where >= 0
            li = np.where(have, where, 0)
            same = have & (stored["file_size"] == listed.sizes[li]) & (stored["file_mtime_ns"] == listed.mtimes[li]) \
                if len(listed) else have
            keep = same | ~have  # a changed file's old row is dropped; a vanished file's row stays, "missing"
            covered += int(same.sum())
            rows = {c: v[keep] for c, v in stored.items()}
            listed_rows = li[keep]
            gone = ~have[keep]
            labels = np.where(gone, -1, listed.labels[listed_rows] if len(listed) else -1).astype(np.int64)
            for i in np.flatnonzero(gone):  # vanished rows keep their stored label
                name = rows["label_names"][i]
                if name:
                    labels[i] = index[name] if name in index else extras.setdefault(name, len(names) + len(extras))
            status = rows["status"].astype(np.uint8)
            errors = rows["errors"]
            if gone.any():
                status = status.copy()
                errors = errors.copy()
                status[gone] = MISSING
                errors[gone] = _VANISHED.encode()  # errors stay bytes, as read (`_read_shard`)
            values = {"paths": rows["paths"], "labels": labels, "status": status, "errors": errors,
                      **{c: rows[c] for c in ROW_DATASETS if c not in ("paths", "labels", "status", "errors")}}
            out0 = result.rows + pending_rows
            m = len(rows["paths"])
            paths_hash.update((b"" if not out0 else b", ") + _json_items(rows["paths"]))
            fp.update((("\n" if out0 else "") + "\n".join(rows["paths"].tolist())).encode())
            for name, spill in spills.items():
                spill.add(values[name])
            result.n_ok += int((status == OK).sum())
            result.n_failed += int((status == FAILED).sum())
            result.n_missing += int((status == MISSING).sum())
            _add_runs(runs, rows["source"], rows["row"], out0)
            used.update(np.unique(rows["source"]).tolist())
            pending.append(values)
            pending_rows += m
            if pending_rows >= _BLOCK:  # few large writes: h5py's cost is per call as much as per row
                flush()
        flush()
        ordered = sorted(extras)
        if ordered != list(extras):  # class names of vanished rows are listed sorted, after the listing's
            remap = np.arange(len(names) + len(extras) + 1, dtype=np.int64)
            remap[-1] = -1  # unlabeled rows (-1) index the last slot
            for name, i in extras.items():
                remap[i] = len(names) + ordered.index(name)
            for a in range(0, result.rows, _BLOCK):
                block = ds["labels"][a:a + _BLOCK]
                ds["labels"][a:a + _BLOCK] = remap[block]
        names += ordered
        f.create_dataset("class_names", data=np.array(names, dtype=STR))
        paths_hash.update(b"]")
        # The digest's order (`schema.metadata_digest`): paths, class names, errors, the numbers, later datasets.
        h = paths_hash
        h.update(json.dumps(names).encode())
        spills["errors"].hash_into(h)
        for name in (*DIGEST_NUM, *[n for n in ROW_DATASETS if n not in DIGEST_STR + DIGEST_NUM]):
            if ROW_DATASETS[name] is STR:
                spills[name].hash_into(h)
                continue
            for a in range(0, result.rows, _BLOCK):
                h.update(np.ascontiguousarray(ds[name][a:a + _BLOCK], dtype=ROW_DATASETS[name]).tobytes())
        for name in ("labels", "status", "file_size", "file_mtime_ns"):  # the fingerprint's numbers, in its order
            for a in range(0, result.rows, _BLOCK):
                fp.update(np.ascontiguousarray(ds[name][a:a + _BLOCK], dtype=ROW_DATASETS[name]).tobytes())
    finally:
        for spill in spills.values():
            spill.close()
    result.complete = complete and covered == listed_total
    result.used = sorted(used)
    return result, {"digest": h, "fingerprint": fp.hexdigest()}, runs


def _add_runs(runs: list[tuple[int, int, int, int]], source: np.ndarray, row: np.ndarray, out0: int) -> None:
    """Append runs of consecutive rows of one shard (output rows out0...) to `runs`, joining the last one."""
    if not len(source):
        return
    brk = np.flatnonzero((source[1:] != source[:-1]) | (row[1:] != row[:-1] + 1)) + 1
    starts = np.concatenate([[0], brk])
    ends = np.concatenate([brk, [len(source)]])
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        s, r = int(source[a]), int(row[a])
        if runs and runs[-1][0] == s and runs[-1][1] + runs[-1][3] == r and runs[-1][2] + runs[-1][3] == out0 + a:
            last = runs[-1]
            runs[-1] = (s, last[1], last[2], last[3] + b - a)
        else:
            runs.append((s, r, out0 + a, b - a))
