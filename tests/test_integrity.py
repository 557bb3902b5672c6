"""Dataset integrity: a missing or corrupted chunk is a clear error naming it, never rows of zeros."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import GradpipeError
from pipeline.ingest import ingest
from pipeline.store.dataset import open_dataset, read_info, read_rows
from tests.conftest import chunk_object, dataset_group, tree_hashes


@pytest.fixture
def small_ds(tmp_path, client) -> Path:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 3))
    y = X @ [1.0, -2.0, 0.5] + 0.1 * rng.normal(size=400)
    lines = ["a,b,c,y"] + [",".join(f"{v:.6f}" for v in (*x, t)) for x, t in zip(X, y, strict=True)]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    path = tmp_path / "ds.zarr"
    ingest([str(tmp_path / "d.csv")], path, "y", client, chunk_mb=0.002)  # ~87 rows a chunk: 5 chunks
    return path


def _rows(ds: Path, k: int) -> tuple[int, int]:
    info = read_info(ds)
    return k * info.chunk_rows, min(info.n_rows, (k + 1) * info.chunk_rows)


def test_ingest_writes_crc32c_checksums(small_ds):
    for name in ("X", "y"):
        codecs = [type(c).__name__ for c in dataset_group(small_ds)[name].metadata.codecs]
        assert codecs[-1] == "Crc32cCodec", codecs


def test_lost_chunk_object_names_the_chunk(small_ds):
    assert read_info(small_ds).n_chunks >= 4
    chunk_object(small_ds, "X", 3).unlink()
    with pytest.raises(GradpipeError, match=r"array X chunk 3 .*corrupted or missing"):
        read_rows(str(small_ds), *_rows(small_ds, 3))
    read_rows(str(small_ds), *_rows(small_ds, 2))  # the others still read


@pytest.mark.parametrize("damage", ["flip", "garbage", "truncate"])
def test_corrupted_chunk_names_array_and_chunk_at_read(small_ds, damage):
    chunk = chunk_object(small_ds, "X", 2)
    raw = bytearray(chunk.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x01  # one bit: only the checksum can tell
    elif damage == "garbage":
        raw = bytearray(b"not a blosc frame" * 8)
    else:
        raw = raw[: len(raw) // 2]
    chunk.write_bytes(bytes(raw))
    open_dataset(small_ds)  # the damage shows at first read, not at open
    with pytest.raises(GradpipeError, match=r"array X chunk 2 .*corrupted"):
        read_rows(str(small_ds), *_rows(small_ds, 2))
    read_rows(str(small_ds), *_rows(small_ds, 0))  # the intact chunks still read


def test_cli_train_on_garbage_chunk_is_one_line_exit_2(small_ds, scheduler, tmp_path):
    chunk = chunk_object(small_ds, "X", 1)
    chunk.write_bytes(b"\x00garbage" * 16)
    before = tree_hashes(small_ds)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train", "--dataset", str(small_ds), "--scheduler",
                           scheduler, "--runs-dir", str(tmp_path / "runs"), "--solver", "gd", "--max-iter", "3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "array X chunk 1" in proc.stderr and "corrupted" in proc.stderr
    assert tree_hashes(small_ds) == before  # nothing touched


def test_run_lock_refuses_a_second_writer_and_dies_with_its_process(tmp_path):
    import time

    from pipeline.store.runs import run_lock

    store = tmp_path / "r1.zarr"
    with run_lock(store), pytest.raises(GradpipeError, match="r1 is being trained or resumed by another"):
        with run_lock(store):
            pass
    # A holder killed by SIGKILL: the OS drops its flock, the next resume is not blocked.
    code = f"from pipeline.store.runs import run_lock\nwith run_lock({str(store)!r}):\n print('held', flush=True)\n" \
           " import time; time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(GradpipeError):
            with run_lock(store):
                pass
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while True:  # wait on the condition (the lock is free), with a deadline
        try:
            with run_lock(store):
                break
        except GradpipeError:
            assert time.monotonic() < deadline, "a dead holder's lock was never released"
            time.sleep(0.05)


def test_runs_list_shows_a_store_without_row_0_as_not_started(tmp_path):
    from pipeline.cli.runs import summary
    from pipeline.store.runs import DatasetRef, RunStore

    ref = DatasetRef(uri="ds.zarr", fingerprint="f", feature_names=["a"], target="y", n_rows=1, mean=None,
                     scale=None)
    RunStore.create(tmp_path / "dead.zarr", config={}, solver="gd", dataset=ref, n_params=2, state_shapes={},
                    version="0")
    assert summary(tmp_path / "dead.zarr")["status"] == "not started"


def test_a_second_resume_of_a_run_is_refused_while_one_holds_it(small_ds, client, tmp_path):
    from pipeline.config import TrainConfig
    from pipeline.store.runs import run_lock
    from pipeline.training import resume, train

    runs = tmp_path / "runs"
    train(small_ds, TrainConfig(solver="gd", max_iter=3, tol=0), client=client, runs_dir=runs, run_id="r")
    with run_lock(runs / "r.zarr"), pytest.raises(GradpipeError, match="r is being trained or resumed"):
        resume("r", runs_dir=runs, client=client, max_iter=6)
    assert resume("r", runs_dir=runs, client=client, max_iter=6).n_iter == 6  # free again: it resumes
