"""Attacks on outputs, model files and option values: each is refused in one line, and nothing the user had is lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

import embedfit
from embedfit.cli import main
from embedfit.errors import InputError, ModelFileError, OutputError, UsageError, check_output_not_input
from embedfit.extraction.settings import ExtractConfig, MaxFailures, cap_workers, resolve_device
from embedfit.fitting.evaluate import fit
from embedfit.prediction import predict
from embedfit.runs import load_model, model_binding
from tests.test_fit import blobs, synthetic_store

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[1]


def _store(path: Path, k: int = 3, seed: int = 0) -> Path:
    X, y = blobs(n=60, d=8, k=k, seed=seed)
    return synthetic_store(path, X, y, ["a", "b", "c"][:k]).path


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, Path]:
    store = _store(tmp_path / "s.h5")
    return fit(store, "ridge", output=tmp_path / "run", cv=3).run_dir, store


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------------------------------
# 1. outputs are checked against inputs, by resolved path


def test_outputs_that_are_inputs_are_refused(run: tuple[Path, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, store = run
    before = {p: p.read_bytes() for p in (store, *run_dir.iterdir())}
    link = tmp_path / "link.h5"
    link.symlink_to(store)
    (tmp_path / "sub").mkdir()
    attacks = [
        ["predict", str(run_dir), str(store), "-o", str(store)],
        ["predict", str(run_dir), str(store), "-o", str(tmp_path / "sub" / ".." / "s.h5")],  # `..`
        ["predict", str(run_dir), str(link), "-o", str(store)],  # a symlink to the same file
        ["predict", str(run_dir), str(store), "-o", str(run_dir / "model.skops")],
        ["predict", str(run_dir), str(store), "-o", str(run_dir / "new.csv")],  # inside the run read
        ["report", str(run_dir), "-o", str(run_dir / "model.json")],
        ["fit", str(store), "-o", str(store)],
    ]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        attacks.append(["predict", str(run_dir), "s.h5", "-o", "./s.h5"])  # relative paths
        for argv in attacks:
            assert main(argv) == 2, argv
            err = _one_line_error(capsys)
            assert "is also an input" in err or "inside the run directory" in err or "is an existing" in err, err
    finally:
        os.chdir(cwd)
    assert {p: p.read_bytes() for p in before} == before  # nothing the user had is lost


def test_an_image_is_never_overwritten_by_an_output(image_tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pic = next(image_tree.glob("brick/*.jpg"))
    data = pic.read_bytes()
    assert main(["classify", str(pic), "-o", str(pic)]) == 2  # refused before any model is loaded
    assert "is also an input" in _one_line_error(capsys)
    assert main(["extract", str(image_tree), "-o", str(pic)]) == 2
    assert "image file inside the input folder" in _one_line_error(capsys)
    assert pic.read_bytes() == data
    # an output store or CSV inside the image folder is an ordinary thing to ask for
    assert check_output_not_input(image_tree / "feats.h5", [image_tree]) == image_tree / "feats.h5"
    assert check_output_not_input(image_tree / "brick" / "preds.csv", [image_tree])


def test_training_outputs_may_not_be_the_data_folder(image_tree: Path) -> None:
    from embedfit.training.compare import compare
    from embedfit.training.finetune import train

    with pytest.raises(UsageError, match="also an input"):
        train(image_tree, output=image_tree, epochs=1)
    with pytest.raises(UsageError, match="also an input"):
        compare(image_tree, image_tree / "sub" / "..", epochs=1)
    assert sorted(p.name for p in image_tree.iterdir()) == ["brick", "grass", "gravel"]


# ---------------------------------------------------------------------------------------------------
# 2. model.json is bound to its model file


def test_reversed_class_names_are_refused(run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, store = run
    meta = json.loads((run_dir / "model.json").read_text())
    meta["class_names"] = meta["class_names"][::-1]
    (run_dir / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match=r"class names .* were changed"):
        predict(run_dir, [store])
    assert main(["predict", str(run_dir), str(store), "-o", str(run_dir.parent / "p.csv")]) == 1
    _one_line_error(capsys)


def test_a_model_file_from_another_run_is_refused(tmp_path: Path) -> None:
    three = fit(_store(tmp_path / "s3.h5"), "ridge", output=tmp_path / "three", cv=3).run_dir
    two = fit(_store(tmp_path / "s2.h5", k=2), "ridge", output=tmp_path / "two", cv=3).run_dir
    (three / "model.skops").write_bytes((two / "model.skops").read_bytes())
    with pytest.raises(ModelFileError, match="SHA-256 differs"):
        load_model(three)
    # a run without the binding (pre-release embedfit, or model.json edited) is refused, not trusted
    meta = json.loads((two / "model.json").read_text())
    for key in ("model_sha256", "n_classes", "class_names_sha256"):
        broken = {k: v for k, v in meta.items() if k != key}
        (two / "model.json").write_text(json.dumps(broken))
        with pytest.raises(ModelFileError, match=r"does not bind the model file.*refit the run"):
            load_model(two)


# ---------------------------------------------------------------------------------------------------
# 3. a tampered model whose sidecar was rewritten too cannot crash the process

TAMPER = """
import json, sys
import skops.io as sio
from sklearn.tree._tree import Tree
from embedfit.fitting.registry import trusted_types
from embedfit.runs import model_binding
run = sys.argv[1]
pipe = sio.load(f"{run}/model.skops", trusted=list(trusted_types()))
est = pipe.steps[-1][1]
for tree in est.estimators_:
    state = tree.tree_.__getstate__()
    state["nodes"]["left_child"][0] = 10**12
    state["nodes"]["feature"][0] = 10**12
    new = Tree(tree.tree_.n_features, tree.tree_.n_classes, tree.tree_.n_outputs)
    new.__setstate__(state)
    tree.tree_ = new
