"""The Ray engine (`embedfit extract --engine ray`): the same extraction fanned out over a Ray cluster.

The driver never loads a model, nor torch, and holds no table of the images: it reads the input's root only
(`embedfit.images.split_input`: its first-level folders, the root's own files, or byte ranges of a CSV) and has
each part listed and planned on the cluster (`embedfit.extraction.parts.plan_part`, by the actors, or by Ray tasks
on a re-run before any actor starts): each lists its part where the data is, plans it against the store's shards
that overlap its keys (the same `plan_blocks` as a local run), writes a *listing file* beside the shards and returns
a `PartSummary` (counts, key range, labels). From the
summaries alone the driver decides the source kind and class list (`parts.plan_input`) and cuts the images still
to embed into shards of `shard_size` images with fixed names, each a few (listing file, first, stop) runs
(`parts.cut_shards`). The actors (one model each, on the CPUs or GPU Ray granted it, with as many intra-op threads
as CPUs) take shard after shard: an actor reads its images from the listing files, decodes on a background thread
while it embeds (the local engine's `iter_embeddings` loop), writes the shard itself (`embedfit.storage.shards`:
locally, then moved whole into ``<store>.shards/``, or uploaded there on object storage) and returns only counts and
failure reasons (on object storage also the shard's metadata copy, for the commit). The driver never sees a
feature; at the end it writes the manifest (`FeatureWriter.commit`) as a streamed merge of the shards' rows and the
parts' listings (`parts.merged_listing`). So the store is a sharded store with the schema, provenance,
resume behaviour and row order of a local run. A re-run whose images are all stored starts no actor.

Start-up (`ExtractSummary.startup_phases`): importing Ray, starting (or joining) the cluster, the actors' processes,
their imports (torch, timm) and model loads. A local cluster the run starts itself gets no `runtime_env` when its
workers (this interpreter, this environment) import this embedfit anyway, so Ray's pre-started workers take the
actors instead of new ones behind a packaging step. On a long-lived cluster (`address` given) the actors stay
after a successful run as named, detached "warm actors" in the `embedfit` namespace, named by everything that
makes them embed differently (the model settings, resources, embedfit's code and `EMBEDFIT_*` settings): the next
run with the same settings takes them as they are and starts at once; another run's settings never match their
name. Each exits by itself after `keep_warm` idle seconds, a run that needs their resources stops idle ones of
other settings, and `stop_workers` (`embedfit ray stop-workers`) stops them all. The actors also list and plan the
parts when a run has them (a new store, or warm actors); a re-run of a store with these settings lists with Ray
tasks first, and starts actors only when something is left to embed.

Failures: Ray restarts an actor that dies and retries its shard (`max_restarts=-1`, `max_task_retries=-1`), and
retries a listing task whose worker dies (`max_retries=3`); a shard or listing written twice replaces itself (same
name), and the manifest keeps one row per image key. A killed driver leaves finished shards, which the next run
reuses (shard granularity; a shard being written is absent), and its listing files, which the next run deletes.

Ray is optional: `pip install 'embedfit[ray]'`; it is imported only inside the functions here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from embedfit.backbones.spec import BackboneSpec
from embedfit.errors import EmbedfitError, UsageError
from embedfit.extraction.engines import ExtractJob
from embedfit.extraction.parts import LISTING_PREFIX, PartSummary, cut_shards, plan_input, remove_listings
from embedfit.extraction.settings import ExtractConfig, ExtractSummary
from embedfit.extraction.writer import FeatureWriter, PlannedInput
from embedfit.images import ImageRecord, InputPart, InputSplit, split_input
from embedfit.storage import StoreSettings
from embedfit.storage.schema import shards_dir
from embedfit.storage.shards import place_metadata_copy
from embedfit.url import is_url, put_file

_TEST_KILL_ONCE = "EMBEDFIT_TEST_KILL_ACTOR_ONCE"  # tests: path of a marker; the first shard's actor exits hard
_TEST_KILL_LISTING_ONCE = "EMBEDFIT_TEST_KILL_LISTING_ONCE"  # tests: the same for the first listing task
DEFAULT_SHARD_SIZE = 1024
MIN_SHARD = 64  # images: below this a shard's fixed costs (its file, the decode thread's first batch) show
SHARDS_PER_ACTOR = 4  # a small run is cut finer than `shard_size`, so that every actor has work to the end
WARM_NAMESPACE = "embedfit"  # Ray namespace of the warm actors a run leaves on a long-lived cluster
DEFAULT_KEEP_WARM = 600.0  # seconds a warm actor waits idle for the next run before it exits
# The settings only the driver uses (each call brings the store's settings); every other field of `ExtractConfig`,
# a new one included, names a warm actor: two runs share actors only when those agree.
_DRIVER_FIELDS = ("workers", "dtype", "overwrite", "retry_failed", "max_failures", "flush_every", "shard_size",
                  "progress")


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError("the Ray engine needs Ray: pip install 'embedfit[ray]'") from None
    return ray


def _answers(address: str, timeout: float = 3.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def connect(address: str | None = None, *, ship_code: bool = False) -> bool:
    """Connect to a Ray cluster, or start a local one, failing within seconds with what to do instead of retrying.

    Args:
        address: None or "auto" (the cluster this machine runs, else a new local one), "HOST:PORT" (its GCS port,
            6379 by default), or "ray://HOST:10001" (Ray Client, needs `ray[client]`).
        ship_code: Ship this embedfit's code and `EMBEDFIT_*` settings to the job's workers (`_runtime_env`).

    Returns:
        True when this call started a local cluster (it stops with this process), False when it joined one
        (or this process was connected already).

    Raises:
        UsageError: Ray or Ray Client is not installed, or the cluster named (or recorded in Ray's
            ``ray_current_cluster`` file) does not answer.
    """
    ray = _ray()
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith("ray://"):
        if importlib.util.find_spec("grpc") is None:
            raise UsageError(f"`address` {address} uses Ray Client, which needs grpcio: pip install "
                             "'ray[client]' (or 'embedfit[ray]', which includes it)")
    elif address and address not in ("auto", "local"):
        if not _answers(address):
            raise UsageError(f"no Ray cluster answers at {address}; check the address (the head's GCS port, "
                             "6379 by default) or start one with `ray start --head`")
    elif address != "local":
        from ray._private.utils import get_ray_address_file, read_ray_address

        recorded = read_ray_address()
        if recorded and not _answers(recorded):
            raise UsageError(f"{get_ray_address_file(None)} names a Ray cluster at {recorded} that no longer "
                             "answers (a stale file from a cluster that was not stopped cleanly); delete that "
                             "file to start a local cluster, or pass `address` HOST:PORT")
        if address == "auto" and not recorded:
            raise UsageError("`address` auto found no running Ray cluster on this machine; start one with "
                             "`ray start --head`, or leave out `address` to start a local one")
        address = recorded or None
    # Ray's own INFO lines (packaging the code, starting a local instance) would bury embedfit's output.
    ray.init(address=address, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
             runtime_env=_runtime_env(local=address is None) if ship_code else None, logging_level="WARNING")
    return address is None


def _runtime_env(local: bool = False) -> dict[str, Any] | None:
    """Ship this embedfit (its code, not its dependencies) and its settings to every node of the job.

    A local cluster's workers run this interpreter in this process's environment (`EMBEDFIT_*` included): when
    they import this same embedfit anyway, nothing is shipped (None), and Ray's pre-started workers can take the
    actors, where a `runtime_env` would start new ones after packaging the code (~1.5 s on 2 cores)."""
    import embedfit

    if local and _workers_import_this_embedfit():
        return None
    return {"py_modules": [str(Path(embedfit.__file__).parent)], "excludes": ["__pycache__"],
            "env_vars": {k: v for k, v in os.environ.items() if k.startswith("EMBEDFIT_")}}


def _workers_import_this_embedfit() -> bool:
    """Whether a fresh process of this interpreter and environment imports the embedfit this process runs: from
    PYTHONPATH, the working directory, or an installed (or editable) distribution at this path; not when it was
    added to `sys.path` at run time (a notebook)."""
    import importlib.metadata
    import site

    import embedfit

    init = Path(embedfit.__file__).resolve()
    root = init.parent.parent
    paths = [*os.environ.get("PYTHONPATH", "").split(os.pathsep), os.getcwd(), *site.getsitepackages()]
    if any(p and Path(p).resolve() == root for p in paths):
        return True
    try:
        dist = importlib.metadata.distribution("embedfit")
    except importlib.metadata.PackageNotFoundError:
        return False
    if Path(str(dist.locate_file("embedfit/__init__.py"))).resolve() == init:
        return True
    url = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")  # an editable install's source
    return url.rstrip("/") == root.as_uri()


class _ShardWorker:
    """Ray actor: one model, loaded once; each call embeds one shard of images and writes it (no features returned).

    A warm actor (`ready(keep_warm)` with seconds) outlives its run and exits by itself once idle that long.
    """

    def __init__(self, config: ExtractConfig, device: str, threads: int, cpu: int | None) -> None:
        began = time.perf_counter()
        self.host = socket.gethostname()
        self.failure: BaseException | None = None
        self.phases: dict[str, float] = {}  # this process's share of the start-up, reported once by `ready`
        self.busy, self.last_used, self.keep_warm = False, time.monotonic(), 0.0
        self._reaper: threading.Thread | None = None
        try:  # a failure is reported by `ready`, in one line naming this node, not as a dead actor
            import torch

            from embedfit.backbones.factory import create_backbone
            from embedfit.extraction.encoder import Encoder
            from embedfit.extraction.settings import resolve_device

            imported = time.perf_counter()
            self.phases["actor imports"] = imported - began
            if cpu is not None and hasattr(os, "sched_setaffinity"):  # strong-scaling runs: one actor per core
                os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[cpu % len(os.sched_getaffinity(0))]})
            # Ray sets OMP_NUM_THREADS=1 in actors; give the model the CPUs this actor was granted (ONNX Runtime's
            # intra-op threads follow torch's count).
            torch.set_num_threads(threads)
            self.config = config
            backbone = create_backbone(config.backbone, weights=config.weights, layer=config.layer,
                                       pool=config.pool, resolution=config.resolution)
            self.encoder = Encoder(backbone, resolve_device(device), precision=config.precision, tta=config.tta,
                                   channels_last=config.channels_last, compile=config.compile,
                                   runtime=config.runtime)
            self.phases["model load"] = time.perf_counter() - imported
        except Exception as exc:
            self.failure = exc

    def ready(self, keep_warm: float = 0.0) -> tuple[str, BackboneSpec | None, str, BaseException | None,
                                                     dict[str, float]]:
        """(host, the backbone's spec, runtime, None, start-up phases) once the model is loaded, or (host, None, "",
        the failure, {}). The phases come with the first call only: a warm actor's next run loads nothing.

        Args:
            keep_warm: Seconds idle after which this actor exits by itself; 0: never (the run stops it).
        """
        self.last_used, phases, self.phases = time.monotonic(), self.phases, {}
        if self.failure is not None:
            return self.host, None, "", self.failure, {}
        self.keep_warm = keep_warm
        if keep_warm and self._reaper is None:
            self._reaper = threading.Thread(target=self._exit_when_idle, name="embedfit-keep-warm", daemon=True)
            self._reaper.start()
        return self.host, self.encoder.spec, self.encoder.runtime, None, phases

    def plan_part(self, split: InputSplit, part: InputPart, listing: str, sources: list[tuple[str, Any]],
                  retry_failed: bool) -> Any:
        """List and plan one part of the input (what a listing task does, in this process: no new one)."""
        self.busy = True
        try:
            return _plan_part(split, part, listing, sources, retry_failed)
        finally:
            self.busy, self.last_used = False, time.monotonic()

    def info(self) -> dict[str, Any]:
        """This actor's process id and the seconds since its last call ended (0 while it embeds)."""
        return {"pid": os.getpid(), "idle": 0.0 if self.busy else time.monotonic() - self.last_used}

    def _exit_when_idle(self) -> None:
        import ray

        while True:
            time.sleep(min(5.0, max(0.2, self.keep_warm / 10)))
            if self.keep_warm and not self.busy and time.monotonic() - self.last_used > self.keep_warm:
                # no_restart: an actor that times out is gone for good (a crash is restarted, this is not)
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return

    def run(self, name: str, pieces: list[tuple[str, int, int]],
            target: tuple[StoreSettings, str, dict[str, Any]]) -> dict[str, Any]:
        """Embed the images of shard `name` and write the shard: `pieces` (listing file, first, stop) name them as
        runs of the images to embed of the input's parts (`embedfit.extraction.parts.read_todo`).

        `target` (settings, shards folder, provenance) comes with every call, not once, so that an actor Ray
        restarts (which runs only `__init__` again) writes the same shards. The folder is a path every worker can
        write (a shared filesystem) or a URL on object storage, where the shard is uploaded whole.
        """
        self.busy = True
        try:
            return self._run(name, pieces, target)
        finally:
            self.busy, self.last_used = False, time.monotonic()

    def _run(self, name: str, pieces: list[tuple[str, int, int]],
             target: tuple[StoreSettings, str, dict[str, Any]]) -> dict[str, Any]:
        settings, folder, provenance = target
        import numpy as np

        from embedfit.extraction.encoder import iter_embeddings
        from embedfit.extraction.parts import read_todo
        from embedfit.storage import CONTENT_HASH, FAILED, OK
        from embedfit.storage.shards import metadata_copy, write_shard

        marker = os.environ.get(_TEST_KILL_ONCE)
        if marker and not Path(marker).exists():  # test hook: die mid-run once, as a preempted worker would
            Path(marker).write_text("killed")
            os._exit(1)
        items = {}  # by key: a shard is sorted, one row per key (a CSV's parts may list a key twice)
        for location, start, stop in pieces:
            for path, key, label, size, mtime in read_todo(location, start, stop):
                items.setdefault(key, (path, label, size, mtime))
        keys = sorted(items)
        records = [ImageRecord(p if is_url(p) else Path(p), k, -1, s, m)  # URLs stay strings
                   for k in keys for p, _, s, m in [items[k]]]
        c = self.config
        batches = list(iter_embeddings(records, self.encoder, batch_size=c.batch_size, workers=0,
                                       jpeg_draft=c.jpeg_draft, max_pixels=c.max_pixels, decode=c.decode,
                                       decode_thread=True))
        errors = [e for b in batches for e in b.errors]
        args = (name, settings, keys, [items[k][1] for k in keys], [r.size for r in records],
                [r.mtime_ns for r in records], [FAILED if e else OK for e in errors], errors,
                np.concatenate([b.features for b in batches]), {**provenance, "runtime": self.encoder.runtime},
                {CONTENT_HASH: [h for b in batches for h in b.hashes]})
        report = {"name": name, "rows": len(records), "first": keys[0] if keys else "",
                  "last": keys[-1] if keys else "",
                  "failures": [(r.key, e) for r, e in zip(records, errors, strict=True) if e]}
        if is_url(folder):  # the store is on object storage: written here, uploaded whole (one PUT)
            with tempfile.TemporaryDirectory(prefix="embedfit-shard-") as local:
                shard = write_shard(local, *args)
                put_file(shard, f"{folder}/{name}")
                # After the upload: the driver commits over this copy, which stands for a shard that is there.
                report["copy"] = metadata_copy(shard)
        else:
            write_shard(folder, *args)
        return report


