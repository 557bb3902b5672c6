"""The tuning flows, run for real against the session's temporary Prefect server and Dask cluster.

The reference for the chosen α is scikit-learn's LassoCV on the same rows, α grid and folds (our folds are
rebuilt with :func:`pipeline.folds.fold_ids`, their documented definition; the dataset rows are the ingested
rows in file order).
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from flows.pipeline import pipeline_flow, tune_flow
from pipeline.errors import GradpipeError
from pipeline.folds import fold_ids
from pipeline.settings import load
from pipeline.store.runs import RunStore
from pipeline.store.tunes import TuneStore
from pipeline.tune_report import table_indices
from tests.conftest import write_csv

K = 5
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _data(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, 6)) @ np.linalg.cholesky(0.5 * np.eye(6) + 0.5).T
    X = Z * rng.uniform(0.5, 20, size=6) + rng.uniform(-5, 5, size=6)  # unequal scales and offsets
    coef = np.array([2, -1, 0, 0.5, 0, 0.1]) / X.std(axis=0)  # two zeros, one weak: the lasso has work to do
    return X, X @ coef + 1 + rng.normal(size=n)


X, Y = _data()


@pytest.fixture
def raw(tmp_path):
    (tmp_path / "raw").mkdir()
    write_csv(tmp_path / "raw" / "a.csv", X, Y)
    return tmp_path


def settings_for(root: Path, scheduler: str, environ: dict[str, str] | None = None, **over) -> dict:
    return load(overrides={"name": "t", "raw": [str(root / "raw")], "target": "y", "data_dir": str(root / "data"),
                           "scheduler": scheduler, "chunk_mb": 0.02, **over}, environ=environ or {}).to_dict()


def splits(n: int, k: int = K, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    f = fold_ids(0, n, k, seed)
    return [(np.flatnonzero(f != j), np.flatnonzero(f == j)) for j in range(k)]


def artifact(key: str) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        texts = [a.data for a in client.read_artifacts() if a.key == key]
    assert texts, f"no artifact {key}"
    return texts[-1]


def embedded_png(text: str, alt: str) -> bytes:
    m = re.search(rf"!\[{re.escape(alt)}\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", text)
    assert m, f"no inlined {alt} PNG in the artifact"
    return base64.b64decode(m.group(1))


def check_picture(png: bytes) -> None:
    """A real PNG that matplotlib drew something on: decodable, the figure's size, many distinct colours."""
    import matplotlib.image

    assert png[:8] == PNG_MAGIC and len(png) > 10_000
    img = matplotlib.image.imread(io.BytesIO(png), format="png")
    assert img.shape[:2] == (360, 540)  # FIGSIZE × DPI
    pixels = img[..., :3].reshape(-1, 3)
    assert (pixels.min(axis=1) < 0.9).mean() > 0.02  # not a blank canvas: lines, text, error bars
    assert len(np.unique(np.round(pixels * 255).astype(int), axis=0)) > 20  # several colours (anti-aliased)


def lasso_cv_alpha(alphas: np.ndarray) -> float:
    from sklearn.linear_model import LassoCV

    return LassoCV(alphas=alphas, cv=splits(len(Y)), tol=1e-12, max_iter=100_000).fit(X, Y).alpha_


