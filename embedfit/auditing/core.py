"""`audit`: the findings about a store's images that make its scores wrong, from the embeddings already stored.

Kinds of finding (one row each in audit.csv; `other` is the second image of a pair):

- exact_duplicate: the same content twice (the store's per-image content hash; stores without one: identical
  embeddings, which a note says).
- near_duplicate: cosine similarity of the embeddings at or above `threshold` (resized, re-encoded, lightly cropped
  copies). The default, `NEAR_DUPLICATE_THRESHOLD`, is calibrated on real photos (docs/audit.md).
- conflicting_labels: a duplicate or near-duplicate pair filed under different classes.
- train_test_leak: an image of the test store that duplicates or near-duplicates one of the store.
- label_issue: the combined evidence (out-of-fold probabilities, the labels of the nearest neighbours, and the
  backbone's own ImageNet head where the class names map onto ImageNet) says another class.
- outlier: far from every other image: its mean similarity to its nearest neighbours is a far-out low value
  (below Q1 - 3 IQR of the store's).
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedfit.auditing.search import EXACT_MAX_ROWS, knn, read_normalized
from embedfit.errors import InputError, OutputError, UsageError, check_output_dir
from embedfit.runs import csv_value, read_csv, write_csv
from embedfit.storage import CONTENT_HASH, FeatureStore, check_mixable

log = logging.getLogger("embedfit")

KINDS = ("exact_duplicate", "near_duplicate", "conflicting_labels", "train_test_leak", "label_issue", "outlier")
COLUMNS = ("kind", "path", "other", "score", "given", "suggested", "action")
# Cosine similarity of EfficientNet-Lite0 pre-logit embeddings at or above which two images are near-duplicates.
# Calibrated on real photos (docs/audit.md): distinct images reached 0.93 at most; copies resized to half, JPEG
# re-encoded at quality 50 or cropped by 10% at least 0.95.
NEAR_DUPLICATE_THRESHOLD = 0.95
NEIGHBORS = 10
# Weight of each signal in the combined label evidence: the neighbours' labels count as much as the out-of-fold
# probe, the ImageNet head (trained on other labels) half as much.
_WEIGHTS = {"oof": 1.0, "neighbors": 1.0, "imagenet": 0.5}


@dataclass(frozen=True)
class AuditConfig:
    """How to audit (the `embedfit audit` options, one field each).

    Attributes:
        threshold: Cosine similarity at or above which two embeddings are near-duplicates.
        neighbors: Nearest neighbours looked at per image (near-duplicates, label votes, outliers).
        cv: Folds of the out-of-fold probe when no `run` is given.
        imagenet: Use the backbone's ImageNet head as a label signal where the class names map onto ImageNet
            ("auto": when the store holds pre-logit features of a backbone with such a head).
        exact: Brute-force search (True), approximate (False), or by size (None).
        seed: Random state of the out-of-fold probe.
    """

    threshold: float = NEAR_DUPLICATE_THRESHOLD
    neighbors: int = NEIGHBORS
    cv: int = 5
    imagenet: str = "auto"
    exact: bool | None = None
    seed: int = 0


@dataclass
class AuditResult:
    """What `audit` found: one dict per finding (the audit.csv columns), counts, settings and notes."""

    findings: list[dict[str, Any]]
    counts: dict[str, int]
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    output: Path | None = None

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.findings if f["kind"] == kind]


def _open(store: str | os.PathLike | FeatureStore) -> FeatureStore:
    return store if isinstance(store, FeatureStore) else FeatureStore.open(store)


def content_keys(store: FeatureStore, rows: np.ndarray, features: np.ndarray | None = None
                 ) -> tuple[np.ndarray, bool]:
    """Per row a key equal for identical images: the content hash, or (stores written before it) the bytes of the
    embedding (`features`: the rows' features when already in memory). Returns (keys, whether content hashes)."""
    hashes = store.row_arrays[CONTENT_HASH]  # "" where unknown: every row of a store written before hashes
    if all(hashes[rows]):
        return np.asarray(hashes[rows], dtype=object), True
    keys = np.empty(len(rows), dtype=object)
    for i in range(0, len(rows), 16384):
        block = store.features(rows[i:i + 16384]) if features is None else features[i:i + 16384]
        # a 16-byte digest per row, not the row itself: keys of a million rows stay small
        keys[i:i + len(block)] = [hashlib.blake2b(np.asarray(r, np.float32).tobytes(), digest_size=16).digest()
                                  for r in block]
    return keys, False


def components(n: int, pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """Connected components (union-find) of `n` items joined by `pairs`: a component id per item."""
    parent = np.arange(n)

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(a) for a in range(n)])


