"""Ingest throughput: ``gradpipe ingest`` against pyarrow's CSV parse ceiling and the dask.dataframe recipe.

Why: ingest should run at a useful fraction of what merely parsing the CSV costs, and beat the obvious
``dd.read_csv(...).to_dask_array(lengths=True).rechunk(...).to_zarr(...)`` recipe, which parses the files
twice (once for the partition lengths). The compressor rows (lz4 / zstd / none: ingest time, bytes on
disk, read-back speed of X) are what justify gradpipe's default compressor.

All methods run in the same process on the same data; gradpipe and dask share one LocalCluster of
``--workers`` processes × 1 thread; pyarrow parses in the driver with its own thread pool (all cores).
After an untimed warm-up, every measurement is repeated ``--repeats`` times in interleaved order and the
median is reported. The CSV files are in the page cache (they were just written), so this measures
parse/encode/write, not the disk. "vs pyarrow" is speed relative to parsing alone (1.0 = as fast).

    python bench/ingest.py --quick          # smoke run, seconds
    python bench/ingest.py                  # ≥ 1 GB of CSV; several minutes on 2 cores
    python bench/ingest.py --target s3      # local against S3 ingest of the same files (bench/object_store.py)
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

COMPRESSORS = ("lz4", "zstd", "none")
RESULTS = REPO / "bench" / "results" / "ingest.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, help="data rows (default 5,000,000 ≈ 1.1 GB of CSV; --quick 200,000)")
    p.add_argument("--features", type=int, default=20)
    p.add_argument("--files", type=int, help="CSV files (default 8; --quick 4)")
    p.add_argument("--repeats", type=int, help="runs per measurement, median reported (default 3; --quick 1)")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (1 thread each)")
    p.add_argument("--chunk-mb", type=float, help="MiB of X per row chunk (default 64; --quick 4)")
    p.add_argument("--workdir", help="where to put the data (default: a new temp dir)")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument("--keep", action="store_true", help="keep the generated CSV files and stores")
    p.add_argument("--target", choices=("local", "s3"), default="local",
                   help="s3: ingest into a dataset on a local S3 server (moto) against local ingest of the same "
                        "files, and streamed training from both: bench/object_store.py, with --rows, --features, "
                        "--files, --repeats, --workers, --quick")
    p.add_argument("--out", help=f"JSON results (default {RESULTS.relative_to(REPO)}; --target s3: "
                                 f"bench/results/object_store.json)")
    args = p.parse_args(argv)
    if args.target == "s3":
        keep = {"--rows": args.rows, "--features": args.features, "--files": args.files, "--repeats": args.repeats,
                "--workers": args.workers, "--out": args.out}
        return _object_store().parse_args([a for k, v in keep.items() if v is not None for a in (k, str(v))]
                                          + (["--quick"] if args.quick else []))
    args.out = args.out or str(RESULTS)
    args.rows = args.rows or (200_000 if args.quick else 5_000_000)
    args.files = args.files or (4 if args.quick else 8)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.chunk_mb = args.chunk_mb or (4.0 if args.quick else 64.0)
    return args


def _object_store():
    sys.path.insert(0, str(Path(__file__).parent))
    import object_store

    return object_store


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.0f}k"


def bench_pyarrow(files: list[Path], n_features: int) -> tuple[float, int]:
    """The parse ceiling: pyarrow's multi-threaded CSV reader, float64 columns, nothing else."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    types = {f"x{j}": pa.float64() for j in range(n_features)} | {"y": pa.float64()}
    t0, rows = time.perf_counter(), 0
    for f in files:
        table = pacsv.read_csv(f, read_options=pacsv.ReadOptions(use_threads=True),
                               convert_options=pacsv.ConvertOptions(column_types=types))
        rows += table.num_rows
        del table
    return time.perf_counter() - t0, rows


def bench_gradpipe(raw: Path, store: Path, client, compressor: str, chunk_mb: float) -> tuple[float, int]:
    from pipeline.ingest import ingest

    shutil.rmtree(store, ignore_errors=True)
    t0 = time.perf_counter()
    result = ingest([str(raw)], store, "y", client, chunk_mb=chunk_mb, compressor=compressor)
    return time.perf_counter() - t0, result.n_rows


