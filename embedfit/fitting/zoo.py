"""embedfit's own classifiers, one record each (`registry.Classifier`): fitted in memory, or streamed out of core
(sgd-logreg, sgd-svm). The builders import scikit-learn when called, so registering them costs nothing."""

from __future__ import annotations

from typing import Any

from embedfit.fitting.registry import (
    CALIBRATION_TYPES,
    BuildContext,
    Classifier,
    StreamContext,
    Streaming,
    register_classifier,
)

LOGREG_CS = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]  # logreg's inner CV (numpy.logspace(-4, 1, 6))


_LOGREG_SOLVER = {"max_iter": 1000, "tol": 1e-3}  # shared by the NumPy and the array-API logreg


def _logreg(ctx: BuildContext) -> Any:
    """The linear probe: C chosen by an inner (3-fold) CV on log loss."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

    if ctx.search:  # the grid search tunes C
        return LogisticRegression(class_weight=ctx.class_weight, **_LOGREG_SOLVER)
    if ctx.inner_folds < 2:  # a class with one training image: no inner CV can hold it out
        ctx.notes.append("logreg: the smallest class has 1 image in a training set, too few for an inner CV; "
                         "C is fixed at 1.0")
        return LogisticRegression(C=1.0, class_weight=ctx.class_weight, **_LOGREG_SOLVER)
    if ctx.array_api:  # LogisticRegressionCV fails on tensors: the same Cs, folds and log loss by a grid search
        from sklearn.model_selection import GridSearchCV

        return GridSearchCV(LogisticRegression(class_weight=ctx.class_weight, **_LOGREG_SOLVER),
                            {"C": LOGREG_CS}, cv=ctx.inner_folds, scoring="neg_log_loss")
    return LogisticRegressionCV(Cs=LOGREG_CS, cv=ctx.inner_folds, scoring="neg_log_loss",
                                class_weight=ctx.class_weight, l1_ratios=(0.0,), use_legacy_attributes=False,
                                **_LOGREG_SOLVER)


def _svm(ctx: BuildContext) -> Any:
    # Calibrated on held-out folds instead of the deprecated SVC(probability=True). Two folds, fitted in parallel:
    # an ensemble of two SVCs on halves costs half of one SVC on everything (kernel SVMs scale ~n^2), 3x less than
    # three folds on 10k x 1280 for -1.3 points of accuracy (benchmarks/bench_fit.py).
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.svm import SVC

    svc = SVC(C=3.0, gamma="scale", class_weight=ctx.class_weight, cache_size=1000, tol=1e-3, random_state=ctx.seed)
    if ctx.inner_folds < 2:  # under a search, `make_pipeline` strips the grid's "estimator__" for the bare SVC
        ctx.notes.append("svm: the smallest class has 1 image in a training set, too few for an inner CV; fitted "
                         "without probabilities (needs 2 to calibrate them)")
        return svc
    return CalibratedClassifierCV(svc, cv=2, method="sigmoid", n_jobs=-1)


def _linear_svm(ctx: BuildContext) -> Any:
    # The dual solver is ~4x faster than the primal at small C. C shrinks as 1/n beyond 1000 images, which keeps
    # the per-image regularisation fixed (as SGD's alpha does): 10k x 1280 fits in ~3 s, not ~8.
    from sklearn.svm import LinearSVC

    return LinearSVC(C=0.01 * min(1.0, 1000 / max(ctx.n_samples, 1)), dual=True, tol=1e-2, max_iter=2000,
                     class_weight=ctx.class_weight, random_state=ctx.seed)


def _knn(ctx: BuildContext) -> Any:
    from sklearn.neighbors import KNeighborsClassifier

    return KNeighborsClassifier(n_neighbors=max(1, min(10, ctx.n_samples // 10, ctx.n_train)), weights="distance")


def _ridge(ctx: BuildContext) -> Any:
    from sklearn.linear_model import RidgeClassifier, RidgeClassifierCV

    if ctx.search:  # the grid search tunes alpha
        return RidgeClassifier(class_weight=ctx.class_weight)
    return RidgeClassifierCV(alphas=[0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0], class_weight=ctx.class_weight)


def _lda(ctx: BuildContext) -> Any:
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    return LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")


def _rf(ctx: BuildContext) -> Any:
    # Quarter-size bootstrap samples on large sets: ~6x faster than full-size ones on 10k x 1280, -2 points of
    # accuracy; small sets keep full-size ones (speed is no issue there, every image counts).
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=200, max_samples=0.25 if ctx.n_samples >= 4000 else None, n_jobs=-1,
                                  class_weight=ctx.class_weight, random_state=ctx.seed)


def _mlp(ctx: BuildContext) -> Any:
    # Stop after 5 epochs without validation gain (not 10): 30% less time on 10k x 1280, same accuracy.
    from sklearn.neural_network import MLPClassifier

    return MLPClassifier(hidden_layer_sizes=(256,), alpha=1e-3, early_stopping=ctx.n_samples >= 100, max_iter=300,
                         n_iter_no_change=5, random_state=ctx.seed)


def _sgd(loss: str) -> Any:
    def build(ctx: StreamContext) -> Any:
        # A constant step of 2 / n_features: after standardisation a row's squared norm is about n_features, so
        # each update moves a margin by at most about 2 (times its class weight), whatever the dimension.
        # (scikit-learn's "optimal" schedule assumes rows of norm ~1; on 1280-d features its first steps are ~1000x
        # too large and drive margins and intercepts into the thousands.) Averaging starts after the first pass,
        # so the average leaves out the iterates still close to zero.
        from sklearn.linear_model import SGDClassifier

        return SGDClassifier(loss=loss, alpha=ctx.alpha, class_weight=ctx.class_weight, learning_rate="constant",
                             eta0=2.0 / ctx.n_features,
                             average=max(1, ctx.n_samples if ctx.epochs > 1 else ctx.n_samples // 2),
                             random_state=ctx.seed)

    return build


# Array API, checked with scikit-learn 1.9: logreg (as a grid search) and ridge run on tensors; LogisticRegressionCV,
# LDA(lsqr), SVC, LinearSVC, RF and MLP fail on them, and kNN converts them back to NumPy.
for _record in (
    Classifier("logreg", _logreg, {"C": [0.001, 0.01, 0.1, 1.0, 10.0]}, array_api=True),
    Classifier("svm", _svm, {"estimator__C": [0.3, 1.0, 3.0, 10.0, 30.0], "estimator__gamma": ["scale", 0.3, 3.0]},
               pca_first=True, types=CALIBRATION_TYPES),
    Classifier("linear-svm", _linear_svm, {"C": [0.0001, 0.001, 0.01, 0.1, 1.0]}),
    Classifier("knn", _knn, {"n_neighbors": [3, 5, 10, 20], "weights": ["uniform", "distance"]}, pca_first=True,
               types=("sklearn.metrics._dist_metrics.EuclideanDistance64", "sklearn.neighbors._kd_tree.KDTree",
                      "sklearn.neighbors._ball_tree.BallTree")),
    Classifier("ridge", _ridge, {"alpha": [0.1, 1.0, 10.0, 100.0, 1000.0]}, array_api=True, labels_on_host=True),
    Classifier("lda", _lda, {"shrinkage": ["auto", 0.01, 0.1, 0.5]}),
    Classifier("rf", _rf, {"max_features": ["sqrt", 0.1], "min_samples_leaf": [1, 3]},
               types=("sklearn.tree._tree.Tree",)),
    Classifier("mlp", _mlp, {"alpha": [1e-4, 1e-3, 1e-2], "hidden_layer_sizes": [(256,), (512,)]},
               types=("sklearn.neural_network._stochastic_optimizers.AdamOptimizer",)),
    # Out of core (`fit_out_of_core`). SGD's own one-vs-rest probabilities saturate to 0/1 on large stores (uniform
    # rows, argmax(proba) != predict): sgd-logreg's are calibrated instead (docs/scaling.md).
    Classifier("sgd-logreg", stream=Streaming(_sgd("log_loss"), calibrate=True)),
    Classifier("sgd-svm", stream=Streaming(_sgd("hinge"))),
):
    register_classifier(_record)
