"""fit / predict / report on real stores: CV equals scikit-learn's, model files are safe, checks fire."""

from __future__ import annotations

import html.parser
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score
from sklearn.model_selection import cross_val_score

from embedfit.backbones.spec import BackboneSpec
from embedfit.cli import main
from embedfit.errors import InputError, ModelFileError, StoreMismatchError, UsageError
from embedfit.fitting.evaluate import fit, make_splits
from embedfit.fitting.models import make_pipeline
from embedfit.fitting.out_of_core import fit_out_of_core
from embedfit.fitting.registry import classifier_names, trusted_types
from embedfit.images import ImageRecord
from embedfit.prediction import predict
from embedfit.report import SECTIONS, build_report
from embedfit.runs import load_model
from embedfit.storage import FAILED, MISSING, OK, FeatureStore, StoreSettings, StoreWriter

pytestmark = pytest.mark.fast


def synthetic_store(path: Path, X: np.ndarray, y: np.ndarray, class_names: list[str], *, name: str = "synthetic",
                    status: np.ndarray | None = None, complete: bool = True, tta: str = "none") -> FeatureStore:
    """A real store file holding given features (for checks that need no images)."""
    spec = BackboneSpec(name=name, architecture=f"test/{name}", weights="random", weights_sha256="",
                        input_size=(8, 8), resize_size=8, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3,
                        embedding_dim=X.shape[1])
    status = np.zeros(len(y), dtype=int) if status is None else status
    keys = [f"{class_names[c] if c >= 0 else 'x'}/img_{i:04d}.jpg" for i, c in enumerate(y)]
    records = [ImageRecord(path.parent / k, k, int(c), 100, 1) for k, c in zip(keys, y, strict=True)]
    with StoreWriter(path, StoreSettings(spec, tta=tta)) as w:
        w.write_part(keys, [class_names[c] if c >= 0 else "" for c in y], [100] * len(y), [1] * len(y), status,
                     ["broken" if s else "" for s in status], X)
        return w.commit(records, class_names, complete=complete)


def rebind_model_file(run_dir: Path, name: str = "model.skops") -> None:
    """Rewrite model.json's record of the model file, as an attacker who swaps both files would: the checks
    behind the hash (file format, allow-list, fitted state) must still refuse the file."""
    from embedfit.runs import model_binding

    meta = json.loads((run_dir / "model.json").read_text())
    meta.update(model_binding(run_dir / name, meta["class_names"]))
    (run_dir / "model.json").write_text(json.dumps(meta))


