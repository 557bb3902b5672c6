"""Progress output (issue: long work is silent) and the ingest's task keys on a shared cluster.

- A live line only for a person at a terminal: the CLI runs on a pty (``Terminal``) and on pipes.
- ``on_piece`` hears of every piece once, with byte totals that are the input files' sizes.
- Two ingests of same-named datasets at once on one cluster: each gets its own rows (per-call key token).
"""

from __future__ import annotations

import re
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.ingest import ingest
from pipeline.store.dataset import open_dataset
from tests.conftest import make_xy, write_csv
from tests.test_hardening import Terminal, gradpipe

TRAIN_LINE = re.compile(r"iter\s+\d+/7\b.*loss .*‖g‖ .*lr .*s")  # the live line, not the result lines
PIECES_LINE = re.compile(r"ingest (\d+)/(\d+) pieces")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, client) -> Path:
    root = tmp_path_factory.mktemp("progress")
    X, y = make_xy(2000, 3, seed=7)
    write_csv(root / "a.csv", X, y)
    ingest([str(root / "a.csv")], root / "ds.zarr", "y", client, chunk_mb=0.02)
    return root / "ds.zarr"


def train_argv(dataset: Path, tmp_path: Path, scheduler: str, *extra: str) -> list[str]:
    return [*gradpipe(), "train", "--dataset", str(dataset), "--runs-dir", str(tmp_path / "runs"),
            "--solver", "gd", "--max-iter", "7", "--tol", "0", "--gtol", "0", "--scheduler", scheduler, *extra]


def in_terminal(argv: list[str], cwd: Path) -> str:
    term = Terminal(argv, cwd=cwd)
    try:
        rc, out = term.finish(120)
    finally:
        term.close()
    assert rc == 0, out[-3000:]
    return out


def test_train_on_a_pipe_prints_no_progress(dataset, tmp_path, scheduler):
    """The old code printed a line a second on a pipe; now only the result lines come."""
    piped = subprocess.run(train_argv(dataset, tmp_path, scheduler), cwd=tmp_path, capture_output=True, text=True,
                           timeout=180)
    assert piped.returncode == 0, piped.stderr[-3000:]
    assert not TRAIN_LINE.search(piped.stderr) and "‖g‖" not in piped.stderr + piped.stdout, piped.stderr
    assert "\x1b[" not in piped.stderr  # no cursor codes either
    assert "after 7 iterations" in piped.stdout  # the result lines stay


def test_train_quiet_in_a_terminal_prints_no_progress(dataset, tmp_path, scheduler):
    out = in_terminal(train_argv(dataset, tmp_path, scheduler, "--quiet"), tmp_path)
    assert not TRAIN_LINE.search(out) and "‖g‖" not in out, out[-3000:]
    assert "after 7 iterations" in out, out[-3000:]


def test_train_in_a_terminal_shows_iterations_loss_and_gradient(dataset, tmp_path, scheduler):
    out = in_terminal(train_argv(dataset, tmp_path, scheduler), tmp_path)
    assert TRAIN_LINE.search(out), out[-3000:]
    assert re.search(r"iter\s+7/7", out), out[-3000:]  # the last state is drawn before the line closes
    assert "after 7 iterations" in out, out[-3000:]
    assert "\x1b[?25h" in out.rsplit("\x1b[?25l", 1)[-1], out[-3000:]  # the cursor hidden while live is back


def test_ingest_in_a_terminal_shows_pieces_and_not_on_a_pipe(tmp_path, scheduler, capfd):
    sources = [str(write_csv(tmp_path / f"{i}.csv", *make_xy(300, 2, seed=i))) for i in range(3)]
    args = ["ingest", *sources, "--target", "y", "--scheduler", scheduler]
    out = in_terminal([*gradpipe(), *args, "--dataset", str(tmp_path / "tty.zarr")], tmp_path)
    assert ("3", "3") in PIECES_LINE.findall(out), out[-3000:]
    assert re.search(r"pieces .*B/s", out), out[-3000:]  # bytes read and the rate
    assert "ingested 3 file(s)" in out
    assert main([*args, "--dataset", str(tmp_path / "pipe.zarr")]) == 0  # in-process, stderr is a pipe
    piped = capfd.readouterr()
    assert "ingested 3 file(s)" in piped.out
    assert not PIECES_LINE.search(piped.out + piped.err) and "\x1b[" not in piped.err, piped.err


