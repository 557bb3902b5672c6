"""Training speed: gradpipe's per-iteration time against a single-process NumPy floor, dask-ml and plain dask.

Why: one full-batch gradient step is one pass over X, so its time is bounded below by what one machine's
BLAS needs for ``r = X @ θ - y; g = X.T @ r`` on data already in memory (the "floor"). gradpipe should stay
close to that floor (goal: ≤ 1.5× the 2-thread floor at 10M rows), be much faster than dask-ml's
``LinearRegression(solver='gradient_descent')`` (goal: ≥ 20× per iteration), keep the per-iteration
scheduler overhead small (goal: ≤ 10 ms with 64 chunks) and checkpointing cheap (goal: ≤ 2 % of the time).

Setup: synthetic linear data (``pipeline.synth``, .npy) ingested into a gradpipe dataset (float64, the
ingest default of 64 MiB row chunks unless ``--chunk-mb``); one LocalCluster of ``--workers`` processes ×
1 thread, latency-tuned (``tune_latency``) for every method; all data persisted in worker memory (the
floor holds it in the driver). Measured per size:

1. ``gradpipe gd``: ``pipeline.training.train`` with ``TrainConfig(max_iter=--iters, gtol=0, tol=0,
   standardize=False)`` (see ``bench_train`` for why unstandardized) and the default ``lr='auto'``:
   the median wall time between consecutive iterations (one pass + solver + checkpoint), FitResult's
   ``seconds_per_iter`` (which also amortises the start: the Lipschitz pass and θ₀'s pass), passes per
   iteration and the checkpoint share; plus ``gradpipe engine pass``: one ``ChunkEngine.map_reduce`` of
   the gradient kernel alone (no solver, no checkpoint), with the workers' BLAS at 1 thread (their
   default under a nanny) and at 2 threads.
2. NumPy floor: ``r = X @ θ - y; g = X.T @ r`` in the driver with BLAS limited to 1 and to 2 threads, and
   with the rows split over ``--workers`` Python threads running 1-thread BLAS each (OpenBLAS's own
   threading of these tall-skinny products can be much slower than 1 thread, which makes the "2 threads"
   floor an easy target; "× best" compares with the fastest variant).
3. dask-ml ``LinearRegression(solver='gradient_descent')``: the median wall time between consecutive
   iterations of ``min(--repeats, 3)`` fits of ``--dask-ml-iters`` iterations (see ``bench_dask_ml``).
4. naive dask: ``(X.T @ (X @ θ - y)).compute()`` on the persisted dask arrays (same chunks).
5. Scheduler overhead: ``map_reduce`` of the gradient kernel on 6,400 × 20 rows in 64 chunks (and the
   naive dask expression on the same tiny array), where compute is negligible.
6. Checkpoint cost: ``FitResult.checkpoint_seconds / seconds`` of the training runs (goal at the largest
   size).

After an untimed warm-up, the per-iteration methods are repeated ``--repeats`` times in interleaved order
and the median is reported. "× np-2" is time / NumPy 2-thread time (the goals' floor); "× best" is time /
the fastest NumPy variant. The machine may be shared: the load average is recorded, and the least-disturbed
(minimum) times are printed too.

    python bench/train.py --quick          # smoke run, ~1 minute
    python bench/train.py                  # 1M and 10M rows × 20; several minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a plain script from a checkout (and in spawned workers)

RESULTS = REPO / "bench" / "results" / "train.json"
GOALS = {"floor_ratio_10m": 1.5, "dask_ml_speedup": 20.0, "overhead_ms": 10.0, "checkpoint_pct": 2.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+",
                   help="data sizes in rows (default 1,000,000 10,000,000; --quick 100,000 400,000)")
    p.add_argument("--features", type=int, default=20)
    p.add_argument("--repeats", type=int, help="runs per measurement, median reported (default 5; --quick 2)")
    p.add_argument("--iters", type=int, help="gradpipe iterations per training run (default 30; --quick 5)")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (1 thread each)")
    p.add_argument("--chunk-mb", type=float,
                   help="MiB of X per row chunk (default 64, the ingest default; --quick 4)")
    p.add_argument("--tiny-rows", type=int, default=6400, help="rows of the scheduler-overhead data")
    p.add_argument("--tiny-chunks", type=int, default=64, help="chunks of the scheduler-overhead data")
    p.add_argument("--dask-ml-iters", type=int,
                   help="max_iter of each dask-ml fit (default 4; --quick 3); min(repeats, 3) fits")
    p.add_argument("--no-dask-ml", action="store_true", help="skip dask-ml (reported as n/a)")
    p.add_argument("--workdir", help="where to put the data (default: a new temp dir)")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument("--keep", action="store_true", help="keep the generated datasets and runs")
    p.add_argument("--out", default=str(RESULTS), help=f"JSON results (default {RESULTS.relative_to(REPO)})")
    args = p.parse_args(argv)
    args.rows = args.rows or ([100_000, 400_000] if args.quick else [1_000_000, 10_000_000])
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.iters = args.iters or (5 if args.quick else 30)
    args.chunk_mb = args.chunk_mb or (4.0 if args.quick else 64.0)
    args.dask_ml_iters = args.dask_ml_iters or (3 if args.quick else 4)
    if args.dask_ml_iters < 2:
        p.error("--dask-ml-iters must be at least 2")
    return args


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def timed(fn, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def fmt_rows(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n / 1e3:g}k"


# ---- data ----------------------------------------------------------------------------------------------
def make_dataset(work: Path, rows: int, features: int, chunk_mb: float, client) -> Path:
    """Synthetic linear data → .npy parts → a gradpipe dataset (the .npy files are removed afterwards)."""
    from pipeline.ingest import ingest
    from pipeline.synth import SynthSpec, make_data

    raw, store = work / f"raw-{rows}", work / f"data-{rows}.zarr"
    t0 = time.perf_counter()
    files = max(1, min(8, rows // 1_000_000))
    make_data(SynthSpec("linear", rows, features, files, "npy", seed=0), raw)
    shutil.rmtree(store, ignore_errors=True)
    ingest([str(raw)], store, f"col{features}", client, chunk_mb=chunk_mb)
    shutil.rmtree(raw)
    print(f"data: {rows:,} × {features} float64 → {store} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return store


# ---- worker helpers (module level: pickled by reference) ------------------------------------------------
def _set_blas_threads(n: int) -> list[int]:
    from threadpoolctl import threadpool_info, threadpool_limits

    threadpool_limits(limits=n, user_api="blas")  # stays in force: the limiter is not restored on exit
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


def _blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


# ---- methods ---------------------------------------------------------------------------------------------
def numpy_floor(X, y, theta, threads: int):
    from threadpoolctl import threadpool_limits

    def step():
        with threadpool_limits(limits=threads, user_api="blas"):
            r = X @ theta - y
            return X.T @ r

    return step


def numpy_split(X, y, theta, threads: int):
    """The same NumPy gradient with the rows split over ``threads`` Python threads, BLAS at 1 thread each
    (BLAS releases the GIL): what one process can do on ``threads`` cores without BLAS's own threading."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    bounds = [(i * len(X) // threads, (i + 1) * len(X) // threads) for i in range(threads)]
    pool = ThreadPoolExecutor(threads)

    def part(ab):
        a, b = ab
        r = X[a:b] @ theta - y[a:b]
        return X[a:b].T @ r

    def step():
        with threadpool_limits(limits=1, user_api="blas"):
            return sum(pool.map(part, bounds))

    return step


