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
from scipy.special import gammaln, xlogy

if TYPE_CHECKING:
    from pipeline.stats import TargetStats

AUC_BINS = 8192
AUC_ZMAX = 32.0
NEWTON_MAX_FEATURES = 4096  # the d×d Gram per pass and the driver's O(d³) solve stay cheap up to here
Z_MAX = 700.0  # log-link exponentials take z clamped to ±Z_MAX: e^700 ≈ 1e304 is still finite


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
    n_y_terms = 0  # how many per-row terms :meth:`y_terms` gives (their weighted sums: null deviance, AIC)
    canonical = True  # ℓ'' does not depend on y: observed and expected information agree (see :meth:`fisher`)

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

    def fisher(self, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        """E[ℓ''] per row, the expected information's weight: ℓ'' itself for a canonical link (linear,
        logistic, Poisson). Standard errors use it, as statsmodels and glum do; Newton steps use ℓ''."""
        return self.d2(z, y)

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

    @abstractmethod
    def pearson(self, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(y − μ)²/V(μ) per row: the Pearson χ² terms (summed by the Newton pass when :attr:`uses_pearson`)."""

    def y_terms(self, y: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
        """(n_y_terms, n) per-row quantities of y and the offset alone (not of θ), whose weighted sums the
        Newton pass returns: what the null deviance (the intercept-only model, fitted with the offset, as
        statsmodels does) and the AIC need. ``offset`` None is an offset of 0."""
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

    def first_outside(self, summary: TargetStats) -> tuple[float, int] | None:
        """The first (value, row) outside a lower bound of 0 from the summary, when it recorded one."""
        if self.y_lower != 0.0:
            return None
        return summary.first_nonpositive if self.y_lower_strict else summary.first_negative

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
    def dispersion(self, deviance: float, pearson: float, df_resid: float) -> float:
        """φ from the deviance or Pearson's χ² (w-weighted sums) and the residual degrees of freedom."""
        return 1.0

    @abstractmethod
    def null_deviance(self, info: dict[str, Any]) -> float:
        """Deviance of the intercept-only model, from the information the fit's last pass holds: the TSQR
        R factor of ``[1 | X_std | y]`` (``info["R"]``) or the Newton pass's ``n`` (Σw), ``sum_y`` (Σwy) and
        ``y_terms``. The null model is the weighted mean of y (an offset is not part of it)."""

    @property
    def checks_y(self) -> bool:
        """Whether training must check the target (a domain narrower than the finite numbers ingest allows)."""
        return type(self).invalid_y is not Family.invalid_y

    @abstractmethod
    def aic(self, info: dict[str, Any], deviance: float, n_params: int, dispersion: float) -> float:
        """Akaike's criterion at the fitted model (statsmodels' convention; NaN where its likelihood needs
        sums no pass collects). ``info`` as for :meth:`null_deviance`, plus ``rows`` and ``weighted``."""


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
        if w is None:
            return np.array([0.5 * (r @ r), 0.5 * (c @ c)])
        return np.array([0.5 * (w @ (r * r)), 0.5 * (w @ (c * c))])

    def metrics(self, sums, n):
        sse, sst = 2 * float(sums[0]), 2 * float(sums[1])
        return {"mse": sse / n, "rmse": math.sqrt(sse / n), "r2": 1.0 - sse / sst if sst > 0 else math.nan,
                "deviance": sse, "null_deviance": sst}

    def null_predictor(self, mean_y):
        return mean_y

    def pearson(self, z, y):
        return (y - z) ** 2

    def dispersion(self, deviance, pearson, df_resid):
        return deviance / df_resid  # σ², the residual variance

    def null_deviance(self, info):
        R = info["R"]  # with the ones column first, what is left of y after the intercept: Σ(y − ȳ)²
        return float(R[1:, -1] @ R[1:, -1])

    def aic(self, info, deviance, n_params, dispersion):
        """statsmodels OLS; weighted, its likelihood needs Σ log w, which no pass collects: NaN."""
        if info.get("weighted"):
            return math.nan
        n = info["rows"]
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
            e = np.abs(z)
            np.negative(e, out=e)
            np.exp(e, out=e)  # one exp for all three: log1p(e), the sigmoid, its derivative
            d = 1.0 + e
            loss = np.maximum(z, 0.0)
            loss -= y * z
            loss += np.log1p(e)
            p = np.where(z >= 0, 1.0, e)
            p /= d
            p -= y
            return loss, p, e / (d * d)  # σ(1−σ) = e/(1+e)² for either sign of z (in place: the same bits)

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
        hit = (z > 0) == (y > 0.5)
        zc = np.clip(np.nan_to_num(z, nan=0.0), -AUC_ZMAX, AUC_ZMAX)  # NaN cannot be ranked (log-loss is NaN)
        idx = np.minimum(((zc + AUC_ZMAX) * (AUC_BINS / (2 * AUC_ZMAX))).astype(np.int64), AUC_BINS - 1)
        if w is None:
            pos = np.bincount(idx[y == 1], minlength=AUC_BINS)
            neg = np.bincount(idx[y == 0], minlength=AUC_BINS)
            sums = [self.loss(z, y).sum(), self.loss(z0, y).sum(), np.count_nonzero(hit)]
        else:  # each row counts with its weight: weighted log-loss, accuracy and AUC (sklearn's sample_weight)
            pos = np.bincount(idx[y == 1], weights=w[y == 1], minlength=AUC_BINS)
            neg = np.bincount(idx[y == 0], weights=w[y == 0], minlength=AUC_BINS)
            sums = [w @ self.loss(z, y), w @ self.loss(z0, y), w @ hit]
        return np.concatenate([sums, pos, neg]).astype(float)

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

    def pearson(self, z, y):
        p = expit(z)
        return (y - p) ** 2 / (p * (1.0 - p))

    def aic(self, info, deviance, n_params, dispersion):
        return deviance + 2.0 * n_params  # for 0/1 targets the log-likelihood is −deviance/2 (weighted too)

    def null_deviance(self, info):
        """The intercept-only model at the weighted mean of y; with an offset (``info["offset"]``) its
        intercept solves Σ w (σ(b + o) − y) = 0, which no sum of a pass decides (statsmodels fits it): NaN."""
        if info.get("offset"):
            return math.nan
        n, sum_y = info["n"], info["sum_y"]
        z0 = self.null_predictor(sum_y / n)
        return 2.0 * (n * float(np.logaddexp(0.0, z0)) - z0 * sum_y)


class LogLink(Family):
    """The Tweedie family of power p with a log link: Poisson (p = 1), Gamma (p = 2), compound Poisson–Gamma
    (1 < p < 2). With μ = eᶻ and the unit deviance / 2 (glum's and scikit-learn's convention, ℓ = 0 at μ = y):

        ℓ(z, y) = c(y) − y·κ₁(z) + κ₂(z),   ℓ′ = e⁽²⁻ᵖ⁾ᶻ − y·e⁽¹⁻ᵖ⁾ᶻ,   ℓ″ = (2−p)·e⁽²⁻ᵖ⁾ᶻ + (p−1)·y·e⁽¹⁻ᵖ⁾ᶻ

    with κ₁ = e⁽¹⁻ᵖ⁾ᶻ/(1−p), κ₂ = e⁽²⁻ᵖ⁾ᶻ/(2−p) and c(y) = y²⁻ᵖ/((1−p)(2−p)) (the limits p → 1: κ₁ = z,
    c = y log y − y; p → 2: κ₂ = z, c = −log y − 1). ℓ″ ≥ 0 for y ≥ 0, so the objective is convex.

    Overflow: the exponentials take z clamped to ±``Z_MAX`` (700: e⁷⁰⁰ ≈ 1e304 is still finite), so a wild
    trial step of a line search gets a huge, finite loss and is rejected, and nothing warns; any z a fit can
    reach (|z| < 700 means μ between 1e-304 and 1e304) is computed exactly.
    """

    power = 1.0
    gate_metric = "mean_deviance"
    canonical = False  # the log link is canonical for Poisson only
    uses_pearson = True  # the dispersion is Pearson's χ²/df (statsmodels' default scale), except Poisson's
    n_y_terms = 5  # c(y), then the offset's sums of the null model (see :meth:`y_terms`)
    y_lower = 0.0

    def __init__(self, power: float | None = None):
        if power is not None:
            self.power = float(power)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.power == self.power

    def __hash__(self) -> int:
        return hash((type(self), self.power))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(power={self.power:g})"

    # ---- pointwise math ------------------------------------------------------------------------------
    def _exps(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(clamped z, e^{(1−p)z}, e^{(2−p)z}); an exponent of 0 (p = 1 or 2) is exactly 1."""
        zc = np.clip(z, -Z_MAX, Z_MAX)
        p = self.power
        with np.errstate(under="ignore"):
            a = np.ones_like(zc) if p == 1.0 else np.exp((1.0 - p) * zc)
            b = np.ones_like(zc) if p == 2.0 else np.exp((2.0 - p) * zc)
        return zc, a, b

    def _c(self, y: np.ndarray) -> np.ndarray:
        p = self.power
        if p == 1.0:
            return xlogy(y, y) - y
        if p == 2.0:
            return -np.log(y) - 1.0
        return np.power(y, 2.0 - p) / ((1.0 - p) * (2.0 - p))

    def _loss(self, zc, a, b, y):
        p = self.power
        k1 = zc if p == 1.0 else a / (1.0 - p)
        k2 = zc if p == 2.0 else b / (2.0 - p)
        return self._c(y) - y * k1 + k2

    def loss(self, z, y):
        return self._loss(*self._exps(np.asarray(z, dtype=np.float64)), y)

    def d1(self, z, y):
        _, a, b = self._exps(np.asarray(z, dtype=np.float64))
        return b - y * a

    def d2(self, z, y):
        _, a, b = self._exps(np.asarray(z, dtype=np.float64))
        return (2.0 - self.power) * b + (self.power - 1.0) * y * a

    def fisher(self, z, y):
        """E[ℓ''] = μ²⁻ᵖ = e⁽²⁻ᵖ⁾ᶻ (y replaced by its mean μ in ℓ'')."""
        return self._exps(np.asarray(z, dtype=np.float64))[2]

    def derivatives(self, z, y):
        zc, a, b = self._exps(z)
        return self._loss(zc, a, b, y), b - y * a, (2.0 - self.power) * b + (self.power - 1.0) * y * a

    def residual(self, z, y, b, acc, *buffers):
        z += b
        loss, r, _ = self.derivatives(z, y)
        acc[1] += loss.sum()
        acc[0] += r.sum()
        return r

    def inverse_link(self, z):
        with np.errstate(under="ignore"):
            return np.exp(np.clip(np.asarray(z, dtype=np.float64), -Z_MAX, Z_MAX))

    # ---- the target ------------------------------------------------------------------------------------
    def invalid_y(self, y):
        return ~np.isfinite(y) | ((y <= 0) if self.y_lower_strict else (y < 0))

    def y_domain(self):
        return "positive values (y > 0)" if self.y_lower_strict else "non-negative values (y ≥ 0)"

    def y_advice(self):
        return " Use --model tweedie or poisson for targets with zeros." if self.y_lower_strict else ""

    # ---- metrics -----------------------------------------------------------------------------------------
    def metric_sums(self, z, y, center, w=None):
        z0 = np.full_like(z, self.null_predictor(center))
        if w is None:
            return np.array([self.loss(z, y).sum(), self.loss(z0, y).sum()])
        return np.array([w @ self.loss(z, y), w @ self.loss(z0, y)])

    def metrics(self, sums, n):
        dev, null = 2 * float(sums[0]), 2 * float(sums[1])
        return {"mean_deviance": dev / n, "d2": 1.0 - dev / null if null > 0 else math.nan, "deviance": dev,
                "null_deviance": null}

    def null_predictor(self, mean_y):
        # all-zero targets (Poisson/Tweedie): the limit μ → 0, clamped where e^z is still a normal float
        return math.log(mean_y) if mean_y > 0 else -Z_MAX

    # ---- inference -------------------------------------------------------------------------------------
    def pearson(self, z, y):
        """(y − μ)²/μᵖ, as (y·μ^{−p/2} − μ^{1−p/2})², whose factors stay finite for |z| ≤ Z_MAX where (y − μ)²
        would not; a term whose true value exceeds the float range (|z| ≳ 350 at y ~ 1) is +inf, silently:
        it is only summed at a fitted optimum, where such a term means the model is degenerate anyway."""
        zc = np.clip(np.asarray(z, dtype=np.float64), -Z_MAX, Z_MAX)
        with np.errstate(under="ignore", over="ignore"):
            r = y * np.exp(-0.5 * self.power * zc) - np.exp((1.0 - 0.5 * self.power) * zc)
            return r * r

    def y_terms(self, y, offset=None):
        """[c(y), e^{(2−p)o}, y e^{(1−p)o}, y·o, o]: Σw c(y) is the y-only part of every deviance; with the
        other four the null model fitted with the offset o has a closed form (see :meth:`null_deviance`)."""
        y = np.asarray(y, dtype=np.float64)
        if offset is None:
            zero = np.zeros_like(y)
            return np.stack([self._c(y), np.ones_like(y), y, zero, zero])
        o = np.clip(np.asarray(offset, dtype=np.float64), -Z_MAX, Z_MAX)
        p = self.power
        with np.errstate(under="ignore"):
            a = np.ones_like(o) if p == 2.0 else np.exp((2.0 - p) * o)
            b = y if p == 1.0 else y * np.exp((1.0 - p) * o)
        return np.stack([self._c(y), a, b, y * o, o])

    def dispersion(self, deviance, pearson, df_resid):
        return pearson / df_resid

    def null_deviance(self, info):
        """statsmodels' null model: the intercept b alone, with the offset o. With the weighted sums
        C = Σw c(y), A = Σw e^{(2−p)o}, B = Σw y e^{(1−p)o}, its score equation Σw(e^{(2−p)(b+o)} −
        y e^{(1−p)(b+o)}) = 0 gives e^b = B/A (without an offset: the weighted mean of y), and its deviance is

            2(C − B^{2−p}A^{p−1}/((1−p)(2−p)))     (1 < p < 2)
            2(C + B − B·b − Σw y o)                 (p = 1)
            2(C + A + A·b + Σw o)                   (p = 2)

        B = 0 (all targets 0: Poisson, Tweedie) is the limit b → −∞, where every term but C vanishes."""
        C, A, B, syo, so = (float(v) for v in info["y_terms"][:5])
        p = self.power
        if B <= 0.0:
            return 2.0 * C
        if p == 1.0:
            return 2.0 * (C + B - B * math.log(B / A) - syo)
        if p == 2.0:
            return 2.0 * (C + A + A * math.log(B / A) + so)
        return 2.0 * (C - math.exp((2.0 - p) * math.log(B) + (p - 1.0) * math.log(A)) / ((1.0 - p) * (2.0 - p)))

    def aic(self, info, deviance, n_params, dispersion):
        """Tweedie with 1 < p < 2 has no closed-form likelihood: NaN (statsmodels' is a series expansion)."""
        return math.nan


class Poisson(LogLink):
    """Counts (or rates with an offset log(exposure)): ℓ = y log y − y − yz + eᶻ."""

    name = "poisson"
    power = 1.0
    canonical = True
    uses_pearson = False  # φ = 1
    n_y_terms = 6

    def y_terms(self, y, offset=None):
        """:meth:`LogLink.y_terms` and log y! (the AIC's normalizing constant)."""
        return np.concatenate([super().y_terms(y, offset), gammaln(np.asarray(y, dtype=np.float64) + 1.0)[None, :]])

    def dispersion(self, deviance, pearson, df_resid):
        return 1.0

    def aic(self, info, deviance, n_params, dispersion):
        # statsmodels: llf = Σ w (y log μ − μ − log y!) = −deviance/2 + Σ w (y log y − y − log y!)
        c, lgam = float(info["y_terms"][0]), float(info["y_terms"][5])
        return -2.0 * (-0.5 * deviance + c - lgam) + 2.0 * n_params


class Gamma(LogLink):
    """Positive, right-skewed targets (severities, durations): ℓ = z − log y + y e⁻ᶻ − 1."""

    name = "gamma"
    power = 2.0
    y_lower_strict = True

    def aic(self, info, deviance, n_params, dispersion):
        """statsmodels' Gamma log-likelihood at the estimated dispersion φ, for unit weights:
        llf = n(ν log ν − ν − log Γ(ν)) − ν·deviance/2 − Σ log y with ν = 1/φ. Its var_weights variant needs
        per-row terms of the weights that no pass collects: NaN for a weighted fit."""
        if info.get("weighted"):
            return math.nan
        n, nu = info["n"], 1.0 / dispersion
        sum_log_y = -(float(info["y_terms"][0]) + n)  # c(y) = −log y − 1
        llf = n * (nu * math.log(nu) - nu - math.lgamma(nu)) - nu * 0.5 * deviance - sum_log_y
        return -2.0 * llf + 2.0 * n_params


class Tweedie(LogLink):
    """Compound Poisson–Gamma, 1 < p < 2: non-negative targets with exact zeros (pure premiums)."""

    name = "tweedie"
    power = 1.5

    def __init__(self, power: float | None = None):
        super().__init__(power)
        if not 1.0 < self.power < 2.0:
            raise ValueError(f"the Tweedie power must be between 1 and 2 (exclusive), not {self.power:g}; "
                             f"use --model poisson for 1 or --model gamma for 2.")


FAMILIES: dict[str, Family] = {f.name: f for f in (Gaussian(), Binomial(), Poisson(), Gamma(), Tweedie())}


def get_family(family: str | Family, power: float | None = None) -> Family:
    """The family object for a name (``power``: the Tweedie power, ignored by families without one)."""
    if isinstance(family, Family):
        return family
    if family == "tweedie" and power is not None:
        return Tweedie(power)
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown model {family!r}; expected one of {sorted(FAMILIES)}") from None
