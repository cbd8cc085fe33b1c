"""Tests of lmjax.tokenizer: training, round trips, normalization rules, fixed ids, the cache."""

import pickle
import random

import numpy as np
import pytest
import sentencepiece as spm

from lmjax import tokenizer as tk

WORDS = ("the king queen lord lady sword crown night day love death heart blood hand eye "
         "speak hear come go thou thee thy art hath doth shall will would good sweet fair").split()


def _corpus(n_lines=3000, seed=0):
  rng = random.Random(seed)
  lines = []
  for _ in range(n_lines):
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
    words[0] = words[0].capitalize()
    lines.append(" ".join(words) + rng.choice([".", ",", "!", "?", ";"]) + f" {rng.randint(0, 99)}")
  return ["\n".join(lines[i : i + 20]) for i in range(0, n_lines, 20)]


SMALL = dict(vocab_size=400, num_sentinels=8, input_sentence_size=0)


@pytest.fixture(scope="module")
def corpus():
  return _corpus()


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory):
  return tk.train_tokenizer(corpus, tk.TokenizerConfig(**SMALL),
                            cache_dir=tmp_path_factory.mktemp("cache"))


def test_special_ids_are_fixed(tok):
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 4)
  assert tok.sentinel_ids == tuple(range(5, 13))
  pieces = [tok.id_to_piece(i) for i in range(13)]
  assert pieces == ["<pad>", "<s>", "</s>", "<unk>", "<mask>"] + [f"<extra_id_{i}>" for i in
                                                                  range(8)]
  assert tok.vocab_size == spm.SentencePieceProcessor(model_proto=tok.model_proto).vocab_size()
  assert 300 < tok.vocab_size <= 400
  assert isinstance(tok, tk.Tokenizer)
  # Special strings map to their ids; bos/eos flags put the ids at the ends.
  assert tok.encode("<mask>") == [4]
  assert tok.encode("<extra_id_3>") == [8]
  ids = tok.encode("the king", add_bos=True, add_eos=True)
  assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1] and 2 not in ids[1:-1]


@pytest.mark.parametrize("text", [
    "The king hath spoken.",
    "Line one\nline two\n\nA new paragraph, 42 of them!",
    "Unseen: Zebra-quux 3.14159 ~ {braces} é ü 日本 \U0001F600",
    "tabs\tand  double  spaces stay when not folded",
])
def test_round_trip(tok, text):
  text = tok.normalize(text)
  ids = tok.encode(text)
  assert all(0 <= i < tok.vocab_size for i in ids)
  assert tok.unk_id not in ids  # byte fallback covers everything
  assert tok.decode(ids) == text
  assert tok.decode(np.asarray(ids, np.int32)) == text


def test_batch_encode_decode(tok):
  texts = ["The lord speaks.", "Fair lady, good night!", ""]
  batch = tok.encode(texts, add_eos=True)
  assert batch == [tok.encode(t, add_eos=True) for t in texts]
  padded = np.zeros((3, max(map(len, batch))), np.int32)
  for row, ids in zip(padded, batch):
    row[: len(ids)] = ids
  assert tok.decode(padded) == texts  # pad and eos are dropped
  assert tok.decode(batch) == texts


@pytest.mark.parametrize("rule,raw,expected", [
    ("nfkc", "ﬁne ＡＢＣ ①", "fine ABC 1"),
    ("strip_accents", "café naïve Ångström", "cafe naive Angstrom"),
    ("lowercase", "The KING", "the king"),
    ("fold_whitespace", "  a \t\u2003 b  \r\n  c\n\n\n\nd  ", "a b\nc\n\nd"),
])
def test_each_normalization_rule(rule, raw, expected):
  off = tk.NormalizationConfig(nfkc=False, fold_whitespace=False)
  assert tk.normalize_text(raw, off) == raw
  on = tk.NormalizationConfig(**{"nfkc": False, "fold_whitespace": False, rule: True})
  assert tk.normalize_text(raw, on) == expected


def test_normalization_applies_at_encoding(tok, corpus):
  # Default: NFKC and whitespace folding, case and accents kept.
  assert tok.encode("ＴＨＥ  king") == tok.encode("THE king")
  assert tok.encode("The king") != tok.encode("the king")
  cfg = tk.TokenizerConfig(**SMALL, normalization=tk.NormalizationConfig(
      lowercase=True, strip_accents=True))
  low = tk.train_tokenizer(corpus, cfg, use_cache=False)
  assert low.encode("The KÍNG") == low.encode("the king")


