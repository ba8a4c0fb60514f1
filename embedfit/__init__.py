"""embedfit: transfer learning on image folders.

Pretrained CNN embeddings of an image folder go into an HDF5 feature store once (`extract`); scikit-learn
models are then fitted and cross-validated on the stored embeddings in seconds (`fit`).

    >>> import embedfit                                             # doctest: +SKIP
    >>> summary = embedfit.extract("images/", "feats.h5")            # doctest: +SKIP
    >>> X, y, paths = embedfit.FeatureStore.open("feats.h5").load()  # doctest: +SKIP
    >>> result = embedfit.fit("feats.h5", "logreg")                  # doctest: +SKIP

The pipeline, one package or module per stage: `images` -> `backbones` -> `extraction` -> `store` -> `fitting`
-> `runs` -> `prediction` / `report`; `training` holds fine-tuning, scratch, as-is and the comparison.

Names are imported on first use (PEP 562), so `import embedfit` loads neither torch nor scikit-learn. The verbs
`extract`, `fit` and `predict` are functions here; their modules are `extraction`, `fitting` and `prediction`.
"""

from __future__ import annotations

from embedfit._lazy import attach
from embedfit._version import __version__
from embedfit.errors import EmbedfitError

_LAZY = {
    "Backbone": "embedfit.backbones", "BackboneSpec": "embedfit.backbones", "backbone_info": "embedfit.backbones",
    "create_backbone": "embedfit.backbones", "list_backbones": "embedfit.backbones",
    "register_backbone": "embedfit.backbones",
    "ExtractConfig": "embedfit.extraction", "embed_images": "embedfit.extraction", "extract": "embedfit.extraction",
    "FitConfig": "embedfit.fitting", "fit": "embedfit.fitting", "fit_out_of_core": "embedfit.fitting",
    "load_model": "embedfit.runs",
    "decode_image": "embedfit.images", "scan_images": "embedfit.images",
    "predict": "embedfit.prediction",
    "build_report": "embedfit.report",
    "FeatureStore": "embedfit.storage",
    "EmbeddingTransformer": "embedfit.embedding_transformer",
}

__getattr__, __dir__, _names = attach(__name__, _LAZY)
__all__ = ["EmbedfitError", "__version__", *_names]
