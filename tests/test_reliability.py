"""Broken and odd files through `extract` into a real store: each is embedded correctly or recorded as failed.

Decoder-level behaviour (exact pixels, fuzzing) is tested in test_images.py; here the question is what reaches the
store: the right rows, the right embeddings, a reason for every failure and honest counts.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedfit.cli import main
from embedfit.extraction.local import extract
from embedfit.extraction.settings import ExtractSummary
from embedfit.storage import FAILED, OK, FeatureStore

pytestmark = [pytest.mark.fast, pytest.mark.timeout(300)]


def _base(seed: int = 3, size: int = 128) -> np.ndarray:
    """A real texture crop (RGB uint8)."""
    from skimage import data

    rng = np.random.default_rng(seed)
    img = data.brick()
    y, x = rng.integers(0, img.shape[0] - size, size=2)
    crop = img[y:y + size, x:x + size].astype(np.float64)
    return np.clip(crop[..., None] * rng.uniform(0.7, 1.2, size=3), 0, 255).astype(np.uint8)


def _save(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _png_bomb(width: int, height: int) -> bytes:
    """A valid grayscale PNG of width x height zeros, compressed to a few hundred KB without allocating it."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# file name -> expected status: "ok", "failed" or "skipped" (not a row at all)
EXPECTED = {
    "zero.jpg": "failed", "truncated.jpg": "failed", "random.png": "failed", "page.jpg": "failed",
    "page.webp": "failed", "bomb.png": "failed", "dangling.jpg": "failed",
    "base.png": "ok", "png_named.jpg": "ok", "cmyk.jpg": "ok", "gray.png": "ok", "gray16.png": "ok",
    "la.png": "ok", "rgba.png": "ok", "rgba_on_white.png": "ok", "palette_t.png": "ok", "palette_t_rgba.png": "ok",
    "anim.gif": "ok", "anim_first.gif": "ok", "pages.tif": "ok", "page0.tif": "ok", "lossless.webp": "ok",
    "plain.bmp": "ok", "one_pixel.png": "ok", "strip.png": "ok", "rotated.png": "ok", "upright.png": "ok",
    "rotated.jpg": "ok", "rotated_jpg_upright.png": "ok", "plain.jpg": "ok",
    "café ünï 日本.png": "ok", "  spaced  name .png": "ok",
    "folder.jpg": "skipped", ".hidden.jpg": "skipped", "._base.png": "skipped",
}


def build_zoo(root: Path) -> Path:
    """Class folder `odd/` with every case, and `good/` with a few plain images."""
    odd = root / "odd"
    odd.mkdir(parents=True)
    rgb = _base()
    base = Image.fromarray(rgb)
    jpeg = _save(base, "JPEG", quality=92)
    png = _save(base, "PNG")
    rng = np.random.default_rng(0)
    files: dict[str, bytes] = {
        "zero.jpg": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "random.png": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "page.jpg": b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
        "page.webp": b"<html>" + b"x" * 500,
        "bomb.png": _png_bomb(12_000, 10_000),  # 120 Mpx, over the 100 Mpx limit
        "base.png": png,
        "png_named.jpg": png,
        "cmyk.jpg": _save(base.convert("CMYK"), "JPEG", quality=95),
        "gray.png": _save(base.convert("L"), "PNG"),
        # the same gray image in 16 bits (v * 257): rescaled, it must embed exactly like the 8-bit one
        "gray16.png": _save(Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257), "PNG"),
        "la.png": _save(base.convert("LA"), "PNG"),
        "plain.bmp": _save(base, "BMP"),
        "lossless.webp": _save(base, "WEBP", lossless=True),
        "one_pixel.png": _save(Image.new("RGB", (1, 1), (200, 30, 40)), "PNG"),
        "strip.png": _save(Image.fromarray(np.tile(rgb[:12, :100], (1, 40, 1))), "PNG"),  # 4000 x 12
        "upright.png": png,
        # stored rotated by 90 degrees, with EXIF orientation 6 ("rotate 90 CW to display"): displays as upright
        "rotated.png": _save(base.transpose(Image.Transpose.ROTATE_90), "PNG", exif=_orientation(6)),
        "rotated.jpg": _save(base.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=_orientation(6)),
        "plain.jpg": _save(base, "JPEG", quality=95),
        "café ünï 日本.png": png,
        "  spaced  name .png": png,
        ".hidden.jpg": jpeg,
        "._base.png": b"\x00\x05\x16\x07" + b"\x00" * 80,  # AppleDouble header
    }
    # RGBA with a transparent half, and its own composite on white saved as plain RGB
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, 64:] = 0
    rgba = Image.fromarray(np.dstack([rgb, alpha]))
    files["rgba.png"] = _save(rgba, "PNG")
    white = rgb.copy()
    white[:, 64:] = 255
    files["rgba_on_white.png"] = _save(Image.fromarray(white), "PNG")
    # palette image with a transparent index, and its RGBA twin
    pal = base.quantize(16)
    pal.info["transparency"] = 0
    files["palette_t.png"] = _save(pal, "PNG", transparency=0)
    files["palette_t_rgba.png"] = _save(pal.convert("RGBA"), "PNG")
    # animation: the first frame is what counts
    frame0, frame1 = base.quantize(64), Image.fromarray(255 - rgb).quantize(64)
    files["anim.gif"] = _save(frame0, "GIF", save_all=True, append_images=[frame1], duration=100, loop=0)
    files["anim_first.gif"] = _save(frame0, "GIF")
    files["pages.tif"] = _save(base, "TIFF", save_all=True, append_images=[Image.fromarray(255 - rgb)])
    files["page0.tif"] = _save(base, "TIFF")
    # what the rotated JPEG should decode to: its stored pixels turned upright (JPEG is lossy, so not `base`)
    with Image.open(io.BytesIO(files["rotated.jpg"])) as stored:
        files["rotated_jpg_upright.png"] = _save(stored.transpose(Image.Transpose.ROTATE_270), "PNG")
    for name, data in files.items():
        (odd / name).write_bytes(data)
    (odd / "folder.jpg").mkdir()
    (odd / "folder.jpg" / "inner.txt").write_text("a directory named like an image")
    os.symlink(odd / "gone.jpg", odd / "dangling.jpg")
    good = root / "good"
    good.mkdir()
    for i in range(3):
        Image.fromarray(_base(seed=10 + i)).save(good / f"g{i}.jpg", quality=90)
    return root


