"""L1 / elastic net in the second-order solvers (exact TSQR + coordinate descent, proximal Newton) against
independent references: scikit-learn's Lasso/ElasticNet, glum, and the closed-form KKT conditions.

The solvers run over the real kernels and reduction tree (InProcessEngine.of_arrays + ClusterObjective).
scikit-learn's objective 1/(2n)‖y − Xw − b‖² + α·R‖w‖₁ + α(1−R)/2‖w‖² is ours with l1 = αR, l2 = α(1−R);
glum's alpha/l1_ratio the same, with the mean (weighted) log-likelihood as the loss.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import scipy.linalg
from sklearn.linear_model import ElasticNet as SkElasticNet
from sklearn.linear_model import Lasso

from pipeline.errors import GradpipeError
from pipeline.inprocess import InProcessEngine
from pipeline.objective import ClusterObjective
from pipeline.problem import Problem
from pipeline.solvers.base import Row, Stalled, StopOptions
from pipeline.solvers.cd import l1_quadratic
from pipeline.solvers.exact import Exact
from pipeline.solvers.newton import Newton

SCALES = np.array([1e-2, 1.0, 30.0, 5.0, 0.1, 300.0, 1.0, 2.0])


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def build(solver_cls, X, y, family, *, l1, l2, w=None, offset=None, standardize=True, tol=1e-12, gtol=1e-10,
          chunk_rows=250):
    """A solver over the real kernels; standardization (or none) is the caller's choice, as in training."""
    mean, scale = (X.mean(axis=0), X.std(axis=0)) if standardize else (None, None)
    problem = Problem.of(family, X.shape[1], l1=l1, l2=l2, mean=mean, scale=scale)
    engine = InProcessEngine.of_arrays(X, y, w, offset, chunk_rows=chunk_rows, fan_in=3)
    obj = ClusterObjective(engine, problem, weight_sum=None if w is None else float(np.sum(w)))
    return solver_cls(StopOptions(tol=tol, gtol=gtol), problem, obj)


def run(solver, theta0=None, max_iter=50, rows=None) -> tuple[list[Row], str]:
    """The training loop's order: stop_reason on the last row, else one step (Stalled ends it converged)."""
    if rows is None:
        rows = [solver.start(np.zeros(solver.n_params) if theta0 is None else theta0)]
    prev = rows[-2].loss if len(rows) > 1 else None
    while len(rows) <= max_iter:
        if reason := solver.stop_reason(prev, rows[-1]):
            return rows, reason
        try:
            new = solver.step()
        except Stalled as done:
            return rows, str(done)
        prev = rows[-1].loss
        rows.append(new)
    return rows, "max_iter"


def original(solver, row) -> np.ndarray:
    coef, intercept = solver.problem.to_original(row.theta)
    return np.append(coef, intercept)


def assert_exact_zeros(rows: list[Row]) -> None:
    """No coefficient is 'almost zero': each is exactly 0.0 or clearly away from it (rounding-level residue
    of a zeroed coordinate would be ~1e-17 relative)."""
    for row in rows:
        big = np.max(np.abs(row.theta))
        assert np.all((row.theta[:-1] == 0.0) | (np.abs(row.theta[:-1]) > 1e-12 * big))


@pytest.fixture(scope="module")
def linear():
    """Raw features spread over 4.5 decades of scale (so unstandardized θ is badly scaled), half the true
    weights zero; well conditioned once standardized."""
    rng = np.random.default_rng(7)
    n, d = 3000, len(SCALES)
    X = rng.normal(size=(n, d)) * SCALES + rng.normal(size=d) * SCALES
    X[:, 3] += 0.5 * X[:, 1] * SCALES[3]  # some correlation
    c = np.array([1.0, 0.0, -2.0, 0.0, 0.7, 0.0, 0.4, 0.0]) / SCALES
    y = X @ c + 0.3 + 0.5 * rng.normal(size=n)
    return X, y


def kkt_residual_linear(X, y, coef, intercept, l1, l2) -> float:
    """The min-norm subgradient of sklearn's objective in raw space, computed directly (closed form)."""
    r = X @ coef + intercept - y
    g = X.T @ r / len(y) + l2 * coef
    sub = np.where(coef != 0, g + l1 * np.sign(coef), np.sign(g) * np.maximum(np.abs(g) - l1, 0.0))
    return float(np.max(np.abs(np.append(sub, r.mean()))))


