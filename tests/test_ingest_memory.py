"""A file larger than a worker's memory limit ingests: parse tasks see bounded byte ranges, a bounded window
of parsed pieces is alive at once, and each finished chunk is released."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow.csv as pacsv
from distributed import Client, LocalCluster

from pipeline.ingest import ingest
from pipeline.store.dataset import open_dataset
from pipeline.synth import SynthSpec, make_data


def test_file_larger_than_worker_memory(tmp_path):
    # 100,000 generated rows repeated 30 times: the same ~650 MB as 3,000,000 generated rows (what matters here is
    # the size against the worker's limit, not the values), written in seconds instead of a minute on 2 cores
    make_data(SynthSpec(kind="linear", rows=100_000, features=20, files=1, format="csv", seed=5), tmp_path / "gen")
    header, body = next((tmp_path / "gen").glob("*.csv")).read_bytes().split(b"\n", 1)
    assert body.endswith(b"\n")
    (tmp_path / "raw").mkdir()
    src = tmp_path / "raw" / "big.csv"
    with open(src, "wb") as fh:
        fh.write(header + b"\n")
        for _ in range(30):
            fh.write(body)
    limit = 500 * 2**20
    assert src.stat().st_size > 1.2 * limit  # ~650 MB of CSV against a 500 MiB worker
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", memory_limit=limit,
                      dashboard_address="127.0.0.1:0", silence_logs=logging.CRITICAL) as lc, Client(lc) as client:
        worker = next(iter(client.scheduler_info()["workers"]))
        res = ingest([str(src)], tmp_path / "ds.zarr", "y", client, chunk_mb=16)
        assert list(client.scheduler_info()["workers"]) == [worker]  # never killed and restarted for memory
    assert res.n_rows == 3_000_000
    ds = open_dataset(tmp_path / "ds.zarr")
    # spot-check the first and last rows against pyarrow reading the same bytes independently
    # (the first 1 MiB block and the last 2,000 bytes only: reading all ~650 MB again here cost seconds)
    with pacsv.open_csv(src, read_options=pacsv.ReadOptions(block_size=1 << 20)) as reader:
        head = reader.read_next_batch().slice(0, 5)
    assert np.array_equal(ds.X[:5].compute(), np.column_stack([head.column(i).to_numpy() for i in range(20)]))
    with open(src, "rb") as fh:
        fh.seek(-2000, 2)
        tail_line = fh.read().splitlines()[-1].decode().split(",")
    assert np.array_equal(ds.X[-1].compute(), np.array(tail_line[:20], dtype=float))
    assert ds.y[-1].compute() == float(tail_line[20])
