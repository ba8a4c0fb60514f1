"""Choices and parsers shared by the commands (the library validates again; these give typer its --help)."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import typer

from embedfit.backbones.spec import POOLS
from embedfit.extraction.engines import engine_names
from embedfit.extraction.settings import DECODERS, PRECISIONS, RUNTIMES, TTAS


def _choices(name: str, values: Sequence[str]) -> Any:
    """A typer choice built from the library's own tuple of values, so each list of choices has one home."""
    return Enum(name, {v: v for v in values}, type=str)


Precision = _choices("Precision", PRECISIONS)
TTA = _choices("TTA", TTAS)
Decode = _choices("Decode", DECODERS)
Runtime = _choices("Runtime", RUNTIMES)
Pool = _choices("Pool", POOLS)
Engine = _choices("Engine", engine_names())  # the engine registry's names (no engine is imported)


class FeatureDtype(str, Enum):
    float32 = "float32"
    float16 = "float16"


def _max_failures(value: str | None) -> object:
    """The flag's text as the library's `MaxFailures` (the grammar lives there); errors name the flag."""
    from embedfit.errors import UsageError
    from embedfit.extraction.settings import MaxFailures

    try:
        return MaxFailures.parse(value)
    except UsageError as exc:
        raise typer.BadParameter(str(exc).replace("`max_failures`", "").strip(), param_hint="--max-failures") from None


class Scale(str, Enum):
    standard = "standard"
    l2 = "l2"
    none = "none"


class Backend(str, Enum):
    loky = "loky"
    threading = "threading"
    ray = "ray"
    dask = "dask"


def _pca(value: str) -> int | str | None:
    if value in ("auto", "none"):
        return None if value == "none" else "auto"
    if not value.isdigit() or int(value) < 1:
        raise typer.BadParameter(f"must be a positive integer, 'auto' or 'none', got '{value}'", param_hint="--pca")
    return int(value)


def _path_str(path: Path | None) -> str | None:
    return str(path) if path else None


def args_backbone(name: str) -> str:
    from embedfit.backbones.catalogue import check_name

    check_name(name)  # without torch: a typo is refused at once
    return name


# Options that evaluation commands share, defined once: what an audit feeds back into how a classifier is scored.
GROUP_DUPLICATES: Any = typer.Option(False, help="Keep each cluster of exact and near-duplicate images (see "
                                     "`embedfit audit`) on one side of every split, so that no copy is scored by "
                                     "a model trained on its twin: fit and sweep keep a cluster within one CV fold "
                                     "(sweep: the same folds for every backbone), compare within the training or "
                                     "the validation images of each split (every arm). fit and sweep: not with "
                                     "a hold-out (--test-size, --test-store; sweep's --test).")
EXCLUDE: Any = typer.Option(None, help="CSV with path,action columns (audit.csv, or the fixes CSV of `embedfit "
                            "report AUDIT_DIR`): leave out the training images marked 'exclude' (paths as the "
                            "store or folder keys them) from every model (fit, sweep) or every arm (compare).")
