"""Speculative decoding: greedy equals plain greedy; sampled output has the target's law."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infer
import lmjax
from infer import sampling, speculative
from tests.lmjax.helpers import random_params, tiny

X = jnp.ones((1, 4), jnp.int32)


class CharTokenizer:
  """id = the character's code point (3..255); 0 pad, 1 bos, 2 eos."""

  vocab_size, pad_id, bos_id, eos_id = 256, 0, 1, 2

  def encode(self, text):
    return [ord(c) for c in text]

  def decode(self, ids):
    return "".join(chr(i) for i in ids if i >= 3)


@pytest.fixture(scope="module")
def models():
  target = lmjax.CausalLM(tiny(vocab_size=256, max_len=128))
  small = lmjax.CausalLM(tiny(vocab_size=256, max_len=128, num_decoder_layers=1))
  return {"target": (target, random_params(target, (X,), 0)),
          "bad": (target, random_params(target, (X,), 1)),  # same shape, unrelated weights
          "small": (small, random_params(small, (X,), 2))}


# Ragged: 6, 13 and 1 tokens; row 0 repeats itself, so n-gram drafts are kept there.
PROMPTS = [[1, 65, 66, 67, 65, 66], [1] + list(range(70, 82)), [9]]


@pytest.fixture(scope="module")
def plain(models):
  model, params = models["target"]
  return infer.generate(model, params, PROMPTS, max_new_tokens=20)


@pytest.mark.parametrize("drafter", ["target", "small", "bad", "ngram"])
def test_greedy_equals_plain_greedy(models, plain, drafter):
  model, params = models["target"]
  draft = "ngram" if drafter == "ngram" else models[drafter]
  out = infer.generate(model, params, PROMPTS, max_new_tokens=20, draft=draft,
                       num_draft_tokens=3)
  assert out.tokens == plain.tokens
  np.testing.assert_allclose(np.concatenate(out.log_probs), np.concatenate(plain.log_probs),
                             atol=1e-4)
  assert out.stop_reason == plain.stop_reason
  assert sum(out.accepted) <= 3 * sum(out.rounds)
  if drafter != "ngram":  # target / bad (the target's config) draft on the target's cache
    assert speculative.shares_cache(model, draft[0]) == (drafter != "small")
  if drafter == "target":  # the model drafting for itself: every draft is kept
    assert out.acceptance_rate == 1.0 and out.mean_accepted_length == 3.0
    assert out.rounds == [5, 5, 5]  # 1 token from the prefill, then 19 in rounds of 4
  if drafter == "bad":
    assert out.acceptance_rate < 0.2
  assert 0.0 <= out.acceptance_rate <= 1.0


@pytest.mark.parametrize("fmt", ["float32", "bfloat16"])
def test_packed_params_give_the_plain_packed_output(models, fmt):
  """The CPU decode layout (`lmjax.packed`, what plain decoding reads on a CPU): the same tokens
  as plain decoding from the same packed weights. bfloat16: one row with k = 3 checks 4 tokens
  (read as bfloat16 by `lmjax.packed_rows`), three rows with k = 6 check 21 (more than its 16
  rows: widened to float32 once)."""
  model, params = models["target"]
  packed = lmjax.packed.pack(model, params, fmt)
  small = (models["small"][0], lmjax.packed.pack(*models["small"], fmt))
  for prompts, k in (([PROMPTS[0]], 3), (PROMPTS, 6)):
    assert speculative.reads_narrow(packed, len(prompts) * (k + 1)) == (
        fmt == "bfloat16" and k == 3)
    ref = infer.generate(model, packed, prompts, max_new_tokens=16)
    for draft in ("ngram", small):
      out = infer.generate(model, packed, prompts, max_new_tokens=16, draft=draft,
                           num_draft_tokens=k)
      assert out.tokens == ref.tokens, (fmt, k, draft)
  # `stream` runs the same round from Python (the check's params made once, before it).
  result = infer.drain(infer.stream(model, packed, [PROMPTS[0]], max_new_tokens=16,
                                    draft="ngram", num_draft_tokens=3), lambda _: None)
  assert result.tokens == infer.generate(model, packed, [PROMPTS[0]], max_new_tokens=16).tokens


