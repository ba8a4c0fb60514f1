"""Scale-out measurements: Ray extraction with 1 and 2 actors against the local engine, and out-of-core SGD.

Usage:
    python benchmarks/bench_ray.py --images 1000 --memory-images 1000,10000 --shard-size 50  # Ray vs local, RSS
    python benchmarks/bench_ray.py --part startup --counts 600,2000  # whole commands: start-up phases, warm actors
    python benchmarks/bench_ray.py --part ooc --rows 200000  # out-of-core fit on a synthetic store
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from _common import jpeg_folder, save
from bench_fit import features


def _driver(folder: Path, out: Path, address: str, workers: int, cpus: int, shard_size: int, pin: bool) -> dict:
    """One Ray extraction in a fresh driver process: its wall time, start-up, and peak RSS (the driver's alone)."""
    code = ("import sys, json, time; from embedfit.extraction.ray import extract_ray; t = time.perf_counter(); "
            f"s = extract_ray({str(folder)!r}, {str(out)!r}, address={address!r}, num_workers={workers}, "
            f"cpus_per_worker={cpus}, shard_size={shard_size}, pin_cpus={pin}, progress=False); "
            # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent across exec.
            "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0].split()[1]; "
            "print(json.dumps({'seconds': time.perf_counter() - t, 'startup': s.startup_seconds, "
            "'embedded': s.embedded, 'peak_rss_mb': int(hwm) / 1024, 'torch': 'torch' in sys.modules}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rates(n: int, seconds: float, startup: float) -> dict:
    return {"img_s": n / seconds, "startup_s": startup, "img_s_after_startup": n / (seconds - startup)}


def bench_ray(images: int, shard_size: int, memory_images: list[int]) -> dict:
    """Local vs Ray on one machine, strong scaling over pinned single-CPU actors, and driver memory vs images.

    Every rate is a whole run (model loading included) and, beside it, the rate after start-up (until the model,
    or every actor's, was ready); the Ray cluster's own start-up is timed apart. The local engine runs in a fresh
    process too, so both pay the same imports.
    """
    import ray

    folder = jpeg_folder(images, 500, 375)
    start = time.perf_counter()
    ctx = ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING",
                   _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    cluster_startup = time.perf_counter() - start
    address = ctx.address_info["gcs_address"]
    cores = len(os.sched_getaffinity(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        code = ("import json, time; from embedfit.extraction.local import extract; t = time.perf_counter(); "
                f"s = extract({str(folder)!r}, {str(Path(tmp) / 'local.h5')!r}, progress=False); "
                "print(json.dumps({'seconds': time.perf_counter() - t, 'startup': s.startup_seconds}))")
        local = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                          check=True).stdout.strip().splitlines()[-1])
        rows.append({"engine": "local", "actors": 1, "cpus_each": cores,
                     **_rates(images, local["seconds"], local["startup"])})
        print(rows[-1], flush=True)  # as it comes: a run on a busy machine may be cut short
        for workers, cpus, pin in [(1, cores, False), (1, 1, True), (2, 1, True)]:
            r = _driver(folder, Path(tmp) / f"ray{workers}x{cpus}{pin}.h5", address, workers, cpus, shard_size, pin)
            rows.append({"engine": "ray", "actors": workers, "cpus_each": cpus, "pinned": pin,
                         **_rates(images, r["seconds"], r["startup"]), "driver_peak_rss_mb": r["peak_rss_mb"],
                         "driver_imported_torch": r["torch"]})
            print(rows[-1], flush=True)
        memory = []
        for n in memory_images:
            sub = jpeg_folder(n, 500, 375, seed=1)
            r = _driver(sub, Path(tmp) / f"mem{n}.h5", address, 1, cores, shard_size, False)
            memory.append({"images": n, "driver_peak_rss_mb": r["peak_rss_mb"],
                           **_rates(n, r["seconds"], r["startup"])})
            print(memory[-1], flush=True)
    ray.shutdown()
    base = rows[0]
    print(f"Ray cluster start-up: {cluster_startup:.1f} s (in none of the rates below)")
    for r in rows:
        extra = f", driver peak RSS {r['driver_peak_rss_mb']:.0f} MB" if "driver_peak_rss_mb" in r else ""
        print(f"{r['engine']:>6} {r['actors']} x {r['cpus_each']} CPU{' pinned' if r.get('pinned') else ''}: "
              f"{r['img_s']:.1f} img/s whole run ({r['img_s'] / base['img_s']:.2f} x local), "
              f"{r['img_s_after_startup']:.1f} img/s after {r['startup_s']:.1f} s start-up "
              f"({r['img_s_after_startup'] / base['img_s_after_startup']:.2f} x local){extra}")
    one, two = rows[2], rows[3]
    print(f"strong scaling, 2 vs 1 pinned single-CPU actors: {two['img_s'] / one['img_s']:.2f} x whole run, "
          f"{two['img_s_after_startup'] / one['img_s_after_startup']:.2f} x after start-up (target >= 1.7)")
    print(f"Ray 1 x {cores} CPU vs local: {rows[1]['img_s'] / base['img_s']:.2f} x whole run, "
          f"{rows[1]['img_s_after_startup'] / base['img_s_after_startup']:.2f} x after start-up (target >= 0.8)")
    for m in memory:
        print(f"driver peak RSS at {m['images']} images: {m['driver_peak_rss_mb']:.0f} MB ({m['img_s']:.1f} img/s)")
    return {"images": images, "shard_size": shard_size, "cluster_startup_seconds": cluster_startup, "rows": rows,
            "memory": memory}


# One extraction in a fresh process, timed from its first line: the JSON of what it did, the time to its first
# result (the first batch, or on Ray the first shard back), and its start-up phases (absent before they existed).
_WHOLE = """import time; t0 = time.perf_counter()
import json
from embedfit.extraction.local import extract
first = []
def seen(e):
    if e.kind == "step" and e.done and not first:
        first.append(time.perf_counter() - t0)
{engine}
s = extract({folder!r}, {out!r}, engine=engine, on_progress=seen)
print(json.dumps({{"seconds": s.seconds, "startup": s.startup_seconds, "phases": getattr(s, "startup_phases", {{}}),
                  "first_result": first[0] if first else None, "in_process": time.perf_counter() - t0,
                  "embedded": s.embedded, "notes": s.notes}}))
"""


def _whole(folder: Path, out: Path, engine: str, env: dict[str, str]) -> dict:
    """A user's command: a fresh process; `wall` is from its start to its exit (Ray's shutdown included)."""
    code = _WHOLE.format(engine=engine, folder=str(folder), out=str(out))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return {"wall": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}


def bench_startup(counts: list[int], workers: int, cpus: int, repeats: int, cold_only: bool,
                  before: str | None = None) -> dict:
    """Whole commands, as a user runs them, against the local engine: Ray on a cluster the run starts itself (the
    default without `--ray-address`), then on a long-lived cluster its first run (new actors) and a second run
    with the same settings (the first run's warm actors), each on a fresh store. Every Ray run's start-up is
    broken down by phase (`ExtractSummary.startup_phases`). `cold_only` skips the long-lived cluster; `before`
    (a folder holding another build's `embedfit` package) adds that build's run on its own cluster, right after
    this build's, so that a busy machine moves both alike."""
    import ray

    engine = (f"from embedfit.extraction.ray import RayEngine; engine = RayEngine(address={{address!r}}, "
              f"num_workers={workers}, cpus_per_worker={cpus})")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-ray-", dir="/tmp") as tmp:
        tmp = Path(tmp)
        own = {"RAY_TMPDIR": str(tmp / "rt"), "RAY_ADDRESS": ""}  # a local cluster of the run's own, not another's
        (tmp / "rt").mkdir()
        address = None
        if not cold_only:  # the long-lived cluster, held by this process: its drivers come and go
            ctx = ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING",
                           _temp_dir=str(tmp / "rl"))
            address = ctx.address_info["gcs_address"]
        for n in counts:
            folder = jpeg_folder(n, 500, 375)
            for rep in range(repeats):
                row: dict = {"images": n, "repeat": rep}
                row["local"] = _whole(folder, tmp / f"l{n}-{rep}.h5", "engine = 'local'", {})
                row["ray_own_cluster"] = _whole(folder, tmp / f"r{n}-{rep}.h5", engine.format(address=None), own)
                if before:
                    row["ray_own_cluster_before"] = _whole(folder, tmp / f"b{n}-{rep}.h5", engine.format(address=None),
                                                           {**own, "PYTHONPATH": before})
                if address:
                    row["ray_cold_actors"] = _whole(folder, tmp / f"c{n}-{rep}.h5", engine.format(address=address), {})
                    row["ray_warm_actors"] = _whole(folder, tmp / f"w{n}-{rep}.h5", engine.format(address=address), {})
                    from embedfit.extraction.ray import stop_workers

                    row["stopped_workers"] = stop_workers(address)  # the next count starts cold again
                results.append(row)
                _print_startup_row(row)
        if address:
            ray.shutdown()
    summary = {}
    for n in counts:
        rows = [r for r in results if r["images"] == n]
        med = {k: float(np.median([r[k]["wall"] for r in rows])) for k in rows[0] if isinstance(rows[0][k], dict)}
        summary[str(n)] = {"wall_s": med, "x_local_whole_run": {k: med["local"] / v for k, v in med.items()}}
        print(f"{n} images, whole commands (medians of {len(rows)}): "
              + ", ".join(f"{k} {v:.1f} s ({med['local'] / v:.2f} x local)" for k, v in med.items()), flush=True)
    return {"counts": counts, "workers": workers, "cpus_per_worker": cpus, "repeats": repeats, "runs": results,
            "summary": summary}


def _print_startup_row(row: dict) -> None:
    local = row["local"]["wall"]
    for kind, r in row.items():
        if not isinstance(r, dict):
            continue
        phases = ", ".join(f"{k} {v:.1f}" for k, v in r.get("phases", {}).items())
        first = f", first result at {r['first_result']:.1f} s" if r.get("first_result") else ""
        print(f"{row['images']} images, {kind}: {r['wall']:.1f} s whole command ({local / r['wall']:.2f} x local), "
              f"extract {r['seconds']:.1f} s, start-up {r['startup']:.1f} s ({phases}){first}", flush=True)


def bench_shards(shards: int, shard_size: int, dim: int = 1280) -> dict:
    """What a sharded store costs without a model: one worker's shard write, the driver's manifest commit, reads."""
    from embedfit.backbones.factory import create_backbone
    from embedfit.images import ImageRecord
    from embedfit.storage import OK, FeatureStore, StoreSettings
    from embedfit.storage.shards import ShardedStoreWriter, write_shard

    spec = create_backbone("efficientnet_lite0").spec  # provenance only; features are random
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        out_by_dtype = {}
        for dtype in ("float16", "float32"):
            settings = StoreSettings(spec, dtype, "none", "fp32")
            path = Path(tmp) / f"{dtype}.h5"
            with ShardedStoreWriter(path, settings, shard_size=shard_size) as writer:
                records, write_s = [], []
                for i in range(shards):
                    # Keys sorted across shards, as the engines cut them: one virtual-dataset mapping per shard.
                    keys = [f"c{g * 10 // (shards * shard_size)}/img{g:09d}.jpg"
                            for g in range(i * shard_size, (i + 1) * shard_size)]
                    feats = rng.standard_normal((shard_size, dim), dtype=np.float32)
                    t = time.perf_counter()
                    write_shard(writer.parts, writer.shard_name(i), settings, keys, [k[:2] for k in keys],
                                [1] * shard_size, [1] * shard_size, [OK] * shard_size, [""] * shard_size, feats)
                    write_s.append(time.perf_counter() - t)
                    records += [ImageRecord(Path(k), k, int(k[1]), 1, 1) for k in keys]
                t = time.perf_counter()
                writer.commit(records, [f"c{c}" for c in range(10)], complete=True)
                commit_s = time.perf_counter() - t
            t = time.perf_counter()
            store = FeatureStore.open(path)
            open_s = time.perf_counter() - t
            t = time.perf_counter()
            store.features()
            read_s = time.perf_counter() - t
            rows = shards * shard_size
            out_by_dtype[dtype] = {
                "shard_write_rows_s": shard_size / float(np.median(write_s)),
                "shard_write_mb_s": shard_size * dim * np.dtype(dtype).itemsize / 2**20 / float(np.median(write_s)),
                "commit_seconds": commit_s, "commit_rows_s": rows / commit_s, "open_seconds": open_s,
                "read_rows_s": rows / read_s, "manifest_mb": path.stat().st_size / 2**20,
                "bytes_per_row_on_disk": (path.stat().st_size + sum(p.stat().st_size for p in writer.parts.iterdir()))
                / rows}
            r = out_by_dtype[dtype]
            print(f"{dtype}: shard write {r['shard_write_rows_s']:.0f} rows/s ({r['shard_write_mb_s']:.0f} MB/s, "
                  f"median of {shards}); manifest commit of {rows} rows in {shards} shards {commit_s:.2f} s "
                  f"({r['commit_rows_s']:.0f} rows/s); open {open_s:.2f} s; full read {r['read_rows_s']:.0f} rows/s; "
                  f"manifest {r['manifest_mb']:.1f} MB; {r['bytes_per_row_on_disk']:.0f} bytes/row on disk")
    return {"shards": shards, "shard_size": shard_size, "dim": dim, **out_by_dtype}


def synthetic_store(path: Path, n: int, classes: int) -> None:
    """A real store of synthetic class-structured features, rows sorted by class like a folder tree."""
    from embedfit.backbones.factory import create_backbone
    from embedfit.images import ImageRecord
    from embedfit.storage import OK, StoreSettings, StoreWriter

    spec = create_backbone("efficientnet_lite0").spec  # provenance only; the features are synthetic (1280-d)
    names = [f"c{c:02d}" for c in range(classes)]
    records = []
    with StoreWriter(path, StoreSettings(spec, "float16", False, "fp32")) as writer:
        X_all, y_all = features(n, spec.embedding_dim, classes)  # one draw: the same class means throughout
        for start in range(0, n, 50000):
            X, y = X_all[start:start + 50000], y_all[start:start + 50000]
            keys = [f"{names[c]}/img{start + i:09d}.jpg" for i, c in enumerate(y)]
            writer.write_part(keys, [names[c] for c in y], [0] * len(y), [0] * len(y), [OK] * len(y),
                              [""] * len(y), X)
            records += [ImageRecord(Path(k), k, int(c), 0, 0) for k, c in zip(keys, y, strict=True)]
        writer.commit(records, names, complete=True)


def bench_ooc(n: int, classes: int, epochs: int, batch_rows: int) -> dict:
    from sklearn.linear_model import SGDClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from embedfit.fitting.out_of_core import fit_out_of_core
    from embedfit.storage import FeatureStore

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.h5"
        synthetic_store(path, n, classes)
        tracemalloc.start()  # numpy and h5py report their buffers to tracemalloc
        start = time.perf_counter()
        result = fit_out_of_core(path, "sgd-logreg", output=Path(tmp) / "run", epochs=epochs, batch_rows=batch_rows)
        ooc_seconds = time.perf_counter() - start
        peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        store = FeatureStore.open(path)
        test_a = np.sort([p["row"] for p in result.predictions])  # the same hold-out split
        train = np.setdiff1d(store.ok_rows(), test_a)
        calibration = _calibration(result, store, test_a)
        start = time.perf_counter()
        pipe = make_pipeline(StandardScaler(), SGDClassifier(loss="log_loss", learning_rate="constant",
                                                             eta0=2.0 / store.dim, average=len(train),
                                                             max_iter=epochs, tol=None, class_weight="balanced",
                                                             random_state=0))
        pipe.fit(store.features(train), store.labels[train])
        mem_seconds = time.perf_counter() - start
        mem_acc = float((pipe.predict(store.features(test_a)) == store.labels[test_a]).mean())
    out = {"rows": n, "dim": store.dim, "classes": classes, "epochs": epochs, "batch_rows": batch_rows,
           "ooc_seconds": ooc_seconds, "ooc_accuracy": result.score("accuracy"),
           "ooc_peak_traced_mb": peak_mb, "in_memory_seconds": mem_seconds, "in_memory_accuracy": mem_acc,
           "features_mb_float32": n * store.dim * 4 / 2**20, **calibration}
    print(f"out-of-core sgd-logreg on {n} x {store.dim} ({out['features_mb_float32']:.0f} MB float32), {epochs} epochs:"
          f" {ooc_seconds:.1f} s (hold-out eval + refit), accuracy {out['ooc_accuracy']:.3f}, peak allocations "
          f"{peak_mb:.0f} MB; in-memory SGD on the same split: {mem_seconds:.1f} s (one fit), "
          f"accuracy {mem_acc:.3f}")
    print("hold-out probabilities: log loss {log_loss:.3f}, ROC AUC {roc_auc:.4f}, argmax(proba) == predict on "
          "{agreement:.1%} of rows, {uniform_rows:.1%} uniform rows; max |decision value| of the saved model "
          "{max_abs_margin:.1f}".format(**calibration))
    return out


def _calibration(result, store, test: np.ndarray) -> dict:
    """Hold-out log loss / AUC / argmax agreement / uniform rows, and the saved model's largest |margin|."""
    names = list(store.class_names)
    proba = np.array([[p[f"p_{c}"] for c in names] for p in result.predictions])
    predicted = np.array([names.index(p["predicted"]) for p in result.predictions])
    clf = result.pipeline[-1]
    sgd = getattr(clf, "estimator", clf)  # the SGD model under its calibration (or bare, before it had one)
    margins = np.concatenate([sgd.decision_function(result.pipeline[:-1].transform(store.features(rows)))
                              for rows in np.array_split(test, max(1, len(test) // 4096))])
    return {"log_loss": result.score("log_loss"), "roc_auc": result.score("roc_auc"),
            "agreement": float((proba.argmax(axis=1) == predicted).mean()),
            "uniform_rows": float((np.ptp(proba, axis=1) < 1e-3).mean()),
            "max_abs_margin": float(np.abs(margins).max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("ray", "startup", "shards", "ooc", "all"), default="ray")
    parser.add_argument("--counts", default="600,2000", help="image counts for --part startup")
    parser.add_argument("--workers", type=int, default=2, help="actors for --part startup (the CLI's default)")
    parser.add_argument("--cpus", type=int, default=1, help="CPUs per actor for --part startup (the CLI's default)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each command for --part startup")
    parser.add_argument("--cold-only", action="store_true",
                        help="--part startup without the long-lived cluster (a build without warm actors)")
    parser.add_argument("--before", help="--part startup: a folder with another build's embedfit package (e.g. "
                        "`git archive REV embedfit | tar -x -C DIR`), run on its own cluster beside this one")
    parser.add_argument("--name", default="ray_startup", help="results file of --part startup")
    parser.add_argument("--shards", type=int, default=100, help="shards for --part shards")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--shard-size", type=int, default=50,
                        help="images per shard (20 shards of 1,000 images keep two actors evenly loaded to the end)")
    parser.add_argument("--memory-images", default="1000,10000", help="image counts for the driver-memory runs")
    parser.add_argument("--rows", type=int, default=200000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-rows", type=int, default=8192)
    args = parser.parse_args()
    if args.part in ("ray", "all"):
        counts = [int(n) for n in args.memory_images.split(",") if n]
        print(f"wrote {save('ray', bench_ray(args.images, args.shard_size, counts))}")
    if args.part in ("startup", "all"):
        counts = [int(n) for n in args.counts.split(",") if n]
        result = bench_startup(counts, args.workers, args.cpus, args.repeats, args.cold_only, args.before)
        print(f"wrote {save(args.name, result)}")
    if args.part in ("shards", "all"):
        print(f"wrote {save('shards', bench_shards(args.shards, args.shard_size))}")
    if args.part in ("ooc", "all"):
        print(f"wrote {save('ooc', bench_ooc(args.rows, args.classes, args.epochs, args.batch_rows))}")


if __name__ == "__main__":
    main()
