"""The engine registry: where extraction runs (this machine, a Ray cluster, ...). Imports no engine.

An engine is one object with one method, `run(job)`, that `embedfit.extract` calls after it has done what every
engine shares: staged a store on object storage to a local copy, checked the backbone name, scanned the images,
and planned the resume (a re-run with nothing to embed stops there, without an engine). The engine embeds
the images still to embed into `job.output` with `FeatureWriter` and returns its summary. An engine with
`lists_input` True lists and plans the input itself, part by part (`embedfit.extraction.parts`): `extract()`
scans nothing and hands it `job.images` None.

`ENGINES` names the shipped engines by import string, in the manner of fsspec's `known_implementations`, so that
the command line lists them without importing one. Adding an engine: one file with a class that has `name`,
`shard_size` and `run`, plus one line in `ENGINES` (or `register_engine(name, cls)` from outside embedfit).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from embedfit.errors import UsageError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from embedfit.extraction.settings import ExtractConfig, ExtractSummary
    from embedfit.images import ImageSource
    from embedfit.progress import OnProgress
    from embedfit.storage import StoreSettings


@dataclass(frozen=True)
class ExtractJob:
    """What `extract()` hands an engine once the store is staged and the resume planned.

    Attributes:
        source: The image folder, CSV or URL as given.
        output: The store's local path (the staging copy when the store is on object storage).
        url: The store's URL on object storage (uploaded by `extract()` after `run` returns), else None.
        config: The extraction settings (`shard_size` already defaulted to the engine's).
        images: The scanned images (None for an engine that `lists_input`).
        started: `time.perf_counter()` when `extract()` began (for start-up and total times).
        on_progress: Where the engine's `FeatureWriter.run` reports the images (`embedfit.progress`).
        class_names: The class list asked for, or None (the folders' or the CSV's).
        stored: The existing store's settings when this run asks for exactly what made it (a re-run), else None.
    """

    source: str | os.PathLike
    output: str | os.PathLike
    url: str | None
    config: ExtractConfig
    images: ImageSource | None
    started: float
    on_progress: OnProgress | None = None
    class_names: Sequence[str] | None = None
    stored: StoreSettings | None = None


class Engine(Protocol):
    """Where the images are embedded.

    Attributes:
        name: The registry name, recorded in the store's provenance.
        shard_size: The store layout when `config.shard_size` is not set: None for one file, or images per shard.
        lists_input: Optional (False when absent): the engine lists and plans the input itself.
    """

    name: str
    shard_size: int | None

    def run(self, job: ExtractJob) -> ExtractSummary:
        """Embed the images the store still lacks and commit the store with `FeatureWriter`."""
        ...


# The shipped engines by import string ("module:class"): nothing is imported until one is used.
ENGINES: dict[str, str | Callable[..., Engine]] = {
    "local": "embedfit.extraction.local:LocalEngine",
    "ray": "embedfit.extraction.ray:RayEngine",
}


def register_engine(name: str, factory: str | Callable[..., Engine]) -> None:
    """Register an engine class (or "module:class", imported on first use) under `name`."""
    ENGINES[name] = factory


def engine_names() -> tuple[str, ...]:
    """The registered engine names, without importing any engine (the command line's choices)."""
    return tuple(ENGINES)


def _factory(name: str) -> Callable[..., Engine]:
    if name not in ENGINES:
        close = difflib.get_close_matches(name, list(ENGINES), n=2, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UsageError(f"unknown `engine` '{name}'{hint} (choose from {', '.join(ENGINES)})")
    factory = ENGINES[name]
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module), attr)
    return factory


def create_engine(name: str, **options: Any) -> Engine:
    """The engine registered as `name`, constructed with `options` (e.g. the Ray engine's `num_workers`).

    Raises:
        UsageError: An unknown name, or options the engine does not take (named as parameters).
    """
    factory = _factory(name)
    accepted = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        unknown = [k for k in options if k not in accepted]
        if unknown:
            raise UsageError(f"{', '.join(f'`{k}`' for k in unknown)} does not apply to engine {name}")
    return factory(**options)