def _plan_part(split: InputSplit, part: InputPart, listing: str, sources: list[tuple[str, Any]],
               retry_failed: bool) -> Any:
    """Ray task: list and plan one part of the input where the data is (`embedfit.extraction.parts.plan_part`)."""
    from embedfit.extraction.parts import plan_part

    marker = os.environ.get(_TEST_KILL_LISTING_ONCE)
    if marker and not Path(marker).exists():  # test hook: the task's worker dies once, as a lost node's would
        Path(marker).write_text("killed")
        os._exit(1)
    return plan_part(split, part, listing, sources, retry_failed=retry_failed)


def _check_options(config: ExtractConfig, num_gpus_per_worker: float) -> None:
    """Options that mean nothing on Ray are one-line errors, not silently ignored."""
    if config.workers is not None:
        raise UsageError("`workers` does not apply on Ray: each actor decodes on a background thread; "
                         "use `cpus_per_worker` and `num_workers`")
    if config.device not in ("auto", "cpu", "cuda") and not config.device.startswith("cuda"):
        raise UsageError(f"`device` {config.device} does not apply on Ray; actors use a GPU when "
                         "`num_gpus_per_worker` is set, else the CPU")
    if config.device.startswith("cuda") and not num_gpus_per_worker:
        raise UsageError("`device` cuda on Ray needs `num_gpus_per_worker` (e.g. 1)")
    if config.device == "cpu" and num_gpus_per_worker:
        raise UsageError("`device` cpu contradicts `num_gpus_per_worker`; leave one out")


