"""Long work is never silent: plain progress lines when stderr is not a terminal (a log, CI, `2> file`)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from embedfit.cli import main
from embedfit.progress import Progress


def test_plain_lines_at_most_every_interval() -> None:
    stream = io.StringIO()
    with Progress("embedding", 10, unit="images", interval=0.0, stream=stream) as p:
        for _ in range(3):
            p.advance(2, "5.0 img/s")
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("embedding: 2/10 images in ") and lines[0].endswith(", 5.0 img/s")
    assert lines[-1].startswith("embedding: 6/10 images")
    quiet = io.StringIO()
    with Progress("embedding", 10, interval=3600, stream=quiet) as p:
        p.advance(10)
    assert quiet.getvalue() == ""  # within the interval: nothing, the command's summary follows
    off = io.StringIO()
    with Progress("embedding", 10, enabled=False, interval=0.0, stream=off) as p:
        p.advance(10)
    assert off.getvalue() == ""


def test_fit_and_extract_report_progress_when_piped(shared_store: Path, image_tree: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDFIT_PROGRESS_INTERVAL", "0")
    assert main(["fit", str(shared_store), "--cv", "3", "-o", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "fitting logreg: 1/3 folds" in err and "fitting logreg: 3/3 folds" in err
    assert main(["report", str(tmp_path / "run"), "-o", str(tmp_path / "report.html")]) == 0
    err = capsys.readouterr().err
    assert "report: 1/7 sections" in err and "embedding maps" in err
    assert main(["extract", str(image_tree), "-o", str(tmp_path / "f.h5"), "--workers", "0", "--batch-size", "4"]) == 0
    err = capsys.readouterr().err
    assert "embedding: 4/12 images" in err and "img/s" in err
