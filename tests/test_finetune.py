"""Fine-tuning, scratch and as-is classification, on real images with real models."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from embedfit.cli import main
from embedfit.errors import UsageError
from embedfit.training.classify import classify
from embedfit.training.finetune import (
    Classifier,
    TrainConfig,
    apply_freeze,
    backbone_blocks,
    load_finetuned,
    load_split,
    train,
)

pytestmark = pytest.mark.slow

FAST = dict(epochs=2, batch_size=8, val_size=0.5, augment=("flip",), device="cpu")


@pytest.fixture(scope="module")
def split(shared_tree: Path, lite0):
    return load_split(shared_tree, lite0.spec, val_size=0.5, seed=0)


def test_classify_puts_chelsea_in_a_cat_class(tmp_path: Path) -> None:
    from skimage.data import chelsea

    path = tmp_path / "chelsea.jpg"
    Image.fromarray(chelsea()).save(path, quality=92)
    rows = classify([path], top=3)
    assert rows[0]["rank"] == 1 and "cat" in rows[0]["class"] and rows[0]["probability"] > 0.3
    assert len(rows) == 3


def test_finetuning_improves_on_the_untrained_head(split) -> None:
    result = train(split, TrainConfig(freeze="head", lr_head=1e-2, **FAST))
    untrained, best = result.epochs[0]["val_accuracy"], result.val_accuracy
    assert untrained == pytest.approx(1 / 3)  # zero-initialised head: every class scores the same
    assert best > untrained + 0.3


def test_the_untrained_head_is_never_the_model_kept(split) -> None:
    """Epoch 0 is the baseline in the history, not a candidate: here only class-0 images are validated, which
    the untrained head (all classes tied, argmax 0) gets all right, so no trained epoch can beat it."""
    keep = split.val_labels == 0
    only_class0 = dataclasses.replace(split, val_images=[im for im, k in zip(split.val_images, keep, strict=True) if k],
                                      val_labels=split.val_labels[keep],
                                      val_keys=[v for v, k in zip(split.val_keys, keep, strict=True) if k])
    result = train(only_class0, TrainConfig(freeze="head", **{**FAST, "epochs": 1}))
    assert result.epochs[0]["val_accuracy"] == 1.0
    assert result.val_accuracy == result.epochs[1]["val_accuracy"]
    assert result.model.head.weight.abs().sum() > 0  # a trained head, not the zero-initialised one


def test_frozen_weights_stay_bit_identical(split) -> None:
    result = train(split, TrainConfig(freeze="last:1", lr_backbone=1e-2, **FAST))
    from embedfit.backbones.factory import create_backbone

    fresh = Classifier(create_backbone(), 3)
    blocks_after = backbone_blocks(result.model.backbone)
    blocks_before = backbone_blocks(fresh.backbone)
    for before, after in zip(blocks_before[:-1], blocks_after[:-1], strict=True):  # frozen, BN stats included
        for (name, a), (_, b) in zip(before.state_dict().items(), after.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
    changed = any(not torch.equal(a, b) for a, b in zip(blocks_before[-1].state_dict().values(),
                                                        blocks_after[-1].state_dict().values(), strict=True))
    assert changed  # the trainable block did train


def test_discriminative_learning_rates_reach_the_optimizer(split) -> None:
    result = train(split, TrainConfig(freeze="none", lr_head=3e-3, lr_backbone=2e-5, **{**FAST, "epochs": 1}))
    groups = {g["name"]: g["lr"] for g in result.optimizer.param_groups}
    assert groups == {"head": 3e-3, "backbone": 2e-5}


def test_gradual_unfreezing_follows_the_schedule(lite0) -> None:
    model = Classifier(lite0, 3)
    blocks = backbone_blocks(model.backbone)
    for trainable in (0, 1, 2):
        apply_freeze(model, trainable)
        flags = [all(p.requires_grad for p in b.parameters()) for b in blocks]
        assert flags == [False] * (len(blocks) - trainable) + [True] * trainable
    apply_freeze(model, None)
    assert all(p.requires_grad for p in model.parameters())


def test_training_unfreezes_one_block_per_epoch(split) -> None:
    result = train(split, TrainConfig(freeze="head", unfreeze_every=1, early_stopping=False,
                                      **{**FAST, "epochs": 3}))
    assert [e["trainable_blocks"] for e in result.epochs] == [0, 0, 1, 2]
    blocks = backbone_blocks(result.model.backbone)
    assert [all(p.requires_grad for p in b.parameters()) for b in blocks[-3:]] == [False, True, True]


def test_same_seed_same_model(split) -> None:
    config = TrainConfig(freeze="last:1", augment=("flip", "crop", "color"), epochs=1, batch_size=8, device="cpu",
                         seed=3)
    first, second = train(split, config), train(split, config)
    assert first.epochs[1]["train_loss"] == second.epochs[1]["train_loss"]
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    other = train(split, TrainConfig(**{**dataclasses.asdict(config), "seed": 4, "augment": config.augment}))
    assert not torch.equal(first.model.head.weight, other.model.head.weight)


def test_saved_model_reloads_and_predicts_identically(shared_tree: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    result = train(shared_tree, TrainConfig(freeze="head", lr_head=1e-2, **FAST), output=tmp_path / "run")
    for name in ("model.pt", "model.json", "metrics.json", "predictions.csv"):
        assert (tmp_path / "run" / name).is_file()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 3 and metrics["timing"]["train_seconds"] > 0
    loaded = load_finetuned(tmp_path / "run", device="cpu")
    paths = sorted(shared_tree.rglob("*.png"))[:5]
    proba, errors = loaded.predict_proba_paths(paths)
    from embedfit.images import decode_image
    from embedfit.training.finetune import evaluate

    direct = evaluate(result.model, [decode_image(p) for p in paths], np.zeros(5, int), result.model.backbone.spec,
                      torch.device("cpu"))
    np.testing.assert_allclose(proba, direct, atol=1e-6)
    assert errors == [""] * 5
    # `embedfit predict` and `embedfit report` take the run like any other
    assert main(["predict", str(tmp_path / "run"), str(shared_tree / "grass"), "-o", str(tmp_path / "p.csv")]) == 0
    assert "8 images predicted" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "run"), "-o", str(tmp_path / "r.html")]) == 0
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "run"), str(tmp_path / "feats.h5")]) == 2  # needs images, not a store
    assert "predicts from images" in capsys.readouterr().err


def _scored_classifier(lite0) -> Classifier:
    """A 3-class head with seeded random weights on a copy of the session backbone (a zero head scores every
    class alike; the copy keeps training steps off the shared fixture)."""
    model = Classifier(copy.deepcopy(lite0), 3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=generator) * 0.05)
        model.head.bias.copy_(torch.randn(model.head.bias.shape, generator=generator))
    return model


def test_evaluate_gives_the_probabilities_of_the_old_forward_loop(split, lite0) -> None:
    """evaluate now runs extraction's forward path; its probabilities are those of the loop it replaced:
    preprocess, model(x) on the device, softmax, in fp32."""
    from embedfit.training.finetune import evaluate

    model = _scored_classifier(lite0).train()
    images, spec = split.val_images, lite0.spec
    proba = evaluate(model, images, split.val_labels, spec, torch.device("cpu"), batch_size=5)
    model.eval()
    with torch.inference_mode():
        x = torch.stack([spec.preprocess()(im) for im in images])
        old = torch.softmax(model(x).float(), dim=1).numpy()
    assert proba.shape == (len(images), 3) and proba.dtype == np.float32
    np.testing.assert_allclose(proba, old, rtol=0, atol=1e-6)
    assert not np.allclose(proba, 1 / 3)  # the random head tells the images apart
    assert evaluate(model, [], np.zeros(0, int), spec, torch.device("cpu")).shape == (0, 0)


def test_evaluate_runs_through_the_encoder_and_leaves_the_model_trainable(split, lite0,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """One forward path: evaluate's batches go through `Encoder.embed` (PyTorch, fp32, NCHW), and the model
    keeps its parameter tensors (no copy, no move, no memory-format change), so training continues on them."""
    from embedfit.extraction.encoder import Encoder
    from embedfit.training.finetune import evaluate

    calls: list[tuple[int, str, str]] = []
    embed = Encoder.embed

    def spy(self: Encoder, images: torch.Tensor) -> torch.Tensor:
        calls.append((len(images), self.runtime, self.precision))
        return embed(self, images)

    monkeypatch.setattr(Encoder, "embed", spy)
    model = _scored_classifier(lite0)
    before = [(p, p.data_ptr()) for p in model.parameters()]
    evaluate(model, split.val_images, split.val_labels, lite0.spec, torch.device("cpu"), batch_size=5)
    n = len(split.val_images)
    assert calls == [(min(5, n - i), "torch", "fp32") for i in range(0, n, 5)]
    assert not model.training
    after = list(model.parameters())
    assert len(after) == len(before)
    for (p, ptr), q in zip(before, after, strict=True):
        assert p is q and q.data_ptr() == ptr and q.is_contiguous() and not q.is_inference()
    # a training step still works on the evaluated model (no inference tensors, gradients flow)
    model.train()
    x = torch.stack([lite0.spec.preprocess()(im) for im in split.val_images[:2]])
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    assert model.head.weight.grad is not None


def test_scratch_trains_from_random_weights(split) -> None:
    result = train(split, TrainConfig(pretrained=False, freeze="none", **{**FAST, "epochs": 1}))
    assert result.model.backbone.spec.weights == "random" and len(result.epochs) == 2


def test_config_validation() -> None:
    for bad in (dict(freeze="some"), dict(augment=("blur",)), dict(epochs=0), dict(val_size=1.5),
                dict(validate_epochs=False)):
        with pytest.raises(UsageError):
            TrainConfig(**bad)


def test_freeze_all_is_refused() -> None:
    """--freeze all (a pre-release name that meant "nothing frozen") is gone: only head, last:N and none."""
    with pytest.raises(UsageError, match="head, last:N or none, got 'all'"):
        TrainConfig(freeze="all")
    assert TrainConfig(freeze="none").freeze == "none"


def test_classify_restricted_to_the_given_classes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--classes: the model chooses only among the user's classes (plural names map onto ImageNet); -o writes
    the file without a table; a broken file is a row with its reason; the table shows the class folder."""
    from skimage.data import chelsea, coffee

    (tmp_path / "cats").mkdir()
    (tmp_path / "espressos").mkdir()
    Image.fromarray(chelsea()).save(tmp_path / "cats" / "chelsea.jpg")
    Image.fromarray(coffee()).save(tmp_path / "espressos" / "cup.jpg")
    (tmp_path / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    rows = classify([tmp_path], classes=["cats", "espressos"], top=2, workers=0)
    good = [r for r in rows if not r["error"]]
    assert {(Path(r["path"]).name, r["class"]) for r in good if r["rank"] == 1} == {("chelsea.jpg", "cats"),
                                                                                  ("cup.jpg", "espressos")}
    assert sum(r["probability"] for r in good if r["path"].endswith("chelsea.jpg")) == pytest.approx(1.0)
    assert [r["error"] != "" for r in rows if r["path"].endswith("broken.jpg")] == [True]
    assert main(["classify", str(tmp_path), "--classes", "cats,espressos", "-o", str(tmp_path / "c.csv")]) == 0
    printed = capsys.readouterr()
    assert "3 images classified" in printed.out and "chelsea" not in printed.out  # no table
    assert "'tabby'" in printed.err  # the mapping used
    assert main(["classify", str(tmp_path / "cats" / "chelsea.jpg"), "--top", "1"]) == 0
    assert "cats/chelsea.jpg" in capsys.readouterr().out
    assert main(["classify", str(tmp_path), "--classes", "cats,widgets"]) == 2
    assert "'widgets'" in capsys.readouterr().err


def test_cli_finetune_and_scratch(shared_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["finetune", str(shared_tree), "-o", str(tmp_path / "ft"), "--freeze", "head", "--epochs", "1",
                 "--batch-size", "8", "--augment", "flip", "--device", "cpu"]) == 0
    assert "best validation accuracy" in capsys.readouterr().out
    assert main(["scratch", str(shared_tree), "-o", str(tmp_path / "sc"), "--epochs", "1", "--batch-size", "8",
                 "--device", "cpu"]) == 0
    assert main(["finetune", str(shared_tree), "--freeze", "half"]) == 2
    assert "--freeze must be head" in capsys.readouterr().err


def test_every_command_that_builds_a_pretrained_model_takes_weights(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The offline error says "pass --weights FILE"; classify, finetune and compare must then accept it."""
    import torchvision
    from skimage.data import chelsea

    image = tmp_path / "chelsea.jpg"
    Image.fromarray(chelsea()).save(image)
    assert main(["classify", str(image), "-b", "resnet18"]) == 1
    assert "--weights FILE" in capsys.readouterr().err
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), weights)
    assert main(["classify", str(image), "-b", "resnet18", "--weights", str(weights), "--top", "2"]) == 0
    for command in ("finetune", "compare"):
        assert "--weights" in _help(command, capsys)


def _help(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert main([command, "--help"]) == 0
    return capsys.readouterr().out
