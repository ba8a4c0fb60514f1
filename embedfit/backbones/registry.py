"""The backbone registry, in the manner of timm's `_registry.py` and fsspec's `known_implementations`: families
register their backbones into it; it imports no family, nor torch.

A family is a module that calls `register_backbone` (a named backbone) or `register_prefix` (every name with a
prefix, e.g. `timm:`) when imported. `FAMILIES` names the shipped family modules; they are imported on the first
lookup, so `import embedfit` and `embedfit backbones` (which reads the shipped catalogue) load no torch. A family
outside embedfit registers by being imported (or adds its module to `FAMILIES`).

Every builder has one signature, `build(name, *, weights, pretrained, resolution) -> BuiltBackbone`, and every
info function `info(name) -> BackboneInfo`; `embedfit.backbones.factory.create_backbone` does the common steps
(layer, pooling, spec) on the build record.

Adding a family: one file that defines `build` and `info` and calls `register_backbone(name, build, info)` for
each name (or `register_prefix`), plus one line in `FAMILIES` (or an import of that file before use).
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from embedfit.backbones.spec import BackboneInfo
from embedfit.errors import UsageError

if TYPE_CHECKING:
    from torch import nn

# The shipped families: module -> the name prefixes it answers. Imported on the first lookup (each registers its
# names when imported); a prefixed name imports only its own family.
FAMILIES: dict[str, tuple[str, ...]] = {
    "embedfit.backbones.lite": (),
    "embedfit.backbones.torchvision_models": (),
    "embedfit.backbones.timm_models": ("timm:",),
    "embedfit.backbones.foundation": (),
}


@dataclass(frozen=True)
class BuiltBackbone:
    """What a family's builder returns: the full classifier and what `BackboneSpec` records about it.

    Attributes:
        model: The full classifier (`nn.Module`), pretrained unless asked otherwise.
        architecture: "<library>/<model name>", recorded in the spec.
        weights: Identity of the weights ("random", "file:<name>", a hub id, ...).
        weights_file: The file the weights came from (its SHA-256 is recorded), or None.
        input_size, resize_size, interpolation, mean, std: The preprocessing the weights expect.
        class_names: Names of the classifier's classes, or None.
        split_head: `model -> (pre-logits trunk, linear head or None)`; None: the last `nn.Linear` in module order
            is the head (`factory.split_last_linear`).
        trace_layer: `(model, layer) -> module` returning that graph node's output; None: torchvision's FX tracer
            (`factory.fx_layer`).
        tokens: The model is a timm transformer whose tokens can be pooled (`cls`, `mean`, ...) or taken at a block.
    """

    model: nn.Module
    architecture: str
    weights: str
    weights_file: Path | None
    input_size: tuple[int, int]
    resize_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: list[str] | None
    split_head: Callable[[nn.Module], tuple[nn.Module, nn.Module | None]] | None = None
    trace_layer: Callable[[nn.Module, str], nn.Module] | None = None
    tokens: bool = False


class Builder(Protocol):
    def __call__(self, name: str, *, weights: Path | None, pretrained: bool,
                 resolution: int | None) -> BuiltBackbone: ...


@dataclass(frozen=True)
class BackboneEntry:
    """One registered name (or, for a prefix, every name that starts with it).

    Attributes:
        name: The name, or the prefix ("timm:").
        build: The builder (see `Builder`).
        info: `name -> BackboneInfo`, without loading weights.
        listed: Shown by `list_backbones` (a prefix is not: its names are open-ended).
    """

    name: str
    build: Builder
    info: Callable[[str], BackboneInfo]
    listed: bool = True


_ENTRIES: dict[str, BackboneEntry] = {}
_PREFIXES: dict[str, BackboneEntry] = {}
_loaded: list[str] = []


def register_backbone(name: str, build: Builder, info: Callable[[str], BackboneInfo]) -> BackboneEntry:
    """Register `build` and `info` under `name` (a later registration of the same name replaces it)."""
    entry = BackboneEntry(name, build, info)
    _ENTRIES[name] = entry
    return entry


def register_prefix(prefix: str, build: Builder, info: Callable[[str], BackboneInfo]) -> BackboneEntry:
    """Register a family that answers every name starting with `prefix` (e.g. "timm:" for any timm model).
    The builder and info function receive the whole name."""
    entry = BackboneEntry(prefix, build, info, listed=False)
    _PREFIXES[prefix] = entry
    return entry


def _load_families(modules: list[str] | None = None) -> None:
    """Import the shipped family modules (all, or `modules`) not imported yet: torchvision and timm load only now."""
    for module in FAMILIES if modules is None else modules:
        if module not in _loaded:
            importlib.import_module(module)
            _loaded.append(module)


def _prefix_entry(name: str) -> BackboneEntry | None:
    _load_families([m for m, claimed in FAMILIES.items() if name.startswith(claimed)])
    return next((e for p, e in _PREFIXES.items() if name.startswith(p)), None)


def prefixes() -> tuple[str, ...]:
    """The name prefixes families answer (`timm:`), without importing any family."""
    return tuple({*(p for claimed in FAMILIES.values() for p in claimed), *_PREFIXES})


def get_backbone(name: str) -> BackboneEntry:
    """The entry answering `name`.

    Raises:
        UsageError: The name is not registered (with close names).
    """
    if name in _ENTRIES:  # registered already (a family outside embedfit, or a later lookup): no imports
        return _ENTRIES[name]
    entry = _prefix_entry(name)
    if entry is not None:
        return entry
    _load_families()
    if name in _ENTRIES:
        return _ENTRIES[name]
    raise unknown_backbone(name, list(_ENTRIES))


def unknown_backbone(name: str, known: list[str]) -> UsageError:
    """The error for a backbone name that is not registered, with the closest of `known` as suggestions."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return UsageError(
        f"unknown backbone '{name}'{hint} (`embedfit backbones` lists them; any timm model works as timm:NAME)"
    )


def registered_so_far() -> list[str]:
    """The names registered in this process until now, without importing any family."""
    return list(_ENTRIES)


def check_backbone_name(name: str) -> None:
    """Raise a UsageError with suggestions unless `name` is registered or has a registered prefix (`timm:`)."""
    if name.startswith(prefixes()):
        return
    get_backbone(name)


def list_backbones(pattern: str = "*") -> list[str]:
    """Registered backbone names matching a glob pattern (any timm model also works as `timm:<name>`)."""
    _load_families()
    return sorted(n for n, e in _ENTRIES.items() if e.listed and fnmatch.fnmatch(n, pattern))


def backbone_info(name: str) -> BackboneInfo:
    """Embedding dim, input size and weights availability of a backbone, without loading weights."""
    return get_backbone(name).info(name)


def build_backbone(name: str, *, weights: Path | None, pretrained: bool, resolution: int | None) -> BuiltBackbone:
    """The family's build record for `name` (the factory's first step)."""
    return get_backbone(name).build(name, weights=weights, pretrained=pretrained, resolution=resolution)

