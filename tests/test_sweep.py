"""`embedfit sweep`: backbones x models on identical folds, a paired ranking, interrupt-safe progress, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embedfit.cli import main
from embedfit.progress import ProgressEvent
from embedfit.sweep import SweepConfig, paired_interval, read_sweep, sweep

pytestmark = pytest.mark.fast

# Two feature sets from one backbone (pre-logits and an inner stage): a sweep of two entries for one model load.
CONFIG = SweepConfig(backbones=("efficientnet_lite0",), layers=(None, "blocks.5"), models=("ridge",), cv=3,
                     workers=0)


def test_sweep_ranks_on_identical_folds_and_resumes(shared_tree: Path, tmp_path: Path) -> None:
    events: list[str] = []
    result = sweep(shared_tree, tmp_path / "sw", CONFIG, on_progress=lambda e: events.append(e.line()))
    assert [e["backbone"] for e in result.entries] and len(result.entries) == 2
    a, b = result.entries
    assert a["score"] >= b["score"] and a["rows"] == b["rows"] and len(a["folds"]) == len(b["folds"]) == 3
    assert {e["layer"] for e in result.entries} == {"pre_logits", "blocks.5"}
    assert all(e["extract_seconds"] > 0 and e["images_per_second"] > 0 and e["embedding_dim"] > 0
               for e in result.entries)
    (c,) = result.comparisons
    assert c["low"] <= c["difference"] <= c["high"] and "paired over 3 CV folds" in c["method"]
    assert result.verdict.startswith(f"best: {a['backbone']} + ridge")
    state = read_sweep(tmp_path / "sw")
    assert state["complete"] and state["done"] == 2
    assert "| efficientnet_lite0 | ridge |" in (tmp_path / "sw" / "leaderboard.md").read_text()
    # the cost, measured on a batch and printed before the long part
    first = events.index("[1/2] efficientnet_lite0: extracting")
    assert any(e.startswith("estimate: extraction about ") for e in events[:first])
    assert set(state["estimate"]["extract_seconds"]) == {"efficientnet_lite0", "efficientnet_lite0@blocks.5"}
    assert all(s > 0 for s in state["estimate"]["extract_seconds"].values())
    assert state["estimate"]["fit_seconds_per_backbone"] > 0 and state["skipped"] == []

    # A re-run reuses the stores and the finished fits.
    mtime = (Path(a["run"]) / "metrics.json").stat().st_mtime_ns
    events.clear()
    again = sweep(shared_tree, tmp_path / "sw", CONFIG, on_progress=lambda e: events.append(e.line()))
    assert "[1/2] efficientnet_lite0: ridge already fitted" in events
    assert not any("timing one batch" in e for e in events)  # the stores hold every image: nothing to measure
    assert (Path(a["run"]) / "metrics.json").stat().st_mtime_ns == mtime
    assert [e["score"] for e in again.entries] == [e["score"] for e in result.entries]


def test_an_interrupted_sweep_keeps_finished_backbones(shared_tree: Path, tmp_path: Path) -> None:
    def stop_at_second(event: ProgressEvent) -> None:
        if event.what.startswith("[2/2]"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep(shared_tree, tmp_path / "sw", CONFIG, on_progress=stop_at_second)
    state = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert state["done"] == 1 and not state["complete"]
    assert [e["backbone"] for e in state["entries"]] == ["efficientnet_lite0"]


def test_a_backbone_without_weights_fails_alone(shared_tree: Path, tmp_path: Path) -> None:
    result = sweep(shared_tree, tmp_path / "sw", CONFIG, backbones=("resnet18", "efficientnet_lite0"),
                   layers=(None,))
    assert [e["backbone"] for e in result.entries] == ["efficientnet_lite0"]
    assert result.failures[0]["backbone"] == "resnet18" and "torch hub cache" in result.failures[0]["error"]


def test_max_minutes_skips_the_backbones_over_budget(shared_tree: Path, tmp_path: Path) -> None:
    """A budget below any backbone's measured extraction skips each one, names it, and says so."""
    from embedfit.errors import UsageError

    with pytest.raises(UsageError, match=r"no backbone fits the 0\.001-minute budget"):
        sweep(shared_tree, tmp_path / "sw", CONFIG, max_minutes=0.001)
    state = read_sweep(tmp_path / "sw")
    assert [s["backbone"] for s in state["skipped"]] == ["efficientnet_lite0", "efficientnet_lite0@blocks.5"]
    assert all("`max_minutes`" in s["reason"] and s["estimated_seconds"] > 0 for s in state["skipped"])
    assert "- skipped: efficientnet_lite0: estimated" in (tmp_path / "sw" / "leaderboard.md").read_text()
    assert not list((tmp_path / "sw" / "stores").glob("*.h5"))  # nothing was extracted


def test_paired_intervals() -> None:
    base = {"backbone": "a", "model": "m", "rows": "r", "evaluation": "cv", "cv": 5}
    best = {**base, "score": 0.9, "folds": [0.90, 0.92, 0.88, 0.91, 0.89]}
    other = {**base, "backbone": "b", "score": 0.8, "folds": [0.80, 0.81, 0.79, 0.82, 0.78]}
    sure = paired_interval(best, other)
    assert sure["sure"] and 0 < sure["low"] < 0.1 < sure["high"]
    noisy = {**other, "score": 0.89, "folds": [0.95, 0.85, 0.93, 0.84, 0.88]}
    assert not paired_interval(best, noisy)["sure"]
    # A test set: bootstrap over its images.
    labels = ["x", "y"] * 50
    good = {**base, "evaluation": "test", "score": 1.0, "labels": labels, "predicted": labels}
    bad = {**good, "backbone": "b", "score": 0.5, "predicted": ["x"] * 100}
    boot = paired_interval(good, bad)
    assert boot["sure"] and "bootstrap over 100 test images" in boot["method"] and boot["low"] > 0.3
    assert paired_interval(good, {**bad, "rows": "other"})["low"] is None


def test_sweep_cli_and_report(shared_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "sw"
    code = main(["sweep", str(shared_tree), "-o", str(folder), "-b", "efficientnet_lite0", "-m", "ridge",
                 "--cv", "3"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "[1/1] efficientnet_lite0: fitting ridge" in captured.err and "best: efficientnet_lite0" in captured.out
    assert main(["report", str(folder), "-o", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert 'id="sweep-cost"' in page and "efficientnet_lite0" in page
    assert main(["sweep", str(shared_tree), "-o", str(folder), "-m", "nope"]) == 2
    assert "unknown model" in capsys.readouterr().err
