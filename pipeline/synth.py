"""Deterministic synthetic regression/classification data with a known truth, for tests, demos and benches.

Why this shape of data:

- Features have very different scales and means (feature j is ``mean_j + scale_j * N(0, 1)`` with
  ``scale_j = F ** u_j``, ``u_j ~ U(-1, 1)`` and ``mean_j ~ U(-5F, 5F)`` for ``F = scale_spread``), so an
  optimiser that skips standardization visibly struggles.
- True coefficients are ``z_j / scale_j`` with ``z_j ~ N(0, 1)``: every feature matters equally once
  standardized. For logistic data they are rescaled so the logit has standard deviation 2.5 and the
  intercept centres it near 0 — learnable, balanced and far from separable (Bayes error ≈ 19 %).
- ``linear``: ``y = X @ coef + intercept + noise * N(0, 1)``. ``logistic``: ``y ~ Bernoulli(sigmoid(...))``
  as 0/1; ``noise`` is not used.
- ``poisson``, ``gamma``, ``tweedie`` (log link, ``μ = exp(η)``): the coefficients are rescaled so the feature
  part of η has standard deviation ``ETA_STD`` (0.5) and the intercept puts its mean at ``ETA_MEAN`` (0.5,
  typical μ ≈ 1.6): moderate, so counts are neither all 0 nor huge. ``poisson``: ``y ~ Poisson(μ)``.
  ``gamma``: shape ``GAMMA_SHAPE`` k = 2 (dispersion 1/k), mean μ. ``tweedie``: compound Poisson–Gamma with
  power p ∈ (1, 2) (``power``, default 1.5) and dispersion φ = ``TWEEDIE_PHI`` (1): ``N ~ Poisson(λ)``,
  ``λ = μ^(2-p) / (φ (2-p))``, y the sum of N Gamma(shape (2-p)/(p-1), scale φ (p-1) μ^(p-1)) draws.
- ``weights`` adds a column ``w ~ U(0.5, 2)`` (float32), used as a *precision* weight, the convention of
  glum's and scikit-learn's ``sample_weight`` and statsmodels' ``var_weights``: Var(y) = φ V(μ) / w with the
  same mean μ. Poisson: ``y = Poisson(w μ) / w`` (w is the exposure, y the rate); gamma: shape ``k w``;
  tweedie: dispersion ``φ / w``; linear: noise ``noise / √w``; logistic: y does not depend on w (importance
  weights). The weighted MLE then recovers the truth, and is the efficient estimator for the GLM kinds.
- ``offset`` adds a column ``log_exposure = log E``, ``E ~ U(0.5, 2)`` (float32), which enters η with
  coefficient 1 (``η = X @ coef + intercept + log_exposure``), as an offset does in training.
- X is rounded to float32 *before* y is computed, and y is rounded to float32 too, so the truth holds exactly
  for the stored values and CSV cells stay short: each cell is the shortest decimal that reads back as the
  same float32 (parse it as float64 and it is within 6e-8 relative of the float32 value).

Determinism: ``SeedSequence(seed).spawn(2)`` gives one child for the truth (so it does not depend on the
number of files) and one whose ``spawn(files)`` seeds each file. Each file is generated in fixed blocks of
``BLOCK_ROWS`` rows and y uses elementwise arithmetic in a fixed order (no BLAS), so the bytes are the same
whatever the number of writer threads (on one platform with the same numpy/pyarrow versions).

Files are written by a thread pool, not processes: the heavy parts (numpy's generators and ufuncs, Arrow's
CSV/Parquet encoders) release the GIL, so threads scale, without spawn's re-import of ``__main__`` (which
breaks unguarded scripts such as ``python -m pipeline``) or fork's hazards in a threaded parent.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import GradpipeError

KINDS = ("linear", "logistic", "poisson", "gamma", "tweedie")
LOG_LINK_KINDS = ("poisson", "gamma", "tweedie")
FORMATS = ("csv", "parquet", "npy")
BLOCK_ROWS = 131_072  # rows generated at a time (bounds memory) and the Parquet row-group size
LOGIT_STD = 2.5
ETA_STD = 0.5  # std of the feature part of the log-link predictor
ETA_MEAN = 0.5  # its mean (before any offset)
GAMMA_SHAPE = 2.0
TWEEDIE_PHI = 1.0
TWEEDIE_POWER = 1.5  # the default --power
WEIGHT_COLUMN = "w"
OFFSET_COLUMN = "log_exposure"
UNIFORM_RANGE = (0.5, 2.0)  # of the weights and of the exposure
TRUTH_FILE = "truth.json"
PART_RE = re.compile(r"part-\d{5,}\.(csv|parquet|npy)")


@dataclass(frozen=True)
class SynthSpec:
    """Everything that determines the output bytes."""

    kind: str
    rows: int
    features: int
    files: int
    format: str
    seed: int = 0
    noise: float = 0.1
    scale_spread: float = 10.0
    power: float | None = None  # tweedie only (default TWEEDIE_POWER)
    weights: bool = False
    offset: bool = False

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise GradpipeError(f"--kind must be one of {', '.join(KINDS)}, not {self.kind!r}.")
        if self.power is not None and self.kind != "tweedie":
            raise GradpipeError(f"--power applies to --kind tweedie only, not {self.kind}.")
        if self.kind == "tweedie" and not (math.isfinite(self.tweedie_power) and 1 < self.tweedie_power < 2):
            raise GradpipeError(f"--power must lie strictly between 1 and 2 (compound Poisson–Gamma), not "
                                f"{self.tweedie_power}.")
        if self.format not in FORMATS:
            raise GradpipeError(f"--format must be one of {', '.join(FORMATS)}, not {self.format!r}.")
        if self.rows < 1:
            raise GradpipeError(f"--rows must be at least 1, not {self.rows}.")
        if self.features < 1:
            raise GradpipeError(f"--features must be at least 1, not {self.features}.")
        if not 1 <= self.files <= self.rows:
            raise GradpipeError(f"--files must be between 1 and --rows ({self.rows}), not {self.files}.")
        if self.seed < 0:
            raise GradpipeError(f"--seed must be a non-negative integer, not {self.seed}.")
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise GradpipeError(f"--noise must be a finite number ≥ 0, not {self.noise}.")
        if not (math.isfinite(self.scale_spread) and self.scale_spread >= 1):
            raise GradpipeError(f"--scale-spread must be a finite number ≥ 1, not {self.scale_spread}.")

    @property
    def tweedie_power(self) -> float:
        return TWEEDIE_POWER if self.power is None else float(self.power)

    @property
    def family_power(self) -> float | None:
        """The Tweedie power of the response's law (Poisson 1, Gamma 2); None for linear/logistic."""
        return {"poisson": 1.0, "gamma": 2.0, "tweedie": self.tweedie_power}.get(self.kind)

    @property
    def feature_names(self) -> list[str]:
        return [f"x{j}" for j in range(self.features)]

    @property
    def extra_names(self) -> list[str]:
        """The weight and offset columns written, in file order (between the features and y)."""
        return [*([WEIGHT_COLUMN] if self.weights else []), *([OFFSET_COLUMN] if self.offset else [])]

    @property
    def column_names(self) -> list[str]:
        return [*self.feature_names, *self.extra_names, "y"]

    def part_rows(self) -> list[int]:
        """Rows per file, as even as possible (the first ``rows % files`` files get one more)."""
        q, r = divmod(self.rows, self.files)
        return [q + (i < r) for i in range(self.files)]

    def part_name(self, index: int) -> str:
        return f"part-{index:05d}.{self.format}"