def blobs(n: int = 120, d: int = 16, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    return (rng.normal(size=(n, d)) + 1.5 * np.eye(k, d)[y]).astype(np.float32), y


@pytest.fixture
def store(tmp_path: Path) -> FeatureStore:
    X, y = blobs()
    return synthetic_store(tmp_path / "s.h5", X, y, ["a", "b", "c"])


@pytest.mark.parametrize("model", ["logreg", "svm", "ridge", "knn"])
def test_cv_scores_equal_sklearns_cross_val_score(store: FeatureStore, tmp_path: Path, model: str) -> None:
    result = fit(store.path, model, output=tmp_path / "run", cv=4, seed=3)
    X, y, _ = store.load()
    pipe = make_pipeline(model, n_samples=len(y), n_features=X.shape[1], seed=3)
    expected = cross_val_score(pipe, X, y, cv=make_splits(y, cv=4, repeats=1, groups=None, seed=3), scoring="accuracy")
    np.testing.assert_allclose(result.metrics["scores"]["accuracy"]["folds"], expected)
    assert result.metrics["scores"]["accuracy"]["mean"] > 0.6


def test_run_directory_and_reload(store: FeatureStore, tmp_path: Path) -> None:
    result = fit(store.path, "logreg", output=tmp_path / "run")
    for name in ("model.skops", "model.json", "metrics.json", "predictions.csv"):
        assert (tmp_path / "run" / name).is_file()
    pipeline, meta = load_model(tmp_path / "run")
    X, _, _ = store.load()
    np.testing.assert_array_equal(pipeline.predict(X), result.pipeline.predict(X))
    np.testing.assert_allclose(pipeline.predict_proba(X), result.pipeline.predict_proba(X))
    assert meta["spec"]["name"] == "synthetic" and meta["class_names"] == ["a", "b", "c"]
    assert meta["store_fingerprint"] == store.fingerprint
    m = result.metrics
    assert sum(map(sum, m["confusion_matrix"])) == 120 and set(m["per_class"]) == {"a", "b", "c"}
    assert {"accuracy", "balanced_accuracy", "f1_macro", "log_loss", "roc_auc"} <= set(m["scores"])


@pytest.mark.parametrize("model", classifier_names())
def test_every_model_saves_only_allow_listed_types(store: FeatureStore, tmp_path: Path, model: str) -> None:
    import skops.io as sio

    if model in classifier_names(streaming=True):
        result = fit_out_of_core(store.path, model, output=tmp_path / model, epochs=2, batch_rows=32)
    else:
        result = fit(store.path, model, output=tmp_path / model, cv=3)
    untrusted = sio.get_untrusted_types(file=tmp_path / model / "model.skops")
    assert set(untrusted) <= set(trusted_types())
    pipeline, _ = load_model(tmp_path / model)
    # One label space: what a store loads is what a saved model predicts, and `score` is accuracy.
    X, y, _ = store.load()
    assert set(y) == {"a", "b", "c"}
    np.testing.assert_array_equal(pipeline.predict(X), result.pipeline.predict(X))
    assert pipeline.score(X, y) == pytest.approx(accuracy_score(y, pipeline.predict(X)))


def test_logreg_ships_the_c_its_inner_cv_chose(store: FeatureStore, tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression

    X, y, _ = store.load()
    chooser = make_pipeline("logreg", n_samples=len(y), n_features=X.shape[1]).fit(X, y)  # LogisticRegressionCV
    result = fit(store.path, "logreg", output=tmp_path / "run", cv=3)
    clf = result.pipeline[-1]
    assert type(clf) is LogisticRegression and clf.C == result.metrics["best_params"]["C"] == chooser[-1].C_
    np.testing.assert_allclose(result.pipeline.predict_proba(X), chooser.predict_proba(X), rtol=1e-6)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # runs on unpickling
        return (Path.write_text, (self.marker, "pwned"))


def test_crafted_pickle_is_refused_and_never_executed(store: FeatureStore, tmp_path: Path) -> None:
    fit(store.path, "logreg", output=tmp_path / "run")
    marker = tmp_path / "marker"
    (tmp_path / "run" / "model.skops").write_bytes(pickle.dumps(_Exploit(marker)))
    rebind_model_file(tmp_path / "run")
    with pytest.raises(ModelFileError, match="not a skops model file"):
        load_model(tmp_path / "run")
    assert not marker.exists()


def test_skops_file_with_unexpected_type_is_refused(store: FeatureStore, tmp_path: Path) -> None:
    import skops.io as sio
    from sklearn.feature_selection import SelectKBest
    from sklearn.pipeline import Pipeline

    fit(store.path, "logreg", output=tmp_path / "run")
    sio.dump(Pipeline([("k", SelectKBest(k=2))]), tmp_path / "run" / "model.skops")  # holds a function reference
    rebind_model_file(tmp_path / "run")
    with pytest.raises(ModelFileError, match="allow-list"):
        load_model(tmp_path / "run")


def test_prefit_checks(tmp_path: Path) -> None:
    X, y = blobs(30)
    bad = X.copy()
    bad[3, 0] = np.inf
    with pytest.raises(InputError, match="non-finite"):
        fit(synthetic_store(tmp_path / "inf.h5", bad, y, ["a", "b", "c"]).path, output=tmp_path / "r")
    with pytest.raises(InputError, match="at least two classes"):
        fit(synthetic_store(tmp_path / "one.h5", X, np.zeros(30, int), ["a"]).path, output=tmp_path / "r")
    few = np.array([0] * 27 + [1] * 3)
    with pytest.raises(InputError, match=r"class 'b' has 3 image\(s\), fewer than the 5 CV folds"):
        fit(synthetic_store(tmp_path / "few.h5", X, few, ["a", "b"]).path, output=tmp_path / "r")
    with pytest.raises(InputError, match="no labels"):
        fit(synthetic_store(tmp_path / "unl.h5", X, np.full(30, -1), []).path, output=tmp_path / "r")
    status = np.array([FAILED] * 3 + [OK] * 27)
    result = fit(synthetic_store(tmp_path / "failed.h5", X, y, ["a", "b", "c"], status=status).path, cv=3,
                 output=tmp_path / "r")
    assert result.metrics["n_samples"] == 27 and result.metrics["n_excluded"] == 3
    with pytest.raises(UsageError, match="unknown model 'logrg'; did you mean logreg"):
        fit(tmp_path / "failed.h5", "logrg")
    with pytest.raises(UsageError, match="`cv` must be at least 2"):
        fit(tmp_path / "failed.h5", cv=1, output=tmp_path / "r")


def test_holdout_store_must_match(store: FeatureStore, tmp_path: Path) -> None:
    X, y = blobs(60, seed=1)
    same = synthetic_store(tmp_path / "test.h5", X, y, ["a", "b", "c"])
    result = fit(store.path, "logreg", test_store=same.path, output=tmp_path / "run")
    assert result.metrics["evaluation"]["strategy"] == "holdout" and result.metrics["n_samples"] == 120
    other = synthetic_store(tmp_path / "other.h5", X, y, ["a", "b", "c"], name="resnet18")
    with pytest.raises(StoreMismatchError, match="resnet18"):
        fit(store.path, "logreg", test_store=other.path, output=tmp_path / "run2")


@pytest.mark.parametrize("model", ["logreg", "svm", "knn", "ridge", "mlp"])
def test_a_holdout_store_saves_the_evaluated_model(store: FeatureStore, tmp_path: Path, model: str) -> None:
    """With `test_store` the evaluation trains on every training image: that model is saved, not fitted again."""
    import csv

    X, y = blobs(60, seed=1)
    test = synthetic_store(tmp_path / "test.h5", X, y, ["a", "b", "c"])
    result = fit(store.path, model, test_store=test.path, output=tmp_path / "run")
    assert result.metrics["evaluation"]["refit"] is False
    X_test, y_test, _ = test.load()
    with open(tmp_path / "run" / "predictions.csv", newline="") as f:
        scored = [row["predicted"] for row in csv.DictReader(f)]
    saved, _ = load_model(tmp_path / "run")
    np.testing.assert_array_equal(saved.predict(X_test), scored)  # the scored model is the saved one
    assert saved.score(X_test, y_test) == result.metrics["scores"]["accuracy"]["mean"]
    X_train, y_train, _ = store.load()
    refit = make_pipeline(model, n_samples=len(y_train), n_features=X_train.shape[1]).fit(X_train, y_train)
    assert np.mean(refit.predict(X_test) == saved.predict(X_test)) >= 0.95  # what the second fit would give
    # cross-validation still refits on every image: its folds each left some out
    assert fit(store.path, model, cv=3, output=tmp_path / "cv").metrics["evaluation"]["refit"] is True


def test_holdout_store_with_other_tta_is_refused_naming_both(store: FeatureStore, tmp_path: Path) -> None:
    """Flip TTA changes what a feature means: a --tta flip test store cannot score a model trained without it."""
    X, y = blobs(60, seed=1)
    flipped = synthetic_store(tmp_path / "flip.h5", X, y, ["a", "b", "c"], tta="flip")
    with pytest.raises(StoreMismatchError) as info:
        fit(store.path, "logreg", test_store=flipped.path, output=tmp_path / "run")
    message = str(info.value)
    assert str(flipped.path) in message and str(store.path) in message
    assert "--tta flip" in message and "tta: flip != none" in message


def test_grouped_cv_keeps_groups_together(store: FeatureStore, tmp_path: Path) -> None:
    result = fit(store.path, "ridge", groups=r"img_(\d\d\d)\d", cv=3, output=tmp_path / "run")
    assert result.metrics["evaluation"]["groups"]
    folds = {}
    for row in result.predictions:
        folds.setdefault(row["path"].split("img_")[1][:3], set()).add(row["fold"])
    assert all(len(f) == 1 for f in folds.values())


def test_nested_search_reports_best_params(store: FeatureStore, tmp_path: Path) -> None:
    result = fit(store.path, "ridge", search=True, cv=3, output=tmp_path / "run")
    assert "alpha" in result.metrics["best_params"] and result.metrics["evaluation"]["search"]
    load_model(tmp_path / "run")


def test_predict_on_images_equals_predict_on_their_store(shared_tree: Path, shared_store: Path,
                                                         tmp_path: Path) -> None:
    fit(shared_store, "logreg", cv=3, output=tmp_path / "run")
    on_store = predict(tmp_path / "run", [shared_store])
    on_images = predict(tmp_path / "run", [shared_tree])
    by_path = {Path(p).relative_to(shared_tree).as_posix(): i for i, p in enumerate(on_images.paths)}
    order = [by_path[p] for p in on_store.paths]
    assert [on_images.predicted[i] for i in order] == on_store.predicted
    np.testing.assert_allclose(on_images.proba[order], on_store.proba, atol=1e-4)
    assert sum(p == label for p, label in zip(on_store.predicted, [p.split("/")[0] for p in on_store.paths],
                                             strict=True)) >= 20


def test_predict_refuses_a_store_from_another_backbone(store: FeatureStore, tmp_path: Path,
                                                       shared_store: Path) -> None:
    fit(store.path, "logreg", output=tmp_path / "run")
    with pytest.raises(StoreMismatchError, match=r"efficientnet_lite0 .* synthetic"):
        predict(tmp_path / "run", [shared_store])


class _Sections(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.images = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        if tag == "section":
            self.ids.append(attrs["id"])
        if tag == "img" and attrs["src"].startswith("data:image/"):
            self.images += 1


@pytest.mark.slow
def test_report_has_every_section(shared_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fit(shared_store, "logreg", cv=3, output=tmp_path / "logreg")
    fit(shared_store, "ridge", cv=3, output=tmp_path / "ridge")
    out = build_report([tmp_path / "logreg", tmp_path / "ridge"], tmp_path / "report.html")
    parser = _Sections()
    parser.feed(out.read_text())
    # one mistakes section per run
    assert parser.ids == [*SECTIONS[:-1], "mistakes-logreg", "mistakes-ridge"] and parser.images >= 6
    assert main(["report", str(tmp_path / "logreg"), "-o", str(tmp_path / "r2.html")]) == 0
    assert "report:" in capsys.readouterr().out
    with pytest.raises(ModelFileError, match="does not exist"):
        build_report([tmp_path / "nope"], tmp_path / "x.html")


@pytest.mark.slow
def test_report_escapes_names(tmp_path: Path) -> None:
    X, y = blobs(30)
    s = synthetic_store(tmp_path / "s.h5", X, y, ["<b>a</b>", "b", "c"])
    fit(s.path, "ridge", cv=3, output=tmp_path / "run")
    text = build_report([tmp_path / "run"], tmp_path / "r.html").read_text()
    assert "&lt;b&gt;a&lt;/b&gt;" in text and "<b>a</b>" not in text


def test_cli_fit_predict(shared_store: Path, shared_tree: Path, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["fit", str(shared_store), "-m", "ridge", "--cv", "3", "-o", str(run)]) == 0
    assert "ridge" in capsys.readouterr().out
    assert main(["fit", str(shared_store), "-m", "ridge", "--cv", "3", "-o", str(run)]) == 0  # same place again
    assert f"note: replacing the earlier run in {run}" in capsys.readouterr().err
    preds = tmp_path / "p.csv"
    assert main(["predict", str(run), str(shared_tree / "brick"), "-o", str(preds)]) == 0
    assert "8 images predicted, 0 failed" in capsys.readouterr().out
    assert preds.read_text().count("\n") == 9
    assert main(["fit", str(shared_store), "-m", "svn"]) == 2
    assert "did you mean svm" in capsys.readouterr().err


def test_parallel_folds_default_to_the_cores_memory_allows() -> None:
    from embedfit.fitting.evaluate import PARALLEL_MIN_VALUES, default_jobs

    cores = len(os.sched_getaffinity(0))
    large = np.zeros((PARALLEL_MIN_VALUES // 1000, 1000), dtype=np.float32)
    assert default_jobs(large, n_splits=5) == min(cores, 5)
    assert default_jobs(large, n_splits=1) == 1
    # small data: starting worker processes costs more than parallel folds save
    assert default_jobs(np.zeros((245, 1280), dtype=np.float32), n_splits=5) == 1
    huge = np.broadcast_to(np.float32(0), (2**40,))  # 4 TB by nbytes, nothing allocated
    assert default_jobs(huge, n_splits=5) == 1


def test_speed_defaults_scale_with_the_data() -> None:
    assert np.isclose(make_pipeline("linear-svm", n_samples=500)[-1].C, 0.01)
    assert np.isclose(make_pipeline("linear-svm", n_samples=8000)[-1].C, 0.00125)  # fixed per-image strength
    assert make_pipeline("rf", n_samples=200)[-1].max_samples is None  # small sets keep full bootstrap samples
    assert make_pipeline("rf", n_samples=8000)[-1].max_samples == 0.25


def test_fit_with_parallel_jobs_equals_sequential_fit(store: FeatureStore, tmp_path: Path) -> None:
    parallel = fit(store.path, "logreg", cv=3, jobs=2, output=tmp_path / "p")
    sequential = fit(store.path, "logreg", cv=3, jobs=1, output=tmp_path / "s")
    assert parallel.metrics["scores"] == sequential.metrics["scores"]


def test_automatic_pca_fits_the_smallest_training_fold(tmp_path: Path) -> None:
    """PCA's 256 dims (capped at 0.6 n) used to exceed a fold's training set with --cv 2 or a large --test-size."""
    X, y = blobs(100, d=300)
    s = synthetic_store(tmp_path / "s.h5", X, y, ["a", "b", "c"])
    for model, kw in (("svm", {"cv": 2}), ("knn", {"test_size": 0.6}), ("knn", {"test_size": 0.95})):
        result = fit(s.path, model, output=tmp_path / f"{model}-{'-'.join(map(str, kw.values()))}", jobs=1, **kw)
        n_train = 50 if "cv" in kw else 100 - int(np.ceil(kw["test_size"] * 100))
        assert result.pipeline["pca"].n_components <= n_train
    with pytest.raises(UsageError, match="`pca` 60 is too many components: at most 50"):
        fit(s.path, "logreg", pca=60, cv=2, output=tmp_path / "r")
    assert fit(s.path, "ridge", pca=50, cv=2, output=tmp_path / "r").pipeline["pca"].n_components == 50


def test_inner_cvs_fit_the_smallest_class(tmp_path: Path) -> None:
    """A class with one image in a training fold: svm's 2-fold calibration used to raise; now a note says what."""
    X, _ = blobs(30, d=8)
    y = np.array([0] * 14 + [1] * 14 + [2] * 2)  # --cv 2: class c has 1 training image per fold
    s = synthetic_store(tmp_path / "s.h5", X, y, ["a", "b", "c"])
    svm = fit(s.path, "svm", cv=2, output=tmp_path / "svm", jobs=1)
    assert "fitted without probabilities" in svm.metrics["notes"][0] and "log_loss" not in svm.metrics["scores"]
    load_model(tmp_path / "svm")
    logreg = fit(s.path, "logreg", cv=2, output=tmp_path / "logreg", jobs=1)
    assert "C is fixed at 1.0" in logreg.metrics["notes"][0] and logreg.pipeline[-1].C == 1.0
    three = synthetic_store(tmp_path / "three.h5", X, np.array([0] * 14 + [1] * 13 + [2] * 3), ["a", "b", "c"])
    searched = fit(three.path, "svm", cv=3, search=True, output=tmp_path / "searched", jobs=1)
    assert set(searched.metrics["best_params"]) == {"C", "gamma"}  # the search's folds hold 1 image of c
    assert make_pipeline("logreg", min_class=2)[-1].cv == 2  # inner folds: at most the smallest class's images
    with pytest.raises(UsageError, match="`search` needs at least 2 training images of every class"):
        fit(s.path, "ridge", cv=2, search=True, output=tmp_path / "r")
    tiny = synthetic_store(tmp_path / "tiny.h5", X[:4], np.array([0, 0, 1, 1]), ["a", "b"])
    with pytest.raises(UsageError, match="lda needs more training images than classes"):
        fit(tiny.path, "lda", cv=2, output=tmp_path / "r")


def test_one_image_class_and_too_small_holdouts_are_clear_errors(tmp_path: Path) -> None:
    X, _ = blobs(30)
    y = np.array([0] * 15 + [1] * 14 + [2])
    one = synthetic_store(tmp_path / "one.h5", X, y, ["a", "b", "c"])
    with pytest.raises(InputError, match="class 'c' has 1 image; evaluating needs at least 2") as info:
        fit(one.path, output=tmp_path / "r")
    assert "`cv` 2" not in str(info.value)  # which would not work either
    with pytest.raises(InputError, match="class 'c' has 1 image"):
        fit(one.path, test_size=0.3, output=tmp_path / "r")
    s = synthetic_store(tmp_path / "s.h5", X, np.arange(30) % 3, ["a", "b", "c"])
    with pytest.raises(UsageError, match=r"gives 2 test images for 3 classes.*`test_size` 0.1 or more"):
        fit(s.path, test_size=0.05, output=tmp_path / "r")
    with pytest.raises(UsageError, match=r"leaves 1 training images for 3 classes.*`test_size` 0.9 or less"):
        fit(s.path, test_size=0.95, output=tmp_path / "r")
    fit(s.path, "ridge", test_size=0.1, output=tmp_path / "r")  # the bound it names works


def test_incomplete_store_is_noted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    X, y = blobs(30)
    s = synthetic_store(tmp_path / "s.h5", X, y, ["a", "b", "c"], complete=False)
    assert main(["fit", str(s.path), "-m", "ridge", "--cv", "3", "-o", str(tmp_path / "run")]) == 0
    assert "is incomplete (an interrupted extract): only 30 images are embedded" in capsys.readouterr().err
    notes = json.loads((tmp_path / "run" / "metrics.json").read_text())["notes"]
    assert len(notes) == 1 and "re-run embedfit extract" in notes[0]


def test_classes_without_usable_images_are_left_out(tmp_path: Path) -> None:
    """A deleted class folder leaves `missing` rows: the class is no class to fit, score or report."""
    X, y = blobs(45)
    s = synthetic_store(tmp_path / "s.h5", X, y, ["a", "b", "c"], status=np.where(y == 1, MISSING, OK))
    result = fit(s.path, "logreg", cv=3, output=tmp_path / "run")
    m = result.metrics
    assert m["class_names"] == ["a", "c"] and np.array(m["confusion_matrix"]).shape == (2, 2)
    assert "roc_auc" in m["scores"] and "left out: b" in m["notes"][0]
    assert {r["label"] for r in result.predictions} == {"a", "c"} and list(result.pipeline.classes_) == ["a", "c"]
    assert load_model(tmp_path / "run")[1]["class_names"] == ["a", "c"]


def test_option_checks(store: FeatureStore, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="`class_weight` must be balanced or none, got 'bal'"):
        fit(store.path, class_weight="bal", output=tmp_path / "r")
    assert fit(store.path, "ridge", cv=3, class_weight="none", output=tmp_path / "r").pipeline[-1].class_weight is None
    assert "pca" not in fit(store.path, "svm", cv=3, pca="none", output=tmp_path / "r2").pipeline.named_steps
    with pytest.raises(InputError, match=r"groups file missing\.csv does not exist"):
        fit(store.path, groups="missing.csv", output=tmp_path / "r")
    with pytest.raises(UsageError, match=r"`groups` .* does not combine with `test_size`"):
        fit(store.path, groups=r"img_(\d)", test_size=0.2, output=tmp_path / "r")
    with pytest.raises(UsageError, match="is the training store itself"):
        fit(store.path, test_store=store.path, output=tmp_path / "r")
    with pytest.raises(UsageError, match="`repeats` needs CV or `test_size`"):
        fit(store.path, test_store=tmp_path / "other.h5", repeats=2, output=tmp_path / "r")


def test_holdout_share_is_repeated(store: FeatureStore, tmp_path: Path) -> None:
    from sklearn.model_selection import train_test_split

    result = fit(store.path, "ridge", test_size=0.25, repeats=3, output=tmp_path / "r")
    assert result.metrics["evaluation"]["repeats"] == 3 and len(result.metrics["scores"]["accuracy"]["folds"]) == 3
    _, first = train_test_split(np.arange(120), test_size=0.25, stratify=store.labels, random_state=0)
    assert sorted(r["row"] for r in result.predictions) == sorted(first)  # predictions: the first split


def test_run_directory_is_checked_first_and_names_the_store_absolutely(
        store: FeatureStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "taken").write_text("not a directory")
    with pytest.raises(UsageError, match="taken is a file"):
        fit(store.path, output=tmp_path / "taken")
    with pytest.raises(UsageError, match="taken is a file"):
        fit(store.path, output=tmp_path / "taken" / "run")
    monkeypatch.chdir(tmp_path)
    fit("s.h5", "ridge", cv=3, output="run")
    meta = load_model(tmp_path / "run")[1]
    assert meta["store"] == str((tmp_path / "s.h5").resolve())
    monkeypatch.chdir(tmp_path / "run")
    assert Path(meta["store"]).is_file()
