"""Registry and factory, in timm's style: `register_backbone` adds a family's builder, `create_backbone(name)`
returns a headless `Backbone` (uint8 images in, embeddings out) with its frozen `BackboneSpec`.

The families (`lite`, `tv`, `timm_models`) register themselves when first needed, so importing this module does
not import torchvision or timm.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from embedfit.backbones.catalogue import check_request, unknown_backbone
from embedfit.backbones.spec import DEFAULT_BACKBONE, PRE_LOGITS, BackboneInfo, BackboneSpec
from embedfit.backbones.weights import _sha256
from embedfit.errors import UsageError


class Backbone(nn.Module):
    """A headless network: uint8 (or [0, 1] float) images (N, 3, H, W) -> embeddings (N, D).

    Attributes:
        spec: The frozen `BackboneSpec`.
        trunk: Normalised images -> embeddings.
        head: The original classifier on top of the pre-logits embedding, or None when `layer` is an
            intermediate layer or the model has no linear head.
        class_names: Names of the head's classes (ImageNet for the shipped weights), or None.
    """

    def __init__(self, trunk: nn.Module, spec: BackboneSpec, head: nn.Module | None = None,
                 class_names: list[str] | None = None) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.spec = spec
        self.class_names = class_names
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.to(self.mean.dtype).div_(255)
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.normalize(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores of the pretrained classifier (the model as-is)."""
        if self.head is None:
            raise UsageError(f"{self.spec.short()} has no classifier head to classify with")
        return self.head(self.forward(x))


@dataclass(frozen=True)
class _Built:
    """What a family builder returns before the common steps (layer selection, spec) are applied."""

    model: nn.Module  # the full classifier
    architecture: str
    weights: str
    weights_file: Path | None
    input_size: tuple[int, int]
    resize_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: list[str] | None
    family: str  # "timm" or "torchvision": decides how the head is split and layers are traced


_REGISTRY: dict[str, Callable[..., _Built]] = {}


_INFO: dict[str, Callable[[], BackboneInfo]] = {}


def register_backbone(name: str, info: Callable[[], BackboneInfo]) -> Callable:
    """Decorator registering `fn(weights: str | None, pretrained: bool) -> _Built` under `name`."""

    def decorator(fn: Callable[..., _Built]) -> Callable[..., _Built]:
        _REGISTRY[name] = fn
        _INFO[name] = info
        return fn

    return decorator


def _load_families() -> None:
    """Import the family modules, which register their backbones (torchvision and timm load only now)."""
    from embedfit.backbones import foundation, lite, timm_models, tv  # noqa: F401

    if not any(n in _REGISTRY for n in foundation.FOUNDATION):
        foundation.register()


def list_backbones(pattern: str = "*") -> list[str]:
    """Registered backbone names matching a glob pattern (any timm model also works as `timm:<name>`)."""
    import fnmatch

    _load_families()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def backbone_info(name: str) -> BackboneInfo:
    """Embedding dim, input size and weights availability of a backbone, without loading weights."""
    if name.startswith("timm:"):
        from embedfit.backbones.timm_models import _timm_info

        return _timm_info(name)
    check_backbone_name(name)
    return _INFO[name]()