def _exact_pairs(keys: Sequence[Any]) -> list[tuple[int, int]]:
    """Each copy paired with the first row of its content (rows are in path order)."""
    first: dict[Any, int] = {}
    pairs = []
    for i, key in enumerate(keys):
        if key in first:
            pairs.append((first[key], i))
        else:
            first[key] = i
    return pairs


def _near_pairs(sims: np.ndarray, idx: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """Unique pairs (i < j) among the neighbour lists at or above the threshold."""
    qi, slot = np.nonzero(sims >= threshold)
    seen: dict[tuple[int, int], float] = {}
    for i, s in zip(qi.tolist(), slot.tolist(), strict=True):
        j = int(idx[i, s])
        if j < 0 or j == i:
            continue
        key = (min(i, j), max(i, j))
        seen[key] = max(seen.get(key, -1.0), float(sims[i, s]))
    return [(a, b, s) for (a, b), s in sorted(seen.items())]


def duplicate_groups(store: str | os.PathLike | FeatureStore, rows: np.ndarray | None = None, *,
                     threshold: float = NEAR_DUPLICATE_THRESHOLD, neighbors: int = NEIGHBORS) -> np.ndarray:
    """A group id per row: exact and near-duplicates share one (for grouped CV: `fit(group_duplicates=True)`).

    Args:
        store: The feature store.
        rows: Store rows to group (default: the embedded ones).
        threshold: Near-duplicate cosine similarity.
        neighbors: Nearest neighbours searched per image.
    """
    store = _open(store)
    rows = store.ok_rows() if rows is None else np.asarray(rows)
    keys, _ = content_keys(store, rows)
    return cluster_duplicates(keys, read_normalized(store, rows), threshold=threshold, neighbors=neighbors)


def cluster_duplicates(keys: Sequence[Any], normalized: np.ndarray | None, *,
                       threshold: float = NEAR_DUPLICATE_THRESHOLD, neighbors: int = NEIGHBORS) -> np.ndarray:
    """A group id per image: images with equal `keys` (content hashes) and, given their embeddings, images whose
    cosine similarity is at least `threshold` share one (connected components: a chain of copies is one group).

    Args:
        keys: A content key per image (the store's `content_hash`, or the SHA-256 of the file's bytes); None or ""
            where unknown (such an image is grouped by its embedding only).
        normalized: L2-normalised embeddings, one row per image (`search.normalize`); None groups by content only.
        threshold: Near-duplicate cosine similarity.
        neighbors: Nearest neighbours searched per image.
    """
    known = [k if k else ("unknown", i) for i, k in enumerate(keys)]  # an unknown key equals no other
    pairs = _exact_pairs(known)
    if normalized is not None and len(normalized):
        sims, idx = knn(normalized, neighbors)
        pairs += [(a, b) for a, b, _ in _near_pairs(sims, idx, threshold)]
    return components(len(known), pairs)


def exact_duplicates_across(keys: np.ndarray, folds: np.ndarray | None = None, other_keys: np.ndarray | None = None
                            ) -> list[tuple[int, int]]:
    """Exact duplicates (`keys` from `content_keys`) that sit in different CV folds (`folds`: each row's test
    fold), or, given `other_keys` (a test store's), the (row, other row) pairs of identical images."""
    if other_keys is not None:
        where = {k: i for i, k in enumerate(keys)}
        return [(where[k], j) for j, k in enumerate(other_keys) if k in where]
    assert folds is not None
    return [(a, b) for a, b in _exact_pairs(keys) if folds[a] != folds[b]]


def read_exclusions(path: str | os.PathLike) -> set[str]:
    """The image paths a fixes CSV (`path,action`, e.g. from `embedfit report AUDIT_DIR`) or an audit.csv marks
    with the action "exclude".

    Raises:
        InputError: The file is missing or has no `path` and `action` columns.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"exclusions file {path} does not exist")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "action"} <= set(reader.fieldnames):
            raise InputError(f"exclusions file {path} needs 'path' and 'action' columns (mark rows to leave out "
                             "with action 'exclude')")
        # cells as embedfit's CSV writer escaped them (a path starting with '=' reads back with a leading "'")
        return {csv_value(row["path"]) for row in reader if (row.get("action") or "").strip().lower() == "exclude"}


def exclusion_note(path: str | os.PathLike, left_out: int, unknown: int, where: str = "the store") -> str:
    """The note on what an exclusions file (`read_exclusions`) left out: `left_out` images, and `unknown` marked
    paths that are not in `where`."""
    return (f"{left_out} image(s) left out as marked in {path}"
            + (f" ({unknown} marked path(s) are not in {where})" if unknown else ""))


# ---------------------------------------------------------------------------------------------------
# label evidence


def _oof_from_run(run: str | os.PathLike, store: FeatureStore, rows: np.ndarray,
                  class_names: list[str]) -> np.ndarray:
    """Out-of-fold probabilities of a CV run on this store, aligned with `rows` (NaN where the run has none)."""
    from embedfit.runs import read_run

    record = read_run(run)
    meta, predictions = record.meta, record.predictions
    if meta.get("kind") != "sklearn" or meta.get("store_fingerprint") != store.fingerprint:
        raise UsageError(f"run {run} was not fitted on store {store.path} as it is now (fingerprint differs): "
                         "give a run from `embedfit fit` on this store, or leave out `run`")
    if record.evaluation.scheme != "cv":
        raise UsageError(f"run {run} was evaluated on {record.evaluation.scheme} images, not by CV: `run` needs "
                         "out-of-fold predictions for every image")
    columns = [f"p_{c}" for c in class_names]
    if not predictions or any(c not in predictions[0] for c in columns):
        raise UsageError(f"run {run} has no class probabilities in its predictions.csv (its model predicts "
                         "classes only): give a run of a model with probabilities, e.g. logreg")
    position = {int(r): i for i, r in enumerate(rows)}
    proba = np.full((len(rows), len(class_names)), np.nan)
    for p in predictions:
        i = position.get(int(p["row"]))
        if i is not None:
            proba[i] = [float(p[c]) for c in columns]
    return proba


def _oof_probe(X: np.ndarray, y: np.ndarray, groups: np.ndarray, n_classes: int, cv: int, seed: int) -> np.ndarray:
    """Out-of-fold probabilities of a logistic-regression probe, duplicates kept within one fold (a copy in the
    training folds would vouch for its own label)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    counts = np.bincount(y, minlength=n_classes)
    present = counts[counts > 0]
    folds = int(min(cv, present.min(), len(np.unique(groups)))) if len(present) > 1 else 0
    proba = np.full((len(y), n_classes), np.nan)
    if folds < 2:
        return proba
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced"))
    for tr, te in StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(X, y, groups):
        if len(np.unique(y[tr])) < 2:
            continue
        pipe.fit(X[tr], y[tr])
        proba[np.ix_(te, pipe.classes_)] = 0.0
        proba[np.ix_(te, pipe.classes_)] = pipe.predict_proba(X[te])
    return proba


def _neighbor_votes(sims: np.ndarray, idx: np.ndarray, y: np.ndarray, groups: np.ndarray,
                    n_classes: int) -> np.ndarray:
    """Class distribution of each image's nearest neighbours, weighted by similarity, its own duplicates left
    out, smoothed towards uniform by one vote."""
    votes = np.full((len(y), n_classes), 1.0 / n_classes)
    valid = (idx >= 0) & (groups[np.where(idx >= 0, idx, 0)] != groups[:, None])
    weights = np.where(valid, np.clip(sims, 0, None), 0.0)
    for c in range(n_classes):
        votes[:, c] += (weights * (y[np.where(idx >= 0, idx, 0)] == c)).sum(axis=1)
    return votes / votes.sum(axis=1, keepdims=True)


def _imagenet_evidence(store: FeatureStore, X: np.ndarray, class_names: list[str], mode: str
                       ) -> tuple[np.ndarray | None, str]:
    """The backbone's ImageNet head on the stored pre-logit features, restricted to the classes' ImageNet
    classes: (N, C) probabilities, or None with why not."""
    if mode == "off":
        return None, "not asked for"
    spec = store.spec
    if spec.layer != "pre_logits" or spec.pool not in ("avg", "head") or store.settings.tta != "none":
        return None, "the store does not hold the backbone's pre-logit features"
    from embedfit.training.imagenet_classes import map_classes, restricted_predict

    mapping = map_classes(class_names)
    if not mapping.applicable:
        return None, mapping.reason
    import torch

    from embedfit.backbones import create_backbone
    from embedfit.training.classify import has_imagenet_head

    try:
        model = create_backbone(spec.name, pool=spec.pool, resolution=spec.input_size[0])
    except Exception as exc:  # weights not available offline, an unknown backbone...: a signal less, not a failure
        return None, f"the backbone could not be loaded ({exc})"
    if not has_imagenet_head(model) or model.spec.differences(spec):
        return None, f"{spec.short()} has no ImageNet head matching the stored features"
    with torch.inference_mode():
        logits = model.head(torch.as_tensor(X, dtype=torch.float32)).float()
        probs = torch.softmax(logits, dim=1).numpy()
    return restricted_predict(probs, mapping)[1], "used"


def _label_issues(signals: dict[str, np.ndarray], y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Combine the signals (a weighted mean of the available probabilities per image); an image is an issue when
    the combined evidence prefers another class. Returns (combined, suggested class, margin over the given)."""
    total = np.zeros_like(next(iter(signals.values())))
    weight = np.zeros((len(y), 1))
    for name, p in signals.items():
        ok = np.isfinite(p).all(axis=1, keepdims=True)
        total += np.where(ok, np.nan_to_num(p), 0.0) * _WEIGHTS[name]
        weight += ok * _WEIGHTS[name]
    combined = total / np.maximum(weight, 1e-12)
    suggested = combined.argmax(axis=1)
    margin = combined[np.arange(len(y)), suggested] - combined[np.arange(len(y)), y]
    return combined, suggested, margin


# ---------------------------------------------------------------------------------------------------
# audit


def audit(store: str | os.PathLike | FeatureStore, output: str | os.PathLike | None = None,
          config: AuditConfig | None = None, *, test_store: str | os.PathLike | FeatureStore | None = None,
          run: str | os.PathLike | None = None, **options: Any) -> AuditResult:
    """Find exact and near-duplicates, conflicting labels, train/test leaks, label issues and outliers.

    Args:
        store: The feature store to audit.
        output: Folder for audit.csv (one row per finding: kind,path,other,score,given,suggested,action) and
            audit.json (counts, settings, notes); None writes nothing.
        config: How to audit (`AuditConfig`); keyword `options` override its fields (e.g. `threshold=0.97`).
        test_store: A hold-out store (same backbone) to check for images leaked from `store`.
        run: A CV run of `embedfit fit` on this store: its out-of-fold probabilities replace the audit's own probe.

    Returns:
        An `AuditResult`.

    Raises:
        UsageError: A setting is out of range, or `run` is not a CV run on this store.
        StoreMismatchError: `test_store` was made with another backbone.
    """
    import dataclasses

    try:
        config = dataclasses.replace(config or AuditConfig(), **options)
    except TypeError as exc:
        raise UsageError(f"unknown audit option: {exc}") from None
    if not 0 < config.threshold <= 1:
        raise UsageError(f"`threshold` is a cosine similarity between 0 and 1, got {config.threshold}")
    if config.neighbors < 1:
        raise UsageError(f"`neighbors` must be at least 1, got {config.neighbors}")
    if config.imagenet not in ("auto", "off"):
        raise UsageError(f"`imagenet` must be 'auto' or 'off', got {config.imagenet!r}")
    out_dir = Path(output) if output is not None else None
    if out_dir is not None:
        check_output_dir(out_dir)
    store = _open(store)
    notes: list[str] = []
    rows = store.ok_rows()
    paths = store.paths[rows]
    labels = store.labels[rows]
    names = list(store.class_names)
    given = [names[c] if c >= 0 else "" for c in labels]
    findings: list[dict[str, Any]] = []

    def add(kind: str, i: int, score: float, *, other: str = "", suggested: str = "", given_: str | None = None
            ) -> None:
        findings.append({"kind": kind, "path": str(paths[i]), "other": other, "score": round(float(score), 6),
                         "given": given[i] if given_ is None else given_, "suggested": suggested, "action": ""})

    # duplicates
    keys, hashed = content_keys(store, rows)
    if not hashed:
        notes.append(f"store {store.path} lacks content hashes (rows extracted before embedfit stored them): exact "
                     "copies were found through identical embeddings only; re-extract it with `embedfit extract "
                     "... --overwrite` to compare file contents")
    exact = _exact_pairs(keys)
    base = read_normalized(store, rows)
    sims, idx = knn(base, config.neighbors, exact=config.exact)
    exact_set = {(a, b) for a, b in exact}
    groups_of = components(len(rows), exact)
    near = [(a, b, s) for a, b, s in _near_pairs(sims, idx, config.threshold)
            if (min(a, b), max(a, b)) not in exact_set and groups_of[a] != groups_of[b]]
    for a, b in exact:
        add("exact_duplicate", b, 1.0, other=str(paths[a]))
    for a, b, s in near:
        add("near_duplicate", b, s, other=str(paths[a]))
    for a, b, s in [(a, b, 1.0) for a, b in exact] + near:
        if labels[a] >= 0 and labels[b] >= 0 and labels[a] != labels[b]:
            add("conflicting_labels", b, s, other=str(paths[a]), suggested=given[a])
    dup_groups = components(len(rows), exact + [(a, b) for a, b, _ in near])

    # train/test leaks
    test_root = None
    if test_store is not None:
        leaks, test_root = _leaks(store, rows, base, keys, test_store, config, notes)
        findings += leaks

    # label issues
    labelled = np.flatnonzero(labels >= 0)
    label_settings: dict[str, Any] = {}
    if len(names) >= 2 and len(labelled) >= 2:
        y = labels[labelled]
        signals: dict[str, np.ndarray] = {}
        if run is not None:
            signals["oof"] = _oof_from_run(run, store, rows[labelled], names)
        else:
            X = np.asarray(base[labelled], dtype=np.float32)
            signals["oof"] = _oof_probe(X, y, dup_groups[labelled], len(names), config.cv, config.seed)
        sub_sims, sub_idx = sims[labelled], idx[labelled]
        position = np.full(len(rows), -1)
        position[labelled] = np.arange(len(labelled))
        mapped = np.where(sub_idx >= 0, position[np.where(sub_idx >= 0, sub_idx, 0)], -1)
        signals["neighbors"] = _neighbor_votes(sub_sims, mapped, y, dup_groups[labelled], len(names))
        imagenet, why = _imagenet_evidence(store, store.features(rows[labelled]), names, config.imagenet)
        if imagenet is not None:
            signals["imagenet"] = imagenet
        else:
            notes.append(f"label issues: the backbone's ImageNet head was not used ({why})")
        _, suggested, margin = _label_issues(signals, y)
        label_settings = {"signals": sorted(signals), "weights": {k: _WEIGHTS[k] for k in signals},
                          "oof_source": str(run) if run is not None else f"logistic regression, {config.cv}-fold"}
        for j in np.flatnonzero(margin > 0):
            add("label_issue", int(labelled[j]), margin[j], suggested=names[int(suggested[j])])

    # outliers: far-out low mean similarity to the nearest neighbours (Tukey's far fence)
    if len(rows) >= 10:
        closeness = np.where(np.isfinite(sims), sims, np.nan)
        mean_sim = np.nanmean(closeness, axis=1)
        q1, q3 = np.nanpercentile(mean_sim, [25, 75])
        fence = q1 - 3 * (q3 - q1)
        for i in np.flatnonzero(mean_sim < fence):
            add("outlier", int(i), 1 - mean_sim[i])

    findings.sort(key=lambda f: (KINDS.index(f["kind"]), -f["score"], f["path"]))
    counts = {k: sum(1 for f in findings if f["kind"] == k) for k in KINDS}
    settings = {**asdict(config), "store": getattr(store, "url", "") or str(store.path.resolve()),
                "store_fingerprint": store.fingerprint, "root": str(store.root), "backbone": store.spec.short(),
                "images": len(rows), "exact_by": "content_hash" if hashed else "embedding",
                "search": "exact" if (len(rows) <= EXACT_MAX_ROWS if config.exact is None else config.exact)
                else "approximate", "test_store": _describe(test_store), "test_root": test_root,
                "run": str(run) if run is not None else None,
                "label_issues": label_settings,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    result = AuditResult(findings, counts, settings, notes)
    if out_dir is not None:
        result.output = write_audit(out_dir, result)
    return result


def _describe(store: Any) -> str | None:
    if store is None:
        return None
    if isinstance(store, FeatureStore):
        return getattr(store, "url", "") or str(store.path.resolve())
    return str(store)


def _leaks(store: FeatureStore, rows: np.ndarray, base: np.ndarray, keys: np.ndarray,
           test_store: str | os.PathLike | FeatureStore, config: AuditConfig, notes: list[str]
           ) -> tuple[list[dict[str, Any]], str]:
    """The test store's images that duplicate one of the store's, and the test store's image root."""
    test = _open(test_store)
    check_mixable(test.settings, store.settings, f"test store {test.path}", f"the audited store {store.path}")
    if Path(test.path).resolve() == Path(store.path).resolve():
        raise UsageError(f"`test_store` {test.path} is the audited store itself")
    test_rows = test.ok_rows()
    test_keys, hashed = content_keys(test, test_rows)
    where = {k: i for i, k in enumerate(keys)}
    queries = read_normalized(test, test_rows)
    sims, idx = knn(base, 1, queries, exact=config.exact)
    out = []
    names = list(test.class_names)
    for j in range(len(test_rows)):
        i = where.get(test_keys[j])
        score = 1.0 if i is not None else float(sims[j, 0])
        i = i if i is not None else int(idx[j, 0])
        if score >= config.threshold and i >= 0:
            label = int(test.labels[test_rows[j]])
            train_label = int(store.labels[rows[i]])
            out.append({"kind": "train_test_leak", "path": str(test.paths[test_rows[j]]),
                        "other": str(store.paths[rows[i]]), "score": round(score, 6),
                        "given": names[label] if label >= 0 else "",
                        "suggested": store.class_names[train_label] if train_label >= 0 else "", "action": ""})
    if not hashed:
        notes.append(f"test store {test.path} has no content hashes: leaks were found through the embeddings only")
    return out, str(test.root)


def write_audit(out_dir: str | os.PathLike, result: AuditResult) -> Path:
    """Write audit.csv and audit.json into `out_dir` (each replaced whole); return the folder."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / ".audit.csv.tmp"
        write_csv(tmp, COLUMNS, ([row.get(c, "") for c in COLUMNS] for row in result.findings))
        os.replace(tmp, out_dir / "audit.csv")
        tmp = out_dir / ".audit.json.tmp"
        tmp.write_text(json.dumps({"counts": result.counts, "settings": result.settings, "notes": result.notes},
                                  indent=2))
        os.replace(tmp, out_dir / "audit.json")
    except OSError as exc:
        raise OutputError(f"cannot write the audit to {out_dir}: {exc.strerror or exc}") from None
    return out_dir


def read_audit(folder: str | os.PathLike) -> AuditResult:
    """An audit folder written by `audit`: its findings, counts, settings and notes.

    Raises:
        InputError: The folder holds no audit, or a damaged one.
    """
    folder = Path(folder)
    if not (folder / "audit.json").is_file() or not (folder / "audit.csv").is_file():
        raise InputError(f"{folder} is not an audit folder (no audit.json and audit.csv): run `embedfit audit`")
    try:
        meta = json.loads((folder / "audit.json").read_text())
        findings: list[dict[str, Any]] = list(read_csv(folder / "audit.csv"))
        for row in findings:
            row["score"] = float(row["score"])
        return AuditResult(findings, meta["counts"], meta["settings"], meta.get("notes", []), folder)
    except (ValueError, KeyError) as exc:
        raise InputError(f"audit folder {folder} is damaged ({exc}); run `embedfit audit` again") from None


def is_audit_folder(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / "audit.json").is_file()


