"""`predict` inputs: every image in a folder whatever its layout, CSV lists, and what it refuses."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from embedfit.cli import main
from embedfit.fitting.evaluate import fit
from embedfit.prediction import predict

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def run(shared_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit(shared_store, "ridge", cv=3, output=tmp_path_factory.mktemp("predict") / "run").run_dir


def test_a_folder_with_sub_folders_is_predicted_whole(run: Path, shared_tree: Path, tmp_path: Path) -> None:
    """Images in the folder itself and in sub-folders: all predicted (no file is skipped as "loose")."""
    new = tmp_path / "new"
    (new / "archive").mkdir(parents=True)
    jpgs = sorted(shared_tree.rglob("*.jpg"))
    for src in jpgs[:3]:
        shutil.copy(src, new / src.name)
    shutil.copy(jpgs[-1], new / "archive" / jpgs[-1].name)
    result = predict(run, [new])
    assert sorted(Path(p).name for p in result.paths) == sorted(p.name for p in [*jpgs[:3], jpgs[-1]])
    assert all(result.predicted)


def test_a_csv_list_is_predicted(run: Path, shared_tree: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    listed = sorted(shared_tree.rglob("*.png"))[:4]
    csv = tmp_path / "new.csv"
    csv.write_text("path\n" + "".join(f"{p}\n" for p in listed))
    assert main(["predict", str(run), str(csv), "-o", str(tmp_path / "p.csv")]) == 0
    assert "4 images predicted, 0 failed" in capsys.readouterr().out
