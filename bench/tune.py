"""Cross-validated tuning: gradpipe ``tune`` (K folds × an α path, elastic net) side by side with
scikit-learn's and glum's CV estimators on the same in-memory arrays, the SAME folds and the SAME α grid, in
one run.

Why: a tune is K × L fits; gradpipe shares its passes among every fold and candidate, so its cost in passes
should be that of a few single fits, not K·L of them. The table shows tune passes / single-fit passes, the
seconds of each system and whether they choose the same α.

Data: n × d float64 (default 1M and 10M × 20), generated as ``bench/solvers.py`` does: features with spread
scales (0.01…100) and means (±50), equicorrelated at ρ (default 0.99); linear: y = Xw + b + 0.5·noise;
logistic: Bernoulli(σ(x_std·w + b)) with logits of standard deviation ~2; poisson: Poisson(exp(x_std·w + 0.5))
with a log-mean of standard deviation 0.5 (as ``bench/glm.py``). Written as a gradpipe dataset
(``write_dataset``) in a temporary directory.

gradpipe: a LocalCluster of ``--workers`` processes × 1 thread; ``tune(…, TuneConfig(model, cv=5,
n_alphas=100, l1_ratios=[0.5]))``: seconds (tune + refit, as ``TuneResult.seconds``) and passes (tune, refit,
total); then one ``train`` at the chosen α (its passes: the "single fit").

Anchors, each in a subprocess killed at ``--anchor-timeout`` seconds (reported as "> cap"); the folds are
``pipeline.folds.fold_ids(0, n, 5, 0)`` and the grid is gradpipe's ``result.alphas[0]`` (the penalty
``alpha·(R‖w‖₁ + (1−R)/2‖w‖²)`` on the raw-feature weights is the same in all three systems; each refits at
its choice, as gradpipe does; data loading is not timed):

- linear: scikit-learn ``ElasticNetCV(l1_ratio=0.5, alphas=grid, cv=splits, n_jobs=2)``;
- logistic: scikit-learn ``LogisticRegressionCV(Cs=1/(n_train·grid), cv=splits, scoring="neg_log_loss",
  n_jobs=2)`` with ``--sk-logistic``: ``saga`` (elastic net, l1_ratios=[0.5]: the same problem) or ``lbfgs``
  (L2 only, the same Cs: a different problem, its α is not comparable), n_train = 4n/5;
- glum ``GeneralizedLinearRegressorCV(family=normal|binomial|poisson, alphas=grid, l1_ratio=0.5, cv=splits)``
  for all three models (its default ``n_jobs``).

    python bench/tune.py --rows 100000                        # a smoke run (minutes)
    python bench/tune.py                                      # 1M and 10M × 20 (an hour or more on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a plain script from a checkout (and in spawned workers)

RESULTS = REPO / "bench" / "results" / "tune.json"
CV, N_ALPHAS, L1_RATIO, SEED = 5, 100, 0.5, 0
ANCHORS = {"linear": ["sklearn ElasticNetCV", "glum CV"], "logistic": ["sklearn LogisticRegressionCV", "glum CV"],
           "poisson": ["glum CV"]}
GLUM_FAMILY = {"linear": "normal", "logistic": "binomial", "poisson": "poisson"}


def _csv(kind):
    return lambda s: [kind(float(v)) if kind is int else kind(v) for v in s.split(",") if v]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=_csv(int), default=[1_000_000, 10_000_000], help="sizes, comma separated")
    p.add_argument("--models", type=_csv(str), default=["linear", "logistic", "poisson"])
    p.add_argument("--features", type=int, default=20)
    p.add_argument("--rho", type=float, default=0.99)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--anchor-timeout", type=float, default=900.0, help="seconds per anchor fit (default 900)")
    p.add_argument("--sk-logistic", choices=["saga", "lbfgs"], default="lbfgs",
                   help="scikit-learn LogisticRegressionCV: saga elastic net or lbfgs L2 (default lbfgs)")
    p.add_argument("--no-anchors", action="store_true")
    p.add_argument("--append", action="store_true",
                   help="add this run's cases to those already in the JSON file (and print them all)")
    p.add_argument("--json", "--out", dest="out", default=str(RESULTS),
                   help=f"JSON results (default {RESULTS.relative_to(REPO)})")
    args = p.parse_args(argv)
    bad = [m for m in args.models if m not in ANCHORS]
    if bad:
        p.error(f"--models: unknown {bad}; choose from {', '.join(ANCHORS)}")
    return args


def make_xy(n: int, d: int, rho: float, kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """bench/solvers.py's data (bit for bit for linear and logistic), plus a Poisson target."""
    rng = np.random.default_rng([seed, n, d, int(rho * 1000)])
    common = rng.standard_normal((n, 1))
    X = math.sqrt(1 - rho) * rng.standard_normal((n, d))
    X += math.sqrt(rho) * common
    X *= np.geomspace(0.01, 100, d)[rng.permutation(d)]
    X += rng.uniform(-50, 50, d)
    w = rng.normal(size=d)
    if kind == "linear":
        y = X @ (w / X.std(0)) + 1.0 + 0.5 * rng.standard_normal(n)
        return X, y
    z = ((X - X.mean(0)) / X.std(0)) @ w
    if kind == "logistic":
        z *= 2.0 / z.std()
        y = (rng.random(n) < 1.0 / (1.0 + np.exp(-(z + 0.3)))).astype(np.float64)
    else:
        z *= 0.5 / z.std()
        y = rng.poisson(np.exp(z + 0.5)).astype(np.float64)
    return X, y


