"""Load a function's entry module from `functions/<name>/` the way Lambda does: by file."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load(function: str, module: str) -> ModuleType:
    """`load("worker", "worker")` imports functions/worker/worker.py as `fn_worker_worker`."""
    name = f"fn_{function}_{module}"
    if name in sys.modules:
        return sys.modules[name]
    path = ROOT / "functions" / function / f"{module}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
