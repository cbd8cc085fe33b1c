"""Decoding: cached loop vs recompute, batch vs alone, stops, streaming, best-of, bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infer
import lmjax
from infer import decode, sampling
from tests.lmjax.helpers import random_params, tiny

TOL = dict(rtol=1e-5, atol=1e-5)
M = 10  # max_new_tokens of most runs


class CharTokenizer:
  """A fake tokenizer: id = the character's code point (3..255); 0 pad, 1 bos, 2 eos."""

  vocab_size, pad_id, bos_id, eos_id = 256, 0, 1, 2
  chat_template = None

  def encode(self, text):
    return [ord(c) for c in text]

  def decode(self, ids):
    return "".join(chr(i) for i in ids if i >= 3)


@pytest.fixture(scope="module")
def causal():
  cfg = lmjax.TransformerConfig.from_preset("tiny", max_len=64)
  model = lmjax.CausalLM(cfg)
  return model, random_params(model, (jnp.ones((1, 4), jnp.int32),), 0)


@pytest.fixture(scope="module")
def seq2seq():
  cfg = tiny("seq2seq")
  model = lmjax.Seq2SeqLM(cfg)
  x = jnp.ones((1, 4), jnp.int32)
  return model, random_params(model, (x, x), 3)


TEXTS = ["ab", "hello wor", "the quick brown"]  # 3, 10 and 16 tokens with the BOS
PROMPTS = [[1] + [ord(c) for c in s] for s in TEXTS]
# Row 0 greedy, rows 1 and 2 sampled (top-p), one compiled plan for the batch and for each alone.
MIXED = sampling.Sampler(temperature=[0.0, 1.0, 0.7], top_p=[1.0, 0.9, 0.8])
SEEDS = [5, 6, 7]


def _alone_sampler(i):
  return sampling.Sampler(temperature=[MIXED.temperature[i]], top_p=[MIXED.top_p[i]])


@pytest.fixture(scope="module")
def batched(causal):
  model, p = causal
  return infer.generate(model, p, PROMPTS, max_new_tokens=M, sampler=MIXED, seed=SEEDS)


REF_LEN = 32  # the no-cache reference runs at one padded shape (one compile)


def _padded(seqs, length=REF_LEN):
  tokens = np.zeros((len(seqs), length), np.int32)
  seg = np.zeros((len(seqs), length), np.int32)
  for i, s in enumerate(seqs):
    tokens[i, :len(s)], seg[i, :len(s)] = s, 1
  return jnp.asarray(tokens), jnp.asarray(seg)


def _full_last_logits(model, p, seq):
  """No cache: a full forward pass over `seq` (right-padded, segment ids), its last logits."""
  tokens, seg = _padded([seq])
  logits = _apply(model)(p, tokens, seg)
  return np.asarray(logits[0, len(seq) - 1])


_APPLY = {}


def _apply(model):
  if model not in _APPLY:
    if isinstance(model, lmjax.Seq2SeqLM):
      _APPLY[model] = jax.jit(lambda p, enc, enc_seg, dec, dec_seg: model.apply(
          {"params": p}, enc, dec, encoder_segment_ids=enc_seg, decoder_segment_ids=dec_seg))
    else:
      _APPLY[model] = jax.jit(lambda p, t, s: model.apply({"params": p}, t, segment_ids=s))
  return _APPLY[model]


