"""CLI happy paths for the extraction commands (errors on every command: tests/test_cli_errors.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from embedfit.cli import main
from embedfit.storage import FeatureStore

pytestmark = pytest.mark.fast


def test_extract_then_info(image_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (image_tree / "brick" / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    shutil.copy(image_tree / "brick" / "brick_000.jpg", image_tree / "loose.jpg")  # beside the class folders
    out = tmp_path / "out" / "feats.h5"
    assert main(["extract", str(image_tree), "-o", str(out), "--workers", "0", "--batch-size", "5"]) == 0
    text = capsys.readouterr().out
    assert "complete" in text and "12 embedded, 1 failed" in text and "broken.jpg" in text
    assert "1 skipped" in text and "skipped: loose.jpg: loose file in the root" in text
    assert FeatureStore.open(out).n_ok == 12

    assert main(["extract", str(image_tree), "-o", str(out), "--workers", "0"]) == 0
    assert "0 embedded, 0 failed, 13 already stored" in capsys.readouterr().out

    assert main(["info", str(out), "--failed"]) == 0
    text = capsys.readouterr().out
    assert "efficientnet_lite0 (1280-d, 224x224)" in text and "brick" in text and "broken.jpg" in text
    assert all(line == line.rstrip() for line in text.splitlines()), "piped output is padded with spaces"
    # The provenance a reader needs to reproduce the features, and counts per class and status.
    spec = FeatureStore.open(out).spec
    assert f"sha256 {spec.weights_sha256[:12]}" in text and "resize 256 bicubic, crop 224x224" in text
    summary = FeatureStore.open(out).summary()
    assert summary["class_status"]["brick"] == {"ok": 4, "failed": 1, "missing": 0}
    assert summary["classes"]["brick"] == 4 and summary["engine"] == "local"


def test_backbones_lists_every_backbone(capsys: pytest.CaptureFixture[str]) -> None:
    """No pattern: all of them, RegNets included (their builders cannot run on the meta device)."""
    assert main(["backbones"]) == 0
    text = capsys.readouterr().out
    assert "regnet_y_128gf" in text and "resnet50" in text and "efficientnet_lite0" in text


def test_backbones_lists_offline_availability(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backbones", "efficientnet_lite*"]) == 0
    text = capsys.readouterr().out
    assert "efficientnet_lite0" in text and "efficientnet_lite2" in text and "yes" in text
    assert main(["backbones", "resnet50"]) == 0
    assert "│ no " in capsys.readouterr().out  # not in the (empty, isolated) torch hub cache


def test_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["extract", str(tmp_path / "nope"), "-o", str(tmp_path / "x.h5")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err and "Traceback" not in err
    assert main(["extract", str(tmp_path), "-o", "x.h5", "--backbone", "resnet5"]) == 2
    assert "did you mean resnet50" in capsys.readouterr().err


def test_python_dash_m_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "embedfit", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "extract" in result.stdout
