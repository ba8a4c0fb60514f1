"""The Ray driver's own work, without a model or Ray: plan, take the workers' shard summaries, commit the manifest.

Usage:
    python benchmarks/bench_manifest.py --rows 200000            # shard size 1024 (the Ray default), dim 8
    python benchmarks/bench_manifest.py --rows 2000000 --shard-size 4096

First (not timed, cached in --cache) it writes the synthetic shards a fresh run's workers would write, with the real
shard writer (`write_shard`: tiny features, since the driver never reads them; a 64-hex content hash per row and
1 failed row in 500, like real shards). Then, in a fresh process whose peak RSS is measured alone, it runs what the
Ray engine's driver does between the scan and the end: open the store writer, plan the resume against the listing,
cut the images still to embed into named shards, receive each shard as a worker reports it (the pre-written file is
hard-linked under the name the driver gave it, as a worker's rename would land it, plus the worker's summary), and
commit the manifest. The last line is JSON: rows, shards, driver_seconds (all of it), plan/commit seconds and
peak_rss_mb (the driver process's VmHWM, so generating the shards does not count).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

CLASSES = 10
MTIME0 = 1_700_000_000_000_000_000


def _spec(dim: int) -> Any:
    from embedfit.backbones.spec import BackboneSpec

    return BackboneSpec("bench", "bench/none", "random", "", (224, 224), 256, "bilinear", (0.5,) * 3, (0.5,) * 3, dim)


def listing(start: int, stop: int, rows: int) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Keys, label indices, sizes and mtimes of images start..stop of a synthetic folder of `rows` images, in key
    order (class folders of equal size, zero-padded names)."""
    idx = np.arange(start, stop)
    labels = idx * CLASSES // rows
    keys = [f"class_{c:02d}/img_{i:010d}.jpg" for c, i in zip(labels.tolist(), idx.tolist(), strict=True)]
    return keys, labels, 1000 + idx % 50_000, MTIME0 + idx


def generate(folder: Path, rows: int, shard_size: int, dim: int) -> None:
    """The shards a fresh run's workers would write, numbered in key order (`shard-bench-<seq>.h5`)."""
    from embedfit.storage import FAILED, OK, StoreSettings
    from embedfit.storage.schema import CONTENT_HASH
    from embedfit.storage.shards import write_shard

    settings = StoreSettings(_spec(dim), "float16")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"class_{c:02d}" for c in range(CLASSES)]
    for seq, start in enumerate(range(0, rows, shard_size)):
        keys, labels, sizes, mtimes = listing(start, min(rows, start + shard_size), rows)
        failed = (np.arange(start, start + len(keys)) % 500) == 499
        status = np.where(failed, FAILED, OK)
        errors = ["cannot identify image file" if f else "" for f in failed]
        feats = rng.standard_normal((len(keys), dim)).astype(np.float16)
        feats[failed] = np.nan
        hashes = [f"{(start + i) * 2654435761 % (1 << 64):064x}" for i in range(len(keys))]
        (tmp / f"listing-{seq:08d}.txt").write_text("\n".join(keys))  # the input shard's listing, as a CSV block
        write_shard(tmp, f"shard-bench-{seq:08d}.h5", settings, keys, [names[c] for c in labels], sizes, mtimes,
                    status, errors, feats, {"engine": "ray"}, {CONTENT_HASH: hashes})
    tmp.rename(folder)


def drive(src: Path, store: Path, rows: int, shard_size: int, dim: int) -> dict:
    """The driver's part, timed; runs in its own process (see `main`)."""
    from embedfit.storage import StoreSettings
    from embedfit.storage.manifest import Listing, ListingBlock, PlanCounts
    from embedfit.storage.shards import ShardedStoreWriter

    t0 = time.perf_counter()
    settings = StoreSettings(_spec(dim), "float16")

    def blocks() -> Iterator[ListingBlock]:  # the input's listing, one input shard at a time, never all of it
        for seq, start in enumerate(range(0, rows, shard_size)):
            idx = np.arange(start, min(rows, start + shard_size))
            keys = np.array((src / f"listing-{seq:08d}.txt").read_text().split("\n"), dtype=object)
            yield ListingBlock(keys, idx * CLASSES // rows, 1000 + idx % 50_000, MTIME0 + idx)

    scan = Listing(blocks, [f"class_{c:02d}" for c in range(CLASSES)])
    plan_s = 0.0
    with ShardedStoreWriter(store, settings, shard_size=shard_size) as writer:
        writer.parts.mkdir(parents=True, exist_ok=True)
        counts, embedded, failed, shards = PlanCounts(), 0, 0, 0
        t = time.perf_counter()
        for seq, (name, todo) in enumerate(writer.plan_shards(scan, counts)):
            plan_s += time.perf_counter() - t
            # A worker embeds `todo`, writes the shard and renames it into place; its summary comes back.
            os.link(src / f"shard-bench-{seq:08d}.h5", writer.parts / name)
            summary = {"name": name, "rows": len(todo), "failures": int(((np.arange(len(todo)) + seq * shard_size)
                                                                         % 500 == 499).sum())}
            embedded += summary["rows"] - summary["failures"]
            failed += summary["failures"]
            shards += 1
            t = time.perf_counter()
        plan_s += time.perf_counter() - t
        t_commit = time.perf_counter()
        result = writer.commit_listing(scan, complete=True)
        commit_s = time.perf_counter() - t_commit
    seconds = time.perf_counter() - t0
    with open("/proc/self/status") as status:  # VmHWM: this process's peak RSS (ru_maxrss may be the parent's)
        hwm = next(ln for ln in status if ln.startswith("VmHWM")).split()[1]
    assert result.rows == rows and result.complete and result.n_failed == failed, result
    return {"rows": result.rows, "failed": result.n_failed, "shards": shards, "driver_seconds": seconds,
            "plan_seconds": plan_s, "commit_seconds": commit_s, "peak_rss_mb": int(hwm) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=8, help="feature size of the synthetic shards")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "embedfit-bench-manifest",
                        help="where the generated shards are kept between runs")
    parser.add_argument("--keep", action="store_true", help="keep the generated shards (default: delete them)")
    parser.add_argument("--drive", type=Path, help=argparse.SUPPRESS)  # internal: the timed driver process
    args = parser.parse_args()
    src = args.cache / f"rows{args.rows}-shard{args.shard_size}-dim{args.dim}"
    if args.drive:
        print(json.dumps(drive(src, args.drive, args.rows, args.shard_size, args.dim)))
        return
    if not src.is_dir():
        t = time.perf_counter()
        generate(src, args.rows, args.shard_size, args.dim)
        print(f"generated {args.rows:,} rows in shards of {args.shard_size} in {time.perf_counter() - t:.1f} s",
              file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="bench-manifest-", dir=args.cache))
    try:
        proc = subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--shard-size",
                               str(args.shard_size), "--dim", str(args.dim), "--cache", str(args.cache),
                               "--drive", str(work / "feats.h5")], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
    result.update(shard_size=args.shard_size, dim=args.dim)
    print(f"driver: {result['rows']:,} rows in {result['shards']:,} shards: {result['driver_seconds']:.2f} s "
          f"(plan {result['plan_seconds']:.2f} s, commit {result['commit_seconds']:.2f} s), "
          f"{result['rows'] / result['driver_seconds']:,.0f} rows/s, peak RSS {result['peak_rss_mb']:.0f} MB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
