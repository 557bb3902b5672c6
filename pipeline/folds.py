"""Cross-validation folds and the kernels that serve every fold in one read of a chunk (pure NumPy + LAPACK).

**Folds** are a seeded hash of the dataset row index (``splitmix64(row + seed·φ) mod K``): a row's fold depends
on nothing but its index, K and the seed, so the folds are the same on 1, 2 or 64 workers, in-process, after a
worker dies and after a resume, and any tool can rebuild them (:func:`fold_ids`). A row index is the row's
position in the dataset store (after the rows ingest dropped). Fold sizes are multinomial: within a few
√(n/K) of n/K.

**Kernels** (the tuning passes, ``docs/design.md §3``) take the leaf's first row so they can compute its folds:

- :func:`chunk_fold_qr`: the R factor of ``[1 | X_std | y]`` of each fold's rows, (K, d+2, d+2), combined up
  the tree fold by fold (:func:`fold_qr_combine`): least squares on any union of folds is one small QR of their
  R factors on the driver, so the whole regularization path of every fold costs this one pass.
- :func:`chunk_fold_newton`: for M models at once (θ_m fitted on the rows outside fold f_m), each model's
  training loss, gradient (and weighted Gram Σ ℓ''·a aᵀ) and its held-out loss on fold f_m. The
  linear predictors of a fold's models are one product ``C·Θᵀ``; their Grams are one product ``(ℓ''⊙w)ᵀ·(C⊙C)``
  of the block's pairwise column products, shared by every model, instead of one ``syrk`` per model.
"""

from __future__ import annotations

import numpy as np

from pipeline.families import Family, get_family
from pipeline.losses import _blocks, _check_X, chunk_qr, qr_combine
from pipeline.problem import check_scaling

_GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1
PAIR_BLOCK_BYTES = 2**22  # the block's pairwise column products (rows × p(p+1)/2) take about this much
MAX_PAIRS = 20_000  # above ~200 features the pair products do not pay: one syrk per model instead


def fold_ids(start: int, n: int, n_folds: int, seed: int = 0) -> np.ndarray:
    """The fold (0 … K−1) of dataset rows ``start … start+n−1``: splitmix64 of the row index, mod K."""
    if n_folds < 2:
        raise ValueError(f"need at least 2 folds, got {n_folds}")
    z = np.arange(start, start + n, dtype=np.uint64) + np.uint64(((seed + 1) * _GOLDEN) & _MASK)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z % np.uint64(n_folds)).astype(np.intp)


def chunk_fold_qr(X, y, w, offset, start: int, n_folds: int, seed: int, mean, scale) -> np.ndarray:
    """(K, d+2, d+2): the TSQR factor of ``[1 | X_std | y]`` of each fold's rows in this leaf."""
    folds = fold_ids(start, len(y), n_folds, seed)
    out = []
    for k in range(n_folds):
        rows = np.flatnonzero(folds == k)
        Xk, yk = np.asarray(X)[rows], np.asarray(y)[rows]
        wk = None if w is None else w[rows]
        ok = None if offset is None else offset[rows]
        out.append(chunk_qr(Xk, yk, mean, scale, w=wk, offset=ok))
    return np.stack(out)


chunk_fold_qr.with_start = True  # the engines pass the leaf's first dataset row


def fold_qr_combine(parts: list[np.ndarray]) -> np.ndarray:
    """TSQR's combine, fold by fold."""
    return np.stack([qr_combine([p[k] for p in parts]) for k in range(parts[0].shape[0])])


def fold_layout(n_params: int, gram: bool) -> dict[str, slice]:
    """Where :func:`chunk_fold_newton` puts what in each model's row."""
    p = n_params
    at = {"grad": slice(0, p), "loss": slice(p, p + 1), "n": slice(p + 1, p + 2),
          "ho_grad": slice(p + 2, 2 * p + 2), "ho_loss": slice(2 * p + 2, 2 * p + 3),
          "ho_n": slice(2 * p + 3, 2 * p + 4)}
    if gram:
        at["gram"] = slice(2 * p + 4, 2 * p + 4 + p * p)
    return at