def _hoisted_weights(hlo: str) -> list[str]:
  """Lines of a compiled module's ENTRY computation (outside every loop) that widen an int8 or
  bfloat16 parameter to a float32 array of the same shape for the loop (their op names say
  `while/body`: hoisted out of it): a weight copy made before the loop, read by every step."""
  entry = hlo[hlo.index("\nENTRY "):]
  entry = entry[:entry.index("\n}")]
  narrow = dict(re.findall(r"%(\S+) = (?:s8|bf16)(\[[\d,]+\])\S* parameter", entry))
  return [line for line in entry.splitlines()
          if (m := re.search(r"= f32(\[[\d,]+\])\S* (?:fusion|convert)\(([^)]*)\)", line))
          and any(narrow.get(a.strip().lstrip("%")) == m.group(1) for a in m.group(2).split(","))
          and "/while/body/" in line]


@pytest.mark.parametrize("fmt", ["int8", "bfloat16"])
def test_a_packed_drafter_reads_its_own_weights_inside_the_loop(models, fmt):
  """A drafter packed in int8 (or bfloat16) is read as such by its steps inside the compiled
  speculative loop: no float32 copy of its weights is made before the loop (XLA hoisted one
  when the loop-variance barrier held the weights alone: a self-drafter's steps read 4x the
  bytes). The tokens are still the plain greedy tokens of the target."""
  model, params = models["target"]
  packed = lmjax.packed.pack(model, params, "float32")
  draft = (models["small"][0], lmjax.packed.pack(*models["small"], fmt))
  ref = infer.generate(model, packed, [PROMPTS[0]], max_new_tokens=12)
  out = infer.generate(model, packed, [PROMPTS[0]], max_new_tokens=12, draft=draft,
                       num_draft_tokens=3)
  assert out.tokens == ref.tokens
  req = infer.requests.prepare(model, [PROMPTS[0]], max_new_tokens=12)
  r = speculative.setup(model, packed, speculative.check(model, req, None, draft=draft, k=3), 3)
  hlo = r.decoder.run.lower(r.params, r.draft_params, r.inputs, r.req.consts).compile().as_text()
  assert "while" in hlo and not _hoisted_weights(hlo), _hoisted_weights(hlo)[:3]


def test_reads_narrow_only_bfloat16_packed_few_rows(models):
  """The k + 1-token check reads bfloat16 packed weights as they are for 2..16 rows only."""
  model, params = models["target"]
  bf16, f32 = (lmjax.packed.pack(model, params, f) for f in ("bfloat16", "float32"))
  assert [speculative.reads_narrow(bf16, r) for r in (1, 2, 16, 17)] == [False, True, True,
                                                                          False]
  assert not speculative.reads_narrow(f32, 4) and not speculative.reads_narrow(params, 4)


def test_ngram_without_a_match_takes_plain_steps(models):
  """A prompt with no repeated token: rounds with no n-gram match are single plain steps (no
  drafts counted), and the output is still plain greedy's."""
  model, params = models["target"]
  prompt = [1] + list(range(100, 110))
  ref = infer.generate(model, params, [prompt], max_new_tokens=12, ignore_eos=True)
  out = infer.generate(model, params, [prompt], max_new_tokens=12, ignore_eos=True,
                       draft="ngram", num_draft_tokens=4)
  assert out.tokens == ref.tokens
  checks = out.drafted[0] // 4
  singles = out.rounds[0] - checks
  assert checks + singles == out.rounds[0] and singles >= 1
  assert singles + checks + out.accepted[0] >= 11  # tokens after the prefill's first one