def _orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExtractSummary, FeatureStore]:
    root = build_zoo(tmp_path_factory.mktemp("zoo") / "images")
    summary = extract(root, root.parent / "zoo.h5", workers=0, batch_size=4)
    return summary, FeatureStore.open(summary.store)


def _row(store: FeatureStore, name: str) -> int:
    rows = [i for i, p in enumerate(store.paths) if p == f"odd/{name}"]
    assert len(rows) == 1, f"{name}: {len(rows)} rows"
    return rows[0]


def _emb(store: FeatureStore, name: str) -> np.ndarray:
    return store.features([_row(store, name)])[0]


def test_every_case_is_embedded_or_recorded_and_counted(zoo: tuple[ExtractSummary, FeatureStore]) -> None:
    summary, store = zoo
    keys = {str(p) for p in store.paths}
    for name, expected in EXPECTED.items():
        if expected == "skipped":
            assert f"odd/{name}" not in keys and not any(k.startswith(f"odd/{name}/") for k in keys), name
            continue
        row = _row(store, name)
        status, reason, feats = store.status[row], str(store.errors[row]), store.features([row])[0]
        if expected == "ok":
            assert status == OK and reason == "" and np.isfinite(feats).all() and np.abs(feats).sum() > 0, name
        else:
            assert status == FAILED and reason, name
            assert np.isnan(feats).all(), name  # a failed row never carries a usable embedding
    n_ok = sum(v == "ok" for v in EXPECTED.values()) + 3  # plus good/
    n_failed = sum(v == "failed" for v in EXPECTED.values())
    assert (summary.embedded, summary.failed, summary.complete) == (n_ok, n_failed, True)
    assert (store.n_ok, int((store.status == FAILED).sum()), len(store)) == (n_ok, n_failed, n_ok + n_failed)
    assert store.complete
    X, y, paths = store.load()
    assert len(X) == len(y) == n_ok and np.isfinite(X).all()
    assert set(paths) == {str(p) for p, s in zip(store.paths, store.status, strict=True) if s == OK}


@pytest.mark.parametrize(("name", "reason"), [
    ("zero.jpg", "empty file"), ("truncated.jpg", ""), ("random.png", ""), ("page.jpg", ""),
    ("page.webp", ""), ("bomb.png", "decompression bomb: 12000x10000"), ("dangling.jpg", "broken symlink"),
])
def test_failures_carry_a_reason(zoo: tuple[ExtractSummary, FeatureStore], name: str, reason: str) -> None:
    _, store = zoo
    recorded = str(store.errors[_row(store, name)])
    assert reason in recorded and "\n" not in recorded and len(recorded) < 300, recorded


