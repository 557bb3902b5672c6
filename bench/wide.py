"""Wide data: peak memory and start-up of a Gram pass at thousands of features.

Why: ``--lr auto`` (and Newton/IRLS, TSQR) reduce a (d+1)² matrix per leaf. Built for every leaf before
any was reduced, 20,000 rows × 5,000 features peaked at 10.3 GB RSS. Now a worker folds its leaves in
place up the fixed tree, one task per block of the tree's first level, and the driver folds the blocks as
they complete (``pipeline.engine.STREAM_BYTES``), so the peak should be O(workers × d²), not growing with
the leaf count (goal: peak RSS of the whole process tree, less that of a 10-feature run, ≤ 4 × (workers + 1) × the
Gram's bytes + the data).

Setup per width d: rows = ``--rows`` (default 20,000), Gaussian features, a linear target, one .npy file;
``gradpipe ingest`` (64 MiB chunks in 16 MiB leaves: ~210 rows per leaf at 10,000 features, 96 leaves), then
``gradpipe train --solver gd --lr auto --max-iter 3`` on an embedded 2-worker LocalCluster. The process
tree (CLI + nanny + workers) is sampled with psutil every 0.1 s; the table gives its peak RSS, the seconds
until the run's first row was committed (the Gram pass plus θ₀'s pass: the start-up), the data and Gram
sizes, and the peak over the goal's bound.

    python bench/wide.py --quick     # 2,000 and 4,000 features, ~1 minute
    python bench/wide.py             # 5,000 and 10,000 features; several minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._report import main  # noqa: E402

RESULTS = REPO / "bench" / "results" / "wide.json"
WORKERS = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2,000 and 4,000 features")
    p.add_argument("--widths", default=None, help="comma-separated feature counts (default 5000,10000)")
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    args.widths = [int(w) for w in (args.widths or ("2000,4000" if args.quick else "5000,10000")).split(",")]
    return args


class TreeRss:
    """Peak resident memory of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int):
        self.root, self.peak, self.driver, self.worker = psutil.Process(pid), 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            total = 0
            try:
                for p in [self.root, *self.root.children(recursive=True)]:
                    try:
                        rss = p.memory_info().rss
                    except psutil.Error:
                        continue
                    total += rss
                    if p.pid == self.root.pid:
                        self.driver = max(self.driver, rss)
                    else:
                        self.worker = max(self.worker, rss)
            except psutil.Error:
                return
            self.peak = max(self.peak, total)
            time.sleep(0.1)

    def stop(self) -> TreeRss:
        self._stop.set()
        self._thread.join()
        return self


def cli(args: list[str], cwd: Path) -> tuple[float, TreeRss, str]:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    rss = TreeRss(proc.pid)
    out, err = proc.communicate()
    rss.stop()
    if proc.returncode:
        raise SystemExit(f"gradpipe {args[0]} failed ({proc.returncode}):\n{err[-3000:]}")
    return time.perf_counter() - t0, rss, out


def one_width(d: int, rows: int, root: Path) -> dict:
    rng = np.random.default_rng(d)
    data = np.empty((rows, d + 1))
    for a in range(0, rows, 2000):  # in blocks: no second full-size temporary
        b = min(rows, a + 2000)
        data[a:b, :d] = rng.standard_normal((b - a, d))
    data[:, d] = data[:, :d] @ rng.standard_normal(d) / np.sqrt(d) + rng.standard_normal(rows)
    src = root / f"wide{d}.npy"
    np.save(src, data)
    del data
    ds, runs = root / f"wide{d}.zarr", root / "runs"
    t_ingest, rss_ingest, _ = cli(["ingest", str(src), "--target", str(d), "--dataset", str(ds),
                                   "--workers", str(WORKERS), "--json"], root)
    src.unlink()
    t_train, rss_train, out = cli(["train", "--dataset", str(ds), "--runs-dir", str(runs), "--run-id", f"w{d}",
                                   "--solver", "gd", "--lr", "auto", "--max-iter", "3", "--workers", str(WORKERS),
                                   "--json"], root)
    import zarr

    store = zarr.open_group(str(runs / f"w{d}.zarr"), mode="r")
    first_row = float(store["elapsed"][0])
    gram = (d + 1) ** 2 * 8
    data_bytes = rows * (d + 1) * 8
    bound = 4 * (WORKERS + 1) * gram + data_bytes
    shutil.rmtree(ds)
    return {"features": d, "rows": rows, "data_gb": data_bytes / 1e9, "gram_gb": gram / 1e9,
            "ingest_s": t_ingest, "ingest_peak_gb": rss_ingest.peak / 1e9, "train_s": t_train,
            "start_s": first_row, "train_peak_gb": rss_train.peak / 1e9, "driver_peak_gb": rss_train.driver / 1e9,
            "worker_peak_gb": rss_train.worker / 1e9, "bound_gb": bound / 1e9,
            "peak_over_bound": rss_train.peak / bound, "result": json.loads(out)["status"]}


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="gradpipe-wide-") as tmp:
        base = one_width(10, 2000, Path(tmp))  # Python, Dask and NumPy in 3 processes: what any run costs
        rows = [one_width(d, args.rows, Path(tmp)) for d in args.widths]
    for r in rows:
        r["baseline_gb"] = base["train_peak_gb"]
        r["peak_over_bound"] = (r["train_peak_gb"] - base["train_peak_gb"]) / r["bound_gb"]
    return {"bench": "wide", "workers": WORKERS, "load": os.getloadavg(), "rows": rows,
            "goal": "train_peak_gb - baseline_gb <= bound_gb"}


def print_table(res: dict) -> None:
    print(f"{'features':>8} {'rows':>7} {'data GB':>8} {'Gram GB':>8} {'ingest s':>9} {'start s':>8} "
          f"{'train s':>8} {'peak GB':>8} {'driver':>7} {'worker':>7} {'bound GB':>9} {'peak/bound':>10}")
    for r in res["rows"]:
        print(f"{r['features']:>8} {r['rows']:>7} {r['data_gb']:>8.2f} {r['gram_gb']:>8.2f} {r['ingest_s']:>9.1f} "
              f"{r['start_s']:>8.1f} {r['train_s']:>8.1f} {r['train_peak_gb']:>8.2f} {r['driver_peak_gb']:>7.2f} "
              f"{r['worker_peak_gb']:>7.2f} {r['bound_gb']:>9.2f} "
              f"{r['peak_over_bound']:>10.2f}")
    print(f"baseline (a 10-feature run) {res['rows'][0]['baseline_gb']:.2f} GB; load average {res['load'][0]:.1f}")


if __name__ == "__main__":
    sys.exit(main(parse_args, run, print_table))
