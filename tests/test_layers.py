"""The one-way layers of docs/design.md §2: numpy chunk math → Dask engine/loop → Prefect flows and CLI."""

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
    loaded = imported_after(["pipeline.losses", "pipeline.folds", "pipeline.path", "pipeline.optim", "pipeline.stats"])
    assert not loaded & {"dask", "distributed", "zarr", "prefect", "pyarrow"}


def test_design_citations_name_sections_that_exist():
    """Code and README cite ``docs/design.md §N``; each N must be a section of the document in the repo."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sections = set(re.findall(r"^## (\d+)\.", (root / "docs" / "design.md").read_text(), flags=re.M))
    files = [root / "README.md", *root.glob("pipeline/**/*.py"), *root.glob("flows/*.py"), *root.glob("tests/*.py")]
    cited = {(f.name, n) for f in files for n in re.findall(r"design\.md §(\d+)", f.read_text())}
    assert len(cited) >= 4
    assert not {c for c in cited if c[1] not in sections}
