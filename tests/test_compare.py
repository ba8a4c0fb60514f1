"""The comparison: every arm on identical seeded splits, spreads over splits, the learning curve, as-is mapping."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedfit.cli import main
from embedfit.errors import UsageError
from embedfit.training.classify import imagenet_mapping
from embedfit.training.compare import compare


def _val_paths(run_dir: Path) -> list[str]:
    with open(run_dir / "predictions.csv", newline="") as f:
        return sorted(row["path"] for row in csv.DictReader(f))


def test_compare_runs_every_arm_on_identical_splits(shared_tree: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", str(shared_tree), "-o", str(out), "--epochs", "1", "--sizes", "2,all", "--repeats", "2",
                 "--val-size", "0.5", "--device", "cpu"]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert list(result["arms"]) == ["as-is", "linear probe", "fine-tune", "scratch"]
    as_is = result["arms"]["as-is"]
    assert as_is["applicable"] is False and "ImageNet" in as_is["reason"]  # textures are not ImageNet classes
    for name in ("linear probe", "fine-tune", "scratch"):
        arm = result["arms"][name]
        assert len(arm["accuracy_runs"]) == 2 and arm["seconds"] > 0
        assert arm["accuracy"] == pytest.approx(np.mean(arm["accuracy_runs"]))
        assert arm["accuracy_std"] == pytest.approx(np.std(arm["accuracy_runs"]))
    assert result["arms"]["linear probe"]["accuracy"] > 0.8  # well above 1/3 chance on three textures
    assert result["seeds"] == [0, 1] and result["val_images"] == 12
    # learning curve: 2 per class, then the whole training split (4 per class after the 50% split)
    assert [(p["per_class"], p["all"]) for p in result["learning_curve"]] == [(2, False), (4, True)]
    assert result["learning_curve"][-1]["probe_runs"] == result["arms"]["linear probe"]["accuracy_runs"]
    # fine-tune and scratch were scored on the same validation images
    assert _val_paths(out / "fine-tune") == _val_paths(out / "scratch")
    assert len(_val_paths(out / "fine-tune")) == 12
    assert json.loads((out / "scratch" / "model.json").read_text())["model"] == "scratch"
    assert (out / "learning_curve.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "linear probe" in printed and "not applicable" in printed
    assert (out / "compare.md").read_text().count("|") > 20


def test_as_is_arm_scores_classes_that_map_to_imagenet(tmp_path: Path) -> None:
    from skimage import data

    for folder, image in (("cat", data.chelsea()), ("espresso", data.coffee())):
        (tmp_path / "photos" / folder).mkdir(parents=True)
        h, w = image.shape[:2]
        for i, frac in enumerate((1.0, 0.9, 0.8, 0.7)):  # different crops, mirrored every other one
            crop = image[: int(h * frac), w - int(w * frac):]
            crop = crop[:, ::-1] if i % 2 else crop
            Image.fromarray(np.ascontiguousarray(crop)).save(tmp_path / "photos" / folder / f"{i}.jpg")
    result = compare(tmp_path / "photos", tmp_path / "out", epochs=1, sizes=(), repeats=1, val_size=0.5,
                     device="cpu")
    as_is = result["arms"]["as-is"]
    assert as_is["applicable"] is True and as_is["accuracy"] == 1.0
    assert "Egyptian cat" in as_is["imagenet_classes"]["cat"] and as_is["imagenet_classes"]["espresso"] == ["espresso"]
    assert result["learning_curve"] == []


def test_imagenet_mapping_uses_whole_names(lite0) -> None:
    names = lite0.class_names
    mapping = imagenet_mapping(["cat", "espresso"], names)
    cats = [names[i] for i in mapping[0]]
    assert "tabby, tabby cat" in cats and not any("catamaran" in c for c in cats)
    assert [names[i] for i in mapping[1]] == ["espresso"]  # not "espresso maker"
    assert imagenet_mapping(["brick", "grass"], names) is None  # no ImageNet class named brick
    assert imagenet_mapping(["cat", "tabby"], names) is None  # two classes claim the tabby


def test_compare_rejects_bad_settings(shared_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UsageError, match="repeats"):
        compare(shared_tree, tmp_path / "x", repeats=0)
    assert main(["compare", str(shared_tree), "-o", str(tmp_path / "y"), "--sizes", "5,many"]) == 2
    assert "--sizes" in capsys.readouterr().err
