"""Time to solution for penalized GLMs: Poisson and logistic regression with an elastic net whose λ zeroes
about half the coefficients, seconds and passes until max|θ−θ*|/max|θ*| ≤ 1e-6, side by side with glum (in
memory) in one run. The GLM counterpart of ``bench/solvers.py`` (same machinery: ``run_gradpipe``).

Goals (issue "GLM breadth"): ≤ 10 passes for ``newton`` (IRLS + coordinate descent on the driver); faster
than glum end to end at 10M rows.

Data: n × d float64 (default 1M and 10M × 20), features with spread scales (0.1…10) and means (±3),
equicorrelated at ρ = 0.5; half the true coefficients are zero. Poisson: counts with log E[y] = x·β + b and
β scaled so the linear predictor has standard deviation 0.5; logistic: logits with standard deviation 2.
The penalty is ``alpha·(R‖β‖₁ + (1−R)/2‖β‖²)`` with R = 0.5 (glum's parametrization, ours via --alpha and
--l1-ratio), alpha chosen once per family at the smallest size by bisection on glum's fit so that half the
coefficients are zero. θ* is glum's solution at ``gradient_tol=1e-12`` (untimed). glum is timed at its
default tolerance and at the loosest ``gradient_tol`` that reaches 1e-6 of θ*; the goal compares with that.

gradpipe: a LocalCluster of ``--workers`` processes × 1 thread, data persisted on the workers (loading not
timed), ``tol = gtol = 0`` and a time cap; the first committed row within 1e-6 of θ* gives the seconds and
passes.

    python bench/glm.py --quick     # 200k rows (~1 minute)
    python bench/glm.py             # 1M and 10M × 20 (~10 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.solvers import TARGET, cells, rel_err, run_gradpipe  # noqa: E402

RESULTS = REPO / "bench" / "results" / "glm.json"
L1_RATIO = 0.5
SOLVERS = ["newton", "lbfgs", "gd"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", help="sizes (default 1,000,000 10,000,000; --quick 200,000)")
    p.add_argument("--features", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cap", type=float, help="seconds per gradpipe solver run (default 30; --quick 10)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(RESULTS), help=f"JSON results (default {RESULTS.relative_to(REPO)})")
    args = p.parse_args(argv)
    args.rows = args.rows or ([200_000] if args.quick else [1_000_000, 10_000_000])
    args.cap = args.cap or (10.0 if args.quick else 30.0)
    return args


def make_xy(n: int, d: int, kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, n, d])
    X = math.sqrt(0.5) * rng.standard_normal((n, d))
    X += math.sqrt(0.5) * rng.standard_normal((n, 1))
    X *= np.geomspace(0.1, 10, d)[rng.permutation(d)]
    X += rng.uniform(-3, 3, d)
    beta = rng.normal(size=d)
    beta[rng.permutation(d)[: d // 2]] = 0.0
    z = ((X - X.mean(0)) / X.std(0)) @ beta
    if kind == "poisson":
        z *= 0.5 / z.std()
        y = rng.poisson(np.exp(z + 0.5)).astype(np.float64)
    else:
        z *= 2.0 / z.std()
        y = (rng.random(n) < 1.0 / (1.0 + np.exp(-(z + 0.3)))).astype(np.float64)
    return X, y


def glum_fit(kind: str, X: np.ndarray, y: np.ndarray, alpha: float, **tol):
    from glum import GeneralizedLinearRegressor

    family = "poisson" if kind == "poisson" else "binomial"
    return GeneralizedLinearRegressor(family=family, alpha=alpha, l1_ratio=L1_RATIO, **tol).fit(X, y)


def run_glum(kind: str, X: np.ndarray, y: np.ndarray, alpha: float, ref: np.ndarray) -> list[dict]:
    """glum at its default tolerance, and at the loosest ``gradient_tol`` of 1e-6, 1e-8, 1e-10 that reaches
    the target (its default stops short of 1e-6 here): both fits timed."""
    out = []
    for tol in (None, 1e-6, 1e-8, 1e-10):
        t0 = time.perf_counter()
        m = glum_fit(kind, X, y, alpha, **({} if tol is None else {"gradient_tol": tol}))
        sec = time.perf_counter() - t0
        err = rel_err(np.append(m.coef_, m.intercept_), ref)
        if tol is None or err <= TARGET or tol == 1e-10:
            out.append({"system": "glum", "solver": f"glum (gradient_tol {'default' if tol is None else f'{tol:g}'})",
                        "seconds": sec, "final_err": err, "reached": err <= TARGET})
        if tol is not None and err <= TARGET:
            break
    return out


def half_zero_alpha(kind: str, X: np.ndarray, y: np.ndarray) -> float:
    """alpha (geometric bisection on glum's fit) with about half the coefficients exactly zero."""
    lo, hi = 1e-6, 1.0
    for _ in range(14):
        mid = math.sqrt(lo * hi)
        zeros = int(np.sum(glum_fit(kind, X, y, mid).coef_ == 0))
        if zeros == X.shape[1] // 2:
            return mid
        lo, hi = (mid, hi) if zeros < X.shape[1] // 2 else (lo, mid)
    return math.sqrt(lo * hi)


def run(args: argparse.Namespace) -> dict:
    from distributed import Client, LocalCluster

    from pipeline.estimators import write_dataset

    work = Path(tempfile.mkdtemp(prefix="gradpipe-bench-glm-"))
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "workers": args.workers,
                           "load_before": os.getloadavg()}, "target": TARGET, "l1_ratio": L1_RATIO, "cases": []}
    alphas: dict[str, float] = {}
    try:
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR) as lc, Client(lc) as client:
            for n in sorted(args.rows):
                for kind in ("poisson", "logistic"):
                    X, y = make_xy(n, args.features, kind)
                    if kind not in alphas:
                        alphas[kind] = half_zero_alpha(kind, X, y)
                    alpha = alphas[kind]
                    ref_model = glum_fit(kind, X, y, alpha, gradient_tol=1e-12, max_iter=1000)
                    ref = np.append(ref_model.coef_, ref_model.intercept_)
                    store = work / f"{kind}-{n}.zarr"
                    write_dataset(store, X, y, client)
                    case = {"rows": n, "kind": kind, "alpha": alpha, "zeros": int(np.sum(ref_model.coef_ == 0)),
                            "results": []}
                    for solver in SOLVERS:
                        r = run_gradpipe(store, kind, solver, ref, client, work / "runs", args.cap, alpha=alpha,
                                         l1_ratio=L1_RATIO)
                        case["results"].append({"system": "gradpipe", **r})
                        print(f"{n:>9} {kind:8} gradpipe {solver:7} {r.get('seconds', '-')} s "
                              f"{r.get('passes', '-')} passes (err {r['final_err']:.1e})", file=sys.stderr)
                    case["results"] += run_glum(kind, X, y, alpha, ref)
                    results["cases"].append(case)
                    shutil.rmtree(store, ignore_errors=True)
                    del X, y
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["machine"]["load_after"] = os.getloadavg()
    results["goals"] = goals(results)
    return results


