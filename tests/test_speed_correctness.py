"""Every speed technique of the extractor leaves the features unchanged (within a stated tolerance).

The GPU-only ones (nvJPEG decoding, fp16/bf16 on CUDA, torch.compile on CUDA) are in test_gpu.py; here the same
code paths run on the CPU, so CI covers them.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from embedfit.extraction.encoder import Encoder, iter_embeddings
from embedfit.extraction.local import extract
from embedfit.extraction.reader import ImageDataset, _Batch, decode_jpeg_cpu, plain_jpeg_bytes
from embedfit.extraction.settings import ExtractConfig, transfer_batch_size
from embedfit.images import decode_image, scan_images
from embedfit.storage import FeatureStore

pytestmark = pytest.mark.slow


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _photo(width: int, height: int, seed: int) -> Image.Image:
    from skimage import data

    base = [data.chelsea(), data.astronaut(), data.coffee()][seed % 3]
    return Image.fromarray(base).resize((width, height), Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def odd_jpegs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Plain JPEGs of several sizes, plus every kind the device decoder must hand back to PIL."""
    root = tmp_path_factory.mktemp("odd")
    for i, (w, h) in enumerate([(500, 375), (375, 500), (640, 480), (1200, 800), (300, 300), (500, 375)]):
        _photo(w, h, i).save(root / f"plain_{i}.jpg", quality=90)
    _photo(400, 300, 0).convert("L").save(root / "gray.jpg", quality=90)
    _photo(400, 300, 1).save(root / "progressive.jpg", quality=90, progressive=True)
    _photo(400, 300, 2).convert("CMYK").save(root / "cmyk.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: PIL applies it, the device path must not ignore it
    _photo(400, 300, 0).save(root / "rotated.jpg", quality=90, exif=exif)
    _photo(400, 300, 1).save(root / "photo.png")
    buf = io.BytesIO()
    _photo(400, 300, 2).save(buf, format="JPEG", quality=90)
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "text.jpg").write_text("not an image")
    return root


def test_plain_jpeg_bytes_sends_only_safe_jpegs_to_the_device(odd_jpegs: Path) -> None:
    device_ok = {p.name for p in sorted(odd_jpegs.iterdir()) if plain_jpeg_bytes(p) is not None}
    assert device_ok == {f"plain_{i}.jpg" for i in range(6)} | {"gray.jpg", "progressive.jpg"}
    data = plain_jpeg_bytes(odd_jpegs / "plain_0.jpg")
    assert data.dtype == torch.uint8 and bytes(data.numpy()) == (odd_jpegs / "plain_0.jpg").read_bytes()
    assert plain_jpeg_bytes(odd_jpegs / "plain_0.jpg", max_pixels=1000) is None  # the bomb limit still applies


def test_cpu_jpeg_decoder_takes_plain_jpegs_that_draft_would_not_shrink(odd_jpegs: Path) -> None:
    draft = (256, 256)
    taken = {p.name for p in sorted(odd_jpegs.iterdir()) if decode_jpeg_cpu(p, draft_size=draft) is not None}
    # plain_3 is 1200x800: PIL's JPEG draft decodes it at half size, far cheaper, so it stays with PIL.
    assert taken == {f"plain_{i}.jpg" for i in (0, 1, 2, 4, 5)} | {"gray.jpg", "progressive.jpg"}
    assert decode_jpeg_cpu(odd_jpegs / "plain_3.jpg") is not None  # no draft asked for: taken
    assert decode_jpeg_cpu(odd_jpegs / "plain_0.jpg", max_pixels=1000) is None  # the bomb limit: PIL words it


def test_cpu_jpeg_decoder_gives_pils_pixels(odd_jpegs: Path, tmp_path: Path) -> None:
    """torchvision's libjpeg-turbo and Pillow's decode plain JPEGs (4:2:0, 4:4:4, grey, progressive) alike."""
    photo = _photo(333, 517, 1)
    photo.save(tmp_path / "444.jpg", quality=95, subsampling=0)
    photo.save(tmp_path / "422.jpg", quality=75, subsampling=1)
    paths = [tmp_path / "444.jpg", tmp_path / "422.jpg",
             *(odd_jpegs / n for n in ("plain_0.jpg", "plain_1.jpg", "gray.jpg", "progressive.jpg"))]
    for path in paths:
        fast = decode_jpeg_cpu(path)
        reference = torch.from_numpy(np.array(decode_image(path))).permute(2, 0, 1)
        assert fast is not None and fast.shape == reference.shape and fast.dtype == torch.uint8, path.name
        assert (fast.int() - reference.int()).abs().max() <= 1, path.name