@pytest.mark.parametrize("text,seen", [
    ("ROMEO:\n", "ROMEO:\n"),  # the demo report's prompt
    ("\n\n", "\n\n"),  # the README's stop string
    ("\nThe king ", "\nThe king "),
    ("  The\tking  \n\n\n\n", " The king\n\n"),  # ends folded like the inside, not stripped
])
def test_encode_keeps_the_ends_of_the_text(tok, text, seen):
  """Normalization must not change what a prompt means: `encode` keeps leading and trailing
  whitespace (folded by the same rules as inside the text); training text is still stripped."""
  assert tok.normalize(text) == seen
  ids = tok.encode(text)
  assert tok.decode(ids) == seen
  assert tok.encode([text]) == [ids]
  assert tk.normalize_text(text, tok.normalization) == seen.strip()  # training: stripped
  if seen.strip():
    stripped = tok.encode(seen.strip())
    assert ids != stripped and tok.decode(stripped) == seen.strip()


def test_normalization_applies_at_training():
  # Fullwidth, upper-case text: with NFKC + lowercase no learned piece may hold either.
  rng = random.Random(1)
  corpus = [" ".join(rng.choice(["ＫＩＮＧ", "ＱＵＥＥＮ", "Lord", "Crown"]) for _ in range(10))
            for _ in range(300)]
  cfg = tk.TokenizerConfig(**SMALL, normalization=tk.NormalizationConfig(lowercase=True))
  t = tk.train_tokenizer(corpus, cfg, use_cache=False)
  learned = [t.id_to_piece(i) for i in range(t.vocab_size)
             if not t.id_to_piece(i).startswith("<")]
  assert "king" in learned or "▁king" in learned
  assert not any(any(c.isupper() or ord(c) >= 0xFF00 for c in p) for p in learned)


def test_bpe_and_unigram(corpus):
  # BPE stores merge ranks as scores (0, -1, -2, ...); unigram stores log-probabilities.
  for model_type, integral in (("bpe", True), ("unigram", False)):
    t = tk.train_tokenizer(corpus, tk.TokenizerConfig(**SMALL, model_type=model_type),
                           use_cache=False)
    sp = spm.SentencePieceProcessor(model_proto=t.model_proto)
    scores = [sp.get_score(i) for i in range(sp.vocab_size())
              if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))
              and not sp.id_to_piece(i).startswith("<") and sp.id_to_piece(i) != "\n"]
    assert all(float(s).is_integer() for s in scores) == integral
    text = "Sweet lady, thy heart doth speak."
    assert t.decode(t.encode(text)) == text


def test_cache_is_reused(corpus, tmp_path, monkeypatch):
  cfg = tk.TokenizerConfig(**SMALL)
  first = tk.train_tokenizer(corpus, cfg, cache_dir=tmp_path)
  assert len(list(tmp_path.glob("*.model"))) == 1

  def no_training(*args, **kwargs):
    raise AssertionError("trained again instead of reading the cache")

  monkeypatch.setattr(spm.SentencePieceTrainer, "train", no_training)
  second = tk.train_tokenizer(corpus, cfg, cache_dir=tmp_path)
  assert second.model_proto == first.model_proto
  assert second.normalization == first.normalization
  # Another corpus or other settings are other keys, so they train.
  with pytest.raises(AssertionError, match="trained again"):
    tk.train_tokenizer(corpus[:-1], cfg, cache_dir=tmp_path)
  with pytest.raises(AssertionError, match="trained again"):
    tk.train_tokenizer(corpus, tk.TokenizerConfig(**SMALL, seed=1), cache_dir=tmp_path)
  # The environment variable moves the default cache.
  monkeypatch.setenv("LMJAX_TOKENIZER_CACHE", str(tmp_path))
  assert tk.train_tokenizer(corpus, cfg).model_proto == first.model_proto


def test_save_load_and_pickle(tok, tmp_path):
  path = tok.save(tmp_path / "t.model")
  loaded = tk.SentencePieceTokenizer.load(path)
  text = "ＴＨＥ   king\n\n\n\nspeaks"
  assert loaded.normalization == tok.normalization
  assert loaded.encode(text) == tok.encode(text) == tok.encode("THE king\n\nspeaks")
  assert pickle.loads(pickle.dumps(tok)).encode(text) == tok.encode(text)
  with pytest.raises(FileNotFoundError, match="nowhere.model"):
    tk.SentencePieceTokenizer.load(tmp_path / "nowhere.model")


def test_config_errors(corpus):
  with pytest.raises(ValueError, match=r"model_type='wordpiece'.*bpe.*unigram"):
    tk.TokenizerConfig(model_type="wordpiece")
  with pytest.raises(ValueError, match="vocab_size=300"):
    tk.TokenizerConfig(vocab_size=300)
  with pytest.raises(ValueError, match="no non-empty text"):
    tk.train_tokenizer(["", "  \n "], tk.TokenizerConfig(**SMALL), use_cache=False)