@pytest.mark.parametrize("standardize", [True, False])
@pytest.mark.parametrize("l1_ratio", [1.0, 0.5])
@pytest.mark.parametrize("solver_cls", [Exact, Newton])
def test_linear_elastic_net_matches_scikit_learn(linear, solver_cls, l1_ratio, standardize):
    X, y = linear
    alpha = 0.08
    l1, l2 = alpha * l1_ratio, alpha * (1 - l1_ratio)
    ref_model = (Lasso(alpha=alpha, tol=1e-12, max_iter=10**6) if l1_ratio == 1.0 else
                 SkElasticNet(alpha=alpha, l1_ratio=l1_ratio, tol=1e-12, max_iter=10**6)).fit(X, y)
    ref = np.append(ref_model.coef_, ref_model.intercept_)
    assert 0 < np.sum(ref_model.coef_ == 0) < len(SCALES)  # the penalty zeroes some weights, not all

    solver = build(solver_cls, X, y, "linear", l1=l1, l2=l2, standardize=standardize)
    rows, reason = run(solver)
    got = original(solver, rows[-1])
    np.testing.assert_array_equal(got[:-1] == 0, ref_model.coef_ == 0)  # the same zero pattern, exact zeros
    assert_exact_zeros(rows)
    # sklearn stops at a duality gap of 1e-12·‖y‖²/n, we at a min-norm subgradient ≤ 1e-10; with the
    # problem's scaled condition number ~10 both sit within ~1e-12 of the optimum (measured: ≤ 3e-15 apart,
    # raw or standardized, since CD, Cholesky and QR are all invariant to the column scaling), so 1e-11.
    assert rel_err(got, ref) < 1e-11
    kkt = kkt_residual_linear(X, y, got[:-1], got[-1], l1, l2)
    assert kkt < 1e-11 * np.abs(y).mean()  # stationarity itself, independent of either solver (measured ~1e-13)
    if solver_cls is Exact:
        assert solver.obj.passes == 1 and len(rows) == 2 and "exact elastic-net" in reason
    else:
        assert solver.obj.passes <= 3  # a constant Hessian: one prox-Newton step is the solution, plus a check


def elastic_net_on_support(X, y, support, signs, l1, l2) -> np.ndarray:
    """The elastic net's closed form once its support and signs are known, by QR of the raw data (no Gram):
    with X and y centred (the intercept is free), c solves (XᵀX + n·l2·I) c = Xᵀy − n·l1·σ on the support;
    with [X_S; √(n·l2) I] = QR that is c = R⁻¹Qᵀ[y; 0] − R⁻¹R⁻ᵀ(n·l1·σ). Valid iff KKT holds (checked by
    the caller): the objective is strictly convex, so the point is then the unique optimum."""
    n = len(y)
    mx, my = X.mean(axis=0), y.mean()
    A = np.vstack([X[:, support] - mx[support], np.sqrt(n * l2) * np.eye(int(support.sum()))])
    Q, R = np.linalg.qr(A)
    c_s = scipy.linalg.solve_triangular(R, Q.T @ np.append(y - my, np.zeros(int(support.sum()))))
    c_s -= scipy.linalg.solve_triangular(R, scipy.linalg.solve_triangular(R, n * l1 * signs, trans="T"))
    coef = np.zeros(X.shape[1])
    coef[support] = c_s
    return np.append(coef, my - mx @ coef)


def test_exact_elastic_net_on_near_collinear_features_is_stationary_to_rounding():
    """Two features 3e-5 apart (Gram condition ~1e9) both kept by a little ridge: the Gram squares R's
    condition number, and the refinement from R must still reach the optimum. (scikit-learn needs ~7 million
    CD epochs and 200 s here, so the reference is the closed form on the support, validated by KKT.)"""
    rng = np.random.default_rng(1)
    n = 6000
    base = rng.normal(size=(n, 3))
    X = np.column_stack([base, base[:, 0] + 3e-5 * rng.normal(size=n), rng.normal(size=n)]) * [1, 2, 0.5, 1, 3]
    y = X @ np.array([1.0, -2.0, 0.0, 3.0, 0.0]) + 0.2 + 0.1 * rng.normal(size=n)
    l1, l2 = 1e-3, 1e-6
    solver = build(Exact, X, y, "linear", l1=l1, l2=l2)
    rows, _ = run(solver)
    got = original(solver, rows[-1])
    assert solver.obj.passes == 1 and np.all(got[[0, 3]] != 0)
    support = got[:-1] != 0
    ref = elastic_net_on_support(X, y, support, np.sign(got[:-1][support]), l1, l2)
    np.testing.assert_array_equal(np.sign(ref), np.sign(got))
    # The reference is the optimum: its raw-space KKT residual (computed from X directly) is at rounding.
    assert kkt_residual_linear(X, y, ref[:-1], ref[-1], l1, l2) < 1e-13
    assert kkt_residual_linear(X, y, got[:-1], got[-1], l1, l2) < 1e-13  # measured 1e-15
    # Both are stationary to ~1e-15 and the smallest curvature is the ridge's 1e-6 along the pair's
    # difference, so they agree to ~1e-15/1e-6 = 1e-9 absolute; 1e-8 relative (max|coef| ≈ 2) is the bar
    # (measured 2e-11).
    assert rel_err(got, ref) < 1e-8


