"""Stop strings, matched on the decoded text inside the compiled decode loop.

A stop string ends a sequence as soon as the text of its new tokens contains it, however the
model split it into tokens: "\\n\\n" stops after the tokens "\\n", "\\n" as after one "\\n\\n"
token, and a token "a\\n\\nb" stops at once. (This is what Hugging Face's `StopStringCriteria`
and vLLM do; token-id stop sequences are matched as tokens, in `infer.decode`.)

The matching is exact and works in UTF-8 bytes, so tokens that hold part of a character
(byte-level BPE, byte fallback) are no problem. Let W >= (longest stop in bytes) - 1. Per row
the loop keeps `tail`, the last W bytes of the text so far (-1 where there are fewer). A new
token t completes a stop when

* the stop lies inside t's own bytes: `contains[t]`, precomputed over the vocabulary; or
* it starts in `tail` and ends in t: then it ends within t's first W bytes, so comparing every
  stop with every window of `tail ++ head[t]` (`head[t]`: t's first W bytes) finds it.

The text before t holds no stop (the row would have stopped), so nothing else can match. The
new tail is the last W bytes of `tail ++ bytes(t)`: `last[t]` when t has W bytes or more.

The per-token bytes come from the tokenizer's `token_bytes()` (`lmjax.tokenizer.Tokenizer`);
a tokenizer without it is read one id at a time with `decode([id])`, which is exact only when
every token is whole characters.

After the loop, `cut` gives the returned text: the decoded new tokens up to (not including) the
first occurrence of a stop string. The tokens keep the token that completed the stop.
"""

from __future__ import annotations

import weakref

import jax.numpy as jnp
import numpy as np

WINDOW_MULTIPLE = 8  # W is bucketed to a multiple of this, to limit recompiles

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {key: value}
_CACHE_ENTRIES = 16  # per tokenizer


def _cached(tokenizer, key, build):
  """`build()`, kept per tokenizer (while it lives) under `key`."""
  try:
    store = _CACHE.setdefault(tokenizer, {})
  except TypeError:  # not weak-referenceable: no cache
    return build()
  key = (key, getattr(tokenizer, "vocab_size", None))
  if key not in store:
    while len(store) >= _CACHE_ENTRIES:
      store.pop(next(iter(store)))
    store[key] = build()
  return store[key]


def vocab_bytes(tokenizer, vocab: int) -> list[bytes]:
  """Per id in [0, vocab), the bytes it adds to decoded text (ids the tokenizer lacks: b"")."""
  def build():
    if hasattr(tokenizer, "token_bytes"):
      out = [bytes(b) for b in tokenizer.token_bytes()]
    else:
      out = []
      for i in range(int(getattr(tokenizer, "vocab_size", vocab))):
        try:
          text = tokenizer.decode([i])
        except Exception:  # noqa: BLE001 - an id the tokenizer cannot decode adds nothing
          text = ""
        out.append(text.encode("utf-8") if isinstance(text, str) else b"")
    return out[:vocab] + [b""] * max(0, vocab - len(out))
  return _cached(tokenizer, ("bytes", vocab), build)


