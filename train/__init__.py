"""lmjax training: data pipelines, the trainer, objectives and the command-line jobs.

Importing `train` is cheap: a submodule loads on first use, so `import train` then
`train.data.make_pipeline(...)` works (as does `from train import data`).
"""

from __future__ import annotations

import importlib
import importlib.util


def __getattr__(name: str):
  if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