def test_cpu_jpeg_decoder_leaves_damaged_files_to_pil(tmp_path: Path, lite0) -> None:
    """A complete-looking JPEG with garbage inside: statuses and reasons are PIL's, whichever decoder ran."""
    buf = io.BytesIO()
    _photo(451, 300, 0).save(buf, format="JPEG", quality=90)
    rng = np.random.default_rng(0)
    for k in range(4):
        data = bytearray(buf.getvalue())
        start = len(data) // 2 + 500 * k
        data[start:start + 200] = rng.integers(0, 256, 200, dtype=np.uint8).tobytes()
        (tmp_path / f"damaged_{k}.jpg").write_bytes(bytes(data))
    records = scan_images(tmp_path).records
    dataset = ImageDataset(records, lite0.spec)
    for i, record in enumerate(records):
        _, image, error = dataset[i]
        try:
            expected = lite0.spec.preprocess()(decode_image(record.path, draft_size=dataset.draft)), ""
        except Exception as exc:
            expected = None, str(exc)
        assert error == expected[1], record.key
        if image is not None:
            assert (image.int() - expected[0].int()).abs().max() <= 2, record.key
    assert any(dataset[i][1] is None for i in range(len(records)))  # the garbage broke at least one


def test_cpu_fast_path_leaves_features_unchanged(odd_jpegs: Path, lite0) -> None:
    """The dataset's output (torchvision decode + torch resize) against PIL decode + torchvision's PIL transforms."""
    from torchvision.transforms import v2

    pre = lite0.spec.preprocess()
    reference = v2.Compose([v2.Resize(pre.resize_size, interpolation=v2.InterpolationMode(pre.interpolation),
                                      antialias=True), v2.CenterCrop(pre.crop_size), v2.PILToTensor()])
    records = [r for r in scan_images(odd_jpegs).records if r.key.startswith(("plain", "gray", "progressive"))]
    dataset = ImageDataset(records, lite0.spec)
    fast = torch.stack([dataset[i][1] for i in range(len(records))])
    ref = torch.stack([reference(decode_image(r.path, draft_size=dataset.draft)) for r in records])
    assert (fast.int() - ref.int()).abs().max() <= 2
    encoder = Encoder(lite0, torch.device("cpu"))
    assert cosine(encoder(fast), encoder(ref)).min() > 0.9999


def test_device_decoding_matches_pil(odd_jpegs: Path, lite0, tmp_path: Path) -> None:
    """`--decode device` (torchvision's decoder + torch resize) vs PIL: same statuses, cosine above 0.998.

    PIL's JPEG draft is off: the device decoder always decodes at full size (draft is tested in test_images).
    Measured: 0.99988 with torch 2.14 / torchvision 0.29, 0.99884 with torch 2.11 / torchvision 0.26.
    """
    stores = {}
    for decode in ("pil", "device"):
        extract(odd_jpegs, tmp_path / f"{decode}.h5", workers=0, batch_size=4, decode=decode, jpeg_draft=False)
        stores[decode] = FeatureStore.open(tmp_path / f"{decode}.h5")
    pil, dev = stores["pil"], stores["device"]
    assert list(pil.paths) == list(dev.paths)
    assert (pil.status == dev.status).all(), (list(pil.errors), list(dev.errors))
    assert set(np.asarray(pil.paths)[pil.status != 0]) == {"text.jpg", "truncated.jpg"}
    ok = pil.status == 0
    X_pil, X_dev = pil.features()[ok], dev.features()[ok]
    cos = cosine(X_pil, X_dev)
    assert cos.min() > 0.998, dict(zip(np.asarray(pil.paths)[ok], cos.round(5), strict=True))
    # Files that went through PIL in both runs (CMYK, rotated, PNG) are bit-identical.
    for name in ("cmyk.jpg", "rotated.jpg", "photo.png"):
        i = list(pil.paths).index(name)
        np.testing.assert_array_equal(pil.features([i]), dev.features([i]))
    assert dev.attrs["decode"] == "device"


