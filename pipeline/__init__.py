"""gradpipe: generalized linear models (linear, logistic, Poisson, Gamma, Tweedie) over chunked Zarr data on Dask.

Imports are lazy so that ``import pipeline.losses`` stays NumPy-only and nothing here imports Prefect.
``pipeline.train(dataset, config)`` trains, ``pipeline.tune(dataset, TuneConfig(...))`` cross-validates; the
ingest function is ``pipeline.ingest.ingest``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "open_dataset": "pipeline.store.dataset",
    "read_info": "pipeline.store.dataset",
    "train": "pipeline.training",
    "resume": "pipeline.training",
    "FitResult": "pipeline.training",
    "tune": "pipeline.tune",
    "resume_tune": "pipeline.tune",
    "TuneConfig": "pipeline.tune",
    "TuneResult": "pipeline.tune",
    "TrainConfig": "pipeline.config",
    "GradpipeError": "pipeline.errors",
    "load_model": "pipeline.evaluate",
    "predict_file": "pipeline.predict",
    "LinearRegression": "pipeline.estimators",
    "LogisticRegression": "pipeline.estimators",
    "PoissonRegressor": "pipeline.estimators",
    "GammaRegressor": "pipeline.estimators",
    "TweedieRegressor": "pipeline.estimators",
    "LinearRegressionCV": "pipeline.estimators_cv",
    "LogisticRegressionCV": "pipeline.estimators_cv",
    "PoissonRegressorCV": "pipeline.estimators_cv",
    "GammaRegressorCV": "pipeline.estimators_cv",
    "TweedieRegressorCV": "pipeline.estimators_cv",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


__all__ = list(_EXPORTS)