def test_rows_accept_differently_and_stop_inside_a_draft(models):
  """EOS, a token-id stop and a stop string land inside drafts; k exceeds the budget."""
  model, params = models["target"]
  tok = CharTokenizer()
  ref = infer.generate(model, params, PROMPTS, max_new_tokens=20, ignore_eos=True)
  eos = ref.tokens[0][6]  # row 0 ends at its 7th token (inside a round of 4)
  stop_ids = ref.tokens[1][8:10]  # row 1 at its 10th
  text = tok.decode(ref.tokens[2][:12])
  stop_str = text[-2:] if len(text) >= 2 else None
  kw = dict(max_new_tokens=20, eos_id=eos, stop=[stop_ids] + ([stop_str] if stop_str else []),
            tokenizer=tok)
  base = infer.generate(model, params, PROMPTS, **kw)
  for draft, k in ((models["target"], 3), ("ngram", 5)):
    out = infer.generate(model, params, PROMPTS, draft=draft, num_draft_tokens=k, **kw)
    assert out.tokens == base.tokens and out.text == base.text
    assert out.stop_reason == base.stop_reason
  assert base.stop_reason[0] == "eos" and base.stop_reason[1] == "stop"
  # Without the stops the rows keep different numbers of n-gram drafts (2- and 3-gram matches).
  free = infer.generate(model, params, PROMPTS, max_new_tokens=20, ignore_eos=True,
                        draft="ngram", num_draft_tokens=5)
  assert free.tokens == ref.tokens and len(set(free.accepted)) > 1
  # k larger than the budget left: 2 new tokens, rounds of 4 (the greedy test's loop).
  short = infer.generate(model, params, PROMPTS, max_new_tokens=2, draft=models["target"],
                         num_draft_tokens=3)
  assert short.tokens == [t[:2] for t in ref.tokens]


def test_stream_with_a_drafter_gives_generates_text(models):
  """`stream(draft=...)`: the steps' texts join to `generate(draft=...)`'s and plain greedy's;
  a stop string completed inside a kept draft (the model drafting for itself keeps them all)
  is never shown, nor the kept drafts after it."""
  model, params = models["target"]
  tok = CharTokenizer()
  free = infer.generate(model, params, PROMPTS, max_new_tokens=20, ignore_eos=True,
                        tokenizer=tok)
  # Row 0's 7th token (a draft of the second round of 4) completes the stop string.
  stop = free.text[0][5:7]
  kw = dict(max_new_tokens=20, ignore_eos=True, tokenizer=tok, stop=[stop])
  plain = infer.generate(model, params, PROMPTS, **kw)
  assert plain.stop_reason[0] == "stop" and stop not in plain.text[0]
  for draft in (models["target"], "ngram"):  # a model drafter (all kept), and no model
    ref = infer.generate(model, params, PROMPTS, draft=draft, num_draft_tokens=3, **kw)
    steps = []
    result = infer.drain(infer.stream(model, params, PROMPTS, draft=draft, num_draft_tokens=3,
                                      **kw), steps.append)
    for r in range(len(PROMPTS)):
      text = "".join(s.text[r] for s in steps)
      assert text == ref.text[r] == plain.text[r]
      assert [int(s.tokens[r]) for s in steps if s.active[r]] == plain.tokens[r]
    assert not any(stop in s.text[0] for s in steps)
    assert result.tokens == plain.tokens and result.stop_reason == plain.stop_reason
    assert result.accepted == ref.accepted and result.rounds == ref.rounds


def test_once_runs_its_function_only_when_asked():
  """`_once`, the rounds' `lax.cond` replacement (a while loop of 0 or 1 trips: a cond copied
  every layer's KV cache each round): fn's result when pred holds, the state as it was else."""
  f = jax.jit(lambda p, x: speculative._once(p, lambda s: {"a": s["a"] * 2 + 1}, {"a": x}))
  x = jnp.arange(3.0)
  np.testing.assert_array_equal(f(jnp.asarray(True), x)["a"], x * 2 + 1)
  np.testing.assert_array_equal(f(jnp.asarray(False), x)["a"], x)


