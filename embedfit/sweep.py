"""Backbone sweep: extract each backbone once, fit every model on identical splits, rank them with a paired test.

Layout of a sweep folder:

    sweep.json          the plan, every finished (backbone, model) result, the ranking (rewritten atomically
                        after each backbone: a kill loses at most the backbone in progress)
    leaderboard.md      the same as a table
    stores/KEY.h5       one feature store per backbone (and KEY.test.h5 for `test`); re-runs reuse or resume them
    runs/KEY-MODEL/     a run directory per fit (`embedfit predict` and `embedfit report` take them)

Every model is scored on the same cross-validation folds (the folds depend only on the labels and the seed, and
every store holds the same images) or on the same test images, so two entries are compared pairwise: fold by fold
(a t-interval with Nadeau and Bengio's correction for overlapping training sets) or image by image (a paired
bootstrap on the test set).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import html
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedfit.errors import EmbedfitError, ExtractionInterrupted, InputError, UsageError, check_output_file
from embedfit.progress import OnProgress, duration, note, progress_sink, within

SWEEP_FILE = "sweep.json"


LEADERBOARD_FILE = "leaderboard.md"


METRICS = ("accuracy", "balanced_accuracy", "f1_macro")


@dataclass(frozen=True)
class SweepConfig:
    """What to sweep (the `embedfit sweep` options, one field each).

    Attributes:
        backbones: Backbone names; empty: every backbone whose weights are on disk, smallest first.
        models: Classifiers fitted on each backbone's features (`embedfit.fitting.classifier_names(streaming=False)`).
        layers: Layers to embed from, each swept on every backbone (None: pre-logits).
        pool: Pooling (None: each backbone's own default).
        resolution: Input size for every backbone (None: each one's default).
        test: A labeled image folder to evaluate on instead of cross-validation.
        metric: What ranks the entries: accuracy, balanced_accuracy or f1_macro.
        cv: Cross-validation folds.
        repeats: Repetitions of the k-fold (more paired folds: a surer ranking).
        seed: Seed of the folds and models.
        device: Extraction device.
        batch_size: Extraction batch size (None: by device).
        workers: Decoding processes (None: by device).
        progress: Show the steps, extractions and fits on stderr (`embedfit.progress.StderrSink`) when `sweep` is
            given no `on_progress`.
        max_minutes: A budget: each backbone's extraction is estimated from a measured batch before the long
            part (its fitting from the backbones fitted before it); a backbone that would not fit in what is left
            is skipped and named. None runs every backbone.
        group_duplicates: Keep each cluster of exact and near-duplicates within one CV fold, for every entry. The
            clusters are found once (`embedfit.auditing.duplicate_groups`: content hashes, and near-duplicates in
            the first backbone's embeddings that extracts) and used as every fit's groups, so that every entry is
            still scored on the same folds. Not with `test`.
        exclude: A CSV with `path,action` columns (an audit.csv, or the fixes CSV of an audit's report): the images
            marked "exclude" are left out of every fit.
    """

    backbones: tuple[str, ...] = ()
    models: tuple[str, ...] = ("logreg",)
    layers: tuple[str | None, ...] = (None,)
    pool: str | None = None
    resolution: int | None = None
    test: str | Path | None = None
    metric: str = "accuracy"
    cv: int = 5
    repeats: int = 1
    seed: int = 0
    device: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    progress: bool = False
    max_minutes: float | None = None
    group_duplicates: bool = False
    exclude: str | Path | None = None


@dataclass
class SweepResult:
    """What `sweep()` produced: entries best first, the comparison of the best with the others, the folder."""

    folder: Path
    entries: list[dict[str, Any]]
    comparisons: list[dict[str, Any]]
    failures: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def best(self) -> dict[str, Any] | None:
        return self.entries[0] if self.entries else None

    @property
    def verdict(self) -> str:
        return verdict(self.entries, self.comparisons)

    @property
    def recommendation(self) -> str:
        return recommendation(self.entries, self.comparisons)


def default_backbones() -> list[str]:
    """Backbones usable offline here (weights on disk), smallest first (no torch: from the catalogue)."""
    from embedfit.backbones.catalogue import list_infos

    infos = [i for i in list_infos() if i.offline]
    return [i.name for i in sorted(infos, key=lambda i: (i.params or math.inf, i.name))]


def candidate_key(backbone: str, layer: str | None) -> str:
    """A file-name-safe key per (backbone, layer): 'dinov2_vits14', 'timm_vit_small@-4'."""
    key = backbone + (f"@{layer}" if layer else "")
    return re.sub(r"[^A-Za-z0-9_.@+-]", "_", key)


def sweep(data: str | Path, output: str | Path, config: SweepConfig | None = None, *,
          on_progress: OnProgress | None = None, **options: Any) -> SweepResult:
    """Extract every backbone into its store, fit every model on identical splits, rank them.

    Args:
        data: Labeled image folder (class per sub-folder) or CSV.
        output: The sweep folder (created; a re-run reuses its stores and finished fits).
        config: What to sweep; keyword `options` override its fields.
        on_progress: Called with a note per step ("[2/3] efficientnet_lite1: extracting") and the progress of
            each extraction and fit within it (`embedfit.progress`); else `config.progress` shows them on stderr.

    Returns:
        A `SweepResult`; `sweep.json` and `leaderboard.md` in `output` hold the same.

    Raises:
        UsageError: Unknown backbone, model or metric; no backbone usable offline.
        ExtractionInterrupted: Ctrl-C; finished backbones are saved, a re-run resumes.
    """
    try:
        config = dataclasses.replace(config or SweepConfig(), **options)
    except TypeError as exc:
        raise UsageError(f"unknown sweep option: {exc}") from None
    with progress_sink(on_progress, config.progress) as sink:
        return _sweep(data, output, config, sink)


def _sweep(data: str | Path, output: str | Path, config: SweepConfig, on_progress: OnProgress | None) -> SweepResult:
    from embedfit.backbones.registry import check_backbone_name
    from embedfit.fitting.models import check_model_name

    def emit(line: str) -> None:
        note(on_progress, line)

    if config.metric not in METRICS:
        raise UsageError(f"unknown metric '{config.metric}'; choose one of {', '.join(METRICS)}")
    if not config.models:
        raise UsageError("give at least one model")
    for model in config.models:
        check_model_name(model)
    backbones = list(dict.fromkeys(config.backbones)) or default_backbones()
    if not backbones:
        raise UsageError("no backbone has its weights on disk here (`embedfit backbones` shows where they go); "
                         "name one in `backbones`")
    for name in backbones:
        check_backbone_name(name)
    if config.max_minutes is not None and not config.max_minutes > 0:
        raise UsageError(f"`max_minutes` must be a positive number of minutes, got {config.max_minutes}")
    if not Path(data).exists():
        raise InputError(f"{data} does not exist")
    if config.test is not None and not Path(config.test).exists():
        raise InputError(f"test data {config.test} does not exist")
    if config.group_duplicates and config.test is not None:
        raise UsageError("`group_duplicates` keeps duplicates within CV folds; it does not combine with `test`")
    if config.exclude is not None:
        from embedfit.auditing import read_exclusions

        read_exclusions(config.exclude)  # a missing or malformed file is refused before the first extraction
    from embedfit.images import scan_images

    # Input mistakes are the data's, not one backbone's: refuse them before the first extraction.
    source = scan_images(data)
    if not source.class_names:
        raise InputError(f"{data} has no classes (class sub-folders or a label column): a sweep fits classifiers")
    n_test = len(scan_images(config.test).records) if config.test is not None else 0
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"`output` {folder} is a file; give a folder for the sweep")
    (folder / "stores").mkdir(parents=True, exist_ok=True)
    (folder / "runs").mkdir(parents=True, exist_ok=True)

    plan = [(b, layer) for b in backbones for layer in config.layers]
    settings = _fit_settings(config)
    entries: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    skipped: list[dict[str, Any]] = []
    # The sweep's duplicate clusters (path -> group), found on the first store extracted: every fit gets the same
    # groups, so every entry is scored on the same folds (each backbone's own near-duplicates would differ).
    groups: dict[str, str] | None = None
    grouping: dict[str, Any] | None = None
    t_start = time.perf_counter()
    # The cost, before the long part: a measured batch per backbone still to extract; fitting is timed on the
    # first backbone and counted for the others from then on.
    extract_estimate = _estimate_extraction(plan, source.records, len(source.records) + n_test, folder, config,
                                            on_progress)
    fit_seconds: list[float] = []  # per backbone fitted so far: its models' fitting
    names = {candidate_key(b, layer): b for b, layer in plan}
    for line in _estimate_lines(extract_estimate, names, config, time.perf_counter() - t_start):
        emit(line)
    budget = None if config.max_minutes is None else 60 * config.max_minutes

    def save(done: int) -> None:
        comparisons = compare_entries(entries, config.metric)
        write_sweep(folder, {
            "data": str(Path(data).resolve()), "test": str(Path(config.test).resolve()) if config.test else None,
            "settings": settings, "plan": [candidate_key(b, layer) for b, layer in plan], "done": done,
            "complete": done == len(plan), "entries": rank(entries, config.metric), "comparisons": comparisons,
            "failures": failures, "seconds": time.perf_counter() - t_start,
            "estimate": {"extract_seconds": {k: round(v, 2) for k, v in extract_estimate.items()},
                         "fit_seconds_per_backbone": round(sum(fit_seconds) / len(fit_seconds), 4)
                         if fit_seconds else None,
                         "method": "one measured batch per backbone still to extract (decoding in the main "
                                   "process), fitting as the backbones fitted before"},
            "max_minutes": config.max_minutes, "skipped": skipped, "duplicates": grouping,
        })

    save(0)
    for i, (backbone, layer) in enumerate(plan):
        key = candidate_key(backbone, layer)
        step = f"[{i + 1}/{len(plan)}] {key}"
        if budget is not None:
            need = extract_estimate[key] + (sum(fit_seconds) / len(fit_seconds) if fit_seconds else 0.0)
            spent = time.perf_counter() - t_start
            if spent + need > budget:
                skipped.append({"backbone": key, "estimated_seconds": round(need, 1),
                                "reason": f"estimated {duration(need)} with {duration(spent)} spent, over the "
                                          f"{duration(budget)} budget (`max_minutes`)"})
                emit(f"{step}: skipped: {skipped[-1]['reason']}")
                save(i + 1)
                continue
        try:
            emit(f"{step}: extracting")
            stores = _extract(data, folder, key, backbone, layer, config, within(on_progress, step))
            if config.group_duplicates and groups is None:
                emit(f"{step}: finding duplicate clusters")
                groups, grouping = _duplicate_clusters(stores, key, config)
            fitted = 0.0
            for model in config.models:
                run_dir = folder / "runs" / f"{key}-{model}"
                if _reusable(run_dir, stores, model, config, groups):
                    emit(f"{step}: {model} already fitted")
                else:
                    emit(f"{step}: fitting {model}")
                    t0 = time.perf_counter()
                    _fit(run_dir, model, stores, config, groups, within(on_progress, step))
                    fitted += time.perf_counter() - t0
                entry = _entry(run_dir, key, backbone, model, stores, config)
                entries.append(entry)
                emit(f"{step}: {model} {config.metric} {entry['score']:.3f} ± {entry['score_std']:.3f}")
            if fitted:
                fit_seconds.append(fitted)
        except ExtractionInterrupted as exc:
            save(i)
            if exc.exit_code == 130:
                raise ExtractionInterrupted(f"sweep interrupted at {key}: {len(entries)} results are saved in "
                                            f"{folder / SWEEP_FILE}; re-run the same command to resume") from None
            failures.append({"backbone": key, "error": str(exc)})
            emit(f"{step}: failed: {exc}")
        except EmbedfitError as exc:  # one backbone that cannot run (no weights, a layer it lacks) stops only itself
            failures.append({"backbone": key, "error": str(exc)})
            emit(f"{step}: failed: {exc}")
        save(i + 1)
    if skipped and not entries and not failures:
        raise UsageError(f"no backbone fits the {config.max_minutes:g}-minute budget (`max_minutes`): the cheapest, "
                         f"{min(skipped, key=lambda s: s['estimated_seconds'])['backbone']}, is estimated at "
                         f"{duration(min(s['estimated_seconds'] for s in skipped))}")
    if failures and not entries:
        raise InputError(f"every backbone failed, e.g. {failures[0]['backbone']}: {failures[0]['error']} "
                         f"(details in {folder / SWEEP_FILE})")
    ranked = rank(entries, config.metric)
    return SweepResult(folder, ranked, compare_entries(entries, config.metric), failures,
                       time.perf_counter() - t_start)


def _estimate_extraction(plan: Sequence[tuple[str, str | None]], records: Sequence[Any], n_images: int,
                         folder: Path, config: SweepConfig, on_progress: OnProgress | None) -> dict[str, float]:
    """Seconds to extract each planned backbone: its images not yet in its store times the seconds per image of
    a measured batch (the third one, when there are three: the first ones pay for warm-up)."""
    from embedfit.backbones.factory import create_backbone
    from embedfit.extraction.encoder import Encoder, iter_embeddings
    from embedfit.extraction.settings import ExtractConfig, default_batch_size, resolve_device
    from embedfit.storage import FeatureStore

    device = resolve_device(config.device)
    batch = config.batch_size or default_batch_size(device)
    sample = list(records[:3 * batch])
    seconds: dict[str, float] = {}
    for backbone, layer in plan:
        key = candidate_key(backbone, layer)
        stored = 0
        for name in (f"{key}.h5", f"{key}.test.h5"):
            if (folder / "stores" / name).exists():
                with contextlib.suppress(EmbedfitError, OSError), FeatureStore.open(folder / "stores" / name) as st:
                    stored += int(st.attrs.get("n_ok", 0)) + int(st.attrs.get("n_failed", 0))
        left = max(0, n_images - stored)
        if not left or not sample:
            seconds[key] = 0.0
            continue
        note(on_progress, f"{key}: timing one batch")
        try:
            cfg = ExtractConfig(backbone=backbone, layer=layer, pool=config.pool, resolution=config.resolution)
            model = create_backbone(backbone, layer=layer, pool=config.pool, resolution=config.resolution)
            encoder = Encoder(model, device, precision=cfg.precision, tta=cfg.tta, channels_last=cfg.channels_last,
                              runtime=cfg.runtime)
            marks = [time.perf_counter()]
            for _ in iter_embeddings(sample, encoder, batch_size=batch, workers=0):
                marks.append(time.perf_counter())
        except EmbedfitError:  # the loop says why this backbone cannot run, where it runs
            seconds[key] = 0.0
            continue
        # One batch stays in flight, so the first result comes once the second batch is queued: the gap between
        # the first two results is one whole batch (the third) decoded and embedded, past the warm-up.
        took, n = (marks[2] - marks[1], batch) if len(marks) > 3 else (marks[-1] - marks[0], len(sample))
        seconds[key] = left * took / max(1, n)
    return seconds


def _estimate_lines(extract: dict[str, float], names: dict[str, str], config: SweepConfig,
                    spent: float) -> list[str]:
    """The estimate as printed before the long part, and on a CPU the fast answer first."""
    each = ", ".join(f"{k} {duration(s)}" for k, s in extract.items())
    out = [f"estimate: extraction about {duration(spent + sum(extract.values()))} ({each}); fitting "
           f"{len(config.models)} model{'s' if len(config.models) != 1 else ''} per backbone is timed on the first "
           "and added from then on"]
    if len(extract) > 1 and config.device in ("auto", "cpu"):
        from embedfit.extraction.settings import resolve_device

        if resolve_device(config.device).type == "cpu":
            cheapest = min(extract, key=lambda k: extract[k])
            out.append(f"on a CPU: -b {names[cheapest]} alone gives a first answer (about "
                       f"{duration(extract[cheapest])}); --max-minutes caps the sweep")
    return out


def _fit_settings(config: SweepConfig) -> dict[str, Any]:
    """The sweep's evaluation settings, as sweep.json records them."""
    return {"metric": config.metric, "cv": config.cv, "repeats": config.repeats, "seed": config.seed,
            "evaluation": "test" if config.test else "cv", "group_duplicates": config.group_duplicates,
            "exclude": str(config.exclude) if config.exclude is not None else None}


def _duplicate_clusters(stores: dict[str, Any], key: str, config: SweepConfig
                        ) -> tuple[dict[str, str], dict[str, Any]]:
    """The duplicate clusters of the images a fit uses (`embedfit.auditing.duplicate_groups` on this backbone's
    store) as path -> group key, and what sweep.json records of them."""
    import numpy as np

    from embedfit.auditing import duplicate_groups
    from embedfit.fitting.data import usable_rows
    from embedfit.storage import FeatureStore

    with FeatureStore.open(stores["store"]) as store:
        rows, _ = usable_rows(store, config.exclude)
        found = duplicate_groups(store, rows)
        paths = store.paths[rows]
    sizes = np.bincount(found)
    clustered = sizes[found] > 1
    return ({str(p): f"g{g}" for p, g in zip(paths, found, strict=True)},
            {"from": key, "clusters": int((sizes > 1).sum()), "images": int(clustered.sum())})


def _reusable(run_dir: Path, stores: dict[str, Any], model: str, config: SweepConfig,
              groups: dict[str, str] | None = None) -> bool:
    """Whether a finished run in the sweep answers what this sweep asks: its identity (data fingerprint, test
    set, model settings, folds, repeats, seed, the images left out and the groups kept together:
    `embedfit.runs.identity_of`) is the one `_fit` would record.
    The metric only chooses which of the run's scores ranks it (`_entry`), so it never needs a refit."""
    from embedfit.runs import is_run, recorded_identity

    if not is_run(run_dir):
        return False
    recorded = recorded_identity(run_dir)
    wanted = _fit_options(stores, config, groups)
    return (recorded is not None and recorded.get("model") == model
            and recorded.get("data") == stores["train_fingerprint"]
            and recorded.get("evaluation", {}).get("test_store_fingerprint") == stores["test_fingerprint"]
            and all(recorded.get("evaluation", {}).get(k) == v for k, v in wanted["evaluation"].items())
            and recorded.get("settings") == wanted["settings"])


def _fit_options(stores: dict[str, Any], config: SweepConfig, groups: dict[str, str] | None = None
                 ) -> dict[str, Any]:
    """The `fit` options of every fit in the sweep, and the model settings and evaluation settings they record
    (the model settings are `FitConfig`'s defaults: a version that changes them refits). With `exclude` or
    duplicate `groups` (path -> group key), the images kept and their group keys, in the store's row order,
    and what fit's identity records of them (`selection_identity`)."""
    import numpy as np

    from embedfit.fitting.evaluate import FitConfig, selection_identity

    default = FitConfig()
    settings = {"scale": default.scale, "pca": None if default.pca == "none" else default.pca,
                "class_weight": default.class_weight, "search": default.search, "seed": config.seed}
    keys = None
    selected: dict[str, Any] = {"rows": None}
    if groups is not None or config.exclude is not None:
        from embedfit.fitting.data import usable_rows
        from embedfit.storage import FeatureStore

        with FeatureStore.open(stores["store"]) as store:
            paths = store.paths[usable_rows(store, config.exclude)[0]]
        # an image the clusters do not know (not embedded by the first backbone) is a group of its own
        keys = None if groups is None else np.array([groups.get(str(p), f"own:{p}") for p in paths])
        selected.update(selection_identity(paths, keys, excluded=config.exclude is not None))
    chosen = {"exclude": config.exclude, **({"groups": keys} if keys is not None else {})}
    if stores["test_store"] is not None:
        return {"options": {"test_store": stores["test_store"], "seed": config.seed, **chosen},
                "settings": settings, "evaluation": {"strategy": "holdout", "seed": config.seed, **selected}}
    return {"options": {"cv": config.cv, "repeats": config.repeats, "seed": config.seed, **chosen},
            "settings": settings,
            "evaluation": {"strategy": "cv", "n_splits": config.cv, "repeats": config.repeats, "seed": config.seed,
                           "groups": False, **selected}}


def _extract(data: str | Path, folder: Path, key: str, backbone: str, layer: str | None,
             config: SweepConfig, on_progress: OnProgress | None) -> dict[str, Any]:
    from embedfit.extraction.local import extract
    from embedfit.extraction.settings import ExtractConfig
    from embedfit.storage import FeatureStore

    extract_config = ExtractConfig(backbone=backbone, layer=layer, pool=config.pool, resolution=config.resolution,
                                   device=config.device, batch_size=config.batch_size, workers=config.workers)
    train = folder / "stores" / f"{key}.h5"
    extract(data, train, extract_config, on_progress=on_progress)
    store = FeatureStore.open(train)
    out = {"store": train, "fingerprint": store.fingerprint, "train_fingerprint": store.fingerprint,
           "test_fingerprint": None, "spec": store.spec.to_dict(),
           "extract_seconds": float(store.attrs.get("extract_seconds", 0.0)),
           "images": int(store.attrs.get("n_ok", 0)) + int(store.attrs.get("n_failed", 0)), "test_store": None}
    if config.test is not None:
        test = folder / "stores" / f"{key}.test.h5"
        extract(config.test, test, extract_config, class_names=store.class_names, on_progress=on_progress)
        test_store = FeatureStore.open(test)
        out["test_store"] = test
        out["fingerprint"] += ":" + test_store.fingerprint
        out["test_fingerprint"] = test_store.fingerprint
        out["extract_seconds"] += float(test_store.attrs.get("extract_seconds", 0.0))
        out["images"] += int(test_store.attrs.get("n_ok", 0)) + int(test_store.attrs.get("n_failed", 0))
    return out


def _fit(run_dir: Path, model: str, stores: dict[str, Any], config: SweepConfig, groups: dict[str, str] | None,
         on_progress: OnProgress | None) -> None:
    """Fit one model on one backbone's store into its run directory (replacing a run that no longer answers
    this sweep: the sweep owns its runs folder)."""
    import shutil

    from embedfit.fitting.evaluate import fit

    if run_dir.exists():
        shutil.rmtree(run_dir)
    fit(stores["store"], model, output=run_dir, on_progress=on_progress,
        **_fit_options(stores, config, groups)["options"])


def _entry(run_dir: Path, key: str, backbone: str, model: str, stores: dict[str, Any],
           config: SweepConfig) -> dict[str, Any]:
    """A leaderboard entry from a finished run (`embedfit.runs.read_run`), scored by the sweep's metric."""
    from embedfit.runs import read_run

    run = read_run(run_dir)
    scores, timing, spec = run.metrics["scores"], run.metrics["timing"], stores["spec"]
    rows = sorted((p["path"], p["label"], p["predicted"]) for p in run.predictions)
    seconds = stores["extract_seconds"]
    return {
        "backbone": key, "name": backbone, "layer": spec["layer"], "pool": spec["pool"],
        "input_size": list(spec["input_size"]), "embedding_dim": spec["embedding_dim"], "model": model,
        "metric": config.metric, "score": scores[config.metric]["mean"], "score_std": scores[config.metric]["std"],
        "folds": scores[config.metric]["folds"],
        "scores": {m: {"mean": s["mean"], "std": s["std"]} for m, s in scores.items()},
        "evaluation": "test" if stores["test_store"] else "cv", "cv": config.cv, "repeats": config.repeats,
        "n_samples": run.metrics["n_samples"],
        "extract_seconds": seconds, "images_per_second": stores["images"] / seconds if seconds > 0 else 0.0,
        "fit_seconds": float(timing["cv_seconds"]) + float(timing["fit_seconds"]),
        # The images scored (path, label) identify the pairing; labels and predictions feed the bootstrap.
        "rows": hashlib.sha256(json.dumps([r[:2] for r in rows]).encode()).hexdigest()[:16],
        "labels": [r[1] for r in rows], "predicted": [r[2] for r in rows],
        "run": str(run_dir), "store": str(stores["store"]), "store_fingerprint": stores["fingerprint"],
    }


def rank(entries: Sequence[dict[str, Any]], metric: str = "accuracy") -> list[dict[str, Any]]:
    """Best first: by the mean score, then by the cheaper extraction."""
    return sorted(entries, key=lambda e: (-e["score"], e["extract_seconds"]))


def _metric(metric: str, labels: Any, predicted: Any) -> float:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    if metric == "accuracy":
        return float(accuracy_score(labels, predicted))
    if metric == "balanced_accuracy":
        return float(balanced_accuracy_score(labels, predicted))
    return float(f1_score(labels, predicted, average="macro", zero_division=0))


def paired_interval(best: dict[str, Any], other: dict[str, Any], metric: str = "accuracy", *,
                    level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """How much `best` beats `other`, with a `level` interval from the same folds or the same test images
    (`embedfit.stats`: a corrected t-interval over CV folds, a paired bootstrap over test images)."""
    import numpy as np

    from embedfit.stats import bootstrap_metric_difference, corrected_t_interval

    diff = best["score"] - other["score"]
    out: dict[str, Any] = {"backbone": other["backbone"], "model": other["model"], "difference": diff}
    if best["rows"] != other["rows"]:
        return {**out, "method": "unpaired (different images)", "low": None, "high": None, "sure": False}
    if best["evaluation"] == "cv" and len(best["folds"]) == len(other["folds"]) > 1:
        d = np.asarray(best["folds"]) - np.asarray(other["folds"])
        low, high = corrected_t_interval(d, int(best.get("cv", len(d))), level)
        method = f"paired over {len(d)} CV folds (corrected t-interval)"
    else:
        names = sorted(set(best["labels"]) | set(best["predicted"]) | set(other["predicted"]))
        code = {n: i for i, n in enumerate(names)}
        y = np.array([code[v] for v in best["labels"]])
        pa, pb = np.array([code[v] for v in best["predicted"]]), np.array([code[v] for v in other["predicted"]])
        low, high = bootstrap_metric_difference(y, pa, pb, lambda t, p: _metric(metric, t, p), seed=seed,
                                                n_boot=n_boot, level=level)
        method = f"paired bootstrap over {len(y)} test images"
    return {**out, "low": low, "high": high, "method": method, "sure": low > 0}


def compare_entries(entries: Sequence[dict[str, Any]], metric: str = "accuracy") -> list[dict[str, Any]]:
    """The best entry against each other one (`paired_interval`), in ranking order."""
    ranked = rank(entries, metric)
    return [paired_interval(ranked[0], e, metric) for e in ranked[1:]]


def verdict(entries: Sequence[dict[str, Any]], comparisons: Sequence[dict[str, Any]]) -> str:
    """One sentence naming the best and how sure the ranking is."""
    if not entries:
        return "no backbone finished"
    best = entries[0]
    line = f"best: {best['backbone']} + {best['model']} ({best['score']:.3f} ± {best['score_std']:.3f})"
    if not comparisons:
        return line
    c = comparisons[0]
    if c["low"] is None:
        return line + f"; ahead of {c['backbone']} + {c['model']} by {c['difference']:.3f} ({c['method']})"
    how = "ahead of" if c["sure"] else "not distinguishable from"
    return (line + f"; {how} the runner-up {c['backbone']} + {c['model']} by {c['difference']:+.3f} "
            f"(95% CI {c['low']:+.3f} to {c['high']:+.3f}, {c['method']})")


def cost_per_image(entry: dict[str, Any]) -> float:
    """Seconds per image to use an entry: embedding one image (extraction) plus the fit's share."""
    per_image = 1 / entry["images_per_second"] if entry["images_per_second"] else math.inf
    return per_image + entry["fit_seconds"] / max(1, entry["n_samples"])


def recommendation(entries: Sequence[dict[str, Any]], comparisons: Sequence[dict[str, Any]]) -> str:
    """What to use, in one line, with why: the best entry, or the cheapest per image among the entries whose
    difference from it is within noise (its interval reaches zero; `embedfit.stats.cheapest_within_noise`)."""
    from embedfit.stats import cheapest_within_noise, ratio

    if not entries:
        return "no backbone finished"
    name = {id(e): f"{e['backbone']} + {e['model']}" for e in entries}
    best = entries[0]
    by_name = {name[id(e)]: e for e in entries}
    # comparisons hold best - other: the other is within noise when that interval reaches zero (low <= 0)
    high = {f"{c['backbone']} + {c['model']}": (None if c["low"] is None else -c["low"]) for c in comparisons}
    pick = cheapest_within_noise(name[id(best)], {n: cost_per_image(e) for n, e in by_name.items()},
                                 {n: e["score"] for n, e in by_name.items()}, high)
    chosen = by_name[pick]
    if chosen is best:
        why = ("the only entry" if len(entries) == 1 else
               "clearly ahead of the others" if all(c["sure"] for c in comparisons) else
               "the best score, and no entry within noise of it is cheaper")
        return f"use {pick}: {why} ({best['score']:.3f})"
    c = next(c for c in comparisons if f"{c['backbone']} + {c['model']}" == pick)
    share = ratio(cost_per_image(chosen), cost_per_image(best))
    return (f"use {pick}: within noise of the best, {name[id(best)]} ({-c['difference']:+.3f}, 95% CI "
            f"{-c['high']:+.3f} to {-c['low']:+.3f}), at {share} of its cost per image "
            f"({cost_per_image(chosen) * 1000:.1f} ms vs {cost_per_image(best) * 1000:.1f} ms)")


def write_sweep(folder: Path, state: dict[str, Any]) -> None:
    """sweep.json and leaderboard.md, each replaced whole (a kill never leaves half a file)."""
    from embedfit.runs.files import atomic_write

    atomic_write(folder / SWEEP_FILE, json.dumps(state, indent=1, default=str) + "\n")
    atomic_write(folder / LEADERBOARD_FILE, to_markdown(state))


def _cells(e: dict[str, Any]) -> list[str]:
    size = "x".join(str(s) for s in e["input_size"])
    return [e["backbone"], e["model"], f"{e['score']:.3f} ± {e['score_std']:.3f}", str(e["embedding_dim"]),
            size, e["pool"], f"{e['images_per_second']:.1f}", f"{e['extract_seconds']:.1f}",
            f"{e['fit_seconds']:.1f}"]


LEADERBOARD_HEADER = ("backbone", "model", "score ± spread", "dim", "input", "pool", "extract img/s",
                      "extract s", "fit s")


def to_markdown(state: dict[str, Any]) -> str:
    """The leaderboard as a Markdown table, with the verdict and the paired comparisons."""
    metric = state["settings"]["metric"]
    entries, comparisons = state["entries"], state["comparisons"]
    lines = [f"# Sweep: {metric} ({state['done']}/{len(state['plan'])} backbones done)", "",
             f"{verdict(entries, comparisons)}", "", f"Recommendation: {recommendation(entries, comparisons)}", "",
             "| " + " | ".join(LEADERBOARD_HEADER) + " |", "|" + "---|" * len(LEADERBOARD_HEADER)]
    lines += ["| " + " | ".join(_cells(e)) + " |" for e in entries]
    if comparisons:
        lines += ["", "Best against each other entry (difference in " + metric + ", 95% interval):", ""]
        for c in comparisons:
            ci = "n/a" if c["low"] is None else f"{c['low']:+.3f} to {c['high']:+.3f}"
            lines.append(f"- {c['backbone']} + {c['model']}: {c['difference']:+.3f} ({ci}; {c['method']})"
                         + (" — sure" if c["sure"] else ""))
    for f in state.get("failures", []):
        lines.append(f"- failed: {f['backbone']}: {f['error']}")
    for k in state.get("skipped", []):
        lines.append(f"- skipped: {k['backbone']}: {k['reason']}")
    return "\n".join(lines) + "\n"


def read_sweep(folder: str | Path) -> dict[str, Any]:
    """The state of a sweep folder (sweep.json)."""
    path = Path(folder) / SWEEP_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{folder} is not a sweep folder (no {SWEEP_FILE})") from None
    except ValueError as exc:
        raise InputError(f"{path} is damaged ({exc})") from None


def is_sweep_folder(path: str | Path) -> bool:
    return (Path(path) / SWEEP_FILE).is_file()


def build_sweep_report(folder: str | Path, output: str | Path) -> Path:
    """A self-contained HTML page: the leaderboard, the verdict and score against extraction cost."""
    import base64
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    check_output_file(output)
    state = read_sweep(folder)
    entries, metric = state["entries"], state["settings"]["metric"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model in sorted({e["model"] for e in entries}):
        pts = [e for e in entries if e["model"] == model]
        cost = [1000 / e["images_per_second"] if e["images_per_second"] else float("nan") for e in pts]
        ax.errorbar(cost, [e["score"] for e in pts], yerr=[e["score_std"] for e in pts], fmt="o", capsize=3,
                    label=model)
        for e, x in zip(pts, cost, strict=True):
            ax.annotate(e["backbone"], (x, e["score"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("extraction cost (ms per image)")
    ax.set_ylabel(f"{metric} (mean ± std over folds)")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    plot = base64.b64encode(buf.getvalue()).decode()
    head = "".join(f"<th>{html.escape(h)}</th>" for h in LEADERBOARD_HEADER)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(e)) + "</tr>" for e in entries)
    comps = "".join(f"<li>{html.escape(c['backbone'])} + {html.escape(c['model'])}: {c['difference']:+.3f} ("
                    + ("n/a" if c["low"] is None else f"{c['low']:+.3f} to {c['high']:+.3f}")
                    + f"; {html.escape(c['method'])})</li>" for c in state["comparisons"])
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>embedfit sweep</title>
<style>body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; }} th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }} img {{ max-width: 100%; }}</style></head><body>
<h1>embedfit sweep</h1>
<section id="sweep-leaderboard"><h2>Leaderboard ({html.escape(metric)})</h2>
<p>{html.escape(verdict(entries, state["comparisons"]))}</p>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<ul>{comps}</ul></section>
<section id="sweep-cost"><h2>Score against extraction cost</h2>
<img alt="score against extraction cost" src="data:image/png;base64,{plot}"></section>
</body></html>"""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(doc, encoding="utf-8")
    return output
