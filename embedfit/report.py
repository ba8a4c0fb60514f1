"""Reports on run directories: a self-contained HTML file and a leaderboard for the terminal.

The HTML report has one section per view, each with a stable id: leaderboard (backbone × classifier with scores
and times), metrics, confusion (counts and row-normalised), per-class, cv-spread (fold scores per run),
embedding-map (PCA and t-SNE of the store's embeddings, mistakes marked) and mistakes (the most confident
out-of-fold errors as thumbnails). Images are inlined as base64 PNG/JPEG: the file can be mailed as it is.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedfit.errors import InputError, ModelFileError, check_output_file
from embedfit.runs import read_sidecar

# Section ids, in order; the last is a prefix: one "mistakes-RUN" section per run.
SECTIONS = ("leaderboard", "metrics", "confusion", "per-class", "cv-spread", "embedding-map", "mistakes")
_TSNE_MAX = 3000  # t-SNE above this many points takes minutes on a laptop; PCA is always shown


@dataclass
class Run:
    """A run directory's contents, as the report needs them."""

    path: Path
    meta: dict[str, Any]
    metrics: dict[str, Any]
    predictions: list[dict[str, str]]

    @property
    def label(self) -> str:
        return f"{self.meta['spec']['name']} + {self.metrics['model']} ({self.path.name})"


def read_run(path: str | Path) -> Run:
    """Load model.json, metrics.json and predictions.csv of a run directory."""
    path = Path(path)
    meta = read_sidecar(path)
    try:
        metrics = json.loads((path / "metrics.json").read_text())
    except FileNotFoundError:
        raise ModelFileError(f"{path} has no metrics.json; was the run interrupted?") from None
    except ValueError as exc:
        raise ModelFileError(f"{path / 'metrics.json'} is damaged ({exc})") from None
    predictions: list[dict[str, str]] = []
    if (path / "predictions.csv").is_file():
        with open(path / "predictions.csv", newline="", encoding="utf-8") as f:
            predictions = list(csv.DictReader(f))
    return Run(path, meta, metrics, predictions)


def summarize_runs(runs: Sequence[str | Path | Run]) -> list[dict[str, Any]]:
    """Leaderboard rows (best balanced accuracy first): backbone, model, scores, times."""
    rows = []
    for run in (r if isinstance(r, Run) else read_run(r) for r in runs):
        s, t = run.metrics["scores"], run.metrics.get("timing", {})
        rows.append({
            "run": str(run.path), "backbone": run.metrics.get("backbone", run.meta["spec"]["name"]),
            "model": run.metrics["model"], "evaluation": run.metrics.get("evaluation", {}).get("strategy", ""),
            **{f"{m}_mean": s[m]["mean"] for m in s}, **{f"{m}_std": s[m]["std"] for m in s},
            "extract_seconds": float(t.get("extract_seconds", 0.0)),
            "train_seconds": float(t.get("cv_seconds", 0.0)) + float(t.get("fit_seconds", 0.0))
            + float(t.get("train_seconds", 0.0)),
        })
    return sorted(rows, key=lambda r: -r.get("balanced_accuracy_mean", r.get("accuracy_mean", 0.0)))


# ---------------------------------------------------------------------------------------------------
# HTML


def build_report(runs: Sequence[str | Path], output: str | Path, *, title: str = "embedfit report") -> Path:
    """Write a self-contained HTML report comparing `runs`; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    if not runs:
        raise InputError("give at least one run directory to report on")
    from embedfit.sweep import build_sweep_report, is_sweep_folder

    if len(runs) == 1 and is_sweep_folder(runs[0]):
        return build_sweep_report(runs[0], output)
    check_output_file(output)
    loaded = [read_run(r) for r in runs]
    parts = [_leaderboard(loaded), _metrics(loaded), _confusion(loaded), _per_class(loaded), _cv_spread(loaded),
             _embedding_map(loaded[0]), *(_mistakes(r, len(loaded) > 1) for r in loaded)]
    body = "\n".join(parts)
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
section {{ margin-bottom: 2em; }} img {{ max-width: 100%; }} .note {{ color: #666; }}
.thumbs {{ display: flex; flex-wrap: wrap; gap: 10px; }} .thumbs figure {{ margin: 0; width: 140px; font-size: 12px; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="note">{len(loaded)} run(s): {", ".join(html.escape(r.label) for r in loaded)}</p>
{body}
</body></html>"""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(doc, encoding="utf-8")
    return output


def _section(sid: str, heading: str, content: str) -> str:
    return f'<section id="{sid}"><h2>{html.escape(heading)}</h2>\n{content}\n</section>'


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _fmt(score: dict[str, float] | None) -> str:
    return "—" if score is None else f"{score['mean']:.3f} ± {score['std']:.3f}"


