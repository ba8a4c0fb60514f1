"""Sharded stores (`embedfit.storage.shards`): a manifest plus one HDF5 file per shard, read exactly like one file."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_store_integrity import CLASSES, _records, _write_part

from embedfit.cli import main
from embedfit.errors import StoreError
from embedfit.extraction.local import extract
from embedfit.storage import FeatureStore, ShardedStoreWriter, StoreSettings
from embedfit.storage.manifest import Listing
from embedfit.storage.shards import shards_dir

pytestmark = pytest.mark.fast


def _shards(out: Path) -> list[Path]:
    return sorted(shards_dir(out).glob("shard-*.h5"))


def _same_rows(a: Path, b: Path) -> None:
    x, y = FeatureStore.open(a), FeatureStore.open(b)
    assert list(x.paths) == list(y.paths) and list(x.labels) == list(y.labels)
    assert list(x.class_names) == list(y.class_names) and list(x.status) == list(y.status)
    np.testing.assert_allclose(x.features(), y.features(), rtol=1e-5, atol=1e-5)


def test_sharded_store_reads_like_the_single_file(shared_tree: Path, shared_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "feats.h5"
    summary = extract(shared_tree, out, workers=0, shard_size=10)
    assert summary.complete and summary.embedded == 24
    assert len(_shards(out)) == 3  # 10 + 10 + 4
    _same_rows(out, shared_store)
    store = FeatureStore.open(out)
    assert store.attrs["layout"] == "sharded" and store.attrs["engine"] == "local"
    assert json.loads(store.attrs["shards"]) == [p.name for p in _shards(out)]
    rows = np.array([20, 3, 11])  # index reads across shards, in any order
    np.testing.assert_array_equal(store.features(rows), store.features()[rows])
    with h5py.File(out, "r") as f:  # plain h5py sees one (virtual) features dataset over the shards
        assert f["features"].is_virtual and f["features"].shape == (24, store.dim)
    with h5py.File(_shards(out)[0], "r") as f:  # each shard carries the schema and its provenance
        assert f.attrs["engine"] == "local" and "spec" in f.attrs and len(f["paths"]) == 10
    # The store moves as a folder pair: shard names are relative to the manifest.
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(out, moved / out.name)
    shutil.move(shards_dir(out), shards_dir(moved / out.name))
    _same_rows(moved / out.name, shared_store)


@pytest.mark.slow
def test_cli_reads_a_sharded_store(shared_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "feats.h5"
    assert main(["extract", str(shared_tree), "-o", str(out), "--workers", "0", "--shard-size", "8"]) == 0
    assert main(["info", str(out)]) == 0
    assert main(["fit", str(out), "-m", "logreg", "--cv", "2", "-o", str(tmp_path / "run")]) == 0
    assert main(["fit", str(out), "-m", "sgd-logreg", "--epochs", "2", "--batch-rows", "8",
                 "-o", str(tmp_path / "ooc")]) == 0
    assert main(["predict", str(tmp_path / "run"), str(out), "-o", str(tmp_path / "p.csv")]) == 0
    assert main(["report", str(tmp_path / "run"), "-o", str(tmp_path / "r.html")]) == 0
    capsys.readouterr()


def test_resume_new_images_and_reprocessed_shards_never_duplicate(image_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "feats.h5"
    extract(image_tree, out, workers=0, shard_size=5)
    first = _shards(out)
    # Nothing to do: no new shard, same manifest.
    again = extract(image_tree, out, workers=0, shard_size=5)
    assert (again.embedded, again.reused) == (0, 12) and _shards(out) == first
    # A new image interleaves with stored keys; one image changes: only those two are embedded.
    src = next(image_tree.rglob("*.png"))
    shutil.copy(src, src.with_name("aaa_new.png"))
    changed = sorted(image_tree.rglob("*.png"))[-1]
    os.utime(changed, ns=(time.time_ns(), time.time_ns()))
    resumed = extract(image_tree, out, workers=0)  # no --shard-size: a sharded store stays sharded
    assert (resumed.embedded, resumed.reused) == (2, 11)
    store = FeatureStore.open(out)
    assert len(store) == 13 and len(set(store.paths)) == 13 and list(store.paths) == sorted(store.paths)
    # A finished shard written twice (a retried worker) and a stray copy of it: still one row per image.
    shutil.copy(_shards(out)[0], shards_dir(out) / "shard-99999999999999999999-0-000000.h5")
    extract(image_tree, out, workers=0)
    store2 = FeatureStore.open(out)
    assert list(store2.paths) == list(store.paths) and store2.complete
    np.testing.assert_allclose(store2.features(), store.features(), rtol=1e-6)
    reference = tmp_path / "ref.h5"
    extract(image_tree, reference, workers=0)
    _same_rows(out, reference)


def test_missing_shard_is_refused_and_layouts_are_not_mixed(image_tree: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    single = tmp_path / "single.h5"
    extract(image_tree, single, workers=0)
    assert main(["extract", str(image_tree), "-o", str(single), "--workers", "0", "--shard-size", "4"]) == 1
    err = capsys.readouterr().err
    assert "single-file store" in err and err.count("\n") == 1
    out = tmp_path / "feats.h5"
    extract(image_tree, out, workers=0, shard_size=4)
    _shards(out)[1].unlink()
    with pytest.raises(StoreError, match=r"shard \S+ is missing"):  # HDF5 would read its rows as NaN
        FeatureStore.open(out)
    # --overwrite rebuilds it, and removes the old shards once the new manifest is in place.
    extract(image_tree, out, workers=0, shard_size=6, overwrite=True)
    assert FeatureStore.open(out).complete and len(_shards(out)) == 2


def test_overwriting_a_sharded_store_with_one_file_removes_its_shards(image_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "feats.h5"
    extract(image_tree, out, workers=0, shard_size=4)
    held = FeatureStore.open(out)  # a reader of the sharded store, open across the overwrite
    assert len(_shards(out)) == 3
    extract(image_tree, out, workers=0, overwrite=True)  # no shard size: one file, as on a first run
    store = FeatureStore.open(out)
    assert "layout" not in store.attrs and store.complete and store.n_ok == 12
    assert not Path(f"{out}.shards").exists()  # no folder of orphaned shards left behind
    # The old reader reads through the path, checked to hold the same rows (same images, same settings): it gets
    # them from the new file rather than NaN from deleted shards.
    np.testing.assert_array_equal(held.features(), store.features())


def _mapping(path: Path) -> list[tuple[int, int, str, int | None]]:
    """The manifest's features mapping: (first row, rows, shard, first shard row, None where it selects "all")."""
    with h5py.File(path, "r") as f:
        maps = []
        for m in f["features"].virtual_sources():
            (o0, _), (o1, _) = m.vspace.get_select_bounds()
            whole = m.src_space.get_select_type() == h5py.h5s.SEL_ALL
            maps.append((o0, o1 - o0 + 1, os.path.basename(m.file_name),
                         None if whole else m.src_space.get_select_bounds()[0][0]))
    return sorted(maps)


