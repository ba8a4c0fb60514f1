"""Shared fixtures: isolated caches, offline mode, small real image folders, the default backbone."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ["EMBEDFIT_OFFLINE"] = "1"  # never reach for a network in tests
os.environ["HF_HUB_OFFLINE"] = "1"


TIERS = ("fast", "slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test module names its tier (`pytestmark = pytest.mark.fast` or `slow`): `make test` runs the tests not
    marked slow (a test of a fast module may be marked slow itself), `make test-all` and CI run every tier."""
    untiered = sorted({item.path.name for item in items if not any(item.get_closest_marker(t) for t in TIERS)})
    if untiered:
        raise pytest.UsageError(f"test modules without a tier (pytestmark = pytest.mark.fast or slow): "
                                f"{', '.join(untiered)}")


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point every model cache at an empty temp folder, so tests see a fresh machine."""
    root = tmp_path_factory.getbasetemp() / "caches"
    monkeypatch.setenv("TORCH_HOME", str(root / "torch"))
    monkeypatch.setenv("HF_HOME", str(root / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hf" / "hub"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(root / "xdg"))


def _texture_crops(n: int, seed: int) -> dict[str, list[np.ndarray]]:
    """n random RGB crops per skimage texture (brick, grass, gravel): real images, three classes."""
    from skimage import data

    rng = np.random.default_rng(seed)
    out = {}
    for name in ("brick", "grass", "gravel"):
        img = getattr(data, name)()
        crops = []
        for _ in range(n):
            size = int(rng.integers(96, 160))
            y, x = rng.integers(0, img.shape[0] - size), rng.integers(0, img.shape[1] - size)
            crop = img[y:y + size, x:x + size]
            tint = rng.uniform(0.8, 1.2, size=3)
            crops.append(np.clip(crop[..., None] * tint, 0, 255).astype(np.uint8))
        out[name] = crops
    return out


def write_tree(root: Path, per_class: int = 4, seed: int = 0) -> Path:
    """A class-per-subfolder tree of JPEG and PNG texture crops."""
    for cls, crops in _texture_crops(per_class, seed).items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i, crop in enumerate(crops):
            ext = "png" if i % 2 else "jpg"
            Image.fromarray(crop).save(root / cls / f"{cls}_{i:03d}.{ext}", quality=90)
    return root


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """A fresh, writable 3-class tree (12 images) per test."""
    return write_tree(tmp_path / "images")


@pytest.fixture(scope="session")
def shared_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only 3-class tree (24 images) shared by tests that do not modify it."""
    return write_tree(tmp_path_factory.mktemp("shared") / "images", per_class=8, seed=1)


@pytest.fixture(scope="session")
def lite0():
    """The default backbone, loaded once per session."""
    from embedfit.backbones.factory import create_backbone

    return create_backbone("efficientnet_lite0")


@pytest.fixture(scope="session")
def settings(lite0):
    """The default backbone's `StoreSettings`, for tests that write stores with `StoreWriter` directly."""
    from embedfit.storage import StoreSettings

    return StoreSettings(lite0.spec)


@pytest.fixture(scope="session")
def shared_store(shared_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished store of `shared_tree` with the default backbone (do not modify)."""
    from embedfit.extraction.local import extract

    out = tmp_path_factory.mktemp("store") / "feats.h5"
    extract(shared_tree, out, workers=0)
    return out


# --------------------------------------------------------------------------------------------------
# object storage: moto's S3 server (test_remote.py, test_distributed.py)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free local port; s3fs (and any subprocess) finds it through the environment."""
    s3fs = pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    # fsspec keeps one filesystem per set of options, and the endpoint comes from the environment, so a filesystem
    # cached by an earlier test module would still talk to that module's (stopped) server.
    s3fs.S3FileSystem.clear_instance_cache()
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                           "FSSPEC_S3_ENDPOINT_URL": endpoint}.items():
            mp.setenv(key, value)
        try:
            yield endpoint
        finally:
            server.stop()


_BUCKETS = iter(range(10_000))


@pytest.fixture
def bucket(s3_endpoint: str) -> tuple[object, str]:
    """(s3fs filesystem, bucket name): a fresh bucket per test."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True)
    name = f"embedfit-test-{next(_BUCKETS)}"
    fs.mkdir(name)
    return fs, name


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A folder with a short path in /tmp (Ray's socket paths have a length limit, which pytest's `tmp_path` can
    exceed), removed after the test: Ray's session folders would otherwise fill /tmp run after run."""
    path = Path(tempfile.mkdtemp(prefix="ef", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