def chunk_fold_newton(X, y, w, offset, start: int, family: str | Family, n_folds: int, seed: int,
                      thetas: np.ndarray, model_fold: np.ndarray, mean, scale, gram: bool = True,
                      held_grad: bool = False) -> np.ndarray:
    """(M, width) sums for M models (see :func:`fold_layout`): model m's loss, gradient (and weighted Gram) on
    this leaf's rows outside fold ``model_fold[m]``, and its loss on the rows inside it (and their gradient
    when ``held_grad``: the start pass, whose full-data gradient sets α_max).

    θ are in the standardized space, as everywhere; the arithmetic is that of ``chunk_newton`` (centred block
    C = [X − mean, 1], 1/scale applied once at the end). Each block's rows are ordered by fold, so a model's
    training rows are the two contiguous pieces around its held-out fold: views, no masks."""
    if offset is not None:
        raise ValueError("tuning does not support an offset column")
    fam = get_family(family)
    X, y = _check_X(X, y)
    n, d = X.shape
    p = d + 1
    m_, s = check_scaling(d, mean, scale)
    thetas = np.asarray(thetas, dtype=np.float64).reshape(-1, p)
    M = len(thetas)
    model_fold = np.asarray(model_fold)
    groups = [(k, np.flatnonzero(model_fold == k)) for k in range(n_folds)]
    groups = [(k, g) for k, g in groups if len(g)]
    folds = fold_ids(start, n, n_folds, seed)
    theta_c = np.concatenate([thetas[:, :d] / s, thetas[:, d:]], axis=1)  # (M, p) in centred coordinates
    iu = np.triu_indices(p)  # the pairs (i, j ≥ i), row by row
    pairs = len(iu[0])
    offs = np.concatenate([[0], np.cumsum(np.arange(p, 0, -1))])
    by_pairs = gram and pairs <= MAX_PAIRS
    block_rows = max(64, PAIR_BLOCK_BYTES // (8 * max(pairs if by_pairs else p, M)))
    grad, ho_grad = np.zeros((M, p)), np.zeros((M, p))
    loss, n_tr, ho_loss, ho_n = np.zeros(M), np.zeros(M), np.zeros(M), np.zeros(M)
    G = np.zeros((M, pairs)) if by_pairs else np.zeros((M, p, p)) if gram else None
    C = np.empty((min(block_rows, max(n, 1)), p))
    P = np.empty((len(C), pairs)) if by_pairs else None
    for a, b in _blocks(n, block_rows):
        order = np.argsort(folds[a:b], kind="stable")
        edges = np.searchsorted(folds[a:b][order], np.arange(n_folds + 1))
        Cb = C[: b - a]
        np.subtract(X[a:b][order], m_, out=Cb[:, :d])
        Cb[:, d] = 1.0
        yb = np.asarray(y[a:b], dtype=np.float64)[order][:, None]
        wb = None if w is None else np.asarray(w[a:b], dtype=np.float64)[order][:, None]
        if by_pairs:
            Pb = P[: b - a]
            for i in range(p):  # column i times columns i…p−1: contiguous products, no gather
                np.multiply(Cb[:, i, None], Cb[:, i:], out=Pb[:, offs[i]:offs[i + 1]])
        for k, g in groups:
            lo, hi = int(edges[k]), int(edges[k + 1])
            Z = Cb @ theta_c[g].T  # (rows, models of fold k)
            for piece in (slice(0, lo), slice(hi, b - a)):  # the training rows
                if piece.stop <= piece.start:
                    continue
                with np.errstate(under="ignore"):
                    ell, r, h = fam.derivatives(Z[piece], yb[piece])
                if wb is not None:
                    ell *= wb[piece]
                    r *= wb[piece]
                    h *= wb[piece]
                    n_tr[g] += float(wb[piece].sum())
                else:
                    n_tr[g] += piece.stop - piece.start
                loss[g] += ell.sum(axis=0)
                grad[g] += r.T @ Cb[piece]
                if by_pairs:
                    G[g] += h.T @ Pb[piece]
                elif gram:
                    for col, j in enumerate(g):
                        Sc = Cb[piece] * np.sqrt(h[:, col])[:, None]
                        G[j] += Sc.T @ Sc
            if hi > lo:  # the held-out rows
                held = slice(lo, hi)
                with np.errstate(under="ignore"):
                    ell = fam.loss(Z[held], yb[held])
                    r = fam.d1(Z[held], yb[held]) if held_grad else None
                if wb is not None:
                    ell *= wb[held]
                    r = None if r is None else r * wb[held]
                    ho_n[g] += float(wb[held].sum())
                else:
                    ho_n[g] += hi - lo
                ho_loss[g] += ell.sum(axis=0)
                if r is not None:
                    ho_grad[g] += r.T @ Cb[held]
    unscale = np.append(1.0 / s, 1.0)
    cols = [grad * unscale, loss[:, None], n_tr[:, None], ho_grad * unscale, ho_loss[:, None], ho_n[:, None]]
    if gram:
        if by_pairs:
            full = np.zeros((M, p, p))
            full[:, iu[0], iu[1]] = G
            full[:, iu[1], iu[0]] = G
        else:
            full = G
        full *= np.outer(unscale, unscale)
        cols.append(full.reshape(M, p * p))
    return np.concatenate(cols, axis=1)


chunk_fold_newton.with_start = True
