"""Soft prompts (Lester et al., 2021, arXiv:2104.08691): k learned input embeddings.

The adapter is `{"embed": {"prompt_embeddings": [k, D]}}`. `lmjax.peft.apply` prepends k
placeholder positions to each row (segment ids and positions shifted: virtual positions
0..k-1, the real tokens from k on), the embedding call writes the prompt over them, and their
logits are left out, as Hugging Face PEFT's prompt tuning does for causal LMs. With a KV cache
the prompt enters the cache at the prefill; decode steps then see it as ordinary context.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmjax.config import TransformerConfig
from lmjax.peft.config import PromptConfig

KEY = "prompt_embeddings"


def init(spec: PromptConfig, config: TransformerConfig, key: jax.Array, *,
         embedding: Any = None, text_ids: Sequence[int] | None = None,
         dtype: Any = jnp.float32) -> dict:
  """A boxed soft prompt `{"embed": {"prompt_embeddings": [k, D]}}`.

  Args:
    spec: the prompt config (k = `num_virtual_tokens`).
    config: the base's config (D).
    key: PRNG key (random init).
    embedding: the base's token embedding `[V, D]`: random rows get its standard deviation;
      with `text_ids`, the prompt starts as those tokens' embeddings.
    text_ids: token ids of `spec.init_text` (repeated, then cut, to k, as Hugging Face PEFT).

  Raises:
    ValueError: `init_text` is set but no `text_ids`/`embedding` given, or ids out of range.
  """
  k, d = spec.num_virtual_tokens, config.model_dim
  if spec.init_text is not None or text_ids is not None:
    if embedding is None or not text_ids:
      raise ValueError("a soft prompt from text needs the text's token ids (non-empty) and the "
                       "base's embedding table")
    ids = np.asarray(list(text_ids), np.int64)
    if ids.min() < 0 or ids.max() >= embedding.shape[0]:
      raise ValueError(f"prompt init token ids must be in [0, {embedding.shape[0]})")
    ids = np.resize(ids, k)  # repeats, then cuts
    value = jnp.asarray(embedding)[ids].astype(dtype)
  else:
    std = 0.02 if embedding is None else float(jnp.std(jnp.asarray(embedding, jnp.float32)))
    value = (jax.random.normal(key, (k, d), jnp.float32) * std).astype(dtype)
  return {"embed": {KEY: nn.LogicallyPartitioned(value, (None, "embed"))}}
