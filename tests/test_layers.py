"""The one-way layers of DESIGN.md §2: numpy chunk math → Dask engine/loop → Prefect flows and CLI."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pipeline


def imported_after(modules: list[str]) -> set[str]:
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\nprint('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return {m.split(".")[0] for m in out.split()}


def test_the_library_never_imports_prefect():
    modules = [m.name for m in pkgutil.walk_packages(pipeline.__path__, "pipeline.") if m.name != "pipeline.__main__"]
    assert "pipeline.training" in modules and "pipeline.engine" in modules
    # the CLI's `run`/`serve` import flows lazily, inside the command
    assert "prefect" not in imported_after(modules)


def test_chunk_math_imports_numpy_only():
    loaded = imported_after(["pipeline.losses", "pipeline.optim", "pipeline.stats"])
    assert not loaded & {"dask", "distributed", "zarr", "prefect", "pyarrow"}