@pytest.mark.parametrize(("name", "twin"), [
    ("png_named.jpg", "base.png"),  # decoded by content, not by extension
    ("gray16.png", "gray.png"),  # 16-bit rescaled, not clipped to white
    ("rgba.png", "rgba_on_white.png"),  # alpha composited on white
    ("palette_t.png", "palette_t_rgba.png"),  # palette transparency treated like the RGBA image
    ("anim.gif", "anim_first.gif"),  # first frame
    ("pages.tif", "page0.tif"),  # first page
    ("lossless.webp", "base.png"),
    ("plain.bmp", "base.png"),
    ("rotated.png", "upright.png"),  # EXIF orientation applied
    ("rotated.jpg", "rotated_jpg_upright.png"),
    ("café ünï 日本.png", "base.png"),  # odd names reach the right file
    ("  spaced  name .png", "base.png"),
])
def test_embedding_equals_its_twin(zoo: tuple[ExtractSummary, FeatureStore], name: str, twin: str) -> None:
    _, store = zoo
    np.testing.assert_allclose(_emb(store, name), _emb(store, twin), rtol=1e-5, atol=1e-5)


def test_cmyk_jpeg_keeps_its_colours(zoo: tuple[ExtractSummary, FeatureStore]) -> None:
    """A CMYK JPEG embeds like the same picture saved as an RGB JPEG (lossy both, so close rather than equal);
    inverted or mis-converted colours would not."""
    _, store = zoo

    def cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    cmyk, rgb_jpeg = _emb(store, "cmyk.jpg"), _emb(store, "plain.jpg")
    assert cos(cmyk, rgb_jpeg) > 0.97
    assert cos(cmyk, rgb_jpeg) > cos(cmyk, _emb(store, "gray.png")) + 0.1