def check_backbone_name(name: str) -> None:
    """Raise a UsageError with suggestions unless `name` is registered or `timm:<name>`."""
    if name.startswith("timm:"):
        return
    _load_families()
    if name in _REGISTRY:
        return
    raise unknown_backbone(name, list(_REGISTRY))


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    *,
    weights: str | os.PathLike | None = None,
    pretrained: bool = True,
    layer: str | None = None,
    pool: str | None = None,
    resolution: int | None = None,
) -> Backbone:
    """Build a headless backbone in eval mode, with its `BackboneSpec`.

    Args:
        name: A registered name (`list_backbones()`) or `timm:<model name>`.
        weights: Path to a state dict to use instead of the default pretrained weights.
        pretrained: False gives random initialisation (for training from scratch).
        layer: An intermediate layer: a graph node name ("layer3"), or for a transformer a block ("blocks.8",
            "-4": the fourth block from the end); default pre-logits.
        pool: How features become one vector (`POOLS`): "avg" or "max" over a feature map; for transformers
            "cls", "mean" (patch tokens), "cls+mean" or "head" (the model's own). Default: the backbone's own
            (`BackboneInfo.pool`, e.g. "cls+mean" for DINOv2).
        resolution: Input size (square) instead of the backbone's default; transformers are built for it
            (position embeddings resampled), CNNs take it as it is. The resize before the centre crop keeps
            the default's ratio.

    Returns:
        The `Backbone` on the CPU, in eval mode, with `.spec`.

    Raises:
        UsageError: Unknown name, layer or pooling (with suggestions).
        WeightsUnavailableError: Pretrained weights are not on disk and cannot be fetched.
    """
    from embedfit.backbones.foundation import FOUNDATION, block_index, default_pool, is_token_model, token_trunk

    check_backbone_name(name)
    pool = pool or default_pool(name)
    check_request(name, weights=weights, pool=pool, resolution=resolution)
    weights_path = Path(weights) if weights is not None else None
    if name.startswith("timm:"):
        from embedfit.backbones.timm_models import _build_timm

        built = _build_timm(name[5:], weights_path, pretrained, resolution)
    elif name in FOUNDATION:
        built = _REGISTRY[name](weights_path, pretrained, resolution)
    else:
        built = _REGISTRY[name](weights_path, pretrained)
    if resolution is not None and built.input_size != (resolution, resolution):
        ratio = built.resize_size / min(built.input_size)
        built = dataclasses.replace(built, input_size=(resolution, resolution),
                                    resize_size=math.floor(resolution * ratio + 1e-6))
    model = built.model.eval()

    layer = layer or PRE_LOGITS
    token_path = built.family == "timm" and is_token_model(model) and (
        pool not in ("avg", "max") or block_index(layer, len(model.blocks)) is not None)
    if token_path:
        trunk, layer, pool = token_trunk(model, name, layer, pool)
        head = model.get_classifier() if layer == PRE_LOGITS and pool == "head" else None
        head = head if isinstance(head, nn.Linear) and built.class_names else None
        class_names = built.class_names if head is not None else None
    elif pool not in ("avg", "max"):
        raise UsageError(f"`pool` {pool} needs a transformer backbone; {name} gives a feature map: use avg or max")
    elif layer == PRE_LOGITS:
        if pool != "avg":
            raise UsageError("`pool` applies to an intermediate `layer`; pre-logits use the model's own pooling")
        trunk, head = _split_head(model, built.family)
        class_names = built.class_names
    else:
        trunk, head, class_names = _LayerPool(_layer_extractor(model, layer, built.family), pool), None, None

    dim = _embedding_dim(trunk, built.input_size)
    sha = _sha256(built.weights_file) if built.weights_file else ""
    spec = BackboneSpec(
        name=name, architecture=built.architecture, weights=built.weights, weights_sha256=sha,
        input_size=built.input_size, resize_size=built.resize_size, interpolation=built.interpolation,
        mean=built.mean, std=built.std, embedding_dim=dim, layer=layer, pool=pool,
    )
    return Backbone(trunk, spec, head, class_names).eval()


class _TimmPreLogits(nn.Module):
    """timm's own pre-logits path: forward_features -> forward_head(pre_logits=True)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


class _LayerPool(nn.Module):
    """An intermediate layer's output, globally pooled to (N, C)."""

    def __init__(self, extractor: nn.Module, pool: str) -> None:
        super().__init__()
        self.extractor = extractor
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.extractor(x)
        out = next(iter(out.values())) if isinstance(out, dict) else out
        if isinstance(out, list | tuple):
            out = out[0]
        if out.ndim == 4:  # (N, C, H, W) feature map
            return out.amax(dim=(2, 3)) if self.pool == "max" else out.mean(dim=(2, 3))
        if out.ndim == 3:  # (N, tokens, C) from a transformer
            return out.amax(dim=1) if self.pool == "max" else out.mean(dim=1)
        return out.flatten(1)


def _split_head(model: nn.Module, family: str) -> tuple[nn.Module, nn.Module | None]:
    """Split a classifier into (pre-logits trunk, linear head)."""
    if family == "timm":
        head = model.get_classifier()
        return _TimmPreLogits(model), (head if isinstance(head, nn.Linear) else None)
    # torchvision: the head is the last Linear in module order (fc, classifier[-1], heads.head, ...).
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UsageError("this model has no linear classifier to remove; pass `layer` to pick a layer")
    head = model.get_submodule(linears[-1])
    parent_name, _, attr = linears[-1].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Identity())
    return model, head


def _layer_extractor(model: nn.Module, layer: str, family: str) -> nn.Module:
    """Truncate the model at `layer` with FX feature extraction (timm's tracer knows timm's leaf modules)."""
    from torchvision.models.feature_extraction import get_graph_node_names

    if family == "timm":
        from timm.models import create_feature_extractor
    else:
        from torchvision.models.feature_extraction import create_feature_extractor
    try:
        return create_feature_extractor(model, return_nodes={layer: "out"})
    except (ValueError, KeyError, RuntimeError) as exc:
        try:
            nodes = get_graph_node_names(model)[1]
        except Exception:  # tracing can fail on exotic models; fall back to module names
            nodes = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(layer, nodes, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f" ({exc})"
        raise UsageError(f"unknown layer '{layer}'{hint}") from None


@torch.inference_mode()
def _embedding_dim(trunk: nn.Module, input_size: tuple[int, int]) -> int:
    return int(trunk(torch.zeros(1, 3, *input_size)).shape[-1])


@contextlib.contextmanager
def _skip_init() -> Iterator[None]:
    """Make torch.nn.init's in-place initialisers no-ops: a module tree built on the CPU then costs only
    allocations, which untouched memory makes cheap (the largest RegNet has 644M parameters to initialise)."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def _skeleton(build: Callable[[], nn.Module]) -> nn.Module:
    """A model's module tree without real weights: on the meta device, which allocates nothing, or, for
    builders that compute sizes with tensors (RegNet's .tolist()), on the CPU without initialisation."""
    try:
        with torch.device("meta"):
            return build()
    except (NotImplementedError, RuntimeError):
        with _skip_init(), torch.no_grad():
            return build()
