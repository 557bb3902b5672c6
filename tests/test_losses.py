"""Tests for pipeline.losses against independent dense NumPy / scikit-learn references."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import Ridge
from sklearn.metrics import accuracy_score, log_loss, mean_squared_error, r2_score

from pipeline import losses as L
from pipeline.families import get_family
from pipeline.penalty import ElasticNet
from pipeline.problem import Problem, from_original, to_original


def pointwise(model):
    """(z, y) -> (loss per row, dloss/dz per row) of a family: the per-row definitions."""
    fam = get_family(model)
    return lambda z, y: (fam.loss(z, y), fam.d1(z, y))


def mean_loss_and_grad(model, sums, n, theta, l2=0.0, scale=None):
    """Reduced sums -> the penalized mean objective and its gradient, through the Problem."""
    return Problem.of(model, len(theta) - 1, l2=l2, scale=scale).finish(sums[-2], sums[:-2], n, theta)


def penalty(theta, l2, scale=None):
    s = np.ones(len(theta) - 1) if scale is None else scale
    return ElasticNet(l2=l2).value(theta, s), ElasticNet(l2=l2).grad(theta, s)

EPS = np.finfo(np.float64).eps
REPO = Path(__file__).resolve().parents[1]


def make_data(model: str, n: int = 60, d: int = 3, seed: int = 0):
    """Raw features deliberately far from standardized (means ~ 5..50, scales ~ 0.5..8)."""
    rng = np.random.default_rng(seed)
    loc = np.array([5.0, -3.0, 50.0, 1.0, -7.0])[:d]
    sd = np.array([2.0, 0.5, 8.0, 1.0, 3.0])[:d]
    X = rng.normal(loc, sd, size=(n, d))
    mean, scale = X.mean(axis=0), X.std(axis=0)
    theta = rng.normal(size=d + 1)
    z = ((X - mean) / scale) @ theta[:d] + theta[d]
    if model == "linear":
        y = z + rng.normal(size=n)
    else:
        y = (rng.random(n) < 1.0 / (1.0 + np.exp(-z))).astype(np.float64)
    return X, y, mean, scale, rng.normal(size=d + 1)


def design(X, mean=None, scale=None):
    """Explicitly standardized design with a ones column: the dense reference."""
    Z = X if mean is None else (X - mean) / scale
    return np.column_stack([Z, np.ones(len(X))])


def dense_loss(model, A, y, theta):
    z = A @ theta
    if model == "linear":
        return 0.5 * np.sum((z - y) ** 2)
    return np.sum(np.log1p(np.exp(z)) - y * z)  # naive is fine: |z| < ~200 << 709 for this data


def central_diff(f, theta, h):
    g = np.zeros_like(theta)
    for k in range(theta.size):
        e = np.zeros_like(theta)
        e[k] = h
        g[k] = (f(theta + e) - f(theta - e)) / (2 * h)
    return g


# ---------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("model", ["linear", "logistic"])
@pytest.mark.parametrize("standardize", [False, True])
def test_chunk_sums_gradient_matches_finite_differences(model, standardize):
    X, y, mean, scale, theta = make_data(model)
    if not standardize:
        mean = scale = None
    d = X.shape[1]
    sums = L.chunk_sums(model, X, y, theta, mean, scale, block_rows=7)
    assert sums.dtype == np.float64 and sums.shape == (d + 3,)
    assert sums[d + 2] == len(X)

    def f(t):
        return L.chunk_sums(model, X, y, t, mean, scale)[d + 1]

    # Raw features reach ~66, so |f| <~ 4e3 and max|grad| is ~15..3e4. With h=1e-5 the
    # rounding error eps*|f|/h is <~1e-7 and the truncation error h^2*|f'''|/6 is <~1e-6
    # (zero for linear), i.e. < 1e-7 * max|grad| (observed: <= 6e-11 relative). A wrong
    # term (e.g. a missing mean correction) is O(|grad|).
    fd = central_diff(f, theta, 1e-5)
    np.testing.assert_allclose(sums[: d + 1], fd, rtol=1e-6, atol=1e-7 * np.abs(fd).max())


@pytest.mark.parametrize("model", ["linear", "logistic"])
@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("l2", [0.0, 0.37])
def test_mean_loss_and_grad_matches_finite_differences(model, standardize, l2):
    X, y, mean, scale, theta = make_data(model, seed=1)
    if not standardize:
        mean = scale = None
    n = len(X)
    sums = L.chunk_sums(model, X, y, theta, mean, scale)
    loss, grad = mean_loss_and_grad(model, sums, n, theta, l2, scale)

    def f(t):
        return mean_loss_and_grad(model, L.chunk_sums(model, X, y, t, mean, scale), n, t, l2, scale)[0]

    # Independent dense value: sum over ~60 O(1..1e3) terms in a different order, plus the
    # closed-form penalty; reassociation error ~n*eps ~ 1e-14 relative.
    s = np.ones(X.shape[1]) if scale is None else scale
    ref = dense_loss(model, design(X, mean, scale), y, theta) / n + 0.5 * l2 * np.sum((theta[:-1] / s) ** 2)
    assert loss == pytest.approx(ref, rel=1e-12)
    # Mean loss is O(1..100); h=1e-5 gives rounding error ~eps*100/1e-5 ~ 2e-9 and truncation
    # ~h^2 * |f'''| (< 1e-6 here; observed max error 4e-8), so rtol 1e-6 + atol 1e-6 has margin
    # yet flags a missing or mis-scaled penalty term (>= 0.37 * |w|/scale^2 ~ 5e-3).
    np.testing.assert_allclose(grad, central_diff(f, theta, 1e-5), rtol=1e-6, atol=1e-6)


def test_linear_matches_dense_standardized_computation():
    X, y, mean, scale, theta = make_data("linear", n=101, d=4, seed=2)
    A = design(X, mean, scale)
    n = len(X)
    sums = L.chunk_sums("linear", X, y, theta, mean, scale, block_rows=16)
    loss, grad = mean_loss_and_grad("linear", sums, n, theta, 0.0, scale)
    r = A @ theta - y
    # Both sides sum ~100 O(1..10) terms in different orders (and ours folds mean/scale into
    # the weights): rounding error is ~n*eps relative to the magnitudes, far below 1e-12.
    assert loss == pytest.approx(0.5 * (r @ r) / n, rel=1e-12)
    assert np.all(np.abs(grad - A.T @ r / n) <= 1e-12 * (np.abs(A).T @ np.abs(r)) / n)


def test_linear_solution_maps_back_to_lstsq_on_raw_features():
    X, y, mean, scale, _ = make_data("linear", n=120, d=4, seed=3)
    d = X.shape[1]
    # Normal equations in the standardized space, built only from this module's kernels:
    # chunk_gram gives A^T A, and the summed gradient at theta=0 is A^T(0 - y) = -A^T y.
    G = L.chunk_gram(X, mean, scale, block_rows=32)
    g0 = L.chunk_sums("linear", X, y, np.zeros(d + 1), mean, scale, block_rows=32)[: d + 1]
    theta = np.linalg.solve(G, -g0)
    coef, intercept = to_original(theta, mean, scale)
    ref, *_ = np.linalg.lstsq(np.column_stack([X, np.ones(len(X))]), y, rcond=None)
    # The raw design (means up to 50) has condition number ~1e3, so lstsq itself is only
    # accurate to ~cond*eps ~ 1e-13 relative; rtol 1e-9 is loose enough for that, tight
    # enough to catch any mistake in the mean/scale back-transformation.
    np.testing.assert_allclose(coef, ref[:d], rtol=1e-9)
    assert intercept == pytest.approx(ref[d], rel=1e-9)
    # Optimality: the gradient at the solution vanishes (to rounding of ~n*|A||r|*eps).
    grad = L.chunk_sums("linear", X, y, theta, mean, scale)[: d + 1]
    np.testing.assert_allclose(grad, 0.0, atol=1e-9)


# ---------------------------------------------------------------------------- logistic stability


def test_logistic_extreme_margins_are_finite_exact_and_silent():
    per_row = pointwise("logistic")
    z = np.array([1e4, 1e4, -1e4, -1e4])
    y = np.array([0.0, 1.0, 0.0, 1.0])
    X = np.array([[1.0], [1.0], [-1.0], [-1.0]])
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        lv, r = per_row(z, y)
        sums = L.chunk_sums("logistic", X, y, np.array([1e4, 0.0]))
        p = L.chunk_predict("logistic", X, np.array([1e4, 0.0]))
        met = L.chunk_metrics("logistic", X, y, np.array([1e4, 0.0]))
    # Closed forms: log(1+e^z) - yz is z for (z=1e4, y=0), 0 for (1e4, 1) and (-1e4, 0)
    # (log1p(e^-1e4) underflows to exactly 0 in float64), and -z = 1e4 for (-1e4, 1);
    # sigmoid(z) - y is 1, 0, 0, -1. All of these are exactly representable, so compare exactly.
    np.testing.assert_array_equal(lv, [1e4, 0.0, 0.0, 1e4])
    np.testing.assert_array_equal(r, [1.0, 0.0, 0.0, -1.0])
    # grad_w = sum x*r = 1*1 + (-1)*(-1) = 2, grad_b = sum r = 0, loss = 2e4, n = 4.
    np.testing.assert_array_equal(sums, [2.0, 0.0, 2e4, 4.0])
    np.testing.assert_array_equal(p, [1.0, 1.0, 0.0, 0.0])
    np.testing.assert_array_equal(met[[0, 1, 3]], [4.0, 2e4, 2.0])  # n, Σ log-loss, #correct


def test_expit_matches_naive_formula_where_naive_is_safe():
    z = np.linspace(-30, 30, 301)
    # Two correctly-rounded-ish evaluations of the same function: a few ulps apart at most.
    np.testing.assert_allclose(L.expit(z), 1.0 / (1.0 + np.exp(-z)), rtol=1e-14)


# ---------------------------------------------------------------------------- chunking invariance


def magnitude_bound(model, X, y, theta, mean, scale):
    """Sum of |terms| behind each output of chunk_sums: the scale of any reassociation error."""
    A = design(X, mean, scale)
    w_eff = theta[:-1] / scale
    z = A @ theta
    zmag = np.abs(X) @ np.abs(w_eff) + abs(theta[-1]) + np.abs(mean @ w_eff)  # scale of rounding in z
    if model == "linear":
        r, lv = z - y, 0.5 * (z - y) ** 2
    else:
        r, lv = 1 / (1 + np.exp(-z)) - y, np.logaddexp(0, z) - y * z
    rmag = np.abs(r) + zmag + np.abs(y)
    gw = (np.abs(X).T @ rmag + np.abs(mean) * rmag.sum()) / scale
    return np.concatenate([gw, [rmag.sum(), np.sum(np.abs(lv) + rmag * (1 + rmag)), 0.0]])


@settings(max_examples=40, deadline=None)
@given(
    model=st.sampled_from(["linear", "logistic"]),
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 200),
    cuts=st.lists(st.floats(0, 1), max_size=6),
    block_rows=st.integers(1, 64),
)
def test_chunked_sums_add_up_to_unchunked(model, seed, n, cuts, block_rows):
    X, y, mean, scale, theta = make_data(model, n=max(n, 2), d=3, seed=seed)
    X, y = X[:n], y[:n]
    edges = sorted({0, n, *(int(c * n) for c in cuts)})
    whole = L.chunk_sums(model, X, y, theta, mean, scale)
    parts = np.zeros(X.shape[1] + 3)
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        parts += L.chunk_sums(model, X[a:b], y[a:b], theta, mean, scale, block_rows=block_rows)
    other_blocks = L.chunk_sums(model, X, y, theta, mean, scale, block_rows=block_rows)
    # Reassociating a sum of n <= 200 terms moves it by at most ~n*eps*sum|terms| ~ 4.4e-14
    # relative to the magnitude bound (which also covers rounding of z inherited by r);
    # 1e-12 gives >20x headroom while any dropped/duplicated row is O(1) relative.
    tol = 1e-12 * magnitude_bound(model, X, y, theta, mean, scale) + 1e-300
    assert np.all(np.abs(parts - whole) <= tol)
    assert np.all(np.abs(other_blocks - whole) <= tol)
    assert parts[-1] == whole[-1] == n  # row counts are exact integers


def test_deterministic_and_float32_input():
    X, y, mean, scale, theta = make_data("logistic", n=300, d=4, seed=5)
    a = L.chunk_sums("logistic", X, y, theta, mean, scale, block_rows=50)
    b = L.chunk_sums("logistic", X, y, theta, mean, scale, block_rows=50)
    np.testing.assert_array_equal(a, b)
    X32 = X.astype(np.float32)
    s32 = L.chunk_sums("logistic", X32, y.astype(np.float32), theta, mean, scale, block_rows=50)
    assert s32.dtype == np.float64
    # float32 -> float64 upcast is exact, so the float32 path must equal the float64 path on
    # the same (rounded) values bit for bit.
    np.testing.assert_array_equal(
        s32, L.chunk_sums("logistic", X32.astype(np.float64), y, theta, mean, scale, block_rows=50)
    )


@pytest.mark.parametrize("model", ["linear", "logistic"])
def test_default_blocks_match_pointwise_reference(model):
    """The buffered fast path (two default-size blocks plus a ragged one) against the per-row definitions
    in ``MODELS[model].pointwise``, for C-ordered, Fortran-ordered and strided X and an integer y."""
    d = 3
    n = 2 * L._block_rows(None, d) + 17
    X, y, mean, scale, theta = make_data(model, n=n, d=d, seed=12)
    A = design(X, mean, scale)
    lv, r = pointwise(model)(A @ theta, y)
    ref = np.concatenate([A.T @ r, [lv.sum(), n]])
    # Blocked sums of n terms in another order (and mean/scale folded into the weights): worst-case
    # reassociation error n*eps ~ 4e-11 relative to the magnitude bound; 1e-10 still flags any lost row.
    tol = 1e-10 * magnitude_bound(model, X, y, theta, mean, scale) + 1e-300
    wide = np.column_stack([X, np.ones(n)])
    for Xv, yv in [(X, y), (np.asfortranarray(X), y), (wide[:, :d], y)]:
        got = L.chunk_sums(model, Xv, yv, theta, mean, scale)
        assert np.all(np.abs(got - ref) <= tol)
        np.testing.assert_array_equal(got, L.chunk_sums(model, Xv, yv, theta, mean, scale))
    if model == "logistic":  # 0/1 as int64 is upcast exactly: same bits as the float64 target
        np.testing.assert_array_equal(L.chunk_sums(model, X, y.astype(np.int64), theta, mean, scale),
                                      L.chunk_sums(model, X, y, theta, mean, scale))


def test_empty_chunk_returns_zeros():
    X = np.zeros((0, 3))
    out = L.chunk_sums("linear", X, np.zeros(0), np.ones(4), np.ones(3), np.full(3, 2.0))
    np.testing.assert_array_equal(out, np.zeros(6))
    np.testing.assert_array_equal(L.chunk_gram(X), np.zeros((4, 4)))
    empty = L.chunk_metrics("logistic", X, np.zeros(0), np.ones(4))
    assert empty.shape == (4 + 2 * 8192,) and not empty.any()
    assert L.chunk_predict("linear", X, np.ones(4)).shape == (0,)


def test_bad_inputs_raise():
    X, y, mean, scale, theta = make_data("linear")
    with pytest.raises(ValueError, match="linear"):
        L.chunk_sums("probit", X, y, theta)
    with pytest.raises(ValueError):
        L.chunk_sums("linear", X, y, theta[:-1])
    with pytest.raises(ValueError):
        L.chunk_sums("linear", X, y, theta, mean, np.zeros_like(scale))
    with pytest.raises(ValueError):
        L.chunk_sums("linear", X, y[:-1], theta)


# ---------------------------------------------------------------------------- gram, metrics


@pytest.mark.parametrize("standardize", [False, True])
def test_chunk_gram_equals_dense_gram(standardize):
    X, _, mean, scale, _ = make_data("linear", n=77, d=4, seed=6)
    if not standardize:
        mean = scale = None
    A = design(X, mean, scale)
    G = L.chunk_gram(X, mean, scale, block_rows=10)
    # Same products, different summation order: error <= n*eps*(|A|^T|A|) ~ 2e-14 relative.
    np.testing.assert_array_less(np.abs(G - A.T @ A), 1e-12 * (np.abs(A).T @ np.abs(A)))
    np.testing.assert_array_equal(G, G.T)


def test_linear_metrics_match_sklearn():
    X, y, mean, scale, theta = make_data("linear", n=150, seed=7)
    m = sum(
        L.chunk_metrics("linear", X[a : a + 40], y[a : a + 40], theta, mean, scale, y.mean())
        for a in range(0, 150, 40)
    )
    n, half_sse, half_sst = m
    pred = design(X, mean, scale) @ theta
    assert n == 150
    # Sums of ~150 O(1..10) terms about the mean (no cancellation): relative rounding ~n*eps ~ 3e-14.
    assert 2 * half_sse / n == pytest.approx(mean_squared_error(y, pred), rel=1e-10)
    assert 1 - half_sse / half_sst == pytest.approx(r2_score(y, pred), rel=1e-10)
    got = get_family("linear").metrics(m[1:], n)
    assert got["r2"] == pytest.approx(r2_score(y, pred), rel=1e-10)
    np.testing.assert_allclose(L.chunk_predict("linear", X, theta, mean, scale), pred, rtol=1e-12, atol=1e-12)


def test_logistic_metrics_match_sklearn():
    X, y, mean, scale, theta = make_data("logistic", n=150, seed=8)
    m = sum(
        L.chunk_metrics("logistic", X[a : a + 33], y[a : a + 33], theta, mean, scale)
        for a in range(0, 150, 33)
    )
    n, sum_ll, n_correct = m[0], m[1], m[3]
    p = 1.0 / (1.0 + np.exp(-(design(X, mean, scale) @ theta)))
    assert n == 150
    # sklearn evaluates -log(p), -log(1-p) from p; 1-p loses ~eps*e^|z| relative (|z| < 10
    # here -> < 1e-11), while we use log(1+e^z) - yz directly. rtol 1e-9 covers that.
    assert sum_ll / n == pytest.approx(log_loss(y, p), rel=1e-9)
    assert n_correct / n == accuracy_score(y, (p > 0.5).astype(float))  # integer counts: exact
    np.testing.assert_allclose(L.chunk_predict("logistic", X, theta, mean, scale), p, rtol=1e-13)


# ---------------------------------------------------------------------------- penalty & transforms


@pytest.mark.parametrize("use_scale", [False, True])
def test_penalty_closed_form_and_finite_differences(use_scale):
    rng = np.random.default_rng(9)
    theta = rng.normal(size=5)
    scale = rng.uniform(0.3, 3.0, size=4) if use_scale else None
    s = scale if use_scale else np.ones(4)
    l2 = 0.7
    val, grad = penalty(theta, l2, scale)
    # Closed form of (l2/2)||w/s||^2 and its gradient l2*w/s^2; a handful of roundings each.
    assert val == pytest.approx(0.5 * l2 * np.sum((theta[:4] / s) ** 2), rel=1e-14)
    np.testing.assert_allclose(grad, np.append(l2 * theta[:4] / s**2, 0.0), rtol=1e-14)
    # A quadratic: central differences are exact up to rounding ~eps*|val|/h ~ 1e-10.
    fd = central_diff(lambda t: penalty(t, l2, scale)[0], theta, 1e-5)
    np.testing.assert_allclose(grad, fd, rtol=1e-8, atol=1e-8)
    # The intercept is never penalized.
    bumped = theta.copy()
    bumped[-1] += 123.0
    assert penalty(bumped, l2, scale)[0] == val and grad[-1] == 0.0


def test_original_space_round_trip_and_semantics():
    X, _, mean, scale, theta = make_data("linear", n=40, d=5, seed=10)
    coef, intercept = to_original(theta, mean, scale)
    back = from_original(coef, intercept, mean, scale)
    # Multiply/divide by scale and add/subtract mean.coef: a few ulps of the O(50) terms.
    np.testing.assert_allclose(back, theta, rtol=1e-13, atol=1e-13)
    # Semantics: the original-space model gives the same predictions on raw X.
    np.testing.assert_allclose(X @ coef + intercept, design(X, mean, scale) @ theta, rtol=1e-12, atol=1e-12)
    c0, b0 = to_original(theta, None, None)
    np.testing.assert_array_equal(c0, theta[:-1])
    assert b0 == theta[-1]


def test_ridge_normal_equations_match_sklearn():
    X, y, mean, scale, _ = make_data("linear", n=90, d=4, seed=11)
    n, d, lam = len(X), X.shape[1], 0.05

    def grad(t):
        return mean_loss_and_grad("linear", L.chunk_sums("linear", X, y, t, mean, scale), n, t, lam, scale)[
            1
        ]

    # The objective is quadratic, so grad(t) = H t + g0 exactly; read H column by column.
    g0 = grad(np.zeros(d + 1))
    H = np.column_stack([grad(e) - g0 for e in np.eye(d + 1)])
    theta = np.linalg.solve(H, -g0)
    coef, intercept = to_original(theta, mean, scale)
    # Ours: (1/2n)||Xc + b - y||^2 + (lam/2)||c||^2 in original space. Multiplying by 2n gives
    # ||y - Xc - b||^2 + n*lam*||c||^2, which is sklearn Ridge's objective with alpha = n*lam
    # (Ridge also leaves the intercept unpenalized).
    ref = Ridge(alpha=n * lam).fit(X, y)
    # Both are direct solves of well-conditioned (cond ~1e3) systems: agreement to ~1e-12
    # expected; rtol 1e-8 leaves room for the H-by-differences step.
    np.testing.assert_allclose(coef, ref.coef_, rtol=1e-8)
    assert intercept == pytest.approx(ref.intercept_, rel=1e-8)


# ---------------------------------------------------------------------------- import hygiene


def test_kernels_do_not_import_dask():
    """The kernels must stay NumPy-only so they import cheaply anywhere; Dask belongs to the driver."""
    code = (
        "import pipeline.losses, pipeline.optim, sys; "
        "bad = sorted(m for m in sys.modules if m.startswith('dask')); "
        "assert not bad, bad"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------- Newton and TSQR kernels


@pytest.mark.parametrize("model", ["linear", "logistic"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_chunk_newton_equals_the_dense_weighted_gram(model, dtype):
    """Loss, gradient and Σ ℓ''·a aᵀ against the explicitly standardized dense design, over several ragged
    blocks (block_rows=23) so that every per-block buffer refill is exercised."""
    X, y, mean, scale, theta = make_data(model, n=200, d=4, seed=31)
    X = X.astype(dtype)
    A = design(X.astype(np.float64), mean, scale)
    z = A @ theta
    if model == "linear":
        r, w = z - y, np.ones_like(z)
    else:
        p = 1 / (1 + np.exp(-z))
        r, w = p - y, p * (1 - p)
    out = L.chunk_newton(model, X, y, theta, mean, scale, block_rows=23)
    at = L.newton_layout(5)
    # Sums of 200 products of O(1..50) terms in another order: ~n·eps relative to Σ|terms|; 1e-11 of the
    # magnitude flags any lost row, weight or column.
    mag = np.abs(A).T @ (np.abs(w)[:, None] * np.abs(A))
    np.testing.assert_array_less(np.abs(out[at["gram"]].reshape(5, 5) - (A * w[:, None]).T @ A), 1e-11 * mag)
    np.testing.assert_array_less(np.abs(out[at["grad"]] - A.T @ r), 1e-11 * (np.abs(A).T @ np.abs(r)) + 1e-300)
    assert out[at["loss"]][0] == pytest.approx(dense_loss(model, A, y, theta), rel=1e-12)
    assert (out[at["n"]][0], out[at["sum_y"]][0]) == (200, pytest.approx(y.sum(), rel=1e-14))
    # the gradient is also that of chunk_sums (the value+gradient pass): same math, other kernel
    np.testing.assert_array_less(np.abs(out[at["grad"]] - L.chunk_sums(model, X, y, theta, mean, scale)[:5]),
                                 1e-11 * (np.abs(A).T @ np.abs(r)) + 1e-300)


@pytest.mark.parametrize("standardize", [True, False])
def test_chunk_qr_is_the_r_factor_of_the_augmented_design(standardize):
    """R of [1 | X_std | y]: RᵀR = AᵀA, |R| = |numpy's R| (rows differ by sign only), and the TSQR combine of
    two halves is the R of the whole. Blocks of 17 rows (ragged) exercise the blocked tpqrt."""
    X, y, mean, scale, _ = make_data("linear", n=150, d=3, seed=32)
    if not standardize:
        mean = scale = None
    Z = X if mean is None else (X - mean) / scale
    A = np.column_stack([np.ones(len(X)), Z, y])
    R = L.chunk_qr(X, y, mean, scale, block_rows=17)
    assert np.array_equal(R, np.triu(R))
    # Householder QR is backward stable: RᵀR = AᵀA to ~n·eps·‖A‖² per entry.
    np.testing.assert_array_less(np.abs(R.T @ R - A.T @ A), 1e-12 * np.abs(A).T @ np.abs(A) + 1e-300)
    np.testing.assert_allclose(np.abs(R), np.abs(np.linalg.qr(A, mode="r")), rtol=1e-10, atol=1e-10 * np.abs(R).max())
    halves = L.qr_combine([L.chunk_qr(X[:70], y[:70], mean, scale), L.chunk_qr(X[70:], y[70:], mean, scale)])
    np.testing.assert_allclose(np.abs(halves), np.abs(R), rtol=1e-10, atol=1e-10 * np.abs(R).max())
    np.testing.assert_array_equal(L.chunk_qr(X[:0], y[:0], mean, scale), np.zeros((5, 5)))
