"""The DeepSpeed backend: the only code of the package that imports deepspeed (tests/test_architecture.py).

Every module here imports deepspeed through `load()`, first, so that its import never pulls in mlflow."""

from __future__ import annotations

import sys
from types import ModuleType


def load() -> ModuleType:
    """`import deepspeed`, without the `import mlflow` that DeepSpeed's autotuner runs at package import when
    mlflow is installed (2.5 s and ~30 MB in every rank, and on export's memory, for an autotuner this trainer
    never starts). While deepspeed is imported, `import mlflow` fails as if mlflow were absent, which
    DeepSpeed's own `try` expects; afterwards mlflow imports normally (train.report_to: [mlflow])."""
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # None: `import mlflow` raises ImportError
    try:
        import deepspeed
    finally:
        if hide and sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]
    return deepspeed