def test_draws_filtered_logits_are_the_checks_draft_distributions():
  """`spec_rule.draw` (the drafter's sampler, filtering each draft's logits once): the tokens
  of `infer.sampling.sample_logits` for the same keys, and filtered logits whose
  `sampler_probs(..., filtered=True)` equal the distributions `sampler_probs` gives the raw
  logits (the q the rule must divide by), per row: temperatures 0.8 / 0 / 1.3 / 0.5 with
  top-k and top-p; greedy flags: the argmax."""
  from infer import spec_rule
  logits = jax.random.normal(jax.random.key(0), (4, 40)) * 3
  keys = jax.random.split(jax.random.key(1), 4)
  consts = {"temperature": jnp.asarray([0.8, 0.0, 1.3, 0.5]),
            "top_k": jnp.asarray([5, 40, 40, 12], jnp.int32),
            "top_p": jnp.asarray([0.9, 1.0, 0.6, 1.0])}
  flags = {"use_top_k": True, "use_top_p": True, "greedy": False}

  @jax.jit
  def both(logits, keys, consts):
    tok, x = spec_rule.draw(logits, keys, consts, flags)
    ref = sampling.sample_logits(logits, keys, consts["temperature"], consts["top_k"],
                                 consts["top_p"], **flags)
    return (tok, ref, spec_rule.sampler_probs(x[:, None], consts, flags, filtered=True),
            spec_rule.sampler_probs(logits[:, None], consts, flags),
            spec_rule.draw(logits, keys, consts, dict(flags, greedy=True))[0])
  tok, ref, q, q_ref, best = both(logits, keys, consts)
  np.testing.assert_array_equal(tok, ref)
  np.testing.assert_allclose(q, q_ref, atol=1e-7)
  np.testing.assert_array_equal(best, np.argmax(logits, axis=-1))


# --------------------------------------------------------------------- the rule itself


def _first_tokens(rule, p, q, n, seed):
  """The first and second emitted tokens of `n` rounds of `rule` with k = 2 fixed p, q."""
  key = jax.random.key(seed)
  kd, ku, kr = jax.random.split(key, 3)
  k = q.shape[0]
  drafts = jax.vmap(lambda kk: jax.random.categorical(kk, jnp.log(q), axis=-1))(
      jax.random.split(kd, n)).astype(jnp.int32)  # [n, k]
  u = jax.random.uniform(ku, (n, k))
  pb = jnp.broadcast_to(p, (n,) + p.shape)
  qb = jnp.broadcast_to(q, (n,) + q.shape)
  m, tok = rule(pb, qb, drafts, u, jax.random.split(kr, n))
  first = np.where(np.asarray(m) >= 1, np.asarray(drafts[:, 0]), np.asarray(tok))
  second = np.where(np.asarray(m) >= 2, np.asarray(drafts[:, 1]), np.asarray(tok))
  return first, second[np.asarray(m) >= 1]


def _wrong_resample(p, q, drafts, u, keys):
  """A wrong rule: on rejection draw from p itself instead of the residual."""
  n, _ = speculative.accept(p, q, drafts, u, keys)
  pick = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]
  return n, jax.vmap(jax.random.categorical)(keys, jnp.log(pick)).astype(jnp.int32)


def _wrong_match(p, q, drafts, u, keys):
  """A wrong rule: keep a draft when the target's own sample equals it."""
  del u
  k = drafts.shape[1]
  own = jax.vmap(lambda kk, pr: jax.random.categorical(kk, jnp.log(pr[:k]), axis=-1))(
      jax.vmap(lambda kk: jax.random.fold_in(kk, 7))(keys), p)
  n = jnp.sum(jnp.cumprod((own == drafts).astype(jnp.int32), axis=1), axis=1)
  _, tok = speculative.accept(p, q, drafts, jnp.ones_like(drafts, jnp.float32), keys)
  return n, tok


def _tv(samples, probs):
  counts = np.bincount(samples, minlength=len(probs)) / len(samples)
  return 0.5 * np.abs(counts - probs).sum()


def test_rejection_rule_preserves_the_target_distribution():
  rng = np.random.default_rng(0)
  v = 6
  p = rng.dirichlet(np.ones(v), size=3)  # k + 1 = 3 positions
  p[1, 4] = 0.0  # a token the target never takes (as after top-k / top-p)
  p[1] /= p[1].sum()
  q = rng.dirichlet(np.ones(v) * 0.5, size=2)
  q_point = np.eye(v)[[2, 4]]  # a deterministic drafter (n-gram): point masses
  for qq in (q, q_point):
    pj, qj = jnp.asarray(p, jnp.float32), jnp.asarray(qq, jnp.float32)
    tvs = []
    for n in (2_000, 64_000):
      first, second = _first_tokens(speculative.accept, pj, qj, n, seed=n)
      tvs.append((_tv(first, p[0]), _tv(second, p[1]), len(second)))
    for (tv1, tv2, n2), n in zip(tvs, (2_000, 64_000)):
      assert tv1 < 2.0 * np.sqrt(v / n), (tv1, n)  # E[TV] ~ sqrt(V / (2 pi n))
      if n2 > 100:
        assert tv2 < 2.0 * np.sqrt(v / n2), (tv2, n2)
    assert tvs[1][0] < tvs[0][0]  # shrinking with n
  # The same test catches wrong rules.
  pj, qj = jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32)
  for wrong in (_wrong_resample, _wrong_match):
    first, _ = _first_tokens(wrong, pj, qj, 64_000, seed=1)
    assert _tv(first, p[0]) > 4.0 * np.sqrt(v / 64_000), wrong.__name__