class RayEngine:
    """The Ray engine: actors embed shards of the images still to embed and write them; the driver commits.

    Args:
        address: Ray cluster address (see `connect`).
        num_workers: Embedding actors (one model each).
        num_gpus_per_worker: GPUs per actor (0 for CPU actors).
        cpus_per_worker: CPUs Ray reserves per actor; the actor's model runs that many threads.
        pin_cpus: Pin actor i to this machine's i-th allowed CPU (benchmarks of scaling on one machine).
        keep_warm: Seconds the actors stay after a successful run, idle, for the next run with the same settings
            (warm actors; `stop_workers` stops them sooner); 0 stops them with the run. None: `DEFAULT_KEEP_WARM`
            on a cluster named by `address` (or RAY_ADDRESS), 0 otherwise. A cluster the run starts itself stops
            with it, so it takes no `keep_warm`.

    Raises:
        UsageError: Ray missing, fewer than one worker or CPU, or a negative `keep_warm`.
    """

    name = "ray"
    shard_size: int | None = DEFAULT_SHARD_SIZE

    def __init__(self, address: str | None = None, num_workers: int = 2, num_gpus_per_worker: float = 0.0,
                 cpus_per_worker: int = 1, pin_cpus: bool = False, keep_warm: float | None = None) -> None:
        if importlib.util.find_spec("ray") is None:  # found, not imported: importing is start-up, timed by `run`
            _ray()
        if num_workers < 1 or cpus_per_worker < 1:
            raise UsageError(f"`num_workers` and `cpus_per_worker` must be at least 1, got {num_workers} and "
                             f"{cpus_per_worker}")
        if keep_warm is not None and keep_warm < 0:
            raise UsageError(f"`keep_warm` must be 0 or more seconds, got {keep_warm}")
        self.address, self.num_workers, self.num_gpus_per_worker = address, num_workers, num_gpus_per_worker
        self.cpus_per_worker, self.pin_cpus, self.keep_warm = cpus_per_worker, pin_cpus, keep_warm

    def run(self, job: ExtractJob) -> ExtractSummary:
        """Split the input at its root, have it listed and planned part by part on the cluster, start the actors
        (or take the warm ones) and take the spec from them, hand out the shards, commit the manifest. A re-run
        whose images are all stored starts no actor. On object storage (`job.url`) the actors upload their shards
        next to it."""
        phases = {"store checks": time.perf_counter() - job.started}
        lap = time.perf_counter()
        ray = _ray()
        config = job.config
        _check_options(config, self.num_gpus_per_worker)
        device = "cuda" if self.num_gpus_per_worker > 0 else "cpu"
        phases["import ray"], lap = time.perf_counter() - lap, time.perf_counter()
        started_cluster = connect(self.address, ship_code=True)
        phases["cluster"], lap = time.perf_counter() - lap, time.perf_counter()
        keep_warm = self._keep_warm(started_cluster)
        split = split_input(job.source)
        pool = _Pool(self, ray, config, device, keep_warm)
        shards_url = f"{job.url}.shards" if job.url else None
        lister: _Lister | None = None
        finished = False
        try:
            if job.stored is None or (keep_warm and pool.all_warm()):  # the actors' model decides the store
                pool.start()
                if _fresh(job):  # nothing stored to plan against: the actors list the parts once they are up
                    lister = _Lister(ray, split, job, shards_url or str(shards_dir(job.output)), [], self.num_workers,
                                     pool.actors)
                phases.update(pool.wait())
            settings = job.stored or pool.settings()
            with FeatureWriter(job.output, settings, None, overwrite=config.overwrite,
                               retry_failed=config.retry_failed, shard_size=config.shard_size,
                               started=job.started) as writer:
                store = writer.store
                if job.stored is not None and pool.spec is not None:  # warm actors taken for the listing
                    store.check_settings(pool.settings(), "the model the Ray actors loaded")
                lap = time.perf_counter()
                # A killed run's listings go (we hold the lock now), not those this run's tasks are writing.
                remove_listings(store.parts, keep_prefix=lister.prefix if lister else "")
                if lister is None:
                    sources = [(f"{shards_url}/{p.name}" if shards_url else str(p), info)
                               for p, info in store.source_infos()]
                    lister = _Lister(ray, split, job, shards_url or str(store.parts), sources, self.num_workers,
                                     pool.actors)
                planned = lister.planned()
                writer.use_plan(planned)
                phases["listing"] = time.perf_counter() - lap
                if not planned.todo:  # every image is stored: no model needed
                    writer.commit()
                    writer.summary.device = "no device: nothing to embed"
                    finished = True
                    return writer.summary
                if pool.actors is None:
                    pool.start()
                    phases.update(pool.wait())
                    store.check_settings(pool.settings(), "the model the Ray actors loaded")
                ready = time.perf_counter() - job.started
                summary = _extract_shards(ray, pool, writer, job, lister,
                                          f"ray ({self.num_workers} x {device}, {self.cpus_per_worker} CPU each)")
                summary.startup_seconds, summary.startup_phases = ready, phases
                if keep_warm:
                    summary.notes.append(f"{pool.reused} of {len(pool.actors)} Ray actors were warm (same settings); "
                                         f"all stay {keep_warm:.0f} s idle for the next run (`embedfit ray "
                                         "stop-workers` stops them)")
                finished = True
                return summary
        finally:
            if lister is not None:
                lister.remove()
            if pool.actors and not (finished and keep_warm):
                _kill(ray, pool.actors)

    def _keep_warm(self, started_cluster: bool) -> float:
        """The idle seconds this run's actors stay after it (0: they stop with it)."""
        if started_cluster:
            if self.keep_warm:
                raise UsageError("`keep_warm` needs a long-lived Ray cluster (`address`, e.g. one started with "
                                 "`ray start --head`): the cluster this run started stops with it")
            return 0.0
        if self.keep_warm is not None:
            return float(self.keep_warm)
        named = self.address or os.environ.get("RAY_ADDRESS")
        return DEFAULT_KEEP_WARM if named and named != "local" else 0.0


