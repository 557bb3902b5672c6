"""I/O failures and hard-to-represent input: one line naming the file/row/value or the setting, exit 2.

The disk failures are real kernel errors, not mocks: EFBIG from ``RLIMIT_FSIZE`` set in the CLI process
(its embedded local cluster's workers inherit the limit), ENOSPC and EROFS from a small tmpfs where this
process may mount one (root), or a read-only directory by permissions (not root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.ingest import ingest
from pipeline.ingest.parse import Schema, parse_piece
from pipeline.ingest.sources import plan_pieces, read_columns
from pipeline.store.dataset import read_info
from tests.conftest import chunk_object, dataset_state, make_xy, write_csv

ROOT = Path(__file__).resolve().parent.parent

# Sets a file-size limit, then runs the CLI in this very process: the limit is inherited by its workers.
LIMITED = ("import resource, runpy, signal, sys\n"
           "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"  # a write past the limit fails with EFBIG
           "n = int(sys.argv.pop(1)); resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))\n"
           "sys.argv[0] = 'gradpipe'; runpy.run_module('pipeline', run_name='__main__')\n")
FSIZE = 20_000  # bytes: metadata and small chunks fit, a 52 KB X chunk or a run-store chunk does not


def cli(*args: str, fsize: int | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    prefix = [sys.executable, "-c", LIMITED, str(fsize)] if fsize else [sys.executable, "-m", "pipeline"]
    return subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def one_line(proc: subprocess.CompletedProcess) -> str:
    """The CLI failed with exit 2 and said so in exactly one line, without a traceback."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    return lines[0]


def small_csv(path: Path, n: int = 3000, seed: int = 0) -> Path:
    X, y = make_xy(n, 5, seed)
    return write_csv(path, X, y)


# With --compressor none and --chunk-mb 0.05, an X chunk of 5 float64 features is 52 KB: above FSIZE.
LAYOUT = ["--compressor", "none", "--chunk-mb", "0.05", "--json"]


# ---- (a) EFBIG / ENOSPC ---------------------------------------------------------------------------------

def test_ingest_efbig_leaves_no_store(tmp_path):
    src, ds = small_csv(tmp_path / "a.csv"), tmp_path / "ds.zarr"
    proc = cli("ingest", str(src), "--target", "y", "--dataset", str(ds), "--workers", "1", *LAYOUT,
               fsize=FSIZE)
    line = one_line(proc)
    assert f"{ds}: File too large (EFBIG)" in line and "--dataset" in line and "nothing was committed" in line
    assert not ds.exists()


def test_append_efbig_keeps_the_dataset(tmp_path, client):
    ds = tmp_path / "ds.zarr"
    ingest([str(small_csv(tmp_path / "a.csv"))], ds, "y", client, chunk_mb=0.05, compressor="none")
    before = dataset_state(ds)
    proc = cli("ingest", str(small_csv(tmp_path / "b.csv", seed=1)), "--target", "y", "--dataset", str(ds),
               "--workers", "1", *LAYOUT, fsize=FSIZE)
    assert "File too large (EFBIG)" in one_line(proc)
    assert dataset_state(ds) == before
    assert [Path(m["path"]).name for m in read_info(ds).manifest] == ["a.csv"]


def test_train_checkpoint_efbig_is_one_line_and_keeps_the_dataset(tmp_path, client):
    ds, runs = tmp_path / "ds.zarr", tmp_path / "runs"
    ingest([str(small_csv(tmp_path / "a.csv"))], ds, "y", client, chunk_mb=0.05)
    before = dataset_state(ds)
    proc = cli("train", "--dataset", str(ds), "--runs-dir", str(runs), "--solver", "gd", "--max-iter", "3",
               "--workers", "1", "--json", "--quiet", fsize=FSIZE)
    line = one_line(proc)
    assert f"{runs}: File too large (EFBIG)" in line and "--runs-dir" in line, line
    assert dataset_state(ds) == before


