"""Per-chunk loss/gradient math for generalized linear models (pure NumPy, no Dask).

Every function here works on ONE in-memory chunk and returns plain SUMS, so chunk results
merge across workers by addition and the driver divides by the global row count once.

Parameters ``theta`` (length d+1) live in the *standardized* space: ``theta[:d]`` are weights
for ``(x - mean) / scale`` and ``theta[d]`` is the intercept. Standardization is folded into
the kernel algebraically (``z = X @ (w/scale) + (b - mean . w/scale)``) so a chunk is never
copied just to be standardized; chunks are read in row blocks that stay in cache, so X is
streamed from memory once per call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Loss",
    "MODELS",
    "chunk_sums",
    "chunk_gram",
    "chunk_predict",
    "chunk_metrics",
    "penalty",
    "to_original",
    "from_original",
    "mean_loss_and_grad",
    "expit",
]

Pointwise = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
DEFAULT_BLOCK_ROWS = 8192  # chunk_predict / chunk_metrics
SUMS_BLOCK_BYTES = 2**21  # chunk_sums / chunk_gram: X per block (see _sums_block_rows)
MIN_BLOCK_ROWS = 128


def expit(z: np.ndarray) -> np.ndarray:
    """Logistic sigmoid that never overflows: ``exp`` only ever sees ``-|z| <= 0``."""
    z = np.asarray(z, dtype=np.float64)
    with np.errstate(under="ignore"):  # exp(-1e4) -> 0.0 is the correctly rounded answer
        e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0, e) / (1.0 + e)


@dataclass(frozen=True)
class Loss:
    """A GLM family: pointwise loss/derivative, inverse link and mergeable metric sums.

    ``metrics(z, y)`` returns the per-chunk sums named by ``metric_names[1:]`` (the row count,
    ``metric_names[0] == "n"``, is added by :func:`chunk_metrics`).
    """

    name: str
    pointwise: Pointwise  # (z, y) -> (loss per row, dloss/dz per row)
    inverse_link: Callable[[np.ndarray], np.ndarray]  # z -> prediction on the response scale
    metrics: Callable[[np.ndarray, np.ndarray], np.ndarray]
    metric_names: tuple[str, ...]


def _linear_pointwise(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = z - y
    return 0.5 * r * r, r


def _linear_metrics(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    r = z - y
    return np.array([r @ r, y.sum(), y @ y])


def _logistic_pointwise(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # log(1 + e^z) - y z; logaddexp never forms e^z, so z = +-1e4 stays finite. Its internal
    # log1p(exp(-|z|)) may underflow to 0, which is the correctly rounded result.
    with np.errstate(under="ignore"):
        return np.logaddexp(0.0, z) - y * z, expit(z) - y


def _logistic_metrics(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    loss, _ = _logistic_pointwise(z, y)
    # Class 1 iff p > 0.5 (z > 0), the same tie rule as sklearn's LogisticRegression.predict.
    correct = np.count_nonzero((z > 0) == (y > 0.5))
    return np.array([loss.sum(), float(correct)])


MODELS: dict[str, Loss] = {
    "linear": Loss(
        "linear", _linear_pointwise, lambda z: z, _linear_metrics, ("n", "sum_sq_err", "sum_y", "sum_y2")
    ),
    "logistic": Loss(
        "logistic", _logistic_pointwise, expit, _logistic_metrics, ("n", "sum_logloss", "n_correct")
    ),
}


def _get_model(model: str) -> Loss:
    try:
        return MODELS[model]
    except KeyError:
        raise ValueError(f"unknown model {model!r}; expected one of {sorted(MODELS)}") from None


def _check_scaling(
    d: int, mean: np.ndarray | None, scale: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Return float64 (mean, scale), defaulting to the identity transform."""
    m = np.zeros(d) if mean is None else np.asarray(mean, dtype=np.float64)
    s = np.ones(d) if scale is None else np.asarray(scale, dtype=np.float64)
    if m.shape != (d,) or s.shape != (d,):
        raise ValueError(f"mean/scale must have shape ({d},), got {m.shape} and {s.shape}")
    if not np.all(np.isfinite(s)) or np.any(s == 0):
        raise ValueError("scale must be finite and non-zero (use 1 for constant features)")
    return m, s


