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
    make_data(SynthSpec(kind="linear", rows=3_000_000, features=20, files=1, format="csv", seed=5), tmp_path / "raw")
    src = next((tmp_path / "raw").glob("*.csv"))
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
    head = pacsv.read_csv(src, read_options=pacsv.ReadOptions(block_size=1 << 20)).slice(0, 5)
    assert np.array_equal(ds.X[:5].compute(), np.column_stack([head.column(i).to_numpy() for i in range(20)]))
    tail_line = src.read_bytes()[-2000:].splitlines()[-1].decode().split(",")
    assert np.array_equal(ds.X[-1].compute(), np.array(tail_line[:20], dtype=float))
    assert ds.y[-1].compute() == float(tail_line[20])
