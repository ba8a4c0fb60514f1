"""A scikit-learn transformer from image paths to embeddings, for `Pipeline`s over raw image files.

    >>> from sklearn.pipeline import make_pipeline                        # doctest: +SKIP
    >>> from sklearn.linear_model import LogisticRegression               # doctest: +SKIP
    >>> clf = make_pipeline(EmbeddingTransformer(), LogisticRegression())  # doctest: +SKIP
    >>> clf.fit(["a.jpg", "b.jpg"], ["cat", "dog"])                        # doctest: +SKIP

For many images or many models, extract once into a store (`embedfit.extract`) instead: this transformer
re-embeds on every `transform`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from embedfit.backbones import DEFAULT_BACKBONE
from embedfit.backbones.registry import Backbone, create_backbone
from embedfit.errors import DecodeError, UsageError


@functools.lru_cache(maxsize=4)
def _cached_backbone(name: str, weights: str | None, layer: str | None, pool: str) -> Backbone:
    # Clones made by cross-validation share one loaded model instead of reloading weights per fold.
    return create_backbone(name, weights=weights, layer=layer, pool=pool)


class EmbeddingTransformer(TransformerMixin, BaseEstimator):
    """Image file paths (n_samples,) -> embeddings (n_samples, embedding_dim).

    Weights load lazily in `fit`, never in `__init__`; the model runs in eval mode under inference_mode.

    Args:
        backbone: Registered backbone name or `timm:<name>`.
        weights: Optional state-dict file.
        layer: Intermediate layer, default pre-logits.
        pool: "avg" or "max" pooling for `layer`.
        device: "auto", "cpu", "cuda", ...
        batch_size: Images per forward pass.
        precision: "fp32", "fp16" or "bf16".
        tta: "none" or "flip".
        on_error: "raise" (a `DecodeError` naming the file) or "nan" (NaN rows for undecodable images).

    Attributes:
        backbone_: The loaded `Backbone`.
        spec_: Its `BackboneSpec`.
        n_features_in_: Always 1 (one path per sample).
        n_features_out_: Embedding dimension.
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, weights: str | None = None, layer: str | None = None,
                 pool: str = "avg", device: str = "cpu", batch_size: int | None = None, precision: str = "fp32",
                 tta: str = "none", on_error: str = "raise") -> None:
        self.backbone = backbone
        self.weights = weights
        self.layer = layer
        self.pool = pool
        self.device = device
        self.batch_size = batch_size
        self.precision = precision
        self.tta = tta
        self.on_error = on_error

    def _paths(self, X: Any) -> list[str]:
        if isinstance(X, str | os.PathLike):
            raise UsageError("EmbeddingTransformer expects a sequence of image paths, got a single path")
        arr = np.asarray(X, dtype=object)
        if arr.ndim == 2 and arr.shape[1] == 1:  # a column of paths (e.g. from a DataFrame)
            arr = arr[:, 0]
        if arr.ndim != 1 or not all(isinstance(p, str | os.PathLike) for p in arr):
            raise UsageError(f"EmbeddingTransformer expects a 1-D sequence of image paths, got an array of "
                             f"shape {np.shape(X)}")
        return [os.fspath(p) for p in arr]

    def fit(self, X: Sequence[str | os.PathLike], y: Any = None) -> EmbeddingTransformer:
        """Load the backbone (X is only validated: the backbone is pretrained)."""
        self._paths(X)
        if self.on_error not in ("raise", "nan"):
            raise UsageError(f"on_error must be 'raise' or 'nan', got '{self.on_error}'")
        self.backbone_ = _cached_backbone(self.backbone, self.weights, self.layer, self.pool)
        self.spec_ = self.backbone_.spec
        self.n_features_in_ = 1
        self.n_features_out_ = self.spec_.embedding_dim
        return self

    def transform(self, X: Sequence[str | os.PathLike]) -> np.ndarray:
        """Embed the images (float32)."""
        from embedfit.extraction.encoder import embed_images

        check_is_fitted(self, "backbone_")
        paths = self._paths(X)
        feats, errors = embed_images(paths, self.backbone_, device=self.device, batch_size=self.batch_size,
                                     precision=self.precision, tta=self.tta)
        bad = [(p, e) for p, e in zip(paths, errors, strict=True) if e]
        if bad and self.on_error == "raise":
            raise DecodeError(f"{len(bad)} image(s) could not be decoded, e.g. {bad[0][0]}: {bad[0][1]}")
        return feats

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        check_is_fitted(self, "backbone_")
        return np.array([f"emb{i}" for i in range(self.n_features_out_)], dtype=object)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False  # input is a list of file paths, not a numeric matrix
        tags.input_tags.string = True
        tags.requires_fit = True
        return tags
