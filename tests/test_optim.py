"""Tests for pipeline.optim: convergence, hand-computed steps, and bitwise checkpoint/resume."""

from __future__ import annotations

import io

import numpy as np
import pytest

from pipeline import optim as O

# Small strongly convex quadratic f(x) = 1/2 x^T Q x - b^T x, eigenvalues 1..10 (kappa = 10),
# with closed-form minimizer x* = Q^{-1} b.
_rng = np.random.default_rng(0)
_R, _ = np.linalg.qr(_rng.normal(size=(4, 4)))
Q = _R @ np.diag([1.0, 2.0, 5.0, 10.0]) @ _R.T
B = _rng.normal(size=4)
X_STAR = np.linalg.solve(Q, B)


def grad(x):
    return Q @ x - B


def run(opt, steps, x=None, state=None):
    x = np.zeros(4) if x is None else x
    state = opt.init(x) if state is None else state
    for _ in range(steps):
        updates, state = opt.update(grad(x), state, x)
        x = O.apply_updates(x, updates)
    return x, state


CONFIGS = {
    # lr = 1/L: contraction 1 - mu/L = 0.9 per step -> 0.9**400 ~ 5e-19.
    "sgd": (dict(schedule=0.1), 400),
    # lr*lambda in [0.05, 0.5]: heavy ball / Nesterov roots have modulus <= ~0.95 -> <1e-13.
    "momentum": (dict(schedule=0.05, beta=0.9), 600),
    "nesterov": (dict(schedule=0.05, beta=0.9), 600),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_converges_to_closed_form_minimizer(name):
    kwargs, steps = CONFIGS[name]
    x, state = run(O.make(name, **kwargs), steps)
    assert state.count == steps
    # Linear convergence leaves an error far below 1e-10 (see CONFIGS); the closed form itself
    # is accurate to ~kappa*eps ~ 1e-15, so 1e-10 is a meaningful yet safe bound.
    np.testing.assert_allclose(x, X_STAR, atol=1e-10)


def test_adam_converges():
    # Adam's normalized step only shrinks as its second-moment EMA (timescale 1/(1-b2) = 1000
    # steps) forgets early large gradients, so with a constant lr it converges slowly: after
    # 3000 steps the error is ~1e-7; 1e-5 is a safe bound that a wrong update still misses.
    x, _ = run(O.adam(0.05), 3000)
    np.testing.assert_allclose(x, X_STAR, atol=1e-5)
    # With a decaying lr the oscillation dies out completely (observed error ~1e-15).
    x, _ = run(O.adam(O.invscaling(0.1, power_t=0.5)), 3000)
    np.testing.assert_allclose(x, X_STAR, atol=1e-10)


def test_adam_steps_match_hand_computation():
    opt = O.adam(0.1, b1=0.9, b2=0.999, eps=1e-8)
    g1 = np.array([0.5, -2.0, 0.0])
    g2 = np.array([1.0, 1.0, 3.0])
    state = opt.init(np.zeros(3))
    u1, state = opt.update(g1, state, np.zeros(3))
    # Step 1: bias correction makes mu_hat = g, nu_hat = g^2, so the step is -lr*g/(|g|+eps).
    expected1 = np.array([-0.1 * 0.5 / (0.5 + 1e-8), 0.1 * 2.0 / (2.0 + 1e-8), 0.0])
    # Step 2, written out: mu = 0.9*0.1*g1 + 0.1*g2, nu = 0.999*0.001*g1^2 + 0.001*g2^2,
    # corrections 1 - 0.9^2 = 0.19 and 1 - 0.999^2 = 0.001999.
    mu = 0.09 * g1 + 0.1 * g2
    nu = 0.000999 * g1**2 + 0.001 * g2**2
    expected2 = -0.1 * (mu / 0.19) / (np.sqrt(nu / 0.001999) + 1e-8)
    u2, state = opt.update(g2, state, np.zeros(3))
    # A handful of roundings on each side (the constants above are themselves rounded): 1e-14.
    np.testing.assert_allclose(u1, expected1, rtol=1e-14, atol=0)
    np.testing.assert_allclose(u2, expected2, rtol=1e-14, atol=0)
    assert state.count == 2


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_steps_match_hand_computation(nesterov):
    lr, beta = 0.1, 0.9
    g1, g2 = np.array([1.0, -2.0]), np.array([0.5, 4.0])
    opt = O.momentum(lr, beta=beta, nesterov=nesterov)
    state = opt.init(np.zeros(2))
    u1, state = opt.update(g1, state, np.zeros(2))
    u2, state = opt.update(g2, state, np.zeros(2))
    v1, v2 = g1, beta * g1 + g2
    if nesterov:  # look-ahead through the velocity: g + beta * v_new
        e1, e2 = -lr * (g1 + beta * v1), -lr * (g2 + beta * v2)
    else:
        e1, e2 = -lr * v1, -lr * v2
    # Identical operation order to the hand formula except for association: 1 ulp-level.
    np.testing.assert_allclose(u1, e1, rtol=1e-15)
    np.testing.assert_allclose(u2, e2, rtol=1e-15)
    np.testing.assert_array_equal(state.velocity, v2)


def test_update_is_pure():
    opt = O.adam(0.1)
    params, g = np.ones(3), np.array([1.0, -1.0, 2.0])
    state = opt.init(params)
    _, s1 = opt.update(g, state, params)
    _, s1 = opt.update(g, s1, params)
    before = {k: v.copy() for k, v in O.state_to_arrays(s1).items()}
    g_copy = g.copy()
    opt.update(g, s1, params)
    for k, v in O.state_to_arrays(s1).items():
        np.testing.assert_array_equal(v, before[k])
    np.testing.assert_array_equal(g, g_copy)


def _roundtrip_through_npz(arrays):
    """Serialize like a store would: bytes out, bytes in (no shared memory with the original)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    buf.seek(0)
    with np.load(buf) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adam"])
def test_checkpoint_roundtrip_and_resume_is_bitwise(name):
    opt = O.make(name, schedule=O.invscaling(0.05))
    x_mid, state_mid = run(opt, 7)
    arrays = O.state_to_arrays(state_mid)
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    assert arrays["count"].dtype == np.int64 and arrays["count"] == 7
    stored = _roundtrip_through_npz(arrays)
    for kind in (opt, type(state_mid)):
        restored = O.state_from_arrays(kind, stored)
        assert type(restored) is type(state_mid)
        for a, b in zip(restored, state_mid, strict=True):
            assert type(a) is type(b)
            np.testing.assert_array_equal(a, b)
    restored = O.state_from_arrays(opt, stored)
    x_resumed, s_resumed = run(opt, 20, x=x_mid.copy(), state=restored)
    x_straight, s_straight = run(opt, 27)
    # Bitwise: pure functions of bitwise-identical inputs must give identical floats.
    assert x_resumed.tobytes() == x_straight.tobytes()
    for a, b in zip(
        O.state_to_arrays(s_resumed).values(), O.state_to_arrays(s_straight).values(), strict=True
    ):
        assert a.tobytes() == b.tobytes()


def test_state_from_arrays_rejects_mismatched_fields():
    arrays = O.state_to_arrays(O.adam(0.1).init(np.zeros(2)))
    with pytest.raises(ValueError):
        O.state_from_arrays(O.MomentumState, arrays)
    with pytest.raises(TypeError):
        O.state_from_arrays(dict, arrays)


def test_schedules():
    lr, p = 0.3, 0.25
    sched = O.invscaling(lr, power_t=p)
    for t in (0, 1, 9, 1000):
        # sklearn's eta0 / t**power_t with its 1-based t; same expression, so exact.
        assert sched(t) == lr / (t + 1) ** p
    assert sched(0) == lr
    assert O.constant(0.7)(0) == O.constant(0.7)(10**6) == 0.7
    # A float schedule is a constant one.
    x1, _ = run(O.sgd(0.1), 5)
    x2, _ = run(O.sgd(O.constant(0.1)), 5)
    assert x1.tobytes() == x2.tobytes()


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adam"])
def test_schedule_sees_zero_based_step_count(name):
    # The first update must use schedule(0) = the base lr (invscaling's t=1 in sklearn terms).
    seen: list[int] = []
    opt = O.make(name, schedule=lambda t: seen.append(t) or 0.1)
    run(opt, 3)
    assert seen == [0, 1, 2]


def test_make():
    assert set(O.OPTIMIZERS) == {"sgd", "momentum", "nesterov", "adam"}
    with pytest.raises(ValueError, match="adam.*momentum.*nesterov.*sgd"):
        O.make("rmsprop", schedule=0.1)
    x1, _ = run(O.make("nesterov", schedule=0.05, beta=0.8), 10)
    x2, _ = run(O.momentum(0.05, beta=0.8, nesterov=True), 10)
    assert x1.tobytes() == x2.tobytes()
    x3, _ = run(O.make("momentum", schedule=0.05, beta=0.8), 10)
    assert x3.tobytes() != x1.tobytes()