def bench_dask(files: list[Path], store: Path, n_features: int, chunk_rows: int) -> tuple[float, int]:
    """The dask.dataframe recipe, at its best: X and y stored in one compute, so the CSV is read twice
    (lengths, then data) rather than three times. Same codec as gradpipe's default (lz4)."""
    import dask
    import dask.array as da
    import dask.dataframe as dd
    import zarr

    from pipeline.store.dataset import _codecs  # gradpipe's lz4 settings, so bytes on disk compare

    shutil.rmtree(store, ignore_errors=True)
    t0 = time.perf_counter()
    arr = dd.read_csv([str(f) for f in files], dtype="float64").to_dask_array(lengths=True)
    X = arr[:, :n_features].rechunk((chunk_rows, n_features))
    y = arr[:, n_features].rechunk((chunk_rows,))
    zarr.open_group(str(store), mode="w", zarr_format=3)
    codecs = _codecs("lz4", 8)
    dask.compute(da.to_zarr(X, str(store), component="X", compute=False, compressors=codecs),
                 da.to_zarr(y, str(store), component="y", compute=False, compressors=codecs))
    return time.perf_counter() - t0, arr.shape[0]


def open_group(store: Path):
    """A store's root group read-only: a gradpipe dataset through Icechunk, dask's plain Zarr directly."""
    import zarr

    if (store / "refs").is_dir():
        import icechunk

        repo = icechunk.Repository.open(icechunk.local_filesystem_storage(str(store)))
        return zarr.open_group(repo.readonly_session("main").store, mode="r")
    return zarr.open_group(str(store), mode="r")


def read_back(store: Path) -> float:
    """Seconds to read all of X into memory with plain zarr (decompression included)."""
    t0 = time.perf_counter()
    X = open_group(store)["X"][:]
    seconds = time.perf_counter() - t0
    del X
    return seconds


