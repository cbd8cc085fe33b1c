"""Bottleneck adapters (Houlsby et al., 2019, arXiv:1902.00751; Pfeiffer et al., 2020,
"AdapterFusion", arXiv:2005.00247, for the feed-forward-only placement).

On a sublayer's output `h` `[B, T, D]`: `h + up(act(h down + b_d)) + b_u`, before the residual
add, with `down` `[D, m]` small random and `up` `[m, D]` zero, so a fresh adapter is the
identity. The adapter tree puts `adapter_down`, `adapter_down_bias`, `adapter_up`,
`adapter_up_bias` in the attention's (`.../self_attention`) and/or the feed-forward's
(`.../mlp`) scope; `lmjax.peft.apply` adds them there.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import unflatten_dict

from lmjax.peft.config import AdapterConfig
from lmjax.peft.lora import projections

AXIS = None  # the bottleneck dim: replicated


def init(spec: AdapterConfig, boxed: Any, key: jax.Array, dtype: Any = jnp.float32) -> dict:
  """A fresh boxed adapter tree for the base's boxed abstract params `boxed`.

  Returns:
    `{...module path...: {"adapter_down": [*L, D, m], "adapter_down_bias": [*L, m],
    "adapter_up": [*L, m, D], "adapter_up_bias": [*L, D]}}`, boxed.
  """
  where = {"ffn": ("wo",), "attention": ("query",), "both": ("query", "wo")}
  kinds = where[spec.placement]
  out = {}
  projs = projections(boxed)
  sites = sorted({p[:-1] for p in projs if p[-1] in kinds and "cross_attention" not in p})
  for i, site in enumerate(sites):
    tg = projs[site + (("query",) if site[-1] == "self_attention" else ("wo",))]
    lead, n = tg.lead, len(tg.lead)
    lead_names = tg.names[:n]
    d = tg.in_shape[0] if site[-1] == "self_attention" else tg.out_shape[-1]
    m = spec.dim
    down = jax.random.normal(jax.random.fold_in(key, i), lead + (d, m), jnp.float32) * 1e-2
    box = nn.LogicallyPartitioned
    leaves = {
        "adapter_down": box(down.astype(dtype), lead_names + ("embed", AXIS)),
        "adapter_down_bias": box(jnp.zeros(lead + (m,), dtype), lead_names + (AXIS,)),
        "adapter_up": box(jnp.zeros(lead + (m, d), dtype), lead_names + (AXIS, "embed")),
        "adapter_up_bias": box(jnp.zeros(lead + (d,), dtype), lead_names + ("embed",)),
    }
    out.update({site + (k,): v for k, v in leaves.items()})
  if not out:
    raise ValueError("this model has no attention / feed-forward sublayer for adapters")
  return unflatten_dict(out)
