"""A hand-written CPU attention of a few new tokens over the filled part of a KV cache.

A decode step attends one token (a speculative check k + 1) over the cache. In XLA that is a
handful of small ops per layer (slice the cache's filled part, two batched dots, a softmax of
several fusions), about 45 us a layer inside a decode step on this 2-core CPU for 128-256
filled slots of SmolLM2-135M (a profile): 1.3-1.4 ms of a 4.5 ms int8 decode step. This
module builds `cpu_attention.cc` (beside it; `lmjax.quant.cpu_build`) and calls it as an XLA
FFI custom call: per (row, kv head, chunk of query rows) the scores of those rows against
each key read once, the softmax in float32 (a polynomial exp), then the values weighed,
reading only the first `used` slots.
It is `lmjax.attention_ops.grouped_attention` up to summation order and the exp's last bits
(a bfloat16 cache: p rounded to bfloat16 before it weighs v, as there).

Measured here (`benchmarks/results/cached_attention.json`, the same process, XLA's parts path
as the baseline): SmolLM2's attention alone, 30 layers chained, one new token over 64 / 200 /
700 filled slots 6.1 / 16.0 / 41.7 us a layer against 27.2 / 61.9 / 88.2 (2.1-4.5x), five
tokens 1.6-3.0x; SmolLM2 decode steps 1.16-1.38x faster in float32, packed bfloat16, int8 and
int4 with int8 activations (0.85-1.85 ms a step saved at 256 and 768 slots). It lives in
`lmjax.quant` beside the other CPU kernels that `lmjax.quant.cpu_build` compiles.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.quant import cpu_build

Array = jax.Array
# New tokens per call: a decode step (1), a speculative check (k + 1). Longer query blocks (a
# prompt's suffix after a cached prefix) are matmuls XLA does better.
MAX_TOKENS = 16
TARGETS = {jnp.dtype(jnp.float32): ("LmjaxCachedAttentionF32", "lmjax_cached_attention_f32"),
           jnp.dtype(jnp.bfloat16): ("LmjaxCachedAttentionBf16", "lmjax_cached_attention_bf16")}
__all__ = ["MAX_TOKENS", "available", "applies", "attention"]


def available(dtype=jnp.float32) -> bool:
  """Whether the kernel for a cache of `dtype` is built and registered."""
  symbol, target = TARGETS[jnp.dtype(dtype)]
  return cpu_build.load("cpu_attention", symbol, target)


def applies(q: Array, k: Array) -> bool:
  """Whether the kernel computes `attention(q, k, ...)`: q `[B, T, N, H]` with T <=
  `MAX_TOKENS` and H a multiple of 16, a float32 or bfloat16 cache `[B, K, S, H]`, JAX's default
  backend the CPU and no mesh of several devices in scope, the kernel available."""
  b, t, n, h = q.shape
  dtype = jnp.dtype(k.dtype)
  mesh = jax.sharding.get_abstract_mesh()
  return (dtype in TARGETS and t <= MAX_TOKENS and h % 16 == 0 and k.ndim == 4
          and k.shape[3] == h and n % k.shape[1] == 0 and jax.default_backend() == "cpu"
          and (mesh.empty or mesh.size == 1) and available(dtype))


def attention(q: Array, k: Array, v: Array, mask: Array, used: Array,
              other: Callable[..., Array]) -> Array:
  """softmax(q k^T / sqrt(H), masked) v over the first `used` slots of the cache.

  Args:
    q: `[B, T, N, H]` queries.
    k, v: `[B, K, S, H]` the cache (N a multiple of K).
    mask: `[B, T, S]` boolean, False at every slot >= `used`.
    used: `[]` int32, the slots any row reads.
    other: `other(q, k, v, mask, used)`, the same attention in XLA, used where the kernel does
      not apply.

  Returns:
    `[B, T, N, H]` in q's dtype.
  """
  if not applies(q, k):
    return other(q, k, v, mask, used)

  def cpu(q, k, v, mask, used):
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    target = TARGETS[jnp.dtype(k.dtype)][1]
    scale = np.float32(1.0 / q.shape[-1] ** 0.5)
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(
        q.astype(jnp.float32), k, v, mask, used.astype(jnp.int32), scale=scale).astype(q.dtype)
  return jax.lax.platform_dependent(q, k, v, mask, used, cpu=cpu, default=other)
