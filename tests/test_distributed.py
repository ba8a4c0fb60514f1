"""Extraction and model selection on a local Ray cluster started by the test (2 CPUs)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from embedfit.distributed import extract_ray  # noqa: E402
from embedfit.fit import fit  # noqa: E402
from embedfit.store import FeatureStore  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
             runtime_env={"env_vars": {"EMBEDFIT_OFFLINE": "1"}})
    yield
    ray.shutdown()


def _same(a: Path, b: Path) -> None:
    x, y = FeatureStore.open(a), FeatureStore.open(b)
    assert x.complete and list(x.paths) == list(y.paths) and list(x.labels) == list(y.labels)
    np.testing.assert_allclose(x.features(), y.features(), rtol=1e-5, atol=1e-5)


def test_sharded_extraction_equals_local(shared_tree: Path, shared_store: Path, tmp_path: Path) -> None:
    summary = extract_ray(shared_tree, tmp_path / "ray.h5", num_workers=1, shard_size=5)
    assert (summary.embedded, summary.failed, summary.complete) == (24, 0, True)
    _same(tmp_path / "ray.h5", shared_store)
    store = FeatureStore.open(tmp_path / "ray.h5")
    assert store.attrs["engine"] == "ray" and store.spec == FeatureStore.open(shared_store).spec
    again = extract_ray(shared_tree, tmp_path / "ray.h5", num_workers=1, shard_size=5)  # resume: nothing to do
    assert (again.embedded, again.reused) == (0, 24)


def test_killed_actor_is_retried_without_duplicates(shared_tree: Path, shared_store: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "killed"
    monkeypatch.setenv("EMBEDFIT_TEST_KILL_ACTOR_ONCE", str(marker))
    ray.shutdown()  # restart so the actors inherit the test hook
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"EMBEDFIT_OFFLINE": "1", "EMBEDFIT_TEST_KILL_ACTOR_ONCE": str(marker)}})
    try:
        summary = extract_ray(shared_tree, tmp_path / "ray.h5", num_workers=1, shard_size=6)
    finally:
        ray.shutdown()
        os.environ.pop("EMBEDFIT_TEST_KILL_ACTOR_ONCE", None)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"EMBEDFIT_OFFLINE": "1"}})
    assert marker.exists()  # an actor really died
    assert summary.embedded == 24
    _same(tmp_path / "ray.h5", shared_store)


def test_ray_backend_cv_equals_local_cv(shared_store: Path, tmp_path: Path) -> None:
    local = fit(shared_store, "ridge", cv=3, output=tmp_path / "local")
    on_ray = fit(shared_store, "ridge", cv=3, backend="ray", jobs=2, output=tmp_path / "ray")
    assert on_ray.metrics["scores"]["accuracy"]["folds"] == local.metrics["scores"]["accuracy"]["folds"]
