"""The HTML report after the store has changed under a run, and with several runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from embedfit.extraction.local import extract
from embedfit.fitting.evaluate import fit
from embedfit.report import build_report, read_run, stored_rows
from embedfit.storage import FeatureStore

pytestmark = pytest.mark.fast


def test_map_follows_paths_after_the_store_changed(image_tree: Path, tmp_path: Path) -> None:
    """An image added that sorts first shifts every row number: the report must still map each prediction to
    its own image's embedding, and say the store changed."""
    store_path = tmp_path / "feats.h5"
    extract(image_tree, store_path, workers=0)
    before = FeatureStore.open(store_path)
    before_paths, before_features = list(before.paths), before.features()  # the file is replaced below
    fit(store_path, "ridge", cv=3, output=tmp_path / "run")
    shutil.copy(image_tree / "brick" / "brick_001.png", image_tree / "brick" / "aaa.png")
    extract(image_tree, store_path, workers=0)
    after = FeatureStore.open(store_path)
    assert list(after.paths[:2]) == ["brick/aaa.png", before_paths[0]]

    run = read_run(tmp_path / "run")
    kept, rows = stored_rows(run.predictions, after)
    assert len(kept) == len(run.predictions) == 12
    original = {key: i for i, key in enumerate(before_paths)}
    np.testing.assert_array_equal(after.features(rows), before_features[[original[p["path"]] for p in kept]])
    html = build_report([tmp_path / "run"], tmp_path / "report.html").read_text()
    assert "The store has changed since the fit: 12 of 12 predicted images" in html


def test_mistakes_are_shown_for_every_run(shared_store: Path, tmp_path: Path) -> None:
    fit(shared_store, "ridge", cv=3, output=tmp_path / "ridge")
    fit(shared_store, "knn", cv=3, output=tmp_path / "knn")
    html = build_report([tmp_path / "ridge", tmp_path / "knn"], tmp_path / "report.html").read_text()
    assert 'id="mistakes-ridge"' in html and 'id="mistakes-knn"' in html
    assert "Most confident mistakes (efficientnet_lite0 + knn (knn))" in html
