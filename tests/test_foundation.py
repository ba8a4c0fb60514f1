"""Foundation backbones (DINOv2, CLIP, SigLIP, EVA-02, ConvNeXt V2): random-init weights saved to a local file and
loaded through `weights=`, then dims, pooling, block selection, resolution and what the store records."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from embedfit.backbones.factory import create_backbone
from embedfit.errors import UsageError, WeightsUnavailableError

pytestmark = pytest.mark.slow

SMALL = 56  # 4x4 patches of 14 px: quick forwards; the weights file loads at any resolution


@pytest.fixture(scope="session")
def dinov2_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init DINOv2 ViT-S/14 state dict, saved at the default 224 px (its position embeddings 16x16)."""
    model = create_backbone("dinov2_vits14", pretrained=False)
    path = tmp_path_factory.mktemp("weights") / "dinov2_vits14.pth"
    torch.save(model.trunk.model.state_dict(), path)
    return path


def _embed(backbone, n: int = 2) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randint(0, 256, (n, 3, *backbone.spec.input_size), dtype=torch.uint8)
    with torch.inference_mode():
        return backbone(x)


def test_dinov2_pools_layers_and_resolution_from_a_weights_file(dinov2_file: Path) -> None:
    by_pool = {pool: create_backbone("dinov2_vits14", weights=dinov2_file, pool=pool, resolution=SMALL)
               for pool in ("cls", "mean", "cls+mean")}
    feats = {pool: _embed(b) for pool, b in by_pool.items()}
    assert {p: f.shape[1] for p, f in feats.items()} == {"cls": 384, "mean": 384, "cls+mean": 768}
    assert not torch.allclose(feats["cls"], feats["mean"])
    assert torch.allclose(feats["cls+mean"], torch.cat([feats["cls"], feats["mean"]], 1), atol=1e-5)
    spec = by_pool["cls"].spec
    assert (spec.input_size, spec.resize_size, spec.interpolation) == ((SMALL, SMALL), 64, "bicubic")
    assert spec.weights == f"file:{dinov2_file.name}" and spec.weights_sha256
    # The default: DINOv2's linear-evaluation recipe at 224 (Resize 256, CenterCrop 224).
    default = create_backbone("dinov2_vits14", weights=dinov2_file)
    assert (default.spec.pool, default.spec.input_size, default.spec.resize_size) == ("cls+mean", (224, 224), 256)
    assert default.spec.embedding_dim == 768 and default.head is None

    fourth_last = create_backbone("dinov2_vits14", weights=dinov2_file, layer="-4", pool="mean", resolution=SMALL)
    assert (fourth_last.spec.layer, fourth_last.spec.pool) == ("blocks.8", "mean")
    same = create_backbone("dinov2_vits14", weights=dinov2_file, layer="blocks.8", pool="mean", resolution=SMALL)
    assert torch.allclose(_embed(fourth_last), _embed(same))
    assert not torch.allclose(_embed(fourth_last), feats["mean"])
    last = create_backbone("dinov2_vits14", weights=dinov2_file, layer="-1", pool="mean", resolution=SMALL)
    assert torch.allclose(_embed(last), feats["mean"], atol=1e-5)  # the last block, normed = the final tokens

    with pytest.raises(UsageError, match="out of range"):
        create_backbone("dinov2_vits14", weights=dinov2_file, layer="-13", resolution=SMALL)
    with pytest.raises(UsageError, match="head"):
        create_backbone("dinov2_vits14", weights=dinov2_file, layer="-2", pool="head", resolution=SMALL)
    with pytest.raises(UsageError, match="transformer"):
        create_backbone("efficientnet_lite0", pool="cls")


def test_store_records_pool_layer_and_resolution(dinov2_file: Path, image_tree: Path, tmp_path: Path) -> None:
    from embedfit.extraction.local import extract
    from embedfit.storage import FeatureStore

    out = tmp_path / "dino.h5"
    extract(image_tree, out, backbone="dinov2_vits14", weights=str(dinov2_file), layer="-4", pool="cls+mean",
            resolution=SMALL, runtime="torch", workers=0)
    store = FeatureStore.open(out)
    spec = store.spec
    assert (spec.name, spec.layer, spec.pool, spec.input_size, spec.embedding_dim) == (
        "dinov2_vits14", "blocks.8", "cls+mean", (SMALL, SMALL), 768)
    assert store.complete
    # The same request again is recognised from the store alone (nothing to embed, no model built).
    again = extract(image_tree, out, backbone="dinov2_vits14", weights=str(dinov2_file), layer="-4",
                    pool="cls+mean", resolution=SMALL, runtime="torch", workers=0)
    assert again.embedded == 0


