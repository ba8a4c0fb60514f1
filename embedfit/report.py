"""Reports on run directories: a self-contained HTML file and a leaderboard for the terminal.

The HTML report has one section per view, each with a stable id: leaderboard (backbone × classifier with scores,
training-set sizes and costs, one table per evaluation set: runs scored on different images are never ranked
together), metrics, confusion (counts and row-normalised), per-class, cv-spread (fold scores per run),
confused (the most-confused class pairs and the worst classes, first: what a user with many classes needs),
embedding-map (PCA and t-SNE of each store's embeddings, one map per store, mistakes marked; large stores are
subsampled) and mistakes (the most confident out-of-fold errors as thumbnails that open larger on a click).
Single hold-out splits show a bootstrap interval over their images instead of a spread over folds. Images are
inlined as base64 PNG/JPEG: the file can be mailed as it is.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedfit.errors import InputError, check_output_file, check_output_not_input
from embedfit.progress import OnProgress, Progress
from embedfit.runs import Run, read_run

# Section ids, in order; the last is a prefix: one "mistakes-RUN" section per run.
SECTIONS = ("leaderboard", "metrics", "confused", "confusion", "per-class", "cv-spread", "embedding-map", "mistakes")
_TSNE_MAX = 3000  # t-SNE above this many points takes minutes on a laptop; PCA is always shown
MANY_CLASSES = 20  # above this, matrices and legends stop being readable: pairs, rankings and sorted tables lead
MAP_POINTS = 5000  # the map draws at most this many points (every mistake, then a stratified sample)


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 image', '2 images' (`many` for irregular plurals)."""
    return f"{n} {word if n == 1 else many or word + 's'}"


@dataclass(frozen=True)
class EvaluationSet:
    """The images a run was scored on, and how.

    Runs are comparable only when `key` is equal: the same kind of evaluation over the same images (by path
    relative to the image root, with their labels and, for CV, their fold), with the same repeats.
    """

    key: tuple[Any, ...]
    scheme: str  # "3-fold CV (seed 0)", "hold-out store", "hold-out split (seed 0)", "fine-tuning validation split"
    n_images: int  # images scored (each once: the first repetition)
    store: str  # the store (or, for fine-tuning, the image folder) the scored images come from
    root: str  # the folder the images' paths are relative to

    def describe(self, stores: Sequence[str] = ()) -> str:
        """'3-fold CV (seed 0) on 24 images of /data/train (store feats.h5)'."""
        stores = sorted(set(stores)) or [self.store]
        where = f"store {stores[0]}" if len(stores) == 1 else f"stores {', '.join(stores)}"
        if self.scheme.startswith("fine-tuning"):
            return f"{self.scheme}: {plural(self.n_images, 'image')} of {self.root}"
        return f"{self.scheme}: {plural(self.n_images, 'image')} of {self.root} ({where})"


def evaluation_set(run: Run) -> EvaluationSet:
    """What `run` was evaluated on, from its evaluation record (`embedfit.runs.Evaluation`) and predictions.

    Runs scored on separate images (a test store for `fit`, a test folder for fine-tuning and `compare`) are
    one group when the images, their labels and folds are the same, whatever command scored them.
    """
    ev = run.evaluation
    details = ev.details
    seed = details.get("seed", run.meta.get("params", {}).get("seed"))
    seeded = f" (seed {seed})" if seed is not None else ""
    n = len(run.predictions) or int(np.sum(run.metrics.get("confusion_matrix", [[0]])))
    # The scored images themselves: two runs on the same images, labels and folds evaluate alike.
    rows = sorted(f"{p.get('path')}\t{p.get('label')}\t{p.get('fold')}" for p in run.predictions)
    digest = hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16] if rows else f"n={n}"
    store = ev.source or str(_predictions_store(run))
    root = ev.image_root or _image_root_of(Path(store))
    repeats = int(details.get("repeats", 1) or 1)
    if ev.scheme == "validation-split":
        val = details.get("val_size", run.meta.get("params", {}).get("val_size"))
        share = f"{val:.0%} " if isinstance(val, int | float) else ""
        return EvaluationSet(("finetune", root, digest), f"fine-tuning's own {share}validation split{seeded}", n,
                             store, root)
    if ev.scheme == "cv":
        scheme = (f"{details.get('n_splits')}-fold CV" + (f" × {repeats}" if repeats > 1 else "")
                  + (", grouped" if details.get("groups") else "") + (", nested search" if details.get("search")
                                                                      else "") + seeded)
        return EvaluationSet(("cv", root, repeats, digest), scheme, n, store, root)
    if ev.scheme == "held-out":
        what = "hold-out store" if details.get("test_store") else "held-out images"  # same key: one group
        return EvaluationSet(("held-out", root, digest), what, n, store, root)
    scheme = "hold-out split" + (f" × {repeats}" if repeats > 1 else "") + seeded
    return EvaluationSet(("split", root, repeats, digest), scheme, n, store, root)


