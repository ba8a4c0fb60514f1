"""What a saved scikit-learn model may contain, and checks of a loaded one: skops' trusted types, embedfit's own
allow-list (`embedfit.fitting.registry.trusted_types()`), and the fitted state that compiled prediction code trusts."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedfit.errors import ModelFileError
from embedfit.fitting.registry import trusted_types


def skops_io() -> Any:
    """`skops.io`, imported on first use (saving or loading a scikit-learn model), as skops ships it.

    Importing skops lists scikit-learn's estimators for its default trust list (`all_estimators`, whose package walk
    imports torch through `sklearn.externals.array_api_compat.torch` and pytest through `sklearn.utils._testing`):
    seconds that `fit` pays once per process. embedfit does not patch skops or scikit-learn to skip it (an upgrade of
    either, or another thread, would break such a patch unnoticed); docs/upstream.md proposes the fixes upstream.
    """
    import skops.io

    return skops.io


def untrusted_types(types: list[str]) -> list[str]:
    """The names among skops' untrusted `types` that embedfit refuses: all but `fitting.registry.trusted_types()`
    and scikit-learn's own classes (a class defined in a module under `sklearn.`). Functions and third-party
    types stay refused."""
    def sklearn_class(name: str) -> bool:
        module, _, attr = name.rpartition(".")
        if not module.startswith("sklearn."):
            return False
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            return False
        return isinstance(obj, type) and obj.__module__.startswith("sklearn.")

    trusted = set(trusted_types())
    return sorted(t for t in set(types) if t not in trusted and not sklearn_class(t))


def check_fitted(pipeline: Any, *, class_names: Sequence[str], n_features: int, path: str | Path) -> None:
    """Check the fitted state that prediction indexes, so a tampered file is refused rather than crashing.

    Compiled code in scikit-learn (tree traversal, libsvm, KD/ball trees) indexes arrays without bounds checks:
    a tree node whose child index is 10**12 is a segfault, not an exception. This walks every estimator inside
    the pipeline and checks the indices and shapes those routines trust.

    Raises:
        ModelFileError: The classes differ from the run's class names, or some fitted state is out of range.
    """
    classes = np.asarray(getattr(pipeline, "classes_", []))
    # Runs predict class names (older runs: indices into model.json's class names).
    same = (np.array_equal(classes, np.arange(len(class_names))) if classes.dtype.kind in "iu"
            else classes.dtype.kind in "UO" and sorted(map(str, classes)) == sorted(class_names))
    if not same:
        raise ModelFileError(f"{path} predicts {len(classes)} classes ({', '.join(map(str, classes[:3]))}, ...) "
                             f"but its model.json lists {len(class_names)} other class names: the files come from "
                             "different runs; refit the run")
    if getattr(pipeline, "n_features_in_", n_features) != n_features:
        raise ModelFileError(f"{path} expects {pipeline.n_features_in_}-d features but its model.json records a "
                             f"{n_features}-d backbone: the files come from different runs; refit the run")
    problem = _fitted_problem(pipeline, set())
    if problem:
        raise ModelFileError(f"{path} is damaged or was tampered with ({problem}); refusing to use it")


def _fitted_problem(obj: Any, seen: set[int]) -> str:
    """The first out-of-range fitted state found in `obj` and the estimators inside it ("" when none)."""
    from sklearn.base import BaseEstimator
    from sklearn.tree._tree import Tree

    if id(obj) in seen:
        return ""
    seen.add(id(obj))
    if isinstance(obj, Tree):
        return _tree_problem(obj)
    if isinstance(obj, (list, tuple)):
        children: Any = obj
    elif isinstance(obj, dict):
        children = obj.values()
    elif isinstance(obj, BaseEstimator) or type(obj).__module__.startswith("sklearn."):
        problem = _estimator_problem(obj)
        if problem:
            return problem
        children = vars(obj).values() if hasattr(obj, "__dict__") else ()
    else:
        return ""
    return next((p for child in children if (p := _fitted_problem(child, seen))), "")


def _tree_problem(tree: Any) -> str:
    n = int(tree.node_count)
    left, right, feature = tree.children_left, tree.children_right, tree.feature
    internal = left != -1
    idx = np.arange(n)
    if not (np.array_equal(internal, right != -1) and (left[internal] > idx[internal]).all()
            and (right[internal] > idx[internal]).all() and (left[internal] < n).all()
            and (right[internal] < n).all()):
        return "a decision tree has child indices outside its nodes"
    if ((feature[internal] < 0) | (feature[internal] >= tree.n_features)).any():
        return f"a decision tree splits on features outside 0..{tree.n_features - 1}"
    if tree.value.shape[0] != n:
        return "a decision tree has fewer leaf values than nodes"
    return ""


def _estimator_problem(est: Any) -> str:
    """Shape checks for the fitted attributes compiled prediction code relies on."""
    name = type(est).__name__
    n_in = getattr(est, "n_features_in_", None)
    tree = getattr(est, "tree_", None)
    if tree is not None and n_in is not None and getattr(tree, "n_features", n_in) != n_in:
        return f"{name} has a tree over {tree.n_features} features but takes {n_in}"
    coef = getattr(est, "coef_", None)
    if isinstance(coef, np.ndarray) and n_in is not None and coef.ndim in (1, 2) and coef.shape[-1] != n_in:
        return f"{name} has coefficients for {coef.shape[-1]} features but takes {n_in}"
    if isinstance(coef, np.ndarray) and coef.ndim == 2 and hasattr(est, "classes_"):
        k = len(est.classes_)
        if coef.shape[0] not in ({1} if k == 2 else {k}):
            return f"{name} has coefficients for {coef.shape[0]} classes but {k} classes"
    sv = getattr(est, "support_vectors_", None)
    if isinstance(sv, np.ndarray) and sv.size:
        n_support = np.asarray(getattr(est, "_n_support", []))
        dual = np.asarray(getattr(est, "_dual_coef_", getattr(est, "dual_coef_", np.zeros((0, 0)))))
        if ((n_in is not None and sv.shape[1] != n_in) or n_support.sum() != sv.shape[0]
                or dual.shape[-1] != sv.shape[0] or (n_support < 0).any()):
            return f"{name} has support vectors that do not match their counts or coefficients"
    if hasattr(est, "get_arrays"):  # KDTree / BallTree
        data, order, nodes, _ = est.get_arrays()
        n = len(data)
        if not np.array_equal(np.sort(np.asarray(order)), np.arange(n)) or (
                len(nodes) and ((nodes["idx_start"] < 0).any() or (nodes["idx_end"] > n).any()
                                or (nodes["idx_start"] > nodes["idx_end"]).any())):
            return f"{name} indexes points outside its {n} points"
    y = getattr(est, "_y", None)
    if isinstance(y, np.ndarray) and hasattr(est, "classes_") and y.size and y.dtype.kind in "iu" and (
            y.min() < 0 or y.max() >= len(est.classes_)):
        return f"{name} has neighbour labels outside its {len(est.classes_)} classes"
    return ""
