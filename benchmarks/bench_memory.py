"""Peak memory of `embedfit extract` against the number of images: it should not grow with the folder.

Each count runs in a fresh process (so peaks do not carry over) that extracts a folder of generated JPEGs and
reports the peak resident set size of itself (model, store writer, batches in flight) and of its largest
decoding worker, from getrusage.

Usage:
    python benchmarks/bench_memory.py --counts 1000 10000 --size 320x240
    python benchmarks/bench_memory.py --device cuda --counts 1000 10000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import hardware, jpeg_folder, save


def _child(folder: str, device: str, workers: int | None) -> None:
    from embedfit.extraction.local import extract

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = extract(folder, Path(tmp) / "feats.h5", device=device, workers=workers)
        seconds = time.perf_counter() - start
        store_mb = (Path(tmp) / "feats.h5").stat().st_size / 2**20
    print(json.dumps({"embedded": summary.embedded, "seconds": seconds, "store_mb": store_mb,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--size", default="320x240")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.device, args.workers)
        return
    w, h = map(int, args.size.split("x"))
    rows = []
    print(f"hardware: {hardware()}")
    for n in args.counts:
        folder = jpeg_folder(n, w, h)
        cmd = [sys.executable, __file__, "--child", str(folder), "--device", args.device]
        if args.workers is not None:
            cmd += ["--workers", str(args.workers)]
        row = {"images": n, **json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True)
                                         .stdout.strip().splitlines()[-1])}
        rows.append(row)
        print(f"{n:>7} images: peak RSS {row['peak_rss_mb']:7.1f} MB (largest worker {row['worker_peak_rss_mb']:6.1f} "
              f"MB), store {row['store_mb']:6.1f} MB, {row['embedded'] / row['seconds']:7.1f} img/s", flush=True)
    if len(rows) > 1:
        growth = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
        print(f"peak RSS at {rows[-1]['images']} vs {rows[0]['images']} images: {growth:.2f}x")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and hardware()["gpu"]) else "cpu"
    print(f"wrote {save(f'memory_{device}', {'size': args.size, 'device': args.device, 'rows': rows})}")


if __name__ == "__main__":
    main()