def _image_root_of(store_path: Path) -> str:
    """The folder a store's image paths are relative to (the store's own path when it cannot be read)."""
    if store_path.is_file():
        from embedfit.errors import EmbedfitError
        from embedfit.storage import FeatureStore

        with contextlib.suppress(EmbedfitError):
            return str(FeatureStore.open(store_path).root)
    return str(store_path)


def group_by_evaluation(runs: Sequence[Run]) -> list[tuple[EvaluationSet, list[Run]]]:
    """Runs grouped by evaluation set (first appearance first), best balanced accuracy first in each group."""
    groups: dict[tuple[Any, ...], tuple[EvaluationSet, list[Run]]] = {}
    for run in runs:
        ev = evaluation_set(run)
        groups.setdefault(ev.key, (ev, []))[1].append(run)
    return [(ev, sorted(rs, key=_score_key)) for ev, rs in groups.values()]


def _score_key(run: Run) -> float:
    s = run.metrics["scores"]
    return -s.get("balanced_accuracy", s.get("accuracy", {"mean": 0.0}))["mean"]


def training_images(run: Run) -> str:
    """What the scored model(s) were trained on: per fold for CV and splits, plus the final model's size."""
    n = int(run.metrics.get("n_samples", 0))
    ev = run.evaluation
    if ev.scheme in ("validation-split", "held-out") or not run.predictions:
        return str(ev.n_train or n)
    per_fold: dict[str, int] = {}
    for p in run.predictions:
        per_fold[p.get("fold", "0")] = per_fold.get(p.get("fold", "0"), 0) + 1
    sizes = sorted({n - k for k in per_fold.values()})
    each = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}–{sizes[-1]}"
    return f"{each} per {'fold' if ev.scheme == 'cv' else 'split'} (final model {n})"


def costs(run: Run) -> tuple[float | None, float]:
    """(extraction seconds, training seconds). Fine-tuning has no extraction (it reads the images every epoch):
    None, and its training time is its whole cost."""
    t = run.metrics.get("timing", {})
    train = float(t.get("cv_seconds", 0.0)) + float(t.get("fit_seconds", 0.0)) + float(t.get("train_seconds", 0.0))
    if run.meta.get("kind") == "torch":
        return None, train
    return float(t.get("extract_seconds", 0.0)), train


def summarize_runs(runs: Sequence[str | Path | Run]) -> list[dict[str, Any]]:
    """Leaderboard rows grouped by evaluation set, best balanced accuracy first within each group.

    Each row: run, backbone, model, group (0, 1, ... in order of first appearance), evaluation (the set, in
    words), n_evaluated, training_images, scores (`<metric>_mean`, `<metric>_std`), extract_seconds (None for
    fine-tuning: it extracts nothing), train_seconds, total_seconds.
    """
    loaded = [r if isinstance(r, Run) else read_run(r) for r in runs]
    rows = []
    for g, (ev, members) in enumerate(group_by_evaluation(loaded)):
        described = ev.describe([evaluation_set(r).store for r in members])
        for run in members:
            s = run.metrics["scores"]
            extract, train = costs(run)
            rows.append({
                "run": str(run.path), "backbone": run.metrics.get("backbone", run.meta["spec"]["name"]),
                "model": run.metrics["model"], "group": g, "evaluation": described,
                "n_evaluated": ev.n_images, "training_images": training_images(run),
                **{f"{m}_mean": s[m]["mean"] for m in s}, **{f"{m}_std": s[m]["std"] for m in s},
                "extract_seconds": extract, "train_seconds": train, "total_seconds": (extract or 0.0) + train,
            })
    return rows


# ---------------------------------------------------------------------------------------------------
# HTML