def extract_ray(source: str | os.PathLike, output: str | os.PathLike, config: ExtractConfig | None = None, *,
                address: str | None = None, num_workers: int = 2, num_gpus_per_worker: float = 0.0,
                cpus_per_worker: int = 1, pin_cpus: bool = False, keep_warm: float | None = None,
                class_names: list[str] | None = None, **options: Any) -> ExtractSummary:
    """`embedfit.extract` on a Ray cluster (`engine=RayEngine(...)`): a sharded store written by the workers,
    same resume, same rows.

    Args:
        source: Image folder or CSV, at the same path on every node (a shared filesystem), or a URL on object
            storage (``s3://bucket/prefix``), which every node reads with its own credentials.
        output: The store's manifest; its shards go to ``<output>.shards/``: on a shared filesystem every node
            can write, or on object storage (``s3://...``), where each worker uploads the shards it writes.
        config: Extraction settings (keyword `options` override fields); `config.shard_size` defaults to 1024.
        address, num_workers, num_gpus_per_worker, cpus_per_worker, pin_cpus, keep_warm: The cluster and its
            actors (see `RayEngine`).
        class_names: Class list to use instead of the folder names.

    Raises:
        UsageError: An option that does not apply on Ray, Ray missing, the cluster unreachable, a node without
            embedfit.
        ExtractionInterrupted: Ctrl-C or `max_failures`; finished shards are kept and the run can resume.
    """
    from embedfit.extraction.local import extract

    engine = RayEngine(address=address, num_workers=num_workers, num_gpus_per_worker=num_gpus_per_worker,
                       cpus_per_worker=cpus_per_worker, pin_cpus=pin_cpus, keep_warm=keep_warm)
    return extract(source, output, config, class_names=class_names, engine=engine, **options)


