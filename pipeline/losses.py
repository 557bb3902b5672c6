"""Per-chunk kernels, one per kind of pass (pure NumPy + LAPACK, no Dask).

Every kernel works on ONE in-memory chunk and returns what a fixed reduction tree combines: plain SUMS
(merged by addition; the driver divides by the global row count once), or an R factor (merged by QR of
stacked factors, :func:`qr_combine`). The kinds of pass:

- :func:`chunk_sums`: value + gradient (first-order solvers, line searches, L-BFGS);
- :func:`chunk_newton`: value + gradient + the weighted Gram Σ ℓ''·a aᵀ (Newton/IRLS), by ``syrk``;
- :func:`chunk_qr`: the R factor of the augmented block ``[1 | X_std | y]`` (TSQR: exact least squares);
- :func:`chunk_gram`: the plain Gram of ``[X_std, 1]`` (the curvature bound of ``--lr auto``);
- :func:`chunk_metrics`, :func:`chunk_predict`, :func:`chunk_invalid_y`.

Parameters ``theta`` (length d+1) live in the *standardized* space: ``theta[:d]`` are weights for
``(x - mean) / scale`` and ``theta[d]`` is the intercept. Standardization happens inside the kernels, one
cache-sized row block at a time, so X is never copied scaled and is read from memory once per pass.
Results are deterministic functions of the inputs and the block size for a given BLAS and one BLAS thread
(OpenBLAS splits sums differently with more threads: Dask's nanny sets one per worker).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scipy.linalg import blas, lapack

from pipeline.families import Family, expit, get_family
from pipeline.problem import check_scaling

__all__ = ["chunk_sums", "chunk_newton", "chunk_qr", "qr_combine", "chunk_gram", "chunk_predict",
           "chunk_metrics", "chunk_invalid_y", "newton_layout", "linear_predictor", "expit"]

DEFAULT_BLOCK_ROWS = 8192  # chunk_predict / chunk_metrics
SUMS_BLOCK_BYTES = 2**21  # chunk_sums / chunk_gram / chunk_newton: X per block (see _sums_block_rows)
MIN_BLOCK_ROWS = 128
QR_BLOCK_ROWS = 1024  # rows per tpqrt call: in cache, measured fastest (1024–2048) with LAPACK block 4
QR_NB = 4


def _check_theta(theta: np.ndarray, d: int) -> np.ndarray:
    theta = np.asarray(theta, dtype=np.float64)
    if theta.shape != (d + 1,):
        raise ValueError(f"theta must have shape ({d + 1},), got {theta.shape}")
    return theta


def _effective(theta: np.ndarray, mean, scale) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """Fold standardization into (w_eff, b_eff) so z = X @ w_eff + b_eff on raw X."""
    m, s = check_scaling(theta.shape[0] - 1, mean, scale)
    w_eff = theta[:-1] / s
    return w_eff, float(theta[-1] - m @ w_eff), m, s


def _check_X(X: np.ndarray, y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D, got shape {X.shape}")
    if y is not None:
        y = np.asarray(y)
        if y.shape != (X.shape[0],):
            raise ValueError(f"y must have shape ({X.shape[0]},), got {y.shape}")
    return X, y


def _block_rows(block_rows: int | None, n_features: int) -> int:
    """Rows per block: about ``SUMS_BLOCK_BYTES`` of float64 X unless given."""
    if block_rows is None:
        return max(MIN_BLOCK_ROWS, SUMS_BLOCK_BYTES // (8 * max(n_features, 1)))
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    return block_rows


def _blocks(n: int, block_rows: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, block_rows):
        yield start, min(start + block_rows, n)


def chunk_sums(family: str | Family, X: np.ndarray, y: np.ndarray, theta: np.ndarray, mean=None, scale=None,
               block_rows: int | None = None, *, w: np.ndarray | None = None,
               offset: np.ndarray | None = None) -> np.ndarray:
    """Summed gradient and loss of one chunk: ``[grad_sum_w (d), grad_sum_b, loss_sum, Σw]`` (Σw: the row
    count when there are no weights).

    The gradient is w.r.t. the standardized θ: ``grad_w = (X^T r - mean * sum(r)) / scale``,
    ``grad_b = sum(r)``. X is read from memory once: per row block, ``z = X_b @ w`` (BLAS), the family's
    fused residual r = ℓ'(z) and loss in preallocated buffers, then ``X_b^T r`` while the block is in cache.
    With sample weights r and ℓ are weighted per row (r = wᵢℓ'ᵢ); an offset is added to z. Without them the
    arithmetic is exactly the unweighted one (same bits as a dataset that never had them).
    """
    fam = get_family(family)
    X, y = _check_X(X, y)
    n, d = X.shape
    theta = _check_theta(theta, d)
    w_eff, b_eff, m, s = _effective(theta, mean, scale)
    block_rows = _block_rows(block_rows, d)
    rows = min(block_rows, n)
    zbuf = np.empty(rows)
    extra = tuple(np.empty(rows, dtype=t) for t in fam.buffers)
    xbuf = None if X.dtype == np.float64 else np.empty((rows, d))
    ybuf = None if y.dtype == np.float64 else np.empty(rows)
    xtr, part, acc = np.zeros(d), np.empty(d), np.zeros(2)  # acc: [Σ r, Σ loss]
    with np.errstate(under="ignore"):  # tiny sigmoid tails flushing to 0 is harmless
        for start, stop in _blocks(n, block_rows):
            k = stop - start
            Xb, yb = X[start:stop], y[start:stop]
            if xbuf is not None:
                Xb = xbuf[:k]
                np.copyto(Xb, X[start:stop], casting="unsafe")
            if ybuf is not None:
                yb = ybuf[:k]
                np.copyto(yb, y[start:stop], casting="unsafe")
            z = zbuf[:k]
            np.dot(Xb, w_eff, out=z)
            if offset is not None:
                z += offset[start:stop]
            if w is None:
                r = fam.residual(z, yb, b_eff, acc, *(e[:k] for e in extra))
            else:
                z += b_eff
                wb = w[start:stop]
                acc[1] += wb @ fam.loss(z, yb)
                r = fam.d1(z, yb)
                r *= wb
                acc[0] += r.sum()
            np.dot(r, Xb, out=part)  # X_b^T r: the same block, still in cache
            xtr += part
    sum_r = float(acc[0])
    out = np.empty(d + 3)
    out[:d] = (xtr - m * sum_r) / s
    out[d] = sum_r
    out[d + 1] = acc[1]
    out[d + 2] = n if w is None else float(np.sum(w))
    return out


def newton_layout(n_params: int, n_y_terms: int = 0) -> dict[str, slice]:
    """Where :func:`chunk_newton` puts what in its flat result: the gradient, loss, Σw, Σwy, the rows with
    w > 0, Σ w·pearson (the family's Pearson χ² terms, for an estimated dispersion), the sums of the family's
    y-only terms (null deviance, AIC) and the weighted Gram."""
    p, k = n_params, n_y_terms
    return {"grad": slice(0, p), "loss": slice(p, p + 1), "n": slice(p + 1, p + 2), "sum_y": slice(p + 2, p + 3),
            "rows": slice(p + 3, p + 4), "pearson": slice(p + 4, p + 5), "y_terms": slice(p + 5, p + 5 + k),
            "gram": slice(p + 5 + k, p + 5 + k + p * p)}


def chunk_newton(family: str | Family, X: np.ndarray, y: np.ndarray, theta: np.ndarray, mean=None, scale=None,
                 block_rows: int | None = None, *, w: np.ndarray | None = None,
                 offset: np.ndarray | None = None, fisher: bool = False) -> np.ndarray:
    """Value, gradient and weighted Gram of one chunk, flat (see :func:`newton_layout`).

    Per row block, in one cache-sized buffer: the centred block ``C = [X - mean, 1]``, ``z = C·[w/scale, b]``
    (+ offset), ℓ, ℓ', ℓ'' from the family at once (times the sample weights), ``Cᵀℓ'``, then C scaled in
    place by √ℓ'' and ``Σ ℓ''·c cᵀ`` by BLAS ``syrk`` (half the flops of a general product). The 1/scale of
    the standardization is applied once to the (d+1)-vector and the (d+1)² matrix at the end, not to every row.
    ``fisher``: the Gram of the expected information (``Family.fisher``) instead of ℓ'' (standard errors).
    """
    fam = get_family(family)
    X, y = _check_X(X, y)
    n, d = X.shape
    p = d + 1
    theta = _check_theta(theta, d)
    m, s = check_scaling(d, mean, scale)
    block_rows = _block_rows(block_rows, p)
    rows = min(block_rows, n)
    C = np.empty((rows, p))
    G = np.zeros((p, p), order="F")
    theta_c = np.append(theta[:d] / s, theta[d])
    grad, loss_sum, sum_y, pearson = np.zeros(p), 0.0, 0.0, 0.0
    y_terms = np.zeros(fam.n_y_terms)
    for start, stop in _blocks(n, block_rows):
        Cb = C[: stop - start]  # scaled in place below: every column is refilled
        np.subtract(X[start:stop], m, out=Cb[:, :d])  # also upcasts a float32 chunk
        Cb[:, d] = 1.0
        yb = np.asarray(y[start:stop], dtype=np.float64)
        z = Cb @ theta_c
        if offset is not None:
            z += offset[start:stop]
        loss, r, h = fam.derivatives(z, yb)
        if fisher:
            h = fam.fisher(z, yb)
        if w is None:
            loss_sum += float(loss.sum())
            sum_y += float(yb.sum())
            if fam.uses_pearson:
                pearson += float(fam.pearson(z, yb).sum())
            if fam.n_y_terms:
                y_terms += fam.y_terms(yb, None if offset is None else offset[start:stop]).sum(axis=1)
        else:
            wb = w[start:stop]
            loss_sum += float(wb @ loss)
            sum_y += float(wb @ yb)
            if fam.uses_pearson:
                pearson += float(wb @ fam.pearson(z, yb))
            if fam.n_y_terms:
                y_terms += fam.y_terms(yb, None if offset is None else offset[start:stop]) @ wb
            r *= wb
            h *= wb
        grad += r @ Cb
        np.sqrt(h, out=h)
        Cb *= h[:, None]
        # C-ordered (k, p) is Fortran (p, k): syrk of it, trans=0, is Cbᵀ Cb without a copy
        G = blas.dsyrk(1.0, Cb.T, beta=1.0, c=G, trans=0, lower=0, overwrite_c=1)
    unscale = np.append(1.0 / s, 1.0)
    G = np.triu(G) + np.triu(G, 1).T
    G *= np.outer(unscale, unscale)
    n_w, rows = (n, n) if w is None else (float(np.sum(w)), np.count_nonzero(w))
    return np.concatenate([grad * unscale, [loss_sum, n_w, sum_y, rows, pearson], y_terms, G.ravel()])


def chunk_qr(X: np.ndarray, y: np.ndarray, mean=None, scale=None, block_rows: int = QR_BLOCK_ROWS, *,
             w: np.ndarray | None = None, offset: np.ndarray | None = None) -> np.ndarray:
    """The (d+2)×(d+2) upper-triangular R of ``[1 | (X - mean)/scale | y]`` for one chunk.

    Weighted least squares is least squares on rows scaled by √wᵢ (ones column and target included); an
    offset is subtracted from the target (z = Xθ + offset fits y ⇔ Xθ fits y − offset).

    Householder QR, block by block: each cache-sized block B is folded into the running R by LAPACK's
    triangular-pentagonal QR (``tpqrt``: the QR of ``[R; B]`` that keeps R's triangle), so the chunk is read
    once and Q is never formed. RᵀR equals AᵀA, but R is computed without squaring the condition number:
    least squares from R keeps lstsq's accuracy, where the normal equations lose half the digits.

    The block is centred (which matters: |mean| ≫ scale would cost digits) but not scaled: Householder QR is
    column-scaling invariant, so R's columns are divided by the scales once at the end. B is filled
    transposed, into a C-ordered (q, rows) buffer that is the column-major block LAPACK reads.
    """
    X, y = _check_X(X, y)
    n, d = X.shape
    m, s = check_scaling(d, mean, scale)
    q = d + 2
    R = np.zeros((q, q), order="F")
    BT = np.empty((q, min(block_rows, max(n, 1))))
    for start, stop in _blocks(n, block_rows):
        k = stop - start
        Bt = BT[:, :k] if k == BT.shape[1] else np.empty((q, k))  # tpqrt overwrites it: every row is refilled
        Bt[0] = 1.0
        Bt[1:d + 1] = X[start:stop].T
        Bt[1:d + 1] -= m[:, None]
        Bt[d + 1] = y[start:stop]
        if offset is not None:
            Bt[d + 1] -= offset[start:stop]
        if w is not None:
            Bt *= np.sqrt(w[start:stop])
        R, _, _, info = lapack.dtpqrt(0, min(QR_NB, q), R, Bt.T, overwrite_a=1, overwrite_b=1)
        if info != 0:
            raise RuntimeError(f"LAPACK dtpqrt failed (info={info})")
    R = np.triu(R)
    R[:, 1:d + 1] /= s
    return R


def qr_combine(parts: list[np.ndarray]) -> np.ndarray:
    """TSQR's combine: the R factor of the stacked R factors (deterministic for a fixed order of parts)."""
    R = np.array(parts[0], dtype=np.float64, order="F", copy=True)
    for other in parts[1:]:
        R, _, _, info = lapack.dtpqrt(0, min(QR_NB, R.shape[0]), R, np.array(other, order="F", copy=True),
                                      overwrite_a=1, overwrite_b=1)
        if info != 0:
            raise RuntimeError(f"LAPACK dtpqrt failed (info={info})")
    return np.triu(R)


def chunk_gram(X: np.ndarray, mean=None, scale=None, block_rows: int | None = None, *,
               w: np.ndarray | None = None) -> np.ndarray:
    """``sum_i w_i a_i a_i^T`` with ``a = [(x - mean)/scale, 1]``: bounds the curvature for ``--lr auto``.

    Each block is centred on its own (not via ``X^T X - n mean mean^T``) to avoid catastrophic
    cancellation when |mean| >> scale; the scaling is applied once at the end.
    """
    X, _ = _check_X(X)
    n, d = X.shape
    m, s = check_scaling(d, mean, scale)
    block_rows = _block_rows(block_rows, d)
    buf = np.empty((min(block_rows, n), d))
    ones = np.ones(len(buf))
    cross, colsum = np.zeros((d, d)), np.zeros(d)
    for start, stop in _blocks(n, block_rows):
        Cb = buf[: stop - start]
        np.subtract(X[start:stop], m, out=Cb)  # also upcasts a float32 chunk, one block at a time
        if w is None:
            cross += Cb.T @ Cb
            colsum += ones[: stop - start] @ Cb
        else:
            wb = w[start:stop]
            cross += (Cb * wb[:, None]).T @ Cb
            colsum += wb @ Cb
    g = np.empty((d + 1, d + 1))
    g[:d, :d] = cross / np.outer(s, s)
    g[:d, d] = colsum / s
    g[d, :d] = g[:d, d]
    g[d, d] = n if w is None else float(np.sum(w))
    return g


def linear_predictor(X: np.ndarray, theta: np.ndarray, mean, scale, offset: np.ndarray | None = None) -> np.ndarray:
    """z = X_std·w + b (+ offset), block by block."""
    X, _ = _check_X(X)
    theta = _check_theta(theta, X.shape[1])
    w_eff, b_eff, _, _ = _effective(theta, mean, scale)
    z = np.empty(X.shape[0])
    for start, stop in _blocks(X.shape[0], DEFAULT_BLOCK_ROWS):
        z[start:stop] = np.asarray(X[start:stop], dtype=np.float64) @ w_eff + b_eff
    if offset is not None:
        z += offset
    return z


def chunk_predict(family: str | Family, X: np.ndarray, theta: np.ndarray, mean=None, scale=None,
                  offset: np.ndarray | None = None) -> np.ndarray:
    """Predictions on the response scale (the family's inverse link of z)."""
    return get_family(family).inverse_link(linear_predictor(X, theta, mean, scale, offset))


def chunk_metrics(family: str | Family, X: np.ndarray, y: np.ndarray, theta: np.ndarray, mean=None, scale=None,
                  center: float = 0.0, *, w: np.ndarray | None = None, offset: np.ndarray | None = None) -> np.ndarray:
    """``[Σw, *family.metric_sums(z, y, center, w)]``: additive, finished by ``family.metrics``."""
    fam = get_family(family)
    X, y = _check_X(X, y)
    z = linear_predictor(X, theta, mean, scale, offset)
    n = X.shape[0] if w is None else float(np.sum(w))
    with np.errstate(under="ignore"):
        return np.concatenate([[n], fam.metric_sums(z, np.asarray(y, dtype=np.float64), center, w)])


def chunk_invalid_y(family: str | Family, y: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """``[#targets outside the family's domain, Σw, Σ wy]`` (w = 1 without weights): a count survives the
    tree exactly."""
    y = np.asarray(y, dtype=np.float64)
    bad = np.count_nonzero(get_family(family).invalid_y(y))
    if w is None:
        return np.array([bad, len(y), y.sum()], dtype=np.float64)
    return np.array([bad, np.sum(w), w @ y], dtype=np.float64)
