"""Terminal output shared by the CLI commands (rich tables); no logic lives here."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from embedfit.extract import ExtractSummary
from embedfit.store import FAILED, FeatureStore


def print_extract_summary(console: Console, s: ExtractSummary) -> None:
    """One block after `embedfit extract`: counts, speed, where the store is, failures."""
    state = "complete" if s.complete else "INCOMPLETE"
    console.print(
        f"{s.store}: {state} — {s.embedded} embedded, {s.failed} failed, {s.reused} already stored"
        + (f", {s.skipped} skipped" if s.skipped else "")
        + (f", {s.missing} no longer present" if s.missing else "")
        + f" of {s.total} images in {s.seconds:.1f} s ({s.images_per_second:.1f} img/s on {s.device})",
        soft_wrap=True, markup=False,
    )
    for path, reason in s.failures[:10]:
        console.print(f"  failed: {path}: {reason}", markup=False, soft_wrap=True)
    if s.failed > 10:
        console.print(f"  … {s.failed - 10} more (embedfit info {s.store} --failed)", markup=False)


def print_store_info(console: Console, store: FeatureStore, *, list_failed: bool = False) -> None:
    """`embedfit info`: provenance, per-class counts, status counts, optionally the failed files."""
    s = store.summary()
    table = Table(show_header=False, box=None)
    for key in ("path", "backbone", "images", "ok", "failed", "missing", "dtype", "precision", "tta", "device",
                "complete", "root", "created", "updated"):
        table.add_row(key, str(s[key]))
    table.add_row("extract time", f"{s['extract_seconds']:.1f} s")
    table.add_row("versions", ", ".join(f"{k} {v}" for k, v in s["versions"].items()))
    console.print(table)
    if s["classes"]:
        classes = Table("class", "images")
        for name, count in s["classes"].items():
            classes.add_row(name, str(count))
        console.print(classes)
    failed = [(str(p), str(e)) for p, e, st in zip(store.paths, store.errors, store.status, strict=True)
              if st == FAILED]
    for path, reason in failed if list_failed else failed[:5]:
        console.print(f"  failed: {path}: {reason}", markup=False, soft_wrap=True)
    if failed and not list_failed and len(failed) > 5:
        console.print(f"  … {len(failed) - 5} more (--failed lists them all)")
