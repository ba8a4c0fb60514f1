"""`predict` inputs: every image in a folder whatever its layout, CSV lists, and what it refuses."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from embedfit.cli import main
from embedfit.fitting.evaluate import fit
from embedfit.prediction import predict

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def run(shared_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit(shared_store, "ridge", cv=3, output=tmp_path_factory.mktemp("predict") / "run").run_dir


def test_a_folder_with_sub_folders_is_predicted_whole(run: Path, shared_tree: Path, tmp_path: Path) -> None:
    """Images in the folder itself and in sub-folders: all predicted (no file is skipped as "loose")."""
    new = tmp_path / "new"
    (new / "archive").mkdir(parents=True)
    jpgs = sorted(shared_tree.rglob("*.jpg"))
    for src in jpgs[:3]:
        shutil.copy(src, new / src.name)
    shutil.copy(jpgs[-1], new / "archive" / jpgs[-1].name)
    result = predict(run, [new])
    assert sorted(Path(p).name for p in result.paths) == sorted(p.name for p in [*jpgs[:3], jpgs[-1]])
    assert all(result.predicted)


def test_a_csv_list_is_predicted(run: Path, shared_tree: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    listed = sorted(shared_tree.rglob("*.png"))[:4]
    csv = tmp_path / "new.csv"
    csv.write_text("path\n" + "".join(f"{p}\n" for p in listed))
    assert main(["predict", str(run), str(csv), "-o", str(tmp_path / "p.csv")]) == 0
    assert "4 images predicted, 0 failed" in capsys.readouterr().out


def test_a_labelled_store_is_scored(run: Path, shared_store: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", str(run), str(shared_store), "-o", str(tmp_path / "p.csv")]) == 0
    out = capsys.readouterr()
    assert "accuracy" in out.out and "balanced accuracy" in out.out and "on 24 labelled images" in out.out
    assert "warning" not in out.err
    check = predict(run, [shared_store]).check()
    assert check is not None and check.n_scored == 24 and check.accuracy is not None and check.accuracy >= 0.8


def test_inputs_of_other_classes_get_a_one_line_warning(run: Path, shared_tree: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A class tree whose classes the model never saw (ants and bees for a texture model): a warning, no score."""
    other = tmp_path / "other"
    for name, cls in (("ants", "brick"), ("bees", "grass")):
        (other / name).mkdir(parents=True)
        for src in sorted((shared_tree / cls).glob("*.jpg"))[:2]:
            shutil.copy(src, other / name / src.name)
    assert main(["predict", str(run), str(other), "-o", str(tmp_path / "p.csv")]) == 0
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.startswith("warning")]
    assert len(lines) == 1 and "none of the inputs' 2 classes (ants, bees) is among the model's 3" in lines[0]
    assert "accuracy" not in out.out and "4 images predicted" in out.out


def test_check_labels_scores_shared_classes_and_names_the_mistakes() -> None:
    from embedfit.prediction import check_labels

    check = check_labels(["a", "a", "a", "b", "c", "x"], ["a", "b", "b", "b", "a", "a"], ["a", "b", "c"])
    assert (check.n_scored, check.accuracy) == (5, 0.4)
    assert check.balanced_accuracy == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert check.confused[0] == ("a", "b", 2) and check.unknown == {"x": 1}
    assert "a -> b (2)" in check.summary() and "1 images of 1 classes the model does not know" in check.summary()
    # a flat folder or a loose image beside the sub-folders: no labels, nothing claimed
    assert check_labels([], [], ["a"]).accuracy is None


def test_a_folder_of_sub_folders_with_loose_images_has_no_labels(run: Path, shared_tree: Path, tmp_path: Path) -> None:
    from embedfit.images import collect_images
    from embedfit.prediction import input_labels

    new = tmp_path / "new"
    (new / "2024").mkdir(parents=True)
    jpgs = sorted(shared_tree.rglob("*.jpg"))
    shutil.copy(jpgs[0], new / jpgs[0].name)
    shutil.copy(jpgs[1], new / "2024" / jpgs[1].name)
    assert input_labels([new], collect_images([new])) is None
    assert input_labels([shared_tree], collect_images([shared_tree])) == [
        Path(p).parent.name for p in map(str, (r.path for r in collect_images([shared_tree])))]


def test_mismatches_name_other_features_and_other_classes(tmp_path: Path) -> None:
    """What the notebook checks before it shows anything: the store and the run belong together."""
    from embedfit.prediction import mismatches
    from embedfit.storage import FeatureStore
    from tests.test_fit import blobs, synthetic_store

    X, y = blobs(60)
    train = synthetic_store(tmp_path / "train.h5", X, y, ["a", "b", "c"])
    run = fit(train.path, "ridge", cv=3, output=tmp_path / "run").run_dir
    assert mismatches(run, FeatureStore.open(train.path)) == []
    other = synthetic_store(tmp_path / "other.h5", X, y, ["ants", "bees", "wasps"], name="resnet18")
    problems = mismatches(run, other)
    assert len(problems) == 2 and "resnet18" in problems[0] and "(ants, bees, wasps)" in problems[1]
