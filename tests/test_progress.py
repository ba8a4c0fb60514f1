"""Long work is never silent: one sink, plain lines with time left when stderr is not a terminal (a log, CI,
`2> file`), a heartbeat inside one long step, and events that real runs send from inside epochs and embedding."""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import pytest

from embedfit.cli import main
from embedfit.progress import Progress, ProgressEvent, StderrSink, note, within

pytestmark = pytest.mark.fast


def test_plain_lines_say_time_left_and_notes_always_show() -> None:
    stream = io.StringIO()
    with StderrSink(interval=0.0, stream=stream, live=False) as sink, \
            Progress("embedding", 10, unit="images", on_progress=sink) as p:
        for _ in range(3):
            time.sleep(0.01)
            p.advance(2, "5.0 img/s")
    lines = stream.getvalue().splitlines()
    step = next(line for line in lines if line.startswith("embedding: 2/10 images in "))
    assert ", 5.0 img/s, about " in step and step.endswith(" s left")
    assert lines[-1].startswith("embedding: 6/10 images")
    quiet = io.StringIO()
    with StderrSink(interval=3600, stream=quiet, live=False) as sink:
        with Progress("embedding", 10, on_progress=within(sink, "split 1/3")) as p:
            p.advance(10)
        note(sink, "split 2/3: linear probe")
    # within the interval: no count, but every milestone
    assert quiet.getvalue() == "split 2/3: linear probe\n"
    assert ProgressEvent("fitting", 4, 8, "folds", 20.0).seconds_left == pytest.approx(20.0)
    assert ProgressEvent("fitting", 0, 8, "folds", 20.0).seconds_left is None  # nothing done: no rate yet
    assert ProgressEvent("t-SNE", 3, None, "", 20.0).seconds_left is None  # no total: no time left


def test_heartbeat_repeats_the_latest_count_inside_one_long_step() -> None:
    stream = io.StringIO()
    with StderrSink(interval=0.05, stream=stream, live=False) as sink:
        p = Progress("fitting svm", 4, unit="folds", on_progress=sink)
        p.advance()
        time.sleep(0.4)  # one long fold: nothing new arrives, the sink still speaks
        p.close()
        printed = stream.getvalue()
        time.sleep(0.2)  # after the end: no more heartbeats
    lines = printed.splitlines()
    assert len(lines) >= 3 and all(line.startswith("fitting svm: 1/4 folds in ") for line in lines)
    assert all(line.endswith(" left") for line in lines)
    assert stream.getvalue() == printed


def test_training_sends_heartbeats_inside_each_epoch(shared_tree: Path, tmp_path: Path) -> None:
    from embedfit.training.finetune import TrainConfig, train

    events: list[ProgressEvent] = []
    train(shared_tree, TrainConfig(freeze="head", epochs=2, batch_size=2, val_size=0.5, augment=(), device="cpu"),
          on_progress=events.append)
    inside = [e for e in events if e.what == "epoch 1/2" and e.kind == "step" and 0 < e.done < (e.total or 0)]
    assert len(inside) >= 3 and inside[0].unit == "batches" and inside[0].seconds_left is not None
    assert inside[0].status.startswith("loss ")
    ended = next(i for i, e in enumerate(events) if e.kind == "note" and e.what.startswith("epoch 1/2 done in "))
    assert events.index(inside[-1]) < ended  # during the epoch, not after it
    assert any(e.what == "epoch 1/2: validating: embedding" and e.unit == "images" and e.done for e in events)


def test_finetune_and_compare_show_time_left_when_piped(shared_tree: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDFIT_PROGRESS_INTERVAL", "0")
    assert main(["finetune", str(shared_tree), "-o", str(tmp_path / "ft"), "--epochs", "1", "--batch-size", "4",
                 "--freeze", "head", "--augment", "none", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert f"decoding {shared_tree}" in err
    assert any(line.startswith("epoch 1/1: 1/") and "batches in " in line and line.endswith(" left")
               for line in err.splitlines())
    out = tmp_path / "cmp"
    assert main(["compare", str(shared_tree), "-o", str(out), "--arms", "probe,finetune", "--epochs", "1",
                 "--sizes", "all", "--repeats", "1", "--val-size", "0.5", "--freeze", "head", "--augment", "off",
                 "--device", "cpu"]) == 0
    err = capsys.readouterr()
    lines = err.err.splitlines()
    bb = "efficientnet_lite0"
    assert any(line.startswith(f"{bb}: embedding: ") and "/24 images" in line and line.endswith(" left")
               for line in lines)
    assert any(line.startswith("split 1/1: fine-tune: epoch 1/1: 1/1 batches in ") for line in lines)
    assert "split 1/1: linear probe" in lines
    # timings: the embedding pass apart from each arm's fitting
    result = json.loads((out / "compare.json").read_text())
    embedded = result["embedding_seconds"][bb]
    probe = result["arms"]["linear probe"]
    assert embedded > 0 and probe["embedding_seconds"] == embedded and probe["seconds"] > 0
    assert result["arms"]["fine-tune"]["embedding_seconds"] is None  # it embeds inside its training
    md = (out / "compare.md").read_text()
    assert "fitting per split (s)" in md and f"{bb} {embedded:.1f} s" in md
    assert "Embedding the 24 images once" in err.out


def test_fit_and_extract_report_progress_when_piped(shared_store: Path, image_tree: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDFIT_PROGRESS_INTERVAL", "0")
    assert main(["fit", str(shared_store), "--cv", "3", "-o", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "fitting logreg: 1/3 folds" in err and "fitting logreg: 3/3 folds" in err and " left" in err
    assert main(["report", str(tmp_path / "run"), "-o", str(tmp_path / "report.html")]) == 0
    err = capsys.readouterr().err
    assert re.search(r"report: 1/\d+ sections", err) and "embedding maps" in err
    assert main(["extract", str(image_tree), "-o", str(tmp_path / "f.h5"), "--workers", "0", "--batch-size", "4"]) == 0
    err = capsys.readouterr().err
    assert "embedding: 4/12 images" in err and "img/s, about " in err