def _kill(ray: Any, actors: list[Any]) -> None:
    """On a long-lived cluster, our actors must not outlive the run (warm actors: only a successful one)."""
    for a in actors:
        ray.kill(a, no_restart=True)


def _start_actors(ray: Any, config: ExtractConfig, device: str, n: int, cpus: int, gpus: float, pin: bool,
                  keep_warm: float) -> tuple[list[Any], int]:
    """The run's `n` actors and how many of them were warm already. Without `keep_warm`, new actors that stop with
    the run; with it, the warm actors named for these settings (`_warm_name`), started where missing, after
    stopping idle warm actors of other settings when the cluster lacks the CPUs or GPUs for the new ones.

    The actors load their models while the driver goes on: `_spec_of` waits for them.
    """
    actor = ray.remote(_ShardWorker)
    options = {"num_cpus": cpus, "num_gpus": gpus or None, "max_restarts": -1, "max_task_retries": -1}
    if not keep_warm:
        return [actor.options(**options).remote(config, device, cpus, i if pin else None) for i in range(n)], 0
    prefix = _warm_name(config, device, cpus, gpus, pin)
    names = _warm_names(ray)
    missing = [i for i in range(n) if f"{prefix}-{i}" not in names]
    if missing:
        _stop_idle(ray, [m for m in names if not m.startswith(f"{prefix}-")], len(missing) * cpus,
                   len(missing) * gpus)
    # get_if_exists: two runs starting at once share one actor per name instead of failing on the name
    return [actor.options(**options, name=f"{prefix}-{i}", namespace=WARM_NAMESPACE, lifetime="detached",
                          get_if_exists=True).remote(config, device, cpus, i if pin else None)
            for i in range(n)], n - len(missing)


