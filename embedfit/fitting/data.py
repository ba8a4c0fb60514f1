"""The rows you can train on: labelled, embedded images of a store, and the checks that they can be fitted."""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embedfit.errors import InputError, StoreMismatchError, UsageError
from embedfit.storage import FeatureStore, check_mixable


@dataclass
class Dataset:
    """Embeddings of the usable images of a store."""

    X: np.ndarray
    y: np.ndarray
    paths: np.ndarray
    rows: np.ndarray  # row indices in the store
    class_names: list[str]
    store: FeatureStore
    excluded: int  # failed, missing or unlabeled images left out
    notes: list[str] = field(default_factory=list)  # what a user should know about the data (printed by the CLI)


def load_dataset(store: FeatureStore | str | Path, exclude: str | Path | None = None) -> Dataset:
    """Load the labeled, embedded images of a store and check they can be fitted.

    Args:
        store: The feature store.
        exclude: A CSV with `path,action` columns (an audit.csv, or the fixes CSV of `embedfit report AUDIT_DIR`):
            the images marked "exclude" are left out.
    """
    store = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
    if not store.class_names or (store.labels < 0).all():
        raise InputError(f"store {store.path} has no labels: extract from a class-per-subfolder tree or a CSV "
                         "with a label column to fit a classifier")
    rows, notes = usable_rows(store, exclude)
    X = store.features(rows)
    if not np.isfinite(X).all():
        bad = rows[~np.isfinite(X).all(axis=1)]
        raise InputError(f"store {store.path} has non-finite features for {len(bad)} image(s), e.g. "
                         f"{store.paths[bad[0]]}; re-extract it with "
                         "`embedfit extract ... --precision fp32 --overwrite`")
    y = store.labels[rows]
    class_names = list(store.class_names)
    if not store.complete:
        notes.append(f"store {store.path} is incomplete (an interrupted extract): only {store.n_ok} images are "
                     "embedded so far; re-run embedfit extract to finish it")
    counts = np.bincount(y, minlength=len(class_names))
    if len(y) and not counts.all():  # e.g. a deleted class folder or a renamed CSV label: nothing to learn from
        empty = [c for c, n in zip(class_names, counts, strict=True) if n == 0]
        notes.append(f"{len(empty)} class(es) without usable images in the store left out: {', '.join(empty)}")
        keep = np.flatnonzero(counts)
        y = np.searchsorted(keep, y)  # labels renumbered over the classes kept
        class_names = [class_names[c] for c in keep]
    return Dataset(X, y, store.paths[rows], rows, class_names, store, len(store) - len(rows), notes)


def usable_rows(store: FeatureStore, exclude: str | Path | None = None) -> tuple[np.ndarray, list[str]]:
    """The rows of a store a classifier is fitted on (embedded, labelled, and not marked "exclude" in the
    `exclude` CSV: `embedfit.auditing.read_exclusions`), and a note on what `exclude` left out."""
    usable = (store.status == 0) & (store.labels >= 0)
    notes = []
    if exclude is not None:
        from embedfit.auditing import exclusion_note, read_exclusions

        marked = read_exclusions(exclude)
        left_out = np.isin(store.paths, np.array(sorted(marked), dtype=object))
        notes.append(exclusion_note(exclude, int((left_out & usable).sum()), len(marked) - int(left_out.sum())))
        usable &= ~left_out
    return np.flatnonzero(usable), notes


def check_trainable(y: np.ndarray, class_names: Sequence[str], n_splits: int | None) -> None:
    """Refuse data that cannot be cross-validated, naming the class that is short."""
    present = np.unique(y)
    if len(present) < 2:
        found = f"one ({class_names[present[0]]})" if len(present) else "none with usable images"
        raise InputError(f"need at least two classes to fit a classifier, found {found}")
    if n_splits is not None:
        counts = np.bincount(y, minlength=len(class_names))
        short = [(class_names[c], int(counts[c])) for c in present if counts[c] < n_splits]
        if short:
            name, count = min(short, key=lambda s: s[1])
            if count < 2:  # no number of folds helps
                raise InputError(f"class '{name}' has 1 image; evaluating needs at least 2 per class (one to train "
                                 "on, one to test): add images, remove the class, or evaluate on a `test_store`")
            raise InputError(f"class '{name}' has {count} image(s), fewer than the {n_splits} CV folds; use "
                             f"`cv` {count} or add images")


def groups_from(spec: str | None, paths: np.ndarray) -> np.ndarray | None:
    """Group labels for grouped CV: a CSV (path,group) file, or a regex whose first group is the group key."""
    if spec is None:
        return None
    if spec.lower().endswith(".csv"):  # a file name, never a regex on image paths
        if not Path(spec).is_file():
            raise InputError(f"groups file {spec} does not exist")
        with open(spec, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"path", "group"} <= set(reader.fieldnames):
                raise InputError(f"groups file {spec} needs 'path' and 'group' columns")
            table = {row["path"]: row["group"] for row in reader}
        missing = [p for p in paths if p not in table]
        if missing:
            raise InputError(f"groups file {spec} has no group for {len(missing)} image(s), e.g. {missing[0]}")
        return np.array([table[p] for p in paths])
    try:
        pattern = re.compile(spec)
    except re.error as exc:
        raise UsageError(f"`groups` is neither a CSV file nor a valid regex: {exc}") from None
    keys = []
    for p in paths:
        m = pattern.search(str(p))
        if m is None:
            raise InputError(f"`groups` regex {spec!r} does not match {p}")
        keys.append(m.group(1) if m.groups() else m.group(0))
    return np.array(keys)


def _check_test_size(test_size: float, y: np.ndarray) -> None:
    """A stratified hold-out needs an image of every class on both sides (scikit-learn's rounding)."""
    n, k = len(y), len(np.unique(y))
    n_test = math.ceil(test_size * n)
    if n_test < k:
        raise UsageError(f"`test_size` {test_size} gives {n_test} test images for {k} classes; a stratified "
                         f"hold-out needs one per class: use `test_size` {math.ceil(100 * k / n) / 100} or more")
    if n - n_test < k:
        raise UsageError(f"`test_size` {test_size} leaves {n - n_test} training images for {k} classes; use "
                         f"`test_size` {math.floor(100 * (n - k) / n) / 100} or less")


def _aligned_test_set(test_store: str | Path | FeatureStore, train: Dataset) -> Dataset:
    """Load a hold-out store and map its labels onto the training classes by name."""
    test = load_dataset(test_store)
    check_mixable(test.store.settings, train.store.settings, f"test store {test.store.path}",
                  f"the training store {train.store.path}")
    unknown = sorted(set(test.class_names[i] for i in np.unique(test.y)) - set(train.class_names))
    if unknown:
        raise StoreMismatchError(f"test store {test.store.path} has classes the training store lacks: "
                                 f"{', '.join(unknown)}")
    mapping = np.array([train.class_names.index(c) if c in train.class_names else -1 for c in test.class_names])
    test.y = mapping[test.y]
    return test
