"""Every script in `benchmarks/` imports: they are run by hand (and on lent GPU boxes, where a
broken import costs rare device minutes), so nothing else would notice a name one of them takes
from another script or from jaxlora going away. Importing runs only module-level code (each
script's work is under `if __name__ == "__main__"`); torch/peft/trl are imported inside workers.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("path", sorted(BENCH.glob("*.py")), ids=lambda p: p.stem)
def test_benchmark_script_imports(path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # scripts import each other by file name
    spec = importlib.util.spec_from_file_location(f"_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    assert callable(getattr(module, "main", None)), f"{path.name} has no main()"
