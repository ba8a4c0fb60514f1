"""torchvision classifiers (`resnet50`, `vgg16`, `inception_v3`, ...): weights through their weight enums,
files in the torch hub cache, checked against the hash in their published name."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from embedfit.backbones.factory import skeleton
from embedfit.backbones.registry import BackboneInfo, BuiltBackbone, register_backbone
from embedfit.backbones.weights import (
    _check_published_hash,
    _fetch_or_explain,
    _load_state_dict,
)

# Constructor arguments torchvision itself sets when it loads these weights.
_TV_KWARGS = {
    "inception_v3": dict(transform_input=True, aux_logits=True, init_weights=False),
    "googlenet": dict(transform_input=True, aux_logits=True, init_weights=False),
}


_TV_SKIP = {"squeezenet1_0", "squeezenet1_1"}  # convolutional heads: no pre-logits vector


def _tv_weights_enum(name: str) -> Any:
    import torchvision

    return torchvision.models.get_model_weights(name).DEFAULT


def tv_weights_path(name: str) -> Path:
    """Where torchvision's hub cache keeps the default weights of `name` (respects TORCH_HOME)."""
    url = _tv_weights_enum(name).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def build_torchvision(name: str, *, weights: Path | None, pretrained: bool,
                      resolution: int | None) -> BuiltBackbone:
    """Builder of a torchvision classifier (a CNN or a ViT at its own size: `resolution` is applied by the factory's
    preprocessing). The head is the last `nn.Linear`, layers are traced with torchvision's tracer (the defaults)."""
    import torchvision

    enum = _tv_weights_enum(name)
    model = torchvision.models.get_model(name, weights=None, num_classes=len(enum.meta["categories"]),
                                         **_TV_KWARGS.get(name, {}))
    if weights is not None:
        weights_id, weights_file = f"file:{weights.name}", weights
    elif pretrained:
        weights_id, weights_file = f"{type(enum).__name__}.{enum.name}", tv_weights_path(name)
        if not weights_file.is_file():
            _fetch_or_explain(name, enum.url, weights_file)
        _check_published_hash(weights_file)
    else:
        weights_id, weights_file = "random", None
    if weights_file is not None:
        _load_state_dict(model, weights_file)
    t = enum.transforms()
    return BuiltBackbone(
        model=model, architecture=f"torchvision/{name}", weights=weights_id, weights_file=weights_file,
        input_size=(t.crop_size[0], t.crop_size[0]), resize_size=t.resize_size[0],
        interpolation=t.interpolation.value, mean=tuple(t.mean), std=tuple(t.std),
        class_names=list(enum.meta["categories"]),
    )


def tv_info(name: str) -> BackboneInfo:
    """Info of a torchvision classifier from its module tree."""
    import torchvision

    t = _tv_weights_enum(name).transforms()
    model = skeleton(functools.partial(torchvision.models.get_model, name, weights=None, **_TV_KWARGS.get(name, {})))
    dim = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].in_features
    path = tv_weights_path(name)
    return BackboneInfo(name, "torchvision", dim, (t.crop_size[0], t.crop_size[0]), path, path.is_file(),
                        licence="bsd-3-clause", params=int(_tv_weights_enum(name).meta.get("num_params", 0)),
                        weights_source={"kind": "torch_hub", "file": path.name})


def _register_torchvision() -> None:
    import torchvision

    for name in torchvision.models.list_models(module=torchvision.models):
        if name not in _TV_SKIP:
            register_backbone(name, build_torchvision, tv_info)


_register_torchvision()
