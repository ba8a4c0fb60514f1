"""Start-up and small-data latency of whole `embedfit` processes, each against its reference in the same run.

Targets (issue "One clear shape for the code, and commands that start in a blink"), on a 2-core machine:
- `embedfit --help` and `embedfit COMMAND --help`: at most 0.4 x `python -c "import torch"`;
- `embedfit info STORE` imports no torch (tests/test_startup.py) and `embedfit backbones` runs under 1.5 s;
- `embedfit fit STORE` on a 245 x 1280 store: at most 1.5 x the hand-written scikit-learn script (hand_fit.py);
- re-running `extract` on a folder whose images are all stored: at most 1.5 x `python -c "import torch"`;
- a command refused on its arguments (a folder that does not exist, a misspelt model): at most 0.5 x
  `python -c "import torch"` (issue "Real use": every check that needs no model comes before torch and
  scikit-learn; tests/test_startup.py checks that they are not imported).

Each command runs `--repeats` times, interleaved with the others so that all see the same drift of the machine;
the figures are medians of wall time. Usage: python bench_startup.py [--repeats 5] [--refusals-only]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import CACHE, jpeg_folder, save

BIN = Path(sys.executable).parent


def _store(path: Path, n: int = 245, dim: int = 1280, seed: int = 0) -> Path:
    """A real store of n x dim synthetic features (2 classes, overlapping), like a small two-class image set."""
    from embedfit.backbones.spec import BackboneSpec
    from embedfit.images import ImageRecord, ImageSource
    from embedfit.storage import OK, StoreSettings, StoreWriter

    if path.is_file():
        return path
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    X = (rng.normal(size=(n, dim)) + 0.15 * y[:, None] * rng.normal(size=dim)).astype(np.float32)
    X = np.maximum(X + 0.5, 0)  # post-ReLU-like, as CNN features are
    spec = BackboneSpec("efficientnet_lite0", "timm/tf_efficientnet_lite0", "synthetic", "", (224, 224), 256,
                        "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), dim)
    records = [ImageRecord(Path(f"c{c}/img_{i:04d}.jpg"), f"c{c}/img_{i:04d}.jpg", int(c), 1, 1)
               for i, c in enumerate(y)]
    with StoreWriter(path, StoreSettings(spec, "float32", "none", "fp32")) as writer:
        writer.write_part([r.key for r in records], [f"c{r.label}" for r in records], [1] * n, [1] * n, [OK] * n,
                          [""] * n, X)
        writer.commit(records, ["c0", "c1"], complete=True)
    ImageSource  # noqa: B018  (the records above are what scan_images would give)
    return path


def _image_store(tmp: Path, n: int = 400) -> tuple[Path, Path]:
    """A folder of n small JPEGs in two classes, fully extracted once (untimed)."""
    flat = jpeg_folder(n, 96, 72)
    folder = tmp / f"classes_{n}"
    if not folder.is_dir():
        for i, src in enumerate(sorted(flat.glob("*.jpg"))):
            dst = folder / f"class_{i % 2}" / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    store = tmp / f"classes_{n}.h5"
    subprocess.run([str(BIN / "embedfit"), "extract", str(folder), "-o", str(store)], check=True,
                   capture_output=True, env=_env())
    return folder, store


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "EMBEDFIT_OFFLINE": "1"}


def _time(cmd: list[str], refused: bool = False) -> float:
    """Wall seconds of `cmd`, which must succeed (or, when `refused`, fail with a one-line error)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    seconds = time.perf_counter() - t0
    if (proc.returncode != 0) != refused or (refused and not proc.stderr.startswith("error: ")):
        raise SystemExit(f"{' '.join(cmd)} {'was not refused' if refused else 'failed'}: {proc.stderr[-500:]}")
    return seconds


REFUSED = ("embedfit extract /no/such/folder (refused)", "embedfit fit STORE --model svn (refused)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--refusals-only", action="store_true", help="Time only the refused commands and the "
                        "reference (seconds, not minutes: no images to extract first).")
    args = parser.parse_args()
    tmp = CACHE / "startup"
    tmp.mkdir(parents=True, exist_ok=True)
    store = _store(tmp / "small_245x1280.h5")
    ef, py = str(BIN / "embedfit"), sys.executable
    refusals = {
        "import torch": [py, "-c", "import torch"],
        REFUSED[0]: [ef, "extract", str(tmp / "no" / "such" / "folder"), "-o", str(tmp / "refused.h5")],
        REFUSED[1]: [ef, "fit", str(store), "--model", "svn", "-o", str(tmp / "refused-run")],
    }
    if args.refusals_only:
        _report(args.repeats, refusals, "startup_refusals")
        return
    folder, image_store = _image_store(tmp)
    commands = {
        **refusals,
        "embedfit --help": [ef, "--help"],
        "embedfit fit --help": [ef, "fit", "--help"],
        "embedfit extract --help": [ef, "extract", "--help"],
        "embedfit info STORE": [ef, "info", str(store)],
        "embedfit backbones": [ef, "backbones"],
        "hand-written scikit-learn fit": [py, str(Path(__file__).with_name("hand_fit.py")), str(store)],
        "embedfit fit STORE": [ef, "fit", str(store), "-o", str(tmp / "run")],
        "embedfit extract (all stored)": [ef, "extract", str(folder), "-o", str(image_store)],
    }
    _report(args.repeats, commands, "startup")


def _report(repeats: int, commands: dict[str, list[str]], name: str) -> None:
    """Time `commands` interleaved, print each target's ratio, and save the results as `name`."""
    times: dict[str, list[float]] = {label: [] for label in commands}
    for r in range(repeats):
        for label, cmd in commands.items():
            times[label].append(_time(cmd, refused=label in REFUSED))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    torch_s = med["import torch"]
    rows = [(label, med[label] / torch_s, "x import torch", 0.5) for label in REFUSED]
    if "hand-written scikit-learn fit" in med:
        rows += _startup_rows(med, torch_s)
    print(f"\nmedians of {repeats} interleaved runs (wall s): "
          + ", ".join(f"{k} {v:.2f}" for k, v in med.items()))
    print(f"{'command':42s} {'ratio':>8s}  {'against':16s} {'target':>7s}  met")
    for label, value, unit, target in rows:
        met = "" if target is None else ("yes" if value <= target else "NO")
        print(f"{label:42s} {value:8.2f}  {unit:16s} {'' if target is None else f'<= {target}':>7s}  {met}")
    path = save(name, {"repeats": repeats, "seconds": times, "medians": med,
                       "rows": [{"command": n, "value": v, "unit": u, "target": t} for n, v, u, t in rows]})
    print(f"results: {path}")


def _startup_rows(med: dict[str, float], torch_s: float) -> list[tuple[str, float, str, float | None]]:
    hand_s = med["hand-written scikit-learn fit"]
    return [
        ("embedfit --help", med["embedfit --help"] / torch_s, "x import torch", 0.4),
        ("embedfit fit --help", med["embedfit fit --help"] / torch_s, "x import torch", 0.4),
        ("embedfit extract --help", med["embedfit extract --help"] / torch_s, "x import torch", 0.4),
        ("embedfit info STORE", med["embedfit info STORE"] / torch_s, "x import torch", None),
        ("embedfit backbones", med["embedfit backbones"], "s", 1.5),
        ("embedfit fit STORE (245 x 1280)", med["embedfit fit STORE"] / hand_s, "x hand-written", 1.5),
        ("embedfit extract, 400 images all stored", med["embedfit extract (all stored)"] / torch_s, "x import torch",
         1.5),
    ]


if __name__ == "__main__":
    main()
