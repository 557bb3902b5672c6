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

KINDS = ("linear", "logistic")
FORMATS = ("csv", "parquet", "npy")
BLOCK_ROWS = 131_072  # rows generated at a time (bounds memory) and the Parquet row-group size
LOGIT_STD = 2.5
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

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise GradpipeError(f"--kind must be one of {', '.join(KINDS)}, not {self.kind!r}.")
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
    def feature_names(self) -> list[str]:
        return [f"x{j}" for j in range(self.features)]

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
    """Yield (X float32, y float32) blocks of file ``index``; the stream depends only on spec and index."""
    child = np.random.SeedSequence(spec.seed).spawn(2)[1].spawn(spec.files)[index]
    rng = np.random.default_rng(child)
    left = spec.part_rows()[index]
    while left:
        b = min(left, BLOCK_ROWS)
        X = (truth.means + truth.scales * rng.standard_normal((b, spec.features))).astype(np.float32)
        eta = _dot(X, truth.coef) + truth.intercept
        if spec.kind == "linear":
            y = eta + spec.noise * rng.standard_normal(b)
        else:
            y = (rng.random(b) < 1.0 / (1.0 + np.exp(-eta))).astype(np.float64)
        yield X, y.astype(np.float32)
        left -= b


def write_part(spec: SynthSpec, truth: Truth, index: int, path: str) -> int:
    """Write file ``index`` to ``path`` block by block; returns its size in bytes."""
    names = [*spec.feature_names, "y"]
    if spec.format == "npy":
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64,
                                        shape=(spec.part_rows()[index], spec.features + 1))
        row = 0
        for X, y in generate_blocks(spec, truth, index):
            out[row:row + len(X), :-1] = X
            out[row:row + len(X), -1] = y
            row += len(X)
        out.flush()
        del out
        return os.path.getsize(path)
    import pyarrow as pa

    schema = pa.schema([(n, pa.float32()) for n in names])

    def table(X: np.ndarray, y: np.ndarray) -> pa.Table:
        return pa.Table.from_arrays([*(pa.array(X[:, j]) for j in range(X.shape[1])), pa.array(y)],
                                    schema=schema)

    if spec.format == "csv":
        import pyarrow.csv as pacsv

        with open(path, "wb") as fh:
            fh.write((",".join(names) + "\n").encode())  # unquoted header, on any pyarrow version
            with pacsv.CSVWriter(fh, schema, write_options=pacsv.WriteOptions(include_header=False)) as w:
                for X, y in generate_blocks(spec, truth, index):
                    w.write_table(table(X, y))
    else:
        import pyarrow.parquet as pq

        with pq.ParquetWriter(path, schema) as w:
            for X, y in generate_blocks(spec, truth, index):
                w.write_table(table(X, y), row_group_size=BLOCK_ROWS)
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
            "feature_scales": truth.scales.tolist()}


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


def _check_replaceable(out: Path) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise GradpipeError(f"--out {out} exists and is not a directory.")
    names = [p.name for p in out.iterdir()]
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