def test_vit_fine_tuning_counts_blocks_and_freezes_the_class_token(dinov2_file: Path) -> None:
    from embedfit.training.finetune import Classifier, apply_freeze, backbone_blocks

    backbone = create_backbone("dinov2_vits14", weights=dinov2_file, resolution=SMALL)
    blocks = backbone_blocks(backbone)
    assert len(blocks) == 1 + 12 + 1  # patch embedding (+ class token, positions), 12 blocks, final norm
    model = Classifier(backbone, 3)
    apply_freeze(model, 0)  # "head": the whole backbone frozen
    assert not any(p.requires_grad for p in model.backbone.parameters())
    apply_freeze(model, 2)
    root = backbone.trunk.model
    assert not root.cls_token.requires_grad and not root.pos_embed.requires_grad
    assert all(p.requires_grad for p in root.blocks[-1].parameters())


def test_missing_foundation_weights_fail_at_once_naming_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(WeightsUnavailableError, match=r"models--timm--vit_small_patch14_dinov2\.lvd142m"):
        create_backbone("dinov2_vits14")
    # Not marked offline, but no network: no minute of hub retries either.
    monkeypatch.delenv("EMBEDFIT_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    t0 = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="no network"):
        create_backbone("clip_vitb16_openai")
    assert time.perf_counter() - t0 < 30


def test_backbones_listing_shows_licence_and_weights_location() -> None:
    from embedfit.backbones.catalogue import list_infos

    infos = {i.name: i for i in list_infos()}
    for name in ("dinov2_vits14", "dinov2_vitb14", "clip_vitb16_openai", "clip_vitb16_laion", "siglip_vitb16",
                 "eva02_small", "convnextv2_tiny"):
        assert infos[name].licence and not infos[name].offline
    assert (infos["dinov2_vits14"].embedding_dim, infos["dinov2_vits14"].input_size) == (768, (224, 224))
    assert infos["convnextv2_tiny"].licence == "cc-by-nc-4.0"
    assert infos["efficientnet_lite0"].offline and infos["efficientnet_lite0"].params < infos["resnet50"].params


@pytest.mark.slow
@pytest.mark.parametrize(("name", "pool", "dims"), [
    ("eva02_small", ("cls", "mean", "cls+mean"), (384, 384, 768)),
    ("siglip_vitb16", ("head", "mean"), (768, 768)),
    ("clip_vitb16_openai", ("cls", "mean", "cls+mean"), (768, 768, 1536)),
    ("clip_vitb16_laion", ("cls",), (768,)),
    ("dinov2_vitb14", ("cls+mean",), (1536,)),
    ("convnextv2_tiny", ("avg",), (768,)),
])
def test_each_foundation_architecture_loads_a_weights_file(name: str, pool: tuple[str, ...], dims: tuple[int, ...],
                                                           tmp_path: Path) -> None:
    size = SMALL if name.startswith(("dinov2", "eva02")) else 64  # whole patches of 14 or 16 px
    model = create_backbone(name, pretrained=False, resolution=size)
    root = getattr(model.trunk, "model", model.trunk)
    path = tmp_path / f"{name}.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in root.state_dict().items()}, str(path))
    for p, d in zip(pool, dims, strict=True):
        b = create_backbone(name, weights=path, pool=p, resolution=size)
        assert _embed(b).shape == (2, d) and b.spec.pool == p and b.spec.input_size == (size, size)
    if name == "siglip_vitb16":
        with pytest.raises(UsageError, match="no class token"):
            create_backbone(name, weights=path, pool="cls", resolution=size)


@pytest.mark.slow
def test_a_vit_fine_tunes_and_reloads(dinov2_file: Path, image_tree: Path, tmp_path: Path) -> None:
    from embedfit.training.finetune import TrainConfig, load_finetuned, train

    config = TrainConfig(backbone="dinov2_vits14", weights=str(dinov2_file), freeze="last:1", epochs=1, batch_size=4,
                         device="cpu", augment=())
    result = train(image_tree, config, output=tmp_path / "ft")
    assert result.run_dir is not None and 0 <= result.val_accuracy <= 1
    reloaded = load_finetuned(tmp_path / "ft", device="cpu")
    assert reloaded.model.backbone.spec.pool == "cls+mean"
    proba, errors = reloaded.predict_proba_paths(sorted(image_tree.rglob("*.jpg"))[:2])
    assert proba.shape == (2, 3) and not any(errors)