def build_report(runs: Sequence[str | Path], output: str | Path, *, title: str = "embedfit report",
                 on_progress: OnProgress | None = None) -> Path:
    """Write a self-contained HTML report comparing `runs`; returns its path.

    Args:
        runs: Run directories (or one sweep folder).
        output: The HTML file.
        title: Its title.
        on_progress: Called with the sections as they are drawn (`embedfit.progress`; the embedding map's t-SNE
            takes a while on large stores).
    """
    import matplotlib

    matplotlib.use("Agg")
    if not runs:
        raise InputError("give at least one run directory to report on")
    from embedfit.sweep import build_sweep_report, is_sweep_folder

    if len(runs) == 1 and is_sweep_folder(runs[0]):
        return build_sweep_report(runs[0], output)
    check_output_file(output)
    check_output_not_input(output, run_dirs=runs)  # e.g. -o RUN/model.json would replace the sidecar
    runs, summaries = expand_compare_folders(runs)
    loaded = [read_run(r) for r in runs]
    groups = group_by_evaluation(loaded)
    sections = [("leaderboard", lambda: _leaderboard(groups)), ("metrics", lambda: _metrics(loaded)),
                ("most-confused pairs", lambda: _confused(loaded)), ("confusion matrices", lambda: _confusion(loaded)),
                ("per-class scores", lambda: _per_class(loaded)),
                ("fold spread", lambda: _cv_spread(groups)), ("embedding maps", lambda: _embedding_map(loaded)),
                *((f"mistakes of {r.label}", lambda r=r: _mistakes(r, len(loaded) > 1)) for r in loaded)]
    parts = []
    with Progress("report", len(sections), unit="sections", on_progress=on_progress) as shown:
        for name, draw in sections:
            shown.advance(0, name)
            parts.append(draw())
            shown.advance(1)
    body = "\n".join(parts)
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
section {{ margin-bottom: 2em; }} img {{ max-width: 100%; }} .note {{ color: #666; }}
td {{ max-width: 24em; overflow-wrap: anywhere; }}
.thumbs {{ display: flex; flex-wrap: wrap; gap: 10px; }}
.thumbs figure {{ margin: 0; width: 140px; font-size: 12px; }}
.thumbs img {{ width: 140px; height: auto; cursor: zoom-in; }}
.thumbs img.big {{ position: fixed; inset: 0; margin: auto; width: auto; max-width: 90vw; max-height: 90vh;
  z-index: 10; cursor: zoom-out; box-shadow: 0 0 0 100vmax rgba(0, 0, 0, 0.6); }}
.name {{ display: block; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="note">{plural(len(loaded), "run")}: {", ".join(html.escape(r.label) for r in loaded)}</p>
{"".join(f"<pre>{html.escape(text)}</pre>" for text in summaries)}
{body}
</body></html>"""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(doc, encoding="utf-8")
    return output


COMPARE_FILE = "compare.json"  # written by `embedfit compare` (embedfit.training.compare), next to compare.md


def expand_compare_folders(paths: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """Run directories to report on: a `compare` folder stands for the run directories of its trained arms; its
    compare.md (the table and the recommendation) comes back too, to show above them.

    Raises:
        InputError: A compare folder holds no run directory (only as-is and probe arms were run).
    """
    from embedfit.runs import is_run

    runs: list[Path] = []
    summaries: list[str] = []
    for path in map(Path, paths):
        if not (path / COMPARE_FILE).is_file():
            runs.append(path)
            continue
        found = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".") and is_run(p))
        if not found:
            raise InputError(f"{path} is a comparison without trained arms (no run directory in it); its results "
                             f"are in {path / 'compare.md'}")
        runs += found
        if (path / "compare.md").is_file():
            summaries.append((path / "compare.md").read_text(encoding="utf-8"))
    return runs, summaries


def _section(sid: str, heading: str, content: str) -> str:
    return f'<section id="{sid}"><h2>{html.escape(heading)}</h2>\n{content}\n</section>'


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A table; long cells wrap anywhere (CSS) and keep their full text on hover."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: Any) -> str:
    text = html.escape(str(value))
    return f'<td title="{text}">{text}</td>' if len(str(value)) > 30 else f"<td>{text}</td>"


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _fmt(score: dict[str, float] | None, interval: tuple[float, float] | None = None) -> str:
    """mean ± std over folds; one split: the score alone, or with its bootstrap interval (never "± 0.000")."""
    if score is None:
        return "—"
    if len(score.get("folds", [])) == 1:
        return f"{score['mean']:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")
    return f"{score['mean']:.3f} ± {score['std']:.3f}"


BOOTSTRAP_METRICS = ("accuracy", "balanced_accuracy", "f1_macro")


def bootstrap_intervals(run: Run, n_boot: int = 1000, seed: int = 0) -> dict[str, tuple[float, float]]:
    """95% percentile-bootstrap intervals of accuracy, balanced accuracy and macro F1 over a single hold-out
    split's images (its predictions.csv); {} for runs scored on several folds (their spread says more)."""
    scores = run.metrics["scores"]
    if not run.predictions or len(scores.get("accuracy", {}).get("folds", [])) != 1:
        return {}
    names = {c: i for i, c in enumerate(run.metrics["class_names"])}
    known = [p for p in run.predictions if p["label"] in names and p["predicted"] in names]
    if not known:
        return {}
    k = len(names)
    codes = np.array([names[p["label"]] * k + names[p["predicted"]] for p in known])
    rng = np.random.default_rng(seed)
    # each resample's confusion matrix from its multinomial counts of the observed (true, predicted) pairs
    pairs, counts = np.unique(codes, return_counts=True)
    draws = rng.multinomial(len(codes), counts / counts.sum(), size=n_boot)
    cms = np.zeros((n_boot, k * k))
    cms[:, pairs] = draws
    cms = cms.reshape(n_boot, k, k)
    diag, true, pred = np.diagonal(cms, axis1=1, axis2=2), cms.sum(axis=2), cms.sum(axis=1)
    recall = np.divide(diag, true, out=np.zeros_like(diag), where=true > 0)
    precision = np.divide(diag, pred, out=np.zeros_like(diag), where=pred > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(diag), where=precision + recall > 0)
    present = (true > 0) | (pred > 0)  # scikit-learn's macro average: the labels seen in either
    values = {"accuracy": diag.sum(axis=1) / len(codes),
              "balanced_accuracy": (recall * (true > 0)).sum(axis=1) / np.maximum((true > 0).sum(axis=1), 1),
              "f1_macro": (f1 * present).sum(axis=1) / np.maximum(present.sum(axis=1), 1)}
    return {m: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for m, v in values.items()}


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _leaderboard(groups: list[tuple[EvaluationSet, list[Run]]]) -> str:
    blocks = []
    if len(groups) > 1:
        blocks.append(f'<p class="note"><b>These runs were scored on {len(groups)} different evaluation sets.</b> '
                      "Each table ranks only the runs scored on the same images in the same way; scores in "
                      "different tables are not comparable.</p>")
    for g, (ev, members) in enumerate(groups, start=1):
        rows = []
        for rank, r in enumerate(members, start=1):
            s = r.metrics["scores"]
            extract, train = costs(r)
            ci = bootstrap_intervals(r)
            rows.append([rank, r.metrics.get("backbone", ""), r.metrics["model"],
                         *(_fmt(s.get(m), ci.get(m)) for m in BOOTSTRAP_METRICS), training_images(r),
                         _seconds(extract), _seconds(train), _seconds((extract or 0.0) + train), r.path.name])
        described = html.escape(ev.describe([evaluation_set(r).store for r in members]))
        heading = f"<h3>Evaluation set {g}</h3>" if len(groups) > 1 else ""
        blocks.append(f'{heading}<p>Evaluated on {described}.</p>' + _table(
            ["#", "backbone", "classifier", "accuracy", "balanced accuracy", "macro F1", "training images",
             "extract s", "train s", "total s", "run"], rows))
    note = ('<p class="note">Scores are mean ± std over the evaluation folds (or repeated splits); a single hold-out '
            "split shows its score and a 95% bootstrap interval over its images, [low, high]. Extraction is "
            "paid once per store and shared by every classifier fitted on it; train s is the evaluation plus the "
            "final fit. Fine-tuning extracts nothing (—): it runs the backbone on the images every epoch, and its "
            "train s is its whole cost.</p>")
    return _section("leaderboard", "Leaderboard", "\n".join(blocks) + note)


def _metrics(runs: list[Run]) -> str:
    names = ["accuracy", "balanced_accuracy", "f1_macro", "log_loss", "roc_auc"]
    rows = []
    for r in runs:
        ev = evaluation_set(r)
        ci = bootstrap_intervals(r)
        rows.append([r.label, *(_fmt(r.metrics["scores"].get(m), ci.get(m)) for m in names), ev.describe([ev.store]),
                     training_images(r)])
    return _section("metrics", "Metrics", _table(["run", *names, "evaluated on", "training images"], rows))


def confused_pairs(cm: np.ndarray, names: Sequence[str], top: int = 10) -> list[tuple[str, str, int, float]]:
    """The most frequent mistakes: (true class, predicted class, images, share of the true class), most first."""
    off = cm.astype(float).copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:top]
    support = np.maximum(cm.sum(axis=1), 1)
    return [(names[i], names[j], int(off[i, j]), float(off[i, j] / support[i]))
            for i, j in (np.unravel_index(o, off.shape) for o in order) if off[i, j] > 0]


def _confused(runs: list[Run]) -> str:
    blocks = []
    for r in runs:
        cm, names = np.array(r.metrics["confusion_matrix"]), r.metrics["class_names"]
        pairs = confused_pairs(cm, names)
        worst = sorted(r.metrics["per_class"].items(), key=lambda kv: (kv[1]["f1"], kv[0]))[:10]
        heading = f"<h3>{html.escape(r.label)}</h3>" if len(runs) > 1 else ""
        table = (_table(["true class", "predicted as", "images", "share of the class"],
                        [[t, p, n, f"{share:.0%}"] for t, p, n, share in pairs]) if pairs else
                 '<p class="note">No mistakes.</p>')
        blocks.append(f"{heading}<h4>Most-confused pairs</h4>{table}<h4>Worst classes (lowest F1)</h4>"
                      + _table(["class", "F1", "recall", "precision", "images"],
                               [[c, f"{v['f1']:.3f}", f"{v['recall']:.3f}", f"{v['precision']:.3f}", v["support"]]
                                for c, v in worst]))
    return _section("confused", "Most-confused pairs and worst classes", "\n".join(blocks))


def confusion_figure(cm: np.ndarray, names: Sequence[str]) -> Any:
    """Counts and row-normalised confusion matrices side by side (a matplotlib Figure); above `MANY_CLASSES`
    only the row-normalised one (the counts matrix is nearly empty), sized so that each class keeps a readable row
    (its labels shrink to fit; beyond 60 classes the pairs table names them instead)."""
    import matplotlib.pyplot as plt

    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    many = len(names) > MANY_CLASSES
    size = max(4.0, 0.45 * len(names) + 2) if not many else min(14.0, 0.12 * len(names) + 4)
    panels = ((norm, "row-normalised (recall)"),) if many else ((cm, "counts"), (norm, "row-normalised (recall)"))
    # constrained layout keeps each panel's "true" label clear of the other panel's tick labels
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * size + 1, size), layout="constrained",
                             squeeze=False)
    fontsize = 10 if not many else max(4.0, min(8.0, 72 * 0.8 * size / len(names) * 0.8))
    for ax, (mat, what) in zip(axes[0], panels, strict=True):
        ax.imshow(mat, cmap="Blues")
        if len(names) <= 60:
            ax.set_xticks(range(len(names)), names, rotation=90 if many else 45, ha="center" if many else "right",
                          fontsize=fontsize)
            ax.set_yticks(range(len(names)), names, fontsize=fontsize)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(what)
        if len(names) <= 20:
            for (i, j), v in np.ndenumerate(mat):
                ax.text(j, i, f"{v:.0f}" if mat is cm else f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if v > mat.max() / 2 else "black")
    return fig


def _confusion(runs: list[Run]) -> str:
    blocks = []
    for r in runs:
        fig = confusion_figure(np.array(r.metrics["confusion_matrix"], dtype=float), r.metrics["class_names"])
        n = len(r.metrics["class_names"])
        note = ("" if n <= MANY_CLASSES else f'<p class="note">{n} classes: the row-normalised matrix only'
                + (", without class labels (too many to read); the most-confused pairs above name them"
                   if n > 60 else "") + ".</p>")
        blocks.append(f"<h3>{html.escape(r.label)}</h3>{_png(fig)}{note}")
    return _section("confusion", "Confusion matrices", "\n".join(blocks))


def per_class_figure(per: dict[str, dict[str, float]]) -> Any:
    """Grouped precision/recall/F1 bars per class; the axis zooms in on the data, values are written on the bars
    (up to 15 classes) and the legend sits outside, right of the plot."""
    import matplotlib.pyplot as plt

    if len(per) > MANY_CLASSES:
        return _per_class_ranked(per)
    names = list(per)
    x = np.arange(len(names))
    values = [per[c][m] for c in names for m in ("precision", "recall", "f1")]
    low = min(values) if values else 0.0
    # zoom to the data: a 0-1 axis makes 0.93 and 1.0 look the same
    bottom = 0.0 if low < 0.5 else max(0.0, np.floor((low - 0.1 * (1 - low) - 0.02) * 20) / 20)
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(names) + 2.5), 3.5), layout="constrained")
    for k, metric in enumerate(("precision", "recall", "f1")):
        bars = ax.bar(x + (k - 1) * 0.27, [per[c][metric] for c in names], width=0.27, label=metric)
        if len(names) <= 15:
            ax.bar_label(bars, fmt="%.2f", fontsize=7, rotation=90, padding=2)
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_ylim(bottom, 1.0 + (1.0 - bottom) * (0.18 if len(names) <= 15 else 0.03))
    ax.set_yticks([t for t in ax.get_yticks() if bottom <= t <= 1.0 + 1e-9])  # headroom for the values only
    ax.set_ylabel("score" + (f" (axis from {bottom:.2f})" if bottom > 0 else ""))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return fig