def test_one_batch_in_flight_keeps_order_and_failures_aligned(odd_jpegs: Path, lite0) -> None:
    """Pipelined batches (batch i+1 queued before batch i is read back) vs one image at a time."""
    records = scan_images(odd_jpegs).records
    encoder = Encoder(lite0, torch.device("cpu"))
    batched = list(iter_embeddings(records, encoder, batch_size=5, workers=0))
    single = list(iter_embeddings(records, encoder, batch_size=1, workers=0))
    assert [r.key for b in batched for r in b.records] == [r.key for r in records]
    errors_b = [e for b in batched for e in b.errors]
    assert errors_b == [e for b in single for e in b.errors]
    Xb = np.concatenate([b.features for b in batched])
    Xs = np.concatenate([b.features for b in single])
    failed = np.array([bool(e) for e in errors_b])
    assert np.isnan(Xb[failed]).all() and not np.isnan(Xb[~failed]).any()
    np.testing.assert_allclose(Xb[~failed], Xs[~failed], rtol=1e-4, atol=1e-4)


def test_handed_over_batches_split_into_model_batches() -> None:
    """Workers hand over ~64 images at once (fewer handovers); the model still gets `batch_size` at a time, in
    order, with PIL-decoded images, JPEG bytes and failures at their positions, and no copies of the pixels."""
    assert [transfer_batch_size(b) for b in (1, 5, 8, 64, 100, 128)] == [64, 65, 64, 64, 100, 128]
    images = torch.arange(5 * 3 * 2 * 2, dtype=torch.uint8).reshape(5, 3, 2, 2)
    jpegs = [torch.tensor([30, 31], dtype=torch.uint8), torch.tensor([70], dtype=torch.uint8)]
    errors = ["", "bad 1", "", "", "", "", "bad 6", "", ""]
    batch = _Batch(list(range(10, 19)), errors, images, [0, 2, 4, 5, 8], jpegs, [3, 7])
    parts = list(batch.split(4))
    assert [p.index for p in parts] == [[10, 11, 12, 13], [14, 15, 16, 17], [18]]
    assert [p.errors for p in parts] == [errors[:4], errors[4:8], errors[8:]]
    assert [p.image_pos for p in parts] == [[0, 2], [0, 1], [0]]
    assert [p.jpeg_pos for p in parts] == [[3], [3], []]
    for part, rows in zip(parts, ([0, 1], [2, 3], [4]), strict=True):
        assert torch.equal(part.images, images[rows])
        assert part.images.untyped_storage().data_ptr() == images.untyped_storage().data_ptr()
    assert [p.jpegs for p in parts[:2]] == [[jpegs[0]], [jpegs[1]]]
    only_jpegs = _Batch([0, 1], ["", ""], None, [], jpegs, [0, 1])
    assert [(p.images, p.image_pos, p.jpeg_pos) for p in only_jpegs.split(1)] == [(None, [], [0]), (None, [], [0])]
    whole = list(batch.split(9))
    assert len(whole) == 1 and whole[0] is batch