def goals(results: dict) -> dict:
    out: dict = {}
    for case in results["cases"]:
        tag = f"{case['kind']} {case['rows'] / 1e6:g}M"
        nt = next(r for r in case["results"] if r["system"] == "gradpipe" and r["solver"] == "newton")
        gl = next((r for r in case["results"] if r["system"] == "glum" and r["reached"]), None)
        out[f"{tag}: newton passes (≤ 10)"] = nt.get("passes")
        out[f"{tag}: newton faster than glum at 1e-6 (×)"] = (round(gl["seconds"] / nt["seconds"], 2)
                                                             if nt.get("reached") and gl else None)
    return out


def print_table(res: dict) -> None:
    print(f"\nElastic net (l1_ratio {res['l1_ratio']}), time to max|θ−θ*|/max|θ*| ≤ {res['target']:g} (fit only; "
          f"{res['machine']['workers']} workers; load {res['machine']['load_before'][0]:.1f} → "
          f"{res['machine']['load_after'][0]:.1f})\n")
    print(f"| {'case':<24} | {'system / solver':<30} | {'seconds':>14} | {'passes':>7} | {'error reached':>13} |")
    print(f"|{'-' * 26}|{'-' * 32}|{'-' * 16}|{'-' * 9}|{'-' * 15}|")
    for case in res["cases"]:
        tag = f"{case['kind']} {case['rows'] / 1e6:g}M ({case['zeros']} zeros)"
        for r in case["results"]:
            name, sec, passes = cells(r)
            print(f"| {tag:<24} | {name:<30} | {sec:>14} | {passes:>7} | {r['final_err']:>13.1e} |")
    print("\nGoals:")
    for k, v in res["goals"].items():
        print(f"  {k}: {v}")


if __name__ == "__main__":
    from bench._report import main

    raise SystemExit(main(parse_args, run, print_table))