def _garbage_folder(root: Path, good: int, junk: int) -> Path:
    for i in range(good):
        (root / "a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(_base(seed=i)).save(root / "a" / f"img_{i:02d}.png")
    for i in range(junk):
        (root / "b").mkdir(parents=True, exist_ok=True)
        (root / "b" / f"junk_{i:02d}.jpg").write_text(f"<html>page {i}</html>")
    return root


@pytest.mark.parametrize("limit", ["5", "0.5", "50%"])
def test_max_failures_aborts_a_garbage_folder(tmp_path: Path, limit: str, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _garbage_folder(tmp_path / "scraped", good=4, junk=36)
    out = tmp_path / "f.h5"
    code = main(["extract", str(folder), "-o", str(out), "--workers", "0", "--batch-size", "2",
                 "--max-failures", limit])
    # The first test in a run to use ONNX Runtime also sees the one-off export notice.
    err = "".join(line for line in capsys.readouterr().err.splitlines(keepends=True)
                  if not line.startswith("exporting "))
    assert code == 1, err
    assert err.startswith("error: aborted:") and err.count("\n") == 1 and "Traceback" not in err
    assert f"(limit {float(limit.rstrip('%')) / (100 if '%' in limit else 1):g}" in err
    assert "is " + str(folder) + " an image folder?" in err and "--max-failures" in err
    store = FeatureStore.open(out)  # what was done is saved, marked incomplete
    assert not store.complete and len(store) < 40
    # without the limit the same folder completes, every file accounted for
    assert main(["extract", str(folder), "-o", str(out), "--workers", "0", "--batch-size", "2"]) == 0
    store = FeatureStore.open(out)
    assert store.complete and (store.n_ok, len(store)) == (4, 40)


def test_max_failures_does_not_trip_on_a_few_bad_files(tmp_path: Path) -> None:
    folder = _garbage_folder(tmp_path / "photos", good=8, junk=2)
    summary = extract(folder, tmp_path / "f.h5", workers=0, batch_size=2, max_failures=0.5)
    assert (summary.embedded, summary.failed, summary.complete) == (8, 2, True)


def test_retry_failed_retries_only_failed_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file that failed for a transient reason (here: unreadable content that is later restored with the same
    size and mtime, as after a network-share hiccup) is not retried by a plain re-run, only by --retry-failed."""
    folder = _garbage_folder(tmp_path / "imgs", good=6, junk=0)
    victim = folder / "a" / "img_03.png"
    good = victim.read_bytes()
    victim.write_bytes(bytes(len(good)))  # same size, unreadable
    stamp = victim.stat().st_mtime_ns
    out = tmp_path / "f.h5"
    argv = ["extract", str(folder), "-o", str(out), "--workers", "0", "--batch-size", "2"]
    assert main(argv) == 0
    first = FeatureStore.open(out)
    assert (first.n_ok, int((first.status == FAILED).sum())) == (5, 1)
    victim.write_bytes(good)
    os.utime(victim, ns=(stamp, stamp))
    assert main(argv) == 0
    assert FeatureStore.open(out).n_ok == 5  # unchanged file: its failure is remembered, not retried
    capsys.readouterr()
    assert main([*argv, "--retry-failed"]) == 0
    printed = capsys.readouterr().out
    store = FeatureStore.open(out)
    assert store.complete and (store.n_ok, len(store)) == (6, 6)
    ok_before = [i for i in range(6) if first.status[i] == OK]
    np.testing.assert_array_equal(store.features(ok_before), first.features(ok_before))  # reused, not recomputed
    assert "1 embedded" in printed.replace(",", "") or "embedded 1" in printed, printed
    reference = extract(folder, tmp_path / "ref.h5", workers=0, batch_size=2)
    np.testing.assert_allclose(store.features(), FeatureStore.open(reference.store).features(), rtol=1e-5, atol=1e-5)


def test_unwritable_store_is_left_byte_identical(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A later run that cannot write (read-only directory) fails with one line and leaves the store as it was."""
    folder = _garbage_folder(tmp_path / "imgs", good=4, junk=0)
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "f.h5"
    argv = ["extract", str(folder), "-o", str(out), "--workers", "0"]
    assert main(argv) == 0
    before = out.read_bytes()
    Image.fromarray(_base(seed=99)).save(folder / "a" / "new.png")  # work to do, so the store must be rewritten
    readonly = _make_readonly(outdir)
    try:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 1, err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
        assert str(outdir) in err and ("read-only" in err.lower() or "cannot write" in err or "ermission" in err)
        assert out.read_bytes() == before
        assert FeatureStore.open(out).complete
    finally:
        readonly()
    assert main(argv) == 0 and FeatureStore.open(out).n_ok == 5


def _make_readonly(directory: Path):
    """Make `directory` unwritable: chmod for ordinary users; a read-only bind mount for root (who ignores modes).

    Returns a function that undoes it.
    """
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return lambda: directory.chmod(0o755)
    import subprocess

    ok = subprocess.run(["mount", "--bind", str(directory), str(directory)], capture_output=True).returncode == 0
    ok = ok and subprocess.run(["mount", "-o", "remount,bind,ro", str(directory)],
                               capture_output=True).returncode == 0
    if not ok:
        subprocess.run(["umount", str(directory)], capture_output=True)
        pytest.skip("running as root without permission to mount: cannot make a directory read-only")
    return lambda: subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def test_store_from_another_backbone_class_set_is_refused_naming_both(tmp_path: Path, shared_store: Path) -> None:
    """A hold-out store must match the training store's backbone and classes; the message names both sides."""
    from embedfit.errors import StoreMismatchError
    from embedfit.fitting.evaluate import fit

    odd = tmp_path / "holdout"
    shutil.copytree(Path(FeatureStore.open(shared_store).root), odd)
    (odd / "gravel").rename(odd / "marble")  # a class the training store never saw
    test_store = extract(odd, tmp_path / "holdout.h5", workers=0).store
    with pytest.raises(StoreMismatchError, match=r"marble") as info:
        fit(shared_store, "ridge", test_store=test_store, output=tmp_path / "run")
    assert str(test_store) in str(info.value)


def test_joblib_file_in_place_of_a_model_is_refused_and_not_run(tmp_path: Path, shared_store: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`embedfit predict` on a run whose model file was swapped for a crafted joblib dump: refused, nothing runs."""
    import joblib

    from embedfit.fitting.evaluate import fit

    run = fit(shared_store, "ridge", cv=3, output=tmp_path / "run").run_dir
    marker = tmp_path / "executed"
    joblib.dump(_Payload(str(marker)), run / "model.skops")
    from tests.test_fit import rebind_model_file

    rebind_model_file(run)  # the sidecar rewritten too: the file format check must still refuse it
    code = main(["predict", str(run), str(FeatureStore.open(shared_store).root)])
    err = capsys.readouterr().err
    assert code == 1 and "not a skops model file" in err and err.count("\n") == 1, err
    assert not marker.exists()


class _Payload:
    """Unpickling this would write a file: proof that code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "code ran"))
