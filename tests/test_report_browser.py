"""The HTML report in a real browser (headless Chromium, Debian's `chromium`, installed by .ci/run): with 2, 10
and 100 classes, nothing overflows the page or its cell, every image loads, thumbnails open larger on a click, a
single hold-out shows intervals, and many classes lead with the most-confused pairs."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedfit.fitting.evaluate import fit
from embedfit.report import build_report
from embedfit.runs import read_csv
from tests.test_fit import blobs, synthetic_store

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Measured by the browser once the page has loaded, and written into the page for --dump-dom to carry out.
CHECKS = """<script>
window.addEventListener("load", () => {
  const out = {};
  out.pageOverflow = document.documentElement.scrollWidth - window.innerWidth;
  out.cellOverflow = [...document.querySelectorAll(".thumbs figure, td")]
    .filter(e => e.scrollWidth > e.clientWidth + 1).length;
  out.images = document.images.length;
  out.broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length;
  out.ids = [...document.querySelectorAll("section")].map(s => s.id);
  out.text = document.body.innerText;
  out.tallest = Math.max(...[...document.images].map(i => i.naturalHeight));
  const thumb = document.querySelector(".thumbs img");
  if (thumb) {
    const before = thumb.getBoundingClientRect().width;
    thumb.click();
    out.zoom = [before, thumb.getBoundingClientRect().width];
  }
  const pre = document.createElement("pre");
  pre.id = "checks";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _report(tmp_path: Path, k: int, *, holdout: bool) -> Path:
    """A run on k classes (long names from 10 on), its mistakes' images on disk, and its report."""
    names = [f"class {c:03d}" if k < 10 else f"a rather long class name that keeps going, number {c:03d}"
             for c in range(k)]
    X, y = blobs(n=6 * k, d=16, k=k, seed=0)
    X[: 2 * k] += np.random.default_rng(1).normal(scale=1.5, size=(2 * k, 16))  # some mistakes
    store = synthetic_store(tmp_path / "train.h5", X, y, names).path
    test = None
    if holdout:
        Xt, yt = blobs(n=3 * k, d=16, k=k, seed=2)
        test = synthetic_store(tmp_path / "test.h5", Xt, yt, names).path
    run = fit(store, "ridge", cv=3, test_store=test, output=tmp_path / "run").run_dir
    rng = np.random.default_rng(0)
    for row in read_csv(run / "predictions.csv"):
        path = tmp_path / row["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(path, format="PNG")
    return build_report([run], tmp_path / "report.html")


def _in_chromium(page: Path, tmp_path: Path, checks: str = CHECKS) -> dict:
    checked = tmp_path / "checked.html"
    checked.write_text(page.read_text().replace("</body>", checks + "</body>"))
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,900",
                          "--virtual-time-budget=10000", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                          checked.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="checks">(.*?)</pre>', dom.stdout, flags=re.S)
    assert found, dom.stderr[-2000:]
    return json.loads(html.unescape(found.group(1)))


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium; .ci/run installs it)")
@pytest.mark.parametrize(("k", "holdout"), [(2, False), (10, False), (100, True)])
def test_the_report_reads_well_in_a_browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, k: int,
                                            holdout: bool) -> None:
    monkeypatch.chdir(tmp_path)  # the synthetic stores' image root is "."
    seen = _in_chromium(_report(tmp_path, k, holdout=holdout), tmp_path)
    assert seen["pageOverflow"] <= 0 and seen["cellOverflow"] == 0  # long names wrap or end in an ellipsis
    assert seen["images"] >= 4 and seen["broken"] == 0
    assert seen["zoom"][1] > 1.5 * seen["zoom"][0]  # a thumbnail opens larger
    assert seen["ids"].index("confused") < seen["ids"].index("confusion")  # the pairs come first
    if holdout:
        assert "± 0.000" not in seen["text"] and "bootstrap interval" in seen["text"]
        assert "no spread over folds to draw" in seen["text"]
    if k > 20:
        assert "no colour legend" in seen["text"] and "without class labels" in seen["text"]  # 100 labels: none
        assert seen["tallest"] > 100 * 12  # the per-class chart grows with the class count


# The audit page's "Download fixes.csv", clicked: the CSV handed to the Blob is carried out (the download itself is
# left out: headless Chromium would save it somewhere of its own).
FIXES = """<script>
window.addEventListener("load", () => {
  let csv = null;
  const RealBlob = window.Blob;
  window.Blob = function (parts, options) { csv = parts.join(""); return new RealBlob(parts, options); };
  HTMLAnchorElement.prototype.click = function () {};
  document.querySelector("button").click();
  const pre = document.createElement("pre");
  pre.id = "checks";
  pre.textContent = JSON.stringify({csv: csv});
  document.body.appendChild(pre);
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium; .ci/run installs it)")
def test_the_audit_pages_fixes_csv_is_formula_escaped(tmp_path: Path) -> None:
    """A class folder named like a formula: the page's fixes CSV escapes it as embedfit's CSV writer does (a
    leading "'"), and `fit --exclude` reads the downloaded file back to the very paths."""
    import shutil

    from conftest import write_tree

    from embedfit import audit
    from embedfit.auditing import build_audit_report, read_exclusions
    from embedfit.extraction.local import extract
    from embedfit.fitting.data import load_dataset

    root = write_tree(tmp_path / "tree", per_class=3, seed=1)
    (root / "brick").rename(root / "=HYPERLINK(1)")
    shutil.copy(root / "=HYPERLINK(1)" / "brick_000.jpg", root / "=HYPERLINK(1)" / "brick_copy.jpg")
    store = extract(root, tmp_path / "f.h5", workers=0).store
    result = audit(store, tmp_path / "audit", imagenet="off")
    (dup,) = result.of_kind("exact_duplicate")
    assert dup["path"] == "=HYPERLINK(1)/brick_copy.jpg"  # the copy: excluded by default
    seen = _in_chromium(build_audit_report(tmp_path / "audit", tmp_path / "audit.html"), tmp_path, FIXES)
    lines = seen["csv"].splitlines()
    assert lines[0] == '"path","action"'
    assert '"\'=HYPERLINK(1)/brick_copy.jpg","exclude"' in lines
    assert not [line for line in lines if line.startswith('"=')]  # no cell a spreadsheet would run
    downloaded = tmp_path / "fixes.csv"
    downloaded.write_text(seen["csv"])
    assert read_exclusions(downloaded) == {"=HYPERLINK(1)/brick_copy.jpg"}
    assert "=HYPERLINK(1)/brick_copy.jpg" not in load_dataset(store, exclude=downloaded).paths