def cv_splits(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from pipeline.folds import fold_ids

    f = fold_ids(0, n, CV, SEED)
    return [(np.flatnonzero(f != k), np.flatnonzero(f == k)) for k in range(CV)]


# ---- the anchors (each in its own subprocess) --------------------------------------------------------------
def fit_anchor(spec: dict) -> dict:
    """Load the arrays, fit one anchor (timed), return its choice."""
    X, y = np.load(spec["X"]), np.load(spec["y"])
    splits = cv_splits(len(y))
    grid = np.asarray(spec["alphas"])
    name, kind = spec["name"], spec["kind"]
    out: dict = {}
    if name == "sklearn ElasticNetCV":
        from sklearn.linear_model import ElasticNetCV

        t0 = time.perf_counter()
        m = ElasticNetCV(l1_ratio=L1_RATIO, alphas=grid, cv=splits, n_jobs=2).fit(X, y)
        out["seconds"] = time.perf_counter() - t0
        out["alpha"] = float(m.alpha_)
        out["n_iter"] = int(np.ravel(m.n_iter_)[0]) if np.size(m.n_iter_) else None
        coef, icpt = np.ravel(m.coef_), float(m.intercept_)
    elif name == "sklearn LogisticRegressionCV":
        from sklearn.linear_model import LogisticRegressionCV

        n_train = float(np.mean([len(tr) for tr, _ in splits]))
        Cs = 1.0 / (n_train * grid)
        solver = spec["sk_logistic"]
        extra = {"solver": "saga", "l1_ratios": [L1_RATIO]} if solver == "saga" else \
            {"solver": "lbfgs", "l1_ratios": [0.0], "max_iter": 1000}
        t0 = time.perf_counter()
        m = LogisticRegressionCV(Cs=Cs, cv=splits, scoring="neg_log_loss", n_jobs=2, use_legacy_attributes=True,
                                 **extra).fit(X, y)
        out["seconds"] = time.perf_counter() - t0
        out["alpha"] = float(1.0 / (n_train * float(np.ravel(m.C_)[0])))
        out["n_iter_max"] = int(np.max(m.n_iter_))
        out["variant"] = f"{solver} ({'elastic net 0.5' if solver == 'saga' else 'L2'})"
        coef, icpt = np.ravel(m.coef_), float(np.ravel(m.intercept_)[0])
    elif name == "glum CV":
        from glum import GeneralizedLinearRegressorCV

        t0 = time.perf_counter()
        m = GeneralizedLinearRegressorCV(family=GLUM_FAMILY[kind], alphas=grid, l1_ratio=L1_RATIO,
                                         cv=splits).fit(X, y)
        out["seconds"] = time.perf_counter() - t0
        out["alpha"] = float(m.alpha_)
        coef, icpt = np.ravel(m.coef_), float(m.intercept_)
    else:
        raise ValueError(name)
    out["alpha_index"] = int(np.argmin(np.abs(np.log(grid) - math.log(out["alpha"]))))
    out.update(coef=coef.tolist(), intercept=icpt, status="ok")
    return out


def run_anchor(spec: dict, work: Path, timeout: float) -> dict:
    """``fit_anchor`` in a subprocess (its own session, so a kill takes joblib's workers too)."""
    tag = f"{spec['kind']}-{spec['name'].replace(' ', '_')}"
    spec_path, out_path = work / f"{tag}.spec.json", work / f"{tag}.out.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_anchor", str(spec_path),
                             str(out_path)], start_new_session=True, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"status": "timeout", "cap": timeout, "wall": time.perf_counter() - t0}
    if proc.returncode != 0 or not out_path.exists():
        return {"status": "error", "error": (err or "").strip().splitlines()[-1:] or [f"rc {proc.returncode}"],
                "wall": time.perf_counter() - t0}
    res = json.loads(out_path.read_text())
    res["wall"] = time.perf_counter() - t0
    return res


