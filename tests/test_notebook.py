"""The analysis notebook executes end to end on a small store and run."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest

from embedfit.fitting.evaluate import fit

pytestmark = pytest.mark.fast

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
    assert any("store train.h5 and run train-logreg belong together" in t for t in texts)


def _client(nb: nbformat.NotebookNode, cwd: Path) -> Any:
    from nbclient import NotebookClient

    os.environ.setdefault("JUPYTER_PLATFORM_DIRS", "1")
    client = NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    client.kernel_manager_kwargs = {"kernel_cmd": [sys.executable, "-m", "ipykernel_launcher", "-f",
                                                   "{connection_file}"]}
    return client


def test_notebook_has_parameters_and_uses_the_public_api_only() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code"  # papermill injects its values after this cell
    assert "STORE =" in tagged[0].source and "RUN =" in tagged[0].source
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "embedfit.fit import" not in code and "make_splits" not in code and "embedfit.store" not in code
    assert "training accuracy" not in code  # a score on the training images reads like a result


@pytest.mark.timeout(300)
def test_notebook_says_clearly_when_the_store_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nbclient.exceptions import CellExecutionError

    monkeypatch.delenv("EMBEDFIT_STORE", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    # as papermill does: the injected values in a cell right after the parameters cell
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(f"STORE = {str(tmp_path / 'nope.h5')!r}"))
    with pytest.raises(CellExecutionError, match=r"feature store .*nope\.h5 does not exist: set STORE"):
        _client(nb, tmp_path).execute()


@pytest.mark.timeout(300)
def test_make_notebook_runs_it_on_a_users_store_and_run(shared_store: Path, tmp_path: Path) -> None:
    """`make notebook STORE=... RUN=...` as a user runs it, through papermill (the `[notebook]` extra)."""
    import subprocess

    pytest.importorskip("papermill")
    run = fit(shared_store, "ridge", cv=3, output=tmp_path / "my-run").run_dir
    root = NOTEBOOK.parents[1]
    out = tmp_path / "out" / "analysis.ipynb"
    env = {**os.environ, "MPLBACKEND": "Agg", "JUPYTER_PLATFORM_DIRS": "1"}
    # The Makefile's own recipe, with this interpreter's environment instead of .venv.
    recipe = subprocess.run(["make", "-n", "-s", "-C", str(root), "notebook", f"STORE={shared_store}",
                             f"RUN={run}", f"NB_OUT={out}", "BIN=" + str(Path(sys.executable).parent),
                             "VENV=" + str(tmp_path)], capture_output=True, text=True, env=env)
    papermill = next(line for line in recipe.stdout.splitlines() if "papermill" in line)
    assert f"-p RUN {run}" in papermill and f"-p STORE {shared_store}" in papermill
    out.parent.mkdir()
    done = subprocess.run(papermill, shell=True, cwd=root, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    texts = [o.get("text", "") for c in nbformat.read(out, as_version=4).cells for o in c.get("outputs", [])]
    assert any("belong together" in t for t in texts) and any("ridge, 3-fold CV accuracy" in t for t in texts)
