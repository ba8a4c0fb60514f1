"""GPU paths, run where a CUDA GPU exists (skipped elsewhere, including CI): features match the CPU reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from embedfit.extraction.encoder import Encoder
from embedfit.extraction.local import extract
from embedfit.storage import FeatureStore

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image
    from skimage import data

    root = tmp_path_factory.mktemp("gpu")
    for name in ["chelsea", "astronaut", "coffee", "rocket", "cat"]:
        img = Image.fromarray(getattr(data, name)())
        for j, scale in enumerate([1.0, 2.5]):
            img.resize((int(img.width * scale), int(img.height * scale))).save(root / f"{name}_{j}.jpg", quality=92)
    (root / "broken.jpg").write_bytes((root / "chelsea_0.jpg").read_bytes()[:5000])
    return root


def _store(src: Path, out: Path, **options) -> tuple[np.ndarray, np.ndarray, list[str]]:
    extract(src, out, **options)
    store = FeatureStore.open(out)
    return store.features(), store.status, list(store.paths)


def test_gpu_matches_cpu_in_fp32(photos: Path, tmp_path: Path) -> None:
    X_cpu, s_cpu, p_cpu = _store(photos, tmp_path / "cpu.h5", device="cpu", workers=0)
    X_gpu, s_gpu, p_gpu = _store(photos, tmp_path / "gpu.h5", device="cuda", workers=2)
    assert p_cpu == p_gpu and (s_cpu == s_gpu).all() and (s_gpu != 0).sum() == 1
    ok = s_cpu == 0
    cos = cosine(X_cpu[ok], X_gpu[ok])
    assert cos.min() > 0.9999, cos  # cuDNN's algorithms differ from the CPU's; TF32 convolutions round more


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_close_to_fp32(photos: Path, tmp_path: Path, precision: str) -> None:
    X32, s32, _ = _store(photos, tmp_path / "fp32.h5", device="cuda", workers=2)
    Xh, sh, _ = _store(photos, tmp_path / f"{precision}.h5", device="cuda", workers=2, precision=precision)
    ok = s32 == 0
    assert (s32 == sh).all()
    cos = cosine(X32[ok], Xh[ok])
    assert cos.min() > 0.99, cos


def test_nvjpeg_decoding_matches_pil(photos: Path, tmp_path: Path) -> None:
    # nvJPEG decodes at full size; PIL's JPEG draft (DCT downscaling) is off here so both see the same pixels.
    X_pil, s_pil, _ = _store(photos, tmp_path / "pil.h5", device="cuda", workers=2, jpeg_draft=False)
    X_dev, s_dev, _ = _store(photos, tmp_path / "dev.h5", device="cuda", workers=2, decode="device")
    assert (s_pil == s_dev).all()  # the truncated file is still reported, via the PIL fallback
    ok = s_pil == 0
    cos = cosine(X_pil[ok], X_dev[ok])
    assert cos.min() > 0.998, cos


def test_compile_matches_eager(lite0) -> None:
    x = torch.randint(0, 256, (8, 3, 224, 224), dtype=torch.uint8)
    eager = Encoder(lite0, torch.device("cuda"))(x)
    compiled = Encoder(lite0, torch.device("cuda"), compile=True)
    full, short = compiled(x), compiled(x[:3])  # the short batch is padded to the compiled shape
    assert short.shape == (3, eager.shape[1])
    for got, want in ((full, eager), (short, eager[:3])):
        cos = cosine(got, want)
        assert cos.min() > 0.9999, (cos, np.abs(got - want).max())


def test_pretrained_model_on_gpu_still_sees_a_cat(lite0) -> None:
    from skimage import data

    from embedfit.backbones.factory import create_backbone

    model = create_backbone("efficientnet_lite0").cuda()
    pre = model.spec.preprocess()
    from PIL import Image

    x = pre(Image.fromarray(data.chelsea()))[None].cuda()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        top = model.logits(x).float().softmax(1).argmax(1).item()
    assert "cat" in model.class_names[top]


GPU_FIT = r"""
import json, sys
from embedfit.fitting.evaluate import fit
from embedfit.fitting.data import load_dataset
from embedfit.runs import load_model
data, out = load_dataset(sys.argv[1]), {}
for model in ("ridge", "logreg"):
    gpu = fit(sys.argv[1], model, device="auto", output=f"{sys.argv[2]}/{model}-gpu", cv=3)
    cpu = fit(sys.argv[1], model, device="cpu", output=f"{sys.argv[2]}/{model}-cpu", cv=3)
    saved, _ = load_model(f"{sys.argv[2]}/{model}-gpu")  # loads and predicts on the CPU, like any run
    out[model] = {"device": gpu.metrics["device"], "gpu": gpu.score(), "cpu": cpu.score(),
                  "agree": float((saved.predict(data.X) == cpu.pipeline.predict(data.X)).mean())}
print(json.dumps(out))
"""


def test_fit_on_gpu_matches_cpu(shared_store: Path, tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "SCIPY_ARRAY_API": "1"}  # SciPy reads it at import: a fresh process
    proc = subprocess.run([sys.executable, "-c", GPU_FIT, str(shared_store), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for model, r in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        assert r["device"] == "cuda" and abs(r["gpu"] - r["cpu"]) <= 0.1 and r["agree"] >= 0.9, (model, r)
