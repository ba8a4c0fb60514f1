"""What each entry point imports: the cheap commands must not pay for torch or scikit-learn (not timed here;
benchmarks/bench_startup.py measures the seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

HEAVY = ("torch", "torchvision", "timm", "sklearn")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_embedfit_loads_neither_torch_nor_sklearn() -> None:
    loaded = _modules_after("import embedfit, embedfit.backbones, embedfit.extraction, embedfit.fitting")
    assert not loaded & set(HEAVY)


def test_help_loads_neither_torch_nor_sklearn() -> None:
    code = ("import contextlib, io\nfrom embedfit.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert main(['--help']) == 0\n    assert main(['fit', '--help']) == 0\n"
            "    assert main(['extract', '--help']) == 0")
    assert not _modules_after(code) & set(HEAVY)


def test_info_and_backbones_load_no_torch(shared_store: Path) -> None:
    code = ("import contextlib, io\nfrom embedfit.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    assert main(['info', {str(shared_store)!r}]) == 0\n"
            "    assert main(['backbones']) == 0")
    assert not _modules_after(code) & set(HEAVY)


def test_lazy_names_resolve() -> None:
    import embedfit

    for name in embedfit.__all__:
        assert getattr(embedfit, name) is not None
    assert callable(embedfit.extract) and callable(embedfit.fit) and callable(embedfit.predict)
    with pytest.raises(AttributeError):
        embedfit.no_such_name  # noqa: B018


def test_a_fit_leaves_skops_and_scikit_learn_as_they_ship(shared_store: Path, tmp_path: Path) -> None:
    """embedfit saves and loads models through skops' public API only: no global of skops or scikit-learn is
    swapped or rewritten (an upgrade of either would break such a patch unnoticed), nothing is hidden in
    sys.modules, and skops used directly afterwards trusts scikit-learn's estimators by default, as it does alone."""
    code = ("from embedfit.fitting.evaluate import fit\n"
            f"fit({str(shared_store)!r}, 'logreg', cv=2, output={str(tmp_path / 'run')!r})\n"
            "from embedfit.runs import load_model\nload_model(" + repr(str(tmp_path / "run")) + ")\n"
            "import sys, sklearn.utils, sklearn.utils.discovery, skops.io as sio\n"
            "from skops.io import _general, _trusted_types\n"
            "from sklearn.ensemble import RandomForestClassifier\n"
            "assert sklearn.utils.all_estimators is sklearn.utils.discovery.all_estimators\n"
            "assert type(_trusted_types.SKLEARN_ESTIMATOR_TYPE_NAMES) is list\n"
            "assert _general.SKLEARN_ESTIMATOR_TYPE_NAMES is _trusted_types.SKLEARN_ESTIMATOR_TYPE_NAMES\n"
            "assert 'sklearn.ensemble._forest.RandomForestClassifier' in _trusted_types.SKLEARN_ESTIMATOR_TYPE_NAMES\n"
            "assert not [name for name, module in sys.modules.items() if module is None and 'sklearn' in name]\n"
            "assert sio.get_untrusted_types(data=sio.dumps(RandomForestClassifier())) == [], 'default trust'\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "ok"


# Commands that fail on their arguments, paths, names or outputs: each is refused before torch or scikit-learn is
# imported (benchmarks/bench_startup.py times them against `import torch`).
REFUSED = [
    (["extract", "{tmp}/no/such/folder", "-o", "{tmp}/x.h5"], "does not exist"),
    (["extract", "{tmp}", "-o", "{tmp}/x.h5", "-b", "resnet51"], "did you mean resnet50"),
    (["extract", "{tmp}", "-o", "{tmp}/x.h5", "--weights", "{tmp}/no.pt"], "weights file"),
    (["fit", "{store}", "--model", "svn", "-o", "{tmp}/run"], "did you mean svm"),
    (["fit", "{tmp}/no.h5"], "does not exist"),
    (["fit", "{store}", "--test-size", "0.2", "--test-store", "{store}"], "not both"),
    (["fit", "{store}", "-o", "{store}"], "also an input"),
    (["predict", "{tmp}/no-run", "{tmp}"], "does not exist"),
    (["report", "{tmp}/no-run", "-o", "{tmp}/r.html"], "does not exist"),
    (["classify", "{tmp}/no.jpg"], "does not exist"),
    (["finetune", "{tmp}/no/such/folder"], "does not exist"),
    (["compare", "{tmp}", "-b", "resnt50"], "did you mean resnet50"),
    (["sweep", "{tmp}/no/such/folder", "-o", "{tmp}/sweep"], "does not exist"),
]


def test_refused_commands_import_neither_torch_nor_sklearn(shared_store: Path, tmp_path: Path) -> None:
    calls = [[a.format(tmp=tmp_path, store=shared_store) for a in argv] for argv, _ in REFUSED]
    code = ("import contextlib, io, sys, json\nfrom embedfit.cli import main\nresults = []\n"
            f"for argv in {calls!r}:\n"
            "    err = io.StringIO()\n"
            "    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):\n"
            "        code = main(argv)\n"
            "    heavy = [m for m in " + repr(HEAVY) + " if m in sys.modules]\n"
            "    results.append([code, err.getvalue(), heavy])\n"
            "print(json.dumps(results))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    for (argv, expected), (code, message, heavy) in zip(REFUSED, json.loads(out.stdout.splitlines()[-1]),
                                                        strict=True):
        assert code != 0 and expected in message, (argv, message)
        assert heavy == [], (argv, heavy)  # the modules loaded by the time this refusal (and those before) came
