"""Object storage against local disk, in one run: ingest and streamed training with the data on S3.

Starts a real S3 API server (``moto_server``, in its own process) on 127.0.0.1, writes the same CSV files
locally and to a bucket, and measures on one LocalCluster:

- ingest: local files → local dataset, against s3 files → s3 dataset (workers read byte ranges from the
  store and write chunk objects to it); the two datasets must hold identical X and y;
- training streamed from the dataset (``persist="no"``: every pass reads every chunk from the store), per
  iteration: the median of the run store's elapsed-time differences;
- checkpointing with the run store on s3 against a local run store (the local dataset held in memory, so
  an iteration is as short as it gets and the checkpoint's share as large): the loop's checkpoint cost
  (``FitResult.checkpoint_seconds``) as a share of the run, and the background writer's time per
  iteration. The cost is per iteration and does not grow with rows, so a share measured here bounds the
  share at 10M rows.

Ratios are s3 / local, measured in the same run (the machine is shared and noisy). moto is a Python server
on the same cores as the workers: every byte it serves or stores costs CPU the workers then lack (the
table gives moto's own CPU seconds), and it answers a ranged GET by reading the whole object. It measures
our request pattern and a slow server's costs, not a real network's bandwidth.

    .venv/bin/python bench/object_store.py                 # 1,000,000 rows × 20 features
    .venv/bin/python bench/object_store.py --quick         # a smoke run
    .venv/bin/python bench/ingest.py --target s3           # the same script
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results" / "object_store.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, help="data rows (default 1,000,000; --quick 50,000)")
    p.add_argument("--features", type=int, default=20)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--iters", type=int, default=15, help="training iterations per run")
    p.add_argument("--repeats", type=int, default=3, help="ingests per target, median reported")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--chunk-mb", type=float, default=64.0, help="dataset chunk size, both targets")
    p.add_argument("--requests-per-object", type=int, default=1,
                   help="the requests_per_object storage option (0: Icechunk's default): moto answers a ranged "
                        "GET by reading the whole object, so 1 is its fastest")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    args.rows = args.rows or (50_000 if args.quick else 1_000_000)
    return args


def start_s3() -> tuple[subprocess.Popen, str]:
    """The moto server in its own process (as a real store is: it must not share the driver's GIL, which
    the Dask scheduler of the LocalCluster runs under), and the environment every process (workers
    included) reaches it through."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not start on port {port}") from None
            time.sleep(0.1)
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret",
                      AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1")
    return server, endpoint


def cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds a process (by default this one) has used so far."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def workers_cpu(client) -> float:
    """CPU seconds the cluster's worker processes have used so far."""
    return sum(client.run(cpu_seconds).values())


def per_iteration(run_uri: str) -> float:
    from pipeline.store.runs import RunStore

    elapsed = RunStore.open(run_uri).column("elapsed")
    return statistics.median(b - a for a, b in zip(elapsed[1:-1], elapsed[2:], strict=False))


def run(args: argparse.Namespace) -> dict:
    server, endpoint = start_s3()  # before the cluster: its workers inherit the variables
    try:
        return _measure(args, server, endpoint)
    finally:
        server.terminate()
        server.wait()