def _warm_name(config: ExtractConfig, device: str, cpus: int, gpus: float, pin: bool) -> str:
    """The name prefix of the warm actors for these settings: a digest of everything that makes an actor embed
    differently (the model settings, its weights file, resources, embedfit's code, the `EMBEDFIT_*` settings)."""
    identity: dict[str, Any] = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                                if f.name not in _DRIVER_FIELDS}
    if config.weights and not is_url(config.weights) and os.path.exists(config.weights):
        st = os.stat(config.weights)  # the same path with other weights in it is another model
        identity["weights_file"] = [st.st_size, st.st_mtime_ns]
    identity.update(engine_device=device, cpus=cpus, gpus=gpus, pin=pin, code=_code_digest(),
                    env=sorted((k, v) for k, v in os.environ.items() if k.startswith("EMBEDFIT_")))
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"shard-worker-{digest}"


def _code_digest() -> str:
    """This embedfit's code, as names, sizes and times of its modules (a few ms): a warm actor runs its own."""
    import embedfit

    root = Path(embedfit.__file__).parent
    h = hashlib.sha256(embedfit.__version__.encode())
    for path in sorted(root.rglob("*.py")):
        st = path.stat()
        h.update(f"{path.relative_to(root)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def _warm_names(ray: Any) -> set[str]:
    """The names of the warm actors on the cluster (every run's, every setting's)."""
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == WARM_NAMESPACE}


def _stop_idle(ray: Any, names: list[str], cpus: float, gpus: float) -> None:
    """Stop warm actors of other settings that are idle (a second or more), when the cluster has fewer free CPUs or
    GPUs than `cpus` and `gpus`: a run that needs their resources should not wait for their idle timeout. A warm
    actor busy with another run does not answer within the timeout and is left alone."""
    free = ray.available_resources()
    if free.get("CPU", 0.0) >= cpus and free.get("GPU", 0.0) >= gpus:
        return
    for name in names:
        try:
            handle = ray.get_actor(name, namespace=WARM_NAMESPACE)
            idle = ray.get(handle.info.remote(), timeout=2.0)["idle"]
        except (ValueError, ray.exceptions.RayError):  # gone since listed, busy, or dying
            continue
        if idle >= 1.0:
            ray.kill(handle, no_restart=True)


def stop_workers(address: str | None = None) -> int:
    """Stop every warm actor (`RayEngine(keep_warm=...)`) on a running cluster, idle or not.

    Args:
        address: The cluster (see `connect`); None: the one this machine runs (`ray start`), or RAY_ADDRESS.

    Returns:
        How many actors were stopped.

    Raises:
        UsageError: Ray missing, or no cluster answers (a local one is never started for this).
    """
    ray = _ray()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None and not ray.is_initialized():
        from ray._private.utils import read_ray_address

        if not read_ray_address():
            raise UsageError("no Ray cluster runs on this machine, so no warm actors to stop; name another cluster "
                             "with `address`")
    connect(address or "auto")
    stopped = 0
    for name in sorted(_warm_names(ray)):
        try:
            ray.kill(ray.get_actor(name, namespace=WARM_NAMESPACE), no_restart=True)
            stopped += 1
        except ValueError:  # exited by itself since listed
            pass
    return stopped