def check_same(a: Path, b: Path, rows: int) -> None:
    """Both stores must hold the same data (pandas' parser may differ from Arrow's in the last ulp)."""
    import numpy as np

    ga, gb = open_group(a), open_group(b)
    for name in ("X", "y"):
        assert ga[name].shape[0] >= rows and gb[name].shape[0] == rows, (name, ga[name].shape, gb[name].shape)
        for lo in (0, rows // 2, max(0, rows - 1000)):
            np.testing.assert_allclose(ga[name][lo:lo + 1000], gb[name][lo:lo + 1000], rtol=1e-15, atol=0)


def warm_up(work: Path, client, args: argparse.Namespace) -> None:
    """One tiny untimed pass of each method, so worker start-up and imports are not charged to the first."""
    from pipeline.synth import SynthSpec, make_data

    tiny = work / "warm-up"
    make_data(SynthSpec("linear", 20_000, args.features, 2, "csv", seed=1), tiny / "raw")
    files = sorted((tiny / "raw").glob("part-*.csv"))
    bench_pyarrow(files, args.features)
    for c in COMPRESSORS:
        bench_gradpipe(tiny / "raw", tiny / f"{c}.zarr", client, c, args.chunk_mb)
    bench_dask(files, tiny / "dask.zarr", args.features, 10_000)
    shutil.rmtree(tiny)


def run(args: argparse.Namespace) -> dict:
    if not hasattr(args, "chunk_mb"):  # --target s3
        return _object_store().run(args)
    from pipeline.cluster import dask_client
    from pipeline.store.dataset import chunk_rows_for
    from pipeline.synth import SynthSpec, make_data

    work = Path(args.workdir).absolute() if args.workdir else Path(tempfile.mkdtemp(prefix="gradpipe-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    raw, stores = work / "raw", work / "stores"
    try:
        spec = SynthSpec("linear", args.rows, args.features, args.files, "csv", seed=0)
        gen = make_data(spec, raw)
        files = sorted(raw.glob("part-*.csv"))
        print(f"data: {args.rows:,} rows × {args.features} features in {args.files} CSV files, "
              f"{gen.bytes / 1e9:.2f} GB, generated in {gen.seconds:.1f} s ({raw})", file=sys.stderr)
        chunk_rows = chunk_rows_for(args.chunk_mb, args.features, 8)
        times: dict[str, list[float]] = {}
        extra: dict[str, dict] = {}
        with dask_client(workers=args.workers, announce=False) as client:
            warm_up(work, client, args)
            for r in range(args.repeats):
                s, n = bench_pyarrow(files, args.features)
                assert n == args.rows, n
                times.setdefault("pyarrow", []).append(s)
                for c in COMPRESSORS:
                    store = stores / f"gradpipe-{c}.zarr"
                    s, n = bench_gradpipe(raw, store, client, c, args.chunk_mb)
                    assert n == args.rows, n
                    times.setdefault(f"gradpipe-{c}", []).append(s)
                    e = extra.setdefault(f"gradpipe-{c}", {"read_seconds": []})
                    e["bytes"] = tree_bytes(store)
                    e["read_seconds"].append(read_back(store))
                    if c != "lz4":
                        shutil.rmtree(store)
                store = stores / "dask.zarr"
                s, n = bench_dask(files, store, args.features, chunk_rows)
                assert n == args.rows, n
                times.setdefault("dask", []).append(s)
                e = extra.setdefault("dask", {"read_seconds": []})
                e["bytes"] = tree_bytes(store)
                e["read_seconds"].append(read_back(store))
                check_same(stores / "gradpipe-lz4.zarr", store, args.rows)
                shutil.rmtree(store)
                print(f"repeat {r + 1}/{args.repeats}: " +
                      ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()), file=sys.stderr)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        elif args.workdir:
            shutil.rmtree(raw, ignore_errors=True)
            shutil.rmtree(stores, ignore_errors=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return summarize(args, gen, times, extra)


LABELS = {"pyarrow": "pyarrow read_csv (parse only)", "gradpipe-lz4": "gradpipe ingest, lz4 (default)",
          "gradpipe-zstd": "gradpipe ingest, zstd", "gradpipe-none": "gradpipe ingest, no compression",
          "dask": "dask.dataframe → to_zarr, lz4"}


def summarize(args: argparse.Namespace, gen, times: dict[str, list[float]], extra: dict[str, dict]) -> dict:
    import dask
    import numpy as np
    import pyarrow
    import zarr

    x_bytes = args.rows * args.features * 8
    base = statistics.median(times["pyarrow"])
    methods = []
    for key, label in LABELS.items():
        med = statistics.median(times[key])
        m = {"method": key, "label": label, "seconds": times[key], "median_seconds": med,
             "rows_per_second": args.rows / med, "ratio_to_pyarrow": base / med}
        if key in extra:
            read = statistics.median(extra[key]["read_seconds"])
            m |= {"bytes_on_disk": extra[key]["bytes"],
                  "compression_ratio": (x_bytes + args.rows * 8) / extra[key]["bytes"],
                  "read_x_seconds": extra[key]["read_seconds"], "read_x_median_seconds": read,
                  "read_x_gb_per_second": x_bytes / read / 1e9}
        methods.append(m)
    return {
        "config": {k: getattr(args, k)
                   for k in ("rows", "features", "files", "repeats", "workers", "chunk_mb", "quick")},
        "data": {"csv_bytes": gen.bytes, "generate_seconds": gen.seconds, "x_bytes_float64": x_bytes},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "numpy": np.__version__, "pyarrow": pyarrow.__version__,
                    "dask": dask.__version__, "zarr": zarr.__version__},
        "methods": methods,
    }


def print_table(res: dict) -> None:
    if "ingest_ratio" in res:  # --target s3
        return _object_store().print_table(res)
    c = res["config"]
    print(f"\ningest: {c['rows']:,} rows × {c['features']} features, {c['files']} CSV files "
          f"({res['data']['csv_bytes'] / 1e9:.2f} GB), {c['workers']} workers × 1 thread, "
          f"median of {c['repeats']}")
    head = (f"{'method':<32} {'seconds':>8} {'rows/s':>8} {'vs pyarrow':>10} {'on disk':>9} {'ratio':>6} "
            f"{'read X':>7} {'GB/s':>6}")
    print(head)
    print("-" * len(head))
    for m in res["methods"]:
        line = (f"{m['label']:<32} {m['median_seconds']:>8.2f} {fmt_rate(m['rows_per_second']):>8} "
                f"{m['ratio_to_pyarrow']:>10.2f}")
        if "bytes_on_disk" in m:
            line += (f" {m['bytes_on_disk'] / 1e6:>6.0f} MB {m['compression_ratio']:>6.2f} "
                     f"{m['read_x_median_seconds']:>6.2f}s {m['read_x_gb_per_second']:>6.2f}")
        print(line)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    from _report import main

    sys.exit(main(parse_args, run, print_table))
