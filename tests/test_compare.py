"""The comparison: every arm on identical seeded splits, intervals, a recommendation, the test folder, the as-is
arm on real folder names, the learning curve."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tree
from PIL import Image

from embedfit.cli import main
from embedfit.errors import UsageError
from embedfit.training.compare import _single_class, _tick_labels, compare, parse_arms, recommend
from embedfit.training.finetune import TrainConfig

pytestmark = pytest.mark.slow


def _val_paths(run_dir: Path) -> list[str]:
    with open(run_dir / "predictions.csv", newline="") as f:
        return sorted(row["path"] for row in csv.DictReader(f))


def _photos(root: Path, names: tuple[str, str] = ("cats", "espressos"), n: int = 4, offset: int = 0) -> Path:
    """Real photos of two ImageNet things (skimage's chelsea the cat, a coffee), n crops each."""
    from skimage import data

    for folder, image in zip(names, (data.chelsea(), data.coffee()), strict=True):
        (root / folder).mkdir(parents=True, exist_ok=True)
        h, w = image.shape[:2]
        for i in range(n):
            frac = 1.0 - 0.07 * (i + offset)  # different crops, mirrored every other one
            crop = image[: int(h * frac), w - int(w * frac):]
            crop = crop[:, ::-1] if i % 2 else crop
            Image.fromarray(np.ascontiguousarray(crop)).save(root / folder / f"{i + offset}.jpg")
    return root


@pytest.mark.slow
def test_compare_runs_every_arm_on_identical_splits(shared_tree: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", str(shared_tree), "-o", str(out), "--epochs", "1", "--sizes", "2,all,50", "--repeats",
                 "2", "--val-size", "0.5", "--device", "cpu"]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert list(result["arms"]) == ["as-is", "linear probe", "fine-tune", "scratch"]
    as_is = result["arms"]["as-is"]
    # textures are not ImageNet classes, and compare.md names them once
    assert as_is["applicable"] is False and "`imagenet_map`" in as_is["reason"]
    assert "brick" in result["unmapped"]
    for name in ("linear probe", "fine-tune", "scratch"):
        arm = result["arms"][name]
        assert len(arm["accuracy_runs"]) == 2 and arm["seconds"] > 0
        assert arm["accuracy"] == pytest.approx(np.mean(arm["accuracy_runs"]))
        assert arm["accuracy_std"] == pytest.approx(np.std(arm["accuracy_runs"]))
        lo, hi = arm["accuracy_ci"]
        assert 0 <= lo <= arm["accuracy"] <= hi <= 1
    assert result["arms"]["linear probe"]["accuracy"] > 0.8  # well above 1/3 chance on three textures
    assert result["seeds"] == [0, 1] and result["val_images"] == 12
    # paired differences from the best arm, with intervals
    comparisons = result["comparisons"]
    assert comparisons["vs"] not in comparisons["arms"] and len(comparisons["arms"]) == 2
    for c in comparisons["arms"].values():
        assert c["ci"][0] <= c["difference"] <= c["ci"][1]
    # learning curve: 2 per class, then the whole training split (4 per class after the 50% split); 50 is named
    assert [(p["per_class"], p["all"]) for p in result["learning_curve"]] == [(2, False), (4, True)]
    assert result["learning_curve"][-1]["probe_runs"] == result["arms"]["linear probe"]["accuracy_runs"]
    assert result["learning_curve_skipped"] == [{"per_class": 50,
                                                 "reason": "the training split has 4 images per class"}]
    # fine-tune and scratch were scored on the same validation images; the kept fine-tune model is refit on all 24
    assert _val_paths(out / "fine-tune") == _val_paths(out / "scratch")
    assert len(_val_paths(out / "fine-tune")) == 12
    assert json.loads((out / "scratch" / "model.json").read_text())["model"] == "scratch"
    assert json.loads((out / "fine-tune" / "metrics.json").read_text())["refit"]["train_images"] == 24
    assert (out / "learning_curve.png").stat().st_size > 0
    printed = capsys.readouterr()
    assert "linear probe" in printed.out and "not applicable" in printed.out
    assert "50 per class skipped" in printed.out and "learning_curve.png" in printed.out
    md = (out / "compare.md").read_text()
    assert md.count("|") > 20 and md.rstrip().splitlines()[-1] == f"Recommendation: {result['recommendation']}"
    assert printed.out.rstrip().splitlines()[-1].startswith("Recommendation: ")


@pytest.mark.slow
def test_compare_with_a_test_folder_scores_every_arm_on_the_same_images(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Plural folder names ('cats', 'espressos') map onto ImageNet; every arm is scored on the test folder."""
    train_dir, test_dir = _photos(tmp_path / "photos"), _photos(tmp_path / "photos_test", n=3, offset=4)
    (test_dir / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    out = tmp_path / "out"
    assert main(["compare", str(train_dir), "--test", str(test_dir), "-o", str(out), "--epochs", "1",
                 "--sizes", "all", "--repeats", "1", "--val-size", "0.5", "--device", "cpu"]) == 0
    result = json.loads((out / "compare.json").read_text())
    as_is = result["arms"]["as-is"]
    assert as_is["applicable"] is True and as_is["accuracy"] == 1.0
    assert as_is["mapping"]["classes"]["espressos"]["names"] == ["espresso"]
    assert "tabby, tabby cat" in as_is["imagenet_classes"]["cats"]
    assert 0 <= as_is["top1_mapped"] <= 1 and "top1_mapped" in as_is["test"]
    assert result["test"]["images"] == 6 and result["test"]["excluded"][0]["path"].endswith("broken.jpg")
    for name, arm in result["arms"].items():
        assert arm["test"]["images"] == 6, name
        lo, hi = arm["test"]["accuracy_ci"]
        assert lo <= arm["test"]["accuracy"] <= hi, name
    assert result["scored_on"] == "test" and result["comparisons"]["on"] == "test"
    with open(out / "test_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and set(rows[0]) == {"path", "label", "as-is", "linear probe", "fine-tune", "scratch"}
    # the trained arms' kept models were refit on all 8 training images and scored on the test images
    for arm in ("fine-tune", "scratch"):
        assert json.loads((out / arm / "metrics.json").read_text())["refit"]["train_images"] == 8
        assert len(_val_paths(out / arm)) == 6
    # the run's evaluation is the test folder, and `predict` reproduces what the comparison recorded
    from embedfit.prediction import predict
    from embedfit.report import build_report, summarize_runs
    from embedfit.runs import read_run

    run = read_run(out / "fine-tune")
    assert (run.evaluation.scheme, run.evaluation.image_root, run.evaluation.n_train) == \
        ("held-out", str(test_dir), 8)
    got = predict(out / "fine-tune", [test_dir / p["path"] for p in run.predictions])
    want = np.array([[float(p[f"p_{c}"]) for c in got.class_names] for p in run.predictions])
    assert np.abs(got.proba - want).max() < 1e-4
    assert got.predicted == [p["predicted"] for p in run.predictions] == [r["fine-tune"] for r in rows]
    # `report` takes the compare folder; thumbnails come from the test folder, the runs share one evaluation
    html = build_report([out], tmp_path / "report.html").read_text()
    assert "(image unavailable)" not in html and "Recommendation: " in html
    summary = summarize_runs([out / "fine-tune", out / "scratch"])
    assert {r["group"] for r in summary} == {0} and summary[0]["training_images"] == "8"
    assert "held-out images" in summary[0]["evaluation"]
    printed = capsys.readouterr().out
    md = (out / "compare.md").read_text()
    for text in (printed, md):
        assert "broken.jpg" in text and "'espresso'" in text and "Recommendation: " in text


def test_as_is_arm_names_unmapped_classes_and_takes_an_explicit_map(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    tree = write_tree(tmp_path / "tex", per_class=3)
    (tree / "brick" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    out = tmp_path / "out"
    assert main(["compare", str(tree), "-o", str(out), "--arms", "as-is", "--sizes", "all", "--repeats", "1",
                 "--val-size", "0.5", "--device", "cpu"]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert list(result["arms"]) == ["as-is"]
    assert "`imagenet_map`" in result["arms"]["as-is"]["reason"]  # the names are listed once, outside the table
    assert result["unmapped"] == ["brick", "grass", "gravel"]
    assert result["excluded"] == [{"path": "brick/broken.jpg", "reason": result["excluded"][0]["reason"]}]
    printed = capsys.readouterr().out
    assert "brick/broken.jpg" in printed and "not applicable" in printed
    assert "learning_curve.png" not in printed and not (out / "learning_curve.png").exists()  # no curve: none
    mapping = tmp_path / "map.csv"
    mapping.write_text("class,imagenet_class\nbrick,stone wall\ngrass,lawn mower\ngravel,n09421951\n")
    out = tmp_path / "mapped"  # another question: another folder (the first one would be refused)
    assert main(["compare", str(tree), "-o", str(out), "--arms", "as-is,probe", "--imagenet-map", str(mapping),
                 "--sizes", "all", "--repeats", "1", "--val-size", "0.5", "--device", "cpu"]) == 0
    result = json.loads((out / "compare.json").read_text())
    as_is = result["arms"]["as-is"]
    assert as_is["applicable"] and as_is["mapping"]["source"] == str(mapping)
    assert as_is["imagenet_classes"]["brick"] == ["stone wall"]
    assert list(result["arms"]) == ["as-is", "linear probe"]
    assert "stone wall" in capsys.readouterr().out


def test_learning_curve_sizes_train_for_comparable_steps(shared_tree: Path, tmp_path: Path) -> None:
    """The whole split (12 images, batch 2) gets 6 steps in 1 epoch; 1 image per class (3 images) gets 2 steps
    per epoch, so 3 epochs, not 1."""
    result = compare(shared_tree, tmp_path / "out", arms="finetune", epochs=1, sizes=(1,), repeats=1,
                     val_size=0.5, device="cpu", finetune=TrainConfig(batch_size=2, augment=()))
    assert [(p["per_class"], p["epochs"]) for p in result["learning_curve"]] == [(1, 3)]
    assert list(result["arms"]) == ["fine-tune"] and result["recommendation"].startswith("fine-tune")


@pytest.mark.slow
def test_freeze_and_augment_policies_run_as_arms(shared_tree: Path, tmp_path: Path) -> None:
    result = compare(shared_tree, tmp_path / "out", arms=["finetune"], epochs=1, sizes=(), repeats=1,
                     val_size=0.5, device="cpu", freeze=["head", "none"], augment=[True, False])
    names = ["fine-tune (head, augment)", "fine-tune (head, no augment)", "fine-tune (none, augment)",
             "fine-tune (none, no augment)"]
    assert list(result["arms"]) == names
    assert result["arms"][names[1]]["augment"] == [] and result["arms"][names[2]]["freeze"] == "none"
    assert (tmp_path / "out" / "fine-tune-head-no-augment" / "model.pt").is_file()


def test_recommendation_is_drawn_from_the_numbers() -> None:
    """The issue's numbers: the probe within noise of fine-tuning at 1/6 of its time."""
    scores = {"linear probe": {"accuracy": 0.962, "seconds": 20.0}, "fine-tune": {"accuracy": 0.965, "seconds": 120},
              "scratch": {"accuracy": 0.612, "seconds": 300.0}}
    comparisons = {"best": "fine-tune", "linear probe": {"difference": -0.003, "ci": [-0.03, 0.02]},
                   "scratch": {"difference": -0.35, "ci": [-0.45, -0.25]}}
    line = recommend(scores, comparisons, "validation")
    assert line.startswith("linear probe: within noise of fine-tune") and "1/6 of its time" in line
    comparisons["linear probe"]["ci"] = [-0.02, -0.001]
    assert recommend(scores, comparisons, "test").startswith("fine-tune: the most accurate on test images")
    scores["as-is"] = {"accuracy": 0.974, "seconds": 1.0}
    comparisons = {"best": "as-is", "linear probe": {"difference": -0.012, "ci": [-0.04, 0.01]},
                   "fine-tune": {"difference": -0.009, "ci": [-0.03, 0.02]},
                   "scratch": {"difference": -0.36, "ci": [-0.45, -0.25]}}
    assert "with no training" in recommend(scores, comparisons, "validation")


def test_single_class_predictions_are_named() -> None:
    names = ["ants", "bees"]
    assert _single_class(np.array([1, 1, 1]), np.array([0, 1, 1]), names) == "bees"
    assert _single_class(np.array([1, 0, 1]), np.array([0, 1, 1]), names) is None


def test_tick_labels_do_not_collide() -> None:
    sizes = [5.0, 10.0, 25.0, 45.0, 50.0]
    shown = _tick_labels(sizes, ["5", "10", "25", "45", "50\n(all)"], width_in=4.5)
    assert shown == ["5", "10", "25", "", "50\n(all)"]  # 45 sits on top of 50


def test_compare_rejects_bad_settings(shared_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UsageError, match="repeats"):
        compare(shared_tree, tmp_path / "x", repeats=0)
    with pytest.raises(UsageError, match="`arms`"):
        parse_arms("probe,magic")
    assert parse_arms("scratch,probe") == ["linear probe", "scratch"]
    assert main(["compare", str(shared_tree), "-o", str(tmp_path / "y"), "--sizes", "5,many"]) == 2
    assert "--sizes" in capsys.readouterr().err
    assert main(["compare", str(shared_tree), "-o", str(tmp_path / "y"), "--augment", "maybe"]) == 2
    assert "--augment" in capsys.readouterr().err
    assert main(["compare", str(shared_tree), "-o", str(tmp_path / "y"), "--arms", "all"]) == 2
    assert "--arms takes" in capsys.readouterr().err


def test_each_backbone_adds_a_probe_arm_on_the_same_splits(tmp_path: Path) -> None:
    """`compare -b A -b B`: one linear-probe column per backbone, scored on the same validation images."""
    tree = write_tree(tmp_path / "tex", per_class=4)
    out = tmp_path / "out"
    assert main(["compare", str(tree), "-o", str(out), "-b", "efficientnet_lite0", "-b", "efficientnet_lite1",
                 "--arms", "probe", "--sizes", "all", "--repeats", "2", "--val-size", "0.5",
                 "--device", "cpu"]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert list(result["arms"]) == ["linear probe", "linear probe (efficientnet_lite1)"]
    for arm in result["arms"].values():
        assert arm["applicable"] and len(arm["accuracy_runs"]) == 2 and len(arm["accuracy_ci"]) == 2
    assert "linear probe (efficientnet_lite1)" in (out / "compare.md").read_text()


def test_compare_reuses_a_store_and_scores_the_classes_that_map(tmp_path: Path) -> None:
    """Frozen embeddings come from the store that holds the very files; 'widgets' names no ImageNet class, so
    as-is scores the cats only and says so; the estimate is recorded."""
    from embedfit.extraction import extract

    tree = _photos(tmp_path / "photos", names=("cats", "widgets"), n=4)
    store = tmp_path / "photos.h5"
    extract(tree, store, device="cpu", workers=0)
    lines: list[str] = []
    result = compare(tree, tmp_path / "cmp", arms="as-is,probe", sizes=[None], repeats=1, val_size=0.5,
                     device="cpu", stores=[store], on_progress=lambda e: lines.append(e.line()))
    assert result["stores"]["images_reused"] == 8
    as_is = result["arms"]["as-is"]
    assert as_is["coverage"]["classes"] == 1 and as_is["coverage"]["class_names"] == ["cats"]
    assert result["unmapped"] == ["widgets"]
    assert "as-is" not in result["comparisons"].get("arms", {})  # not paired with arms that answer every class
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "as-is (1 of 2 classes)" in md and md.count("widgets") == 1  # listed once, outside the table
    estimate = next(i for i, line in enumerate(lines) if line.startswith("estimate: about"))
    assert estimate < lines.index("split 1/1: linear probe")  # printed before the long part
    assert result["estimate"]["total_seconds"] >= 0 and result["skipped"] == []


def test_max_minutes_skips_the_arms_over_budget(tmp_path: Path) -> None:
    tree = _photos(tmp_path / "photos", n=4)
    lines: list[str] = []
    result = compare(tree, tmp_path / "cmp", arms="probe,finetune", epochs=1, sizes=[None], repeats=1,
                     val_size=0.5, device="cpu", max_minutes=0.001, on_progress=lambda e: lines.append(e.line()))
    skipped = [s["arm"] for s in result["skipped"]]
    assert "fine-tune" in skipped and "fine-tune" not in result["arms"]
    # the estimate splits as the results do: the one embedding pass apart from each arm's fitting
    estimate = result["estimate"]
    assert estimate["fitting_seconds"]["fine-tune"] > 0 and estimate["fitting_seconds"]["linear probe"] == 0
    assert estimate["seconds"]["linear probe"] == estimate["embedding_seconds"]["efficientnet_lite0"]
    assert estimate["seconds"]["fine-tune"] == estimate["fitting_seconds"]["fine-tune"]
    # a pass the budget stopped is not recorded as an arm's embedding
    assert ("linear probe" in skipped) == ("efficientnet_lite0" not in result["embedding_seconds"])
    # the embedding pass reports through the sink inside its backbone, so time left and the heartbeat work there
    assert any(line.startswith("efficientnet_lite0: embedding: ") and "/8 images" in line for line in lines)
    assert not (tmp_path / "cmp" / "fine-tune").exists()
    assert any("--arms as-is,probe" in line for line in lines)  # on a CPU: the fast answer first
    assert "Skipped (over the 0.001-minute budget)" in (tmp_path / "cmp" / "compare.md").read_text()
