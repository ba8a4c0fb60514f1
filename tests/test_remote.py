"""Images and feature stores on object storage, against a real S3 API (moto's server on 127.0.0.1) through s3fs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedfit.errors import DecodeError, StoreError, UsageError

pytestmark = pytest.mark.slow

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")


def _upload_tree(fs, root: Path, prefix: str) -> None:
    for f in sorted(root.rglob("*")):
        if f.is_file():
            fs.put_file(str(f), f"{prefix}/{f.relative_to(root).as_posix()}")


def _jpeg_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# no network needed


def test_unsupported_scheme_output_is_one_line_and_writes_nothing(image_tree: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from embedfit.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["extract", str(image_tree), "-o", "foo://bucket/x.h5", "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unsupported URL scheme foo://" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # no ./foo:/bucket/x.h5


def test_missing_backend_names_the_package(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    from embedfit.cli import main

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed")
    assert main(["info", "gs://bucket/feats.h5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "gcsfs" in err and "pip install" in err


def test_url_where_a_local_path_is_due_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from embedfit.cli import main

    assert main(["fit", str(tmp_path / "x.h5"), "-o", "s3://bucket/run"]) == 2
    err = capsys.readouterr().err
    assert "--output" in err and "s3://bucket/run" in err and "local path" in err
    assert not (Path.cwd() / "s3:").exists()


def test_local_or_url() -> None:
    from embedfit.url import local_or_url, redact

    assert local_or_url("file:///tmp/a%20b/x.h5") == "/tmp/a b/x.h5"
    assert local_or_url("s3://bucket/x.h5") == "s3://bucket/x.h5"
    with pytest.raises(UsageError, match="collapsed"):
        local_or_url(Path("s3://bucket/x.h5"))
    assert redact("s3://KEY:SECRET@bucket/x.h5?X-Amz-Signature=abc") == "s3://bucket/x.h5"


def test_decode_image_reads_file_objects_and_reports_truncation() -> None:
    from embedfit.images import decode_image

    data = _jpeg_bytes(0)
    assert decode_image(io.BytesIO(data)).size == (96, 80)
    with pytest.raises(DecodeError, match="truncated"):
        decode_image(io.BytesIO(data[: len(data) // 2]))

    class Failing(io.RawIOBase):
        def read(self, *_: object) -> bytes:
            raise ConnectionError("connection reset by peer")

    with pytest.raises(DecodeError, match="connection reset"):
        decode_image(Failing())


# --------------------------------------------------------------------------------------------------
# against the S3 API


def test_scan_folder_and_csv_on_s3(bucket: tuple[object, str], image_tree: Path, tmp_path: Path) -> None:
    from embedfit.images import collect_images, scan_images

    fs, name = bucket
    _upload_tree(fs, image_tree, f"{name}/images")
    fs.pipe(f"{name}/images/brick/.hidden.jpg", b"x")
    src = scan_images(f"s3://{name}/images")
    assert src.kind == "folder" and src.class_names == ["brick", "grass", "gravel"]
    assert len(src.records) == 12 and src.records[0].key == "brick/brick_000.jpg"
    assert src.records[0].path == f"s3://{name}/images/brick/brick_000.jpg"
    assert src.records[0].size == (image_tree / "brick/brick_000.jpg").stat().st_size and src.records[0].mtime_ns > 0
    assert ("brick/.hidden.jpg", "hidden file") in src.skipped

    # a CSV on S3 (relative rows, and a URL row), and a local CSV whose rows are URLs
    rows = f"path,label\nbrick/brick_000.jpg,brick\ns3://{name}/images/grass/grass_001.png,grass\nnope.jpg,brick\n"
    fs.pipe(f"{name}/images/list.csv", rows.encode())
    csv_src = scan_images(f"s3://{name}/images/list.csv")
    keys = {r.key: r for r in csv_src.records}
    assert set(keys) == {"brick/brick_000.jpg", f"s3://{name}/images/grass/grass_001.png", "nope.jpg"}
    assert keys["nope.jpg"].size == -1 and keys["brick/brick_000.jpg"].size > 0
    local_csv = tmp_path / "list.csv"
    local_csv.write_text(f"path,label\ns3://{name}/images/brick/brick_001.png,brick\n")
    assert scan_images(local_csv).records[0].path == f"s3://{name}/images/brick/brick_001.png"

    assert len(collect_images([f"s3://{name}/images/grass/", f"s3://{name}/images/brick/brick_000.jpg"])) == 5
    with pytest.raises(Exception, match="does not exist"):
        scan_images(f"s3://{name}/nothing-here")


def test_remote_store_changed_meanwhile_is_not_overwritten(bucket: tuple[object, str]) -> None:
    from embedfit.storage.objects import staged_store

    fs, name = bucket
    url = f"s3://{name}/feats.h5"
    fs.pipe(f"{name}/feats.h5", b"first")
    with pytest.raises(StoreError, match="changed by another writer"):  # noqa: SIM117
        with staged_store(url) as local:
            assert local.read_bytes() == b"first"  # downloaded to resume from
            local.write_bytes(b"mine")
            fs.pipe(f"{name}/feats.h5", b"someone else's")
    assert fs.cat(f"{name}/feats.h5") == b"someone else's"


@pytest.mark.slow
def test_extract_fit_predict_report_on_s3(bucket: tuple[object, str], image_tree: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The whole loop on object storage: images and store in the bucket, resumed, read back by every command."""
    from embedfit.cli import main
    from embedfit.extraction.local import extract
    from embedfit.storage import FAILED, FeatureStore

    fs, name = bucket
    _upload_tree(fs, image_tree, f"{name}/images")
    fs.pipe(f"{name}/images/grass/broken.jpg", _jpeg_bytes(1)[:600])  # truncated: a per-file failure
    url = f"s3://{name}/feats.h5"

    assert main(["extract", f"s3://{name}/images", "-o", url, "--workers", "1", "--batch-size", "4"]) == 0
    assert fs.exists(f"{name}/feats.h5") and not list(tmp_path.glob("s3*"))
    store = FeatureStore.open(url)
    assert len(store) == 13 and store.n_ok == 12
    bad = list(store.paths).index("grass/broken.jpg")
    assert store.status[bad] == FAILED and "truncated" in store.errors[bad]
    assert store.attrs["root"] == f"s3://{name}/images"
    assert url in repr(store) and store.summary()["path"] == url

    # the same pixels as from the local files
    local = extract(image_tree, tmp_path / "local.h5", workers=0)
    assert local.embedded == 12
    here = FeatureStore.open(tmp_path / "local.h5")
    rows = [list(store.paths).index(k) for k in here.paths]
    np.testing.assert_allclose(store.features(rows), here.features(), atol=1e-5)

    # resume: two new objects are embedded, the rest reused
    fs.pipe(f"{name}/images/brick/new_a.jpg", _jpeg_bytes(2))
    fs.pipe(f"{name}/images/gravel/new_b.jpg", _jpeg_bytes(3))
    capsys.readouterr()
    summary = extract(f"s3://{name}/images", url, workers=0)
    assert (summary.embedded, summary.reused, summary.failed) == (2, 13, 0), summary.failures
    assert summary.store == url
    store = FeatureStore.open(url)
    assert len(store) == 15 and store.n_ok == 14 and store.complete
    assert extract(f"s3://{name}/images", url, workers=0).embedded == 0  # nothing new: nothing embedded

    # info, fit, predict (a store and images on S3), report read the remote store
    assert main(["info", url]) == 0
    assert url in capsys.readouterr().out
    run = tmp_path / "run"
    assert main(["fit", url, "-o", str(run), "--cv", "2"]) == 0
    meta = json.loads((run / "model.json").read_text())
    assert meta["store"] == url and "testing-secret" not in (run / "model.json").read_text()
    preds = tmp_path / "preds.csv"
    assert main(["predict", str(run), url, "-o", str(preds)]) == 0
    assert preds.read_text().count("\n") == 16
    assert main(["predict", str(run), f"s3://{name}/images/gravel/", f"s3://{name}/images/grass/broken.jpg",
                 "-o", str(preds)]) == 0
    text = preds.read_text()
    assert f"s3://{name}/images/gravel/new_b.jpg" in text and "truncated" in text
    assert main(["report", str(run), "-o", str(tmp_path / "report.html")]) == 0
    assert "Not available: no feature store" not in (tmp_path / "report.html").read_text()


