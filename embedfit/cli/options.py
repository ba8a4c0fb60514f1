"""Choices and parsers shared by the commands (the library validates again; these give typer its --help)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class FeatureDtype(str, Enum):
    float32 = "float32"
    float16 = "float16"


class TTA(str, Enum):
    none = "none"
    flip = "flip"


class Decode(str, Enum):
    pil = "pil"
    device = "device"


class Runtime(str, Enum):
    auto = "auto"
    torch = "torch"
    onnx = "onnx"


class Engine(str, Enum):
    local = "local"
    ray = "ray"


class Pool(str, Enum):
    avg = "avg"
    max = "max"
    cls = "cls"
    mean = "mean"
    cls_mean = "cls+mean"
    head = "head"


def _fraction_or_count(value: str | None) -> float | None:
    """'10' -> 10 images, '0.2' or '20%' -> a fraction."""
    if value is None:
        return None
    try:
        number = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise typer.BadParameter(f"expected a count (10) or a fraction (0.2, 20%), got '{value}'",
                                 param_hint="--max-failures") from None
    if number < 0 or (value.endswith("%") and number > 1):
        raise typer.BadParameter(f"must be a count >= 1 or a fraction in [0, 1), got '{value}'",
                                 param_hint="--max-failures")
    return number


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
    from embedfit.backbones.registry import check_backbone_name

    check_backbone_name(name)
    return name
