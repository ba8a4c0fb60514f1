"""Extraction into the feature store: correctness, resume, refusal, schema, bad files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from embedfit.errors import ExtractionInterrupted, StoreError, StoreLockedError, StoreMismatchError
from embedfit.extraction.local import extract
from embedfit.extraction.settings import ExtractConfig
from embedfit.images import decode_image, scan_images
from embedfit.storage import FAILED, MISSING, OK, FeatureStore, StoreWriter

pytestmark = pytest.mark.fast


def _direct(backbone, paths: list[Path]) -> np.ndarray:
    """The reference: decode, preprocess, stack, one plain forward pass, no embedfit engine."""
    pre = backbone.spec.preprocess()
    x = torch.stack([pre(decode_image(p)) for p in paths])
    with torch.inference_mode():
        return backbone.eval()(x).numpy()


def test_embeddings_equal_a_direct_forward_pass(shared_store: Path, shared_tree: Path, lite0) -> None:
    store = FeatureStore.open(shared_store)
    paths = [shared_tree / p for p in store.paths]
    np.testing.assert_allclose(store.features(), _direct(lite0, paths), rtol=1e-5, atol=1e-5)


def test_batch_size_and_workers_do_not_change_features(shared_store: Path, shared_tree: Path,
                                                       tmp_path: Path) -> None:
    reference = FeatureStore.open(shared_store).features()
    one = extract(shared_tree, tmp_path / "b1.h5", batch_size=1, workers=0, jpeg_draft=False)
    many = extract(shared_tree, tmp_path / "b64.h5", batch_size=64, workers=2, channels_last=False)
    assert one.complete and many.complete
    np.testing.assert_allclose(FeatureStore.open(one.store).features(), reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(FeatureStore.open(many.store).features(), reference, rtol=1e-5, atol=1e-5)


def test_store_schema_is_plain_hdf5(shared_store: Path, shared_tree: Path) -> None:
    with h5py.File(shared_store, "r") as f:
        assert f["features"].shape == (24, 1280) and f["features"].dtype == np.float32
        assert f["features"].chunks is not None and f["features"].maxshape == (None, 1280)
        paths = f["paths"].asstr()[:]
        assert list(paths) == sorted(paths) and paths[0] == "brick/brick_000.jpg"
        assert list(f["class_names"].asstr()[:]) == ["brick", "grass", "gravel"]
        assert set(f["labels"][:]) == {0, 1, 2} and set(f["status"][:]) == {OK}
        for key in ("spec", "versions", "device", "precision", "created", "root", "complete", "dtype"):
            assert key in f.attrs
        assert f.attrs["complete"] and f.attrs["root"] == str(shared_tree)
    store = FeatureStore.open(shared_store)
    assert store.spec.name == "efficientnet_lite0" and store.complete
    assert store.summary()["classes"] == {"brick": 8, "grass": 8, "gravel": 8}


def test_rerun_resumes_and_tracks_changes(image_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "feats.h5"
    first = extract(image_tree, out, workers=0)
    assert (first.embedded, first.reused, first.complete) == (12, 0, True)
    before = FeatureStore.open(out)

    again = extract(image_tree, out, workers=0)
    assert (again.embedded, again.reused) == (0, 12)
    np.testing.assert_array_equal(FeatureStore.open(out).features(), before.features())

    shutil.copy(image_tree / "brick" / "brick_000.jpg", image_tree / "brick" / "brick_new.jpg")
    (image_tree / "grass" / "grass_001.png").unlink()
    changed = image_tree / "gravel" / "gravel_000.jpg"
    shutil.copy(image_tree / "gravel" / "gravel_002.jpg", changed)
    os.utime(changed, ns=(1, 1))
    third = extract(image_tree, out, workers=0)
    assert (third.embedded, third.reused, third.missing) == (2, 10, 1)
    store = FeatureStore.open(out)
    rows = {p: i for i, p in enumerate(store.paths)}
    assert store.status[rows["grass/grass_001.png"]] == MISSING and len(store) == 13
    np.testing.assert_allclose(store.features([rows["brick/brick_new.jpg"]]),
                               store.features([rows["brick/brick_000.jpg"]]), atol=1e-6)
    np.testing.assert_allclose(store.features([rows["gravel/gravel_000.jpg"]]),
                               store.features([rows["gravel/gravel_002.jpg"]]), atol=1e-6)


def test_overwrite_starts_afresh(image_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "feats.h5"
    extract(image_tree, out, workers=0)
    assert extract(image_tree, out, workers=0, overwrite=True).embedded == 12


def test_other_backbone_or_dtype_is_refused(image_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "feats.h5"
    extract(image_tree, out, workers=0)
    before = out.read_bytes()
    with pytest.raises(StoreMismatchError, match=r"layer blocks\.5"):
        extract(image_tree, out, workers=0, layer="blocks.5")
    with pytest.raises(StoreMismatchError, match="dtype: float32 != float16"):
        extract(image_tree, out, workers=0, dtype="float16")
    assert out.read_bytes() == before  # nothing the user had is touched


def test_float16_store_halves_size(shared_tree: Path, shared_store: Path, tmp_path: Path) -> None:
    half = extract(shared_tree, tmp_path / "half.h5", workers=0, dtype="float16", flush_every=5)
    store = FeatureStore.open(half.store)
    with h5py.File(half.store) as f:
        assert f["features"].dtype == np.float16
    np.testing.assert_allclose(store.features(), FeatureStore.open(shared_store).features(), atol=2e-2, rtol=1e-2)


def test_broken_images_are_recorded_not_fatal(image_tree: Path, tmp_path: Path) -> None:
    (image_tree / "brick" / "broken.jpg").write_bytes((image_tree / "brick" / "brick_000.jpg").read_bytes()[:300])
    (image_tree / "grass" / "notes.png").write_text("<html>not an image</html>")
    summary = extract(image_tree, tmp_path / "feats.h5", workers=0)
    assert (summary.embedded, summary.failed, summary.complete) == (12, 2, True)
    store = FeatureStore.open(summary.store)
    failed = {str(p): str(e) for p, e, s in zip(store.paths, store.errors, store.status, strict=True) if s == FAILED}
    assert set(failed) == {"brick/broken.jpg", "grass/notes.png"} and all(failed.values())
    assert np.isnan(store.features(np.flatnonzero(store.status == FAILED))).all()
    X, y, paths = store.load()
    assert X.shape == (12, 1280) and np.isfinite(X).all() and len(y) == len(paths) == 12
    # failed images are not retried unless asked
    assert extract(image_tree, summary.store, workers=0).embedded == 0
    assert extract(image_tree, summary.store, workers=0, retry_failed=True).failed == 2


def test_max_failures_aborts_and_keeps_work(tmp_path: Path, image_tree: Path) -> None:
    for i in range(30):
        (image_tree / "brick" / f"junk_{i:02d}.jpg").write_bytes(b"\x00" * 10)
    with pytest.raises(ExtractionInterrupted, match=r"aborted: .* failed"):
        extract(image_tree, tmp_path / "feats.h5", workers=0, batch_size=4, max_failures=5)
    store = FeatureStore.open(tmp_path / "feats.h5")
    assert not store.complete
    done = extract(image_tree, tmp_path / "feats.h5", workers=0)
    assert done.complete and len(FeatureStore.open(done.store)) == 42


def test_parts_from_a_killed_run_are_resumed(image_tree: Path, tmp_path: Path, lite0) -> None:
    """Finished part files (what a killed run leaves) are reused; unfinished temp files are ignored."""
    out = tmp_path / "feats.h5"
    reference = extract(image_tree, tmp_path / "ref.h5", workers=0)
    ref = FeatureStore.open(reference.store)
    from embedfit.storage import StoreSettings

    records = scan_images(image_tree).records
    with StoreWriter(out, StoreSettings(lite0.spec)) as writer:
        rows = [i for i, p in enumerate(ref.paths) if p.startswith("grass")]
        writer.write_part([ref.paths[i] for i in rows], ["grass"] * len(rows),
                          [records[i].size for i in rows], [records[i].mtime_ns for i in rows],
                          [OK] * len(rows), [""] * len(rows), ref.features(rows))
    (out.parent / "feats.h5.parts" / ".part-x.h5.tmp").write_bytes(b"half-written")
    with pytest.raises(StoreError, match="interrupted"):
        FeatureStore.open(out)
    resumed = extract(image_tree, out, workers=0)
    assert (resumed.embedded, resumed.reused) == (8, 4)
    np.testing.assert_allclose(FeatureStore.open(out).features(), ref.features(), atol=1e-6)
    assert not (out.parent / "feats.h5.parts").exists() or not list((out.parent / "feats.h5.parts").glob("part-*"))


def test_second_writer_is_refused(image_tree: Path, tmp_path: Path, lite0) -> None:
    from embedfit.storage import StoreSettings

    out = tmp_path / "feats.h5"
    with StoreWriter(out, StoreSettings(lite0.spec)), pytest.raises(StoreLockedError, match="another"):
        extract(image_tree, out, workers=0)
    assert extract(image_tree, out, workers=0).complete  # the lock died with its holder


def test_config_validation() -> None:
    from embedfit.errors import UsageError

    for bad in (dict(batch_size=0), dict(workers=-1), dict(precision="fp8"), dict(dtype="int8"),
                dict(tta="rotate"), dict(max_failures=-1)):
        with pytest.raises(UsageError):
            ExtractConfig(**bad)


def test_csv_input_and_given_class_order(image_tree: Path, tmp_path: Path) -> None:
    csv = tmp_path / "list.csv"
    rows = [f"{p.relative_to(image_tree)},{p.parent.name}" for p in sorted(image_tree.rglob("*.jpg"))]
    csv.write_text("path,label\n" + "\n".join(f"images/{r}" for r in rows) + "\n")
    summary = extract(csv, tmp_path / "csv.h5", workers=0, class_names=["gravel", "grass", "brick"])
    store = FeatureStore.open(summary.store)
    assert store.class_names == ["gravel", "grass", "brick"] and len(store) == 6
    assert store.labels[list(store.paths).index("images/brick/brick_000.jpg")] == 2


def test_relabeling_updates_the_store_without_re_embedding(image_tree: Path, tmp_path: Path) -> None:
    """Labels are the current input's: an edited CSV (or a renamed class folder) relabels the stored rows."""
    csv = tmp_path / "list.csv"
    rows = [f"images/{p.relative_to(image_tree)},{p.parent.name}" for p in sorted(image_tree.rglob("*.jpg"))]
    csv.write_text("path,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "csv.h5"
    extract(csv, out, workers=0)
    before = FeatureStore.open(out)
    csv.write_text(csv.read_text().replace(",brick", ",wall"))
    again = extract(csv, out, workers=0)
    assert (again.embedded, again.reused) == (0, 6)
    store = FeatureStore.open(out)
    assert store.class_names == ["grass", "gravel", "wall"]  # no stale, empty "brick" class
    assert [store.class_names[i] for i in store.labels] == [p.split(",")[1] for p in
                                                             csv.read_text().splitlines()[1:]]
    np.testing.assert_array_equal(store.features(), before.features())
