"""Ray extraction throughput with 1 and 2 embedding actors on a local cluster, against the local engine.

Usage:
    python benchmarks/bench_ray.py --images 120
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import jpeg_folder, save

from embedfit.extract import extract


def main() -> None:
    import ray

    from embedfit.distributed import extract_ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--shard-size", type=int, default=16)
    args = parser.parse_args()
    folder = jpeg_folder(args.images, 500, 375)
    ray.init(include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        extract(folder, Path(tmp) / "local.h5")
        rows.append({"engine": "local", "workers": 1, "img_s": args.images / (time.perf_counter() - start)})
        for workers in (1, 2):
            start = time.perf_counter()
            extract_ray(folder, Path(tmp) / f"ray{workers}.h5", num_workers=workers, shard_size=args.shard_size)
            rows.append({"engine": "ray", "workers": workers, "img_s": args.images / (time.perf_counter() - start)})
    for r in rows:
        print(f"{r['engine']:>6} x{r['workers']}: {r['img_s']:.1f} img/s (wall time incl. model load)")
    print(f"wrote {save('ray', {'images': args.images, 'rows': rows})}")


if __name__ == "__main__":
    main()
