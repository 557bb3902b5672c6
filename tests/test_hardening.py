"""What a terminal, a dying cluster and a run cut short do to training (issue: hardening).

- Ctrl-C in a terminal reaches the whole process group: the driver *and* the embedded cluster's workers.
  The tests run the CLI in its own session on a pty and signal the group, as a terminal does.
- Every worker killed mid-run: the nannies restart them, the pass is re-placed, the history is unchanged.
- A run that ends on its budget says so (``converged: false``) and the quality gate refuses to publish it.
"""

from __future__ import annotations

import json
import logging
import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from distributed import Client, LocalCluster

from pipeline.cli import main
from pipeline.config import TrainConfig
from pipeline.ingest import ingest
from pipeline.publish import decide
from pipeline.store.runs import RunStore
from pipeline.training import train
from tests.conftest import make_xy, wait_until, write_csv

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, client):
    root = tmp_path_factory.mktemp("hardening")
    X, y = make_xy(6000, 5, seed=4)
    write_csv(root / "a.csv", X, y)
    ingest([str(root / "a.csv")], root / "ds.zarr", "y", client, chunk_mb=0.02)  # 15 chunks
    return root / "ds.zarr"


def committed(store: Path) -> int:
    try:
        return RunStore.open(store).committed
    except Exception:  # noqa: BLE001 - not created yet, or being created
        return -1


class Terminal:
    """A command in its own session with a pty as its terminal: ``interrupt`` is a terminal's Ctrl-C."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str] | None = None):
        master, slave = pty.openpty()
        self.master = master
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, start_new_session=True,
                                     env={**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"},
                                          "COLUMNS": "200", **(env or {})})
        os.close(slave)
        self.output = b""

    def running(self) -> bool:
        if self.proc.poll() is not None:
            self._drain()
            raise AssertionError(f"exited {self.proc.returncode}:\n{self.output.decode(errors='replace')[-3000:]}")
        return True

    def interrupt(self, sig: int = signal.SIGINT) -> None:
        os.killpg(self.proc.pid, sig)  # the whole foreground group, workers included

    def finish(self, deadline_s: float) -> tuple[int, str]:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            self._drain()
            if self.proc.poll() is not None:
                self._drain()
                return self.proc.returncode, self.output.decode(errors="replace")
            time.sleep(0.05)
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        raise AssertionError(f"did not exit within {deadline_s} s:\n{self.output.decode(errors='replace')[-3000:]}")

    def _drain(self) -> None:
        import select

        while select.select([self.master], [], [], 0)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # the other end closed
                return
            if not chunk:
                return
            self.output += chunk

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        os.close(self.master)


def gradpipe() -> list[str]:
    script = Path(sys.executable).parent / "gradpipe"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline"]


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_in_a_terminal_stops_train_and_leaves_a_resumable_run(presses, dataset, tmp_path, scheduler):
    """Fails without the shielded workers: they die of the terminal's SIGINT and the driver waits for ever."""
    store = tmp_path / "runs" / "ctrlc.zarr"
    term = Terminal([*gradpipe(), "train", "--dataset", str(dataset), "--runs-dir", str(tmp_path / "runs"),
                     "--run-id", "ctrlc", "--solver", "gd", "--no-standardize", "--lr", "1e-9", "--tol", "0",
                     "--gtol", "0", "--max-iter", "1000000", "--workers", "2"], cwd=tmp_path)
    try:
        wait_until(lambda: term.running() and committed(store) >= 3, 120, "training started")
        for _ in range(presses):  # a second press lands while the run stops
            term.interrupt()
        rc, out = term.finish(30)
    finally:
        term.close()
    assert rc == 130, out[-3000:]
    assert f"gradpipe train --resume ctrlc --runs-dir {tmp_path / 'runs'}" in out, out[-3000:]
    run = RunStore.open(store)
    assert run.status == "stopped" and run.committed >= 3, (run.status, run.committed)
    before = run.committed
    rc = main(["train", "--resume", "ctrlc", "--runs-dir", str(tmp_path / "runs"), "--max-iter", str(before + 3),
               "--scheduler", scheduler, "--quiet"])
    assert rc == 0 and RunStore.open(store).committed == before + 3


