"""An input listed and planned part by part where the data is, and read back streamed: the driver handles parts.

The Ray engine's driver reads only the input's root (`embedfit.images.split_input`: its first-level folders, or
byte ranges of a CSV). Each part is listed and planned by a worker (`plan_part`): `scan_part` lists it as
`scan_images` would, `plan_blocks` joins it with the store's shards that overlap its keys (the resume: stored,
changed, failed), and the result is one *listing file* per part (``listing-<run>-<seq>.h5`` beside the shards:
every listed image's key, label, size, mtime and location, and whether it still needs embedding), sorted by key.
The worker returns a `PartSummary` (counts, key range, labels, a few keys). Embedding actors read the rows they
embed from the listing files (`read_todo`), and the manifest's commit reads them back as one sorted listing
(`merged_listing`: a k-way merge over the parts by blocks, which holds one block per part that overlaps the current
key, so one at a time for a folder tree). No process holds a table of every image.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedfit.errors import InputError, StoreError
from embedfit.images import InputPart, InputSplit, combine_parts, scan_part
from embedfit.storage.manifest import Listing, ListingBlock, PlanCounts, ShardInfo, plan_blocks
from embedfit.url import get_file, is_url, put_file

if TYPE_CHECKING:
    from embedfit.extraction.writer import PlannedInput

LISTING_PREFIX = "listing-"
_SAMPLE = 10  # keys and skipped entries a part reports
_BLOCK = 1 << 13  # rows per read of a listing file: the commit holds one block per overlapping part


@dataclass
class PartSummary:
    """What a worker reports of the part it listed and planned (its rows stay in its listing file).

    Attributes:
        part: The part.
        listing: Where its listing file is (a path, or a URL on object storage).
        rows: Images listed.
        todo: Of those, images to embed.
        reused, retried, changed: The plan's counts (`PlanCounts`).
        first, last: Its first and last key ("" when empty).
        labels: The labels its rows carry.
        keys: Its first keys.
        skipped: What its listing left out (the first ones), and how many (`n_skipped`).
    """

    part: InputPart
    listing: str
    rows: int = 0
    todo: int = 0
    reused: int = 0
    retried: int = 0
    changed: int = 0
    first: str = ""
    last: str = ""
    labels: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    n_skipped: int = 0


@contextlib.contextmanager
def local_copy(location: str) -> Iterator[Path]:
    """A local path for a file that may be on object storage (downloaded to a temporary folder)."""
    if not is_url(location):
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="embedfit-part-") as tmp:
        local = Path(tmp) / location.rsplit("/", 1)[-1]
        get_file(location, local)
        yield local


def plan_part(split: InputSplit, part: InputPart, listing: str, sources: Sequence[tuple[str, ShardInfo]], *,
              retry_failed: bool = False) -> PartSummary:
    """List one part, plan it against the store, and write its listing file (runs on a worker).

    Args:
        split: The input.
        part: The part to list.
        listing: Where its listing file goes (a path in the shards folder, or a URL beside the shards).
        sources: The store's shards (location, `ShardInfo`), oldest first; those overlapping the part's keys are
            read (downloaded when on object storage).
        retry_failed: Embed again images the store records as failed.
    """
    scanned = scan_part(split, part)
    records = scanned.records
    keys = np.array([r.key for r in records], dtype=object)
    todo = np.ones(len(records), dtype=bool)
    counts = PlanCounts()
    if records:
        first, last = keys[0], keys[-1]
        overlapping = [(loc, info) for loc, info in sources if info.rows and info.first <= last and info.last >= first]
        with contextlib.ExitStack() as stack:
            paths = [stack.enter_context(local_copy(loc)) for loc, _ in overlapping]
            infos = {p.name: info for p, (_, info) in zip(paths, overlapping, strict=True)}
            todo[:] = False
            for block in plan_blocks(Listing.of(records), paths, infos, counts, retry_failed=retry_failed):
                todo[np.searchsorted(keys, block.keys)] = True
    labels = [scanned.class_names[r.label] if r.label >= 0 else "" for r in records]
    write_listing(listing, keys, labels, [str(r.path) for r in records], [r.size for r in records],
                  [r.mtime_ns for r in records], todo)
    return PartSummary(part, listing, len(records), int(todo.sum()), counts.reused, counts.retried, counts.changed,
                       keys[0] if len(keys) else "", keys[-1] if len(keys) else "", sorted(set(labels)),
                       keys[:_SAMPLE].tolist(), scanned.skipped[:_SAMPLE], len(scanned.skipped))


def write_listing(location: str, keys: np.ndarray, labels: Sequence[str], paths: Sequence[str],
                  sizes: Sequence[int], mtimes: Sequence[int], todo: np.ndarray) -> None:
    """Write a listing file whole (a temporary file, then renamed or uploaded: absent or complete)."""
    import h5py

    from embedfit.storage.schema import STR

    # Beside its final name, under it: the driver's clean-up of a killed run's listings spares this run's by name.
    fd, local = tempfile.mkstemp(prefix=f".{location.rsplit('/', 1)[-1]}.", suffix=".tmp",
                                 dir=None if is_url(location) else os.path.dirname(location) or None)
    os.close(fd)
    # Keys as one UTF-8 blob, each followed by a newline, and their end offsets; labels as indices into the few
    # label names: the commit reads 2M keys in ~1 s this way, twice as fast as variable-length strings.
    encoded = [k.encode() + b"\n" for k in np.asarray(keys, dtype=object).tolist()]
    names, index = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True) if len(encoded) \
        else (np.array([], dtype=str), np.array([], dtype=np.int64))
    try:
        with h5py.File(local, "w") as f:
            f.create_dataset("key_bytes", data=np.frombuffer(b"".join(encoded), dtype=np.uint8))
            f.create_dataset("key_ends", data=np.cumsum([len(k) for k in encoded], dtype=np.int64))
            f.create_dataset("label_names", data=np.asarray(names.tolist(), dtype=object), dtype=STR)
            f.create_dataset("labels", data=np.asarray(index, dtype=np.int32))
            f.create_dataset("paths", data=np.asarray(paths, dtype=object), dtype=STR)
            f.create_dataset("sizes", data=np.asarray(sizes, dtype=np.int64))
            f.create_dataset("mtimes", data=np.asarray(mtimes, dtype=np.int64))
            # The rows to embed, by index: a shard's images are a slice of it (`read_todo`), whatever the part's size.
            f.create_dataset("todo_rows", data=np.flatnonzero(np.asarray(todo, dtype=bool)).astype(np.int64))
        if is_url(location):
            put_file(local, location)
        else:
            os.replace(local, location)
    except (OSError, RuntimeError) as exc:
        raise StoreError(f"cannot write listing {location}: {getattr(exc, 'strerror', None) or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(local)


def read_todo(location: str, start: int, stop: int) -> list[tuple[str, str, str, int, int]]:
    """Images `start`..`stop` of a listing file's images to embed: (path, key, label, size, mtime) each.

    Reads those rows only, whatever the part's size: a slice of `todo_rows`, then the span they cover when they are
    dense (a fresh run), or each row when they are sparse (a resume that embeds a few images of a large part). A
    listing on object storage is downloaded once per process (`_fetched`), not once per shard."""
    import h5py

    with h5py.File(_fetched(location), "r") as f:
        rows = f["todo_rows"][start:stop]
        if not len(rows):
            return []
        names = np.array([*f["label_names"].asstr()[()].tolist(), ""], dtype=object)
        if rows[-1] - rows[0] < 4 * len(rows):  # dense: one read of the span, then the rows picked from it
            span = slice(int(rows[0]), int(rows[-1]) + 1)
            pick = rows - rows[0]
            keys = _keys(f, span.start, span.stop)[pick]
            paths, labels = f["paths"].asstr()[span][pick], f["labels"][span][pick]
            sizes, mtimes = f["sizes"][span][pick], f["mtimes"][span][pick]
        else:
            keys = np.array([_keys(f, r, r + 1)[0] for r in rows.tolist()], dtype=object)
            paths, labels = f["paths"].asstr()[rows], f["labels"][rows]
            sizes, mtimes = f["sizes"][rows], f["mtimes"][rows]
    return list(zip(paths.tolist(), keys.tolist(), names[labels].tolist(), sizes.tolist(), mtimes.tolist(),
                    strict=True))


def _remove_orphaned_copies() -> None:
    """Delete the downloaded listings of processes on this machine that no longer run (an actor is stopped by a
    kill, which runs no clean-up): their folders are named after their process id."""
    for folder in Path(tempfile.gettempdir()).glob("embedfit-listing-*-*"):
        pid = folder.name.split("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


_FETCHED: OrderedDict[str, Path] = OrderedDict()  # listings on object storage this process downloaded, newest last


def _fetched(location: str) -> Path:
    """A local path for a listing file: itself, or for one on object storage a download kept for this process's
    next shards of the same part (the two latest; a listing never changes once written)."""
    if not is_url(location):
        return Path(location)
    if not _FETCHED:  # this process's first: the copies of processes that are gone (killed actors) go first
        _remove_orphaned_copies()
    if location not in _FETCHED:
        folder = Path(tempfile.mkdtemp(prefix=f"embedfit-listing-{os.getpid()}-"))
        local = folder / location.rsplit("/", 1)[-1]
        get_file(location, local)
        _FETCHED[location] = local
        while len(_FETCHED) > 2:
            shutil.rmtree(_FETCHED.popitem(last=False)[1].parent, ignore_errors=True)
    _FETCHED.move_to_end(location)
    return _FETCHED[location]


def _keys(f: Any, start: int, stop: int) -> np.ndarray:
    """Keys `start`..`stop` of an open listing file, as an object array of str (`write_listing`'s layout)."""
    ends = f["key_ends"][max(0, start - 1):stop]
    first = int(ends[0]) if start else 0
    ends = ends[1:] if start else ends
    blob = f["key_bytes"][first:int(ends[-1]) if len(ends) else first].tobytes()
    out = np.empty(len(ends), dtype=object)
    if blob.count(b"\n") == len(ends):  # no key holds a newline: one decode, one split
        out[:] = blob[:-1].decode().split("\n") if len(ends) else []
    else:
        bounds = np.concatenate([[0], ends - first]).tolist()
        out[:] = [blob[a:b - 1].decode() for a, b in itertools.pairwise(bounds)]
    return out


class _Cursor:
    """One listing file read block by block."""

    def __init__(self, location: str, stack: contextlib.ExitStack) -> None:
        import h5py

        self.location = location
        self._stack = contextlib.ExitStack()  # closed as soon as the file is read: one open listing per active part
        stack.callback(self._stack.close)
        # No chunk cache: each block is read once (the default 1 MiB per dataset, per open file, adds up).
        self.file = self._stack.enter_context(h5py.File(self._stack.enter_context(local_copy(location)), "r",
                                                        rdcc_nbytes=0))
        self.n = len(self.file["key_ends"])
        self.names = np.array(self.file["label_names"].asstr()[()].tolist(), dtype=object)
        self.pos = 0
        self.block: dict[str, np.ndarray] = {}
        self.load()

    def load(self) -> None:
        end = min(self.n, self.pos + _BLOCK)
        span = slice(self.pos, end)
        self.block = {"keys": _keys(self.file, self.pos, end), "labels": self.names[self.file["labels"][span]],
                      "sizes": self.file["sizes"][span], "mtimes": self.file["mtimes"][span]}
        self.pos = end

    def take(self, bound: str | None) -> dict[str, np.ndarray]:
        """Its buffered rows with keys <= `bound` (all when None); loads the next block when the buffer empties."""
        keys = self.block["keys"]
        cut = len(keys) if bound is None else int(np.searchsorted(keys, bound, side="right"))
        piece = {c: v[:cut] for c, v in self.block.items()}
        self.block = {c: v[cut:] for c, v in self.block.items()}
        if not len(self.block["keys"]):
            if self.pos < self.n:
                self.load()
            else:
                self._stack.close()
        return piece

    @property
    def done(self) -> bool:
        return not len(self.block["keys"])


def merged_listing(parts: Sequence[PartSummary], class_names: Sequence[str]) -> Listing:
    """The images of `parts` as one `Listing` in key order, streamed from their listing files.

    Parts whose key ranges overlap (a CSV's parts) are merged; a key listed by two parts is kept once, from the
    first part, when both give it the same label (else `InputError`, as `scan_images` says of one CSV).
    """
    index = {c: i for i, c in enumerate(class_names)}
    ordered = sorted((p for p in parts if p.rows), key=lambda p: p.first)

    def labels_of(names: np.ndarray) -> np.ndarray:
        if len(names) and (names == names[0]).all():  # a folder part: one class
            return np.full(len(names), index.get(names[0], -1), dtype=np.int64)
        return np.fromiter((index.get(n, -1) for n in names.tolist()), np.int64, len(names))

    def blocks() -> Iterator[ListingBlock]:
        with contextlib.ExitStack() as stack:
            pending, active, last = list(ordered), [], None
            while pending or active:
                if not active:
                    active.append(_Cursor(pending.pop(0).listing, stack))
                bound = min(c.block["keys"][-1] for c in active)
                while pending and pending[0].first <= bound:
                    active.append(_Cursor(pending.pop(0).listing, stack))
                    bound = min(c.block["keys"][-1] for c in active)
                pieces = [c.take(bound if len(active) > 1 else None) for c in active]
                active = [c for c in active if not c.done]
                block = {c: np.concatenate([p[c] for p in pieces]) for c in pieces[0]} if len(pieces) > 1 \
                    else pieces[0]
                if len(pieces) > 1:
                    order = np.argsort(block["keys"], kind="stable")  # parts in order: the first part's row first
                    block = {c: v[order] for c, v in block.items()}
                keys = block["keys"]
                if not len(keys):
                    continue
                dup = np.zeros(len(keys), dtype=bool)
                dup[1:] = keys[1:] == keys[:-1]
                if last is not None and keys[0] == last[0]:
                    dup[0] = True
                for i in np.flatnonzero(dup):
                    before = block["labels"][i - 1] if i else last[1]
                    if block["labels"][i] != before:
                        raise InputError(f"{keys[i]!r} is listed with label {before!r} and {block['labels'][i]!r}; "
                                         "fix the list, then re-run the same command to resume")
                last = (keys[-1], block["labels"][-1])
                if dup.any():
                    block = {c: v[~dup] for c, v in block.items()}
                yield ListingBlock(block["keys"], labels_of(block["labels"]), block["sizes"].astype(np.int64),
                                   block["mtimes"].astype(np.int64))

    return Listing(blocks, list(class_names))


def plan_input(split: InputSplit, summaries: Sequence[PartSummary], class_names: Sequence[str] | None
               ) -> tuple[PlannedInput, list[PartSummary]]:
    """The driver's plan from the parts' summaries alone: `combine_parts`' rules (class tree or flat, the class
    list, what is skipped), the totals, and the input as one streamed listing.

    Returns:
        The input as `FeatureWriter.use_plan` takes it, and the parts whose rows are the input, in key order.
    """
    from embedfit.extraction.writer import PlannedInput

    kind, names, used_parts, skipped, n_skipped = combine_parts(
        split, [(s.part, s.rows, s.labels, s.keys) for s in summaries], class_names)
    used = sorted((s for s in summaries if s.part in used_parts), key=lambda s: s.first)
    skipped = sorted({*skipped, *split.skipped, *(k for s in summaries for k in s.skipped)})
    n_skipped += len(split.skipped) + sum(s.n_skipped for s in summaries)
    return PlannedInput(split.root, kind, names, sum(s.rows for s in used), sum(s.todo for s in used),
                        sum(s.reused for s in used), skipped[:_SAMPLE], n_skipped, merged_listing(used, names)), used


def cut_shards(used: Sequence[PartSummary], step: int, shard_name: Callable[[int], str]
               ) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """The images to embed of `used` parts (in key order) cut into shards of `step` images, each named by
    `shard_name(seq)` and given as (listing file, first, stop) runs of its parts' images to embed (`read_todo`)."""
    shards: list[tuple[str, list[tuple[str, int, int]]]] = []
    pieces: list[tuple[str, int, int]] = []
    filled = 0
    for s in used:
        start = 0
        while start < s.todo:
            take = min(step - filled, s.todo - start)
            pieces.append((s.listing, start, start + take))
            start, filled = start + take, filled + take
            if filled == step:
                shards.append((shard_name(len(shards)), pieces))
                pieces, filled = [], 0
    if pieces:
        shards.append((shard_name(len(shards)), pieces))
    return shards


def remove_listings(folder: str | Path, keep_prefix: str = "") -> None:
    """Delete the listing files in a local shards folder, and those half-written (a killed run's), except those
    whose name starts with `keep_prefix` when given (this run's, which its workers may be writing now)."""
    folder = Path(folder)
    found = [*folder.glob(f"{LISTING_PREFIX}*.h5"), *folder.glob(f".{LISTING_PREFIX}*.tmp")] if folder.is_dir() else []
    for path in found:
        if not keep_prefix or not path.name.lstrip(".").startswith(keep_prefix):
            with contextlib.suppress(OSError):
                path.unlink()


def remove_remote(locations: Sequence[str]) -> None:
    """Delete listing files on object storage (best effort: a leftover is only a small stray file)."""
    from embedfit.url import filesystem

    for location in locations:
        with contextlib.suppress(Exception):
            fs, path = filesystem(location)
            fs.rm(path)