def logistic_data(n=4000, seed=3):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 6)) * [1, 3, 0.2, 1, 10, 0.5] + [0, 1, 0, -2, 5, 0]
    z = X @ np.array([0.8, 0.0, 2.0, -0.5, 0.0, 0.0]) - 0.3
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(float)
    return X, y


def glum_fit(X, y, family, alpha, l1_ratio, **fit):
    from glum import GeneralizedLinearRegressor

    m = GeneralizedLinearRegressor(family=family, alpha=alpha, l1_ratio=l1_ratio, gradient_tol=1e-13,
                                   max_iter=1000, solver="irls-cd").fit(X, y, **fit)
    return np.append(m.coef_, m.intercept_)


@pytest.mark.parametrize("l1_ratio", [1.0, 0.5])
def test_newton_logistic_elastic_net_matches_glum(l1_ratio):
    X, y = logistic_data()
    alpha = 0.02
    ref = glum_fit(X, y, "binomial", alpha, l1_ratio)
    solver = build(Newton, X, y, "logistic", l1=alpha * l1_ratio, l2=alpha * (1 - l1_ratio))
    rows, reason = run(solver)
    got = original(solver, rows[-1])
    assert 0 < np.sum(ref[:-1] == 0) < 6
    np.testing.assert_array_equal(got[:-1] == 0, ref[:-1] == 0)
    assert_exact_zeros(rows)
    # glum's own stopping (gradient_tol 1e-13 on its scaled gradient, step-size rule) leaves it ~1e-9 from the
    # optimum (measured 7e-10 apart from us, while we stop at a min-norm subgradient ≤ 1e-10 with Newton's
    # quadratic convergence below it): 1e-8 relative is the bar.
    assert rel_err(got, ref) < 1e-8
    assert solver.obj.passes <= 10, solver.obj.passes
    assert reason != "max_iter"


def test_newton_stops_at_a_kink_on_the_min_norm_subgradient():
    """At an L1 optimum with zeros, ‖∇L‖ (the smooth part's gradient) stays of order λ₁ while the min-norm
    subgradient goes to 0: the stop must come from the latter, with the other rules switched off."""
    X, y = logistic_data(seed=5)
    solver = build(Newton, X, y, "logistic", l1=0.02, l2=0.0, tol=0.0, gtol=1e-7)
    # tol = 0 disables the step-size rule; the decrement rule fires only at rounding level (~1e-16), which
    # a min-norm subgradient of 1e-7 (decrement ~1e-14 with curvature ~1) reaches later.
    rows, reason = run(solver)
    last = rows[-1]
    assert reason.startswith("gradient norm ≤ gtol"), reason
    assert np.linalg.norm(last.grad) > 1e-3  # of order λ₁ at the zeroed coordinates
    assert np.linalg.norm(solver.problem.min_norm_subgradient(last.theta, last.grad)) <= 1e-7
    assert np.any(last.theta[:-1] == 0)


@pytest.mark.parametrize("solver_cls, family", [(Newton, "logistic"), (Exact, "linear"), (Newton, "linear")])
def test_a_restored_solver_repeats_the_run_bit_for_bit(solver_cls, family, linear):
    X, y = logistic_data() if family == "logistic" else linear
    opts = dict(l1=0.01, l2=0.005, tol=0.0, gtol=0.0)
    whole, _ = run(build(solver_cls, X, y, family, **opts), max_iter=6)
    cut = 0 if solver_cls is Exact else 2
    first = build(solver_cls, X, y, family, **opts)
    part, _ = run(first, max_iter=cut)
    resume_state = first.resume_state()
    second = build(solver_cls, X, y, family, **opts)
    second.load_static(first.static_arrays())
    last = part[-1]
    second.restore(Row(last.theta.copy(), last.loss, last.grad.copy(), last.lr,
                       {k: v.copy() for k, v in last.state.items()}), resume_state)
    rest, _ = run(second, rows=list(part), max_iter=6)
    assert len(rest) == len(whole) >= 2
    for a, b in zip(whole, rest, strict=True):
        assert a.loss == b.loss and a.lr == b.lr
        np.testing.assert_array_equal(a.theta, b.theta)
        np.testing.assert_array_equal(a.grad, b.grad)
        for k in a.state:
            np.testing.assert_array_equal(a.state[k], b.state[k])


