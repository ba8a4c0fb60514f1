"""Tests for embedfit.images: real files made with Pillow/numpy in tmp_path, real decoding, no mocks."""

from __future__ import annotations

import io
import os
import struct
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, ImageOps

from embedfit.errors import DecodeError, InputError, UsageError
from embedfit.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageRecord,
    ImageSource,
    _to_rgb,
    decode_image,
    scan_images,
)

pytestmark = pytest.mark.fast

WHITE = (255, 255, 255)


# --------------------------------------------------------------------------------------------------
# helpers


def photo(width: int, height: int, seed: int = 0, noise: float = 10.0) -> Image.Image:
    """A photo-like RGB image: smooth gradients and shapes plus sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 128 + 100 * np.sin(x / width * 6.0)
    g = 255 * y / height
    b = 128 + 100 * np.cos((x + y) / (width + height) * 9.0)
    rgb = np.stack([r, g, b], axis=-1)
    rgb += rng.standard_normal(rgb.shape, dtype=np.float32) * noise
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def blocks(width: int = 6, height: int = 4, seed: int = 0) -> Image.Image:
    """A small asymmetric image of random colours (every orientation gives different pixels)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def write(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 1-bit PNG whose IHDR claims width x height (CRC fixed, so only the size is a lie)."""
    data = bytearray(encode(Image.new("1", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)  # after signature(8) + length(4) + b"IHDR"(4)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def exif_with_orientation(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


# --------------------------------------------------------------------------------------------------
# decode_image: formats and inputs


@pytest.mark.parametrize(
    ("fmt", "suffix", "params", "tolerance"),
    [
        ("PNG", ".png", {}, 0),
        ("BMP", ".bmp", {}, 0),
        ("TIFF", ".tif", {}, 0),
        ("TIFF", ".tiff", {"compression": "tiff_lzw"}, 0),
        ("WEBP", ".webp", {"lossless": True}, 0),
        ("WEBP", ".webp", {"quality": 90}, 12),
        ("JPEG", ".jpg", {"quality": 95}, 12),
    ],
)
def test_decodes_common_formats(tmp_path: Path, fmt: str, suffix: str, params: dict, tolerance: int) -> None:
    src = photo(40, 30)
    path = write(tmp_path / f"img{suffix}", encode(src, fmt, **params))
    out = decode_image(path)
    assert out.mode == "RGB"
    assert out.size == (40, 30)
    assert np.abs(arr(out) - arr(src)).mean() <= tolerance


def test_gif_decodes_exactly_with_few_colours(tmp_path: Path) -> None:
    src = blocks(8, 5).quantize(16).convert("RGB")  # a GIF holds 256 colours at most
    out = decode_image(write(tmp_path / "a.gif", encode(src, "GIF")))
    assert out.mode == "RGB"
    assert np.array_equal(arr(out), arr(src))


def test_png_named_jpg_decodes_by_content(tmp_path: Path) -> None:
    src = blocks()
    out = decode_image(write(tmp_path / "really_a_png.jpg", encode(src, "PNG")))
    assert np.array_equal(arr(out), arr(src))


def test_accepts_str_pathlike_and_bytes_alike(tmp_path: Path) -> None:
    data = encode(blocks(), "PNG")
    path = write(tmp_path / "a.png", data)
    expected = arr(decode_image(path))
    for source in (str(path), path, data, bytearray(data), memoryview(data)):
        assert np.array_equal(arr(decode_image(source)), expected)


def test_result_is_detached_from_the_file(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (5, 4), c) for c in ((255, 0, 0), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    out = decode_image(path)  # multi-frame: Pillow keeps its file open until close()
    assert not isinstance(out, ImageFile.ImageFile)
    path.unlink()
    assert out.getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("size", [(1, 1), (4000, 12), (12, 4000)])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_extreme_shapes(size: tuple[int, int], fmt: str) -> None:
    out = decode_image(encode(Image.new("RGB", size, (10, 200, 30)), fmt))
    assert out.size == size
    assert out.mode == "RGB"


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (6, 6), c) for c in colours]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 3
    assert decode_image(path).getpixel((3, 3)) == colours[0]


def test_multipage_tiff_gives_first_page(tmp_path: Path) -> None:
    pages = [Image.new("RGB", (6, 6), c) for c in ((1, 2, 3), (200, 100, 50))]
    path = tmp_path / "pages.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    assert Image.open(path).n_frames == 2
    assert decode_image(path).getpixel((0, 0)) == (1, 2, 3)


# --------------------------------------------------------------------------------------------------
# decode_image: failures


def test_truncated_jpeg_fails_at_decode_even_though_verify_passes(tmp_path: Path) -> None:
    data = encode(photo(200, 150), "JPEG", quality=90)
    path = write(tmp_path / "cut.jpg", data[: len(data) // 2])
    with Image.open(path) as img:
        img.verify()  # the trap: header-level checks say this file is fine
    with pytest.raises(DecodeError, match=r"^truncated image$"):
        decode_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "TIFF", "WEBP"])
def test_truncated_other_formats(fmt: str) -> None:
    data = encode(photo(64, 48), fmt)
    with pytest.raises(DecodeError):
        decode_image(data[: len(data) * 2 // 3])


def test_not_an_image(tmp_path: Path) -> None:
    path = write(tmp_path / "notes.jpg", b"this is plain text, not a JPEG\n" * 10)
    with pytest.raises(DecodeError, match=r"^not an image \(cannot identify format\)$"):
        decode_image(path)


def test_eps_is_not_opened_even_if_pillow_could(tmp_path: Path) -> None:
    # Only the allowlisted formats are tried: an EPS would otherwise be handed to Ghostscript.
    path = write(tmp_path / "x.jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(DecodeError, match="not an image"):
        decode_image(path)


def test_unusable_paths_have_clear_reasons(tmp_path: Path) -> None:
    (tmp_path / "folder.jpg").mkdir()
    write(tmp_path / "empty.jpg")
    (tmp_path / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    os.mkfifo(tmp_path / "pipe.jpg")  # opening a FIFO would block forever
    cases = {
        "folder.jpg": "is a directory",
        "missing.jpg": "file not found",
        "broken.jpg": "broken symlink",
        "empty.jpg": r"empty file \(0 bytes\)",
        "pipe.jpg": "not a regular file",
    }
    for name, reason in cases.items():
        with pytest.raises(DecodeError, match=reason):
            decode_image(tmp_path / name)
    with pytest.raises(DecodeError, match="empty data"):
        decode_image(b"")


def test_bad_arguments_are_usage_errors() -> None:
    data = encode(blocks(), "PNG")
    for kwargs in ({"max_pixels": 0}, {"max_pixels": 1.5}, {"draft_size": (0, 10)}, {"draft_size": (10,)}):
        with pytest.raises(UsageError):
            decode_image(data, **kwargs)
    with pytest.raises(UsageError, match="path or bytes"):
        decode_image(123)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# decode_image: decompression bombs


def test_bomb_refused_from_header_before_allocating() -> None:
    limit_before = Image.MAX_IMAGE_PIXELS
    data = png_claiming(12_000, 10_000)  # 120 M: over our limit, in Pillow's warning-only band
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not escape
        with pytest.raises(DecodeError, match=r"^decompression bomb: 12000x10000 pixels exceeds limit 100000000$"):
            decode_image(data)
    assert time.perf_counter() - start < 0.5
    assert limit_before == Image.MAX_IMAGE_PIXELS


def test_huge_bomb_caught_by_pillow_is_reported_the_same_way() -> None:
    start = time.perf_counter()
    with pytest.raises(DecodeError, match=r"^decompression bomb: 2500000000 pixels exceeds limit 100000000$"):
        decode_image(png_claiming(50_000, 50_000))
    assert time.perf_counter() - start < 0.5


def test_max_pixels_is_explicit() -> None:
    data = encode(blocks(10, 10), "PNG")
    assert decode_image(data, max_pixels=100).size == (10, 10)
    with pytest.raises(DecodeError, match="10x10 pixels exceeds limit 99"):
        decode_image(data, max_pixels=99)
    assert DEFAULT_MAX_PIXELS == 100_000_000


def test_no_pillow_warning_when_our_limit_allows_the_size() -> None:
    # 90.25 M pixels: above Pillow's warning threshold (89.5 M); the data is missing, so this fails
    # cheaply as truncated, not as a bomb, and no warning is raised.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DecodeError, match=r"truncated|corrupt"):
            decode_image(png_claiming(9_500, 9_500), max_pixels=None)


# --------------------------------------------------------------------------------------------------
# decode_image: EXIF orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_imageops_exactly(tmp_path: Path, orientation: int) -> None:
    path = write(tmp_path / "o.png", encode(blocks(), "PNG", exif=exif_with_orientation(orientation)))
    with Image.open(path) as img:
        expected = ImageOps.exif_transpose(img).convert("RGB")
    out = decode_image(path)
    assert out.size == expected.size
    assert np.array_equal(arr(out), arr(expected))
    if orientation in (5, 6, 7, 8):
        assert out.size == (4, 6)


@pytest.mark.parametrize(
    ("orientation", "store_as"),
    [(6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)],
)
def test_rotated_camera_jpeg_comes_out_upright(tmp_path: Path, orientation: int, store_as: Image.Transpose) -> None:
    upright = photo(64, 32, noise=0)
    stored = upright.transpose(store_as)  # what a camera held sideways writes
    data = encode(stored, "JPEG", quality=95, exif=exif_with_orientation(orientation))
    out = decode_image(write(tmp_path / "cam.jpg", data))
    assert out.size == (64, 32)
    assert np.abs(arr(out) - arr(upright)).mean() < 3
    upside_down = upright.transpose(Image.Transpose.ROTATE_180)
    assert np.abs(arr(out) - arr(upside_down)).mean() > 30  # the check can tell orientations apart


# --------------------------------------------------------------------------------------------------
# decode_image: modes


def test_16bit_png_keeps_its_gradient(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))
    path = write(tmp_path / "ramp16.png", encode(Image.fromarray(ramp), "PNG"))
    assert Image.open(path).mode == "I;16"
    out = arr(decode_image(path))
    red = out[0, :, 0]
    assert np.array_equal(out[..., 0], out[..., 1])
    assert red[0] == 0
    assert red[-1] == 255
    assert np.all(np.diff(red) >= 0)
    assert len(np.unique(red)) > 200  # convert("RGB") would give one value: white
    assert np.abs(red - ramp[0] / 257).max() <= 0.5


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16bit_tiff_both_byte_orders(tmp_path: Path, mode: str) -> None:
    values = np.array([[0, 257 * 100, 65535]], dtype="<u2" if mode == "I;16" else ">u2")
    img = Image.frombytes(mode, (3, 1), values.tobytes())  # (convert("I;16B") would clip at 255)
    path = write(tmp_path / "g.tif", encode(img, "TIFF"))
    assert Image.open(path).mode == mode
    assert arr(decode_image(path))[0, :, 0].tolist() == [0, 100, 255]


def test_32bit_int_tiff(tmp_path: Path) -> None:
    in_16bit_range = Image.fromarray(np.array([[0, 257 * 128, 65535]], dtype=np.int32))
    assert arr(decode_image(encode(in_16bit_range, "TIFF")))[0, :, 0].tolist() == [0, 128, 255]
    signed = Image.fromarray(np.array([[-1000, 0, 1000]], dtype=np.int32))
    assert arr(decode_image(encode(signed, "TIFF")))[0, :, 0].tolist() == [0, 128, 255]


def test_float_tiff_scaled_sensibly() -> None:
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert arr(decode_image(encode(unit, "TIFF")))[0, :, 0].tolist() == [0, 128, 255]
    eight_bit = Image.fromarray(np.array([[0.0, 100.0, 200.0]], dtype=np.float32))
    assert arr(decode_image(encode(eight_bit, "TIFF")))[0, :, 0].tolist() == [0, 100, 200]
    wild = Image.fromarray(np.array([[-3.0, np.nan, 7.0]], dtype=np.float32))
    assert arr(decode_image(encode(wild, "TIFF")))[0, :, 0].tolist() == [0, 0, 255]


def test_bilevel_and_gray(tmp_path: Path) -> None:
    bw = Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1")
    assert arr(decode_image(encode(bw, "PNG"))).tolist() == [[[0, 0, 0], [255, 255, 255]]]
    gray = Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8))
    assert arr(decode_image(encode(gray, "PNG")))[0, :, 1].tolist() == [0, 77, 255]


def test_rgba_composited_on_white() -> None:
    rgba = np.array([[[200, 0, 0, 0], [200, 0, 0, 128], [200, 0, 0, 255]]], dtype=np.uint8)
    out = arr(decode_image(encode(Image.fromarray(rgba), "PNG")))
    assert tuple(out[0, 0]) == WHITE  # fully transparent: white, not its hidden red
    assert tuple(out[0, 1]) == (227, 127, 127)  # 200*a + 255*(1-a), a = 128/255
    assert tuple(out[0, 2]) == (200, 0, 0)


def test_gray_alpha_composited_on_white() -> None:
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], dtype=np.uint8), mode="LA")
    assert arr(decode_image(encode(la, "PNG"))).tolist() == [[list(WHITE), [0, 0, 0]]]


def test_palette_png_with_transparency_matches_rgba_twin() -> None:
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [40, 80, 120]], dtype=np.uint8)
    alpha = np.array([0, 128, 255, 60], dtype=np.uint8)
    index = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], dtype=np.uint8)
    p = Image.fromarray(index, mode="P")
    p.putpalette(palette.ravel().tolist())
    p_png = encode(p, "PNG", transparency=alpha.tobytes())
    assert "transparency" in Image.open(io.BytesIO(p_png)).info
    rgba_twin = np.concatenate([palette[index], alpha[index][..., None]], axis=-1)
    from_p = arr(decode_image(p_png))
    from_rgba = arr(decode_image(encode(Image.fromarray(rgba_twin), "PNG")))
    assert np.array_equal(from_p, from_rgba)
    a = alpha[index][..., None] / 255
    assert np.abs(from_p - (palette[index] * a + 255 * (1 - a))).max() <= 0.5
    assert tuple(from_p[0, 0]) == WHITE


def test_gif_transparent_index_becomes_white() -> None:
    p = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), mode="P")
    p.putpalette([255, 0, 0, 0, 0, 255])
    out = decode_image(encode(p, "GIF", transparency=0))
    assert [out.getpixel((0, 0)), out.getpixel((1, 0))] == [WHITE, (0, 0, 255)]


@pytest.mark.parametrize(
    ("mode", "pixels", "key"),
    [("RGB", [[[10, 20, 30], [1, 2, 3]]], (10, 20, 30)), ("L", [[7, 9]], 7)],
)
def test_colour_key_transparency_becomes_white(mode: str, pixels: list, key: object) -> None:
    img = Image.fromarray(np.array(pixels, dtype=np.uint8), mode=mode)
    out = decode_image(encode(img, "PNG", transparency=key))
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((1, 0)) != WHITE


def test_palette_alpha_tiff() -> None:
    pa = Image.new("PA", (2, 1))
    pa.putpalette([0, 0, 255] * 2)
    pa.putpixel((0, 0), (0, 0))
    pa.putpixel((1, 0), (0, 255))
    out = decode_image(encode(pa, "TIFF"))
    assert [out.getpixel((0, 0)), out.getpixel((1, 0))] == [WHITE, (0, 0, 255)]


def test_cmyk_jpeg_with_adobe_inversion_keeps_colours() -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red
    data = encode(cmyk, "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "CMYK"
        assert "adobe" in img.info  # stored inverted, the Photoshop convention
    assert np.abs(arr(decode_image(data))[8, 8] - np.array([255, 0, 0])).max() <= 3


@pytest.mark.parametrize("mode", ["LAB", "YCbCr", "CMYK"])
def test_other_colour_spaces_from_tiff(mode: str) -> None:
    src = photo(8, 6).convert(mode) if mode != "LAB" else Image.new("LAB", (8, 6), (60, 150, 100))
    data = encode(src, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == mode
    assert np.array_equal(arr(decode_image(data)), arr(src.convert("RGB")))


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("HSV", (0, 255, 255), (255, 0, 0)),
        ("YCbCr", (76, 85, 255), (254, 0, 0)),
        ("RGBX", (1, 2, 3, 0), (1, 2, 3)),
        ("RGBa", (0, 0, 0, 0), WHITE),
        ("La", (0, 0), WHITE),
        ("I;16B", 65535, WHITE),
        ("I;16L", 257, (1, 1, 1)),
    ],
)
def test_to_rgb_handles_every_mode(mode: str, value: object, expected: tuple[int, int, int]) -> None:
    out = _to_rgb(Image.new(mode, (2, 2), value))
    assert out.mode == "RGB"
    assert out.getpixel((1, 1)) == expected


# --------------------------------------------------------------------------------------------------
# decode_image: JPEG draft


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("draft") / "big.jpg"
    photo(3000, 2000, seed=1).save(path, quality=90)
    return path


def test_jpeg_draft_is_close_to_full_decode(big_jpeg: Path) -> None:
    """Draft decodes a 16th of the pixels (its speed is measured in benchmarks/, not timed here)."""
    full = decode_image(big_jpeg)
    drafted = decode_image(big_jpeg, draft_size=(256, 256))
    assert full.size == (3000, 2000)
    assert drafted.size == (750, 500)  # 1/4 scale: the largest reduction keeping both sides >= 256
    small_full = full.resize((224, 224), Image.Resampling.BILINEAR)
    small_draft = drafted.resize((224, 224), Image.Resampling.BILINEAR)
    assert np.abs(arr(small_full) - arr(small_draft)).mean() < 2


def test_draft_request_follows_exif_rotation(tmp_path: Path) -> None:
    stored = photo(800, 400)  # shown as 400 wide x 800 tall (orientation 6)
    path = write(tmp_path / "r.jpg", encode(stored, "JPEG", exif=exif_with_orientation(6)))
    out = decode_image(path, draft_size=(100, 200))
    assert out.size == (100, 200)  # 1/4 scale; without swapping the request only 1/2 would fit


def test_draft_ignored_for_non_jpeg() -> None:
    assert decode_image(encode(photo(300, 200), "PNG"), draft_size=(32, 32)).size == (300, 200)


# --------------------------------------------------------------------------------------------------
# decode_image: fuzzing


def _fuzz_seeds() -> dict[str, bytes]:
    img = photo(16, 12, seed=3)
    rgba = img.convert("RGBA")
    rgba.putalpha(128)
    return {
        "png": encode(rgba, "PNG"),
        "jpeg": encode(img, "JPEG", quality=80),
        "progressive_jpeg": encode(img, "JPEG", progressive=True),
        "gif": encode(img.quantize(32), "GIF"),
        "bmp": encode(img, "BMP"),
        "tiff": encode(img, "TIFF", compression="tiff_lzw"),
        "webp": encode(img, "WEBP", quality=80),
    }


FUZZ_SEEDS = _fuzz_seeds()

_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=16)),
)


def _mutate(data: bytes, mutations: list[tuple[str, int, object]]) -> bytes:
    out = bytearray(data)
    for op, where, arg in mutations:
        if not out:
            break
        i = where % len(out)
        if op == "flip":
            out[i] ^= arg  # type: ignore[operator]
        elif op == "truncate":
            del out[i:]
        else:
            out[i:i] = arg  # type: ignore[assignment]
    return bytes(out)


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,  # the same cases on every run and machine
    database=None,  # nothing written into the shared checkout
    suppress_health_check=[HealthCheck.too_slow],
)
@given(fmt=st.sampled_from(sorted(FUZZ_SEEDS)), mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_fuzzed_bytes_give_rgb_or_decode_error(fmt: str, mutations: list) -> None:
    data = _mutate(FUZZ_SEEDS[fmt], mutations)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about mangled metadata; not the point here
        try:
            # A small limit keeps a mutated header from making a test allocate hundreds of MB.
            out = decode_image(data, max_pixels=1 << 20)
        except DecodeError as exc:
            assert str(exc)
            assert "\n" not in str(exc)
            return
    assert out.mode == "RGB"
    assert out.width * out.height >= 1


# --------------------------------------------------------------------------------------------------
# scan_images: folders


def make_tree(root: Path, files: list[str], content: bytes = b"x") -> Path:
    for name in files:
        write(root / name, content)
    return root


def keys(source: ImageSource) -> list[str]:
    return [r.key for r in source.records]


def test_class_tree(tmp_path: Path) -> None:
    root = make_tree(
        tmp_path / "data",
        ["dog/b.png", "cat/a.jpg", "cat/deep/er/c.JPG", "bird/d.webp", "loose.jpg", "notes.txt", "cat/x.csv"],
    )
    (root / "empty_dir").mkdir()
    src = scan_images(root)
    assert src.kind == "folder"
    assert src.root == root
    assert src.class_names == ["bird", "cat", "dog"]
    assert keys(src) == ["bird/d.webp", "cat/a.jpg", "cat/deep/er/c.JPG", "dog/b.png"]
    assert [r.label for r in src.records] == [0, 1, 1, 2]
    skipped = dict(src.skipped)
    assert "loose" in skipped["loose.jpg"]
    assert "no images" in skipped["empty_dir/"]
    for rec in src.records:
        assert rec.path == root / rec.key
        assert rec.path.is_absolute()
        st = os.stat(rec.path)
        assert (rec.size, rec.mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_given_class_names_fix_the_label_order(tmp_path: Path) -> None:
    root = make_tree(tmp_path, ["dog/1.jpg", "cat/2.jpg"])
    src = scan_images(root, class_names=["zebra", "dog", "cat"])
    assert src.class_names == ["zebra", "dog", "cat"]
    assert [(r.key, r.label) for r in src.records] == [("cat/2.jpg", 2), ("dog/1.jpg", 1)]


def test_class_folder_not_in_given_names_is_named(tmp_path: Path) -> None:
    root = make_tree(tmp_path, ["dog/1.jpg", "cat/2.jpg", "yak/3.jpg"])
    with pytest.raises(InputError, match="'yak'"):
        scan_images(root, class_names=["cat", "dog"])


def test_bad_class_names_argument(tmp_path: Path) -> None:
    root = make_tree(tmp_path, ["dog/1.jpg"])
    for bad in ([], ["dog", "dog"], "dog", ["dog", ""]):
        with pytest.raises(UsageError):
            scan_images(root, class_names=bad)


def test_flat_folder(tmp_path: Path) -> None:
    root = make_tree(tmp_path, ["b.png", "a.jpeg", "c.TIFF", "readme.md"])
    (tmp_path / "no_images_here").mkdir()
    write(tmp_path / "no_images_here" / "x.txt")
    src = scan_images(root)
    assert src.kind == "flat"
    assert src.class_names == []
    assert keys(src) == ["a.jpeg", "b.png", "c.TIFF"]
    assert {r.label for r in src.records} == {-1}


def test_given_class_names_ignored_for_unlabeled_folder(tmp_path: Path) -> None:
    src = scan_images(make_tree(tmp_path, ["a.jpg"]), class_names=["cat"])
    assert (src.kind, src.class_names, src.records[0].label) == ("flat", [], -1)


def test_extensions_case_insensitive_and_complete(tmp_path: Path) -> None:
    names = [f"f{i}{ext.upper() if i % 2 else ext}" for i, ext in enumerate(sorted(IMAGE_EXTENSIONS))]
    src = scan_images(make_tree(tmp_path, [*names, "g.jpg.txt", "h.svg", "noext"]))
    assert keys(src) == sorted(names)


def test_hidden_appledouble_macosx_and_image_named_folders(tmp_path: Path) -> None:
    root = make_tree(
        tmp_path,
        [
            "cat/a.jpg",
            "cat/._a.jpg",
            "cat/.hidden.png",
            ".cache/cat/b.jpg",
            "__MACOSX/cat/._a.jpg",
            "dog/album.jpg/c.jpg",
            ".DS_Store",
        ],
    )
    src = scan_images(root)
    assert src.class_names == ["cat", "dog"]
    assert keys(src) == ["cat/a.jpg", "dog/album.jpg/c.jpg"]
    skipped = dict(src.skipped)
    assert "AppleDouble" in skipped["cat/._a.jpg"]
    assert "hidden" in skipped["cat/.hidden.png"]
    assert "__MACOSX/" in skipped


def test_hidden_root_itself_is_fine(tmp_path: Path) -> None:
    assert keys(scan_images(make_tree(tmp_path / ".data", ["a.png"]))) == ["a.png"]


def test_broken_symlink_is_a_record_that_fails_to_decode(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "d", ["cat/ok.png"], encode(blocks(), "PNG"))
    (root / "cat" / "gone.jpg").symlink_to(root / "cat" / "never_there.jpg")
    src = scan_images(root)
    rec = {r.key: r for r in src.records}["cat/gone.jpg"]
    assert (rec.size, rec.mtime_ns, rec.label) == (-1, 0, 0)
    failures = {}
    for r in src.records:
        try:
            decode_image(r.path)
        except DecodeError as exc:
            failures[r.key] = str(exc)
    assert failures == {"cat/gone.jpg": "broken symlink"}


def test_symlinked_folders_followed_and_loops_stopped(tmp_path: Path) -> None:
    elsewhere = make_tree(tmp_path / "elsewhere", ["x.png"])
    root = make_tree(tmp_path / "data", ["cat/a.jpg"])
    (root / "dog").symlink_to(elsewhere, target_is_directory=True)
    (root / "cat" / "again").symlink_to(root / "cat", target_is_directory=True)  # loop
    (root / "cat" / "up").symlink_to(root, target_is_directory=True)  # loop through the root
    (root / "cat" / "self.jpg").symlink_to(root / "cat" / "self.jpg")  # ELOOP file
    src = scan_images(root)
    assert keys(src) == ["cat/a.jpg", "cat/self.jpg", "dog/x.png"]
    assert src.class_names == ["cat", "dog"]
    skipped = dict(src.skipped)
    assert "loop" in skipped["cat/again/"]
    assert "loop" in skipped["cat/up/"]
    assert {r.key: r.size for r in src.records}["cat/self.jpg"] == -1


def test_unicode_and_spaces_sorted_deterministically(tmp_path: Path) -> None:
    names = ["chat noir/été 1.jpg", "chat noir/Zoë.png", "猫/写真 2.jpg", "chat noir/a b.jpg", "Ω/x.png"]
    src = scan_images(make_tree(tmp_path, names))
    assert keys(src) == sorted(names)  # plain code-point order, not locale or filesystem order
    assert src.class_names == sorted(["chat noir", "猫", "Ω"])
    assert all(r.path.exists() for r in src.records)


@pytest.mark.skipif(sys.platform != "linux", reason="needs a filesystem that stores raw name bytes")
def test_non_utf8_file_name_is_skipped_not_mangled(tmp_path: Path) -> None:
    make_tree(tmp_path, ["ok.png"])
    with open(os.path.join(os.fsencode(tmp_path), b"bad\xff.png"), "wb") as f:
        f.write(b"x")
    src = scan_images(tmp_path)
    assert keys(src) == ["ok.png"]
    assert src.skipped == [("bad\\xff.png", "file name is not valid UTF-8")]


def test_missing_and_empty_sources(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"does not exist$"):
        scan_images(tmp_path / "nope")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(InputError, match="broken symlink"):
        scan_images(tmp_path / "dangling")
    empty = make_tree(tmp_path / "empty", ["a.txt", "sub/b.md"])
    with pytest.raises(InputError, match=r"no images found in .*empty \(looked for \.bmp, \.gif, \.jpeg"):
        scan_images(empty)
    only_hidden = make_tree(tmp_path / "hidden", ["._a.jpg"])
    with pytest.raises(InputError, match="skipped 1"):
        scan_images(only_hidden)
    with pytest.raises(InputError, match=r"not a folder or a \.csv file"):
        scan_images(write(tmp_path / "one.jpg", b"x"))


# --------------------------------------------------------------------------------------------------
# scan_images: CSV lists


def write_csv(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def test_csv_with_labels(tmp_path: Path) -> None:
    make_tree(tmp_path / "lists", ["imgs/b.png", "imgs/a.jpg"])
    outside = write(tmp_path / "outside" / "c.jpg", b"x")
    csv_path = write_csv(
        tmp_path / "lists" / "train.CSV",
        f"label,path\ndog,imgs/b.png\ncat,./imgs/a.jpg\n\ncat,{outside}\ndog,imgs/missing.jpg\n",
    )
    src = scan_images(csv_path)
    base = tmp_path / "lists"
    assert (src.kind, src.root, src.class_names) == ("csv", base, ["cat", "dog"])
    assert keys(src) == sorted([outside.as_posix(), "imgs/a.jpg", "imgs/b.png", "imgs/missing.jpg"])
    by_key = {r.key: r for r in src.records}
    assert by_key["imgs/a.jpg"].path == base / "imgs" / "a.jpg"
    assert by_key["imgs/a.jpg"].label == 0
    assert by_key[outside.as_posix()].path == outside
    missing = by_key["imgs/missing.jpg"]  # kept, so extraction reports it
    assert (missing.size, missing.mtime_ns, missing.label) == (-1, 0, 1)
    assert all(r.path == src.root / r.key for r in src.records)


def test_csv_without_labels_bom_and_odd_header(tmp_path: Path) -> None:
    make_tree(tmp_path, ["a b.jpg", "ü.png"])
    csv_path = write_csv(tmp_path / "list.csv", " Path ,note\na b.jpg,hi\nü.png,\n", encoding="utf-8-sig")
    src = scan_images(csv_path)
    assert (src.class_names, keys(src)) == ([], ["a b.jpg", "ü.png"])
    assert {r.label for r in src.records} == {-1}
    assert all(r.size == 1 for r in src.records)


def test_csv_given_class_names(tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "l.csv", "path,label\na.jpg,dog\nb.jpg,\n")
    src = scan_images(csv_path, class_names=["cat", "dog"])
    assert src.class_names == ["cat", "dog"]
    assert [(r.key, r.label) for r in src.records] == [("a.jpg", 1), ("b.jpg", -1)]
    with pytest.raises(InputError, match="'dog'"):
        scan_images(csv_path, class_names=["cat"])


def test_csv_duplicates(tmp_path: Path) -> None:
    same = write_csv(tmp_path / "same.csv", "path,label\na.jpg,cat\n./a.jpg,cat\n")
    src = scan_images(same)
    assert keys(src) == ["a.jpg"]
    assert src.skipped == [("a.jpg", "listed again on line 3 (first on line 2)")]
    clash = write_csv(tmp_path / "clash.csv", "path,label\na.jpg,cat\na.jpg,dog\n")
    with pytest.raises(InputError, match="'cat' on line 2 and 'dog' on line 3"):
        scan_images(clash)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("file,label\na.jpg,cat\n", r"has no 'path' column \(columns: 'file', 'label'\)"),
        ("", "is empty"),
        ("path,label\n", "no images listed"),
        (b"path\n\xff\xfe\x00bad.jpg\n", "not UTF-8"),
    ],
)
def test_csv_errors_are_one_line(tmp_path: Path, text: str | bytes, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(InputError, match=message) as info:
        scan_images(path)
    assert "\n" not in str(info.value)


def test_csv_empty_path_cell_is_reported(tmp_path: Path) -> None:
    src = scan_images(write_csv(tmp_path / "l.csv", "path,label\n,cat\na.jpg,cat\n"))
    assert keys(src) == ["a.jpg"]
    assert src.skipped == [("l.csv:2", "empty path cell")]


def test_records_are_frozen(tmp_path: Path) -> None:
    rec = scan_images(make_tree(tmp_path, ["a.png"])).records[0]
    assert isinstance(rec, ImageRecord)
    with pytest.raises(AttributeError):
        rec.label = 3  # type: ignore[misc]