def test_channels_last_and_batching_do_not_change_features(lite0) -> None:
    x = torch.randint(0, 256, (6, 3, 224, 224), dtype=torch.uint8)
    reference = Encoder(lite0, torch.device("cpu"), channels_last=False)(x[:1])
    fast = Encoder(lite0, torch.device("cpu"), channels_last=True)(x)
    np.testing.assert_allclose(fast[:1], reference, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_stays_close_to_fp32(lite0) -> None:
    x = torch.from_numpy(np.array(_photo(224, 224, 0))).permute(2, 0, 1)[None].repeat(2, 1, 1, 1)
    fp32 = Encoder(lite0, torch.device("cpu"))(x)
    bf16 = Encoder(lite0, torch.device("cpu"), precision="bf16")(x)
    assert cosine(fp32, bf16).min() > 0.99


def test_workers_do_not_change_features(odd_jpegs: Path, lite0) -> None:
    records = scan_images(odd_jpegs).records
    encoder = Encoder(lite0, torch.device("cpu"))
    inline = np.concatenate([b.features for b in iter_embeddings(records, encoder, workers=0)])
    workers = np.concatenate([b.features for b in iter_embeddings(records, encoder, workers=2)])
    np.testing.assert_array_equal(np.isnan(inline), np.isnan(workers))
    np.testing.assert_allclose(np.nan_to_num(inline), np.nan_to_num(workers), rtol=1e-5, atol=1e-5)


def test_device_decoder_rejects_unknown_names() -> None:
    from embedfit.errors import UsageError

    with pytest.raises(UsageError, match="unknown decoder"):
        ExtractConfig(decode="nvjpeg")


def test_dataset_returns_bytes_only_for_plain_jpegs(odd_jpegs: Path, lite0) -> None:
    records = scan_images(odd_jpegs).records
    ds = ImageDataset(records, lite0.spec, raw_jpeg=True)
    kinds = {records[i].key: (None if t is None else t.dim()) for i, t, _ in (ds[i] for i in range(len(ds)))}
    assert kinds["plain_0.jpg"] == 1 and kinds["cmyk.jpg"] == 3 and kinds["photo.png"] == 3
    assert kinds["truncated.jpg"] is None and kinds["text.jpg"] is None


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_uint8_resize_matches_pil_resize_then_crop(interpolation: str) -> None:
    """Preprocess resizes PIL images as uint8 tensors (torch's vectorised resize); the pixels match Pillow's resize
    through v2.Resize + v2.CenterCrop on the PIL image, padding included where the crop exceeds the image."""
    from torchvision.transforms import v2

    from embedfit.backbones.preprocess import Preprocess

    rng = np.random.default_rng(0)
    sizes = [(500, 375), (375, 500), (256, 256), (224, 224), (257, 300), (1000, 999), (3000, 2000), (299, 224),
             (600, 257), (224, 500), (800, 256), (333, 517), (1024, 768), (200, 150)]
    for resize, crop in [(256, (224, 224)), (224, (224, 224)), (320, (288, 288)), (256, (224, 200)),
                         (256, (300, 224))]:
        pre = Preprocess(resize, crop, interpolation)
        reference = v2.Compose([v2.Resize(resize, interpolation=v2.InterpolationMode(interpolation), antialias=True),
                                v2.CenterCrop(crop), v2.PILToTensor()])
        for w, h in sizes:
            # noise is the hardest case for resampling; smooth photos differ less
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            fast, ref = pre(img), reference(img)
            assert fast.shape == ref.shape and fast.dtype == torch.uint8, (resize, crop, w, h)
            diff = (fast.int() - ref.int()).abs()
            assert diff.max() <= 2 and (diff > 0).float().mean() < 0.2, (resize, crop, w, h, diff.max())


def test_uint8_resize_leaves_features_unchanged(lite0) -> None:
    from torchvision.transforms import v2

    pre = lite0.spec.preprocess()
    reference = v2.Compose([v2.Resize(pre.resize_size, interpolation=v2.InterpolationMode(pre.interpolation),
                                      antialias=True), v2.CenterCrop(pre.crop_size), v2.PILToTensor()])
    photos = [_photo(w, h, i) for i, (w, h) in enumerate([(500, 375), (375, 500), (1200, 800), (640, 427)])]
    encoder = Encoder(lite0, torch.device("cpu"))
    fast = encoder(torch.stack([pre(p) for p in photos]))
    ref = encoder(torch.stack([reference(p) for p in photos]))
    assert cosine(fast, ref).min() > 0.9999


def test_cpu_decoders_yield_the_cores_to_the_model() -> None:
    """On a CPU the decoding workers drop to the lowest priority (the model's threads come first); not on a GPU."""
    import subprocess
    import sys

    from embedfit.extraction.reader import worker_niceness

    assert worker_niceness(torch.device("cpu")) == 19 and worker_niceness(torch.device("cuda")) == 0
    code = ("import os; from embedfit.extraction.reader import _worker_init; before = os.nice(0); "
            "_worker_init(0, niceness=19); print(before, os.nice(0))")
    before, after = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                            check=True).stdout.split())
    assert after == min(before + 19, 19)