def _per_class_ranked(per: dict[str, dict[str, float]]) -> Any:
    """Many classes: F1 per class as horizontal bars, worst at the top, the height growing with the class count."""
    import matplotlib.pyplot as plt

    ranked = sorted(per, key=lambda c: (per[c]["f1"], c))
    fig, ax = plt.subplots(figsize=(7, 0.16 * len(ranked) + 1.2), layout="constrained")
    ax.barh(np.arange(len(ranked)), [per[c]["f1"] for c in ranked], color="tab:blue")
    ax.set_yticks(np.arange(len(ranked)), ranked, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1 (worst class first)")
    ax.margins(y=0.005)
    return fig


def _per_class(runs: list[Run]) -> str:
    blocks = []
    for r in runs:
        per = r.metrics["per_class"]
        rows = [[c, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", v["support"]]
                for c, v in sorted(per.items(), key=lambda kv: (kv[1]["f1"], kv[0]))]  # worst first
        blocks.append(f"<h3>{html.escape(r.label)}</h3>{_png(per_class_figure(per))}"
                      + _table(["class", "precision", "recall", "F1", "support"], rows))
    note = '<p class="note">Tables are sorted by F1, worst class first.</p>'
    return _section("per-class", "Per-class precision, recall and F1", "\n".join(blocks) + note)


def spread_figure(folds: Sequence[Sequence[float]], labels: Sequence[str]) -> Any:
    """Box plot of per-fold balanced accuracy per run, with each fold's score and a legend for the markers."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(folds) + 3.5), 3.5), layout="constrained")
    mean_style = {"marker": "^", "markerfacecolor": "tab:green", "markeredgecolor": "tab:green", "markersize": 7}
    ax.boxplot(folds, showmeans=True, showfliers=False, meanprops=mean_style, medianprops={"color": "tab:orange"})
    # every fold is drawn as a dot below: fliers would draw the outlying ones twice
    for i, f in enumerate(folds, start=1):
        ax.scatter(np.full(len(f), i) + np.linspace(-0.08, 0.08, len(f)), f, s=12, color="k", zorder=3)
    ax.set_xticks(range(1, len(folds) + 1), labels)
    ax.set_ylabel("balanced accuracy per fold")
    handles = [Line2D([], [], linestyle="none", **mean_style, label="mean"),
               Line2D([], [], color="tab:orange", label="median"),
               Line2D([], [], linestyle="none", marker="o", color="k", markersize=4, label="one fold")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return fig


def _cv_spread(groups: list[tuple[EvaluationSet, list[Run]]]) -> str:
    spread = [(g, r) for g, (_, members) in enumerate(groups, start=1) for r in members
              if len(r.metrics["scores"]["balanced_accuracy"]["folds"]) > 1]
    single = [r for _, members in groups for r in members if len(r.metrics["scores"]["balanced_accuracy"]["folds"]) < 2]
    left_out = ("" if not single else f'<p class="note">{html.escape(", ".join(r.label for r in single))}: one '
                "hold-out split, so no spread over folds to draw; its leaderboard scores carry a bootstrap interval "
                "over the hold-out images instead.</p>")
    if not spread:
        return _section("cv-spread", "Score spread over folds", left_out)
    ordered = [r for _, r in spread]
    labels = [f"{r.meta['spec']['name']}\n{r.metrics['model']}" + (f"\n(set {g})" if len(groups) > 1 else "")
              for g, r in spread]
    fig = spread_figure([r.metrics["scores"]["balanced_accuracy"]["folds"] for r in ordered], labels)
    note = ("" if len(groups) == 1 else '<p class="note">"set N" is the evaluation set of the leaderboard: runs '
            "of different sets were scored on different images.</p>")
    return _section("cv-spread", "Score spread over folds", _png(fig) + note + left_out)


def _embedding_map(runs: list[Run]) -> str:
    """One map per distinct store that runs were scored on; a note for runs without one."""
    by_store: dict[Path, list[Run]] = {}
    notes = []
    for run in runs:
        store_path = _predictions_store(run)
        if run.meta.get("kind") != "sklearn":
            notes.append(f"{run.label}: fine-tuning reads the images themselves; there is no feature store to map.")
        elif not run.predictions or not store_path.is_file():
            notes.append(f"{run.label}: no feature store to map at {store_path}.")
        else:
            by_store.setdefault(store_path.resolve(), []).append(run)
    blocks = [_store_map(path, members, titled=len(by_store) > 1 or len(runs) > 1)
              for path, members in by_store.items()]
    blocks += [f'<p class="note">Not available for {html.escape(n)}</p>' for n in notes]
    heading = "Embedding map" + ("s, one per store" if len(by_store) > 1 else
                                 f" ({runs[0].label})" if len(runs) == 1 else "")
    return _section("embedding-map", heading, "\n".join(blocks))


def recorded_fingerprint(run: Run, store_path: Path) -> str | None:
    """The fingerprint `run` recorded for the store at `store_path` when it was fitted; None when it recorded none
    (then nothing can be said about whether that store changed since)."""
    ev = run.metrics.get("evaluation", {})
    test = ev.get("test_store")
    if test and Path(test).resolve() == store_path.resolve():
        value = ev.get("test_store_fingerprint") or run.meta.get("test_store_fingerprint")
    elif Path(run.meta.get("store", "")).resolve() == store_path.resolve():
        value = run.meta.get("store_fingerprint")
    else:
        value = None
    return str(value) if value else None


def _store_map(store_path: Path, runs: list[Run], *, titled: bool) -> str:
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    from embedfit.storage import FeatureStore

    title = (f"<h3>{html.escape(str(store_path))} ({plural(len(runs), 'run')}: "
             f"{html.escape(', '.join(r.label for r in runs))})</h3>" if titled else "")
    store = FeatureStore.open(store_path)
    # Every image any of these runs predicted, and how many of the runs that predicted it got it wrong.
    predicted: dict[str, dict[str, str]] = {}
    tally: dict[str, list[int]] = {}
    for run in runs:
        for p in run.predictions:
            predicted.setdefault(p["path"], p)
            t = tally.setdefault(p["path"], [0, 0])
            t[0] += p["correct"] not in ("True", "true", "1")
            t[1] += 1
    rows, stored = stored_rows(list(predicted.values()), store)
    n_all = len(rows)
    if n_all > MAP_POINTS:  # every mistake, then an even share of each class: a readable map, not a blob
        keep = map_sample([tally[p["path"]][0] > 0 for p in rows], [p["label"] for p in rows], MAP_POINTS)
        rows, stored = [rows[i] for i in keep], [stored[i] for i in keep]
    if not rows:
        return title + ('<p class="note">Not available: none of the predicted images has an embedding in '
                        f"{html.escape(str(store_path))} any more.</p>")
    order = np.argsort(stored)  # HDF5 reads rows in increasing order
    rows, stored = [rows[i] for i in order], [stored[i] for i in order]
    X = store.features(stored)
    changed_runs = [r for r in runs if (f := recorded_fingerprint(r, store_path)) and f != store.fingerprint]
    which = "" if len(runs) == 1 else " of " + ", ".join(r.path.name for r in changed_runs)
    changed = ("" if not changed_runs else
               f" The store has changed since the fit{which}: {len(rows)} of {len(predicted)} predicted images"
               " are still in it, with their current embeddings.")
    names = list(dict.fromkeys(c for r in runs for c in r.metrics["class_names"]))
    y = np.array([names.index(p["label"]) for p in rows])
    counts = np.array([tally[p["path"]] for p in rows])
    wrong_all = (counts[:, 0] > 0) & (counts[:, 0] == counts[:, 1])
    wrong_some = (counts[:, 0] > 0) & ~wrong_all
    maps = [("PCA", PCA(2, random_state=0).fit_transform(X))]
    if 10 < len(X) <= _TSNE_MAX:
        from sklearn.manifold import TSNE

        maps.append(("t-SNE", TSNE(2, perplexity=min(30, len(X) // 4), init="pca", random_state=0).fit_transform(X)))
    fig, axes = plt.subplots(1, len(maps), figsize=(5.5 * len(maps) + 2, 5), squeeze=False, layout="constrained")
    colours = class_colours(len(names))
    every = "misclassified" if len(runs) == 1 else "misclassified by every run that predicted it"
    dot = 12 if len(X) <= 1000 else 4  # small, translucent dots once points overlap
    for ax, (what, Z) in zip(axes[0], maps, strict=True):
        for c, name in enumerate(names):
            m = y == c
            ax.scatter(Z[m, 0], Z[m, 1], s=dot, color=colours[c], label=name, alpha=0.85 if dot > 4 else 0.5,
                       linewidths=0)
        ax.scatter(Z[wrong_all, 0], Z[wrong_all, 1], s=50, facecolors="none", edgecolors="k", linewidths=1.2,
                   label=every)
        if wrong_some.any():
            ax.scatter(Z[wrong_some, 0], Z[wrong_some, 1], s=50, facecolors="none", edgecolors="0.55",
                       linewidths=0.8, linestyle="--", label="misclassified by some runs")
        ax.set_title(what)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if len(names) > MANY_CLASSES:  # nobody tells 100 hues apart: keep only the rings' entries
        handles, labels = handles[len(names):], labels[len(names):]
    fig.legend(handles, labels, loc="outside right upper", fontsize=8, markerscale=1.5 if dot > 4 else 3)
    circled = ("circled points were misclassified out of fold" if len(runs) == 1 else
               "black rings: misclassified by every run that predicted the image; grey dashed rings: by some of them")
    shown = (f"{plural(len(X), 'image')}" if n_all == len(X) else
             f"{len(X)} of {n_all} images (every misclassified one, then an even share of each class)")
    colour = ("coloured by class" if len(names) <= MANY_CLASSES else
              f"coloured by class ({len(names)} classes: too many colours to tell apart, so no colour legend; the "
              "most-confused pairs name the classes that mix)")
    tsne = ("" if len(maps) > 1 or len(X) <= 10 else
            f" t-SNE is left out above {_TSNE_MAX} images (it would take minutes); PCA is shown alone.")
    note = (f'<p class="note">Embeddings of {shown} from {html.escape(str(store_path))}, {colour}; '
            f"{circled}.{html.escape(changed)}{tsne}</p>")
    return title + _png(fig) + note


def map_sample(wrong: Sequence[bool], labels: Sequence[str], limit: int, seed: int = 0) -> list[int]:
    """At most `limit` indices, sorted: every wrong one (up to `limit`), then an equal share of each class's right
    ones at random."""
    rng = np.random.default_rng(seed)
    wrong_i = [i for i, w in enumerate(wrong) if w][:limit]
    by_class: dict[str, list[int]] = {}
    for i, (w, label) in enumerate(zip(wrong, labels, strict=True)):
        if not w:
            by_class.setdefault(label, []).append(i)
    room = limit - len(wrong_i)
    chosen = list(wrong_i)
    for k, members in enumerate(sorted(by_class.values(), key=len)):  # small classes first: they keep all theirs
        share = room // (len(by_class) - k) if len(by_class) > k else 0
        take = members if len(members) <= share else list(rng.choice(members, share, replace=False))
        chosen += take
        room -= len(take)
    return sorted(int(i) for i in chosen)


def class_colours(n: int) -> list[Any]:
    """n distinct colours: tab10 up to 10 classes, tab20 up to 20, then evenly spaced hues."""
    import matplotlib.pyplot as plt

    if n <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(n)]
    if n <= 20:
        return [plt.get_cmap("tab20")(i) for i in range(n)]
    return [plt.get_cmap("hsv")(i / n) for i in range(n)]


def stored_rows(predictions: Sequence[dict[str, str]], store: Any) -> tuple[list[dict[str, str]], list[int]]:
    """The predictions whose image still has an embedding in `store`, and its row there.

    By path, not by the row numbers saved at fit time: a store re-extracted since then (images added, changed
    or removed) numbers its rows differently.
    """
    from embedfit.storage import OK

    index = {key: i for i, key in enumerate(store.paths) if store.status[i] == OK}
    kept = [p for p in predictions if p["path"] in index]
    return kept, [index[p["path"]] for p in kept]


THUMB_SIZE = 96  # px, the longer side of a mistake's thumbnail
ZOOM_SIZE = 384  # px, the longer side of the image a thumbnail opens to (it is shown at 140 px until clicked)


def thumbnail(image: Any, size: int = THUMB_SIZE) -> tuple[Any, str]:
    """`image` scaled so that its longer side is `size` px, and the format to embed it in.

    Small images are scaled up (a 25 px image is unreadable at its own size): nearest-neighbour and PNG for tiny
    ones (at least 2x), which keeps their pixels sharp; larger ones are resampled smoothly and embedded as JPEG.
    """
    from PIL import Image

    w, h = image.size
    scale = size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    if scale >= 2:
        return image.resize(new, Image.Resampling.NEAREST), "png"
    return image.resize(new, Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS), "jpeg"


def _mistakes(run: Run, name_run: bool = False, top: int = 12) -> str:
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
        caption = (_name(p["path"]) + _name(p["label"], "true ")
                   + _name(p["predicted"], "predicted ", f" ({float(conf):.2f})" if conf else ""))
        path = Path(p["path"]) if Path(p["path"]).is_absolute() else root / p["path"]
        try:
            image, fmt = thumbnail(decode_image(path), ZOOM_SIZE)
            buf = io.BytesIO()
            image.save(buf, format=fmt.upper(), **({"quality": 85} if fmt == "jpeg" else {}))
            src = (f'<img alt="thumbnail" width="{image.width}" height="{image.height}" title="click to enlarge" '
                   f'onclick="this.classList.toggle(\'big\')" '
                   f'src="data:image/{fmt};base64,{base64.b64encode(buf.getvalue()).decode()}">')
        except Exception:  # the file moved or broke since extraction: show the caption alone
            src = '<p class="note">(image unavailable)</p>'
        figures.append(f"<figure>{src}<figcaption>{caption}</figcaption></figure>")
    shown = ("" if len(wrong) == 1 else f"; the {top} most confident shown" if len(wrong) > top else
             "; all shown, most confident first")
    return _section(f"mistakes-{run.path.name}", heading,
                    f'<p class="note">{plural(len(wrong), "misclassified image")}{shown}.</p>'
                    f'<div class="thumbs">{"".join(figures)}</div>')


def _name(text: str, before: str = "", after: str = "") -> str:
    """A line holding a name (in bold after a `before` word), cut with an ellipsis where it is too long; the full
    name on hover."""
    escaped = html.escape(text)
    shown = f"{before}<b>{escaped}</b>{after}" if before else escaped + after
    return f'<span class="name" title="{escaped}">{shown}</span>'


def _predictions_store(run: Run) -> Path:
    """The store whose rows predictions.csv refers to: the hold-out store when there was one."""
    recorded = str(run.metrics.get("evaluation", {}).get("test_store") or run.meta.get("store", ""))
    if "://" in recorded:  # on object storage: its local copy (embedfit.url)
        from embedfit.errors import EmbedfitError
        from embedfit.storage import FeatureStore

        try:
            return FeatureStore.open(recorded).path
        except EmbedfitError:
            pass
    return Path(recorded)


def _image_root(run: Run) -> Path:
    """The folder the paths in a run's predictions.csv are relative to: its evaluation's own image source."""
    if run.evaluation.image_root:
        return Path(run.evaluation.image_root)
    store_path = _predictions_store(run)
    if store_path.is_file():
        from embedfit.storage import FeatureStore

        return FeatureStore.open(store_path).root
    return store_path if store_path.is_dir() else Path(".")