# ---- the coordinate-descent kernel itself -------------------------------------------------------------
def lasso_quadratic(n, d, rng, l1, l2=0.0, corr=0.0):
    """H, g at θ₀ = 0 for sklearn's ElasticNet on (X, y) with the intercept last: min ½θᵀHθ + gᵀθ + λ₁‖w‖₁."""
    X = rng.normal(size=(n, d)) + corr * rng.normal(size=(n, 1))
    beta = np.where(rng.random(d) < 0.5, rng.normal(size=d), 0.0)
    y = X @ beta + 0.5 + 0.3 * rng.normal(size=n)
    A = np.column_stack([X, np.ones(n)])
    H = A.T @ A / n
    H[np.arange(d), np.arange(d)] += l2
    return X, y, H, -A.T @ y / n, np.append(np.full(d, l1), 0.0)


@pytest.mark.parametrize("d, corr", [(20, 0.0), (200, 0.0), (200, 0.5)])
def test_cd_matches_scikit_learn_with_exact_zeros(d, corr):
    rng = np.random.default_rng(d)
    X, y, H, g, a = lasso_quadratic(3 * d + 500, d, rng, l1=0.02, l2=0.01, corr=corr)
    res = l1_quadratic(H, g, np.zeros(d + 1), a)
    ref = SkElasticNet(alpha=0.03, l1_ratio=2 / 3, tol=1e-13, max_iter=10**6).fit(X, y)
    np.testing.assert_array_equal(res.theta[:-1] == 0, ref.coef_ == 0)
    # Normal equations of condition ≤ ~1e3 lose ≤ 3 digits to the Gram; sklearn's gap 1e-13 is tighter.
    assert rel_err(res.theta, np.append(ref.coef_, ref.intercept_)) < 1e-10
    # A warm start elsewhere (the gradient moved to θ₀ accordingly) reaches the same optimum.
    theta0 = rng.normal(size=d + 1)
    again = l1_quadratic(H, g + H @ theta0, theta0, a)
    np.testing.assert_array_equal(again.theta == 0, res.theta == 0)
    assert rel_err(again.theta, res.theta) < 1e-10


def test_cd_constant_feature_stays_zero_and_the_rest_is_unchanged():
    rng = np.random.default_rng(11)
    X, y, H, g, a = lasso_quadratic(800, 10, rng, l1=0.01)
    X0 = np.column_stack([X[:, :4], np.zeros(len(X)), X[:, 4:]])  # a constant (centred: zero) column
    H0 = np.insert(np.insert(H, 4, 0.0, axis=0), 4, 0.0, axis=1)
    g0, a0 = np.insert(g, 4, 0.0), np.insert(a, 4, 0.01)
    theta0 = np.zeros(12)
    theta0[4] = 3.0  # even started off zero, the flat coordinate goes to 0 (the penalty alone decides it)
    res = l1_quadratic(H0, g0, theta0, a0)
    ref = Lasso(alpha=0.01, tol=1e-13, max_iter=10**6).fit(X0, y)
    assert res.theta[4] == 0.0 and ref.coef_[4] == 0.0
    assert rel_err(res.theta, np.append(ref.coef_, ref.intercept_)) < 1e-10  # as above


def test_cd_that_cannot_converge_says_so():
    rng = np.random.default_rng(2)
    _, _, H, g, a = lasso_quadratic(300, 50, rng, l1=1e-4, corr=3.0)
    with pytest.raises(GradpipeError, match="did not converge in 2 sweeps"):
        l1_quadratic(H, g, np.zeros(51), a, max_sweeps=2)


@pytest.mark.parametrize("d", [20, 200, 1000])
def test_cd_time_at_d(d, record_property):
    """Driver time per solve (reported; the ceiling, 5× the measured time on a loaded 2-core machine, catches an
    accidental O(d³) per sweep, which at d = 1000 would take tens of seconds)."""
    rng = np.random.default_rng(d)
    _, _, H, g, a = lasso_quadratic(2 * d + 500, d, rng, l1=0.02)
    t0 = time.perf_counter()
    res = l1_quadratic(H, g, np.zeros(d + 1), a)
    seconds = time.perf_counter() - t0
    record_property("seconds", seconds)
    record_property("sweeps", res.sweeps)
    assert seconds < 0.01 * d + 1.0


