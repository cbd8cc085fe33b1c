"""Heads beside the LM head: `RewardModel`, a decoder trunk with a scalar head.

A reward model (Stiennon et al., 2020; Ouyang et al., 2022) is a `CausalLM` whose LM head is
replaced by a linear map `D -> 1` (the `score` head, as Hugging Face's
`LlamaForSequenceClassification` with `num_labels=1`). Its reward for a sequence is the head's
value at the sequence's last real token; the same head read at every token gives per-token
values `[B, T]`, the value head (critic) of PPO (Schulman et al., 2017).

    rm = lmjax.RewardModel(cfg)
    params = lmjax.heads.reward_params_from_lm(lm_params, cfg, jax.random.key(0))
    rewards = rm.apply({"params": params}, tokens, segment_ids=seg)          # [B]
    values = rm.apply({"params": params}, tokens, per_token=True)            # [B, T]

Padding (segment id 0, on the right) and packing (several segments per row, each attending
only inside itself) never move a reward: it is read where the row's (or, with
`segment_rewards`, each segment's) last real token is.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmjax.config import TransformerConfig
from lmjax.embeddings import TokenEmbedding
from lmjax.layers import einsum_f32
from lmjax.transformer import Stack, _one_stack

Array = jax.Array
SCORE = "score"  # the head's subtree (Hugging Face: `score.weight`, [1, D])
SCORE_AXES = ("embed", "score")  # logical names of the head's [D, 1] kernel ("score": replicated)
SCORE_INIT_STD = 0.02  # transformers' `initializer_range` default, as its score head starts


def last_token_index(segment_ids: Array | None, length: int) -> Array:
  """`[B]` index of each row's last real token (segment id != 0); `length - 1` without ids."""
  if segment_ids is None:
    return jnp.full((1,), length - 1, jnp.int32)
  t = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None, :]
  return jnp.max(jnp.where(segment_ids != 0, t, 0), axis=1)


def segment_ends(segment_ids: Array) -> Array:
  """`[B, T]` bool: True at the last token of every segment (the token before the id changes)."""
  nxt = jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1)
  return (segment_ids != 0) & (nxt != segment_ids)


def segment_rewards(values: Array, segment_ids: Array, num_segments: int) -> Array:
  """Per-segment rewards `[B, num_segments]` of packed rows: `values` `[B, T]` read at each
  segment's last token (segment k in column k - 1; a missing segment reads 0)."""
  ends = segment_ends(segment_ids)
  onehot = jax.nn.one_hot(segment_ids - 1, num_segments, dtype=values.dtype)  # [B, T, S]
  return jnp.einsum("BT,BTS->BS", jnp.where(ends, values, 0.0), onehot)


class RewardModel(nn.Module):
  """A decoder trunk (`CausalLM`'s embed and layers) with a scalar `score` head.

  Params: `embed`, `decoder` (as `CausalLM`'s) and `score/kernel` `[D, 1]`; no LM head.
  """

  config: TransformerConfig

  @nn.compact
  def __call__(self, tokens: Array, *, positions: Array | None = None,
               segment_ids: Array | None = None, train: bool = False, per_token: bool = False,
               checks: bool = False) -> Array:
    """Args:
      tokens: `[B, T]` int ids.
      positions: `[B, T]`; default restarts per segment.
      segment_ids: `[B, T]`, 0 = padding (right-padded); tokens see only their own segment.
      train: dropout on.
      per_token: return the head's value at every token (a critic's values).
      checks: as in `CausalLM`.

    Returns:
      float32 rewards `[B]` at each row's last real token, or values `[B, T]` with
      `per_token` (NaN in rows past a limit, as `CausalLM`'s logits).
    """
    cfg = self.config
    pos, ctx, limits = _one_stack("CausalLM", cfg, tokens, positions, segment_ids, None, checks)
    embed = TokenEmbedding(cfg, name="embed")
    x, _ = Stack(cfg, cfg.num_decoder_layers, causal=True, name="decoder")(
        embed(tokens), pos, ctx, None, train=train)
    w = self.param(SCORE, nn.with_logical_partitioning(
        nn.initializers.normal(SCORE_INIT_STD), SCORE_AXES), (cfg.model_dim, 1),
        jnp.dtype(cfg.param_dtype))
    values = limits.guard(einsum_f32("BTD,DC->BTC", x, w.astype(x.dtype))[..., 0])
    if per_token:
      return values
    idx = last_token_index(segment_ids, tokens.shape[1])
    idx = jnp.broadcast_to(idx, values.shape[:1])
    return jnp.take_along_axis(values, idx[:, None], axis=1)[:, 0]


