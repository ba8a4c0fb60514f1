"""The analysis notebook executes end to end on a small store and run."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import nbformat
import pytest

from embedfit.fitting.cv import fit

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "analysis.ipynb"


@pytest.mark.timeout(300)
def test_analysis_notebook_runs(shared_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nbclient import NotebookClient

    # The `make demo` layout, and the kernel started in notebooks/ as Jupyter does: the defaults must find it.
    repo = tmp_path / "repo"
    (repo / "runs" / "demo").mkdir(parents=True)
    (repo / "notebooks").mkdir()
    shutil.copy(shared_store, repo / "runs" / "demo" / "train.h5")
    fit(repo / "runs" / "demo" / "train.h5", "logreg", cv=3, output=repo / "runs" / "train-logreg")
    monkeypatch.delenv("EMBEDFIT_STORE", raising=False)
    monkeypatch.delenv("EMBEDFIT_RUN", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed without outputs
    # the kernel runs this interpreter, so it sees the same embedfit and environment
    client = NotebookClient(nb, timeout=240, kernel_name="python3",
                            resources={"metadata": {"path": str(repo / "notebooks")}})
    os.environ.setdefault("JUPYTER_PLATFORM_DIRS", "1")
    client.kernel_manager_kwargs = {"kernel_cmd": [sys.executable, "-m", "ipykernel_launcher", "-f",
                                                   "{connection_file}"]}
    client.execute()
    texts = [o.get("text", "") for c in nb.cells for o in c.get("outputs", [])]
    assert any("ridge, 3-fold CV accuracy" in t for t in texts)