def _leaderboard(runs: list[Run]) -> str:
    rows = []
    for r in sorted(runs, key=lambda r: -r.metrics["scores"].get("balanced_accuracy", {"mean": 0})["mean"]):
        s, t = r.metrics["scores"], r.metrics.get("timing", {})
        train = float(t.get("cv_seconds", 0)) + float(t.get("fit_seconds", 0)) + float(t.get("train_seconds", 0))
        rows.append([r.metrics.get("backbone", ""), r.metrics["model"], _fmt(s.get("accuracy")),
                     _fmt(s.get("balanced_accuracy")), _fmt(s.get("f1_macro")),
                     f"{float(t.get('extract_seconds', 0)):.1f}", f"{train:.1f}", r.path.name])
    note = ('<p class="note">Scores are mean ± std over the evaluation folds. Extraction is paid once per backbone; '
            "training time is evaluation plus the final fit.</p>")
    return _section("leaderboard", "Leaderboard", _table(
        ["backbone", "classifier", "accuracy", "balanced accuracy", "macro F1", "extract s", "train s", "run"],
        rows) + note)


def _metrics(runs: list[Run]) -> str:
    names = ["accuracy", "balanced_accuracy", "f1_macro", "log_loss", "roc_auc"]
    rows = [[r.label, *(_fmt(r.metrics["scores"].get(m)) for m in names),
             r.metrics.get("n_samples", ""), _evaluation(r.metrics.get("evaluation", {}))] for r in runs]
    return _section("metrics", "Metrics", _table(["run", *names, "images", "evaluation"], rows))


def _evaluation(ev: dict[str, Any]) -> str:
    if ev.get("strategy") != "cv":
        return ev.get("strategy", "")
    text = f"{ev['n_splits']}-fold CV" + (f" × {ev['repeats']}" if ev.get("repeats", 1) > 1 else "")
    return text + (", grouped" if ev.get("groups") else "") + (", nested search" if ev.get("search") else "")


def _confusion(runs: list[Run]) -> str:
    import matplotlib.pyplot as plt

    blocks = []
    for r in runs:
        cm = np.array(r.metrics["confusion_matrix"], dtype=float)
        names = r.metrics["class_names"]
        norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        size = max(4.0, 0.45 * len(names) + 2)
        fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size))
        for ax, mat, what in ((axes[0], cm, "counts"), (axes[1], norm, "row-normalised (recall)")):
            ax.imshow(mat, cmap="Blues")
            ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
            ax.set_yticks(range(len(names)), names)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            ax.set_title(what)
            if len(names) <= 20:
                for (i, j), v in np.ndenumerate(mat):
                    ax.text(j, i, f"{v:.0f}" if mat is cm else f"{v:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if v > mat.max() / 2 else "black")
        blocks.append(f"<h3>{html.escape(r.label)}</h3>{_png(fig)}")
    return _section("confusion", "Confusion matrices", "\n".join(blocks))


def _per_class(runs: list[Run]) -> str:
    import matplotlib.pyplot as plt

    blocks = []
    for r in runs:
        per = r.metrics["per_class"]
        names = list(per)
        x = np.arange(len(names))
        fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(names) + 2), 3.5))
        for k, metric in enumerate(("precision", "recall", "f1")):
            ax.bar(x + (k - 1) * 0.27, [per[c][metric] for c in names], width=0.27, label=metric)
        ax.set_xticks(x, names, rotation=45, ha="right")
        ax.set_ylim(0, 1.05)
        ax.legend(loc="lower right")
        rows = [[c, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", v["support"]]
                for c, v in per.items()]
        blocks.append(f"<h3>{html.escape(r.label)}</h3>{_png(fig)}"
                      + _table(["class", "precision", "recall", "F1", "support"], rows))
    return _section("per-class", "Per-class precision, recall and F1", "\n".join(blocks))


def _cv_spread(runs: list[Run]) -> str:
    import matplotlib.pyplot as plt

    folds = [r.metrics["scores"]["balanced_accuracy"]["folds"] for r in runs]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(runs) + 2), 3.5))
    ax.boxplot(folds, showmeans=True)
    for i, f in enumerate(folds, start=1):
        ax.scatter(np.full(len(f), i) + np.linspace(-0.08, 0.08, len(f)), f, s=12, color="k", zorder=3)
    ax.set_xticks(range(1, len(runs) + 1), [f"{r.meta['spec']['name']}\n{r.metrics['model']}" for r in runs])
    ax.set_ylabel("balanced accuracy per fold")
    return _section("cv-spread", "Score spread over folds", _png(fig))


