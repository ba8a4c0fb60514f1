"""What a user sees in the report: evaluation sets kept apart, costs, readable plots and thumbnails, one embedding
map per store, no false "store changed" warnings. Synthetic stores: no backbone, no images unless a test needs them."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from embedfit.backbones.spec import BackboneSpec
from embedfit.cli.presentation import print_leaderboard
from embedfit.fitting.evaluate import fit
from embedfit.images import ImageRecord
from embedfit.report import (
    ZOOM_SIZE,
    Run,
    bootstrap_intervals,
    build_report,
    confused_pairs,
    confusion_figure,
    map_sample,
    per_class_figure,
    spread_figure,
    summarize_runs,
    thumbnail,
)
from embedfit.storage import StoreSettings, StoreWriter

pytestmark = pytest.mark.slow

NAMES = ["a", "b", "c"]


def make_store(path: Path, X: np.ndarray, y: np.ndarray, *, name: str = "synthetic", root: Path | None = None,
               prefix: str = "img") -> Path:
    """A store file of given features, its image keys relative to `root` (default: the store's folder)."""
    spec = BackboneSpec(name=name, architecture=f"test/{name}", weights="random", weights_sha256="",
                        input_size=(8, 8), resize_size=8, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3,
                        embedding_dim=X.shape[1])
    root = root or path.parent
    keys = [f"{NAMES[c]}/{prefix}_{i:04d}.png" for i, c in enumerate(y)]
    records = [ImageRecord(root / k, k, int(c), 100, 1) for k, c in zip(keys, y, strict=True)]
    with StoreWriter(path, StoreSettings(spec)) as w:
        w.write_part(keys, [NAMES[c] for c in y], [100] * len(y), [1] * len(y), np.zeros(len(y), int),
                     [""] * len(y), X)
        w.commit(records, NAMES, complete=True, attrs={"root": str(root), "extract_seconds": 12.5})
    return path


def blobs(n: int = 30, d: int = 8, seed: int = 0, sep: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    return (rng.normal(size=(n, d)) + sep * np.eye(3, d)[y]).astype(np.float32), y


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def fake_finetune_run(like: Path, out: Path, data: Path) -> Path:
    """A fine-tuning run directory as finetune.save_trained writes it (without training a network)."""
    shutil.copytree(like, out)
    meta = json.loads((out / "model.json").read_text())
    meta.update(kind="torch", model="finetune", store=str(data), store_fingerprint="",
                params={"val_size": 0.2, "seed": 0, "pretrained": True})
    (out / "model.json").write_text(json.dumps(meta))
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.update(model="finetune", store=str(data), n_samples=24,
                   evaluation={"strategy": "holdout", "n_splits": 1, "repeats": 1, "groups": False, "search": False},
                   timing={"extract_seconds": 0.0, "train_seconds": 42.0, "predict_seconds_per_image": 0.01})
    (out / "metrics.json").write_text(json.dumps(metrics))
    rows = read_csv(out / "predictions.csv")[:6]
    for r in rows:
        r["row"], r["fold"] = "-1", "0"
    with open(out / "predictions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Runs on three evaluation sets: 3-fold CV (two classifiers, and a second backbone's store of the same images),
    a hold-out store, and fine-tuning's own validation split (do not modify: copy first)."""
    tmp_path = tmp_path_factory.mktemp("runs")
    images = tmp_path / "images"
    X, y = blobs()
    train = make_store(tmp_path / "train.h5", X, y, root=images)
    other = make_store(tmp_path / "other.h5", blobs(seed=5)[0], y, name="other", root=images)
    test = make_store(tmp_path / "test.h5", *blobs(15, seed=1), root=tmp_path / "test-images", prefix="t")
    out = {"ridge": fit(train, "ridge", cv=3, output=tmp_path / "ridge", jobs=1).run_dir,
           "lda": fit(train, "lda", cv=3, output=tmp_path / "lda", jobs=1).run_dir,
           "other": fit(other, "ridge", cv=3, output=tmp_path / "other-ridge", jobs=1).run_dir,
           "holdout": fit(train, "ridge", test_store=test, output=tmp_path / "holdout", jobs=1).run_dir}
    out["finetune"] = fake_finetune_run(out["ridge"], tmp_path / "finetune", images)
    return out


def _section(text: str, sid: str) -> str:
    return re.search(rf'<section id="{sid}">(.*?)</section>', text, re.S).group(1)


def test_runs_on_different_evaluation_sets_are_never_ranked_together(runs: dict[str, Path], tmp_path: Path) -> None:
    rows = summarize_runs(list(runs.values()))
    groups = {Path(r["run"]).name: r["group"] for r in rows}
    # the same images and folds: comparable, also across backbones (stores) of those images
    assert groups["ridge"] == groups["lda"] == groups["other-ridge"]
    assert len({groups["ridge"], groups["holdout"], groups["finetune"]}) == 3
    by_run = {Path(r["run"]).name: r for r in rows}
    assert by_run["holdout"]["evaluation"].startswith("hold-out store: 15 images of")
    assert str(runs["ridge"].parent / "test.h5") in by_run["holdout"]["evaluation"]
    assert by_run["ridge"]["evaluation"].startswith("3-fold CV (seed 0): 30 images of")
    assert by_run["finetune"]["evaluation"].startswith("fine-tuning's own 20% validation split (seed 0): 6 images")

    html = build_report(list(runs.values()), tmp_path / "r.html").read_text()
    board = _section(html, "leaderboard")
    assert board.count("<table>") == 3 and "scored on 3 different evaluation sets" in board
    assert "Evaluated on hold-out store: 15 images" in board

    console = Console(record=True, width=250)
    print_leaderboard(console, rows)
    text = console.export_text()
    assert "3 different evaluation sets" in text and text.count("evaluated on") == 3
    assert re.search(r"┃ run\s+┃ backbone", text) and "holdout" in text and "other-ridge" in text


def test_finetuning_shows_its_real_cost_and_training_images(runs: dict[str, Path], tmp_path: Path) -> None:
    rows = {Path(r["run"]).name: r for r in summarize_runs(list(runs.values()))}
    assert rows["finetune"]["extract_seconds"] is None and rows["finetune"]["train_seconds"] == 42.0
    assert rows["ridge"]["extract_seconds"] == 12.5
    assert rows["ridge"]["training_images"] == "20 per fold (final model 30)"
    assert rows["holdout"]["training_images"] == "30" and rows["finetune"]["training_images"] == "24"
    board = _section(build_report(list(runs.values()), tmp_path / "r.html").read_text(), "leaderboard")
    assert "training images" in board and "extract s" in board
    finetune_row = next(r for r in board.split("<tr>") if "<td>finetune</td>" in r).split("</tr>")[0]
    assert "<td>—</td><td>42.0</td><td>42.0</td>" in finetune_row and "<td>0.0</td>" not in finetune_row


def test_holdout_store_is_compared_with_its_own_fingerprint(runs: dict[str, Path], tmp_path: Path) -> None:
    """A --test-store run's map is drawn from the test store: it was compared with the training store's
    fingerprint and always said 'changed'."""
    html = build_report([runs["holdout"]], tmp_path / "r.html").read_text()
    assert "has changed since the fit" not in html and "Embeddings of 15 images" in html
    # once fit records the test store's fingerprint, a changed test store is reported
    run = shutil.copytree(runs["holdout"], tmp_path / "holdout")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["evaluation"]["test_store_fingerprint"] = "an older one"
    (run / "metrics.json").write_text(json.dumps(metrics))
    html = build_report([run], tmp_path / "r.html").read_text()
    assert "The store has changed since the fit: 15 of 15 predicted images" in html


def test_one_embedding_map_per_store(runs: dict[str, Path], tmp_path: Path) -> None:
    html = build_report([runs["ridge"], runs["lda"], runs["other"], runs["finetune"]], tmp_path / "r.html").read_text()
    section = _section(html, "embedding-map")
    assert section.count("<img") == 2  # train.h5 (ridge and lda) and other.h5
    base = runs["ridge"].parent
    assert str(base / "train.h5") in section and str(base / "other.h5") in section
    assert "finetune): fine-tuning reads the images themselves" in section


def test_mistake_thumbnails_are_scaled_up_and_counted_in_words(tmp_path: Path) -> None:
    images = tmp_path / "images"
    X, y = blobs(30, sep=0.3)  # overlapping classes: mistakes
    store = make_store(tmp_path / "s.h5", X, y, root=images)
    rng = np.random.default_rng(0)
    for i, c in enumerate(y):
        (images / NAMES[c]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (25, 25, 3), dtype=np.uint8)).save(images / NAMES[c] / f"img_{i:04d}.png")
    run = fit(store, "ridge", cv=3, output=tmp_path / "run", jobs=1).run_dir
    html = build_report([run], tmp_path / "r.html").read_text()
    thumbs = re.findall(r'alt="thumbnail" width="(\d+)" height="(\d+)"[^>]*? src="data:image/png;base64,([^"]+)"',
                        html)
    assert thumbs
    for w, h, data in thumbs:  # embedded at the size a click opens it to (CSS shows it smaller until then)
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        assert image.size == (int(w), int(h)) == (ZOOM_SIZE, ZOOM_SIZE)
        # nearest-neighbour: each source pixel became a block of equal pixels (no blur between them)
        assert len(np.unique(np.asarray(image).reshape(-1, 3), axis=0)) <= 25 * 25

    # exactly one mistake: singular
    rows = read_csv(run / "predictions.csv")
    for i, r in enumerate(rows):
        r["correct"] = str(i != 0)
        r["predicted"] = r["predicted"] if i else next(n for n in NAMES if n != r["label"])
    with open(run / "predictions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    html = build_report([run], tmp_path / "r.html").read_text()
    assert "1 misclassified image." in html and "1 misclassified images" not in html
    assert "1 run:" in html and "run(s)" not in html


def test_thumbnail_sizes() -> None:
    tiny, fmt = thumbnail(Image.new("RGB", (25, 10)))
    assert tiny.size == (96, 38) and fmt == "png"
    big, fmt = thumbnail(Image.new("RGB", (400, 300)))
    assert big.size == (96, 72) and fmt == "jpeg"


def _overlap(a: Any, b: Any) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("names", [["brick", "grass", "gravel"], [f"class_{i}_long_name" for i in range(10)]])
def test_confusion_labels_clear_of_ticks_and_the_other_panel(names: list[str]) -> None:
    """The right panel's "true" label overlapped the left panel's tick labels and image."""
    fig = confusion_figure(np.eye(len(names)) * 5 + 1, names)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ticks = [t.get_window_extent(renderer) for ax in fig.axes
             for t in ax.get_yticklabels() + ax.get_xticklabels() if t.get_text()]
    for ax in fig.axes:
        others = ticks + [a.get_window_extent(renderer) for a in fig.axes if a is not ax]
        for label in (ax.yaxis.label, ax.xaxis.label):
            box = label.get_window_extent(renderer)
            assert not any(_overlap(box, o) for o in others), label.get_text()


def test_per_class_bars_zoom_to_the_data_and_keep_the_legend_outside() -> None:
    per = {c: {"precision": p, "recall": r, "f1": (p + r) / 2, "support": 10}
           for c, p, r in (("a", 1.0, 0.95), ("b", 0.93, 1.0), ("c", 0.97, 0.97))}
    fig = per_class_figure(per)
    ax = fig.axes[0]
    assert 0.8 <= ax.get_ylim()[0] < 0.93 and ax.get_ylim()[1] > 1.0
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert ax.get_legend().get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1
    assert any(t.get_text() == "0.93" for t in ax.texts)  # values written on the bars
    low = per_class_figure({"a": {"precision": 0.2, "recall": 0.9, "f1": 0.3, "support": 3}})
    assert low.axes[0].get_ylim()[0] == 0.0


def test_fold_spread_legend_names_the_mean_marker() -> None:
    fig = spread_figure([[0.8, 0.9, 0.85], [0.7, 0.75, 0.9]], ["x\nridge", "x\nlda"])
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["mean", "median", "one fold"]



def test_map_sample_keeps_every_mistake_and_an_even_share_of_each_class() -> None:
    labels = ["big"] * 90_000 + ["small"] * 300 + ["mid"] * 9_700
    wrong = [i % 100 == 0 for i in range(len(labels))]
    keep = map_sample(wrong, labels, 5000)
    assert len(keep) == 5000 and keep == sorted(set(keep))
    assert {i for i, w in enumerate(wrong) if w} <= set(keep)  # 1000 mistakes, all drawn
    kept = [labels[i] for i in keep if not wrong[i]]
    assert kept.count("small") == 297 and abs(kept.count("big") - kept.count("mid")) <= 1  # small keeps all its own


def test_single_holdout_scores_get_a_bootstrap_interval_not_a_zero_spread() -> None:
    names = ["a", "b"]
    preds = [{"label": names[i % 2], "predicted": names[i % 2] if i % 10 else names[1 - i % 2]} for i in range(400)]
    run = Run(Path("r"), {}, {"class_names": names, "scores": {"accuracy": {"mean": 0.9, "std": 0.0, "folds": [0.9]}}},
              preds, None)  # type: ignore[arg-type]  # no evaluation record needed here
    ci = bootstrap_intervals(run)
    assert ci["accuracy"][0] < 0.9 < ci["accuracy"][1] and ci["accuracy"][1] - ci["accuracy"][0] < 0.1
    assert set(ci) == {"accuracy", "balanced_accuracy", "f1_macro"}
    run.metrics["scores"]["accuracy"]["folds"] = [0.9, 0.9]  # several folds: their spread, no interval
    assert bootstrap_intervals(run) == {}


def test_confused_pairs_are_the_largest_off_diagonal_counts() -> None:
    cm = np.array([[8, 2, 0], [5, 5, 0], [0, 1, 9]])
    assert confused_pairs(cm, ["lobster", "crayfish", "lotus"]) == [
        ("crayfish", "lobster", 5, 0.5), ("lobster", "crayfish", 2, 0.2), ("lotus", "crayfish", 1, 0.1)]
