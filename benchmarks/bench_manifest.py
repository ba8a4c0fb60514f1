"""The Ray driver's own work, without a model or Ray: take the parts' and shards' summaries, commit the manifest.

Usage:
    python benchmarks/bench_manifest.py --rows 200000            # shard size 1024 (the Ray default), dim 8
    python benchmarks/bench_manifest.py --rows 2000000 --shard-size 4096

First (not timed, cached in --cache) it writes what a fresh run's workers would write: per input part (a class
folder of a synthetic tree of 10 classes) the listing file its listing task writes (`parts.write_listing`: every
image to embed), and per shard the shard an actor writes (`write_shard`: tiny features, since the driver never
reads them; a 64-hex content hash per row and 1 failed row in 500, like real shards). Then, in a fresh process
whose peak RSS is measured alone, it runs what the Ray engine's driver does between splitting the input and the
end: open the store writer, take each part's summary (`PartSummary`) and plan from them alone
(`parts.plan_input`), cut the images to embed into named shards (`parts.cut_shards`), receive each shard as an
actor reports it (the pre-written file is hard-linked under the name the driver gave it, as an actor's rename
would land it, plus the actor's counts), and commit the manifest from the parts' listings, streamed
(`parts.merged_listing`). The last line is JSON: rows, shards, driver_seconds (all of it), plan_seconds (the
summaries to the shard list), commit_seconds and peak_rss_mb (the driver process's VmHWM, so generating the
files does not count).
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


def _parts(rows: int) -> list[tuple[int, int]]:
    """The input's parts (one per class folder) as image ranges."""
    bounds = [-(-c * rows // CLASSES) for c in range(CLASSES)]  # the first image of class c (`listing`'s labels)
    return list(zip(bounds, [*bounds[1:], rows], strict=True))


def generate(folder: Path, rows: int, shard_size: int, dim: int) -> None:
    """The listing files of a fresh run's parts and the shards its actors would write (`shard-bench-<seq>.h5`,
    in key order, shards running across parts)."""
    from embedfit.extraction.parts import write_listing
    from embedfit.storage import FAILED, OK, StoreSettings
    from embedfit.storage.schema import CONTENT_HASH
    from embedfit.storage.shards import write_shard

    settings = StoreSettings(_spec(dim), "float16")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"class_{c:02d}" for c in range(CLASSES)]
    for seq, (start, stop) in enumerate(_parts(rows)):
        keys, labels, sizes, mtimes = listing(start, stop, rows)
        write_listing(str(tmp / f"listing-bench-{seq:06d}.h5"), np.array(keys, dtype=object),
                      [names[c] for c in labels], [f"/data/{k}" for k in keys], sizes, mtimes,
                      np.ones(len(keys), dtype=bool))
    for seq, start in enumerate(range(0, rows, shard_size)):
        keys, labels, sizes, mtimes = listing(start, min(rows, start + shard_size), rows)
        failed = (np.arange(start, start + len(keys)) % 500) == 499
        status = np.where(failed, FAILED, OK)
        errors = ["cannot identify image file" if f else "" for f in failed]
        feats = rng.standard_normal((len(keys), dim)).astype(np.float16)
        feats[failed] = np.nan
        hashes = [f"{(start + i) * 2654435761 % (1 << 64):064x}" for i in range(len(keys))]
        write_shard(tmp, f"shard-bench-{seq:08d}.h5", settings, keys, [names[c] for c in labels], sizes, mtimes,
                    status, errors, feats, {"engine": "ray"}, {CONTENT_HASH: hashes})
    tmp.rename(folder)


def drive(src: Path, store: Path, rows: int, shard_size: int, dim: int) -> dict:
    """The driver's part, timed; runs in its own process (see `main`)."""
    from embedfit.extraction.parts import PartSummary, cut_shards, plan_input
    from embedfit.images import InputPart, InputSplit
    from embedfit.storage import StoreSettings
    from embedfit.storage.shards import ShardedStoreWriter

    t0 = time.perf_counter()
    settings = StoreSettings(_spec(dim), "float16")
    names = [f"class_{c:02d}" for c in range(CLASSES)]
    split = InputSplit("/data", Path("/data"), False, [InputPart("folder", n) for n in names])
    with ShardedStoreWriter(store, settings, shard_size=shard_size) as writer:
        writer.parts.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        summaries = []  # what each listing task returns: counts, key range, labels, a few keys
        for seq, ((start, stop), part) in enumerate(zip(_parts(rows), split.parts, strict=True)):
            keys = listing(start, min(stop, start + 10), rows)[0]
            last = listing(stop - 1, stop, rows)[0][0]
            summaries.append(PartSummary(part, str(src / f"listing-bench-{seq:06d}.h5"), stop - start, stop - start,
                                         0, 0, 0, keys[0], last, [part.name], keys))
        planned, used = plan_input(split, summaries, None)
        shards = cut_shards(used, shard_size, writer.shard_name)
        plan_s = time.perf_counter() - t
        embedded = failed = 0
        for seq, (name, pieces) in enumerate(shards):
            # An actor embeds the shard's images, writes the shard and renames it into place; its counts come back.
            os.link(src / f"shard-bench-{seq:08d}.h5", writer.parts / name)
            n = sum(b - a for _, a, b in pieces)
            keys = listing(seq * shard_size, seq * shard_size + 1, rows)[0] + \
                listing(seq * shard_size + n - 1, seq * shard_size + n, rows)[0]
            writer.written(name, n, keys[0], keys[1])  # the actor's report: its rows and key range
            bad = int(((np.arange(n) + seq * shard_size) % 500 == 499).sum())
            embedded, failed = embedded + n - bad, failed + bad
        t_commit = time.perf_counter()
        result = writer.commit_listing(planned.listing, complete=True)
        commit_s = time.perf_counter() - t_commit
    seconds = time.perf_counter() - t0
    with open("/proc/self/status") as status:  # VmHWM: this process's peak RSS (ru_maxrss may be the parent's)
        hwm = next(ln for ln in status if ln.startswith("VmHWM")).split()[1]
    assert result.rows == rows and result.complete and result.n_failed == failed, result
    assert planned.todo == rows == embedded + failed
    return {"rows": result.rows, "failed": result.n_failed, "shards": len(shards), "driver_seconds": seconds,
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