def _embedding_map(run: Run) -> str:
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    from embedfit.store import FeatureStore

    heading = f"Embedding map ({run.label})"
    store_path = _predictions_store(run)
    if run.meta.get("kind") != "sklearn" or not run.predictions or not store_path.is_file():
        return _section("embedding-map", heading,
                        f'<p class="note">Not available: no feature store to map at {html.escape(str(store_path))}.'
                        "</p>")
    store = FeatureStore.open(store_path)
    rows, stored = stored_rows(run.predictions, store)
    if not rows:
        return _section("embedding-map", heading, '<p class="note">Not available: none of the predicted images '
                        f"has an embedding in {html.escape(str(store_path))} any more.</p>")
    X = store.features(stored)
    changed = ("" if store.fingerprint == run.meta.get("store_fingerprint") else
               f" The store has changed since the fit: {len(rows)} of {len(run.predictions)} predicted images"
               " are still in it, with their current embeddings.")
    names = run.metrics["class_names"]
    y = np.array([names.index(p["label"]) for p in rows])
    wrong = np.array([p["correct"] not in ("True", "true", "1") for p in rows])
    maps = [("PCA", PCA(2, random_state=0).fit_transform(X))]
    if 10 < len(X) <= _TSNE_MAX:
        from sklearn.manifold import TSNE

        maps.append(("t-SNE", TSNE(2, perplexity=min(30, len(X) // 4), init="pca", random_state=0).fit_transform(X)))
    fig, axes = plt.subplots(1, len(maps), figsize=(6 * len(maps), 5), squeeze=False)
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for ax, (what, Z) in zip(axes[0], maps, strict=True):
        for c, name in enumerate(names):
            m = y == c
            ax.scatter(Z[m, 0], Z[m, 1], s=10, color=cmap(c % cmap.N), label=name, alpha=0.8)
        ax.scatter(Z[wrong, 0], Z[wrong, 1], s=40, facecolors="none", edgecolors="k", label="misclassified")
        ax.set_title(what)
    axes[0][0].legend(fontsize=8, markerscale=1.5)
    note = (f'<p class="note">Embeddings of {len(X)} images from {html.escape(str(store_path))}, coloured by class; '
            f"circled points were misclassified out of fold.{html.escape(changed)}</p>")
    return _section("embedding-map", heading, _png(fig) + note)


def stored_rows(predictions: Sequence[dict[str, str]], store: Any) -> tuple[list[dict[str, str]], list[int]]:
    """The predictions whose image still has an embedding in `store`, and its row there.

    By path, not by the row numbers saved at fit time: a store re-extracted since then (images added, changed
    or removed) numbers its rows differently.
    """
    from embedfit.store import OK

    index = {key: i for i, key in enumerate(store.paths) if store.status[i] == OK}
    kept = [p for p in predictions if p["path"] in index]
    return kept, [index[p["path"]] for p in kept]


def _mistakes(run: Run, name_run: bool = False, top: int = 12) -> str:
    from PIL import Image

    from embedfit.images import decode_image

    heading = "Most confident mistakes" + (f" ({run.label})" if name_run else "")
    wrong = [p for p in run.predictions if p.get("correct") not in ("True", "true", "1")]
    if not wrong:
        return _section(f"mistakes-{run.path.name}", heading, '<p class="note">No mistakes to show.</p>')
    wrong.sort(key=lambda p: -float(p.get(f"p_{p['predicted']}", 0) or 0))
    root = _image_root(run)
    figures = []
    for p in wrong[:top]:
        conf = p.get(f"p_{p['predicted']}")
        caption = (f"{html.escape(p['path'])}<br>true <b>{html.escape(p['label'])}</b>, predicted "
                   f"<b>{html.escape(p['predicted'])}</b>" + (f" ({float(conf):.2f})" if conf else ""))
        path = Path(p["path"]) if Path(p["path"]).is_absolute() else root / p["path"]
        try:
            image = decode_image(path)
            image.thumbnail((128, 128), Image.Resampling.BILINEAR)
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=85)
            src = f'<img alt="thumbnail" src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}">'
        except Exception:  # the file moved or broke since extraction: show the caption alone
            src = '<p class="note">(image unavailable)</p>'
        figures.append(f"<figure>{src}<figcaption>{caption}</figcaption></figure>")
    return _section(f"mistakes-{run.path.name}", heading,
                    f'<p class="note">{len(wrong)} misclassified images; the {min(top, len(wrong))} most confident '
                    f'shown.</p><div class="thumbs">{"".join(figures)}</div>')


def _predictions_store(run: Run) -> Path:
    """The store whose rows predictions.csv refers to: the hold-out store when there was one."""
    return Path(run.metrics.get("evaluation", {}).get("test_store") or run.meta.get("store", ""))


def _image_root(run: Run) -> Path:
    store_path = _predictions_store(run)
    if store_path.is_file():
        from embedfit.store import FeatureStore

        return FeatureStore.open(store_path).root
    return store_path if store_path.is_dir() else Path(".")
