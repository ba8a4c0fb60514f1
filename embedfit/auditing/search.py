"""Nearest neighbours of every stored embedding by cosine similarity, streamed from the store in blocks.

Two engines, chosen by size:

- exact: a brute-force inner product over L2-normalised rows, one block of queries at a time (faiss' `IndexFlatIP`
  when faiss is installed, NumPy otherwise). Up to `EXACT_MAX_ROWS` it is faster than building an index; without
  faiss it is used at every size (correct, but quadratic).
- approximate: faiss (the `[audit]` extra). The rows are projected onto their first `ANN_DIMS` principal components
  (PCA fitted on a sample), indexed by an inverted file (`IVF`, k-means cells, `ANN_PROBES` cells searched per
  query) by Euclidean distance in that space, and every candidate is re-scored with the exact cosine on the full,
  stored vectors. A near-duplicate is almost the same vector, so it lands in its twin's cell or one next to it: a
  few probes find it (recall measured in `benchmarks/bench_audit.py`), and the re-scoring keeps the PCA's
  approximation out of the similarities reported.

Why faiss: it is the reference library for this (Meta, BSD-licensed, wheels for every platform as `faiss-cpu`), its
IVF index streams (add in blocks, search in blocks), and its brute-force kernel is BLAS-bound, so the same
library serves both engines. hnswlib builds a graph whose construction on 1M x 1280 takes longer than the whole
IVF pipeline on 2 cores, and annoy needs the full vectors in its trees (memory).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from embedfit.errors import UsageError

log = logging.getLogger("embedfit")

# Brute force up to this many rows: single-threaded, 5,000 x 1280 took 3.3 s exact vs 4.9 s through the index,
# 15,000 took 24.2 s vs 10.2 s (benchmarks/README.md, "Audit at scale"); exact grows with n^2, the index ~n^1.5.
EXACT_MAX_ROWS = 7_500
ANN_DIMS = 128  # PCA components the approximate index works in
# IVF cells searched per query: a near-duplicate is almost its twin's vector, so it lies in the same cell or next to
# it; 4 probes found every planted pair of 1,000 among 1M rows, and cost a quarter of 16 (benchmarks/README.md).
ANN_PROBES = 4
ANN_TRAIN_ROWS = 65_536  # sample the PCA and the k-means are fitted on
BLOCK_ROWS = 16_384  # rows read from the store and searched at a time


def normalize(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, as float32 (zero rows stay zero)."""
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return np.divide(X, norms, out=np.zeros_like(X), where=norms > 0)


def _faiss() -> Any | None:
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def read_normalized(store: Any, rows: np.ndarray, block: int = BLOCK_ROWS) -> np.ndarray:
    """The rows' features, L2-normalised, as float16 (half the memory; the similarities are computed in float32),
    read from the store one block at a time."""
    out = np.empty((len(rows), store.dim), dtype=np.float16)
    for i in range(0, len(rows), block):
        out[i:i + block] = normalize(store.features(rows[i:i + block]))
    return out


def _blocks(n: int, block: int) -> Iterator[slice]:
    for i in range(0, n, block):
        yield slice(i, min(n, i + block))