def _check_theta(theta: np.ndarray, d: int) -> np.ndarray:
    theta = np.asarray(theta, dtype=np.float64)
    if theta.shape != (d + 1,):
        raise ValueError(f"theta must have shape ({d + 1},), got {theta.shape}")
    return theta


def _effective(
    theta: np.ndarray, mean: np.ndarray | None, scale: np.ndarray | None
) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """Fold standardization into (w_eff, b_eff) so z = X @ w_eff + b_eff on raw X."""
    d = theta.shape[0] - 1
    m, s = _check_scaling(d, mean, scale)
    w_eff = theta[:d] / s
    return w_eff, float(theta[d] - m @ w_eff), m, s


def _check_X(X: np.ndarray, y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D, got shape {X.shape}")
    if y is not None:
        y = np.asarray(y)
        if y.shape != (X.shape[0],):
            raise ValueError(f"y must have shape ({X.shape[0]},), got {y.shape}")
    return X, y


def _blocks(X: np.ndarray, block_rows: int) -> Iterator[tuple[slice, np.ndarray]]:
    """Yield row blocks as float64 (a float32 chunk is upcast one cache-sized block at a time)."""
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    for start in range(0, X.shape[0], block_rows):
        sl = slice(start, min(start + block_rows, X.shape[0]))
        yield sl, np.asarray(X[sl], dtype=np.float64)


def _sums_block_rows(n_features: int) -> int:
    """Default rows per block of :func:`chunk_sums`: about ``SUMS_BLOCK_BYTES`` of float64 X."""
    return max(MIN_BLOCK_ROWS, SUMS_BLOCK_BYTES // (8 * max(n_features, 1)))


def _linear_residual(z: np.ndarray, y: np.ndarray, b: float, acc: np.ndarray, *_buffers: np.ndarray) -> np.ndarray:
    """``z`` holds ``X_b @ w``: make it ``r = z + b - y`` in place; add ``[sum r, r.r]`` to ``acc``."""
    z += b
    z -= y
    acc[0] += z.sum()
    acc[1] += z @ z  # halved once at the end (exact), instead of building 0.5*r*r
    return z


def _logistic_residual(z: np.ndarray, y: np.ndarray, b: float, acc: np.ndarray, t1: np.ndarray, t2: np.ndarray,
                       pos: np.ndarray) -> np.ndarray:
    """``z`` holds ``X_b @ w``; return ``r = expit(z + b) - y`` (in ``t2``) and add ``[sum r, loss]`` to ``acc``.

    The math of :func:`expit` and ``_logistic_pointwise`` sharing one ``e = exp(-|z|)``, in preallocated
    buffers (``z`` is overwritten): ``log(1 + e^z) - y z = (max(z, 0) - y z) + log1p(e)``, whose first term is
    ``>= 0`` for 0/1 targets, so no large terms cancel; ``exp`` only ever sees ``-|z| <= 0``.
    """
    z += b
    np.greater_equal(z, 0.0, out=pos)
    np.abs(z, out=t1)
    np.negative(t1, out=t1)
    np.exp(t1, out=t1)  # e
    np.maximum(z, 0.0, out=t2)
    z *= y
    t2 -= z  # max(z, 0) - y z
    np.log1p(t1, out=z)
    t2 += z
    acc[1] += t2.sum()
    np.add(t1, 1.0, out=z)  # 1 + e
    np.maximum(t1, pos, out=t2)  # expit's numerator: 1 where z >= 0 (e <= 1 there), else e (NaN stays NaN)
    t2 /= z
    t2 -= y
    acc[0] += t2.sum()
    return t2


_RESIDUALS = {"linear": _linear_residual, "logistic": _logistic_residual}


def chunk_sums(
    model: str,
    X: np.ndarray,
    y: np.ndarray,
    theta: np.ndarray,
    mean: np.ndarray | None = None,
    scale: np.ndarray | None = None,
    block_rows: int | None = None,
) -> np.ndarray:
    """Summed gradient and loss of one chunk: ``[grad_sum_w (d), grad_sum_b, loss_sum, n_rows]``.

    Sums (not means) so partial results reduce by plain addition; the gradient is w.r.t. the
    standardized ``theta``: ``grad_w = (X^T r - mean * sum(r)) / scale``, ``grad_b = sum(r)``.

    X is read from memory once: per row block, ``z = X_b @ w`` (BLAS), the residual ``r`` and the loss in
    preallocated buffers, then ``X_b^T r`` while the block is still in cache. ``block_rows`` (default: about
    ``SUMS_BLOCK_BYTES`` of X per block) only changes the summation order, i.e. rounding; the result is a
    deterministic function of the inputs and ``block_rows`` for a given BLAS and BLAS thread count (OpenBLAS
    splits its dot/gemv sums differently with more threads: run kernels with 1 BLAS thread, as Dask's nanny
    sets for its workers, for bit-identical results everywhere).
    """
    _get_model(model)
    X, y = _check_X(X, y)
    n, d = X.shape
    theta = _check_theta(theta, d)
    w_eff, b_eff, m, s = _effective(theta, mean, scale)
    if block_rows is None:
        block_rows = _sums_block_rows(d)
    elif block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    residual = _RESIDUALS[model]
    rows = min(block_rows, n)
    zbuf = np.empty(rows)
    extra = (np.empty(rows), np.empty(rows), np.empty(rows, dtype=bool)) if model == "logistic" else ()
    xbuf = None if X.dtype == np.float64 else np.empty((rows, d))  # float32 is upcast one block at a time
    ybuf = None if y.dtype == np.float64 else np.empty(rows)
    xtr = np.zeros(d)
    part = np.empty(d)
    acc = np.zeros(2)  # [sum r, loss sum (linear: r.r)]
    with np.errstate(under="ignore"):  # tiny sigmoid tails flushing to 0 is harmless
        for start in range(0, n, block_rows):
            stop = min(start + block_rows, n)
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
            r = residual(z, yb, b_eff, acc, *(e[:k] for e in extra))
            np.dot(r, Xb, out=part)  # X_b^T r: the same block, still in cache
            xtr += part
    sum_r = float(acc[0])
    out = np.empty(d + 3)
    out[:d] = (xtr - m * sum_r) / s
    out[d] = sum_r
    out[d + 1] = 0.5 * acc[1] if model == "linear" else acc[1]
    out[d + 2] = n
    return out


def chunk_gram(
    X: np.ndarray,
    mean: np.ndarray | None = None,
    scale: np.ndarray | None = None,
    block_rows: int | None = None,
) -> np.ndarray:
    """``sum_i a_i a_i^T`` with ``a = [(x - mean)/scale, 1]``: bounds the Lipschitz constant.

    Each block is centred on its own (not via ``X^T X - n mean mean^T``) to avoid catastrophic
    cancellation when |mean| >> scale; the scaling is applied once at the end
    (``C_jk / (scale_j scale_k)``), which is only a multiplicative rounding and keeps ``g`` exactly
    symmetric. ``block_rows`` defaults to about ``SUMS_BLOCK_BYTES`` of X per block.
    """
    X, _ = _check_X(X)
    n, d = X.shape
    m, s = _check_scaling(d, mean, scale)
    if block_rows is None:
        block_rows = _sums_block_rows(d)
    elif block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    rows = min(block_rows, n)
    buf = np.empty((rows, d))
    ones = np.ones(rows)
    cross = np.zeros((d, d))
    colsum = np.zeros(d)
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        Cb = buf[: stop - start]
        np.subtract(X[start:stop], m, out=Cb)  # also upcasts a float32 chunk, one block at a time
        cross += Cb.T @ Cb
        colsum += ones[: stop - start] @ Cb
    g = np.empty((d + 1, d + 1))
    g[:d, :d] = cross / np.outer(s, s)
    g[:d, d] = colsum / s
    g[d, :d] = g[:d, d]
    g[d, d] = n
    return g


def _linear_predictor(
    X: np.ndarray, theta: np.ndarray, mean: np.ndarray | None, scale: np.ndarray | None
) -> np.ndarray:
    X, _ = _check_X(X)
    theta = _check_theta(theta, X.shape[1])
    w_eff, b_eff, _, _ = _effective(theta, mean, scale)
    z = np.empty(X.shape[0])
    for sl, Xb in _blocks(X, DEFAULT_BLOCK_ROWS):
        z[sl] = Xb @ w_eff + b_eff
    return z


def chunk_predict(
    model: str,
    X: np.ndarray,
    theta: np.ndarray,
    mean: np.ndarray | None = None,
    scale: np.ndarray | None = None,
) -> np.ndarray:
    """Predictions on the response scale: z for linear, P(y=1) for logistic."""
    loss = _get_model(model)
    return loss.inverse_link(_linear_predictor(X, theta, mean, scale))


def chunk_metrics(
    model: str,
    X: np.ndarray,
    y: np.ndarray,
    theta: np.ndarray,
    mean: np.ndarray | None = None,
    scale: np.ndarray | None = None,
) -> np.ndarray:
    """Additive metric sums for one chunk, layout ``MODELS[model].metric_names``.

    * linear:   ``[n, sum_sq_err, sum_y, sum_y2]`` -> MSE = sse/n,
      R^2 = 1 - sse / (sum_y2 - sum_y^2/n).
    * logistic: ``[n, sum_logloss, n_correct]`` -> log-loss = sum/n, accuracy = n_correct/n
      (class 1 iff p > 0.5).
    """
    loss = _get_model(model)
    X, y = _check_X(X, y)
    z = _linear_predictor(X, theta, mean, scale)
    out = np.zeros(len(loss.metric_names))
    out[0] = X.shape[0]
    if X.shape[0]:
        with np.errstate(under="ignore"):
            out[1:] = loss.metrics(z, np.asarray(y, dtype=np.float64))
    return out


def penalty(theta: np.ndarray, l2: float, scale: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """``(l2/2) * ||w/scale||^2`` and its gradient w.r.t. theta (intercept unpenalized).

    The penalty acts on ORIGINAL-space weights so the fitted model does not depend on the
    internal standardization (it matches sklearn Ridge on raw features).
    """
    theta = np.asarray(theta, dtype=np.float64)
    d = theta.shape[0] - 1
    _, s = _check_scaling(d, None, scale)
    w_orig = theta[:d] / s
    grad = np.zeros(d + 1)
    grad[:d] = l2 * w_orig / s
    return 0.5 * l2 * float(w_orig @ w_orig), grad


def hessian_bound(model: str, gram: np.ndarray, l2: float = 0.0, scale: np.ndarray | None = None) -> np.ndarray:
    """A matrix H with H ⪰ ∇²L(θ) for every θ, from the mean Gram matrix ``gram`` of ``[(x-mean)/scale, 1]``.

    Linear: the Hessian, ``gram``. Logistic: ℓ'' ≤ 1/4, so ``gram/4``. The penalty adds ``l2/scale²`` on the
    weights' diagonal (it acts on original-space weights ``w/scale``); the intercept gets none.
    """
    _get_model(model)
    gram = np.asarray(gram, dtype=np.float64)
    d = gram.shape[0] - 1
    _, s = _check_scaling(d, None, scale)
    H = gram * (1.0 if model == "linear" else 0.25)
    H[np.arange(d), np.arange(d)] += l2 / s**2
    return H


def to_original(
    theta: np.ndarray, mean: np.ndarray | None, scale: np.ndarray | None
) -> tuple[np.ndarray, float]:
    """Map standardized theta to raw-feature ``(coef, intercept)``: the model users see."""
    theta = np.asarray(theta, dtype=np.float64)
    d = theta.shape[0] - 1
    m, s = _check_scaling(d, mean, scale)
    coef = theta[:d] / s
    return coef, float(theta[d] - m @ coef)


def from_original(
    coef: np.ndarray, intercept: float, mean: np.ndarray | None, scale: np.ndarray | None
) -> np.ndarray:
    """Inverse of :func:`to_original`, for warm-starting from a raw-space model."""
    coef = np.asarray(coef, dtype=np.float64)
    m, s = _check_scaling(coef.shape[0], mean, scale)
    return np.append(coef * s, float(intercept) + float(m @ coef))


def mean_loss_and_grad(
    model: str,
    sums: np.ndarray,
    n: float,
    theta: np.ndarray,
    l2: float = 0.0,
    scale: np.ndarray | None = None,
) -> tuple[float, np.ndarray]:
    """Turn reduced chunk sums into the penalized objective and its gradient.

    ``loss = loss_sum/n + penalty``, ``grad = grad_sum/n + penalty_grad``; ``model`` is only
    validated (the family's math is already in ``sums``).
    """
    _get_model(model)
    sums = np.asarray(sums, dtype=np.float64)
    theta = np.asarray(theta, dtype=np.float64)
    d = theta.shape[0] - 1
    if sums.shape != (d + 3,):
        raise ValueError(f"sums must have shape ({d + 3},), got {sums.shape}")
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    pval, pgrad = penalty(theta, l2, scale)
    return float(sums[d + 1] / n) + pval, sums[: d + 1] / n + pgrad
