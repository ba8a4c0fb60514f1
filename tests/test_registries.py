"""The three registries (backbone families, classifiers, engines): entries from outside the package (a family, an
in-memory and a streaming classifier, an engine) are used end to end; the registries import none of their entries; a
skeleton built without initialisation leaves other threads' models initialised."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from embedfit.backbones import registry as backbones
from embedfit.backbones.spec import BackboneInfo
from embedfit.extraction import engines
from embedfit.fitting import registry as classifiers

pytestmark = pytest.mark.fast

# --- a toy backbone family: a tiny random CNN (seeded, so every build is the same network) ---

def _build_toy(name: str, *, weights: Path | None, pretrained: bool, resolution: int | None):
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(6, 4))
    return backbones.BuiltBackbone(model=model, architecture="toy/cnn", weights="seed:0", weights_file=None,
                                   input_size=(32, 32), resize_size=36, interpolation="bilinear",
                                   mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), class_names=None)


def _toy_info(name: str) -> BackboneInfo:
    return BackboneInfo(name, "toy", 6, (32, 32), None, True, params=4 * 6 + 4 + 6 * 3 * 9 + 6)


# --- a toy classifier, and a toy streaming one (fitted out of core) ---

def _build_centroid(ctx: classifiers.BuildContext):
    from sklearn.neighbors import NearestCentroid

    return NearestCentroid()


def _build_perceptron(ctx: classifiers.StreamContext):
    from sklearn.linear_model import Perceptron

    return Perceptron(penalty="l2", alpha=ctx.alpha, eta0=1.0 / ctx.n_features, class_weight=ctx.class_weight,
                      random_state=ctx.seed)


# --- a toy engine: everything in this process, no reader workers ---

class ToyEngine:
    name = "toy"
    shard_size = None

    def __init__(self) -> None:
        self.jobs: list[engines.ExtractJob] = []

    def run(self, job: engines.ExtractJob):
        import torch

        from embedfit.backbones.factory import create_backbone
        from embedfit.extraction.encoder import Encoder, iter_embeddings
        from embedfit.extraction.writer import FeatureWriter
        from embedfit.storage import StoreSettings

        self.jobs.append(job)
        c = job.config
        encoder = Encoder(create_backbone(c.backbone), torch.device("cpu"), channels_last=False)
        settings = StoreSettings(encoder.spec, c.dtype, c.tta, c.precision)
        with FeatureWriter(job.output, settings, job.images, started=job.started) as writer:
            provenance = {"engine": self.name, "device": "cpu", "decode": "pil", "runtime": "torch"}
            writer.set_provenance(**provenance)
            for batch in iter_embeddings(writer.todo, encoder, batch_size=4, workers=0):
                writer.add(batch.records, batch.features, batch.errors)
            writer.commit(**provenance)
        return writer.summary


@pytest.fixture
def toys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register the toys for one test: each registry is a copy, restored afterwards."""
    # embedfit's own entries first, then the copies: entries loaded into a copy would vanish with it, and their
    # modules, imported by then, would not register them again (later tests' backbones would be unknown)
    backbones.list_backbones()
    classifiers.classifier_names()
    monkeypatch.setattr(backbones, "_ENTRIES", dict(backbones._ENTRIES))
    monkeypatch.setattr(classifiers, "_CLASSIFIERS", dict(classifiers._CLASSIFIERS))
    monkeypatch.setattr(engines, "ENGINES", dict(engines.ENGINES))
    backbones.register_backbone("toy_cnn", _build_toy, _toy_info)
    classifiers.register_classifier(classifiers.Classifier(
        "toy-centroid", _build_centroid, {"metric": ["euclidean", "manhattan"]}, types=("toy.CentroidState",)))
    classifiers.register_classifier(classifiers.Classifier(
        "toy-perceptron", stream=classifiers.Streaming(_build_perceptron, calibrate=True),
        types=("toy.PerceptronState",)))
    engines.register_engine("toy", ToyEngine)


