"""An input listed part by part (`split_input`, `scan_part`, `plan_part`, `merged_listing`: what the Ray engine's
workers and driver do, here in one process) says exactly what one `scan_images` says, and plans the same resume."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tree

from embedfit.errors import InputError
from embedfit.extraction.parts import PartSummary, cut_shards, merged_listing, plan_input, plan_part, read_todo
from embedfit.images import combine_parts, scan_images, split_input
from embedfit.storage.manifest import Listing, PlanCounts, plan_blocks

pytestmark = pytest.mark.fast


def _by_parts(source: Path, folder: Path, class_names=None, sources=(), csv_part_bytes: int = 1 << 20):
    split = split_input(source, csv_part_bytes=csv_part_bytes)
    folder.mkdir(exist_ok=True)
    summaries = [plan_part(split, part, str(folder / f"listing-{i:03d}.h5"), list(sources))
                 for i, part in enumerate(split.parts)]
    planned, used = plan_input(split, summaries, class_names)  # the driver's part: summaries in, plan out
    assert planned.todo == sum(s.todo for s in used) and planned.total == sum(s.rows for s in used)
    return split, summaries, planned.kind, planned.class_names, used, planned.n_skipped


def _rows(listing: Listing) -> list[tuple]:
    return [(k, int(lb), int(s), int(m)) for b in listing.blocks()
            for k, lb, s, m in zip(b.keys.tolist(), b.labels, b.sizes, b.mtimes, strict=True)]


def _expected(source) -> list[tuple]:
    return [(r.key, r.label, r.size, r.mtime_ns) for r in source.records]


def test_a_class_tree_listed_by_parts_is_the_whole_scan(tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "images", per_class=5)
    (tree / "loose.jpg").write_bytes((tree / "brick" / "brick_000.jpg").read_bytes())  # skipped: not in a class
    (tree / "empty").mkdir()  # not a class
    (tree / "grass" / ".hidden.jpg").write_bytes(b"x")
    (tree / "grass" / "deep" / "er").mkdir(parents=True)
    (tree / "grass" / "deep" / "er" / "x.png").write_bytes((tree / "grass" / "grass_001.png").read_bytes())
    whole = scan_images(tree)
    split, summaries, kind, names, used, n_skipped = _by_parts(tree, tmp_path / "listings")
    assert {p.kind for p in split.parts} == {"folder", "loose"} and len(split.parts) == 5
    assert (kind, names) == (whole.kind, whole.class_names) == ("folder", ["brick", "grass", "gravel"])
    assert n_skipped == len(whole.skipped)
    assert _rows(merged_listing(used, names)) == _expected(whole)
    assert sum(s.todo for s in used) == len(whole.records)  # nothing stored yet: everything to embed
    # A worker reads the images of a shard back from the listing files, by runs of the images to embed.
    first = used[0]
    got = read_todo(first.listing, 1, 3)
    assert [g[1] for g in got] == [r.key for r in whole.records[1:3]]
    assert got[0][0] == str(whole.records[1].path) and got[0][2] == "brick"
    # Shards of 4 images run across the parts in key order: every image to embed once.
    shards = cut_shards(used, 4, lambda i: f"s{i}")
    assert [len(p) for _, p in shards] == [1, 2, 2, 1]  # 5 brick + 6 grass + 5 gravel: two shards span parts
    assert [sum(b - a for _, a, b in p) for _, p in shards] == [4, 4, 4, 4]
    assert [row[1] for _, p in shards for loc, a, b in p for row in read_todo(loc, a, b)] == \
        [r.key for r in whole.records]

    # Given class names: their order, and a folder outside them is refused before anything is embedded.
    assert combine_parts(split, [(s.part, s.rows, s.labels, s.keys) for s in summaries],
                         ["gravel", "grass", "brick"])[1] == ["gravel", "grass", "brick"]
    with pytest.raises(InputError, match="not in the given class names"):
        combine_parts(split, [(s.part, s.rows, s.labels, s.keys) for s in summaries], ["brick", "grass"])


def test_a_flat_folder_and_an_empty_one(tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "t", per_class=2)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, p in enumerate(sorted(tree.rglob("*.*"))):
        (flat / f"{i:02d}{p.suffix}").write_bytes(p.read_bytes())
    (flat / "no_images").mkdir()
    whole = scan_images(flat)
    _, _, kind, names, used, _ = _by_parts(flat, tmp_path / "l1")
    assert (kind, names) == ("flat", [])
    assert _rows(merged_listing(used, names)) == _expected(whole)
    (tmp_path / "none").mkdir()
    with pytest.raises(InputError, match="no images found"):
        _by_parts(tmp_path / "none", tmp_path / "l2")


def test_a_csv_in_byte_ranges_is_the_whole_csv_even_unsorted_with_repeats(tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "images", per_class=6)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tree.rglob("*.*"))
    order = np.random.default_rng(0).permutation(len(files))
    rows = [(files[i], files[i].split("/")[1]) for i in order]
    rows += [rows[3], rows[11]]  # listed again, same label: kept once
    lst = tmp_path / "list.csv"
    with open(lst, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)
    whole = scan_images(lst)
    split, _, kind, names, used, _ = _by_parts(lst, tmp_path / "l", csv_part_bytes=100)
    assert len(split.parts) >= 5 and all(p.kind == "csv" for p in split.parts)
    assert (kind, names) == ("csv", whole.class_names)
    assert _rows(merged_listing(used, names)) == _expected(whole)  # overlapping parts merged, repeats once

    with open(lst, "a", newline="") as f:  # the same image with another label, far from its first line
        csv.writer(f).writerow([rows[0][0], "other"])
    _, _, _, names, used, _ = _by_parts(lst, tmp_path / "l2", csv_part_bytes=100)
    with pytest.raises(InputError, match="is listed with label"):
        _rows(merged_listing(used, names))


def test_a_part_plans_its_resume_against_the_shards_that_overlap_it(tmp_path: Path, settings) -> None:
    from embedfit.storage.shards import ShardedStoreWriter

    tree = write_tree(tmp_path / "images", per_class=4)
    whole = scan_images(tree)
    out = tmp_path / "s.h5"
    with ShardedStoreWriter(out, settings, shard_size=4) as w:
        stored = whole.records[:7]
        feats = np.zeros((7, settings.spec.embedding_dim), np.float32)
        w.write_part([r.key for r in stored], [whole.class_names[r.label] for r in stored],
                     [r.size for r in stored], [r.mtime_ns for r in stored], [0] * 6 + [1], [""] * 6 + ["bad"],
                     feats)
        sources = [(str(p), i) for p, i in w.source_infos()]
    victim = whole.records[2]
    os.utime(victim.path, ns=(victim.mtime_ns + 10**9, victim.mtime_ns + 10**9))  # changed since it was stored
    whole = scan_images(tree)
    counts = PlanCounts()
    expected = [k for b in plan_blocks(Listing.of(whole.records), [Path(s) for s, _ in sources],
                                       {Path(s).name: i for s, i in sources}, counts) for k in b.keys.tolist()]
    *_, used, _ = _by_parts(tree, tmp_path / "l", sources=sources)
    planned: list[PartSummary] = used
    assert sum(s.todo for s in planned) == counts.todo == len(expected) == 12 - 7 + 1  # 1 of 7 stored rows changed
    assert (sum(s.reused for s in planned), sum(s.changed for s in planned)) == (counts.reused, counts.changed)
    assert (counts.reused, counts.changed) == (6, 1)
    todo = [row[1] for s in planned for row in read_todo(s.listing, 0, s.todo)]
    assert todo == expected


def test_a_shard_reads_only_its_rows_of_a_listing_dense_or_sparse(tmp_path: Path) -> None:
    from embedfit.extraction.parts import write_listing

    keys = np.array([f"c/{i:04d}.jpg" for i in range(100)], dtype=object)
    todo = np.zeros(100, dtype=bool)
    todo[[3, 4, 5, 6, 50, 97]] = True  # a dense run, then rows far apart (a resume's few changed images)
    location = str(tmp_path / "listing-x.h5")
    write_listing(location, keys, ["c"] * 100, [f"/data/{k}" for k in keys], range(100), range(1000, 1100), todo)
    expected = [(f"/data/{keys[i]}", keys[i], "c", i, 1000 + i) for i in np.flatnonzero(todo)]
    assert read_todo(location, 0, 4) == expected[:4]  # dense: one span
    assert read_todo(location, 3, 6) == expected[3:]  # sparse: the rows alone
    assert read_todo(location, 0, 6) == expected and read_todo(location, 6, 9) == []


def test_a_killed_runs_listings_go_and_this_runs_stay_even_half_written(tmp_path: Path) -> None:
    from embedfit.extraction.parts import remove_listings

    names = ["listing-1-9-000000.h5", ".listing-1-9-000001.h5.ab12.tmp",  # a killed run's, whole and half-written
             "listing-2-9-000000.h5", ".listing-2-9-000001.h5.cd34.tmp", "shard-2-9-000000.h5"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    remove_listings(tmp_path, keep_prefix="listing-2-9-")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])
    remove_listings(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["shard-2-9-000000.h5"]


def test_listings_downloaded_by_a_process_that_is_gone_are_removed(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys
    import tempfile

    from embedfit.extraction.parts import _remove_orphaned_copies

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # an actor killed after it downloaded a listing
    (tmp_path / f"embedfit-listing-{gone}-ab12").mkdir()
    (tmp_path / f"embedfit-listing-{os.getpid()}-cd34").mkdir()  # this process's own
    _remove_orphaned_copies()
    assert [p.name for p in tmp_path.iterdir()] == [f"embedfit-listing-{os.getpid()}-cd34"]