def test_tune_flow_chooses_scikit_learns_alpha_and_leaves_a_cv_curve(raw, scheduler, prefect_server):
    out = tune_flow(settings_for(raw, scheduler))
    assert out["ingest"]["n_rows"] == len(Y)
    store = TuneStore.open(out["tune_uri"])
    alphas = np.asarray(store.grid)
    assert alphas.shape == (1, 100) and out["cv"] == K and out["select"] == "min" and out["kind"] == "alpha"
    assert out["alpha"] == lasso_cv_alpha(alphas[0]) and out["l1_ratio"] == 1.0
    assert out["alpha"] < alphas[0, 0]  # an interior choice, not the all-zero end
    assert out["passes"] == 1 and out["total_passes"] == out["passes"] + out["refit"]["passes"]
    # the refit is a normal run in the runs dir, converged, carrying the tuning record
    run_uri = Path(out["run_uri"])
    assert run_uri.parent == raw / "data" / "runs" and run_uri.is_dir() and out["run_id"] == f"{out['tune_id']}-refit"
    run = RunStore.open(run_uri)
    assert run.status == "converged" and out["refit"]["status"] == "converged"
    assert run.attrs["tuning"]["tune_id"] == out["tune_id"] and run.attrs["tuning"]["alpha"] == out["alpha"]
    assert Path(out["tune_uri"]).parent == raw / "data" / "tunes"
    # the PNG, kept in the tune store and inlined in the artifact
    png = Path(out["png"])
    assert Path(out["tune_uri"]) in png.parents
    text = artifact("gradpipe-tune-t")
    picture = embedded_png(text, "CV curve")
    assert picture == png.read_bytes()
    check_picture(picture)
    assert "| l1_ratio | α | mean deviance | SE |" in text and "**chosen**" in text
    assert f"{out['alpha']:.6g}" in text and "5-fold CV" in text
    rows = [line for line in text.splitlines() if line.startswith("| 1 |")]
    assert 10 <= len(rows) <= 13  # every 10th of 100 α, the last, the chosen and the minimum
    json.dumps(out)  # a Prefect result: JSON-able


def test_pipeline_flow_with_tune_refits_evaluates_and_publishes(raw, scheduler, prefect_server):
    cfg = settings_for(raw, scheduler, environ={"GRADPIPE_TUNE": "1", "GRADPIPE_TUNE_CV": str(K)})
    assert cfg["tune"] is True
    result = pipeline_flow(cfg)
    tuned, train = result["tune"], result["train"]
    assert result["ingest"]["n_rows"] == len(Y) and result["warm_start"] is None
    # the tune's refit IS the trained run: evaluated, gated, published, reported
    assert train["run_id"] == tuned["run_id"] == f"{tuned['tune_id']}-refit" and train["status"] == "converged"
    assert tuned["alpha"] == lasso_cv_alpha(np.asarray(TuneStore.open(tuned["tune_uri"]).grid)[0])
    assert result["publish"]["publish"] and result["metrics"]["r2"] > 0.5
    latest = json.loads((raw / "data" / "models" / "t" / "latest.json").read_text())
    assert latest["run_id"] == train["run_id"]
    store = RunStore.open(train["run_uri"])
    assert store.attrs["publish"]["publish"] is True and store.attrs["tuning"]["tune_id"] == tuned["tune_id"]
    assert Path(result["loss_curve"]).read_bytes()[:8] == PNG_MAGIC
    assert "![loss curve](data:image/png;base64," in artifact("gradpipe-t")  # the normal run report
    check_picture(embedded_png(artifact("gradpipe-tune-t"), "CV curve"))
    assert not any(p.name.startswith("t-2") for p in (raw / "data" / "runs").iterdir())  # no plain train run


def test_tune_settings_come_from_env_toml_and_flags(tmp_path):
    s = load(environ={})
    assert (s.tune, s.tune_cv, s.tune_alphas, s.tune_select) == (False, 5, 100, "min")
    assert s.tunes_dir == str(Path(s.data_dir) / "tunes")
    s = load(environ={"GRADPIPE_TUNE": "1", "GRADPIPE_TUNE_CV": "3", "GRADPIPE_TUNE_ALPHAS": "20",
                      "GRADPIPE_TUNE_SELECT": "1se"})
    assert (s.tune, s.tune_cv, s.tune_alphas, s.tune_select) == (True, 3, 20, "1se")
    toml = tmp_path / "g.toml"
    toml.write_text('tune = true\ntune_cv = 4\n')
    s = load(toml, overrides={"tune_cv": 7}, environ={})
    assert s.tune and s.tune_cv == 7
    with pytest.raises(GradpipeError, match="tune_select"):
        load(environ={"GRADPIPE_TUNE_SELECT": "best"})
    with pytest.raises(GradpipeError, match="tune_cv"):
        load(overrides={"tune_cv": 1}, environ={})


def test_table_rows_are_sampled_for_a_long_path():
    assert table_indices(8, 3, 3) == list(range(8))
    keep = table_indices(100, 57, 54)
    assert keep == sorted({*range(0, 100, 10), 99, 57, 54})