def is_reward_params(params) -> bool:
  """Whether a params tree is a `RewardModel`'s (it has the `score` head)."""
  return isinstance(params, dict) and SCORE in params and "embed" in params


def reward_params_from_lm(lm_params: dict, config: TransformerConfig, key: jax.Array) -> dict:
  """A `RewardModel`'s params from a `CausalLM`'s: its trunk (the arrays themselves, not
  copies; the LM head left out) and a fresh `score` head (normal, std 0.02).

  Raises:
    ValueError: `lm_params` is already a reward model's, or lacks the trunk.
  """
  if is_reward_params(lm_params):
    raise ValueError("these params are already a reward model's (they have a 'score' head); "
                     "a language model (CausalLM) is expected here")
  missing = [k for k in ("embed", "decoder") if k not in lm_params]
  if missing:
    raise ValueError(f"not a CausalLM params tree: it lacks {missing}")
  score = jax.random.normal(key, (config.model_dim, 1), jnp.float32) * SCORE_INIT_STD
  return {"embed": lm_params["embed"], "decoder": lm_params["decoder"],
          SCORE: score.astype(jnp.dtype(config.param_dtype))}


def check_lm_params(params, what: str = "a policy") -> None:
  """A clear error when a reward model's params are given where an LM's are expected."""
  if is_reward_params(params):
    raise ValueError(f"a reward model (params with a 'score' head) was given where {what} "
                     "(a CausalLM) is expected; give a language model")


def pad_rows(seqs: list[list[int]], length: int, rows: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded `(tokens, segment_ids)` `[rows, length]` of token lists (segment 1 / 0)."""
  rows = len(seqs) if rows is None else rows
  tokens = np.zeros((rows, length), np.int32)
  seg = np.zeros((rows, length), np.int32)
  for i, s in enumerate(seqs):
    tokens[i, :len(s)] = s
    seg[i, :len(s)] = 1
  return tokens, seg


def load_reward_model(path: str, dtype: str = "float32", mesh: jax.sharding.Mesh | None = None):
  """A reward model's `(config, params, tokenizer)`: a run dir of `python -m train.reward`, or
  a Hugging Face `*ForSequenceClassification` folder (`num_labels=1`, e.g. one that
  `lmjax.save_pretrained` wrote).

  Raises:
    ValueError: `path` is a language model (a policy), not a reward model.
  """
  from pathlib import Path

  from lmjax import checkpoint
  from lmjax.convert import pretrained, reward

  local = Path(str(path)).expanduser()
  if "://" in str(path) or (local / checkpoint.CHECKPOINT_DIR).is_dir():
    return checkpoint.load_run(path, mesh=mesh, head="reward")
  folder = pretrained.resolve(path)
  if not folder.is_dir() or not reward.is_reward_folder(folder):
    raise ValueError(f"{str(path)!r} is not a reward model: give a run dir of python -m "
                     "train.reward or a Hugging Face *ForSequenceClassification folder "
                     "(a language model/policy was given)")
  cfg, params = reward.read_reward_folder(folder, dtype, mesh)
  return cfg, params, pretrained._folder_tokenizer(folder)
