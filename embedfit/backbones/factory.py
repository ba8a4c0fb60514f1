"""The factory: `create_backbone(name)` turns a family's build record (`registry.BuiltBackbone`) into a headless
`Backbone` (uint8 images in, embeddings out) with its frozen `BackboneSpec`; and the helpers families share
(`split_last_linear`, `fx_layer`, `skeleton`).

Imports torch; the registry it builds from does not.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from embedfit.backbones.catalogue import check_request
from embedfit.backbones.registry import get_backbone
from embedfit.backbones.spec import DEFAULT_BACKBONE, PRE_LOGITS, BackboneSpec
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
    from embedfit.backbones.foundation import block_index, default_pool, token_trunk

    entry = get_backbone(name)
    pool = pool or default_pool(name)
    check_request(name, weights=weights, pool=pool, resolution=resolution)
    weights_path = Path(weights) if weights is not None else None
    built = entry.build(name, weights=weights_path, pretrained=pretrained, resolution=resolution)
    if resolution is not None and built.input_size != (resolution, resolution):
        ratio = built.resize_size / min(built.input_size)
        built = dataclasses.replace(built, input_size=(resolution, resolution),
                                    resize_size=math.floor(resolution * ratio + 1e-6))
    model = built.model.eval()

    layer = layer or PRE_LOGITS
    token_path = built.tokens and (
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
        trunk, head = (built.split_head or split_last_linear)(model)
        class_names = built.class_names
    else:
        trunk, head, class_names = _LayerPool((built.trace_layer or fx_layer)(model, layer), pool), None, None

    dim = _embedding_dim(trunk, built.input_size)
    sha = _sha256(built.weights_file) if built.weights_file else ""
    spec = BackboneSpec(
        name=name, architecture=built.architecture, weights=built.weights, weights_sha256=sha,
        input_size=built.input_size, resize_size=built.resize_size, interpolation=built.interpolation,
        mean=built.mean, std=built.std, embedding_dim=dim, layer=layer, pool=pool,
    )
    return Backbone(trunk, spec, head, class_names).eval()


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


def split_last_linear(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """Split a classifier whose head is its last `nn.Linear` in module order (torchvision's `fc`, `classifier[-1]`,
    `heads.head`, ...): the model with that layer replaced by `nn.Identity`, and the layer."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UsageError("this model has no linear classifier to remove; pass `layer` to pick a layer")
    head = model.get_submodule(linears[-1])
    parent_name, _, attr = linears[-1].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Identity())
    return model, head


def fx_layer(model: nn.Module, layer: str, create: Callable[..., nn.Module] | None = None) -> nn.Module:
    """Truncate the model at graph node `layer` with FX feature extraction (`create`: a family's own
    `create_feature_extractor`, e.g. timm's, whose tracer knows timm's leaf modules; default torchvision's)."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    try:
        return (create or create_feature_extractor)(model, return_nodes={layer: "out"})
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


class _NoParameterInit(TorchFunctionMode):
    """Skip in-place writes to parameters: `torch.nn.init`'s initialisers and the tensor methods they call
    (`uniform_`, `fill_`, `normal_`, ...) return the parameter untouched. A torch function mode is active in the
    thread that entered it only, so a model built meanwhile in another thread is initialised as usual (patching
    `torch.nn.init` would reach every thread)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        name = getattr(func, "__name__", "")
        if isinstance(target, nn.Parameter) and name.endswith("_") and not name.endswith("__"):  # in place
            return target
        return func(*args, **kwargs)


def skeleton(build: Callable[[], nn.Module]) -> nn.Module:
    """A model's module tree without real weights (for sizes and parameter counts): on the meta device, which
    allocates nothing, or, for builders that compute sizes with tensors (RegNet's .tolist()), on the CPU with
    the parameters left uninitialised in this thread only (the largest RegNet has 644M parameters)."""
    try:
        with torch.device("meta"):
            return build()
    except (NotImplementedError, RuntimeError):
        with _NoParameterInit(), torch.no_grad():
            return build()