def test_a_sharded_store_travels_with_its_shards(bucket: tuple[object, str], image_tree: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A sharded store on S3: the shards go up before the manifest, and a reader on a fresh machine gets them."""
    from embedfit.extraction.local import extract
    from embedfit.storage import FeatureStore

    fs, name = bucket
    url = f"s3://{name}/feats.h5"
    assert extract(image_tree, url, shard_size=5, workers=0).embedded == 12
    first = sorted(fs.ls(f"{name}/feats.h5.shards", detail=False))
    assert len(first) == 3 and fs.exists(f"{name}/feats.h5")  # 5 + 5 + 2 images

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "another-machine"))  # nothing cached, nothing staged
    store = FeatureStore.open(url)
    local = extract(image_tree, tmp_path / "local.h5", workers=0)
    assert local.embedded == 12 and store.attrs["layout"] == "sharded"
    here = FeatureStore.open(tmp_path / "local.h5")
    assert list(store.paths) == list(here.paths)
    np.testing.assert_allclose(store.features(), here.features(), atol=1e-5)

    # resumed from that machine: one new image is one new shard; the old shards are kept, none is copied twice
    (image_tree / "brick" / "new.jpg").write_bytes(_jpeg_bytes(7))
    summary = extract(image_tree, url, workers=0)
    assert (summary.embedded, summary.reused) == (1, 12)
    fs.invalidate_cache()
    now = sorted(fs.ls(f"{name}/feats.h5.shards", detail=False))
    assert len(now) == 4 and set(first) < set(now)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-third-machine"))
    again = FeatureStore.open(url)
    assert len(again) == 13 and again.complete and again.n_ok == 13


def test_staged_metadata_copies_are_never_uploaded_nor_resumed_from(bucket: tuple[object, str], settings: object,
                                                                    tmp_path: Path) -> None:
    """What a Ray driver keeps of the shards its actors uploaded (metadata copies, committed over) stays on its
    machine: readers get the shards, a staged run replaces the copies by the shards before its writer resumes (or
    deletes those the remote lacks: their images are embedded again), and an upload refuses to put one in a
    shard's place. Written here as the Ray engine does: shard written, uploaded, its copy placed in staging."""
    from test_store_integrity import CLASSES, _records, _write_part

    from embedfit.storage import FeatureStore, ShardedStoreWriter
    from embedfit.storage.manifest import Listing
    from embedfit.storage.objects import cache_dir, staged_store
    from embedfit.storage.schema import features_elided
    from embedfit.storage.shards import metadata_copy, place_metadata_copy
    from embedfit.url import put_file

    fs, name = bucket
    url = f"s3://{name}/feats.h5"
    recs = _records(40, "img")
    feats = np.random.default_rng(0).standard_normal((40, settings.spec.embedding_dim)).astype(np.float32)

    def write(writer: ShardedStoreWriter, rows: slice, upload: bool = True) -> str:
        shard = _write_part(writer, recs[rows], feats[rows])
        if upload:
            put_file(shard, f"{url}.shards/{shard.name}")
        place_metadata_copy(writer.parts, shard.name, metadata_copy(shard))
        return shard.name

    with staged_store(url) as local, ShardedStoreWriter(local, settings, shard_size=10) as writer:
        for a in (0, 10, 20):
            write(writer, slice(a, a + 10))
        writer.commit_listing(Listing.of(recs[:30], CLASSES), complete=True)
    staged = sorted(writer.parts.glob("shard-*.h5"))
    assert len(staged) == 3 and all(features_elided(s) for s in staged)
    first = sorted(fs.ls(f"{name}/feats.h5.shards", detail=False))
    assert len(first) == 3 and fs.exists(url)
    store = FeatureStore.open(url)  # (d) the reader's cache is another folder, of downloaded shards
    np.testing.assert_array_equal(store.features(), feats[:30])
    assert (cache_dir() / "staging") not in store.path.parents
    assert not any(features_elided(s) for s in (store.path.parent / "feats.h5.shards").glob("*.h5"))

    # A run killed before its manifest: one shard uploaded, one not; both copies stay in staging.
    with pytest.raises(RuntimeError, match="killed"):  # noqa: SIM117
        with staged_store(url) as local, ShardedStoreWriter(local, settings, shard_size=10) as writer:
            uploaded, lost = write(writer, slice(30, 35)), write(writer, slice(35, 40), upload=False)
            raise RuntimeError("killed")
    assert features_elided(writer.parts / uploaded) and features_elided(writer.parts / lost)
    manifest = fs.info(url)["ETag"]
    with pytest.raises(StoreError, match="only its metadata copy"):  # noqa: SIM117
        with staged_store(url) as local, ShardedStoreWriter(local, settings, shard_size=10) as writer:
            # (b) the writer resumes from shards with features: the uploaded one downloaded, the lost one embedded
            # again
            assert not any(features_elided(s) for s in writer.parts.glob("shard-*.h5"))
            assert (writer.parts / uploaded).is_file() and not (writer.parts / lost).exists()
            assert [r.key for r in writer.plan(recs).todo] == [r.key for r in recs[35:40]]
            # (a) a copy whose shard the remote lacks is refused at the upload, before anything is put
            refused = write(writer, slice(35, 40), upload=False)
            writer.commit_listing(Listing.of(recs, CLASSES), complete=True)
    fs.invalidate_cache()
    assert fs.info(url)["ETag"] == manifest and not fs.exists(f"{name}/feats.h5.shards/{refused}")


@pytest.mark.ray
def test_ray_engine_reads_images_from_and_writes_its_store_to_s3(bucket: tuple[object, str], shared_tree: Path,
                                                                 shared_store: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 request: pytest.FixtureRequest) -> None:
    """`--engine ray` with the images and the store in a bucket: the actors read objects and upload their shards,
    and the driver commits over their metadata copies: no shard is downloaded (moto's request log says so). The
    cluster is the driver's own (its own temp dir), started with the environment that holds the credentials, as a
    real cluster's nodes have theirs: embedfit never ships credentials to workers."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    from moto.moto_api import recorder

    from embedfit.storage import FeatureStore
    from embedfit.storage.objects import _slot
    from embedfit.storage.schema import features_elided, shards_dir

    pytest.importorskip("ray")
    fs, name = bucket
    _upload_tree(fs, shared_tree, f"{name}/images")
    url = f"s3://{name}/feats.h5"
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_ADDRESS": ""}
    command = [sys.executable, "-m", "embedfit", "extract", f"s3://{name}/images", "-o", url, "--engine", "ray",
               "--ray-workers", "2", "--shard-size", "10"]
    log = tmp_path / "requests.jsonl"
    monkeypatch.setattr(recorder, "_location", str(log))  # the server runs in this process

    def shard_requests(method: str) -> set[str]:
        """The shard objects requested with `method` since the log was reset."""
        entries = [json.loads(line) for line in log.read_text().splitlines()]
        return {e["url"].rpartition("/")[2].partition("?")[0] for e in entries
                if e["method"] == method and "/feats.h5.shards/shard-" in e["url"]}

    def recorded_run() -> None:
        """The command, with the server's requests recorded afresh."""
        recorder.reset_recording()
        recorder.start_recording()
        try:
            run = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env)
        finally:
            recorder.stop_recording()
        assert run.returncode == 0, run.stderr[-3000:]

    recorded_run()
    names = sorted(p.rpartition("/")[2] for p in fs.ls(f"{name}/feats.h5.shards", detail=False))
    assert len(names) == 3  # 10 + 10 + 4 images
    assert shard_requests("PUT") == set(names) and shard_requests("GET") == set()  # uploaded, never downloaded
    staged = shards_dir(_slot("staging", url) / "feats.h5")
    assert sorted(p.name for p in staged.glob("shard-*.h5")) == names
    assert all(features_elided(p) for p in staged.glob("shard-*.h5"))  # the driver's copies: no features
    store, here = FeatureStore.open(url), FeatureStore.open(shared_store)
    assert store.attrs["engine"] == "ray" and store.attrs["root"] == f"s3://{name}/images"
    assert list(store.paths) == list(here.paths) and store.complete
    np.testing.assert_allclose(store.features(), here.features(), atol=1e-5)

    # Resumed on the same URL: the staging copies are replaced by the shards, nothing is embedded or uploaded.
    recorded_run()
    assert shard_requests("PUT") == set() and shard_requests("GET") == set(names)
    assert not any(features_elided(p) for p in staged.glob("shard-*.h5"))
    fs.invalidate_cache()
    assert sorted(p.rpartition("/")[2] for p in fs.ls(f"{name}/feats.h5.shards", detail=False)) == names
    again = FeatureStore.open(url)
    assert list(again.paths) == list(here.paths) and again.complete and again.n_ok == 24
    np.testing.assert_allclose(again.features(), here.features(), atol=1e-5)


def test_workers_reading_object_storage_start_from_a_fork_server(image_tree: Path) -> None:
    """A worker forked from a process whose fsspec/aiobotocore threads hold a lock hangs in its first read (seen
    in the suite); workers that read URLs start from a clean fork server, local files keep the cheap fork."""
    import torch

    from embedfit.backbones.factory import create_backbone
    from embedfit.extraction.reader import ImageDataset, image_loader
    from embedfit.images import ImageRecord

    spec = create_backbone("efficientnet_lite0").spec
    local = [ImageRecord(p, p.name, 0, p.stat().st_size, 0) for p in sorted(image_tree.rglob("*.jpg"))]
    remote = [ImageRecord(f"s3://bucket/{r.key}", r.key, 0, r.size, 0) for r in local]
    cpu = torch.device("cpu")
    assert image_loader(ImageDataset(local, spec), 4, 1, cpu).multiprocessing_context is None
    context = image_loader(ImageDataset(remote, spec), 4, 1, cpu).multiprocessing_context
    assert context is not None and context.get_start_method() == "forkserver"
