"""Bad command-line input on every command: one line on stderr, exit 2 (usage) or 1 (runtime), no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedfit.cli import app, main

pytestmark = pytest.mark.fast

# command -> [(arguments, exit code, text the one-line message must contain)]; {store}, {run}, {tmp} are filled in.
CASES: dict[str, list[tuple[list[str], int, str]]] = {
    "extract": [
        ([], 2, "Missing argument"),
        (["{tmp}/nope", "-o", "{tmp}/x.h5"], 1, "does not exist"),
        (["{tmp}/empty", "-o", "{tmp}/x.h5"], 1, "no images found"),
        (["{tmp}", "-o", "{tmp}/x.h5", "--batch-size", "0"], 2, "--batch-size"),
        (["{tmp}", "-o", "{tmp}/x.h5", "--batch-size", "many"], 2, "--batch-size"),
        (["{tmp}", "-o", "{tmp}/x.h5", "--backbone", "resnet5"], 2, "did you mean resnet50"),
        (["{tmp}", "-o", "{tmp}/x.h5", "--precision", "fp8"], 2, "--precision"),
        (["{tmp}", "-o", "{tmp}/x.h5", "--max-failures", "lots"], 2, "--max-failures"),
        (["{tmp}", "-o", "{tmp}/x.h5", "--device", "tpu"], 2, "unknown device"),
        (["{tmp}", "-o", "{tmp}/x.h5", "--precision", "fp16", "--device", "cpu"], 2, "fp16 needs a GPU"),
        (["{tmp}", "-o", "{tmp}/x.h5", "--backbone", "resnet18"], 1, "--weights FILE"),
        (["{tmp}", "-o", "{tmp}/x.h5", "--weights", "{tmp}/missing.pth"], 2, "does not exist"),
        (["{tmp}", "-o", "{tmp}/x.h5", "--pool", "max"], 2, "intermediate"),
        (["{tmp}", "-o", "{store}", "--layer", "blocks.5"], 1, "pass --overwrite"),
        (["{tmp}", "-o", "{tmp}/x.h5", "--engine", "spark"], 2, "--engine"),
        (["{tmp}", "-o", "{tmp}/x.h5", "--engine", "ray", "--ray-workers", "0"], 2, "--ray-workers"),
    ],
    "info": [
        ([], 2, "Missing argument"),
        (["{tmp}/nope.h5"], 1, "does not exist"),
        (["{tmp}/not_a_store.h5"], 1, "cannot read feature store"),
        (["{tmp}/nope.json"], 1, "collection"),
    ],
    "collect": [
        ([], 2, "Missing argument"),
        (["{tmp}/c.json"], 2, "Missing argument"),
        (["{tmp}/c.h5", "{store}"], 2, "must be a .json file name"),
        (["{tmp}/c.json", "{tmp}/nope.h5"], 1, "does not exist"),
        (["{tmp}/c.json", "{store}", "{store}"], 2, "given twice"),
        (["{tmp}/c.json", "{tmp}/not_a_store.h5"], 1, "cannot read feature store"),
    ],
    "backbones": [
        (["a", "b"], 2, "unexpected extra argument"),
    ],
    "fit": [
        ([], 2, "Missing argument"),
        (["{tmp}/nope.h5"], 1, "does not exist"),
        (["{store}", "--model", "svn"], 2, "did you mean svm"),
        (["{store}", "--model", "sgd-logrg"], 2, "did you mean sgd-logreg"),
        (["{store}", "--cv", "1"], 2, "--cv"),
        (["{store}", "--cv", "20", "-o", "{tmp}/r"], 1, "fewer than the 20 CV folds"),
        (["{store}", "--test-size", "2"], 2, "--test-size"),
        (["{store}", "--test-size", "0.3", "--test-store", "{store}", "-o", "{tmp}/r"], 2, "not both"),
        (["{store}", "--pca", "-3"], 2, "--pca"),
        (["{store}", "--jobs", "0", "-o", "{tmp}/r"], 2, "--jobs"),
        (["{store}", "--groups", "(unclosed", "-o", "{tmp}/r"], 2, "regex"),
        (["{store}", "--backend", "spark"], 2, "--backend"),
        (["{store}", "-m", "svm", "-m", "knn", "-o", "{tmp}/r"], 2, "one run directory"),
        (["{store}", "--epochs", "0"], 2, "--epochs"),
        (["{store}", "--model", "sklearn.nope:Thing"], 2, "cannot import sklearn.nope"),
        (["{store}", "--ray-address", "auto", "-o", "{tmp}/r"], 2, "--ray-address needs --backend ray"),
        (["{store}", "--model", "sklearn.linear_model:Nope"], 2, "has no 'Nope'"),
        (["{store}", "--model", "sklearn.linear_model:Ridge"], 2, "not a scikit-learn classifier"),
        (["{store}", "--model", "sklearn.pipeline:Pipeline"], 2, "cannot construct Pipeline()"),
        (["{store}", "--exclude", "{tmp}/nope.csv", "-o", "{tmp}/r"], 1, "exclusions file"),
        (["{store}", "--exclude", "{tmp}/bad.csv", "-o", "{tmp}/r"], 1, "needs 'path' and 'action' columns"),
        (["{store}", "--group-duplicates", "--test-size", "0.3", "-o", "{tmp}/r"], 2, "does not combine"),
    ],
    "predict": [
        ([], 2, "Missing argument"),
        (["{tmp}/norun", "{tmp}"], 1, "does not exist"),
        (["{tmp}", "{tmp}"], 1, "not an embedfit run directory"),
        (["{run}", "{tmp}/nothing.jpg"], 1, "does not exist"),
        (["{run}", "{tmp}/empty"], 1, "no images found"),
        (["{run}", "{tmp}", "--batch-size", "0"], 2, "--batch-size"),
        (["{run}", "{tmp}", "--device", "tpu"], 2, "unknown device"),
        (["{run}", "{tmp}", "-o", "{tmp}"], 2, "is a folder"),  # refused before any image is embedded
        (["{run}", "{tmp}", "-o", "{tmp}/a.jpg/p.csv"], 1, "is a file, not a folder"),
    ],
    "classify": [
        ([], 2, "Missing argument"),
        (["{tmp}/a.jpg", "--top", "0"], 2, "--top"),
        (["{tmp}/a.jpg", "--backbone", "vgg1"], 2, "did you mean"),
        (["{tmp}/a.jpg", "-o", "{tmp}"], 2, "is a folder"),
        (["{tmp}/nothing.jpg"], 1, "does not exist"),
    ],
    "finetune": [
        ([], 2, "Missing argument"),
        (["{tmp}/nope"], 1, "does not exist"),
        (["{tmp}", "--freeze", "half"], 2, "--freeze must be head"),
        (["{tmp}", "--augment", "blur"], 2, "unknown augmentation"),
        (["{tmp}", "--epochs", "0"], 2, "--epochs"),
        (["{tmp}", "--lr-head", "-1"], 2, "--lr-head"),
        (["{tmp}", "--dropout", "1.5"], 2, "--dropout"),
    ],
    "scratch": [
        ([], 2, "Missing argument"),
        (["{tmp}", "--arch", "resnet5"], 2, "did you mean resnet50"),
        (["{tmp}", "--val-size", "3"], 2, "--val-size"),
        (["{tmp}", "--lr", "fast"], 2, "--lr"),
        (["{tmp}/nope"], 1, "does not exist"),
    ],
    "compare": [
        ([], 2, "Missing argument"),
        (["{tmp}", "--sizes", "few"], 2, "--sizes"),
        (["{tmp}/empty"], 1, "no images found"),
        (["{tmp}", "--epochs", "0"], 2, "--epochs"),
        (["{tmp}", "-b", "resnet5"], 2, "did you mean resnet50"),
        (["{tmp}", "--exclude", "{tmp}/nope.csv"], 1, "nope.csv does not exist"),
        (["{tmp}", "--exclude", "{tmp}/bad.csv"], 1, "needs 'path' and 'action' columns"),
    ],
    "sweep": [
        ([], 2, "Missing argument"),
        (["{tmp}/nope", "-o", "{tmp}/sw"], 1, "does not exist"),
        (["{tmp}/empty", "-o", "{tmp}/sw"], 1, "no images found"),
        (["{tmp}", "-o", "{tmp}/sw", "-b", "resnet5"], 2, "did you mean resnet50"),
        (["{tmp}", "-o", "{tmp}/sw", "-m", "svn"], 2, "did you mean svm"),
        (["{tmp}", "-o", "{tmp}/sw", "-m", "sgd-logreg"], 2, "fit_out_of_core"),
        (["{tmp}", "-o", "{tmp}/sw", "--cv", "1"], 2, "--cv"),
        (["{tmp}", "-o", "{tmp}/sw", "--exclude", "{tmp}/nope.csv"], 1, "nope.csv does not exist"),
        (["{tmp}", "-o", "{tmp}/sw", "--exclude", "{tmp}/bad.csv"], 1, "needs 'path' and 'action' columns"),
        (["{tmp}", "-o", "{tmp}/sw", "--group-duplicates", "--test", "{tmp}"], 2, "does not combine with --test"),
    ],
    "audit": [
        ([], 2, "Missing argument"),
        (["{tmp}/nope.h5", "-o", "{tmp}/au"], 1, "does not exist"),
        (["{tmp}/not_a_store.h5", "-o", "{tmp}/au"], 1, "cannot read feature store"),
        (["{store}", "-o", "{tmp}/au", "--threshold", "2"], 2, "--threshold"),
        (["{store}", "-o", "{tmp}/au", "--neighbors", "0"], 2, "--neighbors"),
        (["{store}", "-o", "{tmp}/au", "--test-store", "{store}"], 2, "is the audited store itself"),
        (["{store}", "-o", "{tmp}/au", "--run", "{tmp}/norun"], 1, "does not exist"),
        (["{store}", "-o", "{store}"], 2, "is also an input"),
    ],
    "report": [
        ([], 2, "Missing argument"),
        (["{tmp}/norun"], 1, "does not exist"),
        (["{tmp}"], 1, "not an embedfit run directory"),
        (["{run}", "-o", "{tmp}"], 2, "is a folder"),
    ],
}


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory, shared_store: Path) -> dict[str, str]:
    from embedfit.fitting.evaluate import fit

    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "empty").mkdir()
    (tmp / "not_a_store.h5").write_bytes(b"garbage" * 100)
    (tmp / "a.jpg").write_bytes(b"")
    (tmp / "bad.csv").write_text("path,label\na.jpg,cat\n")  # an exclusions file without an action column
    run = fit(shared_store, "ridge", cv=3, output=tmp / "run").run_dir
    return {"tmp": str(tmp), "store": str(shared_store), "run": str(run)}


def test_every_command_has_error_cases() -> None:
    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert names <= set(CASES), f"commands without bad-input tests: {sorted(names - set(CASES))}"


@pytest.mark.parametrize(("command", "args", "code", "text"),
                         [(c, a, code, t) for c, cases in CASES.items() for a, code, t in cases])
def test_bad_input_is_one_clear_line(command: str, args: list[str], code: int, text: str, places: dict[str, str],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    if command not in {c.name or c.callback.__name__ for c in app.registered_commands}:
        pytest.skip(f"{command} is not a command in this build")
    argv = [command, *(a.format(**places) for a in args)]
    assert main(argv) == code, capsys.readouterr().err
    captured = capsys.readouterr()
    assert text in captured.err, captured.err
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert "Traceback" not in captured.err + captured.out


def test_debug_shows_the_traceback(places: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--debug", "info", places["tmp"] + "/nope.h5"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_library_errors_name_parameters_and_the_cli_shows_flags(shared_store: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """From Python a message names the parameter (`test_size`); the same mistake on the command line, the flag."""
    from embedfit.errors import UsageError
    from embedfit.fitting.evaluate import FitConfig, fit

    with pytest.raises(UsageError) as info:
        fit(shared_store, "ridge", config=FitConfig(test_size=1.5), output=tmp_path / "r")
    assert str(info.value) == "`test_size` must be a fraction between 0 and 1, got 1.5"
    with pytest.raises(UsageError) as info:
        fit(shared_store, "ridge", test_size=0.05, output=tmp_path / "r")
    assert str(info.value).startswith("`test_size` 0.05 gives 2 test images for 3 classes")
    assert "use `test_size` 0.13 or more" in str(info.value) and "--test-size" not in str(info.value)

    assert main(["fit", str(shared_store), "--test-size", "0.05", "-o", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --test-size 0.05 gives 2 test images for 3 classes")
    assert "use --test-size 0.13 or more" in err and "`" not in err
    assert main(["--debug", "fit", str(shared_store), "--test-size", "0.3", "--test-store", str(shared_store),
                 "-o", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.endswith("error: give either --test-store or --test-size, not both\n")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(("argv", "message", "shown"), [
    (["fit", "x.h5"], "give either `test_store` or `test_size`, not both",
     "give either --test-store or --test-size, not both"),
    (["--debug", "predict", "run", "a.jpg"], "`output` p.csv is a folder; pass `weights` FILE",
     "--output p.csv is a folder; pass --weights FILE"),
    # extract names its Ray options as extract_ray() does; fit hands --ray-address to connect(address)
    (["extract", "imgs", "-o", "f.h5"], "`num_workers` and `cpus_per_worker` must be at least 1",
     "--ray-workers and --cpus-per-worker must be at least 1"),
    (["fit", "x.h5"], "`address` auto found no running Ray cluster", "--ray-address auto found no running Ray cluster"),
    (["scratch", "imgs"], "`backbone` resnet5; `freeze` none", "--arch resnet5; `freeze` none"),  # scratch: no --freeze
    (["sweep", "imgs"], "name one in `backbones`", "name one in --backbone"),
    # not a parameter of the command, a whole command, no command: as written
    (["info", "f.h5"], "re-extract it with `embedfit extract ... --overwrite` (`overwrite`)",
     "re-extract it with `embedfit extract ... --overwrite` (`overwrite`)"),
    (["nosuch"], "`test_size`", "`test_size`"),
    ([], "`test_size`", "`test_size`"),
])
def test_name_flags_writes_a_commands_parameters_as_its_flags(argv: list[str], message: str, shown: str) -> None:
    from embedfit.cli.app import name_flags

    assert name_flags(message, argv) == shown


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in app.registered_commands:
        name = command.name or command.callback.__name__
        assert main([name, "--help"]) == 0
        assert "Usage" in capsys.readouterr().out


def test_every_command_is_documented_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    missing = [n for n in names if f"embedfit {n}" not in readme]
    assert not missing, f"commands not shown in README.md: {missing}"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("model", ["ridge", "mlp"])
def test_ctrl_c_during_any_command_says_interrupted(model: str, shared_store: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C (a real SIGINT to this process) in the middle of `fit`: exit 130 and one line saying so. With mlp
    too, whose scikit-learn fit catches Ctrl-C itself and would return a half-trained network."""
    import os
    import signal
    import threading

    # Python's own SIGINT handler, as a fresh `embedfit` process has it (in the full suite an earlier test in this
    # process has been seen to leave another one installed: the fit then ran to the end)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:  # 100 repeated 5-fold CVs with nested grid search: minutes, far longer than the 3 s before the signal
        code = main(["fit", shared_store.as_posix(), "-m", model, "--repeats", "100", "--search", "--jobs", "1",
                     "-o", str(tmp_path / "run")])
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert code == 130
    assert capsys.readouterr().err.strip() == "error: interrupted"
    assert not (tmp_path / "run").exists()
