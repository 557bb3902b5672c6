"""The loss curve: a real PNG of L − L_best and ‖∇L‖ (log), titled with the run, and its data URI."""

from __future__ import annotations

import base64
import time
import warnings

import matplotlib
import numpy as np
import pytest
import zarr

from pipeline.config import TrainConfig
from pipeline.estimators import write_dataset
from pipeline.report import (
    LOSS_CURVE_FILE,
    loss_curve_data_uri,
    loss_curve_figure,
    loss_curve_path,
    loss_curve_png,
    write_loss_curve,
)
from pipeline.store.runs import RunStore
from pipeline.training import train
from tests.conftest import make_xy

matplotlib.use("Agg")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, client):
    root = tmp_path_factory.mktemp("report")
    X, y = make_xy(2000, 3, seed=7)
    write_dataset(root / "ds.zarr", X, y, client, chunk_rows=500)
    return root / "ds.zarr"


@pytest.fixture(scope="module")
def gd_run(dataset, client, tmp_path_factory):
    """30 plain gradient steps: unconverged, the case a loss-only plot hides."""
    res = train(dataset, TrainConfig(solver="gd", max_iter=30, lr=0.05, standardize=True), client=client,
                runs_dir=tmp_path_factory.mktemp("runs"), run_id="gd-curve")
    assert res.status != "converged"
    return res.run_uri


@pytest.fixture(scope="module")
def exact_run(dataset, client, tmp_path_factory):
    res = train(dataset, TrainConfig(solver="exact"), client=client, runs_dir=tmp_path_factory.mktemp("runs"),
                run_id="exact-curve")
    assert res.status == "converged"
    return res.run_uri


def columns(run_uri: str) -> tuple[np.ndarray, np.ndarray]:
    """loss and grad_norm read straight from Zarr (not through RunStore.column)."""
    g = zarr.open_group(run_uri, mode="r")
    n = int(g.attrs["committed"]) + 1
    return np.asarray(g["loss"][:n]), np.asarray(g["grad_norm"][:n])


def expected_positive(values: np.ndarray) -> np.ndarray:
    return np.where(values > 0, values, np.nan)


def line(ax, gid: str):
    (found,) = [ln for ln in ax.get_lines() if ln.get_gid() == gid]
    return found


def check_figure(fig, store: RunStore, loss: np.ndarray, gnorm: np.ndarray) -> None:
    title = fig._suptitle.get_text()
    for part in (store.run_id, store.model, store.solver, store.status):
        assert part in title
    assert title == f"{store.run_id} — {store.model}/{store.solver} — {store.status}"
    top, bottom = fig.axes
    assert top.get_yscale() == "log" and bottom.get_yscale() == "log"
    gap_line, gn_line = line(top, "gap"), line(bottom, "grad_norm")
    np.testing.assert_array_equal(gap_line.get_xdata(), np.arange(len(loss)))
    np.testing.assert_array_equal(gn_line.get_xdata(), np.arange(len(loss)))
    np.testing.assert_allclose(gap_line.get_ydata(), expected_positive(loss - loss.min()), rtol=0, atol=0)
    np.testing.assert_allclose(gn_line.get_ydata(), expected_positive(gnorm), rtol=0, atol=0)
    fig.canvas.draw()
    lo, hi = bottom.get_xlim()
    ticks = [t for t in bottom.get_xticks() if lo <= t <= hi]
    assert ticks and all(float(t).is_integer() for t in ticks)
    labels = [lbl.get_text().replace("\u2212", "-") for lbl in bottom.get_xticklabels() if lbl.get_text()]
    assert labels and all(lbl.lstrip("-").isdigit() for lbl in labels)


def check_png(path, width=540, height=360) -> bytes:
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert mpimg.imread(path).shape[:2] == (height, width)
    assert len(data) < 200_000  # small enough to inline in a Prefect artifact
    return data


