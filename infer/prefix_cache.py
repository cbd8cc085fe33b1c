"""Prefix caching: the KV of earlier prompts' prefixes, reused so only the rest is prefilled.

A prompt's keys and values at position i depend only on its tokens 0..i, so a new prompt that
starts with a prefix seen before can take that prefix's KV as it was and prefill only its own
suffix. This is vLLM's automatic prefix caching (Kwon et al., 2023, "Efficient Memory Management
for Large Language Model Serving with PagedAttention"): the KV is kept in blocks of
`block_size` tokens, block j of a prompt keyed by a hash chain over the tokens of blocks
0..j, salted with the identity of the model and its params, so that a block is found only
under exactly the same tokens before it and the same weights. A hit compares the stored tokens
too (no hash collision can return another prefix's KV).

`generate(..., prefix_cache=pc)`:

1. prefixes that several prompts of the batch share, and that are not cached yet, are
   prefilled once (a batch-1 call) and stored, so a shared system prompt is computed once;
2. each prompt takes its longest cached chain of whole blocks that leaves at least one token
   to prefill (the last prompt token's logits give the first new token), then, where one is
   cached, the *tail* block after it: the last partial block (< `block_size` tokens) of an
   earlier prompt that ended there, so a chat's next turn, which starts with the last turn's
   prompt and answer, prefills exactly its new tokens, not the rest of a partial block too;
3. the compiled loop's prefill (`infer.prefix_glue.prefill`) writes those blocks into the fresh
   KV cache and runs only the suffixes, against the cache (`infer.decode.Decoder._prefill`
   calls it when the inputs carry `prefix_len`);
4. after the loop, the prompts' whole blocks and tail blocks not yet cached are copied out of
   the final cache (the generated tokens sit past the prompt, so the prompt's slots are as
   prefilled) and stored, least recently used first evicted under `max_bytes`; blocks the call
   used are pinned while it stores.

Counters (`stats()`): prompts that hit / missed, prompt tokens taken from the cache / prefilled,
blocks stored / evicted. `CausalLM` only (a `Seq2SeqLM` is refused with a clear error).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import weakref

import jax
import jax.numpy as jnp
import numpy as np

import lmjax
from infer.requests import prompt_bucket, round_up

Array = jax.Array

__all__ = ["PrefixCache", "salt"]


@dataclasses.dataclass
class _Block:
  tokens: tuple[int, ...]
  k: Array  # [L, K, block, H]
  v: Array
  nbytes: int


class PrefixCache:
  """KV blocks of prompt prefixes, LRU-bounded by bytes; pass it to `infer.generate`.

  Args:
    max_bytes: the budget for the stored keys and values (> 0).
    block_size: tokens per block (>= 1); a prefix is reused in whole blocks, and in the tail
      block of a prompt that ended there.

  Attributes (read them, or `stats()`): hits / misses (prompts with / without a cached block),
  hit_tokens / prefilled_tokens (prompt tokens taken from the cache / run through the model),
  stored / evicted (blocks), bytes (now stored).
  """

  def __init__(self, max_bytes: int, block_size: int = 16):
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int | np.integer) or max_bytes < 1:
      raise ValueError(f"max_bytes={max_bytes!r} must be an int > 0 (the KV budget in bytes)")
    if isinstance(block_size, bool) or not isinstance(block_size, int | np.integer) or (
        block_size < 1):
      raise ValueError(f"block_size={block_size!r} must be an int >= 1")
    self.max_bytes, self.block_size = int(max_bytes), int(block_size)
    self._blocks: collections.OrderedDict[bytes, _Block] = collections.OrderedDict()
    self._layout = None  # the KV layout of the model it serves (set on first use)
    self.bytes = 0
    self.hits = self.misses = self.hit_tokens = self.prefilled_tokens = 0
    self.stored = self.evicted = 0

  def __len__(self) -> int:
    return len(self._blocks)

  def stats(self) -> dict[str, int]:
    return {"hits": self.hits, "misses": self.misses, "hit_tokens": self.hit_tokens,
            "prefilled_tokens": self.prefilled_tokens, "stored": self.stored,
            "evicted": self.evicted, "blocks": len(self._blocks), "bytes": self.bytes}

  def clear(self) -> None:
    """Drops every block (the counters stay)."""
    self._blocks.clear()
    self.bytes = 0

  # ------------------------------------------------------------------------- keys

  def check_model(self, model) -> None:
    """Raises ValueError, before compute, for a model this cache cannot serve."""
    if not isinstance(model, lmjax.CausalLM):
      raise ValueError(f"prefix_cache works with an lmjax.CausalLM, not {type(model).__name__}")
    cfg = model.config
    layout = (cfg.num_decoder_layers, cfg.resolved_num_kv_heads, cfg.resolved_head_dim,
              str(cfg.dtype), cfg.scan_layers)
    if self._layout is None:
      self._layout = layout
    elif layout != self._layout:
      raise ValueError(
          f"this PrefixCache was made for a model with KV layout (layers, kv heads, head dim, "
          f"dtype, scan_layers) = {self._layout}, not {layout}; use one PrefixCache per model")

  def keys(self, salt: bytes, ids: list[int]) -> list[bytes]:
    """The hash-chain key of each whole block of `ids`."""
    out, h, bs = [], salt, self.block_size
    for j in range(len(ids) // bs):
      h = _chain(h, ids[j * bs:(j + 1) * bs])
      out.append(h)
    return out

  def lookup(self, salt: bytes, ids: list[int]) -> list[bytes]:
    """The keys of the longest cached chain of whole blocks of `ids`, then of the longest cached
    tail block after it, that leave at least one token to prefill (marked recently used: the
    chain's first block last, so its end goes first)."""
    bs, found = self.block_size, []
    for j, key in enumerate(self.keys(salt, ids[:len(ids) - 1])):
      block = self._blocks.get(key)
      if block is None or block.tokens != tuple(ids[j * bs:(j + 1) * bs]):
        break
      found.append(key)
    rest = ids[len(found) * bs:len(ids) - 1]
    for r in range(min(bs - 1, len(rest)), 0, -1):
      key = _chain(found[-1] if found else salt, rest[:r], tail=True)
      block = self._blocks.get(key)
      if block is not None and block.tokens == tuple(rest[:r]):
        found.append(key)
        break
    for key in reversed(found):
      self._blocks.move_to_end(key)
    return found

  def num_tokens(self, keys: list[bytes]) -> int:
    """The tokens the blocks of `keys` hold."""
    return sum(len(self._blocks[key].tokens) for key in keys)

  # ------------------------------------------------------------------------ store

  def store(self, salt: bytes, prompts: list[list[int]], cache: lmjax.KVCache, rows: list[int],
            pinned: set[bytes]) -> None:
    """Stores the whole blocks, and the tail block, of each prompt not cached yet, read from
    `cache` row `rows[i]` (prompt i's KV in slots 0..len - 1)."""
    bs, todo, seen = self.block_size, [], set()
    slots = jax.tree.leaves(cache.k)[0].shape[-2]
    for ids, row in zip(prompts, rows):
      chain = self.keys(salt, ids)
      whole = len(chain) * bs
      if whole < len(ids) and whole + bs <= slots:  # the tail: read as a whole block, cut
        chain = chain + [_chain(chain[-1] if chain else salt, ids[whole:], tail=True)]
      for j, key in enumerate(chain):
        if key in self._blocks or key in seen:
          if key in self._blocks:
            self._blocks.move_to_end(key)
          continue
        seen.add(key)
        todo.append((key, tuple(ids[j * bs:(j + 1) * bs]), row, j * bs))
    if not todo:
      return
    m = len(todo)
    pad = 1 << (m - 1).bit_length()  # bucketed, to limit recompiles
    rows_a = np.zeros((pad,), np.int32)
    starts = np.zeros((pad,), np.int32)
    rows_a[:m] = [t[2] for t in todo]
    starts[:m] = [t[3] for t in todo]
    k, v = _gather(cache.k, cache.v, rows_a, starts, bs)
    per_token = (k[0].nbytes + v[0].nbytes) // bs
    for i, (key, toks, _, _) in enumerate(todo):
      n = len(toks)
      nbytes = per_token * n
      if not self._make_room(nbytes, pinned):
        break
      ki, vi = (k[i], v[i]) if n == bs else (k[i][:, :, :n], v[i][:, :, :n])
      self._blocks[key] = _Block(toks, ki, vi, nbytes)
      self.bytes += nbytes
      self.stored += 1

  def _make_room(self, nbytes: int, pinned: set[bytes]) -> bool:
    if nbytes > self.max_bytes:
      return False
    for key in list(self._blocks):
      if self.bytes + nbytes <= self.max_bytes:
        break
      if key in pinned:
        continue
      self.bytes -= self._blocks.pop(key).nbytes
      self.evicted += 1
    return self.bytes + nbytes <= self.max_bytes

  # ------------------------------------------------------------------------ use

  def shared_prefixes(self, salt: bytes, prompts: list[list[int]]) -> list[list[int]]:
    """Prefixes (whole blocks, each leaving a token of its prompts to prefill) that two or more
    prompts share and the cache lacks: the deepest such per group, to prefill once."""
    chains = [self.keys(salt, ids[:len(ids) - 1]) for ids in prompts]
    count = collections.Counter(k for c in chains for k in c)
    out, done = [], set()
    for ids, chain in zip(prompts, chains):
      deep = max((j for j, key in enumerate(chain) if count[key] > 1), default=-1)
      if deep < 0 or chain[deep] in done or chain[deep] in self._blocks:
        continue
      done.add(chain[deep])
      out.append(ids[:(deep + 1) * self.block_size + 1])  # + 1: the prefix's blocks are stored
    return sorted(out, key=len, reverse=True)  # the deepest first: it may hold the others

  def has(self, salt: bytes, ids: list[int]) -> bool:
    """Whether every whole block of `ids` but the last token is cached."""
    n = (len(ids) - 1) // self.block_size
    return self.num_tokens(self.lookup(salt, ids)) >= n * self.block_size

  def inputs(self, cfg: lmjax.TransformerConfig, salt: bytes, prompts: list[list[int]],
             pad_id: int, count: bool = True) -> tuple[dict | None, set[bytes]]:
    """The prefix-cache inputs of a request (None when no prompt hits), and the keys used;
    `count`: add to the counters (not for the shared prefixes' own prefill)."""
    hits = [self.lookup(salt, ids) for ids in prompts]
    used = {k for h in hits for k in h}
    bs = self.block_size
    hit_len = [self.num_tokens(h) for h in hits]
    for ids, n in zip(prompts, hit_len if count else []):
      self.hits += n > 0
      self.misses += n == 0
      self.hit_tokens += n
      self.prefilled_tokens += len(ids) - n
    if not any(hit_len):
      return None, used
    b = len(prompts)
    ph = round_up(prompt_bucket(max(hit_len)), bs)
    suffix = [ids[n:] for ids, n in zip(prompts, hit_len)]
    ts = prompt_bucket(max(map(len, suffix)))
    toks = np.full((b, ts), pad_id, np.int32)
    seg = np.zeros((b, ts), np.int32)
    for i, s in enumerate(suffix):
      toks[i, :len(s)] = s
      seg[i, :len(s)] = 1
    first = self._blocks[next(iter(used))].k
    zeros = jnp.zeros(first.shape[:2] + (ph,) + first.shape[3:], first.dtype)

    def rows(part):
      out = []
      for h in hits:
        x = [getattr(self._blocks[key], part) for key in h]
        x = jnp.concatenate(x, axis=2) if x else zeros[:, :, :0]
        out.append(jnp.pad(x, ((0, 0), (0, 0), (0, ph - x.shape[2]), (0, 0))))
      stacked = jnp.stack(out, axis=1)  # [L, B, K, Ph, H]
      return stacked if cfg.scan_layers else tuple(stacked[i] for i in range(stacked.shape[0]))
    return {"prefix_k": rows("k"), "prefix_v": rows("v"),
            "prefix_len": np.asarray(hit_len, np.int32), "suffix_tokens": toks,
            "suffix_segment_ids": seg,
            "suffix_lengths": np.asarray(list(map(len, suffix)), np.int32)}, used


def _chain(h: bytes, tokens, tail: bool = False) -> bytes:
  """The key of a block of `tokens` after the block keyed `h` (a salt for the first); a tail
  block (fewer tokens, the end of a prompt) is keyed apart from the whole blocks."""
  data = h + (b"tail" if tail else b"") + np.asarray(tokens, np.int64).tobytes()
  return hashlib.blake2b(data, digest_size=16).digest()


@functools.partial(jax.jit, static_argnums=(4,))
def _gather(k, v, rows: Array, starts: Array, bs: int) -> tuple[Array, Array]:
  """Blocks `[M, L, K, bs, H]` of keys and values: row `rows[m]`, slots `starts[m]` + bs."""
  def take(x):
    if isinstance(x, (tuple, list)):  # unrolled: L arrays [R, K, S, H]
      return jnp.stack([take(layer) for layer in x], axis=1)
    if x.ndim == 5:  # stacked [L, R, K, S, H]
      return jax.vmap(lambda r, s: jax.lax.dynamic_slice(
          x, (0, r, 0, s, 0), (x.shape[0], 1, x.shape[2], bs, x.shape[4]))[:, 0])(rows, starts)
    return jax.vmap(lambda r, s: jax.lax.dynamic_slice(
        x, (r, 0, s, 0), (1, x.shape[1], bs, x.shape[3]))[0])(rows, starts)
  return take(k), take(v)


# ----------------------------------------------------------------------------- identity

_SALTS: dict = {}


def salt(model, params) -> bytes:
  """The identity of a model and its params: its type, config, and a fingerprint of every
  param leaf (structure, shapes, dtypes and two weighted sums), memoized per leaf objects."""
  leaves, treedef = jax.tree.flatten(params)
  memo = tuple(id(x) for x in leaves)
  hit = _SALTS.get(memo)
  if hit is not None and all(r() is x for r, x in zip(hit[0], leaves)):
    return hit[1]
  sums = np.asarray(jax.device_get(_fingerprint(leaves)))
  h = hashlib.blake2b(digest_size=16)
  h.update(f"{type(model).__name__}|{model.config!r}|{treedef}".encode())
  h.update(repr([(x.shape, str(x.dtype)) for x in leaves]).encode())
  h.update(sums.tobytes())
  value = h.digest()
  try:
    refs = [weakref.ref(x) for x in leaves]
    if len(_SALTS) > 16:
      _SALTS.pop(next(iter(_SALTS)))
    _SALTS[memo] = (refs, value)
  except TypeError:  # leaves that cannot be weakly referenced: not memoized
    pass
  return value


@jax.jit
def _fingerprint(leaves) -> Array:
  def one(x):
    x = jnp.ravel(x).astype(jnp.float32)
    w = jnp.cos(jnp.arange(x.shape[0], dtype=jnp.float32) * 0.7071)
    return jnp.stack([jnp.sum(x), jnp.sum(x * w)])
  return jnp.stack([one(x) for x in leaves]) if leaves else jnp.zeros((0, 2))
