"""Collections of stores (`embedfit.storage.collection`): read as one store by every reader, checked per member.

Real stores throughout: the texture tree extracted as two CSV parts (one of them sharded) against the whole tree
extracted as one store (`shared_store`), and small stores written by `StoreWriter` for the attacks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tree

from embedfit.backbones.spec import BackboneSpec
from embedfit.cli import main
from embedfit.errors import StoreError, StoreMismatchError, UsageError
from embedfit.images import ImageRecord
from embedfit.storage import OK, FeatureStore, StoreCollection, StoreSettings, StoreWriter, collect

pytestmark = [pytest.mark.fast, pytest.mark.timeout(600)]


def _spec(name: str = "synthetic", dim: int = 8) -> BackboneSpec:
    return BackboneSpec(name=name, architecture=f"test/{name}", weights="random", weights_sha256="",
                        input_size=(8, 8), resize_size=8, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3,
                        embedding_dim=dim)


def _store(path: Path, keys: list[str], labels: list[str], *, root: str, seed: int = 0,
           settings: StoreSettings | None = None) -> np.ndarray:
    """A complete store of the given keys (sorted) and class names per key; returns its features in key order."""
    settings = settings or StoreSettings(_spec())
    order = np.argsort(keys)
    keys, labels = [keys[i] for i in order], [labels[i] for i in order]
    names = sorted(set(labels))
    X = np.random.default_rng(seed).standard_normal((len(keys), settings.spec.embedding_dim)).astype(np.float32)
    records = [ImageRecord(Path(root) / k, k, names.index(c), 100, 1) for k, c in zip(keys, labels, strict=True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with StoreWriter(path, settings, overwrite=True) as w:
        w.write_part(keys, labels, [100] * len(keys), [1] * len(keys), [OK] * len(keys), [""] * len(keys), X)
        w.commit(records, names, complete=True, attrs={"root": root})
    return X


@pytest.fixture
def two_folders(tmp_path: Path) -> dict:
    """Stores of /photos/2019 (cats, dogs) and /photos/2020 (dogs, fish) beside a collection of both."""
    a = _store(tmp_path / "out" / "2019.h5", [f"{c}/{i}.jpg" for c in ("cats", "dogs") for i in range(5)],
               ["cats"] * 5 + ["dogs"] * 5, root="/photos/2019", seed=1)
    b = _store(tmp_path / "out" / "parts" / "2020.h5", [f"{c}/{i}.jpg" for c in ("dogs", "fish") for i in range(4)],
               ["dogs"] * 4 + ["fish"] * 4, root="/photos/2020", seed=2)
    out = tmp_path / "out" / "feats.collection.json"
    collect(out, [tmp_path / "out" / "2019.h5", tmp_path / "out" / "parts" / "2020.h5"])
    return {"collection": out, "X": np.concatenate([a, b]), "folder": tmp_path / "out"}


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture, code: int = 1) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


# --------------------------------------------------------------------------------------------------
# one store, made of members


def test_a_collection_reads_its_members_rows_as_one_store(two_folders: dict) -> None:
    with FeatureStore.open(two_folders["collection"]) as store:
        assert isinstance(store, StoreCollection) and len(store) == 18 and store.complete
        assert store.class_names == ["cats", "dogs", "fish"]  # merged by name, sorted as one store's would be
        assert str(store.root) == "/photos"  # keys under the folder the members' roots share: still one file each
        assert list(store.paths[:2]) == ["2019/cats/0.jpg", "2019/cats/1.jpg"]
        assert store.paths[10] == "2020/dogs/0.jpg" and store.image_path(10) == Path("/photos/2020/dogs/0.jpg")
        names = np.array(store.class_names)[store.labels]
        assert list(names) == ["cats"] * 5 + ["dogs"] * 9 + ["fish"] * 4  # labels re-indexed by name
        X = two_folders["X"]
        np.testing.assert_array_equal(store.features(), X)
        rows = np.array([17, 0, 12, 9, 10, 3])  # across members, unsorted
        np.testing.assert_array_equal(store.features(rows), X[rows])
        np.testing.assert_array_equal(store.features(slice(8, 13)), X[8:13])
        np.testing.assert_array_equal(store.features(slice(1, 18, 4)), X[1:18:4])
        batches = list(store.iter_batches(batch_rows=7))
        np.testing.assert_array_equal(np.concatenate([b for _, b in batches]), X)
        loaded, y, paths = store.load()
        np.testing.assert_array_equal(loaded, X)
        assert list(y[:1]) == ["cats"] and len(paths) == 18
        members = store.summary()["members"]
        assert [m["path"] for m in members] == ["2019.h5", "parts/2020.h5"]
        assert store.verify() == 18
        fp = store.fingerprint
    assert FeatureStore.open(two_folders["collection"]).fingerprint == fp  # derived from the members, stable


def test_a_moved_or_renamed_collection_folder_still_reads(two_folders: dict, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(two_folders["folder"], moved)
    renamed = moved / "renamed.json"
    (moved / "feats.collection.json").rename(renamed)
    with FeatureStore.open(renamed) as store:
        np.testing.assert_array_equal(store.features(), two_folders["X"])


def test_a_missing_swapped_or_changed_member_is_one_line(two_folders: dict, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    folder, collection = two_folders["folder"], str(two_folders["collection"])
    member = folder / "parts" / "2020.h5"
    kept = tmp_path / "kept.h5"
    shutil.move(member, kept)
    err = _one_line_error(["info", collection], capsys)
    assert "member parts/2020.h5 is missing" in err and "embedfit collect" in err
    # Swapped: another store under the member's name.
    _store(member, ["dogs/0.jpg", "dogs/1.jpg"], ["dogs", "dogs"], root="/photos/2020")
    err = _one_line_error(["info", collection], capsys)
    assert "member parts/2020.h5 has 2 rows" in err and "run `embedfit collect` again" in err
    # Changed: the same keys, other labels (a re-extraction after a class was renamed).
    _store(member, [f"{c}/{i}.jpg" for c in ("dogs", "fish") for i in range(4)], ["dogs"] * 4 + ["eels"] * 4,
           root="/photos/2020", seed=2)
    err = _one_line_error(["fit", collection], capsys)
    assert "member parts/2020.h5 has another metadata digest" in err  # labels by index alike, names not
    shutil.move(kept, member)  # the original back: reads again
    assert main(["info", collection]) == 0
    out = capsys.readouterr().out
    assert "member  2019.h5: 10 images, 10 ok" in out and "member  parts/2020.h5: 8 images" in out


def test_mixed_settings_duplicates_and_bad_names_are_refused_in_one_line(two_folders: dict, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    folder = two_folders["folder"]
    other = tmp_path / "other.h5"
    _store(other, ["x/0.jpg", "x/1.jpg"], ["x", "x"], root="/photos/2021", settings=StoreSettings(_spec("resnet")))
    err = _one_line_error(["collect", str(tmp_path / "c.json"), str(folder / "2019.h5"), str(other)], capsys)
    assert f"member {other.relative_to(tmp_path)} has resnet" in err and "but member" in err
    with pytest.raises(StoreMismatchError):  # the one rule: `StoreSettings.differences`, as rows of one store
        collect(tmp_path / "c.json", [folder / "2019.h5", other])
    flipped = tmp_path / "flip.h5"
    _store(flipped, ["x/0.jpg"], ["x"], root="/photos/2021", settings=StoreSettings(_spec(), tta="flip"))
    with pytest.raises(StoreMismatchError, match="tta"):
        collect(tmp_path / "c.json", [folder / "2019.h5", flipped])
    again = tmp_path / "again.h5"  # the 2019 folder extracted a second time: its images would count twice
    _store(again, ["cats/0.jpg", "cats/9.jpg"], ["cats", "cats"], root="/photos/2019")
    err = _one_line_error(["collect", str(tmp_path / "c.json"), str(folder / "2019.h5"), str(again)], capsys)
    assert "both hold image cats/0.jpg" in err and "must not overlap" in err
    assert not (tmp_path / "c.json").exists()
    err = _one_line_error(["collect", str(tmp_path / "c.h5"), str(folder / "2019.h5")], capsys, code=2)
    assert ".json" in err
    with pytest.raises(UsageError, match="given twice"):
        collect(tmp_path / "c.json", [folder / "2019.h5", folder / "2019.h5"])
    with pytest.raises(UsageError, match="is a collection"):
        collect(tmp_path / "c.json", [two_folders["collection"]])
    notes = tmp_path / "notes.json"
    notes.write_text("{}")
    with pytest.raises(UsageError, match="not a store collection"):
        collect(notes, [folder / "2019.h5"])
    with pytest.raises(StoreError, match="not a store collection"):
        FeatureStore.open(notes)


def test_an_edited_collection_file_is_refused(two_folders: dict) -> None:
    path = two_folders["collection"]
    doc = json.loads(path.read_text())
    doc["members"][1]["metadata_sha256"] = "0" * 64
    path.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="another metadata digest"):
        FeatureStore.open(path)
    path.write_text('{"format": "embedfit-collection"')
    with pytest.raises(StoreError, match="not JSON"):
        FeatureStore.open(path)


# --------------------------------------------------------------------------------------------------
# every reader: the texture tree as two CSV parts (one sharded) against the same images as one store


@pytest.fixture(scope="module")
def parts(shared_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`shared_tree`'s images (written again, byte for byte) extracted as two CSV parts: brick and half of grass,
    then the rest of grass and gravel (sharded); collected as one."""
    from embedfit.extraction.local import extract

    base = tmp_path_factory.mktemp("parts")
    tree = write_tree(base / "images", per_class=8, seed=1)
    keys = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*.*"))
    for name, chunk in (("a", keys[:12]), ("b", keys[12:])):
        (tree / f"part-{name}.csv").write_text("path,label\n" + "".join(f"{k},{k.split('/')[0]}\n" for k in chunk))
    extract(tree / "part-a.csv", base / "a.h5", workers=0)
    extract(tree / "part-b.csv", base / "b.h5", workers=0, shard_size=5)
    collection = base / "feats.collection.json"
    collect(collection, [base / "a.h5", base / "b.h5"])
    return {"collection": collection, "base": base}