def test_a_toy_family_classifier_and_engine_work_end_to_end(toys: None, image_tree: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from embedfit import extract, fit, fit_out_of_core, predict
    from embedfit.cli import main
    from embedfit.errors import UsageError
    from embedfit.runs import load_model
    from embedfit.storage import FeatureStore

    engine = ToyEngine()
    summary = extract(image_tree, tmp_path / "toy.h5", backbone="toy_cnn", engine=engine)
    assert summary.embedded == 12 and summary.complete and len(engine.jobs) == 1 and engine.jobs[0].url is None
    with FeatureStore.open(tmp_path / "toy.h5") as store:
        assert store.dim == 6 and store.spec.architecture == "toy/cnn" and store.attrs["engine"] == "toy"
    # by name, and planned by extract(): nothing left to embed, so the engine is not called
    again = extract(image_tree, tmp_path / "toy.h5", backbone="toy_cnn", engine="toy")
    assert again.device == "no device: nothing to embed"

    result = fit(tmp_path / "toy.h5", "toy-centroid", cv=2, output=tmp_path / "run", search=True)
    assert result.model == "toy-centroid" and "balanced_accuracy" in result.metrics["scores"]
    assert "toy.CentroidState" in classifiers.trusted_types()
    preds = predict(tmp_path / "run", [image_tree], device="cpu")  # re-embeds with the toy family
    assert len(preds.paths) == 12 and set(preds.predicted) <= {"brick", "grass", "gravel"}

    # the streaming toy: the command line sends it out of core because its record streams, 4 rows at a time
    assert "toy-perceptron" in classifiers.classifier_names(streaming=True)
    code = main(["fit", str(tmp_path / "toy.h5"), "-m", "toy-perceptron", "--epochs", "3", "--batch-rows", "4",
                 "-o", str(tmp_path / "ooc")])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "ooc" / "metrics.json").read_text())
    assert metrics["model"] == "toy-perceptron" and metrics["evaluation"]["out_of_core"] is True
    assert "log_loss" in metrics["scores"]  # `calibrate`: temperature-scaled probabilities over its decisions
    assert "toy.PerceptronState" in classifiers.trusted_types()
    assert set(classifiers.CALIBRATION_TYPES) <= set(classifiers.trusted_types())
    pipeline, meta = load_model(tmp_path / "ooc")  # through the allow-list
    assert meta["model"] == "toy-perceptron" and meta["params"]["batch_rows"] == 4
    assert type(pipeline[-1].estimator.estimator).__name__ == "Perceptron"
    preds = predict(tmp_path / "ooc", [image_tree], device="cpu")
    assert len(preds.paths) == 12 and preds.proba is not None and preds.proba.shape == (12, 3)
    np.testing.assert_allclose(preds.proba.sum(axis=1), 1.0, rtol=1e-6)
    # each record is fitted its own way only, with a one-line pointer to the other
    with pytest.raises(UsageError, match="streams the store"):
        fit(tmp_path / "toy.h5", "toy-perceptron", cv=2)
    with pytest.raises(UsageError, match=r"fitted in memory.*toy-perceptron"):
        fit_out_of_core(tmp_path / "toy.h5", "toy-centroid")

    assert "toy_cnn" in backbones.list_backbones("toy*")
    assert backbones.backbone_info("toy_cnn").family == "toy"
    with pytest.raises(Exception, match="`num_workers` does not apply to engine toy"):
        engines.create_engine("toy", num_workers=2)


def test_unknown_names_are_one_line_errors_with_suggestions() -> None:
    from embedfit.errors import UsageError

    with pytest.raises(UsageError, match="did you mean logreg"):
        classifiers.get_classifier("logrg")
    with pytest.raises(UsageError, match="did you mean ray"):
        engines.create_engine("rayy")


def test_the_registries_import_none_of_their_entries() -> None:
    """Names are checkable without torch or scikit-learn: the CLI refuses a typo at once."""
    code = ("import sys, json\n"
            "from embedfit.backbones.registry import check_backbone_name\n"
            "from embedfit.extraction.engines import engine_names\n"
            "from embedfit.fitting.registry import classifier_names, trusted_types\n"
            "check_backbone_name('timm:resnet18'); names = classifier_names(); types = trusted_types()\n"
            "streaming = classifier_names(streaming=True)\n"
            "print(json.dumps([engine_names(), names, streaming, sorted(sys.modules)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    engine_list, names, streaming, modules = json.loads(out.stdout)
    assert engine_list == ["local", "ray"] and names[0] == "logreg" and "svm" in names
    assert streaming == ["sgd-logreg", "sgd-svm"] and set(streaming) <= set(names)
    assert not {"torch", "sklearn", "timm", "torchvision", "ray"} & set(modules)
    assert not {"embedfit.extraction.local", "embedfit.extraction.ray",
                "embedfit.backbones.torchvision_models"} & set(modules)


def test_a_skeleton_leaves_a_model_built_meanwhile_in_another_thread_initialised() -> None:
    """`skeleton` skips initialisation in its own thread only (a torch function mode), not process-wide."""
    import torch
    from torch import nn

    from embedfit.backbones.factory import skeleton

    torch.manual_seed(0)
    reference = nn.Linear(64, 32).weight.detach().clone()
    built: dict[str, torch.Tensor] = {}

    def other_thread() -> None:
        torch.manual_seed(0)
        built["weight"] = nn.Linear(64, 32).weight.detach().clone()

    def build() -> nn.Module:
        torch.zeros(2).tolist()  # a size computed with a tensor: the meta device cannot, the CPU path runs
        model = nn.Linear(1000, 1000)
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()  # while this thread's skeleton is being built
        return model

    model = skeleton(build)
    assert model.weight.shape == (1000, 1000) and model.weight.device.type == "cpu"
    assert torch.equal(built["weight"], reference)
    torch.manual_seed(0)  # and in this thread, after the skeleton, initialisation is back
    assert torch.equal(nn.Linear(64, 32).weight, reference)