def _reads(out: Path, feats: np.ndarray) -> None:
    with FeatureStore.open(out) as store:
        np.testing.assert_array_equal(store.features(), feats)
        np.testing.assert_array_equal(store.features(np.array([24, 13, 0])), feats[[24, 13, 0]])
        assert store.verify() == len(feats)  # every row's key against the shard row it is read from
    with h5py.File(out, "r") as f:  # plain h5py, through HDF5's own reading of the mapping
        np.testing.assert_array_equal(f["features"][()], feats)


def test_whole_shards_are_mapped_as_all_and_hyperslab_manifests_still_read(settings: StoreSettings,
                                                                            tmp_path: Path) -> None:
    """A mapping over a whole shard selects "all" of it (HDF5 then holds no hyperslab for it: the manifest's peak
    memory at 2M rows) and is read as the shard's rows 0..n-1; part of a shard keeps a hyperslab, as every mapping
    of a manifest written before did, and those still read."""
    out = tmp_path / "feats.h5"
    recs = _records(25, "img")
    feats = np.random.default_rng(0).standard_normal((25, settings.spec.embedding_dim)).astype(np.float32)
    with ShardedStoreWriter(out, settings, shard_size=10) as writer:
        for i in range(0, 25, 10):
            _write_part(writer, recs[i:i + 10], feats[i:i + 10])
        writer.commit(recs, CLASSES, complete=True)
    a, b, c = (p.name for p in _shards(out))
    assert _mapping(out) == [(0, 10, a, None), (10, 10, b, None), (20, 5, c, None)]
    _reads(out, feats)
    # A resumed run re-embeds one changed file: its new one-row shard is whole, the two parts of b around it not.
    recs[13] = recs[13]._replace(size=7)
    feats[13] = 42.0
    with ShardedStoreWriter(out, settings, shard_size=10) as writer:
        assert [r.key for r in writer.plan(recs).todo] == [recs[13].key]
        _write_part(writer, recs[13:14], feats[13:14])
        writer.commit(recs, CLASSES, complete=True)
    new = next(p.name for p in _shards(out) if p.name not in (a, b, c))
    assert _mapping(out) == [(0, 10, a, None), (10, 3, b, 0), (13, 1, new, None), (14, 6, b, 4), (20, 5, c, None)]
    _reads(out, feats)
    # The manifest as embedfit wrote it before: a hyperslab source for every mapping (its digest does not cover
    # the mapping, which `verify` checks row by row against the shards' keys).
    with h5py.File(out, "r+") as f:
        rows = {name: e["rows"] for name, e in json.loads(f.attrs["shard_index"]).items()}
        layout = h5py.VirtualLayout(f["features"].shape, f["features"].dtype)
        for o0, n, name, src0 in _mapping(out):
            source = h5py.VirtualSource(f"{shards_dir(out).name}/{name}", "features", (rows[name], feats.shape[1]))
            layout[o0:o0 + n] = source[src0 or 0:(src0 or 0) + n]
        del f["features"]
        f.create_virtual_dataset("features", layout, fillvalue=np.nan)
    assert [m[3] for m in _mapping(out)] == [0, 0, 0, 4, 0]
    _reads(out, feats)