def _spec_of(ray: Any, actors: list[Any], keep_warm: float = 0.0) -> tuple[BackboneSpec, str, dict[str, float]]:
    """The backbone spec every actor loaded, their runtimes, and the start-up phases of the slowest new one
    ({} when all were warm); the first failure (a node without torch, missing weights...) is raised in one line
    naming its node, and actors that disagree (nodes with other weights files) are refused."""
    specs, runtimes, inside = [], set(), {}
    for host, spec, runtime, failure, phases in ray.get([a.ready.remote(keep_warm) for a in actors]):
        if isinstance(failure, EmbedfitError):
            raise failure
        if failure is not None:
            first = str(failure).splitlines()[0] if str(failure) else ""
            raise UsageError(f"Ray node {host} cannot run embedfit ({type(failure).__name__}: {first}); install "
                             "'embedfit[ray]' (torch, timm) on every node, e.g. in the cluster's image")
        specs.append((host, spec))
        runtimes.add(runtime)
        if sum(phases.values()) > sum(inside.values()):
            inside = phases
    for host, spec in specs[1:]:
        if spec != specs[0][1]:
            raise UsageError(f"Ray nodes {specs[0][0]} and {host} load different models for "
                             f"{specs[0][1].short()} ({specs[0][1].differences(spec)[0]}); give every node the "
                             "same weights files and library versions")
    return specs[0][1], "+".join(sorted(runtimes)), inside


def _extract_shards(ray: Any, pool: _Pool, writer: FeatureWriter, job: ExtractJob, lister: _Lister,
                    device: str) -> ExtractSummary:
    """Cut the images still to embed into shards, hand them to the actors, count what they wrote, commit.

    A shard is a run of the parts' images to embed in key order (`_Lister.shards`), named before the work starts.
    On object storage (`job.url`) the actors upload their shards to ``<url>.shards`` and report each with its
    metadata copy (`embedfit.storage.shards.metadata_copy`: no features, ~250 kB per 1024 rows), which goes into
    the local shards folder under the shard's name for the commit (which reads the shards' per-row metadata and
    their features' shape only): the driver downloads no shard.
    """
    from ray.util import ActorPool

    config, actors = job.config, pool.actors
    shards_url = f"{job.url}.shards" if job.url else None
    summary, store = writer.summary, writer.store
    summary.device, summary.runtime = device, pool.runtime
    provenance = {"device": device, "engine": "ray", "decode": config.decode, "runtime": pool.runtime}
    target = ray.put((writer.store.settings, shards_url or str(store.parts), provenance))
    shards = lister.shards(store, len(actors), config.shard_size or DEFAULT_SHARD_SIZE)
    received = []

    def add(result: dict[str, Any]) -> tuple[int, str]:
        received.append(result["name"])
        if shards_url:
            place_metadata_copy(store.parts, result["name"], result["copy"])
        if result["rows"]:
            store.written(result["name"], result["rows"], result["first"], result["last"])
        writer.add_written(result["rows"], result["failures"])
        return result["rows"], ""

    def stop() -> None:
        # The actors are stopped before the manifest is committed: no shard is written after it. Warm actors
        # that returned every shard have none in flight, and stay.
        if not pool.keep_warm or len(received) < len(shards):
            _kill(ray, actors)

    writer.run(ActorPool(actors).map_unordered(lambda a, shard: a.run.remote(*shard, target), shards), add,
               config=config, source=job.source, output=job.output, provenance=provenance,
               stop=stop, on_progress=job.on_progress)
    return summary


def _fresh(job: ExtractJob) -> bool:
    """Whether the store has nothing to plan against: started afresh, or neither a manifest nor shards exist."""
    folder = shards_dir(job.output)
    return job.config.overwrite or (not Path(job.output).exists()
                                    and not (folder.is_dir() and any(folder.glob("shard-*.h5"))))


