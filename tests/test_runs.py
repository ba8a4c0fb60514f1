"""The run-directory contract: runs keep what they answered, outputs are committed whole, reuse keys hold every
setting that changes a score, fine-tuned runs reproduce under `predict`, and the paired statistics."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from embedfit.errors import OutputError
from embedfit.fitting.evaluate import fit
from embedfit.runs import atomic_write, read_run, staged_dir
from embedfit.stats import cheapest_within_noise, paired_bootstrap
from embedfit.storage import FeatureStore
from embedfit.sweep import SweepConfig, _reusable, recommendation, sweep

pytestmark = pytest.mark.fast


def _holdout_store(shared_store: Path, tmp_path: Path) -> Path:
    """A second store with the same classes: a copy of the shared one (a different file, the same images)."""
    copy = tmp_path / "val.h5"
    shutil.copy(shared_store, copy)
    return copy


def test_a_run_with_another_evaluation_is_refused_not_replaced(shared_store: Path, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "train-logreg"
    held_out = fit(shared_store, "logreg", output=run, test_store=_holdout_store(shared_store, tmp_path))
    before = (run / "model.json").read_bytes()
    with pytest.raises(OutputError, match=r"holds another run \(evaluation.*delete"):
        fit(shared_store, "logreg", output=run, cv=3)
    assert (run / "model.json").read_bytes() == before  # the hold-out run is still there, whole
    assert read_run(run).evaluation.scheme == "held-out" and held_out.metrics["evaluation"]["scheme"] == "held-out"
    # the identical command may replace its own run
    fit(shared_store, "logreg", output=run, test_store=tmp_path / "val.h5")
    # another model's settings in the same folder: refused too
    with pytest.raises(OutputError, match="settings"):
        fit(shared_store, "logreg", output=run, test_store=tmp_path / "val.h5", class_weight=None)


def test_a_folder_that_is_not_a_run_is_never_replaced(shared_store: Path, tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work")
    with pytest.raises(OutputError, match="holds no embedfit run"):
        fit(shared_store, "logreg", output=folder, cv=3)
    assert (folder / "thesis.txt").read_text() == "years of work"


def test_a_failed_write_leaves_the_previous_folder_whole(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with staged_dir(final) as stage:
        (stage / "a.json").write_text("1")
    with pytest.raises(KeyboardInterrupt), staged_dir(final) as stage:
        (stage / "a.json").write_text("2")
        raise KeyboardInterrupt  # a kill in the middle of writing the new folder
    assert (final / "a.json").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind
    atomic_write(final / "b.json", {"x": np.float32(1.5)})
    assert json.loads((final / "b.json").read_text()) == {"x": 1.5}


def test_the_evaluation_record_says_what_scored_the_run(shared_store: Path, tmp_path: Path) -> None:
    result = fit(shared_store, "logreg", output=tmp_path / "run", cv=3)
    run = read_run(result.run_dir)
    root = FeatureStore.open(shared_store).root
    assert run.evaluation.scheme == "cv" and run.evaluation.image_root == str(root)
    assert run.evaluation.n_images == len(run.predictions) == result.metrics["n_samples"]
    assert run.evaluation.details["n_splits"] == 3
    assert run.meta["flavors"]["sklearn"]["file"] == "model.skops"


def _unbalanced_tree(root: Path) -> Path:
    """3 classes, 10/3/3 images: accuracy and balanced accuracy rank models differently."""
    from conftest import _texture_crops
    from PIL import Image

    crops = _texture_crops(10, seed=3)
    for (name, images), n in zip(crops.items(), (10, 3, 3), strict=False):
        (root / name).mkdir(parents=True)
        for i, img in enumerate(images[:n]):
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


def test_a_sweep_rerun_with_another_metric_ranks_by_that_metric(tmp_path: Path) -> None:
    data = _unbalanced_tree(tmp_path / "data")
    out = tmp_path / "sweep"
    options = dict(backbones=("efficientnet_lite0",), models=("logreg", "knn"), cv=3, device="cpu", workers=0)
    sweep(data, out, **options)
    lines: list[str] = []
    again = sweep(data, out, metric="balanced_accuracy", on_progress=lambda e: lines.append(e.line()), **options)
    assert sum("already fitted" in line for line in lines) == 2  # no refit: the runs hold every metric
    for entry in again.entries:
        run = read_run(entry["run"])
        assert entry["score"] == run.metrics["scores"]["balanced_accuracy"]["mean"]
        assert entry["metric"] == "balanced_accuracy"
    assert [e["score"] for e in again.entries] == sorted((e["score"] for e in again.entries), reverse=True)
    state = json.loads((out / "sweep.json").read_text())
    assert state["settings"]["metric"] == "balanced_accuracy"
    assert state["entries"][0]["score"] == max(e["score"] for e in state["entries"])
    assert "Recommendation: use " in (out / "leaderboard.md").read_text()


@pytest.mark.parametrize("change", ["cv", "repeats", "seed", "test", "data", "model settings"])
def test_the_reuse_key_holds_every_setting_that_changes_a_score(shared_store: Path, tmp_path: Path,
                                                                change: str) -> None:
    config = SweepConfig(cv=3, seed=0)
    store = FeatureStore.open(shared_store)
    stores = {"store": shared_store, "train_fingerprint": store.fingerprint, "test_fingerprint": None,
              "test_store": None}
    run = tmp_path / "run"
    fit(shared_store, "logreg", output=run, cv=3, seed=0)
    assert _reusable(run, stores, "logreg", config)
    if change == "cv":
        config = SweepConfig(cv=4, seed=0)
    elif change == "repeats":
        config = SweepConfig(cv=3, repeats=2, seed=0)
    elif change == "seed":
        config = SweepConfig(cv=3, seed=1)
    elif change == "test":
        val = _holdout_store(shared_store, tmp_path)
        stores = {**stores, "test_store": val, "test_fingerprint": FeatureStore.open(val).fingerprint}
    elif change == "data":
        stores = {**stores, "train_fingerprint": "another-store"}
    else:  # a version whose default model settings differ: the recorded settings no longer match
        meta = json.loads((run / "model.json").read_text())
        meta["identity"]["settings"]["pca"] = 64
        (run / "model.json").write_text(json.dumps(meta))
    assert not _reusable(run, stores, "logreg", config)
    assert not _reusable(run, {**stores}, "knn", SweepConfig(cv=3, seed=0))  # another model, never


def _entry(name: str, score: float, images_per_second: float, folds: list[float]) -> dict:
    return {"backbone": name, "model": "logreg", "score": score, "score_std": 0.01, "folds": folds,
            "evaluation": "cv", "cv": 5, "rows": "same", "images_per_second": images_per_second,
            "fit_seconds": 1.0, "n_samples": 100, "extract_seconds": 100 / images_per_second}


def test_a_sweep_tie_goes_to_the_cheapest_per_image_and_says_why() -> None:
    from embedfit.sweep import compare_entries, rank

    lite2 = _entry("lite2", 0.912, 10.0, [0.90, 0.93, 0.91, 0.92, 0.90])
    lite0 = _entry("lite0", 0.908, 30.0, [0.91, 0.90, 0.92, 0.90, 0.91])
    entries = rank([lite0, lite2])
    line = recommendation(entries, compare_entries(entries))
    assert line.startswith("use lite0 + logreg: within noise of the best, lite2 + logreg")
    assert "cost per image" in line and "CI" in line
    far = _entry("lite1", 0.70, 50.0, [0.70, 0.69, 0.71, 0.70, 0.70])
    entries = rank([lite2, far])
    assert recommendation(entries, compare_entries(entries)).startswith("use lite2 + logreg: clearly ahead")


def test_one_statistics_module_serves_compare_and_sweep() -> None:
    from embedfit.training import compare

    assert compare.paired_bootstrap is paired_bootstrap and compare.cheapest_within_noise is cheapest_within_noise
    hits = [np.array([1, 0, 1, 1, 0, 1, 1, 1], float)]
    lo, hi = paired_bootstrap(hits, seed=0)
    assert lo <= hits[0].mean() <= hi
    assert cheapest_within_noise("a", {"a": 3.0, "b": 1.0, "c": 0.5}, {"a": 0.9, "b": 0.89, "c": 0.5},
                                 {"b": 0.01, "c": -0.2}) == "b"


def test_predict_reproduces_a_finetuned_runs_recorded_probabilities(shared_tree: Path, tmp_path: Path) -> None:
    from embedfit.prediction import predict
    from embedfit.training.finetune import TrainConfig, train

    run = tmp_path / "run"
    train(shared_tree, TrainConfig(freeze="head", lr_head=1e-2, epochs=1, batch_size=8, val_size=0.5,
                                   augment=("flip",), device="cpu"), output=run)
    with open(run / "predictions.csv", newline="") as f:
        recorded = list(csv.DictReader(f))
    assert read_run(run).evaluation.scheme == "validation-split"
    got = predict(run, [shared_tree / r["path"] for r in recorded])
    names = got.class_names
    want = np.array([[float(r[f"p_{c}"]) for c in names] for r in recorded])
    assert np.abs(got.proba - want).max() < 1e-4
    assert got.predicted == [r["predicted"] for r in recorded]