def naive_dask(X, y, theta):
    def step():
        return (X.T @ (X @ theta - y)).compute()

    return step


def engine_pass(engine, theta, mean, scale):
    from pipeline.objective import _sums

    def step():
        return engine.map_reduce(_sums, "linear", theta, mean, scale)

    return step


def bench_train(store: Path, client, runs_dir: Path, iters: int) -> dict:
    """One training run; per-iteration times from the wall clock between consecutive iterations."""
    from pipeline.config import TrainConfig
    from pipeline.training import train

    stamps: list[float] = []
    passes: list[float] = []

    def on_iteration(t: int, rec: dict) -> None:
        stamps.append(time.perf_counter())
        passes.append(rec["passes"])

    # standardize=False: on the standardized synthetic data (independent features, condition number ~1) gd
    # reaches machine precision in a few iterations and stops early even with tol=0 (the loss stops changing);
    # the raw problem is ill-conditioned, so every run does exactly `iters` steps. Same work per iteration.
    config = TrainConfig(model="linear", solver="gd", max_iter=iters, gtol=0.0, tol=0.0, persist="yes",
                         standardize=False)
    res = train(store, config, client=client, runs_dir=runs_dir, on_iteration=on_iteration)
    shutil.rmtree(res.run_uri, ignore_errors=True)
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"status": res.status, "n_iter": res.n_iter, "seconds": res.seconds,
            "seconds_per_iter": res.seconds_per_iter, "median_iter_seconds": median(gaps),
            "passes": res.passes, "passes_per_iter": (passes[-1] - passes[0]) / max(res.n_iter, 1),
            "checkpoint_seconds": res.checkpoint_seconds,
            "checkpoint_pct": 100.0 * res.checkpoint_seconds / res.seconds, "loss": res.loss}