@dataclass(frozen=True)
class Truth:
    """The generating parameters: raw-scale coefficients and intercept, plus each feature's mean/scale."""

    coef: np.ndarray
    intercept: float
    means: np.ndarray
    scales: np.ndarray


def make_truth(spec: SynthSpec) -> Truth:
    rng = np.random.default_rng(np.random.SeedSequence(spec.seed).spawn(2)[0])
    f = spec.scale_spread
    scales = f ** rng.uniform(-1.0, 1.0, spec.features)
    means = rng.uniform(-5.0 * f, 5.0 * f, spec.features)
    z = rng.standard_normal(spec.features)
    b0 = float(rng.standard_normal())
    if spec.kind == "logistic":
        z = z * (LOGIT_STD / max(float(np.sqrt(z @ z)), 1e-12))  # std of z·(X-mean)/scale is |z|
        coef = z / scales
        intercept = -float(_dot(means[None, :], coef)[0]) + 0.5 * b0  # logit mean ≈ 0: balanced classes
    elif spec.kind in LOG_LINK_KINDS:
        z = z * (ETA_STD / max(float(np.sqrt(z @ z)), 1e-12))
        coef = z / scales
        intercept = -float(_dot(means[None, :], coef)[0]) + ETA_MEAN + 0.25 * b0
    else:
        coef = z / scales
        intercept = b0
    return Truth(coef, intercept, means, scales)