sio.dump(pipe, f"{run}/model.skops")
meta = json.load(open(f"{run}/model.json"))
meta.update(model_binding(f"{run}/model.skops", meta["class_names"]))
json.dump(meta, open(f"{run}/model.json", "w"))
"""


def test_a_tampered_tree_is_refused_not_a_segfault(tmp_path: Path) -> None:
    store = _store(tmp_path / "s.h5")
    run_dir = fit(store, "rf", output=tmp_path / "run", cv=3).run_dir
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", TAMPER, str(run_dir)], check=True, env=env, timeout=120)
    proc = subprocess.run([sys.executable, "-m", "embedfit", "predict", str(run_dir), str(store), "-o",
                           str(tmp_path / "p.csv")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert proc.stderr.count("\n") == 1 and "tampered" in proc.stderr and "child indices" in proc.stderr


# ---------------------------------------------------------------------------------------------------
# 4. --max-failures has one grammar


@pytest.mark.parametrize(("text", "expected"), [
    ("10", MaxFailures(count=10)), ("0", MaxFailures(count=0)), (3, MaxFailures(count=3)),
    ("0.2", MaxFailures(fraction=0.2)), ("1.0", MaxFailures(fraction=1.0)), (".5", MaxFailures(fraction=0.5)),
    ("20%", MaxFailures(fraction=0.2)), ("100%", MaxFailures(fraction=1.0)), ("0%", MaxFailures(fraction=0.0)),
    (0.25, MaxFailures(fraction=0.25)), (None, None),
])
def test_max_failures_grammar(text: object, expected: MaxFailures | None) -> None:
    assert MaxFailures.parse(text) == expected
    assert ExtractConfig(max_failures=text).max_failures == expected


@pytest.mark.parametrize("text", ["1.5", "-1", "120%", "ten", "1e3", "", "nan", 1.5, -2, True])
def test_max_failures_refuses_the_rest(text: object, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UsageError):
        MaxFailures.parse(text)
    if isinstance(text, str):
        assert main(["extract", "nowhere", "-o", "x.h5", "--max-failures", text]) == 2
        assert "--max-failures" in _one_line_error(capsys)


def test_a_fraction_is_judged_against_the_images_to_embed() -> None:
    assert MaxFailures.parse("0%").exceeded(1, 1000)  # 0 and 0% abort on the first failure
    assert MaxFailures.parse("0").exceeded(1, 1000)
    assert not MaxFailures.parse("20%").exceeded(1, 10)  # one early failure is not 20% of 10
    assert MaxFailures.parse("20%").exceeded(3, 10)  # 3 of 10 can never end at or below 20%
    assert not MaxFailures.parse("100%").exceeded(40, 40) and not MaxFailures.parse("1.0").exceeded(40, 40)


def _garbage(root: Path, good: int, junk: int) -> Path:
    from PIL import Image

    (root / "a").mkdir(parents=True)
    for i in range(good):
        Image.new("RGB", (40, 40), (i * 20, 90, 200)).save(root / "a" / f"img_{i:02d}.png")
    for i in range(junk):
        (root / "a" / f"junk_{i:02d}.jpg").write_text("<html>")
    return root


def test_zero_percent_aborts_at_the_first_failure_and_100_percent_never(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    folder = _garbage(tmp_path / "imgs", good=0, junk=6)
    for limit in ("100%", "1.0"):
        assert main(["extract", str(folder), "-o", str(tmp_path / f"{limit}.h5"), "--workers", "0",
                     "--batch-size", "2", "--max-failures", limit]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["extract", str(folder), "-o", str(tmp_path / "zero.h5"), "--workers", "0", "--batch-size", "2",
                 "--max-failures", "0%"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err[0].startswith("error: aborted: 2 of 2 images failed (limit 0 of 6 images)"), err


# ---------------------------------------------------------------------------------------------------
# 5. absurd values


def test_decoding_workers_are_capped_by_cores_and_work() -> None:
    from embedfit.extraction.settings import available_cores

    cores = available_cores()
    assert cap_workers(1000, 1000) == (2 * cores, f"decoding with {2 * cores} workers instead of 1000: at most 2 "
                                                  f"per core ({cores} cores here)")
    assert cap_workers(min(100, 2 * cores), 1) == (1, "")  # 40 images are one handover: one worker
    assert cap_workers(0, 5) == (0, "")


def test_workers_1000_does_not_fork_1000_processes(image_tree: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["extract", str(image_tree), "-o", str(tmp_path / "f.h5"), "--workers", "1000"]) == 0
    assert "instead of 1000" in capsys.readouterr().err


def test_out_of_range_repeats_and_sizes_are_refused(run: tuple[Path, Path], image_tree: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from embedfit.training.compare import compare

    _, store = run
    assert main(["fit", str(store), "--repeats", "1000000", "-o", str(tmp_path / "r")]) == 2
    _one_line_error(capsys)
    with pytest.raises(UsageError, match="between 1 and 100"):
        fit(store, "ridge", output=tmp_path / "r", repeats=1000)
    for sizes in ("0,-3", "5,x", "-3"):
        assert main(["compare", str(image_tree), "--sizes", sizes, "-o", str(tmp_path / "c")]) == 2
        assert "--sizes" in _one_line_error(capsys)
    with pytest.raises(UsageError, match="`sizes` must be positive"):
        compare(image_tree, tmp_path / "c", sizes=[0, -3])
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------------------------------
# 6. messages


def _unwritable() -> Path:
    for folder in (Path("/sys"), Path("/proc")):
        try:
            os.rmdir(tempfile.mkdtemp(dir=folder))
        except OSError:
            return folder
    pytest.skip("no folder this process cannot write in")


def test_an_unwritable_run_directory_is_refused_before_the_cv(run: tuple[Path, Path],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    _, store = run
    target = _unwritable() / "embedfit-run"
    assert main(["fit", str(store), "-o", str(target)]) == 1
    err = _one_line_error(capsys)
    assert err.startswith(f"error: cannot write run directory {target}") and "unexpected" not in err
    with pytest.raises(OutputError):
        from embedfit.errors import check_output_dir

        check_output_dir(target)


def test_unsupported_devices_are_refused() -> None:
    for device in ("meta", "xla", "nonsense"):
        with pytest.raises(UsageError, match=f"unknown device '{device}'"):
            resolve_device(device)


def test_a_refused_model_pt_never_advises_weights_only_false(tmp_path: Path) -> None:
    import torch

    from embedfit.training.finetune import load_finetuned

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"head.weight": torch.zeros(2, 4), "x": np.dtype("float32")}, run_dir / "model.pt")
    from embedfit.backbones.spec import BackboneSpec

    spec = BackboneSpec(name="efficientnet_lite0", architecture="x", weights="random", weights_sha256="",
                        input_size=(224, 224), resize_size=256, interpolation="bilinear", mean=(0.5,) * 3,
                        std=(0.5,) * 3, embedding_dim=4)
    meta = {"kind": "torch", "spec": spec.to_dict(), "params": {}, "class_names": ["a", "b"],
            "embedfit_version": embedfit.__version__,
            **model_binding(run_dir / "model.pt", ["a", "b"])}
    (run_dir / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError) as info:
        load_finetuned(run_dir, device="cpu")
    message = str(info.value)
    assert "weights_only" not in message and "\n" not in message and "refusing to unpickle" in message, message


def test_a_class_folder_linked_to_another_class_is_refused(image_tree: Path) -> None:
    from embedfit.images import scan_images

    (image_tree / "stones").symlink_to(image_tree / "gravel", target_is_directory=True)
    with pytest.raises(InputError, match=r"class folders 'gravel' and 'stones' .* are the same folder"):
        scan_images(image_tree)


def test_finetune_into_a_file_fails_before_training(image_tree: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "FILE"
    blocker.write_text("x")
    for command in ("finetune", "scratch", "compare"):
        assert main([command, str(image_tree), "-o", str(blocker / "run")]) == 2
        err = _one_line_error(capsys)
        assert f"{blocker} is a file" in err and "unexpected" not in err


def test_a_network_with_another_class_count_is_refused(tmp_path: Path) -> None:
    """model.json bound to its model.pt, but the network's head has another class count: checked after loading."""
    import torch

    from embedfit.backbones.factory import create_backbone
    from embedfit.training.finetune import Classifier, load_finetuned

    backbone = create_backbone("efficientnet_lite0", pretrained=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save(Classifier(backbone, 2).state_dict(), run_dir / "model.pt")
    meta = {"kind": "torch", "spec": backbone.spec.to_dict(), "params": {}, "class_names": ["a", "b", "c"],
            "embedfit_version": embedfit.__version__, **model_binding(run_dir / "model.pt", ["a", "b", "c"])}
    (run_dir / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match=r"2-class head but its model\.json lists 3 class names"):
        load_finetuned(run_dir, device="cpu")


FORMULAS = ['=HYPERLINK("http://evil.example","click")', "+1+1", "-2+3", "@SUM(A1)", "\tx", "'quoted"]


def test_csv_cells_are_escaped_against_formula_injection(tmp_path: Path) -> None:
    """Class folders named like formulas (OWASP: leading =, +, -, @, tab, CR): every CSV embedfit writes shows
    them as text in a spreadsheet, and embedfit reads its own files back to the same names."""
    import csv

    from embedfit.report import build_report, read_run
    from embedfit.runs import csv_value

    X, y = blobs(n=72, d=8, k=len(FORMULAS))
    store = synthetic_store(tmp_path / "s.h5", X, y, FORMULAS).path
    run_dir = fit(store, "ridge", output=tmp_path / "run", cv=3).run_dir
    predict(run_dir, [store]).write(tmp_path / "predicted.csv")
    for written in (run_dir / "predictions.csv", tmp_path / "predicted.csv"):
        with open(written, newline="", encoding="utf-8") as f:
            cells = [cell for row in csv.reader(f) for cell in row]
        assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")], written
        assert {csv_value(c) for c in cells} >= set(FORMULAS)  # the label column, back as written
    rows = read_run(run_dir).predictions
    assert {r["label"] for r in rows} == set(FORMULAS) and all(r["path"].rsplit("/", 1)[0] in FORMULAS for r in rows)
    assert all(isinstance(r["row"], str) and not r["row"].startswith("'") for r in rows)  # numbers stay numbers
    build_report([run_dir], tmp_path / "report.html")
    assert "&quot;http://evil.example&quot;" in (tmp_path / "report.html").read_text()
