"""GLM families: everything that differs between linear and logistic regression lives here (pure NumPy).

A family is the pointwise loss ℓ(z, y) of the linear predictor z with its first and second derivatives,
the y domain, the inverse link, the metrics and the quality-gate metric, how its inference is done, and
which solver ``--solver auto`` picks. Nothing outside this module asks ``if model == …``: a new family is a
subclass and one line in :data:`FAMILIES` (scikit-learn's ``_loss`` module is the anchor).

Losses are per row, so the objective is their mean: ½(z − y)² (linear) and log(1 + eᶻ) − yz (logistic).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pipeline.stats import TargetStats

AUC_BINS = 8192
AUC_ZMAX = 32.0
NEWTON_MAX_FEATURES = 4096  # the d×d Gram per pass and the driver's O(d³) solve stay cheap up to here


def expit(z: np.ndarray) -> np.ndarray:
    """Logistic sigmoid that never overflows: ``exp`` only ever sees ``-|z| <= 0``."""
    z = np.asarray(z, dtype=np.float64)
    with np.errstate(under="ignore"):  # exp(-1e4) -> 0.0 is the correctly rounded answer
        e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0, e) / (1.0 + e)


def auc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """(trapezoid AUC, bound on its error vs the exact AUC) from per-bin class counts in score order."""
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan, math.nan  # AUC is undefined with one class (sklearn raises)
    above = np.cumsum(pos[::-1])[::-1] - pos  # positives in strictly higher bins
    auc = float(neg @ (above + 0.5 * pos)) / (n_pos * n_neg)
    return auc, 0.5 * float(pos @ neg) / (n_pos * n_neg)


class Family(ABC):
    """The interface; see :class:`Gaussian` and :class:`Binomial`."""

    name = "base"
    gate_metric = "loss"  # lower is better
    curvature_bound: float | None = None  # sup ℓ'' over z and y, when there is one (--lr auto uses it)
    constant_hessian = False  # ℓ'' does not depend on z: one Newton step is exact
    supports_exact = False  # least squares: the one-pass TSQR solver applies
    classifier = False  # predictions also get a 0/1 label (z > 0)
    information = "hessian"  # inference from the weighted Gram ("hessian") or the R factor ("qr")
    stat_name = "z"  # t when the dispersion is estimated
    buffers: tuple[str, ...] = ()  # dtypes of the scratch vectors :meth:`residual` needs
    # A lower bound of the y domain that min(y) decides, for :meth:`y_in_domain`: e.g. Poisson sets
    # ``y_lower = 0.0`` (y ≥ 0), Gamma ``y_lower = 0.0, y_lower_strict = True`` (y > 0). None: no bound.
    y_lower: float | None = None
    y_lower_strict = False
    uses_pearson = False  # the Newton pass sums the Pearson χ² terms (an estimated dispersion needs them)
    n_y_terms = 0  # how many y-only per-row terms :meth:`y_terms` gives (their weighted sums: null deviance, AIC)

    # ---- pointwise math ------------------------------------------------------------------------------
    @abstractmethod
    def loss(self, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        """ℓ(z, y) per row."""

    @abstractmethod
    def d1(self, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        """∂ℓ/∂z per row."""

    @abstractmethod
    def d2(self, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        """∂²ℓ/∂z² per row (the IRLS weight)."""

    def derivatives(self, z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ℓ, ℓ', ℓ'') per row at once (the Newton pass); families share their intermediate terms."""
        return self.loss(z, y), self.d1(z, y), self.d2(z, y)

    @abstractmethod
    def inverse_link(self, z: np.ndarray) -> np.ndarray:
        """The mean of y given z (predictions on the response scale)."""

    def residual(self, z: np.ndarray, y: np.ndarray, b: float, acc: np.ndarray, *buffers: np.ndarray) -> np.ndarray:
        """The fused value+gradient kernel's inner step: ``z`` holds ``X_b @ w``; return ℓ'(z + b, y) (it may
        overwrite ``z`` or a buffer) and add ``[Σ ℓ', Σ ℓ]`` to ``acc``. Subclasses do this in place."""
        z += b
        acc[1] += self.loss(z, y).sum()
        r = self.d1(z, y)
        acc[0] += r.sum()
        return r

    def pearson(self, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(y − μ)²/V(μ) per row: the Pearson χ² terms (read when :attr:`uses_pearson`)."""
        raise NotImplementedError(f"the {self.name} family estimates no dispersion from Pearson's χ²")

    def y_terms(self, y: np.ndarray) -> np.ndarray:
        """(n_y_terms, n) per-row quantities of y alone, whose weighted sums the Newton pass returns."""
        return np.empty((0, len(y)))

    # ---- the target ------------------------------------------------------------------------------------
    def invalid_y(self, y: np.ndarray) -> np.ndarray:
        """Mask of targets outside the family's domain."""
        return ~np.isfinite(y)

    def y_domain(self) -> str:
        return "finite numbers"

    def y_advice(self) -> str:
        return ""

    def y_in_domain(self, summary: TargetStats | None) -> bool | None:
        """Whether every target lies in the domain, decided from the summary recorded at ingest, so that
        ``gradpipe train`` refuses a bad target before a cluster starts; None when there is no summary (a
        dataset ingested before it existed), which leaves the decision to training's cluster-side check.

        Ingest already refuses or drops non-finite targets, so the base domain (finite numbers) needs only
        the optional lower bound ``y_lower``, which ``min`` decides; a family with a discrete domain overrides.
        """
        if summary is None:
            return None
        if summary.count == 0 or self.y_lower is None:
            return True
        return summary.min > self.y_lower if self.y_lower_strict else summary.min >= self.y_lower

    def y_outside_count(self, summary: TargetStats | None) -> int | None:
        """How many targets lie outside the domain, when the summary counts them (for the message); None
        when it cannot tell (a bound that only ``min`` decides, or no summary)."""
        return None

    # ---- choosing a solver -----------------------------------------------------------------------------
    def auto_solver(self, n_features: int) -> str:
        return "newton" if n_features <= NEWTON_MAX_FEATURES else "lbfgs"

    # ---- metrics: additive sums per chunk, finished on the driver ---------------------------------------
    @abstractmethod
    def metric_sums(self, z: np.ndarray, y: np.ndarray, center: float, w: np.ndarray | None = None) -> np.ndarray:
        """``[Σ ℓ(z, y), Σ ℓ(z0, y)]`` plus the family's own sums; z0 is the intercept-only model's z, for
        ``center`` the mean of y."""

    @abstractmethod
    def metrics(self, sums: np.ndarray, n: float) -> dict[str, float]:
        """The metrics from the summed :meth:`metric_sums` of ``n`` rows."""

    @abstractmethod
    def null_predictor(self, mean_y: float) -> float:
        """z of the intercept-only model (the mean prediction equals the mean of y)."""

    # ---- inference -------------------------------------------------------------------------------------
    def dispersion(self, deviance: float, df_resid: float) -> float:
        return 1.0

    @abstractmethod
    def null_deviance(self, info: dict[str, Any]) -> float:
        """Deviance of the intercept-only model, from the information the fit's last pass holds: the TSQR
        R factor of ``[1 | X_std | y]`` (``info["R"]``) or the Newton pass's ``n`` and ``sum_y``."""

    @property
    def checks_y(self) -> bool:
        """Whether training must check the target (a domain narrower than the finite numbers ingest allows)."""
        return type(self).invalid_y is not Family.invalid_y

    @abstractmethod
    def aic(self, n: float, deviance: float, n_params: int) -> float:
        """Akaike's criterion at the fitted model (statsmodels' convention)."""


class Gaussian(Family):
    """Least squares: ℓ = ½(z − y)², identity link."""

    name = "linear"
    gate_metric = "rmse"
    curvature_bound = 1.0
    constant_hessian = True
    supports_exact = True
    information = "qr"
    stat_name = "t"

    def loss(self, z, y):
        r = z - y
        return 0.5 * r * r

    def d1(self, z, y):
        return z - y

    def d2(self, z, y):
        return np.ones_like(z)

    def inverse_link(self, z):
        return np.asarray(z, dtype=np.float64)

    def residual(self, z, y, b, acc, *buffers):
        z += b
        z -= y
        acc[0] += z.sum()
        acc[1] += 0.5 * (z @ z)  # halving is exact, and cheaper than building ½r² per row
        return z

    def auto_solver(self, n_features: int) -> str:
        return "exact" if n_features <= NEWTON_MAX_FEATURES else "lbfgs"

    def metric_sums(self, z, y, center, w=None):
        r = z - y
        c = y - center
        return np.array([0.5 * (r @ r), 0.5 * (c @ c)])

    def metrics(self, sums, n):
        sse, sst = 2 * float(sums[0]), 2 * float(sums[1])
        return {"mse": sse / n, "rmse": math.sqrt(sse / n), "r2": 1.0 - sse / sst if sst > 0 else math.nan,
                "deviance": sse, "null_deviance": sst}

    def null_predictor(self, mean_y):
        return mean_y

    def dispersion(self, deviance, df_resid):
        return deviance / df_resid  # σ², the residual variance

    def null_deviance(self, info):
        R = info["R"]  # with the ones column first, what is left of y after the intercept: Σ(y − ȳ)²
        return float(R[1:, -1] @ R[1:, -1])

    def aic(self, n, deviance, n_params):
        llf = -0.5 * n * (math.log(2 * math.pi) + math.log(deviance / n) + 1.0)  # σ² at its MLE RSS/n
        return -2.0 * llf + 2.0 * n_params  # statsmodels OLS counts the coefficients, not σ


class Binomial(Family):
    """Logistic regression: ℓ = log(1 + eᶻ) − yz for y ∈ {0, 1}, logit link."""

    name = "logistic"
    gate_metric = "log_loss"
    classifier = True
    curvature_bound = 0.25
    buffers = ("f8", "f8", "?")

    def loss(self, z, y):
        # logaddexp never forms e^z, so z = ±1e4 stays finite; its log1p(exp(-|z|)) may underflow to 0,
        # the correctly rounded result.
        with np.errstate(under="ignore"):
            return np.logaddexp(0.0, z) - y * z

    def d1(self, z, y):
        return expit(z) - y

    def d2(self, z, y):
        p = expit(z)
        return p * (1.0 - p)

    def derivatives(self, z, y):
        with np.errstate(under="ignore"):
            e = np.exp(-np.abs(z))  # one exp for all three: log1p(e), the sigmoid, its derivative
            loss = np.maximum(z, 0.0) - y * z + np.log1p(e)
            p = np.where(z >= 0, 1.0, e) / (1.0 + e)
            return loss, p - y, e / ((1.0 + e) * (1.0 + e))  # σ(1−σ) = e/(1+e)² for either sign of z

    def inverse_link(self, z):
        return expit(z)

    def residual(self, z, y, b, acc, t1, t2, pos):
        """The math of :func:`expit` and :meth:`loss` sharing one ``e = exp(-|z|)``, in preallocated buffers:
        ``log(1 + e^z) - y z = (max(z, 0) - y z) + log1p(e)``, whose first term is ``>= 0`` for 0/1 targets,
        so no large terms cancel; ``exp`` only ever sees ``-|z| <= 0``."""
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

    def invalid_y(self, y):
        return (y != 0) & (y != 1)

    def y_domain(self):
        return "0/1 values"

    def y_advice(self):
        return " Use --model linear or recode the target."

    def y_in_domain(self, summary: TargetStats | None) -> bool | None:
        """{0, 1} is not an interval, so min/max cannot decide it: the summary counts values other than 0/1."""
        return None if summary is None else summary.n_not_binary == 0

    def y_outside_count(self, summary: TargetStats | None) -> int | None:
        return None if summary is None else summary.n_not_binary

    def metric_sums(self, z, y, center, w=None):
        """Σ log-loss, Σ log-loss of the intercept-only model, #correct, and the logit histograms of the two
        classes that ROC AUC is computed from (see ``pipeline.evaluate``). Class 1 iff z > 0 (p > 0.5), the
        tie rule of sklearn's ``LogisticRegression.predict``."""
        z0 = np.full_like(z, self.null_predictor(center))
        correct = np.count_nonzero((z > 0) == (y > 0.5))
        zc = np.clip(np.nan_to_num(z, nan=0.0), -AUC_ZMAX, AUC_ZMAX)  # NaN cannot be ranked (log-loss is NaN)
        idx = np.minimum(((zc + AUC_ZMAX) * (AUC_BINS / (2 * AUC_ZMAX))).astype(np.int64), AUC_BINS - 1)
        pos = np.bincount(idx[y == 1], minlength=AUC_BINS)
        neg = np.bincount(idx[y == 0], minlength=AUC_BINS)
        return np.concatenate([[self.loss(z, y).sum(), self.loss(z0, y).sum(), correct], pos, neg]).astype(float)

    def metrics(self, sums, n):
        pos, neg = sums[3:3 + AUC_BINS], sums[3 + AUC_BINS:]
        auc, err = auc_from_histograms(pos, neg)
        dev, null = 2 * float(sums[0]), 2 * float(sums[1])
        return {"log_loss": float(sums[0]) / n, "accuracy": float(sums[2]) / n, "roc_auc": auc,
                "roc_auc_max_error": err, "deviance": dev, "null_deviance": null}

    def null_predictor(self, mean_y):
        if not 0.0 < mean_y < 1.0:
            return math.copysign(800.0, mean_y - 0.5)  # one class only: the limit of the MLE, loss exactly 0
        return math.log(mean_y / (1.0 - mean_y))

    def aic(self, n, deviance, n_params):
        return deviance + 2.0 * n_params  # for 0/1 targets the log-likelihood is −deviance/2

    def null_deviance(self, info):
        n, sum_y = info["n"], info["sum_y"]
        z0 = self.null_predictor(sum_y / n)
        return 2.0 * (n * float(np.logaddexp(0.0, z0)) - z0 * sum_y)


FAMILIES: dict[str, Family] = {f.name: f for f in (Gaussian(), Binomial())}


def get_family(family: str | Family, power: float | None = None) -> Family:
    """The family object for a name (``power``: the Tweedie power, ignored by families without one)."""
    if isinstance(family, Family):
        return family
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown model {family!r}; expected one of {sorted(FAMILIES)}") from None
