"""The Ray engine (`embedfit extract --engine ray`): the same extraction fanned out over a Ray cluster.

The driver never loads a model, nor torch: it scans the input, starts the actors (one model each, on the CPUs or
GPU Ray granted it, with as many intra-op threads as CPUs), takes the backbone's spec from them (they must all
agree), plans the resume with the same `FeatureWriter` as a local run and cuts the images still to embed into
shards of `shard_size` images with fixed names. Each actor takes shard after shard: it decodes on a background
thread while it embeds (the local engine's `iter_embeddings` loop), writes the shard itself (`embedfit.storage.shards`:
locally, then moved whole into ``<store>.shards/``) and returns only counts and failure reasons. The driver never
sees a feature; at the end it writes the manifest (`FeatureWriter.commit`). So the store is a sharded store with
the schema, provenance, resume behaviour and row order of a local run. A re-run whose images are all stored
plans from the store alone and starts no cluster.

Failures: Ray restarts an actor that dies and retries its shard (`max_restarts=-1`, `max_task_retries=-1`); a
shard written twice replaces itself (same name), and the manifest keeps one row per image key. A killed driver
leaves finished shards, which the next run reuses (shard granularity; a shard being written is absent).

Ray is optional: `pip install 'embedfit[ray]'`; it is imported only inside the functions here.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from embedfit.backbones.spec import BackboneSpec
from embedfit.errors import EmbedfitError, UsageError
from embedfit.extraction.engines import ExtractJob
from embedfit.extraction.settings import ExtractConfig, ExtractSummary
from embedfit.extraction.writer import FeatureWriter
from embedfit.images import ImageRecord
from embedfit.storage import StoreSettings
from embedfit.url import get_file, is_url, put_file

_TEST_KILL_ONCE = "EMBEDFIT_TEST_KILL_ACTOR_ONCE"  # tests: path of a marker; the first shard's actor exits hard
DEFAULT_SHARD_SIZE = 1024


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


def connect(address: str | None = None, *, runtime_env: dict[str, Any] | None = None) -> None:
    """Connect to a Ray cluster, or start a local one, failing within seconds with what to do instead of retrying.

    Args:
        address: None or "auto" (the cluster this machine runs, else a new local one), "HOST:PORT" (its GCS port,
            6379 by default), or "ray://HOST:10001" (Ray Client, needs `ray[client]`).
        runtime_env: Ray runtime environment for the job (env vars, py_modules).

    Raises:
        UsageError: Ray or Ray Client is not installed, or the cluster named (or recorded in Ray's
            ``ray_current_cluster`` file) does not answer.
    """
    ray = _ray()
    if ray.is_initialized():
        return
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
             runtime_env=runtime_env, logging_level="WARNING")


def _runtime_env() -> dict[str, Any]:
    """Ship this embedfit (its code, not its dependencies) and its settings to every node of the job."""
    import embedfit

    return {"py_modules": [str(Path(embedfit.__file__).parent)], "excludes": ["__pycache__"],
            "env_vars": {k: v for k, v in os.environ.items() if k.startswith("EMBEDFIT_")}}


class _ShardWorker:
    """Ray actor: one model, loaded once; each call embeds one shard of images and writes it (no features returned)."""

    def __init__(self, config: ExtractConfig, device: str, threads: int, cpu: int | None) -> None:
        self.host = socket.gethostname()
        self.failure: BaseException | None = None
        try:  # a failure is reported by `ready`, in one line naming this node, not as a dead actor
            import torch

            from embedfit.backbones.factory import create_backbone
            from embedfit.extraction.encoder import Encoder
            from embedfit.extraction.settings import resolve_device

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
        except Exception as exc:
            self.failure = exc

    def ready(self) -> tuple[str, BackboneSpec | None, str, BaseException | None]:
        """(host, the backbone's spec, runtime, None) once the model is loaded, or (host, None, "", the failure)."""
        if self.failure is not None:
            return self.host, None, "", self.failure
        return self.host, self.encoder.spec, self.encoder.runtime, None

    def run(self, name: str, items: list[tuple[str, str, int, int, int]],
            target: tuple[StoreSettings, str, list[str], dict[str, Any]]) -> dict[str, Any]:
        """Embed the images of shard `name` (path, key, label, size, mtime each) and write the shard.

        `target` (settings, shards folder, class names, provenance) comes with every call, not once, so that an
        actor Ray restarts (which runs only `__init__` again) writes the same shards. The folder is a path every
        worker can write (a shared filesystem) or a URL on object storage, where the shard is uploaded whole.
        """
        settings, folder, class_names, provenance = target
        import numpy as np

        from embedfit.extraction.encoder import iter_embeddings
        from embedfit.storage import FAILED, OK
        from embedfit.storage.shards import write_shard

        marker = os.environ.get(_TEST_KILL_ONCE)
        if marker and not Path(marker).exists():  # test hook: die mid-run once, as a preempted worker would
            Path(marker).write_text("killed")
            os._exit(1)
        records = [ImageRecord(p if is_url(p) else Path(p), k, lb, s, m) for p, k, lb, s, m in items]  # URLs stay
        c = self.config
        batches = list(iter_embeddings(records, self.encoder, batch_size=c.batch_size, workers=0,
                                       jpeg_draft=c.jpeg_draft, max_pixels=c.max_pixels, decode=c.decode,
                                       decode_thread=True))
        errors = [e for b in batches for e in b.errors]
        args = (name, settings, [r.key for r in records],
                [class_names[r.label] if r.label >= 0 else "" for r in records], [r.size for r in records],
                [r.mtime_ns for r in records], [FAILED if e else OK for e in errors], errors,
                np.concatenate([b.features for b in batches]), {**provenance, "runtime": self.encoder.runtime})
        if is_url(folder):  # the store is on object storage: written here, uploaded whole (one PUT)
            with tempfile.TemporaryDirectory(prefix="embedfit-shard-") as local:
                put_file(write_shard(local, *args), f"{folder}/{name}")
        else:
            write_shard(folder, *args)
        return {"name": name, "rows": len(records),
                "failures": [(r.key, e) for r, e in zip(records, errors, strict=True) if e]}


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

    Raises:
        UsageError: Ray missing, or fewer than one worker or CPU.
    """

    name = "ray"
    shard_size: int | None = DEFAULT_SHARD_SIZE

    def __init__(self, address: str | None = None, num_workers: int = 2, num_gpus_per_worker: float = 0.0,
                 cpus_per_worker: int = 1, pin_cpus: bool = False) -> None:
        _ray()
        if num_workers < 1 or cpus_per_worker < 1:
            raise UsageError(f"`num_workers` and `cpus_per_worker` must be at least 1, got {num_workers} and "
                             f"{cpus_per_worker}")
        self.address, self.num_workers, self.num_gpus_per_worker = address, num_workers, num_gpus_per_worker
        self.cpus_per_worker, self.pin_cpus = cpus_per_worker, pin_cpus

    def run(self, job: ExtractJob) -> ExtractSummary:
        """Start the actors, take the spec from them, plan, hand out the shards, commit the manifest. On object
        storage (`job.url`) the actors upload their shards next to it."""
        ray = _ray()
        config = job.config
        _check_options(config, self.num_gpus_per_worker)
        device = "cuda" if self.num_gpus_per_worker > 0 else "cpu"
        connect(self.address, runtime_env=_runtime_env())
        actor = ray.remote(_ShardWorker).options(num_cpus=self.cpus_per_worker,
                                                 num_gpus=self.num_gpus_per_worker or None,
                                                 max_restarts=-1, max_task_retries=-1)
        # The actors load their models while the driver waits: the spec comes from them (the driver needs no torch).
        actors = [actor.remote(config, device, self.cpus_per_worker, i if self.pin_cpus else None)
                  for i in range(self.num_workers)]
        try:
            spec, runtime = _spec_of(ray, actors)
            ready = time.perf_counter() - job.started
            summary = _extract_shards(ray, actors, job, spec, runtime,
                                      f"ray ({self.num_workers} x {device}, {self.cpus_per_worker} CPU each)")
            summary.startup_seconds = ready
            return summary
        finally:
            _kill(ray, actors)


def extract_ray(source: str | os.PathLike, output: str | os.PathLike, config: ExtractConfig | None = None, *,
                address: str | None = None, num_workers: int = 2, num_gpus_per_worker: float = 0.0,
                cpus_per_worker: int = 1, pin_cpus: bool = False, class_names: list[str] | None = None,
                **options: Any) -> ExtractSummary:
    """`embedfit.extract` on a Ray cluster (`engine=RayEngine(...)`): a sharded store written by the workers,
    same resume, same rows.

    Args:
        source: Image folder or CSV, at the same path on every node (a shared filesystem), or a URL on object
            storage (``s3://bucket/prefix``), which every node reads with its own credentials.
        output: The store's manifest; its shards go to ``<output>.shards/``: on a shared filesystem every node
            can write, or on object storage (``s3://...``), where each worker uploads the shards it writes.
        config: Extraction settings (keyword `options` override fields); `config.shard_size` defaults to 1024.
        address, num_workers, num_gpus_per_worker, cpus_per_worker, pin_cpus: The cluster (see `RayEngine`).
        class_names: Class list to use instead of the folder names.

    Raises:
        UsageError: An option that does not apply on Ray, Ray missing, the cluster unreachable, a node without
            embedfit.
        ExtractionInterrupted: Ctrl-C or `max_failures`; finished shards are kept and the run can resume.
    """
    from embedfit.extraction.local import extract

    engine = RayEngine(address=address, num_workers=num_workers, num_gpus_per_worker=num_gpus_per_worker,
                       cpus_per_worker=cpus_per_worker, pin_cpus=pin_cpus)
    return extract(source, output, config, class_names=class_names, engine=engine, **options)


def _kill(ray: Any, actors: list[Any]) -> None:
    """On a long-lived cluster, our actors must not outlive the run."""
    for a in actors:
        ray.kill(a)


def _spec_of(ray: Any, actors: list[Any]) -> tuple[BackboneSpec, str]:
    """The backbone spec every actor loaded; the first failure (a node without torch, missing weights...) is raised
    in one line naming its node, and actors that disagree (nodes with other weights files) are refused."""
    specs, runtimes = [], set()
    for host, spec, runtime, failure in ray.get([a.ready.remote() for a in actors]):
        if isinstance(failure, EmbedfitError):
            raise failure
        if failure is not None:
            first = str(failure).splitlines()[0] if str(failure) else ""
            raise UsageError(f"Ray node {host} cannot run embedfit ({type(failure).__name__}: {first}); install "
                             "'embedfit[ray]' (torch, timm) on every node, e.g. in the cluster's image")
        specs.append((host, spec))
        runtimes.add(runtime)
    for host, spec in specs[1:]:
        if spec != specs[0][1]:
            raise UsageError(f"Ray nodes {specs[0][0]} and {host} load different models for "
                             f"{specs[0][1].short()} ({specs[0][1].differences(spec)[0]}); give every node the "
                             "same weights files and library versions")
    return specs[0][1], "+".join(sorted(runtimes))


def _extract_shards(ray: Any, actors: list[Any], job: ExtractJob, spec: BackboneSpec, runtime: str,
                    device: str) -> ExtractSummary:
    """Plan the resume for `spec`, hand the shards to the actors, count what they wrote, commit the manifest.

    On object storage (`job.url`) the actors upload their shards to ``<url>.shards``, and each is downloaded into
    the local shards folder as it is reported, for the manifest (the commit reads the shards' per-row metadata).
    """
    from ray.util import ActorPool

    config, images, shard_size = job.config, job.images, job.config.shard_size or DEFAULT_SHARD_SIZE
    shards_url = f"{job.url}.shards" if job.url else None
    settings = StoreSettings(spec, config.dtype, config.tta, config.precision)
    with FeatureWriter(job.output, settings, images, overwrite=config.overwrite, retry_failed=config.retry_failed,
                       shard_size=shard_size, started=job.started) as writer:
        summary = writer.summary
        summary.device, summary.runtime = device, runtime
        provenance = {"device": device, "engine": "ray", "decode": config.decode, "runtime": runtime}
        store = writer.store
        target = ray.put((settings, shards_url or str(store.parts), list(images.class_names), provenance))
        todo = sorted(writer.todo, key=lambda r: r.key)  # shards hold contiguous key ranges: one VDS map each
        shards = [(store.shard_name(i // shard_size),
                   [(str(r.path), r.key, r.label, r.size, r.mtime_ns) for r in todo[i:i + shard_size]])
                  for i in range(0, len(todo), shard_size)]

        def add(result: dict[str, Any]) -> tuple[int, str]:
            if shards_url:
                get_file(f"{shards_url}/{result['name']}", store.parts / result["name"])
            writer.add_written(result["rows"], result["failures"])
            return result["rows"], ""

        # The actors are stopped before the manifest is committed: no shard is written after it.
        writer.run(ActorPool(actors).map_unordered(lambda a, shard: a.run.remote(*shard, target), shards), add,
                   config=config, source=job.source, output=job.output, provenance=provenance,
                   stop=lambda: _kill(ray, actors), on_progress=job.on_progress)
    return summary
