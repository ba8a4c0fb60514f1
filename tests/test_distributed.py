"""Scale-out: extraction and model selection on a local Ray cluster started by the test (2 CPUs), and
out-of-core SGD fitting (no Ray needed)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from embedfit.cli import main
from embedfit.fitting.evaluate import fit
from embedfit.fitting.out_of_core import fit_out_of_core
from embedfit.runs import load_model
from embedfit.storage import FeatureStore

pytestmark = pytest.mark.slow

KILL_HOOK = "EMBEDFIT_TEST_KILL_ACTOR_ONCE"  # the first embedding call on the cluster exits hard, once
KILL_LISTING = "EMBEDFIT_TEST_KILL_LISTING_ONCE"  # the same for the first listing task


@pytest.fixture(scope="module")
def ray(tmp_path_factory: pytest.TempPathFactory):
    ray = pytest.importorskip("ray")
    marker = tmp_path_factory.mktemp("ray") / "killed"
    # Our own cluster in our own temp dir (short: Ray's socket paths have a length limit); ray.shutdown() stops
    # what ray.init started in this process, never another engineer's cluster.
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True, _temp_dir=temp,
             runtime_env={"env_vars": {"EMBEDFIT_OFFLINE": "1", KILL_HOOK: str(marker),
                                       KILL_LISTING: str(marker.with_name("listing-killed"))}})
    ray.kill_marker = marker
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def _same(a: Path, b: Path) -> None:
    x, y = FeatureStore.open(a), FeatureStore.open(b)
    assert x.complete and list(x.paths) == list(y.paths) and list(x.labels) == list(y.labels)
    np.testing.assert_allclose(x.features(), y.features(), rtol=1e-5, atol=1e-5)


@pytest.mark.ray
def test_sharded_extraction_equals_local_despite_a_killed_actor(ray, shared_tree: Path, shared_store: Path,
                                                                tmp_path: Path) -> None:
    from embedfit.extraction.ray import extract_ray

    summary = extract_ray(shared_tree, tmp_path / "ray.h5", num_workers=2, shard_size=5)
    assert ray.kill_marker.exists()  # an actor really died mid-shard and Ray restarted it
    assert ray.kill_marker.with_name("listing-killed").exists()  # and a listing task's worker, retried
    assert (summary.embedded, summary.failed, summary.complete) == (24, 0, True)
    _same(tmp_path / "ray.h5", shared_store)  # no duplicates, no losses, same order, same features
    store = FeatureStore.open(tmp_path / "ray.h5")
    # The workers wrote the shards (5 + 5 + 5 + 5 + 4 rows), each with its provenance; the driver the manifest.
    shards = sorted((tmp_path / "ray.h5.shards").glob("shard-*.h5"))
    assert store.attrs["layout"] == "sharded" and len(shards) == 5
    assert json.loads(store.attrs["shards"]) == [p.name for p in shards]
    local = FeatureStore.open(shared_store)
    assert store.attrs["engine"] == "ray" and store.spec == local.spec
    # The actors' runtime, as the local run (same default) records it, not a guess.
    assert (store.attrs["runtime"], store.attrs["decode"]) == (local.attrs["runtime"], "pil")
    again = extract_ray(shared_tree, tmp_path / "ray.h5", num_workers=1, shard_size=5)  # resume: nothing to do
    assert (again.embedded, again.reused) == (0, 24)
    assert FeatureStore.open(tmp_path / "ray.h5").attrs["runtime"] == local.attrs["runtime"]


@pytest.mark.ray
def test_the_driver_never_imports_torch_and_a_finished_folder_starts_no_actors(ray, shared_tree: Path,
                                                                              shared_store: Path,
                                                                              tmp_path: Path) -> None:
    # A fresh driver process on the fixture's cluster: the spec comes from the actors, the driver stays small.
    address = ray.get_runtime_context().gcs_address
    code = ("import sys, json; from embedfit.extraction.ray import extract_ray; "
            f"a = extract_ray({str(shared_tree)!r}, {str(tmp_path / 'r.h5')!r}, address={address!r}, num_workers=2,"
            " shard_size=10); "
            f"b = extract_ray({str(shared_tree)!r}, {str(tmp_path / 'r.h5')!r}, address={address!r}); "
            "print(json.dumps({'torch': 'torch' in sys.modules, 'a': [a.embedded, a.startup_seconds, a.seconds], "
            "'b': [b.embedded, b.reused, b.device]}))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "EMBEDFIT_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["torch"] is False
    embedded, startup, seconds = out["a"]
    assert embedded == 24 and 0 < startup < seconds  # start-up (actors loading their models) is reported apart
    assert out["b"] == [0, 24, "no device: nothing to embed"]
    _same(tmp_path / "r.h5", shared_store)


@pytest.mark.ray
def test_ray_resume_sees_vanished_changed_and_new_images_and_a_csv_is_listed_by_parts(ray, tmp_path: Path) -> None:
    from conftest import write_tree

    from embedfit.extraction.local import extract
    from embedfit.extraction.ray import extract_ray, stop_workers
    from embedfit.storage import MISSING

    stop_workers(ray.get_runtime_context().gcs_address)  # an earlier test's warm actors hold the cluster's CPUs
    tree = write_tree(tmp_path / "images", per_class=4)
    out = tmp_path / "r.h5"
    assert extract_ray(tree, out, num_workers=2, shard_size=4).embedded == 12
    (tree / "brick" / "brick_000.jpg").unlink()
    changed = tree / "grass" / "grass_001.png"
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    (tree / "new").mkdir()  # a new class folder, between the others in key order
    (tree / "new" / "n.jpg").write_bytes((tree / "gravel" / "gravel_000.jpg").read_bytes())
    again = extract_ray(tree, out, num_workers=2, shard_size=4)
    assert (again.embedded, again.reused, again.missing, again.total) == (2, 10, 1, 12)
    extract(tree, tmp_path / "local.h5", workers=0)
    store, local = FeatureStore.open(out), FeatureStore.open(tmp_path / "local.h5")
    assert store.class_names == local.class_names == ["brick", "grass", "gravel", "new"]
    ok = store.status != MISSING
    assert list(np.asarray(store.paths)[~ok]) == ["brick/brick_000.jpg"]
    assert list(np.asarray(store.paths)[ok]) == list(local.paths) and list(store.labels[ok]) == list(local.labels)
    np.testing.assert_allclose(store.features()[ok], local.features(), rtol=1e-5, atol=1e-5)

    listed = tmp_path / "list.csv"  # a CSV, unsorted, with a repeated row: the same rows as one scan gives
    rows = [(f"images/{p}", p.split("/")[0]) for p in reversed(list(local.paths))]
    with open(listed, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows, rows[0]])
    extract_ray(listed, tmp_path / "csv.h5", num_workers=2, shard_size=4)
    extract(listed, tmp_path / "csv_local.h5", workers=0)
    _same(tmp_path / "csv.h5", tmp_path / "csv_local.h5")
    assert not list((tmp_path / "csv.h5.shards").glob("listing-*"))  # the listings go once committed


@pytest.mark.ray
def test_a_killed_ray_driver_loses_only_its_unfinished_shards(ray, tmp_path: Path) -> None:
    from conftest import write_tree

    from embedfit.extraction.ray import extract_ray, stop_workers

    stop_workers(ray.get_runtime_context().gcs_address)  # an earlier test's warm actors hold the cluster's CPUs
    tree = write_tree(tmp_path / "images", per_class=16, seed=5)
    out = tmp_path / "r.h5"
    code = ("from embedfit.extraction.ray import extract_ray; "
            f"extract_ray({str(tree)!r}, {str(out)!r}, address={ray.get_runtime_context().gcs_address!r}, "
            "num_workers=2, shard_size=4, batch_size=2, keep_warm=0)")
    driver = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "EMBEDFIT_OFFLINE": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = Path(f"{out}.shards")
    deadline = time.monotonic() + 240
    while not (shards.is_dir() and list(shards.glob("shard-*.h5"))) and time.monotonic() < deadline:
        time.sleep(0.05)
    driver.kill()  # SIGKILL: no commit, no clean-up
    driver.wait()
    left = sorted(p.name for p in shards.glob("shard-*.h5"))
    assert left and not out.exists() and list(shards.glob("listing-*.h5"))  # shards and listings, no manifest
    again = extract_ray(tree, out, num_workers=2, shard_size=4)
    assert again.complete and again.reused + again.embedded == 48 and again.reused >= 4 * len(left) - 4
    store = FeatureStore.open(out)
    assert len(store) == 48 and len(set(store.paths)) == 48 and store.n_ok == 48
    assert not list(shards.glob("listing-*"))  # the killed run's listings went with the next run's commit


def _warm(ray) -> dict[str, int]:
    """The warm actors on the fixture's cluster: name -> process id."""
    from embedfit.extraction.ray import WARM_NAMESPACE

    pids = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] == WARM_NAMESPACE:
            with contextlib.suppress(ValueError, ray.exceptions.RayActorError):  # stopped since listed
                pids[a["name"]] = ray.get(ray.get_actor(a["name"], namespace=WARM_NAMESPACE).info.remote())["pid"]
    return pids