def test_cd_refuses_a_non_finite_model():
    H, g = np.eye(3), np.array([1.0, np.nan, 0.0])
    with pytest.raises(GradpipeError, match="not finite"):
        l1_quadratic(H, g, np.zeros(3), np.array([0.1, 0.1, 0.0]))


@pytest.mark.parametrize("solver_cls", [Exact, Newton])
def test_linear_elastic_net_with_weights_and_an_offset_matches_scikit_learn(linear, solver_cls):
    """sklearn rescales sample weights to sum to n, so its objective is Σw r²/(2Σw) + penalty, ours; it has no
    offset, but for least squares z = Xθ + offset fitting y is Xθ fitting y − offset."""
    X, y = linear
    rng = np.random.default_rng(17)
    w, offset = rng.uniform(0.2, 3.0, size=len(y)), rng.normal(size=len(y))
    ref_model = SkElasticNet(alpha=0.05, l1_ratio=0.8, tol=1e-12, max_iter=10**6).fit(X, y - offset,
                                                                                     sample_weight=w)
    ref = np.append(ref_model.coef_, ref_model.intercept_)
    assert 0 < np.sum(ref_model.coef_ == 0) < len(SCALES)
    solver = build(solver_cls, X, y, "linear", l1=0.04, l2=0.01, w=w, offset=offset)
    rows, _ = run(solver)
    got = original(solver, rows[-1])
    np.testing.assert_array_equal(got[:-1] == 0, ref_model.coef_ == 0)
    assert rel_err(got, ref) < 1e-11  # as in the unweighted test (weights in [0.2, 3] barely change conditioning)
    assert solver.obj.passes == (1 if solver_cls is Exact else 2)


def test_newton_logistic_with_weights_and_an_offset_matches_glum():
    """glum normalizes sample weights to sum 1, which leaves Σwℓ/Σw + penalty unchanged."""
    X, y = logistic_data(seed=9)
    rng = np.random.default_rng(19)
    w, offset = rng.uniform(0.2, 3.0, size=len(y)), 0.5 * rng.normal(size=len(y))
    ref = glum_fit(X, y, "binomial", 0.02, 0.7, sample_weight=w, offset=offset)
    solver = build(Newton, X, y, "logistic", l1=0.014, l2=0.006, w=w, offset=offset)
    rows, _ = run(solver)
    got = original(solver, rows[-1])
    assert 0 < np.sum(ref[:-1] == 0) < 6
    np.testing.assert_array_equal(got[:-1] == 0, ref[:-1] == 0)
    assert_exact_zeros(rows)
    assert rel_err(got, ref) < 1e-8  # as in the unweighted glum test
    assert solver.obj.passes <= 10, solver.obj.passes


@pytest.mark.parametrize("l1_ratio", [1.0, 0.5])
def test_newton_poisson_elastic_net_with_weights_and_an_offset_matches_glum(l1_ratio):
    """Poisson (log link) with sample weights and an offset (log exposure); glum's weights normalized to sum 1
    leave Σwℓ/Σw + penalty unchanged."""
    rng = np.random.default_rng(23)
    n = 4000
    X = rng.normal(size=(n, 6)) * [1, 3, 0.2, 1, 10, 0.5] + [0, 1, 0, -2, 5, 0]
    offset = np.log(rng.uniform(0.5, 2.0, size=n))
    mu = np.exp(X @ np.array([0.3, 0.0, 1.0, -0.2, 0.0, 0.0]) - 0.5 + offset)
    y = rng.poisson(mu).astype(float)
    w = rng.uniform(0.2, 3.0, size=n)
    alpha = 0.04
    ref = glum_fit(X, y, "poisson", alpha, l1_ratio, sample_weight=w, offset=offset)
    solver = build(Newton, X, y, "poisson", l1=alpha * l1_ratio, l2=alpha * (1 - l1_ratio), w=w, offset=offset)
    rows, reason = run(solver)
    got = original(solver, rows[-1])
    assert 0 < np.sum(ref[:-1] == 0) < 6
    np.testing.assert_array_equal(got[:-1] == 0, ref[:-1] == 0)
    assert_exact_zeros(rows)
    assert rel_err(got, ref) < 1e-8  # as in the logistic glum test (glum's stopping sets the gap; measured 5e-12)
    assert solver.obj.passes <= 10, solver.obj.passes
    assert reason != "max_iter"
