"""Attacks where one store file meets another: sharded stores renamed, copied, swapped, edited, damaged and resumed
(locally and on a real moto S3 server), a truncated copy in the remote read cache, a FIFO among the images, a
decoding worker whose parent is killed, outputs that link to artifacts. Real files and processes throughout."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_store_integrity import CLASSES, Rec, _records, _write_part

from embedfit.cli import main
from embedfit.errors import StoreError, UsageError, check_output_file
from embedfit.extraction.local import extract
from embedfit.storage import OK, FeatureStore, ShardedStoreWriter, StoreSettings, shards_dir

pytestmark = [pytest.mark.fast, pytest.mark.timeout(300)]


def _sharded(path: Path, settings: StoreSettings, n: int = 30, shard: int = 10) -> tuple[list[Rec], np.ndarray]:
    """A complete sharded store of n synthetic rows, `shard` per shard; returns its records and features."""
    recs = _records(n, "img")
    feats = np.random.default_rng(0).standard_normal((n, settings.spec.embedding_dim)).astype(np.float32)
    with ShardedStoreWriter(path, settings, shard_size=shard) as writer:
        for i in range(0, n, shard):
            _write_part(writer, recs[i:i + shard], feats[i:i + shard])
        writer.commit(recs, CLASSES, complete=True)
    return recs, feats


def _shards(path: Path) -> list[Path]:
    return sorted(shards_dir(path).glob("shard-*.h5"))


def _copy_pair(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)
    shutil.copytree(shards_dir(src), shards_dir(dst))


def test_a_renamed_or_copied_pair_reads_the_same_features(settings: StoreSettings, tmp_path: Path) -> None:
    store = tmp_path / "feats.h5"
    recs, feats = _sharded(store, settings)
    _copy_pair(store, tmp_path / "new" / "feats.h5")  # cp -a feats.h5 feats.h5.shards new/
    renamed = tmp_path / "new" / "renamed.h5"
    os.rename(tmp_path / "new" / "feats.h5", renamed)
    os.rename(shards_dir(tmp_path / "new" / "feats.h5"), shards_dir(renamed))
    with FeatureStore.open(renamed) as moved:
        assert list(moved.paths) == [r.key for r in recs]
        np.testing.assert_array_equal(moved.features(), feats)  # not NaN: shards found under the new name
        X, _, _ = moved.load()
        assert not np.isnan(X).any()
        assert moved.verify() == len(recs)
    # Plain h5py reads the pair moved together to another folder under its own names (the virtual dataset's
    # source names are relative to the manifest's folder).
    _copy_pair(store, tmp_path / "elsewhere" / "feats.h5")
    with h5py.File(tmp_path / "elsewhere" / "feats.h5", "r") as f:
        np.testing.assert_array_equal(f["features"][:], feats)
    # A manifest renamed without its folder: refused in one line, naming the shard, instead of NaN rows.
    os.rename(tmp_path / "elsewhere" / "feats.h5", tmp_path / "elsewhere" / "alone.h5")
    with pytest.raises(StoreError, match=r"shard shard-\S+ is missing; re-run the same `embedfit extract`"):
        FeatureStore.open(tmp_path / "elsewhere" / "alone.h5")


def test_swapped_shards_and_edited_keys_are_refused(settings: StoreSettings, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "feats.h5"
    _sharded(store, settings)
    a, b, _ = _shards(store)
    swap = a.with_name("swap.tmp")
    os.rename(a, swap), os.rename(b, a), os.rename(swap, b)  # two shard files swapped: each still opens
    with pytest.raises(StoreError, match=f"shard {a.name} has another metadata digest"):
        FeatureStore.open(store)
    assert main(["info", str(store)]) == 1
    err = capsys.readouterr().err
    assert f"shard {a.name}" in err and err.count("\n") == 1 and "Traceback" not in err
    os.rename(a, swap), os.rename(b, a), os.rename(swap, b)
    FeatureStore.open(store).close()
    # A key edited inside a shard (its own digest attribute left as it was): the per-shard check at open reads
    # only the first and last keys; the full check (`info --verify`) reads them all.
    with h5py.File(b, "r+") as f:
        f["paths"][4] = "c0/someone_else.png"
    FeatureStore.open(store).close()
    assert main(["info", str(store), "--verify"]) == 1
    err = capsys.readouterr().err
    assert f"shard {b.name}" in err and "changed on disk" in err and err.count("\n") == 1
    # The manifest's own metadata is covered by its digest, as a single file's is.
    store2 = tmp_path / "other.h5"
    _sharded(store2, settings)
    assert main(["info", str(store2), "--verify"]) == 0
    assert "verified: 30 rows" in capsys.readouterr().out
    with h5py.File(store2, "r+") as f:
        f["paths"][3] = "c1/edited.png"
    with pytest.raises(StoreError, match="metadata checksum mismatch"):
        FeatureStore.open(store2)


def test_resume_repairs_missing_and_damaged_shards(image_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "feats.h5"
    extract(image_tree, out, workers=0, shard_size=4)  # 12 images: 3 shards
    with FeatureStore.open(out) as before:
        paths, feats = list(before.paths), before.features()
    first, second, _ = _shards(out)
    first.unlink()  # missing
    with open(second, "r+b") as f:  # damaged: truncated
        f.truncate(second.stat().st_size // 2)
    with pytest.raises(StoreError, match="shard"):
        FeatureStore.open(out)
    assert main(["extract", str(image_tree), "-o", str(out), "--workers", "0"]) == 0  # no internal error
    with FeatureStore.open(out) as after:
        assert after.complete and list(after.paths) == paths
        np.testing.assert_allclose(after.features(), feats, rtol=1e-5, atol=1e-5)
        assert after.verify() == 12
    resumed = extract(image_tree, out, workers=0)
    assert (resumed.embedded, resumed.reused) == (0, 12)


def test_sharded_store_on_s3_copied_key_and_a_healing_cache(settings: StoreSettings, tmp_path: Path,
                                                             bucket: tuple) -> None:
    from embedfit.storage.objects import cache_dir

    fs, name = bucket
    local = tmp_path / "feats.h5"
    _, feats = _sharded(local, settings)
    fs.put_file(str(local), f"{name}/a/feats.h5")
    for shard in _shards(local):
        fs.put_file(str(shard), f"{name}/a/feats.h5.shards/{shard.name}")
    fs.copy(f"{name}/a/feats.h5", f"{name}/b/copy.h5")  # a copied key, with its shards beside it
    for shard in _shards(local):
        fs.copy(f"{name}/a/feats.h5.shards/{shard.name}", f"{name}/b/copy.h5.shards/{shard.name}")
    url = f"s3://{name}/b/copy.h5"
    with FeatureStore.open(url) as store:
        np.testing.assert_array_equal(store.features(), feats)
        assert store.summary()["path"] == url
        cached = store.path
    # Truncated copies in the read cache (the manifest, then a shard): downloaded again, never called damaged.
    assert cached.is_relative_to(cache_dir())
    for victim in (cached, _shards(cached)[1]):
        with open(victim, "r+b") as f:
            f.truncate(victim.stat().st_size // 3)
        with FeatureStore.open(url) as store:
            np.testing.assert_array_equal(store.features(), feats)
    # The object itself damaged: then it is a damaged store, in one line.
    with open(tmp_path / "bad.h5", "wb") as f:
        f.write(local.read_bytes()[:2000])
    fs.put_file(str(tmp_path / "bad.h5"), f"{name}/b/copy.h5")
    with pytest.raises(StoreError, match="cannot read feature store"):
        FeatureStore.open(url)


def test_a_fifo_among_the_images_is_a_failed_row(image_tree: Path, tmp_path: Path) -> None:
    folder = sorted(p for p in image_tree.iterdir() if p.is_dir())[0]
    os.mkfifo(folder / "x.jpg")  # opening it would block until a writer comes
    for workers in (0, 1):
        summary = extract(image_tree, tmp_path / f"w{workers}.h5", workers=workers)
        assert summary.complete and summary.failed == 1
        assert summary.failures == [(f"{folder.name}/x.jpg", "not a regular file")]


def test_decoding_workers_die_with_their_parent(tmp_path: Path) -> None:
    pid_file = tmp_path / "worker.pid"
    script = textwrap.dedent(f"""
        import os, time, torch
        from torch.utils.data import DataLoader, Dataset
        from embedfit.extraction.reader import _worker_init

        class Stuck(Dataset):
            def __len__(self):
                return 1
            def __getitem__(self, i):
                open({str(pid_file)!r}, "w").write(str(os.getpid()))
                time.sleep(600)  # like a worker blocked in a system call

        for _ in DataLoader(Stuck(), num_workers=1, worker_init_fn=_worker_init):
            pass
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        deadline = time.monotonic() + 120
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        state = Path(f"/proc/{worker}/stat").read_text().split()[2] if Path(f"/proc/{worker}").exists() else "gone"
        assert state in ("gone", "Z")  # dead (a zombie only until its new parent reaps it)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_outputs_never_clobber_artifacts_through_a_link(settings: StoreSettings, tmp_path: Path) -> None:
    store = tmp_path / "feats.h5"
    _sharded(store, settings, n=4, shard=4)
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.json").write_text("{}")
    (run / "model.skops").write_bytes(b"PK\x03\x04")
    image = tmp_path / "cat.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    for target, kind in ((store, "feature store"), (run / "model.skops", "model file"), (image, "image")):
        link = tmp_path / f"link-{target.name}.csv"
        link.symlink_to(target)
        with pytest.raises(UsageError, match=f"is an existing {kind}; write to another file"):
            check_output_file(link)
        assert target.exists() and not target.is_symlink()
    with pytest.raises(UsageError, match="is an existing feature store"):
        check_output_file(store)  # the store itself, too
    assert main(["predict", str(run), str(store), "-o", str(tmp_path / "link-feats.h5.csv")]) == 2
    with FeatureStore.open(store) as still:
        assert len(still) == 4
    assert check_output_file(tmp_path / "new.csv") == tmp_path / "new.csv"


