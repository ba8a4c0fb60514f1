"""`embedfit audit` on real images: planted copies, flipped labels, cross-class duplicates and leaks are found, and
what it finds feeds back into `fit` (grouped folds, exclusions, the duplicate warning)."""

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

pytestmark = pytest.mark.slow  # ~2.5 min on the shared 2-core machine: two extractions per module, audits


def _reencoded(src: Path, dst: Path, scale: float, quality: int) -> None:
    with Image.open(src) as im:
        im = im.convert("RGB")
        im = im.resize((int(im.width * scale), int(im.height * scale)), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
    dst.write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 3-class texture tree with planted problems, its store, and a test store that leaks one training image."""
    from embedfit.extraction.local import extract

    base = tmp_path_factory.mktemp("audit")
    root = write_tree(base / "train", per_class=8, seed=3)
    # a re-encoded copy in its own class (resized copies: test_resized_photos_found)
    _reencoded(root / "brick" / "brick_000.jpg", root / "brick" / "copy_q85.jpg", 1.0, 85)
    # an exact copy filed under another class: a duplicate and a conflict
    shutil.copy(root / "gravel" / "gravel_003.png", root / "brick" / "gravel_copy.png")
    # flipped labels: real images of one class filed under another
    flipped = {"grass/brick_004.jpg": "brick", "gravel/grass_006.jpg": "grass", "brick/gravel_002.jpg": "gravel"}
    for key, cls in flipped.items():
        folder, name = key.split("/")
        shutil.move(root / cls / name, root / folder / name)
    test = write_tree(base / "test", per_class=3, seed=9)
    shutil.copy(root / "grass" / "grass_001.png", test / "grass" / "leaked.png")
    train_store, test_store = base / "train.h5", base / "test.h5"
    extract(root, train_store, workers=0)
    extract(test, test_store, workers=0)
    return {"root": root, "store": train_store, "test": test_store, "flipped": flipped, "base": base}


@pytest.fixture(scope="module")
def audited(planted: dict) -> tuple:
    from embedfit import audit

    out = planted["base"] / "audit"
    return audit(planted["store"], out, test_store=planted["test"]), out


def _pairs(result, kind: str) -> set[frozenset]:
    return {frozenset((f["path"], f["other"])) for f in result.of_kind(kind)}


def test_copies_found_as_duplicates(audited: tuple) -> None:
    result, _ = audited
    # the calibrated threshold pairs the copy and no two distinct crops of this tree
    assert _pairs(result, "near_duplicate") == {frozenset(("brick/brick_000.jpg", "brick/copy_q85.jpg"))}
    assert _pairs(result, "exact_duplicate") == {frozenset(("brick/gravel_copy.png", "gravel/gravel_003.png"))}


def test_resized_photos_found(tmp_path: Path) -> None:
    """Real photos (skimage): copies resized to 75% and re-encoded, or cropped by 5% a side, pair with their
    originals at the default threshold; the distinct photos pair with nothing."""
    from skimage import data

    from embedfit import audit
    from embedfit.extraction.local import extract

    root = tmp_path / "photos" / "all"
    root.mkdir(parents=True)
    for name in ("astronaut", "coffee", "chelsea", "camera", "horse", "hubble_deep_field", "moon", "rocket"):
        image = np.asarray(getattr(data, name)())
        image = (image * 255).astype(np.uint8) if image.dtype == bool else image
        Image.fromarray(image).convert("RGB").save(root / f"{name}.png")
    _reencoded(root / "astronaut.png", root / "astronaut_small.jpg", 0.75, 85)
    _reencoded(root / "coffee.png", root / "coffee_small.jpg", 0.75, 85)
    with Image.open(root / "chelsea.png") as im:
        w, h = im.size
        im.crop((w // 20, h // 20, w - w // 20, h - h // 20)).save(root / "chelsea_crop.png")
    store = extract(tmp_path / "photos", tmp_path / "photos.h5", workers=0).store
    found = _pairs(audit(store, imagenet="off"), "near_duplicate")
    assert found == {frozenset((f"all/{a}.png", f"all/{b}")) for a, b in
                     [("astronaut", "astronaut_small.jpg"), ("coffee", "coffee_small.jpg"),
                      ("chelsea", "chelsea_crop.png")]}


def test_duplicate_across_classes_is_a_conflict(audited: tuple) -> None:
    result, _ = audited
    (conflict,) = result.of_kind("conflicting_labels")
    assert {conflict["path"], conflict["other"]} == {"brick/gravel_copy.png", "gravel/gravel_003.png"}
    assert {conflict["given"], conflict["suggested"]} == {"brick", "gravel"}


def test_flipped_labels_found_with_their_class(audited: tuple, planted: dict) -> None:
    result, _ = audited
    issues = {f["path"]: f["suggested"] for f in result.of_kind("label_issue")}
    for key, true_class in planted["flipped"].items():
        assert issues.get(key) == true_class, (key, issues)
    # ranked first, with the copy filed under the wrong class, ahead of anything else
    top = [f["path"] for f in result.of_kind("label_issue")[:4]]
    assert set(top) == {*planted["flipped"], "brick/gravel_copy.png"}


def test_leak_into_the_test_store(audited: tuple) -> None:
    result, _ = audited
    (leak,) = result.of_kind("train_test_leak")
    assert (leak["path"], leak["other"], leak["score"]) == ("grass/leaked.png", "grass/grass_001.png", 1.0)


def test_outputs(audited: tuple) -> None:
    result, out = audited
    with open(out / "audit.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:6] == ["kind", "path", "other", "score", "given", "suggested"]
    assert len(rows) == len(result.findings) and {r["kind"] for r in rows} >= {"near_duplicate", "label_issue"}
    meta = json.loads((out / "audit.json").read_text())
    assert meta["counts"] == result.counts and meta["settings"]["threshold"] == 0.95
    assert meta["settings"]["search"] == "exact" and meta["settings"]["exact_by"] == "content_hash"


def test_run_gives_the_out_of_fold_probabilities(planted: dict, tmp_path: Path) -> None:
    from embedfit import audit, fit

    run = fit(planted["store"], "logreg", output=tmp_path / "run", cv=3).run_dir
    result = audit(planted["store"], run=run)
    assert result.settings["label_issues"]["oof_source"] == str(run)
    assert len({f["path"] for f in result.of_kind("label_issue")} & set(planted["flipped"])) >= 2
    other = fit(planted["test"], "logreg", output=tmp_path / "other", cv=2).run_dir
    assert main(["audit", str(planted["store"]), "--run", str(other), "-o", str(tmp_path / "a")]) == 2


def test_group_duplicates_keeps_each_cluster_in_one_fold(planted: dict) -> None:
    from embedfit.auditing import duplicate_groups
    from embedfit.fitting.data import load_dataset
    from embedfit.fitting.evaluate import make_splits

    data = load_dataset(planted["store"])
    groups = duplicate_groups(data.store, data.rows)
    index = {p: i for i, p in enumerate(data.paths)}
    for a, b in [("brick/brick_000.jpg", "brick/copy_q85.jpg"), ("gravel/gravel_003.png", "brick/gravel_copy.png")]:
        assert groups[index[a]] == groups[index[b]]
    assert len(np.unique(groups)) == len(data.paths) - 2
    fold = np.full(len(data.y), -1)
    for f, (_, te) in enumerate(make_splits(data.y, cv=3, repeats=1, groups=groups, seed=0)):
        fold[te] = f
    for g in np.unique(groups):
        assert len(np.unique(fold[groups == g])) == 1


def test_fit_warns_then_groups_and_excludes(planted: dict, tmp_path: Path, audited: tuple,
                                            caplog: pytest.LogCaptureFixture) -> None:
    from embedfit import fit

    store = str(planted["store"])
    warned = []
    for seed in range(4):  # the exact copy lands in another fold than its original for some seed
        result = fit(store, "logreg", output=tmp_path / f"plain{seed}", cv=3, seed=seed)
        warned += [n for n in result.metrics.get("notes", []) if "exact duplicate" in n]
    assert warned and "embedfit audit" in warned[0]
    held_out = fit(store, "logreg", output=tmp_path / "held", test_store=planted["test"])
    assert any("grass/grass_001.png = grass/leaked.png" in n for n in held_out.metrics["notes"])
    grouped = fit(store, "logreg", output=tmp_path / "grouped", cv=3, group_duplicates=True)
    assert grouped.metrics["evaluation"]["groups"] is True
    assert not [n for n in grouped.metrics.get("notes", []) if "exact duplicate" in n]
    # mark the copies and the flipped images in audit.csv, hand it back
    _, out = audited
    with open(out / "audit.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        if r["kind"] in ("exact_duplicate", "label_issue"):
            r["action"] = "exclude"
    marked = tmp_path / "marked.csv"
    with open(marked, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    excluded = {r["path"] for r in rows if r["action"] == "exclude"}
    assert main(["fit", store, "-o", str(tmp_path / "clean"), "--cv", "3", "--exclude", str(marked)]) == 0
    with open(tmp_path / "clean" / "predictions.csv", newline="") as f:
        kept = {r["path"] for r in csv.DictReader(f)}
    assert kept and not kept & excluded
    assert main(["fit", store, "-o", str(tmp_path / "x"), "--test-size", "0.3", "--group-duplicates"]) == 2


def test_cli_audit_summary_and_bad_input(planted: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    assert main(["audit", str(planted["store"]), "-o", str(out), "--no-imagenet", "--threshold", "0.99"]) == 0
    text = capsys.readouterr().out
    assert "exact_duplicate" in text and "label_issue" in text and str(out) in text
    assert json.loads((out / "audit.json").read_text())["settings"]["threshold"] == 0.99
    assert main(["audit", str(tmp_path / "nope.h5"), "-o", str(tmp_path / "n")]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_content_hash_in_single_file_and_sharded_stores(planted: dict, tmp_path: Path) -> None:
    """The SHA-256 of each file, computed as it is read for embedding, is stored per row; shards carry it too."""
    import hashlib

    from embedfit import FeatureStore
    from embedfit.extraction.local import extract

    store = FeatureStore.open(planted["store"])
    hashes = dict(zip(store.paths, store.row_arrays["content_hash"], strict=True))
    expected = hashlib.sha256((planted["root"] / "gravel" / "gravel_003.png").read_bytes()).hexdigest()
    assert hashes["brick/gravel_copy.png"] == hashes["gravel/gravel_003.png"] == expected
    assert len(set(hashes.values())) == len(hashes) - 1  # only the exact copy shares one
    sharded = FeatureStore.open(extract(planted["root"], tmp_path / "sharded.h5", workers=0, shard_size=8).store)
    assert sharded.attrs.get("layout") == "sharded"
    assert dict(zip(sharded.paths, sharded.row_arrays["content_hash"], strict=True)) == hashes


@pytest.mark.parametrize("shard_size", [None, 8])
def test_exact_copies_of_an_old_store_through_embeddings(planted: dict, tmp_path: Path, shard_size: int | None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A store written before content hashes (the schema without its entry) still opens, verifies and resumes;
    audit finds its exact copies through identical embeddings, and says so."""
    from embedfit import FeatureStore, audit
    from embedfit.extraction.local import extract
    from embedfit.storage import CONTENT_HASH
    from embedfit.storage.schema import ROW_DATASETS

    path, root = tmp_path / "old.h5", tmp_path / "tree"
    shutil.copytree(planted["root"], root)
    with monkeypatch.context() as m:  # the schema as it was before the entry
        m.delitem(ROW_DATASETS, CONTENT_HASH)
        extract(root, path, workers=0, shard_size=shard_size)
    with FeatureStore.open(path) as store:
        store.verify()
        assert not any(store.row_arrays[CONTENT_HASH])
        result = audit(store, imagenet="off")
    assert result.settings["exact_by"] == "embedding"
    assert any("identical embeddings" in n for n in result.notes)
    assert _pairs(result, "exact_duplicate") == {frozenset(("brick/gravel_copy.png", "gravel/gravel_003.png"))}
    # a resume adds hashed rows to the old ones; the merged store is checked like any other
    shutil.copy(root / "grass" / "grass_001.png", root / "grass" / "new.png")
    extract(root, path, workers=0, shard_size=shard_size)
    with FeatureStore.open(path) as store:
        store.verify()
        hashes = dict(zip(store.paths, store.row_arrays[CONTENT_HASH], strict=True))
    assert hashes["grass/new.png"] and not hashes["grass/grass_001.png"]


def test_approximate_search_finds_planted_pairs() -> None:
    """The faiss index (forced on a small set) finds the same near-duplicates as brute force."""
    pytest.importorskip("faiss")
    from embedfit.auditing.search import knn, normalize

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 256))
    X = centres[rng.integers(0, 20, 3000)] + rng.normal(scale=0.8, size=(3000, 256))
    X[2900:] = X[:100] + rng.normal(scale=0.05, size=(100, 256))  # 100 planted near-duplicates
    base = normalize(X)
    s_exact, i_exact = knn(base, 5, exact=True)
    s_ann, i_ann = knn(base, 5, exact=False)
    assert (i_exact[2900:, 0] == np.arange(100)).all()
    assert (i_ann[2900:, 0] == np.arange(100)).mean() >= 0.95
    found = i_ann[2900:, 0] == np.arange(100)
    assert np.allclose(s_ann[2900:, 0][found], s_exact[2900:, 0][found], atol=1e-5)  # exact re-scoring


