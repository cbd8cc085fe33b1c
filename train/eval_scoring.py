"""Log-likelihood scoring: batched, jitted, bucketed forward passes of a causal LM.

The primitive of every log-likelihood evaluation (multiple choice, perplexity, lm-evaluation-
harness's `loglikelihood` and `loglikelihood_rolling`): given token ids `(context,
continuation)`, the sum of `log p(continuation | context)` and whether greedy decoding would
have produced the continuation (every continuation token is the argmax), as in Gao et al.,
2021-2024, "A framework for few-shot language model evaluation" (lm-evaluation-harness).

How it runs (`Scorer`):

* requests are sorted by length, longest first, and cut into batches of `batch_size` rows
  (the last one filled with empty rows), so rows of a batch have similar lengths;
* each row is `(context + continuation)[:-1]`, right-padded; padding has segment id 0, so a
  real token never attends to it (and positions restart per segment: padding changes no score);
  a row longer than `max_length` keeps its last `max_length` tokens (left truncation);
* shapes are bucketed, so a few executables serve every batch: the row length to
  `infer.requests.prompt_bucket` (a power of two >= 16, a multiple of 128 past 256), the
  continuation length to a power of two >= 4;
* only the continuation's positions reach the LM head: the final hidden states `[B, T, D]` are
  gathered to `[B, C, D]` before the head (by intercepting `lmjax.transformer.LMHead`), so the
  `[B, T, V]` logits are never made. The log-softmax is float32.

With a mesh, rows are split over its batch axes (data x fsdp) and params keep their shardings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infer.requests import prompt_bucket
from lmjax.sharding import batch_sharding
from lmjax.transformer import CausalLM, LMHead
from train.trainer import attention_scope

MIN_CONT_BUCKET = 4


@dataclasses.dataclass(frozen=True)
class Score:
  """The score of one `(context, continuation)` request.

  Attributes:
    logprob: sum of the continuation tokens' log-probabilities (float64 sum of float32 terms).
    is_greedy: every continuation token is the model's argmax at its position.
    token_logprobs: per continuation token, `[len(continuation)]` float32.
  """

  logprob: float
  is_greedy: bool
  token_logprobs: np.ndarray


def cont_bucket(n: int) -> int:
  """Padded continuation length: a power of two >= `MIN_CONT_BUCKET`."""
  return max(MIN_CONT_BUCKET, 1 << (max(n, 1) - 1).bit_length())


def _check_ids(ids, what: str, i: int, vocab: int) -> list[int]:
  arr = np.asarray(ids)
  if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
    raise ValueError(f"request {i}: {what} must be a list of token ids, got {ids!r}")
  if arr.size and (arr.min() < 0 or arr.max() >= vocab):
    raise ValueError(f"request {i}: {what} has token ids outside [0, {vocab})")
  return [int(x) for x in arr]


class _Forward:
  """The jitted scoring function of one model (kept per model config, so every `Scorer` of the
  model, e.g. one per evaluation of a training run, reuses the executables)."""

  def __init__(self, model):
    self.model, self.traces = model, 0
    self.fn = jax.jit(self._score)

  def __call__(self, *args, **kwargs):
    return self.fn(*args, **kwargs)

  def _score(self, params, tokens, segment_ids, cont_idx, targets, mask):
    """Per continuation slot, the target's log-prob and whether it is the argmax.

    Args: tokens, segment_ids `[B, T]`; cont_idx, targets `[B, C]` int32; mask `[B, C]` bool.
    Returns: `(logprobs [B, C] float32, greedy [B] bool)`; 0 / True at masked slots.
    """
    self.traces += 1

    def gather_first(next_fun, args, kwargs, context):
      if isinstance(context.module, LMHead) and context.method_name == "__call__":
        x, *rest = args
        x = jnp.take_along_axis(x, cont_idx[:, :, None], axis=1)  # [B, T, D] -> [B, C, D]
        return next_fun(x, *rest, **kwargs)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(gather_first):
      logits = self.model.apply({"params": params}, tokens, segment_ids=segment_ids)  # [B, C, V]
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    tok = jnp.take_along_axis(logp, targets[:, :, None], axis=-1)[:, :, 0]
    greedy = jnp.all((jnp.argmax(logits, axis=-1) == targets) | ~mask, axis=1)
    return jnp.where(mask, tok, 0.0), greedy


_FORWARDS: dict = {}
_MAX_FORWARDS = 8


def forward_for(model) -> _Forward:
  """The (cached, oldest dropped past 8) scoring function of a model."""
  key = (type(model), model.config)
  fwd = _FORWARDS.pop(key, None) or _Forward(model)
  _FORWARDS[key] = fwd
  while len(_FORWARDS) > _MAX_FORWARDS:
    _FORWARDS.pop(next(iter(_FORWARDS)))
  return fwd


class Scorer:
  """Scores `(context, continuation)` token-id requests with one model.

  Args:
    model: an `lmjax.CausalLM`.
    params: its params (the raw tree or `{"params": tree}`), on the host or sharded.
    batch_size: rows per forward pass (a multiple of the mesh's data x fsdp).
    max_length: the longest row fed to the model (default and at most `config.max_len`).
    mesh: a `jax.sharding.Mesh` (axes data, fsdp, tensor) to split rows over; None: one device.
  """

  def __init__(self, model, params, *, batch_size: int = 8, max_length: int | None = None,
               mesh: jax.sharding.Mesh | None = None):
    if not isinstance(model, CausalLM):
      raise ValueError(f"log-likelihood scoring needs an lmjax.CausalLM, got "
                       f"{type(model).__name__}")
    if not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    cfg = model.config
    max_length = cfg.max_len if max_length is None else max_length
    if not isinstance(max_length, int) or not 2 <= max_length <= cfg.max_len:
      raise ValueError(f"max_length must be an int in [2, {cfg.max_len}] (the model's max_len), "
                       f"got {max_length!r}")
    if mesh is not None:
      shards = mesh.shape["data"] * mesh.shape["fsdp"]
      if batch_size % shards:
        raise ValueError(f"batch_size={batch_size} must be a multiple of the mesh's data x fsdp "
                         f"= {shards}")
    if isinstance(params, dict) and set(params) == {"params"}:
      params = params["params"]
    self.model, self.params, self.mesh = model, params, mesh
    self.batch_size, self.max_length = batch_size, max_length
    self.vocab = cfg.vocab_size
    self._scope = attention_scope(model)
    self._forward = forward_for(model)

  @property
  def traces(self) -> int:
    """How often this model's scoring function was traced (once per bucketed shape)."""
    return self._forward.traces

  # --- batches -----------------------------------------------------------------------------

  def _row(self, ctx: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
    """`(input ids, continuation)`: `(ctx + cont)[:-1]`, left-truncated to `max_length`."""
    whole = (ctx + cont)[-(self.max_length + 1):]
    return whole[:-1], cont

  def _batch(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, np.ndarray]:
    b = self.batch_size
    t = min(prompt_bucket(max(len(x) for x, _ in rows)), self.max_length)
    c = min(cont_bucket(max(len(y) for _, y in rows)), t)
    out = {"tokens": np.zeros((b, t), np.int32), "segment_ids": np.zeros((b, t), np.int32),
           "cont_idx": np.zeros((b, c), np.int32), "targets": np.zeros((b, c), np.int32),
           "mask": np.zeros((b, c), bool)}
    for r, (x, y) in enumerate(rows):
      n, k = len(x), len(y)
      out["tokens"][r, :n] = x
      out["segment_ids"][r, :n] = 1
      out["cont_idx"][r, :k] = np.arange(n - k, n)  # the position predicting each cont token
      out["targets"][r, :k] = y
      out["mask"][r, :k] = True
    return out

  def _run(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    with self._scope():
      if self.mesh is None:
        out = self._forward(self.params, **batch)
      else:
        with jax.set_mesh(self.mesh):
          placed = {k: jax.device_put(v, batch_sharding(self.mesh, v.ndim))
                    for k, v in batch.items()}
          out = self._forward(self.params, **placed)
    lp, greedy = jax.device_get(out)
    return np.asarray(lp), np.asarray(greedy)

  # --- public ------------------------------------------------------------------------------

  def loglikelihood(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
                    ) -> list[Score]:
    """Scores each `(context ids, continuation ids)` request.

    Args:
      requests: N pairs; a context has >= 1 token (start with BOS/EOS for "no context"), a
        continuation 1 to `max_length` tokens.

    Returns:
      N `Score`s, in the order of `requests`.

    Raises:
      ValueError: before any compute, for an empty context or continuation, a continuation
        longer than `max_length`, or token ids outside the vocabulary.
    """
    rows = []
    for i, req in enumerate(requests):
      if not isinstance(req, Sequence) or len(req) != 2:
        raise ValueError(f"request {i} must be a (context ids, continuation ids) pair")
      ctx = _check_ids(req[0], "the context", i, self.vocab)
      cont = _check_ids(req[1], "the continuation", i, self.vocab)
      if not ctx:
        raise ValueError(f"request {i}: the context is empty; start it with a BOS or EOS id")
      if not cont:
        raise ValueError(f"request {i}: the continuation is empty")
      if len(cont) > self.max_length:
        raise ValueError(f"request {i}: a continuation of {len(cont)} tokens does not fit "
                         f"max_length={self.max_length}; split it (`rolling_windows`)")
      rows.append(self._row(ctx, cont))
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i][0]), i))
    out: list[Score | None] = [None] * len(rows)
    for s in range(0, len(order), self.batch_size):
      idx = order[s:s + self.batch_size]
      lp, greedy = self._run(self._batch([rows[i] for i in idx]))
      for r, i in enumerate(idx):
        tok = lp[r, :len(rows[i][1])]
        out[i] = Score(float(np.sum(tok, dtype=np.float64)), bool(greedy[r]), tok)
    return out  # type: ignore[return-value]