def test_every_worker_killed_mid_run_the_run_completes_bitwise(dataset, tmp_path):
    """Fails before the engine re-placed lost passes: the pass pinned to dead workers waited for ever."""
    cfg = TrainConfig(solver="gd", max_iter=20, tol=0, gtol=0, standardize=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0", silence_logs=logging.CRITICAL) as lc, Client(lc) as c:
        clean = train(dataset, cfg, client=c, runs_dir=tmp_path, run_id="clean")
        pids = set(c.run(os.getpid).values())

        def kill_all(t, _rec):
            if t == 8:
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)

        killed = train(dataset, cfg, client=c, runs_dir=tmp_path, run_id="killed", on_iteration=kill_all)
        after = set(c.run(os.getpid).values())
    assert not pids & after  # the workers that finished the run are the restarted ones
    a, b = (RunStore.open(tmp_path / f"{r}.zarr").history() for r in ("clean", "killed"))
    for name in ("theta", "grad", "loss"):
        assert np.array_equal(a[name], b[name]), name  # bitwise: the same tree, whoever computed the leaves
    assert killed.n_iter == clean.n_iter == 20


def test_a_run_cut_short_says_so_and_is_not_published(dataset, tmp_path, scheduler, capsys):
    rc = main(["train", "--dataset", str(dataset), "--runs-dir", str(tmp_path), "--run-id", "short", "--solver", "gd",
               "--no-standardize", "--max-iter", "3", "--scheduler", scheduler, "--json"])
    out = capsys.readouterr()
    assert rc == 0
    result = json.loads(out.out.strip().splitlines()[-1])
    assert result["converged"] is False and result["status"] == "max_iter"
    assert any("NOT CONVERGED" in w and "--max-iter" in w for w in result["warnings"])
    store = RunStore.open(tmp_path / "short.zarr")
    assert store.attrs["converged"] is False
    metrics = {"rmse": 1.0}
    refused = decide("linear", metrics, None, None, converged=False)
    assert not refused.publish and "--allow-unconverged" in refused.reason
    assert decide("linear", metrics, None, None, converged=False, allow_unconverged=True).publish

    rc = main(["train", "--dataset", str(dataset), "--runs-dir", str(tmp_path), "--run-id", "full", "--solver",
               "exact", "--scheduler", scheduler, "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and result["converged"] is True and not any("NOT CONVERGED" in w for w in result["warnings"])
    assert RunStore.open(tmp_path / "full.zarr").attrs["converged"] is True


def test_the_pipeline_does_not_publish_an_unconverged_run(tmp_path, scheduler, prefect_server):
    """Fails before the gate looked at convergence: a run stopped at max_iter was published as the first model."""
    from flows.pipeline import pipeline_flow
    from pipeline.settings import load

    X, y = make_xy(2000, 3, seed=9)
    (tmp_path / "raw").mkdir()
    write_csv(tmp_path / "raw" / "a.csv", X, y)

    def settings(**extra):
        return load(overrides={"name": "u", "raw": [str(tmp_path / "raw")], "target": "y", "chunk_mb": 0.02,
                               "data_dir": str(tmp_path / "data"), "scheduler": scheduler, "solver": "gd",
                               "max_iter": 2, **extra}).to_dict()

    latest = tmp_path / "data" / "models" / "u" / "latest.json"
    result = pipeline_flow(settings())
    assert result["train"]["converged"] is False and not result["publish"]["publish"]
    assert "did not converge" in result["publish"]["reason"] and not latest.exists()
    result = pipeline_flow(settings(allow_unconverged=True))
    assert result["publish"]["publish"] and json.loads(latest.read_text())["run_id"] == result["train"]["run_id"]


def test_ctrl_c_in_a_terminal_stops_gradpipe_run(tmp_path):
    """Fails without the shielded workers and Prefect server: both died of the terminal's SIGINT, and the
    flow then waited for the dead server for minutes. Now: the run stops resumable, exit 130 in seconds."""
    X, y = make_xy(20000, 5, seed=2)
    (tmp_path / "raw").mkdir()
    write_csv(tmp_path / "raw" / "a.csv", X, y)
    runs = tmp_path / "data" / "runs"
    env = {"GRADPIPE_TRAIN_TOL": "0", "GRADPIPE_TRAIN_GTOL": "0", "GRADPIPE_TRAIN_LR": "1e-9",  # never converges
           "PREFECT_HOME": str(tmp_path / "prefect")}
    term = Terminal([*gradpipe(), "run", "--raw", str(tmp_path / "raw"), "--data-dir", str(tmp_path / "data"),
                     "--solver", "gd", "--max-iter", "1000000", "--workers", "2"], cwd=tmp_path, env=env)

    def training():
        stores = list(runs.glob("*.zarr")) if runs.exists() else []
        return term.running() and stores and committed(stores[0]) >= 3 and stores[0]

    try:
        store = wait_until(training, 240, "the flow's training started")
        term.interrupt()
        t0 = time.monotonic()
        rc, out = term.finish(60)
    finally:
        term.close()
    assert rc == 130, out[-3000:]
    assert time.monotonic() - t0 < 30, out[-3000:]  # a deadline, not a benchmark: it hung for ever before
    assert f"gradpipe train --resume {store.name.removesuffix('.zarr')}" in out
    assert RunStore.open(store).status == "stopped"
    assert not (tmp_path / "data" / "models").exists()  # a stopped run is neither evaluated nor published


def test_a_run_killed_before_row_0_can_start_again_and_a_taken_id_is_refused_first(dataset, tmp_path, scheduler,
                                                                                   capsys):
    """Fails before: the dead store made `--resume` say "start a new run" and the new run "already exists"."""
    from pipeline.store.dataset import open_dataset
    from pipeline.store.runs import DatasetRef

    ref = DatasetRef(uri=str(dataset), fingerprint=open_dataset(dataset).fingerprint(), target="y", n_rows=6000,
                     feature_names=[f"x{i}" for i in range(5)], mean=None, scale=None)
    RunStore.create(tmp_path / "dead.zarr", config=TrainConfig().to_json(), solver="gd", n_params=6, dataset=ref,
                    state_shapes={}, version="test")  # what a SIGKILL between creation and row 0 leaves
    assert main(["train", "--resume", "dead", "--runs-dir", str(tmp_path)]) == 2
    assert "--run-id dead" in capsys.readouterr().err  # says how to start it again
    rc = main(["train", "--dataset", str(dataset), "--runs-dir", str(tmp_path), "--run-id", "dead", "--solver", "exact",
               "--quiet", "--scheduler", scheduler])
    assert rc == 0 and RunStore.open(tmp_path / "dead.zarr").status == "converged"
    t0 = time.monotonic()  # now the id is taken: refused before connecting to a scheduler that is not there
    rc = main(["train", "--dataset", str(dataset), "--runs-dir", str(tmp_path), "--run-id", "dead", "--quiet",
               "--scheduler", "tcp://127.0.0.1:9"])
    assert rc == 2 and "already exists" in capsys.readouterr().err and time.monotonic() - t0 < 10


def test_workers_fold_sums_in_place_with_the_bits_of_the_fixed_tree():
    """The in-place fold a worker uses for sums gives the bits of `reduce_tree` over the whole list, however
    the leaves are split among workers (values spanning 16 orders of magnitude make any reordering show)."""
    from pipeline.engine import _FoldingTree, reduce_tree

    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 9, 17, 65):
        for fan_in in (2, 3, 8):
            leaves = [rng.standard_normal(7) * 10 ** rng.uniform(-8, 8, 7) for _ in range(n)]
            ref = reduce_tree({(0, i): v for i, v in enumerate(leaves)}, n, fan_in)
            for cuts in ([n], [n // 3, n], [1, n // 2, n]):
                nodes, start = {}, 0
                for stop in cuts:
                    ids, start = list(range(start, stop)), stop
                    tree = _FoldingTree(ids, n, fan_in)
                    for i in ids:
                        tree.insert(0, i, leaves[i])
                    assert not tree.partial  # every partial sum was completed and handed on
                    nodes.update(tree.nodes)
                got = reduce_tree(nodes, n, fan_in)
                assert list(got) == list(ref) and all(np.array_equal(got[k], ref[k]) for k in ref), (n, fan_in, cuts)
                # the driver's streamed fold: every worker's nodes, arriving in any order
                driver = _FoldingTree(list(range(n)), n, fan_in)
                for key in rng.permutation(len(nodes)):
                    driver.insert(*sorted(nodes)[key], nodes[sorted(nodes)[key]])
                assert not driver.partial and not driver.waiting
                assert list(driver.nodes) == list(ref) and np.array_equal(driver.nodes[next(iter(ref))],
                                                                          ref[next(iter(ref))]), (n, fan_in, cuts)


def test_a_worker_given_its_leaves_out_of_order_folds_the_same_bits(dataset, monkeypatch):
    """A re-placed pass can hand one worker the leaves of several lost ones, not in leaf order; the in-place
    fold needs each parent's children in order (it raised KeyError on the partial sum it had not begun)."""
    import pickle

    from pipeline import engine
    from pipeline.engine import ChunkLayout, add, reduce_tree
    from pipeline.losses import chunk_gram
    from pipeline.store.dataset import open_dataset, read_rows

    monkeypatch.setattr(engine, "_prepared", True)  # no worker set-up in the test process
    ds = open_dataset(dataset)
    bounds = ChunkLayout.regular(ds.n_rows, ds.chunk_rows, ds.n_features).bounds
    n = len(bounds)
    assert n >= 9  # two levels of the fan-in 8 tree
    ref = reduce_tree({(0, i): chunk_gram(read_rows(str(dataset), a, b)[0]) for i, (a, b) in enumerate(bounds)},
                      n, 8)
    mine = [*range(8, n), *range(0, 8)]  # two lost groups, regrouped onto one worker in job order
    payload = pickle.dumps((_gram_of_x, (), add, mine, n, 8, str(dataset), [bounds[i] for i in mine],
                            [None] * n))
    got = reduce_tree(engine._run_group(payload), n, 8)
    assert list(got) == list(ref) and np.array_equal(got[next(iter(ref))], ref[next(iter(ref))])


def test_streamed_gram_passes_give_the_bits_of_one_task_per_worker(dataset, client, monkeypatch):
    """Large leaf results (Grams of thousands of features) go one task per tree block, folded on the driver
    as they come, so that no process holds every worker's boundary nodes at once; same tree, same bits."""
    from pipeline import engine as engine_module
    from pipeline.engine import STREAM_BYTES, ChunkEngine
    from pipeline.inprocess import InProcessEngine
    from pipeline.objective import _gram
    from pipeline.store.dataset import open_dataset

    monkeypatch.setattr(engine_module, "MIN_BYTES_PER_WORKER", 1)  # both workers, though the data are tiny
    ds = open_dataset(dataset)
    shape = dict(store=ds.path, n_rows=ds.n_rows, chunk_rows=ds.chunk_rows, n_features=ds.n_features, itemsize=8)
    engine = ChunkEngine(client, **shape, fan_in=2)  # fan-in 2 over 15 leaves: four levels, blocks of two
    assert len(engine.groups) == 2
    whole = engine.map_reduce(_gram, None, None)
    streamed = engine.map_reduce(_gram, None, None, result_bytes=STREAM_BYTES)
    local = InProcessEngine(**shape, fan_in=2).map_reduce(_gram, None, None)
    engine.close()
    assert np.array_equal(whole, streamed) and np.array_equal(whole, local)
    X = np.asarray(open_dataset(dataset).X[:])  # and it is the Gram: 1e-9 relative, sums in another order
    np.testing.assert_allclose(whole[:-1, :-1], X.T @ X, rtol=1e-9)


def _gram_of_x(X, y, w, offset):
    from pipeline.losses import chunk_gram

    return chunk_gram(X)


def test_a_long_run_is_a_few_files_and_resumes_bitwise(dataset, tmp_path):
    """Fails with one row per chunk: 600 iterations were ~8,000 files (13 arrays × one file per row)."""
    from pipeline.training import INPROCESS, resume

    cfg = TrainConfig(solver="gd", max_iter=600, tol=0, gtol=0, standardize=False, lr=1e-9)
    full = train(dataset, cfg, client=INPROCESS, runs_dir=tmp_path, run_id="long")
    files = sum(1 for p in (tmp_path / "long.zarr").rglob("*") if p.is_file())
    assert full.n_iter == 600 and files < 50, files
    cfg.max_iter = 250  # the same run cut in two, resumed across a partly filled chunk
    train(dataset, cfg, client=INPROCESS, runs_dir=tmp_path, run_id="split")
    resume("split", runs_dir=tmp_path, client=INPROCESS, max_iter=600)
    a, b = (RunStore.open(tmp_path / f"{r}.zarr").history() for r in ("long", "split"))
    for name in ("theta", "grad", "loss", "lr", "passes"):
        assert np.array_equal(a[name], b[name]), name  # bitwise


def test_ctrl_c_in_a_terminal_stops_ingest_and_leaves_the_dataset_as_it_was(tmp_path, client):
    """An append cut short by the terminal's Ctrl-C: exit 130 within seconds, the dataset byte for byte as
    before (same tip and history, its private branch gone), and the same ingest run again appends the file."""
    from pipeline.store.dataset import read_info
    from tests.conftest import chunk_objects, dataset_state

    raw = tmp_path / "raw"
    raw.mkdir()
    X, y = make_xy(2000, 4, seed=1)
    write_csv(raw / "a.csv", X, y)
    ds = tmp_path / "ds.zarr"
    ingest([str(raw / "a.csv")], ds, "y", client)
    before = dataset_state(ds)
    # Three new files on two workers: the third is still to be parsed when the first one's chunks appear, so
    # the interrupt lands mid-append however fast the machine is (one file could finish before it landed).
    for k in range(3):
        write_csv(raw / f"b{k}.csv", *make_xy(150_000, 4, seed=2 + k))
    argv = [*gradpipe(), "ingest", str(raw), "--dataset", str(ds), "--target", "y", "--workers", "2",
            "--chunk-mb", "1"]
    term = Terminal(argv, cwd=tmp_path)
    try:
        n_before = len(chunk_objects(ds))
        wait_until(lambda: term.running() and len(chunk_objects(ds)) > n_before, 120, "the append's writes started")
        term.interrupt()
        rc, out = term.finish(30)
    finally:
        term.close()
    assert rc == 130, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert dataset_state(ds) == before
    assert main(["ingest", str(raw), "--dataset", str(ds), "--target", "y", "--scheduler", client.scheduler.address,
                 "--json"]) == 0
    assert read_info(ds).n_rows == 452_000


def test_training_waits_for_a_worker_to_join_and_names_a_cluster_that_has_none(dataset, tmp_path, monkeypatch):
    """A cluster whose workers are still starting (compose brings the scheduler up first) or restarting is
    waited for; one that gets none within the deadline is one readable error naming the scheduler."""
    import threading

    from pipeline import engine
    from pipeline.errors import GradpipeError

    monkeypatch.setattr(engine, "WORKER_DEADLINE", 3.0)
    with LocalCluster(n_workers=0, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, silence_logs=logging.ERROR) as lc, Client(lc) as c:
        with pytest.raises(GradpipeError, match=rf"cluster at {lc.scheduler_address} has no workers \(waited 3 s\)"):
            train(dataset, TrainConfig(max_iter=2), client=c, runs_dir=tmp_path, run_id="none")
        monkeypatch.setattr(engine, "WORKER_DEADLINE", 120.0)
        threading.Thread(target=lc.scale, args=(1,), daemon=True).start()  # joins while train waits
        fit = train(dataset, TrainConfig(max_iter=2), client=c, runs_dir=tmp_path, run_id="late")
        assert fit.status == "converged" and fit.n_iter >= 1