def test_report_page_and_fixes_csv(audited: tuple, planted: dict, tmp_path: Path) -> None:
    from embedfit.fitting.data import load_dataset

    _, out = audited
    page = tmp_path / "audit.html"
    assert main(["report", str(out), "-o", str(page)]) == 0
    text = page.read_text()
    # pairs side by side: the exact duplicate's card holds both thumbnails
    card = text[text.index('<h2 id="exact_duplicate">'):text.index('<h2 id="near_duplicate">')]
    assert card.count("data:image/jpeg;base64,") == 2 and "Download fixes.csv" in text
    assert "relabel:brick" in text  # a flipped image can be relabelled to its suggested class
    # the page's own CSV writer escapes formula cells as write_csv does (run in Chromium: test_report_browser.py)
    assert "function csvCell(v){\n  v=String(v); if(/^[=+\\-@\\t\\r']/.test(v)) v=\"'\"+v;" in text
    with open(out / "fixes.csv", newline="") as f:
        fixes = {r["path"]: r["action"] for r in csv.DictReader(f)}
    assert fixes["gravel/gravel_003.png"] == "exclude" and fixes["grass/brick_004.jpg"] == "keep"
    assert fixes["grass/grass_001.png"] == "exclude"  # the training copy of a leaked test image
    data = load_dataset(planted["store"], exclude=out / "fixes.csv")
    assert not {"gravel/gravel_003.png", "grass/grass_001.png"} & set(data.paths)
    assert len(data.paths) == len(load_dataset(planted["store"]).paths) - 2