class _Pool:
    """The run's actors: started (`start`: new ones, or the warm ones for these settings) and waited for (`wait`:
    the spec they all loaded, their runtime and the start-up phases)."""

    def __init__(self, engine: RayEngine, ray: Any, config: ExtractConfig, device: str, keep_warm: float) -> None:
        self.engine, self.ray, self.config, self.device, self.keep_warm = engine, ray, config, device, keep_warm
        self.actors: list[Any] | None = None
        self.reused = 0
        self.spec: BackboneSpec | None = None
        self.runtime = ""
        self._started = 0.0

    def settings(self) -> StoreSettings:
        """What the actors' model makes, with this run's dtype, TTA and precision (once `wait` has the spec)."""
        return StoreSettings(self.spec, self.config.dtype, self.config.tta, self.config.precision)

    def all_warm(self) -> bool:
        """Whether warm actors for these settings are on the cluster, all of them (taking them loads nothing)."""
        e = self.engine
        prefix = _warm_name(self.config, self.device, e.cpus_per_worker, e.num_gpus_per_worker, e.pin_cpus)
        return {f"{prefix}-{i}" for i in range(e.num_workers)} <= _warm_names(self.ray)

    def start(self) -> None:
        e = self.engine
        self._started = time.perf_counter()
        self.actors, self.reused = _start_actors(self.ray, self.config, self.device, e.num_workers,
                                                 e.cpus_per_worker, e.num_gpus_per_worker, e.pin_cpus, self.keep_warm)

    def wait(self) -> dict[str, float]:
        """Wait for every actor's model; the start-up phases: the slowest actor's own imports and model load, and
        the rest of the wait as its process starting ("actor start")."""
        try:
            self.spec, self.runtime, inside = _spec_of(self.ray, self.actors, self.keep_warm)
        except self.ray.exceptions.RayActorError:
            if not self.keep_warm:
                raise
            # A warm actor reached its idle timeout just as this run took it: start the missing ones.
            self.start()
            self.spec, self.runtime, inside = _spec_of(self.ray, self.actors, self.keep_warm)
        return {"actor start": time.perf_counter() - self._started - sum(inside.values()), **inside}


class _Lister:
    """The input's parts listed and planned on the cluster, a few at a time, each into its listing file in `folder`
    (the shards folder, or its URL on object storage): by the run's `actors` when it has them (their processes are
    there; a task of a new run waits seconds for a worker process of its own job, which on a small machine also
    slows the models loading beside it), else by Ray tasks (a re-run that may have nothing to embed starts no
    actor)."""

    def __init__(self, ray: Any, split: InputSplit, job: ExtractJob, folder: str, sources: list[tuple[str, Any]],
                 workers: int, actors: list[Any] | None = None) -> None:
        self.ray, self.split, self.job, self.folder = ray, split, job, folder
        if not is_url(folder):
            Path(folder).mkdir(parents=True, exist_ok=True)
        self.prefix = f"{LISTING_PREFIX}{time.time_ns():020d}-{os.getpid()}-"
        self.locations = [f"{folder}/{self.prefix}{i:06d}.h5" for i in range(len(split.parts))]
        task = ray.remote(num_cpus=0, max_retries=3)(_plan_part)  # I/O bound: beside the actors, not for CPUs
        sources_ref = ray.put(sources)
        self._task = lambda i: task.remote(split, split.parts[i], self.locations[i], sources_ref,
                                           job.config.retry_failed)
        self._submit = self._task if not actors else lambda i: actors[i % len(actors)].plan_part.remote(
            split, split.parts[i], self.locations[i], sources_ref, job.config.retry_failed)
        self._limit = max(2, 2 * workers)  # tasks in flight: listing is I/O, but each task is a process
        self._next = 0
        self._running: dict[Any, int] = {}
        self._fill()
        self.used: list[PartSummary] = []

    def _fill(self) -> None:
        while self._next < len(self.split.parts) and len(self._running) < self._limit:
            self._running[self._submit(self._next)] = self._next
            self._next += 1

    def planned(self) -> PlannedInput:
        """Wait for every part; the input as `FeatureWriter` takes it (`parts.plan_input`)."""
        done: dict[int, PartSummary] = {}
        while self._running:
            ready, _ = self.ray.wait(list(self._running), num_returns=1)
            i = self._running.pop(ready[0])
            try:
                done[i] = self.ray.get(ready[0])
            except self.ray.exceptions.RayActorError:  # a warm actor that timed out as this run took it
                self._running[self._task(i)] = i
                continue
            except self.ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, EmbedfitError):  # the input's own error, in its one line
                    raise cause from None
                raise
            self._fill()
        planned, self.used = plan_input(self.split, [done[i] for i in range(len(self.split.parts))],
                                        self.job.class_names)
        return planned

    def shards(self, store: Any, actors: int, shard_size: int) -> list[tuple[str, list[tuple[str, int, int]]]]:
        """The images to embed cut into named shards (`parts.cut_shards`), in key order: about
        `SHARDS_PER_ACTOR` per actor for a small run, `shard_size` images at most."""
        return cut_shards(self.used, _shard_step(shard_size, sum(s.todo for s in self.used), actors),
                          store.shard_name)

    def remove(self) -> None:
        """Delete this run's listing files (once committed, or after a failure: a resume lists again)."""
        from embedfit.extraction.parts import remove_remote

        if is_url(self.folder):
            remove_remote(self.locations)
            return
        for location in self.locations:
            with contextlib.suppress(OSError):
                os.unlink(location)


def _shard_step(shard_size: int, todo: int, actors: int) -> int:
    """Images per shard: `shard_size` at most, and few enough that every actor takes about `SHARDS_PER_ACTOR`
    shards of a small run (600 images in shards of 1024 kept one of two actors idle), but not below `MIN_SHARD`."""
    return max(1, min(shard_size, max(MIN_SHARD, -(-todo // (actors * SHARDS_PER_ACTOR)))))
