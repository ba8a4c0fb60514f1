"""Fitting on torch tensors through scikit-learn's array API: the path `embedfit fit --device cuda` takes.

SciPy reads SCIPY_ARRAY_API once, at import, so the tensor path runs in a subprocess that sets it. Torch CPU
tensors go through the same scikit-learn code as CUDA ones; tests/test_gpu.py runs `fit` itself on a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from embedfit.cli import main
from embedfit.errors import UsageError
from embedfit.fitting.device import array_api_ready, resolve_fit_device
from embedfit.fitting.models import make_pipeline
from embedfit.fitting.registry import array_api_names, classifier_names

pytestmark = pytest.mark.fast

TENSOR_SCRIPT = r"""
import json, sys
import numpy as np, skops.io as sio, torch
from sklearn.base import BaseEstimator
from embedfit.fitting.evaluate import _fold, _refit, make_splits
from embedfit.fitting.device import array_api_ready, on_device
from embedfit.fitting.data import load_dataset
from embedfit.fitting.models import make_pipeline
from embedfit.fitting.registry import trusted_types

def tensors_in(obj):
    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, BaseEstimator):
        return sum(tensors_in(v) for v in vars(obj).values())
    if isinstance(obj, (list, tuple)):
        return sum(tensors_in(v) for v in obj)
    if isinstance(obj, dict):
        return sum(tensors_in(v) for v in obj.values())
    return 0

data = load_dataset(sys.argv[1])
X, y = data.X, data.y
splits = make_splits(y, cv=3, repeats=1, groups=None, seed=0)
out = {"ready": array_api_ready(), "cases": []}
for model, kw in [("ridge", {}), ("ridge", {"pca": 8, "scale": "l2"}), ("ridge", {"search": True}),
                  ("logreg", {}), ("logreg", {"pca": 8})]:
    Xt, yt = on_device(X, y, model, "cpu")  # as fit() copies them to a GPU
    pipe = make_pipeline(model, n_samples=len(y), n_features=X.shape[1], array_api=True, **kw)
    reference = make_pipeline(model, n_samples=len(y), n_features=X.shape[1], **kw)  # the CPU pipeline
    tensor = [_fold(pipe, Xt, yt, tr, te) for tr, te in splits]
    same_on_numpy = [_fold(pipe, X, y, tr, te) for tr, te in splits]
    cpu = [_fold(reference, X, y, tr, te) for tr, te in splits]
    final = _refit(pipe, Xt, yt)
    if hasattr(final[-1], "best_estimator_"):  # as fit() ships it
        final.steps[-1] = ("clf", final[-1].best_estimator_)
    path = sys.argv[2] + f"/{model}{len(out['cases'])}.skops"
    sio.dump(final, path)
    test_rows = np.concatenate([te for _, te in splits])
    acc = lambda folds: float(np.mean(np.concatenate([p for p, _, _ in folds]) == y[test_rows]))
    probas = [(a[1], b[1]) for a, b in zip(tensor, same_on_numpy) if a[1] is not None]
    out["cases"].append({
        "case": f"{model} {kw}",
        "types": sorted({type(p).__name__ for fold in tensor for p in fold if p is not None}),
        "agree": float(np.mean(np.concatenate([a[0] == b[0] for a, b in zip(tensor, same_on_numpy)]))),
        "proba_diff": max((float(np.abs(a - b).max()) for a, b in probas), default=0.0),
        "accuracy": acc(tensor), "accuracy_cpu": acc(cpu),
        "tensors_left": tensors_in(final),
        "refit_agree": float(np.mean(final.predict(X) == _refit(pipe, X, y).predict(X))),
        "untrusted": sorted(set(sio.get_untrusted_types(file=path)) - set(trusted_types())),
    })
print(json.dumps(out))
"""


def test_pipelines_fit_on_tensors_like_on_numpy(shared_store: Path, tmp_path: Path) -> None:
    env = {**os.environ, "SCIPY_ARRAY_API": "1"}
    proc = subprocess.run([sys.executable, "-c", TENSOR_SCRIPT, str(shared_store), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ready"]
    for case in out["cases"]:
        assert case["types"] == ["ndarray"], case  # fold results come back as NumPy
        assert case["agree"] >= 0.95 and case["proba_diff"] < 1e-2, case
        assert abs(case["accuracy"] - case["accuracy_cpu"]) <= 0.1, case
        assert case["tensors_left"] == 0 and case["refit_agree"] >= 0.95, case  # saved model is plain NumPy
        assert case["untrusted"] == [], case


def test_array_api_needs_scipy_flag() -> None:
    assert array_api_ready() == (os.environ.get("SCIPY_ARRAY_API") == "1")


def test_fit_device_rules() -> None:
    assert resolve_fit_device("cpu", "ridge") == ("cpu", None)
    for model in classifier_names():
        if model not in array_api_names() or not torch.cuda.is_available():
            assert resolve_fit_device("auto", model)[0] == "cpu"
    with pytest.raises(UsageError, match="logreg, ridge"):
        resolve_fit_device("cuda", "svm")
    with pytest.raises(UsageError, match="unknown fit device"):
        resolve_fit_device("tpu", "ridge")
    with pytest.raises(UsageError, match="cannot be fitted on torch tensors"):
        make_pipeline("rf", array_api=True)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            resolve_fit_device("cuda:0", "ridge")


def test_cli_device_errors_are_one_line(shared_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # Checked before any model is fitted: logreg would run, then svm would fail.
    code = main(["fit", str(shared_store), "-m", "logreg", "-m", "svm", "--device", "cuda"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert not Path("runs").exists()
    code = main(["fit", str(shared_store), "-m", "svm", "--device", "cuda"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "error: svm cannot be fitted on a GPU (models that can: logreg, ridge); use " \
        "--device cpu", err
    code = main(["fit", str(shared_store), "-m", "ridge", "--device", "gpu", "-o", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "unknown fit device 'gpu'" in err, err
    assert not (tmp_path / "run").exists()