def bench_dask_ml(X, y, iters: int) -> dict:
    """dask-ml's gradient descent: per-iteration seconds between consecutive iterations of one fit.

    dask-glm's ``gradient_descent`` calls its line search ``compute_stepsize_dask`` once per iteration, so
    the wall time between consecutive calls is one whole iteration (gradient, line search, persist,
    compute), like gradpipe's number; the fit's set-up (the normalisation pass, the intercept column) is
    not charged to any iteration.
    """
    import dask_glm.algorithms as algos
    from dask_ml.linear_model import LinearRegression

    stamps: list[float] = []
    original = algos.compute_stepsize_dask

    def stamped(*a, **k):
        stamps.append(time.perf_counter())
        return original(*a, **k)

    algos.compute_stepsize_dask = stamped  # gradient_descent looks it up as a module global
    try:
        t0 = time.perf_counter()
        LinearRegression(solver="gradient_descent", max_iter=iters, tol=0.0).fit(X, y)
        seconds = time.perf_counter() - t0
    finally:
        algos.compute_stepsize_dask = original
    if len(stamps) < 2:
        raise RuntimeError(f"dask-ml stopped after {len(stamps)} iteration(s)")
    return {"iter_seconds": [b - a for a, b in zip(stamps, stamps[1:], strict=False)], "fit_seconds": seconds,
            "n_iter": len(stamps)}


def dask_ml_status() -> str | None:
    """None if dask-ml imports and fits a tiny problem on this dask version, else why not."""
    try:
        import dask.array as da
        import numpy as np
        from dask_ml.linear_model import LinearRegression

        X = da.from_array(np.random.default_rng(0).normal(size=(200, 3)), chunks=(50, 3))
        LinearRegression(solver="gradient_descent", max_iter=2, tol=0.0).fit(X, X @ np.ones(3))
    except Exception as exc:  # noqa: BLE001 - report any failure, do not crash the benchmark
        return f"{type(exc).__name__}: {exc}"[:120]
    return None


