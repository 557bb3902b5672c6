"""First-order optimizers as pure state transitions (optax style, pure NumPy).

``update(grad, state, params) -> (updates, new_state)`` never mutates its inputs, and a state
is a NamedTuple of an int step count plus float64 arrays. That makes the state itself the
checkpoint: :func:`state_to_arrays` / :func:`state_from_arrays` round-trip it bitwise, so a
resumed run follows exactly the trajectory of an uninterrupted one.

Learning rates come from a :data:`Schedule` evaluated at the 0-based step count, so a driver
can implement loss-adaptive schedules by wrapping or swapping the schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "Schedule",
    "Optimizer",
    "SGDState",
    "MomentumState",
    "AdamState",
    "constant",
    "invscaling",
    "sgd",
    "momentum",
    "adam",
    "make",
    "apply_updates",
    "state_to_arrays",
    "state_from_arrays",
    "OPTIMIZERS",
]

Schedule = Callable[[int], float]
UpdateFn = Callable[[np.ndarray, Any, np.ndarray], tuple[np.ndarray, Any]]


class Optimizer(NamedTuple):
    """A pair of pure functions; ``init(params) -> state``, ``update(grad, state, params)``."""

    init: Callable[[np.ndarray], Any]
    update: UpdateFn


class SGDState(NamedTuple):
    count: int


class MomentumState(NamedTuple):
    count: int
    velocity: np.ndarray


class AdamState(NamedTuple):
    count: int
    mu: np.ndarray  # first-moment EMA (biased)
    nu: np.ndarray  # second-moment EMA (biased)


# ----------------------------------------------------------------------------- schedules


def constant(lr: float) -> Schedule:
    """Fixed step size."""
    lr = float(lr)
    return lambda step: lr


def invscaling(lr: float, power_t: float = 0.25) -> Schedule:
    """sklearn's ``eta0 / t**power_t`` with 1-based t, i.e. ``lr / (step + 1)**power_t``."""
    lr, power_t = float(lr), float(power_t)
    return lambda step: lr / (step + 1) ** power_t


def _as_schedule(schedule: Schedule | float) -> Schedule:
    return schedule if callable(schedule) else constant(schedule)


def _as_vector(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {x.shape}")
    return x


# ----------------------------------------------------------------------------- optimizers


def apply_updates(params: np.ndarray, updates: np.ndarray) -> np.ndarray:
    """``params + updates`` (updates are already the signed, descending step)."""
    return np.asarray(params, dtype=np.float64) + updates


def sgd(schedule: Schedule | float) -> Optimizer:
    """Plain gradient descent: ``-lr_t * g``."""
    sched = _as_schedule(schedule)

    def init(params: np.ndarray) -> SGDState:
        _as_vector(params, "params")
        return SGDState(count=0)

    def update(
        grad: np.ndarray, state: SGDState, params: np.ndarray | None = None
    ) -> tuple[np.ndarray, SGDState]:
        g = _as_vector(grad, "grad")
        return -sched(state.count) * g, SGDState(count=state.count + 1)

    return Optimizer(init, update)


def momentum(schedule: Schedule | float, beta: float = 0.9, nesterov: bool = False) -> Optimizer:
    """Heavy-ball momentum, optionally Nesterov, in the optax ``trace`` form.

    ``v <- beta*v + g``; the step is ``-lr_t * v`` (heavy ball) or ``-lr_t * (g + beta*v)``
    (Nesterov: the look-ahead is expressed through the velocity, so only the gradient at the
    current params is needed -- one distributed gradient pass per step).
    Keeping lr outside the velocity means a schedule change rescales the whole step at once.
    """
    sched = _as_schedule(schedule)
    beta = float(beta)

    def init(params: np.ndarray) -> MomentumState:
        return MomentumState(count=0, velocity=np.zeros_like(_as_vector(params, "params")))

    def update(
        grad: np.ndarray, state: MomentumState, params: np.ndarray | None = None
    ) -> tuple[np.ndarray, MomentumState]:
        g = _as_vector(grad, "grad")
        v = beta * state.velocity + g
        direction = g + beta * v if nesterov else v
        return -sched(state.count) * direction, MomentumState(count=state.count + 1, velocity=v)

    return Optimizer(init, update)


def adam(schedule: Schedule | float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Optimizer:
    """Adam (Kingma & Ba) with bias-corrected moments; eps is added outside the sqrt."""
    sched = _as_schedule(schedule)
    b1, b2, eps = float(b1), float(b2), float(eps)

    def init(params: np.ndarray) -> AdamState:
        zeros = np.zeros_like(_as_vector(params, "params"))
        return AdamState(count=0, mu=zeros, nu=zeros.copy())

    def update(
        grad: np.ndarray, state: AdamState, params: np.ndarray | None = None
    ) -> tuple[np.ndarray, AdamState]:
        g = _as_vector(grad, "grad")
        t = state.count + 1
        mu = b1 * state.mu + (1.0 - b1) * g
        nu = b2 * state.nu + (1.0 - b2) * (g * g)
        mu_hat = mu / (1.0 - b1**t)
        nu_hat = nu / (1.0 - b2**t)
        step = -sched(state.count) * mu_hat / (np.sqrt(nu_hat) + eps)
        return step, AdamState(count=t, mu=mu, nu=nu)

    return Optimizer(init, update)


OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {
    "sgd": sgd,
    "momentum": momentum,
    "nesterov": lambda schedule, **kw: momentum(schedule, nesterov=True, **kw),
    "adam": adam,
}


def make(name: str, **kwargs: Any) -> Optimizer:
    """Build an optimizer by name, e.g. ``make("adam", schedule=constant(1e-3), b1=0.9)``.

    ``schedule`` may also be a float (constant learning rate).
    """
    try:
        factory = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {sorted(OPTIMIZERS)}") from None
    return factory(**kwargs)


# ----------------------------------------------------------------------------- checkpointing


def state_to_arrays(state: NamedTuple) -> dict[str, np.ndarray]:
    """Flatten a state to ``{field: ndarray}`` (the count as a 0-d int64) for Zarr storage."""
    out: dict[str, np.ndarray] = {}
    for field, value in zip(state._fields, state, strict=True):
        if isinstance(value, (int, np.integer)):
            out[field] = np.asarray(value, dtype=np.int64)
        else:
            out[field] = np.array(value, dtype=np.float64, copy=True)
    return out


def state_from_arrays(kind: type | Optimizer, arrays: Mapping[str, np.ndarray]) -> NamedTuple:
    """Rebuild a state saved by :func:`state_to_arrays`.

    ``kind`` is the state class (e.g. ``AdamState``) or the :class:`Optimizer` that made it;
    for the latter the class is discovered from ``optimizer.init`` on an empty vector.
    """
    if isinstance(kind, Optimizer):
        cls = type(kind.init(np.zeros(0)))
    elif isinstance(kind, type) and issubclass(kind, tuple) and hasattr(kind, "_fields"):
        cls = kind
    else:
        raise TypeError(f"expected an Optimizer or a state NamedTuple class, got {kind!r}")
    fields = tuple(cls._fields)
    if set(arrays) != set(fields):
        raise ValueError(f"{cls.__name__} needs fields {sorted(fields)}, got {sorted(arrays)}")
    values: list[Any] = []
    for field in fields:
        arr = np.asarray(arrays[field])
        if field == "count":
            values.append(int(arr))
        else:
            values.append(np.array(arr, dtype=np.float64, copy=True))
    return cls(*values)