def test_a_shards_metadata_copy_commits_like_it_and_refuses_its_features(settings: StoreSettings,
                                                                         tmp_path: Path) -> None:
    """What a Ray actor reports for a shard it uploaded (`metadata_copy`): every attribute and per-row dataset as
    in the shard (the same digest: the manifest committed over the copy records the real shard), a features dataset
    of the same shape that holds no chunk, and a mark that makes readers refuse its features."""
    from embedfit.storage.manifest import shard_info
    from embedfit.storage.schema import FEATURES_ELIDED, features_elided
    from embedfit.storage.shards import metadata_copy, place_metadata_copy

    out = tmp_path / "feats.h5"
    recs = _records(600, "img")
    feats = np.random.default_rng(0).standard_normal((600, settings.spec.embedding_dim)).astype(np.float32)
    real = tmp_path / "real.h5"
    with ShardedStoreWriter(out, settings, shard_size=1024) as writer:
        shard = _write_part(writer, recs, feats)
        data = metadata_copy(shard)
        shutil.move(shard, real)  # the shard is elsewhere (uploaded); the commit reads the copy in its place
        assert place_metadata_copy(writer.parts, shard.name, data) == shard
        writer.commit_listing(Listing.of(recs, CLASSES), complete=True)
    assert len(data) < real.stat().st_size / 20  # ~metadata size: 600 rows of 1280 floats are 3 MB
    assert features_elided(shard) and not features_elided(real) and shard_info(shard) == shard_info(real)
    with h5py.File(real, "r") as a, h5py.File(shard, "r") as b:
        assert set(b.attrs) == {*a.attrs, FEATURES_ELIDED} and set(a) == set(b)
        for key in a.attrs:
            assert a.attrs[key] == b.attrs[key] and a.attrs.get_id(key).dtype == b.attrs.get_id(key).dtype
        for name in set(a) - {"features"}:
            np.testing.assert_array_equal(a[name][()], b[name][()])
        x, y = a["features"], b["features"]
        assert (x.shape, x.dtype, x.chunks, x.fletcher32) == (y.shape, y.dtype, y.chunks, y.fletcher32)
        assert y.id.get_storage_size() == 0  # no chunk written
    with pytest.raises(StoreError, match="metadata copy without features"):
        FeatureStore.open(out)
    with pytest.raises(StoreError, match="not a metadata copy"):  # a driver takes copies only
        place_metadata_copy(tmp_path, shard.name, real.read_bytes())
    shutil.copyfile(real, shard)  # the real shard in its place: the manifest reads it
    np.testing.assert_array_equal(FeatureStore.open(out).features(), feats)