def window(stops: list[str]) -> int:
  """W: the tail length for these stop strings (bucketed)."""
  longest = max(len(s.encode("utf-8")) for s in stops)
  return -(-max(longest - 1, 1) // WINDOW_MULTIPLE) * WINDOW_MULTIPLE


def _ends(tokenizer, vocab: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`tok_head`, `tok_last`, `tok_len` of `tables` (they depend on W only)."""
  def build():
    pieces = vocab_bytes(tokenizer, vocab)
    lens = np.fromiter(map(len, pieces), np.int32, vocab)
    flat = np.frombuffer(b"".join(pieces), np.uint8).astype(np.int16)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    j = np.arange(w)
    ok = j[None, :] < lens[:, None]  # [V, W]
    head = np.where(ok, flat[np.where(ok, starts[:, None] + j, 0)] if flat.size else -1, -1)
    back = j[None, :] - w + lens[:, None]  # position in the token of last's slot j
    ok = back >= 0
    last = np.where(ok, flat[np.where(ok, starts[:, None] + back, 0)] if flat.size else -1, -1)
    return head.astype(np.int16), last.astype(np.int16), lens
  return _cached(tokenizer, ("ends", vocab, w), build)


def tables(tokenizer, vocab: int, stops: list[str]) -> dict[str, np.ndarray]:
  """The constant arrays `match` reads, for stop strings `stops` (non-empty strings) and a
  model vocabulary of `vocab` ids. Kept per tokenizer: a request with the same stops reuses
  them.

  Returns:
    `stop_bytes` `[n, W + 1]` int16 (each stop right-aligned, -1 before it), `stop_bytes_valid`
    `[n, W + 1]` bool, `tok_head` / `tok_last` `[V, W]` int16 (a token's first / last W bytes,
    -1 where it has fewer: head left-aligned, last right-aligned), `tok_len` `[V]` int32 (its
    byte count), `tok_contains` `[V]` bool (a stop lies inside it).
  """
  w = window(stops)
  encoded = [s.encode("utf-8") for s in stops]
  stop_bytes = np.full((len(stops), w + 1), -1, np.int16)
  valid = np.zeros((len(stops), w + 1), bool)
  for i, s in enumerate(encoded):
    stop_bytes[i, w + 1 - len(s):] = np.frombuffer(s, np.uint8)
    valid[i, w + 1 - len(s):] = True
  head, last, lens = _ends(tokenizer, vocab, w)

  def build_contains():
    pieces = vocab_bytes(tokenizer, vocab)
    return np.fromiter((any(s in b for s in encoded) for b in pieces), bool, vocab)
  contains = _cached(tokenizer, ("contains", vocab, tuple(stops)), build_contains)
  return {"stop_bytes": stop_bytes, "stop_bytes_valid": valid, "tok_head": head,
          "tok_last": last, "tok_len": lens, "tok_contains": contains}


def match(tail, tok, consts) -> tuple:
  """One step of the matcher (jnp, inside the loop).

  Args:
    tail: `[R, W]` int32, the last W bytes of each row's text so far (-1: none).
    tok: `[R]` int32, the new tokens.
    consts: the arrays of `tables`.

  Returns:
    `(hit, tail)`: `[R]` bool, the new token completed a stop; the new `[R, W]` tail.
  """
  w = tail.shape[1]
  head = consts["tok_head"][tok].astype(jnp.int32)  # [R, W]
  joined = jnp.concatenate([tail, head], axis=1)  # [R, 2W]
  # Windows of W + 1 bytes ending at each byte of the new token: [W, W + 1] indices.
  idx = np.arange(w)[:, None] + np.arange(w + 1)[None, :]
  windows = joined[:, idx]  # [R, W, W + 1]
  stop = consts["stop_bytes"].astype(jnp.int32)
  ok = (windows[:, :, None, :] == stop[None, None]) | ~consts["stop_bytes_valid"][None, None]
  hit = jnp.any(jnp.all(ok, axis=-1), axis=(1, 2)) | consts["tok_contains"][tok]
  n = consts["tok_len"][tok]
  shifted = jnp.take_along_axis(joined, jnp.minimum(n, w)[:, None] + np.arange(w)[None], axis=1)
  new_tail = jnp.where((n >= w)[:, None], consts["tok_last"][tok].astype(jnp.int32), shifted)
  return hit, new_tail


def first_stop(text: str, stops: list[str]) -> int | None:
  """Where the first stop string in `text` starts (None: none there)."""
  found = [i for i in (text.find(s) for s in stops) if i >= 0]
  return min(found) if found else None


def cut(tokenizer, tokens: list[int], text: str, stops: list[str], vocab: int) -> str | None:
  """`text` (the decoded `tokens`) cut before its first stop string; None when the tokens'
  bytes hold no stop. Where the decoder changed the text so that the stop is not found in it
  (a stripped first space), the bytes are cut and decoded instead."""
  at = first_stop(text, stops)
  if at is not None:
    return text[:at]
  pieces = vocab_bytes(tokenizer, vocab)
  raw = b"".join(pieces[t] for t in tokens if 0 <= t < vocab)
  found = [i for i in (raw.find(s.encode("utf-8")) for s in stops) if i >= 0]
  if not found:
    return None
  return raw[:min(found)].decode("utf-8", errors="replace")


def held_back(text: str, stops: list[str]) -> int:
  """The length of the longest end of `text` that begins a stop string (streaming holds it
  back until the next tokens tell whether the stop follows)."""
  best = 0
  for s in stops:
    for k in range(min(len(s) - 1, len(text)), best, -1):
      if text.endswith(s[:k]):
        best = k
        break
  return best