def test_a_sharded_store_on_s3_missing_a_shard_is_refused_then_repaired(image_tree: Path, bucket: tuple) -> None:
    fs, name = bucket
    url = f"s3://{name}/feats.h5"
    extract(image_tree, url, workers=0, shard_size=4)
    with FeatureStore.open(url) as store:
        paths, feats = list(store.paths), store.features()
    victim = sorted(fs.ls(f"{name}/feats.h5.shards"))[0]
    fs.rm(victim)
    from embedfit.storage.objects import cache_dir

    shutil.rmtree(cache_dir())  # a fresh machine: nothing cached
    with pytest.raises(StoreError, match="cannot download"):
        FeatureStore.open(url)
    assert main(["extract", str(image_tree), "-o", url, "--workers", "0"]) == 0
    with FeatureStore.open(url) as store:
        assert store.complete and list(store.paths) == paths
        np.testing.assert_allclose(store.features(), feats, rtol=1e-5, atol=1e-5)


def test_a_new_per_row_dataset_is_one_schema_entry(settings: StoreSettings, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """What a per-image content hash (or any per-row dataset) needs: an entry in `ROW_DATASETS`; parts, shards,
    manifests, the merge and the metadata digest carry it with no other change."""
    from embedfit.storage import StoreWriter
    from embedfit.storage.schema import ROW_DATASETS, ROW_DEFAULTS, STR

    monkeypatch.setitem(ROW_DATASETS, "content_sha256", STR)
    monkeypatch.setitem(ROW_DEFAULTS, "content_sha256", "")
    keys = [f"c0/img_{i}.png" for i in range(6)]
    hashes = [f"h{i}" for i in range(6)]
    feats = np.ones((6, settings.spec.embedding_dim), dtype=np.float32)
    recs = [Rec(k, 0, 1, 1) for k in keys]
    for sharded in (False, True):
        path = tmp_path / f"s{int(sharded)}.h5"
        writer = (ShardedStoreWriter(path, settings, shard_size=3) if sharded else StoreWriter(path, settings))
        with writer:
            for i in (0, 3):
                writer.write_part(keys[i:i + 3], ["c0"] * 3, [1] * 3, [1] * 3, [OK] * 3, [""] * 3, feats[i:i + 3],
                                  extra={"content_sha256": hashes[i:i + 3]})
            writer.commit(recs, CLASSES, complete=True)
        with FeatureStore.open(path) as store:
            assert list(store.row_arrays["content_sha256"]) == hashes
        with h5py.File(path, "r+") as f:  # covered by the digest like the other per-row datasets
            f["content_sha256"][2] = "forged"
        with pytest.raises(StoreError, match="metadata checksum mismatch"):
            FeatureStore.open(path)


def test_unusual_strings_survive_the_manifest_merge(settings: StoreSettings, tmp_path: Path) -> None:
    """The commit copies errors and content hashes as raw bytes and hashes them without `json` when they are plain
    ASCII: keys, errors and hashes with non-ASCII, quotes, backslashes and newlines must come out as written, under
    a digest that the reader verifies, and a changed file's row is replaced by its new one."""
    from embedfit.storage import FAILED
    from embedfit.storage.schema import CONTENT_HASH

    keys = sorted(["c0/caf\u00e9 \"quoted\".png", "c0/back\\slash.png", "c1/\u65e5\u672c.png", "c1/plain.png"])
    recs = [Rec(k, int(k.startswith("c1")), 1000 + i, 10**18 + i) for i, k in enumerate(keys)]
    errors = ["", "line one\nline two \"q\" \\ caf\u00e9", "", "\u00e9chec"]
    status = [OK if not e else FAILED for e in errors]
    hashes = ["", "h\u00e9\"\\", "0" * 64, "a\nb"]
    feats = np.random.default_rng(1).standard_normal((4, settings.spec.embedding_dim)).astype(np.float32)
    out = tmp_path / "odd.h5"
    with ShardedStoreWriter(out, settings, shard_size=2) as writer:
        for i in (0, 2):
            writer.write_part(keys[i:i + 2], [CLASSES[r.label] for r in recs[i:i + 2]], [r.size for r in recs[i:i + 2]],
                              [r.mtime_ns for r in recs[i:i + 2]], status[i:i + 2], errors[i:i + 2], feats[i:i + 2],
                              {CONTENT_HASH: hashes[i:i + 2]})
        writer.commit(recs, CLASSES, complete=True)
    store = FeatureStore.open(out)  # verifies the metadata digest
    assert list(store.paths) == keys and list(store.errors) == errors and list(store.status) == status
    with h5py.File(out, "r") as f:
        assert list(f[CONTENT_HASH].asstr()[:]) == hashes
    store.close()
    # One file changed: its old row is dropped, the new one (written by a resumed run) is committed.
    recs[1] = recs[1]._replace(size=5)
    with ShardedStoreWriter(out, settings, shard_size=2) as writer:
        assert [r.key for r in writer.plan(recs).todo] == [keys[1]]
        writer.write_part([keys[1]], [CLASSES[recs[1].label]], [5], [recs[1].mtime_ns], [OK], [""], feats[1:2],
                          {CONTENT_HASH: ["new"]})
        store = writer.commit(recs, CLASSES, complete=True)
    assert list(store.errors) == ["", "", "", errors[3]] and list(store.status) == [OK, OK, OK, FAILED]
    with h5py.File(out, "r") as f:
        assert f[CONTENT_HASH].asstr()[1] == "new"
