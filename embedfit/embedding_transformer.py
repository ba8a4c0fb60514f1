"""A scikit-learn transformer from image paths to embeddings, for `Pipeline`s over raw image files.

    >>> from sklearn.pipeline import make_pipeline                        # doctest: +SKIP
    >>> from sklearn.linear_model import LogisticRegression               # doctest: +SKIP
    >>> clf = make_pipeline(EmbeddingTransformer(), LogisticRegression())  # doctest: +SKIP
    >>> clf.fit(["a.jpg", "b.jpg"], ["cat", "dog"])                        # doctest: +SKIP

Embeddings are cached per process (`embedding_cache_info`, `clear_embedding_cache`), keyed by the backbone and
settings and by each file's path, size and mtime: a `GridSearchCV` or `cross_val_score` over a Pipeline that
starts with this transformer runs each image through the network once, not once per candidate and fold (its
clones share the cache). The cache holds at most EMBEDFIT_TRANSFORM_CACHE_MB (default 512) MiB of embeddings,
least recently used first out; worker processes (`n_jobs` > 1) each have their own. For many images or many
models, extract once into a store (`embedfit.extract`) instead.
"""

from __future__ import annotations

import functools
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from embedfit.backbones import DEFAULT_BACKBONE
from embedfit.backbones.factory import Backbone, create_backbone
from embedfit.errors import DecodeError, UsageError


@functools.lru_cache(maxsize=4)
def _cached_backbone(name: str, weights: str | None, layer: str | None, pool: str) -> Backbone:
    # Clones made by cross-validation share one loaded model instead of reloading weights per fold.
    return create_backbone(name, weights=weights, layer=layer, pool=pool)


class _EmbeddingCache:
    """Embeddings by (settings, path, size, mtime), least recently used out beyond `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._rows: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = self.hits = self.misses = self.embedded = 0

    def get(self, key: tuple[Any, ...]) -> np.ndarray | None:
        with self._lock:
            row = self._rows.get(key)
            if row is None:
                self.misses += 1
                return None
            self._rows.move_to_end(key)
            self.hits += 1
            return row

    def put(self, key: tuple[Any, ...], row: np.ndarray) -> None:
        with self._lock:
            if key in self._rows or row.nbytes > self.max_bytes:
                return
            self._rows[key] = row
            self.nbytes += row.nbytes
            while self.nbytes > self.max_bytes:
                self.nbytes -= self._rows.popitem(last=False)[1].nbytes

    def clear(self) -> None:
        with self._lock:
            self._rows.clear()
            self.nbytes = self.hits = self.misses = self.embedded = 0


_CACHE = _EmbeddingCache(int(float(os.environ.get("EMBEDFIT_TRANSFORM_CACHE_MB", "512")) * 2**20))


def embedding_cache_info() -> dict[str, int]:
    """The transformer's embedding cache in this process: hits and misses (images), `embedded` (images run
    through a network by `EmbeddingTransformer.transform`, cached or not), entries, bytes and max_bytes."""
    return {"hits": _CACHE.hits, "misses": _CACHE.misses, "embedded": _CACHE.embedded,
            "entries": len(_CACHE._rows), "bytes": _CACHE.nbytes, "max_bytes": _CACHE.max_bytes}


def clear_embedding_cache() -> None:
    """Empty the transformer's embedding cache and reset its statistics."""
    _CACHE.clear()


def _file_key(path: str) -> tuple[str, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:  # missing: never cached, embedding reports the error
        return None
    return os.path.abspath(path), st.st_size, st.st_mtime_ns


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
        cache: Reuse embeddings of files already embedded in this process with the same backbone and settings
            (see the module's docstring); False embeds every time.

    Attributes:
        backbone_: The loaded `Backbone`.
        spec_: Its `BackboneSpec`.
        n_features_in_: Always 1 (one path per sample).
        n_features_out_: Embedding dimension.
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, weights: str | None = None, layer: str | None = None,
                 pool: str = "avg", device: str = "cpu", batch_size: int | None = None, precision: str = "fp32",
                 tta: str = "none", on_error: str = "raise", cache: bool = True) -> None:
        self.backbone = backbone
        self.weights = weights
        self.layer = layer
        self.pool = pool
        self.device = device
        self.batch_size = batch_size
        self.precision = precision
        self.tta = tta
        self.on_error = on_error
        self.cache = cache

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
            raise UsageError(f"`on_error` must be 'raise' or 'nan', got '{self.on_error}'")
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
        settings = (self.spec_.to_json(), self.precision, self.tta, self.device)
        keys = [(settings, *k) if self.cache and (k := _file_key(p)) else None for p in paths]
        rows = [_CACHE.get(k) if k else None for k in keys]
        todo = [i for i, row in enumerate(rows) if row is None]
        errors = [""] * len(paths)
        if todo:
            new, new_errors = embed_images([paths[i] for i in todo], self.backbone_, device=self.device,
                                           batch_size=self.batch_size, precision=self.precision, tta=self.tta)
            with _CACHE._lock:
                _CACHE.embedded += len(todo)
            for i, row, error in zip(todo, new, new_errors, strict=True):
                rows[i], errors[i] = row, error
                if keys[i] and not error:
                    _CACHE.put(keys[i], row.copy())
        feats = (np.stack(rows).astype(np.float32, copy=True) if rows
                 else np.empty((0, self.n_features_out_), dtype=np.float32))
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
