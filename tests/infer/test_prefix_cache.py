"""Prefix caching: cached prefixes give the uncached outputs; eviction and salts are safe."""

import jax.numpy as jnp
import numpy as np
import pytest

import infer
import lmjax
from infer.prefix_cache import PrefixCache
from infer.streaming import drain
from tests.lmjax.helpers import random_params, tiny

X = jnp.ones((1, 4), jnp.int32)
SYSTEM = [1] + list(range(20, 43))  # a 24-token shared "system prompt"
PROMPTS = [SYSTEM + [50, 51, 52], SYSTEM + [60, 61], SYSTEM[:9] + [70, 71, 72, 73, 74, 75]]
M = 12


@pytest.fixture(scope="module")
def model():
  m = lmjax.CausalLM(tiny(max_len=128))
  return m, random_params(m, (X,), 0), random_params(m, (X,), 1)


@pytest.fixture(scope="module")
def uncached(model):
  m, p, _ = model
  return infer.generate(m, p, PROMPTS, max_new_tokens=M, return_logits=True)


def test_cached_prefixes_give_the_uncached_output(model, uncached):
  m, p, _ = model
  pc = PrefixCache(max_bytes=10**8, block_size=8)
  first = infer.generate(m, p, PROMPTS, max_new_tokens=M, prefix_cache=pc, return_logits=True)
  # The 24-token system prompt is shared by rows 0 and 1 (its first 8 by row 2 too):
  # prefilled once, before the batch, with row 0's next token (3 blocks and a 1-token tail
  # block), so every row hits: row 0 the 3 blocks and the tail, rows 1 and 2 whole blocks.
  assert (pc.hits, pc.misses, pc.hit_tokens) == (3, 0, 25 + 24 + 8)
  # The shared prefix's 3 blocks and tail, then each row's blocks through its answer but the
  # last token (27 + 11, 26 + 11, 15 + 11 tokens: 4, 4 and 3 whole blocks, the first 3 / 3 / 1
  # shared, and tails of 6, 5 and 2 tokens).
  assert pc.stored == 3 + 1 + (1 + 1) + (1 + 1) + (2 + 1)
  second = infer.generate(m, p, PROMPTS, max_new_tokens=M, prefix_cache=pc, return_logits=True)
  # The same again: the rows' own tails sit past their prompts (after their answers).
  assert (pc.hits, pc.hit_tokens) == (6, 2 * (25 + 24 + 8))
  for out in (first, second):
    assert out.tokens == uncached.tokens
    for a, b in zip(out.logits, uncached.logits):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  # With a drafter too.
  spec = infer.generate(m, p, PROMPTS, max_new_tokens=M, prefix_cache=pc, draft="ngram",
                        num_draft_tokens=3)
  assert spec.tokens == uncached.tokens


def test_a_chat_turn_prefills_only_its_new_tokens(model):
  """Turn 2 (turn 1's prompt and answer, then new text) takes turn 1 from the cache, streamed
  and not: only its new tokens are prefilled (turn 1's last answer token, never fed back, and
  the new text); the output is uncached's."""
  m, p, _ = model
  pc = PrefixCache(max_bytes=10**8, block_size=8)
  turn1 = SYSTEM + [50, 51, 52]  # 27 tokens
  first = drain(infer.stream(m, p, [turn1], max_new_tokens=M, ignore_eos=True,
                             prefix_cache=pc))
  assert first.tokens == infer.generate(m, p, [turn1], max_new_tokens=M, ignore_eos=True).tokens
  turn2 = turn1 + first.tokens[0] + [60, 61, 62, 63, 64]  # 27 + 12 + 5 = 44 tokens
  ref = infer.generate(m, p, [turn2], max_new_tokens=M, return_logits=True)
  before = pc.stats()
  out = drain(infer.stream(m, p, [turn2], max_new_tokens=M, prefix_cache=pc))
  # Turn 1's prompt and answer but its last token (27 + 11 = 38): 4 whole blocks and a tail.
  assert pc.hit_tokens - before["hit_tokens"] == 38
  assert pc.prefilled_tokens - before["prefilled_tokens"] == 44 - 38
  assert out.tokens == ref.tokens
  again = infer.generate(m, p, [turn2], max_new_tokens=M, prefix_cache=pc, return_logits=True)
  assert again.tokens == ref.tokens
  for a, b in zip(again.logits, ref.logits):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_tiny_budget_evicts_and_never_mixes_prefixes(model):
  m, p, _ = model
  cfg = m.config
  block_bytes = 2 * cfg.num_decoder_layers * cfg.resolved_num_kv_heads * 8 * (
      cfg.resolved_head_dim * 4)  # k and v of 8 slots, float32
  pc = PrefixCache(max_bytes=3 * block_bytes, block_size=8)
  rng = np.random.default_rng(0)
  a, b, c, d = (list(rng.integers(3, 97, size=n)) for n in (28, 12, 20, 28))
  # 28 tokens each (3 whole blocks), sharing and then differing, so a wrong block shows.
  prompts = [a, a[:16] + b, a[:8] + c, d, a]
  ref = infer.generate(m, p, prompts, max_new_tokens=M).tokens
  for rows in ((0, 1), (2, 3), (4, 1)):
    out = infer.generate(m, p, [prompts[i] for i in rows], max_new_tokens=M, prefix_cache=pc)
    assert out.tokens == [ref[i] for i in rows]
    assert pc.bytes <= pc.max_bytes and len(pc) <= 3
  assert pc.evicted > 0 and pc.hits > 0


def test_keys_are_salted_by_params(model):
  m, p, other = model
  pc = PrefixCache(max_bytes=10**8, block_size=8)
  infer.generate(m, p, PROMPTS[:1], max_new_tokens=M, prefix_cache=pc)
  hits = pc.hits
  ref = infer.generate(m, other, PROMPTS[:1], max_new_tokens=M)
  out = infer.generate(m, other, PROMPTS[:1], max_new_tokens=M, prefix_cache=pc)
  assert pc.hits == hits and out.tokens == ref.tokens  # the other weights found nothing
  again = infer.generate(m, p, PROMPTS[:1], max_new_tokens=M, prefix_cache=pc)
  assert pc.hits == hits + 1 and again.tokens != out.tokens


def test_bad_input(model):
  m, p, _ = model
  for bad in (0, -5, 1.5, None):
    with pytest.raises(ValueError, match="max_bytes"):
      PrefixCache(max_bytes=bad)
  with pytest.raises(ValueError, match="block_size"):
    PrefixCache(max_bytes=100, block_size=0)
  pc = PrefixCache(max_bytes=10**6, block_size=8)
  infer.generate(m, p, PROMPTS[:1], max_new_tokens=2, prefix_cache=pc)
  wide = lmjax.CausalLM(tiny(max_len=128, num_decoder_layers=3))
  with pytest.raises(ValueError, match="made for a model"):
    infer.generate(wide, random_params(wide, (X,), 0), PROMPTS[:1], prefix_cache=pc)
  with pytest.raises(ValueError, match="PrefixCache"):
    infer.generate(m, p, PROMPTS[:1], prefix_cache={"max_bytes": 10})
  s2s = lmjax.Seq2SeqLM(tiny("seq2seq"))
  with pytest.raises(ValueError, match="CausalLM"):
    infer.generate(s2s, {}, PROMPTS[:1], prefix_cache=PrefixCache(100), decoder_start_id=1)