def rolling_windows(ids: Sequence[int], prefix_id: int, max_length: int, context: int = 1
                    ) -> list[tuple[list[int], list[int]]]:
  """`(context, continuation)` requests that together score every token of `ids` once.

  The first window predicts `ids[:max_length]` from `prefix_id` (a BOS or EOS); each later
  window predicts the next `max_length - context + 1` tokens (fewer in the last) from all the
  tokens before them that fit in a row of `max_length` (at least `context`). With `context=1`
  these are lm-evaluation-harness's rolling windows (`get_rolling_token_windows(...,
  context_len=1)` + `make_disjoint_window`); a larger `context` gives every window more history
  (a lower, fairer perplexity) at more compute.

  Args:
    ids: the text's token ids (no BOS).
    prefix_id: the token the first window starts from.
    max_length: the longest row (`len(context) + len(continuation) - 1 == max_length` for every
      window after the first).
    context: the least history of windows after the first, in [1, max_length).
  """
  if not 1 <= context < max_length:
    raise ValueError(f"context must be in [1, max_length={max_length}), got {context}")
  ids = [int(x) for x in ids]
  if not ids:
    return []
  out = [([prefix_id], ids[:max_length])]
  done, step = len(out[0][1]), max_length - context + 1
  while done < len(ids):
    end = min(len(ids), done + step)
    out.append((ids[end - max_length - 1:done], ids[done:end]))
    done = end
  return out