def test_on_piece_is_called_once_per_piece_with_the_files_sizes(tmp_path, client, monkeypatch):
    import pipeline.ingest.sources as sources

    monkeypatch.setattr(sources, "PIECE_BYTES", 4096)  # several byte ranges per file
    data = [make_xy(n, 3, seed=n) for n in (200, 300)]
    paths = [write_csv(tmp_path / f"{i}.csv", X, y) for i, (X, y) in enumerate(data)]
    np.save(tmp_path / "c.npy", np.column_stack(make_xy(600, 3, seed=3)))
    paths.append(tmp_path / "c.npy")  # rows, not bytes, split an .npy: its shares still add up to its size
    n_pieces = sum(len(sources.plan_pieces(p, sources.read_columns(p))[0]) for p in paths)
    assert n_pieces > len(paths)
    calls, keys = [], set()

    def on_piece(done: int, total: int, bytes_done: int, bytes_total: int) -> None:
        calls.append((done, total, bytes_done, bytes_total))
        if done == 1:  # while the tasks are alive
            keys.update(client.run_on_scheduler(lambda dask_scheduler: [str(k) for k in dask_scheduler.tasks]))

    csvs = [str(p) for p in paths[:2]]
    ingest(csvs, tmp_path / "ds.zarr", "y", client, chunk_mb=0.01, on_piece=on_piece)
    ingest([str(paths[2])], tmp_path / "np.zarr", "-1", client, chunk_mb=0.01, on_piece=on_piece)
    n_csv = sum(len(sources.plan_pieces(Path(p), sources.read_columns(Path(p)))[0]) for p in csvs)
    first, second = calls[:n_csv], calls[n_csv:]
    assert len(calls) == n_pieces
    for run, files in ((first, paths[:2]), (second, paths[2:])):
        assert [c[0] for c in run] == list(range(1, len(run) + 1))
        assert {c[1] for c in run} == {len(run)}
        assert {c[3] for c in run} == {sum(p.stat().st_size for p in files)}
        assert all(a[2] < b[2] for a, b in zip(run, run[1:], strict=False)) and run[-1][2] == run[-1][3]
    assert any(k.startswith("gradpipe-ingest-ds-") for k in keys), sorted(keys)[:20]  # the dashboard's names
    assert any(k.startswith("gradpipe-ingest-np-") for k in keys), sorted(keys)[:20]
    ds = open_dataset(tmp_path / "ds.zarr")  # the callback changes nothing in the result
    assert np.array_equal(ds.X.compute(), np.vstack([X for X, _ in data]))
    assert np.array_equal(ds.y.compute(), np.concatenate([y for _, y in data]))


def test_two_ingests_of_same_named_datasets_at_once_each_get_their_own_rows(tmp_path, client, monkeypatch):
    """Fails without the per-call token in the task keys: both ingests submit gradpipe-ingest-ds-<i> and
    Dask hands the second one the first one's parsed pieces."""
    import pipeline.ingest.sources as sources

    monkeypatch.setattr(sources, "PIECE_BYTES", 4096)  # many pieces in flight at once
    data = {d: make_xy(1500, 3, seed=s) for d, s in (("a", 11), ("b", 12))}
    start, errors = threading.Barrier(2), []

    def one(d: str) -> None:
        try:
            (tmp_path / d).mkdir()
            src = write_csv(tmp_path / d / "x.csv", *data[d])
            start.wait(30)
            ingest([str(src)], tmp_path / d / "ds.zarr", "y", client, chunk_mb=0.01)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(d,)) for d in data]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for d, (X, y) in data.items():
        ds = open_dataset(tmp_path / d / "ds.zarr")
        assert np.array_equal(ds.X.compute(), X) and np.array_equal(ds.y.compute(), y), d
