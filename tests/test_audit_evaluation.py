"""What an audit finds feeds `sweep` and `compare` (`--group-duplicates`, `--exclude`) on real images: each duplicate
cluster stays on one side of every split (one CV fold for every backbone of a sweep; training or validation for
every arm of a comparison), marked images are left out, and a sweep never reuses a run made without them."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tree
from PIL import Image

from embedfit.cli import main

pytestmark = pytest.mark.slow  # extractions, a sweep of two feature sets three times, a comparison with scratch

# the planted clusters: an exact copy and a re-encoded copy of one image, and an exact copy of another
CLUSTERS = [{"brick/brick_000.jpg", "brick/copy_exact.jpg", "brick/copy_q85.jpg"},
            {"grass/grass_001.png", "grass/copy_exact.png"}]
MARKED = {"gravel/gravel_002.jpg", "grass/grass_003.png"}


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 3-class texture tree with two duplicate clusters, and an exclusions file marking two other images."""
    base = tmp_path_factory.mktemp("dups")
    root = write_tree(base / "train", per_class=5, seed=3)
    shutil.copy(root / "brick" / "brick_000.jpg", root / "brick" / "copy_exact.jpg")
    with Image.open(root / "brick" / "brick_000.jpg") as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, "JPEG", quality=85)
    (root / "brick" / "copy_q85.jpg").write_bytes(buf.getvalue())
    shutil.copy(root / "grass" / "grass_001.png", root / "grass" / "copy_exact.png")
    marked = base / "fixes.csv"
    with open(marked, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "action"])
        w.writerows([[p, "exclude"] for p in sorted(MARKED)] + [["brick/brick_001.jpg", "keep"]])
    return {"root": root, "marked": marked, "base": base}


def _folds(run_dir: Path) -> dict[str, int]:
    with open(run_dir / "predictions.csv", newline="") as f:
        return {r["path"]: int(r["fold"]) for r in csv.DictReader(f)}


def _split_apart(folds: dict[str, int]) -> list[set[str]]:
    return [c for c in CLUSTERS if len({folds[p] for p in c}) > 1]


def test_sweep_groups_duplicates_on_the_same_folds_and_excludes(planted: dict, tmp_path: Path) -> None:
    from embedfit.sweep import SweepConfig, read_sweep, sweep

    config = SweepConfig(backbones=("efficientnet_lite0",), layers=(None, "blocks.5"), models=("ridge",), cv=5,
                         workers=0)
    out = tmp_path / "sw"
    plain = sweep(planted["root"], out, config)
    apart = [_split_apart(_folds(Path(e["run"]))) for e in plain.entries]
    assert apart[0] and all(a == apart[0] for a in apart)  # copies in two folds, the same for every backbone

    events: list[str] = []
    grouped = sweep(planted["root"], out, config, group_duplicates=True, on_progress=lambda e: events.append(e.line()))
    # a run fitted without the groups is never reused for a sweep with them
    assert not any("already fitted" in e for e in events) and "[1/2] efficientnet_lite0: fitting ridge" in events
    folds = [_folds(Path(e["run"])) for e in grouped.entries]
    assert folds[0] == folds[1]  # both feature sets scored on the same folds: still paired
    assert _split_apart(folds[0]) == [] and len(folds[0]) == 18
    assert grouped.comparisons[0]["method"].startswith("paired over 5 CV folds")
    state = read_sweep(out)
    assert state["settings"]["group_duplicates"] is True
    assert state["duplicates"] == {"from": "efficientnet_lite0", "clusters": 2, "images": 5}
    metrics = json.loads((Path(grouped.entries[0]["run"]) / "metrics.json").read_text())
    assert metrics["evaluation"]["groups"] is True

    events.clear()
    sweep(planted["root"], out, config, group_duplicates=True, on_progress=lambda e: events.append(e.line()))
    assert "[1/2] efficientnet_lite0: ridge already fitted" in events  # the same groups: reused

    # the CLI: marked images left out of every model, grouped folds, refit (the rows changed)
    assert main(["sweep", str(planted["root"]), "-o", str(out), "-b", "efficientnet_lite0", "-m", "ridge", "--cv",
                 "4", "--group-duplicates", "--exclude", str(planted["marked"])]) == 0
    state = read_sweep(out)
    (entry,) = state["entries"]
    kept = _folds(Path(entry["run"]))
    assert len(kept) == 16 and not MARKED & set(kept) and _split_apart(kept) == []
    assert state["settings"]["exclude"] == str(planted["marked"])
    with pytest.raises(Exception, match="does not combine with `test`"):
        sweep(planted["root"], tmp_path / "t", config, group_duplicates=True, test=planted["root"])


def test_compare_keeps_clusters_on_one_side_for_every_arm_and_excludes(planted: dict, tmp_path: Path) -> None:
    from embedfit.training.compare import CompareConfig, _duplicate_clusters, compare
    from embedfit.training.finetune import decode_labeled, split_indices

    out = tmp_path / "cmp"
    config = CompareConfig(arms="probe,scratch", epochs=1, sizes=(None,), repeats=2, val_size=0.5, device="cpu",
                           group_duplicates=True)
    result = compare(planted["root"], out, config)
    assert sorted(map(set, result["duplicates"]["members"]), key=len) == sorted(CLUSTERS, key=len)
    assert any("2 duplicate cluster(s) (5 images) kept on one side" in n for n in result["notes"])
    with open(out / "scratch" / "predictions.csv", newline="") as f:
        val = {r["path"] for r in csv.DictReader(f)}  # the first split's validation images, which every arm scored
    assert val and all(c <= val or not c & val for c in CLUSTERS)

    # every repeat: each cluster on one side with the groups; without them some split cuts a cluster
    data = decode_labeled(planted["root"], None, decode=False)
    from embedfit.backbones.factory import create_backbone
    from embedfit.extraction.encoder import Encoder
    from embedfit.extraction.settings import resolve_device
    from embedfit.training.compare import embed_labeled

    (X,), _, _ = embed_labeled([data], Encoder(create_backbone("efficientnet_lite0"), resolve_device("cpu")))
    groups, _ = _duplicate_clusters(data, X)
    cut = {True: 0, False: 0}
    for seed in range(10):
        for grouped in (True, False):
            _, v = split_indices(data.labels, 3, val_size=0.5, seed=seed, groups=groups if grouped else None)
            side = set(np.asarray(data.keys)[v])
            cut[grouped] += sum(not (c <= side or not c & side) for c in CLUSTERS)
    assert cut[True] == 0 and cut[False] > 0
    assert len(np.unique(groups)) == len(data.keys) - 3

    # --exclude: the marked images are in no arm; the same comparison without grouping is another comparison
    assert main(["compare", str(planted["root"]), "-o", str(tmp_path / "ex"), "--arms", "probe", "--sizes", "all",
                 "--repeats", "1", "--val-size", "0.5", "--device", "cpu", "--exclude", str(planted["marked"])]) == 0
    excluded = json.loads((tmp_path / "ex" / "compare.json").read_text())
    assert sorted(excluded["exclude"]["excluded"]) == sorted(MARKED) and excluded["images"] == 16
    assert excluded["duplicates"] is None
    assert any(f"2 image(s) left out as marked in {planted['marked']}" in n for n in excluded["notes"])
