"""What speculative decoding's drafter and check read (`infer.speculative`): whether a
drafter drafts on the target's own KV cache (`shares_cache`), and the layout of the target's
weights its (k + 1)-token check reads (`reads_narrow`, `widened`)."""

from __future__ import annotations

from flax.traverse_util import flatten_dict, unflatten_dict

from lmjax import packed as packed_lib
from lmjax import packed_rows

__all__ = ["shares_cache", "reads_narrow", "widened"]


def shares_cache(model, draft_model) -> bool:
  """Whether the drafter drafts on the target's KV cache instead of a cache of its own: a
  drafter with the target's config (the target's own weights in another format, e.g. packed
  int4, or a fine-tuned copy), whose keys and values have the target's shapes.

  The target's cache holds every kept token but the round's last (its check wrote them, and
  the prompt's prefill before it), so the drafter needs no prefill of its own and never lags
  behind a round that kept all k drafts (with a cache of its own: a step for d_k, then one
  for the bonus token). Its k steps write its keys and values for the last token and d_1 ..
  d_{k-1} into the slots after the cache's length; the check then writes the target's own
  into the same slots before attending, so the target reads only its own keys and values:
  the output is unchanged, only the drafts (which the rule checks) come from a drafter
  reading the target's keys and values for the context. SmolLM2-135M drafting for itself in
  int4 (`benchmarks/speculative.py --drafter self:int4`): no int4 prefill of the prompt (it
  took 1.5x the target's float32 prefill) and one draft step fewer in each round after one
  that kept every draft."""
  return model.config == draft_model.config


def reads_narrow(params, rows: int) -> bool:
  """Whether a check of `rows` (target rows x (k + 1)) tokens reads bfloat16 `lmjax.packed`
  weights as they are: `lmjax.packed_rows` (1 < rows <= its `max_rows()`) widens each weight
  row inside the product that reads it, so the loop keeps no float32 copy (the params are made
  loop-dependent in `_verify`, as `infer.decode.in_loop` does for one-token steps, or XLA
  would hoist the widening out of the loop). SmolLM2-135M, k = 8 (9 rows): a check read 29.7
  ms from bfloat16 against 53-97 ms from the widened float32 copy (a shared 2-core CPU)."""
  return (isinstance(params, packed_lib.PackedParams) and params.fmt == "bfloat16"
          and packed_rows.applies(rows))


def widened(params):
  """The params a check of more rows than `lmjax.packed_rows` takes reads: bfloat16
  `lmjax.packed` weights widened to float32 once, before the loop (XLA's matmul of the
  bfloat16 matrix would widen all of it in every round); anything else as it is."""
  if not isinstance(params, packed_lib.PackedParams) or params.fmt == "float32":
    return params
  flat = flatten_dict(params.tree)
  for path, *_ in params.packed:
    flat[path] = packed_lib.widen(flat[path])
  for path in flat:
    if path[-2:] == ("embed", "embedding"):
      flat[path] = packed_lib.widen(flat[path])
  return params.replace(tree=unflatten_dict(flat), fmt="float32")
