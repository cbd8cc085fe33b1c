"""Looking inside a model: its attention maps, and decoding without a KV cache.

`attention_weights` returns the attention probabilities softmax(Q K^T / sqrt(H)) of every
self-attention layer (Vaswani et al., 2017), the maps attention-visualization tools draw (Vig,
2019, "A Multiscale Visualization of Attention in the Transformer Model"). The model runs its
own projections, positions and masks: its attention function is swapped, for this call only,
for one that records the probabilities beside the reference output, so nothing is recomputed
outside the model and the logits are the model's.

`greedy_recompute` decodes greedily with no KV cache: every step runs the full forward over a
fixed `[B, prompt + max_new_tokens]` buffer (segment ids hide the empty tail) and reads the
logits at each row's last token. It is the baseline a KV cache is measured against, and a
reference for cached decoding (the same tokens, up to float ties).

    maps = lmjax.inspect.attention_weights(model, params, tokens)   # L x [B, N, T, T]
    ids = lmjax.inspect.greedy_recompute(model, params, [[1, 5, 7]], max_new_tokens=16)
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import attention_ops
from lmjax.layers import einsum_f32
from lmjax.transformer import CausalLM, MaskedLM

Array = jax.Array

_NAME = "lmjax.inspect"
_RECORD: contextvars.ContextVar[list | None] = contextvars.ContextVar(_NAME, default=None)


def probabilities(q: Array, k: Array, *, causal: bool = False, segment_ids=None,
                  sm_scale: float | None = None, mask: Array | None = None) -> Array:
  """Attention probabilities `[B, N, T, S]` of queries `[B, T, N, H]` over keys `[B, S, K, H]`
  (query head n reads kv head n // (N // K)); masked keys get 0, a row with no visible key is
  all zeros (as `reference_attention` gives)."""
  b, t, s, n, kh, h = attention_ops.check_shapes(q, k, k)
  segment_ids = attention_ops.as_segment_ids(segment_ids, t, s)
  m = attention_ops.attention_mask(b, t, s, causal=causal, segment_ids=segment_ids, mask=mask)
  scale = (1.0 / h**0.5) if sm_scale is None else sm_scale
  k = jnp.repeat(k, n // kh, axis=2)  # [B, S, N, H]
  scores = einsum_f32("BTNH,BSNH->BNTS", q, k) * scale
  if m is None:
    return jax.nn.softmax(scores, axis=-1)
  scores = jnp.where(m[:, None], scores, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(scores, axis=-1) * jnp.any(m, -1)[:, None, :, None]


def _recording_attention(q, k, v, *, causal=False, segment_ids=None, sm_scale=None, mask=None,
                         dropout_rate=0.0, dropout_rng=None):
  record = _RECORD.get()
  if record is not None:
    record.append(probabilities(q, k, causal=causal, segment_ids=segment_ids,
                                sm_scale=sm_scale, mask=mask))
  return attention_ops.reference_attention(q, k, v, causal=causal, segment_ids=segment_ids,
                                           sm_scale=sm_scale, mask=mask)


attention_ops.register_attention(_NAME, _recording_attention)


def _check_model(model) -> None:
  if not isinstance(model, (CausalLM, MaskedLM)):
    raise ValueError(f"expected an lmjax.CausalLM or lmjax.MaskedLM, got "
                     f"{type(model).__name__}")
  if model.config.scan_layers:
    raise ValueError("attention_weights needs a model with scan_layers=False (its layers are "
                     "called one by one); rebuild the config with scan_layers=False and "
                     "unstack the params")


def attention_weights(model, params: Any, tokens, *, segment_ids=None,
                      positions=None) -> list[np.ndarray]:
  """The attention probabilities of each self-attention layer of `model` on `tokens`.

  Args:
    model: an `lmjax.CausalLM` or `lmjax.MaskedLM` (`scan_layers=False`).
    params: its params (the raw tree).
    tokens: token ids `[B, T]` (or `[T]`: one row).
    segment_ids, positions: as `model.apply` takes them (`[B, T]`; 0 = padding).

  Returns:
    One float32 numpy array `[B, N, T, T]` per layer, first layer first: row t holds what
    query t attends to (each row sums to 1; masked keys are 0).
  """
  _check_model(model)
  tokens = jnp.asarray(tokens, jnp.int32)
  if tokens.ndim == 1:
    tokens = tokens[None]
  if tokens.ndim != 2 or tokens.shape[1] == 0:
    raise ValueError(f"tokens must be [B, T] (or [T]) with T >= 1; got shape {tokens.shape}")
  vocab = model.config.vocab_size
  if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
    raise ValueError(f"token ids must be in [0, {vocab}); got {int(tokens.min())}.."
                     f"{int(tokens.max())}")
  recording = type(model)(model.config.replace(attention=_NAME))

  def run(params, tokens, segment_ids, positions):
    record = []
    token = _RECORD.set(record)
    try:
      recording.apply({"params": params}, tokens, segment_ids=segment_ids, positions=positions)
    finally:
      _RECORD.reset(token)
    return record

  maps = jax.jit(run)(params, tokens, segment_ids, positions)
  return [np.asarray(m) for m in maps]


def greedy_recompute(model, params: Any, prompts: Sequence[Sequence[int]], *,
                     max_new_tokens: int) -> np.ndarray:
  """Greedy decoding of a `CausalLM` without a KV cache (the full forward at every step).

  Args:
    model: an `lmjax.CausalLM`.
    params: its params (the raw tree).
    prompts: B prompts, lists of token ids (any lengths >= 1).
    max_new_tokens: tokens generated per row (>= 1); EOS does not stop a row.

  Returns:
    int32 `[B, max_new_tokens]`: the new tokens of each row.
  """
  if not isinstance(model, CausalLM):
    raise ValueError(f"greedy_recompute decodes an lmjax.CausalLM, got {type(model).__name__}")
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  lengths = np.array([len(p) for p in prompts], np.int32)
  total = int(lengths.max()) + max_new_tokens
  cfg = model.config
  if cfg.position == "learned" and total > cfg.max_len:
    raise ValueError(f"the longest prompt ({lengths.max()} tokens) + max_new_tokens="
                     f"{max_new_tokens} passes model.max_len={cfg.max_len}")
  buf = np.zeros((len(prompts), total), np.int32)
  for i, p in enumerate(prompts):
    buf[i, :len(p)] = p
  loop = _recompute_loop(type(model), cfg, total, max_new_tokens)
  return np.asarray(loop(params, jnp.asarray(buf), jnp.asarray(lengths)))


@functools.lru_cache(maxsize=16)
def _recompute_loop(cls, cfg, total: int, steps: int):
  """The jitted loop, one per (model, buffer length, steps): a second call does not recompile."""
  model = cls(cfg)

  def loop(params, tokens, lengths):
    def body(i, carry):
      tokens, lengths, out = carry
      seg = (jnp.arange(total)[None, :] < lengths[:, None]).astype(jnp.int32)
      logits = model.apply({"params": params}, tokens, segment_ids=seg)
      last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
      nxt = jnp.argmax(last, axis=-1).astype(jnp.int32)
      tokens = jax.vmap(lambda row, n, t: row.at[n].set(t))(tokens, lengths, nxt)
      return tokens, lengths + 1, out.at[:, i].set(nxt)

    out = jnp.zeros((tokens.shape[0], steps), jnp.int32)
    return jax.lax.fori_loop(0, steps, body, (tokens, lengths, out))[2]

  return jax.jit(loop)