@pytest.fixture
def tmpfs(tmp_path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a real full disk (ENOSPC) and, remounted, a real read-only file system (EROFS)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_ingest_and_append_on_a_full_disk(tmp_path, tmpfs, scheduler, client):
    ds = tmpfs / "ds.zarr"
    ingest([str(small_csv(tmp_path / "a.csv", n=500))], ds, "y", client, chunk_mb=0.05, compressor="none")
    before = dataset_state(ds)
    big = small_csv(tmp_path / "big.csv", n=40_000, seed=1)  # 1.6 MB of float64: more than the disk holds
    proc = cli("ingest", str(big), "--target", "y", "--dataset", str(ds), "--scheduler", scheduler, *LAYOUT)
    line = one_line(proc)
    assert f"{ds}: No space left on device (ENOSPC) — free space, or choose another --dataset" in line, line
    assert dataset_state(ds) == before
    new = tmpfs / "new.zarr"
    proc = cli("ingest", str(big), "--target", "y", "--dataset", str(new), "--scheduler", scheduler, *LAYOUT)
    assert "No space left on device (ENOSPC)" in one_line(proc)
    assert not new.exists()


# ---- (b) a directory that cannot hold the dataset ------------------------------------------------------

def test_read_only_directory_is_named(tmp_path, scheduler, client):
    """An existing dataset in a directory that became read-only: append is refused before any write."""
    if os.geteuid() == 0:
        pytest.skip("root writes through permissions; the tmpfs test below covers a read-only directory")
    ro = tmp_path / "ro"
    ro.mkdir()
    ds = ro / "ds.zarr"
    ingest([str(small_csv(tmp_path / "a.csv", n=100))], ds, "y", client)
    before = dataset_state(ds)
    (ro / ".ds.zarr.lock").unlink()
    ro.chmod(0o555)
    try:
        proc = cli("ingest", str(small_csv(tmp_path / "b.csv", n=100, seed=1)), "--target", "y", "--dataset",
                   str(ds), "--scheduler", scheduler)
        line = one_line(proc)
    finally:
        ro.chmod(0o755)
    assert f"cannot create the lock file {ro / '.ds.zarr.lock'} (Permission denied)" in line, line
    assert dataset_state(ds) == before


def test_read_only_file_system_is_named(tmp_path, tmpfs, scheduler, client):
    ds = tmpfs / "ds.zarr"
    ingest([str(small_csv(tmp_path / "a.csv", n=100))], ds, "y", client)
    before = dataset_state(ds)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    proc = cli("ingest", str(small_csv(tmp_path / "b.csv", n=100, seed=1)), "--target", "y", "--dataset",
               str(ds), "--scheduler", scheduler)
    line = one_line(proc)
    assert f"cannot create the lock file {tmpfs / '.ds.zarr.lock'} (Read-only file system)" in line, line
    assert "write ds.zarr somewhere else" in line
    assert dataset_state(ds) == before


def test_dataset_under_a_file_is_named(tmp_path):
    (tmp_path / "notadir").write_text("x")
    src = small_csv(tmp_path / "a.csv", n=50)
    line = one_line(cli("ingest", str(src), "--target", "y", "--dataset", str(tmp_path / "notadir" / "ds.zarr")))
    assert f"({tmp_path / 'notadir'} is a file, not a directory)" in line, line


# ---- (c) truncated .npy --------------------------------------------------------------------------------

def test_truncated_npy_is_named_before_any_cluster(tmp_path):
    path = tmp_path / "t.npy"
    np.save(path, np.arange(4000.0).reshape(1000, 4))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    line = one_line(cli("ingest", str(path), "--target", "3", "--dataset", str(tmp_path / "ds.zarr")))
    assert f"{path}: truncated .npy file: its header says shape (1000, 4) of float64" in line, line
    assert "only 498 complete rows" in line
    assert not (tmp_path / "ds.zarr").exists()


# ---- (d) a garbage chunk read back during an append ---------------------------------------------------

def test_append_onto_a_garbage_last_chunk_names_it(tmp_path, scheduler, client):
    ds = tmp_path / "ds.zarr"
    ingest([str(small_csv(tmp_path / "a.csv", n=3000))], ds, "y", client, chunk_mb=0.05)
    info = read_info(ds)
    last = info.n_rows // info.chunk_rows
    assert info.n_rows % info.chunk_rows  # a partial last chunk: the append reads and rewrites it
    chunk_object(ds, "X", last).write_bytes(b"\x00garbage" * 16)
    before = dataset_state(ds)
    proc = cli("ingest", str(small_csv(tmp_path / "b.csv", n=100, seed=1)), "--target", "y", "--dataset",
               str(ds), "--scheduler", scheduler, "--json")
    line = one_line(proc)
    assert f"array X chunk {last} " in line and "corrupted" in line and "--replace" in line, line
    assert dataset_state(ds) == before


# ---- (e) integers float64 cannot hold ------------------------------------------------------------------

def test_parquet_int64_beyond_2_53_names_row_and_value(tmp_path, scheduler):
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"a": pa.array([1, None, 2**53, 2**53 + 1], pa.int64()),
                             "y": pa.array([1.0, 2.0, 3.0, 4.0])}), path)
    line = one_line(cli("ingest", str(path), "--target", "y", "--dataset", str(tmp_path / "ds.zarr"),
                        "--scheduler", scheduler, "--json"))
    assert f"{path}: row 3 (0-based), column 'a' holds the integer 9007199254740993" in line, line
    assert "not numeric" not in line
    assert not (tmp_path / "ds.zarr").exists()


def test_npy_int64_beyond_2_53_names_row_and_value(tmp_path, scheduler):
    path = tmp_path / "big.npy"
    np.save(path, np.array([[1, 2], [3, 4], [-(2**60), 5]], dtype=np.int64))
    line = one_line(cli("ingest", str(path), "--target", "1", "--dataset", str(tmp_path / "ds.zarr"),
                        "--scheduler", scheduler, "--json"))
    assert f"{path}: row 2 (0-based), column 'col0' holds the integer {-(2**60)}" in line, line


def test_int64_within_2_53_still_ingests(tmp_path, client):
    path = tmp_path / "ok.parquet"
    pq.write_table(pa.table({"a": pa.array([-(2**53), 0, 2**53], pa.int64()), "y": pa.array([1.0, 2, 3])}), path)
    assert ingest([str(path)], tmp_path / "ds.zarr", "y", client).n_rows == 3


# ---- (f) no numpy warning before the message -----------------------------------------------------------

def _first_piece(path: Path, dtype: str):
    columns = read_columns(path)
    schema = Schema(features=[c for c in columns if c != columns[-1]], target=columns[-1], dtype=dtype,
                    on_invalid="error")
    return plan_pieces(path, columns)[0][0], schema


@pytest.mark.parametrize("fmt", ["csv", "npy", "parquet"])
def test_float32_overflow_raises_the_message_without_a_runtime_warning(tmp_path, fmt):
    path = tmp_path / f"a.{fmt}"
    values = np.array([[1.0, 2.0], [1e300, 3.0]])
    if fmt == "csv":
        path.write_text("a,y\n1,2\n1e300,3\n")
    elif fmt == "npy":
        np.save(path, values)
    else:
        pq.write_table(pa.table({"a": values[:, 0], "y": values[:, 1]}), path)
    piece, schema = _first_piece(path, "float32")
    from pipeline.errors import GradpipeError

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning would fail the test here
        with pytest.raises(GradpipeError, match=r"1e\+?300'?, which does not fit float32"):
            parse_piece(piece, schema)