def test_a_collection_of_parts_equals_the_whole_store(parts: dict, shared_store: Path) -> None:
    with FeatureStore.open(parts["collection"]) as c, FeatureStore.open(shared_store) as whole:
        assert [m.attrs.get("layout") for m in c.members] == [None, "sharded"]
        assert list(c.paths) == list(whole.paths) and c.class_names == whole.class_names
        np.testing.assert_array_equal(c.labels, whole.labels)
        np.testing.assert_allclose(c.features(), whole.features(), atol=1e-5)


def test_fit_on_a_collection_scores_as_on_one_store(parts: dict, shared_store: Path, tmp_path: Path) -> None:
    from embedfit.fitting.evaluate import fit
    from embedfit.fitting.out_of_core import fit_out_of_core

    on_parts = fit(parts["collection"], "ridge", cv=3, output=tmp_path / "parts")
    on_whole = fit(shared_store, "ridge", cv=3, output=tmp_path / "whole")
    for metric in ("accuracy", "balanced_accuracy", "f1_macro"):
        assert on_parts.metrics["scores"][metric] == on_whole.metrics["scores"][metric]
    streamed = [fit_out_of_core(s, "sgd-logreg", output=tmp_path / f"sgd-{i}", batch_rows=8)
                for i, s in enumerate((parts["collection"], shared_store))]
    assert streamed[0].metrics["scores"]["accuracy"] == streamed[1].metrics["scores"]["accuracy"]