def _measure(args: argparse.Namespace, server: subprocess.Popen, endpoint: str) -> dict:
    import boto3
    import numpy as np
    from distributed import Client, LocalCluster

    from pipeline.config import TrainConfig
    from pipeline.ingest import ingest
    from pipeline.store import location
    from pipeline.store.dataset import open_dataset
    from pipeline.synth import SynthSpec, make_data
    from pipeline.training import train

    if args.requests_per_object:
        location.set_storage_options({"requests_per_object": args.requests_per_object})

    def moto_cpu() -> float:
        return cpu_seconds(server.pid)

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="gradpipe-bench")
    work = Path(tempfile.mkdtemp(prefix="gradpipe-bench-s3-"))
    make_data(SynthSpec(kind="linear", rows=args.rows, features=args.features, files=args.files, format="csv"),
              work / "raw")
    files = sorted((work / "raw").glob("*.csv"))
    fs, _ = location.filesystem("s3://gradpipe-bench")
    for f in files:
        fs.put_file(str(f), f"gradpipe-bench/raw/{f.name}")
    times: dict[str, list[float]] = {"local": [], "s3": []}
    server_cpu: dict[str, list[float]] = {"ingest": [], "iteration": []}
    worker_cpu: dict[str, list[float]] = {"local": [], "s3": []}
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as lc, Client(lc) as client:
        for i in range(args.repeats):
            for target in ("local", "s3"):
                src = [str(f) for f in files] if target == "local" else ["s3://gradpipe-bench/raw/*.csv"]
                ds = str(work / f"ds{i}.zarr") if target == "local" else f"s3://gradpipe-bench/datasets/ds{i}"
                c0, w0, t0 = moto_cpu(), workers_cpu(client), time.perf_counter()
                ingest(src, ds, "y", client, chunk_mb=args.chunk_mb)
                times[target].append(time.perf_counter() - t0)
                worker_cpu[target].append(workers_cpu(client) - w0)
                if target == "s3":
                    server_cpu["ingest"].append(moto_cpu() - c0)
        a, b = open_dataset(work / "ds0.zarr"), open_dataset("s3://gradpipe-bench/datasets/ds0")
        assert np.array_equal(a.X.compute(), b.X.compute()) and np.array_equal(a.y.compute(), b.y.compute())
        iters = {}
        cfg = TrainConfig(solver="gd", max_iter=args.iters, tol=0, gtol=0, persist="no")
        for target, ds in (("local", str(work / "ds0.zarr")), ("s3", "s3://gradpipe-bench/datasets/ds0")):
            c0 = moto_cpu()
            fit = train(ds, cfg, client=client, runs_dir=work / "runs", run_id=f"it-{target}")
            iters[target] = per_iteration(fit.run_uri)
            if target == "s3":
                server_cpu["iteration"].append((moto_cpu() - c0) / fit.n_iter)
        ckpt = {}
        cfg = TrainConfig(solver="gd", max_iter=args.iters * 4, tol=0, gtol=0, persist="yes")
        for target, runs in (("local", str(work / "runs")), ("s3", "s3://gradpipe-bench/runs")):
            fit = train(str(work / "ds0.zarr"), cfg, client=client, runs_dir=runs, run_id=f"ck-{target}")
            ckpt[target] = {"iteration_s": fit.seconds_per_iter, "pct": 100 * fit.checkpoint_seconds / fit.seconds,
                            "write_s_per_iter": fit.checkpoint_write_seconds / max(fit.n_iter, 1)}
    ingest_s = {k: statistics.median(v) for k, v in times.items()}
    return {"rows": args.rows, "features": args.features, "files": args.files, "workers": args.workers,
            "chunk_mb": args.chunk_mb, "requests_per_object": args.requests_per_object,
            "csv_mb": round(sum(f.stat().st_size for f in files) / 2**20, 1),
            "ingest_s": ingest_s, "ingest_ratio": ingest_s["s3"] / ingest_s["local"],
            "iteration_s": iters, "iteration_ratio": iters["s3"] / iters["local"], "ingest_runs": times,
            "ingest_worker_cpu_s": {k: statistics.median(v) for k, v in worker_cpu.items()},
            "server_cpu_s": {"ingest": statistics.median(server_cpu["ingest"]),
                             "iteration": server_cpu["iteration"][0]},
            "checkpoint": ckpt}


def print_table(res: dict) -> None:
    print(f"{res['rows']:,} rows × {res['features']} features, {res['files']} CSV files ({res['csv_mb']} MB), "
          f"{res['workers']} workers")
    print(f"{'':28}{'local':>10}{'s3 (moto)':>12}{'s3/local':>10}")
    print(f"{'ingest, s':28}{res['ingest_s']['local']:>10.2f}{res['ingest_s']['s3']:>12.2f}"
          f"{res['ingest_ratio']:>10.2f}")
    print(f"{'streamed iteration, s':28}{res['iteration_s']['local']:>10.3f}{res['iteration_s']['s3']:>12.3f}"
          f"{res['iteration_ratio']:>10.2f}")
    ck = res["checkpoint"]
    cpu, wcpu = res["server_cpu_s"], res["ingest_worker_cpu_s"]
    print(f"{'  workers CPU per ingest, s':28}{wcpu['local']:>10.2f}{wcpu['s3']:>12.2f}")
    print(f"{'  moto CPU per ingest, s':28}{'':>10}{cpu['ingest']:>12.2f}")
    print(f"{'  moto CPU per iteration, s':28}{'':>10}{cpu['iteration']:>12.3f}")
    print(f"{'in-memory iteration, s':28}{ck['local']['iteration_s']:>10.4f}{ck['s3']['iteration_s']:>12.4f}")
    print(f"{'checkpoint, % of the run':28}{ck['local']['pct']:>10.2f}{ck['s3']['pct']:>12.2f}")
    print(f"{'background write, s/iter':28}{ck['local']['write_s_per_iter']:>10.4f}"
          f"{ck['s3']['write_s_per_iter']:>12.4f}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    from _report import main

    sys.exit(main(parse_args, run, print_table))
