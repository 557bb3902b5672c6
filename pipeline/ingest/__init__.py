"""Ingest raw files (CSV, Parquet, .npy) into a dataset store, in parallel on a Dask cluster."""

from pipeline.ingest.run import IngestResult, ingest

__all__ = ["IngestResult", "ingest"]