def bench_overhead(client, args: argparse.Namespace, work: Path) -> dict:
    """Engine map_reduce per call (and naive dask per compute) on tiny data in many chunks."""
    import dask.array as da
    import numpy as np

    from pipeline.engine import ChunkEngine
    from pipeline.estimators import write_dataset

    n, k, d = args.tiny_rows, args.tiny_chunks, args.features
    rows = -(-n // k)
    rng = np.random.default_rng(1)
    Xn, yn = rng.normal(size=(n, d)), rng.normal(size=n)
    X = da.from_array(Xn, chunks=(rows, d))
    y = da.from_array(yn, chunks=(rows,))
    theta = rng.normal(size=d + 1)
    store = work / "tiny.zarr"
    write_dataset(store, Xn, yn, client, chunk_rows=rows)
    engine = ChunkEngine(client, store=str(store), n_rows=n, chunk_rows=rows, n_features=d, itemsize=8,
                         persist="yes")
    Xp, yp = client.persist([X, y])
    try:
        step = engine_pass(engine, theta, None, None)
        naive = naive_dask(Xp, yp, theta[:d])
        step(), naive()  # warm-up
        calls = max(50, 20 * args.repeats)
        eng = timed(step, calls)
        nav = timed(naive, max(10, calls // 5))
    finally:
        engine.close()
        del Xp, yp
    return {"rows": n, "chunks": len(X.chunks[0]), "engine_seconds": eng, "engine_median_seconds": median(eng),
            "naive_dask_seconds": nav, "naive_dask_median_seconds": median(nav)}


def bench_passes(store: Path, client, args: argparse.Namespace, dask_ml_error: str | None) -> dict:
    """The per-iteration methods other than training, interleaved; all data is released on return."""
    import numpy as np

    from pipeline.engine import ChunkEngine
    from pipeline.store.dataset import open_dataset

    ds = open_dataset(store)
    d = ds.n_features
    mean, scale = ds.stats.mean, ds.stats.scale()
    rng = np.random.default_rng(2)
    theta_std = rng.normal(size=d + 1)  # standardized-space θ for gradpipe's kernel
    coef = theta_std[:d] / scale  # the same model on raw X for the baselines
    times: dict[str, list[float]] = {}
    out: dict = {"rows": ds.n_rows, "features": d, "chunk_rows": ds.chunk_rows, "chunks": ds.n_chunks}
    from pipeline.store.dataset import zarr_group

    group = zarr_group(store)
    Xn, yn = group["X"][: ds.n_rows], group["y"][: ds.n_rows]  # the floor's copy, in the driver
    Xd, yd = client.persist([ds.X, ds.y])
    engine = ChunkEngine(client, store=ds.ref, n_rows=ds.n_rows, chunk_rows=ds.chunk_rows, n_features=d,
                         itemsize=8, persist="yes")
    bounds = engine.layout.bounds
    out["rows_per_worker"] = {w: sum(bounds[p][1] - bounds[p][0] for p in g) for w, g in engine.groups}
    try:
        methods = {
            "numpy-1": numpy_floor(Xn, yn, coef, 1),
            "numpy-2": numpy_floor(Xn, yn, coef, 2),
            "numpy-split": numpy_split(Xn, yn, coef, args.workers),
            "engine": engine_pass(engine, theta_std, mean, scale),
            "naive-dask": naive_dask(Xd, yd, coef),
        }
        for fn in methods.values():
            fn()  # warm-up
        calls = 3  # per repeat; the median runs over repeats × calls
        for _ in range(args.repeats):
            for key, fn in methods.items():
                times.setdefault(key, []).extend(timed(fn, calls))
        # The workers' BLAS at 2 threads (2 workers × 2 threads on the cores), then back to 1.
        out["worker_blas_threads_default"] = sorted(client.run(_blas_threads).values())
        client.run(_set_blas_threads, 2)
        try:
            times["engine-blas2"] = timed(methods["engine"], calls * args.repeats)
        finally:
            client.run(_set_blas_threads, 1)
        if dask_ml_error is None:
            try:
                runs = [bench_dask_ml(Xd, yd, args.dask_ml_iters) for _ in range(min(args.repeats, 3))]
                times["dask-ml"] = [t for r in runs for t in r["iter_seconds"]]
                out["dask_ml_fits"] = [{k: r[k] for k in ("fit_seconds", "n_iter")} for r in runs]
            except Exception as exc:  # noqa: BLE001 - a baseline failing is a result, not a crash
                out["dask_ml_error"] = f"{type(exc).__name__}: {exc}"[:120]
        else:
            out["dask_ml_error"] = dask_ml_error
    finally:
        engine.close()
    out["times"] = times
    return out


def bench_size(store: Path, client, args: argparse.Namespace, runs_dir: Path, dask_ml_error: str | None) -> dict:
    out = bench_passes(store, client, args, dask_ml_error)
    train_runs = [bench_train(store, client, runs_dir, args.iters) for _ in range(args.repeats)]
    times = out["times"]
    times["gradpipe"] = [r["median_iter_seconds"] for r in train_runs]
    out["train_runs"] = train_runs
    out["median_seconds"] = {k: median(v) for k, v in times.items()}
    out["checkpoint_pct"] = median([r["checkpoint_pct"] for r in train_runs])
    out["passes_per_iter"] = median([r["passes_per_iter"] for r in train_runs])
    out["fit_seconds_per_iter"] = median([r["seconds_per_iter"] for r in train_runs])
    return out


def run(args: argparse.Namespace) -> dict:
    from pipeline.cluster import dask_client, tune_latency

    work = Path(args.workdir).absolute() if args.workdir else Path(tempfile.mkdtemp(prefix="gradpipe-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    runs_dir = work / "runs"
    sizes, made = [], []
    args.load_before = os.getloadavg()  # the machine may be shared: record how busy it was
    dask_ml_error = "skipped (--no-dask-ml)" if args.no_dask_ml else dask_ml_status()
    try:
        with dask_client(workers=args.workers, announce=False) as client:
            tune_latency(client)  # for every method, not only gradpipe's
            overhead = bench_overhead(client, args, work)
            print(f"overhead: engine {overhead['engine_median_seconds'] * 1e3:.2f} ms per call with "
                  f"{overhead['chunks']} chunks", file=sys.stderr)
            for rows in args.rows:
                store = make_dataset(work, rows, args.features, args.chunk_mb, client)
                made.append(store)
                res = bench_size(store, client, args, runs_dir, dask_ml_error)
                sizes.append(res)
                print(f"{fmt_rows(rows)}: " + ", ".join(f"{k} {v * 1e3:.1f} ms"
                                                       for k, v in res["median_seconds"].items()), file=sys.stderr)
                if not args.keep:
                    shutil.rmtree(store, ignore_errors=True)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        elif args.workdir:
            for store in made:
                shutil.rmtree(store, ignore_errors=True)
            shutil.rmtree(runs_dir, ignore_errors=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    args.load_after = os.getloadavg()
    return summarize(args, overhead, sizes, dask_ml_error)


LABELS = {
    "gradpipe": "gradpipe gd (train, per iteration)",
    "engine": "gradpipe engine pass (kernel only)",
    "engine-blas2": "  same, worker BLAS 2 threads",
    "numpy-1": "numpy fused gradient, 1 thread",
    "numpy-2": "numpy fused gradient, 2 threads",
    "numpy-split": "numpy, rows split over workers' threads",
    "naive-dask": "dask X.T @ (X @ θ - y)",
    "dask-ml": "dask-ml LinearRegression gd",
}


def summarize(args: argparse.Namespace, overhead: dict, sizes: list[dict], dask_ml_error: str | None) -> dict:
    import dask
    import numpy as np

    try:
        import dask_ml

        dask_ml_version = dask_ml.__version__
    except ImportError:
        dask_ml_version = None
    big = max(sizes, key=lambda s: s["rows"])
    med = big["median_seconds"]
    floor_ratio = med["gradpipe"] / med["numpy-2"]
    speedup = med["dask-ml"] / med["gradpipe"] if "dask-ml" in med else None
    goals = {
        "floor_ratio": {"value": floor_ratio, "goal": f"≤ {GOALS['floor_ratio_10m']}", "rows": big["rows"],
                        "met": floor_ratio <= GOALS["floor_ratio_10m"]},
        "dask_ml_speedup": {"value": speedup, "goal": f"≥ {GOALS['dask_ml_speedup']}", "rows": big["rows"],
                            "met": None if speedup is None else speedup >= GOALS["dask_ml_speedup"]},
        "overhead_ms": {"value": overhead["engine_median_seconds"] * 1e3, "goal": f"≤ {GOALS['overhead_ms']}",
                        "chunks": overhead["chunks"],
                        "met": overhead["engine_median_seconds"] * 1e3 <= GOALS["overhead_ms"]},
        "checkpoint_pct": {"value": big["checkpoint_pct"], "goal": f"≤ {GOALS['checkpoint_pct']}",
                           "rows": big["rows"], "met": big["checkpoint_pct"] <= GOALS["checkpoint_pct"]},
    }
    return {
        "config": {k: getattr(args, k) for k in ("rows", "features", "repeats", "iters", "workers", "chunk_mb",
                                                 "tiny_rows", "tiny_chunks", "dask_ml_iters", "quick")},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "numpy": np.__version__, "dask": dask.__version__,
                    "dask_ml": dask_ml_version, "loadavg_before": args.load_before,
                    "loadavg_after": args.load_after},
        "dask_ml_error": dask_ml_error,
        "overhead": overhead,
        "sizes": sizes,
        "goals": goals,
    }


def print_table(res: dict) -> None:
    c, sizes = res["config"], res["sizes"]
    print(f"\ntrain: {c['features']} features float64, persisted; {c['workers']} workers × 1 thread; "
          f"chunks of {c['chunk_mb']:g} MiB; median of {c['repeats']} repeats; load average "
          f"{res['machine']['loadavg_before'][0]:.1f} → {res['machine']['loadavg_after'][0]:.1f}")
    head = f"{'method':<38}" + "".join(f" {fmt_rows(s['rows']) + ' ms/iter':>14} {'× np-2':>7} {'× best':>7}"
                                      for s in sizes)
    print(head)
    print("-" * len(head))
    for key, label in LABELS.items():
        line = f"{label:<38}"
        for s in sizes:
            med = s["median_seconds"]
            if key in med:
                best = min(med[k] for k in ("numpy-1", "numpy-2", "numpy-split"))
                line += f" {med[key] * 1e3:>14.1f} {med[key] / med['numpy-2']:>7.2f} {med[key] / best:>7.2f}"
            else:
                why = s.get("dask_ml_error", "n/a") if key == "dask-ml" else "n/a"
                line += f" {'n/a: ' + why[:23]:>30}"
        print(line)
    print("× np-2: time / NumPy 2-thread time (the goals' floor); × best: / the fastest NumPy variant. "
          "Least-disturbed (min) ms:")
    for s in sizes:
        print(f"  {fmt_rows(s['rows'])}: " + ", ".join(f"{k} {min(v) * 1e3:.1f}" for k, v in s["times"].items()))
    print()
    for s in sizes:
        med = s["median_seconds"]
        ml = f"{med['dask-ml'] / med['gradpipe']:.0f}×" if "dask-ml" in med else "n/a"
        early = [f"{r['status']} after {r['n_iter']}" for r in s["train_runs"] if r["n_iter"] != c["iters"]]
        if early:
            print(f"warning: {fmt_rows(s['rows'])} training runs stopped early: {early}")
        print(f"{fmt_rows(s['rows'])}: {s['chunks']} chunks of {s['chunk_rows']:,} rows, rows per worker "
              f"{sorted(s['rows_per_worker'].values())}; gradpipe FitResult.seconds_per_iter "
              f"{s['fit_seconds_per_iter'] * 1e3:.1f} ms, {s['passes_per_iter']:.2f} passes/iter, checkpoint "
              f"{s['checkpoint_pct']:.2f} %; vs dask-ml {ml}, vs naive dask "
              f"{med['naive-dask'] / med['gradpipe']:.1f}×; worker BLAS threads {s['worker_blas_threads_default']}")
    o = res["overhead"]
    print(f"overhead ({o['rows']:,} rows in {o['chunks']} chunks): engine map_reduce "
          f"{o['engine_median_seconds'] * 1e3:.2f} ms/call, naive dask {o['naive_dask_median_seconds'] * 1e3:.2f} "
          f"ms/compute")
    print("\ngoals:")
    for name, g in res["goals"].items():
        value = "n/a" if g["value"] is None else f"{g['value']:.2f}"
        met = {True: "met", False: "NOT met", None: "n/a"}[g["met"]]
        print(f"  {name:<16} {value:>8}  goal {g['goal']:<6} {met}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    from _report import main

    sys.exit(main(parse_args, run, print_table))