def test_predict_audit_and_test_store_accept_a_collection(parts: dict, shared_store: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    from embedfit.auditing import audit

    run = tmp_path / "run"
    assert main(["fit", str(shared_store), "--test-store", str(parts["collection"]), "-o", str(run)]) == 0
    assert main(["predict", str(run), str(parts["collection"]), "-o", str(tmp_path / "p.csv")]) == 0
    out = capsys.readouterr().out
    assert "24 images predicted, 0 failed" in out and "accuracy" in out
    found = audit(parts["collection"], tmp_path / "audit", imagenet="off")
    assert {f["path"] for f in found.findings} <= {str(p) for p in FeatureStore.open(shared_store).paths}
    assert found.settings and (tmp_path / "audit" / "audit.csv").is_file()
    assert main(["extract", str(tmp_path / "images"), "-o", str(tmp_path / "x.json")]) == 2
    assert "collection of stores" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# object storage (moto's S3 server)


def test_a_collection_on_s3_reads_moved_and_names_a_missing_member(bucket: tuple, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    fs, name = bucket
    X = np.concatenate([_store(tmp_path / "2019.h5", ["cats/0.jpg", "dogs/0.jpg"], ["cats", "dogs"],
                               root="s3://photos/2019", seed=1),
                        _store(tmp_path / "2020.h5", ["dogs/0.jpg", "fish/0.jpg"], ["dogs", "fish"],
                               root="s3://photos/2020", seed=2)])
    fs.put(str(tmp_path / "2019.h5"), f"{name}/feats/2019.h5")
    fs.put(str(tmp_path / "2020.h5"), f"{name}/feats/parts/2020.h5")
    url = f"s3://{name}/feats/all.collection.json"
    assert main(["collect", url, f"s3://{name}/feats/2019.h5", f"s3://{name}/feats/parts/2020.h5"]) == 0
    assert [m["path"] for m in json.loads(fs.cat(url))["members"]] == ["2019.h5", "parts/2020.h5"]
    fs.copy(f"{name}/feats", f"{name}/copy", recursive=True)  # the folder moved: members found beside it
    with FeatureStore.open(f"s3://{name}/copy/all.collection.json") as store:
        np.testing.assert_array_equal(store.features(), X)
        assert list(store.paths) == ["2019/cats/0.jpg", "2019/dogs/0.jpg", "2020/dogs/0.jpg", "2020/fish/0.jpg"]
        assert store.url == f"s3://{name}/copy/all.collection.json"
        assert all(m.url.startswith(f"s3://{name}/copy/") for m in store.members)
        local = store.path
    with FeatureStore.open(local) as again:  # its local copy names the members by URL (report, notebook reopen it)
        np.testing.assert_array_equal(again.features(), X)
    fs.rm(f"{name}/copy/parts/2020.h5")
    err = _one_line_error(["info", f"s3://{name}/copy/all.collection.json"], capsys)
    assert "member parts/2020.h5 is missing" in err
    err = _one_line_error(["collect", url, str(tmp_path / "2019.h5")], capsys, code=2)
    assert "is a local file" in err
