"""EmbeddingTransformer: the scikit-learn contract, and real use inside a Pipeline."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import estimator_checks

from embedfit.embedding_transformer import EmbeddingTransformer
from embedfit.errors import DecodeError, UsageError
from embedfit.storage import FeatureStore

pytestmark = pytest.mark.slow

# Checks that apply to an estimator whose input is a list of file paths: scikit-learn skips its numeric-data checks
# for such estimators (input tag two_d_array=False), so the API checks are run one by one.
API_CHECKS = [
    "check_estimator_cloneable", "check_estimator_repr", "check_no_attributes_set_in_init",
    "check_estimators_unfitted", "check_do_not_raise_errors_in_init_or_set_params", "check_mixin_order",
    "check_get_params_invariance", "check_set_params", "check_valid_tag_types", "check_estimator_tags_renamed",
    "check_parameters_default_constructible",
]


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.SkipTestWarning")
def test_check_estimator_passes() -> None:
    results = estimator_checks.check_estimator(EmbeddingTransformer(), on_fail=None)
    assert results and all(r["status"] != "failed" for r in results)


@pytest.mark.parametrize("check", API_CHECKS)
def test_api_check(check: str) -> None:
    getattr(estimator_checks, check)("EmbeddingTransformer", EmbeddingTransformer())


def test_weights_load_lazily_in_fit() -> None:
    est = EmbeddingTransformer(backbone="resnet18")  # weights absent: __init__ must not touch them
    assert not hasattr(est, "backbone_")
    with pytest.raises(Exception, match="`weights` FILE"):
        est.fit(["a.jpg"])


def test_transform_equals_the_store(shared_tree: Path, shared_store: Path) -> None:
    store = FeatureStore.open(shared_store)
    paths = [str(shared_tree / p) for p in store.paths]
    est = EmbeddingTransformer().fit(paths)
    assert est.n_features_out_ == 1280 and est.spec_ == store.spec
    np.testing.assert_allclose(est.transform(paths), store.features(), rtol=1e-5, atol=1e-5)
    assert est.get_feature_names_out()[0] == "emb0"


def test_in_a_pipeline_with_cross_validation(shared_tree: Path, shared_store: Path) -> None:
    store = FeatureStore.open(shared_store)
    paths = np.array([str(shared_tree / p) for p in store.paths])
    pipe = make_pipeline(EmbeddingTransformer(), StandardScaler(), LogisticRegression(max_iter=1000))
    scores = cross_val_score(pipe, paths, store.labels, cv=3)
    assert scores.mean() > 0.8  # three distinct textures: frozen ImageNet features separate them
    clone(pipe).fit(paths, store.labels)


def test_errors(tmp_path: Path, shared_tree: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    good = str(next(shared_tree.rglob("*.jpg")))
    est = EmbeddingTransformer().fit([good])
    with pytest.raises(DecodeError, match=r"bad\.jpg"):
        est.transform([good, str(bad)])
    feats = EmbeddingTransformer(on_error="nan").fit([good]).transform([good, str(bad)])
    assert np.isfinite(feats[0]).all() and np.isnan(feats[1]).all()
    with pytest.raises(UsageError, match="sequence of image paths"):
        est.transform(good)
    with pytest.raises(UsageError, match="1-D sequence"):
        est.transform(np.zeros((3, 4)))


@pytest.mark.slow
def test_grid_search_embeds_each_image_once(shared_tree: Path, shared_store: Path) -> None:
    """GridSearchCV clones the pipeline per candidate and fold; the shared cache makes it one extraction, with the
    same results as without it."""
    from sklearn.model_selection import GridSearchCV

    from embedfit.embedding_transformer import clear_embedding_cache, embedding_cache_info

    store = FeatureStore.open(shared_store)
    keep = np.concatenate([np.flatnonzero(store.labels == c)[:4] for c in range(3)])  # 12 images, 4 per class
    paths, labels = np.array([str(shared_tree / p) for p in store.paths[keep]]), store.labels[keep]
    results = {}
    for cache in (False, True):
        clear_embedding_cache()
        pipe = make_pipeline(EmbeddingTransformer(cache=cache), StandardScaler(), LogisticRegression(max_iter=1000))
        search = GridSearchCV(pipe, {"logisticregression__C": [0.1, 1.0]}, cv=2).fit(paths, labels)
        results[cache] = (search, embedding_cache_info())
    (uncached, info_off), (cached, info_on) = results[False], results[True]
    n = len(paths)
    assert info_off["embedded"] == n * (2 * 2 + 1)  # every candidate x fold, and the refit
    assert info_on["embedded"] == n and info_on["hits"] == n * 2 * 2  # once; the rest from the cache
    np.testing.assert_allclose(cached.cv_results_["mean_test_score"], uncached.cv_results_["mean_test_score"])
    assert cached.best_params_ == uncached.best_params_
    np.testing.assert_allclose(cached.predict_proba(paths), uncached.predict_proba(paths), rtol=1e-4, atol=1e-5)
    assert info_on["entries"] == n and info_on["bytes"] == n * 1280 * 4
    clear_embedding_cache()
    assert embedding_cache_info()["entries"] == 0


def test_cache_sees_changed_files_and_settings(image_tree: Path) -> None:
    from PIL import Image

    from embedfit.embedding_transformer import clear_embedding_cache, embedding_cache_info

    clear_embedding_cache()
    paths = sorted(str(p) for p in image_tree.rglob("*.png"))[:2]
    est = EmbeddingTransformer().fit(paths)
    first = est.transform(paths)
    np.testing.assert_array_equal(est.transform(paths), first)
    assert embedding_cache_info()["embedded"] == 2
    Image.new("RGB", (64, 64), "red").save(paths[0])  # new content: new size and mtime
    os.utime(paths[0], ns=(1, 1))
    changed = est.transform(paths)
    assert embedding_cache_info()["embedded"] == 3 and not np.allclose(changed[0], first[0])
    np.testing.assert_array_equal(changed[1], first[1])
    EmbeddingTransformer(tta="flip").fit(paths).transform(paths)  # other settings: other embeddings
    assert embedding_cache_info()["embedded"] == 5
