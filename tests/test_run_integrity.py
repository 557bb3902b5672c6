"""Run-store corruption is detected, never resumed, exported or predicted from silently.

Real runs (``train``, in-process: the same bits as on a cluster), then real damage on disk: a flipped bit in
a chunk, a deleted or truncated chunk, a garbage or unknown-codec ``zarr.json``. ``--resume`` rewinds to the
last intact row (its history then equals an uninterrupted run's) or refuses; ``export``, ``predict`` and
``runs show`` exit 2 with one line and no traceback, and change no file.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import pipeline.store.runs as runs_mod
from pipeline.cli import main
from pipeline.config import TrainConfig
from pipeline.errors import GradpipeError
from pipeline.estimators import write_dataset
from pipeline.store.runs import RunStore
from pipeline.training import INPROCESS, resume, train
from tests.conftest import make_xy, tree_hashes, write_csv
from tests.test_resume import assert_same, history

GD = {"solver": "gd", "tol": 0, "gtol": 0, "standardize": False}  # a long, never-converging trajectory


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("integrity")
    X, y = make_xy(1200, 4, seed=5)
    write_dataset(root / "ds.zarr", X, y, INPROCESS, chunk_rows=300)
    labels = (y + np.random.default_rng(0).normal(size=len(y)) * y.std() > np.median(y)).astype(float)
    write_dataset(root / "logit.zarr", X, labels, INPROCESS, chunk_rows=300)
    write_csv(root / "in.csv", X[:50], y[:50])
    return root


def fit(data: Path, runs: Path, run_id: str, max_iter: int, ds: str = "ds.zarr", **cfg) -> None:
    train(data / ds, TrainConfig(max_iter=max_iter, **{**GD, **cfg}), client=INPROCESS, runs_dir=runs,
          run_id=run_id)


def chunk(runs: Path, run_id: str, name: str, k: int) -> Path:
    arr = RunStore.open(runs / f"{run_id}.zarr")._array(name)
    return runs / f"{run_id}.zarr" / name / arr.metadata.encode_chunk_key((k, *(0,) * (arr.ndim - 1)))


def flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[3] ^= 0x10  # one bit of the first value
    path.write_bytes(bytes(raw))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:11])


def delete(path: Path) -> None:
    path.unlink()


@pytest.fixture
def small_chunks(monkeypatch) -> None:
    """8 rows per chunk of theta (5 values), 32 of a scalar: a run of 40 iterations spans 5 and 2 chunks."""
    monkeypatch.setattr(runs_mod, "CHUNK_BYTES", 8 * 5 * 8)


@pytest.mark.parametrize("damage, name, k", [(flip, "theta", 4), (delete, "theta", 4), (delete, "grad", 4),
                                             (truncate, "grad", 4), (flip, "loss", 1)])
def test_resume_rewinds_to_the_last_intact_row_and_repeats_the_uninterrupted_history(
        damage: Callable[[Path], None], name: str, k: int, data, tmp_path, small_chunks, caplog):
    fit(data, tmp_path, "ref", 60)
    fit(data, tmp_path, "cut", 37)  # rows 0..37; theta's chunk 4 holds rows 32..39, loss's chunk 1 rows 32..63
    damage(chunk(tmp_path, "cut", name, k))
    with caplog.at_level(logging.WARNING, logger="gradpipe.train"):
        resume("cut", runs_dir=tmp_path, client=INPROCESS, max_iter=60)
    # the latest row ≤ 31 with a logged solver state (the writer batches rows: not always 31 itself)
    found = [m for r in caplog.records if (m := re.fullmatch(
        rf"run cut: rows (\d+)\.\.37 are damaged \({name} chunk {k}: .+\); resuming from row (\d+)", r.getMessage()))]
    assert len(found) == 1 and int(found[0][1]) == int(found[0][2]) + 1 and int(found[0][2]) <= 31
    assert found[0][0] in RunStore.open(tmp_path / "cut.zarr").warnings
    # gd at a fixed step keeps no state that changes between rows: the rewritten history is the same bits
    assert_same(history(tmp_path, "ref"), history(tmp_path, "cut"))


def test_resume_after_a_rewind_reaches_the_uninterrupted_optimum(data, tmp_path, monkeypatch):
    """A solver whose small state moves on every row (L-BFGS's pair count) continues from the state logged
    for the row it rewinds to, not the committed row's (whose pair count made NaN): the same bits as an
    uninterrupted run."""
    monkeypatch.setattr(runs_mod, "CHUNK_BYTES", 8)
    cfg = {"ds": "logit.zarr", "model": "logistic", "solver": "lbfgs", "standardize": True, "gtol": 1e-10}
    fit(data, tmp_path, "ref", 100, **cfg)
    fit(data, tmp_path, "cut", 6, **cfg)
    flip(chunk(tmp_path, "cut", "theta", 6))
    result = resume("cut", runs_dir=tmp_path, client=INPROCESS, max_iter=100)
    assert result.converged
    # the latest intact row with a logged solver state: 5, or earlier if the writer batched rows 1..6
    assert any(re.fullmatch(r"run cut: rows (\d+)\.\.6 are damaged \(theta chunk 6: .+\); resuming from row \d+", w)
               for w in result.warnings)
    ref, got = history(tmp_path, "ref"), history(tmp_path, "cut")
    assert len(ref["theta"]) > 7
    np.testing.assert_allclose(got["theta"][-1], ref["theta"][-1], rtol=0, atol=1e-8)
    assert_same(ref, got)


@pytest.mark.parametrize("damage", [flip, delete])
def test_resume_refuses_when_no_committed_row_is_intact(damage, data, tmp_path):
    fit(data, tmp_path, "r", 10)  # one chunk of 4,096 rows holds every row
    damage(chunk(tmp_path, "r", "theta", 0))
    before = tree_hashes(tmp_path / "r.zarr")
    with pytest.raises(GradpipeError, match=r"run r cannot be resumed: no committed row is intact \(theta chunk 0"):
        resume("r", runs_dir=tmp_path, client=INPROCESS)
    assert tree_hashes(tmp_path / "r.zarr") == before


def garbage_meta(store: Path) -> None:
    (store / "theta" / "zarr.json").write_text("{ this is not json")


def unknown_codec(store: Path) -> None:
    meta = store / "theta" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["codecs"][-1]["name"] = "frobnicate"
    meta.write_text(json.dumps(doc))


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    # what is done to the store, what the message must say
    "flipped coef": (lambda s: flip(s / "coef" / "c" / "0" / "0"), "coef chunk 0"),
    "deleted coef": (lambda s: delete(s / "coef" / "c" / "0" / "0"), "coef chunk 0: its file"),
    "truncated intercept": (lambda s: truncate(s / "intercept" / "c" / "0"), "intercept chunk 0"),
    "garbage zarr.json": (garbage_meta, "theta/zarr.json is unreadable"),
    "unknown codec": (unknown_codec, "frobnicate"),
    "deleted zarr.json": (lambda s: delete(s / "theta" / "zarr.json"), "theta/zarr.json is missing"),
}


@pytest.fixture
def damaged(request, data, tmp_path) -> tuple[Path, str, dict[str, str]]:
    fit(data, tmp_path / "runs", "bad", 12)
    store = tmp_path / "runs" / "bad.zarr"
    do, expect = DAMAGE[request.param]
    do(store)
    hashes = tree_hashes(store)
    return store, expect, hashes


def one_error_line(err: str, command: str, expect: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"gradpipe {command}: error: ") and expect in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("damaged", list(DAMAGE), indirect=True)
def test_export_and_predict_refuse_a_damaged_run(damaged, data, tmp_path, capsys):
    store, expect, before = damaged
    rd = ["--runs-dir", str(store.parent)]
    out = tmp_path / "model.json"
    assert main(["export", "bad", *rd, "--out", str(out)]) == 2
    one_error_line(capsys.readouterr().err, "export", expect)
    pred = tmp_path / "pred.csv"
    assert main(["predict", "--run", "bad", *rd, "--input", str(data / "in.csv"), "--out", str(pred)]) == 2
    one_error_line(capsys.readouterr().err, "predict", expect)
    assert not out.exists() and not pred.exists() and not list(tmp_path.glob(".*tmp*"))
    assert tree_hashes(store) == before  # nothing else in the store was touched


@pytest.mark.parametrize("damaged", ["flipped coef", "truncated intercept", "garbage zarr.json", "unknown codec",
                                     "deleted zarr.json"], indirect=True)
def test_runs_show_and_resume_exit_2_on_a_damaged_store(damaged, capsys):
    store, expect, before = damaged
    rd = ["--runs-dir", str(store.parent)]
    assert main(["runs", "show", "bad", *rd]) == 2
    one_error_line(capsys.readouterr().err, "runs", expect)
    assert main(["train", "--resume", "bad", *rd]) == 2
    one_error_line(capsys.readouterr().err, "train", expect.split(" is unreadable")[0])
    assert tree_hashes(store) == before


def test_runs_show_flags_a_deleted_chunk(data, tmp_path, capsys):
    fit(data, tmp_path, "r", 12)
    delete(tmp_path / "r.zarr" / "grad" / "c" / "0" / "0")
    assert main(["runs", "show", "r", "--runs-dir", str(tmp_path), "--json"]) == 0
    assert "grad chunk 0: its file grad/c/0/0 is missing" in json.loads(capsys.readouterr().out)["damage"]


def test_cli_exits_2_with_one_line_on_a_truncated_chunk(data, tmp_path):
    """The real command line: no traceback reaches the user."""
    fit(data, tmp_path, "r", 12)
    truncate(tmp_path / "r.zarr" / "coef" / "c" / "0" / "0")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "export", "r", "--runs-dir", str(tmp_path), "--out",
                           str(tmp_path / "m.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    one_error_line(proc.stderr, "export", "coef chunk 0")


@pytest.mark.parametrize("where", ["under a file", "a directory"])
def test_export_to_an_unwritable_path_exits_2_and_leaves_nothing(where, data, tmp_path, capsys):
    fit(data, tmp_path / "runs", "r", 5)
    (tmp_path / "f").write_text("not a directory")
    (tmp_path / "d").mkdir()
    out = tmp_path / "f" / "m.json" if where == "under a file" else tmp_path / "d"
    before = tree_hashes(tmp_path)
    assert main(["export", "r", "--runs-dir", str(tmp_path / "runs"), "--out", str(out)]) == 2
    one_error_line(capsys.readouterr().err, "export", f"cannot write {out}")
    assert tree_hashes(tmp_path) == before


def test_old_stores_without_checksums_still_resume(data, tmp_path, monkeypatch):
    """Stores written before the checksums (plain bytes codec) open, verify and resume as before."""
    from zarr.codecs import Crc32cCodec

    real = runs_mod.zarr.Group.create_array

    def plain(self, *args, compressors=None, **kwargs):
        assert compressors and isinstance(compressors[0], Crc32cCodec)
        return real(self, *args, compressors=None, **kwargs)

    monkeypatch.setattr(runs_mod.zarr.Group, "create_array", plain)
    fit(data, tmp_path, "ref", 30)
    fit(data, tmp_path, "old", 12)
    monkeypatch.undo()
    assert "crc32c" not in (tmp_path / "old.zarr" / "theta" / "zarr.json").read_text()
    resume("old", runs_dir=tmp_path, client=INPROCESS, max_iter=30)
    assert_same(history(tmp_path, "ref"), history(tmp_path, "old"))
    shutil.rmtree(tmp_path / "old.zarr")
