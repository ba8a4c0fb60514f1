"""The ONNX Runtime CPU path gives PyTorch's features (within float tolerance), and falls back safely."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from embedfit.backbones.factory import Backbone, create_backbone
from embedfit.cli import main
from embedfit.errors import UsageError
from embedfit.extraction.encoder import Encoder, embed_images
from embedfit.extraction.local import extract
from embedfit.extraction.onnx import _cache_key, cache_dir, onnx_available, resolve_runtime
from embedfit.extraction.settings import default_workers
from embedfit.storage import FeatureStore

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not onnx_available(), reason="needs embedfit[onnx]")]
CPU = torch.device("cpu")


def images_of(tree: Path) -> list[Path]:
    return sorted(p for p in tree.rglob("*") if p.is_file())


def test_onnx_features_equal_pytorch_features_on_real_images(shared_tree: Path, lite0: Backbone) -> None:
    paths = images_of(shared_tree)
    reference, _ = embed_images(paths, lite0, device="cpu", runtime="torch")
    fast, errors = embed_images(paths, lite0, device="cpu", runtime="onnx")
    assert not any(errors)
    np.testing.assert_allclose(fast, reference, rtol=1e-4, atol=1e-4)


def test_onnx_flip_tta_and_odd_batch_sizes(lite0: Backbone) -> None:
    x = torch.randint(0, 256, (5, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    torch_flip = Encoder(lite0, CPU, tta="flip", runtime="torch")(x)
    onnx = Encoder(lite0, CPU, tta="flip", runtime="onnx")
    assert onnx.runtime == "onnx"
    np.testing.assert_allclose(onnx(x), torch_flip, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(onnx(x[:1]), torch_flip[:1], rtol=1e-4, atol=1e-4)  # batch 1 (dynamic axis)


def test_graph_is_exported_once_and_a_damaged_cache_file_is_replaced(lite0: Backbone) -> None:
    Encoder(lite0, CPU, runtime="onnx")
    graph = cache_dir() / f"{_cache_key(lite0)}.onnx"
    assert graph.stat().st_size > 1_000_000
    mtime = graph.stat().st_mtime_ns
    Encoder(lite0, CPU, runtime="onnx")
    assert graph.stat().st_mtime_ns == mtime  # loaded, not exported again
    graph.write_bytes(b"half a graph")
    encoder = Encoder(lite0, CPU, runtime="onnx")
    assert encoder.runtime == "onnx" and graph.stat().st_size > 1_000_000


def test_intermediate_layer_runs_in_onnx(lite0: Backbone) -> None:
    mid = create_backbone("efficientnet_lite0", layer="blocks.4")
    x = torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    np.testing.assert_allclose(Encoder(mid, CPU, runtime="onnx")(x), Encoder(mid, CPU, runtime="torch")(x),
                               rtol=1e-4, atol=1e-4)


class _DataDependent(nn.Module):
    """A real model that torch.export cannot capture: its branch depends on the pixel values."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).mean((2, 3))
        if y.sum() > 0:
            return y
        return -y


def test_a_model_that_cannot_be_exported_falls_back_to_pytorch(lite0: Backbone) -> None:
    import dataclasses

    spec = dataclasses.replace(lite0.spec, name="branchy", weights="random", weights_sha256="", embedding_dim=8)
    model = Backbone(_DataDependent(), spec)
    auto = Encoder(model, CPU, runtime="auto")
    assert auto.runtime == "torch" and "cannot run" in auto.note
    x = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    assert auto(x).shape == (2, 8)
    with pytest.raises(UsageError, match="cannot run"):
        Encoder(model, CPU, runtime="onnx")


def test_a_failed_export_is_remembered(lite0: Backbone) -> None:
    import dataclasses

    spec = dataclasses.replace(lite0.spec, name="branchy_file", weights="file:branchy.pt", weights_sha256="ab" * 32,
                               embedding_dim=8)
    model = Backbone(_DataDependent(), spec)
    first = Encoder(model, CPU, runtime="auto")
    marker = cache_dir() / f"{_cache_key(model)}.failed"
    assert first.runtime == "torch" and marker.exists() and "cannot run" in marker.read_text()
    again = Encoder(model, CPU, runtime="auto")  # no second attempt: the reason comes from the marker
    assert again.runtime == "torch" and "remembered in" in again.note