@pytest.mark.ray
def test_a_second_run_on_a_long_lived_cluster_takes_the_warm_actors(ray, shared_tree: Path, shared_store: Path,
                                                                   tmp_path: Path) -> None:
    # Each run is a user's command: a fresh driver process on the fixture's cluster (a long-lived one).
    address = ray.get_runtime_context().gcs_address

    def run(out: str, workers: int, keep_warm: float, batch_size: int) -> dict:
        code = ("import json; from embedfit.extraction.ray import extract_ray; "
                f"s = extract_ray({str(shared_tree)!r}, {str(tmp_path / out)!r}, address={address!r}, "
                f"num_workers={workers}, keep_warm={keep_warm}, batch_size={batch_size}, shard_size=10); "
                "print(json.dumps({'phases': s.startup_phases, 'notes': s.notes, 'embedded': s.embedded}))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "EMBEDFIT_OFFLINE": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = run("a.h5", 1, 60, 8)
    assert {"cluster", "actor start", "actor imports", "model load"} <= set(first["phases"])
    assert first["embedded"] == 24 and "0 of 1 Ray actors were warm" in first["notes"][0]
    warm = _warm(ray)
    assert len(warm) == 1  # the actor outlived its driver

    second = run("b.h5", 1, 60, 8)  # same settings: the same actor, its model already loaded
    assert "model load" not in second["phases"] and "actor imports" not in second["phases"]
    assert "1 of 1 Ray actors were warm" in second["notes"][0] and _warm(ray) == warm
    _same(tmp_path / "b.h5", shared_store)

    # Other settings never take those actors; the cluster's 2 CPUs hold one idle warm actor, so the run stops it
    # rather than wait for its idle timeout. Its own actors exit by themselves after 3 idle seconds.
    other = run("c.h5", 2, 3, 4)
    assert "0 of 2 Ray actors were warm" in other["notes"][0] and "model load" in other["phases"]
    after = _warm(ray)
    assert len(after) == 2 and not set(after) & set(warm) and not set(after.values()) & set(warm.values())
    deadline = time.monotonic() + 60
    while _warm(ray) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _warm(ray)
    _same(tmp_path / "c.h5", shared_store)

    run("d.h5", 1, 600, 8)
    assert len(_warm(ray)) == 1
    stop = _embedfit("ray", "stop-workers", "--ray-address", address, env={})
    assert stop.returncode == 0 and "stopped 1 warm embedfit actor" in stop.stdout, stop.stderr
    assert not _warm(ray)


@pytest.mark.ray
def test_a_node_that_cannot_load_the_model_is_named_in_one_line(shared_tree: Path, tmp_path: Path,
                                                                short_tmp: Path) -> None:
    pytest.importorskip("ray")
    broken = tmp_path / "site"  # a node whose timm is broken: the actors' import fails, not the driver's
    (broken / "timm").mkdir(parents=True)
    (broken / "timm" / "__init__.py").write_text("raise ImportError('timm is broken on this node')\n")
    ray_tmp = short_tmp  # our own local cluster, stopped with its driver
    run = _embedfit("extract", str(shared_tree), "-o", str(tmp_path / "f.h5"), "--engine", "ray",
                    env={"RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": "", "PYTHONPATH": str(broken),
                         "EMBEDFIT_OFFLINE": "1"}, timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    assert f"Ray node {socket.gethostname()} cannot run embedfit" in run.stderr
    assert "timm is broken on this node" in run.stderr and "Traceback" not in run.stderr
    # One error line (Ray may add its own warnings, e.g. about token authentication, before it).
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == run.stderr.strip().splitlines()[-1] and not (tmp_path / "f.h5").exists()


@pytest.mark.ray
def test_ray_options_that_do_not_apply_are_one_line_errors(ray, shared_tree: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "f.h5"
    for extra in (["--workers", "2"], ["--device", "cuda"], ["--device", "mps"]):
        assert main(["extract", str(shared_tree), "-o", str(out), "--engine", "ray", *extra]) == 2
        err = capsys.readouterr().err
        assert extra[0] in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def _embedfit(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "embedfit", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env})


@pytest.mark.ray
def test_a_stale_ray_cluster_file_fails_in_seconds(shared_tree: Path, tmp_path: Path, short_tmp: Path) -> None:
    pytest.importorskip("ray")
    ray_tmp = short_tmp
    (ray_tmp / "ray").mkdir()
    with socket.socket() as s:  # a port nothing listens on: the cluster that wrote the file is gone
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    (ray_tmp / "ray" / "ray_current_cluster").write_text(dead)
    start = time.monotonic()
    run = _embedfit("extract", str(shared_tree), "-o", str(tmp_path / "f.h5"), "--engine", "ray",
                    env={"RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": ""})
    assert run.returncode == 2, run.stderr
    assert "ray_current_cluster" in run.stderr and dead in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and time.monotonic() - start < 90  # model load included
    run = _embedfit("extract", str(shared_tree), "-o", str(tmp_path / "f.h5"), "--engine", "ray", "--ray-address",
                    dead, env={"RAY_TMPDIR": str(ray_tmp)})
    assert run.returncode == 2 and "no Ray cluster answers" in run.stderr, run.stderr


@pytest.mark.ray
def test_warm_actors_need_a_long_lived_cluster(shared_tree: Path, tmp_path: Path, short_tmp: Path) -> None:
    pytest.importorskip("ray")
    env = {"RAY_TMPDIR": str(short_tmp), "RAY_ADDRESS": ""}  # no cluster runs here
    run = _embedfit("ray", "stop-workers", env=env)
    assert run.returncode == 2 and "no Ray cluster runs on this machine" in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    run = _embedfit("extract", str(shared_tree), "-o", str(tmp_path / "f.h5"), "--engine", "ray", "--ray-keep-warm",
                    "60", env=env)
    assert run.returncode == 2 and "--ray-keep-warm needs a long-lived Ray cluster" in run.stderr, run.stderr
    assert not (tmp_path / "f.h5").exists()


@pytest.mark.ray
def test_fit_takes_a_ray_address_and_ray_client_needs_its_extra(shared_store: Path, tmp_path: Path) -> None:
    import importlib.util

    pytest.importorskip("ray")
    if importlib.util.find_spec("grpc") is not None:
        pytest.skip("Ray Client is installed here")
    run = _embedfit("fit", str(shared_store), "-m", "ridge", "--backend", "ray", "--ray-address",
                    "ray://127.0.0.1:10001", "-o", str(tmp_path / "run"), env={})
    assert run.returncode == 2 and "pip install 'ray[client]'" in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


@pytest.mark.ray
def test_ray_backend_cv_equals_local_cv(ray, shared_store: Path, tmp_path: Path) -> None:
    local = fit(shared_store, "ridge", cv=3, output=tmp_path / "local")
    on_ray = fit(shared_store, "ridge", cv=3, backend="ray", jobs=2, output=tmp_path / "ray")
    assert on_ray.metrics["scores"]["accuracy"]["folds"] == local.metrics["scores"]["accuracy"]["folds"]


class _CountingStore(FeatureStore):
    """A real store that records how many rows each feature read asks for."""

    reads: list[int]

    def features(self, rows=None, **kwargs):  # type: ignore[no-untyped-def]
        out = super().features(rows, **kwargs)
        self.reads.append(len(out))
        return out


@pytest.mark.parametrize("model", ["sgd-logreg", "sgd-svm"])
def test_out_of_core_sgd_streams_and_writes_a_normal_run(model: str, shared_store: Path, tmp_path: Path) -> None:
    store = _CountingStore.open(shared_store)
    store.reads = []
    result = fit_out_of_core(store, model, output=tmp_path / "ooc", epochs=10, batch_rows=8, test_size=0.5)
    assert store.reads and max(store.reads) <= 8  # never more than batch_rows in memory
    reference = fit(shared_store, "logreg", test_size=0.5, output=tmp_path / "ref")

    assert sorted(p.name for p in result.run_dir.iterdir()) == sorted(p.name for p in reference.run_dir.iterdir())
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    ref_metrics = json.loads((reference.run_dir / "metrics.json").read_text())
    assert set(metrics) == set(ref_metrics) and metrics["evaluation"]["strategy"] == "holdout"
    expected_scores = set(ref_metrics["scores"]) if model == "sgd-logreg" else {"accuracy", "balanced_accuracy",
                                                                               "f1_macro"}
    assert set(metrics["scores"]) == expected_scores
    assert metrics["scores"]["balanced_accuracy"]["mean"] >= 0.75  # 3 classes: chance is 0.33
    with open(result.run_dir / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(reference.run_dir / "predictions.csv", newline="") as f:
        ref_rows = list(csv.DictReader(f))
    assert len(rows) == 12 and list(rows[0]) == (list(ref_rows[0]) if model == "sgd-logreg" else
                                                 ["path", "row", "label", "predicted", "correct", "fold"])

    pipeline, meta = load_model(result.run_dir)  # the skops allow-list accepts it
    assert (meta["kind"], meta["model"]) == ("sklearn", model)
    full = FeatureStore.open(shared_store)
    X, y, _ = full.load()
    assert (pipeline.predict(X) == y).mean() >= 0.9  # refit on every image; one label space


def test_out_of_core_fit_cli(shared_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["fit", str(shared_store), "-m", "sgd-logreg", "--epochs", "3", "--batch-rows", "16",
                 "-o", str(tmp_path / "run")])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "model.json").read_text())["params"]["epochs"] == 3
    assert main(["fit", str(shared_store), "-m", "sgd-logreg", "--epochs", "0"]) == 2


def test_ray_engine_without_ray_says_how_to_install(shared_tree: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    code = main(["extract", str(shared_tree), "-o", str(tmp_path / "f.h5"), "--engine", "ray"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'embedfit[ray]'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "f.h5").exists()
