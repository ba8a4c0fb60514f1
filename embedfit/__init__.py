"""embedfit: transfer learning on image folders.

Pretrained CNN embeddings of an image folder go into an HDF5 feature store once (`extract`); scikit-learn
models are then fitted and cross-validated on the stored embeddings in seconds (`fit`).

    >>> import embedfit                                             # doctest: +SKIP
    >>> summary = embedfit.extract("images/", "feats.h5")            # doctest: +SKIP
    >>> X, y, paths = embedfit.FeatureStore.open("feats.h5").load()  # doctest: +SKIP
    >>> result = embedfit.fit("feats.h5", "logreg")                  # doctest: +SKIP
"""

__version__ = "0.1.0"

# The verbs are imported eagerly: a lazily imported submodule of the same name (embedfit.extract,
# embedfit.fit, embedfit.predict) would otherwise shadow the function of that name.
from embedfit.backbones import Backbone, BackboneSpec, backbone_info, create_backbone, list_backbones
from embedfit.errors import EmbedfitError
from embedfit.extract import ExtractConfig, embed_images, extract
from embedfit.fit import fit, load_model
from embedfit.images import decode_image, scan_images
from embedfit.predict import predict
from embedfit.report import build_report
from embedfit.store import FeatureStore
from embedfit.transformer import EmbeddingTransformer

__all__ = [
    "Backbone", "BackboneSpec", "EmbeddingTransformer", "EmbedfitError", "ExtractConfig", "FeatureStore",
    "__version__", "backbone_info", "build_report", "create_backbone", "decode_image", "embed_images", "extract",
    "fit", "list_backbones", "load_model", "predict", "scan_images",
]