def test_unconverged_gd_curve_plots_gap_and_gradient(gd_run):
    store = RunStore.open(gd_run)
    loss, gnorm = columns(gd_run)
    assert len(loss) == 31 and (loss - loss.min())[0] > 0
    check_figure(loss_curve_figure(store), store, loss, gnorm)

    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        png = write_loss_curve(gd_run)
    assert png == loss_curve_path(gd_run) == store.path / "report" / LOSS_CURVE_FILE
    assert plt.get_fignums() == before  # never registered with pyplot: nothing to leak
    data = check_png(png)

    uri = loss_curve_data_uri(png)
    assert uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.removeprefix("data:image/png;base64,"), validate=True) == data


def test_store_still_opens_with_the_png_inside(gd_run):
    write_loss_curve(gd_run)
    write_loss_curve(gd_run)  # rewriting (after a resume) replaces it
    assert loss_curve_path(gd_run).is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a stray file in the group's directory would warn on every listing
        g = zarr.open_group(gd_run, mode="r")
        assert {"loss", "grad_norm", "theta"} <= {n for n, _ in g.arrays()}
        assert dict(g.groups())["report"].attrs["gradpipe"] == {"kind": "report"}
        store = RunStore.open(gd_run)
    assert "loss" in store.array_names() and LOSS_CURVE_FILE not in store.array_names()
    np.testing.assert_array_equal(store.column("loss"), columns(gd_run)[0])
    assert store.status != "converged" and store.committed == 30


def test_exact_two_row_run_plots_sensibly(exact_run, tmp_path):
    store = RunStore.open(exact_run)
    loss, gnorm = columns(exact_run)
    assert len(loss) == 2
    fig = loss_curve_figure(store)
    check_figure(fig, store, loss, gnorm)
    top, bottom = fig.axes
    assert np.isfinite(line(top, "gap").get_ydata()).sum() == 1  # row 0's gap; row 1 is the best
    lo, hi = bottom.get_xlim()
    assert [t for t in bottom.get_xticks() if lo <= t <= hi] == [0, 1]
    check_png(loss_curve_png(store, tmp_path / "c.png"))


def test_loss_curve_is_fast(gd_run, tmp_path):
    store = RunStore.open(gd_run)
    loss_curve_png(store, tmp_path / "warm.png")  # the first call pays matplotlib's import
    start = time.process_time()  # CPU seconds: what the plot costs, not how busy the test machine is
    loss_curve_png(store, tmp_path / "a.png")
    assert time.process_time() - start < 1.0


class Stub:
    """A RunStore stand-in for degenerate histories no real solver produces on demand."""

    run_id, model, solver, status = "stub", "linear", "gd", "diverged"

    def __init__(self, loss, gnorm):
        self._cols = {"loss": np.asarray(loss, float), "grad_norm": np.asarray(gnorm, float)}

    def column(self, name):
        return self._cols[name]


@pytest.mark.parametrize("loss,gnorm", [([3.0], [0.0]), ([2.0, 1.0, np.inf, np.nan], [1.0, 0.5, np.inf, np.nan]),
                                        ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])])
def test_degenerate_histories_still_plot(loss, gnorm, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = loss_curve_figure(Stub(loss, gnorm))
        fig.savefig(tmp_path / "d.png")
    assert (tmp_path / "d.png").read_bytes()[:8] == PNG_MAGIC
    top, bottom = fig.axes
    assert top.get_yscale() == bottom.get_yscale() == "log"
    assert all(np.isnan(y) or y > 0 for y in line(top, "gap").get_ydata())


def test_report_task_inlines_the_curve_in_the_prefect_artifact(gd_run, prefect_server, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client

    from flows.tasks import report_task
    from pipeline.settings import load

    settings = load(overrides={"name": "report curve", "raw": [str(tmp_path)], "target": "y",
                               "data_dir": str(tmp_path / "data")}).to_dict()
    png = flow(name="report-curve")(lambda: report_task(settings, gd_run, {"rmse": 1.5}, None))()
    assert png == str(loss_curve_path(gd_run))
    with get_client(sync_client=True) as client:
        texts = [a.data for a in client.read_artifacts() if a.key == "gradpipe-report-curve"]
    assert texts and "| iteration | loss |" in texts[-1]
    prefix = "![loss curve](data:image/png;base64,"
    assert prefix in texts[-1]
    encoded = texts[-1].split(prefix, 1)[1].split(")", 1)[0]
    assert base64.b64decode(encoded, validate=True) == open(png, "rb").read()