def _dot(X: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """``X @ coef`` summed column by column in float64: same bits whatever BLAS and its thread count."""
    out = np.zeros(len(X))
    for j in range(X.shape[1]):
        out += X[:, j].astype(np.float64) * coef[j]
    return out


def generate_blocks(spec: SynthSpec, truth: Truth, index: int):
    """Yield (X, extras, y) float32 blocks of file ``index`` (extras: the weight and offset columns present,
    as in ``spec.extra_names``); the stream depends only on spec and index. Without weights or offsets the
    draws are those of the linear/logistic kinds before those options existed, so their bytes are unchanged.
    """
    child = np.random.SeedSequence(spec.seed).spawn(2)[1].spawn(spec.files)[index]
    rng = np.random.default_rng(child)
    left = spec.part_rows()[index]
    while left:
        b = min(left, BLOCK_ROWS)
        X = (truth.means + truth.scales * rng.standard_normal((b, spec.features))).astype(np.float32)
        # Rounded to float32 before use, like X: the truth holds for the stored values.
        w = rng.uniform(*UNIFORM_RANGE, b).astype(np.float32) if spec.weights else None
        off = np.log(rng.uniform(*UNIFORM_RANGE, b)).astype(np.float32) if spec.offset else None
        eta = _dot(X, truth.coef) + truth.intercept
        if off is not None:
            eta = eta + off.astype(np.float64)
        y = _response(spec, rng, eta, None if w is None else w.astype(np.float64))
        yield X, [a for a in (w, off) if a is not None], y.astype(np.float32)
        left -= b


def _response(spec: SynthSpec, rng: np.random.Generator, eta: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    """Draw y given the linear predictor; ``w`` is a precision weight (see the module docstring)."""
    if spec.kind == "linear":
        noise = spec.noise * rng.standard_normal(len(eta))
        return eta + (noise if w is None else noise / np.sqrt(w))
    if spec.kind == "logistic":
        return (rng.random(len(eta)) < 1.0 / (1.0 + np.exp(-eta))).astype(np.float64)
    mu = np.exp(eta)
    prec = np.ones(len(eta)) if w is None else w
    if spec.kind == "poisson":
        return rng.poisson(mu * prec) / prec
    if spec.kind == "gamma":
        shape = GAMMA_SHAPE * prec
        return rng.gamma(shape, mu / shape)
    p = spec.tweedie_power
    phi = TWEEDIE_PHI / prec
    counts = rng.poisson(mu ** (2 - p) / (phi * (2 - p)))
    # The sum of N iid Gamma(α, γ) draws is Gamma(Nα, γ); shape 0 gives exactly 0 (numpy's gamma(0) = 0).
    return rng.gamma(counts * ((2 - p) / (p - 1)), phi * (p - 1) * mu ** (p - 1))


def write_part(spec: SynthSpec, truth: Truth, index: int, path: str) -> int:
    """Write file ``index`` to ``path`` block by block; returns its size in bytes."""
    names = spec.column_names
    if spec.format == "npy":
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64,
                                        shape=(spec.part_rows()[index], len(names)))
        row = 0
        for X, extras, y in generate_blocks(spec, truth, index):
            out[row:row + len(X), :spec.features] = X
            for k, values in enumerate(extras):
                out[row:row + len(X), spec.features + k] = values
            out[row:row + len(X), -1] = y
            row += len(X)
        out.flush()
        del out
        return os.path.getsize(path)
    import pyarrow as pa

    schema = pa.schema([(n, pa.float32()) for n in names])

    def table(X: np.ndarray, extras: list[np.ndarray], y: np.ndarray) -> pa.Table:
        return pa.Table.from_arrays([*(pa.array(X[:, j]) for j in range(X.shape[1])),
                                     *(pa.array(e) for e in extras), pa.array(y)], schema=schema)

    if spec.format == "csv":
        import pyarrow.csv as pacsv

        with open(path, "wb") as fh:
            fh.write((",".join(names) + "\n").encode())  # unquoted header, on any pyarrow version
            with pacsv.CSVWriter(fh, schema, write_options=pacsv.WriteOptions(include_header=False)) as w:
                for X, extras, y in generate_blocks(spec, truth, index):
                    w.write_table(table(X, extras, y))
    else:
        import pyarrow.parquet as pq

        with pq.ParquetWriter(path, schema) as w:
            for X, extras, y in generate_blocks(spec, truth, index):
                w.write_table(table(X, extras, y), row_group_size=BLOCK_ROWS)
    return os.path.getsize(path)


@dataclass
class MakeDataResult:
    out: str
    files: int
    rows: int
    features: int
    bytes: int
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


def truth_json(spec: SynthSpec, truth: Truth) -> dict:
    return {"kind": spec.kind, "coef": truth.coef.tolist(), "intercept": truth.intercept, "seed": spec.seed,
            "noise": spec.noise, "feature_names": spec.feature_names, "target": "y", "rows": spec.rows,
            "features": spec.features, "files": spec.files, "format": spec.format,
            "scale_spread": spec.scale_spread, "feature_means": truth.means.tolist(),
            "feature_scales": truth.scales.tolist(),
            # The response's law: Tweedie power (Poisson 1, Gamma 2; None for linear/logistic), dispersion,
            # and the weight/offset columns (None when absent); columns lists every column in file order.
            "power": spec.family_power, "dispersion": _dispersion(spec),
            "weight": WEIGHT_COLUMN if spec.weights else None, "offset": OFFSET_COLUMN if spec.offset else None,
            "columns": spec.column_names}


def _dispersion(spec: SynthSpec) -> float | None:
    """φ of the unweighted law (a weighted row has φ / w): Var(y) = φ V(μ)."""
    return {"linear": spec.noise ** 2, "poisson": 1.0, "gamma": 1.0 / GAMMA_SHAPE,
            "tweedie": TWEEDIE_PHI}.get(spec.kind)


def make_data(spec: SynthSpec, out: str | Path, threads: int | None = None) -> MakeDataResult:
    """Generate ``spec`` into directory ``out`` (``part-00000.<fmt>``… plus ``truth.json``).

    Files are written to a hidden sibling directory and renamed into place only once all are complete, so
    a failure leaves ``out`` as it was. An existing ``out`` is replaced only if it is empty or holds a
    previous make-data output (``truth.json`` and ``part-*`` files); unknown files are never deleted.
    ``threads`` (writer threads) defaults to ``min(files, cpu_count)``; it never changes the bytes.
    """
    t0 = time.perf_counter()
    spec.validate()
    if threads is not None and threads < 1:
        raise GradpipeError(f"--threads must be at least 1, not {threads}.")
    from pipeline.store import location

    if location.is_remote(out):
        return _make_data_remote(spec, str(out), threads, t0)
    out = Path(out).absolute()
    _check_replaceable(out)
    truth = make_truth(spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = out.with_name(f".{out.name}.make-data-{uuid.uuid4().hex[:12]}")
    staged.mkdir()
    try:
        paths = [str(staged / spec.part_name(i)) for i in range(spec.files)]
        n_threads = min(spec.files, threads or os.cpu_count() or 1)
        if n_threads == 1:
            sizes = [write_part(spec, truth, i, p) for i, p in enumerate(paths)]
        else:
            with ThreadPoolExecutor(n_threads) as pool:
                sizes = list(pool.map(write_part, [spec] * spec.files, [truth] * spec.files,
                                      range(spec.files), paths))
        (staged / TRUTH_FILE).write_text(json.dumps(truth_json(spec, truth), indent=1) + "\n")
        _check_replaceable(out)  # again: something may have appeared in it meanwhile
        _commit(staged, out)
    except OSError as exc:
        raise GradpipeError(f"could not write {out}: {exc}") from exc
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return MakeDataResult(str(out), spec.files, spec.rows, spec.features, sum(sizes),
                          time.perf_counter() - t0)


def _make_data_remote(spec: SynthSpec, out: str, threads: int | None, t0: float) -> MakeDataResult:
    """``make_data`` into an object-store prefix: generated in a local temporary directory, then uploaded
    part by part with ``truth.json`` last (an object store has no directory rename; each PUT is atomic, and
    a failed upload leaves no ``truth.json`` of the new output). Parts of a previous output that the new
    one does not have are deleted after the upload."""
    import tempfile

    from pipeline.store import location

    fs, root = location.filesystem(out)
    try:
        before = [location.name(p) for p in fs.ls(root, detail=False)] if fs.isdir(root) else []
    except OSError as exc:
        raise GradpipeError(f"could not list --out {out}: {exc}") from exc
    _check_names(out, before)
    with tempfile.TemporaryDirectory(prefix="gradpipe-make-data-") as tmp:
        local = make_data(spec, Path(tmp) / "out", threads)
        names = [spec.part_name(i) for i in range(spec.files)]
        try:
            for n in names + [TRUTH_FILE]:
                fs.put_file(str(Path(local.out) / n), f"{root}/{n}")
            stale = [f"{root}/{n}" for n in before if n not in names and n != TRUTH_FILE]
            if stale:
                fs.rm(stale)
        except OSError as exc:
            raise GradpipeError(f"could not write {out}: {exc}") from exc
    return MakeDataResult(location.absolute(out), spec.files, spec.rows, spec.features, local.bytes,
                          time.perf_counter() - t0)


def _check_replaceable(out: Path) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise GradpipeError(f"--out {out} exists and is not a directory.")
    _check_names(str(out), [p.name for p in out.iterdir()])


def _check_names(out: str, names: list[str]) -> None:
    if not names:
        return
    unknown = sorted(n for n in names if n != TRUTH_FILE and not PART_RE.fullmatch(n))
    if unknown:
        why = "it holds " + ", ".join(unknown[:5]) + (", …" if len(unknown) > 5 else "")
    elif TRUTH_FILE not in names:
        why = f"it has no {TRUTH_FILE}"
    else:
        return
    raise GradpipeError(f"--out {out} is not empty and not a previous make-data output ({why}); choose "
                        f"another directory or empty it yourself.")


def _commit(staged: Path, out: Path) -> None:
    """Put ``staged`` at ``out`` in one atomic swap; the previous output (if any) is then deleted."""
    from pipeline.store import atomic

    atomic.commit(staged, out)