def test_cached_loop_equals_recompute_causal(causal):
  """Each step's logits equal a no-cache forward over the sequence so far; greedy tokens match a
  recompute-everything greedy loop. Two samples per prompt (the prefilled cache is repeated)."""
  model, p = causal
  prompts = [PROMPTS[0], PROMPTS[1]]
  sampler = sampling.Sampler(temperature=[0.0, 1.0], top_k=[256, 20])
  out = infer.generate(model, p, prompts, max_new_tokens=8, sampler=sampler, seed=1,
                       num_samples=2, return_logits=True)
  assert len(out) == 4 and out.tokens[0] == out.tokens[1] and out.tokens[2] != out.tokens[3]
  for r in range(4):
    seq = list(prompts[r // 2])
    for t, tok in enumerate(out.tokens[r]):
      ref = _full_last_logits(model, p, seq)
      np.testing.assert_allclose(out.logits[r][t], ref, **TOL)
      if r < 2:  # greedy: the recompute loop picks the same token
        assert tok == int(np.argmax(ref))
      seq.append(tok)
    assert len(out.tokens[r]) == 8 and out.stop_reason[r] == "length"
    lp = jax.nn.log_softmax(jnp.asarray(out.logits[r]), axis=-1)
    np.testing.assert_allclose(out.log_probs[r], lp[np.arange(8), out.tokens[r]], **TOL)


def test_cached_loop_equals_recompute_seq2seq(seq2seq):
  model, p = seq2seq
  prompts = [[5, 9, 11], [7, 3, 3, 8, 20, 4, 6]]
  sampler = sampling.Sampler(temperature=[0.0, 1.0])
  out = infer.generate(model, p, prompts, max_new_tokens=6, sampler=sampler, seed=2,
                       decoder_start_id=1, num_samples=2, return_logits=True)
  assert out.tokens[0] == out.tokens[1] and out.tokens[2] != out.tokens[3]
  for r in range(4):
    enc, enc_seg = _padded([prompts[r // 2]], 8)
    dec = [1]
    for t, tok in enumerate(out.tokens[r]):
      ref = _apply(model)(p, enc, enc_seg, *_padded([dec], 8))
      ref = np.asarray(ref[0, len(dec) - 1])
      np.testing.assert_allclose(out.logits[r][t], ref, **TOL)
      if r < 2:
        assert tok == int(np.argmax(ref))
      dec.append(tok)
    assert len(out.tokens[r]) == 6


def test_batched_equals_alone(causal, batched):
  """Prompts of 3, 10 and 16 tokens in one batch give each row's tokens decoded alone (greedy
  row 0, sampled rows 1-2: per-prompt seeds make a row's randomness its own)."""
  model, p = causal
  assert len({len(t) for t in PROMPTS}) == 3
  for i, prompt in enumerate(PROMPTS):
    alone = infer.generate(model, p, [prompt], max_new_tokens=M, sampler=_alone_sampler(i),
                           seed=[SEEDS[i]])
    assert alone.tokens[0] == batched.tokens[i], i
    np.testing.assert_allclose(alone.log_probs[0], batched.log_probs[i], rtol=1e-5, atol=1e-5)
  assert len({tuple(t) for t in batched.tokens}) == 3


def _expected_stop(tokens, eos, stops, limit):
  """The reference stopping rule on an unconstrained run: (kept tokens, reason)."""
  for t in range(len(tokens)):
    if tokens[t] in eos:
      return tokens[:t + 1], "eos"
    if any(t + 1 >= len(s) and tokens[t + 1 - len(s):t + 1] == s for s in stops):
      return tokens[:t + 1], "stop"
    if t + 1 == limit:
      return tokens[:t + 1], "length"
  raise AssertionError("run too short")


def _stop_setup(batched):
  eos = batched.tokens[0][4]
  stop_seq = batched.tokens[1][5:7]
  expected = [_expected_stop(t, {eos}, [stop_seq], M) for t in batched.tokens]
  return eos, stop_seq, expected


def test_stops_end_each_row_at_the_right_token(causal, batched):
  """EOS, a stop sequence, and max length each end their row where the rule says; string
  prompts and text go through the tokenizer."""
  model, p = causal
  eos, stop_seq, expected = _stop_setup(batched)
  assert {r for _, r in expected} == {"eos", "stop", "length"}, expected
  tok = CharTokenizer()
  out = infer.generate(model, p, TEXTS, tokenizer=tok, max_new_tokens=M, sampler=MIXED,
                       seed=SEEDS, eos_id=eos, stop=[stop_seq])
  assert out.prompt_tokens == PROMPTS  # the BOS is added to string prompts
  for i, (want, reason) in enumerate(expected):
    assert out.tokens[i] == want and out.stop_reason[i] == reason
    body = want[:-1] if reason == "eos" else want[:-2] if reason == "stop" else want
    assert out.text[i] == tok.decode(body)
  # The loop exits as soon as every row is done (not after max_new_tokens).
  req = decode.prepare(model, PROMPTS[:2], max_new_tokens=M, eos_id=eos, stop=[stop_seq],
                       sampler=_two(MIXED), seed=SEEDS[:2])
  state = decode.decoder_for(model, req.plan).run(p, req.inputs, req.consts)
  assert int(state["t"]) == max(len(w) for w, _ in expected[:2]) < M
  out_buf = np.asarray(state["out"])
  for i in range(2):  # outputs after the stop are padding
    assert (out_buf[i, len(expected[i][0]):] == 0).all()


def _two(s):
  return sampling.Sampler(temperature=list(s.temperature[:2]), top_p=list(s.top_p[:2]))


def test_stream_equals_compiled_loop(causal, batched):
  model, p = causal
  eos, stop_seq, expected = _stop_setup(batched)
  tok = CharTokenizer()
  kw = dict(tokenizer=tok, max_new_tokens=M, sampler=MIXED, seed=SEEDS, eos_id=eos,
            stop=[stop_seq])
  gen = infer.stream(model, p, TEXTS, **kw)
  steps = []
  result = infer.drain(gen, steps.append)
  assert len(steps) == M
  for i, (want, reason) in enumerate(expected):
    got = [int(s.tokens[i]) for s in steps if s.active[i]]
    assert got == want
    assert [s.stop_reason[i] for s in steps if s.stop_reason[i]] == [reason]
    assert all(int(s.tokens[i]) == tok.pad_id for s in steps if not s.active[i])
    assert "".join(s.text[i] for s in steps) == tok.decode(
        [t for t in want if t != eos])
  compiled = infer.generate(model, p, TEXTS, **kw)
  assert result.tokens == compiled.tokens
  np.testing.assert_allclose(np.concatenate([np.asarray(x) for x in result.log_probs]),
                             np.concatenate([np.asarray(x) for x in compiled.log_probs]),
                             rtol=1e-6, atol=1e-6)


def test_best_of(causal, batched):
  """Best-of-N returns the highest-scoring of the N candidates (mean log-prob by default, or
  any scorer); N = 1 is plain sampling."""
  model, p = causal
  prompts = PROMPTS[1:]
  kw = dict(max_new_tokens=M, sampler=sampling.TopP(0.95), seed=3)
  cands = infer.generate(model, p, prompts, num_samples=4, **kw)
  best = infer.generate(model, p, prompts, best_of=4, **kw)
  assert len(best) == 2
  for i in range(2):
    means = [np.mean(np.asarray(cands.log_probs[i * 4 + j], np.float64)) for j in range(4)]
    assert len(set(map(tuple, cands.tokens[i * 4:i * 4 + 4]))) > 1  # the candidates differ
    assert best.tokens[i] == cands.tokens[i * 4 + int(np.argmax(means))]
    assert best.scores[i] == pytest.approx(max(means), rel=1e-6)

  def count_7s(prompt, cand):
    assert prompt in prompts
    return sum(t % 7 == 0 for t in cand.tokens) - 1e-3 * cand.tokens[0]
  top2 = infer.generate(model, p, prompts, best_of=4, num_samples=2, scorer=count_7s, **kw)
  for i in range(2):
    scores = [count_7s(prompts[i], cands.candidate(i * 4 + j)) for j in range(4)]
    order = np.argsort(-np.asarray(scores), kind="stable")[:2]
    assert top2.tokens[2 * i:2 * i + 2] == [cands.tokens[i * 4 + j] for j in order]
  one = infer.generate(model, p, PROMPTS, best_of=1, max_new_tokens=M, sampler=MIXED,
                       seed=SEEDS)
  assert one.tokens == batched.tokens


def test_string_prompts_get_one_bos(causal):
  model, _ = causal
  tok = CharTokenizer()

  class HFStyle(CharTokenizer):
    add_bos_token = False  # its encode applies its own convention

  def ids(text, t=tok, **kw):
    return decode.prepare(model, text, tokenizer=t, max_new_tokens=2, **kw).prompts[0]
  assert ids("ab") == [1, 97, 98]  # lmjax pretraining puts a BOS first
  assert ids("\x01ab") == [1, 97, 98]  # not twice
  assert ids("ab", add_bos=False) == [97, 98]
  assert ids("ab", t=HFStyle()) == [97, 98]
  assert ids("ab", t=HFStyle(), add_bos=True) == [1, 97, 98]
  assert ids([1, 1, 5]) == [1, 1, 5]  # token ids are used as given


def test_bad_input_raises_before_compute(causal, seq2seq, monkeypatch):
  model, p = causal

  def no_compute(*a, **k):
    raise AssertionError("compute started before the input was checked")
  monkeypatch.setattr(decode, "decoder_for", no_compute)
  tok = CharTokenizer()

  def bad(match, prompts=PROMPTS[:1], m=model, **kw):
    with pytest.raises(ValueError, match=match):
      infer.generate(m, p, prompts, **{"max_new_tokens": 4, **kw})
    with pytest.raises(ValueError, match=match):
      infer.stream(m, p, prompts, **{"max_new_tokens": 4, **kw})
  bad("longer than the model's context", prompts=[[5] * 65])
  bad("passes the model's context", prompts=[[5] * 60], max_new_tokens=5)
  bad("empty", prompts=[[3], []])
  bad("empty string", prompts=[""], tokenizer=tok)
  bad("outside the vocabulary", prompts=[[3, 256]])
  bad("outside the vocabulary", prompts=[[3, -1]])
  bad("too small", cache_size=8, prompts=[[3] * 6])
  bad("max_new_tokens", max_new_tokens=0)
  bad("top_k.*vocabulary size", sampler=sampling.TopK(257))
  bad("string prompts need a tokenizer", prompts=["hi"])
  bad("per-row sampler parameters", prompts=PROMPTS, sampler=sampling.Temperature([1.0, 0.5]))
  bad("seed", seed=[1, 2])
  bad("stop sequence .* empty", stop=[[]])
  bad("CausalLM or lmjax.Seq2SeqLM", m=lmjax.MaskedLM(tiny("masked")))
  with pytest.raises(ValueError, match="top_p"):
    sampling.TopP(1.5)
  with pytest.raises(ValueError, match="top_p"):
    sampling.TopP(0.0)
  with pytest.raises(ValueError, match="top_k"):
    sampling.TopK(0)
  with pytest.raises(ValueError, match="temperature"):
    sampling.Temperature(-0.5)
  with pytest.raises(ValueError, match="best_of"):
    infer.generate(model, p, PROMPTS, best_of=1, num_samples=2)
  s2s, _ = seq2seq
  with pytest.raises(ValueError, match="decoder's context"):
    infer.generate(s2s, p, [[3, 4]], max_new_tokens=65, decoder_start_id=1)
  with pytest.raises(ValueError, match="decoder_start_id"):
    infer.generate(s2s, p, [[3, 4]], max_new_tokens=4)


def test_command_line(causal, batched, monkeypatch, capsys):
  """`python -m infer` with a stand-in `lmjax.checkpoint.load_run` / `lmjax.load_pretrained`."""
  from infer import __main__ as cli
  model, p = causal
  tok = CharTokenizer()
  monkeypatch.setattr(lmjax.checkpoint, "load_run",
                      lambda workdir: (model.config, p, tok) if workdir == "/run" else None)
  want = batched.tokens[0][:5]  # row 0 of `batched` is greedy from "ab"
  assert tok.eos_id not in want
  args = ["--prompt", "ab", "--sampler", "greedy", "--max-new-tokens", "5"]
  assert cli.main(["--workdir", "/run", *args, "--no-stream"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith("=== prompt 0, sample 0 (length, 5 tokens")
  assert "\n".join(out[1:]) == "ab" + tok.decode(want)
  assert cli.main(["--workdir", "/run", *args, "--stream"]) == 0
  assert capsys.readouterr().out == "ab" + tok.decode(want) + "\n[length, 5 tokens]\n"

  seen = {}

  def load_pretrained(name, dtype, **kw):
    seen.update(name=name, dtype=dtype, **kw)
    return model.config, p, tok
  monkeypatch.setattr(lmjax, "load_pretrained", load_pretrained, raising=False)
  assert cli.main(["--model", "tiny-chat", "--dtype", "bfloat16", "--chat", "hi",
                   "--max-new-tokens", "3", "--sampler", "top-p", "--top-p", "0.5",
                   "--no-stream", "--packed", "none"]) == 0
  assert seen == {"name": "tiny-chat", "dtype": "bfloat16"}  # from Python: no caches
  chat = infer.generate(model, p, "User: hi\nAssistant:", tokenizer=tok, max_new_tokens=3,
                        sampler=sampling.TopP(0.5), seed=0)
  header, body = capsys.readouterr().out.split("\n", 1)
  assert header.startswith("=== prompt 0, sample 0") and body == chat.text[0] + "\n"
  assert cli.main(["--workdir", "/run", "--prompt", "x" * 70, "--no-stream"]) == 2
  assert "longer than the model's context" in capsys.readouterr().err


def test_command_line_packs_the_weights_for_one_sequence_on_a_cpu(causal, monkeypatch, capsys):
  """`--packed auto` (the default): one sequence on a CPU decodes from `lmjax.packed` weights
  in the params' dtype; several sequences, or `--packed none`, from the params as loaded."""
  from infer import __main__ as cli
  model, p = causal
  assert jax.default_backend() == "cpu"
  assert cli.packed_format("auto", False, one_row=True) == "float32"
  assert cli.packed_format("auto", True, one_row=True) == "bfloat16"
  assert cli.packed_format("auto", False, one_row=False) is None
  assert cli.packed_format("none", False, one_row=True) is None
  assert cli.packed_format("bfloat16", False, one_row=False) == "bfloat16"
  assert cli._parser().parse_args(["--model", "m", "--chat", "hi", "--packed"]).packed == (
      "bfloat16")
  seen = []
  real = lmjax.packed.pack
  monkeypatch.setattr(lmjax.packed, "pack", lambda m, q, fmt: seen.append(fmt) or real(m, q, fmt))

  def load_pretrained(name, dtype, packed=None):  # packs at load (lmjax.load_pretrained)
    return model.config, (p if packed is None else real(model, p, packed)), CharTokenizer()
  monkeypatch.setattr(lmjax, "load_pretrained", load_pretrained, raising=False)
  base = ["--model", "tiny", "--max-new-tokens", "2", "--sampler", "greedy", "--no-stream"]
  got = []
  real_generate = infer.decode.generate
  monkeypatch.setattr(infer.decode, "generate", lambda m, q, *a, **k: got.append(
      q.fmt if isinstance(q, lmjax.packed.PackedParams) else None) or real_generate(m, q, *a, **k))
  assert cli.main([*base, "--prompt", "ab"]) == 0
  assert cli.main([*base, "--prompt", "ab", "--prompt", "cd"]) == 0
  assert cli.main([*base, "--prompt", "ab", "--packed", "none"]) == 0
  assert got == ["float32", None, None]
  # --workdir: the run's params, packed after loading, in their own dtype.
  bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p)
  monkeypatch.setattr(lmjax.checkpoint, "load_run", lambda workdir: (model.config, bf16,
                                                                     CharTokenizer()))
  assert cli.main(["--workdir", "/run", *base[2:], "--prompt", "ab", "--timings"]) == 0
  assert seen == ["bfloat16"] and got[-1] == "bfloat16"
  timings = json.loads(capsys.readouterr().err.split("timings: ")[1])
  assert timings["pack_s"] >= 0 and timings["mode"] == "generate"
  assert set(timings) >= {"import_s", "load_s", "compile_s", "first_token_s", "executables",
                          "cache_hits", "process_compiled", "total_s"}


@pytest.mark.parametrize("fmt", lmjax.packed.FORMATS)
@pytest.mark.parametrize("rows", [1, 3])
def test_packed_weights_decode_like_the_same_weights_unpacked(causal, rows, fmt):
  """`lmjax.packed` params (widened inside the loop for one row, hoisted for more) give the
  tokens of the model on the same (bfloat16-rounded or exact float32) weights, compiled and
  streamed."""
  model, p = causal
  def narrow(path, a):  # what packing stores in `fmt`: matrices, the token embedding
    name = jax.tree_util.keystr(path)
    if "kernel" in name or name == "['embed']['embedding']":
      return a.astype(fmt).astype(jnp.float32)
    return a
  rounded = jax.tree_util.tree_map_with_path(narrow, p)
  pk = lmjax.packed.pack(model, p, fmt)
  prompts = PROMPTS[:rows]
  want = infer.generate(model, rounded, prompts, max_new_tokens=M, ignore_eos=True)
  got = infer.generate(model, pk, prompts, max_new_tokens=M, ignore_eos=True)
  assert got.tokens == want.tokens
  assert len(set(want.tokens[-1])) > 1
  for a, b in zip(got.log_probs, want.log_probs):
    np.testing.assert_allclose(a, b, atol=1e-4)
  steps = list(infer.stream(model, pk, prompts, max_new_tokens=M, ignore_eos=True))
  assert np.stack([s.tokens for s in steps], axis=1).tolist() == want.tokens
