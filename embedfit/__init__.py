"""embedfit: transfer learning on image folders.

Pretrained CNN embeddings of an image folder go into an HDF5 feature store once (`extract`); scikit-learn
models are then fitted and cross-validated on the stored embeddings in seconds.

    >>> import embedfit                                             # doctest: +SKIP
    >>> summary = embedfit.extract("images/", "feats.h5")            # doctest: +SKIP
    >>> X, y, paths = embedfit.FeatureStore.open("feats.h5").load()  # doctest: +SKIP

Names are imported lazily so that `embedfit --help` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "BackboneSpec": "embedfit.backbones",
    "Backbone": "embedfit.backbones",
    "create_backbone": "embedfit.backbones",
    "register_backbone": "embedfit.backbones",
    "list_backbones": "embedfit.backbones",
    "backbone_info": "embedfit.backbones",
    "decode_image": "embedfit.images",
    "scan_images": "embedfit.images",
    "extract": "embedfit.extract",
    "ExtractConfig": "embedfit.extract",
    "embed_images": "embedfit.extract",
    "FeatureStore": "embedfit.store",
    "EmbeddingTransformer": "embedfit.transformer",
    "EmbedfitError": "embedfit.errors",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'embedfit' has no attribute {name!r}")
