"""EmbeddingTransformer: the scikit-learn contract, and real use inside a Pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import estimator_checks

from embedfit.errors import DecodeError, UsageError
from embedfit.store import FeatureStore
from embedfit.transformer import EmbeddingTransformer

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
    with pytest.raises(Exception, match="--weights FILE"):
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