def test_runtime_choice() -> None:
    assert resolve_runtime("auto", CPU) == "onnx"
    assert resolve_runtime("auto", CPU, precision="bf16") == "torch"
    assert resolve_runtime("auto", torch.device("cuda")) == "torch"
    assert resolve_runtime("torch", CPU) == "torch"
    with pytest.raises(UsageError, match="fp32 on the CPU only"):
        resolve_runtime("onnx", CPU, precision="bf16")
    with pytest.raises(UsageError, match="unknown runtime"):
        resolve_runtime("tensorrt", CPU)


def test_decoding_workers_follow_the_runtime() -> None:
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip("one core: decoding runs in the main process")
    assert default_workers(CPU, "torch") == 1  # PyTorch's threads leave no room for a second decoder
    assert default_workers(CPU, "onnx") == min(cores, 8)  # ONNX Runtime's threads sleep between batches


def test_extract_records_the_runtime_and_matches_pytorch(shared_tree: Path, tmp_path: Path) -> None:
    fast = extract(shared_tree, tmp_path / "onnx.h5", workers=0, runtime="onnx")
    ref = extract(shared_tree, tmp_path / "torch.h5", workers=0, runtime="torch")
    assert fast.runtime == "onnx" and ref.runtime == "torch"
    a, b = FeatureStore.open(fast.store), FeatureStore.open(ref.store)
    assert a.attrs["runtime"] == "onnx" and b.attrs["runtime"] == "torch"
    assert a.spec == b.spec  # the same features: stores stay comparable and resumable across runtimes
    np.testing.assert_allclose(a.features(), b.features(), rtol=1e-4, atol=1e-4)


def test_a_store_completed_by_runs_on_two_runtimes_records_both(shared_tree: Path, tmp_path: Path) -> None:
    """Resuming with another runtime is allowed (same features within tolerance); the provenance says so."""
    import csv

    first = tmp_path / "first.csv"
    with first.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        for path in sorted(shared_tree.rglob("*.jpg"))[:4]:
            writer.writerow([path, path.parent.name])
    out = tmp_path / "mixed.h5"
    extract(first, out, workers=0, runtime="torch")
    assert FeatureStore.open(out).attrs["runtime"] == "torch"
    extract(first, out, workers=0, runtime="onnx")  # nothing to embed: the rows are still PyTorch's
    assert FeatureStore.open(out).attrs["runtime"] == "torch"
    more = tmp_path / "more.csv"
    pngs = sorted(shared_tree.rglob("*.png"))[:3]
    more.write_text(first.read_text() + "".join(f"{p},{p.parent.name}\n" for p in pngs))
    summary = extract(more, out, workers=0, runtime="onnx")
    assert (summary.reused, summary.embedded) == (4, 3)
    attrs = FeatureStore.open(out).attrs
    assert (attrs["runtime"], attrs["engine"]) == ("torch+onnx", "local")


def test_cli_refuses_onnx_with_bf16(shared_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["extract", str(shared_tree), "-o", str(tmp_path / "f.h5"), "--runtime", "onnx",
                 "--precision", "bf16"])
    err = capsys.readouterr().err
    assert code == 2 and "fp32 on the CPU only" in err and "Traceback" not in err
    assert not (tmp_path / "f.h5").exists()
    assert os.environ["XDG_CACHE_HOME"] in str(cache_dir())  # tests never write the user's cache


def test_cli_says_when_it_exports_and_only_then(shared_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "fresh-cache"))
    assert main(["extract", str(shared_tree), "-o", str(tmp_path / "a.h5"), "--workers", "0"]) == 0
    first = capsys.readouterr()
    assert "exporting efficientnet_lite0" in first.err and "with ONNX Runtime" in first.out
    assert main(["extract", str(shared_tree), "-o", str(tmp_path / "b.h5"), "--workers", "0"]) == 0
    assert "exporting" not in capsys.readouterr().err  # cached