# ------------------------------------------------------------ sampled, end to end


def _np_sampler_probs(logits, temperature, top_k, top_p):
  """The sampler's distribution in float64 numpy (temperature, top-k, top-p; ties low id)."""
  x = np.asarray(logits, np.float64) / temperature
  order = np.argsort(-x, kind="stable")
  keep = np.zeros_like(x, bool)
  keep[order[:top_k]] = True
  xs = np.where(keep, x, -np.inf)
  pr = np.exp(xs - xs.max())
  pr /= pr.sum()
  ps = pr[order]
  before = np.cumsum(ps) - ps
  keep2 = np.zeros_like(keep)
  keep2[order[before < top_p]] = True
  pr = np.where(keep & keep2, pr, 0.0)
  return pr / pr.sum()


def test_sampled_speculative_matches_the_target_sampler():
  v = 8
  target = lmjax.CausalLM(tiny(vocab_size=v, max_len=32))
  draft = lmjax.CausalLM(tiny(vocab_size=v, max_len=32, num_decoder_layers=1))
  tp = random_params(target, (X,), 3)
  dp = random_params(draft, (X,), 4)
  smp = sampling.Sampler(temperature=0.8, top_k=6, top_p=0.95)
  prompt = [1, 5, 3]
  n = 12_000
  out = infer.generate(target, tp, [prompt] * n, max_new_tokens=3, sampler=smp, seed=11,
                       draft=(draft, dp), num_draft_tokens=2, cache_size=16, cache_multiple=8)
  toks = np.asarray(out.tokens)
  assert 0.05 < out.acceptance_rate < 0.95  # both branches of the rule are exercised
  # Exact law of tokens 2 and 3 (made by the rounds) given token 1, from no-cache forwards.
  ctx = np.asarray([prompt + [a, b] for a in range(v) for b in range(v)])
  logits = np.asarray(target.apply({"params": tp}, jnp.asarray(ctx)), np.float64)
  p2 = np.stack([_np_sampler_probs(logits[a * v, 3], 0.8, 6, 0.95) for a in range(v)])
  p3 = np.stack([_np_sampler_probs(logits[i, 4], 0.8, 6, 0.95) for i in range(v * v)])
  for a in range(v):
    rows = toks[toks[:, 0] == a]
    if len(rows) < 500:
      continue
    assert _tv(rows[:, 1], p2[a]) < 2.5 * np.sqrt(v / len(rows)), a
    pair = rows[:, 1] * v + rows[:, 2]
    joint = (p2[a][:, None] * p3[a * v:(a + 1) * v]).ravel()
    assert _tv(pair, joint) < 2.5 * np.sqrt(v * v / len(rows)), a


# ------------------------------------------------------------------------ bad input


def test_bad_drafters_are_refused_before_compute(models):
  model, params = models["target"]
  other = lmjax.CausalLM(tiny(vocab_size=97))
  with pytest.raises(ValueError, match="vocabulary"):
    infer.generate(model, params, PROMPTS, draft=(other, params))
  with pytest.raises(ValueError, match="num_draft_tokens"):
    infer.generate(model, params, PROMPTS, draft="ngram", num_draft_tokens=0)
  with pytest.raises(ValueError, match="ngram"):
    infer.generate(model, params, PROMPTS, draft="bigram")
  with pytest.raises(ValueError, match="too small"):
    infer.generate(model, params, PROMPTS, draft="ngram", max_new_tokens=20, cache_size=33)

  class OtherTok(CharTokenizer):
    def decode(self, ids):
      return "".join(chr(i + 1) for i in ids)
  with pytest.raises(ValueError, match="tokenizer"):
    infer.generate(model, params, PROMPTS, tokenizer=CharTokenizer(),
                   draft=(*models["small"], OtherTok()))
