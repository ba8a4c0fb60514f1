"""Terminal output shared by the CLI commands (rich tables); no logic lives here."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from embedfit.storage import FAILED, FeatureStore

if TYPE_CHECKING:
    from embedfit.extraction.settings import ExtractSummary


def print_extract_summary(console: Console, s: ExtractSummary) -> None:
    """One block after `embedfit extract`: counts, speed, where the store is, failures."""
    state = "complete" if s.complete else "INCOMPLETE"
    console.print(
        f"{s.store}: {state} — {s.embedded} embedded, {s.failed} failed, {s.reused} already stored"
        + (f", {s.skipped} skipped" if s.skipped else "")
        + (f", {s.missing} no longer present" if s.missing else "")
        + f" of {s.total} images in {s.seconds:.1f} s ({s.images_per_second:.1f} img/s on {s.device}"
        + (" with ONNX Runtime)" if s.runtime == "onnx" else ")"),
        soft_wrap=True, markup=False,
    )
    if "cluster" in s.startup_phases:  # Ray: where the start-up went (a local run's is its model load)
        console.print(f"  start-up {s.startup_seconds:.1f} s: "
                      + ", ".join(f"{k} {v:.1f} s" for k, v in s.startup_phases.items()), markup=False, soft_wrap=True)
    for note in s.notes:
        console.print(f"  note: {note}", markup=False, soft_wrap=True)
    for path, reason in s.failures[:10]:
        console.print(f"  failed: {path}: {reason}", markup=False, soft_wrap=True)
    if s.failed > 10:
        console.print(f"  … {s.failed - 10} more (embedfit info {s.store} --failed)", markup=False)
    for entry, reason in s.skips[:5]:
        console.print(f"  skipped: {entry}: {reason}", markup=False, soft_wrap=True)
    if s.skipped > 5:
        console.print(f"  … {s.skipped - 5} more skipped", markup=False)


def print_store_info(console: Console, store: FeatureStore, *, list_failed: bool = False) -> None:
    """`embedfit info`: provenance, per-class counts, status counts, optionally the failed files."""
    s = store.summary()
    rows = [(key, str(s[key])) for key in (
        "path", "backbone", "architecture", "weights", "preprocessing", "images", "ok", "failed", "missing", "dtype",
        "precision", "tta", "device", "runtime", "decode", "engine", "complete", "root", "source_kind", "created",
        "updated", "fingerprint")]
    rows += [("extract time", f"{s['extract_seconds']:.1f} s"),
             ("versions", ", ".join(f"{k} {v}" for k, v in s["versions"].items()))]
    # Plain aligned lines, not a table: a table pads every line to its widest value (160 columns when piped).
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        console.print(f" {key:<{width}}  {value}", markup=False, highlight=False, soft_wrap=True)
    for member in s.get("members", []):  # a collection (`embedfit.storage.collection`)
        console.print(f" member  {member['path']}: {member['images']} images, {member['ok']} ok"
                      + ("" if member["complete"] else ", INCOMPLETE"), markup=False, highlight=False, soft_wrap=True)
    if s["class_status"]:
        shown = [st for st in ("ok", "failed", "missing") if st == "ok" or s[st]]  # columns that are not all 0
        classes = Table("class", *shown)
        for name, counts in s["class_status"].items():
            classes.add_row(name, *(str(counts[st]) for st in shown))
        console.print(classes)
    failed = [(str(p), str(e)) for p, e, st in zip(store.paths, store.errors, store.status, strict=True)
              if st == FAILED]
    for path, reason in failed if list_failed else failed[:5]:
        console.print(f"  failed: {path}: {reason}", markup=False, soft_wrap=True)
    if failed and not list_failed and len(failed) > 5:
        console.print(f"  … {len(failed) - 5} more (--failed lists them all)")


def print_fit_results(console: Console, results: list) -> None:
    """Scores (mean ± std over folds) and timings of each fitted model, then where its run directory is."""
    metrics = {"accuracy": "accuracy", "balanced_accuracy": "balanced", "f1_macro": "macro F1",
               "log_loss": "log loss", "roc_auc": "ROC AUC"}
    table = Table("model", *metrics.values())
    for r in results:
        scores = r.metrics["scores"]
        cells = [_mean_std(scores[m]) if m in scores else "—" for m in metrics]
        table.add_row(r.model, *cells)
    ev = results[0].metrics["evaluation"]
    n_test = len(results[0].predictions)
    if ev["strategy"] == "cv":
        how = (f"{ev['n_splits']}-fold stratified{' grouped' if ev['groups'] else ''} CV"
               + (f" × {ev['repeats']}" if ev["repeats"] > 1 else ""))
    elif ev.get("test_store"):
        how = f"scored on the hold-out store {ev['test_store']} ({n_test} image{'s' * (n_test != 1)})"
    else:
        how = (f"scored on a hold-out split of {n_test} image{'s' * (n_test != 1)}"
               + (f" × {ev['repeats']}" if ev["repeats"] > 1 else ""))
    console.print(f"{results[0].metrics['backbone']} features, {results[0].metrics['n_samples']} "
                  f"{'training ' if ev.get('test_store') else ''}images "
                  f"({results[0].metrics['n_excluded']} failed/unlabeled left out), {how}"
                  + (", nested grid search" if ev["search"] else ""), soft_wrap=True, markup=False)
    console.print(table)
    for r in results:
        t = r.metrics["timing"]
        where = f" on {r.metrics['device']}" if r.metrics.get("device", "cpu") != "cpu" else ""
        note = f"; {r.metrics['device_note']}" if r.metrics.get("device_note") else ""
        console.print(f"{r.model}: {r.run_dir} (evaluation {t['cv_seconds']:.1f} s, "
                      f"final fit {t['fit_seconds']:.1f} s{where}{note})", soft_wrap=True)


def _mean_std(score: dict) -> str:
    """0.993±0.008 -> '.993±.008' so that a row of five scores fits an 80-column terminal."""
    return f"{score['mean']:.3f}±{score['std']:.3f}".replace("0.", ".")


def print_leaderboard(console: Console, rows: list[dict]) -> None:
    """`embedfit report`: one table per evaluation set (rows of `report.summarize_runs`), best balanced accuracy
    first in each; runs scored on different images are never ranked in one table."""
    groups: dict[int, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get("group", 0), []).append(r)
    if len(groups) > 1:
        console.print(f"{len(groups)} different evaluation sets: runs are ranked within each set only; scores of "
                      "different sets are not comparable.", soft_wrap=True, markup=False)
    for members in groups.values():
        console.print(f"evaluated on {members[0].get('evaluation', '?')}", soft_wrap=True, markup=False)
        table = Table("run", "backbone", "model", "accuracy", "balanced", "macro F1", "train imgs", "extract s",
                      "train s")
        for r in members:
            cells = [_mean_std({"mean": r[f"{m}_mean"], "std": r[f"{m}_std"]}) if f"{m}_mean" in r else "—"
                     for m in ("accuracy", "balanced_accuracy", "f1_macro")]
            extract = r.get("extract_seconds")
            table.add_row(Path(r["run"]).name, r["backbone"].split(" ")[0], r["model"], *cells,
                          str(r.get("training_images", "")).split(" ")[0],
                          "—" if extract is None else f"{extract:.1f}", f"{r['train_seconds']:.1f}")
        console.print(table)
