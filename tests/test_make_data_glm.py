"""``gradpipe make-data`` for the log-link families: statsmodels' GLM on the generated files (with their weights
and offset) recovers truth.json, the dispersion is the documented one, and the output is deterministic.

Recovery is judged in units of the MLE's own standard errors (statsmodels' ``bse``, from the inverse Fisher
information, scaled by its Pearson estimate of the dispersion): the MLE is asymptotically normal, so with
20 000 rows each |z| < 5 fails by chance with probability ~6e-7 per coefficient, while a wrong law (weights
used as frequency instead of precision, a missing offset, a wrong power) shifts the estimates by many se.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import statsmodels.api as sm

from pipeline.cli import main
from pipeline.synth import GAMMA_SHAPE, TWEEDIE_PHI, SynthSpec, make_data
from tests.conftest import tree_hashes


def load(out: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """truth.json and every column of the part files, by name (npy columns named from truth['columns'])."""
    truth = json.loads((out / "truth.json").read_text())
    parts = sorted(p for p in out.iterdir() if p.name.startswith("part-"))
    if truth["format"] == "npy":
        data = np.concatenate([np.load(p) for p in parts])
        return truth, {c: data[:, j] for j, c in enumerate(truth["columns"])}
    tables = [pq.read_table(p) for p in parts]
    assert tables[0].column_names == truth["columns"]
    return truth, {c: np.concatenate([t.column(c).to_numpy().astype(np.float64) for t in tables])
                   for c in truth["columns"]}


def fit(truth: dict, cols: dict[str, np.ndarray]):
    """statsmodels GLM, log link, on standardized features (well conditioned); returns (result, true θ)."""
    X = np.column_stack([cols[c] for c in truth["feature_names"]])
    mu, sd = X.mean(0), X.std(0)
    link = sm.families.links.Log()
    family = {"poisson": sm.families.Poisson(link), "gamma": sm.families.Gamma(link),
              "tweedie": sm.families.Tweedie(var_power=truth["power"], link=link)}[truth["kind"]]
    w = cols[truth["weight"]] if truth["weight"] else None
    offset = cols[truth["offset"]] if truth["offset"] else None
    res = sm.GLM(cols["y"], sm.add_constant((X - mu) / sd), family=family, offset=offset,
                 var_weights=w).fit(tol=1e-12)
    coef = np.asarray(truth["coef"])
    return res, np.array([truth["intercept"] + coef @ mu, *(coef * sd)])


CASES = [("poisson", None, False, False), ("poisson", None, True, True), ("gamma", None, False, True),
         ("gamma", None, True, True), ("tweedie", 1.5, True, True), ("tweedie", 1.2, False, False)]


@pytest.mark.parametrize(("kind", "power", "weights", "offset"), CASES)
def test_statsmodels_recovers_the_truth(tmp_path, kind, power, weights, offset):
    spec = SynthSpec(kind, 20_000, 5, 2, "npy", seed=7, power=power, weights=weights, offset=offset)
    make_data(spec, tmp_path / "d")
    truth, cols = load(tmp_path / "d")
    assert truth["kind"] == kind and truth["power"] == {"poisson": 1.0, "gamma": 2.0}.get(kind, power)
    assert truth["weight"] == ("w" if weights else None) and truth["offset"] == ("log_exposure" if offset else None)
    res, true = fit(truth, cols)
    z = (res.params - true) / res.bse
    assert np.abs(z).max() < 5, z
    # The dispersion is the documented one: Pearson's estimate has relative sd ~ sqrt(2/n)·(kurtosis term),
    # about 2-3 % here for 20 000 rows; 10 % is a wide margin that still catches e.g. weights ignored.
    if kind != "poisson":
        assert res.scale == pytest.approx(truth["dispersion"], rel=0.10)
        assert truth["dispersion"] == {"gamma": 1 / GAMMA_SHAPE, "tweedie": TWEEDIE_PHI}[kind]
    # The linear predictor is moderate (documented: feature part has std 0.5).
    X = np.column_stack([cols[c] for c in truth["feature_names"]])
    assert np.std(X @ np.asarray(truth["coef"])) == pytest.approx(0.5, rel=0.05)  # sample sd: ~1 % here


def test_ignoring_the_offset_is_detected(tmp_path):
    """The recovery test can fail: fitting without the offset column leaves the intercept many se off."""
    make_data(SynthSpec("poisson", 20_000, 3, 1, "npy", seed=3, offset=True), tmp_path / "d")
    truth, cols = load(tmp_path / "d")
    res, true = fit({**truth, "offset": None}, cols)
    assert abs((res.params[0] - true[0]) / res.bse[0]) > 10


def test_weights_are_precision_and_the_columns_are_as_documented(tmp_path):
    make_data(SynthSpec("poisson", 20_000, 2, 1, "parquet", seed=1, weights=True, offset=True), tmp_path / "d")
    truth, cols = load(tmp_path / "d")
    assert truth["columns"] == ["x0", "x1", "w", "log_exposure", "y"]
    w, off = cols["w"], cols["log_exposure"]
    assert 0.5 <= w.min() and w.max() <= 2.0 and np.log(0.5) - 1e-6 <= off.min() and off.max() <= np.log(2) + 1e-6
    # Poisson with exposure w: y·w is a count (up to float32 rounding of y, relative 2^-24 of y·w).
    counts = cols["y"] * w
    assert np.all(np.abs(counts - np.round(counts)) <= 1e-6 * np.maximum(1, counts))
    # Precision: Var(y | μ) = μ / w. Check the mean of (y - μ)² w / μ, which is 1 (sd ~ sqrt(2/n) ≈ 1 %).
    X = np.column_stack([cols["x0"], cols["x1"]])
    mu = np.exp(X @ np.asarray(truth["coef"]) + truth["intercept"] + off)
    assert np.mean((cols["y"] - mu) ** 2 * w / mu) == pytest.approx(1.0, abs=0.05)


def test_tweedie_has_exact_zeros_and_positive_values(tmp_path):
    make_data(SynthSpec("tweedie", 5_000, 2, 1, "npy", seed=2, power=1.5), tmp_path / "d")
    _, cols = load(tmp_path / "d")
    y = cols["y"]
    # P(N = 0) = exp(-λ) with λ = μ^0.5 / 0.5 ≈ 2.5 at μ ≈ 1.6: about 8-13 % zeros.
    assert 0.03 < np.mean(y == 0) < 0.3 and np.all(y >= 0)


def test_glm_output_is_deterministic_whatever_the_threads(tmp_path):
    spec = SynthSpec("tweedie", 3_000, 3, 3, "csv", seed=9, power=1.7, weights=True, offset=True)
    make_data(spec, tmp_path / "a", threads=1)
    make_data(spec, tmp_path / "b", threads=3)
    assert tree_hashes(tmp_path / "a") == tree_hashes(tmp_path / "b")
    assert (tmp_path / "a" / "part-00000.csv").read_text().splitlines()[0] == "x0,x1,x2,w,log_exposure,y"


@pytest.mark.parametrize(("args", "message"), [
    (["--kind", "poisson", "--power", "1.5"], "--power applies to --kind tweedie only"),
    (["--kind", "tweedie", "--power", "2"], "--power must lie strictly between 1 and 2"),
    (["--kind", "tweedie", "--power", "1"], "--power must lie strictly between 1 and 2"),
])
def test_bad_power_exits_2(tmp_path, capsys, args, message):
    assert main(["make-data", "--rows", "5", "--features", "2", "--out", str(tmp_path / "d"), *args]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_cli_writes_the_new_kinds(tmp_path):
    assert main(["make-data", "--kind", "gamma", "--rows", "50", "--features", "2", "--weights", "--offset",
                 "--format", "parquet", "--out", str(tmp_path / "d")]) == 0
    truth, cols = load(tmp_path / "d")
    assert (truth["kind"], truth["weight"], truth["offset"]) == ("gamma", "w", "log_exposure")
    assert np.all(cols["y"] > 0)