def knn(base: np.ndarray, k: int, queries: np.ndarray | None = None, *, exact: bool | None = None,
        block: int = BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """The `k` nearest rows of `base` to each query (default: to each row of `base`, itself left out).

    Args:
        base: L2-normalised rows (float16 or float32), e.g. from `read_normalized`.
        k: Neighbours per query.
        queries: L2-normalised rows to search for; None searches `base` against itself.
        exact: Brute force (True), the approximate index (False), or by size (None: `EXACT_MAX_ROWS`).
        block: Queries per step (bounds the memory of the similarity block).

    Returns:
        (similarities, indices), each (n_queries, k), best first; an index of -1 (similarity -inf) where fewer
        than `k` rows exist.

    Raises:
        UsageError: The approximate engine is needed but faiss is not installed.
    """
    self_search = queries is None
    queries = base if queries is None else queries
    n = len(base)
    k_eff = min(k + (1 if self_search else 0), n)
    if exact is None:
        exact = n <= EXACT_MAX_ROWS or _faiss() is None
        if n > EXACT_MAX_ROWS and exact:
            log.warning("note: searching %d embeddings by brute force; `pip install 'embedfit[audit]'` (faiss) "
                        "makes it much faster", n)
    sims = np.full((len(queries), k), -np.inf, dtype=np.float32)
    idx = np.full((len(queries), k), -1, dtype=np.int64)
    if n == 0 or k_eff == 0 or not len(queries):
        return sims, idx
    search = _exact_search(base) if exact else _ann_search(base)
    for sl in _blocks(len(queries), block):
        s, i = search(np.asarray(queries[sl], dtype=np.float32), k_eff)
        if self_search:  # drop each row itself (not always first: an exact twin ties with it)
            own = i == np.arange(sl.start, sl.stop)[:, None]
            missing = ~own.any(axis=1)
            own[missing, -1] = True  # the row was not among its own neighbours: drop the last instead
            s, i = s[~own].reshape(len(s), -1), i[~own].reshape(len(i), -1)
        m = min(k, s.shape[1])
        sims[sl, :m], idx[sl, :m] = s[:, :m], i[:, :m]
    return sims, idx


def _exact_search(base: np.ndarray) -> Any:
    faiss = _faiss()
    if faiss is not None:
        index = faiss.IndexFlatIP(base.shape[1])
        for sl in _blocks(len(base), BLOCK_ROWS):
            index.add(np.ascontiguousarray(base[sl], dtype=np.float32))
        return lambda q, k: index.search(q, k)

    def numpy_search(q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        step = max(1, (1 << 26) // len(base))  # a similarity block of at most 256 MB
        if len(q) > step:
            parts = [numpy_search(q[i:i + step], k) for i in range(0, len(q), step)]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        s = np.empty((len(q), len(base)), dtype=np.float32)
        for sl in _blocks(len(base), BLOCK_ROWS):
            s[:, sl] = q @ np.asarray(base[sl], dtype=np.float32).T
        top = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < len(base) else np.tile(np.arange(len(base)),
                                                                                       (len(q), 1))
        ts = np.take_along_axis(s, top, axis=1)
        order = np.argsort(-ts, axis=1, kind="stable")
        return np.take_along_axis(ts, order, axis=1), np.take_along_axis(top, order, axis=1)

    return numpy_search


def _ann_search(base: np.ndarray) -> Any:
    faiss = _faiss()
    if faiss is None:
        raise UsageError("the approximate search needs faiss: pip install 'embedfit[audit]', or search exactly "
                         "(`exact`)")
    n, dim = base.shape
    rng = np.random.default_rng(0)
    sample = np.asarray(base[np.sort(rng.choice(n, min(n, ANN_TRAIN_ROWS), replace=False))], dtype=np.float32)
    dims = min(ANN_DIMS, dim)
    pca = faiss.PCAMatrix(dim, dims)
    pca.train(sample)
    reduced_sample = pca.apply(sample)
    nlist = max(1, min(4096, int(4 * math.sqrt(n)), len(sample) // 39))  # faiss wants >= 39 points per cell
    quantizer = faiss.IndexFlatL2(dims)
    # Candidates by Euclidean distance in the PCA space, where a twin is nearest. The PCA centres the rows, so an
    # inner product there no longer ranks by closeness: with it the 1M-row benchmark found 92.7% of the planted
    # pairs, with Euclidean distance all of them.
    index = faiss.IndexIVFFlat(quantizer, dims, nlist, faiss.METRIC_L2)
    index.train(reduced_sample)
    for sl in _blocks(n, BLOCK_ROWS):
        index.add(pca.apply(np.ascontiguousarray(base[sl], dtype=np.float32)))
    index.nprobe = min(ANN_PROBES, nlist)

    def search(q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        _, cand = index.search(pca.apply(q), k)
        # Re-score on the full vectors: the reported similarity is the exact cosine, not the PCA's. In chunks:
        # the candidates' full vectors are k times the queries' memory.
        s = np.empty(cand.shape, dtype=np.float32)
        for sl in _blocks(len(q), 2048):
            safe = np.where(cand[sl] >= 0, cand[sl], 0)
            full = np.asarray(base[safe.ravel()], dtype=np.float32).reshape(len(safe), k, dim)
            s[sl] = np.einsum("qd,qkd->qk", q[sl], full)
        s[cand < 0] = -np.inf
        order = np.argsort(-s, axis=1, kind="stable")
        return np.take_along_axis(s, order, axis=1), np.take_along_axis(cand, order, axis=1)

    return search
