"""The reference for `embedfit fit` on small data: what a user would write by hand with scikit-learn.

Load a store with h5py, StandardScaler + LogisticRegressionCV (the same Cs, inner 3-fold CV on log loss, balanced
class weights and solver settings as embedfit's default logreg) in a stratified 5-fold CV, then refit on all
images. bench_startup.py times it beside `embedfit fit STORE`.
"""

from __future__ import annotations

import sys

import h5py
import numpy as np
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def main(path: str) -> None:
    with h5py.File(path, "r") as f:
        ok = (f["status"][:] == 0) & (f["labels"][:] >= 0)
        X, y = f["features"][:][ok], f["labels"][:][ok]
    pipe = make_pipeline(StandardScaler(), LogisticRegressionCV(
        Cs=np.logspace(-4, 1, 6), cv=3, scoring="neg_log_loss", class_weight="balanced", max_iter=1000, tol=1e-3,
        l1_ratios=(0.0,), use_legacy_attributes=False))
    scores = cross_val_score(pipe, X, y, cv=StratifiedKFold(5, shuffle=True, random_state=0), scoring="accuracy")
    pipe.fit(X, y)
    print(f"accuracy {scores.mean():.3f} ± {scores.std():.3f}")


if __name__ == "__main__":
    main(sys.argv[1])
