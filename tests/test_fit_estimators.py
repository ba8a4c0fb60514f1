"""Any scikit-learn classifier or Pipeline as the model; saved models predict class names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.naive_bayes import GaussianNB
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from test_fit import blobs, synthetic_store

import embedfit
from embedfit.cli import main
from embedfit.errors import ModelFileError, UsageError
from embedfit.fitting.evaluate import fit, make_splits
from embedfit.prediction import predict
from embedfit.runs import Evaluation, load_model, save_run
from embedfit.storage import FeatureStore

pytestmark = pytest.mark.fast


@pytest.fixture
def store(tmp_path: Path) -> FeatureStore:
    X, y = blobs()
    return synthetic_store(tmp_path / "s.h5", X, y, ["a", "b", "c"])


class ThirdPartyClassifier(ClassifierMixin, BaseEstimator):
    """Stands in for a classifier from another package: skops would have to trust its type to load it."""

    def fit(self, X: np.ndarray, y: np.ndarray) -> ThirdPartyClassifier:
        self.classes_ = np.unique(y)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.repeat(self.classes_[:1], len(X))


def test_a_bare_estimator_gets_scaling_cv_metrics_and_a_run(store: FeatureStore, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = embedfit.fit(store, LogisticRegression(), cv=3, seed=1)  # was: "... object is not iterable"
    assert result.run_dir == Path("runs/s-logisticregression") and result.model == "logisticregression"
    assert [type(s).__name__ for _, s in result.pipeline.steps] == ["StandardScaler", "LogisticRegression"]
    X, y, _ = store.load()
    expected = cross_val_score(Pipeline([("s", StandardScaler()), ("c", LogisticRegression())]), X, y,
                               cv=make_splits(y, cv=3, repeats=1, groups=None, seed=1))
    np.testing.assert_allclose(result.metrics["scores"]["accuracy"]["folds"], expected)
    assert {"log_loss", "roc_auc"} <= set(result.metrics["scores"])
    meta = json.loads((result.run_dir / "model.json").read_text())
    assert meta["model"] == "logisticregression" and "LogisticRegression" in meta["params"]["estimator"]
    loaded, _ = load_model(result.run_dir)
    assert set(loaded.predict(X)) == {"a", "b", "c"}
    # the configured scaling goes in front of a bare estimator
    l2 = fit(store, GaussianNB(), cv=3, scale="l2", output=tmp_path / "nb")
    assert isinstance(l2.pipeline[0], Normalizer) and l2.run_dir == tmp_path / "nb"


def test_a_pipeline_is_used_as_given(store: FeatureStore, tmp_path: Path) -> None:
    pipe = Pipeline([("norm", Normalizer()), ("nb", GaussianNB())])
    result = fit(store, pipe, cv=3, scale="standard", output=tmp_path / "run")
    assert [name for name, _ in result.pipeline.steps] == ["norm", "nb"] and result.model == "gaussiannb"
    assert not hasattr(pipe[-1], "classes_")  # the caller's pipeline is not fitted in place
    load_model(tmp_path / "run")[0].predict(store.load()[0])


def test_model_as_an_import_path(store: FeatureStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", str(store.path), "--model", "sklearn.naive_bayes:GaussianNB", "--cv", "3",
                 "-o", str(tmp_path / "run")]) == 0, capsys.readouterr().err
    assert "gaussiannb" in capsys.readouterr().out
    assert load_model(tmp_path / "run")[1]["model"] == "gaussiannb"
    with pytest.raises(UsageError, match="search grids exist for the built-in models only"):
        fit(store, GaussianNB(), search=True, output=tmp_path / "s")


NO_EVALUATION = Evaluation("cv", "", "", 0, 0)  # save_run's record, for runs saved by hand here


def test_third_party_types_are_refused_before_the_cv(store: FeatureStore, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"cannot save thirdpartyclassifier safely: .*ThirdPartyClassifier"):
        fit(store, ThirdPartyClassifier(), cv=3, output=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    # and at save time too, for what only shows after fitting
    fitted = Pipeline([("clf", ThirdPartyClassifier().fit(np.zeros((2, 1)), [0, 1]))])
    with pytest.raises(ModelFileError, match="ThirdPartyClassifier"):
        save_run(tmp_path / "run2", fitted, model="x", params={}, store=store, metrics={"class_names": ["a"]},
                 predictions=[], evaluation=NO_EVALUATION, identity={})


def test_scikit_learn_types_outside_the_list_save_and_load(store: FeatureStore, tmp_path: Path) -> None:
    """HistGradientBoosting's fitted trees hold types outside skops' defaults and `trusted_types()`: scikit-learn
    classes are accepted by rule. Checked on the saved file, without the (slow) CV."""
    import skops.io as sio
    from sklearn.ensemble import HistGradientBoostingClassifier

    from embedfit.fitting.registry import trusted_types
    from embedfit.runs import untrusted_types

    X, y, _ = store.load()
    model = Pipeline([("clf", HistGradientBoostingClassifier(max_iter=5))]).fit(X, y)
    save_run(tmp_path / "run", model, model="hgb", params={}, store=store, metrics={"class_names": ["a", "b", "c"]},
             predictions=[], evaluation=NO_EVALUATION, identity={})
    found = sio.get_untrusted_types(file=tmp_path / "run" / "model.skops")
    assert set(found) - set(trusted_types()) and untrusted_types(found) == []
    np.testing.assert_array_equal(load_model(tmp_path / "run")[0].predict(X), model.predict(X))
    assert untrusted_types(["sklearn.feature_selection._univariate_selection.f_classif", "builtins.eval",
                            "os.system", "sklearn.nope.Thing"]) == [
        "builtins.eval", "os.system", "sklearn.feature_selection._univariate_selection.f_classif",
        "sklearn.nope.Thing"]


@pytest.mark.parametrize("model", ["logreg", "svm", "knn", "ridge", "rf"])
def test_saved_models_predict_class_names(tmp_path: Path, model: str) -> None:
    X, y = blobs(90)
    names = ["zebra", "ant", "moth"]  # not in sorted order: names map by name, not by position
    store = synthetic_store(tmp_path / "s.h5", X, y, names)
    result = fit(store, model, cv=3, output=tmp_path / "run")
    loaded, _ = load_model(tmp_path / "run")
    pred = loaded.predict(X)
    assert set(pred) <= set(names) and (pred == np.array(names)[y]).mean() > 0.8
    assert list(result.pipeline.predict(X[:20])) == list(pred[:20])
    preds = predict(tmp_path / "run", [store.path])  # `embedfit predict` on the same store (rows sorted by path)
    pred = loaded.predict(store.features())
    assert preds.predicted == list(pred)
    if preds.proba is not None:
        assert [names[i] for i in preds.proba.argmax(1)] == list(pred)


def test_a_run_that_predicts_class_indices_is_refused(tmp_path: Path) -> None:
    """Runs predict class names; a model that predicts indices (pre-release embedfit) is refused with a hint."""
    X, y = blobs(90)
    names = ["zebra", "ant", "moth"]
    store = synthetic_store(tmp_path / "s.h5", X, y, names)
    result = fit(store, "logreg", cv=3, output=tmp_path / "run")
    old = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression())]).fit(X, y)  # indices
    save_run(tmp_path / "old", old, model="logreg", params={}, store=store, metrics=result.metrics, predictions=[],
             evaluation=NO_EVALUATION, identity={})
    with pytest.raises(ModelFileError, match=r"predicts class indices.*refit the run"):
        predict(tmp_path / "old", [store.path])


TENSOR_REFIT = r"""
import json, sys
import numpy as np, torch
from embedfit.fitting.evaluate import _refit
from embedfit.fitting.models import make_pipeline, name_classes
from embedfit.fitting.data import load_dataset
data = load_dataset(sys.argv[1])
names = np.asarray(data.class_names)
out = {}
for model in ("logreg", "ridge"):
    pipe = make_pipeline(model, n_samples=len(data.y), n_features=data.X.shape[1], array_api=True)
    final = _refit(pipe, torch.as_tensor(data.X), torch.as_tensor(data.y))
    if hasattr(final[-1], "best_estimator_"):
        final.steps[-1] = ("clf", final[-1].best_estimator_)
    name_classes(final[-1], data.class_names)  # as fit() does after a refit on tensors
    pred = final.predict(data.X)
    out[model] = {"agree": float((pred == names[data.y]).mean()), "classes": [str(c) for c in final.classes_]}
print(json.dumps(out))
"""


def test_models_fitted_on_tensors_predict_class_names(shared_store: Path) -> None:
    """The GPU path fits on numeric labels (tensors); its saved model is relabelled to predict names. Run here
    on CPU tensors through the same array-API dispatch."""
    env = {**os.environ, "SCIPY_ARRAY_API": "1"}
    proc = subprocess.run([sys.executable, "-c", TENSOR_REFIT, str(shared_store)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = FeatureStore.open(shared_store).class_names
    for model, r in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        assert r["classes"] == list(names) and r["agree"] > 0.9, (model, r)
