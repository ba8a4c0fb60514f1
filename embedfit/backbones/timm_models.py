"""Any timm model as `timm:<name>`, weights from the Hugging Face cache (loaded as a local file, so an offline
run never waits on the hub)."""

from __future__ import annotations

import difflib
import functools
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from embedfit.backbones.factory import fx_layer, skeleton
from embedfit.backbones.registry import BackboneInfo, BuiltBackbone, register_prefix
from embedfit.backbones.weights import _OFFLINE_WHY, _hf_cached_file, _load_state_dict, offline, unreachable
from embedfit.errors import UsageError, WeightsUnavailableError


class TimmPreLogits(nn.Module):
    """timm's own pre-logits path: forward_features -> forward_head(pre_logits=True)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def timm_split_head(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """A timm model's pre-logits trunk and its linear classifier (None when the head is not one linear layer)."""
    head = model.get_classifier()
    return TimmPreLogits(model), (head if isinstance(head, nn.Linear) else None)


def timm_layer(model: nn.Module, layer: str) -> nn.Module:
    """Truncate a timm model at graph node `layer` with timm's tracer (it knows timm's leaf modules)."""
    from timm.models import create_feature_extractor

    return fx_layer(model, layer, create_feature_extractor)


def timm_built(model: nn.Module, **fields: Any) -> BuiltBackbone:
    """The build record of a timm model: timm's head splitting and layer tracing, token pooling for transformers."""
    from embedfit.backbones.foundation import is_token_model

    return BuiltBackbone(model=model, split_head=timm_split_head, trace_layer=timm_layer,
                         tokens=is_token_model(model), **fields)


def _imagenet_names() -> list[str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]


def _timm_preprocess(model: nn.Module) -> dict[str, Any]:
    import math

    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    h, w = cfg["input_size"][1:]
    return dict(input_size=(h, w), resize_size=math.floor(min(h, w) / cfg["crop_pct"]),
                interpolation=cfg["interpolation"] if cfg["interpolation"] in ("bilinear", "bicubic")
                else "bilinear",
                mean=tuple(float(m) for m in cfg["mean"]), std=tuple(float(s) for s in cfg["std"]))


def _timm_skeleton(arch: str) -> nn.Module:
    """A timm model's module tree and pretrained config, without real weights."""
    import timm

    return skeleton(functools.partial(timm.create_model, arch, pretrained=False))


def _timm_from_cache(arch: str, **kwargs: Any) -> nn.Module:
    """timm's pretrained model, its weights file from the Hugging Face cache when there, else downloaded.

    A cached file is loaded as a local file, so that nothing asks the hub (which offline would retry for
    a minute or more); without the file, offline or when one probe (~2 s) finds the hub unreachable, the error
    comes at once and names what to put where. `kwargs` go to `timm.create_model` (e.g. `img_size`: timm
    resamples the position embeddings while loading).
    """
    import timm
    from huggingface_hub.constants import ENDPOINT, HF_HUB_CACHE

    skeleton = _timm_skeleton(arch)
    cached = _hf_cached_file(skeleton)
    hub_id = (skeleton.pretrained_cfg or {}).get("hf_hub_id")
    where = (f"expected model.safetensors of https://huggingface.co/{hub_id} under "
             f"{Path(HF_HUB_CACHE) / ('models--' + hub_id.replace('/', '--'))}" if hub_id
             else f"no Hugging Face repository is known for it (cache {HF_HUB_CACHE})")
    why = _OFFLINE_WHY
    if cached is not None:
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(cached), source=""),
                                 **kwargs)
    if not offline():
        unreached = unreachable(os.environ.get("HF_ENDPOINT") or ENDPOINT)  # the variable as it is now
        why = f"no network: {unreached}" if unreached else ""
        if not why:
            try:
                return timm.create_model(arch, pretrained=True, **kwargs)
            except Exception as exc:
                why = f"download failed: {type(exc).__name__}"
    raise WeightsUnavailableError(
        f"pretrained weights for timm:{arch} are not in the Hugging Face cache: {where} ({why}); "
        "pass `weights` FILE with a state dict"
    )


def build_timm(name: str, *, weights: Path | None, pretrained: bool, resolution: int | None) -> BuiltBackbone:
    """Builder of `timm:<model name>`."""
    import timm

    arch = name.removeprefix("timm:")

    if not timm.list_models(arch) and arch not in timm.list_models(pretrained=True):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise UsageError(f"unknown timm model '{arch}'{hint}")
    weights_file: Path | None = None
    # A transformer is built for the input size (position embeddings resampled); a CNN takes any size as it is.
    size = {"img_size": resolution} if resolution and hasattr(_timm_skeleton(arch), "patch_embed") else {}
    if weights is not None or not pretrained:
        model = timm.create_model(arch, pretrained=False, **size)
        if weights is not None:
            from embedfit.backbones.foundation import _filter_for

            _load_state_dict(model, weights, transform=_filter_for(model) if size else None)
        weights_id, weights_file = (f"file:{weights.name}", weights) if weights else ("random", None)
    else:
        model = _timm_from_cache(arch, **size)
        cfg = model.pretrained_cfg
        weights_id = cfg.get("hf_hub_id") or f"{arch}.{cfg.get('tag', '')}"
        weights_file = _hf_cached_file(model)
    class_names = _imagenet_names() if getattr(model, "num_classes", 0) == 1000 else None
    return timm_built(model, architecture=f"timm/{arch}", weights=weights_id, weights_file=weights_file,
                      class_names=class_names, **_timm_preprocess(model))


def timm_info(name: str) -> BackboneInfo:
    """Info of `timm:<model name>` from its module tree."""
    model = _timm_skeleton(name.removeprefix("timm:"))
    pre = _timm_preprocess(model)
    file = _hf_cached_file(model)
    return BackboneInfo(name, "timm", int(getattr(model, "num_features", 0)), pre["input_size"], file,
                        bool(file and file.is_file()), licence=str(model.pretrained_cfg.get("license") or ""),
                        params=sum(p.numel() for p in model.parameters()))


register_prefix("timm:", build_timm, timm_info)
