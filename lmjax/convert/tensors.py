"""A lazily loaded tensor of a checkpoint file (GGUF or safetensors)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class TensorRef:
  """One tensor of a file, read only when `load()` is called.

  Attributes:
    name: its name in the Hugging Face layout (`model.layers.0.self_attn.q_proj.weight`).
    shape: its shape in that layout (PyTorch `[out, in]` for linear weights).
    dtype: the stored type as the file names it ("F32", "BF16", "Q4_1", ...).
    source: the file it lives in (for error messages).
  """

  name: str
  shape: tuple[int, ...]
  dtype: str
  source: str
  _load: Callable[[], np.ndarray] = dataclasses.field(repr=False, compare=False)

  def load(self) -> np.ndarray:
    """The values, `[*shape]`, float (float32 for quantized types)."""
    return self._load()