# ---- gradpipe ---------------------------------------------------------------------------------------------
def run_gradpipe(store: Path, kind: str, client, work: Path) -> dict:
    from pipeline.config import TrainConfig
    from pipeline.training import train
    from pipeline.tune import TuneConfig, tune

    t0 = time.perf_counter()
    res = tune(store, TuneConfig(model=kind, cv=CV, n_alphas=N_ALPHAS, l1_ratios=[L1_RATIO], seed=SEED),
               client=client, runs_dir=work / "runs", tunes_dir=work / "tunes")
    wall = time.perf_counter() - t0
    single = train(store, TrainConfig(model=kind, alpha=res.alpha, l1_ratio=L1_RATIO), client=client,
                   runs_dir=work / "runs")
    out = {"seconds": res.seconds, "wall": wall, "passes": res.passes, "refit_passes": res.refit.passes,
           "total_passes": res.total_passes, "refit_seconds": res.refit.seconds, "alpha": res.alpha,
           "alpha_index": int(res.best[1]), "alphas": res.alphas[0].tolist(), "status": res.status,
           "warnings": res.warnings, "mean_deviance": float(res.mean[res.best]),
           "cv_mean": res.mean[0].tolist(), "cv_se": res.se[0].tolist(),
           "coef": np.ravel(res.refit.coef).tolist(), "intercept": float(res.refit.intercept),
           "single": {"passes": single.passes, "seconds": single.seconds, "n_iter": single.n_iter,
                      "solver": single.solver, "status": single.status}}
    for path in (res.tune_uri, res.refit.run_uri, single.run_uri):
        shutil.rmtree(path, ignore_errors=True)
    return out


def warm_up(client, work: Path) -> None:
    """A tiny tune first, so worker start-up and imports are not in the first case's seconds."""
    from pipeline.estimators import write_dataset

    X, y = make_xy(2000, 3, 0.0, "logistic")
    store = work / "warmup.zarr"
    write_dataset(store, X, y, client)
    run_gradpipe(store, "logistic", client, work)
    shutil.rmtree(store, ignore_errors=True)


def run(args: argparse.Namespace) -> dict:
    res = _run(args)
    old = Path(args.out)
    if args.append and old.exists():
        prev = json.loads(old.read_text())
        res["cases"] = prev["cases"] + res["cases"]
        res["earlier_runs"] = prev.get("earlier_runs", []) + [{k: prev[k] for k in ("machine", "settings", "argv")
                                                               if k in prev}]
    return res


def _run(args: argparse.Namespace) -> dict:
    from distributed import Client, LocalCluster

    from pipeline.estimators import write_dataset

    work = Path(tempfile.mkdtemp(prefix="gradpipe-bench-tune-"))
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "workers": args.workers,
                           "load_before": os.getloadavg()},
               "settings": {"cv": CV, "n_alphas": N_ALPHAS, "l1_ratio": L1_RATIO, "rho": args.rho,
                            "features": args.features, "anchor_timeout": args.anchor_timeout,
                            "sk_logistic": args.sk_logistic},
               "argv": sys.argv[1:], "cases": []}
    try:
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR) as lc, Client(lc) as client:
            warm_up(client, work)
            for n in args.rows:
                for kind in args.models:
                    X, y = make_xy(n, args.features, args.rho, kind)
                    store = work / f"{kind}-{n}.zarr"
                    write_dataset(store, X, y, client)
                    xp, yp = work / "X.npy", work / "y.npy"
                    np.save(xp, X)
                    np.save(yp, y)
                    del X, y  # the anchors load their own copy; the workers hold the dataset
                    case = {"rows": n, "kind": kind, "load_start": os.getloadavg()[0]}
                    gp = run_gradpipe(store, kind, client, work)
                    case["gradpipe"] = gp
                    print(f"{n:>9} {kind:8} gradpipe tune {gp['seconds']:.1f} s, passes {gp['passes']:g} + "
                          f"{gp['refit_passes']:g}; single fit {gp['single']['passes']:g}; α {gp['alpha']:.3g}",
                          file=sys.stderr, flush=True)
                    case["anchors"] = {}
                    for name in [] if args.no_anchors else ANCHORS[kind]:
                        spec = {"name": name, "kind": kind, "X": str(xp), "y": str(yp), "alphas": gp["alphas"],
                                "sk_logistic": args.sk_logistic}
                        a = run_anchor(spec, work, args.anchor_timeout)
                        case["anchors"][name] = a
                        print(f"{n:>9} {kind:8} {name:28} {anchor_seconds(a)} s, α {a.get('alpha', float('nan')):.3g}",
                              file=sys.stderr, flush=True)
                    case["load_end"] = os.getloadavg()[0]
                    results["cases"].append(case)
                    shutil.rmtree(store, ignore_errors=True)
                    xp.unlink()
                    yp.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["machine"]["load_after"] = os.getloadavg()
    return results


# ---- the table --------------------------------------------------------------------------------------------
def anchor_seconds(a: dict) -> str:
    if a["status"] == "timeout":
        return f"> {a['cap']:.0f}"
    if a["status"] != "ok":
        return "error"
    return f"{a['seconds']:.1f}"


def speed_up(a: dict, gp: dict) -> str:
    if a["status"] == "timeout":
        return f"> {a['cap'] / gp['seconds']:.1f}×"
    if a["status"] != "ok":
        return "–"
    return f"{a['seconds'] / gp['seconds']:.1f}×"


def agrees(a: dict, gp: dict) -> str:
    if a["status"] != "ok":
        return "–"
    d = a["alpha_index"] - gp["alpha_index"]
    return "yes" if d == 0 else f"no ({d:+d})"


def print_table(res: dict) -> None:
    s, m = res["settings"], res["machine"]
    print(f"\n{' '.join(['python bench/tune.py'] + res.get('argv', []))}")
    print(f"Cross-validated elastic net ({s['cv']} folds × {s['n_alphas']} α, l1_ratio {s['l1_ratio']}), "
          f"{s['features']} features, ρ = {s['rho']:g}; {m['workers']} workers × 1 thread; load "
          f"{m['load_before'][0]:.1f} → {m['load_after'][0]:.1f}; anchor cap {s['anchor_timeout']:.0f} s; "
          f"sklearn logistic: {s['sk_logistic']}\n")
    for e in res.get("earlier_runs", []):
        print(f"(earlier run: {' '.join(e.get('argv', []))}; load {e['machine']['load_before'][0]:.1f} → "
              f"{e['machine']['load_after'][0]:.1f})")
    head = ["rows", "model", "load", "gradpipe tune s", "passes tune/refit/total", "single-fit passes (s)",
            "tune/single passes", "anchor", "anchor s", "speed-up", "same α"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for case in res["cases"]:
        gp = case["gradpipe"]
        left = [f"{case['rows'] / 1e6:g}M", case["kind"], f"{case['load_start']:.1f}–{case['load_end']:.1f}",
                f"{gp['seconds']:.1f}", f"{gp['passes']:g} / {gp['refit_passes']:g} / {gp['total_passes']:g}",
                f"{gp['single']['passes']:g} ({gp['single']['seconds']:.1f})",
                f"{gp['passes'] / gp['single']['passes']:.1f}"]
        anchors = case["anchors"] or {"–": None}
        for i, (name, a) in enumerate(anchors.items()):
            cells = left if i == 0 else [""] * len(left)
            right = ["–"] * 4 if a is None else [name + (f" {a['variant']}" if a.get("variant") else ""),
                                                 anchor_seconds(a), speed_up(a, gp), agrees(a, gp)]
            print("| " + " | ".join(cells + right) + " |")
    notes = [f"{c['rows'] / 1e6:g}M {c['kind']}: {w}" for c in res["cases"] for w in c["gradpipe"]["warnings"]]
    if notes:
        print("\ngradpipe warnings:\n  " + "\n  ".join(notes))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--_anchor":  # the subprocess of run_anchor
        Path(sys.argv[3]).write_text(json.dumps(fit_anchor(json.loads(Path(sys.argv[2]).read_text()))))
        raise SystemExit(0)
    from bench._report import main

    raise SystemExit(main(parse_args, run, print_table))
